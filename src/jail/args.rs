//! `ferrite jail` flags: Firecracker's jailer flags where they mean the same, and what
//! each value may be (checked here, before anything on the host is touched).

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

/// Longest jail id (as Firecracker's jailer).
pub const MAX_ID_LEN: usize = 64;

/// Errors in a flag's value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid jail id {0:?}: 1 to 64 characters, each an ASCII letter, digit or '-'")]
    Id(String),
    #[error("invalid --cgroup {0:?}: expected <controller>.<file>=<value> (e.g. memory.max=512M)")]
    Cgroup(String),
    #[error("invalid --parent-cgroup {0:?}: a relative path without '.' or '..' components")]
    ParentCgroup(String),
    #[error("invalid --resource-limit {0:?}: expected fsize=<n>, no-file=<n> or core=<n>")]
    ResourceLimit(String),
    #[error("--cgroup-version {0}: only cgroup v2 is supported by ferrite jail")]
    CgroupVersion(u8),
}

/// The jail's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct JailArgs {
    /// Jail id: ASCII letters, digits and '-', at most 64 characters. The jail is
    /// <chroot-base-dir>/<exec-file name>/<id>/root and must not exist yet.
    #[arg(long)]
    pub id: String,
    /// The program to run in the jail (copied into the jail's root).
    #[arg(long)]
    pub exec_file: PathBuf,
    /// User id the program runs as (also the owner of the jail's files).
    #[arg(long)]
    pub uid: u32,
    /// Group id the program runs as (no supplementary groups).
    #[arg(long)]
    pub gid: u32,
    /// Directory under which jails are made.
    #[arg(long, default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,
    /// Network namespace to join (a path such as /var/run/netns/NAME).
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// A cgroup v2 file and the value to write into it in the jail's cgroup leaf,
    /// <file>=<value> (e.g. memory.max=512M, pids.max=64); repeatable.
    #[arg(long, value_parser = parse_cgroup)]
    pub cgroup: Vec<CgroupSetting>,
    /// Cgroup version: 2 (v1 is refused).
    #[arg(long, default_value_t = 2, value_parser = parse_cgroup_version)]
    pub cgroup_version: u8,
    /// Cgroup under which the jail's leaf <id> is made (default: the exec file's name).
    #[arg(long, value_parser = parse_parent_cgroup)]
    pub parent_cgroup: Option<PathBuf>,
    /// A resource limit, <resource>=<value>: fsize (bytes), no-file (one more than the
    /// highest fd; 2048 if not given), core (bytes); repeatable.
    #[arg(long, value_parser = parse_resource_limit)]
    pub resource_limit: Vec<ResourceLimit>,
    /// Run the program as PID 1 of a new PID namespace (the jail process forks and exits).
    #[arg(long)]
    pub new_pid_ns: bool,
    /// Detach: new session, standard streams on /dev/null.
    #[arg(long)]
    pub daemonize: bool,
    /// A file to place in the jail's root under its own name: hard-linked (copied,
    /// owned by --uid/--gid, when on another filesystem); repeatable. Ferrite's.
    #[arg(long)]
    pub link_file: Vec<PathBuf>,
    /// The program's own arguments, after `--`.
    #[arg(last = true)]
    pub exec_args: Vec<OsString>,
}

/// One `--cgroup` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSetting {
    pub file: String,
    pub value: String,
}

impl CgroupSetting {
    /// The controller the file belongs to (`memory` for `memory.max`; `cgroup` for
    /// the core files).
    pub fn controller(&self) -> &str {
        self.file.split('.').next().unwrap_or("")
    }
}

/// One `--resource-limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceLimit {
    FileSize(u64),
    NoFile(u64),
    Core(u64),
}

/// Default open-file limit, as Firecracker's jailer.
pub const DEFAULT_NO_FILE: u64 = 2048;

pub fn parse_id(s: &str) -> Result<String, Error> {
    let ok = !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(s.to_owned())
    } else {
        Err(Error::Id(s.to_owned()))
    }
}

/// A single plain path component (no '/', '.', '..').
fn plain_name(s: &str) -> bool {
    let mut c = Path::new(s).components();
    matches!((c.next(), c.next()), (Some(Component::Normal(_)), None)) && !s.contains('/')
}

pub fn parse_cgroup(s: &str) -> Result<CgroupSetting, Error> {
    let bad = || Error::Cgroup(s.to_owned());
    let (file, value) = s.split_once('=').ok_or_else(bad)?;
    let (controller, rest) = file.split_once('.').ok_or_else(bad)?;
    if controller.is_empty() || rest.is_empty() || value.is_empty() || !plain_name(file) {
        return Err(bad());
    }
    if value.contains('\n') {
        return Err(bad());
    }
    Ok(CgroupSetting {
        file: file.to_owned(),
        value: value.to_owned(),
    })
}

pub fn parse_cgroup_version(s: &str) -> Result<u8, String> {
    match s.parse::<u8>() {
        Ok(2) => Ok(2),
        Ok(v) => Err(Error::CgroupVersion(v).to_string()),
        Err(_) => Err(format!("{s:?} is not a cgroup version (2)")),
    }
}

pub fn parse_parent_cgroup(s: &str) -> Result<PathBuf, Error> {
    let p = Path::new(s);
    let ok = !s.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(p.to_path_buf())
    } else {
        Err(Error::ParentCgroup(s.to_owned()))
    }
}

pub fn parse_resource_limit(s: &str) -> Result<ResourceLimit, Error> {
    let bad = || Error::ResourceLimit(s.to_owned());
    let (name, value) = s.split_once('=').ok_or_else(bad)?;
    let n: u64 = value.parse().map_err(|_| bad())?;
    match name {
        "fsize" => Ok(ResourceLimit::FileSize(n)),
        "no-file" => Ok(ResourceLimit::NoFile(n)),
        "core" => Ok(ResourceLimit::Core(n)),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_outside_firecrackers_alphabet_or_length_are_refused() {
        assert!(parse_id("t1").is_ok());
        assert!(parse_id("a-B-9").is_ok());
        assert!(parse_id(&"a".repeat(64)).is_ok());
        for bad in ["", "a/b", "..", "a b", "é", "a_b", &"a".repeat(65)] {
            assert!(parse_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cgroup_settings_cannot_name_a_path_outside_the_leaf() {
        let s = parse_cgroup("memory.max=512M").unwrap();
        assert_eq!((s.controller(), s.value.as_str()), ("memory", "512M"));
        assert_eq!(
            parse_cgroup("cpu.max=5000 10000").unwrap().value,
            "5000 10000"
        );
        for bad in [
            "memory.max",
            "max=1",
            "memory.max=",
            "../x.max=1",
            "a/b.max=1",
            ".max=1",
        ] {
            assert!(parse_cgroup(bad).is_err(), "{bad:?}");
        }
        assert!(parse_parent_cgroup("a/b").is_ok());
        for bad in ["", "/a", "a/../b", "./a"] {
            assert!(parse_parent_cgroup(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resource_limits_take_firecrackers_names() {
        assert_eq!(
            parse_resource_limit("no-file=10").unwrap(),
            ResourceLimit::NoFile(10)
        );
        assert_eq!(
            parse_resource_limit("fsize=1").unwrap(),
            ResourceLimit::FileSize(1)
        );
        assert!(parse_resource_limit("nofile=1").is_err());
        assert!(parse_resource_limit("fsize=-1").is_err());
        assert!(parse_cgroup_version("1").is_err());
    }
}
