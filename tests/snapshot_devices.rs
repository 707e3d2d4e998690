//! Device state of a snapshot on real VMs (`Vm::save_devices`, `Vm::restore_devices`):
//! the tier-A Linux guest (tests/linux_tier_a.rs) with a virtio disk and virtio-rng.
//! The vCPU, irqchip and memory parts of a snapshot are tested with the whole
//! snapshot (tests of `ferrite snapshot` / `run --restore`).

mod common;

use common::*;
use ferrite::console::{ConsoleIo, InputSource};
use ferrite::devices::virtio::mmio::STATUS_DRIVER_OK;
use ferrite::devices::virtio::BackendState;
use ferrite::devices::virtio::INT_USED_RING;
use ferrite::outcome::VmOutcome;
use ferrite::snapshot::devices::DevicesState;
use ferrite::vm::{Vm, VmConfig};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

const DEADLINE: Duration = Duration::from_secs(300);

fn kernel_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_recipe("tests/guests/linux/build-tier-a.sh"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = root().join("target").join("snapshot-devices").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tier-A guest with a read-only disk (so that two VMs may hold it) and an RNG.
fn config(disk: &Path) -> VmConfig {
    let d = kernel_dir();
    let mut cfg = VmConfig::new(d.join("vmlinux"));
    cfg.initrd = Some(d.join("initramfs.cpio.gz"));
    cfg.memory.size = 128 << 20;
    cfg.disks = vec![ferrite::devices::virtio::block::DiskConfig {
        read_only: true,
        serial: Some("snap-disk".into()),
        ..ferrite::devices::virtio::block::DiskConfig::new(disk)
    }];
    cfg.rng = true;
    cfg
}

fn quiet_io() -> ConsoleIo {
    ConsoleIo {
        input: InputSource::None,
        output: Box::new(SharedBuf::default()),
    }
}

fn through_json(s: &DevicesState) -> DevicesState {
    let json = serde_json::to_string(s).unwrap();
    let back: DevicesState = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, s);
    back
}

#[test]
fn restore_devices_refuses_a_disk_of_another_size() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("size");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0x5au8; 1 << 20]).unwrap();
    let cfg = config(&disk);
    let saved = through_json(&Vm::new(&cfg, quiet_io()).unwrap().save_devices().unwrap());
    let names: Vec<&str> = saved.virtio.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["virtio-blk vda", "virtio-rng"]);
    // The same configuration restores.
    Vm::new(&cfg, quiet_io())
        .unwrap()
        .restore_devices(&saved)
        .expect("restore into the same configuration");
    // A VM without the RNG does not.
    let mut no_rng = cfg.clone();
    no_rng.rng = false;
    let e = Vm::new(&no_rng, quiet_io())
        .unwrap()
        .restore_devices(&saved)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "the snapshot has 2 virtio devices (virtio-blk vda, virtio-rng), this VM has 1 \
         (virtio-blk vda)"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let e = Vm::new(&cfg, quiet_io())
        .unwrap()
        .restore_devices(&saved)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "virtio-blk vda: size of {} changed from 1048576 to 2097152 bytes",
            disk.display()
        )
    );
}

#[test]
fn running_guest_devices_save_and_restore_into_a_new_vm() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("running");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0xa5u8; 1 << 20]).unwrap();
    let cfg = config(&disk);
    let (input, mut keys) = std::io::pipe().unwrap();
    let out = SharedBuf::default();
    let io = ConsoleIo {
        input: InputSource::Fd(input.into()),
        output: Box::new(out.clone()),
    };
    let mut vm = Vm::new(&cfg, io).expect("build VM");
    vm.start().expect("start VM");
    let stop = vm.stop_signal();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < DEADLINE && !stop.is_stopping() {
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.request(VmOutcome::Error("test deadline".into()));
    });
    assert!(
        out.wait_for("/ # ", DEADLINE),
        "no shell prompt:\n{}",
        out.text()
    );
    keys.write_all(b"dd if=/dev/vda of=/dev/null bs=4096 count=64; echo read-$((6*7))\n")
        .unwrap();
    assert!(
        out.wait_for("read-42", Duration::from_secs(60)),
        "{}",
        out.text()
    );
    vm.pause(Duration::from_secs(10)).expect("pause");
    let t = Instant::now();
    let saved = through_json(&vm.save_devices().expect("save devices"));
    eprintln!(
        "save_devices took {:?}, {} bytes of JSON",
        t.elapsed(),
        serde_json::to_string(&saved).unwrap().len()
    );
    // Linux drives the UART at 8 data bits, its disk and RNG are active.
    assert_eq!(saved.serial.line_control & 0x03, 0x03, "{saved:?}");
    let vda = &saved.virtio[0].transport;
    assert!(vda.active);
    assert_ne!(vda.status & STATUS_DRIVER_OK, 0);
    assert!(vda.queues[0].next_used > 0, "the guest read its disk");
    assert_eq!(vda.queues[0].next_avail, vda.queues[0].next_used);
    match &vda.backend {
        BackendState::Block(b) => {
            assert_eq!((b.size_bytes, b.sectors), (1 << 20, 2048));
            assert_eq!(b.serial, "snap-disk");
            assert!(b.read_only);
        }
        other => panic!("vda saved as {other:?}"),
    }
    assert!(saved.virtio[1].transport.active, "virtio-rng active");

    // A second VM of the same configuration, with the first one's memory (what the
    // snapshot's memory file gives a restore), takes the device state.
    let mut vm2 = Vm::new(&cfg, quiet_io()).expect("build the second VM");
    for region in vm.memory().iter() {
        let mut buf = vec![0u8; region.len() as usize];
        vm.memory()
            .read_slice(&mut buf, region.start_addr())
            .unwrap();
        vm2.memory().write_slice(&buf, region.start_addr()).unwrap();
    }
    let t = Instant::now();
    vm2.restore_devices(&saved).expect("restore devices");
    eprintln!("restore_devices took {:?}", t.elapsed());
    // Saved again: the same state, with the used-ring interrupt the restore raised and
    // no device asking for a reset (the rings matched the positions).
    let again = vm2.save_devices().expect("save the restored devices");
    let mut expected = saved.clone();
    for v in &mut expected.virtio {
        if v.transport.active {
            v.transport.interrupt_status |= INT_USED_RING;
        }
    }
    assert_eq!(again, expected);
    drop(vm2);

    vm.resume(Duration::from_secs(10)).expect("resume");
    keys.write_all(b"echo resumed-$((6*7))\n").unwrap();
    assert!(
        out.wait_for("resumed-42", Duration::from_secs(60)),
        "{}",
        out.text()
    );
    keys.write_all(b"reboot -f\n").unwrap();
    assert_eq!(vm.wait(), VmOutcome::Reset, "{}", out.text());
    watchdog.join().unwrap();
}
