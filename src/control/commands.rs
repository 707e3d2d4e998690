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

use serde_json::{json, Value};

use super::client::{self, ClientError};
use super::paths;

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
    #[error("cannot list {dir}")]
    List {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where VM `name`'s socket is (`socket` overrides).
pub fn socket_for(name: &str, socket: Option<&Path>) -> Result<PathBuf, Error> {
    if let Some(s) = socket {
        return Ok(s.to_path_buf());
    }
    paths::validate_name(name)?;
    Ok(paths::socket_path(&paths::client_run_dir()?, name))
}

/// One request to VM `name`; a 2xx answer's body, or a clear error.
pub fn call(
    name: &str,
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, Error> {
    match client::request(socket, method, path, body, TIMEOUT) {
        Ok((status, v)) if (200..300).contains(&status) => Ok(v),
        Ok((status, v)) => Err(Error::Refused {
            name: name.to_owned(),
            what: format!("{method} {path}"),
            status,
            message: v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("(no message)")
                .to_owned(),
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
pub fn stop(name: &str, socket: &Path, graceful: Option<Duration>) -> Result<Value, Error> {
    let t0 = Instant::now();
    let body = match graceful {
        None => json!({"mode": "hard"}),
        Some(t) => json!({"mode": "graceful", "timeout_ms": t.as_millis() as u64}),
    };
    let reply = call(name, socket, "PUT", "/vm/stop", Some(&body)).map_err(|e| match e {
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
    let mut v = json!({
        "name": name,
        "mode": reply["mode"],
        "elapsed_ms": elapsed.as_millis() as u64,
    });
    if let Some(t) = graceful {
        v["method"] = reply["method"].clone();
        v["timeout_ms"] = json!(t.as_millis() as u64);
        v["delivered"] = reply["delivered"].clone();
        v["stopped_by"] = json!(if elapsed < t { "guest" } else { "timeout" });
    }
    Ok(v)
}

/// `ferrite stop`'s answer for people.
pub fn stop_text(v: &Value) -> String {
    let name = v["name"].as_str().unwrap_or("?");
    let secs = |ms: &Value| crate::graceful::secs(Duration::from_millis(ms.as_u64().unwrap_or(0)));
    let method = v["method"].as_str().unwrap_or("?");
    match v["stopped_by"].as_str() {
        Some("guest") => format!(
            "{name}: guest shut down {} after the graceful stop request ({method})",
            secs(&v["elapsed_ms"])
        ),
        Some(_) => format!(
            "{name}: guest did not stop within {} of the graceful stop request ({method}); stopped hard",
            secs(&v["timeout_ms"])
        ),
        None => format!("{name}: stopped hard"),
    }
}

/// Why `ferrite list` left a VM out, or that it removed its stale socket.
enum Probe {
    Live(Value),
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
    match client::request(p, "GET", "/vm", None, LIST_TIMEOUT) {
        Ok((status, v)) if (200..300).contains(&status) => Probe::Live(v),
        Ok((status, v)) => Probe::LeftOut(format!(
            "it answered HTTP {status}: {}",
            v.get("error")
                .and_then(Value::as_str)
                .unwrap_or("(no message)")
        )),
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
pub fn list() -> Result<Vec<Value>, Error> {
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

fn mib(v: &Value) -> String {
    v.as_u64()
        .map(|b| format!("{} MiB", b >> 20))
        .unwrap_or_default()
}

/// A VM's info as one line.
pub fn info_line(v: &Value) -> String {
    format!(
        "{:16} {:9} {:>5} {:>10} {:>9} {}",
        v["name"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?"),
        v["vcpus"],
        mib(&v["memory_bytes"]),
        format!("{}s", v["uptime_ms"].as_u64().unwrap_or(0) / 1000),
        v["pid"],
    )
}

pub const LIST_HEADER: &str = "NAME             STATE     VCPUS     MEMORY    UPTIME PID";

/// `ferrite debug`: pauses if needed, dumps every vCPU's registers, resumes if it
/// paused.
pub fn debug(name: &str, socket: &Path) -> Result<Value, Error> {
    let paused = call(name, socket, "PUT", "/vm/pause", None)?;
    let was_running = paused["state_before"] == "running";
    let info = call(name, socket, "GET", "/vm", None)?;
    let n = info["vcpus"].as_u64().unwrap_or(0);
    let mut dumps = Vec::new();
    let mut failure = None;
    for i in 0..n {
        match call(
            name,
            socket,
            "GET",
            &format!("/vm/vcpus/{i}/registers"),
            None,
        ) {
            Ok(v) => dumps.push(v),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if was_running {
        call(name, socket, "PUT", "/vm/resume", None)?;
    }
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(json!({"name": name, "vcpus": dumps}))
}

/// A register dump for people.
pub fn registers_text(v: &Value) -> String {
    let mut out = String::new();
    for d in v["vcpus"].as_array().into_iter().flatten() {
        out += &format!("vCPU {}:\n", d["vcpu"]);
        for group in ["general", "control"] {
            let mut line = String::from(" ");
            if let Some(m) = d[group].as_object() {
                for (k, val) in m {
                    line += &format!(" {k}={}", val.as_str().unwrap_or("?"));
                }
            }
            out += &line;
            out.push('\n');
        }
        if let Some(m) = d["segment"].as_object() {
            let mut line = String::from(" ");
            for (k, s) in m {
                line += &format!(
                    " {k}={}:{}",
                    s["selector"],
                    s["base"].as_str().unwrap_or("?")
                );
            }
            out += &line;
            out.push('\n');
        }
        if let Some(m) = d["msrs"].as_object() {
            let mut line = String::from("  msrs:");
            for (k, val) in m {
                line += &format!(" {k}={}", val.as_str().unwrap_or("?"));
            }
            out += &line;
            out.push('\n');
        }
    }
    out
}

/// The balloon's state for people, on one line (figures in MiB).
pub fn balloon_text(b: &Value) -> String {
    let mib = |k: &str| b[k].as_u64().unwrap_or(0) as f64 / f64::from(1 << 20);
    let mut s = format!(
        "balloon target {:.1} MiB, actual {:.1} MiB of {:.0} MiB RAM",
        mib("target_bytes"),
        mib("actual_bytes"),
        mib("ram_bytes")
    );
    if b["driver_active"] != Value::Bool(true) {
        s += " (no guest driver yet)";
    }
    s += &format!(", reported free {:.1} MiB", mib("reported_bytes"));
    if let Some(g) = b["guest_stats"].as_object() {
        let m = |k: &str| g.get(k).and_then(Value::as_u64).map(|v| v >> 20);
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
        if let Some(age) = b["guest_stats_age_ms"].as_u64() {
            s += &format!(" ({:.1} s ago)", age as f64 / 1000.0);
        }
    }
    s
}

/// The memory line of `ferrite stat`.
fn memory_text(m: &Value) -> String {
    if let Some(why) = m.get("unavailable") {
        return format!("memory: unavailable ({why})\n");
    }
    let Some(ram) = m["guest_ram"].as_u64() else {
        return String::new();
    };
    let mib = |k: &str| m[k].as_u64().unwrap_or(0) as f64 / (1u64 << 20) as f64;
    format!(
        "memory: guest RAM {} MiB, {:.1} MiB resident; Ferrite itself {:.1} MiB \
         (process RSS {:.1} MiB); KVM slot metadata ~{:.0} MiB (estimate, host kernel)\n",
        ram >> 20,
        mib("guest_rss"),
        mib("vmm_rss"),
        mib("process_rss"),
        mib("kvm_metadata_estimate"),
    )
}

/// Exit statistics for people.
pub fn stats_text(v: &Value) -> String {
    let mut out = format!(
        "{} ({})\n",
        v["name"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?")
    );
    out += &memory_text(&v["memory"]);
    if v["balloon"].is_object() {
        out += &balloon_text(&v["balloon"]);
        out.push('\n');
    }
    for c in v["vcpus"].as_array().into_iter().flatten() {
        let mut line = format!("vCPU {}: exits", c["vcpu"]);
        if let Some(m) = c["exits"].as_object() {
            for (k, val) in m {
                if val.as_u64() != Some(0) {
                    line += &format!(" {k} {val}");
                }
            }
        }
        line += &format!(
            "; {:.3} ms in userspace",
            c["userspace_ns"].as_u64().unwrap_or(0) as f64 / 1e6
        );
        out += &line;
        out.push('\n');
        for (what, key) in [("PIO", "pio_by_device"), ("MMIO", "mmio_by_device")] {
            if let Some(m) = c[key].as_object().filter(|m| !m.is_empty()) {
                let list: Vec<String> = m
                    .iter()
                    .map(|(d, v)| format!("{d} {}r/{}w", v["reads"], v["writes"]))
                    .collect();
                out += &format!("  {what}: {}\n", list.join(", "));
            }
        }
        if let Some(k) = c["kvm"].as_object() {
            match k.get("unavailable") {
                Some(r) => out += &format!("  KVM statistics: unavailable ({r})\n"),
                None => {
                    let pick: Vec<String> = [
                        "exits",
                        "halt_exits",
                        "io_exits",
                        "mmio_exits",
                        "irq_injections",
                    ]
                    .iter()
                    .filter_map(|n| k.get(*n).map(|v| format!("{n} {v}")))
                    .collect();
                    out += &format!("  KVM: {}\n", pick.join(", "));
                }
            }
        }
    }
    out
}
