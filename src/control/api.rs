//! The control API: what each endpoint does with the VM. Requests that need the vCPUs
//! send commands to their mailboxes and answer through a completion callback when
//! every vCPU has replied ([`Pending::Later`]); the rest answer at once.
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
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::http::{Method, Request, Response};
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
        }
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

    fn state(&self) -> &'static str {
        if self.stop.is_stopping() {
            "stopping"
        } else if self.paused.load(Ordering::Acquire) {
            "paused"
        } else {
            "running"
        }
    }

    fn info_json(&self) -> Value {
        json!({
            "name": self.info.name,
            "pid": std::process::id(),
            "state": self.state(),
            "vcpus": self.info.vcpus,
            "memory_bytes": self.info.mem_bytes,
            "memory_backing": self.info.mem_backing,
            "hugepages": self.info.hugepages,
            "memory_prealloc": self.info.mem_prealloc,
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "kernel": self.info.kernel,
            "machine": self.info.machine,
            "devices": self.info.devices,
        })
    }
}

fn registers_json(r: &Registers) -> Value {
    let g = &r.regs;
    let s = &r.sregs;
    let seg = |x: &kvm_bindings::kvm_segment| json!({"selector": x.selector, "base": format!("{:#x}", x.base), "limit": x.limit, "type": x.type_, "dpl": x.dpl, "present": x.present, "l": x.l, "db": x.db});
    let hex = |v: u64| format!("{v:#x}");
    let mut msrs = serde_json::Map::new();
    for (i, v) in &r.msrs {
        msrs.insert(format!("{i:#x}"), Value::String(hex(*v)));
    }
    json!({
        "general": {
            "rax": hex(g.rax), "rbx": hex(g.rbx), "rcx": hex(g.rcx), "rdx": hex(g.rdx),
            "rsi": hex(g.rsi), "rdi": hex(g.rdi), "rsp": hex(g.rsp), "rbp": hex(g.rbp),
            "r8": hex(g.r8), "r9": hex(g.r9), "r10": hex(g.r10), "r11": hex(g.r11),
            "r12": hex(g.r12), "r13": hex(g.r13), "r14": hex(g.r14), "r15": hex(g.r15),
            "rip": hex(g.rip), "rflags": hex(g.rflags),
        },
        "segment": {
            "cs": seg(&s.cs), "ds": seg(&s.ds), "es": seg(&s.es), "fs": seg(&s.fs),
            "gs": seg(&s.gs), "ss": seg(&s.ss), "tr": seg(&s.tr), "ldt": seg(&s.ldt),
        },
        "control": {
            "cr0": hex(s.cr0), "cr2": hex(s.cr2), "cr3": hex(s.cr3), "cr4": hex(s.cr4),
            "cr8": hex(s.cr8), "efer": hex(s.efer), "apic_base": hex(s.apic_base),
        },
        "msrs": msrs,
        "unreadable_msrs": r.unreadable_msrs.iter().map(|i| format!("{i:#x}")).collect::<Vec<_>>(),
    })
}

/// KVM's binary statistics as `{name: value}` (histograms as arrays), or
/// `{"unavailable": reason}` when the host does not offer them.
fn kvm_json(fd: Result<&crate::vcpu::kvm_stats::StatsFd, &String>) -> Value {
    let stats = match fd {
        Ok(fd) => fd.read().map_err(|e| e.to_string()),
        Err(reason) => Err(reason.clone()),
    };
    match stats {
        Ok(s) => s
            .pairs()
            .into_iter()
            .map(|(k, v)| {
                let v = if v.len() == 1 { json!(v[0]) } else { json!(v) };
                (k, v)
            })
            .collect::<serde_json::Map<_, _>>()
            .into(),
        Err(reason) => json!({ "unavailable": reason }),
    }
}

/// The balloon's state as JSON.
fn balloon_json(s: &crate::devices::virtio::balloon::BalloonStatus) -> Value {
    let page = crate::devices::virtio::balloon::sys::PAGE;
    let stats = s.stats.as_ref().map(|g| {
        g.values
            .iter()
            .map(|(&t, &v)| (crate::devices::virtio::balloon::stat_name(t), json!(v)))
            .collect::<serde_json::Map<_, _>>()
    });
    json!({
        "target_bytes": u64::from(s.target_pages) * page,
        "actual_bytes": u64::from(s.actual_pages) * page,
        "target_pages": s.target_pages,
        "actual_pages": s.actual_pages,
        "ram_bytes": s.ram_bytes,
        "driver_active": s.active,
        "deflate_on_oom": s.deflate_on_oom,
        "statistics": s.stats_enabled,
        "free_page_reporting": s.reporting_enabled,
        "inflated_pages": s.inflated_pages,
        "deflated_pages": s.deflated_pages,
        "reported_bytes": s.reported_bytes,
        "ignored_pfns": s.ignored_pfns,
        "discard_errors": s.discard_errors,
        "guest_stats": stats,
        "guest_stats_age_ms": s.stats.as_ref().map(|g| g.at.elapsed().as_millis() as u64),
    })
}

/// The balloon target in a request body: bytes, or a size string ("64M"; a plain
/// number string is MiB, as on the command line).
fn balloon_target(body: &Value) -> Result<u64, String> {
    match body.get("target") {
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| format!("target {n} is not a byte count")),
        Some(Value::String(s)) => crate::size::parse(s),
        _ => Err(
            "expected {\"target\": BYTES or \"SIZE\"} (e.g. \"64M\"; 0 empties the balloon)".into(),
        ),
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

/// The body of `PUT /vm/nmi`: empty or `{}` for every vCPU, `{"vcpu": N}` for one.
/// Anything else (another field, a vCPU that is not a whole number, a non-object) is
/// refused, so a malformed request never reaches every vCPU.
fn parse_nmi(body: &[u8]) -> Result<Option<u64>, String> {
    const EXPECTED: &str = "expected an empty body or {} (every vCPU) or {\"vcpu\": N} (one)";
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("request body is not JSON: {e}"))?;
    let Value::Object(obj) = v else {
        return Err(format!("the body must be a JSON object; {EXPECTED}"));
    };
    if let Some(k) = obj.keys().find(|k| *k != "vcpu") {
        return Err(format!("unknown field '{k}'; {EXPECTED}"));
    }
    match obj.get("vcpu") {
        None => Ok(None),
        Some(n) => match n.as_u64() {
            Some(i) => Ok(Some(i)),
            None => Err(format!(
                "vcpu must be a vCPU index (a whole number from 0), not {n}"
            )),
        },
    }
}

/// How `PUT /vm/stop` asks to stop.
#[derive(Debug, PartialEq, Eq)]
enum StopMode {
    Hard,
    Graceful(Duration),
}

/// `{"mode": "graceful" (default) | "hard", "timeout_ms": N (graceful only)}`.
fn parse_stop(body: &Value) -> Result<StopMode, String> {
    let empty = serde_json::Map::new();
    let obj = match body {
        Value::Null => &empty,
        Value::Object(o) => o,
        _ => return Err("the body must be a JSON object".into()),
    };
    if let Some(k) = obj.keys().find(|k| *k != "mode" && *k != "timeout_ms") {
        return Err(format!(
            "unknown field '{k}' (expected \"mode\", \"timeout_ms\")"
        ));
    }
    let timeout = match obj.get("timeout_ms") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(ms) if ms >= 1 && ms <= graceful::MAX_TIMEOUT.as_millis() as u64 => {
                Some(Duration::from_millis(ms))
            }
            _ => {
                return Err(format!(
                    "timeout_ms must be a whole number of milliseconds from 1 to {}, not {v}",
                    graceful::MAX_TIMEOUT.as_millis()
                ))
            }
        },
    };
    match obj.get("mode").map(|m| m.as_str()) {
        None | Some(Some("graceful")) => Ok(StopMode::Graceful(
            timeout.unwrap_or(graceful::DEFAULT_TIMEOUT),
        )),
        Some(Some("hard")) if timeout.is_none() => Ok(StopMode::Hard),
        Some(Some("hard")) => Err("timeout_ms applies to graceful stops only".into()),
        _ => Err(format!(
            "stop mode {} is not supported (use \"graceful\" or \"hard\")",
            obj["mode"]
        )),
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
            &json!({
                "mode": "graceful",
                "method": r.method.as_str(),
                "timeout_ms": r.timeout.as_millis() as u64,
                "delivered": r.delivered,
                "state": api.state(),
            }),
        ),
        Err(e @ graceful::Error::Stopping) => Response::error(409, e.to_string()),
        Err(e @ graceful::Error::Timeout(_)) => Response::error(400, e.to_string()),
        Err(e) => Response::error(500, crate::errors::chain(&e)),
    }
}

fn body_json(req: &Request) -> Result<Value, Response> {
    if req.body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&req.body)
        .map_err(|e| Response::error(400, format!("request body is not JSON: {e}")))
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
        (Method::Get, ["vm"]) => Pending::Done(Response::json(200, &api.info_json())),
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
                    &json!({"state_before": before, "state": a.state()}),
                ));
            });
            Pending::Later
        }
        (Method::Put, ["vm", "stop"]) => {
            let body = match body_json(req) {
                Ok(b) => b,
                Err(r) => return Pending::Done(r),
            };
            match parse_stop(&body) {
                Ok(StopMode::Hard) => {
                    api.stop.request(VmOutcome::Stopped);
                    Pending::Done(Response::json(
                        200,
                        &json!({"mode": "hard", "state": "stopping"}),
                    ))
                }
                Ok(StopMode::Graceful(timeout)) => Pending::Done(graceful_stop(api, timeout)),
                Err(e) => Pending::Done(Response::error(400, e)),
            }
        }
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
                    Reply::Registers(regs) => {
                        let mut v = registers_json(&regs);
                        v["vcpu"] = json!(i);
                        done(Response::json(200, &v))
                    }
                    other => done(Response::error(500, format!("vCPU {i}: {other:?}"))),
                }),
            );
            Pending::Later
        }
        (Method::Put, ["vm", "nmi"]) => {
            let vcpu = match parse_nmi(&req.body) {
                Ok(v) => v,
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
                    Response::json(200, &json!({"nmi": replies.len()}))
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
                let body = match body_json(req) {
                    Ok(b) => b,
                    Err(r) => return Pending::Done(r),
                };
                let target = match balloon_target(&body) {
                    Ok(t) => t,
                    Err(e) => return Pending::Done(Response::error(400, e)),
                };
                if let Err(e) = b.set_target(target) {
                    return Pending::Done(Response::error(400, e.to_string()));
                }
            }
            Pending::Done(Response::json(200, &balloon_json(&b.status())))
        }
        (Method::Get, ["vm", "stats"]) => {
            let vcpus: Vec<Value> = api
                .handles
                .iter()
                .map(|h| {
                    let s = h.stats.snapshot();
                    let mut exits = serde_json::Map::new();
                    for (k, v) in &s.exits {
                        exits.insert(k.to_string(), json!(v));
                    }
                    let devices = |d: &[crate::vcpu::stats::DeviceExits]| -> Value {
                        d.iter()
                            .filter(|d| d.reads + d.writes > 0)
                            .map(|d| {
                                (
                                    d.device.clone(),
                                    json!({"reads": d.reads, "writes": d.writes}),
                                )
                            })
                            .collect::<serde_json::Map<_, _>>()
                            .into()
                    };
                    json!({
                        "vcpu": h.index,
                        "exits": exits,
                        "pio_by_device": devices(&s.pio),
                        "mmio_by_device": devices(&s.mmio),
                        "userspace_ns": s.userspace_ns,
                        "kvm": kvm_json(h.kvm_stats.as_ref().as_ref()),
                    })
                })
                .collect();
            Pending::Done(Response::json(
                200,
                &json!({
                    "name": api.info.name,
                    "state": api.state(),
                    "vcpus": vcpus,
                    "kvm": kvm_json(api.kvm_stats.as_ref()),
                    "memory": memory_json(api.mem.as_ref()),
                    "balloon": api.info.balloon.as_ref().map(|b| balloon_json(&b.status())),
                }),
            ))
        }
        (_, ["vm"] | ["vm", "pause" | "resume" | "stop" | "nmi" | "stats" | "balloon"]) => {
            Pending::Done(Response::error(
                405,
                format!("{:?} is not allowed on {path}", req.method),
            ))
        }
        _ => Pending::Done(Response::error(404, format!("no such endpoint: {path}"))),
    }
}

/// Host memory figures of guest RAM and of Ferrite itself.
fn memory_json(mem: Option<&crate::memory::GuestMemory>) -> Value {
    match mem.map(crate::memory::usage::read) {
        Some(Ok(u)) => json!(u),
        Some(Err(e)) => json!({"unavailable": format!("cannot read /proc/self: {e}")}),
        None => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(balloon: bool) -> Arc<Api> {
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
        };
        Arc::new(Api::new(
            info,
            Vec::new(),
            Arc::new(StopSignal::new()),
            Err("none".into()),
        ))
    }

    /// (status, body) of one request answered at once.
    fn call(api: &Arc<Api>, method: Method, path: &str, body: &str) -> (u16, Value) {
        let req = Request {
            method,
            path: path.into(),
            query: None,
            body: body.as_bytes().to_vec(),
            keep_alive: false,
        };
        match handle(api, &req, Box::new(|_| {})) {
            Pending::Done(r) => (r.status, r.body),
            Pending::Later => panic!("{path} answered later"),
        }
    }

    #[test]
    fn balloon_endpoint() {
        let a = api(false);
        let (st, v) = call(&a, Method::Get, "/vm/balloon", "");
        assert_eq!(st, 404);
        assert!(v["error"].as_str().unwrap().contains("--balloon"), "{v}");
        let a = api(true);
        let (st, v) = call(&a, Method::Put, "/vm/balloon", r#"{"target":"64M"}"#);
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["target_bytes"], 64 << 20);
        assert_eq!(v["target_pages"], 16384);
        assert_eq!(v["driver_active"], false);
        let (_, v) = call(&a, Method::Put, "/vm/balloon", r#"{"target":1048576}"#);
        assert_eq!(v["target_bytes"], 1 << 20);
        let (st, v) = call(&a, Method::Put, "/vm/balloon", r#"{"target":"1G"}"#);
        assert_eq!(st, 400);
        assert!(v["error"].as_str().unwrap().contains("exceeds"), "{v}");
        for bad in [r#"{"target":"x"}"#, r#"{"target":-1}"#, r#"{}"#, "nope"] {
            assert_eq!(call(&a, Method::Put, "/vm/balloon", bad).0, 400, "{bad}");
        }
        let (st, v) = call(&a, Method::Get, "/vm/balloon", "");
        assert_eq!((st, v["target_bytes"].as_u64()), (200, Some(1 << 20)));
        assert_eq!(call(&a, Method::Delete, "/vm/balloon", "").0, 405);
        let (_, v) = call(&a, Method::Get, "/vm/stats", "");
        assert_eq!(v["balloon"]["target_bytes"], 1 << 20);
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
        assert_eq!(parse_nmi(b""), Ok(None));
        assert_eq!(parse_nmi(b" \r\n"), Ok(None));
        assert_eq!(parse_nmi(b"{}"), Ok(None));
        assert_eq!(parse_nmi(br#"{"vcpu":1}"#), Ok(Some(1)));
        assert_eq!(parse_nmi(br#"{"vcpu":0}"#), Ok(Some(0)));
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
            assert!(parse_nmi(bad.as_bytes()).is_err(), "{bad}");
            // Answered at once with 400: `call` panics if the request went to the vCPUs.
            let (st, v) = call(&a, Method::Put, "/vm/nmi", bad);
            assert_eq!(st, 400, "{bad}: {v}");
        }
        // A vCPU that does not exist is 404, also at once.
        let (st, v) = call(&a, Method::Put, "/vm/nmi", r#"{"vcpu":3}"#);
        assert_eq!(st, 404, "{v}");
        let (st, _) = call(
            &a,
            Method::Put,
            "/vm/nmi",
            r#"{"vcpu":18446744073709551615}"#,
        );
        assert_eq!(st, 404);
    }

    #[test]
    fn stop_bodies() {
        let p = |s: &str| parse_stop(&serde_json::from_str(s).unwrap());
        let default = Ok(StopMode::Graceful(graceful::DEFAULT_TIMEOUT));
        assert_eq!(parse_stop(&Value::Null), default);
        assert_eq!(p("{}"), default);
        assert_eq!(p(r#"{"mode":"graceful"}"#), default);
        assert_eq!(
            p(r#"{"mode":"graceful","timeout_ms":1500}"#),
            Ok(StopMode::Graceful(Duration::from_millis(1500)))
        );
        assert_eq!(
            p(r#"{"timeout_ms":20}"#),
            Ok(StopMode::Graceful(Duration::from_millis(20)))
        );
        assert_eq!(p(r#"{"mode":"hard"}"#), Ok(StopMode::Hard));
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
        }
    }
}
