//! The seccomp policy: which syscalls each kind of Ferrite thread may make.
//!
//! Every list starts from [`COMMON`] (what Rust's runtime, the allocator, logging, locks
//! and thread start-up need on any thread) and adds the thread's own work. A syscall
//! outside a thread's list raises SIGSYS (see `super::on_sigsys`), which reports it and
//! ends the process with [`super::EXIT_BAD_SYSCALL`].
//!
//! Argument filters, where the argument is a value (not a pointer the filter cannot
//! read):
//! - `mmap`/`mprotect` never with `PROT_EXEC` (no new executable memory on any thread);
//! - `clone` only with `CLONE_THREAD` (threads, never processes); `clone3`, whose flags sit
//!   in memory the filter cannot read, is answered ENOSYS by the first instructions of each filter (glibc then
//!   falls back to `clone`);
//! - `socket` only `AF_UNIX`;
//! - `ioctl` on vCPU threads only KVM's requests (type byte `0xAE`); elsewhere the
//!   requests listed by number;
//! - `prctl` only `PR_SET_NAME` (a new thread naming itself) and `PR_SET_NO_NEW_PRIVS`;
//! - `seccomp` only `SECCOMP_SET_MODE_FILTER` (a new thread adding its own filter).
//!
//! How the lists were made: from the code's calls (error paths included) and from
//! `strace -f` of the integration tests (docs/DESIGN.md, "Seccomp", has the numbers).

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// The kinds of thread Ferrite runs, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread once the VM runs: waits for the stop, tears down, reports, exits
    /// (re-raising a fatal signal to itself).
    Main,
    /// `ferrite-events`: the control/API server, the devices' queues (net, vsock,
    /// balloon, console input), timers and signals.
    EventLoop,
    /// `ferrite-vcpuN`: KVM_RUN and the port/MMIO exits it hands to the devices.
    Vcpu,
    /// A virtio-blk disk's I/O thread.
    BlockWorker,
    /// `ferrite-console`: copies guest console output to its sink.
    ConsoleWriter,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Main,
        ThreadKind::EventLoop,
        ThreadKind::Vcpu,
        ThreadKind::BlockWorker,
        ThreadKind::ConsoleWriter,
    ];

    /// The short name used in reports and the test hook.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::EventLoop => "loop",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::BlockWorker => "block",
            ThreadKind::ConsoleWriter => "console",
        }
    }
}

/// How a syscall is allowed.
#[derive(Clone, Copy)]
pub(super) enum Allow {
    /// With any arguments.
    Any,
    /// Only when argument `arg` masked with `mask` equals `value`.
    Masked { arg: u8, mask: u64, value: u64 },
    /// Only when argument `arg` equals one of the values.
    OneOf { arg: u8, values: &'static [u64] },
}

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;
const NO_EXEC: Allow = Allow::Masked {
    arg: 2,
    mask: PROT_EXEC,
    value: 0,
};

/// Every thread: the runtime, memory, locks, time, logging to stderr or a log file, and
/// starting a thread (the new thread inherits its creator's filter and first names
/// itself and sets up its signal stack).
const COMMON: &[(i64, Allow)] = &[
    (libc::SYS_read, Allow::Any),
    (libc::SYS_write, Allow::Any),
    (libc::SYS_readv, Allow::Any),
    (libc::SYS_writev, Allow::Any),
    (libc::SYS_close, Allow::Any),
    (libc::SYS_futex, Allow::Any),
    (libc::SYS_sched_yield, Allow::Any),
    (libc::SYS_nanosleep, Allow::Any),
    (libc::SYS_clock_nanosleep, Allow::Any),
    (libc::SYS_clock_gettime, Allow::Any),
    (libc::SYS_gettimeofday, Allow::Any),
    (libc::SYS_getrandom, Allow::Any),
    (libc::SYS_mmap, NO_EXEC),
    (libc::SYS_mprotect, NO_EXEC),
    (libc::SYS_munmap, Allow::Any),
    (libc::SYS_mremap, Allow::Any),
    (libc::SYS_madvise, Allow::Any),
    (libc::SYS_brk, Allow::Any),
    (libc::SYS_rt_sigreturn, Allow::Any),
    (libc::SYS_rt_sigprocmask, Allow::Any),
    (libc::SYS_sigaltstack, Allow::Any),
    (libc::SYS_getpid, Allow::Any),
    (libc::SYS_gettid, Allow::Any),
    // pthread_kill: kicking a vCPU out of KVM_RUN, abort() on a double panic.
    (libc::SYS_tgkill, Allow::Any),
    (libc::SYS_fstat, Allow::Any),
    (libc::SYS_newfstatat, Allow::Any),
    (libc::SYS_statx, Allow::Any),
    (libc::SYS_lseek, Allow::Any),
    (libc::SYS_fcntl, Allow::Any),
    (libc::SYS_eventfd2, Allow::Any),
    (libc::SYS_epoll_ctl, Allow::Any),
    (libc::SYS_poll, Allow::Any),
    (libc::SYS_ppoll, Allow::Any),
    // Thread start-up (a device activated from this thread starts its worker).
    (
        libc::SYS_clone,
        Allow::Masked {
            arg: 0,
            mask: libc::CLONE_THREAD as u64,
            value: libc::CLONE_THREAD as u64,
        },
    ),
    (libc::SYS_clone3, Allow::Any),
    (libc::SYS_set_robust_list, Allow::Any),
    (libc::SYS_rseq, Allow::Any),
    (libc::SYS_sched_getaffinity, Allow::Any),
    (
        libc::SYS_prctl,
        Allow::OneOf {
            arg: 0,
            values: &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
        },
    ),
    // A thread started from a filtered thread adds its own filter (which can only take
    // syscalls away).
    (
        libc::SYS_seccomp,
        Allow::OneOf {
            arg: 0,
            values: &[libc::SECCOMP_SET_MODE_FILTER as u64],
        },
    ),
    (libc::SYS_exit, Allow::Any),
    (libc::SYS_exit_group, Allow::Any),
    // A panic's report with RUST_BACKTRACE set reads the binary and /proc/self/maps:
    // read-only opens (no O_CREAT, O_TRUNC, O_APPEND or write access).
    (
        libc::SYS_openat,
        Allow::Masked {
            arg: 2,
            mask: (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) as u64,
            value: libc::O_RDONLY as u64,
        },
    ),
    (libc::SYS_readlink, Allow::Any),
];

const MAIN: &[(i64, Allow)] = &[
    // Teardown: the VM's fds, its socket and memory file, the terminal.
    (libc::SYS_ioctl, Allow::Any),
    (libc::SYS_unlink, Allow::Any),
    (libc::SYS_unlinkat, Allow::Any),
    (libc::SYS_openat, Allow::Any),
    (libc::SYS_epoll_wait, Allow::Any),
    (libc::SYS_epoll_pwait, Allow::Any),
    (libc::SYS_ftruncate, Allow::Any),
    (libc::SYS_fsync, Allow::Any),
    (libc::SYS_fdatasync, Allow::Any),
    (libc::SYS_shutdown, Allow::Any),
    // Ending by the signal that asked for the stop: default action back, then raise.
    (libc::SYS_rt_sigaction, Allow::Any),
    (libc::SYS_kill, Allow::Any),
    (libc::SYS_sysinfo, Allow::Any),
    // A snapshot (`PUT /vm/snapshot`, served on the main thread): its directory made,
    // the memory file written, the state file renamed into place.
    (libc::SYS_mkdir, Allow::Any),
    (libc::SYS_mkdirat, Allow::Any),
    (libc::SYS_pwrite64, Allow::Any),
    (libc::SYS_rename, Allow::Any),
    (libc::SYS_renameat, Allow::Any),
    (libc::SYS_renameat2, Allow::Any),
    (libc::SYS_rmdir, Allow::Any),
];

const EVENT_LOOP: &[(i64, Allow)] = &[
    (libc::SYS_epoll_wait, Allow::Any),
    (libc::SYS_epoll_pwait, Allow::Any),
    (libc::SYS_epoll_create1, Allow::Any),
    (libc::SYS_timerfd_create, Allow::Any),
    (libc::SYS_timerfd_settime, Allow::Any),
    (libc::SYS_timerfd_gettime, Allow::Any),
    (libc::SYS_signalfd4, Allow::Any),
    (libc::SYS_pread64, Allow::Any),
    (libc::SYS_pwrite64, Allow::Any),
    (libc::SYS_preadv, Allow::Any),
    (libc::SYS_pwritev, Allow::Any),
    // The control/API socket and vsock's host side: Unix sockets only.
    (libc::SYS_accept4, Allow::Any),
    (
        libc::SYS_socket,
        Allow::OneOf {
            arg: 0,
            values: &[libc::AF_UNIX as u64],
        },
    ),
    (libc::SYS_connect, Allow::Any),
    (libc::SYS_bind, Allow::Any),
    (libc::SYS_listen, Allow::Any),
    (libc::SYS_recvfrom, Allow::Any),
    (libc::SYS_sendto, Allow::Any),
    (libc::SYS_recvmsg, Allow::Any),
    (libc::SYS_sendmsg, Allow::Any),
    (libc::SYS_shutdown, Allow::Any),
    (libc::SYS_getsockopt, Allow::Any),
    (libc::SYS_setsockopt, Allow::Any),
    (libc::SYS_getsockname, Allow::Any),
    (libc::SYS_getpeername, Allow::Any),
    // A disk image swapped or a log/metrics file named through the API; sockets and
    // files Ferrite made itself removed.
    (libc::SYS_openat, Allow::Any),
    (libc::SYS_flock, Allow::Any),
    (libc::SYS_unlink, Allow::Any),
    (libc::SYS_unlinkat, Allow::Any),
    (libc::SYS_ftruncate, Allow::Any),
    (libc::SYS_fsync, Allow::Any),
    (libc::SYS_fdatasync, Allow::Any),
    (libc::SYS_fallocate, Allow::Any),
    (libc::SYS_dup, Allow::Any),
    (libc::SYS_fchmod, Allow::Any),
    (libc::SYS_readlink, Allow::Any),
    (libc::SYS_getcwd, Allow::Any),
    (libc::SYS_uname, Allow::Any),
    // Balloon and memory statistics.
    (libc::SYS_mincore, Allow::Any),
    (libc::SYS_sysinfo, Allow::Any),
    (libc::SYS_getrusage, Allow::Any),
    (libc::SYS_rt_sigaction, Allow::Any),
    // KVM (irqfd, ioeventfd, IRQ lines, stats), TAP and the terminal.
    (libc::SYS_ioctl, Allow::Any),
];

const VCPU: &[(i64, Allow)] = &[
    (
        libc::SYS_ioctl,
        Allow::Masked {
            arg: 1,
            mask: 0xff00,
            value: 0xae00,
        },
    ),
    // virtio-net activated by the guest: the TAP's offloads set to what it accepted.
    (
        libc::SYS_ioctl,
        Allow::OneOf {
            arg: 1,
            values: &[libc::TUNSETOFFLOAD],
        },
    ),
    // Device activation (a guest driver's DRIVER_OK arrives as an MMIO write here):
    // the balloon's statistics timer, queue eventfds.
    (libc::SYS_timerfd_create, Allow::Any),
    (libc::SYS_timerfd_settime, Allow::Any),
    (libc::SYS_timerfd_gettime, Allow::Any),
    (libc::SYS_epoll_wait, Allow::Any),
    (libc::SYS_epoll_pwait, Allow::Any),
    // The last vCPU to end can hold the last reference to a device (the MMIO bus): the
    // vsock device then removes its socket here.
    (libc::SYS_unlink, Allow::Any),
    (libc::SYS_unlinkat, Allow::Any),
];

const BLOCK_WORKER: &[(i64, Allow)] = &[
    (libc::SYS_pread64, Allow::Any),
    (libc::SYS_pwrite64, Allow::Any),
    (libc::SYS_preadv, Allow::Any),
    (libc::SYS_pwritev, Allow::Any),
    (libc::SYS_fsync, Allow::Any),
    (libc::SYS_fdatasync, Allow::Any),
    // Discard and write-zeroes punch or zero ranges of the image.
    (libc::SYS_fallocate, Allow::Any),
];

const CONSOLE_WRITER: &[(i64, Allow)] = &[(libc::SYS_fsync, Allow::Any)];

/// The syscalls `kind` may make, beside [`COMMON`]. A thread keeps the filter of the
/// thread that started it (seccomp filters are inherited and only add up), so the
/// threads that start others also allow what those need: a vCPU or the loop activates
/// a disk (its worker starts there) and may start the console writer.
pub(super) fn own_lists(kind: ThreadKind) -> Vec<&'static [(i64, Allow)]> {
    match kind {
        ThreadKind::Main => vec![MAIN],
        ThreadKind::EventLoop => vec![EVENT_LOOP, BLOCK_WORKER, CONSOLE_WRITER],
        ThreadKind::Vcpu => vec![VCPU, BLOCK_WORKER, CONSOLE_WRITER],
        ThreadKind::BlockWorker => vec![BLOCK_WORKER],
        ThreadKind::ConsoleWriter => vec![CONSOLE_WRITER],
    }
}

/// Builds `kind`'s rules for seccompiler.
pub(super) fn rules(
    kind: ThreadKind,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::Error> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let lists = own_lists(kind);
    for &(nr, allow) in COMMON.iter().chain(lists.into_iter().flatten()) {
        let new: Vec<SeccompRule> = match allow {
            Allow::Any => Vec::new(),
            Allow::Masked { arg, mask, value } => {
                vec![SeccompRule::new(vec![SeccompCondition::new(
                    arg,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(mask),
                    value,
                )?])?]
            }
            Allow::OneOf { arg, values } => values
                .iter()
                .map(|&v| {
                    SeccompRule::new(vec![SeccompCondition::new(
                        arg,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        v,
                    )?])
                })
                .collect::<Result<_, _>>()?,
        };
        match map.get_mut(&nr) {
            // Listed twice: an unconditional entry wins; otherwise the rules add up.
            Some(existing) => {
                if existing.is_empty() || new.is_empty() {
                    existing.clear();
                } else {
                    existing.extend(new);
                }
            }
            None => {
                map.insert(nr, new);
            }
        }
    }
    Ok(map)
}
