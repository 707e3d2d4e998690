//! Where a VM's control socket lives, and the socket's life: names, the runtime
//! directory (0700), binding (0600) with stale-socket replacement, removal on drop.
//!
//! Directory: `$FERRITE_RUN_DIR` if set, else `$XDG_RUNTIME_DIR/ferrite`, else
//! `/run/ferrite` (root), else `/tmp/ferrite-<user>`.
#![forbid(unsafe_code)]

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("'{0}' is not a VM name (1 to 64 of A-Z a-z 0-9 . _ -, not starting with '.' or '-')")]
    BadName(String),
    #[error("cannot create the control directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a VM named '{name}' is already running (control socket {path})")]
    InUse { name: String, path: PathBuf },
    #[error("cannot create the control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The directory holding the control sockets.
pub fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FERRITE_RUN_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("ferrite");
    }
    let run = Path::new("/run/ferrite");
    if std::fs::create_dir_all(run).is_ok() {
        return run.to_path_buf();
    }
    let user = std::env::var("USER").unwrap_or_else(|_| "user".into());
    std::env::temp_dir().join(format!("ferrite-{user}"))
}

/// The socket of VM `name` in `dir`.
pub fn socket_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

pub fn validate_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_owned()))
    }
}

/// A short name for a VM started without `--name`: "vm-" and Ferrite's process id,
/// which no other live VM can have.
pub fn generate_name() -> String {
    format!("vm-{}", std::process::id())
}

/// Removes the socket file when dropped (every orderly exit path drops it).
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the control socket at `path` (non-blocking, mode 0600, its directory 0700).
/// A stale socket (nobody listening) is replaced; a live one is an error naming `name`.
pub fn bind(path: &Path, name: &str) -> Result<(UnixListener, SocketFile), Error> {
    if let Some(dir) = path.parent() {
        let dir_err = |source| Error::Dir {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(dir_err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(dir_err)?;
    }
    if path.exists() {
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(Error::InUse {
                    name: name.to_owned(),
                    path: path.to_path_buf(),
                })
            }
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::NotFound) => {
                log::debug!("replacing stale control socket {}", path.display());
                let _ = std::fs::remove_file(path);
            }
            Err(source) => {
                return Err(Error::Bind {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    let bind_err = |source| Error::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    let file = SocketFile(path.to_path_buf());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok((listener, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "vm-1f2e", "test_VM.2"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        let g = generate_name();
        assert!(validate_name(&g).is_ok() && g.starts_with("vm-"), "{g}");
    }

    #[test]
    fn stale_sockets_are_replaced_live_ones_refused_and_files_removed() {
        let dir = std::env::temp_dir().join(format!("ferrite-paths-{}", std::process::id()));
        let path = socket_path(&dir, "t1");
        {
            let (_l, file) = bind(&path, "t1").unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let dmode = std::fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(dmode & 0o777, 0o700);
            assert!(matches!(bind(&path, "t1"), Err(Error::InUse { .. })));
            assert_eq!(file.path(), path);
        }
        assert!(!path.exists(), "removed on drop");
        // A stale socket: bound, then the listener closed without removing the file.
        let l = UnixListener::bind(&path).unwrap();
        drop(l);
        assert!(path.exists());
        let (_l, _f) = bind(&path, "t1").expect("stale socket replaced");
        drop(_f);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
