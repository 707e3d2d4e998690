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
//!
//! [`Server`] is Ferrite's own handler (`ferrite run --restore DIR --mem-backend
//! uffd`): a thread, under its own seccomp filter, that serves each fault with the
//! page read from the memory file (zeros for a page the balloon removed since).
#![allow(unsafe_code)]

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
    #[error("cannot open the memory file {path} for the page-fault handler")]
    MemoryFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the page-fault handler thread")]
    Thread(#[source] std::io::Error),
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

/// Ferrite's own page-fault handler thread; dropping it stops the thread.
pub struct Server {
    stop: vmm_sys_util::eventfd::EventFd,
    thread: Option<crate::threads::Joinable>,
}

impl Server {
    /// Starts serving the faults of `uffd` (regions `mappings`) from `memory_file`.
    pub fn start(
        uffd: Uffd,
        mappings: Vec<RegionMapping>,
        memory_file: &Path,
    ) -> Result<Self, Error> {
        let file = std::fs::File::open(memory_file).map_err(|source| Error::MemoryFile {
            path: memory_file.to_path_buf(),
            source,
        })?;
        let stop =
            vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Thread)?;
        let stop_rx = stop.try_clone().map_err(Error::Thread)?;
        let thread = crate::threads::Joinable::spawn("ferrite-uffd".to_owned(), move || {
            crate::seccomp::enter(crate::seccomp::ThreadKind::UffdHandler);
            let served = serve(&uffd, &mappings, &file, &stop_rx);
            log::info!("page-fault handler: {served} pages served");
        })
        .map_err(Error::Thread)?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            if t.join_until(deadline) != crate::threads::Joined::Finished {
                log::warn!("page-fault handler: the thread did not end");
            }
        }
    }
}

/// The handler's loop: until `stop` is readable, each fault gets its page; returns
/// how many pages it served.
fn serve(
    uffd: &Uffd,
    regions: &[RegionMapping],
    file: &std::fs::File,
    stop: &vmm_sys_util::eventfd::EventFd,
) -> u64 {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let mut page = vec![0u8; PAGE_SIZE];
    let mut removed: Vec<(u64, u64)> = Vec::new();
    let mut served = 0u64;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds, their count given; poll only writes `revents`.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!(
                "page-fault handler: poll: {}",
                std::io::Error::last_os_error()
            );
            return served;
        }
        if fds[1].revents != 0 || fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            return served;
        }
        loop {
            match uffd.read_event() {
                Ok(Some(userfaultfd::Event::Pagefault { addr, .. })) => {
                    let at = addr as u64 & !(PAGE_SIZE as u64 - 1);
                    let Some(r) = regions.iter().find(|r| {
                        at >= r.base_host_virt_addr && at < r.base_host_virt_addr + r.size as u64
                    }) else {
                        log::error!("page-fault handler: a fault at {at:#x} outside guest memory");
                        continue;
                    };
                    let dst = at as *mut libc::c_void;
                    let result = if removed.iter().any(|&(s, e)| at >= s && at < e) {
                        // SAFETY: `dst` is a page of a region registered with `uffd`
                        // (found above); ZEROPAGE fills only that missing page.
                        unsafe { uffd.zeropage(dst, PAGE_SIZE, true) }.map(drop)
                    } else {
                        let off = r.offset + (at - r.base_host_virt_addr);
                        if let Err(e) = file.read_exact_at(&mut page, off) {
                            log::error!("page-fault handler: memory file at {off:#x}: {e}");
                            return served;
                        }
                        // SAFETY: `page` is PAGE_SIZE bytes of ours; `dst` a page of a
                        // region registered with `uffd`; COPY fills only that missing page.
                        unsafe { uffd.copy(page.as_ptr().cast(), dst, PAGE_SIZE, true) }.map(drop)
                    };
                    match result {
                        Ok(()) => served += 1,
                        // Another thread's fault on the page was served first.
                        Err(
                            userfaultfd::Error::CopyFailed(e)
                            | userfaultfd::Error::ZeropageFailed(e),
                        ) if e as i32 == libc::EEXIST => {}
                        Err(e) => {
                            log::error!("page-fault handler: serving {at:#x}: {e}");
                            return served;
                        }
                    }
                }
                Ok(Some(userfaultfd::Event::Remove { start, end })) => {
                    removed.push((start as u64, end as u64));
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    log::error!("page-fault handler: reading an event: {e}");
                    return served;
                }
            }
        }
    }
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
