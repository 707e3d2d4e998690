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
    assert_clean_error(&r, "kernel image / is a directory, not a regular file");
}

/// A FIFO in the bad-input directory (created afresh), for --kernel or --initrd.
fn fifo(name: &str) -> PathBuf {
    let dir = root().join("target").join("bad-input");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    let status = std::process::Command::new("mkfifo")
        .arg(&p)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo {}: {status}", p.display());
    p
}

#[test]
fn fifo_as_kernel_does_not_block() {
    let f = fifo("kernel.fifo");
    let r = run(&["run", "--kernel", f.to_str().unwrap()]);
    assert_clean_error(
        &r,
        &format!(
            "kernel image {} is a FIFO (named pipe), not a regular file",
            f.display()
        ),
    );
}

#[test]
fn character_devices_as_kernel() {
    for dev in ["/dev/zero", "/dev/urandom", "/dev/null"] {
        let r = run(&["run", "--kernel", dev]);
        assert_clean_error(
            &r,
            &format!("kernel image {dev} is a character device, not a regular file"),
        );
    }
}

#[test]
fn empty_kernel() {
    let p = tmpfile("empty", b"");
    let r = run(&["run", "--kernel", p.to_str().unwrap()]);
    assert_clean_error(&r, "is empty");
}

#[test]
fn truncated_elf() {
    if !require_kvm() {
        return;
    }
    let src = std::fs::read(guest("hello64.elf")).unwrap();
    let p = tmpfile("truncated.elf", &src[..100]);
    let r = run(&["run", "--kernel", p.to_str().unwrap(), "--mem", "16M"]);
    assert_clean_error(&r, "truncated.elf");
    // linux-loader's reason in words, not a Debug name like "Elf(ReadProgramHeader)".
    assert!(
        r.stderr
            .contains("not a loadable ELF file: cannot read the program headers"),
        "{}",
        r.stderr
    );
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
    b[0x1f4..0x1f8].copy_from_slice(&((0x2000u32 - 0x400) / 16).to_le_bytes()); // syssize
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

/// A kernel that the loader accepts, for the initrd tests.
fn fake_kernel() -> PathBuf {
    tmpfile("fake-bzImage-for-initrd", &fake_bzimage())
}

/// Runs the fake kernel with `initrd`. The initrd is checked when it is loaded, after
/// KVM is opened, so these tests need /dev/kvm (until the VM builder calls
/// `linux::probe_initrd` up front; `initrd_checks_need_no_vm` covers that function).
/// The initrd is checked before /dev/kvm is opened, so these need no KVM.
fn run_with_initrd(initrd: &str) -> Run {
    let k = fake_kernel();
    run(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        initrd,
        "--mem",
        "16M",
    ])
}

#[test]
fn fifo_as_initrd_does_not_block() {
    let f = fifo("initrd.fifo");
    let r = run_with_initrd(f.to_str().unwrap());
    assert_clean_error(
        &r,
        &format!(
            "initrd {} is a FIFO (named pipe), not a regular file",
            f.display()
        ),
    );
}

#[test]
fn dev_zero_as_initrd() {
    let r = run_with_initrd("/dev/zero");
    assert_clean_error(
        &r,
        "initrd /dev/zero is a character device, not a regular file",
    );
}

#[test]
fn empty_initrd() {
    let i = tmpfile("empty-initrd", b"");
    let r = run_with_initrd(i.to_str().unwrap());
    assert_clean_error(&r, &format!("initrd {} is empty", i.display()));
}

#[test]
fn missing_initrd() {
    let r = run_with_initrd("/nonexistent/initrd");
    assert_clean_error(&r, "cannot open initrd /nonexistent/initrd");
    assert!(r.stderr.contains("No such file"), "{}", r.stderr);
}

#[test]
fn initrd_checks_need_no_vm() {
    use ferrite::arch::x86_64::linux::probe_initrd;
    let f = fifo("probe-initrd.fifo");
    let msg = |p: &std::path::Path| probe_initrd(p).unwrap_err().to_string();
    assert_eq!(
        msg(&f),
        format!(
            "initrd {} is a FIFO (named pipe), not a regular file",
            f.display()
        )
    );
    assert_eq!(
        msg("/dev/zero".as_ref()),
        "initrd /dev/zero is a character device, not a regular file"
    );
    assert_eq!(
        msg("/".as_ref()),
        "initrd / is a directory, not a regular file"
    );
    let empty = tmpfile("probe-empty-initrd", b"");
    assert_eq!(msg(&empty), format!("initrd {} is empty", empty.display()));
    let ok = tmpfile("probe-initrd", &[7u8; 4097]);
    assert_eq!(probe_initrd(&ok).unwrap(), 4097);
}

#[test]
fn truncated_bzimage() {
    let b = fake_bzimage();
    let k = tmpfile("bz-truncated", &b[..0x1800]);
    let r = run(&["run", "--kernel", k.to_str().unwrap()]);
    assert_clean_error(
        &r,
        &format!(
            "kernel image {} is a truncated bzImage: 6144 bytes, header promises 8192",
            k.display()
        ),
    );
}

#[test]
fn bzimage_with_damaged_header() {
    let mut b = fake_bzimage();
    b[0x202..0x206].copy_from_slice(b"HdrX");
    let k = tmpfile("bz-damaged", &b);
    let r = run(&["run", "--kernel", k.to_str().unwrap()]);
    assert_clean_error(
        &r,
        "looks like a PC boot sector or a bzImage with a damaged header",
    );
}

#[test]
fn bzimage_not_loadable_high_reads_as_words() {
    if !require_kvm() {
        return;
    }
    let mut b = fake_bzimage();
    b[0x211] = 0; // loadflags: LOADED_HIGH clear
    let k = tmpfile("bz-low", &b);
    let r = run(&["run", "--kernel", k.to_str().unwrap(), "--mem", "16M"]);
    assert_clean_error(&r, "is not a loadable bzImage: invalid setup header");
    assert!(!r.stderr.contains("Bzimage("), "{}", r.stderr);
}

#[test]
fn files_that_are_not_images_are_named() {
    let mut deb =
        b"!<arch>\ndebian-binary   1700000000  0     0     100644  4         `\n2.0\n".to_vec();
    deb.extend_from_slice(&[0x8b; 64]);
    let cases: [(&str, Vec<u8>, &str); 10] = [
        (
            "README",
            b"Ferrite\n=======\n\nA small VMM for Linux/KVM.\n".to_vec(),
            "is a text file (it begins \"Ferrite\"), not a bootable image",
        ),
        (
            "kernel.gz",
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xcb\x48\xcd\xc9\xc9\x07\x00".to_vec(),
            "is gzip-compressed data, not a bootable image",
        ),
        (
            "kernel.xz",
            b"\xfd7zXZ\x00\x00\x04\xe6\xd6\xb4\x46".to_vec(),
            "is xz-compressed data",
        ),
        (
            "kernel.zst",
            b"\x28\xb5\x2f\xfd\x24\x05\x29\x00\x00".to_vec(),
            "is zstd-compressed data",
        ),
        (
            "kernel.bz2",
            b"BZh91AY&SY\x9b\x12\x00\x00".to_vec(),
            "is bzip2-compressed data",
        ),
        (
            "kernel.zip",
            b"PK\x03\x04\x14\x00\x00\x00\x08\x00".to_vec(),
            "is a zip archive",
        ),
        ("package.deb", deb, "is an ar archive (a .deb package)"),
        (
            "lib.a",
            b"!<arch>\n/               0           0     0     0       4         `\n".to_vec(),
            "is an ar archive, not",
        ),
        (
            "run.sh",
            b"#!/bin/sh\nexec ferrite run --kernel bzImage\n".to_vec(),
            "is a script (#!/bin/sh), not a bootable image",
        ),
        (
            "disk.img",
            {
                let mut mbr = vec![0xfau8; 512];
                mbr[510..].copy_from_slice(&[0x55, 0xaa]);
                mbr
            },
            "looks like a PC boot sector",
        ),
    ];
    for (name, bytes, needle) in cases {
        let p = tmpfile(name, &bytes);
        let r = run(&["run", "--kernel", p.to_str().unwrap()]);
        assert_clean_error(&r, &format!("kernel image {} {needle}", p.display()));
    }
}

#[test]
fn flat_test_guests_are_not_mistaken_for_text() {
    use ferrite::loader::{probe, ImageFormat};
    let mut n = 0;
    for entry in std::fs::read_dir(guests_dir()).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "bin") {
            assert_eq!(probe(&p).unwrap(), ImageFormat::Flat, "{}", p.display());
            n += 1;
        }
    }
    assert!(n > 0, "no flat guests in {}", guests_dir().display());
}

/// Issue 13: a cause was printed twice ("... (os error 2): No such file or directory
/// (os error 2)").
#[test]
fn missing_disk_error_names_its_cause_once() {
    if !require_kvm() {
        return;
    }
    let k = tmpfile("fake-bzImage-disk", &fake_bzimage());
    let r = run(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--mem",
        "16M",
        "--disk",
        "/nonexistent/ferrite-disk.img",
    ]);
    assert_clean_error(&r, "cannot open disk image /nonexistent/ferrite-disk.img");
    assert_eq!(
        r.stderr.matches("No such file or directory").count(),
        1,
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.matches("(os error 2)").count(), 1, "{}", r.stderr);
}

/// Issue 13: `--disk a.img --disk a.img` said "in use by another process". It is found
/// before KVM is opened, so this needs no /dev/kvm.
#[test]
fn same_disk_given_twice_is_named() {
    let k = tmpfile("fake-bzImage-twice", &fake_bzimage());
    let d = tmpfile("twice.img", &[0u8; 4096]);
    let ds = d.to_str().unwrap();
    let r = run(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--mem",
        "16M",
        "--disk",
        ds,
        "--disk",
        ds,
    ]);
    assert_clean_error(
        &r,
        &format!("disk image {ds} is given twice (--disk 1 and --disk 2"),
    );
    assert!(!r.stderr.contains("in use"), "{}", r.stderr);
}

/// Issue 13: a repeated balloon option was taken silently (the last one won); the
/// `--balloon` flag itself given twice is refused by the parser.
#[test]
fn repeated_balloon_option_is_refused() {
    let g = guest("hello.bin");
    let gs = g.to_str().unwrap();
    let r = run(&[
        "run",
        "--kernel",
        gs,
        "--balloon",
        "stats-interval=0,stats-interval=5",
    ]);
    assert_eq!(r.code(), 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("stats-interval given more than once"),
        "{}",
        r.stderr
    );
    let r = run(&[
        "run",
        "--kernel",
        gs,
        "--balloon=deflate-on-oom=off",
        "--balloon=deflate-on-oom=on",
    ]);
    assert_eq!(r.code(), 2, "{}", r.stderr);
    assert!(r.stderr.contains("--balloon"), "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot be used multiple times"),
        "{}",
        r.stderr
    );
}

/// Issue 13 defect 12: a start that failed after creating its `--mem-backing file=`
/// left the file behind. Three failures after the file is made: a bad disk, a missing
/// TAP device, a kernel too big for guest memory. A file that existed before is kept.
#[test]
fn failed_start_removes_the_backing_file_it_created() {
    if !require_kvm() {
        return;
    }
    let dir = root().join("target").join("bad-input");
    std::fs::create_dir_all(&dir).unwrap();
    let k = tmpfile("fake-bzImage-backing", &fake_bzimage());
    let mut big = fake_bzimage();
    big[0x260..0x264].copy_from_slice(&(64u32 << 20).to_le_bytes());
    let big = tmpfile("bz-huge-init-backing", &big);
    let ks = k.to_str().unwrap();
    let cases: [(&str, &[&str], &str); 3] = [
        (
            "bad disk",
            &["--kernel", ks, "--disk", "/nonexistent/ferrite-disk.img"],
            "cannot open disk image",
        ),
        (
            "missing TAP",
            &["--kernel", ks, "--net", "tap=ferritenotap0"],
            "ferritenotap0",
        ),
        (
            "kernel too big",
            &["--kernel", big.to_str().unwrap()],
            "to decompress",
        ),
    ];
    for (what, args, needle) in cases {
        let ram = dir.join(format!("backing-{}", what.replace(' ', "-")));
        let _ = std::fs::remove_file(&ram);
        let backing = format!("file={}", ram.display());
        let mut all = vec!["run", "--mem", "16M", "--mem-backing", &backing];
        all.extend_from_slice(args);
        let r = run(&all);
        assert_clean_error(&r, needle);
        assert!(!ram.exists(), "{what}: {} was left behind", ram.display());

        // The user's own (empty) file is not removed by the same failure.
        std::fs::File::create(&ram).unwrap();
        let r = run(&all);
        assert_clean_error(&r, needle);
        assert!(
            ram.exists(),
            "{what}: the user's {} was removed",
            ram.display()
        );
        std::fs::remove_file(&ram).unwrap();
    }
}
