//! Snapshots through the Firecracker-compatible front door (issue 17), as a
//! Firecracker user drives them: the binary started as `firecracker --api-sock`, the
//! tier-A guest booted ONCE through the API with a drive and a vsock device, a value
//! kept in its shell's memory; `PATCH /vm` Paused, `PUT /snapshot/create`, the process
//! killed; then new processes that `PUT /snapshot/load` it, once with the `File` memory
//! backend (resumed at once, vsock socket moved by `vsock_override`) and once with the
//! `Uffd` backend served by this test's own page-fault handler (Firecracker's
//! external-handler protocol: the userfaultfd and a JSON region list over a UNIX
//! socket, pages copied in with UFFDIO_COPY), loaded paused and resumed with `PATCH
//! /vm`; last the same files through `ferrite run --restore DIR --mem-backend uffd`,
//! Ferrite's own handler thread. Each restored shell must still hold the value.
//! Refusals along the way: a
//! snapshot of a running VM, a Diff snapshot, a load after boot, a load of a missing
//! state file (the path named), an existing snapshot file.
//!
//! Ferrite's snapshot files are its own format, not Firecracker's: the test only
//! passes their paths around, as Firecracker's tools do.
mod common;

use common::fc::{firecracker_in, scratch, tier_a_dir, Api, Reply};
use common::{complete_field, require_kvm, wait_until, SharedBuf, Spawned};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Boot to the shell (the guest kernel is emulated here; parallel boots share 2 cores).
const BOOT: Duration = Duration::from_secs(480);
const SOCKET_READY: Duration = Duration::from_secs(10);
/// One shell command's answer.
const ANSWER: Duration = Duration::from_secs(60);
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
const PAGE: usize = 4096;

fn start(dir: &Path, sock: &Path, id: &str) -> Spawned {
    let mut cmd = Command::new(firecracker_in(dir));
    cmd.args(["--api-sock", sock.to_str().unwrap(), "--id", id])
        .current_dir(dir);
    Spawned::start(cmd, true)
}

fn connect(vm: &mut Spawned, sock: &Path) -> Api {
    let ok = wait_until(SOCKET_READY, || {
        std::os::unix::net::UnixStream::connect(sock).is_ok() || vm.exited()
    });
    assert!(ok && !vm.exited(), "no API socket\n{}", vm.ctx());
    Api::connect(sock, SOCKET_READY)
}

fn accepted(what: &str, r: &Reply) {
    assert_eq!(r.status, 204, "{what}: expected 204, got {r:?}");
}

fn refused(what: &str, r: &Reply) -> String {
    assert_eq!(r.status, 400, "{what}: expected a 400 refusal, got {r:?}");
    let f = r.fault();
    eprintln!("{what}: 400 {f:?}");
    f
}

fn since(out: &SharedBuf, from: usize) -> String {
    let bytes = out.0.lock().unwrap();
    String::from_utf8_lossy(&bytes[from.min(bytes.len())..]).into_owned()
}

/// Types `cmd` into the guest shell; the value of the first complete `KEY=` line.
fn ask(vm: &mut Spawned, cmd: &str, key: &str) -> Option<String> {
    let from = vm.out.0.lock().unwrap().len();
    vm.send(format!("{cmd}\n").as_bytes());
    let mut value = None;
    wait_until(ANSWER, || {
        value = complete_field(&since(&vm.out, from), key);
        value.is_some() || vm.exited()
    });
    value
}

/// Prints the first line of the VM's stdout or stderr holding `needle` (a timing the
/// log reports), for the record.
fn report_line(vm: &Spawned, needle: &str) {
    for buf in [&vm.out, &vm.err] {
        let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
        if let Some(l) = text.lines().find(|l| l.contains(needle)) {
            eprintln!("measured: {}", l.trim_end());
            return;
        }
    }
}

fn end(vm: &mut Spawned) {
    let _ = vm.child.kill();
    vm.wait_exit(Duration::from_secs(10));
}

/// Runs `f`; a panic kills the VM first (and shows its output).
fn guarded<T>(vm: &mut Spawned, f: impl FnOnce(&mut Spawned) -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(vm))) {
        Ok(v) => v,
        Err(p) => {
            end(vm);
            eprintln!("the VM's output:\n{}", vm.ctx());
            std::panic::resume_unwind(p)
        }
    }
}

/// One region as Firecracker's handler protocol describes it.
#[derive(Debug, serde::Deserialize)]
struct Region {
    base_host_virt_addr: u64,
    size: usize,
    offset: u64,
}

/// What the test's page-fault handler saw.
#[derive(Debug, Default)]
struct Served {
    regions: Vec<serde_json::Value>,
    faults: usize,
    error: Option<String>,
}

/// A minimal external page-fault handler: accepts one connection on `listener`, takes
/// the userfaultfd and the region list, and serves every missing-page fault with a
/// copy of that page from `data`, the memory file's contents (zeros for a page the balloon removed) until
/// `stop` is set.
fn serve_page_faults(listener: UnixListener, data: Vec<u8>, stop: Arc<AtomicBool>) -> Served {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut served = Served::default();
    let (stream, _) = match listener.accept() {
        Ok(s) => s,
        Err(e) => {
            served.error = Some(format!("accept: {e}"));
            return served;
        }
    };
    let mut buf = vec![0u8; 64 << 10];
    let (n, file) = match stream.recv_with_fd(&mut buf) {
        Ok((n, Some(f))) => (n, f),
        other => {
            served.error = Some(format!("no userfaultfd received: {other:?}"));
            return served;
        }
    };
    served.regions = serde_json::from_slice(&buf[..n]).unwrap_or_default();
    let regions: Vec<Region> = match serde_json::from_slice(&buf[..n]) {
        Ok(r) => r,
        Err(e) => {
            served.error = Some(format!("region list: {e}: {:?}", &buf[..n]));
            return served;
        }
    };
    // SAFETY: `file` is the userfaultfd just received; the Uffd takes it over.
    let uffd = unsafe { userfaultfd::Uffd::from_raw_fd(file.into_raw_fd()) };
    let mut removed: Vec<(u64, u64)> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, its count given.
        let r = unsafe { libc::poll(&mut pfd, 1, 100) };
        if r <= 0 {
            continue;
        }
        if pfd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            break;
        }
        match uffd.read_event() {
            Ok(Some(userfaultfd::Event::Pagefault { addr, .. })) => {
                let page = addr as u64 & !(PAGE as u64 - 1);
                let Some(r) = regions.iter().find(|r| {
                    page >= r.base_host_virt_addr && page < r.base_host_virt_addr + r.size as u64
                }) else {
                    served.error = Some(format!("fault at {page:#x} outside every region"));
                    break;
                };
                let dst = page as *mut libc::c_void;
                let res = if removed.iter().any(|&(s, e)| page >= s && page < e) {
                    // SAFETY: `dst` is a page of a region registered with this uffd.
                    unsafe { uffd.zeropage(dst, PAGE, true) }.map(drop)
                } else {
                    let off = (r.offset + (page - r.base_host_virt_addr)) as usize;
                    let Some(src) = data.get(off..off + PAGE) else {
                        served.error = Some(format!("offset {off:#x} beyond the memory file"));
                        break;
                    };
                    // SAFETY: `src` is one page of `data`; `dst` one page of a
                    // registered region (the kernel checks it).
                    unsafe { uffd.copy(src.as_ptr().cast(), dst, PAGE, true) }.map(drop)
                };
                match res {
                    Ok(()) => served.faults += 1,
                    // Another thread's fault on the same page was served first.
                    Err(
                        userfaultfd::Error::CopyFailed(e) | userfaultfd::Error::ZeropageFailed(e),
                    ) if e as i32 == libc::EEXIST => {}
                    Err(e) => {
                        served.error = Some(format!("serving {page:#x}: {e:?}"));
                        break;
                    }
                }
            }
            Ok(Some(userfaultfd::Event::Remove { start, end })) => {
                removed.push((start as u64, end as u64));
            }
            Ok(_) => {}
            Err(e) => {
                served.error = Some(format!("read_event: {e:?}"));
                break;
            }
        }
    }
    served
}

#[test]
fn firecracker_snapshot_create_and_load_with_file_and_uffd_backends_keep_the_guests_memory() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("snap");
    let disk = dir.join("data.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    // Named as `ferrite snapshot` names them, so the native restore can take the DIR.
    let snapdir = dir.join("snap");
    std::fs::create_dir(&snapdir).unwrap();
    let (state, mem) = (snapdir.join("state"), snapdir.join("memory"));

    // Boot once, keep a value in the shell's memory, snapshot it.
    let sock = dir.join("api1.sock");
    let mut vm = start(&dir, &sock, "fcsnap1");
    guarded(&mut vm, |vm| {
        let mut api = connect(vm, &sock);
        accepted(
            "machine-config",
            &api.put(
                "/machine-config",
                r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
            ),
        );
        let boot = serde_json::json!({
            "kernel_image_path": tier_a_dir().join("vmlinux"),
            "initrd_path": tier_a_dir().join("initramfs.cpio.gz"),
            "boot_args": CMDLINE,
        });
        accepted("boot-source", &api.put("/boot-source", &boot.to_string()));
        let drive = serde_json::json!({"drive_id": "data", "path_on_host": disk,
            "is_root_device": false, "is_read_only": false});
        accepted("drive", &api.put("/drives/data", &drive.to_string()));
        let vsock = serde_json::json!({"guest_cid": 3, "uds_path": dir.join("v1.sock")});
        accepted("vsock", &api.put("/vsock", &vsock.to_string()));
        let create = serde_json::json!({"snapshot_type": "Full",
            "snapshot_path": state, "mem_file_path": mem});
        let f = refused(
            "create before boot",
            &api.put("/snapshot/create", &create.to_string()),
        );
        assert!(f.contains("before starting"), "{f}");
        accepted(
            "InstanceStart",
            &api.put("/actions", r#"{"action_type": "InstanceStart"}"#),
        );
        assert!(vm.wait_for_stdout("/ # ", BOOT), "no shell prompt");
        assert_eq!(
            ask(vm, "X=kept$((40+2)); echo V=$X", "V").as_deref(),
            Some("kept42")
        );

        // Refusals on the running VM.
        let f = refused(
            "create while running",
            &api.put("/snapshot/create", &create.to_string()),
        );
        assert!(f.contains("running") && f.contains("pause"), "{f}");
        assert!(
            !state.exists() && !mem.exists(),
            "a refused create wrote files"
        );
        let load = serde_json::json!({"snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem}});
        let f = refused(
            "load after boot",
            &api.put("/snapshot/load", &load.to_string()),
        );
        assert!(f.contains("after starting"), "{f}");

        accepted("pause", &api.patch("/vm", r#"{"state": "Paused"}"#));
        assert_eq!(api.state(), "Paused");
        let diff = serde_json::json!({"snapshot_type": "Diff",
            "snapshot_path": state, "mem_file_path": mem});
        let f = refused("Diff", &api.put("/snapshot/create", &diff.to_string()));
        assert!(f.contains("Diff"), "{f}");
        accepted("create", &api.put("/snapshot/create", &create.to_string()));
        report_line(vm, "'create full snapshot' VMM action took");
        assert!(state.is_file() && mem.is_file(), "no snapshot files");
        let f = refused(
            "create over an existing snapshot",
            &api.put("/snapshot/create", &create.to_string()),
        );
        assert!(f.contains(state.to_str().unwrap()), "{f}");
    });
    end(&mut vm);

    // Load with the File backend: resumed at once, the vsock socket moved.
    let sock = dir.join("api2.sock");
    let mut vm = start(&dir, &sock, "fcsnap2");
    guarded(&mut vm, |vm| {
        let mut api = connect(vm, &sock);
        let missing = dir.join("no-such.state");
        let bad = serde_json::json!({"snapshot_path": missing,
            "mem_backend": {"backend_type": "File", "backend_path": mem}});
        let f = refused(
            "load of a missing state file",
            &api.put("/snapshot/load", &bad.to_string()),
        );
        assert!(f.contains(missing.to_str().unwrap()), "{f}");
        let both = serde_json::json!({"snapshot_path": state, "mem_file_path": mem,
            "mem_backend": {"backend_type": "File", "backend_path": mem}});
        refused(
            "mem_file_path and mem_backend",
            &api.put("/snapshot/load", &both.to_string()),
        );
        assert_eq!(api.state(), "Not started");
        let v2 = dir.join("v2.sock");
        let load = serde_json::json!({"snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
            "resume_vm": true, "track_dirty_pages": false,
            "vsock_override": {"uds_path": v2}});
        accepted("load (File)", &api.put("/snapshot/load", &load.to_string()));
        assert_eq!(api.state(), "Running");
        report_line(vm, "'load snapshot' VMM action took");
        assert!(v2.exists(), "the vsock override's socket was not bound");
        assert_eq!(ask(vm, "echo V=$X", "V").as_deref(), Some("kept42"));
        let f = refused(
            "a second load",
            &api.put("/snapshot/load", &load.to_string()),
        );
        assert!(f.contains("after starting"), "{f}");
    });
    end(&mut vm);

    // Load with the Uffd backend, served by this test's handler; loaded paused.
    let handler_sock = dir.join("uffd.sock");
    let listener = UnixListener::bind(&handler_sock).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        // Read before Ferrite connects: the load waits for the pages it touches.
        let data = std::fs::read(&mem).unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || serve_page_faults(listener, data, stop))
    };
    let sock = dir.join("api3.sock");
    let mut vm = start(&dir, &sock, "fcsnap3");
    guarded(&mut vm, |vm| {
        let mut api = connect(vm, &sock);
        let load = serde_json::json!({"snapshot_path": state,
            "mem_backend": {"backend_type": "Uffd", "backend_path": handler_sock},
            "resume_vm": false, "vsock_override": {"uds_path": dir.join("v3.sock")}});
        accepted("load (Uffd)", &api.put("/snapshot/load", &load.to_string()));
        assert_eq!(api.state(), "Paused");
        accepted("resume", &api.patch("/vm", r#"{"state": "Resumed"}"#));
        assert_eq!(ask(vm, "echo V=$X", "V").as_deref(), Some("kept42"));
        // The log line goes through a non-blocking sink: looked for once the guest answered.
        report_line(vm, "'load snapshot' VMM action took");
    });
    end(&mut vm);
    stop.store(true, Ordering::Release);
    let served = handler.join().unwrap();
    assert_eq!(served.error, None, "the handler: {served:?}");
    assert!(!served.regions.is_empty(), "no region list");
    for r in &served.regions {
        let mut keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "base_host_virt_addr",
                "offset",
                "page_size",
                "page_size_kib",
                "size"
            ],
            "{r}"
        );
        assert_eq!(r["page_size"], PAGE, "{r}");
    }
    let total: u64 = served
        .regions
        .iter()
        .map(|r| r["size"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 128 << 20, "the regions do not cover guest RAM");
    assert!(served.faults > 0, "no page was served by the handler");
    eprintln!("uffd handler served {} page faults", served.faults);

    // The same snapshot through the native front door with Ferrite's own handler thread
    // (under its seccomp filter): `ferrite run --restore DIR --mem-backend uffd`.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrite"));
    cmd.args([
        "run",
        "--restore",
        snapdir.to_str().unwrap(),
        "--mem-backend",
        "uffd",
    ])
    .args([
        "--name",
        &format!("fcsnap4-{}", std::process::id()),
        "--log-level",
        "info",
    ]);
    let mut vm = Spawned::start(cmd, true);
    guarded(&mut vm, |vm| {
        assert_eq!(
            ask(vm, "echo V=$X", "V").as_deref(),
            Some("kept42"),
            "{}",
            vm.ctx()
        );
    });
    report_line(&vm, "running in");
    end(&mut vm);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The saved configuration of a machine with one named interface and a vsock device.
fn saved_config() -> ferrite::snapshot::SavedConfig {
    ferrite::snapshot::SavedConfig {
        kernel: PathBuf::from("/nonexistent/vmlinux"),
        vcpus: 1,
        memory_bytes: 128 << 20,
        hidden_features: Vec::new(),
        debug_exit: false,
        console: "serial".to_owned(),
        disks: Vec::new(),
        nets: vec![ferrite::snapshot::SavedNet {
            id: Some("eth0".to_owned()),
            tap: "tap-old".to_owned(),
            mac: Some([2, 0, 0, 0, 0, 1]),
        }],
        rng: false,
        balloon: None,
        vsock: Some(ferrite::snapshot::SavedVsock {
            cid: 3,
            uds: PathBuf::from("/run/old.sock"),
            max_connections: 16,
        }),
        mmds: None,
    }
}

#[test]
fn snapshot_load_overrides_replace_the_named_tap_and_the_vsock_path_and_refuse_unknown_ones() {
    use ferrite::snapshot::{restore_config_from, MemSource, Overrides};
    let saved = saved_config();
    let file = MemSource::File(PathBuf::from("/nonexistent/mem"));
    let o = Overrides {
        nets: vec![("eth0".to_owned(), "tap-new".to_owned())],
        vsock_uds: Some(PathBuf::from("/run/new.sock")),
        ..Default::default()
    };
    let cfg = restore_config_from(&saved, &file, &o).unwrap();
    assert_eq!(cfg.nets[0].tap, "tap-new");
    assert_eq!(
        cfg.nets[0].mac,
        Some([2, 0, 0, 0, 0, 1]),
        "the MAC must stay"
    );
    assert_eq!(
        cfg.vsock.as_ref().unwrap().uds,
        PathBuf::from("/run/new.sock")
    );
    assert_eq!(cfg.vsock.as_ref().unwrap().cid, 3);
    // Without overrides everything is as saved.
    let cfg = restore_config_from(&saved, &file, &Overrides::default()).unwrap();
    assert_eq!(cfg.nets[0].tap, "tap-old");
    assert_eq!(
        cfg.vsock.as_ref().unwrap().uds,
        PathBuf::from("/run/old.sock")
    );
    // The Uffd backend gives anonymous memory for the handler to fill.
    let uffd = MemSource::UffdHandler(PathBuf::from("/run/handler.sock"));
    let cfg = restore_config_from(&saved, &uffd, &Overrides::default()).unwrap();
    assert_eq!(cfg.memory.backing, ferrite::memory::Backing::Anonymous);
    // An interface the snapshot does not have, and a vsock it does not have.
    let bad = Overrides {
        nets: vec![("eth9".to_owned(), "tap-x".to_owned())],
        ..Default::default()
    };
    let e = restore_config_from(&saved, &file, &bad).unwrap_err();
    assert!(e.to_string().contains("'eth9'"), "{e}");
    let mut no_vsock = saved.clone();
    no_vsock.vsock = None;
    let o = Overrides {
        vsock_uds: Some(PathBuf::from("/run/new.sock")),
        ..Default::default()
    };
    let e = restore_config_from(&no_vsock, &file, &o).unwrap_err();
    assert!(e.to_string().contains("vsock"), "{e}");
}
