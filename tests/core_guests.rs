//! Boots the committed test guests on real KVM and checks what they print and how
//! Ferrite exits.

mod common;

use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Runs a test guest with the debug-exit port (the guests end through it).
fn run_guest(name: &str, extra: &[&str], input: Option<&[u8]>) -> Run {
    let mut args = vec!["--debug-exit"];
    args.extend_from_slice(extra);
    run_guest_without_debug_exit(name, &args, input)
}

fn run_guest_without_debug_exit(name: &str, extra: &[&str], input: Option<&[u8]>) -> Run {
    let g = guest(name);
    let mut args = vec![
        "--log-level",
        "info",
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--mem",
        "16M",
    ];
    args.extend_from_slice(extra);
    run_ferrite(&args, input, T)
}

#[test]
fn real_mode_hello_prints_and_halts() {
    if !require_kvm() {
        return;
    }
    let r = run_guest("hello.bin", &[], None);
    assert_eq!(r.stdout, "Hello from real mode\n", "stderr: {}", r.stderr);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr);
    assert!(r.stderr.contains("hlt 1"), "HLT exit counted: {}", r.stderr);
}

#[test]
fn long_mode_elf_hello_resets_through_i8042() {
    if !require_kvm() {
        return;
    }
    let r = run_guest("hello64.elf", &[], None);
    assert_eq!(r.stdout, "Hello from long mode\n", "stderr: {}", r.stderr);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr);
    assert!(r.stderr.contains("guest requested reset"), "{}", r.stderr);
}

#[test]
fn debug_exit_code_becomes_exit_status() {
    if !require_kvm() {
        return;
    }
    let r = run_guest("exit-code.bin", &[], None);
    assert_eq!(r.code(), 32 + 0x2a, "stderr: {}", r.stderr);
}

#[test]
fn pio_loop_counts_unclaimed_writes() {
    if !require_kvm() {
        return;
    }
    let r = run_guest("pio-loop.bin", &[], None);
    assert_eq!(r.code(), 32 + 0x10, "stderr: {}", r.stderr);
    assert!(r.stderr.contains("pio_out 100001"), "{}", r.stderr);
    assert!(
        r.stderr.contains("unclaimed_pio_out 100000"),
        "{}",
        r.stderr
    );
}

#[test]
fn mmio_loop_counts_unclaimed_writes() {
    if !require_kvm() {
        return;
    }
    let r = run_guest("mmio-loop.bin", &[], None);
    assert_eq!(r.code(), 32 + 0x11, "stderr: {}", r.stderr);
    assert!(r.stderr.contains("mmio_write 100000"), "{}", r.stderr);
    assert!(
        r.stderr.contains("unclaimed_mmio_write 100000"),
        "{}",
        r.stderr
    );
}

#[test]
fn triple_fault_is_reported() {
    if !require_kvm() {
        return;
    }
    let r = run_guest("triple-fault.elf", &[], None);
    assert_eq!(r.code(), 4, "stderr: {}", r.stderr);
    assert!(r.stderr.contains("triple-faulted"), "{}", r.stderr);
}

#[test]
fn serial_input_is_echoed() {
    if !require_kvm() {
        return;
    }
    // More than the 64-byte UART FIFO, so held-back input must be delivered later.
    // Letters a..p only: 'q' ends the guest.
    let line: String = (0..200)
        .map(|i| char::from(b'a' + (i % 16) as u8))
        .collect();
    let input = format!("{line}\nq");
    let r = run_guest("echo.bin", &[], Some(input.as_bytes()));
    assert_eq!(r.stdout, format!("ready\n{line}\n"), "stderr: {}", r.stderr);
    assert_eq!(r.code(), 32 + 1, "stderr: {}", r.stderr);
}

#[test]
fn ctrl_a_x_quits() {
    if !require_kvm() {
        return;
    }
    // The echo guest never ends on its own without a 'q'; Ctrl-A x must end Ferrite.
    let r = run_guest("echo.bin", &[], Some(b"ab\x01x"));
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr);
    assert!(r.stderr.contains("Ctrl-A x"), "{}", r.stderr);
    assert!(
        !r.stdout.contains('\u{1}') && !r.stdout.contains('x'),
        "{}",
        r.stdout
    );
}

#[test]
fn stdin_eof_is_harmless() {
    if !require_kvm() {
        return;
    }
    // Empty piped stdin: EOF at once; the guest keeps running and is stopped by signal.
    let g = guest("echo.bin");
    let args = ["run", "--kernel", g.to_str().unwrap(), "--mem", "16M"].map(String::from);
    let mut f = Spawned::spawn(&args, true);
    f.stdin = None;
    // Wait until the guest has printed its prompt: the vCPU runs only after the signal
    // handlers are installed, so SIGTERM is then an orderly stop, not a kill.
    assert!(
        f.wait_for_stdout("ready\n", T),
        "the guest never printed its prompt\n{}",
        f.ctx()
    );
    kill(f.pid(), libc::SIGTERM);
    let status = f
        .wait_exit(T)
        .unwrap_or_else(|| panic!("ferrite did not stop on SIGTERM within {T:?}"));
    let err = f.stderr();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "stderr: {err}");
    assert_eq!(f.stdout(), "ready\n");
}

#[test]
fn two_vcpus_each_print() {
    if !require_kvm() {
        return;
    }
    let r = run_guest("smp.elf", &["--cpus", "2"], None);
    assert_eq!(r.code(), 32 + 2, "stderr: {}", r.stderr);
    let mut lines: Vec<&str> = r.stdout.lines().collect();
    lines.sort();
    assert_eq!(lines, ["vCPU 0 up", "vCPU 1 up"]);
}

#[test]
fn executing_from_mmio_reports_internal_error() {
    if !require_kvm() {
        return;
    }
    let r = run_guest("exec-mmio.elf", &[], None);
    assert_eq!(r.code(), 1, "stderr: {}", r.stderr);
    assert!(r.stderr.contains("KVM_EXIT_INTERNAL_ERROR"), "{}", r.stderr);
    assert!(r.stderr.contains("rip 0x30000000"), "{}", r.stderr);
}

#[test]
fn cmpxchg16b_runs_or_is_reported_with_bytes() {
    if !require_kvm() {
        return;
    }
    let r = run_guest("cmpxchg16b.elf", &[], None);
    match r.code() {
        // Hardware KVM executed it (debug-exit 7).
        39 => {}
        1 => {
            assert!(r.stderr.contains("KVM_EXIT_INTERNAL_ERROR"), "{}", r.stderr);
            assert!(r.stderr.contains("rip 0x10000f"), "{}", r.stderr);
            assert!(
                r.stderr.contains("instruction bytes: f0 48 0f c7"),
                "{}",
                r.stderr
            );
        }
        c => panic!("unexpected status {c}: {}", r.stderr),
    }
}

#[test]
fn kick_ends_a_vcpu_spinning_in_guest() {
    if !require_kvm() {
        return;
    }
    let r = run_guest("kick-spin.elf", &["--cpus", "2"], None);
    assert_eq!(r.stdout, "vCPU 0 stopping the VM\n", "stderr: {}", r.stderr);
    assert_eq!(r.code(), 32 + 9, "stderr: {}", r.stderr);
    // vCPU 1 made no exit of its own: it left KVM_RUN only through the kick (EINTR).
    assert!(
        r.stderr.contains("vCPU 1 exits: interrupted 1"),
        "{}",
        r.stderr
    );
}

#[test]
fn debug_exit_port_is_absent_unless_asked_for() {
    if !require_kvm() {
        return;
    }
    // Without --debug-exit the write to 0xf4 is an unclaimed port: the guest goes on
    // to halt, and the VM ends normally.
    let r = run_guest_without_debug_exit("exit-code.bin", &[], None);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr);
    assert!(r.stderr.contains("unclaimed_pio_out 1"), "{}", r.stderr);
    assert!(r.stderr.contains("all vCPUs halted"), "{}", r.stderr);
}

#[test]
fn cpu_features_apply_to_bare_images_too() {
    if !require_kvm() {
        return;
    }
    // Hiding another feature: the CPUID model is KVM's supported set, x2APIC included.
    let shown = run_guest("cpuid-x2apic.elf", &["--cpu-features=-cx16"], None);
    assert_eq!(shown.code(), 32 + 1, "stderr: {}", shown.stderr);
    let hidden = run_guest("cpuid-x2apic.elf", &["--cpu-features=-x2apic"], None);
    assert_eq!(hidden.code(), 32, "stderr: {}", hidden.stderr);
}
