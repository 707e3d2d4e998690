//! The system call the balloon needs and no rust-vmm crate wraps: `fcntl(O_NONBLOCK)`
//! on the statistics timer (vmm-sys-util's `TimerFd` is blocking; a read after a reset
//! disarmed it would stall the event loop). Guest RAM is given back with
//! [`crate::memory::discard`].
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;

/// The guest's page size for balloon PFNs.
pub const PAGE: u64 = crate::memory::PAGE_SIZE;

/// Makes `fd` non-blocking.
pub fn set_nonblocking(fd: &impl AsRawFd) -> std::io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on an fd the caller owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
