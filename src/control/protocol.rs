//! The native control API's bodies, one type per request and answer, shared by the
//! server ([`super::api`]), the CLI ([`super::commands`]) and the tests. The wire format
//! is what these types serialize to; `Response::json` sorts an object's keys.
//!
//! Requests are refused field by field with the messages below (no position: each
//! names the field and the value); a request field nobody knows is refused, except in
//! `PUT /vm/balloon`, which has always ignored fields other than `target`. Answers
//! accept fields they do not know, so an older CLI can read a newer VM's answers.
//!
//! Free-form parts are maps whose keys are data, not names chosen here: exit counts by
//! reason, exits by device, KVM's statistics by KVM's names, the balloon's guest
//! statistics by the virtio names, MSRs by number.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// A VM's state as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    Paused,
    Stopping,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every 4xx and 5xx answer: `{"error": message}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /vm`; also what `ferrite list --json` prints, one per VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfoAnswer {
    pub name: String,
    pub pid: u32,
    pub state: VmState,
    pub vcpus: usize,
    pub memory_bytes: u64,
    pub memory_backing: String,
    pub hugepages: String,
    pub memory_prealloc: bool,
    pub uptime_ms: u64,
    pub kernel: String,
    pub machine: String,
    pub devices: Vec<String>,
}

/// `PUT /vm/pause` and `PUT /vm/resume`: the state found and the state left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateAnswer {
    pub state_before: VmState,
    pub state: VmState,
}

/// How `PUT /vm/stop` stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StopMode {
    Graceful,
    Hard,
}

/// `PUT /vm/stop`: `{"mode": "graceful" (the default) | "hard", "timeout_ms": N
/// (graceful only, 1 ms to `graceful::MAX_TIMEOUT`)}`; an empty body or `null` is
/// the default graceful stop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StopRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<StopMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl StopRequest {
    /// A stop request's body (empty is the default).
    pub fn parse(body: &[u8]) -> Result<StopRequest, String> {
        if body.is_empty() {
            return Ok(StopRequest::default());
        }
        parse_body(body)
    }
}

impl<'de> Deserialize<'de> for StopRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ObjectVisitor {
            not_object: "the body must be a JSON object",
            null: Some(StopRequest::default()),
            fields: |m: &mut NextField<'_>| {
                let mut r = StopRequest::default();
                while let Some((k, v)) = m() {
                    match k.as_str() {
                        "mode" => r.mode = Some(stop_mode(&v)?),
                        "timeout_ms" => r.timeout_ms = Some(timeout_ms(&v)?),
                        _ => {
                            return Err(format!(
                                "unknown field '{k}' (expected \"mode\", \"timeout_ms\")"
                            ))
                        }
                    }
                }
                if r.mode == Some(StopMode::Hard) && r.timeout_ms.is_some() {
                    return Err("timeout_ms applies to graceful stops only".into());
                }
                Ok(r)
            },
        })
    }
}

/// The `mode` of a stop request.
fn stop_mode(v: &Shown) -> Result<StopMode, String> {
    match v {
        Shown::Str(s) if s == "graceful" => Ok(StopMode::Graceful),
        Shown::Str(s) if s == "hard" => Ok(StopMode::Hard),
        _ => Err(format!(
            "stop mode {v} is not supported (use \"graceful\" or \"hard\")"
        )),
    }
}

/// The `timeout_ms` of a stop request: 1 ms to `graceful::MAX_TIMEOUT`.
fn timeout_ms(v: &Shown) -> Result<u64, String> {
    let max = crate::graceful::MAX_TIMEOUT.as_millis() as u64;
    match v {
        Shown::U64(ms) if (1..=max).contains(ms) => Ok(*ms),
        _ => Err(format!(
            "timeout_ms must be a whole number of milliseconds from 1 to {max}, not {v}"
        )),
    }
}

/// How a graceful stop asks the guest to shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopMethod {
    /// The ACPI fixed power button.
    AcpiPowerButton,
    /// Ctrl-Alt-Del on the i8042 keyboard.
    CtrlAltDel,
}

impl fmt::Display for StopMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopMethod::AcpiPowerButton => "acpi-power-button",
            StopMethod::CtrlAltDel => "ctrl-alt-del",
        })
    }
}

/// The answer to `PUT /vm/stop`, given at once (the VM stops afterwards).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum StopAnswer {
    Hard {
        state: VmState,
    },
    Graceful {
        method: StopMethod,
        timeout_ms: u64,
        /// False when the keyboard took no keys (its driver turned scanning off, or
        /// it is full); the timeout applies anyway.
        delivered: bool,
        state: VmState,
    },
}

/// Who ended a graceful stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoppedBy {
    /// The guest shut down before the timeout.
    Guest,
    /// The timeout passed and the VM was stopped hard.
    Timeout,
}

/// What `ferrite stop --json` prints (the CLI's own report, not an API body); the
/// graceful fields are absent after a hard stop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopReport {
    pub name: String,
    pub mode: StopMode,
    pub elapsed_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<StopMethod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_by: Option<StoppedBy>,
}

/// General registers, as `0x` hex strings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GeneralRegisters {
    pub rax: String,
    pub rbx: String,
    pub rcx: String,
    pub rdx: String,
    pub rsi: String,
    pub rdi: String,
    pub rsp: String,
    pub rbp: String,
    pub r8: String,
    pub r9: String,
    pub r10: String,
    pub r11: String,
    pub r12: String,
    pub r13: String,
    pub r14: String,
    pub r15: String,
    pub rip: String,
    pub rflags: String,
}

impl GeneralRegisters {
    /// `(name, value)` in the usual order.
    pub fn list(&self) -> [(&'static str, &str); 18] {
        [
            ("rax", &self.rax),
            ("rbx", &self.rbx),
            ("rcx", &self.rcx),
            ("rdx", &self.rdx),
            ("rsi", &self.rsi),
            ("rdi", &self.rdi),
            ("rsp", &self.rsp),
            ("rbp", &self.rbp),
            ("r8", &self.r8),
            ("r9", &self.r9),
            ("r10", &self.r10),
            ("r11", &self.r11),
            ("r12", &self.r12),
            ("r13", &self.r13),
            ("r14", &self.r14),
            ("r15", &self.r15),
            ("rip", &self.rip),
            ("rflags", &self.rflags),
        ]
    }
}

/// One segment register.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub selector: u16,
    /// `0x` hex.
    pub base: String,
    pub limit: u32,
    #[serde(rename = "type")]
    pub type_: u8,
    pub dpl: u8,
    pub present: u8,
    pub l: u8,
    pub db: u8,
}

/// The segment registers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRegisters {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
}

impl SegmentRegisters {
    pub fn list(&self) -> [(&'static str, &Segment); 8] {
        [
            ("cs", &self.cs),
            ("ds", &self.ds),
            ("es", &self.es),
            ("fs", &self.fs),
            ("gs", &self.gs),
            ("ss", &self.ss),
            ("tr", &self.tr),
            ("ldt", &self.ldt),
        ]
    }
}

/// Control registers, EFER and the APIC base, as `0x` hex strings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlRegisters {
    pub cr0: String,
    pub cr2: String,
    pub cr3: String,
    pub cr4: String,
    pub cr8: String,
    pub efer: String,
    pub apic_base: String,
}

impl ControlRegisters {
    pub fn list(&self) -> [(&'static str, &str); 7] {
        [
            ("cr0", &self.cr0),
            ("cr2", &self.cr2),
            ("cr3", &self.cr3),
            ("cr4", &self.cr4),
            ("cr8", &self.cr8),
            ("efer", &self.efer),
            ("apic_base", &self.apic_base),
        ]
    }
}

/// `GET /vm/vcpus/N/registers`: one paused vCPU's registers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistersAnswer {
    pub vcpu: usize,
    pub general: GeneralRegisters,
    pub segment: SegmentRegisters,
    pub control: ControlRegisters,
    /// MSR number (`0x` hex) to value (`0x` hex), for the MSRs KVM could read.
    pub msrs: BTreeMap<String, String>,
    /// The requested MSRs KVM did not return (`0x` hex).
    pub unreadable_msrs: Vec<String>,
}

/// What `ferrite debug --json` prints: every vCPU's registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugReport {
    pub name: String,
    pub vcpus: Vec<RegistersAnswer>,
}

/// What `PUT /vm/nmi` accepts.
const NMI_EXPECTED: &str = "expected an empty body or {} (every vCPU) or {\"vcpu\": N} (one)";

/// `PUT /vm/nmi`: an empty body or `{}` for every vCPU, `{"vcpu": N}` for one. Any
/// other body (another field, a vCPU that is not a whole number, a non-object) is
/// refused, so a malformed request never reaches every vCPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NmiRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<u64>,
}

impl NmiRequest {
    /// An NMI request's body (empty or whitespace: every vCPU).
    pub fn parse(body: &[u8]) -> Result<NmiRequest, String> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(NmiRequest::default());
        }
        parse_body(body)
    }
}

impl<'de> Deserialize<'de> for NmiRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ObjectVisitor {
            not_object: NMI_NOT_OBJECT,
            null: None,
            fields: |m: &mut NextField<'_>| {
                let mut r = NmiRequest::default();
                while let Some((k, v)) = m() {
                    if k != "vcpu" {
                        return Err(format!("unknown field '{k}'; {NMI_EXPECTED}"));
                    }
                    r.vcpu = Some(match v {
                        Shown::U64(i) => i,
                        other => {
                            return Err(format!(
                                "vcpu must be a vCPU index (a whole number from 0), not {other}"
                            ))
                        }
                    });
                }
                Ok(r)
            },
        })
    }
}

/// "the body must be a JSON object; " and [`NMI_EXPECTED`].
const NMI_NOT_OBJECT: &str =
    "the body must be a JSON object; expected an empty body or {} (every vCPU) or {\"vcpu\": N} (one)";

/// `PUT /vm/snapshot`: `{"dir": "/path"}`, where the snapshot goes (created if missing;
/// refused if it already holds one). The VM must be paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub dir: std::path::PathBuf,
}

impl SnapshotRequest {
    pub fn parse(body: &[u8]) -> Result<SnapshotRequest, String> {
        let r: SnapshotRequest = parse_body(body)?;
        if r.dir.as_os_str().is_empty() {
            return Err("dir must name a directory, not be empty".into());
        }
        Ok(r)
    }
}

/// `PUT /vm/snapshot`'s answer: what was written and how long it took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotAnswer {
    pub dir: String,
    /// The state file's size.
    pub state_bytes: u64,
    /// The memory file's length (all of guest RAM).
    pub memory_bytes: u64,
    /// Bytes of it written (the rest, zero pages, are holes).
    pub memory_written_bytes: u64,
    /// From the request to the state file in place.
    pub took_us: u64,
}

/// `PUT /vm/nmi`'s answer: how many vCPUs got one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NmiAnswer {
    pub nmi: usize,
}

/// What `PUT /vm/balloon` accepts.
const BALLOON_EXPECTED: &str =
    "expected {\"target\": BYTES or \"SIZE\"} (e.g. \"64M\"; 0 empties the balloon)";

/// The balloon target: bytes, or a size string ("64M"; a plain number string is MiB,
/// as on the command line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum BalloonTarget {
    Bytes(u64),
    Size(String),
}

impl BalloonTarget {
    /// The target in bytes.
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            BalloonTarget::Bytes(b) => Ok(*b),
            BalloonTarget::Size(s) => crate::size::parse(s),
        }
    }
}

/// `PUT /vm/balloon`: `{"target": BYTES or "SIZE"}`; other fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BalloonRequest {
    pub target: BalloonTarget,
}

impl BalloonRequest {
    /// A balloon request's body (it needs one).
    pub fn parse(body: &[u8]) -> Result<BalloonRequest, String> {
        if body.is_empty() {
            return Err(BALLOON_EXPECTED.into());
        }
        parse_body(body)
    }
}

impl<'de> Deserialize<'de> for BalloonRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ObjectVisitor {
            not_object: BALLOON_EXPECTED,
            null: None,
            fields: |m: &mut NextField<'_>| {
                let mut target = None;
                while let Some((k, v)) = m() {
                    if k != "target" {
                        continue;
                    }
                    target = Some(match v {
                        Shown::U64(n) => BalloonTarget::Bytes(n),
                        Shown::Str(s) => BalloonTarget::Size(s),
                        n @ (Shown::I64(_) | Shown::F64(_)) => {
                            return Err(format!("target {n} is not a byte count"))
                        }
                        _ => return Err(BALLOON_EXPECTED.into()),
                    });
                }
                target
                    .map(|target| BalloonRequest { target })
                    .ok_or_else(|| BALLOON_EXPECTED.into())
            },
        })
    }
}

/// `GET` and `PUT /vm/balloon`; the balloon's part of `GET /vm/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonAnswer {
    pub target_bytes: u64,
    pub actual_bytes: u64,
    pub target_pages: u32,
    pub actual_pages: u32,
    pub ram_bytes: u64,
    pub driver_active: bool,
    pub deflate_on_oom: bool,
    /// The statistics queue is offered.
    pub statistics: bool,
    pub free_page_reporting: bool,
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    pub reported_bytes: u64,
    pub ignored_pfns: u64,
    pub discard_errors: u64,
    /// The guest's last statistics by virtio name (`free_memory`, `tag_N` for tags
    /// without a name); null before the first.
    pub guest_stats: Option<BTreeMap<String, u64>>,
    pub guest_stats_age_ms: Option<u64>,
}

/// Reads and writes of one device's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceExitCounts {
    pub reads: u64,
    pub writes: u64,
}

/// One KVM statistic: a value, or a histogram's buckets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum KvmStat {
    One(u64),
    Many(Vec<u64>),
}

/// KVM's binary statistics by KVM's names, or why the host offers none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum KvmStats {
    Unavailable(Unavailable),
    Stats(BTreeMap<String, KvmStat>),
}

/// `{"unavailable": reason}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unavailable {
    pub unavailable: String,
}

/// One vCPU's part of `GET /vm/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuStats {
    pub vcpu: usize,
    /// Exits by reason.
    pub exits: BTreeMap<String, u64>,
    /// Port I/O exits by device (devices with none left out).
    pub pio_by_device: BTreeMap<String, DeviceExitCounts>,
    /// MMIO exits by device (devices with none left out).
    pub mmio_by_device: BTreeMap<String, DeviceExitCounts>,
    pub userspace_ns: u64,
    pub kvm: KvmStats,
}

/// Host memory figures, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryUsage {
    /// Guest RAM size.
    pub guest_ram: u64,
    /// Resident host pages of guest RAM.
    pub guest_rss: u64,
    /// The whole process's resident set.
    pub process_rss: u64,
    /// Ferrite's own memory: the process RSS minus guest RAM's.
    pub vmm_rss: u64,
    /// Estimated host kernel memory KVM holds for the memory slots.
    pub kvm_metadata_estimate: u64,
}

/// The memory part of `GET /vm/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MemoryFigures {
    Unavailable(Unavailable),
    Usage(MemoryUsage),
}

/// `GET /vm/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsAnswer {
    pub name: String,
    pub state: VmState,
    pub vcpus: Vec<VcpuStats>,
    pub kvm: KvmStats,
    /// Null when the VM does not report its memory.
    pub memory: Option<MemoryFigures>,
    /// Null when the VM has no balloon.
    pub balloon: Option<BalloonAnswer>,
}

/// Decodes a request body as `T`. A body that is not JSON is refused with "request
/// body is not JSON: ..." and where it broke; one `T` refuses, with `T`'s message alone
/// (it names the field and the value).
pub fn parse_body<T: de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            let msg = e.to_string();
            let at = format!(" at line {} column {}", e.line(), e.column());
            match msg.strip_suffix(&at) {
                Some(m) => m.to_owned(),
                None => msg,
            }
        }
        _ => format!("request body is not JSON: {e}"),
    })
}

/// A request field's value as the checks see it: a scalar, or only the kind of a
/// compound value; shown in messages as JSON.
#[derive(Debug, Clone, PartialEq)]
enum Shown {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(String),
    Array,
    Object,
}

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shown::Null => f.write_str("null"),
            Shown::Bool(b) => write!(f, "{b}"),
            Shown::U64(n) => write!(f, "{n}"),
            Shown::I64(n) => write!(f, "{n}"),
            Shown::F64(x) => match serde_json::Number::from_f64(*x) {
                Some(n) => write!(f, "{n}"),
                None => write!(f, "{x}"),
            },
            Shown::Str(s) => match serde_json::to_string(s) {
                Ok(q) => f.write_str(&q),
                Err(_) => write!(f, "{s:?}"),
            },
            Shown::Array => f.write_str("an array"),
            Shown::Object => f.write_str("an object"),
        }
    }
}

impl<'de> Deserialize<'de> for Shown {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Shown;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Shown, E> {
                Ok(Shown::Null)
            }
            fn visit_none<E>(self) -> Result<Shown, E> {
                Ok(Shown::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Shown, E> {
                Ok(Shown::Bool(b))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Shown, E> {
                Ok(Shown::U64(n))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Shown, E> {
                Ok(match u64::try_from(n) {
                    Ok(u) => Shown::U64(u),
                    Err(_) => Shown::I64(n),
                })
            }
            fn visit_f64<E>(self, x: f64) -> Result<Shown, E> {
                Ok(Shown::F64(x))
            }
            fn visit_str<E>(self, s: &str) -> Result<Shown, E> {
                Ok(Shown::Str(s.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Shown, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Shown::Array)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Shown, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Shown::Object)
            }
        }
        d.deserialize_any(V)
    }
}

/// A request body that must be a JSON object: `fields` checks its `(key, value)`
/// pairs in order and builds the request; any other JSON value is refused with
/// `not_object` (or is `null`'s meaning, when it has one).
struct ObjectVisitor<T, F> {
    not_object: &'static str,
    null: Option<T>,
    fields: F,
}

/// The next `(key, value)` of the object, `None` at its end (or when it broke).
type NextField<'a> = dyn FnMut() -> Option<(String, Shown)> + 'a;

impl<T, F> ObjectVisitor<T, F> {
    fn refuse<E: de::Error>(self) -> Result<T, E> {
        Err(E::custom(self.not_object))
    }
}

impl<'de, T, F> Visitor<'de> for ObjectVisitor<T, F>
where
    F: FnOnce(&mut NextField<'_>) -> Result<T, String>,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<T, A::Error> {
        let mut failed: Option<A::Error> = None;
        let mut next = || match a.next_key::<String>() {
            Ok(None) => None,
            Ok(Some(k)) => match a.next_value::<Shown>() {
                Ok(v) => Some((k, v)),
                Err(e) => {
                    failed = Some(e);
                    None
                }
            },
            Err(e) => {
                failed = Some(e);
                None
            }
        };
        let r = (self.fields)(&mut next);
        if let Some(e) = failed {
            return Err(e);
        }
        r.map_err(de::Error::custom)
    }

    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        match self.null {
            Some(v) => Ok(v),
            None => Err(E::custom(self.not_object)),
        }
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<T, E> {
        self.refuse()
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<T, E> {
        self.refuse()
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<T, E> {
        self.refuse()
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
        self.refuse()
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<T, E> {
        self.refuse()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        self.refuse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `v` encodes to `wire` (as JSON, key order aside) and decodes back to itself.
    fn round_trip<T>(v: &T, wire: &str)
    where
        T: Serialize + de::DeserializeOwned + PartialEq + fmt::Debug,
    {
        let encoded = serde_json::to_string(v).unwrap();
        let as_json = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        assert_eq!(as_json(&encoded), as_json(wire), "{encoded}");
        assert_eq!(
            &serde_json::from_str::<T>(&encoded).unwrap(),
            v,
            "{encoded}"
        );
        assert_eq!(&serde_json::from_str::<T>(wire).unwrap(), v, "{wire}");
    }

    fn segment(selector: u16) -> Segment {
        Segment {
            selector,
            base: "0x0".into(),
            limit: 0xffff,
            type_: 3,
            dpl: 0,
            present: 1,
            l: 0,
            db: 0,
        }
    }

    #[test]
    fn every_body_round_trips_in_todays_wire_format() {
        round_trip(
            &ErrorBody {
                error: "no such endpoint: /x".into(),
            },
            r#"{"error":"no such endpoint: /x"}"#,
        );
        round_trip(
            &InfoAnswer {
                name: "vm1".into(),
                pid: 42,
                state: VmState::Paused,
                vcpus: 2,
                memory_bytes: 128 << 20,
                memory_backing: "anon".into(),
                hugepages: "off".into(),
                memory_prealloc: false,
                uptime_ms: 1500,
                kernel: "/k".into(),
                machine: "pc".into(),
                devices: vec!["serial".into()],
            },
            r#"{"name":"vm1","pid":42,"state":"paused","vcpus":2,"memory_bytes":134217728,
                "memory_backing":"anon","hugepages":"off","memory_prealloc":false,
                "uptime_ms":1500,"kernel":"/k","machine":"pc","devices":["serial"]}"#,
        );
        round_trip(
            &StateAnswer {
                state_before: VmState::Running,
                state: VmState::Paused,
            },
            r#"{"state_before":"running","state":"paused"}"#,
        );
        round_trip(&StopRequest::default(), "{}");
        round_trip(
            &StopRequest {
                mode: Some(StopMode::Hard),
                timeout_ms: None,
            },
            r#"{"mode":"hard"}"#,
        );
        round_trip(
            &StopRequest {
                mode: Some(StopMode::Graceful),
                timeout_ms: Some(1500),
            },
            r#"{"mode":"graceful","timeout_ms":1500}"#,
        );
        round_trip(
            &StopAnswer::Hard {
                state: VmState::Stopping,
            },
            r#"{"mode":"hard","state":"stopping"}"#,
        );
        round_trip(
            &StopAnswer::Graceful {
                method: StopMethod::AcpiPowerButton,
                timeout_ms: 30000,
                delivered: true,
                state: VmState::Running,
            },
            r#"{"mode":"graceful","method":"acpi-power-button","timeout_ms":30000,
                "delivered":true,"state":"running"}"#,
        );
        round_trip(
            &StopReport {
                name: "vm1".into(),
                mode: StopMode::Graceful,
                elapsed_ms: 1600,
                method: Some(StopMethod::CtrlAltDel),
                timeout_ms: Some(1500),
                delivered: Some(false),
                stopped_by: Some(StoppedBy::Timeout),
            },
            r#"{"name":"vm1","mode":"graceful","elapsed_ms":1600,"method":"ctrl-alt-del",
                "timeout_ms":1500,"delivered":false,"stopped_by":"timeout"}"#,
        );
        round_trip(
            &StopReport {
                name: "vm1".into(),
                mode: StopMode::Hard,
                elapsed_ms: 3,
                method: None,
                timeout_ms: None,
                delivered: None,
                stopped_by: None,
            },
            r#"{"name":"vm1","mode":"hard","elapsed_ms":3}"#,
        );
        let mut regs = RegistersAnswer {
            vcpu: 1,
            ..Default::default()
        };
        regs.general.rip = "0xfff0".into();
        regs.segment.cs = segment(0xf000);
        regs.control.efer = "0x500".into();
        regs.msrs.insert("0x10".into(), "0x1234".into());
        regs.unreadable_msrs.push("0x4b564d02".into());
        let seg0 =
            r#"{"selector":0,"base":"","limit":0,"type":0,"dpl":0,"present":0,"l":0,"db":0}"#;
        let wire = format!(
            r#"{{"vcpu":1,
                "general":{{"rax":"","rbx":"","rcx":"","rdx":"","rsi":"","rdi":"","rsp":"",
                    "rbp":"","r8":"","r9":"","r10":"","r11":"","r12":"","r13":"","r14":"",
                    "r15":"","rip":"0xfff0","rflags":""}},
                "segment":{{"cs":{{"selector":61440,"base":"0x0","limit":65535,"type":3,
                    "dpl":0,"present":1,"l":0,"db":0}},"ds":{seg0},"es":{seg0},"fs":{seg0},
                    "gs":{seg0},"ss":{seg0},"tr":{seg0},"ldt":{seg0}}},
                "control":{{"cr0":"","cr2":"","cr3":"","cr4":"","cr8":"","efer":"0x500",
                    "apic_base":""}},
                "msrs":{{"0x10":"0x1234"}},"unreadable_msrs":["0x4b564d02"]}}"#
        );
        round_trip(&regs, &wire);
        round_trip(
            &DebugReport {
                name: "vm1".into(),
                vcpus: vec![regs.clone()],
            },
            &format!(r#"{{"name":"vm1","vcpus":[{wire}]}}"#),
        );
        round_trip(&NmiRequest::default(), "{}");
        round_trip(&NmiRequest { vcpu: Some(1) }, r#"{"vcpu":1}"#);
        round_trip(&NmiAnswer { nmi: 2 }, r#"{"nmi":2}"#);
        round_trip(
            &SnapshotRequest {
                dir: "/tmp/s".into(),
            },
            r#"{"dir":"/tmp/s"}"#,
        );
        assert!(SnapshotRequest::parse(br#"{"dir":""}"#).is_err());
        assert!(SnapshotRequest::parse(br#"{"dir":"/a","x":1}"#).is_err());
        assert!(SnapshotRequest::parse(b"").is_err());
        round_trip(
            &BalloonRequest {
                target: BalloonTarget::Bytes(1 << 20),
            },
            r#"{"target":1048576}"#,
        );
        round_trip(
            &BalloonRequest {
                target: BalloonTarget::Size("64M".into()),
            },
            r#"{"target":"64M"}"#,
        );
        let balloon = BalloonAnswer {
            target_bytes: 64 << 20,
            actual_bytes: 0,
            target_pages: 16384,
            actual_pages: 0,
            ram_bytes: 256 << 20,
            driver_active: true,
            deflate_on_oom: false,
            statistics: true,
            free_page_reporting: false,
            inflated_pages: 1,
            deflated_pages: 2,
            reported_bytes: 3,
            ignored_pfns: 4,
            discard_errors: 5,
            guest_stats: Some(BTreeMap::from([("free_memory".into(), 1 << 20)])),
            guest_stats_age_ms: Some(7),
        };
        let balloon_wire = r#"{"target_bytes":67108864,"actual_bytes":0,"target_pages":16384,
            "actual_pages":0,"ram_bytes":268435456,"driver_active":true,"deflate_on_oom":false,
            "statistics":true,"free_page_reporting":false,"inflated_pages":1,"deflated_pages":2,
            "reported_bytes":3,"ignored_pfns":4,"discard_errors":5,
            "guest_stats":{"free_memory":1048576},"guest_stats_age_ms":7}"#;
        round_trip(&balloon, balloon_wire);
        let no_stats = BalloonAnswer {
            guest_stats: None,
            guest_stats_age_ms: None,
            ..balloon.clone()
        };
        let no_stats_wire = balloon_wire
            .replace(r#"{"free_memory":1048576}"#, "null")
            .replace(r#""guest_stats_age_ms":7"#, r#""guest_stats_age_ms":null"#);
        round_trip(&no_stats, &no_stats_wire);
        let stats = StatsAnswer {
            name: "vm1".into(),
            state: VmState::Running,
            vcpus: vec![VcpuStats {
                vcpu: 0,
                exits: BTreeMap::from([("hlt".into(), 3), ("pio_out".into(), 0)]),
                pio_by_device: BTreeMap::from([(
                    "serial".into(),
                    DeviceExitCounts {
                        reads: 1,
                        writes: 2,
                    },
                )]),
                mmio_by_device: BTreeMap::new(),
                userspace_ns: 1000,
                kvm: KvmStats::Stats(BTreeMap::from([
                    ("exits".into(), KvmStat::One(9)),
                    ("halt_poll_hist".into(), KvmStat::Many(vec![1, 2])),
                ])),
            }],
            kvm: KvmStats::Unavailable(Unavailable {
                unavailable: "no binary stats".into(),
            }),
            memory: Some(MemoryFigures::Usage(MemoryUsage {
                guest_ram: 1,
                guest_rss: 2,
                process_rss: 3,
                vmm_rss: 4,
                kvm_metadata_estimate: 5,
            })),
            balloon: Some(balloon),
        };
        round_trip(
            &stats,
            &format!(
                r#"{{"name":"vm1","state":"running",
                "vcpus":[{{"vcpu":0,"exits":{{"hlt":3,"pio_out":0}},
                    "pio_by_device":{{"serial":{{"reads":1,"writes":2}}}},"mmio_by_device":{{}},
                    "userspace_ns":1000,"kvm":{{"exits":9,"halt_poll_hist":[1,2]}}}}],
                "kvm":{{"unavailable":"no binary stats"}},
                "memory":{{"guest_ram":1,"guest_rss":2,"process_rss":3,"vmm_rss":4,
                    "kvm_metadata_estimate":5}},
                "balloon":{balloon_wire}}}"#
            ),
        );
        round_trip(
            &StatsAnswer {
                vcpus: Vec::new(),
                kvm: KvmStats::Stats(BTreeMap::new()),
                memory: Some(MemoryFigures::Unavailable(Unavailable {
                    unavailable: "cannot read /proc/self: x".into(),
                })),
                balloon: None,
                ..stats.clone()
            },
            r#"{"name":"vm1","state":"running","vcpus":[],"kvm":{},
                "memory":{"unavailable":"cannot read /proc/self: x"},"balloon":null}"#,
        );
        round_trip(
            &StatsAnswer {
                vcpus: Vec::new(),
                memory: None,
                balloon: None,
                ..stats
            },
            r#"{"name":"vm1","state":"running","vcpus":[],
                "kvm":{"unavailable":"no binary stats"},"memory":null,"balloon":null}"#,
        );
    }

    /// Answers from a newer VM with fields this CLI does not know still parse.
    #[test]
    fn answers_accept_unknown_fields() {
        let v: StateAnswer =
            serde_json::from_str(r#"{"state_before":"paused","state":"running","new":1}"#).unwrap();
        assert_eq!(v.state, VmState::Running);
    }

    /// The requests' messages, as the API gave them before the bodies were typed.
    #[test]
    fn malformed_requests_are_refused_with_todays_messages() {
        let max = crate::graceful::MAX_TIMEOUT.as_millis();
        let timeout = |v: &str| {
            format!("timeout_ms must be a whole number of milliseconds from 1 to {max}, not {v}")
        };
        for (body, want) in [
            (
                r#"{"mode":"hard","timeout_ms":5}"#,
                "timeout_ms applies to graceful stops only".to_owned(),
            ),
            (
                r#"{"mode":"soft"}"#,
                r#"stop mode "soft" is not supported (use "graceful" or "hard")"#.to_owned(),
            ),
            (
                r#"{"mode":3}"#,
                r#"stop mode 3 is not supported (use "graceful" or "hard")"#.to_owned(),
            ),
            (
                r#"{"mode":null}"#,
                r#"stop mode null is not supported (use "graceful" or "hard")"#.to_owned(),
            ),
            (r#"{"timeout_ms":0}"#, timeout("0")),
            (r#"{"timeout_ms":-1}"#, timeout("-1")),
            (r#"{"timeout_ms":1.5}"#, timeout("1.5")),
            (r#"{"timeout_ms":"30"}"#, timeout(r#""30""#)),
            (r#"{"timeout_ms":99999999999}"#, timeout("99999999999")),
            (
                r#"{"timeout":30}"#,
                r#"unknown field 'timeout' (expected "mode", "timeout_ms")"#.to_owned(),
            ),
            ("[1]", "the body must be a JSON object".to_owned()),
            (r#""hard""#, "the body must be a JSON object".to_owned()),
            ("7", "the body must be a JSON object".to_owned()),
        ] {
            assert_eq!(StopRequest::parse(body.as_bytes()), Err(want), "{body}");
        }
        let e = StopRequest::parse(b"{").unwrap_err();
        assert!(e.starts_with("request body is not JSON: "), "{e}");
        assert_eq!(StopRequest::parse(b"null"), Ok(StopRequest::default()));
        assert_eq!(StopRequest::parse(b""), Ok(StopRequest::default()));

        let vcpu = |v: &str| format!("vcpu must be a vCPU index (a whole number from 0), not {v}");
        let not_object = format!("the body must be a JSON object; {NMI_EXPECTED}");
        for (body, want) in [
            (r#"{"vcpu":"1"}"#, vcpu(r#""1""#)),
            (r#"{"vcpu":-1}"#, vcpu("-1")),
            (r#"{"vcpu":1.5}"#, vcpu("1.5")),
            (r#"{"vcpu":null}"#, vcpu("null")),
            (r#"{"vcpu":[0]}"#, vcpu("an array")),
            (
                r#"{"cpu":1}"#,
                format!("unknown field 'cpu'; {NMI_EXPECTED}"),
            ),
            (
                r#"{"vcpu":1,"x":2}"#,
                format!("unknown field 'x'; {NMI_EXPECTED}"),
            ),
            ("[1]", not_object.clone()),
            ("null", not_object.clone()),
            ("1", not_object.clone()),
            (r#""all""#, not_object),
        ] {
            assert_eq!(NmiRequest::parse(body.as_bytes()), Err(want), "{body}");
        }
        let e = NmiRequest::parse(b"{").unwrap_err();
        assert!(e.starts_with("request body is not JSON: "), "{e}");
        for (body, vcpu) in [
            ("", None),
            (" \r\n", None),
            ("{}", None),
            (r#"{"vcpu":0}"#, Some(0)),
        ] {
            assert_eq!(NmiRequest::parse(body.as_bytes()), Ok(NmiRequest { vcpu }));
        }

        for (body, want) in [
            (r#"{"target":-1}"#, "target -1 is not a byte count"),
            (r#"{"target":1.5}"#, "target 1.5 is not a byte count"),
            ("{}", BALLOON_EXPECTED),
            ("", BALLOON_EXPECTED),
            ("[1]", BALLOON_EXPECTED),
            ("null", BALLOON_EXPECTED),
            (r#"{"target":null}"#, BALLOON_EXPECTED),
            (r#"{"target":true}"#, BALLOON_EXPECTED),
            (r#"{"target":{"bytes":1}}"#, BALLOON_EXPECTED),
        ] {
            assert_eq!(
                BalloonRequest::parse(body.as_bytes()),
                Err(want.to_owned()),
                "{body}"
            );
        }
        let e = BalloonRequest::parse(b"nope").unwrap_err();
        assert!(e.starts_with("request body is not JSON: "), "{e}");
        // Fields other than target were ignored before and still are.
        let r = BalloonRequest::parse(br#"{"x":1,"target":"64M"}"#).unwrap();
        assert_eq!(r.target.bytes(), Ok(64 << 20));
        assert!(BalloonRequest::parse(br#"{"target":"x"}"#)
            .unwrap()
            .target
            .bytes()
            .is_err());
    }
}
