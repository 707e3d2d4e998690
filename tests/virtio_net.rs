//! virtio-net on a TAP device: the test makes a network namespace of its own with a
//! TAP in it, runs Ferrite (tier-A kernel, `ferrite.test=net`) inside that namespace,
//! and exchanges data with the guest both ways over TCP (busybox `nc` in the guest;
//! sockets on a test thread that has joined the namespace on the host).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(300);
const HOST: &str = "10.0.2.1";
const GUEST: &str = "10.0.2.2";

fn kernel_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_recipe("tests/guests/linux/build-tier-a.sh"))
}

/// A network namespace, deleted (with its TAP) when dropped.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("ferrite-{tag}-{}", std::process::id());
        // A namespace left by a killed earlier run: gone first (usually there is none).
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        sh("ip", &["netns", "add", &name]);
        Netns(name)
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.0];
        all.extend_from_slice(args);
        sh("ip", &all);
    }

    /// Moves the calling thread into the namespace (network namespaces are per thread).
    fn enter(&self) {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.0)).expect("open netns");
        // SAFETY: setns(2) on a namespace fd we own; it changes only this thread's
        // network namespace.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn guest_exchanges_data_with_the_host_both_ways() {
    if !require_kvm() || !require_root("network tests need root (network namespaces, TAP devices)")
    {
        return;
    }
    let d = kernel_dir();
    let ns = Netns::new("net");
    ns.ip(&["tuntap", "add", "dev", "ftap0", "mode", "tap"]);
    ns.ip(&["addr", "add", &format!("{HOST}/24"), "dev", "ftap0"]);
    ns.ip(&["link", "set", "ftap0", "up"]);
    ns.ip(&["link", "set", "lo", "up"]);
    let payload = data(64 * 1024, 0);

    // Host side of guest -> host: a listener in the namespace, ready before the boot.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let ns_name = ns.0.clone();
    let receiver = std::thread::spawn(move || {
        Netns(ns_name.clone()).enter_and_forget();
        let l = TcpListener::bind((HOST, 5002)).expect("bind 5002 in the namespace");
        l.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        let start = Instant::now();
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(start.elapsed() < DEADLINE, "the guest never connected");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 ferrite.test=net ferrite.ip={GUEST}/24 ferrite.peer={HOST}"
    );
    let kernel = d.join("vmlinux");
    let initrd = d.join("initramfs.cpio.gz");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0, env!("CARGO_BIN_EXE_ferrite"), "run"])
        .args(["--kernel", kernel.to_str().unwrap()])
        .args(["--initrd", initrd.to_str().unwrap()])
        .args(["--mem", "256", "--net", "tap=ftap0", "--cmdline", &cmdline]);
    let mut f = Spawned::start(cmd, false);

    let up = f.out.wait_for("NET-UP", DEADLINE);
    // Host -> guest: connect (retrying until the guest's nc listens) and send.
    let ns_name = ns.0.clone();
    let to_send = payload.clone();
    let sender = std::thread::spawn(move || {
        Netns(ns_name).enter_and_forget();
        let start = Instant::now();
        let mut s = loop {
            match TcpStream::connect((GUEST, 5001)) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(start.elapsed() < Duration::from_secs(120), "connect: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        };
        s.write_all(&to_send).expect("send to the guest");
        s.shutdown(Shutdown::Write).unwrap();
    });
    if up {
        sender.join().expect("sender");
    }
    let status = f.expect_exit(DEADLINE);
    let text = f.stdout();
    let ctx = f.ctx();
    assert!(up, "no NET-UP: {ctx}");
    assert_eq!(status.code(), Some(0), "{ctx}");
    assert_eq!(
        field(&text, "NET_RX_BYTES").map(str::trim),
        Some(payload.len().to_string().as_str()),
        "{ctx}"
    );
    let rx_md5 = field(&text, "NET_RX_MD5").map(|v| v.split_whitespace().next().unwrap_or(""));
    assert_eq!(rx_md5, Some(md5(&payload).as_str()), "host -> guest: {ctx}");
    let back = receiver.join().expect("receiver");
    assert_eq!(back.len(), payload.len(), "guest -> host length: {ctx}");
    assert!(back == payload, "guest -> host bytes differ: {ctx}");
    assert_eq!(field(&text, "NET_TX"), Some("0"), "{ctx}");
}

impl Netns {
    /// Enters the namespace without owning it (the test's `Netns` deletes it).
    fn enter_and_forget(self) {
        self.enter();
        std::mem::forget(self);
    }
}
