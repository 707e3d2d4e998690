//! A non-blocking timerfd for the event loop's users (balloon statistics, vsock
//! time-outs, the MMDS responder). vmm-sys-util's `TimerFd` opens a blocking fd and has
//! no flag for it; a read of a timer that a reset disarmed would then stall the event
//! loop, so the one `fcntl(O_NONBLOCK)` it lacks is written here.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;
use vmm_sys_util::timerfd::TimerFd;

/// A monotonic timerfd whose reads never block.
pub fn nonblocking() -> std::io::Result<TimerFd> {
    let timer = TimerFd::new().map_err(std::io::Error::from)?;
    let fd = timer.as_raw_fd();
    // SAFETY: F_GETFL on the fd `timer` owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on the same fd; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(timer)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_unarmed_timer_reads_would_block_instead_of_blocking() {
        let mut t = super::nonblocking().expect("timerfd");
        let e = t.wait().expect_err("an unarmed timer has nothing to read");
        assert_eq!(e.errno(), libc::EAGAIN);
    }
}
