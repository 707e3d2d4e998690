//! Clones (issue 17): the tier-A guest (tests/linux_tier_a.rs) booted ONCE with 128 MiB,
//! a virtio disk and vsock, paused and snapshotted; then 10 VMs are restored from that
//! one snapshot directory at once, each with its own `--name` (control socket),
//! `--vsock-uds` and `--disk-path` (a copy of the disk image). Each clone answers on its console, through its control socket and on
//! its own vsock socket (a guest echo server started before the snapshot). Guest memory
//! is `MAP_PRIVATE` of the one memory file, so the clones share its unmodified pages
//! through the page cache: their summed PSS is measured against their summed RSS and
//! against 10x the guest's memory.

mod common;

use common::tier_a::{guest_args, start_vsock_echo, vsock_echo, BOOT_DEADLINE, CMDLINE};
use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const ANSWER: Duration = Duration::from_secs(90);
const CLONES: usize = 10;
const GUEST_MIB: u64 = 128;
const ECHO_PORT: u32 = 5000;

/// One process's memory from /proc/PID/smaps_rollup, in KiB.
#[derive(Debug, Default, Clone, Copy)]
struct Mem {
    rss: u64,
    pss: u64,
    private_dirty: u64,
}

fn smaps_rollup(pid: u32) -> Result<Mem, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .map_err(|e| format!("/proc/{pid}/smaps_rollup: {e}"))?;
    let get = |key: &str| -> Result<u64, String> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no {key} in smaps_rollup of {pid}"))
    };
    Ok(Mem {
        rss: get("Rss:")?,
        pss: get("Pss:")?,
        private_dirty: get("Private_Dirty:")?,
    })
}

struct Clone {
    name: String,
    uds: PathBuf,
    vm: Spawned,
    started: Instant,
}

#[derive(Debug, Default)]
struct Outcome {
    /// The first thing that went wrong, else a report.
    result: Option<Result<String, String>>,
    /// Per clone: console, control socket and vsock answers.
    answers: Vec<Result<String, String>>,
    mem: Vec<Mem>,
    ctx: String,
}

fn clones() -> &'static Outcome {
    static O: OnceLock<Outcome> = OnceLock::new();
    O.get_or_init(|| {
        let mut out = Outcome::default();
        let r = run(&mut out);
        out.result = Some(r);
        out
    })
}

fn run(out: &mut Outcome) -> Result<String, String> {
    let run_dir = RunDir::new("clones");
    std::fs::create_dir_all(&run_dir.0).map_err(|e| e.to_string())?;
    let disk = run_dir.0.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(4 << 20))
        .map_err(|e| e.to_string())?;
    let uds = run_dir.0.join("orig.vsock");
    let snap = run_dir.0.join("snap");
    let mut cmd = run_dir.ferrite();
    cmd.args(["run", "--name", "orig", "--mem", &GUEST_MIB.to_string()]);
    guest_args(&mut cmd, &format!("{CMDLINE} nopv"))
        .arg("--disk")
        .arg(&disk)
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()));
    let mut orig = Spawned::start(cmd, true);
    let boot = Instant::now();
    if !orig.wait_for_stdout("/ # ", BOOT_DEADLINE) {
        return Err(format!("no shell prompt\n{}", orig.ctx()));
    }
    let booted = boot.elapsed();
    if let Err(e) = start_vsock_echo(&mut orig, ECHO_PORT, ANSWER) {
        return Err(format!("{e}\n{}", orig.ctx()));
    }
    vsock_echo(&uds, ECHO_PORT, b"before the snapshot", ANSWER)?;
    let (code, o, e) = run_dir.cli(&["pause", "orig"]);
    if code != 0 {
        return Err(format!("pause: {o}{e}"));
    }
    let t = Instant::now();
    let (code, o, e) = run_dir.cli(&["snapshot", "orig", snap.to_str().unwrap()]);
    if code != 0 {
        return Err(format!("snapshot: {o}{e}"));
    }
    let snap_took = t.elapsed();
    let _ = orig.child.kill();
    let _ = orig.wait_exit(Duration::from_secs(20));
    let mem_file = std::fs::metadata(snap.join("memory")).map_err(|e| e.to_string())?;
    // SAFETY-free: st_blocks is in 512-byte units.
    let mem_alloc_kib = std::os::unix::fs::MetadataExt::blocks(&mem_file) / 2;

    // All clones at once.
    let mut clones: Vec<Clone> = (0..CLONES)
        .map(|i| {
            let name = format!("clone{i}");
            let uds = run_dir.0.join(format!("clone{i}.vsock"));
            // A writable image is one VM's: each clone gets a copy.
            let img = run_dir.0.join(format!("clone{i}.img"));
            let _ = std::fs::copy(&disk, &img);
            let mut cmd = run_dir.ferrite();
            cmd.args(["--log-level", "info", "run", "--restore"])
                .arg(&snap)
                .args(["--name", &name])
                .arg("--vsock-uds")
                .arg(&uds)
                .arg("--disk-path")
                .arg(format!("0={}", img.display()));
            Clone {
                name,
                uds,
                vm: Spawned::start(cmd, true),
                started: Instant::now(),
            }
        })
        .collect();
    let mut answers = Vec::new();
    let mut latencies = Vec::new();
    // Every clone is asked first, then each answer awaited: the clones work at once.
    for (i, c) in clones.iter_mut().enumerate() {
        if !c.vm.exited() {
            let _ =
                c.vm.stdin.as_mut().map(|s| {
                    s.write_all(format!("echo CLONE{i}-ANSWER=$((1000+{i}*7))\n").as_bytes())
                });
        }
    }
    for (i, c) in clones.iter_mut().enumerate() {
        let r = (|| -> Result<String, String> {
            if !wait_until(ANSWER, || {
                c.vm.exited() || c.vm.stderr().contains("restored from")
            }) || c.vm.exited()
            {
                return Err(format!(
                    "{}: not running (exit {:?}): {}",
                    c.name,
                    c.vm.status,
                    c.vm.stderr()
                ));
            }
            let key = format!("CLONE{i}-ANSWER=");
            let want = format!("{key}{}", 1000 + i * 7);
            if !c.vm.wait_for_stdout(&want, ANSWER) {
                return Err(format!("{}: no '{want}' on its console", c.name));
            }
            let console = c.started.elapsed();
            let (code, o, e) = run_dir.cli(&["list"]);
            if code != 0 || !o.contains(&c.name) {
                return Err(format!("{}: not in `ferrite list`: {o}{e}", c.name));
            }
            let (code, o, e) = run_dir.cli(&["stat", &c.name]);
            if code != 0 {
                return Err(format!(
                    "{}: `ferrite stat` through its socket: {o}{e}",
                    c.name
                ));
            }
            vsock_echo(&c.uds, ECHO_PORT, format!("clone {i}").as_bytes(), ANSWER)
                .map_err(|e| format!("{}: vsock on {}: {e}", c.name, c.uds.display()))?;
            let restored =
                c.vm.stderr()
                    .lines()
                    .find(|l| l.contains("restored from"))
                    .map(|l| l.to_owned())
                    .unwrap_or_default();
            latencies.push(restored.clone());
            Ok(format!(
                "console answered {console:?} after its start; {restored}"
            ))
        })();
        answers.push(r);
    }
    // Memory of every clone while all run.
    let mut mems = Vec::new();
    for c in &clones {
        mems.push(smaps_rollup(c.vm.pid()).map_err(|e| {
            format!(
                "{}: {e}; the clones' answers: {answers:#?}; its output: {}",
                c.name,
                c.vm.ctx()
            )
        })?);
    }
    for c in &mut clones {
        let sock = run_dir.sock(&c.name);
        if sock.exists() {
            hard_stop(&sock);
        }
        let _ = c.vm.wait_exit(Duration::from_secs(20));
    }
    out.ctx = clones
        .iter()
        .map(|c| {
            let s = c.vm.ctx();
            let start = s.len().saturating_sub(1500);
            let start = (start..s.len())
                .find(|&i| s.is_char_boundary(i))
                .unwrap_or(0);
            format!("--- {}:\n{}", c.name, &s[start..])
        })
        .collect::<Vec<_>>()
        .join("\n");
    out.answers = answers;
    out.mem = mems;
    let (rss, pss, dirty) = out.mem.iter().fold((0, 0, 0), |(r, p, d), m| {
        (r + m.rss, p + m.pss, d + m.private_dirty)
    });
    Ok(format!(
        "boot {booted:?}, snapshot {snap_took:?} (memory file {mem_alloc_kib} KiB allocated); \
         {CLONES} clones: RSS {rss} KiB, PSS {pss} KiB, Private_Dirty {dirty} KiB in total \
         (guest memory {} KiB each)",
        GUEST_MIB * 1024
    ))
}

fn outcome() -> &'static Outcome {
    let o = clones();
    match &o.result {
        Some(Ok(r)) => eprintln!("{r}"),
        Some(Err(e)) => panic!("{e}\n{}", o.ctx),
        None => panic!("did not run"),
    }
    o
}

#[test]
fn ten_clones_of_one_snapshot_each_answer_on_console_control_socket_and_own_vsock() {
    if !require_kvm() {
        return;
    }
    let o = outcome();
    let failed: Vec<&String> = o.answers.iter().filter_map(|a| a.as_ref().err()).collect();
    for a in o.answers.iter().flatten() {
        eprintln!("{a}");
    }
    assert!(failed.is_empty(), "clones failed: {failed:#?}\n{}", o.ctx);
    assert_eq!(o.answers.len(), CLONES);
}

#[test]
fn ten_clones_share_the_snapshot_memory_file_pages_pss_well_below_ten_guests() {
    if !require_kvm() {
        return;
    }
    let o = outcome();
    assert_eq!(o.mem.len(), CLONES);
    for (i, m) in o.mem.iter().enumerate() {
        eprintln!(
            "clone{i}: Rss {} KiB, Pss {} KiB, Private_Dirty {} KiB",
            m.rss, m.pss, m.private_dirty
        );
    }
    let rss: u64 = o.mem.iter().map(|m| m.rss).sum();
    let pss: u64 = o.mem.iter().map(|m| m.pss).sum();
    let ten_guests = CLONES as u64 * GUEST_MIB * 1024;
    // Without sharing each clone's touched guest pages count fully in its PSS (PSS ==
    // RSS for private pages): shared pages make the sum of PSS well below the sum of
    // RSS, and far below ten guests' memory.
    assert!(
        pss * 2 < rss,
        "the clones' summed PSS {pss} KiB is not well below their summed RSS {rss} KiB: \
         the memory file's pages are not shared"
    );
    assert!(
        pss * 3 < ten_guests,
        "the clones' summed PSS {pss} KiB is not well below 10 x {GUEST_MIB} MiB"
    );
}

fn saved_config(nets: &[&str], vsock: bool) -> ferrite::snapshot::SavedConfig {
    ferrite::snapshot::SavedConfig {
        kernel: PathBuf::from("/nonexistent/vmlinux"),
        vcpus: 1,
        memory_bytes: 128 << 20,
        hidden_features: Vec::new(),
        debug_exit: false,
        console: "serial".into(),
        disks: vec![ferrite::snapshot::SavedDisk {
            path: PathBuf::from("/dev/null"),
            read_only: true,
            serial: None,
            flush: false,
            size: 0,
        }],
        nets: nets
            .iter()
            .map(|t| ferrite::snapshot::SavedNet {
                id: None,
                tap: (*t).to_owned(),
                mac: Some([2, 0, 0, 0, 0, 1]),
            })
            .collect(),
        rng: false,
        balloon: None,
        vsock: vsock.then(|| ferrite::snapshot::SavedVsock {
            cid: 3,
            uds: PathBuf::from("/run/snap.vsock"),
            max_connections: 16,
        }),
        mmds: None,
    }
}

fn overrides(taps: &[(&str, &str)], uds: Option<&str>) -> ferrite::snapshot::Overrides {
    ferrite::snapshot::Overrides {
        disks: vec![("0".into(), PathBuf::from("/dev/zero"))],
        vsock_uds: uds.map(PathBuf::from),
        taps: taps
            .iter()
            .map(|(i, t)| ((*i).to_owned(), (*t).to_owned()))
            .collect(),
        ..Default::default()
    }
}

#[test]
fn clone_overrides_give_its_own_taps_and_vsock_socket_keeping_the_macs() {
    let saved = saved_config(&["tap-a", "tap-b"], true);
    let cfg = ferrite::snapshot::restore_config(
        &saved,
        Path::new("/nonexistent/memory"),
        &overrides(
            &[("tap-b", "clone-b"), ("0", "clone-a")],
            Some("/run/clone.vsock"),
        ),
    )
    .expect("overrides of existing devices");
    let taps: Vec<&str> = cfg.nets.iter().map(|n| n.tap.as_str()).collect();
    assert_eq!(taps, ["clone-a", "clone-b"]);
    assert!(cfg.nets.iter().all(|n| n.mac == Some([2, 0, 0, 0, 0, 1])));
    assert_eq!(cfg.disks[0].path, PathBuf::from("/dev/zero"));
    assert!(cfg.disks[0].read_only);
    assert_eq!(
        cfg.vsock.as_ref().map(|v| v.uds.clone()),
        Some(PathBuf::from("/run/clone.vsock"))
    );
    // Without overrides a restore keeps the snapshot's devices.
    let cfg = ferrite::snapshot::restore_config(
        &saved,
        Path::new("/nonexistent/memory"),
        &overrides(&[], None),
    )
    .expect("no overrides");
    assert_eq!(cfg.nets[1].tap, "tap-b");
    assert_eq!(
        cfg.vsock.map(|v| v.uds),
        Some(PathBuf::from("/run/snap.vsock"))
    );
}

#[test]
fn clone_override_of_a_device_the_snapshot_lacks_is_refused_naming_it() {
    let saved = saved_config(&["tap-a"], false);
    let mem = Path::new("/nonexistent/memory");
    for (iface, what) in [("tap-z", "'tap-z'"), ("1", "'1'")] {
        let e = ferrite::snapshot::restore_config(&saved, mem, &overrides(&[(iface, "x")], None))
            .expect_err("an unknown network device");
        let msg = e.to_string();
        assert!(msg.contains(what) && msg.contains("tap-a"), "{msg}");
    }
    let e = ferrite::snapshot::restore_config(&saved, mem, &overrides(&[], Some("/run/x")))
        .expect_err("no vsock device");
    assert!(e.to_string().contains("no vsock device"), "{e}");
    let mut o = overrides(&[], None);
    o.disks = vec![("/other.img".into(), PathBuf::from("/dev/zero"))];
    let e = ferrite::snapshot::restore_config(&saved, mem, &o).expect_err("an unknown disk");
    assert!(e.to_string().contains("no disk '/other.img'"), "{e}");
}

#[test]
fn clone_overrides_without_restore_are_refused_in_one_line() {
    for flag in [
        ["--vsock-uds", "/tmp/x.vsock"],
        ["--tap", "0=tapx"],
        ["--disk-path", "0=/tmp/x.img"],
    ] {
        let r = run_ferrite(
            &["run", "--kernel", "/nonexistent/vmlinux", flag[0], flag[1]],
            None,
            Duration::from_secs(20),
        );
        assert_eq!(r.code(), 2, "{flag:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("they go with --restore"),
            "{flag:?}: {}",
            r.stderr
        );
        assert_eq!(r.stderr.trim().lines().count(), 1, "{flag:?}: {}", r.stderr);
    }
}
