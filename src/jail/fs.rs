//! The jail's directory on the host: `<chroot-base-dir>/<exec-file name>/<id>/root`,
//! made here (never reused), the program copied in, the operator's files linked in,
//! and the few directories and device nodes the VMM needs. Everything is made before
//! the pivot, on host paths, so a failure can remove exactly what was made.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{fchown, lchown, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Directories made in the jail's root (mode 0700, owned by the jail's uid/gid).
pub const DIRS: [&str; 3] = ["dev", "dev/net", "run"];

/// A character device made in the jail's root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node {
    pub path: &'static str,
    pub major: u32,
    pub minor: u32,
    /// Whether failing to make it fails the jail.
    pub required: bool,
}

/// The device nodes (major/minor as on Linux, mode 0600) besides /dev/userfaultfd,
/// whose minor is read from /proc/misc.
pub const NODES: [Node; 3] = [
    Node {
        path: "dev/kvm",
        major: 10,
        minor: 232,
        required: true,
    },
    Node {
        path: "dev/net/tun",
        major: 10,
        minor: 200,
        required: true,
    },
    Node {
        path: "dev/urandom",
        major: 1,
        minor: 9,
        required: false,
    },
];

/// Errors making the jail's directory, each with the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("chroot base directory {path}")]
    Base {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("chroot base directory {0} is not a directory")]
    BaseNotDir(PathBuf),
    #[error("jail directory {0} already exists (ids must be unique; remove it first)")]
    Exists(PathBuf),
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("exec file {path}")]
    ExecFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("exec file {0} is not a regular file")]
    ExecNotFile(PathBuf),
    #[error("cannot copy {from} to {to}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--link-file {0}: its name is taken in the jail (the program, its pid file, dev or run)"
    )]
    NameTaken(PathBuf),
    #[error("--link-file {0}: no file name")]
    NoName(PathBuf),
    #[error("cannot link {from} to {to}")]
    Link {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set owner or mode of {path}")]
    Own {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make device node {path} ({major}:{minor})")]
    Mknod {
        path: PathBuf,
        major: u32,
        minor: u32,
        #[source]
        source: std::io::Error,
    },
}

/// The exec file, checked: its path and its name in the jail.
pub fn exec_file(path: &Path) -> Result<(PathBuf, String), Error> {
    let err = |source| Error::ExecFile {
        path: path.to_path_buf(),
        source,
    };
    let real = fs::canonicalize(path).map_err(err)?;
    let m = fs::metadata(&real).map_err(err)?;
    if !m.is_file() {
        return Err(Error::ExecNotFile(path.to_path_buf()));
    }
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::ExecNotFile(path.to_path_buf()))?;
    Ok((real, name))
}

/// A jail directory made by this process.
#[derive(Debug)]
pub struct JailDir {
    /// `<base>/<exec name>`; removed on failure only if made here and empty.
    exec_dir: Option<PathBuf>,
    /// `<base>/<exec name>/<id>`: made here.
    pub id_dir: PathBuf,
    /// `<id_dir>/root`.
    pub root: PathBuf,
    uid: u32,
    gid: u32,
}

impl JailDir {
    /// Makes `<base>/<exec_name>/<id>/root`; `<id>` must not exist.
    pub fn create(
        base: &Path,
        exec_name: &str,
        id: &str,
        uid: u32,
        gid: u32,
    ) -> Result<Self, Error> {
        let base_real = fs::canonicalize(base).map_err(|source| Error::Base {
            path: base.to_path_buf(),
            source,
        })?;
        if !base_real.is_dir() {
            return Err(Error::BaseNotDir(base.to_path_buf()));
        }
        let exec_dir = base_real.join(exec_name);
        let made_exec_dir = match fs::create_dir(&exec_dir) {
            Ok(()) => true,
            Err(e) if e.kind() == ErrorKind::AlreadyExists && exec_dir.is_dir() => false,
            Err(source) => {
                return Err(Error::Create {
                    path: exec_dir,
                    source,
                })
            }
        };
        let id_dir = exec_dir.join(id);
        let mut jail = JailDir {
            exec_dir: made_exec_dir.then(|| exec_dir.clone()),
            root: id_dir.join("root"),
            id_dir: PathBuf::new(),
            uid,
            gid,
        };
        match fs::create_dir(&id_dir) {
            Ok(()) => jail.id_dir = id_dir,
            Err(e) => {
                jail.remove();
                return Err(if e.kind() == ErrorKind::AlreadyExists {
                    Error::Exists(id_dir)
                } else {
                    Error::Create {
                        path: id_dir,
                        source: e,
                    }
                });
            }
        }
        if let Err(e) = jail.make_dir(&jail.root.clone()) {
            jail.remove();
            return Err(e);
        }
        Ok(jail)
    }

    /// Removes what [`JailDir::create`] and the other steps made (only that: the
    /// base directory and a pre-existing `<exec name>` directory stay).
    pub fn remove(&self) {
        if !self.id_dir.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(&self.id_dir);
        }
        if let Some(d) = &self.exec_dir {
            let _ = fs::remove_dir(d);
        }
    }

    /// A directory owned by the jail's ids, mode 0700.
    fn make_dir(&self, path: &Path) -> Result<(), Error> {
        fs::create_dir(path).map_err(|source| Error::Create {
            path: path.to_path_buf(),
            source,
        })?;
        self.own(path, 0o700)
    }

    fn own(&self, path: &Path, mode: u32) -> Result<(), Error> {
        let err = |source| Error::Own {
            path: path.to_path_buf(),
            source,
        };
        lchown(path, Some(self.uid), Some(self.gid)).map_err(err)?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(err)
    }

    /// Copies `src` into the root as `name`, owned by the jail's ids, with the
    /// source's permission bits less set-id bits. A copy (not a link) so that
    /// no two VMMs share the program's pages, as Firecracker's jailer does.
    pub fn copy_in(&self, src: &Path, name: &str) -> Result<PathBuf, Error> {
        let to = self.root.join(name);
        let err = |source| Error::Copy {
            from: src.to_path_buf(),
            to: to.clone(),
            source,
        };
        let mut from = fs::File::open(src).map_err(err)?;
        let mode = from.metadata().map_err(err)?.mode() & 0o777;
        let mut dst = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
            .open(&to)
            .map_err(err)?;
        fchown(&dst, Some(self.uid), Some(self.gid)).map_err(err)?;
        std::io::copy(&mut from, &mut dst).map_err(err)?;
        Ok(to)
    }

    /// Places an operator's file in the root under its own name: a hard link (its
    /// owner and mode stay the operator's), or a copy owned by the jail's ids when
    /// the file is on another filesystem.
    pub fn link_in(&self, src: &Path, reserved: &[&str]) -> Result<(), Error> {
        let name = src
            .file_name()
            .ok_or_else(|| Error::NoName(src.to_path_buf()))?;
        let name_str = name.to_string_lossy();
        if reserved.iter().any(|r| **r == *name_str) {
            return Err(Error::NameTaken(src.to_path_buf()));
        }
        let to = self.root.join(name);
        match fs::hard_link(src, &to) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                self.copy_in(src, &name_str).map(|_| ())
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                Err(Error::NameTaken(src.to_path_buf()))
            }
            Err(source) => Err(Error::Link {
                from: src.to_path_buf(),
                to,
                source,
            }),
        }
    }

    /// The root's directories and device nodes, all owned by the jail's ids.
    pub fn populate(&self, uffd_minor: Option<u32>) -> Result<(), Error> {
        self.own(&self.root, 0o700)?;
        for d in DIRS {
            self.make_dir(&self.root.join(d))?;
        }
        for n in NODES {
            match self.mknod(n.path, n.major, n.minor) {
                Ok(()) => {}
                Err(e) if !n.required => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "ferrite jail: warning: {}",
                        crate::errors::chain(&e)
                    );
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(minor) = uffd_minor {
            self.mknod("dev/userfaultfd", 10, minor)?;
        }
        Ok(())
    }

    fn mknod(&self, rel: &str, major: u32, minor: u32) -> Result<(), Error> {
        let path = self.root.join(rel);
        let err = |source| Error::Mknod {
            path: path.clone(),
            major,
            minor,
            source,
        };
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| err(std::io::Error::from(ErrorKind::InvalidInput)))?;
        // SAFETY: `c` is a NUL-terminated path that outlives the call; mknod reads it only.
        let r = unsafe {
            libc::mknod(
                c.as_ptr(),
                libc::S_IFCHR | 0o600,
                libc::makedev(major, minor),
            )
        };
        if r != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        self.own(&path, 0o600)
    }
}

/// The minor number of the host's userfaultfd device (from /proc/misc), if it has one.
pub fn userfaultfd_minor(proc_misc: &str) -> Option<u32> {
    proc_misc.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        let minor = w.next()?.parse().ok()?;
        (w.next()? == "userfaultfd").then_some(minor)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userfaultfd_minor_is_read_from_proc_misc() {
        assert_eq!(
            userfaultfd_minor("200 tun\n257 userfaultfd\n232 kvm\n"),
            Some(257)
        );
        assert_eq!(userfaultfd_minor(" 58 network_throughput\n"), None);
    }
}
