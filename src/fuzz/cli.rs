//! Both command lines (`ferrite` and `ferrite firecracker`) with random argument
//! vectors built from their real flags, and the option parsers behind `--mem`,
//! `--disk`, `--net`, `--balloon` and `--vsock` with random strings; valid options
//! written out and parsed back give the same settings.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use clap::Parser;
use proptest::prelude::*;

use super::cases;
use crate::cli::Cli;
use crate::devices::virtio::balloon::BalloonConfig;
use crate::devices::virtio::block::DiskConfig;
use crate::devices::virtio::net::NetConfig;
use crate::devices::virtio::vsock::config::VsockConfig;

const FERRITE_SUBCOMMANDS: &[&str] = &[
    "run", "list", "pause", "resume", "stop", "debug", "stat", "balloon", "help", "bogus", "jail",
];

const FERRITE_FLAGS: &[&str] = &[
    "--log-level",
    "--kernel",
    "-k",
    "--initrd",
    "-i",
    "--cmdline",
    "--cpu-features",
    "--mem",
    "-m",
    "--mem-backing",
    "--hugepages",
    "--mem-prealloc",
    "--cpus",
    "-c",
    "--kvm-device",
    "--debug-exit",
    "--disk",
    "--net",
    "--name",
    "--api-socket",
    "--rng",
    "--console",
    "--balloon",
    "--vsock",
    "--json",
    "--hard",
    "--timeout",
    "--watch",
    "--id",
    "--exec-file",
    "--uid",
    "--gid",
    "--chroot-base-dir",
    "--netns",
    "--cgroup",
    "--cgroup-version",
    "--parent-cgroup",
    "--resource-limit",
    "--new-pid-ns",
    "--daemonize",
    "--link-file",
    "--help",
    "-h",
    "--version",
    "-V",
    "--",
    "-",
];

const FIRECRACKER_FLAGS: &[&str] = &[
    "--api-sock",
    "--id",
    "--seccomp-filter",
    "--no-seccomp",
    "--start-time-us",
    "--start-time-cpu-us",
    "--parent-cpu-time-us",
    "--config-file",
    "--metadata",
    "--no-api",
    "--log-path",
    "--level",
    "--module",
    "--show-level",
    "--show-log-origin",
    "--metrics-path",
    "--boot-timer",
    "--version",
    "--snapshot-version",
    "--describe-snapshot",
    "--http-api-max-payload-size",
    "--mmds-size-limit",
    "--enable-pci",
    "--help",
    "--",
];

/// Values the flags give meaning to, and near misses.
const VALUES: &[&str] = &[
    "",
    "0",
    "1",
    "-1",
    "128",
    "16M",
    "1G",
    "2T",
    "512MiB",
    "99999999999T",
    "18446744073709551616",
    "0.001",
    "0.0001",
    "86400",
    "86401",
    "NaN",
    "inf",
    "1e-3",
    "-x2apic",
    "-x2apic,-cx16",
    "+avx",
    "-bogus",
    "anon",
    "memfd",
    "file=",
    "file=/nonexistent/ferrite-fuzz",
    "hugetlbfs",
    "thp",
    "off",
    "serial",
    "virtio",
    "trace",
    "warn",
    "Warning",
    "/dev/null",
    "vm1",
    "-vm",
    ".vm",
    "a/b",
    "tap=tap0",
    "tap=tap0,mac=52:54:00:12:34:56",
    "tap=,mac=",
    "/x,ro,serial=abc",
    "/x,,ro",
    "deflate-on-oom=on,stats-interval=3600",
    "stats-interval=3601",
    "cid=3,uds=/tmp/ferrite-fuzz.sock",
    "cid=2,uds=x",
    "anonymous-instance",
    "é",
];

fn token(flags: &'static [&'static str]) -> impl Strategy<Value = OsString> {
    prop_oneof![
        4 => prop::sample::select(flags).prop_map(OsString::from),
        4 => prop::sample::select(VALUES).prop_map(OsString::from),
        1 => (prop::sample::select(flags), prop::sample::select(VALUES))
            .prop_map(|(f, v)| OsString::from(format!("{f}={v}"))),
        1 => ".{0,16}".prop_map(OsString::from),
        1 => prop::collection::vec(any::<u8>(), 0..12).prop_map(OsString::from_vec),
    ]
}

fn ferrite_argv() -> impl Strategy<Value = Vec<OsString>> {
    (
        prop::option::weighted(0.9, prop::sample::select(FERRITE_SUBCOMMANDS)),
        prop::collection::vec(token(FERRITE_FLAGS), 0..10),
    )
        .prop_map(|(sub, rest)| {
            let mut argv = vec![OsString::from("ferrite")];
            argv.extend(sub.map(OsString::from));
            argv.extend(rest);
            argv
        })
}

fn firecracker_argv() -> impl Strategy<Value = Vec<OsString>> {
    prop::collection::vec(token(FIRECRACKER_FLAGS), 0..10).prop_map(|rest| {
        let mut argv = vec![OsString::from("firecracker")];
        argv.extend(rest);
        argv
    })
}

/// Option strings: fragments of the real syntax joined by commas, or anything.
fn option_string() -> impl Strategy<Value = String> {
    let fragments = &[
        "ro",
        "serial=",
        "serial=abc",
        "serial=0123456789012345678901",
        "tap=",
        "tap=tap0",
        "tap=0123456789abcdef",
        "tap=a:b",
        "mac=",
        "mac=52:54:00:12:34:56",
        "mac=01:00:00:00:00:00",
        "mac=00:00:00:00:00:00",
        "mac=52:54:00:12:34",
        "mac=52:54:00:12:34:56:78",
        "mac=5:54:00:12:34:56",
        "mac=+5:54:00:12:34:56",
        "deflate-on-oom=on",
        "deflate-on-oom=yes",
        "free-page-reporting=off",
        "stats-interval=0",
        "stats-interval=3600",
        "stats-interval=18446744073709551616",
        "cid=3",
        "cid=4294967295",
        "cid=4294967294",
        "cid=-1",
        "uds=/tmp/v.sock",
        "uds=",
        "max-connections=0",
        "max-connections=1",
        "=",
        "",
        "/path",
    ][..];
    prop_oneof![
        3 => prop::collection::vec(
            prop_oneof![4 => prop::sample::select(fragments).prop_map(str::to_owned), 1 => ".{0,8}"],
            0..6,
        )
        .prop_map(|v| v.join(",")),
        1 => ".{0,40}",
    ]
}

fn suffix() -> impl Strategy<Value = (&'static str, u32)> {
    prop::sample::select(
        &[
            ("", 20),
            ("K", 10),
            ("k", 10),
            ("M", 20),
            ("MiB", 20),
            ("mb", 20),
            ("G", 30),
            ("GiB", 30),
            ("T", 40),
            ("tB", 40),
        ][..],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(1000)))]

    /// `ferrite ...`: parsed or a clap error (whose text renders), never a panic.
    #[test]
    fn ferrite_argv_parses_or_is_a_clap_error(argv in ferrite_argv()) {
        if let Err(e) = Cli::try_parse_from(&argv) {
            let _ = e.render().to_string();
        }
    }

    /// `ferrite firecracker ...`: parsed with a valid id, or an error with Firecracker's
    /// status (153; 0 for --help).
    #[test]
    fn firecracker_argv_parses_or_is_status_153(argv in firecracker_argv()) {
        match crate::firecracker::cli::parse(argv.clone()) {
            Ok(a) => prop_assert!(crate::firecracker::cli::valid_id(&a.id), "{:?}", argv),
            Err((msg, status)) => {
                prop_assert!(status == 153 || status == 0, "{:?}: {} {}", argv, status, msg);
                prop_assert!(!msg.is_empty());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(2000)))]

    /// Every option parser with random strings: Ok or Err.
    #[test]
    fn option_parsers_take_any_string(s in option_string()) {
        let _ = crate::size::parse(&s);
        let _ = crate::cli::parse_mem_size(&s);
        let _ = DiskConfig::parse(&s);
        let _ = NetConfig::parse(&s);
        let _ = BalloonConfig::parse(&s);
        let _ = VsockConfig::parse(&s);
    }

    /// A number with a suffix is that many units, or "too large" when it overflows.
    #[test]
    fn sizes_are_the_number_times_the_unit(
        n in prop_oneof![any::<u64>(), 0u64..100_000],
        (suffix, shift) in suffix(),
        pad in prop::sample::select(&["", " ", "\t"][..]),
    ) {
        let text = format!("{pad}{n}{suffix}{pad}");
        let expected = n.checked_mul(1u64 << shift);
        match crate::size::parse(&text) {
            Ok(bytes) => prop_assert_eq!(Some(bytes), expected, "{:?}", text),
            Err(e) => {
                prop_assert!(expected.is_none(), "{:?}: {}", text, e);
                prop_assert!(e.contains("too large"), "{:?}: {}", text, e);
            }
        }
    }

    #[test]
    fn disk_options_round_trip(
        path in "[^,\\x00]{1,30}",
        ro in any::<bool>(),
        serial in prop::option::of("[ -+\\--~]{1,20}"),
    ) {
        let mut spec = path.clone();
        if ro {
            spec.push_str(",ro");
        }
        if let Some(s) = &serial {
            spec.push_str(&format!(",serial={s}"));
        }
        let d = DiskConfig::parse(&spec).map_err(TestCaseError::fail)?;
        prop_assert_eq!(d.path, PathBuf::from(&path));
        prop_assert_eq!(d.read_only, ro);
        prop_assert_eq!(d.serial, serial);
    }

    #[test]
    fn net_options_round_trip(
        tap in "[a-zA-Z0-9_.-]{1,15}",
        mac in prop::option::of(any::<[u8; 6]>()),
        upper in any::<bool>(),
    ) {
        prop_assume!(tap != "." && tap != "..");
        let mut spec = format!("tap={tap}");
        if let Some(m) = mac {
            let hex: Vec<String> = m
                .iter()
                .map(|b| if upper { format!("{b:02X}") } else { format!("{b:02x}") })
                .collect();
            spec.push_str(&format!(",mac={}", hex.join(":")));
        }
        match NetConfig::parse(&spec) {
            Ok(n) => {
                prop_assert_eq!(n.tap, tap);
                prop_assert_eq!(n.mac, mac);
            }
            // Only a MAC no NIC may have is refused.
            Err(e) => prop_assert!(
                mac.is_some_and(|m| m[0] & 1 != 0 || m == [0; 6]),
                "{}: {}",
                spec,
                e
            ),
        }
    }

    #[test]
    fn balloon_options_round_trip(
        deflate in prop::option::of(any::<bool>()),
        interval in prop::option::of(0u64..=3600),
        reporting in prop::option::of(any::<bool>()),
    ) {
        let onoff = |b: bool| if b { "on" } else { "off" };
        let mut parts = Vec::new();
        if let Some(d) = deflate {
            parts.push(format!("deflate-on-oom={}", onoff(d)));
        }
        if let Some(i) = interval {
            parts.push(format!("stats-interval={i}"));
        }
        if let Some(r) = reporting {
            parts.push(format!("free-page-reporting={}", onoff(r)));
        }
        let c = BalloonConfig::parse(&parts.join(",")).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let d = BalloonConfig::default();
        prop_assert_eq!(c.deflate_on_oom, deflate.unwrap_or(d.deflate_on_oom));
        prop_assert_eq!(
            c.stats_interval,
            interval.map_or(d.stats_interval, std::time::Duration::from_secs)
        );
        prop_assert_eq!(c.free_page_reporting, reporting.unwrap_or(d.free_page_reporting));
    }

    #[test]
    fn vsock_options_round_trip(
        cid in prop_oneof![Just(3u64), Just(u64::from(u32::MAX) - 1), 3..u64::from(u32::MAX)],
        uds in "/[a-z0-9_./-]{0,95}",
        max in prop::option::of(1usize..100_000),
    ) {
        let mut spec = format!("cid={cid},uds={uds}");
        if let Some(m) = max {
            spec.push_str(&format!(",max-connections={m}"));
        }
        let c = VsockConfig::parse(&spec).map_err(TestCaseError::fail)?;
        prop_assert_eq!(c.cid, cid);
        prop_assert_eq!(c.uds, PathBuf::from(&uds));
        if let Some(m) = max {
            prop_assert_eq!(c.max_connections, m);
        }
    }
}
