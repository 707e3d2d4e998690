//! vCPU threads: one per vCPU, each a small state machine around KVM_RUN.
//!
//! ```text
//!            +--- command Pause ---> Paused --- Resume ---+
//!            |                        ^  |                |
//!            |                  Pause |  | Resume         v
//! Running ---+-- HLT (bare) --> Halted --+           back to where it paused from
//!    |                                         
//!    +-- stop request / Stop command / terminal exit / error --> Stopped
//! ```
//!
//! Every state looks at the VM's stop flag and the vCPU's [`command::Mailbox`] before
//! it blocks again (KVM_RUN, or a park while halted or paused); a kick makes KVM_RUN
//! return and unparks the thread, so no command or stop is ever missed.
#![allow(unsafe_code)]

pub mod command;
pub mod exit;
pub mod halt;
pub mod halt_watch;
pub mod kick;
pub mod kvm_stats;
pub mod state;
pub mod stats;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use kvm_bindings::{
    kvm_msr_entry, Msrs, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::bus::Buses;
use crate::memory::GuestMemory;
use crate::outcome::{StopSignal, VmOutcome};
use command::{Command, Mailbox, Registers, Reply, ReplyFn};
use exit::{handle_exit, Action, Exit};
use kick::{Kicker, RunMapping};
use stats::ExitStats;

/// Everything a vCPU thread shares with the rest of the VM.
#[derive(Clone)]
pub struct VmShared {
    pub buses: Buses,
    pub stop: Arc<StopSignal>,
    pub mem: GuestMemory,
    /// vCPUs parked in HLT with nothing able to wake them (bare machine).
    pub halted: Arc<AtomicUsize>,
    pub nr_vcpus: usize,
    /// Tell the guest's kvm-clock about pauses (KVM_KVMCLOCK_CTRL), so a paused Linux
    /// guest does not report soft lockups when it resumes.
    pub kvmclock_ctrl: bool,
    /// Open each vCPU's KVM statistics fd (a VM with a control socket reads them, and
    /// the halt watch of a `Pc` machine; opening costs an ioctl and a descriptor read
    /// per vCPU at start-up).
    pub kvm_stats: bool,
}

/// One vCPU, moved onto its own thread.
pub struct Vcpu {
    index: usize,
    fd: VcpuFd,
    shared: VmShared,
    stats: Arc<ExitStats>,
    kicker: Arc<Kicker>,
    mailbox: Arc<Mailbox>,
    /// The CPUID Ferrite gave the vCPU (what a snapshot saves: KVM_GET_CPUID2 need not
    /// return it, e.g. under an emulated KVM); empty when KVM's default was left.
    given_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
}

/// What the rest of Ferrite keeps of a vCPU: how to reach it and what it counted.
#[derive(Clone)]
pub struct VcpuHandle {
    pub index: usize,
    pub stats: Arc<ExitStats>,
    /// KVM's binary statistics for this vCPU, or why the host offers none.
    pub kvm_stats: Arc<Result<kvm_stats::StatsFd, String>>,
    kicker: Arc<Kicker>,
    mailbox: Arc<Mailbox>,
}

impl VcpuHandle {
    /// Forces the vCPU back to its loop, where it sees any stop request or command.
    pub fn kick(&self) {
        self.kicker.kick();
    }

    /// Sends `cmd`; `reply` is called once with the answer, on the vCPU's thread (or
    /// here, with `Reply::Stopped`, when the vCPU has gone). Never blocks on the vCPU.
    pub fn send(&self, cmd: Command, reply: ReplyFn) {
        match self.mailbox.push(cmd, reply) {
            Ok(()) => self.kicker.kick(),
            Err((_, reply)) => reply(self.index, Reply::Stopped),
        }
    }

    /// Sends `cmd` and waits up to `timeout` for the answer (`None` on timeout). For
    /// callers that may block (main, tests); the event loop uses [`Self::send`].
    pub fn request(&self, cmd: Command, timeout: Duration) -> Option<Reply> {
        let (tx, rx) = mpsc::channel();
        self.send(
            cmd,
            Box::new(move |_, r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv_timeout(timeout).ok()
    }
}

/// Sends `cmd` to every vCPU in `handles`; calls `finish` with their replies (in the
/// order of `handles`) once the last one arrives, on the thread of that last reply.
/// Never blocks.
pub fn broadcast(
    handles: &[VcpuHandle],
    cmd: Command,
    finish: impl FnOnce(Vec<Reply>) + Send + 'static,
) {
    struct Gather {
        replies: Vec<Option<Reply>>,
        left: usize,
        finish: Option<Box<dyn FnOnce(Vec<Reply>) + Send>>,
    }
    let g = Arc::new(std::sync::Mutex::new(Gather {
        replies: vec![None; handles.len()],
        left: handles.len(),
        finish: Some(Box::new(finish)),
    }));
    if handles.is_empty() {
        if let Some(f) = g.lock().unwrap_or_else(|p| p.into_inner()).finish.take() {
            f(Vec::new());
        }
        return;
    }
    for (slot, h) in handles.iter().enumerate() {
        let g = g.clone();
        h.send(
            cmd.clone(),
            Box::new(move |_, r| {
                let mut g = g.lock().unwrap_or_else(|p| p.into_inner());
                if g.replies[slot].is_none() {
                    g.replies[slot] = Some(r);
                    g.left -= 1;
                }
                if g.left == 0 {
                    if let Some(f) = g.finish.take() {
                        let all = g.replies.iter_mut().filter_map(Option::take).collect();
                        drop(g);
                        f(all);
                    }
                }
            }),
        );
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// HLT on the bare machine: nothing can wake the vCPU but a command or a stop.
    Halted,
    /// Paused by a command; resumes into the state it was paused from.
    Paused {
        from_halted: bool,
    },
    Stopped,
}

impl Vcpu {
    /// `run_len` is KVM_GET_VCPU_MMAP_SIZE (the kick maps the run page once more).
    pub fn new(
        index: usize,
        fd: VcpuFd,
        shared: VmShared,
        run_len: usize,
    ) -> Result<(Self, VcpuHandle), kick::Error> {
        let stats = Arc::new(ExitStats::new(&shared.buses));
        let kicker = Arc::new(Kicker::new(RunMapping::new(&fd, index, run_len)?));
        let mailbox = Arc::new(Mailbox::default());
        let handle = VcpuHandle {
            index,
            kvm_stats: Arc::new(if shared.kvm_stats {
                kvm_stats::StatsFd::for_vcpu(&fd).map_err(|e| e.to_string())
            } else {
                Err("not opened (no control socket)".to_owned())
            }),
            stats: stats.clone(),
            kicker: kicker.clone(),
            mailbox: mailbox.clone(),
        };
        Ok((
            Self {
                index,
                fd,
                shared,
                stats,
                kicker,
                mailbox,
                given_cpuid: Vec::new(),
            },
            handle,
        ))
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// The thread body: runs until the VM stops or the vCPU is told to.
    pub fn run(mut self) {
        let kicker = self.kicker.clone();
        let registration = kicker.register();
        let mut state = State::Running;
        while state != State::Stopped {
            state = match state {
                State::Running => self.run_until_interrupted(),
                State::Halted => self.wait(State::Halted),
                State::Paused { .. } => self.wait(state),
                State::Stopped => State::Stopped,
            };
        }
        drop(registration);
        self.mailbox.close(self.index);
        log::debug!("vCPU {} exits: {:?}", self.index, self.stats.snapshot());
    }

    /// Halted or paused: park until a command or the stop request changes the state.
    fn wait(&mut self, state: State) -> State {
        loop {
            if self.shared.stop.is_stopping() {
                return State::Stopped;
            }
            if self.mailbox.has_mail() {
                let next = self.handle_commands(state);
                if next != state {
                    return next;
                }
                continue;
            }
            std::thread::park();
        }
    }

    /// Runs every queued command; returns the state they leave the vCPU in.
    fn handle_commands(&mut self, mut state: State) -> State {
        while let Some((cmd, reply)) = self.mailbox.pop() {
            let answer = match (cmd, state) {
                (Command::Pause, State::Paused { .. }) => Reply::Paused { already: true },
                (Command::Pause, _) => {
                    self.note_pause();
                    state = State::Paused {
                        from_halted: state == State::Halted,
                    };
                    Reply::Paused { already: false }
                }
                (Command::Resume, State::Paused { from_halted }) => {
                    state = if from_halted {
                        State::Halted
                    } else {
                        State::Running
                    };
                    Reply::Resumed { already: false }
                }
                (Command::Resume, _) => Reply::Resumed { already: true },
                (Command::ReadRegisters { msrs }, _) => self.read_registers(&msrs),
                (Command::Nmi, _) => match self.fd.nmi() {
                    Ok(()) => Reply::NmiQueued,
                    Err(e) => Reply::Failed(format!("vCPU {}: KVM_NMI: {e}", self.index)),
                },
                (Command::HaltProbe, State::Paused { .. }) => {
                    Reply::HaltProbe(halt::HaltProbe::paused())
                }
                (Command::HaltProbe, _) => self.halt_probe(),
                (Command::SaveState(plan), State::Paused { .. }) => self.save_state(&plan),
                (Command::SaveState(_), _) => Reply::Failed(format!(
                    "vCPU {}: cannot save the state of a running vCPU: pause it first",
                    self.index
                )),
                (Command::Stop, _) => {
                    state = State::Stopped;
                    Reply::Stopped
                }
            };
            reply(self.index, answer);
            if state == State::Stopped {
                break;
            }
        }
        state
    }

    /// Tells a Linux guest's kvm-clock that the vCPU is being paused (its watchdogs
    /// then ignore the gap). EINVAL means the guest has not enabled kvm-clock.
    fn note_pause(&self) {
        if !self.shared.kvmclock_ctrl {
            return;
        }
        if let Err(e) = self.fd.kvmclock_ctrl() {
            if e.errno() == libc::EINVAL {
                log::debug!("vCPU {}: guest has no kvm-clock to notify", self.index);
            } else {
                log::warn!("vCPU {}: KVM_KVMCLOCK_CTRL failed: {e}", self.index);
            }
        }
    }

    /// Records the CPUID Ferrite set on this vCPU.
    pub fn set_given_cpuid(&mut self, entries: Vec<kvm_bindings::kvm_cpuid_entry2>) {
        self.given_cpuid = entries;
    }

    /// Writes a snapshot's state into this vCPU (see [`state::restore`]
    /// for the order), its saved CPUID among it. On the main thread, before the vCPU
    /// thread starts.
    pub fn restore_state(&mut self, saved: &state::VcpuState) -> Result<(), state::Error> {
        state::restore(&self.fd, self.index, saved)?;
        if !saved.cpuid.is_empty() {
            self.given_cpuid = saved.cpuid.clone();
        }
        Ok(())
    }

    /// Saves the vCPU's state (paused, on its own thread). First lets KVM finish the
    /// I/O exit the vCPU last left KVM_RUN for: until KVM_RUN is entered again an
    /// `out`/`in` is not complete (RIP still points at it; an `in` has not stored its
    /// value), so a state saved then would repeat it on restore.
    fn save_state(&mut self, plan: &state::SavePlan) -> Reply {
        if let Err(e) = self.complete_pending_io() {
            return Reply::Failed(e);
        }
        match state::save(&self.fd, self.index, plan) {
            Ok(mut s) => {
                if !self.given_cpuid.is_empty() {
                    s.cpuid = self.given_cpuid.clone();
                }
                Reply::State(Box::new(s))
            }
            Err(e) => Reply::Failed(crate::errors::chain(&e)),
        }
    }

    /// KVM_RUN with `immediate_exit` set: KVM completes a pending I/O or MMIO exit and
    /// returns EINTR without running guest code. An MMIO access KVM splits in two
    /// exits once more: handled like any exit, then tried again.
    fn complete_pending_io(&mut self) -> Result<(), String> {
        const MAX_TRIES: usize = 8;
        let flag = self.kicker.run().immediate_exit();
        for _ in 0..MAX_TRIES {
            flag.store(1, Ordering::Release);
            let run = self.fd.run();
            let action = match run {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    flag.store(0, Ordering::Release);
                    return Ok(());
                }
                Err(e) => {
                    flag.store(0, Ordering::Release);
                    return Err(format!(
                        "vCPU {}: KVM_RUN (completing I/O before the save) failed: {e}",
                        self.index
                    ));
                }
                Ok(kvm_exit) => {
                    let exit = decode(kvm_exit, self.kicker.run());
                    handle_exit(exit, &self.shared.buses, &self.stats, self.index)
                }
            };
            if !matches!(action, Action::Continue | Action::CheckCommands) {
                flag.store(0, Ordering::Release);
                return Err(format!(
                    "vCPU {}: an exit while completing I/O before the save stopped it",
                    self.index
                ));
            }
        }
        flag.store(0, Ordering::Release);
        Err(format!(
            "vCPU {}: KVM_RUN kept exiting for I/O while completing it before the save",
            self.index
        ))
    }

    /// KVM's run state, RFLAGS.IF and the pending events, for the halt watch.
    fn halt_probe(&self) -> Reply {
        let failed = |what: &str, e: kvm_ioctls::Error| {
            Reply::Failed(format!("vCPU {}: {what}: {e}", self.index))
        };
        let mp = match self.fd.get_mp_state() {
            Ok(m) => m,
            Err(e) => return failed("KVM_GET_MP_STATE", e),
        };
        let regs = match self.fd.get_regs() {
            Ok(r) => r,
            Err(e) => return failed("KVM_GET_REGS", e),
        };
        let events = match self.fd.get_vcpu_events() {
            Ok(v) => v,
            Err(e) => return failed("KVM_GET_VCPU_EVENTS", e),
        };
        Reply::HaltProbe(halt::HaltProbe::from_kvm(&mp, regs.rflags, &events))
    }

    fn read_registers(&self, msrs: &[u32]) -> Reply {
        let regs = match self.fd.get_regs() {
            Ok(r) => r,
            Err(e) => return Reply::Failed(format!("vCPU {}: KVM_GET_REGS: {e}", self.index)),
        };
        let sregs = match self.fd.get_sregs() {
            Ok(s) => s,
            Err(e) => return Reply::Failed(format!("vCPU {}: KVM_GET_SREGS: {e}", self.index)),
        };
        let mut values = Vec::with_capacity(msrs.len());
        let mut unreadable = Vec::new();
        // KVM_GET_MSRS stops at the first MSR it cannot read: read one at a time so one
        // unknown index does not hide the rest.
        for &index in msrs {
            let entry = kvm_msr_entry {
                index,
                ..Default::default()
            };
            let got = Msrs::from_entries(&[entry]).ok().and_then(|mut m| {
                match self.fd.get_msrs(&mut m) {
                    Ok(1) => Some(m.as_slice()[0].data),
                    _ => None,
                }
            });
            match got {
                Some(v) => values.push((index, v)),
                None => unreadable.push(index),
            }
        }
        Reply::Registers(Box::new(Registers {
            regs,
            sregs,
            msrs: values,
            unreadable_msrs: unreadable,
        }))
    }

    fn run_until_interrupted(&mut self) -> State {
        // Userspace time per exit: from KVM_RUN returning to the next KVM_RUN, or to
        // leaving the loop (a halt or pause is not counted).
        let mut exited_at = None;
        let next = self.run_loop(&mut exited_at);
        if let Some(t) = exited_at {
            self.stats.add_userspace_since(t);
        }
        next
    }

    fn run_loop(&mut self, exited_at: &mut Option<u64>) -> State {
        loop {
            if self.shared.stop.is_stopping() {
                return State::Stopped;
            }
            if self.mailbox.has_mail() {
                let next = self.handle_commands(State::Running);
                if next != State::Running {
                    return next;
                }
            }
            if let Some(t) = exited_at.take() {
                self.stats.add_userspace_since(t);
            }
            let run = self.fd.run();
            *exited_at = Some(stats::ticks());
            let action = match run {
                Ok(kvm_exit) => {
                    let exit = decode(kvm_exit, self.kicker.run());
                    handle_exit(exit, &self.shared.buses, &self.stats, self.index)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.kicker
                        .run()
                        .immediate_exit()
                        .store(0, Ordering::Release);
                    handle_exit(
                        Exit::Interrupted,
                        &self.shared.buses,
                        &self.stats,
                        self.index,
                    )
                }
                Err(e) => Action::Stop(VmOutcome::Error(format!(
                    "vCPU {}: KVM_RUN failed: {e}",
                    self.index
                ))),
            };
            match action {
                Action::Continue | Action::CheckCommands => {}
                Action::Halt => {
                    let halted = self.shared.halted.fetch_add(1, Ordering::AcqRel) + 1;
                    if halted == self.shared.nr_vcpus {
                        self.shared.stop.request(VmOutcome::AllHalted);
                    }
                    return State::Halted;
                }
                Action::Stop(outcome) => {
                    self.shared.stop.request(outcome);
                    return State::Stopped;
                }
                Action::ReportInternalError => {
                    let report = self.internal_error_report();
                    self.shared.stop.request(VmOutcome::Error(report));
                    return State::Stopped;
                }
            }
        }
    }

    /// Describes a KVM_EXIT_INTERNAL_ERROR: suberror, RIP and instruction bytes.
    fn internal_error_report(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: exit_reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
        // union member; it is plain data.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let data = &internal.data[..ndata];
        let what = match internal.suberror {
            KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
            2 => "exception while delivering an exception",
            3 => "exit during event delivery",
            4 => "unexpected exit reason",
            _ => "unknown suberror",
        };
        let mut msg = format!(
            "vCPU {}: KVM_EXIT_INTERNAL_ERROR suberror {} ({what})",
            self.index, internal.suberror
        );
        let regs = self.fd.get_regs().ok();
        let sregs = self.fd.get_sregs().ok();
        if let (Some(r), Some(s)) = (regs, sregs) {
            msg += &format!(
                " at rip {:#x} (cs {:#x} base {:#x})",
                r.rip, s.cs.selector, s.cs.base
            );
        }
        let mut bytes: Vec<u8> = Vec::new();
        if internal.suberror == KVM_INTERNAL_ERROR_EMULATION
            && data.len() >= 2
            && data[0] & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
        {
            // struct emulation_failure: data[0] = flags, then a byte of insn_size
            // followed by 15 instruction bytes.
            let raw: Vec<u8> = data[1..].iter().flat_map(|w| w.to_le_bytes()).collect();
            let len = usize::from(raw[0]).min(15).min(raw.len() - 1);
            bytes = raw[1..=len].to_vec();
        } else if let (Some(r), Some(s)) = (regs, sregs) {
            // Older kernels give no bytes: translate the linear RIP and read guest memory.
            let linear = s.cs.base.wrapping_add(r.rip);
            if let Ok(t) = self.fd.translate_gva(linear) {
                if t.valid != 0 {
                    let mut buf = [0u8; 15];
                    if self
                        .shared
                        .mem
                        .read_slice(&mut buf, GuestAddress(t.physical_address))
                        .is_ok()
                    {
                        bytes = buf.to_vec();
                    }
                }
            }
        }
        if bytes.is_empty() {
            msg += ", instruction bytes unavailable";
        } else {
            let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
            msg += &format!(", instruction bytes: {}", hex.join(" "));
        }
        if !data.is_empty() {
            msg += &format!(", data {data:x?}");
        }
        msg
    }
}

/// Turns kvm-ioctls' view of an exit into Ferrite's [`Exit`].
fn decode<'a>(exit: VcpuExit<'a>, run: &RunMapping) -> Exit<'a> {
    // kvm-ioctls hands port I/O data as one slice of size*count bytes; the item size
    // that splits `rep ins/outs` lives in kvm_run.io.
    let io_size = || run.io_size();
    match exit {
        VcpuExit::IoIn(port, data) => Exit::IoIn {
            port,
            size: io_size(),
            data,
        },
        VcpuExit::IoOut(port, data) => Exit::IoOut {
            port,
            size: io_size(),
            data,
        },
        VcpuExit::MmioRead(addr, data) => Exit::MmioRead { addr, data },
        VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite { addr, data },
        VcpuExit::Hlt => Exit::Hlt,
        VcpuExit::Shutdown => Exit::Shutdown,
        VcpuExit::SystemEvent(kind, data) => Exit::SystemEvent { kind, data },
        VcpuExit::InternalError => Exit::InternalError,
        VcpuExit::FailEntry(reason, cpu) => Exit::FailEntry { reason, cpu },
        VcpuExit::Intr => Exit::Interrupted,
        other => Exit::Unhandled(format!("{other:?}")),
    }
}

#[cfg(test)]
mod save_state_tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::vcpu::state::SavePlan;
    use std::sync::Mutex;

    /// Port 0x11 answers 1, 2, 3, ... (the last answer is kept); port 0x10 is a sink.
    #[derive(Default)]
    struct Ports {
        last_in: u16,
        outs: usize,
    }
    struct In(Arc<Mutex<Ports>>);
    impl BusDevice for In {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            let mut p = self.0.lock().unwrap();
            p.last_in += 1;
            let v = p.last_in.to_le_bytes();
            data.copy_from_slice(&v[..data.len().min(2)]);
        }
        fn write(&mut self, _: u64, _: &[u8]) {}
    }
    struct Out(Arc<Mutex<Ports>>);
    impl BusDevice for Out {
        fn read(&mut self, _: u64, _: &mut [u8]) {}
        fn write(&mut self, _: u64, _: &[u8]) {
            self.0.lock().unwrap().outs += 1;
        }
    }

    /// A real-mode vCPU at 0x1000 running `in ax, 0x11; out 0x10, ax; jmp` on its own
    /// thread.
    fn start(
        kvm: &kvm_ioctls::Kvm,
    ) -> (
        kvm_ioctls::VmFd,
        VcpuHandle,
        Arc<Mutex<Ports>>,
        Arc<StopSignal>,
        std::thread::JoinHandle<()>,
    ) {
        let vm = kvm.create_vm().unwrap();
        let mem = crate::memory::create(1 << 20).unwrap();
        crate::memory::register(&vm, &mem).unwrap();
        mem.write_slice(&[0xe5, 0x11, 0xe7, 0x10, 0xeb, 0xfa], GuestAddress(0x1000))
            .unwrap();
        let fd = vm.create_vcpu(0).unwrap();
        let mut sregs = fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        fd.set_sregs(&sregs).unwrap();
        let mut regs = fd.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rflags = 2;
        fd.set_regs(&regs).unwrap();
        let ports = Arc::new(Mutex::new(Ports::default()));
        let mut buses = Buses::default();
        buses
            .pio
            .insert("in", 0x11, 1, Arc::new(Mutex::new(In(ports.clone()))))
            .unwrap();
        buses
            .pio
            .insert("out", 0x10, 1, Arc::new(Mutex::new(Out(ports.clone()))))
            .unwrap();
        let stop = Arc::new(StopSignal::new());
        let shared = VmShared {
            buses,
            stop: stop.clone(),
            mem,
            halted: Arc::new(AtomicUsize::new(0)),
            nr_vcpus: 1,
            kvmclock_ctrl: false,
            kvm_stats: false,
        };
        kick::install_handler().unwrap();
        let run_len = kvm.get_vcpu_mmap_size().unwrap();
        let (vcpu, handle) = Vcpu::new(0, fd, shared, run_len).unwrap();
        // Under the vCPU thread's seccomp filter, as in a VM: the save's ioctls must
        // pass it (a forbidden syscall ends the test process with status 148).
        let thread = std::thread::spawn(move || {
            crate::seccomp::install_in_test(crate::seccomp::ThreadKind::Vcpu).unwrap();
            vcpu.run()
        });
        (vm, handle, ports, stop, thread)
    }

    fn kvm_or_skip(test: &str) -> Option<kvm_ioctls::Kvm> {
        match kvm_ioctls::Kvm::new() {
            Ok(k) => Some(k),
            Err(e) => {
                if std::env::var("CI").as_deref() == Ok("true") {
                    panic!("/dev/kvm is required under CI but cannot be opened: {e}");
                }
                println!("NOT RUN: {test}: /dev/kvm: {e}");
                None
            }
        }
    }

    /// Issue 17: a snapshot of a running vCPU would be torn; SaveState must be refused
    /// until the vCPU is paused, then answered with the state, whose last `in` is
    /// complete (RAX holds the last value the device returned), on the vCPU thread
    /// under its seccomp filter.
    #[test]
    fn save_state_is_refused_while_running_and_complete_when_paused() {
        let Some(kvm) = kvm_or_skip("save_state_is_refused_while_running_and_complete_when_paused")
        else {
            return;
        };
        let (vm, handle, ports, stop, thread) = start(&kvm);
        let t = Duration::from_secs(10);
        let deadline = std::time::Instant::now() + t;
        while ports.lock().unwrap().outs < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "guest made no progress"
            );
            std::thread::yield_now();
        }
        let plan = Arc::new(SavePlan::probe(&kvm, &vm, false).unwrap());
        match handle.request(Command::SaveState(plan.clone()), t) {
            Some(Reply::Failed(why)) => {
                assert!(why.contains("running") && why.contains("pause"), "{why}")
            }
            other => panic!("a running vCPU answered {other:?}"),
        }
        assert!(matches!(
            handle.request(Command::Pause, t),
            Some(Reply::Paused { already: false })
        ));
        let state = match handle.request(Command::SaveState(plan), t) {
            Some(Reply::State(s)) => s,
            other => panic!("a paused vCPU answered {other:?}"),
        };
        let last_in = ports.lock().unwrap().last_in;
        assert!(last_in >= 3);
        assert_eq!(
            state.regs.rax & 0xffff,
            u64::from(last_in),
            "the last in is in RAX"
        );
        assert!(
            (0x1000..0x1006).contains(&state.regs.rip),
            "{:#x}",
            state.regs.rip
        );
        assert!(state.lapic.is_none(), "no irqchip, no LAPIC");
        assert!(matches!(
            handle.request(Command::Resume, t),
            Some(Reply::Resumed { already: false })
        ));
        stop.request(crate::outcome::VmOutcome::AllHalted);
        handle.kick();
        thread.join().unwrap();
    }
}
