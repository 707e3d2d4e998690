//! `ferrite jail` (also the binary run as `jailer`): starts a program — normally
//! Ferrite itself — confined the way Firecracker's jailer confines Firecracker, for
//! root operators running many tenants on one host. The steps, in order (see
//! docs/DESIGN.md, "Jail"):
//!
//! 1. close inherited fds (3 and up); check the flags, the exec file and, with
//!    `--cgroup`, that a cgroup v2 hierarchy is mounted;
//! 2. make `<chroot-base-dir>/<exec name>/<id>/root` ([`fs`]; the id's directory must
//!    not exist), copy the exec file in, link the `--link-file`s in, make `dev`,
//!    `dev/net`, `run` and the device nodes;
//! 3. join `--netns` ([`ns`]); set resource limits ([`privs`]); make the cgroup leaf,
//!    write the limits, move in ([`cgroup`]);
//! 4. new mount namespace, everything private, pivot_root into the jail ([`ns`]);
//! 5. `--daemonize`: fork, setsid, fork, standard streams on /dev/null;
//!    `--new-pid-ns`: fork into a new PID namespace (the parent writes the pid file
//!    and exits 0); else write this process's pid to `/<exec name>.pid`;
//! 6. drop supplementary groups, set gid and uid; exec `/<exec name>` with the
//!    arguments after `--` and an empty environment.
//!
//! A failure before step 4 removes what was made (the id's directory, the cgroup
//! directories); nothing else on the host is removed or changed, except that
//! controllers the `--cgroup` files need are enabled in the ancestors'
//! `cgroup.subtree_control` (which cgroup v2 requires).

pub mod args;
pub mod cgroup;
pub mod fs;
pub mod ns;
pub mod privs;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

pub use args::JailArgs;

/// A jail failure: the failing module's error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Args(#[from] args::Error),
    #[error(transparent)]
    Fs(#[from] fs::Error),
    #[error(transparent)]
    Ns(#[from] ns::Error),
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    #[error(transparent)]
    Privs(#[from] privs::Error),
    #[error("cannot write pid file {path}")]
    PidFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open /dev/null for --daemonize")]
    DevNull(#[source] std::io::Error),
}

/// The command line of the binary run as `jailer`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "jailer",
    about = "Start a program (Ferrite) in a jail, with Firecracker's jailer flags"
)]
struct JailerCli {
    #[command(flatten)]
    args: JailArgs,
}

/// Entry point when the binary is run as `jailer`: Firecracker's jailer command line.
/// As Firecracker's jailer, the program gets `--id <id>` before the arguments after `--`.
pub fn jailer_main(argv: Vec<OsString>) -> i32 {
    use clap::Parser;
    match JailerCli::try_parse_from(argv) {
        Ok(c) => run(c.args, true),
        Err(e) => {
            let _ = e.print();
            if e.use_stderr() {
                2
            } else {
                0
            }
        }
    }
}

/// Runs the jail; returns only on failure (the exit status, after printing the error
/// on one line), or 0 in a parent that forked the program off.
pub fn run(a: JailArgs, pass_id: bool) -> i32 {
    match jail(a, pass_id) {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "ferrite jail: {}",
                crate::errors::chain(&e)
            );
            1
        }
    }
}

fn jail(a: JailArgs, pass_id: bool) -> Result<(), Error> {
    privs::require_root()?;
    privs::close_inherited_fds()?;
    args::parse_id(&a.id)?;
    let (exec_path, exec_name) = fs::exec_file(&a.exec_file)?;
    let cgroup_root = if a.cgroup.is_empty() {
        None
    } else {
        Some(cgroup::host_v2_root()?)
    };
    let uffd_minor = std::fs::read_to_string("/proc/misc")
        .ok()
        .and_then(|m| fs::userfaultfd_minor(&m));

    let jail = fs::JailDir::create(&a.chroot_base_dir, &exec_name, &a.id, a.uid, a.gid)?;
    let mut leaf = None;
    // This process's cgroup v2 path (relative to the hierarchy's root), to go back to.
    let came_from = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("0::/"))
                .map(|p| PathBuf::from(p.trim()))
        });
    let prepared = (|| -> Result<Option<std::fs::File>, Error> {
        jail.copy_in(&exec_path, &exec_name)?;
        let pid_name = format!("{exec_name}.pid");
        let reserved = [exec_name.as_str(), pid_name.as_str(), "dev", "run"];
        for f in &a.link_file {
            jail.link_in(f, &reserved)?;
        }
        jail.populate(uffd_minor)?;
        if let Some(n) = &a.netns {
            ns::join_netns(n)?;
        }
        privs::set_limits(&a.resource_limit)?;
        if let Some(root) = &cgroup_root {
            let parent = a
                .parent_cgroup
                .clone()
                .unwrap_or_else(|| exec_name.clone().into());
            leaf = Some(cgroup::setup(root, &parent, &a.id, &a.cgroup)?);
        }
        let dev_null = if a.daemonize {
            Some(
                std::fs::File::options()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
                    .map_err(Error::DevNull)?,
            )
        } else {
            None
        };
        ns::enter_root(&jail.root)?;
        Ok(dev_null)
    })();
    let dev_null = match prepared {
        Ok(d) => d,
        Err(e) => {
            if let Some(l) = &leaf {
                // Back into the cgroup this process came from, so that the leaf can go.
                if let (Some(root), Some(from)) = (&cgroup_root, &came_from) {
                    let _ = std::fs::write(
                        root.join(from).join("cgroup.procs"),
                        std::process::id().to_string(),
                    );
                }
                l.remove();
            }
            jail.remove();
            return Err(e);
        }
    };

    if let Some(null) = dev_null {
        if let ns::Forked::Parent(_) = ns::fork()? {
            std::process::exit(0);
        }
        ns::setsid()?;
        if let ns::Forked::Parent(_) = ns::fork()? {
            std::process::exit(0);
        }
        privs::redirect_std(&null)?;
    }
    let pid_file = format!("/{exec_name}.pid");
    if a.new_pid_ns {
        let leader = !a.daemonize && ns::is_session_leader();
        ns::unshare_pid()?;
        match ns::fork()? {
            ns::Forked::Parent(pid) => {
                write_pid(&pid_file, pid)?;
                return Ok(());
            }
            ns::Forked::Child => {
                if leader {
                    ns::setsid()?;
                }
            }
        }
    } else {
        write_pid(&pid_file, std::process::id() as libc::pid_t)?;
    }
    privs::drop_to(a.uid, a.gid)?;
    let mut args: Vec<OsString> = Vec::new();
    if pass_id {
        args.push("--id".into());
        args.push(a.id.clone().into());
    }
    args.extend(a.exec_args.iter().cloned());
    Err(privs::exec(&format!("/{exec_name}"), &args).into())
}

fn write_pid(path: &str, pid: libc::pid_t) -> Result<(), Error> {
    let err = |source| Error::PidFile {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(err)?;
    write!(f, "{pid}").map_err(err)
}
