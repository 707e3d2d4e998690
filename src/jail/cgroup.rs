//! The jail's cgroup v2 leaf: `<cgroup2 mount>/<parent>/<id>`, made here (never
//! reused), the `--cgroup` files written into it, the controllers they need enabled
//! in each ancestor's `cgroup.subtree_control` (only where missing), and this process
//! moved in (so the VMM started from it stays there).

use std::collections::BTreeSet;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::args::CgroupSetting;

/// Errors setting up the cgroup leaf, each with its path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no cgroup v2 hierarchy is mounted (no cgroup2 line in /proc/mounts)")]
    NoHierarchy,
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup controller {controller:?} is not available in {root} (it has: {available})")]
    Unavailable {
        controller: String,
        root: PathBuf,
        available: String,
    },
    #[error("cgroup {0} already exists (ids must be unique)")]
    Exists(PathBuf),
    #[error("cannot create cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
}

/// The first cgroup2 mount point in a /proc/mounts text.
pub fn v2_root(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// The host's cgroup v2 mount point.
pub fn host_v2_root() -> Result<PathBuf, Error> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(|source| Error::Read {
        path: "/proc/mounts".into(),
        source,
    })?;
    v2_root(&mounts).ok_or(Error::NoHierarchy)
}

/// A cgroup leaf made here, with the directories made for it (outermost first).
#[derive(Debug, Default)]
pub struct Leaf {
    pub path: PathBuf,
    made: Vec<PathBuf>,
}

impl Leaf {
    /// Removes the directories made here (innermost first); a cgroup that still
    /// has processes stays (rmdir fails) and is left to the operator.
    pub fn remove(&self) {
        for d in self.made.iter().rev() {
            let _ = fs::remove_dir(d);
        }
    }
}

fn write(path: PathBuf, value: &str) -> Result<(), Error> {
    fs::write(&path, format!("{value}\n")).map_err(|source| Error::Write {
        path,
        value: value.to_owned(),
        source,
    })
}

fn read(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Makes `<root>/<parent>/<id>`, writes `settings` into it and moves this process in.
/// On failure, what was made is removed again.
pub fn setup(
    root: &Path,
    parent: &Path,
    id: &str,
    settings: &[CgroupSetting],
) -> Result<Leaf, Error> {
    let available_text = read(&root.join("cgroup.controllers"))?;
    let available: BTreeSet<&str> = available_text.split_whitespace().collect();
    // The controllers the settings need ("cgroup" is the core, always there).
    let mut needed = BTreeSet::new();
    for s in settings {
        let c = s.controller();
        if c != "cgroup" {
            if !available.contains(c) {
                return Err(Error::Unavailable {
                    controller: c.to_owned(),
                    root: root.to_path_buf(),
                    available: available_text.trim().to_owned(),
                });
            }
            needed.insert(c.to_owned());
        }
    }
    let mut leaf = Leaf::default();
    let r = build(root, parent, id, settings, &needed, &mut leaf);
    if r.is_err() {
        leaf.remove();
    }
    r.map(|()| leaf)
}

fn build(
    root: &Path,
    parent: &Path,
    id: &str,
    settings: &[CgroupSetting],
    needed: &BTreeSet<String>,
    leaf: &mut Leaf,
) -> Result<(), Error> {
    // Ancestors from the root down to the parent: made if missing; each must pass
    // the needed controllers down.
    let mut dir = root.to_path_buf();
    let mut ancestors = vec![dir.clone()];
    for c in parent.components() {
        dir.push(c);
        match fs::create_dir(&dir) {
            Ok(()) => leaf.made.push(dir.clone()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(source) => return Err(Error::Create { path: dir, source }),
        }
        ancestors.push(dir.clone());
    }
    let path = dir.join(id);
    match fs::create_dir(&path) {
        Ok(()) => leaf.made.push(path.clone()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => return Err(Error::Exists(path)),
        Err(source) => return Err(Error::Create { path, source }),
    }
    leaf.path = path.clone();
    for a in &ancestors {
        let control = a.join("cgroup.subtree_control");
        let enabled = read(&control)?;
        for c in needed {
            if !enabled.split_whitespace().any(|e| e == c) {
                write(control.clone(), &format!("+{c}"))?;
            }
        }
    }
    for s in settings {
        write(path.join(&s.file), &s.value)?;
    }
    write(path.join("cgroup.procs"), &std::process::id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_v2_hierarchy_is_found_beside_v1_mounts() {
        let m = "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n\
                 cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(v2_root(m), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(v2_root("cgroup /a cgroup rw 0 0\n"), None);
    }
}
