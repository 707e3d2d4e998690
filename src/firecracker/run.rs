//! The process in Firecracker mode: one event loop from process start to exit, the API
//! socket on it before any configuration, the VM joining the same loop at
//! `InstanceStart` (or at once from `--config-file`), and Firecracker's exit statuses.
//!
//! Steps: parse the flags (153 on a bad one) → logging → the event loop with the
//! signal watch → the config file, if any, applied and booted (1 when it fails) → the
//! API socket bound (1 when the path exists) and served → wait for the first stop
//! request (guest reset or power-off, SIGTERM/SIGINT/SIGHUP, a vCPU error) → the VM
//! torn down → the loop stopped → the API socket removed.
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::api::{FcApi, Options, VmSlot};
use super::cli::{self, Args};
use super::logger::{self, LoggerConfig};
use super::metrics::{MetricsConfig, METRICS};
use super::model::{FullConfig, MmdsConfig};
use crate::control::paths;
use crate::control::server::ControlServer;
use crate::event_loop::EventLoop;
use crate::outcome::{StopSignal, VmOutcome};

const EVENT_LOOP_JOIN_TIMEOUT: Duration = Duration::from_secs(2);
/// An API client that sends nothing is closed after a day (the longest the control
/// server takes); Firecracker keeps idle connections open.
const IDLE_TIMEOUT: Duration = Duration::from_secs(86_400);
/// Firecracker's exit status after SIGHUP.
const EXIT_SIGHUP: i32 = 156;
/// Firecracker's exit status for a bad logger or metrics configuration on the command
/// line.
const EXIT_BAD_CONFIGURATION: i32 = 152;

/// Why the process could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the config file {path}")]
    ReadConfig {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the config file {path} is not a valid configuration: {msg}")]
    ParseConfig { path: String, msg: String },
    #[error("the config file {path}: {msg}")]
    Configure { path: String, msg: String },
    #[error("the API socket path {0} already exists (Address in use)")]
    SocketExists(String),
    #[error(transparent)]
    Socket(#[from] paths::Error),
    #[error(transparent)]
    EventLoop(#[from] crate::event_loop::Error),
    #[error(transparent)]
    Signals(#[from] crate::signals::Error),
    #[error("{0} is not supported yet")]
    Unsupported(&'static str),
    #[error("--metadata")]
    Metadata(#[source] crate::mmds::Error),
    #[error("the MMDS content file (--metadata) {path}: {msg}")]
    PopulateMetadata { path: String, msg: String },
    #[error("--seccomp-filter {0}: custom filters are not supported; Ferrite installs its own per-thread filters (docs/DESIGN.md), or none with --no-seccomp")]
    SeccompFilter(String),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::Error),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::Error),
    #[error(transparent)]
    Logger(#[from] logger::Error),
    #[error(transparent)]
    Metrics(#[from] super::metrics::Error),
}

/// Runs Ferrite as `firecracker` with `args` (the program name first) and returns the
/// exit status.
pub fn main(args: Vec<OsString>) -> i32 {
    let a = match cli::parse(args) {
        Ok(a) => a,
        Err((msg, status)) => {
            if status == 0 {
                print!("{msg}");
            } else {
                eprint!("{msg}");
            }
            return status;
        }
    };
    if a.version {
        print!("{}", cli::version_text());
        return 0;
    }
    if let Err(e) = init_log_and_metrics(&a) {
        eprintln!("firecracker (ferrite): error: {}", crate::errors::chain(&e));
        return EXIT_BAD_CONFIGURATION;
    }
    match run(&a) {
        Ok(outcome) => {
            if let VmOutcome::Signal(n) = outcome {
                log::error!("Shutting down VM after intercepting signal {n}, code 0.");
            }
            if let Err(e) = METRICS.flush() {
                log::warn!("metrics: {}", crate::errors::chain(&e));
            }
            match outcome {
                // Firecracker has no handler for these: it dies by them.
                VmOutcome::Signal(n @ (libc::SIGTERM | libc::SIGINT | libc::SIGQUIT)) => {
                    crate::signals::die_by(n)
                }
                o => exit_status(&o),
            }
        }
        Err(e) => {
            log::error!("{}", crate::errors::chain(&e));
            eprintln!("firecracker (ferrite): error: {}", crate::errors::chain(&e));
            1
        }
    }
}

/// The Firecracker logger from the flags (stdout until a path is given), and the
/// metrics file when `--metrics-path` names one.
fn init_log_and_metrics(a: &Args) -> Result<(), Error> {
    logger::install(&a.id)?;
    let level = a.level.as_deref().map(logger::parse_level).transpose()?;
    logger::apply(&LoggerConfig {
        log_path: a.log_path.clone(),
        level,
        show_level: a.show_level.then_some(true),
        show_log_origin: a.show_log_origin.then_some(true),
        module: a.module.clone(),
    })?;
    if let Some(p) = &a.metrics_path {
        METRICS.configure(&MetricsConfig {
            metrics_path: p.clone(),
        })?;
    }
    METRICS.record_process_startup(a.start_time_us, a.start_time_cpu_us, a.parent_cpu_time_us);
    Ok(())
}

/// Firecracker's status for how the VM ended: 0 for a guest reboot or power-off, 156
/// after SIGHUP, 128 + n after another signal (SIGTERM, SIGINT and SIGQUIT end the
/// process by the signal itself, after the teardown), Ferrite's own status otherwise.
pub fn exit_status(outcome: &VmOutcome) -> i32 {
    match outcome {
        VmOutcome::Signal(libc::SIGHUP) => EXIT_SIGHUP,
        o => o.exit_status(),
    }
}

fn run(a: &Args) -> Result<VmOutcome, Error> {
    log::info!(
        "Running Firecracker v{} (Ferrite {})",
        super::api::FIRECRACKER_VERSION,
        env!("CARGO_PKG_VERSION")
    );
    if a.snapshot_version || a.describe_snapshot.is_some() {
        return Err(Error::Unsupported(
            "--snapshot-version and --describe-snapshot (Ferrite's snapshot files are its own format, not Firecracker's)",
        ));
    }
    // Read before anything is bound or built: a missing or bad file ends the process
    // with status 1 (Firecracker panics on it, status 134).
    let mmds_limit = a.mmds_size_limit.unwrap_or(a.http_api_max_payload_size);
    let metadata = a
        .metadata
        .as_deref()
        .map(|p| {
            crate::mmds::read_metadata(p, crate::mmds::metadata_read_limit(mmds_limit))
                .map_err(Error::Metadata)
        })
        .transpose()?;
    if a.enable_pci {
        log::warn!("--enable-pci: Ferrite's devices stay on virtio-mmio (announced on the kernel command line)");
    }
    if let Some(f) = &a.seccomp_filter {
        return Err(Error::SeccompFilter(f.display().to_string()));
    }
    crate::seccomp::set_enabled(!a.no_seccomp);
    crate::seccomp::prepare()?;
    crate::sandbox::no_new_privs()?;
    if a.http_api_max_payload_size > crate::control::http::MAX_BODY {
        log::warn!(
            "--http-api-max-payload-size {}: Ferrite's HTTP reader takes bodies of at most {} bytes",
            a.http_api_max_payload_size,
            crate::control::http::MAX_BODY
        );
    }
    let stop = Arc::new(StopSignal::new());
    let mut event_loop = EventLoop::new(stop.clone())?;
    event_loop.filter_later();
    event_loop.add_handler(Box::new(crate::vm::SignalWatch::install()?))?;
    let events = event_loop.spawn()?;
    let slot: VmSlot = Arc::new(Mutex::new(None));
    let api = Arc::new(FcApi::new(
        Options {
            id: a.id.clone(),
            boot_timer: a.boot_timer,
            max_payload: a.http_api_max_payload_size,
        },
        events.handle(),
        stop.clone(),
        slot.clone(),
    ));
    if let Some(limit) = a.mmds_size_limit {
        api.set_mmds_size_limit(limit);
    }
    if let (Some(v), Some(path)) = (metadata, &a.metadata) {
        if let Err(e) = api.put_metadata(v) {
            let _ = events.stop_and_join(EVENT_LOOP_JOIN_TIMEOUT);
            return Err(Error::PopulateMetadata {
                path: path.display().to_string(),
                msg: format!("Populating MMDS from file failed: {e}"),
            });
        }
        log::info!("Successfully added metadata to mmds from file");
    }
    let served = serve(a, &api, &events.handle());
    let booted = match (&served, &a.config_file) {
        (Ok(_), Some(path)) => boot_from_file(&api, path),
        _ => Ok(()),
    };
    let socket = match (served, booted) {
        (Ok(socket), Ok(())) => socket,
        (Err(e), _) | (Ok(_), Err(e)) => {
            let _ = events.stop_and_join(EVENT_LOOP_JOIN_TIMEOUT);
            // A VM that was built is torn down by its drop.
            drop(slot.lock().unwrap_or_else(|p| p.into_inner()).take());
            return Err(e);
        }
    };
    crate::seccomp::enter(crate::seccomp::ThreadKind::Main);
    // Until the stop, the main thread runs the VM's jobs (a snapshot: `PUT
    // /snapshot/create`); the API pokes it when a job is queued or a VM arrives.
    let first = loop {
        if let Some(o) = stop.wait_or_poked() {
            break o;
        }
        if let Some(vm) = slot.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            vm.run_jobs();
        }
    };
    let vm = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    let outcome = match vm {
        Some(mut vm) => vm.wait(),
        None => first,
    };
    if let Err(e) = events.stop_and_join(EVENT_LOOP_JOIN_TIMEOUT) {
        log::error!("teardown: {e}");
    }
    drop(socket);
    log::info!("Firecracker-compatible instance {} ended: {outcome}", a.id);
    Ok(outcome)
}

/// Binds the API socket and serves it on the loop (unless `--no-api`).
fn serve(
    a: &Args,
    api: &Arc<FcApi>,
    events: &crate::event_loop::LoopHandle,
) -> Result<Option<paths::SocketFile>, Error> {
    if a.no_api {
        return Ok(None);
    }
    let path = &a.api_sock;
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(Error::SocketExists(path.display().to_string()));
    }
    let (listener, file) = paths::bind(path, &a.id)?;
    log::info!(
        "Listening on API socket ({:?}).",
        path.display().to_string()
    );
    // Firecracker never closes an idle connection, and its clients keep one open across
    // a guest's boot: idle clients stay (a full server still evicts the longest-idle).
    let limits = crate::control::server::Limits::from_env_over(crate::control::server::Limits {
        idle: IDLE_TIMEOUT,
        ..Default::default()
    });
    let server = ControlServer::with_limits(listener, api.clone(), events.clone(), limits);
    events.call(move |ctx| {
        if let Err(e) = ctx.add_handler(Box::new(server)) {
            log::error!("cannot serve the API socket: {e}");
            ctx.stop_vm(VmOutcome::Error(format!(
                "cannot serve the API socket: {e}"
            )));
        }
    })?;
    log::info!("API server started.");
    Ok(Some(file))
}

/// Applies a config file section by section through the API's own checks, then boots.
fn boot_from_file(api: &FcApi, path: &Path) -> Result<(), Error> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
        path: shown.clone(),
        source,
    })?;
    let c: FullConfig = serde_json::from_str(&text).map_err(|e| Error::ParseConfig {
        path: shown.clone(),
        msg: e.to_string(),
    })?;
    let fail = |msg: String| Error::Configure {
        path: shown.clone(),
        msg,
    };
    let mmds = c
        .mmds_config
        .clone()
        .map(serde_json::from_value::<MmdsConfig>)
        .transpose()
        .map_err(|e| Error::ParseConfig {
            path: shown.clone(),
            msg: format!("mmds-config: {e}"),
        })?;
    for (section, present) in [
        ("cpu-config", c.cpu_config.is_some()),
        ("pmem", !c.pmem.is_empty()),
        ("memory-hotplug", c.memory_hotplug.is_some()),
    ] {
        if present {
            return Err(fail(format!("Ferrite does not support `{section}` yet")));
        }
    }
    api.configure(|cfg| {
        if let Some(l) = &c.logger {
            cfg.put_logger(l.clone())?;
        }
        if let Some(m) = &c.metrics {
            cfg.put_metrics(m.clone())?;
        }
        if let Some(m) = &c.machine_config {
            cfg.put_machine(m.clone())?;
        }
        cfg.put_boot(c.boot_source.clone())?;
        for d in &c.drives {
            cfg.put_drive(d.clone())?;
        }
        for n in &c.network_interfaces {
            cfg.put_net(n.clone())?;
        }
        // After the interfaces it names (and after `--metadata`, as in Firecracker).
        if let Some(m) = mmds {
            cfg.put_mmds_config(m)?;
        }
        if let Some(v) = &c.vsock {
            cfg.put_vsock(v.clone())?;
        }
        if let Some(b) = &c.balloon {
            cfg.put_balloon(b.clone())?;
        }
        if let Some(e) = &c.entropy {
            cfg.put_entropy(e.clone())?;
        }
        Ok(())
    })
    .map_err(|e| fail(e.to_string()))?;
    api.start().map_err(|e| fail(e.to_string()))
}
