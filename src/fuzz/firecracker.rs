//! The Firecracker-compatible front door: every API body and the config file parsed
//! from random bytes; valid bodies written and read back; and random request
//! sequences through `FcApi::handle`, the function the API server calls, before any
//! VM exists (no KVM needed).

use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::cases;
use super::json::{self, STRINGS};
use crate::control::http::{Method, Request, Response};
use crate::control::service::{Pending, Service};
use crate::event_loop::EventLoop;
use crate::firecracker::api::{Config, FcApi, Options};
use crate::firecracker::logger::LoggerConfig;
use crate::firecracker::metrics::MetricsConfig;
use crate::firecracker::model::*;
use crate::outcome::StopSignal;

/// Parses `body` as every body type the API and the config file read, as the server
/// does (`serde_json::from_slice`; the config file is read as UTF-8 text first).
/// Returns how many types accepted it.
fn parse_as_every_body(body: &[u8]) -> usize {
    fn ok<T: DeserializeOwned>(body: &[u8]) -> usize {
        usize::from(serde_json::from_slice::<T>(body).is_ok())
    }
    let config_file = std::str::from_utf8(body).ok().map_or(0, |t| {
        usize::from(serde_json::from_str::<FullConfig>(t).is_ok())
    });
    config_file
        + ok::<MachineConfig>(body)
        + ok::<MachineConfigUpdate>(body)
        + ok::<BootSource>(body)
        + ok::<Drive>(body)
        + ok::<PartialDrive>(body)
        + ok::<NetworkInterface>(body)
        + ok::<PartialNetworkInterface>(body)
        + ok::<Entropy>(body)
        + ok::<Serial>(body)
        + ok::<Balloon>(body)
        + ok::<BalloonUpdate>(body)
        + ok::<BalloonStatsUpdate>(body)
        + ok::<Vsock>(body)
        + ok::<InstanceAction>(body)
        + ok::<VmState>(body)
        + ok::<LoggerConfig>(body)
        + ok::<MetricsConfig>(body)
        + ok::<RateLimiter>(body)
        + ok::<TokenBucket>(body)
}

fn round_trips<T>(v: &T) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let text = serde_json::to_string(v).map_err(|e| TestCaseError::fail(format!("{v:?}: {e}")))?;
    let back: T = serde_json::from_str(&text)
        .map_err(|e| TestCaseError::fail(format!("{text} does not parse back: {e}")))?;
    prop_assert_eq!(&back, v, "{}", text);
    Ok(())
}

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(STRINGS).prop_map(str::to_owned),
        ".{0,16}",
    ]
}

fn bucket() -> impl Strategy<Value = TokenBucket> {
    (any::<u64>(), any::<Option<u64>>(), any::<u64>()).prop_map(
        |(size, one_time_burst, refill_time)| TokenBucket {
            size,
            one_time_burst,
            refill_time,
        },
    )
}

fn limiter() -> impl Strategy<Value = RateLimiter> {
    (prop::option::of(bucket()), prop::option::of(bucket()))
        .prop_map(|(bandwidth, ops)| RateLimiter { bandwidth, ops })
}

fn machine() -> impl Strategy<Value = MachineConfig> {
    (
        any::<u8>(),
        any::<usize>(),
        any::<bool>(),
        prop::option::of(string()),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(vcpu_count, mem_size_mib, smt, cpu_template, track_dirty_pages, huge)| {
                MachineConfig {
                    vcpu_count,
                    mem_size_mib,
                    smt,
                    cpu_template,
                    track_dirty_pages,
                    huge_pages: if huge {
                        HugePages::Huge2M
                    } else {
                        HugePages::None
                    },
                }
            },
        )
}

fn boot() -> impl Strategy<Value = BootSource> {
    (
        string(),
        prop::option::of(string()),
        prop::option::of(string()),
    )
        .prop_map(|(kernel_image_path, initrd_path, boot_args)| BootSource {
            kernel_image_path,
            initrd_path,
            boot_args,
        })
}

fn drive() -> impl Strategy<Value = Drive> {
    (
        (
            string(),
            prop::option::of(string()),
            any::<bool>(),
            any::<bool>(),
        ),
        (
            any::<Option<bool>>(),
            prop::option::of(string()),
            prop::option::of(limiter()),
            any::<bool>(),
            prop::option::of(string()),
        ),
    )
        .prop_map(
            |((drive_id, partuuid, is_root_device, wb), (ro, path, rate_limiter, asy, socket))| {
                Drive {
                    drive_id,
                    partuuid,
                    is_root_device,
                    cache_type: if wb {
                        CacheType::Writeback
                    } else {
                        CacheType::Unsafe
                    },
                    is_read_only: ro,
                    path_on_host: path,
                    rate_limiter,
                    io_engine: if asy { IoEngine::Async } else { IoEngine::Sync },
                    socket,
                }
            },
        )
}

fn net() -> impl Strategy<Value = NetworkInterface> {
    (
        string(),
        string(),
        prop::option::of(string()),
        any::<Option<u16>>(),
        prop::option::of(limiter()),
        prop::option::of(limiter()),
    )
        .prop_map(
            |(iface_id, host_dev_name, guest_mac, mtu, rx, tx)| NetworkInterface {
                iface_id,
                host_dev_name,
                guest_mac,
                mtu,
                rx_rate_limiter: rx,
                tx_rate_limiter: tx,
                // Never written (an old client's field, read only).
                allow_mmds_requests: None,
            },
        )
}

fn balloon() -> impl Strategy<Value = Balloon> {
    (
        any::<u32>(),
        any::<bool>(),
        any::<u16>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                amount_mib,
                deflate_on_oom,
                stats_polling_interval_s,
                free_page_hinting,
                free_page_reporting,
            )| {
                Balloon {
                    amount_mib,
                    deflate_on_oom,
                    stats_polling_interval_s,
                    free_page_hinting,
                    free_page_reporting,
                }
            },
        )
}

fn vsock() -> impl Strategy<Value = Vsock> {
    (any::<u32>(), string(), prop::option::of(string())).prop_map(
        |(guest_cid, uds_path, vsock_id)| Vsock {
            guest_cid,
            uds_path,
            vsock_id,
        },
    )
}

fn level() -> impl Strategy<Value = log::LevelFilter> {
    prop::sample::select(
        &[
            log::LevelFilter::Off,
            log::LevelFilter::Error,
            log::LevelFilter::Warn,
            log::LevelFilter::Info,
            log::LevelFilter::Debug,
            log::LevelFilter::Trace,
        ][..],
    )
}

fn logger() -> impl Strategy<Value = LoggerConfig> {
    (
        prop::option::of(string()),
        prop::option::of(level()),
        any::<Option<bool>>(),
        any::<Option<bool>>(),
        prop::option::of(string()),
    )
        .prop_map(
            |(path, level, show_level, show_log_origin, module)| LoggerConfig {
                log_path: path.map(Into::into),
                level,
                show_level,
                show_log_origin,
                module,
            },
        )
}

/// A free-form section (`cpu-config` and the like): JSON without floats, whose text
/// form is exact.
fn free_json() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::json!({})),
        any::<u64>().prop_map(|n| serde_json::json!({ "n": n })),
        string().prop_map(|s| serde_json::json!({ "s": s, "a": [1, 2, null] })),
    ]
}

fn full_config() -> impl Strategy<Value = FullConfig> {
    (
        (
            prop::option::of(balloon()),
            prop::collection::vec(drive(), 0..3),
            boot(),
            prop::option::of(free_json()),
            prop::option::of(logger()),
            prop::option::of(machine()),
        ),
        (
            prop::option::of(string().prop_map(|p| MetricsConfig {
                metrics_path: p.into(),
            })),
            prop::option::of(free_json()),
            prop::collection::vec(net(), 0..3),
            prop::option::of(vsock()),
            prop::option::of(
                prop::option::of(limiter()).prop_map(|rate_limiter| Entropy { rate_limiter }),
            ),
            prop::collection::vec(free_json(), 0..2),
            prop::option::of(free_json()),
        ),
    )
        .prop_map(
            |(
                (balloon, drives, boot_source, cpu_config, logger, machine_config),
                (metrics, mmds_config, network_interfaces, vsock, entropy, pmem, memory_hotplug),
            )| FullConfig {
                balloon,
                drives,
                boot_source,
                cpu_config,
                logger,
                machine_config,
                metrics,
                mmds_config,
                network_interfaces,
                vsock,
                entropy,
                pmem,
                memory_hotplug,
            },
        )
}

/// An API on its own event loop (not running: nothing here needs it), as
/// `firecracker::run` makes one.
fn fc_api() -> (Arc<FcApi>, EventLoop) {
    let stop = Arc::new(StopSignal::new());
    let l = EventLoop::new(stop.clone()).expect("an event loop");
    let api = FcApi::new(
        Options {
            id: "fuzz".into(),
            boot_timer: false,
            max_payload: 2048,
        },
        l.handle(),
        stop,
        Arc::new(Mutex::new(None)),
    );
    (Arc::new(api), l)
}

/// The API's configuration as text (to see that a refusal changed nothing).
fn config_of(api: &FcApi) -> String {
    let mut shown = String::new();
    let _ = api.configure(|c: &mut Config| {
        shown = format!("{c:?}");
        Ok(())
    });
    shown
}

fn has_kernel(api: &FcApi) -> bool {
    let mut has = false;
    let _ = api.configure(|c| {
        has = c.boot.is_some();
        Ok(())
    });
    has
}

/// Applies a config file's sections as `firecracker::run` does (logger and metrics
/// left out: they open files), without the start; `no_kernel` skips the boot source.
fn apply_config_file(
    cfg: &mut Config,
    c: &FullConfig,
    no_kernel: bool,
) -> Result<(), crate::firecracker::api::Error> {
    if let Some(m) = &c.machine_config {
        cfg.put_machine(m.clone())?;
    }
    if !no_kernel {
        cfg.put_boot(c.boot_source.clone())?;
    }
    for d in &c.drives {
        cfg.put_drive(d.clone())?;
    }
    for n in &c.network_interfaces {
        cfg.put_net(n.clone())?;
    }
    if let Some(b) = &c.balloon {
        cfg.put_balloon(b.clone())?;
    }
    if let Some(e) = &c.entropy {
        cfg.put_entropy(e.clone())?;
    }
    Ok(())
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        4 => Just(Method::Put),
        2 => Just(Method::Get),
        2 => Just(Method::Patch),
        1 => prop::sample::select(vec![
            Method::Post,
            Method::Delete,
            Method::Other("get".into()),
            Method::Other("PUT ".into()),
        ]),
    ]
}

/// Every route (`/logger` and `/metrics` left out: they open the files they name, and
/// `PUT /metrics` succeeds once per process), ids from the strings, random paths.
fn path() -> impl Strategy<Value = String> {
    let routes = &[
        "/",
        "",
        "//",
        "/version",
        "/machine-config",
        "/machine-config/",
        "/vm",
        "/vm/config",
        "/balloon",
        "/balloon/statistics",
        "/balloon/other",
        "/mmds",
        "/actions",
        "/boot-source",
        "/entropy",
        "/serial",
        "/vsock",
        "/snapshot/create",
        "/pmem/p",
        "/cpu-config",
        "/hotplug/memory",
        "/drives",
        "/network-interfaces",
    ][..];
    prop_oneof![
        6 => prop::sample::select(routes).prop_map(str::to_owned),
        3 => (prop::sample::select(&["/drives/", "/network-interfaces/"][..]), string())
            .prop_map(|(p, id)| format!("{p}{id}")),
        1 => "/[a-z/-]{0,20}",
    ]
}

/// A body that names the right id often enough for the id checks to pass.
fn fc_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => Just(Vec::new()),
        6 => json::body(),
        2 => (drive(), any::<bool>()).prop_map(|(mut d, real)| {
            if real {
                d.drive_id = "rootfs".into();
                d.path_on_host = Some("/dev/null".into());
                d.socket = None;
            }
            serde_json::to_vec(&d).unwrap_or_default()
        }),
        1 => net().prop_map(|n| serde_json::to_vec(&n).unwrap_or_default()),
        1 => machine().prop_map(|m| serde_json::to_vec(&m).unwrap_or_default()),
        1 => balloon().prop_map(|b| serde_json::to_vec(&b).unwrap_or_default()),
        1 => boot().prop_map(|b| serde_json::to_vec(&b).unwrap_or_default()),
    ]
}

/// A body for `route`: a value of its type, the id in the path matching most of the
/// time, then perhaps damaged at the JSON level (a field removed, set to anything, or
/// one nobody knows added).
fn typed_request() -> impl Strategy<Value = (Method, String, serde_json::Value)> {
    fn v(x: impl Serialize) -> serde_json::Value {
        serde_json::to_value(x).unwrap_or_default()
    }
    let id = || prop::sample::select(vec!["rootfs", "data", "x_1", "é", "a b", ""]);
    let sane_machine = (
        1u8..=4,
        1usize..=512,
        any::<bool>(),
        prop::option::of(prop::sample::select(vec!["None", "", "T2"])),
    )
        .prop_map(|(vcpu_count, mem_size_mib, smt, t)| MachineConfig {
            vcpu_count,
            mem_size_mib,
            smt,
            cpu_template: t.map(str::to_owned),
            ..MachineConfig::default()
        });
    let drive = (
        drive(),
        id(),
        prop::option::weighted(0.2, id()),
        any::<bool>(),
    )
        .prop_map(|(mut d, path_id, other_id, socket)| {
            d.drive_id = other_id.unwrap_or(path_id).to_owned();
            d.path_on_host = Some("/dev/null".into());
            if !socket {
                d.socket = None;
            }
            (Method::Put, format!("/drives/{path_id}"), v(d))
        });
    let net = (
        net(),
        id(),
        prop::sample::select(vec!["tap0", "tap1", "", "a/b"]),
        prop::option::of(prop::sample::select(vec![
            "06:00:ac:10:00:02",
            "01:00:00:00:00:00",
            "zz",
        ])),
        any::<bool>(),
    )
        .prop_map(|(mut n, path_id, tap, mac, keep_extras)| {
            // (The id mismatch is the drives' case: the same check.)
            n.iface_id = path_id.to_owned();
            n.host_dev_name = tap.to_owned();
            n.guest_mac = mac.map(str::to_owned);
            if !keep_extras {
                n.mtu = None;
                n.rx_rate_limiter = None;
                n.tx_rate_limiter = None;
            }
            (Method::Put, format!("/network-interfaces/{path_id}"), v(n))
        });
    let get = prop::sample::select(vec![
        "/",
        "/version",
        "/machine-config",
        "/vm/config",
        "/balloon",
        "/balloon/statistics",
        "/mmds",
    ])
    .prop_map(|p| (Method::Get, p.to_owned(), serde_json::Value::Null));
    let routed = prop_oneof![
        2 => get,
        2 => sane_machine.clone().prop_map(|m| (Method::Put, "/machine-config".to_owned(), v(m))),
        1 => (sane_machine, any::<[bool; 4]>()).prop_map(|(m, keep)| {
            let mut o = v(m);
            if let Some(o) = o.as_object_mut() {
                let names = ["vcpu_count", "mem_size_mib", "smt", "cpu_template"];
                for (n, k) in names.iter().zip(keep) {
                    if !k {
                        o.remove(*n);
                    }
                }
            }
            (Method::Patch, "/machine-config".to_owned(), o)
        }),
        1 => (boot(), any::<bool>()).prop_map(|(mut b, real)| {
            if real {
                b.kernel_image_path = "/dev/null".into();
                b.initrd_path = None;
            }
            (Method::Put, "/boot-source".to_owned(), v(b))
        }),
        3 => drive,
        2 => net,
        2 => (0u32..300, any::<bool>(), any::<u16>(), any::<bool>(), any::<bool>()).prop_map(|(amount_mib, deflate_on_oom, stats_polling_interval_s, free_page_hinting, free_page_reporting)| {
            (Method::Put, "/balloon".to_owned(), v(Balloon { amount_mib, deflate_on_oom, stats_polling_interval_s, free_page_hinting, free_page_reporting }))
        }),
        1 => prop::option::of(limiter()).prop_map(|rate_limiter| (Method::Put, "/entropy".to_owned(), v(Entropy { rate_limiter }))),
        1 => prop::option::of(bucket()).prop_map(|rate_limiter| {
            let s = Serial { serial_out_path: Some("/nonexistent/ferrite-fuzz".into()), rate_limiter };
            (Method::Put, "/serial".to_owned(), v(s))
        }),
        1 => prop::sample::select(vec!["FlushMetrics", "InstanceStart", "SendCtrlAltDel"])
            .prop_map(|a| (Method::Put, "/actions".to_owned(), serde_json::json!({ "action_type": a }))),
        1 => prop::sample::select(vec!["Paused", "Resumed"])
            .prop_map(|s| (Method::Patch, "/vm".to_owned(), serde_json::json!({ "state": s }))),
        1 => any::<u32>().prop_map(|n| (Method::Patch, "/balloon".to_owned(), serde_json::json!({ "amount_mib": n }))),
        1 => any::<u16>().prop_map(|n| (Method::Patch, "/balloon/statistics".to_owned(), serde_json::json!({ "stats_polling_interval_s": n }))),
        1 => (id(), prop::option::of(limiter())).prop_map(|(i, r)| {
            (Method::Patch, format!("/drives/{i}"), serde_json::json!({ "drive_id": i, "path_on_host": "/dev/null", "rate_limiter": r }))
        }),
        1 => (id(), prop::option::of(limiter())).prop_map(|(i, r)| {
            (Method::Patch, format!("/network-interfaces/{i}"), serde_json::json!({ "iface_id": i, "rx_rate_limiter": r }))
        }),
    ];
    (
        routed,
        prop::option::weighted(0.3, (any::<prop::sample::Index>(), 0u8..3, json::json())),
    )
        .prop_map(|((method, path, mut body), damage)| {
            if let (Some((i, kind, junk)), Some(o)) = (damage, body.as_object_mut()) {
                let junk = serde_json::from_str(&junk).unwrap_or_default();
                let keys: Vec<String> = o.keys().cloned().collect();
                match (kind, keys.is_empty()) {
                    (0, false) => {
                        o.remove(&keys[i.index(keys.len())]);
                    }
                    (1, false) => {
                        o.insert(keys[i.index(keys.len())].clone(), junk);
                    }
                    _ => {
                        o.insert("unknown_field".into(), junk);
                    }
                }
            }
            (method, path, body)
        })
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        3 => typed_request().prop_map(|(method, path, body)| Request {
            method,
            path,
            query: None,
            body: if body.is_null() { Vec::new() } else { serde_json::to_vec(&body).unwrap_or_default() },
            keep_alive: true,
        }),
        2 => (method(), path(), fc_body()).prop_map(|(method, path, body)| Request {
            method,
            path,
            query: None,
            body,
            keep_alive: true,
        }),
    ]
}

/// One answer is what Firecracker's clients expect: 200 with a JSON object, 204 with
/// nothing, or 400 with `{"fault_message": "..."}`; and it encodes as HTTP.
fn check_answer(req: &Request, r: &Response) -> Result<(), TestCaseError> {
    let what = format!(
        "{} {:?} {:?}",
        req.method,
        req.path,
        String::from_utf8_lossy(&req.body)
    );
    match r.status {
        200 => prop_assert!(r.body.is_object(), "{}: 200 with {}", what, r.body),
        204 => prop_assert!(r.body.is_null(), "{}: 204 with {}", what, r.body),
        400 => {
            let msg = r.body.get("fault_message").and_then(|m| m.as_str());
            prop_assert!(
                msg.is_some_and(|m| !m.is_empty()),
                "{}: 400 without a fault_message: {}",
                what,
                r.body
            );
        }
        s => prop_assert!(false, "{}: status {} ({})", what, s, r.body),
    }
    let wire = r.to_bytes(true);
    let head_end = wire
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| TestCaseError::fail(format!("{what}: no end of head")))?;
    let head = String::from_utf8_lossy(&wire[..head_end]);
    let status_line = format!("HTTP/1.1 {} ", r.status);
    prop_assert!(head.starts_with(&status_line), "{}", head);
    let body = &wire[head_end + 4..];
    if !body.is_empty() {
        prop_assert!(serde_json::from_slice::<serde_json::Value>(body).is_ok());
    }
    Ok(())
}

/// Found by `fc_api_answers_every_request_and_refusals_change_nothing`: PUT /balloon
/// {"amount_mib": 14} then PUT /machine-config {"mem_size_mib": 1} is accepted (a
/// balloon larger than the guest), and GET /vm/config then shows a configuration that
/// is refused when applied. Firecracker refuses the machine-config ("The memory size
/// (MiB) is smaller than the previously set balloon device target size."), and so
/// does `Config::put_machine` now.
#[test]
fn machine_config_smaller_than_the_balloon_is_refused() {
    let mut c = Config::default();
    c.put_balloon(Balloon {
        amount_mib: 14,
        ..Balloon::default()
    })
    .unwrap();
    let smaller = MachineConfig {
        mem_size_mib: 1,
        ..MachineConfig::default()
    };
    assert!(c.put_machine(smaller).is_err());
}

/// Found reading `Config::vm_config` beside `fc_config_file_sections_apply_or_refuse`:
/// `mem_size_mib` is any usize and is shifted into bytes unchecked, so 2^44 + 1 MiB
/// builds a 1 MiB guest (and 2^44 MiB a 0-byte one); more than
/// `memory::MAX_MEM_SIZE` is now refused at PUT.
#[test]
fn mem_size_mib_beyond_the_address_space_is_refused() {
    let mut c = Config::default();
    let huge = MachineConfig {
        mem_size_mib: (1 << 44) + 1,
        ..MachineConfig::default()
    };
    let accepted = c.put_machine(huge).is_ok();
    c.boot = Some(BootSource {
        kernel_image_path: "/dev/null".into(),
        ..BootSource::default()
    });
    let opts = Options {
        id: "t".into(),
        boot_timer: false,
        max_payload: 0,
    };
    let size = c.vm_config(&opts).ok().map(|v| v.memory.size);
    assert!(
        !accepted || size.is_none(),
        "accepted, memory of {size:?} bytes"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(512)))]

    /// Random bytes as every body and as the config file: a value or an error.
    #[test]
    fn fc_bodies_parse_or_refuse_without_panicking(body in json::body()) {
        let _ = parse_as_every_body(&body);
    }

    #[test]
    fn fc_bodies_round_trip(
        m in machine(),
        b in boot(),
        d in drive(),
        n in net(),
        bl in balloon(),
        v in vsock(),
        l in logger(),
        r in limiter(),
        e in prop::option::of(limiter()).prop_map(|rate_limiter| Entropy { rate_limiter }),
        s in (prop::option::of(string()), prop::option::of(bucket()))
            .prop_map(|(serial_out_path, rate_limiter)| Serial { serial_out_path, rate_limiter }),
    ) {
        round_trips(&m)?;
        round_trips(&b)?;
        round_trips(&d)?;
        round_trips(&n)?;
        round_trips(&bl)?;
        round_trips(&v)?;
        round_trips(&l)?;
        round_trips(&r)?;
        round_trips(&e)?;
        round_trips(&s)?;
    }

    #[test]
    fn fc_config_file_round_trips(c in full_config()) {
        round_trips(&c)?;
    }

    /// A PATCH with any subset of the fields reads as exactly those fields.
    #[test]
    fn fc_machine_config_patch_reads_the_fields_given(
        m in machine(),
        given in any::<[bool; 6]>(),
    ) {
        let full = serde_json::to_value(&m).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut patch = serde_json::Map::new();
        let names = ["vcpu_count", "mem_size_mib", "smt", "cpu_template", "track_dirty_pages", "huge_pages"];
        for (name, g) in names.iter().zip(given) {
            if let (true, Some(v)) = (g, full.get(*name)) {
                patch.insert((*name).to_owned(), v.clone());
            }
        }
        let u: MachineConfigUpdate = serde_json::from_value(serde_json::Value::Object(patch))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(u.vcpu_count, given[0].then_some(m.vcpu_count));
        prop_assert_eq!(u.mem_size_mib, given[1].then_some(m.mem_size_mib));
        prop_assert_eq!(u.smt, given[2].then_some(m.smt));
        prop_assert_eq!(u.cpu_template, m.cpu_template.clone().filter(|_| given[3]));
        prop_assert_eq!(u.track_dirty_pages, given[4].then_some(m.track_dirty_pages));
        prop_assert_eq!(u.huge_pages, given[5].then_some(m.huge_pages));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(300)))]

    /// Random request sequences before the start: every answer is well formed, and a
    /// refused one leaves the configuration as it was.
    #[test]
    fn fc_api_answers_every_request_and_refusals_change_nothing(
        reqs in prop::collection::vec(request(), 1..16),
    ) {
        let (api, _loop) = fc_api();
        for req in reqs {
            // InstanceStart with a kernel set would build a VM: not here.
            if has_kernel(&api)
                && serde_json::from_slice::<InstanceAction>(&req.body)
                    .is_ok_and(|a| a.action_type == ActionType::InstanceStart)
            {
                continue;
            }
            let before = config_of(&api);
            let answer = api.clone().handle(&req, Box::new(|_| {}));
            let Pending::Done(r) = answer else {
                return Err(TestCaseError::fail(format!(
                    "{} {}: answered later before the start",
                    req.method, req.path
                )));
            };
            check_answer(&req, &r)?;
            if r.status >= 400 {
                prop_assert_eq!(config_of(&api), before, "{} {} changed the configuration", req.method, req.path);
            }
            prop_assert_eq!(api.state(), InstanceState::NotStarted);
        }
        // What GET /vm/config shows reads back as a config file, and that file
        // configures the same machine.
        let get = Request {
            method: Method::Get,
            path: "/vm/config".into(),
            query: None,
            body: Vec::new(),
            keep_alive: true,
        };
        let Pending::Done(shown) = api.clone().handle(&get, Box::new(|_| {})) else {
            return Err(TestCaseError::fail("GET /vm/config answered later"));
        };
        prop_assert_eq!(shown.status, 200);
        let file: FullConfig = serde_json::from_value(shown.body.clone())
            .map_err(|e| TestCaseError::fail(format!("{}: {e}", shown.body)))?;
        let mut again = Config::default();
        let applied = apply_config_file(&mut again, &file, file.boot_source.kernel_image_path.is_empty());
        prop_assert!(applied.is_ok(), "{}: {:?}", shown.body, applied.err());
        prop_assert_eq!(serde_json::to_value(again.full()).ok(), Some(shown.body));
    }

    /// A config file that parses goes through the API's checks (as
    /// `firecracker::run` applies it, without the start): an error or a configuration.
    #[test]
    fn fc_config_file_sections_apply_or_refuse(c in full_config()) {
        let (api, _loop) = fc_api();
        let _ = api.configure(|cfg| apply_config_file(cfg, &c, false));
        let mut built = None;
        let _ = api.configure(|cfg| {
            built = Some(cfg.vm_config(&Options { id: "fuzz".into(), boot_timer: false, max_payload: 0 }).is_ok());
            Ok(())
        });
        prop_assert!(built.is_some());
    }
}
