//! Replays of what real Firecracker clients do, step by step, against the binary under
//! test started as `firecracker` (Ferrite through a link of that name, or a real
//! Firecracker named by `FERRITE_FC_UNDER_TEST` to check that each replay describes
//! Firecracker's behaviour). Each replay was written from reading the client's source;
//! its doc comment names the files and the commit read. One tier-A guest boot per
//! replay; the boots run one at a time (timings are asserted).
//!
//! The tier-A guest's deviations from a production guest, everywhere: it boots from
//! its initramfs (`initrd_path`), and its console is the test's pipe.

mod common;

use common::fc::{firecracker_in, is_ferrite, scratch, tier_a_dir, Api};
use common::{complete_field, kill, pump, require_kvm, require_root, sh, wait_until, SharedBuf};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Boot deadline for the tier-A guest: 8–10 s alone on this kind of host, but 60–100 s
/// were measured while other builds loaded the 2 cores.
const BOOT: Duration = Duration::from_secs(300);
/// The guest's base command line.
const BASE_ARGS: &str = "console=ttyS0 reboot=k panic=-1";

/// One guest boot at a time in this binary: the replays assert request latencies and
/// client timeouts, which a second emulated guest kernel on a 2-core host would skew.
static ONE_BOOT: Mutex<()> = Mutex::new(());

fn one_boot() -> std::sync::MutexGuard<'static, ()> {
    ONE_BOOT.lock().unwrap_or_else(|p| p.into_inner())
}

fn kernel() -> PathBuf {
    tier_a_dir().join("vmlinux")
}

fn initrd() -> PathBuf {
    tier_a_dir().join("initramfs.cpio.gz")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A JSON string literal.
fn js(v: &str) -> String {
    serde_json::Value::String(v.to_owned()).to_string()
}

/// A network namespace holding one TAP device `tap0`, deleted (with the TAP) when
/// dropped. The VMM is started inside it, as the go SDK does with `NetNS`.
struct Netns {
    name: String,
    file: File,
}

impl Netns {
    fn with_tap(tag: &str) -> Netns {
        let name = format!("ferrite-fcc-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        sh("ip", &["netns", "add", &name]);
        sh(
            "ip",
            &["-n", &name, "tuntap", "add", "dev", "tap0", "mode", "tap"],
        );
        sh("ip", &["-n", &name, "link", "set", "tap0", "up"]);
        let file = File::open(format!("/var/run/netns/{name}")).expect("open the netns");
        Netns { name, file }
    }

    /// Makes `cmd` start inside this namespace.
    fn apply(&self, cmd: &mut Command) {
        let fd = self.file.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and calls only
        // setns(2), which is async-signal-safe; `fd` stays open in the parent (and so
        // in the child) until after spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The VMM process: its console output collected, its console input writable; killed
/// when dropped if still running.
struct Vmm {
    child: Child,
    out: SharedBuf,
    stdin: Option<ChildStdin>,
    started: Instant,
}

impl Vmm {
    /// Starts `cmd` with stdout piped into a buffer, stdin piped when `input`.
    fn spawn(mut cmd: Command, input: bool) -> Vmm {
        cmd.stdin(if input { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let started = Instant::now();
        let mut child = cmd.spawn().expect("start the VMM");
        let out = SharedBuf::default();
        pump(child.stdout.take().expect("stdout piped"), out.clone());
        let stdin = child.stdin.take();
        Vmm {
            child,
            out,
            stdin,
            started,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to end within `deadline`; None if it is still running.
    fn wait(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + deadline;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return Some(st);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Types one line on the guest console.
    fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("console input");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to the guest console");
    }

    /// Runs `cmd` in the guest shell and returns the value of the answer line
    /// `key=...` (keep `cmd` short: the console echoes it and wraps long lines).
    fn ask(&mut self, cmd: &str, key: &str, deadline: Duration) -> Option<String> {
        self.type_line(cmd);
        let mut v = None;
        wait_until(deadline, || {
            v = complete_field(&self.out.text(), key).filter(|v| !v.starts_with('$'));
            v.is_some()
        });
        v
    }

    /// Waits until the busybox shell under busybox init answers (init's signal
    /// handlers are in place from then on).
    fn wait_for_shell(&mut self) {
        assert!(
            self.out.wait_for("FERRITE-USERSPACE", BOOT),
            "the guest did not reach userspace: {}",
            self.ctx()
        );
        assert!(
            self.out.wait_for("busybox shell on the console", BOOT),
            "no busybox shell: {}",
            self.ctx()
        );
        let answer = self.ask("echo SHELL=$((6*7))", "SHELL", BOOT);
        assert_eq!(answer.as_deref(), Some("42"), "{}", self.ctx());
        eprintln!(
            "process start -> guest shell answers: {:?}",
            self.started.elapsed()
        );
    }

    fn ctx(&self) -> String {
        let t = self.out.text();
        let tail: String = t
            .chars()
            .skip(t.chars().count().saturating_sub(3000))
            .collect();
        format!("console/stdout (last 3000 chars):\n{tail}")
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Collects what arrives in a FIFO: opened for reading without blocking (as Kata's
/// fifo package and a late reader do), polled until dropped.
struct FifoReader {
    buf: SharedBuf,
    stop: Arc<AtomicBool>,
}

impl FifoReader {
    fn start(path: &Path) -> FifoReader {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .unwrap_or_else(|e| panic!("open the FIFO {} for reading: {e}", path.display()));
        let buf = SharedBuf::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (mut b, st) = (buf.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut chunk = [0u8; 65536];
            while !st.load(Ordering::Relaxed) {
                match f.read(&mut chunk) {
                    Ok(n) if n > 0 => {
                        let _ = b.write_all(&chunk[..n]);
                    }
                    // No writer yet / for now, or nothing buffered: poll again.
                    _ => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FifoReader { buf, stop }
    }

    /// Waits for a complete line containing `needle` and returns it.
    fn wait_line(&self, needle: &str, deadline: Duration) -> Option<String> {
        let mut found = None;
        wait_until(deadline, || {
            found = self
                .buf
                .text()
                .split_inclusive('\n')
                .find(|l| l.ends_with('\n') && l.contains(needle))
                .map(|l| l.trim_end().to_owned());
            found.is_some()
        });
        found
    }
}

impl Drop for FifoReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn mkfifo(path: &Path, mode: u32) {
    let c = std::ffi::CString::new(s(path)).expect("path without NUL");
    // SAFETY: mkfifo(3) with a valid NUL-terminated path; no memory is retained.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), mode) };
    assert_eq!(
        rc,
        0,
        "mkfifo {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// An ext4 image of `mib` MiB.
fn ext4_image(path: &Path, mib: u64) {
    let f = File::create(path).expect("create the image");
    f.set_len(mib << 20).expect("size the image");
    drop(f);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", s(path)])
        .output()
        .expect("run mkfs.ext4");
    assert!(
        out.status.success(),
        "mkfs.ext4 {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A raw disk image of `len` bytes starting with the line `first_line`.
fn raw_image(path: &Path, first_line: &str, len: u64) {
    let mut f = File::create(path).expect("create the image");
    f.write_all(format!("{first_line}\n").as_bytes())
        .expect("write the image");
    f.set_len(len).expect("size the image");
}

/// Pseudo-random 64-bit values, different per call and per run.
fn random_u64() -> u64 {
    static SEED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let mut x =
        t ^ (u64::from(std::process::id()) << 32) ^ SEED.fetch_add(0x9e37_79b9, Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// A random version-4 UUID, the go SDK's default VMID form.
fn uuid_v4() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

/// A ULID (26 characters of Crockford base32: 48-bit millisecond time, 80 random
/// bits), flintlock's VM UID form.
fn ulid() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let rand =
        (u128::from(random_u64()) << 16 | u128::from(random_u64() & 0xffff)) & ((1 << 80) - 1);
    let v = (ms & ((1 << 48) - 1)) << 80 | rand;
    (0..26)
        .rev()
        .map(|i| ALPHABET[((v >> (5 * i)) & 31) as usize] as char)
        .collect()
}

/// Sends one request on `api`, asserting its status and that the answer came within
/// `limit` (the client's own timeout for that call); returns the body.
fn call_within(
    api: &mut Api,
    method: &str,
    path: &str,
    body: Option<&str>,
    status: u16,
    limit: Duration,
) -> String {
    let t = Instant::now();
    let r = api.call(method, path, body);
    let took = t.elapsed();
    assert_eq!(r.status, status, "{method} {path} {body:?}: {r:?}");
    assert!(
        took <= limit,
        "{method} {path} took {took:?}, over the client's {limit:?} timeout"
    );
    eprintln!("{method} {path}: {} in {took:?}", r.status);
    r.body
}

/// The vCPU threads of `pid` as Kata finds them: every thread whose comm starts with
/// `fc_vcpu`, the rest (spaces trimmed) parsed as the vCPU index.
fn kata_vcpu_threads(pid: u32) -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return found;
    };
    for e in dir.flatten() {
        let Ok(comm) = std::fs::read_to_string(e.path().join("comm")) else {
            continue;
        };
        let comm = comm.trim_end_matches('\n');
        if let Some(rest) = comm.strip_prefix("fc_vcpu") {
            let idx: u32 = rest
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("Kata cannot parse the thread name {comm:?}"));
            let tid: u32 = e.file_name().to_string_lossy().parse().unwrap_or(0);
            found.push((idx, tid));
        }
    }
    found.sort();
    found
}

/// Kata's parse of `firecracker --version`: the first line's second word, without a
/// leading `v`, as a semantic version (MAJOR.MINOR.PATCH, optional -pre/+build).
fn kata_parse_version(out: &str) -> Option<(u64, u64, u64)> {
    let first = out.split('\n').next()?;
    let word = first.split(' ').nth(1)?;
    let v = word.trim().trim_start_matches('v');
    let core = v.split(['-', '+']).next()?;
    let mut it = core.split('.');
    let mut num = || -> Option<u64> {
        let p = it.next()?;
        if p.is_empty()
            || !p.bytes().all(|b| b.is_ascii_digit())
            || (p.len() > 1 && p.starts_with('0'))
        {
            return None;
        }
        p.parse().ok()
    };
    let v = (num()?, num()?, num()?);
    if it.next().is_some() {
        return None;
    }
    Some(v)
}

/// firecracker-go-sdk's `NewMachine` + `Machine.Start` + `Shutdown` + `Wait`, as read
/// in firecracker-go-sdk commit 6fb280e993d4 (2025-12-24, v1.0.0-166): machine.go
/// (NewMachine, configureBuilder, seccompArgs, startVMM, waitForSocket, setupLogging,
/// setupMetrics, createMachine, refreshMachineConfiguration, createBootSource,
/// attachDrive, createNetworkInterface, addVsock, startInstance, Shutdown/sendCtrlAltDel),
/// handlers.go (defaultFcInitHandlerList order, CreateLogFilesHandler/createFifo,
/// AddVsocksHandler), client/models/vsock.go,
/// firecracker.go (request timeouts: 500 ms, PUT /drives 250 ms), command_builder.go,
/// client_transports.go (net/http over the socket: one keep-alive connection),
/// drives.go (root drive id `root_drive`). Facts replayed:
/// - the process: `firecracker --api-sock S --id <uuid> --no-seccomp` (the SDK's
///   default: VMID a random UUID, seccomp disabled), started inside `NetNS`;
/// - readiness: GET /machine-config answered 200 within 3 s of the start;
/// - the log and metrics FIFOs made by the SDK (mode 0700) with no reader, then
///   PUT /logger, PUT /metrics; PUT + GET /machine-config; PUT /boot-source;
///   PUT /drives/root_drive; PUT /network-interfaces/1 (the SDK numbers interfaces
///   from 1); PUT /vsock (AddVsocks, after the interfaces; here one device, ID "1",
///   CID 3: the socket exists once it is answered); PUT /actions InstanceStart — each 204/200 within the SDK's timeout
///   (bodies end in a newline, as Go's JSON encoder writes them);
/// - Shutdown on x86_64 = PUT /actions SendCtrlAltDel, then Wait: exit status 0.
///
/// The SDK itself reads neither FIFO unless asked; the test reads them after start
/// (as a user's log collector would) and expects the metrics line written at start.
#[test]
fn go_sdk_machine_start_and_ctrl_alt_del_shutdown() {
    if !require_kvm()
        || !require_root("the client replays need root (network namespaces, TAP devices)")
    {
        return;
    }
    let _one = one_boot();
    let dir = scratch("gosdk");
    let fc = firecracker_in(&dir);
    let sock = dir.join("firecracker.sock");
    let log_fifo = dir.join("log.fifo");
    let metrics_fifo = dir.join("metrics.fifo");
    let rootfs = dir.join("rootfs.ext4");
    ext4_image(&rootfs, 8);
    let net = Netns::with_tap("gosdk");

    // Config.Validate: the socket path must not exist yet.
    assert!(!sock.exists());
    let vmid = uuid_v4();
    let mut cmd = Command::new(&fc);
    cmd.args(["--api-sock", s(&sock), "--id", &vmid, "--no-seccomp"]);
    net.apply(&mut cmd);
    let mut vm = Vmm::spawn(cmd, true);

    // waitForSocket: every 10 ms, stat the socket, then GET /machine-config; 3 s in all.
    let init_timeout = Duration::from_secs(3);
    let mut api = loop {
        if sock.exists() {
            break Api::connect(&sock, init_timeout.saturating_sub(vm.started.elapsed()));
        }
        assert!(
            vm.started.elapsed() < init_timeout,
            "no API socket {} within {init_timeout:?} (the SDK gives up)",
            sock.display()
        );
        assert!(vm.child.try_wait().unwrap().is_none(), "the VMM exited");
        std::thread::sleep(Duration::from_millis(10));
    };
    let req = Duration::from_millis(500);
    call_within(&mut api, "GET", "/machine-config", None, 200, req);
    let ready = vm.started.elapsed();
    eprintln!("process start -> GET /machine-config answered: {ready:?}");
    assert!(ready < init_timeout, "ready after {ready:?}");

    // CreateLogFilesHandler: the SDK makes both FIFOs; nobody reads them yet.
    mkfifo(&log_fifo, 0o700);
    mkfifo(&metrics_fifo, 0o700);
    let logger = format!(
        r#"{{"level":"Debug","log_path":{},"show_level":true,"show_log_origin":false}}"#,
        js(s(&log_fifo))
    );
    call_within(&mut api, "PUT", "/logger", Some(&logger), 204, req);
    let metrics = format!(r#"{{"metrics_path":{}}}"#, js(s(&metrics_fifo)));
    call_within(&mut api, "PUT", "/metrics", Some(&metrics), 204, req);

    // createMachine: PUT, then GET to refresh the SDK's copy.
    call_within(
        &mut api,
        "PUT",
        "/machine-config",
        Some(r#"{"mem_size_mib":128,"smt":false,"vcpu_count":1}"#),
        204,
        req,
    );
    let mc = call_within(&mut api, "GET", "/machine-config", None, 200, req);
    let mc: serde_json::Value = serde_json::from_str(&mc).expect("machine-config JSON");
    assert_eq!(mc["vcpu_count"], 1, "{mc}");
    assert_eq!(mc["mem_size_mib"], 128, "{mc}");
    assert_eq!(mc["smt"], false, "{mc}");

    let boot = format!(
        r#"{{"boot_args":{},"initrd_path":{},"kernel_image_path":{}}}"#,
        js(BASE_ARGS),
        js(s(&initrd())),
        js(s(&kernel()))
    );
    call_within(&mut api, "PUT", "/boot-source", Some(&boot), 204, req);
    let drive = format!(
        r#"{{"drive_id":"root_drive","is_read_only":false,"is_root_device":true,"path_on_host":{}}}"#,
        js(s(&rootfs))
    );
    call_within(
        &mut api,
        "PUT",
        "/drives/root_drive",
        Some(&drive),
        204,
        Duration::from_millis(250),
    );
    call_within(
        &mut api,
        "PUT",
        "/network-interfaces/1",
        Some(r#"{"guest_mac":"AA:FC:00:00:00:01","host_dev_name":"tap0","iface_id":"1"}"#),
        204,
        req,
    );
    // AddVsocks: one VsockDevice{ID: "1", Path, CID: 3}; its socket is there at once.
    let vsock = dir.join("vsock.sock");
    call_within(
        &mut api,
        "PUT",
        "/vsock",
        Some(&format!(
            r#"{{"guest_cid":3,"uds_path":{},"vsock_id":"1"}}"#,
            js(s(&vsock))
        )),
        204,
        req,
    );
    assert!(vsock.exists(), "no vsock socket after PUT /vsock");
    call_within(
        &mut api,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
        204,
        req,
    );

    // A log collector attached after start finds the metrics written at start.
    let metrics_rd = FifoReader::start(&metrics_fifo);
    let log_rd = FifoReader::start(&log_fifo);
    let line = metrics_rd
        .wait_line("utc_timestamp_ms", Duration::from_secs(10))
        .expect("no metrics line in the metrics FIFO after InstanceStart");
    let m: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("metrics line is not JSON ({e}): {line}"));
    assert!(m["utc_timestamp_ms"].is_u64(), "{line}");
    assert!(
        wait_until(Duration::from_secs(10), || !log_rd.buf.text().is_empty()),
        "nothing in the log FIFO"
    );

    vm.wait_for_shell();

    // Shutdown (x86_64): SendCtrlAltDel, then Wait for the process.
    call_within(
        &mut api,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"SendCtrlAltDel"}"#),
        204,
        req,
    );
    let st = vm.wait(Duration::from_secs(60));
    let ctx = vm.ctx();
    let st = st.unwrap_or_else(|| panic!("still running 60 s after SendCtrlAltDel: {ctx}"));
    assert_eq!(
        st.code(),
        Some(0),
        "exit status after Ctrl-Alt-Del: {st}; {ctx}"
    );
    // Firecracker leaves the vsock socket behind; Ferrite removes what it created.
    if is_ferrite() {
        assert!(!vsock.exists(), "the vsock socket was left behind");
    }
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Kata Containers `fc` hypervisor driver, as read in kata-containers commit
/// 7c6ba40c54ea (2026-08-22, 4.1.0-23): src/runtime/virtcontainers/fc.go
/// (getVersionNumber/parseVersion/checkVersion, fcInit, waitVMMRunning/vmRunning,
/// fcInitConfiguration, createDiskPool/createJailedDrive, fcSetLogger/fcSetMetrics/
/// fcListenToFifo, fcAddVsock, fcAddNetDevice, hotplugBlockDevice/fcUpdateBlockDrive,
/// GetThreadIDs, fcEnd), types/fcConfig.go (the config file's keys) and
/// utils/utils.go (WaitLocalProcess). Facts replayed:
/// - `firecracker --version`: first line's second word a semver >= 0.21.1;
/// - without the jailer: `firecracker --api-sock <root>/run/firecracker.socket
///   --config-file <dir>/fcConfig.json` (tab-indented JSON: boot-source,
///   machine-config with `smt: false`, vsock `root` CID 3, logger + metrics on FIFOs
///   Kata made and reads, a read-only non-root `rootfs` drive and 8 placeholder
///   drives `drive_0`..`drive_7` backed by empty files, a network interface with
///   empty rate limiters);
/// - `GET /` every 10 ms until `state` is `Running`, within 10 s; the vsock socket
///   then exists (Kata chmods it 0640);
/// - hot-plug: the file behind `drive_0`'s path is replaced (Kata bind-mounts; here a
///   rename) and `PATCH /drives/drive_0` names the same path; the guest sees the disk;
/// - vCPU threads found by the name `fc_vcpu N`;
/// - stop: SIGTERM, then the process must be gone within 15 s.
///
/// Deviations: the guest boots from the initramfs (Kata's boot-source has no
/// initrd), `console=ttyS0` (Kata's debug mode) with the console on the test's pipes
/// (Kata gives no stdin), and `panic=-1` instead of `panic=1`.
#[test]
fn kata_config_file_boot_hotplug_by_patch_and_sigterm() {
    if !require_kvm()
        || !require_root("the client replays need root (network namespaces, TAP devices)")
    {
        return;
    }
    let _one = one_boot();
    let dir = scratch("kata");
    let fc = firecracker_in(&dir);

    // checkVersion.
    let out = Command::new(&fc)
        .arg("--version")
        .output()
        .expect("run --version");
    assert!(out.status.success(), "--version: {}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let v = kata_parse_version(&text)
        .unwrap_or_else(|| panic!("Kata cannot parse the version from {text:?}"));
    assert!(
        v >= (0, 21, 1),
        "version {v:?} is below Kata's minimum 0.21.1"
    );

    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let sock = run.join("firecracker.socket");
    let hvsock = dir.join("kata.hvsock");
    let rootfs = dir.join("rootfs");
    raw_image(&rootfs, "KATA-ROOTFS", 1 << 20);
    let mut drives = vec![format!(
        "\t\t{{\n\t\t\t\"drive_id\": \"rootfs\",\n\t\t\t\"is_read_only\": true,\n\t\t\t\"is_root_device\": false,\n\t\t\t\"path_on_host\": {}\n\t\t}}",
        js(s(&rootfs))
    )];
    for i in 0..8 {
        let p = dir.join(format!("drive_{i}"));
        File::create(&p).expect("create a placeholder drive");
        drives.push(format!(
            "\t\t{{\n\t\t\t\"drive_id\": \"drive_{i}\",\n\t\t\t\"is_read_only\": false,\n\t\t\t\"is_root_device\": false,\n\t\t\t\"path_on_host\": {}\n\t\t}}",
            js(s(&p))
        ));
    }
    // fcListenToFifo: Kata makes the FIFOs and reads them before the VMM starts.
    let log_fifo = dir.join("logs.fifo");
    let metrics_fifo = dir.join("metrics.fifo");
    mkfifo(&log_fifo, 0o600);
    mkfifo(&metrics_fifo, 0o600);
    let log_rd = FifoReader::start(&log_fifo);
    let metrics_rd = FifoReader::start(&metrics_fifo);

    let args = format!("{BASE_ARGS} pci=off iommu=off net.ifnames=0 random.trust_cpu=on acpi=off");
    let vsock = format!(
        "\t\"vsock\": {{\n\t\t\"guest_cid\": 3,\n\t\t\"uds_path\": {hv},\n\t\t\"vsock_id\": \"root\"\n\t}},\n",
        hv = js(s(&hvsock))
    );
    let config = format!(
        "{{\n\t\"boot-source\": {{\n\t\t\"kernel_image_path\": {kernel},\n\t\t\"initrd_path\": {initrd},\n\t\t\"boot_args\": {args}\n\t}},\n\
         \t\"machine-config\": {{\n\t\t\"mem_size_mib\": 128,\n\t\t\"smt\": false,\n\t\t\"vcpu_count\": 1\n\t}},\n\
         {vsock}\
         \t\"logger\": {{\n\t\t\"level\": \"Debug\",\n\t\t\"log_path\": {log}\n\t}},\n\
         \t\"metrics\": {{\n\t\t\"metrics_path\": {met}\n\t}},\n\
         \t\"drives\": [\n{drives}\n\t],\n\
         \t\"network-interfaces\": [\n\t\t{{\n\t\t\t\"guest_mac\": \"02:00:ca:fe:00:01\",\n\t\t\t\"host_dev_name\": \"tap0\",\n\t\t\t\"iface_id\": \"eth0\",\n\t\t\t\"rx_rate_limiter\": {{}},\n\t\t\t\"tx_rate_limiter\": {{}}\n\t\t}}\n\t]\n}}",
        kernel = js(s(&kernel())),
        initrd = js(s(&initrd())),
        args = js(&args),
        log = js(s(&log_fifo)),
        met = js(s(&metrics_fifo)),
        drives = drives.join(",\n"),
    );
    let config_path = dir.join("fcConfig.json");
    std::fs::write(&config_path, &config).unwrap();
    std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o640)).unwrap();

    let net = Netns::with_tap("kata");
    let mut cmd = Command::new(&fc);
    cmd.args(["--api-sock", s(&sock), "--config-file", s(&config_path)]);
    net.apply(&mut cmd);
    let mut vm = Vmm::spawn(cmd, true);

    // waitVMMRunning: GET / every 10 ms until Running; 10 s.
    let mut api: Option<Api> = None;
    let running = loop {
        if api.is_none() && sock.exists() {
            let left = Duration::from_secs(10).saturating_sub(vm.started.elapsed());
            api = Some(Api::connect(&sock, left));
        }
        if let Some(a) = api.as_mut() {
            let r = a.get("/");
            assert_eq!(r.status, 200, "GET /: {r:?}");
            if r.json()["state"] == "Running" {
                break vm.started.elapsed();
            }
        }
        assert!(
            vm.started.elapsed() < Duration::from_secs(10),
            "not Running within Kata's 10 s: {}",
            vm.ctx()
        );
        assert!(
            vm.child.try_wait().unwrap().is_none(),
            "exited: {}",
            vm.ctx()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!("process start -> GET / says Running: {running:?}");
    let mut api = api.expect("connected");
    // StartVM: chmod 0640 of the vsock socket.
    std::fs::set_permissions(&hvsock, std::fs::Permissions::from_mode(0o640))
        .unwrap_or_else(|e| panic!("chmod {} (Kata's StartVM): {e}", hvsock.display()));

    // GetThreadIDs.
    let pid = vm.pid();
    let mut vcpus = Vec::new();
    wait_until(Duration::from_secs(5), || {
        vcpus = kata_vcpu_threads(pid);
        !vcpus.is_empty()
    });
    assert_eq!(
        vcpus.iter().map(|v| v.0).collect::<Vec<_>>(),
        vec![0],
        "vCPU threads named fc_vcpu N: {vcpus:?}"
    );

    vm.wait_for_shell();
    let before = vm.ask("read n < /sys/block/vdb/size; echo SZ0=$n", "SZ0", BOOT);
    assert_eq!(
        before.as_deref(),
        Some("0"),
        "placeholder size: {}",
        vm.ctx()
    );

    // hotplugBlockDevice: the disk goes behind drive_0's path, then PATCH, same path.
    let placeholder = dir.join("drive_0");
    let disk = dir.join("drive_0.new");
    raw_image(&disk, "KATA-HOTPLUG-DISK", 4 << 20);
    std::fs::rename(&disk, &placeholder).unwrap();
    let patch = format!(
        r#"{{"drive_id":"drive_0","path_on_host":{}}}"#,
        js(s(&placeholder))
    );
    let r = api.patch("/drives/drive_0", &patch);
    assert_eq!(r.status, 204, "PATCH /drives/drive_0: {r:?}");

    // The guest sees the new capacity (8192 sectors of 512 bytes) and the new data.
    let mut size = None;
    for i in 1..=20 {
        let key = format!("SZ{i}");
        size = vm.ask(
            &format!("read n < /sys/block/vdb/size; echo {key}=$n"),
            &key,
            Duration::from_secs(30),
        );
        if size.as_deref() == Some("8192") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        size.as_deref(),
        Some("8192"),
        "vdb after PATCH: {}",
        vm.ctx()
    );
    let data = vm.ask("read l < /dev/vdb; echo DISK=$l", "DISK", BOOT);
    assert_eq!(data.as_deref(), Some("KATA-HOTPLUG-DISK"), "{}", vm.ctx());

    // Kata read its FIFOs all along: the metrics line written at boot is JSON.
    let line = metrics_rd
        .wait_line("utc_timestamp_ms", Duration::from_secs(10))
        .expect("no metrics line in Kata's metrics FIFO");
    serde_json::from_str::<serde_json::Value>(&line)
        .unwrap_or_else(|e| panic!("metrics line is not JSON ({e}): {line}"));
    assert!(!log_rd.buf.text().is_empty(), "nothing in Kata's log FIFO");

    // fcEnd: SIGTERM, then up to 15 s for the process to go.
    kill(pid, libc::SIGTERM);
    let st = vm.wait(Duration::from_secs(15));
    assert!(
        st.is_some(),
        "still running 15 s after SIGTERM: {}",
        vm.ctx()
    );
    eprintln!("after SIGTERM: {:?}", st.map(|s| (s.code(), s.signal())));
    // Firecracker leaves the vsock socket behind (Kata removes its directory);
    // Ferrite removes what it created.
    if is_ferrite() {
        assert!(!hvsock.exists(), "the vsock socket was left behind");
    }
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The flintlock firecracker provider, as read in liquidmetal-dev/flintlock commit
/// 71121229036d (2026-07-19, v0.11.0): infrastructure/microvm/firecracker/create.go
/// (Create: the arguments, startFirecracker, ensureState), config.go (CreateConfig,
/// WithMicroVM, WithState, DefaultKernelCmdLine), types.go (the config file's keys),
/// state.go (file names) and provider.go (Delete: SIGHUP; State; Metrics: the last
/// line of the metrics file). Facts replayed:
/// - `firecracker --id <ULID> --boot-timer --no-api --config-file <state>/firecracker.cfg
///   --metadata <state>/metadata.json`, stdin empty, stdout and stderr appended to
///   files, the log and metrics files created (empty, regular) beforehand;
/// - the config: drives (root, cache_type Unsafe), boot-source, logger (Debug,
///   show_level, show_log_origin), machine-config (`smt: true` on amd64,
///   `track_dirty_pages: false`), metrics, mmds-config V1 on the interface,
///   network-interfaces;
/// - the last line of the metrics file is JSON; the log has the boot timer's
///   `Guest-boot-time =` line;
/// - Delete: SIGHUP and wait for the process to exit (Firecracker: status 156).
///
/// Deviations: initramfs boot; `panic=-1`; flintlock's default kernel arguments
/// otherwise.
#[test]
fn flintlock_no_api_boot_timer_and_sighup_delete() {
    if !require_kvm()
        || !require_root("the client replays need root (network namespaces, TAP devices)")
    {
        return;
    }
    let _one = one_boot();
    let dir = scratch("flintlock");
    let fc = firecracker_in(&dir);
    let uid = ulid();
    let state = dir.join("ns").join("name").join(&uid);
    std::fs::create_dir_all(&state).unwrap();
    let log = state.join("firecracker.log");
    let metrics = state.join("firecracker.metrics");
    // ensureState: both files exist (empty) before the VMM starts.
    File::create(&log).unwrap();
    File::create(&metrics).unwrap();
    let rootfs = state.join("root.ext4");
    ext4_image(&rootfs, 8);

    let args = format!(
        "{BASE_ARGS} pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd ds=nocloud-net;s=http://169.254.169.254/latest/"
    );
    let config = serde_json::json!({
        "drives": [{
            "drive_id": "root",
            "path_on_host": s(&rootfs),
            "is_root_device": true,
            "is_read_only": false,
            "cache_type": "Unsafe"
        }],
        "boot-source": {
            "kernel_image_path": s(&kernel()),
            "initrd_path": s(&initrd()),
            "boot_args": args
        },
        "logger": {
            "log_path": s(&log),
            "level": "Debug",
            "show_level": true,
            "show_log_origin": true
        },
        "machine-config": {
            "vcpu_count": 1,
            "mem_size_mib": 128,
            "smt": true,
            "track_dirty_pages": false
        },
        "metrics": { "metrics_path": s(&metrics) },
        "mmds-config": { "version": "V1", "network_interfaces": ["eth0"] },
        "network-interfaces": [{
            "iface_id": "eth0",
            "host_dev_name": "tap0",
            "guest_mac": "02:00:00:fc:00:01"
        }]
    });
    let cfg_path = state.join("firecracker.cfg");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let meta_path = state.join("metadata.json");
    std::fs::write(
        &meta_path,
        r##"{
 "latest": {
  "meta-data": "instance_id: ns/name\nlocal_hostname: name\n",
  "user-data": "#cloud-config\n"
 }
}"##,
    )
    .unwrap();

    let net = Netns::with_tap("flintlock");
    let stdout_path = state.join("firecracker.stdout");
    let stderr_path = state.join("firecracker.stderr");
    let open_append = |p: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap()
    };
    let mut cmd = Command::new(&fc);
    cmd.args(["--id", &uid, "--boot-timer", "--no-api"])
        .args(["--config-file", s(&cfg_path)])
        .args(["--metadata", s(&meta_path)])
        .stdin(Stdio::null())
        .stdout(open_append(&stdout_path))
        .stderr(open_append(&stderr_path));
    net.apply(&mut cmd);
    let started = Instant::now();
    let mut child = cmd.spawn().expect("start the VMM");
    let pid = child.id();
    std::fs::write(state.join("firecracker.pid"), pid.to_string()).unwrap();
    let stdout = || std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let ctx = || {
        format!(
            "stdout:\n{}\nstderr:\n{}\nlog:\n{}",
            stdout(),
            std::fs::read_to_string(&stderr_path).unwrap_or_default(),
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };

    let reached = wait_until(BOOT, || {
        stdout().contains("FERRITE-USERSPACE") || child.try_wait().unwrap().is_some()
    });
    assert!(
        reached && stdout().contains("FERRITE-USERSPACE"),
        "no userspace: {}",
        ctx()
    );
    eprintln!(
        "process start -> FERRITE-USERSPACE: {:?}",
        started.elapsed()
    );
    // State(): the process is running.
    assert!(child.try_wait().unwrap().is_none(), "exited: {}", ctx());

    // Metrics(): the last line of the metrics file is JSON.
    let last_metrics = || {
        std::fs::read_to_string(&metrics)
            .unwrap_or_default()
            .lines()
            .last()
            .map(str::to_owned)
    };
    assert!(
        wait_until(Duration::from_secs(10), || last_metrics().is_some()),
        "nothing in the metrics file: {}",
        ctx()
    );
    let line = last_metrics().unwrap_or_default();
    let m: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("metrics line is not JSON ({e}): {line}"));
    assert!(m["utc_timestamp_ms"].is_u64(), "{line}");

    // The boot timer's line. Ferrite's guest marker (the tier-A init writes 0x7b to
    // I/O port 0xf5) is not Firecracker's (123 written to MMIO 0xc0000000), so a real
    // Firecracker never logs it for this guest: asserted only for Ferrite.
    if is_ferrite() {
        assert!(
            wait_until(Duration::from_secs(10), || std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("Guest-boot-time = ")),
            "no Guest-boot-time line in the log: {}",
            ctx()
        );
    }
    assert!(
        !std::fs::read_to_string(&log).unwrap_or_default().is_empty(),
        "nothing in the log file: {}",
        ctx()
    );

    // Delete: SIGHUP, then wait for the process to exit.
    let lines_before = std::fs::read_to_string(&metrics)
        .unwrap_or_default()
        .lines()
        .count();
    kill(pid, libc::SIGHUP);
    let end = Instant::now() + Duration::from_secs(15);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running 15 s after SIGHUP: {}", ctx());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(st.code(), Some(156), "exit after SIGHUP: {st}; {}", ctx());
    let lines_after = std::fs::read_to_string(&metrics)
        .unwrap_or_default()
        .lines()
        .count();
    assert!(
        lines_after > lines_before,
        "no metrics line written on SIGHUP ({lines_before} -> {lines_after})"
    );
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `firecracker --version`, parsed the way Kata's fc.go (commit 7c6ba40c54ea,
/// getVersionNumber/parseVersion) parses it: the first line is
/// `Firecracker v<MAJOR.MINOR.PATCH>`; exit status 0.
#[test]
fn version_first_line_is_firecracker_v_semver() {
    let dir = scratch("version");
    let fc = firecracker_in(&dir);
    let out = Command::new(&fc)
        .arg("--version")
        .output()
        .expect("run --version");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "--version: {text}");
    let first = text.lines().next().unwrap_or_default();
    assert_eq!(first.split(' ').next(), Some("Firecracker"), "{first:?}");
    assert!(
        first.split(' ').nth(1).is_some_and(|w| w.starts_with('v')),
        "{first:?}"
    );
    assert!(kata_parse_version(&text).is_some(), "{first:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
