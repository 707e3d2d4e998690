//! The process the program inherits: descriptors other than 0-2 closed, resource
//! limits, no supplementary groups, the jail's gid and uid, an empty environment.

#![allow(unsafe_code)]

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;

use super::args::{ResourceLimit, DEFAULT_NO_FILE};

/// Errors preparing the process or starting the program, naming the step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "must run as root (uid {0} is not): it makes device nodes, namespaces and a cgroup, \
         then drops to --uid/--gid; an ordinary user in the kvm group runs `ferrite run` \
         directly (README, \"Running without root\")"
    )]
    NotRoot(u32),
    #[error("cannot close inherited file descriptors")]
    CloseFds(#[source] std::io::Error),
    #[error("cannot set resource limit {name} to {value}")]
    Rlimit {
        name: &'static str,
        value: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot drop supplementary groups")]
    Setgroups(#[source] std::io::Error),
    #[error("cannot switch to gid {0}")]
    Setgid(u32, #[source] std::io::Error),
    #[error("cannot switch to uid {0}")]
    Setuid(u32, #[source] std::io::Error),
    #[error("argument or path {0:?} contains a NUL byte")]
    Nul(OsString),
    #[error("cannot execute {0} in the jail")]
    Exec(String, #[source] std::io::Error),
    #[error("cannot redirect standard streams to /dev/null")]
    DevNull(#[source] std::io::Error),
}

fn last() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Refuses to go on unless the effective uid is root (checked before anything is made).
pub fn require_root() -> Result<(), Error> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(Error::NotRoot(euid));
    }
    Ok(())
}

/// Closes every descriptor from 3 up.
pub fn close_inherited_fds() -> Result<(), Error> {
    // SAFETY: close_range takes no memory; closing fds this process does not use yet
    // (it is called first thing, before Rust opens anything it keeps).
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r < 0 {
        return Err(Error::CloseFds(last()));
    }
    Ok(())
}

/// Sets the limits given (soft = hard); open files default to 2048.
pub fn set_limits(limits: &[ResourceLimit]) -> Result<(), Error> {
    let mut all: Vec<(&'static str, libc::__rlimit_resource_t, u64)> = Vec::new();
    if !limits.iter().any(|l| matches!(l, ResourceLimit::NoFile(_))) {
        all.push(("no-file", libc::RLIMIT_NOFILE, DEFAULT_NO_FILE));
    }
    for l in limits {
        all.push(match *l {
            ResourceLimit::FileSize(n) => ("fsize", libc::RLIMIT_FSIZE, n),
            ResourceLimit::NoFile(n) => ("no-file", libc::RLIMIT_NOFILE, n),
            ResourceLimit::Core(n) => ("core", libc::RLIMIT_CORE, n),
        });
    }
    for (name, res, value) in all {
        let lim = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: `lim` is a valid rlimit that outlives the call; setrlimit only reads it.
        if unsafe { libc::setrlimit(res, &lim) } != 0 {
            return Err(Error::Rlimit {
                name,
                value,
                source: last(),
            });
        }
    }
    Ok(())
}

/// Points fds 0-2 at `dev_null`.
pub fn redirect_std(dev_null: &std::fs::File) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    for fd in 0..3 {
        // SAFETY: dup2 of an fd we own onto a standard stream number.
        if unsafe { libc::dup2(dev_null.as_raw_fd(), fd) } < 0 {
            return Err(Error::DevNull(last()));
        }
    }
    Ok(())
}

/// No supplementary groups, then the gid, then the uid (real, effective and saved).
pub fn drop_to(uid: u32, gid: u32) -> Result<(), Error> {
    // SAFETY: an empty group list: no memory is read.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(Error::Setgroups(last()));
    }
    // SAFETY: setresgid takes plain integers.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(Error::Setgid(gid, last()));
    }
    // SAFETY: setresuid takes plain integers.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(Error::Setuid(uid, last()));
    }
    Ok(())
}

fn c(s: &[u8]) -> Result<CString, Error> {
    CString::new(s).map_err(|_| Error::Nul(OsString::from(String::from_utf8_lossy(s).into_owned())))
}

/// Replaces this process with `path` (a path in the jail), argv[0] = `path`, the
/// given arguments and an empty environment. Returns only on failure.
pub fn exec(path: &str, args: &[OsString]) -> Error {
    let run = || -> Result<std::convert::Infallible, Error> {
        let prog = c(path.as_bytes())?;
        let mut argv = vec![prog.clone()];
        for a in args {
            argv.push(c(a.as_bytes())?);
        }
        let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_p.push(std::ptr::null());
        let envp: [*const libc::c_char; 1] = [std::ptr::null()];
        // SAFETY: `prog`, `argv_p` and `envp` are NUL-terminated strings and
        // null-terminated pointer arrays that live until the call (which replaces the
        // process or returns).
        unsafe { libc::execve(prog.as_ptr(), argv_p.as_ptr(), envp.as_ptr()) };
        Err(Error::Exec(path.to_owned(), last()))
    };
    match run() {
        Err(e) => e,
        Ok(never) => match never {},
    }
}
