//! virtio-balloon (device type 5): the host asks the guest to give memory back
//! (inflate), the guest takes it again (deflate, also by itself under memory pressure
//! with DEFLATE_ON_OOM), reports its memory statistics, and reports free memory it
//! does not need (free page reporting) so the host can reclaim it.
//!
//! Queues are numbered compactly over the negotiated features (virtio 1.2, 5.5.2):
//! inflate 0, deflate 1, then statistics when STATS_VQ was accepted, then free page
//! hinting (never offered), then reporting when REPORTING was accepted.
//!
//! - inflate: an array of le32 PFNs (4 KiB pages). PFNs outside guest RAM are ignored
//!   (counted, logged at most once a second); the rest are sorted, coalesced into runs
//!   and each run discarded with one `madvise` ([`crate::memory::discard`]).
//! - deflate: counted only (the guest may use the pages again at once; they fault in
//!   as zero pages).
//! - statistics: the driver's buffer of (le16 tag, le64 value) entries is parsed and
//!   kept; on every tick of a timer (an fd the event loop watches) it is returned, which
//!   asks the guest for fresh figures.
//! - reporting: every descriptor of a chain is a free range (address, length); each is
//!   discarded and the chain returned.
//!
//! The target (`num_pages`) comes from the control API through [`BalloonHandle`]; a
//! change raises a configuration interrupt. `actual` is what the driver writes back.
#![deny(unsafe_code)]

pub mod sys;

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::timerfd::TimerFd;

use super::RateLimit;
use super::{ActivateError, Interrupt, VirtioDevice};
use crate::memory::GuestMemory;
use sys::PAGE;

/// VIRTIO_ID_BALLOON.
pub const DEVICE_TYPE: u32 = 5;
// Feature bits (virtio 1.2, 5.5.3; virtio-bindings has no balloon header).
pub const F_MUST_TELL_HOST: u64 = 1 << 0;
pub const F_STATS_VQ: u64 = 1 << 1;
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
pub const F_FREE_PAGE_HINT: u64 = 1 << 3;
pub const F_PAGE_POISON: u64 = 1 << 4;
pub const F_REPORTING: u64 = 1 << 5;

const QUEUE_SIZE: u16 = 256;
/// Configuration space: num_pages, actual, free_page_hint_cmd_id, poison_val (le32).
const CONFIG_LEN: u64 = 16;
/// PFNs read from one inflate or deflate request at most (the Linux driver sends 256):
/// a hostile chain of 4 GiB costs no more than this.
const MAX_PFNS_PER_REQUEST: usize = 64 * 1024;
/// Statistics entries read at most (16 tags are defined).
const MAX_STATS: usize = 64;
const STAT_LEN: usize = 10;
/// Descriptors of one reporting chain handled at most (Linux sends up to 32).
const MAX_REPORT_RANGES: usize = 1024;

/// Names of the statistics tags (virtio 1.2, 5.5.6.3, and Linux's newer ones).
pub const STAT_NAMES: [&str; 16] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kills",
    "alloc_stalls",
    "async_scans",
    "direct_scans",
    "async_reclaims",
    "direct_reclaims",
];

/// The name of statistics tag `tag` (`tag_N` for one this table does not know).
pub fn stat_name(tag: u16) -> String {
    STAT_NAMES
        .get(usize::from(tag))
        .map_or_else(|| format!("tag_{tag}"), |s| (*s).to_owned())
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--balloon: {0}")]
    Option(String),
    #[error("cannot create the balloon statistics timer")]
    Timer(#[source] std::io::Error),
    #[error("balloon target {target} bytes exceeds the guest's RAM of {ram} bytes")]
    TooLarge { target: u64, ram: u64 },
}

/// `--balloon [deflate-on-oom=on|off,stats-interval=SECONDS,free-page-reporting=on|off]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalloonConfig {
    pub deflate_on_oom: bool,
    /// How often fresh statistics are asked for; zero turns the statistics queue off.
    pub stats_interval: Duration,
    pub free_page_reporting: bool,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        Self {
            deflate_on_oom: true,
            stats_interval: Duration::from_secs(1),
            free_page_reporting: true,
        }
    }
}

impl BalloonConfig {
    /// Parses the option list; an empty string gives the defaults (everything on,
    /// statistics every second).
    pub fn parse(s: &str) -> Result<Self, Error> {
        let mut c = Self::default();
        let onoff = |k: &str, v: &str| match v {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err(Error::Option(format!("{k}={v}: expected on or off"))),
        };
        let mut seen: Vec<&str> = Vec::new();
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| Error::Option(format!("'{item}' is not KEY=VALUE")))?;
            // A repeated option is a mistake to report, not a value to overwrite.
            if seen.contains(&k) {
                return Err(Error::Option(format!("{k} given more than once")));
            }
            seen.push(k);
            match k {
                "deflate-on-oom" => c.deflate_on_oom = onoff(k, v)?,
                "free-page-reporting" => c.free_page_reporting = onoff(k, v)?,
                "stats-interval" => {
                    let secs: u64 = v.parse().ok().filter(|&n| n <= 3600).ok_or_else(|| {
                        Error::Option(format!("stats-interval={v}: expected 0 to 3600 seconds"))
                    })?;
                    c.stats_interval = Duration::from_secs(secs);
                }
                _ => {
                    return Err(Error::Option(format!(
                        "unknown option '{k}' (deflate-on-oom, stats-interval, free-page-reporting)"
                    )))
                }
            }
        }
        Ok(c)
    }
}

/// What a queue index stands for once the features are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// The queue roles, in index order, for the accepted features.
fn roles(acked: u64) -> Vec<Role> {
    let mut r = vec![Role::Inflate, Role::Deflate];
    if acked & F_STATS_VQ != 0 {
        r.push(Role::Stats);
    }
    // F_FREE_PAGE_HINT would come here; it is never offered.
    if acked & F_REPORTING != 0 {
        r.push(Role::Reporting);
    }
    r
}

/// The guest's latest statistics.
#[derive(Debug, Clone)]
pub struct GuestStats {
    /// (tag, value) in the order the guest sent them; a repeated tag keeps its last value.
    pub values: BTreeMap<u16, u64>,
    pub at: Instant,
}

/// Counters and figures for the control API.
#[derive(Debug, Clone)]
pub struct BalloonStatus {
    pub ram_bytes: u64,
    pub target_pages: u32,
    pub actual_pages: u32,
    pub active: bool,
    pub deflate_on_oom: bool,
    pub stats_enabled: bool,
    pub reporting_enabled: bool,
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    pub reported_bytes: u64,
    pub ignored_pfns: u64,
    pub discard_errors: u64,
    pub stats: Option<GuestStats>,
}

struct Active {
    mem: GuestMemory,
    /// (role, queue) by queue index.
    queues: Vec<(Role, Queue)>,
    interrupt: Arc<Interrupt>,
    /// The statistics buffer the driver gave us, returned to ask for fresh figures.
    stats_head: Option<u16>,
}

/// The balloon in a snapshot. The statistics buffer the device holds is not saved:
/// it is a chain taken from the statistics queue and not completed, which the device
/// takes again after the restore (see `MmioTransport::save`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// The target the host set, in 4 KiB pages.
    pub target_pages: u32,
    /// What the driver says the balloon holds, in 4 KiB pages.
    pub actual_pages: u32,
    /// How often statistics are asked for, in ms (0: off).
    pub stats_interval_ms: u64,
}

/// The balloon device.
pub struct Balloon {
    cfg: BalloonConfig,
    ram_bytes: u64,
    acked: u64,
    /// Queue roles for `acked` (inflate and deflate before negotiation).
    roles: Vec<Role>,
    active: Option<Active>,
    target_pages: u32,
    actual_pages: u32,
    timer: Option<TimerFd>,
    stats: Option<GuestStats>,
    log: RateLimit,
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    pub reported_bytes: u64,
    pub ignored_pfns: u64,
    pub discard_errors: u64,
}

impl Balloon {
    /// A balloon for a guest with `ram_bytes` of RAM.
    pub fn new(cfg: &BalloonConfig, ram_bytes: u64) -> Result<Self, Error> {
        let timer = if cfg.stats_interval.is_zero() {
            None
        } else {
            Some(crate::timer::nonblocking().map_err(Error::Timer)?)
        };
        Ok(Self {
            cfg: cfg.clone(),
            ram_bytes,
            acked: 0,
            roles: roles(0),
            active: None,
            target_pages: 0,
            actual_pages: 0,
            timer,
            stats: None,
            log: RateLimit::default(),
            inflated_pages: 0,
            deflated_pages: 0,
            reported_bytes: 0,
            ignored_pfns: 0,
            discard_errors: 0,
        })
    }

    /// Sets how much memory the balloon should hold; the driver is told through a
    /// configuration interrupt.
    pub fn set_target(&mut self, bytes: u64) -> Result<(), Error> {
        if bytes > self.ram_bytes {
            return Err(Error::TooLarge {
                target: bytes,
                ram: self.ram_bytes,
            });
        }
        // 1 TiB of RAM is 2^28 pages: it fits.
        let pages = u32::try_from(bytes / PAGE).unwrap_or(u32::MAX);
        if pages != self.target_pages {
            self.target_pages = pages;
            if let Some(a) = &self.active {
                a.interrupt.signal_config();
            }
        }
        Ok(())
    }

    /// Changes how often fresh statistics are asked for. Statistics on at start stay on
    /// (a new interval above zero); turning them on or off needs the driver to
    /// renegotiate, so it is refused.
    pub fn set_stats_interval(&mut self, interval: Duration) -> Result<(), Error> {
        if self.cfg.stats_interval.is_zero() || interval.is_zero() {
            return Err(Error::Option(
                "the statistics cannot be turned on or off after the start (only the \
                 interval of statistics on from the start can change)"
                    .into(),
            ));
        }
        self.cfg.stats_interval = interval;
        if self.active.is_some() && self.roles.contains(&Role::Stats) {
            if let Some(t) = self.timer.as_mut() {
                t.reset(interval, Some(interval))
                    .map_err(|e| Error::Timer(e.into()))?;
            }
        }
        Ok(())
    }

    pub fn status(&self) -> BalloonStatus {
        BalloonStatus {
            ram_bytes: self.ram_bytes,
            target_pages: self.target_pages,
            actual_pages: self.actual_pages,
            active: self.active.is_some(),
            deflate_on_oom: self.acked & F_DEFLATE_ON_OOM != 0,
            stats_enabled: self.roles.contains(&Role::Stats),
            reporting_enabled: self.roles.contains(&Role::Reporting),
            inflated_pages: self.inflated_pages,
            deflated_pages: self.deflated_pages,
            reported_bytes: self.reported_bytes,
            ignored_pfns: self.ignored_pfns,
            discard_errors: self.discard_errors,
            stats: self.stats.clone(),
        }
    }

    fn warn(&mut self, what: std::fmt::Arguments<'_>) {
        self.log.warn("virtio-balloon", what);
    }

    /// Serves queue `index` until it is empty.
    fn serve(&mut self, index: usize) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some((role, _)) = a.queues.get(index) else {
            return;
        };
        let role = *role;
        let mem = a.mem.clone();
        let interrupt = a.interrupt.clone();
        let mut used_any = false;
        let mut recheck = false;
        loop {
            let Some(a) = self.active.as_mut() else {
                return;
            };
            let q = &mut a.queues[index].1;
            let Some(chain) = q.pop_descriptor_chain(&mem) else {
                if recheck {
                    self.warn(format_args!(
                        "queue {index}: available ring index out of range"
                    ));
                    interrupt.device_error();
                    return;
                }
                match q.enable_notification(&mem) {
                    Ok(true) => {
                        recheck = true;
                        continue;
                    }
                    Ok(false) => break,
                    Err(e) => {
                        self.warn(format_args!("queue {index}: available ring: {e:?}"));
                        interrupt.device_error();
                        return;
                    }
                }
            };
            recheck = false;
            let head = chain.head_index();
            let complete = match role {
                Role::Inflate | Role::Deflate => {
                    self.pfns(role, chain, &mem);
                    true
                }
                Role::Reporting => {
                    self.report(chain, &mem);
                    true
                }
                Role::Stats => self.take_stats(chain, &mem),
            };
            if complete && !self.complete(index, head) {
                return;
            }
            used_any |= complete;
        }
        if used_any {
            self.notify_used(index);
        }
    }

    /// Puts `head` in queue `index`'s used ring (length 0: the device writes nothing).
    fn complete(&mut self, index: usize, head: u16) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        if let Err(e) = a.queues[index].1.add_used(&a.mem, head, 0) {
            let interrupt = a.interrupt.clone();
            self.warn(format_args!("queue {index}: cannot complete {head}: {e:?}"));
            interrupt.device_error();
            return false;
        }
        true
    }

    fn notify_used(&mut self, index: usize) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        match a.queues[index].1.needs_notification(&a.mem) {
            Ok(true) => a.interrupt.signal_used(),
            Ok(false) => {}
            Err(e) => {
                let interrupt = a.interrupt.clone();
                self.warn(format_args!("queue {index}: used ring: {e:?}"));
                interrupt.device_error();
            }
        }
    }

    /// The bytes of a chain's device-readable buffers, at most `max`; `Err` names the
    /// first bad buffer (what was read before it is kept).
    fn readable(
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
        max: usize,
    ) -> (Vec<u8>, Option<String>) {
        let mut out = Vec::new();
        for desc in chain {
            if desc.is_write_only() {
                return (
                    out,
                    Some(format!("device-writable buffer at {:#x}", desc.addr().0)),
                );
            }
            let n = (desc.len() as usize).min(max - out.len());
            let start = out.len();
            out.resize(start + n, 0);
            if let Err(e) = mem.read_slice(&mut out[start..], desc.addr()) {
                out.truncate(start);
                return (out, Some(format!("buffer {:#x}+{n}: {e}", desc.addr().0)));
            }
            if out.len() >= max {
                break;
            }
        }
        (out, None)
    }

    /// An inflate or deflate request: le32 PFNs.
    fn pfns(&mut self, role: Role, chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) {
        let (bytes, bad) = Self::readable(chain, mem, MAX_PFNS_PER_REQUEST * 4);
        if let Some(what) = bad {
            self.warn(format_args!("bad {role:?} request: {what}"));
        }
        let mut pfns: Vec<u64> = bytes
            .chunks_exact(4)
            .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
        if role == Role::Deflate {
            // The guest takes the pages back: nothing to do on the host (they fault in
            // as zero pages), with or without MUST_TELL_HOST.
            self.deflated_pages += pfns.len() as u64;
            return;
        }
        pfns.sort_unstable();
        pfns.dedup();
        let total = pfns.len();
        pfns.retain(|&p| mem.address_in_range(GuestAddress(p * PAGE)));
        let ignored = total - pfns.len();
        if ignored > 0 {
            self.ignored_pfns += ignored as u64;
            self.warn(format_args!(
                "inflate: {ignored} PFNs outside guest RAM ignored"
            ));
        }
        self.inflated_pages += pfns.len() as u64;
        // Runs of consecutive PFNs, one madvise each.
        let mut i = 0;
        while i < pfns.len() {
            let mut j = i + 1;
            while j < pfns.len() && pfns[j] == pfns[j - 1] + 1 {
                j += 1;
            }
            let (gpa, len) = (pfns[i] * PAGE, (j - i) as u64 * PAGE);
            // Every page of the run is RAM, so the run is (regions are page-aligned).
            if let Err(e) = crate::memory::discard(mem, gpa, len) {
                self.discard_failed(&e);
            }
            i = j;
        }
    }

    fn discard_failed(&mut self, e: &crate::memory::DiscardError) {
        self.discard_errors += 1;
        let cause = std::error::Error::source(e).map_or(String::new(), |c| format!(": {c}"));
        self.warn(format_args!("{e}{cause}"));
    }

    /// A free page report: each descriptor is a free range the guest will not touch
    /// until it is returned.
    fn report(&mut self, chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) {
        for desc in chain.take(MAX_REPORT_RANGES) {
            let (gpa, len) = (desc.addr().0, u64::from(desc.len()));
            match crate::memory::discard(mem, gpa, len) {
                Ok(n) => self.reported_bytes += n,
                Err(e) => self.discard_failed(&e),
            }
        }
    }

    /// A statistics buffer: parsed and kept (`false`: not completed now).
    fn take_stats(&mut self, chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> bool {
        let head = chain.head_index();
        let (bytes, bad) = Self::readable(chain, mem, MAX_STATS * STAT_LEN);
        if let Some(what) = bad {
            self.warn(format_args!("bad statistics buffer: {what}"));
        }
        let mut values = BTreeMap::new();
        for e in bytes.chunks_exact(STAT_LEN) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..]);
            values.insert(tag, u64::from_le_bytes(v));
        }
        self.stats = Some(GuestStats {
            values,
            at: Instant::now(),
        });
        let Some(a) = self.active.as_mut() else {
            return true;
        };
        // A second buffer while one is held (the driver keeps one): give the old one back.
        let Some(old) = a.stats_head.replace(head) else {
            return false;
        };
        let index = a.queues.iter().position(|(r, _)| *r == Role::Stats);
        if let Some(index) = index {
            if self.complete(index, old) {
                self.notify_used(index);
            }
        }
        false
    }

    /// The statistics timer fired: return the held buffer (the driver refills it with
    /// fresh figures and hands it back).
    fn stats_tick(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if let Some(t) = self.timer.as_mut() {
            // Non-blocking: nothing to read (EAGAIN) is fine.
            let _ = t.wait();
        }
        let Some(head) = a.stats_head.take() else {
            return;
        };
        let Some(index) = a.queues.iter().position(|(r, _)| *r == Role::Stats) else {
            return;
        };
        if self.complete(index, head) {
            self.notify_used(index);
        }
    }
}

/// The balloon as the control API reaches it.
#[derive(Clone)]
pub struct BalloonHandle(pub Arc<Mutex<Balloon>>);

impl std::fmt::Debug for BalloonHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BalloonHandle")
    }
}

impl BalloonHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Balloon> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn set_target(&self, bytes: u64) -> Result<(), Error> {
        self.lock().set_target(bytes)
    }
    pub fn status(&self) -> BalloonStatus {
        self.lock().status()
    }
    pub fn set_stats_interval(&self, interval: Duration) -> Result<(), Error> {
        self.lock().set_stats_interval(interval)
    }
}

impl VirtioDevice for Balloon {
    fn name(&self) -> &str {
        "virtio-balloon"
    }
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        // Inflate, deflate, statistics, reporting: the most the offered features use.
        &[QUEUE_SIZE; 4]
    }
    fn active_queues(&self) -> usize {
        self.roles.len()
    }
    fn device_features(&self) -> u64 {
        let mut f = 0;
        if !self.cfg.stats_interval.is_zero() {
            f |= F_STATS_VQ;
        }
        if self.cfg.deflate_on_oom {
            f |= F_DEFLATE_ON_OOM;
        }
        if self.cfg.free_page_reporting {
            f |= F_REPORTING;
        }
        f
    }
    fn set_acked_features(&mut self, acked: u64) {
        self.acked = acked;
        self.roles = roles(acked);
    }
    fn config_space(&self) -> std::borrow::Cow<'_, [u8]> {
        let mut cfg = vec![0u8; CONFIG_LEN as usize];
        cfg[..4].copy_from_slice(&self.target_pages.to_le_bytes());
        cfg[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        std::borrow::Cow::Owned(cfg)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        let mut actual = self.actual_pages.to_le_bytes();
        for (i, &b) in data.iter().enumerate() {
            if let Some(o) = offset.checked_add(i as u64) {
                if (4..8).contains(&o) {
                    actual[(o - 4) as usize] = b;
                }
            }
        }
        self.actual_pages = u32::from_le_bytes(actual);
    }
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let queues = super::take_queue_vec(self.name(), queues, self.roles.len(), self.acked)?;
        if self.roles.contains(&Role::Stats) {
            if let Some(t) = self.timer.as_mut() {
                let i = self.cfg.stats_interval;
                t.reset(i, Some(i)).map_err(|e| ActivateError::Failed {
                    device: "virtio-balloon".into(),
                    what: format!("statistics timer: {e}"),
                })?;
            }
        }
        self.active = Some(Active {
            mem,
            queues: self.roles.iter().copied().zip(queues).collect(),
            interrupt,
            stats_head: None,
        });
        Ok(())
    }
    fn queue_notify(&mut self, index: usize) {
        self.serve(index);
    }
    fn save_state(&self) -> Result<super::BackendState, String> {
        Ok(super::BackendState::Balloon(BalloonState {
            target_pages: self.target_pages,
            actual_pages: self.actual_pages,
            stats_interval_ms: u64::try_from(self.cfg.stats_interval.as_millis())
                .unwrap_or(u64::MAX),
        }))
    }
    fn restore_state(&mut self, state: &super::BackendState) -> Result<(), String> {
        let super::BackendState::Balloon(saved) = state else {
            return Err(format!("the snapshot holds the state of {}", state.kind()));
        };
        let ram_pages = self.ram_bytes / PAGE;
        if u64::from(saved.target_pages) > ram_pages {
            return Err(format!(
                "target of {} pages is more than the guest's {ram_pages}",
                saved.target_pages
            ));
        }
        if saved.stats_interval_ms == 0 && !self.cfg.stats_interval.is_zero() {
            return Err("statistics were off, they are on here".into());
        }
        if saved.stats_interval_ms != 0 && self.cfg.stats_interval.is_zero() {
            return Err("statistics were on, they are off here".into());
        }
        self.target_pages = saved.target_pages;
        self.actual_pages = saved.actual_pages;
        self.cfg.stats_interval = Duration::from_millis(saved.stats_interval_ms);
        Ok(())
    }
    fn watched_fds(&self) -> Vec<(RawFd, u32)> {
        match &self.timer {
            Some(t) if self.roles.contains(&Role::Stats) => vec![(t.as_raw_fd(), 0)],
            _ => Vec::new(),
        }
    }
    fn event(&mut self, _data: u32) {
        self.stats_tick();
    }
    fn reset(&mut self) {
        if let Some(t) = self.timer.as_mut() {
            // A zero duration disarms.
            let _ = t.reset(Duration::ZERO, None);
        }
        self.active = None;
        self.acked = 0;
        self.roles = roles(0);
        self.actual_pages = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_util::*;
    use crate::devices::virtio::INT_CONFIG;
    use proptest::prelude::{any, prop_assert, proptest, ProptestConfig};
    use virtio_queue::mock::MockSplitQueue;

    /// Where the pages the tests give back live (BUF holds the requests).
    const PAGES: u64 = 0x20_0000;
    const ALL: u64 = F_STATS_VQ | F_DEFLATE_ON_OOM | F_REPORTING;

    fn balloon(cfg: &BalloonConfig) -> Balloon {
        Balloon::new(cfg, MEM_SIZE).unwrap()
    }

    /// One driver queue per role, 64 KiB apart from 0.
    fn queues(mem: &GuestMemory, n: usize) -> Vec<MockSplitQueue<'_, GuestMemory>> {
        (0..n)
            .map(|i| driver(mem, i as u64 * 0x1_0000, 16))
            .collect()
    }

    fn activate(
        b: &mut Balloon,
        mem: &GuestMemory,
        acked: u64,
        qs: &[MockSplitQueue<'_, GuestMemory>],
    ) -> Arc<Interrupt> {
        b.set_acked_features(acked);
        let irq = interrupt();
        b.activate(
            mem.clone(),
            qs.iter().map(device_queue).collect(),
            irq.clone(),
        )
        .unwrap();
        irq
    }

    fn fill(mem: &GuestMemory, gpa: u64, len: usize, byte: u8) {
        mem.write_slice(&vec![byte; len], GuestAddress(gpa))
            .unwrap();
    }

    fn page_is(mem: &GuestMemory, gpa: u64, byte: u8) -> bool {
        let mut b = vec![0u8; PAGE as usize];
        mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
        b.iter().all(|&x| x == byte)
    }

    fn pfn_request(mem: &GuestMemory, at: u64, pfns: &[u32]) -> u32 {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        bytes.len() as u32
    }

    #[test]
    fn stats_interval_changes_only_while_statistics_stay_on() {
        let on = BalloonConfig::parse("stats-interval=1").unwrap();
        let mut b = Balloon::new(&on, 64 << 20).unwrap();
        b.set_stats_interval(Duration::from_secs(5)).unwrap();
        assert_eq!(b.cfg.stats_interval, Duration::from_secs(5));
        assert!(b.set_stats_interval(Duration::ZERO).is_err());
        let off = BalloonConfig::parse("stats-interval=0").unwrap();
        let mut b = Balloon::new(&off, 64 << 20).unwrap();
        assert!(b.set_stats_interval(Duration::from_secs(1)).is_err());
        assert!(b.cfg.stats_interval.is_zero());
    }

    #[test]
    fn options_parse_with_defaults_all_on() {
        let d = BalloonConfig::parse("").unwrap();
        assert_eq!(d, BalloonConfig::default());
        assert!(d.deflate_on_oom && d.free_page_reporting);
        assert_eq!(d.stats_interval, Duration::from_secs(1));
        let c = BalloonConfig::parse("deflate-on-oom=off,stats-interval=0,free-page-reporting=off")
            .unwrap();
        assert!(!c.deflate_on_oom && !c.free_page_reporting && c.stats_interval.is_zero());
        for bad in [
            "x",
            "deflate-on-oom=yes",
            "stats-interval=-1",
            "stats-interval=99999",
            "foo=on",
        ] {
            assert!(BalloonConfig::parse(bad).is_err(), "{bad}");
        }
        // Issue 13: a repeated option was taken silently (the last one won).
        for (twice, key) in [
            ("stats-interval=0,stats-interval=5", "stats-interval"),
            (
                "deflate-on-oom=on,free-page-reporting=on,deflate-on-oom=off",
                "deflate-on-oom",
            ),
        ] {
            let e = BalloonConfig::parse(twice).unwrap_err().to_string();
            assert!(e.contains(&format!("{key} given more than once")), "{e}");
        }
        let off = balloon(&c);
        assert_eq!(off.device_features(), 0);
        assert!(off.timer.is_none());
        assert_eq!(balloon(&d).device_features(), ALL);
    }

    #[test]
    fn queues_are_numbered_over_the_accepted_features() {
        let mut b = balloon(&BalloonConfig::default());
        assert_eq!(b.active_queues(), 2);
        b.set_acked_features(ALL);
        assert_eq!(
            b.roles,
            [Role::Inflate, Role::Deflate, Role::Stats, Role::Reporting]
        );
        b.set_acked_features(F_REPORTING);
        assert_eq!(b.roles, [Role::Inflate, Role::Deflate, Role::Reporting]);
        assert_eq!(b.active_queues(), 3);
        b.set_acked_features(F_STATS_VQ);
        assert_eq!(b.roles, [Role::Inflate, Role::Deflate, Role::Stats]);
        // Too few queues for the features: refused.
        let mem = mem();
        let qs = queues(&mem, 2);
        b.set_acked_features(ALL);
        let r = b.activate(
            mem.clone(),
            qs.iter().map(device_queue).collect(),
            interrupt(),
        );
        assert!(r.is_err());
    }

    #[test]
    fn inflate_gives_pages_back_and_ignores_pfns_outside_ram() {
        let mem = mem();
        let qs = queues(&mem, 4);
        let first = (PAGES / PAGE) as u32;
        for i in 0..6 {
            fill(&mem, PAGES + i * PAGE, PAGE as usize, 0xaa);
        }
        // Unsorted, a duplicate, a gap (page 3 stays), and PFNs beyond RAM.
        let pfns = [
            first + 2,
            first,
            first + 1,
            first + 1,
            first + 4,
            0xffff_ffff,
            (MEM_SIZE / PAGE) as u32,
        ];
        let len = pfn_request(&mem, BUF, &pfns);
        qs[0].add_desc_chains(&[desc(BUF, len, 0, 0)], 0).unwrap();
        let mut b = balloon(&BalloonConfig::default());
        let irq = activate(&mut b, &mem, ALL, &qs);
        b.queue_notify(0);
        assert_eq!(used(&mem, &qs[0], 0), (1, 0, 0));
        assert_eq!(irq.status() & 1, 1, "used-buffer interrupt");
        for i in [0, 1, 2, 4] {
            assert!(
                page_is(&mem, PAGES + i * PAGE, 0),
                "page {i} given back (reads zero)"
            );
        }
        assert!(page_is(&mem, PAGES + 3 * PAGE, 0xaa), "page 3 kept");
        assert!(page_is(&mem, PAGES + 5 * PAGE, 0xaa), "page 5 kept");
        assert_eq!(b.inflated_pages, 4);
        assert_eq!(b.ignored_pfns, 2);
        assert_eq!(b.discard_errors, 0);
    }

    #[test]
    fn deflate_only_counts() {
        let mem = mem();
        let qs = queues(&mem, 4);
        let first = (PAGES / PAGE) as u32;
        fill(&mem, PAGES, PAGE as usize, 0x55);
        let len = pfn_request(&mem, BUF, &[first, first + 1]);
        qs[1].add_desc_chains(&[desc(BUF, len, 0, 0)], 0).unwrap();
        let mut b = balloon(&BalloonConfig::default());
        activate(&mut b, &mem, ALL, &qs);
        b.queue_notify(1);
        assert_eq!(used(&mem, &qs[1], 0), (1, 0, 0));
        assert_eq!(b.deflated_pages, 2);
        assert!(page_is(&mem, PAGES, 0x55));
    }

    fn stats_request(mem: &GuestMemory, at: u64, entries: &[(u16, u64)]) -> u32 {
        let mut bytes = Vec::new();
        for (t, v) in entries {
            bytes.extend_from_slice(&t.to_le_bytes());
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        bytes.len() as u32
    }

    #[test]
    fn statistics_are_kept_and_the_buffer_returned_on_a_tick() {
        let mem = mem();
        let qs = queues(&mem, 4);
        let entries = [
            (4u16, 100 << 20),
            (5, 256 << 20),
            (3, 1234),
            (99, 7),
            (4, 90 << 20),
        ];
        let len = stats_request(&mem, BUF, &entries);
        // A trailing partial entry is ignored.
        qs[2]
            .add_desc_chains(&[desc(BUF, len + 3, 0, 0)], 0)
            .unwrap();
        let mut b = balloon(&BalloonConfig::default());
        let irq = activate(&mut b, &mem, ALL, &qs);
        assert_eq!(b.watched_fds().len(), 1, "the timer is watched");
        b.queue_notify(2);
        assert_eq!(used(&mem, &qs[2], 0).0, 0, "held until the next tick");
        let s = b.status().stats.unwrap();
        assert_eq!(
            s.values.get(&4),
            Some(&(90 << 20)),
            "last value of a repeated tag"
        );
        assert_eq!(s.values.get(&5), Some(&(256 << 20)));
        assert_eq!(s.values.get(&3), Some(&1234));
        assert_eq!(s.values.get(&99), Some(&7));
        assert_eq!(stat_name(4), "free_memory");
        assert_eq!(stat_name(99), "tag_99");
        b.event(0);
        assert_eq!(
            used(&mem, &qs[2], 0),
            (1, 0, 0),
            "returned: fresh figures asked for"
        );
        assert_eq!(irq.status() & 1, 1);
        // A tick with no buffer held does nothing.
        b.event(0);
        assert_eq!(used(&mem, &qs[2], 0).0, 1);
    }

    #[test]
    fn a_second_statistics_buffer_returns_the_first() {
        let mem = mem();
        let qs = queues(&mem, 4);
        let len = stats_request(&mem, BUF, &[(4, 1)]);
        qs[2].add_desc_chains(&[desc(BUF, len, 0, 0)], 0).unwrap();
        qs[2].add_desc_chains(&[desc(BUF, len, 0, 0)], 1).unwrap();
        let mut b = balloon(&BalloonConfig::default());
        activate(&mut b, &mem, ALL, &qs);
        b.queue_notify(2);
        assert_eq!(used(&mem, &qs[2], 0), (1, 0, 0));
        b.event(0);
        assert_eq!(used(&mem, &qs[2], 1), (2, 1, 0));
    }

    #[test]
    fn free_page_reports_are_given_back_and_bad_ranges_refused() {
        let mem = mem();
        let qs = queues(&mem, 4);
        fill(&mem, PAGES, 8 * PAGE as usize, 0x77);
        qs[3]
            .add_desc_chains(
                &[
                    desc(PAGES, 2 * PAGE as u32, F_WRITE | F_NEXT, 1),
                    // Unaligned, beyond RAM, straddling its end: refused, nothing given back.
                    desc(PAGES + 4 * PAGE + 1, PAGE as u32, F_WRITE | F_NEXT, 2),
                    desc(MEM_SIZE, PAGE as u32, F_WRITE | F_NEXT, 3),
                    desc(MEM_SIZE - PAGE, 2 * PAGE as u32, F_WRITE | F_NEXT, 4),
                    desc(PAGES + 6 * PAGE, PAGE as u32, F_WRITE, 0),
                ],
                0,
            )
            .unwrap();
        let mut b = balloon(&BalloonConfig::default());
        activate(&mut b, &mem, ALL, &qs);
        b.queue_notify(3);
        assert_eq!(used(&mem, &qs[3], 0), (1, 0, 0));
        assert!(page_is(&mem, PAGES, 0) && page_is(&mem, PAGES + PAGE, 0));
        for i in 2..6 {
            assert!(page_is(&mem, PAGES + i * PAGE, 0x77), "page {i} kept");
        }
        assert!(page_is(&mem, PAGES + 6 * PAGE, 0));
        assert_eq!(b.reported_bytes, 3 * PAGE);
        assert_eq!(b.discard_errors, 3);
    }

    #[test]
    fn reporting_is_queue_2_without_statistics() {
        let mem = mem();
        let qs = queues(&mem, 3);
        fill(&mem, PAGES, PAGE as usize, 0x77);
        qs[2]
            .add_desc_chains(&[desc(PAGES, PAGE as u32, F_WRITE, 0)], 0)
            .unwrap();
        let mut b = balloon(&BalloonConfig::default());
        activate(&mut b, &mem, F_REPORTING, &qs);
        assert!(b.watched_fds().is_empty(), "no statistics, no timer");
        b.queue_notify(2);
        assert!(page_is(&mem, PAGES, 0));
        assert_eq!(b.reported_bytes, PAGE);
    }

    #[test]
    fn config_space_target_and_actual() {
        let mem = mem();
        let qs = queues(&mem, 4);
        let mut b = balloon(&BalloonConfig::default());
        b.set_target(1 << 20).unwrap();
        let mut c = [0u8; 16];
        b.read_config(0, &mut c);
        assert_eq!(&c[..4], &256u32.to_le_bytes());
        assert!(b.set_target(MEM_SIZE + 1).is_err(), "more than guest RAM");
        let irq = activate(&mut b, &mem, ALL, &qs);
        b.set_target(2 << 20).unwrap();
        assert_eq!(irq.status() & INT_CONFIG, INT_CONFIG, "config interrupt");
        // The driver writes actual, byte by byte or at once; num_pages is read-only.
        b.write_config(4, &300u32.to_le_bytes());
        b.write_config(0, &[9, 9, 9, 9]);
        // 300 = 0x12c; its second byte becomes 2: 0x22c.
        b.write_config(5, &[2]);
        let mut v = [0u8; 4];
        b.read_config(4, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0x22c);
        b.read_config(0, &mut v);
        assert_eq!(u32::from_le_bytes(v), 512);
        let s = b.status();
        assert_eq!((s.target_pages, s.actual_pages), (512, 0x22c));
        // Beyond the fields, and at absurd offsets: zeros, no panic.
        let mut far = [0xffu8; 8];
        b.read_config(12, &mut far);
        assert_eq!(far, [0; 8]);
        b.read_config(u64::MAX, &mut far);
        b.write_config(u64::MAX - 1, &[1, 2, 3, 4]);
        assert_eq!(far, [0; 8]);
    }

    #[test]
    fn hostile_requests_complete_without_harm() {
        let mem = mem();
        let qs = queues(&mem, 4);
        fill(&mem, PAGES, PAGE as usize, 0x11);
        // Device-writable PFN buffer; a buffer beyond RAM; a huge length.
        let first = (PAGES / PAGE) as u32;
        // After the one PFN: 0xffffffff PFNs (outside RAM) up to the read cap.
        fill(&mem, BUF, MAX_PFNS_PER_REQUEST * 4, 0xff);
        let len = pfn_request(&mem, BUF, &[first]);
        qs[0]
            .add_desc_chains(&[desc(BUF, len, F_WRITE, 0)], 0)
            .unwrap();
        let mut b = balloon(&BalloonConfig::default());
        activate(&mut b, &mem, ALL, &qs);
        b.queue_notify(0);
        assert_eq!(used(&mem, &qs[0], 0), (1, 0, 0));
        assert!(
            page_is(&mem, PAGES, 0x11),
            "a device-writable request is refused"
        );
        qs[0]
            .add_desc_chains(&[desc(MEM_SIZE + 0x1000, 32, 0, 0)], 1)
            .unwrap();
        // A huge length: read up to the cap (the PFN at BUF is taken).
        qs[0]
            .add_desc_chains(&[desc(BUF, u32::MAX, 0, 0)], 2)
            .unwrap();
        b.queue_notify(0);
        assert_eq!(used(&mem, &qs[0], 2).0, 3, "every request completed");
        assert_eq!((b.inflated_pages, b.ignored_pfns), (1, 1));
        assert!(page_is(&mem, PAGES, 0));
        // Notifications for absent queues, before activation and after reset.
        b.queue_notify(7);
        b.reset();
        b.queue_notify(0);
        b.event(0);
        assert_eq!(b.active_queues(), 2);
        let mut fresh = balloon(&BalloonConfig::default());
        fresh.queue_notify(0);
        fresh.event(0);
    }

    #[test]
    fn an_available_index_far_ahead_is_a_device_error_not_a_spin() {
        let mem = mem();
        let qs = queues(&mem, 4);
        random_ring(&mem, &qs[0], &[], &[], Some(1000));
        let mut b = balloon(&BalloonConfig::default());
        let irq = activate(&mut b, &mem, ALL, &qs);
        b.queue_notify(0);
        assert!(irq.needs_reset());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases(1500)))]
        #[test]
        fn random_rings_never_panic(
            descs in proptest::collection::vec(any_desc(), 16),
            heads in proptest::collection::vec(0u16..20, 0..16),
            bogus in proptest::option::of(any::<u16>()),
            queue in 0usize..4,
            pfns in proptest::collection::vec(any::<u32>(), 0..64),
        ) {
            let mem = mem();
            let qs = queues(&mem, 4);
            pfn_request(&mem, BUF, &pfns);
            random_ring(&mem, &qs[queue], &descs, &heads, bogus);
            let mut b = balloon(&BalloonConfig::default());
            activate(&mut b, &mem, ALL, &qs);
            b.queue_notify(queue);
            b.event(0);
            b.queue_notify(queue);
            prop_assert!(b.inflated_pages <= (MEM_SIZE / PAGE) * 16);
            prop_assert!(b.reported_bytes <= MEM_SIZE * 16 * 16);
        }
    }
}
