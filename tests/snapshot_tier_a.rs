//! Tier A snapshots (issue 17): the project's small Linux (tests/linux_tier_a.rs) with
//! 2 vCPUs and a virtio disk, booted ONCE and driven through its interactive shell on
//! the console; every scenario runs in turn in [`snap_boot`], which never panics and
//! records each scenario's outcome; each test asserts its own.
//!
//! The sequence:
//!   setup      a counter on the console (`C0`, `C1`, ... one a second) and a marker
//!              written to vda with fsync
//!   running    `ferrite snapshot` of the running VM: refused, one line, nothing made
//!   snapshot   `ferrite pause`, `ferrite snapshot NAME DIR`: state and memory files,
//!              DIR mode 0700; a second snapshot into DIR is refused
//!   kill       the VM process is killed (SIGKILL)
//!   refusals   restores of broken copies of DIR (truncated state, a flipped byte, no
//!              memory file) and of DIR with the disk resized: each one clear line,
//!              non-zero exit, no process or control socket left
//!   restore    `ferrite run --restore DIR`: the count goes on (not from 0), the shell
//!              answers, its uptime goes on from the snapshot's (not back, no jump),
//!              the marker is read back from vda (page cache dropped)
//!   cycles     3 (FERRITE_SNAP_CYCLES) rounds of restore -> answer -> pause ->
//!              snapshot -> kill, each from the last round's snapshot: the count goes
//!              on across all of them

mod common;

use common::tier_a::{run_args, uptime, BOOT_DEADLINE, CMDLINE};
use common::*;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Bounds one guest command's answer.
const ANSWER: Duration = Duration::from_secs(60);
/// Bounds a refused restore (it must end at once).
const REFUSAL: Duration = Duration::from_secs(30);
const VM_NAME: &str = "snap";
const RESTORED_NAME: &str = "snap2";
const MARK: &str = "SNAPMARK-7";
const DISK_BYTES: u64 = 8 << 20;

/// The counter values the console showed (lines ending in `C<n>`: a shell prompt may
/// come first on the line), in order.
fn counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').rsplit_once('C'))
        .filter(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|(_, n)| n.parse().ok())
        .collect()
}

/// What one refused restore showed.
#[derive(Debug)]
struct Refusal {
    code: Option<i32>,
    stderr: String,
    socket_left: bool,
}

#[derive(Debug, Default)]
struct Outcome {
    results: BTreeMap<&'static str, Result<String, String>>,
    refusals: BTreeMap<&'static str, Result<Refusal, String>>,
    console: String,
    restored_console: String,
    stderr: String,
}

struct Env {
    run_dir: RunDir,
    disk: PathBuf,
    snap: PathBuf,
}

impl Env {
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        self.run_dir.cli(args)
    }
}

/// Sends a shell line and waits for `needle` in the console output.
fn ask(vm: &mut Spawned, line: &str, needle: &str) -> Result<(), String> {
    vm.send(format!("{line}\n").as_bytes());
    if vm.wait_for_stdout(needle, ANSWER) {
        Ok(())
    } else {
        Err(format!("no '{needle}' within {ANSWER:?} after '{line}'"))
    }
}

fn setup(vm: &mut Spawned) -> Result<String, String> {
    // The marker goes straight to the disk (one sector, synced).
    ask(
        vm,
        &format!(
            "echo {MARK} | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null; \
             echo WROTE-$?"
        ),
        "WROTE-0",
    )?;
    // The prompt may precede C0 on its line (`counts` reads past it).
    vm.send(b"i=0; while :; do echo C$i; i=$((i+1)); sleep 1; done &\n");
    let t = Instant::now();
    if !wait_until(ANSWER, || counts(&vm.stdout()).last().copied() >= Some(3)) {
        return Err("the counter did not reach C3".into());
    }
    Ok(format!("counter at C3 after {:?}", t.elapsed()))
}

fn running_refused(env: &Env) -> Result<String, String> {
    let dir = env.run_dir.0.join("not-made");
    let (code, out, err) = env.cli(&["snapshot", VM_NAME, dir.to_str().unwrap()]);
    if code == 0 {
        return Err(format!("a snapshot of a running VM succeeded: {out}"));
    }
    if !err.contains("pause it first") || err.trim().lines().count() != 1 {
        return Err(format!("not one clear line: {err:?}"));
    }
    if dir.exists() {
        return Err(format!("{} was created", dir.display()));
    }
    Ok(err.trim().to_owned())
}

fn snapshot(env: &Env, vm: &mut Spawned) -> Result<(String, u64, f64), String> {
    let up = uptime(vm, "UP1=", ANSWER)?;
    let (code, out, err) = env.cli(&["pause", VM_NAME]);
    if code != 0 {
        return Err(format!("pause: {out}{err}"));
    }
    let before = counts(&vm.stdout()).last().copied().unwrap_or(0);
    let t = Instant::now();
    let (code, out, err) = env.cli(&["snapshot", VM_NAME, env.snap.to_str().unwrap()]);
    let took = t.elapsed();
    if code != 0 {
        return Err(format!("snapshot failed: {out}{err}"));
    }
    for f in ["state", "memory"] {
        if !env.snap.join(f).is_file() {
            return Err(format!("no {f} file in {}", env.snap.display()));
        }
    }
    let mode = std::fs::metadata(&env.snap)
        .map_err(|e| e.to_string())?
        .permissions()
        .mode()
        & 0o777;
    if mode != 0o700 {
        return Err(format!("snapshot directory mode {mode:o}, not 700"));
    }
    // Still paused: the counter did not move while the snapshot was taken.
    let after = counts(&vm.stdout()).last().copied().unwrap_or(0);
    if after > before + 1 {
        return Err(format!(
            "the counter ran on while paused: C{before} -> C{after}"
        ));
    }
    let (code, _, err) = env.cli(&["snapshot", VM_NAME, env.snap.to_str().unwrap()]);
    if code == 0 || !err.contains("already holds a snapshot") {
        return Err(format!(
            "a second snapshot into the same directory: {code} {err}"
        ));
    }
    Ok((format!("{} ({took:?} with the CLI)", out.trim()), after, up))
}

/// `ferrite run --restore dir` that must be refused.
fn refused_restore(env: &Env, dir: &Path, name: &str) -> Refusal {
    let mut cmd = env.run_dir.ferrite();
    cmd.args(["run", "--restore"])
        .arg(dir)
        .args(["--name", name]);
    let mut vm = Spawned::start(cmd, false);
    let status = vm.wait_exit(REFUSAL);
    Refusal {
        code: status.map(|s| s.code().unwrap_or(-1)),
        stderr: vm.stderr(),
        socket_left: env.run_dir.sock(name).exists(),
    }
}

/// A copy of the snapshot directory: the state file copied, the memory file linked.
fn copy_snapshot(env: &Env, tag: &str) -> std::io::Result<PathBuf> {
    let d = env.run_dir.0.join(format!("copy-{tag}"));
    std::fs::create_dir_all(&d)?;
    std::fs::copy(env.snap.join("state"), d.join("state"))?;
    std::fs::hard_link(env.snap.join("memory"), d.join("memory"))?;
    Ok(d)
}

fn refusals(env: &Env, out: &mut Outcome) {
    let mut one = |tag: &'static str, f: &mut dyn FnMut() -> std::io::Result<PathBuf>| {
        let r = f()
            .map_err(|e| format!("preparing the broken copy: {e}"))
            .map(|dir| refused_restore(env, &dir, tag));
        out.refusals.insert(tag, r);
    };
    one("truncated", &mut || {
        let d = copy_snapshot(env, "truncated")?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("state"))?;
        let len = f.metadata()?.len();
        f.set_len(len - 100)?;
        Ok(d)
    });
    one("flipped", &mut || {
        let d = copy_snapshot(env, "flipped")?;
        let mut bytes = std::fs::read(d.join("state"))?;
        let i = bytes.len() - 50;
        bytes[i] ^= 0x20;
        std::fs::write(d.join("state"), bytes)?;
        Ok(d)
    });
    one("no-memory", &mut || {
        let d = copy_snapshot(env, "nomem")?;
        std::fs::remove_file(d.join("memory"))?;
        Ok(d)
    });
    one("disk-size", &mut || {
        let f = std::fs::OpenOptions::new().write(true).open(&env.disk)?;
        f.set_len(DISK_BYTES * 2)?;
        Ok(env.snap.clone())
    });
    // The disk back as it was (the marker is in its first sector).
    if let Err(e) = std::fs::OpenOptions::new()
        .write(true)
        .open(&env.disk)
        .and_then(|f| f.set_len(DISK_BYTES))
    {
        out.results.insert(
            "disk-restore",
            Err(format!("cannot size the disk back: {e}")),
        );
    }
}

fn restore(env: &Env, last: u64, up: f64) -> (Result<String, String>, String) {
    let mut cmd = env.run_dir.ferrite();
    cmd.args(["--log-level", "info", "run", "--restore"])
        .arg(&env.snap)
        .args(["--name", RESTORED_NAME]);
    let t = Instant::now();
    let mut vm = Spawned::start(cmd, true);
    let r = (|| {
        if !wait_until(ANSWER, || {
            counts(&vm.stdout()).iter().any(|&c| c > last) || vm.exited()
        }) {
            return Err(format!("the counter did not go on past C{last}"));
        }
        let resumed = t.elapsed();
        let seen = counts(&vm.stdout());
        // The next line (or the one after, if the pause cut a line in two between the
        // two processes' outputs): never back, never from 0.
        match seen.first() {
            Some(&first) if first > last && first <= last + 2 => {}
            _ => {
                return Err(format!(
                    "the count did not go on from C{last}: the restored VM printed {seen:?}"
                ))
            }
        }
        ask(&mut vm, "echo ALIVE-$((6*7))", "ALIVE-42")?;
        // The guest's clock goes on from where it was saved: not back, and not by the
        // time the snapshot spent on disk.
        let up2 = uptime(&mut vm, "UP2=", ANSWER)?;
        if up2 < up || up2 > up + 60.0 {
            return Err(format!(
                "guest uptime {up} s before the snapshot, {up2} s after the restore"
            ));
        }
        ask(
            &mut vm,
            "echo 3 > /proc/sys/vm/drop_caches; echo DISK=$(dd if=/dev/vda bs=10 count=1 2>/dev/null)",
            &format!("DISK={MARK}"),
        )?;
        let running = vm
            .stderr()
            .lines()
            .find(|l| l.contains("restored from"))
            .unwrap_or("")
            .to_owned();
        Ok(format!(
            "counter went on from C{last} ({seen:?}) {resumed:?} after the start; shell and \
             disk answer; uptime {up} s -> {up2} s; {running}"
        ))
    })();
    let sock = env.run_dir.sock(RESTORED_NAME);
    if sock.exists() {
        hard_stop(&sock);
    }
    let _ = vm.wait_exit(Duration::from_secs(20));
    (r, vm.ctx())
}

/// Snapshot -> kill -> restore cycles (FERRITE_SNAP_CYCLES, default 3: the 20-round run
/// with a disk and vsock in use is tests/snapshot_cycles.rs), each from the previous
/// cycle's snapshot, 2 vCPUs: the counter goes on across every one, the shell answers,
/// the disk stays readable.
fn cycles(env: &Env, mut last: u64) -> Result<String, String> {
    let n: usize = std::env::var("FERRITE_SNAP_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut from = env.snap.clone();
    let mut took = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        let name = format!("cyc{i}");
        let mut cmd = env.run_dir.ferrite();
        cmd.args(["run", "--restore"])
            .arg(&from)
            .args(["--name", &name]);
        let mut vm = Spawned::start(cmd, true);
        let r = (|| {
            if !wait_until(ANSWER, || {
                counts(&vm.stdout()).iter().any(|&c| c > last) || vm.exited()
            }) {
                return Err(format!("the counter did not go on past C{last}"));
            }
            let seen = counts(&vm.stdout());
            match seen.first() {
                Some(&first) if first > last && first <= last + 2 => {}
                _ => return Err(format!("from C{last} the restored VM printed {seen:?}")),
            }
            ask(
                &mut vm,
                &format!("echo CYCLE-$(({i}+1000))"),
                &format!("CYCLE-{}", i + 1000),
            )?;
            let (code, out, err) = env.cli(&["pause", &name]);
            if code != 0 {
                return Err(format!("pause: {out}{err}"));
            }
            let to = env.run_dir.0.join(format!("cycle-{i}"));
            let (code, out, err) = env.cli(&["snapshot", &name, to.to_str().unwrap()]);
            if code != 0 {
                return Err(format!("snapshot: {out}{err}"));
            }
            Ok(to)
        })();
        let _ = vm.child.kill();
        let _ = vm.wait_exit(Duration::from_secs(20));
        let to = r.map_err(|e| format!("cycle {i}: {e}\n{}", vm.ctx()))?;
        last = counts(&vm.stdout()).last().copied().unwrap_or(last);
        if from != env.snap {
            let _ = std::fs::remove_dir_all(&from);
        }
        from = to;
        took.push(t.elapsed());
    }
    let max = took.iter().max().copied().unwrap_or_default();
    Ok(format!(
        "{n} cycles, the counter at C{last}; the slowest cycle (restore, answer, pause, \
         snapshot, kill) {max:?}"
    ))
}

fn snap_boot() -> &'static Outcome {
    static BOOT: OnceLock<Outcome> = OnceLock::new();
    BOOT.get_or_init(|| {
        let run_dir = RunDir::new("snapshot");
        std::fs::create_dir_all(&run_dir.0).unwrap();
        let disk = run_dir.0.join("disk.img");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(DISK_BYTES))
            .unwrap();
        let snap = run_dir.0.join("snap");
        let env = Env {
            run_dir,
            disk,
            snap,
        };
        let mut cmd = env.run_dir.ferrite();
        run_args(&mut cmd, VM_NAME, "128", "2", &format!("{CMDLINE} nopv"))
            .arg("--disk")
            .arg(&env.disk);
        let mut out = Outcome::default();
        let mut vm = Spawned::start(cmd, true);
        let mut last = None;
        let mut up = 0.0;
        if !vm.wait_for_stdout("/ # ", BOOT_DEADLINE) {
            out.results.insert(
                "boot",
                Err(format!("no shell prompt within {BOOT_DEADLINE:?}")),
            );
        } else {
            out.results.insert("boot", Ok("shell".into()));
            let r = setup(&mut vm);
            let ok = r.is_ok();
            out.results.insert("setup", r);
            if ok {
                out.results.insert("running", running_refused(&env));
                match snapshot(&env, &mut vm) {
                    Ok((report, at, up1)) => {
                        out.results.insert("snapshot", Ok(report));
                        last = Some(at);
                        up = up1;
                    }
                    Err(e) => {
                        out.results.insert("snapshot", Err(e));
                    }
                }
            }
        }
        // The VM process is killed: the snapshot is all that is left of it.
        let _ = vm.child.kill();
        let _ = vm.wait_exit(Duration::from_secs(20));
        out.console = vm.stdout();
        out.stderr = vm.stderr();
        // The last count the killed VM printed at all (its output is complete now).
        let last = last.map(|at| counts(&out.console).last().copied().unwrap_or(at));
        if let Some(last) = last {
            refusals(&env, &mut out);
            let (mut r, ctx) = restore(&env, last, up);
            // Where the killed VM's output ended, for the report (a line the pause cut
            // in two shows here and at the restored VM's start).
            let tail: String = out
                .console
                .chars()
                .rev()
                .take(24)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            if let Ok(report) = &mut r {
                report.push_str(&format!("; the killed VM's output ended with {tail:?}"));
            }
            let restored = r.is_ok();
            out.results.insert("restore", r);
            out.restored_console = ctx;
            if restored {
                // The restored VM was stopped after its own last line: the cycles go on
                // from the snapshot again, so from the killed VM's last count.
                out.results.insert("cycles", cycles(&env, last));
            }
        }
        out
    })
}

fn ctx(o: &Outcome) -> String {
    let tail = |s: &str, n: usize| {
        let start = s.len().saturating_sub(n);
        let start = (start..s.len())
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        s[start..].to_owned()
    };
    format!(
        "console (tail):\n{}\nstderr (tail):\n{}\nrestored (tail):\n{}",
        tail(&o.console, 3000),
        tail(&o.stderr, 3000),
        tail(&o.restored_console, 4000)
    )
}

fn assert_scenario(name: &str) {
    let o = snap_boot();
    match o.results.get(name) {
        Some(Ok(report)) => eprintln!("{name}: {report}"),
        Some(Err(e)) => panic!("{name} failed: {e}\n{}", ctx(o)),
        None => panic!("{name} did not run (earlier: {:?})\n{}", o.results, ctx(o)),
    }
}

fn assert_refused(tag: &str, needle: &str) {
    let o = snap_boot();
    assert_scenario("snapshot");
    let r = match o.refusals.get(tag) {
        Some(Ok(r)) => r,
        Some(Err(e)) => panic!("{tag}: {e}"),
        None => panic!("{tag} did not run\n{}", ctx(o)),
    };
    eprintln!("{tag}: {r:?}");
    assert!(
        matches!(r.code, Some(c) if c != 0),
        "{tag}: the restore was not refused (exit {:?}; a process still running is None)\n{}",
        r.code,
        r.stderr
    );
    let lines: Vec<&str> = r.stderr.trim().lines().collect();
    assert_eq!(lines.len(), 1, "{tag}: not one line: {:?}", r.stderr);
    assert!(
        lines[0].contains(needle),
        "{tag}: the line does not say '{needle}': {}",
        lines[0]
    );
    assert!(!r.socket_left, "{tag}: a control socket was left behind");
}

#[test]
fn snapshot_of_a_running_vm_is_refused_with_one_line_and_no_directory() {
    if !require_kvm() {
        return;
    }
    assert_scenario("running");
}

#[test]
fn paused_vm_snapshot_writes_state_and_memory_and_refuses_a_second_into_the_same_dir() {
    if !require_kvm() {
        return;
    }
    assert_scenario("snapshot");
}

#[test]
fn restored_guest_counts_on_keeps_its_clock_answers_its_shell_and_reads_its_synced_disk_data() {
    if !require_kvm() {
        return;
    }
    assert_scenario("restore");
}

#[test]
fn twenty_snapshot_restore_cycles_each_go_on_counting_and_answer() {
    if !require_kvm() {
        return;
    }
    assert_scenario("cycles");
}

#[test]
fn restore_of_a_truncated_state_file_is_refused() {
    if !require_kvm() {
        return;
    }
    assert_refused("truncated", "is truncated");
}

#[test]
fn restore_of_a_state_file_with_a_flipped_byte_is_refused_by_its_checksum() {
    if !require_kvm() {
        return;
    }
    assert_refused("flipped", "checksum");
}

#[test]
fn restore_without_its_memory_file_is_refused() {
    if !require_kvm() {
        return;
    }
    assert_refused("no-memory", "memory file");
}

#[test]
fn restore_with_a_disk_of_another_size_is_refused() {
    if !require_kvm() {
        return;
    }
    assert_refused("disk-size", "the snapshot was taken with");
}
