//! Firecracker's metrics: one JSON object per line, written to the file or FIFO named by
//! `--metrics-path` or `PUT /metrics` ([`MetricsConfig`]), on demand (the
//! `FlushMetrics` action) and every [`PERIOD`] once the VM runs ([`MetricsFlusher`]).
//!
//! The groups and counter names are Firecracker's (v1.16.1, x86_64), in its order,
//! because Kata Containers and firecracker-go-sdk decode the lines into Firecracker's
//! structures: a counter Ferrite does not count stays 0 but is present. What
//! Firecracker does, and so what this does:
//! * Two kinds of value. A [`Counter`] ("shared incremental" in Firecracker) is written
//!   as its increase since the previous line; a [`Gauge`] ("shared store") as its value.
//!   A [`LatencyAgg`] is `min_us`/`max_us` gauges and a `sum_us` counter.
//! * Block, net and pmem devices have a group each, `block_<drive id>`,
//!   `net_<iface id>`, `pmem_<id>` (in id order), followed by the aggregate `block`,
//!   `net`, `pmem`, whose counters are the sum of the devices' increases (its latency
//!   `min_us`/`max_us` stay 0). The aggregate is there with no device at all.
//!   vhost-user devices have `vhost_user_<id>` groups and no aggregate.
//! * Configuring writes nothing; the first line is written when the VM starts (the
//!   flusher writes at once, then each period), and a line is written when the VM ends
//!   (the caller's [`Metrics::flush`]). Metrics can be configured once: a second
//!   configuration is refused ("Reinitialization of metrics not allowed.").
//! * `PUT /metrics` ignores unknown fields (Firecracker's `MetricsConfig` does not refuse
//!   them), so [`MetricsConfig`] does too.
//! * The destination is opened like the log's (see [`Sink`]): a line that would block
//!   is dropped and counted in `logger.missed_metrics_count`; a line is never torn.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::sink::{Sink, Written};
use crate::event_loop::{self, EventHandler, Ops};

/// How often the metrics are written while the VM runs (Firecracker's 60 s).
pub const PERIOD: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the metrics destination {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Reinitialization of metrics not allowed.")]
    AlreadyConfigured,
    #[error("cannot write metrics to {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics line dropped: {} would block (no reader keeping up)", path.display())]
    WouldBlock { path: PathBuf },
    #[error("cannot create or arm the metrics timer")]
    Timer(#[source] vmm_sys_util::errno::Error),
}

/// The body of `PUT /metrics` (and `--metrics-path`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct MetricsConfig {
    /// A file or FIFO for the metrics lines.
    pub metrics_path: PathBuf,
}

/// Something that writes itself as a JSON value into a metrics line.
pub trait Metric {
    /// Appends the value; a [`Counter`] is written as its increase since its last
    /// writing, which this resets.
    fn write_json(&self, out: &mut String);
    /// Adds this value's unwritten increase to `agg` (for an aggregate group); gauges
    /// add nothing.
    fn add_delta_to(&self, agg: &Self)
    where
        Self: Sized;
}

/// Firecracker's "shared incremental" metric: a count, written as its increase since
/// the last line.
#[derive(Debug, Default)]
pub struct Counter {
    count: AtomicU64,
    written: AtomicU64,
}

impl Counter {
    pub const fn new() -> Self {
        Self {
            count: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.count.fetch_add(n, Ordering::Relaxed);
    }
    /// The total since the process started.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
    /// The increase the next line would show.
    pub fn delta(&self) -> u64 {
        self.count()
            .wrapping_sub(self.written.load(Ordering::Relaxed))
    }
}

impl Metric for Counter {
    fn write_json(&self, out: &mut String) {
        let now = self.count();
        let before = self.written.swap(now, Ordering::Relaxed);
        push_u64(out, now.wrapping_sub(before));
    }
    fn add_delta_to(&self, agg: &Self) {
        agg.add(self.delta());
    }
}

/// Firecracker's "shared store" metric: a value, written as it is.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }
    pub fn store(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn fetch(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Metric for Gauge {
    fn write_json(&self, out: &mut String) {
        push_u64(out, self.fetch());
    }
    fn add_delta_to(&self, _agg: &Self) {}
}

fn push_u64(out: &mut String, v: u64) {
    use std::fmt::Write;
    // Writing to a String cannot fail.
    let _ = write!(out, "{v}");
}

/// Appends `s` as a JSON string.
fn push_key(out: &mut String, s: &str) {
    // Serializing a str cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
    out.push(':');
}

/// Defines a group of metrics: a struct of [`Counter`]s, [`Gauge`]s and nested groups
/// written as a JSON object with the fields' names as keys, in order.
macro_rules! metrics_group {
    ($(#[$doc:meta])* pub struct $name:ident { $($field:ident : $ty:ident),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Default)]
        pub struct $name {
            $(pub $field: $ty,)*
        }

        impl $name {
            pub const fn new() -> Self {
                Self { $($field: $ty::new(),)* }
            }
        }

        impl Metric for $name {
            fn write_json(&self, out: &mut String) {
                let fields: &[(&str, &dyn Metric)] = &[$((stringify!($field), &self.$field)),*];
                out.push('{');
                for (i, (key, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    push_key(out, key);
                    value.write_json(out);
                }
                out.push('}');
            }
            fn add_delta_to(&self, agg: &Self) {
                $(self.$field.add_delta_to(&agg.$field);)*
            }
        }
    };
}

metrics_group! {
    /// The time operations took: the smallest and largest (µs) and their sum.
    pub struct LatencyAgg {
        min_us: Gauge,
        max_us: Gauge,
        sum_us: Counter,
    }
}

impl LatencyAgg {
    /// Records one operation that took `d`.
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.add(us);
        let min = self.min_us.fetch();
        if min == 0 || us < min {
            self.min_us.store(us);
        }
        if us > self.max_us.fetch() {
            self.max_us.store(us);
        }
    }
}

metrics_group! {
    /// `api_server`.
    pub struct ApiServerMetrics {
        process_startup_time_us: Gauge,
        process_startup_time_cpu_us: Gauge,
    }
}

metrics_group! {
    /// `balloon`.
    pub struct BalloonMetrics {
        activate_fails: Counter,
        inflate_count: Counter,
        stats_updates_count: Counter,
        stats_update_fails: Counter,
        deflate_count: Counter,
        event_fails: Counter,
        free_page_report_count: Counter,
        free_page_report_freed: Counter,
        free_page_report_fails: Counter,
        free_page_hint_count: Counter,
        free_page_hint_freed: Counter,
        free_page_hint_fails: Counter,
    }
}

metrics_group! {
    /// `block`.
    pub struct BlockMetrics {
        activate_fails: Counter,
        cfg_fails: Counter,
        no_avail_buffer: Counter,
        event_fails: Counter,
        execute_fails: Counter,
        invalid_reqs_count: Counter,
        flush_count: Counter,
        queue_event_count: Counter,
        rate_limiter_event_count: Counter,
        update_count: Counter,
        update_fails: Counter,
        read_bytes: Counter,
        write_bytes: Counter,
        read_count: Counter,
        write_count: Counter,
        read_agg: LatencyAgg,
        write_agg: LatencyAgg,
        rate_limiter_throttled_events: Counter,
        io_engine_throttled_events: Counter,
        remaining_reqs_count: Counter,
    }
}

metrics_group! {
    /// `deprecated_api`.
    pub struct DeprecatedApiMetrics {
        deprecated_http_api_calls: Counter,
    }
}

metrics_group! {
    /// `get_api_requests`.
    pub struct GetRequestsMetrics {
        instance_info_count: Counter,
        machine_cfg_count: Counter,
        mmds_count: Counter,
        vmm_version_count: Counter,
        hotplug_memory_count: Counter,
    }
}

metrics_group! {
    /// `i8042`.
    pub struct I8042Metrics {
        error_count: Counter,
        missed_read_count: Counter,
        missed_write_count: Counter,
        read_count: Counter,
        reset_count: Counter,
        write_count: Counter,
    }
}

metrics_group! {
    /// `uart`.
    pub struct UartMetrics {
        error_count: Counter,
        flush_count: Counter,
        missed_read_count: Counter,
        missed_write_count: Counter,
        read_count: Counter,
        write_count: Counter,
        rate_limiter_dropped_bytes: Counter,
    }
}

metrics_group! {
    /// `latencies_us`.
    pub struct PerformanceMetrics {
        full_create_snapshot: Gauge,
        diff_create_snapshot: Gauge,
        load_snapshot: Gauge,
        pause_vm: Gauge,
        resume_vm: Gauge,
        vmm_full_create_snapshot: Gauge,
        vmm_diff_create_snapshot: Gauge,
        vmm_load_snapshot: Gauge,
        vmm_pause_vm: Gauge,
        vmm_resume_vm: Gauge,
    }
}

metrics_group! {
    /// `logger`.
    pub struct LoggerMetrics {
        missed_metrics_count: Counter,
        metrics_fails: Counter,
        missed_log_count: Counter,
        rate_limited_log_count: Counter,
    }
}

metrics_group! {
    /// `mmds`.
    pub struct MmdsMetrics {
        rx_accepted: Counter,
        rx_accepted_err: Counter,
        rx_accepted_unusual: Counter,
        rx_bad_eth: Counter,
        rx_invalid_token: Counter,
        rx_no_token: Counter,
        rx_count: Counter,
        tx_bytes: Counter,
        tx_count: Counter,
        tx_errors: Counter,
        tx_frames: Counter,
        connections_created: Counter,
        connections_destroyed: Counter,
    }
}

metrics_group! {
    /// `net`.
    pub struct NetMetrics {
        activate_fails: Counter,
        cfg_fails: Counter,
        mac_address_updates: Counter,
        no_rx_avail_buffer: Counter,
        no_tx_avail_buffer: Counter,
        event_fails: Counter,
        rx_queue_event_count: Counter,
        rx_event_rate_limiter_count: Counter,
        rx_rate_limiter_throttled: Counter,
        rx_tap_event_count: Counter,
        rx_bytes_count: Counter,
        rx_packets_count: Counter,
        rx_fails: Counter,
        rx_count: Counter,
        tap_read_fails: Counter,
        tap_write_fails: Counter,
        tap_write_agg: LatencyAgg,
        tx_bytes_count: Counter,
        tx_malformed_frames: Counter,
        tx_fails: Counter,
        tx_count: Counter,
        tx_packets_count: Counter,
        tx_queue_event_count: Counter,
        tx_rate_limiter_event_count: Counter,
        tx_rate_limiter_throttled: Counter,
        tx_spoofed_mac_count: Counter,
        tx_remaining_reqs_count: Counter,
    }
}

metrics_group! {
    /// `patch_api_requests`.
    pub struct PatchRequestsMetrics {
        drive_count: Counter,
        drive_fails: Counter,
        network_count: Counter,
        network_fails: Counter,
        machine_cfg_count: Counter,
        machine_cfg_fails: Counter,
        mmds_count: Counter,
        mmds_fails: Counter,
        hotplug_memory_count: Counter,
        hotplug_memory_fails: Counter,
        pmem_count: Counter,
        pmem_fails: Counter,
    }
}

metrics_group! {
    /// `put_api_requests`.
    pub struct PutRequestsMetrics {
        actions_count: Counter,
        actions_fails: Counter,
        boot_source_count: Counter,
        boot_source_fails: Counter,
        drive_count: Counter,
        drive_fails: Counter,
        logger_count: Counter,
        logger_fails: Counter,
        machine_cfg_count: Counter,
        machine_cfg_fails: Counter,
        cpu_cfg_count: Counter,
        cpu_cfg_fails: Counter,
        metrics_count: Counter,
        metrics_fails: Counter,
        network_count: Counter,
        network_fails: Counter,
        mmds_count: Counter,
        mmds_fails: Counter,
        vsock_count: Counter,
        vsock_fails: Counter,
        pmem_count: Counter,
        pmem_fails: Counter,
        serial_count: Counter,
        serial_fails: Counter,
        hotplug_memory_count: Counter,
        hotplug_memory_fails: Counter,
    }
}

metrics_group! {
    /// `seccomp`.
    pub struct SeccompMetrics {
        num_faults: Gauge,
    }
}

metrics_group! {
    /// `vcpu`.
    pub struct VcpuMetrics {
        exit_io_in: Counter,
        exit_io_out: Counter,
        exit_mmio_read: Counter,
        exit_mmio_write: Counter,
        failures: Counter,
        kvmclock_ctrl_fails: Counter,
        exit_io_in_agg: LatencyAgg,
        exit_io_out_agg: LatencyAgg,
        exit_mmio_read_agg: LatencyAgg,
        exit_mmio_write_agg: LatencyAgg,
    }
}

metrics_group! {
    /// `vmm`.
    pub struct VmmMetrics {
        panic_count: Gauge,
    }
}

metrics_group! {
    /// `signals`.
    pub struct SignalMetrics {
        sigbus: Gauge,
        sigsegv: Gauge,
        sigxfsz: Gauge,
        sigxcpu: Gauge,
        sigpipe: Counter,
        sighup: Gauge,
        sigill: Gauge,
    }
}

metrics_group! {
    /// `vsock`.
    pub struct VsockMetrics {
        activate_fails: Counter,
        cfg_fails: Counter,
        rx_queue_event_fails: Counter,
        tx_queue_event_fails: Counter,
        ev_queue_event_fails: Counter,
        muxer_event_fails: Counter,
        conn_event_fails: Counter,
        rx_queue_event_count: Counter,
        tx_queue_event_count: Counter,
        rx_bytes_count: Counter,
        tx_bytes_count: Counter,
        rx_packets_count: Counter,
        tx_packets_count: Counter,
        conns_added: Counter,
        conns_killed: Counter,
        conns_removed: Counter,
        killq_resync: Counter,
        tx_flush_fails: Counter,
        tx_write_fails: Counter,
        rx_read_fails: Counter,
    }
}

metrics_group! {
    /// `entropy`.
    pub struct EntropyMetrics {
        activate_fails: Counter,
        entropy_event_fails: Counter,
        entropy_event_count: Counter,
        entropy_bytes: Counter,
        host_rng_fails: Counter,
        entropy_rate_limiter_throttled: Counter,
        rate_limiter_event_count: Counter,
    }
}

metrics_group! {
    /// `pmem`.
    pub struct PmemMetrics {
        activate_fails: Counter,
        cfg_fails: Counter,
        event_fails: Counter,
        queue_event_count: Counter,
        rate_limiter_throttled_events: Counter,
        rate_limiter_event_count: Counter,
    }
}

metrics_group! {
    /// `interrupts`.
    pub struct InterruptMetrics {
        triggers: Counter,
        config_updates: Counter,
    }
}

metrics_group! {
    /// `memory_hotplug`.
    pub struct MemoryHotplugMetrics {
        activate_fails: Counter,
        queue_event_fails: Counter,
        queue_event_count: Counter,
        plug_agg: LatencyAgg,
        plug_count: Counter,
        plug_bytes: Counter,
        plug_fails: Counter,
        unplug_agg: LatencyAgg,
        unplug_count: Counter,
        unplug_bytes: Counter,
        unplug_fails: Counter,
        unplug_discard_fails: Counter,
        unplug_all_agg: LatencyAgg,
        unplug_all_count: Counter,
        unplug_all_fails: Counter,
        state_agg: LatencyAgg,
        state_count: Counter,
        state_fails: Counter,
    }
}

metrics_group! {
    /// `vhost_user_<id>`, one per vhost-user device.
    pub struct VhostUserMetrics {
        activate_fails: Counter,
        cfg_fails: Counter,
        init_time_us: Gauge,
        activate_time_us: Gauge,
        config_change_time_us: Gauge,
    }
}

/// One group per device, by id, and optionally their aggregate.
#[derive(Debug, Default)]
pub struct PerDevice<T> {
    devices: RwLock<BTreeMap<String, Arc<T>>>,
}

impl<T: Metric + Default> PerDevice<T> {
    pub const fn new() -> Self {
        Self {
            devices: RwLock::new(BTreeMap::new()),
        }
    }

    /// The group of device `id`, made on first use; a device keeps it for its life
    /// (Firecracker never removes one either).
    pub fn device(&self, id: &str) -> Arc<T> {
        if let Some(m) = self
            .devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
        {
            return Arc::clone(m);
        }
        Arc::clone(
            self.devices
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .entry(id.to_string())
                .or_default(),
        )
    }

    /// Writes `"<prefix>_<id>":{…}` per device and, if `aggregate`, `"<prefix>":{…}`
    /// with the devices' summed increases; each entry is preceded by a comma.
    fn write_entries(&self, out: &mut String, prefix: &str, aggregate: bool) {
        let devices = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let agg = T::default();
        for (id, m) in devices.iter() {
            if aggregate {
                m.add_delta_to(&agg);
            }
            out.push(',');
            push_key(out, &format!("{prefix}_{id}"));
            m.write_json(out);
        }
        if aggregate {
            out.push(',');
            push_key(out, prefix);
            agg.write_json(out);
        }
    }
}

struct Destination {
    sink: Sink,
    path: PathBuf,
}

/// Every metric Firecracker writes, and where the lines go. [`METRICS`] is the
/// process's; tests make their own.
pub struct Metrics {
    destination: Mutex<Option<Destination>>,
    pub api_server: ApiServerMetrics,
    pub balloon: BalloonMetrics,
    pub block: PerDevice<BlockMetrics>,
    pub deprecated_api: DeprecatedApiMetrics,
    pub get_api_requests: GetRequestsMetrics,
    pub i8042: I8042Metrics,
    pub uart: UartMetrics,
    pub latencies_us: PerformanceMetrics,
    pub logger: LoggerMetrics,
    pub mmds: MmdsMetrics,
    pub net: PerDevice<NetMetrics>,
    pub patch_api_requests: PatchRequestsMetrics,
    pub put_api_requests: PutRequestsMetrics,
    pub seccomp: SeccompMetrics,
    pub vcpu: VcpuMetrics,
    pub vmm: VmmMetrics,
    pub signals: SignalMetrics,
    pub vsock: VsockMetrics,
    pub entropy: EntropyMetrics,
    pub pmem: PerDevice<PmemMetrics>,
    pub vhost_user: PerDevice<VhostUserMetrics>,
    pub interrupts: InterruptMetrics,
    pub memory_hotplug: MemoryHotplugMetrics,
}

/// The process's metrics.
pub static METRICS: Metrics = Metrics::new();

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub const fn new() -> Self {
        Self {
            destination: Mutex::new(None),
            api_server: ApiServerMetrics::new(),
            balloon: BalloonMetrics::new(),
            block: PerDevice::new(),
            deprecated_api: DeprecatedApiMetrics::new(),
            get_api_requests: GetRequestsMetrics::new(),
            i8042: I8042Metrics::new(),
            uart: UartMetrics::new(),
            latencies_us: PerformanceMetrics::new(),
            logger: LoggerMetrics::new(),
            mmds: MmdsMetrics::new(),
            net: PerDevice::new(),
            patch_api_requests: PatchRequestsMetrics::new(),
            put_api_requests: PutRequestsMetrics::new(),
            seccomp: SeccompMetrics::new(),
            vcpu: VcpuMetrics::new(),
            vmm: VmmMetrics::new(),
            signals: SignalMetrics::new(),
            vsock: VsockMetrics::new(),
            entropy: EntropyMetrics::new(),
            pmem: PerDevice::new(),
            vhost_user: PerDevice::new(),
            interrupts: InterruptMetrics::new(),
            memory_hotplug: MemoryHotplugMetrics::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Destination>> {
        self.destination.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens the destination; refused if metrics are already configured (nothing is
    /// opened or created then). Writes nothing.
    pub fn configure(&self, cfg: &MetricsConfig) -> Result<(), Error> {
        let mut dest = self.lock();
        if dest.is_some() {
            return Err(Error::AlreadyConfigured);
        }
        let sink = Sink::open(&cfg.metrics_path).map_err(|source| Error::Open {
            path: cfg.metrics_path.clone(),
            source,
        })?;
        *dest = Some(Destination {
            sink,
            path: cfg.metrics_path.clone(),
        });
        Ok(())
    }

    /// Whether a destination is configured.
    pub fn is_configured(&self) -> bool {
        self.lock().is_some()
    }

    /// Stores Firecracker's `api_server` start-up figures from `--start-time-us` and
    /// `--start-time-cpu-us` (a launcher's `CLOCK_MONOTONIC` and this process's
    /// `CLOCK_PROCESS_CPUTIME_ID` readings, µs, taken when it started the process) and
    /// `--parent-cpu-time-us` (added to the CPU figure); call it when the API socket is
    /// ready. A figure whose flag is absent is left alone.
    pub fn record_process_startup(
        &self,
        start_time_us: Option<u64>,
        start_time_cpu_us: Option<u64>,
        parent_cpu_time_us: Option<u64>,
    ) {
        if let Some(start) = start_time_us {
            let now = super::boot_timer::monotonic_us();
            self.api_server
                .process_startup_time_us
                .store(now.saturating_sub(start));
        }
        if let Some(start) = start_time_cpu_us {
            let now = super::boot_timer::process_cpu_us();
            self.api_server.process_startup_time_cpu_us.store(
                now.saturating_sub(start)
                    .saturating_add(parent_cpu_time_us.unwrap_or(0)),
            );
        }
    }

    /// One metrics line, newline included; counters' increases start again from 0.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        out.push('{');
        push_key(&mut out, "utc_timestamp_ms");
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        push_u64(&mut out, u64::try_from(ms).unwrap_or(u64::MAX));
        let group = |out: &mut String, key: &str, m: &dyn Metric| {
            out.push(',');
            push_key(out, key);
            m.write_json(out);
        };
        group(&mut out, "api_server", &self.api_server);
        group(&mut out, "balloon", &self.balloon);
        self.block.write_entries(&mut out, "block", true);
        group(&mut out, "deprecated_api", &self.deprecated_api);
        group(&mut out, "get_api_requests", &self.get_api_requests);
        group(&mut out, "i8042", &self.i8042);
        group(&mut out, "uart", &self.uart);
        group(&mut out, "latencies_us", &self.latencies_us);
        group(&mut out, "logger", &self.logger);
        group(&mut out, "mmds", &self.mmds);
        self.net.write_entries(&mut out, "net", true);
        group(&mut out, "patch_api_requests", &self.patch_api_requests);
        group(&mut out, "put_api_requests", &self.put_api_requests);
        group(&mut out, "seccomp", &self.seccomp);
        group(&mut out, "vcpu", &self.vcpu);
        group(&mut out, "vmm", &self.vmm);
        group(&mut out, "signals", &self.signals);
        group(&mut out, "vsock", &self.vsock);
        group(&mut out, "entropy", &self.entropy);
        self.pmem.write_entries(&mut out, "pmem", true);
        self.vhost_user.write_entries(&mut out, "vhost_user", false);
        group(&mut out, "interrupts", &self.interrupts);
        group(&mut out, "memory_hotplug", &self.memory_hotplug);
        out.push_str("}\n");
        out
    }

    /// Writes one line if metrics are configured (`Ok(true)`); `Ok(false)`, touching
    /// nothing, if not. A line that cannot be written is counted in
    /// `logger.missed_metrics_count` and its increases are lost, as in Firecracker.
    pub fn flush(&self) -> Result<bool, Error> {
        let mut dest = self.lock();
        let Some(d) = dest.as_mut() else {
            return Ok(false);
        };
        let line = self.render();
        let r = match d.sink.write_line(line.as_bytes()) {
            Ok(Written::Line) => Ok(true),
            Ok(Written::Dropped) => Err(Error::WouldBlock {
                path: d.path.clone(),
            }),
            Err(source) => Err(Error::Write {
                path: d.path.clone(),
                source,
            }),
        };
        drop(dest);
        if r.is_err() {
            self.logger.missed_metrics_count.inc();
        }
        r
    }
}

/// The event-loop handler that writes a metrics line when it is added (the VM has
/// started) and then every [`PERIOD`].
pub struct MetricsFlusher {
    metrics: &'static Metrics,
    timer: TimerFd,
}

impl MetricsFlusher {
    pub fn new(metrics: &'static Metrics) -> Result<Self, Error> {
        Self::with_period(metrics, PERIOD)
    }

    /// As [`new`](Self::new), writing every `period` (tests).
    pub fn with_period(metrics: &'static Metrics, period: Duration) -> Result<Self, Error> {
        let mut timer = TimerFd::new().map_err(Error::Timer)?;
        timer.reset(period, Some(period)).map_err(Error::Timer)?;
        Ok(Self { metrics, timer })
    }

    fn write(&self) {
        if let Err(e) = self.metrics.flush() {
            log::error!("Failed to write metrics: {e}");
        }
    }
}

impl EventHandler for MetricsFlusher {
    fn name(&self) -> &str {
        "metrics"
    }

    fn init(&mut self, ops: &mut Ops<'_>) -> Result<(), event_loop::Error> {
        ops.add(&self.timer, 0, EventSet::IN)?;
        self.write();
        Ok(())
    }

    fn handle(&mut self, _: u32, _: EventSet, _: &mut Ops<'_>) {
        // Readable: the timer expired, so this read does not block.
        let _ = self.timer.wait();
        self.write();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use serde_json::Value;

    use super::*;
    use crate::event_loop::EventLoop;
    use crate::firecracker::logger::tests::TempDir;
    use crate::outcome::StopSignal;

    /// The top-level keys of a Firecracker v1.16.1 (x86_64) line with one drive
    /// `rootfs`, one interface `eth0` and no pmem or vhost-user device, in its order,
    /// with each group's number of fields.
    const FIRECRACKER_GROUPS: &[(&str, usize)] = &[
        ("api_server", 2),
        ("balloon", 12),
        ("block_rootfs", 20),
        ("block", 20),
        ("deprecated_api", 1),
        ("get_api_requests", 5),
        ("i8042", 6),
        ("uart", 7),
        ("latencies_us", 10),
        ("logger", 4),
        ("mmds", 13),
        ("net_eth0", 27),
        ("net", 27),
        ("patch_api_requests", 12),
        ("put_api_requests", 26),
        ("seccomp", 1),
        ("vcpu", 10),
        ("vmm", 1),
        ("signals", 7),
        ("vsock", 20),
        ("entropy", 7),
        ("pmem", 6),
        ("interrupts", 2),
        ("memory_hotplug", 18),
    ];

    fn parse(line: &str) -> serde_json::Map<String, Value> {
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1);
        match serde_json::from_str(line).unwrap() {
            Value::Object(m) => m,
            v => panic!("not an object: {v}"),
        }
    }

    fn leaked() -> &'static Metrics {
        Box::leak(Box::new(Metrics::new()))
    }

    #[test]
    fn line_has_every_group_firecracker_writes_in_its_order() {
        let m = Metrics::new();
        m.block.device("rootfs");
        m.net.device("eth0");
        let line = m.render();
        let obj = parse(&line);
        assert!(obj["utc_timestamp_ms"].as_u64().unwrap() > 1_600_000_000_000);
        assert_eq!(obj.len(), FIRECRACKER_GROUPS.len() + 1);
        let mut last = 0;
        for (key, fields) in FIRECRACKER_GROUPS {
            let group = obj[*key].as_object().unwrap_or_else(|| panic!("{key}"));
            assert_eq!(group.len(), *fields, "{key}");
            let at = line.find(&format!("\"{key}\":{{")).unwrap();
            assert!(at > last, "{key} out of order");
            last = at;
        }
        // Spot checks of names clients read.
        assert!(obj["block"]["read_agg"]["min_us"].is_u64());
        assert!(obj["net"]["tap_write_agg"]["sum_us"].is_u64());
        assert!(obj["vcpu"]["exit_mmio_write_agg"]["max_us"].is_u64());
        assert!(obj["api_server"]["process_startup_time_cpu_us"].is_u64());
        assert!(obj["logger"]["missed_log_count"].is_u64());
        assert!(obj["uart"]["rate_limiter_dropped_bytes"].is_u64());
        assert!(obj["signals"]["sigpipe"].is_u64());
    }

    #[test]
    fn counters_reset_after_a_line_and_gauges_do_not() {
        let m = Metrics::new();
        m.put_api_requests.actions_count.add(3);
        m.vmm.panic_count.store(1);
        m.vcpu.exit_io_out_agg.record(Duration::from_micros(40));
        m.vcpu.exit_io_out_agg.record(Duration::from_micros(10));
        let first = parse(&m.render());
        assert_eq!(first["put_api_requests"]["actions_count"], 3);
        assert_eq!(first["vmm"]["panic_count"], 1);
        assert_eq!(first["vcpu"]["exit_io_out_agg"]["sum_us"], 50);
        assert_eq!(first["vcpu"]["exit_io_out_agg"]["min_us"], 10);
        assert_eq!(first["vcpu"]["exit_io_out_agg"]["max_us"], 40);
        m.put_api_requests.actions_count.inc();
        let second = parse(&m.render());
        assert_eq!(second["put_api_requests"]["actions_count"], 1);
        assert_eq!(second["vmm"]["panic_count"], 1);
        assert_eq!(second["vcpu"]["exit_io_out_agg"]["sum_us"], 0);
        assert_eq!(second["vcpu"]["exit_io_out_agg"]["max_us"], 40);
        assert_eq!(parse(&m.render())["put_api_requests"]["actions_count"], 0);
        assert_eq!(m.put_api_requests.actions_count.count(), 4);
    }

    #[test]
    fn aggregate_is_the_sum_of_the_devices_increases() {
        let m = Metrics::new();
        let a = m.block.device("a");
        let b = m.block.device("b");
        assert!(Arc::ptr_eq(&a, &m.block.device("a")));
        a.read_count.add(2);
        b.read_count.add(5);
        b.write_agg.record(Duration::from_micros(7));
        let first = parse(&m.render());
        assert_eq!(first["block_a"]["read_count"], 2);
        assert_eq!(first["block_b"]["read_count"], 5);
        assert_eq!(first["block"]["read_count"], 7);
        assert_eq!(first["block"]["write_agg"]["sum_us"], 7);
        assert_eq!(first["block"]["write_agg"]["max_us"], 0);
        b.read_count.inc();
        let second = parse(&m.render());
        assert_eq!(second["block_a"]["read_count"], 0);
        assert_eq!(second["block"]["read_count"], 1);
        // No device: the aggregate is still written.
        assert_eq!(parse(&m.render())["net"]["rx_count"], 0);
    }

    #[test]
    fn configure_writes_nothing_and_a_second_configure_is_refused() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("metrics");
        let m = Metrics::new();
        m.put_api_requests.actions_count.inc();
        // Not configured: nothing written, nothing reset.
        assert!(!m.flush().unwrap());
        m.configure(&MetricsConfig {
            metrics_path: path.clone(),
        })
        .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        let other = dir.as_path().join("other");
        let e = m
            .configure(&MetricsConfig {
                metrics_path: other.clone(),
            })
            .unwrap_err();
        assert!(matches!(e, Error::AlreadyConfigured), "{e}");
        assert_eq!(e.to_string(), "Reinitialization of metrics not allowed.");
        assert!(!other.exists());
        assert!(m.flush().unwrap());
        assert!(m.flush().unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let counts: Vec<u64> = lines
            .iter()
            .map(|l| {
                parse(&format!("{l}\n"))["put_api_requests"]["actions_count"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(counts, [1, 0]);
    }

    #[test]
    fn unopenable_metrics_path_is_refused_naming_it() {
        let dir = TempDir::new().unwrap();
        let bad = dir.as_path().join("missing").join("metrics");
        let m = Metrics::new();
        let e = m
            .configure(&MetricsConfig {
                metrics_path: bad.clone(),
            })
            .unwrap_err();
        assert!(e.to_string().contains(&*bad.to_string_lossy()), "{e}");
        assert!(!m.is_configured());
    }

    #[test]
    fn metrics_config_ignores_unknown_fields_like_firecracker() {
        let c: MetricsConfig =
            serde_json::from_str(r#"{"metrics_path":"/tmp/m","extra":1}"#).unwrap();
        assert_eq!(c.metrics_path, PathBuf::from("/tmp/m"));
        assert!(serde_json::from_str::<MetricsConfig>("{}").is_err());
    }

    #[test]
    fn fifo_without_reader_never_blocks_and_counts_missed_lines() {
        let dir = TempDir::new().unwrap();
        let fifo = dir.as_path().join("m.fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let m = Metrics::new();
        m.configure(&MetricsConfig {
            metrics_path: fifo.clone(),
        })
        .unwrap();
        let start = Instant::now();
        let mut dropped = 0;
        for _ in 0..100 {
            match m.flush() {
                Ok(true) => {}
                Err(Error::WouldBlock { path }) => {
                    assert_eq!(path, fifo);
                    dropped += 1;
                }
                r => panic!("{r:?}"),
            }
        }
        assert!(start.elapsed() < Duration::from_secs(20));
        assert!(dropped > 0 && dropped < 100, "{dropped}");
        assert_eq!(m.logger.missed_metrics_count.count(), dropped);
    }

    #[test]
    fn flusher_writes_when_added_and_then_every_period() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("metrics");
        let m = leaked();
        m.configure(&MetricsConfig {
            metrics_path: path.clone(),
        })
        .unwrap();
        let stop = Arc::new(StopSignal::new());
        let mut el = EventLoop::new(stop).unwrap();
        el.add_handler(Box::new(
            MetricsFlusher::with_period(m, Duration::from_millis(50)).unwrap(),
        ))
        .unwrap();
        // Added: one line at once, before the loop even runs.
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        let h = el.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::read_to_string(&path).unwrap().lines().count() < 3 {
            assert!(Instant::now() < deadline, "no periodic lines");
            std::thread::sleep(Duration::from_millis(10));
        }
        h.stop_and_join(Duration::from_secs(5)).unwrap();
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            parse(&format!("{line}\n"));
        }
    }

    #[test]
    fn process_startup_figures_come_from_the_flags() {
        let m = Metrics::new();
        m.record_process_startup(None, None, None);
        assert_eq!(m.api_server.process_startup_time_us.fetch(), 0);
        let now = crate::firecracker::boot_timer::monotonic_us();
        m.record_process_startup(Some(now - 5_000), Some(0), Some(1_000_000));
        let wall = m.api_server.process_startup_time_us.fetch();
        assert!((5_000..60_000_000).contains(&wall), "{wall}");
        assert!(m.api_server.process_startup_time_cpu_us.fetch() >= 1_000_000);
        // A start in the future is 0, not a wrapped-around figure.
        m.record_process_startup(Some(u64::MAX), None, None);
        assert_eq!(m.api_server.process_startup_time_us.fetch(), 0);
    }
}
