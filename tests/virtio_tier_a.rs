//! Tier A with Ferrite's virtio-mmio devices: the project's small Linux (see
//! tests/linux_tier_a.rs) with virtio-blk disks (`--disk`), virtio-rng (`--rng`) and
//! virtio-console (`--console virtio`), driven by the test init's `ferrite.test=virtio`
//! and `ferrite.test=hvc` modes (tests/guests/linux/init documents their output).
//!
//! Guest kernel code is emulated on the project's hosts (~25-45 s per boot), so one
//! boot serves several tests: the disk and RNG tests share `disks_boot()` and each
//! asserts its own part of that boot's outcome.
//!
//! Host tools: mkfs.ext4, debugfs and e2fsck (e2fsprogs), md5sum (coreutils).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::OnceLock;
use std::time::Duration;

/// Bounds a whole boot (a guest kernel takes 25-45 s to userspace here; two test
/// boots run at a time on two cores).
const DEADLINE: Duration = Duration::from_secs(300);
const MEM_MIB: &str = "256";
const MIB: usize = 1 << 20;

fn kernel_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_recipe("tests/guests/linux/build-tier-a.sh"))
}

/// `ferrite run` arguments for the tier-A kernel and initramfs with `cmdline`.
fn run_args(cmdline: &str) -> Vec<String> {
    let d = kernel_dir();
    [
        "--log-level",
        "info",
        "run",
        "--kernel",
        d.join("vmlinux").to_str().unwrap(),
        "--initrd",
        d.join("initramfs.cpio.gz").to_str().unwrap(),
        "--mem",
        MEM_MIB,
        "--cmdline",
        cmdline,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A fresh, empty scratch directory for one test (kept after the test, for
/// inspection; recreated on the next run).
fn scratch(name: &str) -> PathBuf {
    let dir = root().join("target").join("virtio-tier-a").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Deterministic pseudo-random bytes (xorshift64*), different per `seed`.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// The MiB the guest writes at offset 0 of the `ferrite.pattern=` disk: block i
/// (0..256) of 4096 bytes is the 16-byte record "ferrite-blk<1000+i>\n", 256 times.
fn guest_pattern() -> Vec<u8> {
    let mut v = Vec::with_capacity(MIB);
    for i in 0..256 {
        let rec = format!("ferrite-blk{}\n", 1000 + i);
        assert_eq!(rec.len(), 16);
        for _ in 0..256 {
            v.extend_from_slice(rec.as_bytes());
        }
    }
    v
}

/// Runs a host tool, failing the test with its output if it fails; returns stdout.
/// e2fsprogs lives in /usr/sbin, which an ordinary user's PATH may lack.
fn tool(program: &str, args: &[&str]) -> String {
    let run = |p: &str| Command::new(p).args(args).output();
    let out = ["/usr/sbin/", "/sbin/"]
        .iter()
        .fold(run(program), |r, dir| match r {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => run(&format!("{dir}{program}")),
            r => r,
        })
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}); the virtio tests need e2fsprogs and coreutils")
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// MD5 (hex) of `bytes`, computed by the host's md5sum (the guest uses busybox md5sum).
fn md5_hex(dir: &Path, bytes: &[u8]) -> String {
    // A name of its own per call: tests run in parallel and may share `dir`.
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let f = dir.join(format!("md5-input-{}-{n}.bin", std::process::id()));
    std::fs::write(&f, bytes).unwrap();
    let out = tool("md5sum", &[f.to_str().unwrap()]);
    std::fs::remove_file(&f).unwrap();
    out.split_whitespace().next().unwrap().to_owned()
}

/// First offset where `a` and `b` differ, for failure messages.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

// --- one boot with three disks and the RNG ------------------------------------------

const RAW_SERIAL: &str = "ferrite-raw";
const EXT4_SERIAL: &str = "ferrite-ext4";
const RO_SERIAL: &str = "ferrite-ro";
const RAW_MIB: usize = 4;
const EXT4_MIB: usize = 16;
const RO_MIB: usize = 2;

/// What the shared boot did, and what the host prepared for it.
struct DisksBoot {
    stdout: String,
    stderr: String,
    status: Option<ExitStatus>,
    /// The raw disk (vda): zeros, with host-made noise in its second MiB.
    raw: PathBuf,
    raw_before: Vec<u8>,
    /// The ext4 disk (vdb) and the line in its /hostfile.
    ext4: PathBuf,
    host_line: String,
    /// The read-only disk (vdc): noise.
    ro: PathBuf,
    ro_before: Vec<u8>,
    dir: PathBuf,
}

impl DisksBoot {
    fn ctx(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }

    fn field(&self, key: &str) -> Option<&str> {
        field(&self.stdout, key)
    }

    /// The guest ran every check and rebooted (Ferrite exits with 0).
    fn assert_completed(&self) {
        let ctx = self.ctx();
        assert!(
            self.status.is_some(),
            "ferrite did not finish within {DEADLINE:?}\n{ctx}"
        );
        assert!(self.stdout.contains("FERRITE-VIRTIO-END"), "{ctx}");
        assert_eq!(self.status.unwrap().code(), Some(0), "{ctx}");
    }
}

/// Boots once per test binary with
///   vda: raw, writable, serial ferrite-raw  (ferrite.pattern=vda)
///   vdb: ext4 made on the host, writable, serial ferrite-ext4  (ferrite.ext4=vdb)
///   vdc: raw, read-only, serial ferrite-ro  (ferrite.ro=vdc)
/// and --rng. Never panics (a panic here would make every test sharing it rerun
/// the boot); the tests assert on the outcome.
fn disks_boot() -> &'static DisksBoot {
    static BOOT: OnceLock<DisksBoot> = OnceLock::new();
    BOOT.get_or_init(|| {
        let dir = scratch("disks");
        let s = seed();

        let raw = dir.join("raw.img");
        let mut raw_before = vec![0u8; RAW_MIB * MIB];
        raw_before[MIB..2 * MIB].copy_from_slice(&noise(MIB, s));
        std::fs::write(&raw, &raw_before).unwrap();

        let host_line = format!("host-made-{s:016x}");
        let tree = dir.join("ext4-tree");
        std::fs::create_dir(&tree).unwrap();
        std::fs::write(tree.join("hostfile"), format!("{host_line}\n")).unwrap();
        let ext4 = dir.join("ext4.img");
        tool(
            "mkfs.ext4",
            &[
                "-F",
                "-q",
                "-d",
                tree.to_str().unwrap(),
                ext4.to_str().unwrap(),
                &format!("{EXT4_MIB}M"),
            ],
        );

        let ro = dir.join("ro.img");
        let ro_before = noise(RO_MIB * MIB, s.rotate_left(17) ^ 0x5a5a);
        std::fs::write(&ro, &ro_before).unwrap();

        let mut args = run_args(
            "console=ttyS0 reboot=k panic=-1 ferrite.test=virtio \
             ferrite.pattern=vda ferrite.ext4=vdb ferrite.ro=vdc",
        );
        for (img, opts) in [
            (&raw, format!(",serial={RAW_SERIAL}")),
            (&ext4, format!(",serial={EXT4_SERIAL}")),
            (&ro, format!(",ro,serial={RO_SERIAL}")),
        ] {
            args.push("--disk".into());
            args.push(format!("{}{opts}", img.display()));
        }
        args.push("--rng".into());

        let mut f = Spawned::spawn(&args, false);
        let status = f.wait_exit(DEADLINE);
        DisksBoot {
            stdout: f.stdout(),
            stderr: f.stderr(),
            status,
            raw,
            raw_before,
            ext4,
            host_line,
            ro,
            ro_before,
            dir,
        }
    })
}

#[test]
fn disks_appear_in_order_with_serials_sizes_and_ro_flags() {
    if !require_kvm() {
        return;
    }
    let b = disks_boot();
    b.assert_completed();
    let ctx = b.ctx();
    assert_eq!(b.field("DISKS"), Some("vda vdb vdc"), "{ctx}");
    let sectors = |mib: usize| (mib * MIB / 512).to_string();
    let expected = [
        ("VDA", RAW_SERIAL, sectors(RAW_MIB), "0"),
        ("VDB", EXT4_SERIAL, sectors(EXT4_MIB), "0"),
        ("VDC", RO_SERIAL, sectors(RO_MIB), "1"),
    ];
    for (disk, serial, size, ro) in expected {
        assert_eq!(
            b.field(&format!("{disk}_SERIAL")),
            Some(serial),
            "{disk}: {ctx}"
        );
        assert_eq!(
            b.field(&format!("{disk}_SIZE")),
            Some(size.as_str()),
            "{disk}: {ctx}"
        );
        assert_eq!(b.field(&format!("{disk}_RO")), Some(ro), "{disk}: {ctx}");
    }
}

#[test]
fn guest_writes_reach_the_raw_image_and_host_data_reaches_the_guest() {
    if !require_kvm() {
        return;
    }
    let b = disks_boot();
    b.assert_completed();
    let ctx = b.ctx();
    assert_eq!(b.field("PATTERN"), Some("written"), "{ctx}");
    // The guest read the host's noise in the second MiB.
    let host_md5 = md5_hex(&b.dir, &b.raw_before[MIB..2 * MIB]);
    assert_eq!(
        b.field("PATTERN_READ_MD5"),
        Some(host_md5.as_str()),
        "{ctx}"
    );
    // Every byte the guest wrote is in the image file; nothing else changed.
    let after = std::fs::read(&b.raw).unwrap();
    assert_eq!(after.len(), b.raw_before.len(), "image size changed");
    let pattern = guest_pattern();
    if let Some(off) = first_difference(&after[..MIB], &pattern) {
        panic!(
            "the first MiB differs from the guest's pattern at offset {off:#x} \
             (image {:?}, expected {:?})\n{ctx}",
            String::from_utf8_lossy(&after[off & !15..(off & !15) + 16]),
            String::from_utf8_lossy(&pattern[off & !15..(off & !15) + 16]),
        );
    }
    if let Some(off) = first_difference(&after[MIB..], &b.raw_before[MIB..]) {
        panic!(
            "the image changed beyond the guest's write, at offset {:#x}\n{ctx}",
            MIB + off
        );
    }
}

#[test]
fn ext4_image_made_on_the_host_is_read_and_written_by_the_guest() {
    if !require_kvm() {
        return;
    }
    let b = disks_boot();
    b.assert_completed();
    let ctx = b.ctx();
    assert_eq!(b.field("EXT4_MOUNT"), Some("ok"), "{ctx}");
    assert_eq!(b.field("HOSTFILE"), Some(b.host_line.as_str()), "{ctx}");
    assert_eq!(b.field("EXT4_GUESTFILE"), Some("written"), "{ctx}");
    assert_eq!(b.field("EXT4_UMOUNT"), Some("ok"), "{ctx}");
    let img = b.ext4.to_str().unwrap();
    let guestfile = tool("debugfs", &["-R", "cat /guestfile", img]);
    assert_eq!(
        guestfile,
        format!("guest saw: {}\n", b.host_line),
        "/guestfile as the host reads it\n{ctx}"
    );
    // The guest unmounted cleanly: the filesystem is consistent (-n: check only).
    tool("e2fsck", &["-f", "-n", img]);
}

#[test]
fn read_only_disk_refuses_writes_and_stays_unchanged() {
    if !require_kvm() {
        return;
    }
    let b = disks_boot();
    b.assert_completed();
    let ctx = b.ctx();
    assert_eq!(b.field("VDC_RO"), Some("1"), "{ctx}");
    assert_eq!(b.field("RO_WRITE"), Some("refused"), "{ctx}");
    let host_md5 = md5_hex(&b.dir, &b.ro_before[..MIB]);
    assert_eq!(b.field("RO_READ_MD5"), Some(host_md5.as_str()), "{ctx}");
    let after = std::fs::read(&b.ro).unwrap();
    assert!(
        after == b.ro_before,
        "the read-only image changed (first difference at {:?})\n{ctx}",
        first_difference(&after, &b.ro_before)
    );
}

#[test]
fn virtio_rng_gives_random_bytes() {
    if !require_kvm() {
        return;
    }
    let b = disks_boot();
    b.assert_completed();
    let ctx = b.ctx();
    let current = b.field("HWRNG_CURRENT").unwrap_or("");
    assert!(current.starts_with("virtio_rng"), "rng_current: {ctx}");
    let hex = b.field("HWRNG").unwrap_or("");
    assert_eq!(hex.len(), 32, "16 bytes as hex: {ctx}");
    assert!(hex.bytes().all(|c| c.is_ascii_hexdigit()), "{ctx}");
    assert_ne!(hex, "0".repeat(32), "all zero: {ctx}");
}

// --- image locking -------------------------------------------------------------------

/// Starts a Ferrite with `disk` and waits for the guest kernel's first output (it is
/// running, so it holds its disks). earlyprintk: output from the first moments of
/// the boot, not only once the serial console driver is up.
fn start_holding(disk: &Path) -> Spawned {
    let mut args = run_args("console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1");
    args.push("--disk".into());
    args.push(disk.to_str().unwrap().into());
    // Stdin stays open (a pipe nobody writes): the guest's shell just waits.
    let mut f = Spawned::spawn(&args, true);
    assert!(
        f.wait_for_stdout("Linux version", Duration::from_secs(120)),
        "the first ferrite did not start its guest\n{}",
        f.ctx()
    );
    f
}

/// SIGTERM ends Ferrite with status 128 + 15.
fn terminate(mut f: Spawned, what: &str) {
    kill(f.pid(), libc::SIGTERM);
    let status = f.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some(),
        "{what}: no exit after SIGTERM\n{}",
        f.ctx()
    );
    assert_eq!(status.unwrap().code(), Some(143), "{what}\n{}", f.ctx());
}

#[test]
fn second_ferrite_on_the_same_writable_image_is_refused() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("in-use");
    let img = dir.join("shared.img");
    std::fs::write(&img, vec![0u8; MIB]).unwrap();
    let img_str = img.to_str().unwrap();

    let mut first = start_holding(&img);

    let mut args = run_args("console=ttyS0 reboot=k panic=-1 ferrite.test=reboot");
    args.push("--disk".into());
    args.push(img_str.into());
    let mut second = Spawned::spawn(&args, false);
    let status = second.wait_exit(Duration::from_secs(20));
    let ctx = second.ctx();
    let status = status.unwrap_or_else(|| panic!("the second ferrite ran on\n{ctx}"));
    assert!(!status.success(), "the second ferrite succeeded\n{ctx}");
    let err = second.stderr();
    assert!(err.contains("is in use"), "{ctx}");
    assert!(err.contains(img_str), "the error names the image\n{ctx}");
    assert!(
        !second.stdout().contains("Linux version"),
        "the second ferrite booted its guest\n{ctx}"
    );

    assert!(!first.exited(), "the first ferrite ended\n{}", first.ctx());
    terminate(first, "first ferrite");

    // The image is free again once its holder has gone.
    let third = start_holding(&img);
    assert!(!third.stderr().contains("is in use"), "{}", third.ctx());
    terminate(third, "third ferrite");
}

// --- virtio console ------------------------------------------------------------------

#[test]
fn virtio_console_carries_a_shell_on_stdin_and_stdout() {
    if !require_kvm() {
        return;
    }
    let mut args = run_args("console=ttyS0 reboot=k panic=-1 ferrite.test=hvc");
    args.push("--console".into());
    args.push("virtio".into());
    let mut f = Spawned::spawn(&args, true);
    // Printed on hvc0 by the shell that then reads it (the UART gets FERRITE-HVC-MODE).
    assert!(
        f.wait_for_stdout("FERRITE-HVC-READY", DEADLINE),
        "no hvc0 shell\n{}",
        f.ctx()
    );
    f.send(b"echo hvc-$((6*7))\n");
    assert!(
        f.wait_for_stdout("hvc-42", Duration::from_secs(60)),
        "no answer on stdout\n{}",
        f.ctx()
    );
    // `reboot -f` resets through the i8042; Ferrite exits with 0.
    f.send(b"reboot -f\n");
    let status = f.wait_exit(Duration::from_secs(60));
    assert!(status.is_some(), "no exit after reboot\n{}", f.ctx());
    assert_eq!(status.unwrap().code(), Some(0), "{}", f.ctx());
}
