//! The microVM metadata service (MMDS, issue 19) seen from a tier-A Linux guest, through
//! the Firecracker front door (`firecracker`: Ferrite through a link of that name, or a
//! real Firecracker named by `FERRITE_FC_UNDER_TEST`, to check that these tests describe
//! Firecracker's behaviour). Two boots in all: the V2 checks through the API socket, and
//! flintlock's start (V1, `--no-api`, `mmds-config` in the config file, `--metadata`).
//!
//! The guest reads with busybox: `wget -q -O -` (non-2xx answers make it print
//! `server returned error: HTTP/1.1 <status>` and fail) and, for the token's `PUT`
//! (which wget cannot send), `nc` with the request typed by `printf`. The VMM runs in a
//! network namespace of the test's own with one TAP; host-side sockets live on threads
//! that joined that namespace.

mod common;

use common::fc::{firecracker_in, scratch, tier_a_dir, Api};
use common::{data, md5, require_kvm, require_root, sh, wait_until, Spawned};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Boot deadline for the tier-A guest: 8–10 s alone, 60–100 s measured while other
/// builds loaded the 2 cores.
const BOOT: Duration = Duration::from_secs(300);
/// One guest command (a few process starts at ~0.4 s each in the emulated guest).
const CMD: Duration = Duration::from_secs(120);
const BASE_ARGS: &str = "console=ttyS0 reboot=k panic=-1";
const MMDS: &str = "169.254.169.254";
const HOST_IP: &str = "10.0.8.1";
const GUEST_IP: &str = "10.0.8.2";
/// The V2 boot's `--mmds-size-limit`, bytes of the serialized document.
const SIZE_LIMIT: usize = 2048;

/// One guest boot at a time in this binary: two emulated guest kernels on a 2-core host
/// would starve each other past the deadlines.
static ONE_BOOT: Mutex<()> = Mutex::new(());

fn one_boot() -> std::sync::MutexGuard<'static, ()> {
    ONE_BOOT.lock().unwrap_or_else(|p| p.into_inner())
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn kernel() -> PathBuf {
    tier_a_dir().join("vmlinux")
}

fn initrd() -> PathBuf {
    tier_a_dir().join("initramfs.cpio.gz")
}

/// A network namespace holding the TAP `tap0` (up, with `addr` if given), deleted with
/// it when dropped.
struct Netns {
    name: String,
    file: File,
}

impl Netns {
    fn with_tap(tag: &str, addr: Option<&str>) -> Netns {
        let name = format!("ferrite-mmds-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        sh("ip", &["netns", "add", &name]);
        sh(
            "ip",
            &["-n", &name, "tuntap", "add", "dev", "tap0", "mode", "tap"],
        );
        if let Some(a) = addr {
            sh("ip", &["-n", &name, "addr", "add", a, "dev", "tap0"]);
        }
        sh("ip", &["-n", &name, "link", "set", "tap0", "up"]);
        sh("ip", &["-n", &name, "link", "set", "lo", "up"]);
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

    /// Runs `f` on a new thread inside this namespace (namespaces are per thread).
    fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let file = self.file.try_clone().expect("dup the netns fd");
        std::thread::spawn(move || {
            // SAFETY: setns(2) on a namespace fd this thread owns; it changes only this
            // thread's network namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The VMM with the guest's busybox shell on its console.
struct Guest {
    vmm: Spawned,
    /// Where the answer to the last typed line starts in the console output.
    mark: usize,
}

impl Guest {
    fn spawn(cmd: Command) -> Guest {
        Guest {
            vmm: Spawned::start(cmd, true),
            mark: 0,
        }
    }

    fn type_line(&mut self, line: &str) {
        self.mark = self.vmm.out.0.lock().unwrap().len();
        self.vmm.send(format!("{line}\n").as_bytes());
    }

    /// The value of the first complete `KEY=` line written since the last typed line
    /// (the console's echo of that line starts with the prompt, and a wrapped echo's
    /// `KEY=$...` is skipped).
    fn wait_key(&mut self, key: &str, deadline: Duration) -> Option<String> {
        let pre = format!("{key}=");
        let mut found = None;
        wait_until(deadline, || {
            let text = {
                let b = self.vmm.out.0.lock().unwrap();
                String::from_utf8_lossy(&b[self.mark.min(b.len())..]).into_owned()
            };
            found = text
                .split_inclusive('\n')
                .filter(|l| l.ends_with('\n'))
                .map(|l| l.trim_end_matches(['\n', '\r']))
                .filter_map(|l| l.strip_prefix(&pre))
                .find(|v| !v.starts_with('$'))
                .map(str::to_owned);
            found.is_some() || self.vmm.exited()
        });
        found
    }

    /// Runs `cmd` (keep it short: the console echoes and wraps long lines) and returns
    /// the value of the answer line `KEY=...`; fails the test without one.
    fn ask(&mut self, cmd: &str, key: &str) -> String {
        self.type_line(cmd);
        self.wait_key(key, CMD)
            .unwrap_or_else(|| panic!("no {key}= after `{cmd}`: {}", self.ctx()))
    }

    fn wait_for_shell(&mut self) {
        assert!(
            self.vmm.out.wait_for("busybox shell on the console", BOOT),
            "no busybox shell: {}",
            self.ctx()
        );
        assert_eq!(self.ask("echo SHELL=$((6*7))", "SHELL"), "42");
    }

    fn ctx(&self) -> String {
        let t = self.vmm.out.text();
        let tail: String = t
            .chars()
            .skip(t.chars().count().saturating_sub(4000))
            .collect();
        format!(
            "console (last 4000 chars):\n{tail}\nstderr:\n{}",
            self.vmm.err.text()
        )
    }
}

/// The first word of a guest `md5sum` answer.
fn word(v: &str) -> &str {
    v.split_whitespace().next().unwrap_or_default()
}

/// Shell lines that make the guest's MMDS requests short to type: `M` the base URL,
/// `g URL` a GET with the session token `$T` (IMDS format: no `Accept`), `j URL` the
/// same asking for JSON; both print wget's error (with the HTTP status) on failure.
const HELPERS: &[&str] = &[
    "M=http://169.254.169.254",
    "g() { wget -q -O - --header \"X-metadata-token: $T\" \"$@\" 2>&1; }",
    "j() { g --header 'Accept: application/json' \"$@\"; }",
];

/// MMDS V2 in one boot, the guest on eth0 (10.0.8.2/24 on the TAP, a host route to
/// 169.254.169.254 through eth0):
/// - without a token, and with a made-up one, a GET answers 401;
/// - `PUT /latest/api/token` (TTL header) answers 200 with a token; with it the guest
///   reads the document as a JSON tree, a leaf as JSON and as IMDS text, an object as
///   the IMDS listing (objects with a trailing `/`), and a missing path as 404;
/// - `PATCH /mmds` on the API at run time: the guest's next read sees the merge;
/// - a `PUT /mmds` or `PATCH /mmds` whose result is over `--mmds-size-limit` is refused
///   (Firecracker answers 413 Payload Too Large, not 400, with a `fault_message`), the
///   document stays as it was (API and guest);
/// - the guest's own TCP traffic on the same interface works beside it: a stream to a
///   host socket is held open (the host does not read) and a stream from the host keeps
///   arriving while the MMDS requests run; both arrive whole (md5 both ways).
#[test]
fn v2_guest_reads_tokened_tree_leaf_listing_and_runtime_patch_beside_tap_traffic() {
    if !require_kvm() || !require_root("MMDS tests need root (network namespaces, TAP devices)") {
        return;
    }
    let _one = one_boot();
    let dir = scratch("mmds-v2");
    let fc = firecracker_in(&dir);
    let sock = dir.join("api.sock");
    let net = Netns::with_tap("v2", Some(&format!("{HOST_IP}/24")));

    // guest -> host: a listener that accepts but reads nothing until `drain` is set.
    let drain = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let d = drain.clone();
    let receiver = net.spawn(move || {
        let l = TcpListener::bind((HOST_IP, 5002)).expect("bind 5002 in the namespace");
        ready_tx.send(()).unwrap();
        l.set_nonblocking(true).unwrap();
        let start = Instant::now();
        let mut c = loop {
            match l.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(start.elapsed() < BOOT, "the guest never connected to 5002");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        c.set_nonblocking(false).unwrap();
        while !d.load(Ordering::Relaxed) && start.elapsed() < BOOT {
            std::thread::sleep(Duration::from_millis(20));
        }
        c.set_read_timeout(Some(CMD)).unwrap();
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        got
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let mut cmd = Command::new(&fc);
    cmd.args(["--api-sock", s(&sock), "--id", "mmds-v2"])
        .args(["--mmds-size-limit", &SIZE_LIMIT.to_string()]);
    net.apply(&mut cmd);
    let mut g = Guest::spawn(cmd);
    let mut api = Api::connect(&sock, Duration::from_secs(10));
    let put = |api: &mut Api, path: &str, body: &str| {
        let r = api.put(path, body);
        assert_eq!(r.status, 204, "PUT {path} {body}: {r:?}");
    };
    put(
        &mut api,
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":256}"#,
    );
    put(
        &mut api,
        "/boot-source",
        &serde_json::json!({
            "kernel_image_path": s(&kernel()),
            "initrd_path": s(&initrd()),
            "boot_args": BASE_ARGS
        })
        .to_string(),
    );
    put(
        &mut api,
        "/network-interfaces/eth0",
        r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:0a:00:08:02"}"#,
    );
    put(
        &mut api,
        "/mmds/config",
        r#"{"version":"V2","network_interfaces":["eth0"]}"#,
    );
    let doc = serde_json::json!({
        "latest": {
            "meta-data": {
                "ami-id": "ami-12345678",
                "reservation-id": "r-fea54097",
                "network": { "interfaces": { "macs": {
                    "06:00:0a:00:08:02": { "device-number": "0" }
                } } }
            }
        }
    });
    put(&mut api, "/mmds", &doc.to_string());
    let r = api.get("/mmds");
    assert_eq!((r.status, r.json()), (200, doc.clone()), "GET /mmds: {r:?}");
    put(&mut api, "/actions", r#"{"action_type":"InstanceStart"}"#);
    g.wait_for_shell();

    let up = g.ask(
        &format!("ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up; echo UP=$?"),
        "UP",
    );
    assert_eq!(up, "0", "{}", g.ctx());
    let route = g.ask(&format!("ip route add {MMDS} dev eth0; echo RT=$?"), "RT");
    assert_eq!(route, "0", "{}", g.ctx());
    for line in HELPERS {
        g.type_line(line);
    }

    // The guest's own traffic, started before the MMDS requests and running beside them.
    let out_len = 256 * 1024;
    let made = g.ask(
        "dd if=/dev/urandom of=/tmp/out bs=1024 count=256 2>/dev/null; echo MADE=$?",
        "MADE",
    );
    assert_eq!(made, "0");
    let out_md5 = g.ask("echo OUTMD5=$(md5sum </tmp/out)", "OUTMD5");
    // Background jobs must not read the console: busybox nc polls its stdin, and a
    // background read of the terminal stops it (SIGTTIN). From /dev/null it half-closes
    // at once and goes on receiving.
    g.type_line(&format!(
        "nc {HOST_IP} 5002 </tmp/out & nc -l -p 5001 </dev/null >/tmp/in &"
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let sender = net.spawn(move || {
        let start = Instant::now();
        let mut c = loop {
            match TcpStream::connect((GUEST_IP, 5001)) {
                Ok(c) => break c,
                Err(e) => {
                    assert!(start.elapsed() < CMD, "connect to the guest's 5001: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        // A guest that stops reading fails the test rather than hanging it.
        c.set_write_timeout(Some(CMD)).unwrap();
        let mut sent = Vec::new();
        let mut seed = 1;
        // At least 16 chunks, then until told to stop: the stream spans the MMDS checks
        // (at ~20 KiB/s: a few MiB in the guest's RAM at most).
        while sent.len() < 16 * 1024 || !st.load(Ordering::Relaxed) {
            let chunk = data(1024, seed);
            seed += 1;
            c.write_all(&chunk).expect("send to the guest");
            sent.extend_from_slice(&chunk);
            std::thread::sleep(Duration::from_millis(50));
        }
        c.shutdown(Shutdown::Write).unwrap();
        // The guest's nc closes once it has read everything.
        c.set_read_timeout(Some(CMD)).unwrap();
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        sent
    });
    // The host->guest stream is flowing before the MMDS requests start.
    let flowing = g.ask(
        "while [ ! -s /tmp/in ]; do sleep 1; done; echo FLOWING=yes",
        "FLOWING",
    );
    assert_eq!(flowing, "yes");

    // No token / a made-up token: 401.
    let none = g.ask("echo \"NOTOKEN=$(wget -q -O - $M/latest 2>&1)\"", "NOTOKEN");
    assert!(none.contains("401"), "GET without a token: {none:?}");
    let bad = g.ask("T=x; echo \"BADTOKEN=$(g $M/latest)\"", "BADTOKEN");
    assert!(bad.contains("401"), "GET with a made-up token: {bad:?}");

    // PUT /latest/api/token through nc: the status line, then the token as the body.
    g.type_line(
        "printf 'PUT /latest/api/token HTTP/1.1\\r\\nX-metadata-token-ttl-seconds: 60\\r\\n\\r\\n' >/tmp/put",
    );
    let status = g.ask(
        &format!("nc {MMDS} 80 </tmp/put >/tmp/tok; echo \"PUTST=$(head -n 1 /tmp/tok)\""),
        "PUTST",
    );
    assert!(
        status.starts_with("HTTP/1.1 200"),
        "PUT /latest/api/token: {status:?}"
    );
    let token = g.ask("T=$(tail -n 1 </tmp/tok); echo \"TOKEN=$T\"", "TOKEN");
    assert!(
        token.len() >= 16 && token.bytes().all(|b| b.is_ascii_graphic()),
        "token {token:?}"
    );

    // With the token: the tree as JSON, a leaf as JSON and as text, the listing, 404.
    let tree = g.ask("echo \"TREE=$(j $M/latest/meta-data)\"", "TREE");
    let tree: serde_json::Value = serde_json::from_str(&tree)
        .unwrap_or_else(|e| panic!("the tree is not JSON ({e}): {tree:?}"));
    assert_eq!(tree, doc["latest"]["meta-data"]);
    let leaf = g.ask("echo \"LEAFJ=$(j $M/latest/meta-data/ami-id)\"", "LEAFJ");
    assert_eq!(leaf, "\"ami-12345678\"");
    let leaf = g.ask("echo \"LEAF=$(g $M/latest/meta-data/ami-id)\"", "LEAF");
    assert_eq!(leaf, "ami-12345678");
    let list = g.ask("echo LIST=$(g $M/latest/meta-data)", "LIST");
    let mut list: Vec<&str> = list.split_whitespace().collect();
    list.sort_unstable();
    assert_eq!(list, ["ami-id", "network/", "reservation-id"], "listing");
    let deep = g.ask("echo DEEP=$(g $M/latest/meta-data/network)", "DEEP");
    assert_eq!(deep, "interfaces/");
    let missing = g.ask("echo \"MISSING=$(g $M/latest/nothing)\"", "MISSING");
    assert!(missing.contains("404"), "a missing path: {missing:?}");

    // PATCH at run time: the next read sees it.
    let r = api.patch(
        "/mmds",
        r#"{"latest":{"meta-data":{"ami-id":"ami-87654321","reservation-id":null}}}"#,
    );
    assert_eq!(r.status, 204, "PATCH /mmds: {r:?}");
    let leaf = g.ask(
        "echo \"PATCHED=$(g $M/latest/meta-data/ami-id)\"",
        "PATCHED",
    );
    assert_eq!(leaf, "ami-87654321");
    let list = g.ask("echo LIST2=$(g $M/latest/meta-data)", "LIST2");
    let mut list: Vec<&str> = list.split_whitespace().collect();
    list.sort_unstable();
    assert_eq!(list, ["ami-id", "network/"], "listing after the PATCH");

    // Over the size limit: refused, the document unchanged.
    let before = api.get("/mmds");
    assert_eq!(before.status, 200);
    let big = "x".repeat(SIZE_LIMIT);
    let r = api.put(
        "/mmds",
        &serde_json::json!({ "latest": { "big": big } }).to_string(),
    );
    assert_eq!(r.status, 413, "PUT /mmds over the limit: {r:?}");
    assert!(!r.fault().is_empty());
    let r = api.patch(
        "/mmds",
        &serde_json::json!({ "latest": { "big": big } }).to_string(),
    );
    assert_eq!(r.status, 413, "PATCH /mmds over the limit: {r:?}");
    assert!(!r.fault().is_empty());
    let after = api.get("/mmds");
    assert_eq!(
        after.json(),
        before.json(),
        "the document after refused updates"
    );
    let leaf = g.ask("echo \"KEPT=$(g $M/latest/meta-data/ami-id)\"", "KEPT");
    assert_eq!(leaf, "ami-87654321");
    let big_read = g.ask("echo \"NOBIG=$(g $M/latest/big)\"", "NOBIG");
    assert!(big_read.contains("404"), "{big_read:?}");

    // A new document by PUT at run time replaces the old one.
    put(
        &mut api,
        "/mmds",
        r#"{"latest":{"meta-data":{"ami-id":"ami-new"}}}"#,
    );
    let leaf = g.ask(
        "echo \"REPLACED=$(g $M/latest/meta-data/ami-id)\"",
        "REPLACED",
    );
    assert_eq!(leaf, "ami-new");

    // The guest's traffic beside it: both streams arrive whole.
    stop.store(true, Ordering::Relaxed);
    drain.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("the host->guest sender");
    let got = receiver.join().expect("the guest->host receiver");
    let done = g.ask("wait; echo DONE=yes", "DONE");
    assert_eq!(done, "yes");
    let in_len = g.ask("echo INLEN=$(wc -c </tmp/in)", "INLEN");
    assert_eq!(in_len, sent.len().to_string(), "host->guest length");
    let in_md5 = g.ask("echo INMD5=$(md5sum </tmp/in)", "INMD5");
    assert_eq!(word(&in_md5), md5(&sent), "host->guest bytes");
    assert_eq!(got.len(), out_len, "guest->host length");
    assert_eq!(md5(&got), word(&out_md5), "guest->host bytes");

    g.type_line("reboot -f");
    let st = g.vmm.wait_exit(Duration::from_secs(60));
    assert!(st.is_some(), "still running after reboot: {}", g.ctx());
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
}

/// flintlock's start, as read in liquidmetal-dev/flintlock commit 71121229036d
/// (2026-07-19): infrastructure/microvm/firecracker/create.go (Create: the arguments;
/// startFirecracker; ensureState), config.go (WithMicroVM: `mmds-config` version V1
/// naming the interfaces that allow metadata requests; WithState: logger and metrics;
/// DefaultKernelCmdLine with `ds=nocloud-net;s=http://169.254.169.254/latest/`),
/// types.go (the config file's and the metadata file's keys: `{"latest": {key:
/// string}}`), state.go (file names; SetConfig/SetMetadata write JSON indented by one
/// space; metadata values are base64-decoded before they are written),
/// core/application/commands.go (addMetadataInterface: the interface `eth0`, a TAP
/// that allows metadata requests, MAC AA:FF:00:00:00:01, static address
/// 169.254.0.1/16; addInstanceData: `instance_id` in meta-data), core/steps/network/
/// interface_create.go (that TAP is not attached to a bridge), core/steps/cloudinit/
/// disk_mount.go (vendor-data: `## template: jinja\n#cloud-config\n\n` and YAML) and
/// client/cloudinit (the keys meta-data, user-data, vendor-data). Facts replayed:
/// - `firecracker --id <uid> --boot-timer --no-api --config-file <state>/firecracker.cfg
///   --metadata <state>/metadata.json`, stdin empty, stdout and stderr appended to
///   files, the log and metrics files created empty beforehand;
/// - the guest reads what cloud-init's nocloud-net source reads from
///   `http://169.254.169.254/latest/`: meta-data, user-data, vendor-data, each the exact
///   bytes of the string in the metadata file, with plain GETs (V1, no token); and the
///   `latest` object's IMDS listing has those three keys.
///
/// Deviations: initramfs boot (no root drive: the tier-A guest needs none), `panic=-1`;
/// the guest configures eth0 by hand with flintlock's static address (cloud-init is not
/// in the tier-A guest).
#[test]
fn flintlock_start_guest_reads_its_cloud_init_metadata_over_v1() {
    if !require_kvm() || !require_root("MMDS tests need root (network namespaces, TAP devices)") {
        return;
    }
    let _one = one_boot();
    let dir = scratch("mmds-flintlock");
    let fc = firecracker_in(&dir);
    let uid = "01KFLINTLOCKMMDS0000000000";
    let state = dir.join("ns").join("name").join(uid);
    std::fs::create_dir_all(&state).unwrap();
    let log = state.join("firecracker.log");
    let metrics = state.join("firecracker.metrics");
    File::create(&log).unwrap();
    File::create(&metrics).unwrap();

    let args = format!(
        "{BASE_ARGS} pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd ds=nocloud-net;s=http://169.254.169.254/latest/"
    );
    // Go's json.MarshalIndent(cfg, "", " ") of flintlock's VmmConfig, fields in its
    // struct order (no balloon, no vsock: omitted when unset).
    let config = format!(
        r#"{{
 "drives": [],
 "boot-source": {{
  "kernel_image_path": {kernel},
  "boot_args": {args},
  "initrd_path": {initrd}
 }},
 "logger": {{
  "log_path": {log},
  "level": "Debug",
  "show_level": true,
  "show_log_origin": true
 }},
 "machine-config": {{
  "vcpu_count": 1,
  "mem_size_mib": 256,
  "smt": true,
  "track_dirty_pages": false
 }},
 "metrics": {{
  "metrics_path": {metrics}
 }},
 "mmds-config": {{
  "version": "V1",
  "network_interfaces": [
   "eth0"
  ]
 }},
 "network-interfaces": [
  {{
   "iface_id": "eth0",
   "host_dev_name": "tap0",
   "guest_mac": "AA:FF:00:00:00:01"
  }}
 ]
}}"#,
        kernel = serde_json::json!(s(&kernel())),
        args = serde_json::json!(args),
        initrd = serde_json::json!(s(&initrd())),
        log = serde_json::json!(s(&log)),
        metrics = serde_json::json!(s(&metrics)),
    );
    let cfg_path = state.join("firecracker.cfg");
    std::fs::write(&cfg_path, &config).unwrap();
    let meta_data = format!("instance_id: {uid}\nlocal_hostname: name\n");
    let user_data = "#cloud-config\nhostname: name\nfinal_message: The system is up\n";
    let vendor_data = "## template: jinja\n#cloud-config\n\nmounts:\n- - vdb\n  - /data\n";
    let metadata = format!(
        "{{\n \"latest\": {{\n  \"meta-data\": {},\n  \"user-data\": {},\n  \"vendor-data\": {}\n }}\n}}",
        serde_json::json!(meta_data),
        serde_json::json!(user_data),
        serde_json::json!(vendor_data)
    );
    let meta_path = state.join("metadata.json");
    std::fs::write(&meta_path, &metadata).unwrap();

    // flintlock's metadata TAP is not attached to anything on the host.
    let net = Netns::with_tap("flintlock", None);
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
    cmd.args(["--id", uid, "--boot-timer", "--no-api"])
        .args(["--config-file", s(&cfg_path)])
        .args(["--metadata", s(&meta_path)]);
    net.apply(&mut cmd);
    // flintlock gives an empty stdin and appends the output to files; the test needs the
    // console, so it keeps the output in memory as well: stderr goes to flintlock's
    // file, stdout (the console) to the test, which appends it to flintlock's file.
    let mut g = Guest {
        vmm: Spawned::with_stdio(
            cmd,
            Stdio::piped(),
            Stdio::piped(),
            Stdio::from(open_append(&stderr_path)),
        ),
        mark: 0,
    };
    let ctx = |g: &Guest| {
        format!(
            "{}\nstderr file:\n{}\nlog:\n{}",
            g.ctx(),
            std::fs::read_to_string(&stderr_path).unwrap_or_default(),
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };
    if !g.vmm.out.wait_for("busybox shell on the console", BOOT) {
        panic!("no shell: {}", ctx(&g));
    }
    assert_eq!(g.ask("echo SHELL=$((6*7))", "SHELL"), "42");

    let up = g.ask(
        "ip addr add 169.254.0.1/16 dev eth0 && ip link set eth0 up; echo UP=$?",
        "UP",
    );
    assert_eq!(up, "0", "{}", ctx(&g));
    let seed = "http://169.254.169.254/latest";
    let list = g.ask(
        &format!("echo LATEST=$(wget -q -O - {seed} 2>&1)"),
        "LATEST",
    );
    let mut list: Vec<&str> = list.split_whitespace().collect();
    list.sort_unstable();
    assert_eq!(
        list,
        ["meta-data", "user-data", "vendor-data"],
        "{}",
        ctx(&g)
    );
    for (key, want) in [
        ("meta-data", meta_data.as_str()),
        ("user-data", user_data),
        ("vendor-data", vendor_data),
    ] {
        let tag = key.replace('-', "").to_uppercase();
        let got = g.ask(
            &format!("wget -q -O /tmp/{key} {seed}/{key}; echo {tag}=$?,$(md5sum </tmp/{key})"),
            &tag,
        );
        let (rc, sum) = got.split_once(',').unwrap_or((&got, ""));
        assert_eq!(rc, "0", "GET {seed}/{key}: {}", ctx(&g));
        assert_eq!(
            word(sum),
            md5(want.as_bytes()),
            "{key}: not the bytes of the metadata file"
        );
    }
    let first = g.ask("read l </tmp/meta-data; echo \"FIRST=$l\"", "FIRST");
    assert_eq!(first, format!("instance_id: {uid}"));

    // flintlock's Delete: SIGHUP, then the process exits.
    common::kill(g.vmm.pid(), libc::SIGHUP);
    let st = g.vmm.wait_exit(Duration::from_secs(15));
    assert!(st.is_some(), "still running 15 s after SIGHUP: {}", ctx(&g));
    let mut f = open_append(&stdout_path);
    let _ = f.write_all(g.vmm.out.text().as_bytes());
    assert!(
        !std::fs::read_to_string(&log).unwrap_or_default().is_empty(),
        "nothing in the log file"
    );
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
}
