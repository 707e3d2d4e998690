//! Bad input gets a one-line error naming the input and a non-zero status, never a
//! panic or a hang.

mod common;

use common::*;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn tmpfile(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = root().join("target").join("bad-input");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    p
}

fn assert_clean_error(r: &Run, needle: &str) {
    assert_ne!(r.code(), 0, "stderr: {}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "panic: {}", r.stderr);
    assert!(
        r.stderr.contains(needle),
        "expected {needle:?} in: {}",
        r.stderr
    );
    assert_eq!(
        r.stderr.trim_end().lines().count(),
        1,
        "one line: {}",
        r.stderr
    );
}

fn run(args: &[&str]) -> Run {
    run_ferrite(args, None, T)
}

#[test]
fn missing_kernel() {
    let r = run(&["run", "--kernel", "/nonexistent/bzImage"]);
    assert_clean_error(&r, "/nonexistent/bzImage");
    assert!(r.stderr.contains("No such file"), "{}", r.stderr);
}

#[test]
fn unreadable_kernel_is_a_directory() {
    let r = run(&["run", "--kernel", "/"]);
    assert_clean_error(&r, "kernel image /");
}

#[test]
fn empty_kernel() {
    let p = tmpfile("empty", b"");
    let r = run(&["run", "--kernel", p.to_str().unwrap()]);
    assert_clean_error(&r, "is empty");
}

#[test]
fn truncated_elf() {
    let src = std::fs::read(guest("hello64.elf")).unwrap();
    let p = tmpfile("truncated.elf", &src[..100]);
    let r = run(&["run", "--kernel", p.to_str().unwrap(), "--mem", "16M"]);
    assert_clean_error(&r, "truncated.elf");
}

#[test]
fn corrupt_elf_program_headers() {
    let mut src = std::fs::read(guest("hello64.elf")).unwrap();
    // e_phoff (offset 32) pointing far past the end of the file.
    src[32..40].copy_from_slice(&0x7fff_ffffu64.to_le_bytes());
    let p = tmpfile("corrupt.elf", &src);
    let r = run(&["run", "--kernel", p.to_str().unwrap(), "--mem", "16M"]);
    assert_clean_error(&r, "corrupt.elf");
}

#[test]
fn thirty_two_bit_elf() {
    let mut src = std::fs::read(guest("hello64.elf")).unwrap();
    src[4] = 1;
    let p = tmpfile("elf32.elf", &src);
    let r = run(&["run", "--kernel", p.to_str().unwrap()]);
    assert_clean_error(&r, "not a 64-bit x86-64");
}

#[test]
fn image_larger_than_memory() {
    let p = tmpfile("big.bin", &vec![0x90u8; 3 << 20]);
    let r = run(&["run", "--kernel", p.to_str().unwrap(), "--mem", "2M"]);
    assert_clean_error(&r, "does not fit in guest memory");
}

#[test]
fn bad_mem_sizes() {
    let g = guest("hello.bin");
    for (mem, needle) in [
        ("0", "below the minimum"),
        ("5000T", "above the maximum"),
        ("12Q", "unknown size suffix"),
        ("lots", "not a size"),
        ("99999999999999999999", "too large"),
    ] {
        let r = run(&["run", "--kernel", g.to_str().unwrap(), "--mem", mem]);
        assert_eq!(r.code(), 2, "--mem {mem}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "--mem {mem}: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"));
    }
}

#[test]
fn zero_cpus_is_rejected_by_the_parser() {
    let g = guest("hello.bin");
    let r = run(&["run", "--kernel", g.to_str().unwrap(), "--cpus", "0"]);
    assert_eq!(r.code(), 2, "{}", r.stderr);
    assert!(r.stderr.contains("--cpus"), "{}", r.stderr);
}

#[test]
fn too_many_cpus_names_the_limit() {
    if !require_kvm() {
        return;
    }
    let g = guest("hello.bin");
    let r = run(&["run", "--kernel", g.to_str().unwrap(), "--cpus", "100000"]);
    assert_clean_error(&r, "--cpus 100000 is out of range");
}

#[test]
fn unusable_kvm_device() {
    let g = guest("hello.bin");
    let r = run(&[
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--kvm-device",
        "/nonexistent/kvm",
    ]);
    assert_clean_error(&r, "cannot open /nonexistent/kvm");
    let r = run(&[
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--kvm-device",
        "/dev/null",
    ]);
    assert_clean_error(&r, "/dev/null");
}

#[test]
fn unknown_flag() {
    let r = run(&["run", "--kernel", "x", "--bogus"]);
    assert_eq!(r.code(), 2);
    assert!(r.stderr.contains("--bogus"), "{}", r.stderr);
}
