//! Kicking a vCPU out of KVM_RUN from another thread without ever losing the kick.
//!
//! The kicker sets the vCPU's `kvm_run.immediate_exit`, issues a release fence and then
//! sends the thread a real-time signal whose handler only fences. If the signal lands
//! while the thread is inside KVM_RUN, the ioctl returns EINTR; if it lands just before,
//! KVM sees `immediate_exit` on entry and returns EINTR at once. Either way the vCPU
//! gets back to its loop and looks at its mailbox and the stop flag.
//!
//! The kicker reaches `immediate_exit` through a [`RunMapping`] of its own: a second
//! mapping of the vCPU's `kvm_run` page, owned by the handle and valid for as long as
//! the handle lives, whatever the vCPU thread does. (Firecracker kicks through a
//! duplicated vCPU fd for the same reason; an mmap holds its own reference to the
//! file, so the mapping alone is enough here.) No safe function takes a raw pointer.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU8, Ordering};
use std::sync::{Mutex, Once};

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot install the vCPU kick signal handler (signal {signal})")]
    InstallHandler {
        signal: i32,
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    #[error("cannot map the kvm_run page of vCPU {index} ({len} bytes)")]
    Map {
        index: usize,
        len: usize,
        #[source]
        source: std::io::Error,
    },
}

/// The real-time signal used for kicks.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Pairs with the release fence in `Kicker::kick`. Nothing else happens here: the
    // only purpose of the signal is to make KVM_RUN return EINTR.
    fence(Ordering::Acquire);
}

/// Installs the kick handler once per process.
pub fn install_handler() -> Result<(), Error> {
    static ONCE: Once = Once::new();
    static FAILED: Mutex<Option<i32>> = Mutex::new(None);
    ONCE.call_once(|| {
        let signal = kick_signal();
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(signal, on_kick) {
            *FAILED.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.errno());
        }
    });
    match *FAILED.lock().unwrap_or_else(|p| p.into_inner()) {
        Some(errno) => Err(Error::InstallHandler {
            signal: kick_signal(),
            source: vmm_sys_util::errno::Error::new(errno),
        }),
        None => Ok(()),
    }
}

/// A mapping of one vCPU's `kvm_run` page (shared with KVM and the vCPU's own
/// mapping), owned by whoever holds it and unmapped on drop.
pub struct RunMapping {
    ptr: NonNull<kvm_run>,
    len: usize,
}

// SAFETY: the mapping is process memory valid until drop; every access through it is
// either atomic (`immediate_exit`) or a read of plain data, so sharing it between
// threads cannot cause a data race in Rust's sense beyond what KVM itself tolerates.
unsafe impl Send for RunMapping {}
// SAFETY: as above.
unsafe impl Sync for RunMapping {}

impl RunMapping {
    /// Maps `len` bytes (KVM_GET_VCPU_MMAP_SIZE) of `vcpu`'s run structure.
    pub fn new(vcpu: &VcpuFd, index: usize, len: usize) -> Result<Self, Error> {
        if len < std::mem::size_of::<kvm_run>() {
            return Err(Error::Map {
                index,
                len,
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        // SAFETY: a fresh shared mapping of a KVM vCPU fd at offset 0 (its kvm_run);
        // the result is checked before use and the kernel keeps the file referenced
        // for the mapping's lifetime.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Map {
                index,
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(p.cast::<kvm_run>()).ok_or(Error::Map {
            index,
            len,
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        Ok(Self { ptr, len })
    }

    /// The `immediate_exit` byte, as an atomic.
    pub fn immediate_exit(&self) -> &AtomicU8 {
        // SAFETY: `ptr` is a live mapping of a kvm_run for as long as `self` lives;
        // `immediate_exit` is a u8, which has the size and alignment of AtomicU8, and
        // every Ferrite access to it goes through this atomic view.
        unsafe { AtomicU8::from_ptr(std::ptr::addr_of_mut!((*self.ptr.as_ptr()).immediate_exit)) }
    }

    /// `kvm_run.io.size`: the item size of the port I/O exit being handled. Only
    /// meaningful during a KVM_EXIT_IO; any other time it is some byte of the union.
    pub fn io_size(&self) -> usize {
        // SAFETY: the mapping is live; the union holds plain integers, so reading its
        // `io.size` byte is defined whatever exit (if any) is current.
        usize::from(unsafe { (*self.ptr.as_ptr()).__bindgen_anon_1.io.size })
    }
}

impl Drop for RunMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; nothing borrows it any
        // more (borrows of `self` have ended).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

struct Thread {
    pthread: libc::pthread_t,
    thread: std::thread::Thread,
}

/// How to interrupt one vCPU: its `kvm_run` mapping, plus the thread's identity while
/// the thread is inside its loop (registered under the mutex, so a signal is never
/// sent to a thread that has left).
pub struct Kicker {
    run: RunMapping,
    thread: Mutex<Option<Thread>>,
}

/// Unregisters the thread when its loop ends.
pub struct Registration<'a>(&'a Kicker);

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        *self.0.thread.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Kicker {
    pub fn new(run: RunMapping) -> Self {
        Self {
            run,
            thread: Mutex::new(None),
        }
    }

    /// The vCPU's `kvm_run`, for the vCPU thread itself (clearing `immediate_exit`,
    /// reading the I/O item size).
    pub fn run(&self) -> &RunMapping {
        &self.run
    }

    /// Called on the vCPU thread when it enters its loop.
    pub fn register(&self) -> Registration<'_> {
        // SAFETY: pthread_self has no preconditions.
        let pthread = unsafe { libc::pthread_self() };
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(Thread {
            pthread,
            thread: std::thread::current(),
        });
        Registration(self)
    }

    /// Forces the vCPU out of KVM_RUN (or out of a park while halted or paused). Before
    /// the thread registers, or after it leaves, only `immediate_exit` is set: the
    /// thread looks at its mailbox before every KVM_RUN anyway.
    pub fn kick(&self) {
        self.run.immediate_exit().store(1, Ordering::Release);
        fence(Ordering::Release);
        let reg = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        let Some(t) = reg.as_ref() else { return };
        // SAFETY: the thread is registered, so it has not left its loop and its
        // pthread_t is valid (it unregisters under this mutex before it ends).
        let rc = unsafe { libc::pthread_kill(t.pthread, kick_signal()) };
        if rc != 0 {
            log::warn!(
                "kick: pthread_kill failed: {}",
                std::io::Error::from_raw_os_error(rc)
            );
        }
        t.thread.unpark();
    }
}
