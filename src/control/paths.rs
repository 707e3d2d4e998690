//! Where a VM's control socket lives, and the socket's life: names, the run directory
//! and the checks that make it trustworthy, binding (0600 from the start), telling a
//! stale socket from anything else at the path, removal on drop.
//!
//! Run directory ([`run_dir`]): `$FERRITE_RUN_DIR` if set, else
//! `$XDG_RUNTIME_DIR/ferrite`, else `/run/ferrite` for root (euid 0), else
//! `$TMPDIR/ferrite-<euid>` (`/tmp/ferrite-<euid>`): named after the uid, never after
//! `$USER`, and a user other than root never uses `/run/ferrite`.
//!
//! Rules (as ssh-agent and tmux check theirs):
//! - Ferrite creates missing directories with mode 0700 (less any umask bits) and never
//!   changes the mode of a directory that already exists: `--api-socket`'s parent and
//!   an existing `$FERRITE_RUN_DIR` are used as they are.
//! - The run directory must be a real directory (not a symbolic link), owned by the
//!   effective uid, and not writable by group or others; else Ferrite refuses it with
//!   an error naming the path and what is wrong — when starting a VM and in every
//!   client command (`ferrite list/pause/stop/...`).
//! - The socket is made 0600 before `bind(2)` creates the file (`fchmod` of the unbound
//!   socket: Linux gives the file the socket inode's mode), so it is never visible with
//!   a wider mode.
//! - Only a socket nobody listens on is stale and is removed ([`remove_stale_socket`]);
//!   a regular file, directory, device, FIFO or symbolic link at the path is an error
//!   and is left alone.
//! - A VM removes its socket on exit only if the path still names the file it bound
//!   ([`SocketFile`] holds it by an `O_PATH` descriptor and compares device and inode).
//!
//! Not covered: these are path-based checks, so a process that may write to the
//! directory (its owner, i.e. the same user, or root) can still swap an entry between a
//! check and the unlink that follows it.
#![allow(unsafe_code)]

use std::fs::{File, Metadata, Permissions};
use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use crate::stale_socket;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("'{0}' is not a VM name (1 to 64 of A-Z a-z 0-9 . _ -, not starting with '.' or '-')")]
    BadName(String),
    #[error("cannot create the control directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("refusing the control directory {path}: {problem}")]
    UntrustedDir { path: PathBuf, problem: String },
    #[error("a VM named '{name}' is already running (control socket {path})")]
    InUse { name: String, path: PathBuf },
    /// What is at the socket's path is not a stale socket, or cannot be removed.
    #[error(transparent)]
    Stale(#[from] stale_socket::Error),
    #[error("cannot create the control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// `dir` without trailing slashes or `.` components, so that `lstat` looks at the last
/// component itself (`lstat("link/")` would follow the link).
fn normalized(dir: PathBuf) -> PathBuf {
    dir.components().collect()
}

/// The directory holding the control sockets (computed only: nothing is created or
/// checked; see [`prepare_run_dir`] and [`client_run_dir`]).
pub fn run_dir() -> PathBuf {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(d) = var("FERRITE_RUN_DIR") {
        return normalized(PathBuf::from(d));
    }
    if let Some(d) = var("XDG_RUNTIME_DIR").map(PathBuf::from) {
        // The XDG spec: a relative path is to be ignored.
        if d.is_absolute() {
            return normalized(d.join("ferrite"));
        }
    }
    let uid = euid();
    if uid == 0 && Path::new("/run").is_dir() {
        return PathBuf::from("/run/ferrite");
    }
    normalized(std::env::temp_dir().join(format!("ferrite-{uid}")))
}

/// What kind of file `m` describes, for messages (the words are [`crate::file::kind`]'s).
pub fn kind(m: &Metadata) -> &'static str {
    crate::file::kind(m.file_type())
}

/// Checks that `dir` may hold control sockets: a real directory owned by the effective
/// uid, not writable by group or others. A missing directory passes (it holds nothing
/// to connect to).
pub fn check_run_dir(dir: &Path) -> Result<(), Error> {
    let m = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Dir {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let untrusted = |problem: String| {
        Err(Error::UntrustedDir {
            path: dir.to_path_buf(),
            problem,
        })
    };
    if m.file_type().is_symlink() {
        let target = std::fs::read_link(dir)
            .map(|t| format!(" (to {})", t.display()))
            .unwrap_or_default();
        return untrusted(format!(
            "it is a symbolic link{target}; it must be a real directory"
        ));
    }
    if !m.is_dir() {
        return untrusted(format!("it is a {}, not a directory", kind(&m)));
    }
    let uid = euid();
    if m.uid() != uid {
        return untrusted(format!(
            "it is owned by uid {}, not by uid {uid} that Ferrite runs as",
            m.uid()
        ));
    }
    if m.mode() & 0o022 != 0 {
        return untrusted(format!(
            "group or others may write to it (mode {:04o}); it must not be writable by anyone but its owner",
            m.mode() & 0o7777
        ));
    }
    Ok(())
}

/// The run directory for clients (`ferrite list/pause/...`): computed and checked,
/// never created.
pub fn client_run_dir() -> Result<PathBuf, Error> {
    let dir = run_dir();
    check_run_dir(&dir)?;
    Ok(dir)
}

/// The run directory for a VM about to bind its socket: created (0700) if missing,
/// then checked.
pub fn prepare_run_dir() -> Result<PathBuf, Error> {
    let dir = run_dir();
    create_missing_dirs(&dir)?;
    check_run_dir(&dir)?;
    Ok(dir)
}

/// Creates `dir` and any missing parents with mode 0700 (less umask bits); an existing
/// directory is left exactly as it is.
pub fn create_missing_dirs(dir: &Path) -> Result<(), Error> {
    if dir.as_os_str().is_empty() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::Dir {
            path: dir.to_path_buf(),
            source,
        })
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

/// [`stale_socket::remove`], its errors as this module's.
pub fn remove_stale_socket(path: &Path) -> Result<bool, Error> {
    Ok(stale_socket::remove(path)?)
}

/// The socket file a VM bound; removed when dropped (every orderly exit path drops
/// it), but only if the path still names that file: the `O_PATH` descriptor keeps its
/// inode alive, so no other file can have the same device and inode meanwhile.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    file: File,
}

impl SocketFile {
    /// Takes hold of the file at `path` (which must be a socket, not a link to one).
    fn hold(path: &Path) -> io::Result<SocketFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
            .open(path)?;
        if !file.metadata()?.file_type().is_socket() {
            return Err(io::Error::other("the bound path is not a socket"));
        }
        Ok(SocketFile {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Takes hold of the socket a device just bound at `path`, to remove it with the
    /// VM; `None` (logged) when there is no socket there.
    pub fn hold_bound(path: &Path) -> Option<SocketFile> {
        SocketFile::hold(path)
            .map_err(|e| log::debug!("{}: not held for removal: {e}", path.display()))
            .ok()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `path` still names the socket this VM bound.
    pub fn is_ours(&self) -> bool {
        match (std::fs::symlink_metadata(&self.path), self.file.metadata()) {
            (Ok(now), Ok(ours)) => stale_socket::same_file(&now, &ours),
            _ => false,
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.is_ours() {
            let _ = std::fs::remove_file(&self.path);
        } else {
            log::debug!(
                "{} no longer names the socket this VM bound; left alone",
                self.path.display()
            );
        }
    }
}

/// A socket of mode 0600, bound at `path` (not yet listening).
fn bind_private(path: &Path) -> io::Result<OwnedFd> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!(
                "a UNIX socket path holds at most {} bytes and no NUL (this one has {})",
                addr.sun_path.len() - 1,
                bytes.len()
            ),
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor just returned by socket(2), owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // fchmod of the unbound socket: bind(2) creates the file with this mode (less the
    // umask), so it never exists with a wider one.
    let file = File::from(fd);
    file.set_permissions(Permissions::from_mode(0o600))?;
    let fd = OwnedFd::from(file);
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is an initialized sockaddr_un that outlives the call and `len`
    // (the path and its NUL) lies within it.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Binds the control socket at `path`: non-blocking, mode 0600 from the start. Missing
/// parent directories are created (0700); an existing one is used as it is. A stale
/// socket is replaced ([`remove_stale_socket`]); a live one is an error naming
/// `name`; any other file is an error and left alone.
pub fn bind(path: &Path, name: &str) -> Result<(UnixListener, SocketFile), Error> {
    if let Some(dir) = path.parent() {
        create_missing_dirs(dir)?;
    }
    match remove_stale_socket(path) {
        Ok(true) => log::debug!("replaced stale control socket {}", path.display()),
        Ok(false) => {}
        Err(Error::Stale(stale_socket::Error::Live { path })) => {
            return Err(Error::InUse {
                name: name.to_owned(),
                path,
            })
        }
        Err(e) => return Err(e),
    }
    let bind_err = |source| Error::Bind {
        path: path.to_path_buf(),
        source,
    };
    let fd = bind_private(path).map_err(bind_err)?;
    let file = SocketFile::hold(path).map_err(bind_err)?;
    // SAFETY: listen(2) takes no pointers; `fd` is a bound socket; the result is checked.
    if unsafe { libc::listen(fd.as_raw_fd(), libc::SOMAXCONN) } < 0 {
        return Err(bind_err(io::Error::last_os_error()));
    }
    Ok((UnixListener::from(fd), file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory of this test's own, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let d = std::env::temp_dir().join(format!(
                "ferrite-paths-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir(&d).unwrap();
            std::fs::set_permissions(&d, Permissions::from_mode(0o755)).unwrap();
            TempDir(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

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
        let dir = TempDir::new("stale");
        let path = socket_path(&dir.0, "t1");
        {
            let (_l, file) = bind(&path, "t1").unwrap();
            assert_eq!(mode(&path), 0o600);
            assert_eq!(mode(&dir.0), 0o755, "an existing directory keeps its mode");
            assert!(matches!(bind(&path, "t1"), Err(Error::InUse { .. })));
            assert_eq!(file.path(), path);
            assert!(file.is_ours());
        }
        assert!(!path.exists(), "removed on drop");
        // A stale socket: bound, then the listener closed without removing the file.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        // Another test forking (mkfifo) at that moment holds a copy of the listener
        // until its exec closes it: wait until nobody listens any more.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::os::unix::net::UnixStream::connect(&path).is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "the closed listener still answers"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let (_l, f) = bind(&path, "t1").expect("stale socket replaced");
        drop(f);
        assert!(!path.exists());
    }

    #[test]
    fn missing_parent_directories_are_created_private() {
        let dir = TempDir::new("mkdir");
        let sub = dir.0.join("a").join("b");
        let path = socket_path(&sub, "t");
        let (_l, _f) = bind(&path, "t").unwrap();
        assert_eq!(mode(&sub) & 0o077, 0, "created without group/other access");
        assert_eq!(mode(&dir.0.join("a")) & 0o077, 0);
        assert_eq!(mode(&dir.0), 0o755);
    }

    #[test]
    fn files_that_are_not_sockets_are_left_alone() {
        let dir = TempDir::new("notsock");
        let file = dir.0.join("precious.sock");
        std::fs::write(&file, b"data").unwrap();
        let sub = dir.0.join("sub.sock");
        std::fs::create_dir(&sub).unwrap();
        let link = dir.0.join("link.sock");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        for (p, k) in [
            (&file, "regular file"),
            (&sub, "directory"),
            (&link, "symbolic link"),
        ] {
            match bind(p, "x") {
                Err(Error::Stale(stale_socket::Error::NotASocket { path, kind })) => {
                    assert_eq!((path.as_path(), kind), (p.as_path(), k))
                }
                other => panic!("{}: {other:?}", p.display()),
            }
            assert!(std::fs::symlink_metadata(p).is_ok(), "{} kept", p.display());
        }
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
        assert!(matches!(
            remove_stale_socket(&dir.0.join("none")),
            Ok(false)
        ));
    }

    #[test]
    fn drop_leaves_a_socket_bound_by_someone_else() {
        let dir = TempDir::new("drop");
        let path = socket_path(&dir.0, "t");
        let (l1, f1) = bind(&path, "t").unwrap();
        drop(l1);
        std::fs::remove_file(&path).unwrap();
        let (_l2, f2) = bind(&path, "t").unwrap();
        assert!(!f1.is_ours() && f2.is_ours());
        drop(f1);
        assert!(path.exists(), "the second socket survives the first's drop");
        drop(f2);
        assert!(!path.exists());
    }

    #[test]
    fn run_dir_checks() {
        let dir = TempDir::new("check");
        assert!(check_run_dir(&dir.0).is_ok(), "0755, owned by us");
        assert!(check_run_dir(&dir.0.join("missing")).is_ok());
        let open = dir.0.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, Permissions::from_mode(0o777)).unwrap();
        let link = dir.0.join("link");
        std::os::unix::fs::symlink(&dir.0, &link).unwrap();
        let file = dir.0.join("file");
        std::fs::write(&file, b"").unwrap();
        for (p, what) in [
            (&open, "may write"),
            (&link, "symbolic link"),
            (&file, "regular file"),
        ] {
            let e = check_run_dir(p).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(e, Error::UntrustedDir { .. }) && msg.contains(what),
                "{msg}"
            );
            assert!(msg.contains(&p.display().to_string()), "{msg}");
        }
        // A trailing slash does not make lstat follow the link.
        let mut with_slash = link.clone().into_os_string();
        with_slash.push("/");
        let d = normalized(PathBuf::from(with_slash));
        assert!(check_run_dir(&d).is_err());
        assert_eq!(mode(&open), 0o777, "a refused directory keeps its mode");
    }

    #[test]
    fn socket_paths_too_long_are_refused() {
        let dir = TempDir::new("long");
        let p = dir.0.join("x".repeat(120));
        let e = bind(&p, "x").unwrap_err();
        assert!(matches!(e, Error::Bind { .. }), "{e}");
    }
}
