//! Files Ferrite is given by path (images, initrds, disks, memory backing files): what
//! kind a path names, in words, and the one checked open that refuses anything but a
//! regular file without blocking on a FIFO. A leaf module: it uses nothing of Ferrite's.
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Why [`open_regular`] refused a path.
#[derive(Debug)]
pub enum OpenFailure {
    /// open or fstat failed.
    Io(std::io::Error),
    /// The path names something other than a regular file (what, e.g. "FIFO").
    NotRegular(&'static str),
}

/// What a file type is, in words ("regular file", "symbolic link" for an lstat, ...).
pub fn kind(t: std::fs::FileType) -> &'static str {
    if t.is_file() {
        "regular file"
    } else if t.is_symlink() {
        "symbolic link"
    } else if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO (named pipe)"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// [`kind`] for anything but a regular file; `None` for a regular file.
pub fn special_kind(t: std::fs::FileType) -> Option<&'static str> {
    (!t.is_file()).then(|| kind(t))
}

/// Opens `path` for reading and returns it with its size, refusing anything but a
/// regular file. `O_NONBLOCK` keeps the open of a FIFO from waiting for a writer; the
/// type comes from the opened file (fstat), so the path cannot change under us.
pub fn open_regular(path: &Path) -> Result<(File, u64), OpenFailure> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            // A Unix socket cannot be opened (ENXIO): name it rather than the errno.
            let socket = e.raw_os_error() == Some(libc::ENXIO)
                && std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket());
            if socket {
                OpenFailure::NotRegular("socket")
            } else {
                OpenFailure::Io(e)
            }
        })?;
    let meta = file.metadata().map_err(OpenFailure::Io)?;
    match special_kind(meta.file_type()) {
        Some(kind) => Err(OpenFailure::NotRegular(kind)),
        None => Ok((file, meta.len())),
    }
}

/// How a file is locked against other processes: `flock(2)` through std's
/// `File::try_lock*` (std implements them with `flock` on Linux), never waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// Many readers (a read-only disk image).
    Shared,
    /// One user (a writable disk image, a guest-memory backing file).
    Exclusive,
}

/// Why [`lock`] failed.
#[derive(Debug)]
pub enum LockFailure {
    /// Another open file (another process, or this one) holds a conflicting lock.
    Held,
    /// flock itself failed.
    Io(std::io::Error),
}

/// Locks `file` without waiting; the lock lives as long as the open file.
pub fn lock(file: &File, how: Lock) -> Result<(), LockFailure> {
    let r = match how {
        Lock::Shared => file.try_lock_shared(),
        Lock::Exclusive => file.try_lock(),
    };
    r.map_err(|e| match e {
        std::fs::TryLockError::WouldBlock => LockFailure::Held,
        std::fs::TryLockError::Error(e) => LockFailure::Io(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_in_words_and_locks_conflict() {
        let kind = |p: &str| match open_regular(Path::new(p)) {
            Err(OpenFailure::NotRegular(k)) => k,
            Err(OpenFailure::Io(e)) => panic!("{p}: {e}"),
            Ok(_) => panic!("{p} was accepted"),
        };
        assert_eq!(kind("/dev/zero"), "character device");
        assert_eq!(kind("/"), "directory");
        let fifo = std::env::temp_dir().join(format!("ferrite-file-{}-fifo", std::process::id()));
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // Opening a FIFO with no writer must not block.
        assert_eq!(kind(fifo.to_str().unwrap()), "FIFO (named pipe)");
        std::fs::remove_file(fifo).unwrap();
        let p = std::env::temp_dir().join(format!("ferrite-file-{}", std::process::id()));
        std::fs::write(&p, b"x").unwrap();
        let (a, size) = open_regular(&p).unwrap();
        assert_eq!(size, 1);
        let (b, _) = open_regular(&p).unwrap();
        lock(&a, Lock::Shared).unwrap();
        lock(&b, Lock::Shared).unwrap();
        drop(b);
        let (c, _) = open_regular(&p).unwrap();
        assert!(matches!(lock(&c, Lock::Exclusive), Err(LockFailure::Held)));
        drop(a);
        lock(&c, Lock::Exclusive).unwrap();
        std::fs::remove_file(p).unwrap();
    }
}
