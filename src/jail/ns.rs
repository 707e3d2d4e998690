//! Namespaces: joining a network namespace, a private mount namespace whose root is
//! the jail (pivot_root, old root unmounted), and a new PID namespace (fork so the
//! program is its PID 1). Also the forks of `--daemonize`.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Errors entering namespaces, naming the step (and path).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open network namespace {path}")]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot join network namespace {path}")]
    JoinNetns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{step} failed (jail root {root})")]
    Mount {
        step: &'static str,
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make a new PID namespace")]
    PidNs(#[source] std::io::Error),
    #[error("fork failed")]
    Fork(#[source] std::io::Error),
    #[error("setsid failed")]
    Setsid(#[source] std::io::Error),
}

fn check(r: libc::c_long) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn cstr(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// Joins the network namespace at `path` (e.g. /var/run/netns/NAME).
pub fn join_netns(path: &Path) -> Result<(), Error> {
    let f = std::fs::File::open(path).map_err(|source| Error::OpenNetns {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: setns on a descriptor we own and keep open for the call; no memory is passed.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    check(r.into()).map_err(|source| Error::JoinNetns {
        path: path.to_path_buf(),
        source,
    })
}

/// A new mount namespace, every mount private, `root` bound onto itself and made
/// the root (pivot_root), the old root unmounted and its mount point removed.
/// Afterwards the working directory is the new `/`.
pub fn enter_root(root: &Path) -> Result<(), Error> {
    let fail = |step: &'static str| {
        move |source| Error::Mount {
            step,
            root: root.to_path_buf(),
            source,
        }
    };
    let c_root = cstr(root).map_err(fail("path"))?;
    let slash = c"/";
    let old = c"old_root";
    // SAFETY: unshare takes no memory; it only changes this process's namespaces.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) }.into())
        .map_err(fail("unshare(CLONE_NEWNS)"))?;
    // SAFETY: the target is a NUL-terminated string; the null source/fstype/data are allowed for a propagation change.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            slash.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    check(r.into()).map_err(fail("making every mount private"))?;
    // SAFETY: source and target are the same NUL-terminated path; null fstype/data are allowed for a bind mount.
    let r = unsafe {
        libc::mount(
            c_root.as_ptr(),
            c_root.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    };
    check(r.into()).map_err(fail("binding the jail root onto itself"))?;
    std::env::set_current_dir(root).map_err(fail("chdir into the jail root"))?;
    // SAFETY: mkdir of a NUL-terminated relative path.
    check(unsafe { libc::mkdir(old.as_ptr(), 0o700) }.into()).map_err(fail("mkdir old_root"))?;
    // SAFETY: pivot_root with two NUL-terminated paths ("." is the new root).
    let r = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), old.as_ptr()) };
    check(r).map_err(fail("pivot_root"))?;
    // SAFETY: chdir to a NUL-terminated path.
    check(unsafe { libc::chdir(slash.as_ptr()) }.into()).map_err(fail("chdir /"))?;
    // SAFETY: umount2 of a NUL-terminated path; MNT_DETACH needs nothing else.
    check(unsafe { libc::umount2(old.as_ptr(), libc::MNT_DETACH) }.into())
        .map_err(fail("unmounting the old root"))?;
    // SAFETY: rmdir of a NUL-terminated path.
    check(unsafe { libc::rmdir(old.as_ptr()) }.into()).map_err(fail("removing old_root"))
}

/// What a fork returned to this process.
pub enum Forked {
    Parent(libc::pid_t),
    Child,
}

/// fork(2). The jail is single-threaded when it forks (no threads are started
/// before exec), so the child may go on running Rust code.
pub fn fork() -> Result<Forked, Error> {
    // SAFETY: fork takes no arguments; the process has one thread (see above).
    let pid = unsafe { libc::fork() };
    match pid {
        p if p < 0 => Err(Error::Fork(std::io::Error::last_os_error())),
        0 => Ok(Forked::Child),
        p => Ok(Forked::Parent(p)),
    }
}

/// Makes the next child this process forks PID 1 of a new PID namespace.
pub fn unshare_pid() -> Result<(), Error> {
    // SAFETY: unshare takes no memory.
    check(unsafe { libc::unshare(libc::CLONE_NEWPID) }.into()).map_err(Error::PidNs)
}

/// Whether this process leads its session.
pub fn is_session_leader() -> bool {
    // SAFETY: getsid(0) and getpid take no memory and cannot fail for this process.
    unsafe { libc::getsid(0) == libc::getpid() }
}

pub fn setsid() -> Result<(), Error> {
    // SAFETY: setsid takes no arguments.
    check(unsafe { libc::setsid() }.into()).map_err(Error::Setsid)
}
