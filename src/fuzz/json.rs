//! Random request bodies: JSON of any shape whose keys and strings are mostly the
//! names the API knows (so that deep fields are reached), numbers at and beyond every
//! integer type's edge, nesting beyond the parser's depth limit, and the same text
//! damaged: bytes flipped, cut short, invalid UTF-8, or no JSON at all.

use proptest::prelude::*;

/// Every field name of the Firecracker bodies, the config file and the native API.
pub const KEYS: &[&str] = &[
    "vcpu_count",
    "mem_size_mib",
    "smt",
    "ht_enabled",
    "cpu_template",
    "track_dirty_pages",
    "huge_pages",
    "kernel_image_path",
    "initrd_path",
    "boot_args",
    "drive_id",
    "partuuid",
    "is_root_device",
    "cache_type",
    "is_read_only",
    "path_on_host",
    "rate_limiter",
    "io_engine",
    "socket",
    "iface_id",
    "host_dev_name",
    "guest_mac",
    "mtu",
    "rx_rate_limiter",
    "tx_rate_limiter",
    "allow_mmds_requests",
    "serial_out_path",
    "amount_mib",
    "deflate_on_oom",
    "stats_polling_interval_s",
    "free_page_hinting",
    "free_page_reporting",
    "guest_cid",
    "uds_path",
    "vsock_id",
    "action_type",
    "state",
    "bandwidth",
    "ops",
    "size",
    "one_time_burst",
    "refill_time",
    "log_path",
    "level",
    "show_level",
    "show_log_origin",
    "module",
    "metrics_path",
    "balloon",
    "drives",
    "boot-source",
    "cpu-config",
    "logger",
    "machine-config",
    "metrics",
    "mmds-config",
    "network-interfaces",
    "vsock",
    "entropy",
    "pmem",
    "memory-hotplug",
    "mode",
    "timeout_ms",
    "vcpu",
    "target",
];

/// Strings the bodies give meaning to: enum variants, ids, MACs, sizes, levels, and
/// paths that do and do not exist (none that a handler could create or write).
pub const STRINGS: &[&str] = &[
    "",
    "None",
    "none",
    "2M",
    "Unsafe",
    "Writeback",
    "Sync",
    "Async",
    "FlushMetrics",
    "InstanceStart",
    "SendCtrlAltDel",
    "Paused",
    "Resumed",
    "graceful",
    "hard",
    "64M",
    "1G",
    "99999999999T",
    "-1",
    "Info",
    "Warning",
    "trace",
    "C3",
    "rootfs",
    "eth0",
    "tap0",
    "a b",
    "é",
    "aa:bb:cc:dd:ee:ff",
    "06:00:AC:10:00:02",
    "01:00:00:00:00:00",
    "00:00:00:00:00:00",
    "zz:zz:zz:zz:zz:zz",
    "/dev/null",
    "/nonexistent/ferrite-fuzz",
    "/",
];

/// Number literals: the edges of u8 to u64 and i64, beyond them, negative zero,
/// fractions and exponents (`1e400` is beyond f64).
const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "2",
    "3",
    "32",
    "33",
    "255",
    "256",
    "65535",
    "65536",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "340282366920938463463374607431768211456",
    "0.5",
    "1.0",
    "1e2",
    "1E-7",
    "-2.5e10",
    "1e400",
];

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(KEYS).prop_map(str::to_owned),
        1 => ".{0,12}",
    ]
}

fn leaf() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just("null".to_owned()),
        1 => any::<bool>().prop_map(|b| b.to_string()),
        2 => prop::sample::select(NUMBERS).prop_map(str::to_owned),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|x| serde_json::to_string(&x).unwrap_or_else(|_| "0".into())),
        3 => prop::sample::select(STRINGS).prop_map(quote),
        1 => ".{0,24}".prop_map(|s| quote(&s)),
    ]
}

/// JSON text of any shape (objects mostly keyed by [`KEYS`]), duplicate keys included.
pub fn json() -> impl Strategy<Value = String> {
    leaf().prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((key(), inner), 0..7).prop_map(|kv| {
                let fields: Vec<String> = kv
                    .iter()
                    .map(|(k, v)| format!("{}:{v}", quote(k)))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
}

/// An object whose keys are all known names: the shape that gets past the first
/// checks of a body type.
pub fn object() -> impl Strategy<Value = String> {
    prop::collection::vec(
        (
            prop::sample::select(KEYS),
            prop_oneof![3 => leaf(), 1 => json()],
        ),
        0..8,
    )
    .prop_map(|kv| {
        let fields: Vec<String> = kv
            .iter()
            .map(|(k, v)| format!("{}:{v}", quote(k)))
            .collect();
        format!("{{{}}}", fields.join(","))
    })
}

/// Nesting deeper than serde_json's limit (128), in arrays or objects.
fn deep() -> impl Strategy<Value = String> {
    (100usize..400, any::<bool>()).prop_map(|(n, arrays)| {
        if arrays {
            format!("{}{}", "[".repeat(n), "]".repeat(n))
        } else {
            format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n))
        }
    })
}

/// Damages `bytes`: flips, inserted invalid UTF-8 and control bytes, a cut.
fn damage(
    mut bytes: Vec<u8>,
    edits: Vec<(prop::sample::Index, u8, u8)>,
    cut: Option<prop::sample::Index>,
) -> Vec<u8> {
    for (i, kind, b) in edits {
        if bytes.is_empty() {
            bytes.push(b);
            continue;
        }
        let i = i.index(bytes.len());
        match kind % 4 {
            0 => bytes[i] = b,
            1 => bytes.insert(i, 0x80 | (b & 0x7f)), // a lone continuation byte
            2 => bytes.insert(i, [0xff, 0xc0, 0xed, 0x00, b'"', b'\\'][usize::from(b) % 6]),
            _ => {
                bytes.remove(i);
            }
        }
    }
    if let Some(c) = cut {
        bytes.truncate(c.index(bytes.len() + 1));
    }
    bytes
}

/// A request body: valid JSON of any shape, known-key objects, deep nesting, damaged
/// JSON, or bytes.
pub fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => object().prop_map(String::into_bytes),
        3 => json().prop_map(String::into_bytes),
        1 => deep().prop_map(String::into_bytes),
        2 => (
            prop_oneof![object(), json()],
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<u8>()), 1..4),
            prop::option::of(any::<prop::sample::Index>()),
        )
            .prop_map(|(t, e, c)| damage(t.into_bytes(), e, c)),
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => prop::sample::select(&["", " ", "null", "{}", "[]", "\"\"", "0", "{", "}"][..])
            .prop_map(|s| s.as_bytes().to_vec()),
    ]
}
