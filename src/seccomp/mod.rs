//! Seccomp filters per thread kind (the lists are in [`policy`]).
//!
//! Each Ferrite thread installs its kind's filter with [`enter`] once it has set up
//! what needs broader syscalls and before it touches guest- or client-controlled
//! input. The filters are built once per process (seccompiler, from the `const` data in
//! [`policy`]) and are on unless [`set_enabled`]`(false)` (`ferrite run --no-seccomp`,
//! Firecracker's `--no-seccomp`).
//!
//! A syscall outside the list raises SIGSYS; [`on_sigsys`] writes one line to stderr,
//! `ferrite: seccomp: thread 'NAME' (KIND filter) made forbidden syscall NR (NAME); exiting with status 148`,
//! and ends the process with [`EXIT_BAD_SYSCALL`] (148, Firecracker's status for a bad
//! syscall). Seccomp's own `apply` sets `PR_SET_NO_NEW_PRIVS` first.
//!
//! Unsafe code: the SIGSYS handler (sigaction, reading `si_syscall`, write and _exit)
//! and the test hook's raw syscall.
#![allow(unsafe_code)]

mod names;
pub mod policy;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Once, OnceLock};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use policy::ThreadKind;

/// Exit status after a forbidden syscall (the same as Firecracker's).
pub const EXIT_BAD_SYSCALL: i32 = 148;

/// Names a thread kind (`main`, `loop`, `vcpu`, `block`, `console`) that makes a
/// forbidden syscall right after installing its filter, to test the report. In every
/// build (the suite tests the release build): it can only end the VM of whoever sets
/// it in Ferrite's environment, which that caller can do anyway; it grants nothing.
pub const TEST_HOOK_ENV: &str = "FERRITE_TEST_FORBIDDEN_SYSCALL";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the seccomp filter for the {kind} threads: {msg}")]
    Build { kind: &'static str, msg: String },
    #[error("cannot install the seccomp filter on thread '{thread}' ({kind})")]
    Install {
        thread: String,
        kind: &'static str,
        #[source]
        source: seccompiler::Error,
    },
}

/// Off in the library's own unit tests (their threads run test code); on elsewhere.
static ENABLED: AtomicBool = AtomicBool::new(!cfg!(test));

/// Turns the filters on or off for threads that start from now on.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

struct Compiled {
    /// Each kind's filter ([`kind_program`]).
    per_kind: Vec<(ThreadKind, BpfProgram)>,
}

static COMPILED: OnceLock<Result<Compiled, (&'static str, String)>> = OnceLock::new();

// Classic BPF opcodes (linux/filter.h), seccomp's return values (linux/seccomp.h).
/// BPF_LD | BPF_W | BPF_ABS.
const BPF_LD_W_ABS: u16 = 0x20;
/// BPF_JMP | BPF_JA.
const BPF_JA: u16 = 0x05;
/// BPF_JMP | BPF_JEQ | BPF_K.
const BPF_JEQ_K: u16 = 0x15;
/// BPF_JMP | BPF_JGE | BPF_K.
const BPF_JGE_K: u16 = 0x35;
/// BPF_RET | BPF_K.
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// Offsets in `struct seccomp_data`.
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;

fn ins(code: u16, jt: u8, jf: u8, k: u32) -> seccompiler::sock_filter {
    seccompiler::sock_filter { code, jt, jf, k }
}

/// A binary search over `nrs` (sorted, distinct) on the syscall number in the
/// accumulator: returns ALLOW for one of them, falls through past its end otherwise.
fn allow_tree(nrs: &[u32]) -> BpfProgram {
    if nrs.len() <= 4 {
        return nrs
            .iter()
            .flat_map(|&n| {
                [
                    ins(BPF_JEQ_K, 0, 1, n),
                    ins(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
                ]
            })
            .collect();
    }
    let mid = nrs.len() / 2;
    let left = allow_tree(&nrs[..mid]);
    let right = allow_tree(&nrs[mid..]);
    // nr >= nrs[mid]: the JA skips the left half (and its closing JA) into the right;
    // else into the left, whose closing JA skips the right half.
    let mut v = vec![
        ins(BPF_JGE_K, 0, 1, nrs[mid]),
        ins(BPF_JA, 0, 0, left.len() as u32 + 1),
    ];
    v.extend(left);
    v.push(ins(BPF_JA, 0, 0, right.len() as u32));
    v.extend(right);
    v
}

/// `kind`'s filter: on x86_64, `clone3` gets ENOSYS (glibc then falls back to `clone`,
/// whose flags the rules can check) and the syscalls allowed whatever their arguments
/// are found by a binary search; everything else (other architectures, the
/// argument-checked syscalls, the unlisted ones) goes to seccompiler's program of the
/// argument-checked rules, which traps what it does not allow.
///
/// Why not seccompiler's program for the whole list: the kernel, when a filter is
/// installed, runs it for every syscall number to cache which are always allowed;
/// over a linear list of 50-85 syscalls that took ~0.2 ms per thread on this nested
/// host (~0.6 ms of a 2.1 ms start->stop, bench/seccomp.py), over the search a small
/// part of it. One filter per thread, not two (each install has a fixed cost too).
fn kind_program(kind: ThreadKind) -> Result<BpfProgram, seccompiler::Error> {
    let rules = policy::rules(kind)?;
    let mut any_args: Vec<u32> = Vec::new();
    let mut checked = std::collections::BTreeMap::new();
    for (nr, r) in rules {
        if r.is_empty() {
            any_args.push(nr as u32);
        } else {
            checked.insert(nr, r);
        }
    }
    any_args.retain(|&n| n != libc::SYS_clone3 as u32);
    let tail: BpfProgram = SeccompFilter::new(
        checked,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)?;
    let tree = allow_tree(&any_args);
    let mut v = vec![
        ins(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH),
        ins(BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        ins(BPF_JA, 0, 0, 3 + tree.len() as u32),
        ins(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
        ins(BPF_JEQ_K, 0, 1, libc::SYS_clone3 as u32),
        ins(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
    ];
    v.extend(tree);
    v.extend(tail);
    Ok(v)
}

fn compile_all() -> Result<Compiled, (&'static str, String)> {
    let mut per_kind = Vec::new();
    for kind in ThreadKind::ALL {
        let prog = kind_program(kind).map_err(|e| (kind.name(), e.to_string()))?;
        per_kind.push((kind, prog));
    }
    Ok(Compiled { per_kind })
}

/// Builds every filter (once); call early so a policy error is reported before any VM
/// starts.
pub fn prepare() -> Result<(), Error> {
    match COMPILED.get_or_init(compile_all) {
        Ok(_) => Ok(()),
        Err((kind, msg)) => Err(Error::Build {
            kind,
            msg: msg.clone(),
        }),
    }
}

/// The report line's start for this thread (no allocation in the handler).
const LABEL_LEN: usize = 96;
thread_local! {
    static LABEL: Cell<([u8; LABEL_LEN], usize)> = const { Cell::new(([0; LABEL_LEN], 0)) };
}

/// Installs `kind`'s filter on the calling thread (when filters are on).
pub fn install(kind: ThreadKind) -> Result<(), Error> {
    if !enabled() {
        return Ok(());
    }
    install_filter(kind)
}

/// [`install`] whatever [`enabled`] says: for a unit test that runs Ferrite code on a
/// thread of its own under that code's filter (turning the global switch on would
/// also filter other tests' threads).
#[cfg(test)]
pub(crate) fn install_in_test(kind: ThreadKind) -> Result<(), Error> {
    install_filter(kind)
}

fn install_filter(kind: ThreadKind) -> Result<(), Error> {
    prepare()?;
    let Some(Ok(c)) = COMPILED.get() else {
        return Ok(());
    };
    install_handler();
    let thread = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_owned();
    let label = format!(
        "ferrite: seccomp: thread '{thread}' ({} filter) made forbidden syscall ",
        kind.name()
    );
    let mut buf = [0u8; LABEL_LEN];
    let n = label.len().min(LABEL_LEN);
    buf[..n].copy_from_slice(&label.as_bytes()[..n]);
    LABEL.with(|l| l.set((buf, n)));
    let prog = c
        .per_kind
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, p)| p)
        .ok_or_else(|| Error::Build {
            kind: kind.name(),
            msg: "no compiled filter".into(),
        })?;
    let err = |source| Error::Install {
        thread: thread.clone(),
        kind: kind.name(),
        source,
    };
    seccompiler::apply_filter(prog).map_err(err)?;
    test_hook(kind);
    Ok(())
}

/// Installs `kind`'s filter; if that fails, says so and ends the process (a thread must
/// not go on unfiltered when filters were asked for).
pub fn enter(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        eprintln!("ferrite: {}", crate::errors::chain(&e));
        std::process::exit(1);
    }
}

fn test_hook(kind: ThreadKind) {
    if std::env::var(TEST_HOOK_ENV).is_ok_and(|v| v == kind.name()) {
        // SAFETY: getppid takes no arguments and changes nothing.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
}

fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler has the SA_SIGINFO signature
        // and only makes async-signal-safe calls (write, _exit).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigsys as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigfillset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
                log::warn!(
                    "seccomp: cannot install the SIGSYS handler ({}): a forbidden syscall ends Ferrite without a report",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

/// Byte offset of `si_syscall` in x86_64's `siginfo_t` for SIGSYS (after signo, errno,
/// code and padding to 16, then the 8-byte call address).
const SI_SYSCALL_OFFSET: usize = 24;

/// Formats the report line for syscall `nr` into `out` (no allocation); returns its length.
fn format_report(label: &[u8], nr: i64, out: &mut [u8; 256]) -> usize {
    let mut n = 0;
    let mut put = |b: &[u8]| {
        let k = b.len().min(out.len() - n);
        out[n..n + k].copy_from_slice(&b[..k]);
        n += k;
    };
    put(label);
    let mut digits = [0u8; 20];
    let mut d = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        d -= 1;
        digits[d] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if nr < 0 {
        put(b"-");
    }
    put(&digits[d..]);
    if let Ok(i) = names::NAMES.binary_search_by_key(&nr, |&(k, _)| k) {
        put(b" (");
        put(names::NAMES[i].1.as_bytes());
        put(b")");
    }
    put(b"; exiting with status 148\n");
    n
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; si_syscall is an int at
    // SI_SYSCALL_OFFSET.
    let nr = unsafe { *(info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<i32>()) };
    let (label, len) = LABEL.with(|l| l.get());
    let mut out = [0u8; 256];
    let label: &[u8] = if len == 0 {
        // A thread that did not install a filter of its own, under its starter's.
        b"ferrite: seccomp: a thread started under another's filter made forbidden syscall "
    } else {
        &label[..len]
    };
    let n = format_report(label, i64::from(nr), &mut out);
    // SAFETY: write and _exit are async-signal-safe and allowed by every filter.
    unsafe {
        libc::write(2, out.as_ptr().cast(), n);
        libc::_exit(EXIT_BAD_SYSCALL);
    }
}

/// The syscalls `kind`'s filter allows (distinct numbers, ascending; one allowed only
/// with certain arguments counts once).
pub fn allowed(kind: ThreadKind) -> Result<Vec<i64>, Error> {
    policy::rules(kind)
        .map(|m| m.keys().copied().collect())
        .map_err(|e| Error::Build {
            kind: kind.name(),
            msg: e.to_string(),
        })
}

/// The syscall name for `nr`, if known (for docs and tests).
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    names::NAMES
        .binary_search_by_key(&nr, |&(k, _)| k)
        .ok()
        .map(|i| names::NAMES[i].1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_kinds_policy_compiles() {
        let c = compile_all().expect("policies compile");
        assert_eq!(c.per_kind.len(), ThreadKind::ALL.len());
        for (kind, prog) in &c.per_kind {
            assert!(!prog.is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn report_line_names_the_syscall() {
        let mut out = [0u8; 256];
        let n = format_report(b"X ", 39, &mut out);
        assert_eq!(
            std::str::from_utf8(&out[..n]).unwrap(),
            "X 39 (getpid); exiting with status 148\n"
        );
        assert_eq!(syscall_name(110), Some("getppid"));
    }

    /// Forks a child that installs `kind`'s filter and makes `getppid`, listed for no
    /// thread: the child must end with status 148 (the SIGSYS report) rather than
    /// return from the call.
    fn child_status_after_forbidden_syscall(kind: ThreadKind) -> i32 {
        child_status(kind, || {
            // SAFETY: getppid has no arguments.
            unsafe { libc::syscall(libc::SYS_getppid) };
        })
    }

    /// Forks a child that installs `kind`'s filter and runs `f`; its exit status (0 when
    /// `f` returned, 148 after a SIGSYS report).
    fn child_status(kind: ThreadKind, f: fn()) -> i32 {
        let c = compile_all().expect("policies compile");
        let prog = c
            .per_kind
            .iter()
            .find(|(k, _)| *k == kind)
            .unwrap()
            .1
            .clone();
        // SAFETY: the child only makes raw syscalls and _exit (no locks, no allocation
        // beyond what is set up here before the fork).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            install_handler();
            if seccompiler::apply_filter(&prog).is_err() {
                // SAFETY: ends the child.
                unsafe { libc::_exit(2) };
            }
            f();
            // SAFETY: ends the child.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "{kind:?}: status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    #[test]
    fn a_thread_under_each_filter_is_ended_by_an_unlisted_syscall() {
        for kind in ThreadKind::ALL {
            assert_eq!(
                child_status_after_forbidden_syscall(kind),
                EXIT_BAD_SYSCALL,
                "{kind:?}"
            );
        }
    }

    /// The one filter per thread answers `clone3` with ENOSYS (so glibc falls back to
    /// `clone`) and still lets listed syscalls through and traps unlisted ones.
    #[test]
    fn clone3_is_answered_enosys_by_each_kinds_single_filter() {
        let clone3 = || {
            // SAFETY: clone3 with a NULL argument block is refused (ENOSYS under the
            // filter, EFAULT/EINVAL without); nothing is created.
            let r = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
            let e = std::io::Error::last_os_error().raw_os_error();
            if r != -1 || e != Some(libc::ENOSYS) {
                // SAFETY: ends the child with a status the test reports.
                unsafe { libc::_exit(3) };
            }
            // SAFETY: getpid is on every list.
            unsafe { libc::syscall(libc::SYS_getpid) };
        };
        for kind in ThreadKind::ALL {
            assert_eq!(child_status(kind, clone3), 0, "{kind:?}");
        }
    }

    /// A classic-BPF interpreter for the instructions the filters use, run on a
    /// `struct seccomp_data` (nr, arch, ip, args).
    fn run_bpf(prog: &[seccompiler::sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
        let mut data = Vec::new();
        data.extend(nr.to_le_bytes());
        data.extend(arch.to_le_bytes());
        data.extend(0u64.to_le_bytes());
        for a in args {
            data.extend(a.to_le_bytes());
        }
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = &prog[pc];
            pc += 1;
            let k = i.k;
            match i.code {
                0x20 => {
                    let o = k as usize;
                    acc = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                }
                0x54 => acc &= k,
                0x05 => pc += k as usize,
                0x15 | 0x25 | 0x35 => {
                    let t = match i.code {
                        0x15 => acc == k,
                        0x25 => acc > k,
                        _ => acc >= k,
                    };
                    pc += usize::from(if t { i.jt } else { i.jf });
                }
                0x06 => return k,
                c => panic!("opcode {c:#x} not interpreted"),
            }
        }
    }

    /// The search-based filters decide every syscall number, on both architectures
    /// and for several argument values, exactly as seccompiler's program of the whole
    /// list does (with clone3 -> ENOSYS in front, as the two filters did before).
    #[test]
    fn search_filters_decide_as_the_linear_lists() {
        let c = compile_all().unwrap();
        let args_sets: [[u64; 6]; 5] = [
            [0; 6],
            [u64::MAX; 6],
            [1, 2, 3, 4, 5, 6],
            [
                0,
                libc::PROT_READ as u64 | libc::PROT_EXEC as u64,
                libc::PR_SET_NAME as u64,
                0,
                0,
                0,
            ],
            [libc::AF_UNIX as u64, 0xae80, 0, 0, 0, 0],
        ];
        for (kind, prog) in &c.per_kind {
            let linear: BpfProgram = SeccompFilter::new(
                policy::rules(*kind).unwrap(),
                SeccompAction::Trap,
                SeccompAction::Allow,
                TargetArch::x86_64,
            )
            .and_then(BpfProgram::try_from)
            .unwrap();
            for arch in [AUDIT_ARCH_X86_64, 0x4000_0003] {
                for nr in 0..=470u32 {
                    for args in args_sets {
                        let want = if nr == libc::SYS_clone3 as u32 && arch == AUDIT_ARCH_X86_64 {
                            SECCOMP_RET_ERRNO | libc::ENOSYS as u32
                        } else {
                            run_bpf(&linear, nr, arch, args)
                        };
                        assert_eq!(
                            run_bpf(prog, nr, arch, args),
                            want,
                            "{kind:?} nr {nr} arch {arch:#x} args {args:?}"
                        );
                    }
                }
            }
            assert!(prog.len() < 4096, "{kind:?}: {} instructions", prog.len());
        }
    }

    #[test]
    fn vcpu_filter_takes_kvm_and_tun_offload_ioctls_only() {
        let kvm_run = || {
            // SAFETY: an ioctl on fd -1 fails with EBADF; nothing is touched.
            unsafe { libc::ioctl(-1, 0xae80) };
        };
        let tun_offload = || {
            // SAFETY: as above.
            unsafe { libc::ioctl(-1, libc::TUNSETOFFLOAD, 0) };
        };
        let tcgets = || {
            // SAFETY: as above.
            unsafe { libc::ioctl(-1, libc::TCGETS, 0) };
        };
        assert_eq!(child_status(ThreadKind::Vcpu, kvm_run), 0);
        assert_eq!(child_status(ThreadKind::Vcpu, tun_offload), 0);
        assert_eq!(child_status(ThreadKind::Vcpu, tcgets), EXIT_BAD_SYSCALL);
    }

    #[test]
    fn no_thread_may_map_executable_memory_or_open_a_non_unix_socket() {
        let map_exec = || {
            // SAFETY: an anonymous mapping the child never uses.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
        };
        let inet = || {
            // SAFETY: creates (and leaks, in a child about to exit) a socket.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        };
        let unix = || {
            // SAFETY: as above.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        };
        for kind in ThreadKind::ALL {
            assert_eq!(child_status(kind, map_exec), EXIT_BAD_SYSCALL, "{kind:?}");
        }
        assert_eq!(child_status(ThreadKind::EventLoop, inet), EXIT_BAD_SYSCALL);
        assert_eq!(child_status(ThreadKind::EventLoop, unix), 0);
    }
}
