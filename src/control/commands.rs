//! The CLI's control commands (`ferrite list|pause|resume|stop|debug|stat|balloon`): find the
//! VM's socket, send one request, print the answer for people or, with `--json`, for
//! scripts.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::client::{self, ClientError};
use super::paths;

const TIMEOUT: Duration = Duration::from_secs(10);

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
    Ok(paths::socket_path(&paths::run_dir(), name))
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
        Err(ClientError::Stale { .. }) => {
            use std::os::unix::fs::FileTypeExt;
            // Only a socket nobody listens on is removed, never some other file.
            let is_socket = std::fs::symlink_metadata(socket)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            if is_socket {
                let _ = std::fs::remove_file(socket);
            }
            Err(Error::Dead {
                name: name.to_owned(),
                path: socket.to_path_buf(),
            })
        }
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

/// Live VMs (stale sockets are removed on the way).
pub fn list() -> Result<Vec<Value>, Error> {
    let dir = paths::run_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(Error::List { dir, source }),
    };
    let mut vms = Vec::new();
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    paths.sort();
    for p in paths {
        let name = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        match call(&name, &p, "GET", "/vm", None) {
            Ok(v) => vms.push(v),
            Err(Error::Dead { .. }) => log::info!("removed stale control socket {}", p.display()),
            Err(e) => log::warn!("{e}"),
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
