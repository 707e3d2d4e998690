//! Running without root: `PR_SET_NO_NEW_PRIVS` at start (with or without seccomp), a
//! check that the devices a VM needs can be opened read-write (with the fix named when
//! they cannot: "add the user to the kvm group"), and optional Landlock (`--landlock`)
//! restricting file access to what the command line names.
//!
//! Landlock is opt-in: the rule set lists every path Ferrite opens after the start
//! ([`Paths`]); a path opened later that the list does not name (a disk swapped in
//! through the control API, say) is refused with EACCES. Where the kernel lacks Landlock
//! (or it is disabled at boot), `--landlock` logs a warning and the VM runs without it.
//! Landlock covers only the thread that applies it and the threads it starts later, so
//! [`restrict`] runs on the main thread before any other thread exists.
//!
//! Unsafe code: the `prctl` and `faccessat` calls.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, ABI,
};

/// The TUN/TAP clone device that `--net` opens.
pub const TUN_PATH: &str = "/dev/net/tun";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot set PR_SET_NO_NEW_PRIVS")]
    NoNewPrivs(#[source] io::Error),
    #[error("uid {uid} may not open {path} read-write ({hint})")]
    NoAccess {
        path: PathBuf,
        uid: u32,
        hint: String,
        #[source]
        source: io::Error,
    },
    #[error("--landlock: cannot build the rule set")]
    Landlock(#[from] landlock::RulesetError),
    #[error("--landlock: cannot open {path} to allow it")]
    RulePath {
        path: PathBuf,
        #[source]
        source: landlock::PathFdError,
    },
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Sets `PR_SET_NO_NEW_PRIVS`: nothing this process executes can gain privileges
/// (set-uid binaries, file capabilities). Seccomp needs it too; it is set here so it
/// also holds with `--no-seccomp`.
pub fn no_new_privs() -> Result<(), Error> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes no pointers; the result is
    // checked.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if r != 0 {
        return Err(Error::NoNewPrivs(io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether `PR_SET_NO_NEW_PRIVS` is set on the calling thread.
pub fn no_new_privs_set() -> bool {
    // SAFETY: prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) takes no pointers.
    unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1 }
}

/// What an operator does so that `path` can be opened read-write.
fn access_hint(path: &Path) -> String {
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "USER".to_owned());
    if path == Path::new(TUN_PATH) {
        format!(
            "{TUN_PATH} is usually mode 0666; make it readable and writable for the user, \
             and create the TAP device for it beforehand: `ip tuntap add dev NAME mode tap user {user}`"
        )
    } else {
        let group = group_of(path).unwrap_or_else(|| "kvm".to_owned());
        format!(
            "add the user to the {group} group that owns it (`usermod -aG {group} {user}`, then log in \
             again) and make sure the group may read and write it (mode 0660)"
        )
    }
}

/// The name of the group owning `path`, from /etc/group.
fn group_of(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let gid = std::fs::metadata(path).ok()?.gid();
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _pw = f.next()?;
        (f.next()?.parse::<u32>().ok()? == gid && gid != 0).then(|| name.to_owned())
    })
}

/// Checks that the effective uid and groups may open `path` for reading and writing
/// (`faccessat` with `AT_EACCESS`); a refusal is an error naming the fix. A missing
/// path passes: opening it reports that better.
pub fn check_device_access(path: &Path) -> Result<(), Error> {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return Ok(());
    };
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let r = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::R_OK | libc::W_OK,
            libc::AT_EACCESS,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => Err(Error::NoAccess {
            path: path.to_path_buf(),
            uid: euid(),
            hint: access_hint(path),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Everything a VM opens after [`restrict`], by the access it needs.
#[derive(Debug, Default, Clone)]
pub struct Paths {
    /// Files read (kernel, initrd, read-only disks).
    pub read: Vec<PathBuf>,
    /// Files read and written (writable disks).
    pub read_write: Vec<PathBuf>,
    /// Device nodes opened read-write and driven by ioctl (/dev/kvm, /dev/net/tun).
    pub devices: Vec<PathBuf>,
    /// Directories where sockets are bound, connected to and removed (the run
    /// directory, vsock's socket directory).
    pub socket_dirs: Vec<PathBuf>,
    /// Directories where regular files are created, written and removed (the
    /// directory of `--mem-backing file=PATH`).
    pub file_dirs: Vec<PathBuf>,
}

/// Host files Ferrite reads while running: its own /proc entries (memory usage,
/// cgroup), host memory figures and cgroup limits (`--mem-prealloc`), and the random
/// devices: in the static build the getrandom crate (virtio-rng) finds no `getrandom`
/// through `dlsym` and reads /dev/urandom, after polling /dev/random.
const SYSTEM_READ: &[&str] = &[
    "/dev/random",
    "/dev/urandom",
    "/proc/self",
    "/proc/meminfo",
    "/sys/fs/cgroup",
    "/sys/kernel/mm",
];

/// How [`restrict`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landlocked {
    /// Every requested restriction is enforced.
    Fully,
    /// The kernel's Landlock lacks some of the access rights asked for (older ABI):
    /// those are not restricted.
    Partially,
    /// This kernel has no Landlock (or it is off): nothing is restricted.
    Unavailable,
}

/// The highest Landlock ABI whose rights Ferrite asks for (best effort: a kernel with
/// an older one enforces what it knows).
const ABI_WANTED: ABI = ABI::V6;

/// Restricts file access (and TCP, which Ferrite never uses) of this thread and the
/// threads it starts later to `paths` plus [`SYSTEM_READ`].
pub fn restrict(paths: &Paths) -> Result<Landlocked, Error> {
    let abi = ABI_WANTED;
    let file_read = AccessFs::ReadFile;
    let file_rw = AccessFs::from_file(abi);
    let dir_read = AccessFs::ReadFile | AccessFs::ReadDir;
    let created = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(Error::Landlock)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(Error::Landlock)?
        .create()
        .map_err(Error::Landlock)?;
    let mut rules: Vec<(&Path, landlock::BitFlags<AccessFs>)> = Vec::new();
    rules.extend(paths.read.iter().map(|p| (p.as_path(), file_read.into())));
    rules.extend(paths.read_write.iter().map(|p| (p.as_path(), file_rw)));
    rules.extend(paths.devices.iter().map(|p| (p.as_path(), file_rw)));
    let sock = AccessFs::MakeSock | AccessFs::RemoveFile | AccessFs::ReadDir;
    rules.extend(paths.socket_dirs.iter().map(|p| (p.as_path(), sock)));
    let files = file_rw | AccessFs::MakeReg | AccessFs::RemoveFile | AccessFs::ReadDir;
    rules.extend(paths.file_dirs.iter().map(|p| (p.as_path(), files)));
    rules.extend(
        SYSTEM_READ
            .iter()
            .map(Path::new)
            .filter(|p| p.exists())
            .map(|p| {
                (
                    p,
                    if p.is_dir() {
                        dir_read
                    } else {
                        file_read.into()
                    },
                )
            }),
    );
    let created = created.add_rules(rules.into_iter().map(|(p, access)| {
        let fd = PathFd::new(p).map_err(|source| Error::RulePath {
            path: p.to_path_buf(),
            source,
        })?;
        Ok::<_, Error>(PathBeneath::new(fd, access))
    }))?;
    let status = created.restrict_self().map_err(Error::Landlock)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Landlocked::Fully,
        RulesetStatus::PartiallyEnforced => Landlocked::Partially,
        _ => Landlocked::Unavailable,
    })
}

/// [`restrict`], reported in the log.
pub fn restrict_logged(paths: &Paths) -> Result<Landlocked, Error> {
    let how = restrict(paths)?;
    match how {
        Landlocked::Fully => log::info!("landlock: file access restricted to the named files"),
        Landlocked::Partially => log::warn!(
            "landlock: this kernel's Landlock is older than ABI {}: file access is restricted, \
             some access rights are not",
            ABI_WANTED as i32
        ),
        Landlocked::Unavailable => log::warn!(
            "landlock: not available on this kernel (or disabled at boot): file access is NOT restricted"
        ),
    }
    Ok(how)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferrite-sandbox-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Landlock on a thread of its own (it covers only that thread): named files open,
    /// others do not.
    #[test]
    fn landlock_allows_only_the_named_files() {
        let d = temp("ll");
        let allowed = d.join("kernel");
        let other = d.join("other");
        std::fs::write(&allowed, b"k").unwrap();
        std::fs::write(&other, b"o").unwrap();
        let sockets = d.join("run");
        std::fs::create_dir(&sockets).unwrap();
        let paths = Paths {
            read: vec![allowed.clone()],
            socket_dirs: vec![sockets.clone()],
            ..Paths::default()
        };
        let (a, o, s, how) = std::thread::spawn(move || {
            let how = restrict(&paths).unwrap();
            let a = std::fs::read(&allowed).map(|_| ());
            let o = std::fs::read(&other).map(|_| ());
            let s = std::os::unix::net::UnixListener::bind(sockets.join("x.sock")).map(|_| ());
            (a, o, s, how)
        })
        .join()
        .unwrap();
        let _ = std::fs::remove_dir_all(&d);
        if how == Landlocked::Unavailable {
            println!("NOT RUN: landlock_allows_only_the_named_files: no Landlock here");
            return;
        }
        assert!(a.is_ok(), "{a:?}");
        assert_eq!(o.unwrap_err().raw_os_error(), Some(libc::EACCES));
        assert!(s.is_ok(), "{s:?}");
    }

    #[test]
    fn no_access_names_the_kvm_group_fix() {
        let e = Error::NoAccess {
            path: "/dev/kvm".into(),
            uid: 1000,
            hint: access_hint(Path::new("/dev/kvm")),
            source: io::Error::from_raw_os_error(libc::EACCES),
        };
        let msg = crate::errors::chain(&e);
        assert!(
            msg.contains("uid 1000 may not open /dev/kvm read-write"),
            "{msg}"
        );
        assert!(msg.contains("add the user to the kvm group"), "{msg}");
        assert!(msg.contains("Permission denied"), "{msg}");
    }

    #[test]
    fn device_access_check_passes_for_a_writable_file_and_missing_paths() {
        let d = temp("acc");
        let f = d.join("dev");
        std::fs::write(&f, b"").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(check_device_access(&f).is_ok());
        assert!(check_device_access(&d.join("missing")).is_ok());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn no_new_privs_is_set() {
        std::thread::spawn(|| {
            no_new_privs().unwrap();
            assert!(no_new_privs_set());
        })
        .join()
        .unwrap();
    }
}
