//! The Firecracker-compatible front door (issue 15), tested as a Firecracker user sees
//! it: the binary is started as `firecracker` (Ferrite through a link of that name, or a
//! real Firecracker named by `FERRITE_FC_UNDER_TEST` to check that a test describes
//! Firecracker v1.16.1's behaviour) and driven through its command line, config file and
//! REST API on a UNIX socket. The tier-A guest's interactive shell (no `ferrite.test=`)
//! answers on the console, which is the process's stdin/stdout as with Firecracker.
//! Assertions about what the issue asks of Ferrite beyond Firecracker are guarded by
//! `is_ferrite()`, each with the reason.
mod common;

use common::fc::{firecracker_in, is_ferrite, scratch, tier_a_dir, Api, Reply};
use common::{complete_field, kill, require_kvm, require_root, wait_until, SharedBuf, Spawned};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Boot to the shell: the guest kernel is emulated on the project's hosts (~8–10 s
/// alone), and several test VMs may boot side by side on two cores.
const BOOT: Duration = Duration::from_secs(480);
/// firecracker-go-sdk gives the socket 3 s from process start.
const SOCKET_READY: Duration = Duration::from_secs(3);
/// One shell command's answer (each fork+exec in the guest costs ~0.4 s).
const ANSWER: Duration = Duration::from_secs(60);
/// The guest's reboot after Ctrl-Alt-Del or `reboot`, until the process has gone.
const EXIT: Duration = Duration::from_secs(120);
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
/// The 2-vCPU API test's: this host's KVM never completes the PV send-IPI hypercall,
/// and an SMP guest using it hangs at "x86: Booting SMP configuration:" (under
/// Firecracker as under Ferrite; ../shared/notes/linux-guest-on-this-host.md).
const SMP_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 nopv";

fn kernel() -> String {
    tier_a_dir().join("vmlinux").to_str().unwrap().to_owned()
}

fn initrd() -> String {
    tier_a_dir()
        .join("initramfs.cpio.gz")
        .to_str()
        .unwrap()
        .to_owned()
}

/// Starts the binary under test as `firecracker ARGS` in `dir`, console on pipes.
fn start(dir: &Path, args: &[&str]) -> Spawned {
    let mut cmd = Command::new(firecracker_in(dir));
    cmd.args(args).current_dir(dir);
    Spawned::start(cmd, true)
}

/// Writes `len` bytes of `pattern` repeated (a raw disk whose content the guest can
/// recognise at any 16-byte-aligned offset).
fn disk(path: &Path, pattern: &[u8; 16], len: usize) {
    let bytes: Vec<u8> = pattern.iter().copied().cycle().take(len).collect();
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// The stdout collected since byte `from`.
fn since(out: &SharedBuf, from: usize) -> String {
    let bytes = out.0.lock().unwrap();
    String::from_utf8_lossy(&bytes[from.min(bytes.len())..]).into_owned()
}

fn out_len(out: &SharedBuf) -> usize {
    out.0.lock().unwrap().len()
}

/// Types `cmd` into the guest shell and returns the value of the first complete
/// `KEY=value` line it prints (the terminal's echo of the command starts with the
/// prompt, never with `KEY=`); None after `deadline`.
fn ask(vm: &mut Spawned, cmd: &str, key: &str, deadline: Duration) -> Option<String> {
    let from = out_len(&vm.out);
    vm.send(format!("{cmd}\n").as_bytes());
    let mut value = None;
    wait_until(deadline, || {
        value = complete_field(&since(&vm.out, from), key);
        value.is_some() || vm.exited()
    });
    value
}

/// Asserts that `r` is Firecracker's refusal: 400 with a non-empty `fault_message`
/// (returned).
fn refused(what: &str, r: &Reply) -> String {
    assert_eq!(r.status, 400, "{what}: expected a 400 refusal, got {r:?}");
    let fault = r.fault();
    assert!(!fault.trim().is_empty(), "{what}: empty fault_message");
    eprintln!("{what}: 400 {fault:?}");
    fault
}

fn accepted(what: &str, r: &Reply) {
    assert_eq!(r.status, 204, "{what}: expected 204, got {r:?}");
    assert!(r.body.is_empty(), "{what}: 204 with a body: {r:?}");
}

/// Connects to the API socket, which must answer within firecracker-go-sdk's 3 s.
fn connect(vm: &mut Spawned, sock: &Path) -> Api {
    let ok = wait_until(SOCKET_READY, || {
        std::os::unix::net::UnixStream::connect(sock).is_ok() || vm.exited()
    });
    assert!(
        ok && !vm.exited(),
        "no API socket {} within {SOCKET_READY:?}\n{}",
        sock.display(),
        vm.ctx()
    );
    Api::connect(sock, SOCKET_READY)
}

/// Ends a VM whose test failed early (a kill, so the next test is not kept waiting).
fn stop_on_panic<T>(vm: &mut Spawned, f: impl FnOnce(&mut Spawned) -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(vm))) {
        Ok(v) => v,
        Err(p) => {
            let _ = vm.child.kill();
            vm.wait_exit(Duration::from_secs(10));
            eprintln!("the VM's output:\n{}", vm.ctx());
            std::panic::resume_unwind(p)
        }
    }
}

#[test]
fn firecracker_api_configures_boots_pauses_swaps_a_drive_refuses_bad_requests_and_reboots_on_ctrl_alt_del(
) {
    if !require_kvm() {
        return;
    }
    let dir = scratch("api");
    let sock = dir.join("api.sock");
    let (disk_one, disk_two) = (dir.join("one.raw"), dir.join("two.raw"));
    disk(&disk_one, b"ferrite-disk-one", 1 << 20);
    let mut vm = start(
        &dir,
        &["--api-sock", sock.to_str().unwrap(), "--id", "fc-api-test"],
    );
    stop_on_panic(&mut vm, |vm| {
        // The socket answers before any configuration.
        let mut api = connect(vm, &sock);
        let r = api.get("/");
        assert_eq!(r.status, 200, "{r:?}");
        let v = r.json();
        assert_eq!(v["id"], "fc-api-test", "{v}");
        assert_eq!(v["state"], "Not started", "{v}");
        assert_eq!(v["app_name"], "Firecracker", "{v}");
        assert!(v["vmm_version"].is_string(), "{v}");
        let r = api.get("/version");
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.json()["firecracker_version"].is_string(), "{r:?}");
        assert_eq!(
            r.json()["firecracker_version"],
            v["vmm_version"],
            "GET /version and GET / disagree"
        );
        let r = api.get("/machine-config");
        assert_eq!(r.status, 200, "{r:?}");
        let m = r.json();
        assert_eq!(
            (&m["vcpu_count"], &m["mem_size_mib"], &m["smt"]),
            (&1.into(), &128.into(), &false.into()),
            "machine-config defaults: {m}"
        );

        // Configure and start.
        accepted(
            "PUT /machine-config",
            &api.put(
                "/machine-config",
                r#"{"vcpu_count": 2, "mem_size_mib": 128}"#,
            ),
        );
        let boot_source = serde_json::json!({
            "kernel_image_path": kernel(),
            "initrd_path": initrd(),
            "boot_args": SMP_CMDLINE,
        });
        accepted(
            "PUT /boot-source",
            &api.put("/boot-source", &boot_source.to_string()),
        );
        let drive = serde_json::json!({
            "drive_id": "data",
            "path_on_host": disk_one,
            "is_root_device": false,
            "is_read_only": false,
        });
        accepted(
            "PUT /drives/data",
            &api.put("/drives/data", &drive.to_string()),
        );
        assert_eq!(api.state(), "Not started");
        accepted(
            "InstanceStart",
            &api.put("/actions", r#"{"action_type": "InstanceStart"}"#),
        );
        assert_eq!(api.state(), "Running");
        assert!(
            vm.wait_for_stdout("FERRITE-USERSPACE", BOOT),
            "the guest did not reach userspace"
        );
        assert!(vm.wait_for_stdout("/ # ", BOOT), "no shell prompt");

        // GET /vm/config reflects the configuration.
        let r = api.get("/vm/config");
        assert_eq!(r.status, 200, "{r:?}");
        let c = r.json();
        assert_eq!(c["machine-config"]["vcpu_count"], 2, "{c}");
        assert_eq!(c["machine-config"]["mem_size_mib"], 128, "{c}");
        assert_eq!(c["boot-source"]["kernel_image_path"], kernel(), "{c}");
        assert_eq!(c["boot-source"]["initrd_path"], initrd(), "{c}");
        assert!(
            c["boot-source"]["boot_args"]
                .as_str()
                .is_some_and(|a| a.contains(SMP_CMDLINE)),
            "{c}"
        );
        assert_eq!(c["drives"][0]["drive_id"], "data", "{c}");
        assert_eq!(
            c["drives"][0]["path_on_host"],
            disk_one.to_str().unwrap(),
            "{c}"
        );
        assert_eq!(c["drives"][0]["is_root_device"], false, "{c}");

        // The guest sees its vCPUs and the drive as configured.
        assert_eq!(
            ask(vm, "echo NCPU=$(nproc)", "NCPU", ANSWER).as_deref(),
            Some("2")
        );
        assert_eq!(
            ask(vm, "echo SZ=$(cat /sys/block/vda/size)", "SZ", ANSWER).as_deref(),
            Some("2048")
        );
        assert_eq!(
            ask(
                vm,
                "echo HD=$(dd if=/dev/vda bs=16 count=1 2>/dev/null)",
                "HD",
                ANSWER
            )
            .as_deref(),
            Some("ferrite-disk-one")
        );

        // Pause: the shell does not answer until the VM is resumed.
        accepted(
            "PATCH /vm Paused",
            &api.patch("/vm", r#"{"state": "Paused"}"#),
        );
        assert_eq!(api.state(), "Paused");
        let from = out_len(&vm.out);
        vm.send(b"echo PING=$((40+2))\n");
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            !since(&vm.out, from).contains("PING=42"),
            "a paused guest answered: {}",
            since(&vm.out, from)
        );
        assert_eq!(api.state(), "Paused");
        accepted(
            "PATCH /vm Resumed",
            &api.patch("/vm", r#"{"state": "Resumed"}"#),
        );
        assert_eq!(api.state(), "Running");
        assert!(
            wait_until(ANSWER, || complete_field(&since(&vm.out, from), "PING")
                .is_some()),
            "no answer after resume"
        );
        assert_eq!(
            complete_field(&since(&vm.out, from), "PING").as_deref(),
            Some("42")
        );

        // A drive swapped after start: another file, another size and content; the
        // guest is told the new capacity (config-change interrupt) and reads the new
        // file.
        disk(&disk_two, b"ferrite-disk-two", 2 << 20);
        let patch = serde_json::json!({"drive_id": "data", "path_on_host": disk_two});
        accepted(
            "PATCH /drives/data",
            &api.patch("/drives/data", &patch.to_string()),
        );
        let mut size = None;
        wait_until(ANSWER, || {
            size = ask(vm, "echo SZ=$(cat /sys/block/vda/size)", "SZ", ANSWER);
            size.as_deref() != Some("2048")
        });
        assert_eq!(size.as_deref(), Some("4096"), "capacity after the swap");
        assert_eq!(
            ask(
                vm,
                "echo HD=$(dd if=/dev/vda bs=16 count=1 2>/dev/null)",
                "HD",
                ANSWER
            )
            .as_deref(),
            Some("ferrite-disk-two"),
            "the first bytes after the swap"
        );
        // Beyond the old file's end (1.5 MiB in).
        assert_eq!(
            ask(
                vm,
                "echo TL=$(dd if=/dev/vda bs=16 skip=98304 count=1 2>/dev/null)",
                "TL",
                ANSWER
            )
            .as_deref(),
            Some("ferrite-disk-two"),
            "bytes beyond the old size after the swap"
        );

        // Refusals while running: each a 400 with a fault_message, the VM unharmed.
        refused("malformed JSON", &api.patch("/vm", r#"{"state": "Paused""#));
        let f = refused(
            "unknown field",
            &api.patch(
                "/drives/data",
                r#"{"drive_id": "data", "no_such_field": 1}"#,
            ),
        );
        assert!(
            f.contains("no_such_field"),
            "the fault names the field: {f}"
        );
        refused("unknown path", &api.get("/no/such/path"));
        refused(
            "unknown path (PUT)",
            &api.put("/no-such-resource", r#"{"x": 1}"#),
        );
        let f = refused(
            "PUT /machine-config after start",
            &api.put(
                "/machine-config",
                r#"{"vcpu_count": 1, "mem_size_mib": 256}"#,
            ),
        );
        assert!(f.contains("after starting"), "{f}");
        let f = refused(
            "PUT /boot-source after start",
            &api.put("/boot-source", &boot_source.to_string()),
        );
        assert!(f.contains("after starting"), "{f}");
        let f = refused(
            "second InstanceStart",
            &api.put("/actions", r#"{"action_type": "InstanceStart"}"#),
        );
        assert!(f.contains("after starting"), "{f}");
        refused(
            "drive id in the path differs from the body",
            &api.patch(
                "/drives/data",
                &serde_json::json!({"drive_id": "other", "path_on_host": disk_one}).to_string(),
            ),
        );
        refused(
            "unknown state in PATCH /vm",
            &api.patch("/vm", r#"{"state": "Frozen"}"#),
        );
        refused(
            "unknown action",
            &api.put("/actions", r#"{"action_type": "Explode"}"#),
        );
        assert_eq!(api.state(), "Running");
        let r = api.get("/vm/config");
        assert_eq!(r.json()["machine-config"]["mem_size_mib"], 128, "{r:?}");
        assert_eq!(
            r.json()["drives"][0]["path_on_host"],
            disk_two.to_str().unwrap(),
            "{r:?}"
        );
        assert_eq!(
            ask(vm, "echo ALIVE=$((6*7))", "ALIVE", ANSWER).as_deref(),
            Some("42"),
            "the guest shell after the refusals"
        );

        // Ctrl-Alt-Del: busybox init reboots the guest (reboot=k), the process exits 0.
        accepted(
            "SendCtrlAltDel",
            &api.put("/actions", r#"{"action_type": "SendCtrlAltDel"}"#),
        );
        let status = vm.expect_exit(EXIT);
        assert_eq!(status.code(), Some(0), "{}", vm.ctx());
        assert!(
            vm.stdout().contains("reboot: Restarting system"),
            "{}",
            vm.ctx()
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn firecracker_api_refuses_bad_pre_boot_requests_and_unsupported_features_with_400() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("preboot");
    let sock = dir.join("api.sock");
    let mut vm = start(&dir, &["--api-sock", sock.to_str().unwrap()]);
    stop_on_panic(&mut vm, |vm| {
        let mut api = connect(vm, &sock);
        assert_eq!(api.state(), "Not started");

        // A missing kernel file is refused at PUT /boot-source (not at start).
        let missing = dir.join("no-such-vmlinux");
        refused(
            "PUT /boot-source with a missing kernel",
            &api.put(
                "/boot-source",
                &serde_json::json!({"kernel_image_path": missing, "boot_args": CMDLINE})
                    .to_string(),
            ),
        );
        let f = refused(
            "InstanceStart without a boot source",
            &api.put("/actions", r#"{"action_type": "InstanceStart"}"#),
        );
        assert!(!f.is_empty());
        let f = refused(
            "PATCH /vm before start",
            &api.patch("/vm", r#"{"state": "Paused"}"#),
        );
        assert!(f.contains("before starting"), "{f}");
        refused(
            "PUT /machine-config with an unknown field",
            &api.put(
                "/machine-config",
                r#"{"vcpu_count": 1, "mem_size_mib": 128, "no_such_field": true}"#,
            ),
        );
        refused(
            "PUT /machine-config malformed",
            &api.put("/machine-config", "{"),
        );

        // pmem, memory hotplug and CPU templates exist in Firecracker 1.16.1 and are
        // accepted there; the issue asks Ferrite for a clear 400 naming what is not
        // supported.
        let pmem_file = dir.join("pmem.img");
        std::fs::write(&pmem_file, vec![0u8; 2 << 20]).unwrap();
        let unsupported = [
            (
                "pmem",
                "PUT",
                "/pmem/p0".to_owned(),
                serde_json::json!({"id": "p0", "path_on_host": pmem_file}).to_string(),
            ),
            (
                "hotplug",
                "PUT",
                "/hotplug/memory".to_owned(),
                r#"{"total_size_mib": 1024, "slot_size_mib": 128, "block_size_mib": 2}"#.to_owned(),
            ),
            (
                "cpu",
                "PUT",
                "/cpu-config".to_owned(),
                r#"{"kvm_capabilities": [], "cpuid_modifiers": [], "msr_modifiers": []}"#
                    .to_owned(),
            ),
        ];
        for (name, method, path, body) in &unsupported {
            let r = api.call(method, path, Some(body));
            if is_ferrite() {
                let f = refused(&format!("{method} {path}"), &r);
                assert!(
                    f.to_lowercase().contains(name),
                    "{method} {path}: the fault should name what is unsupported ({name}): {f}"
                );
            } else {
                eprintln!("{method} {path} (Firecracker): {r:?}");
                assert_eq!(r.status, 204, "{method} {path}: {r:?}");
            }
        }
        if is_ferrite() {
            // A CPU template through machine-config: Firecracker takes T2 on Intel
            // hosts only, so only Ferrite's answer is asserted.
            let f = refused(
                "PUT /machine-config with a CPU template",
                &api.put(
                    "/machine-config",
                    r#"{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2"}"#,
                ),
            );
            assert!(f.to_lowercase().contains("template"), "{f}");
        }
        // Still Not started and still configurable after every refusal.
        assert_eq!(api.state(), "Not started");
        accepted(
            "PUT /machine-config after the refusals",
            &api.put(
                "/machine-config",
                r#"{"vcpu_count": 1, "mem_size_mib": 64}"#,
            ),
        );
        let r = api.get("/machine-config");
        assert_eq!(r.json()["mem_size_mib"], 64, "{r:?}");
        assert!(!vm.exited(), "{}", vm.ctx());
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn firecracker_command_line_errors_exit_with_firecrackers_status() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("cli");
    let run = |args: &[&str]| {
        let mut vm = start(&dir, args);
        let status = vm.expect_exit(Duration::from_secs(20));
        (status.code(), vm.ctx())
    };
    // A flag Firecracker does not have, and --no-api without --config-file: 153.
    let (code, ctx) = run(&["--no-such-flag"]);
    assert_eq!(code, Some(153), "{ctx}");
    let (code, ctx) = run(&["--no-api"]);
    assert_eq!(code, Some(153), "{ctx}");
    // An existing --api-sock path: 1, and the file is left as it was.
    let taken = dir.join("taken.sock");
    std::fs::write(&taken, b"not a socket").unwrap();
    let (code, ctx) = run(&["--api-sock", taken.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{ctx}");
    assert_eq!(
        std::fs::read(&taken).ok().as_deref(),
        Some(&b"not a socket"[..]),
        "the existing file at --api-sock was touched"
    );
    // --version: Firecracker's form on the first line (Kata parses its second word).
    let out = Command::new(firecracker_in(&dir))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or_default();
    let mut words = first.split_whitespace();
    assert_eq!(words.next(), Some("Firecracker"), "{text}");
    let version = words.next().unwrap_or_default();
    assert!(
        version.strip_prefix('v').is_some_and(
            |v| v.split('.').count() == 3 && v.split('.').all(|n| n.parse::<u32>().is_ok())
        ),
        "no semantic version as the second word: {text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A config file that is not what it should be (worst caller: a file written by
/// anyone, in any state) ends the process with status 1 and a message naming the file
/// and what is wrong, before any VM exists; nothing is left running or bound.
#[test]
fn bad_config_files_end_the_process_with_status_1_and_say_why() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("badcfg");
    let kernel = kernel();
    let missing = dir.join("no-such-vmlinux");
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("not JSON", "{\"boot-source\": ".into(), vec![]),
        (
            "no drives",
            format!(r#"{{"boot-source": {{"kernel_image_path": "{kernel}"}}}}"#),
            vec!["drives"],
        ),
        (
            "a missing kernel",
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "drives": []}}"#,
                missing.display()
            ),
            vec!["no-such-vmlinux"],
        ),
        (
            "an unknown machine-config field",
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "{kernel}"}}, "drives": [],
                    "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64, "vcpus": 2}}}}"#
            ),
            vec!["vcpus"],
        ),
        (
            "a drive file that does not exist",
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "{kernel}"}},
                    "drives": [{{"drive_id": "d", "is_root_device": false,
                                 "path_on_host": "{}"}}]}}"#,
                dir.join("no-such-disk").display()
            ),
            vec!["no-such-disk"],
        ),
    ];
    for (what, text, words) in cases {
        let cfg = dir.join("bad.json");
        std::fs::write(&cfg, &text).unwrap();
        let sock = dir.join("bad.sock");
        let mut vm = start(
            &dir,
            &[
                "--api-sock",
                sock.to_str().unwrap(),
                "--config-file",
                cfg.to_str().unwrap(),
            ],
        );
        let status = vm.expect_exit(Duration::from_secs(20));
        let ctx = vm.ctx();
        assert_eq!(status.code(), Some(1), "{what}: {ctx}");
        if is_ferrite() {
            // Ferrite's message names the file and the problem.
            let err = vm.stderr();
            assert!(err.contains("bad.json"), "{what}: {ctx}");
            for w in words {
                assert!(err.contains(w), "{what}: {w:?} not in the message: {ctx}");
            }
            assert!(!sock.exists(), "{what}: the API socket was left behind");
        }
        let _ = std::fs::remove_file(&sock);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Firecracker config file for the tier-A guest with `boot_args`.
fn config_file(dir: &Path, name: &str, boot_args: &str) -> PathBuf {
    let path = dir.join(name);
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel(),
            "initrd_path": initrd(),
            "boot_args": boot_args,
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "drives": [],
    });
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

#[test]
fn firecracker_config_file_boots_at_once_with_and_without_the_api() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("config");
    // --no-api: boots at once; the guest reboots itself, the process exits 0.
    let no_api = config_file(
        &dir,
        "no-api.json",
        &format!("{CMDLINE} ferrite.test=reboot"),
    );
    // With the API: boots at once and the socket serves the running VM.
    let with_api = config_file(&dir, "api.json", CMDLINE);
    let sock = dir.join("api.sock");
    let mut a = start(
        &dir,
        &["--no-api", "--config-file", no_api.to_str().unwrap()],
    );
    let mut b = start(
        &dir,
        &[
            "--api-sock",
            sock.to_str().unwrap(),
            "--config-file",
            with_api.to_str().unwrap(),
        ],
    );
    stop_on_panic(&mut b, |b| {
        let mut api = connect(b, &sock);
        assert_eq!(api.state(), "Running");
        let r = api.get("/vm/config");
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["boot-source"]["kernel_image_path"], kernel());
        assert!(b.wait_for_stdout("FERRITE-USERSPACE", BOOT), "no userspace");
        assert!(b.wait_for_stdout("/ # ", BOOT), "no shell prompt");
        assert_eq!(api.state(), "Running");
        // The shell's `reboot` ends the process with status 0.
        b.send(b"reboot\n");
        let status = b.expect_exit(EXIT);
        assert_eq!(status.code(), Some(0), "{}", b.ctx());
    });
    stop_on_panic(&mut a, |a| {
        assert!(
            a.wait_for_stdout("FERRITE-USERSPACE", BOOT),
            "--no-api: no userspace"
        );
        let status = a.expect_exit(EXIT);
        assert_eq!(status.code(), Some(0), "{}", a.ctx());
        assert!(
            a.stdout().contains("reboot: Restarting system"),
            "{}",
            a.ctx()
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ferrite_list_shows_a_vm_started_as_firecracker() {
    if !require_kvm() {
        return;
    }
    // Ferrite's own CLI (issue 15, item 5: `ferrite list` shows VMs started either way):
    // nothing to check against a real Firecracker.
    if !is_ferrite() {
        eprintln!("ferrite list: Ferrite only, skipped against a real Firecracker");
        return;
    }
    let run_dir = common::RunDir::new("fc-list");
    let dir = scratch("list");
    let sock = dir.join("api.sock");
    let config = config_file(&dir, "vm.json", CMDLINE);
    let mut cmd = Command::new(firecracker_in(&dir));
    cmd.env("FERRITE_RUN_DIR", &run_dir.0)
        .current_dir(&dir)
        .args([
            "--api-sock",
            sock.to_str().unwrap(),
            "--id",
            "fc-list-test",
            "--config-file",
            config.to_str().unwrap(),
        ]);
    let mut vm = Spawned::start(cmd, true);
    stop_on_panic(&mut vm, |vm| {
        let mut api = connect(vm, &sock);
        assert_eq!(api.state(), "Running");
        let mut listed = String::new();
        let found = wait_until(Duration::from_secs(20), || {
            let (_, out, err) = run_dir.cli(&["list"]);
            listed = format!("{out}{err}");
            out.contains("fc-list-test")
        });
        assert!(
            found,
            "`ferrite list` does not show fc-list-test:\n{listed}"
        );
        assert!(vm.wait_for_stdout("/ # ", BOOT), "no shell prompt");
        vm.send(b"reboot\n");
        let status = vm.expect_exit(EXIT);
        assert_eq!(status.code(), Some(0), "{}", vm.ctx());
    });
    let _ = std::fs::remove_dir_all(&dir);
}

const VSOCK_IN_USE: &str = "Vsock config error: Cannot create backend for vsock device: Error \
                            binding to the host-side Unix socket: Address already in use (os error 98)";

fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// `GET /vm/config`'s `vsock` (null when there is none).
fn vsock_shown(api: &mut Api) -> serde_json::Value {
    let r = api.get("/vm/config");
    assert_eq!(r.status, 200, "{r:?}");
    r.json()["vsock"].clone()
}

#[test]
fn put_vsock_binds_its_socket_at_once_replaces_the_previous_one_and_refuses_an_existing_path() {
    let dir = scratch("vsock");
    let sock = dir.join("api.sock");
    let (first, second) = (dir.join("v1.sock"), dir.join("v2.sock"));
    let mut vm = start(&dir, &["--api-sock", sock.to_str().unwrap()]);
    stop_on_panic(&mut vm, |vm| {
        let mut api = connect(vm, &sock);
        // Firecracker binds (and listens on) the socket at PUT /vsock, before any start.
        let r = api.put(
            "/vsock",
            &serde_json::json!({"guest_cid": 3, "uds_path": first}).to_string(),
        );
        accepted("PUT /vsock", &r);
        assert_eq!(r.deprecation, None, "{r:?}");
        assert!(
            is_socket(&first),
            "no socket at {} after PUT /vsock",
            first.display()
        );
        std::os::unix::net::UnixStream::connect(&first)
            .unwrap_or_else(|e| panic!("{} does not listen: {e}", first.display()));
        assert_eq!(
            vsock_shown(&mut api),
            serde_json::json!({"guest_cid": 3, "uds_path": first})
        );
        // A second PUT replaces the first: its socket goes. The deprecated vsock_id is
        // taken (the answer marked `Deprecation: true`) and not shown.
        let r = api.put(
            "/vsock",
            &serde_json::json!({"vsock_id": "root", "guest_cid": 4, "uds_path": second})
                .to_string(),
        );
        accepted("PUT /vsock again", &r);
        assert_eq!(r.deprecation.as_deref(), Some("true"), "{r:?}");
        assert!(!first.exists(), "the first vsock's socket is still there");
        assert!(is_socket(&second), "no socket at {}", second.display());
        assert_eq!(
            vsock_shown(&mut api),
            serde_json::json!({"guest_cid": 4, "uds_path": second})
        );
        // The same path again: the old socket goes first, so the new one can bind.
        accepted(
            "PUT /vsock on the same path",
            &api.put(
                "/vsock",
                &serde_json::json!({"guest_cid": 5, "uds_path": second}).to_string(),
            ),
        );
        assert!(is_socket(&second), "no socket at {}", second.display());
        assert_eq!(vsock_shown(&mut api)["guest_cid"], 5);

        // Anything at the path is "in use" (Firecracker does not replace a stale
        // socket), and left as it was. As in Firecracker, the vsock put before is gone
        // (its socket removed) whether or not the new one could be made.
        let file = dir.join("file");
        std::fs::write(&file, b"precious").unwrap();
        let f = refused(
            "PUT /vsock on a regular file",
            &api.put(
                "/vsock",
                &serde_json::json!({"guest_cid": 3, "uds_path": file}).to_string(),
            ),
        );
        assert_eq!(f, VSOCK_IN_USE);
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
        assert!(
            !second.exists(),
            "the replaced vsock's socket is still there"
        );
        assert!(vsock_shown(&mut api).is_null());
        let stale = dir.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let f = refused(
            "PUT /vsock on a stale socket",
            &api.put(
                "/vsock",
                &serde_json::json!({"guest_cid": 3, "uds_path": stale}).to_string(),
            ),
        );
        assert_eq!(f, VSOCK_IN_USE);
        assert!(is_socket(&stale), "the stale socket was touched");

        // Bad bodies: Firecracker's deserialisation messages.
        let bad_body = "An error occurred when deserializing the json body of a request: ";
        for (body, says) in [
            (
                r#"{"guest_cid": 4294967296, "uds_path": "x.sock"}"#,
                "invalid value: integer `4294967296`, expected u32",
            ),
            (
                r#"{"guest_cid": -1, "uds_path": "x.sock"}"#,
                "invalid value: integer `-1`, expected u32",
            ),
            (r#"{"guest_cid": 3}"#, "missing field `uds_path`"),
            (
                r#"{"guest_cid": 3, "uds_path": "x.sock", "port": 1}"#,
                "unknown field `port`, expected one of `vsock_id`, `guest_cid`, `uds_path`",
            ),
        ] {
            let f = refused(&format!("PUT /vsock {body}"), &api.put("/vsock", body));
            assert!(
                f.starts_with(bad_body) && f.contains(says),
                "PUT /vsock {body}: {f}"
            );
        }
        // Paths the socket cannot have.
        let long = dir.join("a".repeat(110));
        let f = refused(
            "PUT /vsock with a path longer than sockaddr_un holds",
            &api.put(
                "/vsock",
                &serde_json::json!({"guest_cid": 3, "uds_path": long}).to_string(),
            ),
        );
        assert_eq!(
            f,
            "Vsock config error: Cannot create backend for vsock device: Error binding to \
             the host-side Unix socket: path must be shorter than SUN_LEN"
        );
        let f = refused(
            "PUT /vsock in a missing directory",
            &api.put(
                "/vsock",
                &serde_json::json!({"guest_cid": 3, "uds_path": dir.join("no/dir/v.sock")})
                    .to_string(),
            ),
        );
        assert!(
            f.starts_with("Vsock config error: Cannot create backend for vsock device: ")
                && f.contains("No such file or directory"),
            "{f}"
        );
        // CIDs 0-2 are reserved (2 is the host): Firecracker takes any u32 and the
        // guest's driver then misbehaves; Ferrite refuses them, naming the field.
        let r = api.put(
            "/vsock",
            &serde_json::json!({"guest_cid": 2, "uds_path": first}).to_string(),
        );
        if is_ferrite() {
            let f = refused("PUT /vsock with CID 2", &r);
            assert!(f.contains("guest_cid 2"), "{f}");
            assert!(!first.exists(), "a refused PUT left a socket");
        } else {
            eprintln!("PUT /vsock with CID 2 (Firecracker): {r:?}");
            assert_eq!(r.status, 204, "{r:?}");
        }
        accepted(
            "PUT /vsock after the refusals",
            &api.put(
                "/vsock",
                &serde_json::json!({"guest_cid": 3, "uds_path": first}).to_string(),
            ),
        );
        assert!(is_socket(&first));
        assert_eq!(api.state(), "Not started");
        assert!(!vm.exited(), "{}", vm.ctx());
    });
    // Ends by SIGTERM before any start: Ferrite removes the socket it bound;
    // Firecracker leaves it behind.
    kill(vm.pid(), libc::SIGTERM);
    vm.expect_exit(Duration::from_secs(20));
    if is_ferrite() {
        assert!(!first.exists(), "the vsock socket was left behind");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vsock_of_a_config_file_listens_once_started_and_put_vsock_after_the_start_is_refused() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("vsock-cfg");
    let sock = dir.join("api.sock");
    let uds = dir.join("v.sock");
    let path = dir.join("vm.json");
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel(),
            "initrd_path": initrd(),
            "boot_args": CMDLINE,
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "drives": [],
        "vsock": {"guest_cid": 3, "uds_path": uds, "vsock_id": "root"},
    });
    std::fs::write(&path, config.to_string()).unwrap();
    let mut vm = start(
        &dir,
        &[
            "--api-sock",
            sock.to_str().unwrap(),
            "--config-file",
            path.to_str().unwrap(),
        ],
    );
    stop_on_panic(&mut vm, |vm| {
        let mut api = connect(vm, &sock);
        assert_eq!(api.state(), "Running");
        assert!(is_socket(&uds), "no vsock socket at {}", uds.display());
        std::os::unix::net::UnixStream::connect(&uds)
            .unwrap_or_else(|e| panic!("{} does not listen: {e}", uds.display()));
        assert_eq!(
            vsock_shown(&mut api),
            serde_json::json!({"guest_cid": 3, "uds_path": uds})
        );
        let f = refused(
            "PUT /vsock after the start",
            &api.put(
                "/vsock",
                &serde_json::json!({"guest_cid": 4, "uds_path": dir.join("w.sock")}).to_string(),
            ),
        );
        assert_eq!(
            f,
            "The requested operation is not supported after starting the microVM."
        );
        assert!(!dir.join("w.sock").exists());
        assert!(is_socket(&uds), "the running VM's vsock socket went");
        assert!(
            vm.wait_for_stdout("FERRITE-USERSPACE", BOOT),
            "the guest did not reach userspace\n{}",
            vm.ctx()
        );
    });
    // SIGTERM: Ferrite tears the VM down (the socket goes) and dies by the signal;
    // Firecracker dies at once and leaves the socket.
    kill(vm.pid(), libc::SIGTERM);
    let st = vm.expect_exit(EXIT);
    assert!(!st.success(), "{st}");
    if is_ferrite() {
        assert!(!uds.exists(), "the vsock socket was left behind");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- MMDS (issue 19): the API, the flags and the config file ----

/// Firecracker's fault when `/mmds` has no data store.
const MMDS_NOT_INITIALIZED: &str = "MMDS error: The MMDS data store is not initialized.";
const MMDS_TOO_BIG: &str = "MMDS limit exceeded error: The MMDS patch request doesn't fit.";

/// Asserts Firecracker's answer to a document over the MMDS size limit.
fn too_big(what: &str, r: &Reply) {
    assert_eq!(r.status, 413, "{what}: expected 413, got {r:?}");
    assert_eq!(r.fault(), MMDS_TOO_BIG, "{what}");
}

fn mmds(api: &mut Api) -> serde_json::Value {
    let r = api.get("/mmds");
    assert_eq!(r.status, 200, "GET /mmds: {r:?}");
    r.json()
}

/// A TAP device in this namespace, deleted on drop (the interface the MMDS answers on
/// must exist when the VM starts).
struct Tap(String);

impl Tap {
    fn new(tag: &str) -> Tap {
        let name = format!("fm{tag}{}", std::process::id() % 100_000);
        let _ = Command::new("ip")
            .args(["link", "del", "dev", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["tuntap", "add", "dev", &name, "mode", "tap"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot create the TAP device {name}");
        Tap(name)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", "dev", &self.0])
            .status();
    }
}

/// Starts the binary as `firecracker ARGS` with Ferrite's run directory set (where its
/// native control socket, `<run dir>/<id>.sock`, goes; a real Firecracker ignores it).
fn start_in_run_dir(dir: &Path, run_dir: &common::RunDir, args: &[&str]) -> Spawned {
    let mut cmd = Command::new(firecracker_in(dir));
    cmd.env("FERRITE_RUN_DIR", &run_dir.0)
        .args(args)
        .current_dir(dir);
    Spawned::start(cmd, true)
}

/// Ferrite's own view of the started VM's devices (its native control socket's
/// `GET /vm`): a virtio-net device that answers for the MMDS says `mmds ADDRESS`.
fn ferrite_devices(run_dir: &common::RunDir, id: &str) -> Vec<String> {
    let sock = run_dir.sock(id);
    assert!(
        wait_until(Duration::from_secs(20), || sock.exists()),
        "no native control socket {}",
        sock.display()
    );
    let r = Api::connect(&sock, SOCKET_READY).get("/vm");
    assert_eq!(r.status, 200, "{r:?}");
    serde_json::from_value(r.json()["devices"].clone()).unwrap_or_default()
}

#[test]
fn mmds_put_patch_get_round_trip_and_documents_over_the_size_limit_are_refused_unchanged() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("mmds-api");
    let sock = dir.join("api.sock");
    let mut vm = start(
        &dir,
        &[
            "--api-sock",
            sock.to_str().unwrap(),
            "--mmds-size-limit",
            "64",
        ],
    );
    stop_on_panic(&mut vm, |vm| {
        let mut api = connect(vm, &sock);
        // No document yet: GET shows {}, a PATCH has nothing to merge into.
        assert_eq!(mmds(&mut api), serde_json::json!({}));
        assert_eq!(
            refused("PATCH /mmds before PUT", &api.patch("/mmds", r#"{"a": 1}"#)),
            MMDS_NOT_INITIALIZED
        );
        accepted(
            "PUT /mmds",
            &api.put(
                "/mmds",
                r#"{"latest": {"id": "i-1", "tags": ["a"]}, "x": 1}"#,
            ),
        );
        assert_eq!(
            mmds(&mut api),
            serde_json::json!({"latest": {"id": "i-1", "tags": ["a"]}, "x": 1})
        );
        // A JSON merge patch: objects merge, null deletes, other values replace.
        accepted(
            "PATCH /mmds",
            &api.patch(
                "/mmds",
                r#"{"latest": {"tags": null, "ip": "10.0.0.2"}, "x": [2]}"#,
            ),
        );
        let want = serde_json::json!({"latest": {"id": "i-1", "ip": "10.0.0.2"}, "x": [2]});
        assert_eq!(mmds(&mut api), want);
        // Over --mmds-size-limit (64 bytes of compact JSON): 413, nothing changes.
        too_big(
            "PUT /mmds over the limit",
            &api.put(
                "/mmds",
                &serde_json::json!({"k": "v".repeat(64)}).to_string(),
            ),
        );
        too_big(
            "PATCH /mmds growing it over the limit",
            &api.patch("/mmds", r#"{"more": "0123456789012345678901234567890"}"#),
        );
        assert_eq!(mmds(&mut api), want, "a refused document changed the store");
        // Empty and malformed bodies, an unknown path below /mmds.
        assert_eq!(
            refused("PUT /mmds without a body", &api.call("PUT", "/mmds", None)),
            "Empty PUT request."
        );
        assert_eq!(
            refused(
                "PATCH /mmds without a body",
                &api.call("PATCH", "/mmds", None)
            ),
            "Empty PATCH request."
        );
        let f = refused("PUT /mmds malformed", &api.put("/mmds", "{bad"));
        assert!(
            f.starts_with("An error occurred when deserializing the json body of a request"),
            "{f}"
        );
        assert_eq!(
            refused("PUT /mmds/foo", &api.put("/mmds/foo", "{}")),
            "Unrecognized PUT request path `foo`."
        );
        assert_eq!(mmds(&mut api), want);
        // Any JSON value is a document; PUT replaces the whole of it.
        accepted("PUT /mmds a string", &api.put("/mmds", r#""text""#));
        assert_eq!(mmds(&mut api), serde_json::json!("text"));
        accepted("PUT /mmds again", &api.put("/mmds", r#"{"b": 2}"#));
        assert_eq!(mmds(&mut api), serde_json::json!({"b": 2}));
        assert_eq!(api.state(), "Not started");
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn metadata_file_is_the_document_at_start_and_a_missing_invalid_or_too_big_one_ends_the_process() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("mmds-metadata");
    let sock = dir.join("api.sock");
    let good = dir.join("meta.json");
    let doc = serde_json::json!({"latest": {"meta-data": {"instance-id": "i-0123", "pad": "x".repeat(150)}}});
    std::fs::write(&good, doc.to_string()).unwrap();
    let invalid = dir.join("invalid.json");
    std::fs::write(&invalid, "{\"latest\": ").unwrap();
    let missing = dir.join("no-such-meta.json");
    // Each refusal ends the process before it serves anything (Firecracker: a panic,
    // status 134, for the first two; status 1 for the third).
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "a missing file",
            vec!["--metadata", missing.to_str().unwrap()],
        ),
        (
            "invalid JSON",
            vec!["--metadata", invalid.to_str().unwrap()],
        ),
        (
            "a document over --mmds-size-limit",
            vec![
                "--metadata",
                good.to_str().unwrap(),
                "--mmds-size-limit",
                "100",
            ],
        ),
        // The limit defaults to --http-api-max-payload-size.
        (
            "a document over the API payload limit (the default MMDS limit)",
            vec![
                "--metadata",
                good.to_str().unwrap(),
                "--http-api-max-payload-size",
                "100",
            ],
        ),
    ];
    for (what, extra) in cases {
        let mut args = vec!["--api-sock", sock.to_str().unwrap()];
        args.extend(extra);
        let mut vm = start(&dir, &args);
        let status = vm.expect_exit(Duration::from_secs(20));
        let ctx = vm.ctx();
        assert!(!status.success(), "{what}: {ctx}");
        if is_ferrite() {
            // Ferrite does not panic: status 1 and a message naming the file.
            assert_eq!(status.code(), Some(1), "{what}: {ctx}");
            assert!(vm.stderr().contains("--metadata"), "{what}: {ctx}");
            assert!(!sock.exists(), "{what}: the API socket was left behind");
        }
        let _ = std::fs::remove_file(&sock);
    }
    // A good file with room for it: GET /mmds shows it, and a PATCH merges into it.
    let mut vm = start(
        &dir,
        &[
            "--api-sock",
            sock.to_str().unwrap(),
            "--metadata",
            good.to_str().unwrap(),
            "--http-api-max-payload-size",
            "100",
            "--mmds-size-limit",
            "1000",
        ],
    );
    stop_on_panic(&mut vm, |vm| {
        let mut api = connect(vm, &sock);
        assert_eq!(mmds(&mut api), doc);
        accepted(
            "PATCH /mmds after --metadata",
            &api.patch("/mmds", r#"{"latest": {"user-data": "hi"}}"#),
        );
        assert_eq!(mmds(&mut api)["latest"]["user-data"], "hi");
        assert_eq!(
            mmds(&mut api)["latest"]["meta-data"]["instance-id"],
            "i-0123"
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mmds_config_refuses_bad_versions_addresses_and_unknown_interfaces_and_vm_config_shows_it() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("mmds-config");
    let sock = dir.join("api.sock");
    let mut vm = start(&dir, &["--api-sock", sock.to_str().unwrap()]);
    stop_on_panic(&mut vm, |vm| {
        let mut api = connect(vm, &sock);
        assert!(
            api.get("/vm/config").json()["mmds-config"].is_null(),
            "an MMDS config before any PUT /mmds/config"
        );
        let unknown = "MMMDS config error: The list of network interface IDs provided \
                       contains at least one ID that does not correspond to any existing \
                       network interface.";
        assert_eq!(
            refused(
                "PUT /mmds/config naming no configured interface",
                &api.put("/mmds/config", r#"{"network_interfaces": ["eth0"]}"#),
            ),
            unknown
        );
        accepted(
            "PUT /network-interfaces/eth0",
            &api.put(
                "/network-interfaces/eth0",
                r#"{"iface_id": "eth0", "host_dev_name": "fmnotap0"}"#,
            ),
        );
        assert_eq!(
            refused(
                "PUT /mmds/config with eth0 and an unknown eth1",
                &api.put(
                    "/mmds/config",
                    r#"{"network_interfaces": ["eth0", "eth1"]}"#
                ),
            ),
            unknown
        );
        assert_eq!(
            refused(
                "PUT /mmds/config with no interface",
                &api.put("/mmds/config", r#"{"network_interfaces": []}"#),
            ),
            "MMMDS config error: The list of network interface IDs that allow forwarding \
             MMDS requests is empty."
        );
        for addr in ["10.0.0.1", "169.254.255.255", "169.254.0.1"] {
            assert_eq!(
                refused(
                    &format!("PUT /mmds/config with ipv4_address {addr}"),
                    &api.put(
                        "/mmds/config",
                        &format!(r#"{{"network_interfaces": ["eth0"], "ipv4_address": "{addr}"}}"#),
                    ),
                ),
                "MMMDS config error: The MMDS IPv4 address is not link local.",
                "{addr}"
            );
        }
        for (body, words) in [
            (
                r#"{"version": "V3", "network_interfaces": ["eth0"]}"#,
                "unknown variant `V3`, expected `V1` or `V2`",
            ),
            (r#"{"version": "V2"}"#, "missing field `network_interfaces`"),
            (
                r#"{"network_interfaces": ["eth0"], "ipv4_address": "not-an-ip"}"#,
                "invalid IPv4 address syntax",
            ),
            (
                r#"{"network_interfaces": ["eth0"], "bogus": 1}"#,
                "unknown field `bogus`, expected one of `version`, `network_interfaces`, \
                 `ipv4_address`, `imds_compat`",
            ),
        ] {
            let f = refused(
                &format!("PUT /mmds/config {body}"),
                &api.put("/mmds/config", body),
            );
            assert!(f.contains(words), "{body}: {f}");
        }
        assert_eq!(
            refused(
                "PUT /mmds/config without a body",
                &api.call("PUT", "/mmds/config", None)
            ),
            "Empty PUT request."
        );
        assert!(api.get("/vm/config").json()["mmds-config"].is_null());
        // V1, the default, is deprecated: the answer says so.
        let r = api.put("/mmds/config", r#"{"network_interfaces": ["eth0"]}"#);
        accepted("PUT /mmds/config V1", &r);
        assert_eq!(r.deprecation.as_deref(), Some("true"), "{r:?}");
        assert_eq!(
            api.get("/vm/config").json()["mmds-config"],
            serde_json::json!({
                "version": "V1",
                "network_interfaces": ["eth0"],
                "ipv4_address": "169.254.169.254",
                "imds_compat": false
            })
        );
        let r = api.put(
            "/mmds/config",
            r#"{"version": "V2", "network_interfaces": ["eth0"], "ipv4_address": "169.254.170.2", "imds_compat": true}"#,
        );
        accepted("PUT /mmds/config V2", &r);
        assert_eq!(r.deprecation, None, "{r:?}");
        let shown = serde_json::json!({
            "version": "V2",
            "network_interfaces": ["eth0"],
            "ipv4_address": "169.254.170.2",
            "imds_compat": true
        });
        assert_eq!(api.get("/vm/config").json()["mmds-config"], shown);
        // A refused config leaves the accepted one.
        refused(
            "PUT /mmds/config after a good one",
            &api.put("/mmds/config", r#"{"network_interfaces": ["eth7"]}"#),
        );
        assert_eq!(api.get("/vm/config").json()["mmds-config"], shown);
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mmds_of_a_config_file_with_metadata_is_served_and_patched_at_run_time_and_config_is_pre_boot_only(
) {
    if !require_kvm() || !require_root("the MMDS interface needs a TAP device") {
        return;
    }
    let dir = scratch("mmds-run");
    let tap = Tap::new("r");
    let sock = dir.join("api.sock");
    let meta = dir.join("meta.json");
    let doc = serde_json::json!({"latest": {"meta-data": {"instance-id": "i-run", "local-ipv4": "10.0.0.2"}}});
    std::fs::write(&meta, doc.to_string()).unwrap();
    let path = dir.join("vm.json");
    // flintlock's shape: the interface, then `mmds-config` naming it, plus --metadata.
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel(),
            "initrd_path": initrd(),
            "boot_args": CMDLINE,
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "drives": [],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": tap.0, "guest_mac": "06:00:ac:10:00:02"}],
        "mmds-config": {"version": "V2", "network_interfaces": ["eth0"]},
    });
    std::fs::write(&path, config.to_string()).unwrap();
    let run_dir = common::RunDir::new("mmds-run");
    let mut vm = start_in_run_dir(
        &dir,
        &run_dir,
        &[
            "--api-sock",
            sock.to_str().unwrap(),
            "--id",
            "mmds-run",
            "--config-file",
            path.to_str().unwrap(),
            "--metadata",
            meta.to_str().unwrap(),
        ],
    );
    stop_on_panic(&mut vm, |vm| {
        let mut api = connect(vm, &sock);
        assert_eq!(api.state(), "Running");
        if is_ferrite() {
            // The interface named in mmds-config answers for the MMDS.
            let devices = ferrite_devices(&run_dir, "mmds-run");
            assert!(
                devices
                    .iter()
                    .any(|d| d.contains(&tap.0) && d.contains("mmds 169.254.169.254")),
                "{devices:?}"
            );
        }
        assert_eq!(mmds(&mut api), doc);
        assert_eq!(
            api.get("/vm/config").json()["mmds-config"],
            serde_json::json!({
                "version": "V2",
                "network_interfaces": ["eth0"],
                "ipv4_address": "169.254.169.254",
                "imds_compat": false
            })
        );
        // While the guest runs, the document can change (what the guest reads next).
        accepted(
            "PATCH /mmds at run time",
            &api.patch(
                "/mmds",
                r#"{"latest": {"meta-data": {"local-ipv4": null, "rev": 2}}}"#,
            ),
        );
        assert_eq!(
            mmds(&mut api),
            serde_json::json!({"latest": {"meta-data": {"instance-id": "i-run", "rev": 2}}})
        );
        accepted("PUT /mmds at run time", &api.put("/mmds", r#"{"rev": 3}"#));
        assert_eq!(mmds(&mut api), serde_json::json!({"rev": 3}));
        assert_eq!(
            refused(
                "PUT /mmds/config after the start",
                &api.put("/mmds/config", r#"{"network_interfaces": ["eth0"]}"#),
            ),
            "The requested operation is not supported after starting the microVM."
        );
        assert_eq!(api.state(), "Running");
    });
    kill(vm.pid(), libc::SIGTERM);
    vm.expect_exit(EXIT);
    drop(tap);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mmds_after_a_start_without_mmds_config_has_no_data_store_and_a_bad_mmds_config_file_fails() {
    if !require_kvm() || !require_root("the network interface needs a TAP device") {
        return;
    }
    let tap = Tap::new("n");
    let dir = scratch("mmds-none");
    let sock = dir.join("api.sock");
    let meta = dir.join("meta.json");
    std::fs::write(&meta, r#"{"a": 1}"#).unwrap();
    // Firecracker keeps the store with the net devices that answer for it: a VM
    // started without MMDS config has none, whatever --metadata said.
    let path = config_file(&dir, "vm.json", CMDLINE);
    let mut with_net: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    with_net["network-interfaces"] =
        serde_json::json!([{"iface_id": "eth0", "host_dev_name": tap.0}]);
    std::fs::write(&path, with_net.to_string()).unwrap();
    let run_dir = common::RunDir::new("mmds-none");
    let mut vm = start_in_run_dir(
        &dir,
        &run_dir,
        &[
            "--api-sock",
            sock.to_str().unwrap(),
            "--id",
            "mmds-none",
            "--config-file",
            path.to_str().unwrap(),
            "--metadata",
            meta.to_str().unwrap(),
        ],
    );
    stop_on_panic(&mut vm, |vm| {
        let mut api = connect(vm, &sock);
        assert_eq!(api.state(), "Running");
        assert_eq!(
            refused("GET /mmds", &api.get("/mmds")),
            MMDS_NOT_INITIALIZED
        );
        assert_eq!(
            refused("PUT /mmds", &api.put("/mmds", "{}")),
            MMDS_NOT_INITIALIZED
        );
        assert_eq!(
            refused("PATCH /mmds", &api.patch("/mmds", "{}")),
            MMDS_NOT_INITIALIZED
        );
        assert!(api.get("/vm/config").json()["mmds-config"].is_null());
        if is_ferrite() {
            // Without MMDS config no interface has a responder.
            let devices = ferrite_devices(&run_dir, "mmds-none");
            assert!(
                devices.iter().any(|d| d.contains(&tap.0)),
                "no net device: {devices:?}"
            );
            assert!(!devices.iter().any(|d| d.contains("mmds")), "{devices:?}");
        }
    });
    kill(vm.pid(), libc::SIGTERM);
    vm.expect_exit(EXIT);
    // A config file whose mmds-config names an interface it does not have: status 1
    // before any VM exists.
    let mut bad: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    bad["mmds-config"] = serde_json::json!({"network_interfaces": ["eth9"]});
    let bad_path = dir.join("bad.json");
    std::fs::write(&bad_path, bad.to_string()).unwrap();
    let _ = std::fs::remove_file(&sock);
    let mut vm = start(
        &dir,
        &[
            "--api-sock",
            sock.to_str().unwrap(),
            "--config-file",
            bad_path.to_str().unwrap(),
        ],
    );
    let status = vm.expect_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{}", vm.ctx());
    if is_ferrite() {
        let err = vm.stderr();
        assert!(
            err.contains("bad.json") && err.contains("network interface"),
            "{}",
            vm.ctx()
        );
    }
    drop(tap);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Firecracker keeps the MMDS config in a snapshot but not the document: the loaded
/// VM's interface answers again (from an empty store the API fills anew).
#[test]
fn mmds_config_is_kept_across_a_snapshot_load_and_the_document_starts_empty() {
    if !require_kvm() || !require_root("the MMDS interface needs a TAP device") {
        return;
    }
    let dir = scratch("mmds-snap");
    let tap = Tap::new("s");
    let (state, mem) = (dir.join("state"), dir.join("memory"));
    let shown = serde_json::json!({
        "version": "V2",
        "network_interfaces": ["eth0"],
        "ipv4_address": "169.254.170.2",
        "imds_compat": true
    });
    let sock = dir.join("api1.sock");
    let mut vm = start(&dir, &["--api-sock", sock.to_str().unwrap()]);
    stop_on_panic(&mut vm, |vm| {
        let mut api = connect(vm, &sock);
        accepted(
            "PUT /machine-config",
            &api.put(
                "/machine-config",
                r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
            ),
        );
        let boot = serde_json::json!({
            "kernel_image_path": kernel(),
            "initrd_path": initrd(),
            "boot_args": CMDLINE,
        });
        accepted(
            "PUT /boot-source",
            &api.put("/boot-source", &boot.to_string()),
        );
        let net = serde_json::json!({"iface_id": "eth0", "host_dev_name": tap.0});
        accepted(
            "PUT /network-interfaces/eth0",
            &api.put("/network-interfaces/eth0", &net.to_string()),
        );
        accepted(
            "PUT /mmds/config",
            &api.put("/mmds/config", &shown.to_string()),
        );
        accepted("PUT /mmds", &api.put("/mmds", r#"{"before": "snapshot"}"#));
        accepted(
            "InstanceStart",
            &api.put("/actions", r#"{"action_type": "InstanceStart"}"#),
        );
        accepted("pause", &api.patch("/vm", r#"{"state": "Paused"}"#));
        let create = serde_json::json!({"snapshot_type": "Full",
            "snapshot_path": state, "mem_file_path": mem});
        accepted("create", &api.put("/snapshot/create", &create.to_string()));
    });
    // The TAP is free again once the first process has gone.
    kill(vm.pid(), libc::SIGTERM);
    vm.expect_exit(EXIT);
    let sock = dir.join("api2.sock");
    let mut vm = start(&dir, &["--api-sock", sock.to_str().unwrap()]);
    stop_on_panic(&mut vm, |vm| {
        let mut api = connect(vm, &sock);
        let load = serde_json::json!({"snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
            "resume_vm": true});
        accepted("load", &api.put("/snapshot/load", &load.to_string()));
        assert_eq!(api.state(), "Running");
        assert_eq!(api.get("/vm/config").json()["mmds-config"], shown);
        assert_eq!(
            mmds(&mut api),
            serde_json::json!({}),
            "the document was kept"
        );
        accepted(
            "PUT /mmds after the load",
            &api.put("/mmds", r#"{"after": 1}"#),
        );
        accepted(
            "PATCH /mmds after the load",
            &api.patch("/mmds", r#"{"more": 2}"#),
        );
        assert_eq!(mmds(&mut api), serde_json::json!({"after": 1, "more": 2}));
        assert_eq!(
            refused(
                "PUT /mmds/config after the load",
                &api.put("/mmds/config", r#"{"network_interfaces": ["eth0"]}"#),
            ),
            "The requested operation is not supported after starting the microVM."
        );
    });
    kill(vm.pid(), libc::SIGTERM);
    vm.expect_exit(EXIT);
    drop(tap);
    let _ = std::fs::remove_dir_all(&dir);
}
