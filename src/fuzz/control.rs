//! The native control API: its request bodies (and the answers the CLI reads) parsed
//! from random bytes, valid requests written and read back, and random requests
//! through `control::api::handle`, the function the server calls, on a VM without
//! vCPUs (no KVM needed).

use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::cases;
use super::json;
use crate::control::api::{handle, Api, Pending, VmInfo};
use crate::control::http::{Method, Request, Response};
use crate::control::protocol::*;
use crate::devices::virtio::balloon::{Balloon, BalloonConfig, BalloonHandle};
use crate::outcome::StopSignal;

fn parse_every_body(body: &[u8]) {
    let _ = StopRequest::parse(body);
    let _ = NmiRequest::parse(body);
    if let Ok(r) = BalloonRequest::parse(body) {
        let _ = r.target.bytes();
    }
    // What the CLI reads from a VM's socket.
    let _ = parse_body::<ErrorBody>(body);
    let _ = parse_body::<InfoAnswer>(body);
    let _ = parse_body::<StateAnswer>(body);
    let _ = parse_body::<StopAnswer>(body);
    let _ = parse_body::<RegistersAnswer>(body);
    let _ = parse_body::<NmiAnswer>(body);
    let _ = parse_body::<BalloonAnswer>(body);
    let _ = parse_body::<StatsAnswer>(body);
}

fn stop_request() -> impl Strategy<Value = StopRequest> {
    let max = crate::graceful::MAX_TIMEOUT.as_millis() as u64;
    prop_oneof![
        Just(StopRequest::default()),
        Just(StopRequest {
            mode: Some(StopMode::Hard),
            timeout_ms: None
        }),
        (any::<bool>(), prop_oneof![Just(1u64), Just(max), 1..=max]).prop_map(|(named, ms)| {
            StopRequest {
                mode: named.then_some(StopMode::Graceful),
                timeout_ms: Some(ms),
            }
        }),
    ]
}

fn native_api() -> Arc<Api> {
    let dev = Balloon::new(&BalloonConfig::default(), 256 << 20).expect("a balloon");
    let info = VmInfo {
        name: "fuzz".into(),
        kernel: "k".into(),
        vcpus: 0,
        mem_bytes: 256 << 20,
        mem_backing: "anon".into(),
        hugepages: "off".into(),
        mem_prealloc: false,
        machine: "pc",
        devices: Vec::new(),
        balloon: Some(BalloonHandle(Arc::new(Mutex::new(dev)))),
        mmds: Some(Arc::new(Mutex::new(crate::mmds::Mmds::default()))),
    };
    Arc::new(Api::new(
        info,
        Vec::new(),
        Arc::new(StopSignal::new()),
        Err("none".into()),
    ))
}

fn request() -> impl Strategy<Value = Request> {
    let paths = &[
        "/vm",
        "/vm/",
        "//vm//",
        "/vm/pause",
        "/vm/resume",
        "/vm/stop",
        "/vm/nmi",
        "/vm/stats",
        "/vm/balloon",
        "/vm/vcpus/0/registers",
        "/vm/vcpus/18446744073709551616/registers",
        "/vm/vcpus/-1/registers",
        "/",
    ][..];
    (
        prop_oneof![
            4 => Just(Method::Put),
            3 => Just(Method::Get),
            1 => prop::sample::select(vec![Method::Patch, Method::Delete]),
        ],
        prop_oneof![4 => prop::sample::select(paths).prop_map(str::to_owned), 1 => "/[a-z0-9/]{0,16}"],
        prop::option::of("msrs=[0-9a-fx,]{0,30}"),
        prop_oneof![
            1 => Just(Vec::new()),
            4 => json::body(),
            1 => stop_request().prop_map(|r| serde_json::to_vec(&r).unwrap_or_default()),
            1 => any::<Option<u64>>().prop_map(|vcpu| serde_json::to_vec(&NmiRequest { vcpu }).unwrap_or_default()),
            2 => prop_oneof![
                prop::sample::select(vec![0u64, 1, 4096, 64 << 20, 256 << 20, (256 << 20) + 1, u64::MAX])
                    .prop_map(BalloonTarget::Bytes),
                prop::sample::select(vec!["0", "64M", "256M", "257M", "1T", "99999999999T", "x"])
                    .prop_map(|s| BalloonTarget::Size(s.to_owned())),
            ]
            .prop_map(|target| serde_json::to_vec(&BalloonRequest { target }).unwrap_or_default()),
        ],
    )
        .prop_map(|(method, path, query, body)| Request {
            method,
            path,
            query,
            body,
            keep_alive: true,
        })
}

fn check_answer(req: &Request, r: &Response) -> Result<(), TestCaseError> {
    let what = format!(
        "{} {:?} {:?}",
        req.method,
        req.path,
        String::from_utf8_lossy(&req.body)
    );
    prop_assert!(
        matches!(r.status, 200 | 400 | 404 | 405 | 409),
        "{}: status {} ({})",
        what,
        r.status,
        r.body
    );
    if r.status >= 400 {
        let msg = r.body.get("error").and_then(|m| m.as_str());
        prop_assert!(msg.is_some_and(|m| !m.is_empty()), "{}: {}", what, r.body);
    } else {
        prop_assert!(r.body.is_object(), "{}: {}", what, r.body);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(512)))]

    /// Random bytes as every request body and every answer: a value or an error.
    #[test]
    fn control_bodies_parse_or_refuse_without_panicking(body in json::body()) {
        parse_every_body(&body);
    }

    #[test]
    fn control_requests_round_trip(
        stop in stop_request(),
        nmi in any::<Option<u64>>(),
        bytes in any::<u64>(),
        size in "[0-9]{1,6}[KMGT]?",
    ) {
        let text = serde_json::to_vec(&stop).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(StopRequest::parse(&text), Ok(stop));
        let nmi = NmiRequest { vcpu: nmi };
        let text = serde_json::to_vec(&nmi).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(NmiRequest::parse(&text), Ok(nmi));
        for target in [BalloonTarget::Bytes(bytes), BalloonTarget::Size(size.clone())] {
            let r = BalloonRequest { target };
            let text = serde_json::to_vec(&r).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(BalloonRequest::parse(&text), Ok(r));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(300)))]

    /// Random requests against a VM without vCPUs: every answer is a status the API
    /// documents, errors carry `{"error"}`, and nothing panics.
    #[test]
    fn control_api_answers_every_request(reqs in prop::collection::vec(request(), 1..10)) {
        let api = native_api();
        for req in reqs {
            let later: Arc<Mutex<Option<Response>>> = Arc::default();
            let slot = later.clone();
            let answer = handle(&api, &req, Box::new(move |r| {
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            }));
            let r = match answer {
                Pending::Done(r) => Some(r),
                Pending::Later => later.lock().unwrap_or_else(|p| p.into_inner()).take(),
            };
            if let Some(r) = r {
                check_answer(&req, &r)?;
            }
        }
    }
}
