//! The control API: what each endpoint does with the VM. Requests that need the vCPUs
//! send commands to their mailboxes and answer through a completion callback when
//! every vCPU has replied ([`Pending::Later`]); the rest answer at once. Every request
//! and answer body is a type of [`super::protocol`].
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | /vm | name, pid, state, vCPUs, memory, uptime, kernel, devices |
//! | PUT | /vm/pause | park every vCPU (idempotent; says what it found) |
//! | PUT | /vm/resume | run them again (idempotent) |
//! | PUT | /vm/stop | graceful (the default; `{"mode":"graceful","timeout_ms":N}`): ACPI power button or Ctrl-Alt-Del, hard stop after the timeout; 409 while paused. `{"mode":"hard"}`: at once, also while paused |
//!
//! A graceful stop answers at once with `{"mode", "method"` (`acpi-power-button` or
//! `ctrl-alt-del`), `"timeout_ms", "delivered"` (false when the keyboard took no keys:
//! its driver turned scanning off, or it is full; the timeout applies anyway)`, "state"}`.
//! | GET | /vm/vcpus/N/registers?msrs=0x10,0xc0000080 | registers of a paused vCPU (at most 64 MSRs) |
//! | PUT | /vm/nmi | NMI to every vCPU (empty body or `{}`), or `{"vcpu": N}`; any other body is 400 |
//! | GET | /vm/stats | per-vCPU exit counts; the balloon's figures |
//! | GET | /vm/balloon | balloon target, actual, counters, the guest's statistics and their age |
//! | PUT | /vm/balloon | `{"target": "64M"}` or bytes: how much memory the balloon holds |
//! | GET | /vm/mmds | the MMDS document (`{}` before any); 404 without `--mmds` |
//! | PUT | /vm/mmds | any JSON value: the whole document (413 over `--mmds-size-limit`, the document unchanged); answers it |
//! | PATCH | /vm/mmds | a JSON merge patch (RFC 7396) of the document (400 before any PUT, 413 over the limit); answers the result |
//! | PUT | /vm/snapshot | `{"dir": "/path"}`: a paused VM's snapshot into the directory (409 unless paused; see docs/DESIGN.md, "Snapshots") |
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::http::{Method, Request, Response};
use super::protocol::{
    BalloonAnswer, BalloonRequest, ControlRegisters, DeviceExitCounts, GeneralRegisters,
    InfoAnswer, KvmStat, KvmStats, MemoryFigures, MemoryUsage, NmiAnswer, NmiRequest,
    RegistersAnswer, Segment, SegmentRegisters, SnapshotAnswer, SnapshotRequest, StateAnswer,
    StatsAnswer, StopAnswer, StopMethod, StopMode, StopRequest, Unavailable, VcpuStats, VmState,
};
use super::service::Service;
pub use super::service::{Done, Pending};
use crate::event_loop::LoopHandle;
use crate::graceful::{self, GracefulStop};
use crate::outcome::{StopSignal, VmOutcome};
use crate::vcpu::command::{Command, Registers, Reply};
use crate::vcpu::VcpuHandle;

/// What the API reports about the VM.
#[derive(Debug, Clone)]
pub struct VmInfo {
    pub name: String,
    pub kernel: String,
    pub vcpus: usize,
    pub mem_bytes: u64,
    pub mem_backing: String,
    pub hugepages: String,
    pub mem_prealloc: bool,
    pub machine: &'static str,
    pub devices: Vec<String>,
    /// The virtio-balloon, when the VM has one.
    pub balloon: Option<crate::devices::virtio::balloon::BalloonHandle>,
    /// The metadata service's store, when the VM has one (`--mmds`).
    pub mmds: Option<crate::mmds::SharedMmds>,
}

/// A snapshot `PUT /vm/snapshot` took: what its answer reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotTaken {
    pub state_bytes: u64,
    pub memory_bytes: u64,
    pub memory_written_bytes: u64,
    /// How long taking it took (from when the holder of the VM started on it).
    pub took: Duration,
}

/// Why a snapshot was not taken: the HTTP status and the message of the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFailed {
    pub status: u16,
    pub message: String,
}

/// Receives a snapshot's outcome, on the thread that took it.
pub type SnapshotDone = Box<dyn FnOnce(Result<SnapshotTaken, SnapshotFailed>) + Send>;

/// Where `PUT /vm/snapshot` is carried out: the thread that holds the VM (the API's
/// threads do not), which the VM hands to [`Api::with_snapshots`].
pub trait SnapshotJobs: Send + Sync {
    /// Queues a snapshot into `dir` and wakes the thread that takes it, which then
    /// calls `done`; `false` (and `done` dropped uncalled) when the VM is gone.
    fn snapshot(&self, dir: PathBuf, done: SnapshotDone) -> bool;
}

/// The VM as the API sees it.
pub struct Api {
    pub info: VmInfo,
    /// KVM's binary statistics for the VM, or why the host offers none.
    kvm_stats: Result<crate::vcpu::kvm_stats::StatsFd, String>,
    handles: Vec<VcpuHandle>,
    stop: Arc<StopSignal>,
    started: Instant,
    paused: AtomicBool,
    /// Graceful stops, and the loop that times them.
    graceful: Option<(Arc<GracefulStop>, LoopHandle)>,
    /// Guest RAM, for the memory figures of `GET /vm/stats`.
    mem: Option<crate::memory::GuestMemory>,
    /// Where snapshots are taken (the main thread, which holds the VM).
    snapshots: Option<Box<dyn SnapshotJobs>>,
}

impl Api {
    pub fn new(
        info: VmInfo,
        handles: Vec<VcpuHandle>,
        stop: Arc<StopSignal>,
        kvm_stats: Result<crate::vcpu::kvm_stats::StatsFd, String>,
    ) -> Self {
        Self {
            info,
            kvm_stats,
            handles,
            stop,
            started: Instant::now(),
            paused: AtomicBool::new(false),
            graceful: None,
            mem: None,
            snapshots: None,
        }
    }

    /// Enables `PUT /vm/snapshot`, carried out by the main thread through `jobs`.
    pub fn with_snapshots(mut self, jobs: Box<dyn SnapshotJobs>) -> Self {
        self.snapshots = Some(jobs);
        self
    }

    /// Enables graceful stops (the default stop mode; without this, only hard stops).
    pub fn with_graceful(mut self, graceful: Arc<GracefulStop>, events: LoopHandle) -> Self {
        self.graceful = Some((graceful, events));
        self
    }

    /// Reports the host memory use of `mem` in the statistics.
    pub fn with_memory(mut self, mem: crate::memory::GuestMemory) -> Self {
        self.mem = Some(mem);
        self
    }

    fn state(&self) -> VmState {
        if self.stop.is_stopping() {
            VmState::Stopping
        } else if self.paused.load(Ordering::Acquire) {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    fn info(&self) -> InfoAnswer {
        InfoAnswer {
            name: self.info.name.clone(),
            pid: std::process::id(),
            state: self.state(),
            vcpus: self.info.vcpus,
            memory_bytes: self.info.mem_bytes,
            memory_backing: self.info.mem_backing.clone(),
            hugepages: self.info.hugepages.clone(),
            memory_prealloc: self.info.mem_prealloc,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            kernel: self.info.kernel.clone(),
            machine: self.info.machine.to_owned(),
            devices: self.info.devices.clone(),
        }
    }
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

fn segment(x: &kvm_bindings::kvm_segment) -> Segment {
    Segment {
        selector: x.selector,
        base: hex(x.base),
        limit: x.limit,
        type_: x.type_,
        dpl: x.dpl,
        present: x.present,
        l: x.l,
        db: x.db,
    }
}

fn registers(vcpu: usize, r: &Registers) -> RegistersAnswer {
    let g = &r.regs;
    let s = &r.sregs;
    RegistersAnswer {
        vcpu,
        general: GeneralRegisters {
            rax: hex(g.rax),
            rbx: hex(g.rbx),
            rcx: hex(g.rcx),
            rdx: hex(g.rdx),
            rsi: hex(g.rsi),
            rdi: hex(g.rdi),
            rsp: hex(g.rsp),
            rbp: hex(g.rbp),
            r8: hex(g.r8),
            r9: hex(g.r9),
            r10: hex(g.r10),
            r11: hex(g.r11),
            r12: hex(g.r12),
            r13: hex(g.r13),
            r14: hex(g.r14),
            r15: hex(g.r15),
            rip: hex(g.rip),
            rflags: hex(g.rflags),
        },
        segment: SegmentRegisters {
            cs: segment(&s.cs),
            ds: segment(&s.ds),
            es: segment(&s.es),
            fs: segment(&s.fs),
            gs: segment(&s.gs),
            ss: segment(&s.ss),
            tr: segment(&s.tr),
            ldt: segment(&s.ldt),
        },
        control: ControlRegisters {
            cr0: hex(s.cr0),
            cr2: hex(s.cr2),
            cr3: hex(s.cr3),
            cr4: hex(s.cr4),
            cr8: hex(s.cr8),
            efer: hex(s.efer),
            apic_base: hex(s.apic_base),
        },
        msrs: r
            .msrs
            .iter()
            .map(|(i, v)| (hex(u64::from(*i)), hex(*v)))
            .collect(),
        unreadable_msrs: r
            .unreadable_msrs
            .iter()
            .map(|i| hex(u64::from(*i)))
            .collect(),
    }
}

/// KVM's binary statistics by name (histograms as arrays), or why the host does not
/// offer them.
fn kvm_stats(fd: Result<&crate::vcpu::kvm_stats::StatsFd, &String>) -> KvmStats {
    let stats = match fd {
        Ok(fd) => fd.read().map_err(|e| e.to_string()),
        Err(reason) => Err(reason.clone()),
    };
    match stats {
        Ok(s) => KvmStats::Stats(
            s.pairs()
                .into_iter()
                .map(|(k, v)| {
                    let v = match v.as_slice() {
                        [one] => KvmStat::One(*one),
                        _ => KvmStat::Many(v),
                    };
                    (k, v)
                })
                .collect(),
        ),
        Err(unavailable) => KvmStats::Unavailable(Unavailable { unavailable }),
    }
}

/// The balloon's state as the API reports it.
fn balloon(s: &crate::devices::virtio::balloon::BalloonStatus) -> BalloonAnswer {
    let page = crate::devices::virtio::balloon::sys::PAGE;
    BalloonAnswer {
        target_bytes: u64::from(s.target_pages) * page,
        actual_bytes: u64::from(s.actual_pages) * page,
        target_pages: s.target_pages,
        actual_pages: s.actual_pages,
        ram_bytes: s.ram_bytes,
        driver_active: s.active,
        deflate_on_oom: s.deflate_on_oom,
        statistics: s.stats_enabled,
        free_page_reporting: s.reporting_enabled,
        inflated_pages: s.inflated_pages,
        deflated_pages: s.deflated_pages,
        reported_bytes: s.reported_bytes,
        ignored_pfns: s.ignored_pfns,
        discard_errors: s.discard_errors,
        guest_stats: s.stats.as_ref().map(|g| {
            g.values
                .iter()
                .map(|(&t, &v)| (crate::devices::virtio::balloon::stat_name(t), v))
                .collect()
        }),
        guest_stats_age_ms: s.stats.as_ref().map(|g| g.at.elapsed().as_millis() as u64),
    }
}

/// The MSRs a register dump shows when the request names none.
pub const DEFAULT_MSRS: [u32; 8] = [
    0x10,        // TSC
    0x1b,        // APIC base
    0xc000_0080, // EFER
    0xc000_0100, // FS base
    0xc000_0101, // GS base
    0xc000_0102, // kernel GS base
    0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW
    0x4b56_4d02, // MSR_KVM_ASYNC_PF_EN
];

/// The most MSRs one register dump reads.
pub const MAX_MSRS: usize = 64;

/// The MSRs named by `?msrs=` (hex with `0x`, or decimal), every one checked; more than
/// [`MAX_MSRS`] is refused rather than cut.
fn parse_msrs(query: Option<&str>) -> Result<Vec<u32>, String> {
    let Some(list) = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("msrs=")))
    else {
        return Ok(DEFAULT_MSRS.to_vec());
    };
    let msrs = list
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let t = s.trim();
            let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(h) => u32::from_str_radix(h, 16),
                None => t.parse(),
            };
            r.map_err(|_| format!("'{s}' is not an MSR number"))
        })
        .collect::<Result<Vec<u32>, String>>()?;
    if msrs.len() > MAX_MSRS {
        return Err(format!(
            "{} MSRs requested; at most {MAX_MSRS} can be read at once",
            msrs.len()
        ));
    }
    Ok(msrs)
}

/// What a valid `PUT /vm/stop` asks for.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    Hard,
    Graceful(Duration),
}

impl From<StopRequest> for Stop {
    fn from(r: StopRequest) -> Stop {
        match r.mode {
            Some(StopMode::Hard) => Stop::Hard,
            None | Some(StopMode::Graceful) => Stop::Graceful(
                r.timeout_ms
                    .map_or(graceful::DEFAULT_TIMEOUT, Duration::from_millis),
            ),
        }
    }
}

fn graceful_stop(api: &Api, timeout: Duration) -> Response {
    let Some((g, events)) = &api.graceful else {
        return Response::error(
            409,
            "this VM cannot be stopped gracefully; use {\"mode\":\"hard\"}",
        );
    };
    if api.paused.load(Ordering::Acquire) {
        return Response::error(
            409,
            "the VM is paused and a paused guest cannot shut itself down: resume it \
             (PUT /vm/resume) first, or stop it with {\"mode\":\"hard\"}",
        );
    }
    match g.request(timeout, events) {
        Ok(r) => Response::json(
            200,
            &StopAnswer::Graceful {
                method: match r.method {
                    graceful::Method::PowerButton => StopMethod::AcpiPowerButton,
                    graceful::Method::CtrlAltDel => StopMethod::CtrlAltDel,
                },
                timeout_ms: r.timeout.as_millis() as u64,
                delivered: r.delivered,
                state: api.state(),
            },
        ),
        Err(e @ graceful::Error::Stopping) => Response::error(409, e.to_string()),
        Err(e @ graceful::Error::Timeout(_)) => Response::error(400, e.to_string()),
        Err(e) => Response::error(500, crate::errors::chain(&e)),
    }
}

impl Service for Api {
    fn handle(self: Arc<Self>, req: &Request, done: Done) -> Pending {
        handle(&self, req, done)
    }

    fn is_essential(&self, req: &Request) -> bool {
        is_essential(req)
    }

    fn essential_names(&self) -> &'static str {
        ESSENTIAL
    }
}

const ESSENTIAL: &str = "PUT /vm/stop and GET /vm";

/// `PUT /vm/stop` and `GET /vm`: always served (small answers; the owner can always
/// see and stop the VM).
pub fn is_essential(req: &Request) -> bool {
    let parts: Vec<&str> = req.path.split('/').filter(|s| !s.is_empty()).collect();
    matches!(
        (&req.method, parts.as_slice()),
        (Method::Put, ["vm", "stop"]) | (Method::Get, ["vm"])
    )
}

/// Routes one request.
pub fn handle(api: &Arc<Api>, req: &Request, done: Done) -> Pending {
    let path = req.path.trim_end_matches('/');
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match (&req.method, parts.as_slice()) {
        (Method::Get, ["vm"]) => Pending::Done(Response::json(200, &api.info())),
        (Method::Put, ["vm", "pause"]) | (Method::Put, ["vm", "resume"]) => {
            let pause = parts[1] == "pause";
            let before = api.state();
            let cmd = if pause {
                Command::Pause
            } else {
                Command::Resume
            };
            let a = api.clone();
            crate::vcpu::broadcast(&api.handles, cmd, move |replies| {
                let ok = replies.iter().all(|r| {
                    matches!(
                        (pause, r),
                        (true, Reply::Paused { .. }) | (false, Reply::Resumed { .. })
                    )
                });
                if !ok {
                    done(Response::error(
                        409,
                        format!("not every vCPU answered as expected: {replies:?}"),
                    ));
                    return;
                }
                a.paused.store(pause, Ordering::Release);
                done(Response::json(
                    200,
                    &StateAnswer {
                        state_before: before,
                        state: a.state(),
                    },
                ));
            });
            Pending::Later
        }
        (Method::Put, ["vm", "stop"]) => match StopRequest::parse(&req.body).map(Stop::from) {
            Ok(Stop::Hard) => {
                api.stop.request(VmOutcome::Stopped);
                Pending::Done(Response::json(
                    200,
                    &StopAnswer::Hard {
                        state: VmState::Stopping,
                    },
                ))
            }
            Ok(Stop::Graceful(timeout)) => Pending::Done(graceful_stop(api, timeout)),
            Err(e) => Pending::Done(Response::error(400, e)),
        },
        (Method::Get, ["vm", "vcpus", index, "registers"]) => {
            let Ok(i) = index.parse::<usize>() else {
                return Pending::Done(Response::error(
                    400,
                    format!("'{index}' is not a vCPU index"),
                ));
            };
            let Some(h) = api.handles.get(i) else {
                return Pending::Done(Response::error(
                    404,
                    format!("vCPU {i} does not exist (the VM has {})", api.handles.len()),
                ));
            };
            if !api.paused.load(Ordering::Acquire) {
                return Pending::Done(Response::error(409, "pause the VM first (PUT /vm/pause)"));
            }
            let msrs = match parse_msrs(req.query.as_deref()) {
                Ok(m) => m,
                Err(e) => return Pending::Done(Response::error(400, e)),
            };
            h.send(
                Command::ReadRegisters { msrs },
                Box::new(move |i, r| match r {
                    Reply::Registers(regs) => done(Response::json(200, &registers(i, &regs))),
                    other => done(Response::error(500, format!("vCPU {i}: {other:?}"))),
                }),
            );
            Pending::Later
        }
        (Method::Put, ["vm", "nmi"]) => {
            let vcpu = match NmiRequest::parse(&req.body) {
                Ok(r) => r.vcpu,
                Err(e) => return Pending::Done(Response::error(400, e)),
            };
            let targets: Vec<VcpuHandle> = match vcpu {
                Some(i) => match usize::try_from(i).ok().and_then(|i| api.handles.get(i)) {
                    Some(h) => vec![h.clone()],
                    None => {
                        return Pending::Done(Response::error(
                            404,
                            format!("vCPU {i} does not exist (the VM has {})", api.handles.len()),
                        ))
                    }
                },
                None => api.handles.clone(),
            };
            crate::vcpu::broadcast(&targets, Command::Nmi, move |replies| {
                let ok = replies.iter().all(|r| matches!(r, Reply::NmiQueued));
                done(if ok {
                    Response::json(200, &NmiAnswer { nmi: replies.len() })
                } else {
                    Response::error(500, format!("{replies:?}"))
                })
            });
            Pending::Later
        }
        (Method::Get | Method::Put, ["vm", "balloon"]) => {
            let Some(b) = &api.info.balloon else {
                return Pending::Done(Response::error(
                    404,
                    "this VM has no balloon device (start it with --balloon)",
                ));
            };
            if req.method == Method::Put {
                let target = match BalloonRequest::parse(&req.body).and_then(|r| r.target.bytes()) {
                    Ok(t) => t,
                    Err(e) => return Pending::Done(Response::error(400, e)),
                };
                if let Err(e) = b.set_target(target) {
                    return Pending::Done(Response::error(400, e.to_string()));
                }
            }
            Pending::Done(Response::json(200, &balloon(&b.status())))
        }
        (Method::Get | Method::Put | Method::Patch, ["vm", "mmds"]) => {
            Pending::Done(mmds(api.info.mmds.as_ref(), req))
        }
        (Method::Get, ["vm", "stats"]) => {
            let counts =
                |d: &[crate::vcpu::stats::DeviceExits]| -> BTreeMap<String, DeviceExitCounts> {
                    d.iter()
                        .filter(|d| d.reads + d.writes > 0)
                        .map(|d| {
                            let c = DeviceExitCounts {
                                reads: d.reads,
                                writes: d.writes,
                            };
                            (d.device.clone(), c)
                        })
                        .collect()
                };
            let vcpus = api
                .handles
                .iter()
                .map(|h| {
                    let s = h.stats.snapshot();
                    VcpuStats {
                        vcpu: h.index,
                        exits: s.exits.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                        pio_by_device: counts(&s.pio),
                        mmio_by_device: counts(&s.mmio),
                        userspace_ns: s.userspace_ns,
                        kvm: kvm_stats(h.kvm_stats.as_ref().as_ref()),
                    }
                })
                .collect();
            Pending::Done(Response::json(
                200,
                &StatsAnswer {
                    name: api.info.name.clone(),
                    state: api.state(),
                    vcpus,
                    kvm: kvm_stats(api.kvm_stats.as_ref()),
                    memory: memory(api.mem.as_ref()),
                    balloon: api.info.balloon.as_ref().map(|b| balloon(&b.status())),
                },
            ))
        }
        (Method::Put, ["vm", "snapshot"]) => {
            let dir = match SnapshotRequest::parse(&req.body) {
                Ok(r) => r.dir,
                Err(e) => return Pending::Done(Response::error(400, e)),
            };
            let Some(jobs) = &api.snapshots else {
                return Pending::Done(Response::error(
                    501,
                    "this VM cannot be snapshotted through this socket",
                ));
            };
            if !api.paused.load(Ordering::Acquire) {
                return Pending::Done(Response::error(
                    409,
                    "the VM is running: pause it first (PUT /vm/pause, ferrite pause NAME)",
                ));
            }
            let answer_dir = dir.clone();
            let queued = jobs.snapshot(
                dir,
                Box::new(move |outcome| {
                    let answer = match outcome {
                        Ok(t) => Response::json(
                            200,
                            &SnapshotAnswer {
                                dir: answer_dir.display().to_string(),
                                state_bytes: t.state_bytes,
                                memory_bytes: t.memory_bytes,
                                memory_written_bytes: t.memory_written_bytes,
                                took_us: t.took.as_micros() as u64,
                            },
                        ),
                        Err(e) => Response::error(e.status, e.message),
                    };
                    done(answer);
                }),
            );
            if !queued {
                return Pending::Done(Response::error(409, "the VM is stopping"));
            }
            Pending::Later
        }
        (
            _,
            ["vm"]
            | ["vm", "pause" | "resume" | "stop" | "nmi" | "stats" | "balloon" | "mmds" | "snapshot"],
        ) => Pending::Done(Response::error(
            405,
            format!("{:?} is not allowed on {path}", req.method),
        )),
        _ => Pending::Done(Response::error(404, format!("no such endpoint: {path}"))),
    }
}

/// `GET`, `PUT` and `PATCH /vm/mmds`: the store's own refusals (413 for a document
/// over its limit, 400 for a PATCH before any PUT), with the document unchanged.
fn mmds(m: Option<&crate::mmds::SharedMmds>, req: &Request) -> Response {
    let Some(m) = m else {
        return Response::error(
            404,
            "this VM has no metadata service (start it with --mmds and a --net)",
        );
    };
    let body = if req.method == Method::Get {
        None
    } else {
        match serde_json::from_slice::<serde_json::Value>(&req.body) {
            Ok(v) => Some(v),
            Err(e) => return Response::error(400, format!("the body is not a JSON document: {e}")),
        }
    };
    let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
    let changed = match body {
        None => Ok(()),
        Some(v) if req.method == Method::Put => g.store.put(v),
        Some(v) => g.store.patch(v),
    };
    match changed {
        Ok(()) => Response::json(200, g.store.get()),
        Err(e @ crate::mmds::Error::LimitExceeded { size, limit }) => Response::error(
            413,
            format!("{e} It would be {size} bytes; the limit is {limit} (--mmds-size-limit)"),
        ),
        Err(e) => Response::error(400, e.to_string()),
    }
}

/// Host memory figures of guest RAM and of Ferrite itself.
fn memory(mem: Option<&crate::memory::GuestMemory>) -> Option<MemoryFigures> {
    mem.map(|m| match crate::memory::usage::read(m) {
        Ok(u) => MemoryFigures::Usage(MemoryUsage {
            guest_ram: u.guest_ram,
            guest_rss: u.guest_rss,
            process_rss: u.process_rss,
            vmm_rss: u.vmm_rss,
            kvm_metadata_estimate: u.kvm_metadata_estimate,
        }),
        Err(e) => MemoryFigures::Unavailable(Unavailable {
            unavailable: format!("cannot read /proc/self: {e}"),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(balloon: bool) -> Arc<Api> {
        api_with(balloon, None)
    }

    fn api_with(balloon: bool, mmds: Option<crate::mmds::SharedMmds>) -> Arc<Api> {
        use crate::devices::virtio::balloon::{Balloon, BalloonConfig, BalloonHandle};
        let b = balloon.then(|| {
            let dev = Balloon::new(&BalloonConfig::default(), 256 << 20).unwrap();
            BalloonHandle(Arc::new(std::sync::Mutex::new(dev)))
        });
        let info = VmInfo {
            name: "t".into(),
            kernel: "k".into(),
            vcpus: 0,
            mem_bytes: 256 << 20,
            mem_backing: "anon".into(),
            hugepages: "off".into(),
            mem_prealloc: false,
            machine: "pc",
            devices: Vec::new(),
            balloon: b,
            mmds,
        };
        Arc::new(Api::new(
            info,
            Vec::new(),
            Arc::new(StopSignal::new()),
            Err("none".into()),
        ))
    }

    /// One request answered at once.
    fn call(api: &Arc<Api>, method: Method, path: &str, body: &str) -> Response {
        let req = Request {
            method,
            path: path.into(),
            query: None,
            body: body.as_bytes().to_vec(),
            keep_alive: false,
        };
        match handle(api, &req, Box::new(|_| {})) {
            Pending::Done(r) => r,
            Pending::Later => panic!("{path} answered later"),
        }
    }

    /// An answer's body as `T`.
    fn body<T: serde::de::DeserializeOwned>(r: &Response) -> T {
        match serde_json::from_value(r.body.clone()) {
            Ok(v) => v,
            Err(e) => panic!("{}: {e}: {}", std::any::type_name::<T>(), r.body),
        }
    }

    /// The message of an error answer.
    fn error(r: &Response) -> String {
        body::<super::super::protocol::ErrorBody>(r).error
    }

    #[test]
    fn mmds_endpoint_reads_puts_patches_and_refuses_over_limit_or_without_mmds() {
        let a = api(false);
        for m in [Method::Get, Method::Put, Method::Patch] {
            let r = call(&a, m, "/vm/mmds", "{}");
            assert_eq!(r.status, 404, "{r:?}");
            assert!(error(&r).contains("--mmds"), "{r:?}");
        }
        let store = crate::mmds::Mmds {
            store: crate::mmds::store::Store::new(40),
            ..crate::mmds::Mmds::default()
        };
        let m: crate::mmds::SharedMmds = Arc::new(std::sync::Mutex::new(store));
        let a = api_with(false, Some(m.clone()));
        let r = call(&a, Method::Get, "/vm/mmds", "");
        assert_eq!((r.status, r.body.clone()), (200, serde_json::json!({})));
        let r = call(&a, Method::Patch, "/vm/mmds", r#"{"a":1}"#);
        assert_eq!(r.status, 400, "{r:?}");
        assert!(error(&r).contains("not initialized"), "{r:?}");
        let r = call(&a, Method::Put, "/vm/mmds", r#"{"a":1}"#);
        assert_eq!(
            (r.status, r.body.clone()),
            (200, serde_json::json!({"a": 1}))
        );
        let r = call(&a, Method::Patch, "/vm/mmds", r#"{"b":"x"}"#);
        assert_eq!(r.body, serde_json::json!({"a": 1, "b": "x"}));
        let big = format!(r#"{{"c":"{}"}}"#, "z".repeat(100));
        for method in [Method::Put, Method::Patch] {
            let r = call(&a, method, "/vm/mmds", &big);
            assert_eq!(r.status, 413, "{r:?}");
            assert!(error(&r).contains("limit is 40"), "{r:?}");
        }
        let r = call(&a, Method::Put, "/vm/mmds", "{");
        assert_eq!(r.status, 400, "{r:?}");
        let r = call(&a, Method::Get, "/vm/mmds", "");
        assert_eq!(r.body, serde_json::json!({"a": 1, "b": "x"}));
        assert_eq!(
            m.lock().unwrap().store.get(),
            &serde_json::json!({"a": 1, "b": "x"})
        );
        let r = call(&a, Method::Delete, "/vm/mmds", "");
        assert_eq!(r.status, 405, "{r:?}");
    }

    #[test]
    fn balloon_endpoint() {
        let a = api(false);
        let r = call(&a, Method::Get, "/vm/balloon", "");
        assert_eq!(r.status, 404);
        assert!(error(&r).contains("--balloon"), "{r:?}");
        let a = api(true);
        let r = call(&a, Method::Put, "/vm/balloon", r#"{"target":"64M"}"#);
        assert_eq!(r.status, 200, "{r:?}");
        let v: BalloonAnswer = body(&r);
        assert_eq!(v.target_bytes, 64 << 20);
        assert_eq!(v.target_pages, 16384);
        assert!(!v.driver_active);
        let v: BalloonAnswer = body(&call(
            &a,
            Method::Put,
            "/vm/balloon",
            r#"{"target":1048576}"#,
        ));
        assert_eq!(v.target_bytes, 1 << 20);
        let r = call(&a, Method::Put, "/vm/balloon", r#"{"target":"1G"}"#);
        assert_eq!(r.status, 400);
        assert!(error(&r).contains("exceeds"), "{r:?}");
        for bad in [r#"{"target":"x"}"#, r#"{"target":-1}"#, r#"{}"#, "nope"] {
            let r = call(&a, Method::Put, "/vm/balloon", bad);
            assert_eq!(r.status, 400, "{bad}");
            assert!(!error(&r).is_empty(), "{bad}");
        }
        let r = call(&a, Method::Get, "/vm/balloon", "");
        assert_eq!(
            (r.status, body::<BalloonAnswer>(&r).target_bytes),
            (200, 1 << 20)
        );
        assert_eq!(call(&a, Method::Delete, "/vm/balloon", "").status, 405);
        let v: StatsAnswer = body(&call(&a, Method::Get, "/vm/stats", ""));
        assert_eq!(v.balloon.map(|b| b.target_bytes), Some(1 << 20));
    }

    /// The answers that need no vCPU parse as their protocol types.
    #[test]
    fn answers_parse_as_protocol_types() {
        let a = api(false);
        let v: InfoAnswer = body(&call(&a, Method::Get, "/vm", ""));
        assert_eq!((v.name.as_str(), v.state), ("t", VmState::Running));
        assert_eq!(v.memory_bytes, 256 << 20);
        let v: StatsAnswer = body(&call(&a, Method::Get, "/vm/stats", ""));
        assert_eq!((v.vcpus.len(), v.memory, v.balloon), (0, None, None));
        assert_eq!(
            v.kvm,
            KvmStats::Unavailable(Unavailable {
                unavailable: "none".into()
            })
        );
        let r = call(&a, Method::Put, "/vm/stop", r#"{"mode":"hard"}"#);
        assert_eq!(
            body::<StopAnswer>(&r),
            StopAnswer::Hard {
                state: VmState::Stopping
            }
        );
        let r = call(&a, Method::Get, "/nope", "");
        assert_eq!(
            (r.status, error(&r)),
            (404, "no such endpoint: /nope".to_owned())
        );
    }

    #[test]
    fn msr_lists() {
        assert_eq!(parse_msrs(None).unwrap(), DEFAULT_MSRS.to_vec());
        assert_eq!(
            parse_msrs(Some("msrs=0x10,16,0XC0000080")).unwrap(),
            vec![0x10, 16, 0xc000_0080]
        );
        assert!(parse_msrs(Some("msrs=0xzz")).is_err());
    }

    /// Issue 13 defect 8: more than 64 MSRs were cut silently, and the ones past the
    /// 64th were not even checked.
    #[test]
    fn msr_list_beyond_limit_is_refused_not_cut() {
        let list = |n: usize, last: &str| {
            let mut v: Vec<String> = (0..n).map(|i| format!("{:#x}", 0x10 + i)).collect();
            v.push(last.to_string());
            format!("msrs={}", v.join(","))
        };
        // 64 is the limit and is fine.
        assert_eq!(parse_msrs(Some(&list(63, "0x10"))).unwrap().len(), 64);
        // 65 is refused, naming the limit.
        let e = parse_msrs(Some(&list(64, "0x10"))).unwrap_err();
        assert!(e.contains("65") && e.contains("at most 64"), "{e}");
        // A bad entry past the 64th is found.
        let e = parse_msrs(Some(&list(70, "0xzz"))).unwrap_err();
        assert!(e.contains("'0xzz' is not an MSR number"), "{e}");
    }

    /// Issue 13 defect 8: a body `PUT /vm/nmi` did not understand sent an NMI to every vCPU.
    #[test]
    fn nmi_malformed_body_is_400_not_nmi_to_all() {
        let a = api(false);
        for bad in [
            r#"{"vcpu":"1"}"#,
            r#"{"vcpu":-1}"#,
            r#"{"vcpu":1.5}"#,
            r#"{"vcpu":null}"#,
            r#"{"cpu":1}"#,
            r#"{"vcpu":1,"x":2}"#,
            r#"[1]"#,
            r#"null"#,
            r#"1"#,
            r#""all""#,
            r#"{"#,
        ] {
            // Answered at once with 400: `call` panics if the request went to the vCPUs.
            let r = call(&a, Method::Put, "/vm/nmi", bad);
            assert_eq!(r.status, 400, "{bad}: {r:?}");
            assert_eq!(Err(error(&r)), NmiRequest::parse(bad.as_bytes()), "{bad}");
        }
        // A vCPU that does not exist is 404, also at once.
        let r = call(&a, Method::Put, "/vm/nmi", r#"{"vcpu":3}"#);
        assert_eq!(r.status, 404, "{r:?}");
        let r = call(
            &a,
            Method::Put,
            "/vm/nmi",
            r#"{"vcpu":18446744073709551615}"#,
        );
        assert_eq!(r.status, 404);
    }

    #[test]
    fn stop_bodies() {
        let p = |s: &str| StopRequest::parse(s.as_bytes()).map(Stop::from);
        let default = Ok(Stop::Graceful(graceful::DEFAULT_TIMEOUT));
        assert_eq!(p(""), default);
        assert_eq!(p("null"), default);
        assert_eq!(p("{}"), default);
        assert_eq!(p(r#"{"mode":"graceful"}"#), default);
        assert_eq!(
            p(r#"{"mode":"graceful","timeout_ms":1500}"#),
            Ok(Stop::Graceful(Duration::from_millis(1500)))
        );
        assert_eq!(
            p(r#"{"timeout_ms":20}"#),
            Ok(Stop::Graceful(Duration::from_millis(20)))
        );
        assert_eq!(p(r#"{"mode":"hard"}"#), Ok(Stop::Hard));
        let a = api(false);
        for bad in [
            r#"{"mode":"hard","timeout_ms":5}"#,
            r#"{"mode":"soft"}"#,
            r#"{"mode":3}"#,
            r#"{"timeout_ms":0}"#,
            r#"{"timeout_ms":-1}"#,
            r#"{"timeout_ms":1.5}"#,
            r#"{"timeout_ms":"30"}"#,
            r#"{"timeout_ms":99999999999}"#,
            r#"{"timeout":30}"#,
            r#"[1]"#,
            r#""hard""#,
        ] {
            assert!(p(bad).is_err(), "{bad}");
            let r = call(&a, Method::Put, "/vm/stop", bad);
            assert_eq!(r.status, 400, "{bad}: {r:?}");
        }
        assert!(
            !a.stop.is_stopping(),
            "a refused stop request stopped the VM"
        );
    }
}
