//! Kicking a vCPU out of KVM_RUN from another thread without ever losing the kick.
//!
//! The kicker sets the vCPU's `kvm_run.immediate_exit`, issues a release fence and then
//! sends the thread a real-time signal whose handler only fences. If the signal lands
//! while the thread is inside KVM_RUN, the ioctl returns EINTR; if it lands just before,
//! KVM sees `immediate_exit` on entry and returns EINTR at once. Either way the vCPU
//! gets back to its loop and looks at the stop flag.

use std::sync::atomic::{fence, AtomicU8, Ordering};
use std::sync::{Mutex, Once};

use kvm_bindings::kvm_run;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot install the vCPU kick signal handler (signal {signal})")]
    InstallHandler {
        signal: i32,
        #[source]
        source: vmm_sys_util::errno::Error,
    },
}

/// The real-time signal used for kicks.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Pairs with the release fence in `KickTarget::kick`. Nothing else happens here: the
    // only purpose of the signal is to make KVM_RUN return EINTR.
    fence(Ordering::Acquire);
}

/// Installs the kick handler once per process.
pub fn install_handler() -> Result<(), Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        let signal = kick_signal();
        if let Err(source) = vmm_sys_util::signal::register_signal_handler(signal, on_kick) {
            result = Err(Error::InstallHandler { signal, source });
        }
    });
    result
}

struct Registration {
    run: *mut kvm_run,
    pthread: libc::pthread_t,
    thread: std::thread::Thread,
}

// SAFETY: the raw pointer is only dereferenced under the mutex while the owning vCPU
// thread keeps the mapping alive (it unregisters before dropping its VcpuFd); the
// pthread_t is a plain thread id.
unsafe impl Send for Registration {}

/// Shared between a vCPU thread (which registers its `kvm_run` while it lives) and the
/// handles that kick it.
#[derive(Default)]
pub struct KickTarget {
    reg: Mutex<Option<Registration>>,
}

/// Unregisters when the vCPU thread leaves its loop.
pub struct RegistrationGuard<'a>(&'a KickTarget);

impl Drop for RegistrationGuard<'_> {
    fn drop(&mut self) {
        *self.0.reg.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl KickTarget {
    pub fn new() -> Self {
        Self::default()
    }

    /// Called on the vCPU thread with its own `kvm_run`. The mapping must stay valid
    /// until the returned guard is dropped.
    pub fn register(&self, run: *mut kvm_run) -> RegistrationGuard<'_> {
        // SAFETY: pthread_self has no preconditions.
        let pthread = unsafe { libc::pthread_self() };
        *self.reg.lock().unwrap_or_else(|p| p.into_inner()) = Some(Registration {
            run,
            pthread,
            thread: std::thread::current(),
        });
        RegistrationGuard(self)
    }

    /// Forces the vCPU out of KVM_RUN (or out of a park while halted). A no-op once the
    /// thread has left its loop.
    pub fn kick(&self) {
        let reg = self.reg.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = reg.as_ref() else { return };
        // SAFETY: `r.run` points into the vCPU's live kvm_run mapping: the thread drops
        // its registration (under this same mutex) before unmapping it. `immediate_exit`
        // is a byte KVM reads on entry; an atomic store keeps concurrent access defined.
        unsafe { immediate_exit(r.run).store(1, Ordering::Release) };
        fence(Ordering::Release);
        // SAFETY: the thread is alive (it is registered), so its pthread_t is valid.
        let rc = unsafe { libc::pthread_kill(r.pthread, kick_signal()) };
        if rc != 0 {
            log::warn!(
                "kick: pthread_kill failed: {}",
                std::io::Error::from_raw_os_error(rc)
            );
        }
        r.thread.unpark();
    }
}

/// The `immediate_exit` byte of `run` as an atomic.
///
/// # Safety
/// `run` must point to a live, mapped `kvm_run`.
pub unsafe fn immediate_exit<'a>(run: *mut kvm_run) -> &'a AtomicU8 {
    // SAFETY: the caller guarantees `run` is live; `immediate_exit` is a u8 field, which
    // has the size and alignment of AtomicU8.
    unsafe { AtomicU8::from_ptr(std::ptr::addr_of_mut!((*run).immediate_exit)) }
}
