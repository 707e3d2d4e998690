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

/// A minimal well-formed bzImage header (boot protocol 2.15, 64-bit, relocatable) and
/// a few KiB of "kernel": enough for the loader, never run.
fn fake_bzimage() -> Vec<u8> {
    let mut b = vec![0u8; 0x2000];
    b[0x1f1] = 1; // setup_sects
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    b[0x211] = 1; // loadflags: LOADED_HIGH
    b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    b[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    b[0x260..0x264].copy_from_slice(&0x10_0000u32.to_le_bytes()); // init_size
    b
}

#[test]
fn initrd_that_does_not_fit() {
    let k = tmpfile("fake-bzImage", &fake_bzimage());
    let i = tmpfile("huge-initrd", &vec![0u8; 20 << 20]);
    let r = run(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        i.to_str().unwrap(),
        "--mem",
        "16M",
    ]);
    assert_clean_error(&r, "huge-initrd");
    assert!(r.stderr.contains("does not fit"), "{}", r.stderr);
}

#[test]
fn initrd_for_a_non_linux_image() {
    let g = guest("hello.bin");
    let r = run(&[
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--initrd",
        g.to_str().unwrap(),
    ]);
    assert_clean_error(&r, "not one (bzImage or vmlinux)");
}

#[test]
fn thirty_two_bit_only_bzimage() {
    let mut b = fake_bzimage();
    b[0x236] = 0;
    let k = tmpfile("bz32", &b);
    let r = run(&["run", "--kernel", k.to_str().unwrap()]);
    assert_clean_error(&r, "32-bit-only bzImage");
}

#[test]
fn too_old_boot_protocol() {
    let mut b = fake_bzimage();
    b[0x206..0x208].copy_from_slice(&0x0202u16.to_le_bytes());
    let k = tmpfile("bz-old", &b);
    let r = run(&["run", "--kernel", k.to_str().unwrap()]);
    assert_clean_error(&r, "boot protocol 2.02");
}

#[test]
fn kernel_too_big_for_memory() {
    let mut b = fake_bzimage();
    b[0x260..0x264].copy_from_slice(&(64u32 << 20).to_le_bytes());
    let k = tmpfile("bz-huge-init", &b);
    let r = run(&["run", "--kernel", k.to_str().unwrap(), "--mem", "16M"]);
    assert_clean_error(&r, "to decompress");
}

#[test]
fn cmdline_too_long() {
    let k = tmpfile("fake-bzImage-cmdline", &fake_bzimage());
    let long = "x".repeat(70_000);
    let r = run(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--cmdline",
        &long,
        "--mem",
        "16M",
    ]);
    assert_clean_error(&r, "command line is 70000 bytes");
}

#[test]
fn unknown_cpu_feature() {
    let g = guest("hello.bin");
    let r = run(&[
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--cpu-features=-warp",
    ]);
    assert_eq!(r.code(), 2);
    assert!(
        r.stderr.contains("unknown CPU feature 'warp'"),
        "{}",
        r.stderr
    );
}
