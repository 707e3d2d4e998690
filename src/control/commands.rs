//! The CLI's control commands (`ferrite list|pause|resume|stop|debug|stat|balloon`): find the
//! VM's socket (in a run directory that passes [`paths::check_run_dir`]), send one
//! request, print the answer for people or, with `--json`, for scripts.
//!
//! `ferrite list` asks every VM at once, each on a thread of its own, and waits at most
//! [`LIST_TIMEOUT`] (plus a little slack) for all of them; a VM left out is named in a
//! warning that says why (no answer in time, permission denied, a bad reply, ...).
#![forbid(unsafe_code)]

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::client::{self, Answer, ClientError};
use super::paths;
use super::protocol::{
    BalloonAnswer, DebugReport, InfoAnswer, KvmStat, KvmStats, MemoryFigures, RegistersAnswer,
    StateAnswer, StatsAnswer, StopAnswer, StopMode, StopReport, StopRequest, StoppedBy, VmState,
};

const TIMEOUT: Duration = Duration::from_secs(10);

/// How long `ferrite list` waits for the VMs' answers (all asked at once).
pub const LIST_TIMEOUT: Duration = Duration::from_secs(1);
/// Extra time `ferrite list` waits for a VM whose `connect` itself blocks (a listener
/// that has stopped accepting), which the request's deadline does not bound.
const LIST_SLACK: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Name(#[from] paths::Error),
    #[error("no VM named '{name}' (no control socket {path})")]
    NoSuchVm { name: String, path: PathBuf },
    #[error("VM '{name}' is not running (stale control socket {path}, now removed)")]
    Dead { name: String, path: PathBuf },
    #[error("VM '{name}'")]
    Client {
        name: String,
        #[source]
        source: Box<ClientError>,
    },
    #[error("VM '{name}' refused {what}: {message} (HTTP {status})")]
    Refused {
        name: String,
        what: String,
        status: u16,
        message: String,
    },
    #[error("VM '{name}' is still running {} after the stop request", crate::graceful::secs(*.waited))]
    StillRunning { name: String, waited: Duration },
    #[error("the MMDS document for VM '{name}'")]
    Document {
        name: String,
        #[source]
        source: crate::mmds::Error,
    },
    #[error("the MMDS document {path} is {size} bytes of JSON; the control socket takes at most {limit}")]
    DocumentTooBig {
        path: String,
        size: usize,
        limit: usize,
    },
    #[error("cannot list {dir}")]
    List {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The JSON document of `ferrite mmds NAME --put/--patch FILE` (`-`: standard input),
/// read up to a bound and refused here when its compact form exceeds the control
/// socket's body limit (the VM would refuse it too, less clearly).
pub fn mmds_document(name: &str, file: &Path) -> Result<serde_json::Value, Error> {
    let limit = super::http::MAX_BODY;
    let path = if file == Path::new("-") {
        Path::new("/dev/stdin")
    } else {
        file
    };
    let v = crate::mmds::read_metadata(path, crate::mmds::metadata_read_limit(limit)).map_err(
        |source| Error::Document {
            name: name.to_owned(),
            source,
        },
    )?;
    let size = serde_json::to_vec(&v).map_or(usize::MAX, |b| b.len());
    if size > limit {
        return Err(Error::DocumentTooBig {
            path: path.display().to_string(),
            size,
            limit,
        });
    }
    Ok(v)
}

/// Where VM `name`'s socket is (`socket` overrides).
pub fn socket_for(name: &str, socket: Option<&Path>) -> Result<PathBuf, Error> {
    if let Some(s) = socket {
        return Ok(s.to_path_buf());
    }
    paths::validate_name(name)?;
    Ok(paths::socket_path(&paths::client_run_dir()?, name))
}

/// One request to VM `name` without a body; a 2xx answer's body as `T`, or a clear
/// error (one that names the request when the answer is not a `T`).
pub fn call<T: DeserializeOwned>(
    name: &str,
    socket: &Path,
    method: &str,
    path: &str,
) -> Result<T, Error> {
    call_with(name, socket, method, path, client::NO_BODY)
}

/// One request to VM `name` with `body` (as JSON, none for `None`); as [`call`].
pub fn call_with<B: Serialize + ?Sized, T: DeserializeOwned>(
    name: &str,
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&B>,
) -> Result<T, Error> {
    call_with_timeout(name, socket, method, path, body, TIMEOUT)
}

/// How long `ferrite snapshot` waits for the answer: the VM writes all of guest RAM
/// before it answers (seconds for a few hundred MiB on a slow or nested host).
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// [`call_with`], waiting up to `timeout` for the answer.
pub fn call_with_timeout<B: Serialize + ?Sized, T: DeserializeOwned>(
    name: &str,
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&B>,
    timeout: Duration,
) -> Result<T, Error> {
    match client::call(socket, method, path, body, timeout) {
        Ok(Answer::Ok(v)) => Ok(v),
        Ok(Answer::Refused { status, message }) => Err(Error::Refused {
            name: name.to_owned(),
            what: format!("{method} {path}"),
            status,
            message,
        }),
        Err(ClientError::NoSocket { .. }) => Err(Error::NoSuchVm {
            name: name.to_owned(),
            path: socket.to_path_buf(),
        }),
        // Only a socket nobody listens on is removed, never some other file (connecting
        // to a regular file or a device is refused in the same way).
        Err(ClientError::Stale { .. }) => match paths::remove_stale_socket(socket) {
            Ok(_) => Err(Error::Dead {
                name: name.to_owned(),
                path: socket.to_path_buf(),
            }),
            Err(e) => Err(Error::Name(e)),
        },
        Err(source) => Err(Error::Client {
            name: name.to_owned(),
            source: Box::new(source),
        }),
    }
}

/// `v` as one line of JSON, for `--json`.
pub fn to_json<T: Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("cannot encode the answer as JSON: {e}"))
}

/// How long a stopped VM may take to tear down (vCPUs 5 s, event loop 2 s, console
/// 1 s, each bounded in `Vm::wait`) before `ferrite stop` gives up waiting.
pub const STOP_SLACK: Duration = Duration::from_secs(10);

/// The VM behind `socket` is gone: its socket removed, or nobody listening on it.
fn gone(socket: &Path) -> bool {
    use std::os::unix::net::UnixStream;
    !socket.exists()
        || matches!(UnixStream::connect(socket), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// `ferrite stop`: a hard stop (`timeout` None) or a graceful one, then waits until
/// the VM is gone (the timeout plus [`STOP_SLACK`]) and says how it ended. A VM
/// gone before the timeout shut itself down; one gone after it was stopped hard.
pub fn stop(name: &str, socket: &Path, graceful: Option<Duration>) -> Result<StopReport, Error> {
    let t0 = Instant::now();
    let body = match graceful {
        None => StopRequest {
            mode: Some(StopMode::Hard),
            timeout_ms: None,
        },
        Some(t) => StopRequest {
            mode: Some(StopMode::Graceful),
            timeout_ms: Some(t.as_millis() as u64),
        },
    };
    let reply: StopAnswer =
        call_with(name, socket, "PUT", "/vm/stop", Some(&body)).map_err(|e| match e {
            Error::Refused {
                name,
                what,
                status: 409,
                message,
            } if graceful.is_some() => Error::Refused {
                name,
                what,
                status: 409,
                message: format!("{message} [`ferrite stop --hard` stops it at once]"),
            },
            e => e,
        })?;
    let limit = graceful.unwrap_or_default() + STOP_SLACK;
    while !gone(socket) {
        if t0.elapsed() > limit {
            return Err(Error::StillRunning {
                name: name.to_owned(),
                waited: t0.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let elapsed = t0.elapsed();
    let mut report = StopReport {
        name: name.to_owned(),
        mode: match reply {
            StopAnswer::Hard { .. } => StopMode::Hard,
            StopAnswer::Graceful { .. } => StopMode::Graceful,
        },
        elapsed_ms: elapsed.as_millis() as u64,
        method: None,
        timeout_ms: None,
        delivered: None,
        stopped_by: None,
    };
    if let StopAnswer::Graceful {
        method, delivered, ..
    } = reply
    {
        if let Some(t) = graceful {
            report.method = Some(method);
            report.timeout_ms = Some(t.as_millis() as u64);
            report.delivered = Some(delivered);
            report.stopped_by = Some(if elapsed < t {
                StoppedBy::Guest
            } else {
                StoppedBy::Timeout
            });
        }
    }
    Ok(report)
}

/// `ferrite stop`'s answer for people.
pub fn stop_text(r: &StopReport) -> String {
    let name = &r.name;
    let secs = |ms: u64| crate::graceful::secs(Duration::from_millis(ms));
    let method = r.method.map_or_else(|| "?".to_owned(), |m| m.to_string());
    match r.stopped_by {
        Some(StoppedBy::Guest) => format!(
            "{name}: guest shut down {} after the graceful stop request ({method})",
            secs(r.elapsed_ms)
        ),
        Some(StoppedBy::Timeout) => format!(
            "{name}: guest did not stop within {} of the graceful stop request ({method}); stopped hard",
            secs(r.timeout_ms.unwrap_or(0))
        ),
        None => format!("{name}: stopped hard"),
    }
}

/// Why `ferrite list` left a VM out, or that it removed its stale socket.
enum Probe {
    Live(InfoAnswer),
    Removed,
    Gone,
    LeftOut(String),
}

/// Asks the VM behind `p` for its info within [`LIST_TIMEOUT`].
fn probe(p: &Path) -> Probe {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_socket() => {}
        Ok(m) => {
            return Probe::LeftOut(format!(
                "{} is a {}, not a socket (left alone)",
                p.display(),
                paths::kind(&m)
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Probe::Gone,
        Err(e) => return Probe::LeftOut(format!("cannot examine {}: {e}", p.display())),
    }
    match client::call(p, "GET", "/vm", client::NO_BODY, LIST_TIMEOUT) {
        Ok(Answer::Ok(v)) => Probe::Live(v),
        Ok(Answer::Refused { status, message }) => {
            Probe::LeftOut(format!("it answered HTTP {status}: {message}"))
        }
        Err(ClientError::NoSocket { .. }) => Probe::Gone,
        Err(ClientError::Stale { .. }) => match paths::remove_stale_socket(p) {
            Ok(_) => Probe::Removed,
            Err(e) => Probe::LeftOut(format!(
                "connection refused (stale socket), not removed: {}",
                crate::errors::chain(&e)
            )),
        },
        Err(ClientError::Timeout { .. }) => Probe::LeftOut(format!(
            "timed out: no answer within {} (busy, hung or not a Ferrite VM)",
            crate::graceful::secs(LIST_TIMEOUT)
        )),
        Err(ClientError::Connect { source, .. })
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            Probe::LeftOut(format!(
                "permission denied connecting to {} (owned by another user?)",
                p.display()
            ))
        }
        Err(ClientError::Malformed { reason, .. }) => {
            Probe::LeftOut(format!("bad reply: {reason}"))
        }
        Err(e) => Probe::LeftOut(crate::errors::chain(&e)),
    }
}

/// Live VMs (stale sockets are removed on the way). All VMs are asked at once; one
/// that has not answered within [`LIST_TIMEOUT`] (plus [`LIST_SLACK`]) is left out
/// with a warning saying why; its thread is abandoned.
pub fn list() -> Result<Vec<InfoAnswer>, Error> {
    let dir = paths::client_run_dir()?;
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(Error::List { dir, source }),
    };
    let mut socks: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    socks.sort();
    let deadline = Instant::now() + LIST_TIMEOUT + LIST_SLACK;
    let (tx, rx) = mpsc::channel();
    let mut results: Vec<Option<Probe>> = Vec::new();
    for (i, p) in socks.iter().enumerate() {
        let (tx, p2) = (tx.clone(), p.clone());
        let spawned = std::thread::Builder::new()
            .name("ferrite-list".into())
            .spawn(move || {
                let _ = tx.send((i, probe(&p2)));
            });
        results.push(match spawned {
            Ok(_) => None,
            Err(e) => Some(Probe::LeftOut(format!(
                "cannot start a thread to ask it: {e}"
            ))),
        });
    }
    drop(tx);
    let mut waiting = results.iter().filter(|r| r.is_none()).count();
    while waiting > 0 {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        match rx.recv_timeout(left) {
            Ok((i, r)) => {
                results[i] = Some(r);
                waiting -= 1;
            }
            Err(_) => break,
        }
    }
    let mut vms = Vec::new();
    for (p, r) in socks.iter().zip(results) {
        let name = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        match r {
            Some(Probe::Live(v)) => vms.push(v),
            Some(Probe::Removed) => {
                log::info!("removed stale control socket {}", p.display())
            }
            Some(Probe::Gone) => {}
            Some(Probe::LeftOut(why)) => log::warn!("VM '{name}' left out: {why}"),
            None => log::warn!(
                "VM '{name}' left out: timed out: no answer within {} (connecting to {} did not complete)",
                crate::graceful::secs(LIST_TIMEOUT),
                p.display()
            ),
        }
    }
    Ok(vms)
}

/// A VM's info as one line.
pub fn info_line(v: &InfoAnswer) -> String {
    format!(
        "{:16} {:9} {:>5} {:>10} {:>9} {}",
        v.name,
        v.state.as_str(),
        v.vcpus,
        format!("{} MiB", v.memory_bytes >> 20),
        format!("{}s", v.uptime_ms / 1000),
        v.pid,
    )
}

pub const LIST_HEADER: &str = "NAME             STATE     VCPUS     MEMORY    UPTIME PID";

/// `ferrite debug`: pauses if needed, dumps every vCPU's registers, resumes if it
/// paused.
pub fn debug(name: &str, socket: &Path) -> Result<DebugReport, Error> {
    let paused: StateAnswer = call(name, socket, "PUT", "/vm/pause")?;
    let was_running = paused.state_before == VmState::Running;
    let info: InfoAnswer = call(name, socket, "GET", "/vm")?;
    let mut dumps = Vec::new();
    let mut failure = None;
    for i in 0..info.vcpus {
        match call::<RegistersAnswer>(name, socket, "GET", &format!("/vm/vcpus/{i}/registers")) {
            Ok(v) => dumps.push(v),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if was_running {
        call::<StateAnswer>(name, socket, "PUT", "/vm/resume")?;
    }
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(DebugReport {
        name: name.to_owned(),
        vcpus: dumps,
    })
}

/// A register dump for people.
pub fn registers_text(v: &DebugReport) -> String {
    let mut out = String::new();
    for d in &v.vcpus {
        out += &format!("vCPU {}:\n", d.vcpu);
        let mut line = String::from(" ");
        for (k, val) in d.general.list() {
            line += &format!(" {k}={val}");
        }
        out += &line;
        out.push('\n');
        let mut line = String::from(" ");
        for (k, val) in d.control.list() {
            line += &format!(" {k}={val}");
        }
        out += &line;
        out.push('\n');
        let mut line = String::from(" ");
        for (k, s) in d.segment.list() {
            line += &format!(" {k}={}:{}", s.selector, s.base);
        }
        out += &line;
        out.push('\n');
        let mut line = String::from("  msrs:");
        for (k, val) in &d.msrs {
            line += &format!(" {k}={val}");
        }
        out += &line;
        out.push('\n');
    }
    out
}

/// The balloon's state for people, on one line (figures in MiB).
/// `ferrite snapshot`'s line.
pub fn snapshot_text(name: &str, s: &crate::control::protocol::SnapshotAnswer) -> String {
    let mib = |v: u64| v as f64 / f64::from(1 << 20);
    format!(
        "{name}: snapshot in {} (state {} bytes, memory {:.0} MiB of which {:.1} MiB written) \
         in {:.1} ms",
        s.dir,
        s.state_bytes,
        mib(s.memory_bytes),
        mib(s.memory_written_bytes),
        s.took_us as f64 / 1000.0
    )
}

pub fn balloon_text(b: &BalloonAnswer) -> String {
    let mib = |v: u64| v as f64 / f64::from(1 << 20);
    let mut s = format!(
        "balloon target {:.1} MiB, actual {:.1} MiB of {:.0} MiB RAM",
        mib(b.target_bytes),
        mib(b.actual_bytes),
        mib(b.ram_bytes)
    );
    if !b.driver_active {
        s += " (no guest driver yet)";
    }
    s += &format!(", reported free {:.1} MiB", mib(b.reported_bytes));
    if let Some(g) = &b.guest_stats {
        let m = |k: &str| g.get(k).map(|v| v >> 20);
        if let (Some(free), Some(total)) = (m("free_memory"), m("total_memory")) {
            s += &format!("; guest free {free} of {total} MiB");
        }
        if let Some(avail) = m("available_memory") {
            s += &format!(", available {avail} MiB");
        }
        for k in [
            "major_faults",
            "minor_faults",
            "swap_in",
            "swap_out",
            "oom_kills",
        ] {
            if let Some(v) = g.get(k) {
                s += &format!(", {k} {v}");
            }
        }
        if let Some(age) = b.guest_stats_age_ms {
            s += &format!(" ({:.1} s ago)", age as f64 / 1000.0);
        }
    }
    s
}

/// The memory line of `ferrite stat`.
fn memory_text(m: Option<&MemoryFigures>) -> String {
    let u = match m {
        None => return String::new(),
        Some(MemoryFigures::Unavailable(u)) => {
            return format!("memory: unavailable ({})\n", u.unavailable)
        }
        Some(MemoryFigures::Usage(u)) => u,
    };
    let mib = |v: u64| v as f64 / (1u64 << 20) as f64;
    format!(
        "memory: guest RAM {} MiB, {:.1} MiB resident; Ferrite itself {:.1} MiB \
         (process RSS {:.1} MiB); KVM slot metadata ~{:.0} MiB (estimate, host kernel)\n",
        u.guest_ram >> 20,
        mib(u.guest_rss),
        mib(u.vmm_rss),
        mib(u.process_rss),
        mib(u.kvm_metadata_estimate),
    )
}

/// A KVM statistic for people: a value, or a histogram's buckets.
fn kvm_stat_text(s: &KvmStat) -> String {
    match s {
        KvmStat::One(v) => v.to_string(),
        KvmStat::Many(v) => format!("{v:?}"),
    }
}

/// Exit statistics for people.
pub fn stats_text(v: &StatsAnswer) -> String {
    let mut out = format!("{} ({})\n", v.name, v.state);
    out += &memory_text(v.memory.as_ref());
    if let Some(b) = &v.balloon {
        out += &balloon_text(b);
        out.push('\n');
    }
    for c in &v.vcpus {
        let mut line = format!("vCPU {}: exits", c.vcpu);
        for (k, val) in c.exits.iter().filter(|(_, v)| **v != 0) {
            line += &format!(" {k} {val}");
        }
        line += &format!("; {:.3} ms in userspace", c.userspace_ns as f64 / 1e6);
        out += &line;
        out.push('\n');
        for (what, m) in [("PIO", &c.pio_by_device), ("MMIO", &c.mmio_by_device)] {
            if !m.is_empty() {
                let list: Vec<String> = m
                    .iter()
                    .map(|(d, n)| format!("{d} {}r/{}w", n.reads, n.writes))
                    .collect();
                out += &format!("  {what}: {}\n", list.join(", "));
            }
        }
        match &c.kvm {
            KvmStats::Unavailable(u) => {
                out += &format!("  KVM statistics: unavailable ({})\n", u.unavailable)
            }
            KvmStats::Stats(k) => {
                let pick: Vec<String> = [
                    "exits",
                    "halt_exits",
                    "io_exits",
                    "mmio_exits",
                    "irq_injections",
                ]
                .iter()
                .filter_map(|n| k.get(*n).map(|v| format!("{n} {}", kvm_stat_text(v))))
                .collect();
                out += &format!("  KVM: {}\n", pick.join(", "));
            }
        }
    }
    out
}
