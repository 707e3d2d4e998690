//! Command-line interface: argument parsing, logging, and mapping results to exit codes.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::control::commands;
use crate::control::protocol::{
    BalloonAnswer, BalloonRequest, BalloonTarget, SnapshotAnswer, SnapshotRequest, StateAnswer,
    StatsAnswer,
};
use crate::vm::{self, ControlConfig, VmConfig};

#[derive(Debug, Parser)]
#[command(
    name = "ferrite",
    version,
    about = "A small, fast virtual machine monitor for Linux/KVM"
)]
pub struct Cli {
    /// Log level: error, warn, info, debug, trace (also FERRITE_LOG).
    #[arg(long, global = true, env = "FERRITE_LOG", default_value = "warn", value_parser = parse_level)]
    pub log_level: log::LevelFilter,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest and run it until it stops.
    Run(Box<RunArgs>),
    /// List the running VMs (and remove stale control sockets).
    List(JsonArg),
    /// Pause a VM (every vCPU parked).
    Pause(VmArg),
    /// Resume a paused VM.
    Resume(VmArg),
    /// Stop a VM: ask the guest to shut down (ACPI power button, else Ctrl-Alt-Del),
    /// stop it hard after a timeout; or at once with --hard (also when paused).
    /// Waits until the VM is gone and says how it ended.
    Stop(StopArgs),
    /// Dump a VM's vCPU registers (pausing it meanwhile if it runs).
    Debug(VmArg),
    /// Show a VM's exit statistics.
    Stat(StatArgs),
    /// Write a snapshot of a paused VM (`ferrite pause NAME` first) into DIR: its state
    /// file and memory file. DIR is created (mode 0700) if missing and refused if it
    /// holds a snapshot already. `ferrite run --restore DIR` starts it again.
    Snapshot(SnapshotArgs),
    /// Set how much memory a VM's balloon holds (0 empties it), or show the balloon.
    Balloon(BalloonArgs),
    /// Print a VM's metadata-service (MMDS) document, or replace it (--put) or merge
    /// into it (--patch, RFC 7396) and print the result. The VM runs with --mmds.
    Mmds(MmdsArgs),
    /// Start a program (normally Ferrite: `-- run ...`) confined as by Firecracker's
    /// jailer: its own root, namespaces, cgroup v2 leaf, limits and uid/gid.
    Jail(Box<crate::jail::JailArgs>),
    /// Print each thread kind's seccomp allow-list: "KIND COUNT name,name,..." (the
    /// number of distinct syscalls, argument-filtered ones counted once).
    SeccompPolicy,
}

#[derive(Debug, clap::Args)]
pub struct BalloonArgs {
    #[command(flatten)]
    pub vm: VmArg,
    /// Memory the balloon should hold: MiB, or a size with a K, M, G or T suffix
    /// (as --mem); 0 empties it. Without it, the balloon's state is shown.
    #[arg(value_parser = crate::size::parse)]
    pub size: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct MmdsArgs {
    #[command(flatten)]
    pub vm: VmArg,
    /// Replace the document with the JSON in FILE (`-`: standard input).
    #[arg(long, value_name = "FILE|-", conflicts_with = "patch")]
    pub put: Option<PathBuf>,
    /// Merge the JSON in FILE (`-`: standard input) into the document.
    #[arg(long, value_name = "FILE|-")]
    pub patch: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub vm: VmArg,
    /// The directory the snapshot goes into.
    pub dir: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct JsonArg {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct VmArg {
    /// The VM's name (see `ferrite list`).
    pub name: String,
    /// Its control socket, when not in the default place.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct StopArgs {
    #[command(flatten)]
    pub vm: VmArg,
    /// Stop at once, without asking the guest (works on a paused VM too).
    #[arg(long)]
    pub hard: bool,
    /// Seconds the guest gets to shut down before it is stopped hard [default: 30].
    #[arg(long, value_name = "SECONDS", conflicts_with = "hard", value_parser = parse_timeout)]
    pub timeout: Option<std::time::Duration>,
}

/// Seconds (fractions allowed), more than 0 and at most 24 h.
fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    let max = crate::graceful::MAX_TIMEOUT;
    match s.trim().parse::<f64>() {
        Ok(v) if v >= 0.001 && v <= max.as_secs_f64() => {
            Ok(std::time::Duration::from_millis((v * 1000.0).round() as u64))
        }
        _ => Err(format!(
            "'{s}' is not a number of seconds from 0.001 to {}",
            max.as_secs()
        )),
    }
}

#[derive(Debug, clap::Args)]
pub struct StatArgs {
    #[command(flatten)]
    pub vm: VmArg,
    /// Refresh every second until interrupted.
    #[arg(long)]
    pub watch: bool,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Guest image: Linux bzImage or vmlinux, a 64-bit ELF, or a flat binary
    /// (detected from the file).
    #[arg(long, short = 'k', required_unless_present = "restore")]
    pub kernel: Option<PathBuf>,
    /// Start from the snapshot in this directory (`ferrite snapshot NAME DIR`) instead
    /// of booting: the machine (vCPUs, memory, devices) is the snapshot's, so only
    /// --name, --api-socket, --kvm-device, --no-seccomp, --log-level and the clone
    /// overrides --vsock-uds, --tap and --disk-path go with it.
    /// Guest memory is mapped copy-on-write from DIR/memory.
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "kernel", "initrd", "cmdline", "cpu_features", "mem", "mem_backing", "hugepages",
        "mem_prealloc", "cpus", "debug_exit", "disk", "net", "rng", "console", "balloon",
        "vsock", "landlock", "mmds", "metadata", "mmds_size_limit",
    ])]
    pub restore: Option<PathBuf>,
    /// With --restore: `file` maps DIR/memory copy-on-write (the default); `uffd` gives
    /// the guest anonymous memory that Ferrite's own page-fault handler thread fills
    /// from DIR/memory through userfaultfd, page by page as it is touched.
    #[arg(long, value_name = "file|uffd", requires = "restore", value_parser = ["file", "uffd"])]
    pub mem_backend: Option<String>,
    /// With --restore: how the guest's clock goes on. `continue` (default): from the
    /// value it had at the snapshot, as if no time had passed; `realtime`: ahead by the
    /// time since the snapshot was taken, so the guest's wall clock is right (its
    /// monotonic clock jumps forward by as much) [default: continue].
    #[arg(long, value_name = "MODE", requires = "restore")]
    pub restore_clock: Option<crate::snapshot::kvm_vm::ClockMode>,
    /// Initial ramdisk for a Linux kernel.
    #[arg(long, short = 'i')]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=-1"].
    #[arg(long)]
    pub cmdline: Option<String>,
    /// CPUID features to hide from the guest, e.g. "-x2apic,-cx16" (--help lists them).
    #[arg(
        long,
        allow_hyphen_values = true,
        value_parser = parse_cpu_features,
        default_value = "",
        long_help = CPU_FEATURES_LONG_HELP
    )]
    pub cpu_features: HiddenFeatures,
    /// Guest memory: MiB, or a size with a K, M, G or T suffix, optionally followed by
    /// B or iB (e.g. 16M, 1G, 512MiB).
    #[arg(long, short = 'm', default_value = "128", value_parser = parse_mem_size)]
    pub mem: u64,
    /// Guest RAM backing: "anon" (private anonymous memory, the default), "memfd"
    /// (shared; pageable like tmpfs) or "file=PATH" (a shared mapping of a regular
    /// file, created if missing and locked while the VM runs).
    #[arg(long, default_value = "anon", value_parser = crate::memory::Backing::parse)]
    pub mem_backing: crate::memory::Backing,
    /// Back guest RAM with huge pages: "hugetlbfs" (reserved 2 MiB pages; the default
    /// when no value is given) or "thp" (transparent huge pages via madvise).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "hugetlbfs",
          default_value = "off", value_parser = crate::memory::HugePages::parse)]
    pub hugepages: crate::memory::HugePages,
    /// Populate all of guest RAM at start (no page faults later; fails at start when
    /// the host cannot give it).
    #[arg(long)]
    pub mem_prealloc: bool,
    /// Number of vCPUs.
    #[arg(long, short = 'c', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub cpus: u32,
    /// KVM device node.
    #[arg(long, default_value = "/dev/kvm")]
    pub kvm_device: PathBuf,
    /// Add the debug-exit port (0xf4, as QEMU's isa-debug-exit): a guest write of v
    /// (0 to 95) ends the VM with exit status 32 + v.
    #[arg(long)]
    pub debug_exit: bool,
    /// A virtio-blk disk on a raw image: PATH[,ro][,serial=ID] (repeatable; the first
    /// is vda). A writable image is locked: a second VM cannot open it.
    #[arg(long, value_parser = crate::devices::virtio::block::DiskConfig::parse)]
    pub disk: Vec<crate::devices::virtio::block::DiskConfig>,
    /// A virtio-net device on an existing TAP device: tap=NAME[,mac=MAC] (repeatable).
    #[arg(long, value_parser = crate::devices::virtio::net::NetConfig::parse)]
    pub net: Vec<crate::devices::virtio::net::NetConfig>,
    /// The VM's name, for `ferrite list|pause|...` [default: a generated one, printed].
    #[arg(long, value_parser = parse_name)]
    pub name: Option<String>,
    /// Serve the control API on this socket instead of <run dir>/NAME.sock.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Add a virtio-rng device (the guest's /dev/hwrng, backed by getrandom).
    #[arg(long)]
    pub rng: bool,
    /// Run without seccomp filters (by default each thread allows only the syscalls
    /// its work needs; a forbidden one ends Ferrite with status 148).
    #[arg(long)]
    pub no_seccomp: bool,
    /// Restrict file access with Landlock (where the kernel has it) to the files and
    /// directories this command line names: kernel, initrd, disks, the KVM device,
    /// /dev/net/tun, the control and vsock socket directories, the memory backing
    /// file's directory (and Ferrite's own /proc entries, read-only). A file not named
    /// here (e.g. a disk swapped in later) cannot be opened. Without Landlock in the
    /// kernel this logs a warning and runs unrestricted.
    #[arg(long)]
    pub landlock: bool,
    /// The guest's console: "serial" (ttyS0) or "virtio" (hvc0 on a virtio-console;
    /// the UART still shows early boot messages).
    #[arg(long, default_value = "serial", value_parser = parse_console)]
    pub console: crate::vm::ConsoleKind,
    /// Add a virtio-balloon device (`ferrite balloon NAME SIZE` sets how much memory
    /// it holds): optionally deflate-on-oom=on|off, stats-interval=SECONDS (0: no
    /// statistics), free-page-reporting=on|off [default: all on, statistics every 1 s].
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "OPTIONS",
          value_parser = parse_balloon)]
    pub balloon: Option<crate::devices::virtio::balloon::BalloonConfig>,
    /// Add a virtio-vsock device with Firecracker's UNIX-socket host side:
    /// cid=N,uds=PATH[,max-connections=N]. Host programs connect to PATH and write
    /// "CONNECT <port>\n"; a guest connecting to the host (CID 2) port P reaches the
    /// socket PATH_P. PATH is created at start (a stale socket there is replaced, a
    /// live one or any other file refused) and removed when Ferrite exits.
    #[arg(long, value_name = "cid=N,uds=PATH", value_parser = parse_vsock)]
    pub vsock: Option<crate::devices::virtio::vsock::VsockConfig>,
    /// Serve the metadata service (MMDS, as Firecracker's) to the guest at a link-local
    /// address on the --net interfaces: optionally version=v1|v2 [default: v2, session
    /// tokens], address=169.254.X.Y [default: 169.254.169.254], imds-compat[=on|off],
    /// net=TAP (repeatable) [default: every --net]. `ferrite mmds NAME` reads and
    /// changes the document.
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "OPTIONS",
          value_parser = parse_mmds)]
    pub mmds: Option<crate::mmds::MmdsConfig>,
    /// With --mmds: the document the MMDS starts with (a JSON file).
    #[arg(long, value_name = "FILE")]
    pub metadata: Option<PathBuf>,
    /// With --mmds: the largest document, in bytes of compact JSON [default: 51200].
    /// The control socket takes bodies of at most 64 KiB, so larger documents can be
    /// set only with --metadata or in several PATCHes.
    #[arg(long, value_name = "BYTES")]
    pub mmds_size_limit: Option<usize>,
    /// With --restore: the vsock device's host socket is PATH instead of the
    /// snapshot's (clones of one snapshot each need their own).
    #[arg(long, value_name = "PATH", requires = "restore")]
    pub vsock_uds: Option<PathBuf>,
    /// With --restore: attach the network device IFACE (the snapshot's TAP name, or
    /// the device's index 0, 1, ...) to the existing TAP device TAP instead; its MAC
    /// stays the snapshot's (repeatable).
    #[arg(long, value_name = "IFACE=TAP", requires = "restore", value_parser = parse_tap_override)]
    pub tap: Vec<(String, String)>,
    /// With --restore: the disk DISK (the snapshot's image path, or the disk's index
    /// 0, 1, ...) is the image PATH instead, of the same size: a writable image is used
    /// by one VM at a time, so clones each need their own copy (repeatable).
    #[arg(long, value_name = "DISK=PATH", requires = "restore", value_parser = parse_disk_override)]
    pub disk_path: Vec<(String, PathBuf)>,
}

fn parse_disk_override(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((disk, path)) if !disk.is_empty() && !path.is_empty() => {
            Ok((disk.to_owned(), PathBuf::from(path)))
        }
        _ => Err(format!("'{s}' is not DISK=PATH")),
    }
}

fn parse_tap_override(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((iface, tap)) if !iface.is_empty() && !tap.is_empty() => {
            Ok((iface.to_owned(), tap.to_owned()))
        }
        _ => Err(format!("'{s}' is not IFACE=TAP")),
    }
}

fn parse_vsock(s: &str) -> Result<crate::devices::virtio::vsock::VsockConfig, String> {
    crate::devices::virtio::vsock::VsockConfig::parse(s)
}

fn parse_mmds(s: &str) -> Result<crate::mmds::MmdsConfig, String> {
    crate::mmds::MmdsConfig::parse(s).map_err(|e| e.to_string())
}

/// The MMDS of `ferrite run --mmds` (its store filled from `--metadata`), or `None`
/// without `--mmds`; `--metadata` and `--mmds-size-limit` are refused without it, and
/// `--mmds` without a `--net`.
fn native_mmds(args: &RunArgs) -> Result<Option<crate::vm::MmdsAttach>, String> {
    let Some(c) = &args.mmds else {
        if args.metadata.is_some() || args.mmds_size_limit.is_some() {
            return Err("--metadata and --mmds-size-limit go with --mmds".into());
        }
        return Ok(None);
    };
    let line = |e: &crate::mmds::Error| crate::errors::chain(e);
    let taps: Vec<&str> = args.net.iter().map(|n| n.tap.as_str()).collect();
    let nets = c.answering(&taps).map_err(|e| line(&e))?;
    let limit = args
        .mmds_size_limit
        .unwrap_or(crate::mmds::store::DEFAULT_SIZE_LIMIT);
    let mut m = crate::mmds::Mmds {
        store: crate::mmds::store::Store::new(limit),
        version: c.version,
        imds_compat: c.imds_compat,
        ..crate::mmds::Mmds::default()
    };
    if let Some(path) = &args.metadata {
        let v = crate::mmds::read_metadata(path, crate::mmds::metadata_read_limit(limit))
            .map_err(|e| line(&e))?;
        m.store.put(v).map_err(|e| {
            format!(
                "the MMDS content file (--metadata) {}: {} (--mmds-size-limit {limit})",
                path.display(),
                line(&e)
            )
        })?;
    }
    Ok(Some(crate::vm::MmdsAttach {
        mmds: std::sync::Arc::new(std::sync::Mutex::new(m)),
        ipv4: c.ipv4,
        nets,
    }))
}

fn parse_balloon(s: &str) -> Result<crate::devices::virtio::balloon::BalloonConfig, String> {
    crate::devices::virtio::balloon::BalloonConfig::parse(s).map_err(|e| e.to_string())
}

fn parse_name(s: &str) -> Result<String, String> {
    crate::control::paths::validate_name(s)
        .map(|()| s.to_owned())
        .map_err(|e| e.to_string())
}

fn parse_console(s: &str) -> Result<crate::vm::ConsoleKind, String> {
    match s {
        "serial" => Ok(crate::vm::ConsoleKind::Serial),
        "virtio" => Ok(crate::vm::ConsoleKind::Virtio),
        _ => Err(format!("'{s}' is not a console kind (serial, virtio)")),
    }
}

/// The parsed `--cpu-features` list (a newtype so clap treats it as one value).
#[derive(Debug, Clone)]
pub struct HiddenFeatures(pub Vec<crate::arch::x86_64::cpuid::Feature>);

fn parse_cpu_features(s: &str) -> Result<HiddenFeatures, String> {
    crate::arch::x86_64::cpuid::parse_hidden(s)
        .map(HiddenFeatures)
        .map_err(|e| e.to_string())
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("'{s}' is not a log level (off, error, warn, info, debug, trace)"))
}

/// `--cpu-features` help: a constant, so parsing a command line builds no string (a
/// unit test keeps the list equal to `cpuid::FEATURES`).
const CPU_FEATURES_LONG_HELP: &str =
    "CPUID features to hide from the guest, e.g. \"-x2apic,-cx16\".\n\n\
     Features that can be hidden: fma, cx16, pcid, x2apic, movbe, popcnt, tsc-deadline, \
     aes, xsave, avx, f16c, rdrand, hypervisor, fsgsbase, avx2, smep, erms, invpcid, \
     rdseed, smap, clflushopt, clwb, umip, pku, rdpid, fsrm, rdtscp, kvmclock, \
     kvmclock-stable, async-pf, async-pf-int, steal-time, pv-eoi, pv-unhalt, \
     pv-tlb-flush, pv-send-ipi, pv-sched-yield.";

/// Parses `--mem`: a plain number is MiB; K/M/G/T suffixes (optionally followed by
/// `iB` or `B`) are binary multiples.
pub fn parse_mem_size(s: &str) -> Result<u64, String> {
    let bytes = crate::size::parse(s)?;
    if bytes < crate::memory::MIN_MEM_SIZE {
        return Err(format!("'{s}' is below the minimum guest memory of 1 MiB"));
    }
    if bytes > crate::memory::MAX_MEM_SIZE {
        return Err(format!("'{s}' is above the maximum guest memory of 1 TiB"));
    }
    Ok(bytes)
}

/// Log lines go to stderr. A terminal in raw mode needs the carriage return spelled
/// out, so lines end in "\r\n" when stderr is a terminal (decided once, at init) and in
/// "\n" otherwise, so logs captured to a file or pipe stay plain text.
struct StderrLogger {
    level: log::LevelFilter,
    eol: &'static str,
}

impl StderrLogger {
    fn new(level: log::LevelFilter) -> Self {
        use std::io::IsTerminal;
        Self {
            level,
            eol: line_end(std::io::stderr().is_terminal()),
        }
    }
}

fn line_end(stderr_is_terminal: bool) -> &'static str {
    if stderr_is_terminal {
        "\r\n"
    } else {
        "\n"
    }
}

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.level
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let _ = write!(
                std::io::stderr().lock(),
                "ferrite: {}: {}{}",
                r.level(),
                r.args(),
                self.eol
            );
        }
    }
    fn flush(&self) {}
}

pub(crate) fn init_logging(level: log::LevelFilter) {
    let logger = Box::leak(Box::new(StderrLogger::new(level)));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

/// What `ferrite run` does before building the VM, for running without root:
/// `PR_SET_NO_NEW_PRIVS` (also with `--no-seccomp`), the devices checked for read-write
/// access (an error naming the fix), and `--landlock` applied (on this, the only
/// thread so far). The error is one line.
fn unprivileged_start(args: &RunArgs) -> Result<(), String> {
    use crate::sandbox;
    let line = |e: &dyn std::error::Error| crate::errors::chain(e);
    sandbox::no_new_privs().map_err(|e| line(&e))?;
    sandbox::check_device_access(&args.kvm_device).map_err(|e| line(&e))?;
    if !args.net.is_empty() {
        sandbox::check_device_access(std::path::Path::new(sandbox::TUN_PATH))
            .map_err(|e| line(&e))?;
    }
    if !args.landlock {
        return Ok(());
    }
    let mut p = sandbox::Paths::default();
    p.read.extend(args.kernel.iter().cloned());
    p.read.extend(args.initrd.iter().cloned());
    for d in &args.disk {
        if d.read_only {
            p.read.push(d.path.clone());
        } else {
            p.read_write.push(d.path.clone());
        }
    }
    p.devices.push(args.kvm_device.clone());
    if !args.net.is_empty() {
        p.devices.push(sandbox::TUN_PATH.into());
    }
    // The socket directories must exist before the rule names them: created (0700)
    // here as binding would create them.
    let control_dir = match &args.api_socket {
        Some(s) => {
            let d = parent_or_dot(s);
            crate::control::paths::create_missing_dirs(&d).map_err(|e| line(&e))?;
            d
        }
        None => crate::control::paths::prepare_run_dir().map_err(|e| line(&e))?,
    };
    p.socket_dirs.push(control_dir);
    if let Some(v) = &args.vsock {
        // The vsock device does not create its directory: a missing one is its error.
        let d = parent_or_dot(&v.uds);
        if d.is_dir() {
            p.socket_dirs.push(d);
        }
    }
    if let crate::memory::Backing::File(f) = &args.mem_backing {
        p.file_dirs.push(parent_or_dot(f));
    }
    sandbox::restrict_logged(&p).map_err(|e| line(&e))?;
    Ok(())
}

fn parent_or_dot(p: &std::path::Path) -> std::path::PathBuf {
    p.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(|| ".".into(), |d| d.to_path_buf())
}

/// Runs the CLI and returns the process exit status.
pub fn main() -> i32 {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Started as `firecracker` (a link), or `ferrite firecracker ...`: Firecracker's
    // command line.
    let invoked = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_os_string());
    if invoked.as_deref() == Some(std::ffi::OsStr::new("firecracker")) {
        return crate::firecracker::run::main(args);
    }
    // Started as `jailer` (a link): Firecracker's jailer command line.
    if invoked.as_deref() == Some(std::ffi::OsStr::new("jailer")) {
        return crate::jail::jailer_main(args);
    }
    if args.get(1).map(|a| a.as_os_str()) == Some(std::ffi::OsStr::new("firecracker")) {
        return crate::firecracker::run::main(args[1..].to_vec());
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    init_logging(cli.log_level);
    match cli.command {
        Command::Run(args) => {
            crate::seccomp::set_enabled(!args.no_seccomp);
            if let Err(e) = crate::seccomp::prepare() {
                eprintln!("ferrite: error: {}", crate::errors::chain(&e));
                return 1;
            }
            // Read before Landlock (unprivileged_start) can hide the file.
            let mmds = match native_mmds(&args) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("ferrite: error: {e}");
                    return 2;
                }
            };
            if let Err(e) = unprivileged_start(&args) {
                eprintln!("ferrite: error: {e}");
                return 1;
            }
            let control = ControlConfig {
                announce: args.name.is_none(),
                name: args
                    .name
                    .unwrap_or_else(crate::control::paths::generate_name),
                socket: args.api_socket,
                optional: false,
            };
            if args.restore.is_none()
                && (args.restore_clock.is_some() || args.mem_backend.is_some())
            {
                eprintln!(
                    "ferrite: error: --restore-clock and --mem-backend go with --restore DIR"
                );
                return 2;
            }
            // clap's `requires` is not enforced for these: say it here.
            if args.restore.is_none()
                && (args.vsock_uds.is_some() || !args.tap.is_empty() || !args.disk_path.is_empty())
            {
                eprintln!(
                    "ferrite: error: --vsock-uds, --tap and --disk-path change a restored VM's \
                     devices: they go with --restore (a booted VM names its own with --vsock, \
                     --net and --disk)"
                );
                return 2;
            }
            let (kernel, dir) = match (args.kernel, args.restore) {
                (_, Some(dir)) => (PathBuf::new(), Some(dir)),
                (Some(k), None) => (k, None),
                (None, None) => {
                    eprintln!("ferrite: error: --kernel or --restore is needed");
                    return 2;
                }
            };
            if let Some(dir) = dir {
                let overrides = crate::snapshot::Overrides {
                    control: Some(control),
                    kvm_device: Some(args.kvm_device),
                    clock: args.restore_clock.unwrap_or_default(),
                    vsock_uds: args.vsock_uds,
                    taps: args.tap,
                    disks: args.disk_path,
                    ..Default::default()
                };
                let uffd = args.mem_backend.as_deref() == Some("uffd");
                return match crate::snapshot::run_from(&dir, uffd, &overrides) {
                    Ok(outcome) => report(outcome),
                    Err(e) => {
                        eprintln!("ferrite: error: {}", crate::errors::chain(&e));
                        1
                    }
                };
            }
            let cfg = VmConfig {
                kernel,
                initrd: args.initrd,
                cmdline: args.cmdline,
                hidden_features: args.cpu_features.0,
                memory: crate::memory::MemoryConfig {
                    size: args.mem,
                    backing: args.mem_backing,
                    hugepages: args.hugepages,
                    prealloc: args.mem_prealloc,
                },
                vcpus: args.cpus as usize,
                kvm_device: args.kvm_device,
                debug_exit: args.debug_exit,
                disks: args.disk,
                nets: args.net,
                rng: args.rng,
                console: args.console,
                balloon: args.balloon,
                vsock: args.vsock,
                control: Some(control),
                vcpu_thread_prefix: "ferrite-vcpu-".to_owned(),
                extras: crate::vm::Extras {
                    mmds,
                    ..crate::vm::Extras::default()
                },
            };
            match vm::run(&cfg) {
                Ok(outcome) => report(outcome),
                Err(e) => {
                    eprintln!("ferrite: error: {}", crate::errors::chain(&e));
                    1
                }
            }
        }
        Command::List(a) => control_command(|| {
            let vms = commands::list()?;
            if a.json {
                println!("{}", commands::to_json(&vms));
            } else {
                println!("{}", commands::LIST_HEADER);
                for v in &vms {
                    println!("{}", commands::info_line(v));
                }
            }
            Ok(())
        }),
        Command::Pause(a) => simple(&a, "PUT", "/vm/pause"),
        Command::Snapshot(s) => control_command(|| {
            let a = &s.vm;
            let socket = commands::socket_for(&a.name, a.api_socket.as_deref())?;
            // The VM resolves a relative directory against its own working directory:
            // name it from here.
            let dir = std::path::absolute(&s.dir).unwrap_or_else(|_| s.dir.clone());
            let v: SnapshotAnswer = commands::call_with_timeout(
                &a.name,
                &socket,
                "PUT",
                "/vm/snapshot",
                Some(&SnapshotRequest { dir }),
                commands::SNAPSHOT_TIMEOUT,
            )?;
            if a.json {
                println!("{}", commands::to_json(&v));
            } else {
                println!("{}", commands::snapshot_text(&a.name, &v));
            }
            Ok(())
        }),
        Command::Resume(a) => simple(&a, "PUT", "/vm/resume"),
        Command::Stop(s) => control_command(|| {
            let a = &s.vm;
            let socket = commands::socket_for(&a.name, a.api_socket.as_deref())?;
            let graceful = (!s.hard).then(|| s.timeout.unwrap_or(crate::graceful::DEFAULT_TIMEOUT));
            let v = commands::stop(&a.name, &socket, graceful)?;
            if a.json {
                println!("{}", commands::to_json(&v));
            } else {
                println!("{}", commands::stop_text(&v));
            }
            Ok(())
        }),
        Command::Debug(a) => control_command(|| {
            let socket = commands::socket_for(&a.name, a.api_socket.as_deref())?;
            let v = commands::debug(&a.name, &socket)?;
            if a.json {
                println!("{}", commands::to_json(&v));
            } else {
                print!("{}", commands::registers_text(&v));
            }
            Ok(())
        }),
        Command::Stat(s) => control_command(|| {
            let a = &s.vm;
            let socket = commands::socket_for(&a.name, a.api_socket.as_deref())?;
            loop {
                let v: StatsAnswer = commands::call(&a.name, &socket, "GET", "/vm/stats")?;
                if a.json {
                    println!("{}", commands::to_json(&v));
                } else {
                    print!("{}", commands::stats_text(&v));
                }
                if !s.watch {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }),
        Command::Jail(j) => crate::jail::run(*j, false),
        Command::SeccompPolicy => {
            for kind in crate::seccomp::ThreadKind::ALL {
                match crate::seccomp::allowed(kind) {
                    Ok(nrs) => {
                        let names: Vec<String> = nrs
                            .iter()
                            .map(|&nr| {
                                crate::seccomp::syscall_name(nr)
                                    .map_or_else(|| nr.to_string(), str::to_owned)
                            })
                            .collect();
                        println!("{} {} {}", kind.name(), nrs.len(), names.join(","));
                    }
                    Err(e) => {
                        eprintln!("ferrite: error: {}", crate::errors::chain(&e));
                        return 1;
                    }
                }
            }
            0
        }
        Command::Mmds(m) => control_command(|| {
            let a = &m.vm;
            let socket = commands::socket_for(&a.name, a.api_socket.as_deref())?;
            let v: serde_json::Value = match (&m.put, &m.patch) {
                (Some(f), _) => {
                    let doc = commands::mmds_document(&a.name, f)?;
                    commands::call_with(&a.name, &socket, "PUT", "/vm/mmds", Some(&doc))?
                }
                (None, Some(f)) => {
                    let doc = commands::mmds_document(&a.name, f)?;
                    commands::call_with(&a.name, &socket, "PATCH", "/vm/mmds", Some(&doc))?
                }
                (None, None) => commands::call(&a.name, &socket, "GET", "/vm/mmds")?,
            };
            // The document is JSON either way; --json asks for it compact.
            if a.json {
                println!("{}", commands::to_json(&v));
            } else {
                println!("{v:#}");
            }
            Ok(())
        }),
        Command::Balloon(b) => control_command(|| {
            let a = &b.vm;
            let socket = commands::socket_for(&a.name, a.api_socket.as_deref())?;
            let v: BalloonAnswer = match b.size {
                Some(bytes) => commands::call_with(
                    &a.name,
                    &socket,
                    "PUT",
                    "/vm/balloon",
                    Some(&BalloonRequest {
                        target: BalloonTarget::Bytes(bytes),
                    }),
                )?,
                None => commands::call(&a.name, &socket, "GET", "/vm/balloon")?,
            };
            if a.json {
                println!("{}", commands::to_json(&v));
            } else {
                println!("{}: {}", a.name, commands::balloon_text(&v));
            }
            Ok(())
        }),
    }
}

/// How a VM ended, as an exit status (said on stderr unless 0).
fn report(outcome: crate::outcome::VmOutcome) -> i32 {
    let status = outcome.exit_status();
    if status == 0 {
        log::info!("stopped: {outcome}");
    } else {
        eprintln!("ferrite: {outcome} (exit status {status})");
    }
    status
}

fn control_command(f: impl FnOnce() -> Result<(), commands::Error>) -> i32 {
    match f() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ferrite: error: {}", crate::errors::chain(&e));
            1
        }
    }
}

/// pause, resume: one request, the state it found and left.
fn simple(a: &VmArg, method: &str, path: &str) -> i32 {
    control_command(|| {
        let socket = commands::socket_for(&a.name, a.api_socket.as_deref())?;
        let v: StateAnswer = commands::call(&a.name, &socket, method, path)?;
        if a.json {
            println!("{}", commands::to_json(&v));
        } else {
            println!("{}: {} -> {}", a.name, v.state_before, v.state);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_sizes() {
        assert_eq!(parse_mem_size("128").unwrap(), 128 << 20);
        assert_eq!(parse_mem_size("16M").unwrap(), 16 << 20);
        assert_eq!(parse_mem_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_mem_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_mem_size("2048k").unwrap(), 2 << 20);
        for bad in [
            "0",
            "",
            "M",
            "12Q",
            "-1",
            "99999999999999999999",
            "2000T",
            "512K",
            "16MIBIB",
            "16MBB",
            "16BM",
            "16IB",
            "16B",
            "16MI",
            "16MiBx",
            "16KM",
            "16 M",
            "16é",
            "16Mé",
        ] {
            assert!(parse_mem_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mem_size_suffixes_any_case() {
        for (s, want) in [
            ("16m", 16 << 20),
            ("16mb", 16 << 20),
            ("16MB", 16 << 20),
            ("16mib", 16 << 20),
            ("16MiB", 16 << 20),
            ("16MIB", 16 << 20),
            ("4096K", 4 << 20),
            ("4096KiB", 4 << 20),
            ("4096kb", 4 << 20),
            ("1g", 1 << 30),
            ("1GB", 1 << 30),
            ("1t", 1 << 40),
            ("1TiB", 1 << 40),
            (" 32 ", 32 << 20),
        ] {
            assert_eq!(parse_mem_size(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn run_help_lists_every_cpu_feature() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let run = cmd.find_subcommand_mut("run").expect("run subcommand");
        let help = run.render_long_help().to_string();
        let words: Vec<&str> = help
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .collect();
        for f in crate::arch::x86_64::cpuid::FEATURES {
            assert!(
                words.contains(&f.name),
                "`ferrite run --help` does not list {}:\n{help}",
                f.name
            );
        }
    }

    fn run_args(extra: &[&str]) -> Result<Box<RunArgs>, clap::Error> {
        let mut args = vec!["ferrite", "run", "--kernel", "k"];
        args.extend(extra);
        Cli::try_parse_from(args).map(|c| match c.command {
            Command::Run(r) => r,
            _ => unreachable!(),
        })
    }

    #[test]
    fn mmds_option_parses_and_needs_a_net_and_metadata_needs_mmds() {
        let r = run_args(&["--mmds", "--net", "tap=t0"]).unwrap();
        let c = r.mmds.clone().unwrap();
        assert_eq!(c.version, crate::mmds::Version::V2);
        let a = native_mmds(&r).unwrap().unwrap();
        assert_eq!(
            (a.ipv4, a.nets.clone()),
            (crate::mmds::DEFAULT_IPV4, vec![0])
        );
        assert_eq!(a.mmds.lock().unwrap().version, crate::mmds::Version::V2);
        let r = run_args(&[
            "--net",
            "tap=t0",
            "--net",
            "tap=t1",
            "--mmds=version=v1,address=169.254.7.7,net=t1",
            "--mmds-size-limit",
            "100",
        ])
        .unwrap();
        let a = native_mmds(&r).unwrap().unwrap();
        assert_eq!(a.nets, [1]);
        assert_eq!(a.ipv4, std::net::Ipv4Addr::new(169, 254, 7, 7));
        let g = a.mmds.lock().unwrap();
        assert_eq!(
            (g.version, g.store.limit()),
            (crate::mmds::Version::V1, 100)
        );
        drop(g);
        // Refusals: no --net, an unknown TAP, --metadata or a limit without --mmds, a
        // bad option, and --mmds with --restore.
        let e = native_mmds(&run_args(&["--mmds"]).unwrap()).unwrap_err();
        assert!(e.contains("--net tap=NAME"), "{e}");
        let e = native_mmds(&run_args(&["--mmds=net=t9", "--net", "tap=t0"]).unwrap());
        assert!(e.unwrap_err().contains("'t9'"));
        for alone in [&["--metadata", "m.json"][..], &["--mmds-size-limit", "9"]] {
            let e = native_mmds(&run_args(alone).unwrap()).unwrap_err();
            assert!(e.contains("go with --mmds"), "{e}");
        }
        assert!(run_args(&["--mmds=address=10.0.0.1"]).is_err());
        assert!(Cli::try_parse_from(["ferrite", "run", "--restore", "d", "--mmds"]).is_err());
        assert!(native_mmds(&run_args(&[]).unwrap()).unwrap().is_none());
    }

    #[test]
    fn mmds_metadata_file_fills_the_store_and_an_over_limit_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("ferrite-cli-mmds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("m.json");
        std::fs::write(&f, r#"{ "latest": { "id": "i-1" } }"#).unwrap();
        let path = f.to_str().unwrap();
        let r = run_args(&["--net", "tap=t0", "--mmds", "--metadata", path]).unwrap();
        let a = native_mmds(&r).unwrap().unwrap();
        assert_eq!(
            a.mmds.lock().unwrap().store.get(),
            &serde_json::json!({"latest": {"id": "i-1"}})
        );
        let r = run_args(&[
            "--net",
            "tap=t0",
            "--mmds",
            "--metadata",
            path,
            "--mmds-size-limit",
            "10",
        ])
        .unwrap();
        let e = native_mmds(&r).unwrap_err();
        assert!(e.contains("m.json") && e.contains("doesn't fit"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mmds_command_takes_put_or_patch_not_both() {
        let m = Cli::try_parse_from(["ferrite", "mmds", "vm", "--patch", "-"]).unwrap();
        match m.command {
            Command::Mmds(m) => assert_eq!((m.put, m.patch), (None, Some("-".into()))),
            _ => unreachable!(),
        }
        assert!(
            Cli::try_parse_from(["ferrite", "mmds", "vm", "--put", "a", "--patch", "b"]).is_err()
        );
    }

    #[test]
    fn balloon_option_with_and_without_a_value() {
        let run = |extra: &[&str]| {
            let mut args = vec!["ferrite", "run", "--kernel", "k"];
            args.extend(extra);
            Cli::try_parse_from(args).map(|c| match c.command {
                Command::Run(r) => r.balloon,
                _ => unreachable!(),
            })
        };
        use crate::devices::virtio::balloon::BalloonConfig;
        assert_eq!(run(&[]).unwrap(), None);
        assert_eq!(run(&["--balloon"]).unwrap(), Some(BalloonConfig::default()));
        assert_eq!(
            run(&["--balloon", "--rng"]).unwrap(),
            Some(BalloonConfig::default())
        );
        let c = run(&["--balloon", "stats-interval=5,free-page-reporting=off"])
            .unwrap()
            .unwrap();
        assert_eq!(c.stats_interval, std::time::Duration::from_secs(5));
        assert!(!c.free_page_reporting && c.deflate_on_oom);
        let e = run(&["--balloon", "stats=1"]).unwrap_err().to_string();
        assert!(e.contains("unknown option 'stats'"), "{e}");
        let b = Cli::try_parse_from(["ferrite", "balloon", "vm", "64M", "--json"]).unwrap();
        match b.command {
            Command::Balloon(b) => assert_eq!((b.size, b.vm.json), (Some(64 << 20), true)),
            _ => unreachable!(),
        }
        assert!(Cli::try_parse_from(["ferrite", "balloon", "vm", "lots"]).is_err());
    }

    #[test]
    fn vsock_option_reaches_the_run_arguments_and_bad_values_are_refused() {
        let run = |extra: &[&str]| {
            let mut args = vec!["ferrite", "run", "--kernel", "k"];
            args.extend(extra);
            Cli::try_parse_from(args).map(|c| match c.command {
                Command::Run(r) => r.vsock,
                _ => unreachable!(),
            })
        };
        assert_eq!(run(&[]).unwrap(), None);
        let v = run(&["--vsock", "cid=9,uds=/tmp/v.sock,max-connections=4"])
            .unwrap()
            .unwrap();
        assert_eq!(
            (v.cid, v.uds.to_str(), v.max_connections),
            (9, Some("/tmp/v.sock"), 4)
        );
        let e = run(&["--vsock", "cid=1,uds=/tmp/v.sock"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--vsock") && e.contains("reserved"), "{e}");
        assert!(run(&["--vsock"]).is_err());
    }

    #[test]
    fn stop_timeouts() {
        use std::time::Duration;
        assert_eq!(parse_timeout("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_timeout("0.5"), Ok(Duration::from_millis(500)));
        for bad in ["0", "-1", "", "x", "1e9", "NaN", "inf"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
        let cli = Cli::try_parse_from(["ferrite", "stop", "vm1"]).unwrap();
        let Command::Stop(s) = cli.command else {
            panic!("not stop")
        };
        assert!(!s.hard && s.timeout.is_none());
        assert!(
            Cli::try_parse_from(["ferrite", "stop", "vm1", "--hard", "--timeout", "3"]).is_err()
        );
    }

    #[test]
    fn log_line_end_follows_stderr() {
        assert_eq!(line_end(true), "\r\n");
        assert_eq!(line_end(false), "\n");
    }
}
