//! Pause latency, in-process: `Vm::pause` sent to every vCPU -> every vCPU parked and
//! answered, over 1,000 pause/resume cycles, for 1 and 2 vCPUs running
//! tests/guests/asm/elf/counter.s (guest code that never exits on its own, so every
//! pause has to kick a vCPU out of KVM_RUN).
//!
//! The same through the control socket (HTTP request sent -> response received) with
//! `ferrite::control::client`, beside the in-process figure.
//!
//! usage: cargo bench --bench pause [-- CYCLES]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ferrite::console::{ConsoleIo, InputSource};
use ferrite::control::client;
use ferrite::outcome::VmOutcome;
use ferrite::vm::{ControlConfig, Vm, VmConfig};

const T: Duration = Duration::from_secs(10);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let cycles: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let guests = root.join("target").join("guests");
    let status = Command::new("bash")
        .arg(root.join("tests/guests/build-asm.sh"))
        .arg(&guests)
        .status()
        .expect("run build-asm.sh");
    assert!(status.success(), "building the test guests failed");

    println!("\nPause latency (request sent -> all vCPUs parked and answered), {cycles} cycles\n");
    println!(
        "{:12} {:6} {:>12} {:>12} {:>12} {:>14} {:>14}",
        "path", "vCPUs", "median (us)", "p99 (us)", "max (us)", "resume med", "resume p99"
    );
    let sock_dir = std::env::temp_dir().join(format!("ferrite-bench-{}", std::process::id()));
    for (socket, cpus) in [(false, 1usize), (false, 2), (true, 1), (true, 2)] {
        let mut cfg = VmConfig::new(guests.join("counter.elf"));
        cfg.memory.size = 16 << 20;
        cfg.vcpus = cpus;
        let sock = sock_dir.join(format!("bench-{cpus}.sock"));
        if socket {
            cfg.control = Some(ControlConfig {
                name: format!("bench-{cpus}"),
                announce: false,
                socket: Some(sock.clone()),
                optional: false,
            });
        }
        let io = ConsoleIo {
            input: InputSource::None,
            output: Box::new(std::io::sink()),
        };
        let mut vm = Vm::new(&cfg, io).expect("build VM");
        vm.start().expect("start VM");
        std::thread::sleep(Duration::from_millis(50));
        for _ in 0..50 {
            vm.pause(T).expect("pause");
            vm.resume(T).expect("resume");
        }
        let mut pause = Vec::with_capacity(cycles);
        let mut resume = Vec::with_capacity(cycles);
        for _ in 0..cycles {
            let t = Instant::now();
            if socket {
                let (code, _) = client::request(&sock, "PUT", "/vm/pause", None, T).expect("pause");
                assert_eq!(code, 200);
            } else {
                vm.pause(T).expect("pause");
            }
            pause.push(t.elapsed());
            let t = Instant::now();
            if socket {
                let (code, _) =
                    client::request(&sock, "PUT", "/vm/resume", None, T).expect("resume");
                assert_eq!(code, 200);
            } else {
                vm.resume(T).expect("resume");
            }
            resume.push(t.elapsed());
            // Let the guest run between cycles, as a controller would.
            std::thread::sleep(Duration::from_micros(100));
        }
        vm.stop(VmOutcome::Stopped);
        vm.wait();
        pause.sort();
        resume.sort();
        println!(
            "{:12} {:6} {:12.1} {:12.1} {:12.1} {:14.1} {:14.1}",
            if socket { "socket" } else { "in-process" },
            cpus,
            us(percentile(&pause, 0.5)),
            us(percentile(&pause, 0.99)),
            us(*pause.last().unwrap_or(&Duration::ZERO)),
            us(percentile(&resume, 0.5)),
            us(percentile(&resume, 0.99)),
        );
    }
}
