//! Guest memory served by a userfaultfd page-fault handler on restore (Firecracker's
//! `Uffd` memory backend): guest RAM is anonymous memory registered with a new
//! userfaultfd (missing-page mode, `UFFD_EVENT_REMOVE` required so a handler hears
//! about pages the balloon gave back); the descriptor goes to the handler over the
//! UNIX socket it listens on (`SCM_RIGHTS`), with a JSON array of the regions, each
//! `{"base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"}`: where the
//! region is in this process, its length, where its contents are in the memory file,
//! and its page size in bytes (`page_size_kib` carries the same byte count, as
//! Firecracker sends it: the name is Firecracker's). Nothing else is ever said on that
//! socket. Every page anyone touches from then on (KVM for a vCPU, a device, the
//! restore itself) waits until the handler has copied it in (`UFFDIO_COPY`).
#![forbid(unsafe_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::memory::Layout;
use crate::memory::GuestMemory;

const PAGE_SIZE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create a userfaultfd (is /dev/userfaultfd or vm.unprivileged_userfaultfd open to this user?)")]
    Create(#[source] userfaultfd::Error),
    #[error(
        "cannot register guest memory at host address {addr:#x} ({len} bytes) with the userfaultfd"
    )]
    Register {
        addr: u64,
        len: usize,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("guest memory region at {0:#x} is not in the snapshot's memory layout")]
    NotInLayout(u64),
    #[error("cannot connect to the page-fault handler's socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot send the userfaultfd to the page-fault handler at {path}")]
    Send {
        path: PathBuf,
        #[source]
        source: vmm_sys_util::errno::Error,
    },
}

/// One guest memory region as the handler is told of it (Firecracker's field names).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegionMapping {
    /// Where the region starts in this (Ferrite's) address space.
    pub base_host_virt_addr: u64,
    /// The region's length in bytes.
    pub size: usize,
    /// Where the region's contents start in the memory file.
    pub offset: u64,
    /// The page size in bytes.
    pub page_size: usize,
    /// The page size in bytes again (Firecracker's deprecated name for it).
    pub page_size_kib: usize,
}

/// Registers every region of `mem` (anonymous, untouched) with a new userfaultfd and
/// returns it with the region list for the handler; `layout` says where each region
/// is in the memory file.
pub fn register(mem: &GuestMemory, layout: &Layout) -> Result<(Uffd, Vec<RegionMapping>), Error> {
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(FeatureFlags::EVENT_REMOVE)
        .create()
        .map_err(Error::Create)?;
    let mut mappings = Vec::new();
    for r in mem.iter() {
        let guest = r.start_addr().0;
        let saved = layout
            .regions
            .iter()
            .find(|s| s.guest_addr == guest && s.len == r.len())
            .ok_or(Error::NotInLayout(guest))?;
        let host = r.as_ptr();
        let len = r.len() as usize;
        uffd.register(host.cast(), len)
            .map_err(|source| Error::Register {
                addr: host as u64,
                len,
                source,
            })?;
        mappings.push(RegionMapping {
            base_host_virt_addr: host as u64,
            size: len,
            offset: saved.file_offset,
            page_size: PAGE_SIZE,
            page_size_kib: PAGE_SIZE,
        });
    }
    Ok((uffd, mappings))
}

/// Connects to the handler's socket and sends the region list with the descriptor.
pub fn hand_to_handler(
    socket: &Path,
    mappings: &[RegionMapping],
    uffd: &Uffd,
) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    let body = serde_json::to_vec(mappings).unwrap_or_default();
    let stream = UnixStream::connect(socket).map_err(|source| Error::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream
        .send_with_fd(&body[..], uffd.as_raw_fd())
        .map_err(|source| Error::Send {
            path: socket.to_path_buf(),
            source,
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_list_has_firecrackers_field_names() {
        let m = RegionMapping {
            base_host_virt_addr: 0x7f00_0000_0000,
            size: 1 << 20,
            offset: 4096,
            page_size: 4096,
            page_size_kib: 4096,
        };
        let v: serde_json::Value = serde_json::to_value([&m]).unwrap();
        let o = v[0].as_object().unwrap();
        let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "base_host_virt_addr",
                "offset",
                "page_size",
                "page_size_kib",
                "size"
            ]
        );
        assert_eq!(o["base_host_virt_addr"], 0x7f00_0000_0000u64);
    }
}
