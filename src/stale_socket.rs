//! Replacing a stale UNIX socket: the one check every place Ferrite binds a socket
//! path uses (the control socket, the vsock device's socket), kept below both so that
//! neither imports the other.
#![forbid(unsafe_code)]

use std::fs::Metadata;
use std::io::{self, ErrorKind};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path} is in use: a process is listening on it")]
    Live { path: PathBuf },
    #[error("{path} exists and is a {kind}, not a socket: left alone (remove it or choose another path)")]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("cannot tell whether {path} is a stale socket")]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the stale socket {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Whether `a` and `b` are the same file (device and inode).
pub fn same_file(a: &Metadata, b: &Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// Removes the socket at `path` if it is stale: a socket nobody listens on.
///
/// `Ok(true)`: removed; `Ok(false)`: nothing is at `path`. Anything else at the path
/// is an error and left alone: a live socket ([`Error::Live`]), a file that is not a
/// socket ([`Error::NotASocket`], checked with `lstat`, so a symbolic link is not
/// followed), or a socket whose state cannot be told ([`Error::Probe`], e.g. no
/// permission to connect). The path is checked again (same device and inode) just
/// before the unlink. Meant for every place Ferrite replaces a socket it binds.
pub fn remove(path: &Path) -> Result<bool, Error> {
    let probe = |source| Error::Probe {
        path: path.to_path_buf(),
        source,
    };
    let first = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(probe(e)),
    };
    if !first.file_type().is_socket() {
        return Err(Error::NotASocket {
            path: path.to_path_buf(),
            kind: crate::file::kind(first.file_type()),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => {
            return Err(Error::Live {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(probe(e)),
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if same_file(&m, &first) => {}
        Ok(_) => {
            return Err(probe(io::Error::other(
                "the file changed while it was being checked",
            )))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(probe(e)),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(source) => Err(Error::Remove {
            path: path.to_path_buf(),
            source,
        }),
    }
}
