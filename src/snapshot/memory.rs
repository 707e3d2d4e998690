//! A snapshot's memory file (`DIR/memory`): every guest RAM region, in guest-physical
//! order, back to back; the layout (guest address, length, file offset of each region)
//! is recorded in the state file. Pages that are all zero are not written: the file is
//! sized first, so they stay holes (a sparse file: a guest that touched little memory
//! gives a small file, and restore reads zeros for them from the page cache's zero
//! pages).
//!
//! Restore maps the file `MAP_PRIVATE` through [`crate::memory::Backing::Snapshot`].
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

/// Guest memory is copied out this much at a time.
const CHUNK: usize = 1 << 20;
const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create snapshot memory file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write snapshot memory file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read guest memory at {addr:#x}")]
    ReadGuest {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("snapshot memory file {path} is missing")]
    Missing { path: PathBuf },
    #[error("snapshot memory file {path} has {got} bytes; the state file says {expected}")]
    Size {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    #[error("snapshot memory file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the snapshot's memory layout {0:x?} is not back to back from offset 0")]
    Layout(Vec<Region>),
}

/// One guest RAM region in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Region {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// Where guest RAM is in the memory file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    pub regions: Vec<Region>,
}

impl Layout {
    /// Bytes of guest RAM, and so of the memory file.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// `(guest address, length)` of each region, for [`crate::memory::create_ram`].
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.regions.iter().map(|r| (r.guest_addr, r.len)).collect()
    }

    /// Regions must follow each other in the file from offset 0 (the way
    /// `create_ram` maps a file).
    pub fn check(&self) -> Result<(), Error> {
        let mut off = 0;
        for r in &self.regions {
            if r.file_offset != off {
                return Err(Error::Layout(self.regions.clone()));
            }
            off += r.len;
        }
        Ok(())
    }
}

/// What [`save`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saved {
    /// The file's length (all of guest RAM).
    pub bytes: u64,
    /// Bytes actually written (the pages that are not all zero).
    pub written: u64,
}

/// Writes all of `mem` to a new file `path` (mode 0600; an existing file is refused),
/// zero pages as holes, and syncs it.
pub fn save(mem: &GuestMemory, path: &Path) -> Result<(Layout, Saved), Error> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| Error::Create {
            path: path.to_path_buf(),
            source,
        })?;
    let werr = |source| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut regions = Vec::new();
    let mut off = 0u64;
    for r in mem.iter() {
        regions.push(Region {
            guest_addr: r.start_addr().0,
            len: r.len(),
            file_offset: off,
        });
        off += r.len();
    }
    let layout = Layout { regions };
    f.set_len(off).map_err(werr)?;
    let mut written = 0;
    let mut buf = vec![0u8; CHUNK];
    for r in &layout.regions {
        let mut done = 0u64;
        while done < r.len {
            let n = (r.len - done).min(CHUNK as u64) as usize;
            let addr = r.guest_addr + done;
            mem.read_slice(&mut buf[..n], GuestAddress(addr))
                .map_err(|source| Error::ReadGuest { addr, source })?;
            written += write_nonzero(&f, &buf[..n], r.file_offset + done).map_err(werr)?;
            done += n as u64;
        }
    }
    f.sync_data().map_err(werr)?;
    Ok((
        layout,
        Saved {
            bytes: off,
            written,
        },
    ))
}

/// Writes the runs of pages of `data` that are not all zero at `offset` (+ their
/// place in `data`); returns how many bytes it wrote.
fn write_nonzero(f: &File, data: &[u8], offset: u64) -> std::io::Result<u64> {
    let mut written = 0;
    let mut run: Option<usize> = None;
    let mut i = 0;
    while i <= data.len() {
        let zero = i == data.len() || data[i..(i + PAGE).min(data.len())].iter().all(|&b| b == 0);
        match (run, zero) {
            (None, false) => run = Some(i),
            (Some(start), true) => {
                f.write_all_at(&data[start..i], offset + start as u64)?;
                written += (i - start) as u64;
                run = None;
            }
            _ => {}
        }
        i += PAGE;
    }
    Ok(written)
}

/// Checks that the memory file at `path` exists and has the layout's size, before a
/// restore creates anything.
pub fn check_file(path: &Path, layout: &Layout) -> Result<(), Error> {
    layout.check()?;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Missing {
                path: path.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(Error::Open {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if meta.len() != layout.size() {
        return Err(Error::Size {
            path: path.to_path_buf(),
            expected: layout.size(),
            got: meta.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_ram, Backing, MemoryConfig};
    use std::os::unix::fs::MetadataExt;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferrite-snapmem-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Two regions with a gap between them, like the x86 layout around its MMIO hole.
    fn two_regions() -> Vec<(u64, u64)> {
        vec![(0, 4 << 20), (16 << 20, 4 << 20)]
    }

    #[test]
    fn memory_round_trips_through_a_private_mapping_of_the_file() {
        let d = tmpdir("rt");
        let ranges = two_regions();
        let ram = create_ram(&MemoryConfig::new(8 << 20), &ranges).unwrap();
        ram.mem
            .write_obj(0x1122_3344_u32, GuestAddress(0x1000))
            .unwrap();
        ram.mem
            .write_obj(0x5566_7788_u32, GuestAddress((16 << 20) + 0x3000))
            .unwrap();
        let path = d.join("memory");
        let (layout, saved) = save(&ram.mem, &path).unwrap();
        assert_eq!(layout.ranges(), ranges);
        assert_eq!(saved.bytes, 8 << 20);
        // Only the two touched pages are written; the rest are holes.
        assert_eq!(saved.written, 2 * PAGE as u64);
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(allocated < 1 << 20, "{allocated} bytes allocated");
        check_file(&path, &layout).unwrap();

        let mut cfg = MemoryConfig::new(layout.size());
        cfg.backing = Backing::Snapshot(path.clone());
        let restored = create_ram(&cfg, &layout.ranges()).unwrap();
        let a: u32 = restored.mem.read_obj(GuestAddress(0x1000)).unwrap();
        let b: u32 = restored
            .mem
            .read_obj(GuestAddress((16 << 20) + 0x3000))
            .unwrap();
        assert_eq!((a, b), (0x1122_3344, 0x5566_7788));
        // Writes are the VM's own: the file keeps the snapshot.
        restored.mem.write_obj(0u32, GuestAddress(0x1000)).unwrap();
        let again = create_ram(&cfg, &layout.ranges()).unwrap();
        let a: u32 = again.mem.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(a, 0x1122_3344);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_or_short_memory_file_is_refused_before_mapping() {
        let d = tmpdir("short");
        let layout = Layout {
            regions: vec![Region {
                guest_addr: 0,
                len: 2 << 20,
                file_offset: 0,
            }],
        };
        let path = d.join("memory");
        let e = check_file(&path, &layout).unwrap_err();
        assert!(matches!(e, Error::Missing { .. }), "{e}");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let e = check_file(&path, &layout).unwrap_err();
        assert!(e.to_string().contains("has 4096 bytes"), "{e}");
        let mut cfg = MemoryConfig::new(2 << 20);
        cfg.backing = Backing::Snapshot(path);
        let e = create_ram(&cfg, &layout.ranges()).err().unwrap();
        assert!(
            matches!(e, crate::memory::Error::SnapshotFileSize { got: 4096, .. }),
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn save_refuses_an_existing_memory_file() {
        let d = tmpdir("exists");
        let mem = crate::memory::create(2 << 20).unwrap();
        let path = d.join("memory");
        std::fs::write(&path, b"keep").unwrap();
        let e = save(&mem, &path).unwrap_err();
        assert!(matches!(e, Error::Create { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
