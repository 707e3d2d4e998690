//! The guest-facing HTTP/1.1 server of the MMDS.
//!
//! [`serve`] is pure: it takes the bytes a connection has received so far and says
//! whether they hold a complete request and, if so, the whole response. The TCP layer
//! keeps at most [`MAX_REQUEST`] bytes per connection: once that many are buffered
//! without a complete request, `serve` answers 413 and asks for the connection to be
//! closed, so it never returns [`Served::NeedMore`] for `request.len() >= MAX_REQUEST`.
//!
//! Behaviour follows Firecracker v1.16.1 (its `mmds` module and micro_http, read for
//! facts; the responses below were also checked byte for byte against the real binary,
//! a tier-A guest sending raw requests with busybox `nc`): the status codes and error
//! texts are its own —
//! - GET of a JSON pointer path (`//` collapsed, one trailing `/` ignored, an absolute
//!   `http://host/path` URI accepted): 200 with the subtree as compact JSON when the
//!   request says `Accept: application/json` (exactly), otherwise in the IMDS format:
//!   an object's keys one per line (sorted, no final newline, `/` after sub-objects), a
//!   string as itself, anything else 501 "Cannot retrieve value. The value has an
//!   unsupported type."; with `imds_compat` always the IMDS format. A document that is
//!   still `null` (no PUT yet) is `null` in JSON and 501 in IMDS format, as Firecracker.
//! - a missing path: 404 "Resource not found: {path}."; an empty or relative path: 400
//!   "Invalid URI.".
//! - V2: a GET without `X-metadata-token`/`X-aws-ec2-metadata-token` is 401 with
//!   Firecracker's "No MMDS token provided. ..." text, with an unknown or expired one 401
//!   "MMDS token not valid."; V1 serves GETs whatever token they carry.
//! - PUT (V1 and V2) only to `/latest/api/token`: refused with 400 if it has an
//!   `X-Forwarded-For` header (checked first, on any path), 404 on another path, 400
//!   without a TTL header (`X-metadata-token-ttl-seconds` or
//!   `X-aws-ec2-metadata-token-ttl-seconds`), with a non-numeric or out-of-range
//!   (1..=21600) one; otherwise 200 with the token as text/plain and the TTL header
//!   echoed.
//! - PATCH and DELETE: 405 with `Allow: GET, PUT`; other methods 501 "Unsupported HTTP
//!   method."; other HTTP versions 501 "Unsupported HTTP version.".
//! - a request with a body (non-zero `Content-Length`): 400 "Invalid request." (micro_http
//!   refuses them; here the body is read first so the connection stays in step).
//!
//! Where it differs from Firecracker, on purpose:
//! - responses are always `HTTP/1.1` with a reason phrase and no `Server` header
//!   (Firecracker echoes the request's version and sends `HTTP/1.1 200 ` with an empty
//!   reason and `Server: Firecracker API`);
//! - `Connection: close` (and HTTP/1.0 without `Connection: keep-alive`) closes the
//!   connection after the response, and says so in the response; Firecracker always
//!   answers `Connection: keep-alive` and closes only on the guest's FIN;
//! - `imds_compat` responses say `Content-Type: text/plain` (Firecracker echoes the
//!   `Accept` type over an IMDS-format body), and refusals of unparseable requests say
//!   text/plain (micro_http labels them application/json);
//! - a request that httparse cannot parse gets 400 "Invalid request." and the connection
//!   is closed (its end cannot be found); Firecracker finds the end at the first blank
//!   line and gives some of these more specific texts;
//! - requests are bounded by [`MAX_REQUEST`] bytes (head and body) and [`MAX_HEADERS`]
//!   header lines, answered 413/431 and closed (Firecracker resets a connection whose
//!   request outgrows its 2500-byte buffer); `Transfer-Encoding` other than `identity`
//!   is answered 501 and closed (Firecracker ignores it and misreads the body);
//! - `Accept-Encoding: identity;q=0` is not refused.

use super::token::TOKEN_PATH;
use super::{Mmds, Served, Version};
use serde_json::Value;
use std::time::Instant;

/// The largest request (head and body) served, in bytes. A connection that has sent this
/// many bytes without completing a request is answered 413 and closed, so a responder
/// never needs to buffer more than this per connection. Firecracker's bound is 2500 bytes
/// per request; guests' MMDS requests are a request line and a few short headers.
pub const MAX_REQUEST: usize = 4096;

/// The most header lines a request may have (431 and close above).
pub const MAX_HEADERS: usize = 64;

const TOKEN_HEADERS: [&str; 2] = ["x-metadata-token", "x-aws-ec2-metadata-token"];
const TTL_HEADERS: [&str; 2] = [
    "x-metadata-token-ttl-seconds",
    "x-aws-ec2-metadata-token-ttl-seconds",
];
const FORWARDED_FOR: &str = "x-forwarded-for";

const TEXT: &str = "text/plain";
const JSON: &str = "application/json";

/// One response, before serialization.
struct Response {
    status: u16,
    content_type: &'static str,
    /// Headers between `Connection` and `Content-Type` (`Allow`, the echoed TTL).
    extra: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            extra: Vec::new(),
            body: body.into(),
        }
    }

    fn text(status: u16, body: impl Into<Vec<u8>>) -> Response {
        Response::new(status, TEXT, body)
    }

    fn header(mut self, name: &str, value: String) -> Response {
        self.extra.push((name.to_string(), value));
        self
    }

    fn to_bytes(&self, close: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(160 + self.body.len());
        out.extend_from_slice(
            format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status)).as_bytes(),
        );
        out.extend_from_slice(if close {
            b"Connection: close\r\n"
        } else {
            b"Connection: keep-alive\r\n"
        });
        for (name, value) in &self.extra {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        out.extend_from_slice(
            format!(
                "Content-Type: {}\r\nContent-Length: {}\r\n\r\n",
                self.content_type,
                self.body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(&self.body);
        out
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        _ => "Unknown",
    }
}

fn reply(consumed: usize, response: Response, close: bool) -> Served {
    Served::Reply {
        consumed,
        response: response.to_bytes(close),
        close,
    }
}

/// A refusal after which the request's end is unknown: everything is consumed and the
/// connection closed.
fn fatal(request: &[u8], response: Response) -> Served {
    reply(request.len(), response, true)
}

fn too_large(size: usize) -> Response {
    Response::text(
        413,
        format!(
            "Request of at least {size} bytes is larger than the limit of {MAX_REQUEST} bytes."
        ),
    )
}

/// The request's headers with their values as text (trimmed, as micro_http does).
struct Headers<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Headers<'a> {
    /// The last header named any of `names` (ASCII case-insensitive): name as sent, value.
    fn find(&self, names: &[&str]) -> Option<(&'a str, &'a str)> {
        self.0
            .iter()
            .rev()
            .find(|(name, _)| names.iter().any(|n| name.eq_ignore_ascii_case(n)))
            .copied()
    }

    fn all(&self, name: &'a str) -> impl Iterator<Item = &'a str> + '_ {
        self.0
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

/// Serves the bytes a guest connection has sent so far: [`Served::NeedMore`] while they
/// hold no complete request (never once there are [`MAX_REQUEST`] of them), otherwise
/// the response to the first request and how many bytes it took.
pub fn serve(mmds: &mut Mmds, request: &[u8], now: Instant) -> Served {
    let mut header_slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut header_slots);
    let head_len = match parsed.parse(request) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            if request.len() >= MAX_REQUEST {
                return fatal(request, too_large(request.len()));
            }
            return Served::NeedMore;
        }
        Err(httparse::Error::Version) => {
            return fatal(request, Response::text(501, "Unsupported HTTP version."))
        }
        Err(httparse::Error::TooManyHeaders) => {
            return fatal(
                request,
                Response::text(
                    431,
                    format!("A request may have at most {MAX_HEADERS} headers."),
                ),
            )
        }
        Err(_) => return fatal(request, Response::text(400, "Invalid request.")),
    };
    if head_len > MAX_REQUEST {
        return fatal(request, too_large(head_len));
    }
    // A complete parse always sets these; refuse rather than assume.
    let (Some(method), Some(path), Some(minor)) = (parsed.method, parsed.path, parsed.version)
    else {
        return fatal(request, Response::text(400, "Invalid request."));
    };

    // Header values must be text (micro_http refuses the request otherwise); one that
    // is not might be a Content-Length, so the request's end is unknown: close.
    let mut headers = Vec::with_capacity(parsed.headers.len());
    for header in parsed.headers.iter() {
        match std::str::from_utf8(header.value) {
            Ok(value) => headers.push((header.name, value.trim())),
            Err(_) => return fatal(request, Response::text(400, "Invalid request.")),
        }
    }
    let headers = Headers(headers);

    // Framing first: how long is this request?
    if let Some((name, value)) = headers.find(&["transfer-encoding"]) {
        if !value.eq_ignore_ascii_case("identity") {
            return fatal(
                request,
                Response::text(
                    501,
                    format!("Unsupported header value. Key:{name}; Value:{value}"),
                ),
            );
        }
    }
    let body_len = match headers.find(&["content-length"]) {
        None => 0,
        Some((name, value)) => match value.parse::<u32>() {
            Ok(len) => len as usize,
            Err(_) => {
                return fatal(
                    request,
                    Response::text(400, format!("Invalid value. Key:{name}; Value: {value}")),
                )
            }
        },
    };
    let total = match head_len.checked_add(body_len) {
        Some(total) if total <= MAX_REQUEST => total,
        _ => return fatal(request, too_large(head_len.saturating_add(body_len))),
    };
    if request.len() < total {
        return Served::NeedMore;
    }

    let close = wants_close(minor, &headers);
    let response = if body_len > 0 {
        Response::text(400, "Invalid request.")
    } else {
        respond(mmds, method, path, &headers, now)
    };
    reply(total, response, close)
}

/// Whether the connection closes after this request: HTTP/1.1 keeps it unless the
/// request says `Connection: close`, HTTP/1.0 closes it unless it says `keep-alive`.
fn wants_close(minor: u8, headers: &Headers) -> bool {
    let mut close = minor == 0;
    for value in headers.all("connection") {
        for option in value.split(',').map(str::trim) {
            if option.eq_ignore_ascii_case("close") {
                return true;
            }
            if option.eq_ignore_ascii_case("keep-alive") {
                close = false;
            }
        }
    }
    close
}

/// The path of a request target: the target itself when it starts with '/', the part
/// from the first '/' after the host of an `http://host...` target, otherwise "" (as
/// micro_http).
fn abs_path(target: &str) -> &str {
    if let Some(rest) = target.strip_prefix("http://") {
        return rest.find('/').map_or("", |slash| &rest[slash..]);
    }
    if target.starts_with('/') {
        target
    } else {
        ""
    }
}

/// `path` with every run of '/' collapsed to one (Firecracker's URI sanitizing).
fn collapse_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

fn respond(
    mmds: &mut Mmds,
    method: &str,
    target: &str,
    headers: &Headers,
    now: Instant,
) -> Response {
    if !matches!(method, "GET" | "PUT" | "PATCH" | "DELETE") {
        return Response::text(501, "Unsupported HTTP method.");
    }
    let path = abs_path(target);
    if path.is_empty() {
        return Response::text(400, "Invalid URI.");
    }
    match method {
        "GET" => {
            if mmds.version == Version::V2 {
                match headers.find(&TOKEN_HEADERS) {
                    None => {
                        return Response::text(
                            401,
                            "No MMDS token provided. Use `X-metadata-token` or \
                             `X-aws-ec2-metadata-token` header to specify the session token.",
                        )
                    }
                    Some((_, token)) if !mmds.tokens.is_valid(token, now) => {
                        return Response::text(401, "MMDS token not valid.")
                    }
                    Some(_) => {}
                }
            }
            get(mmds, path, headers)
        }
        "PUT" => put_token(mmds, path, headers, now),
        _ => Response::text(405, "Not allowed HTTP method.").header("Allow", "GET, PUT".into()),
    }
}

fn get(mmds: &Mmds, path: &str, headers: &Headers) -> Response {
    let Some(value) = mmds.store.lookup(&collapse_slashes(path)) else {
        return Response::text(404, format!("Resource not found: {path}."));
    };
    let json = !mmds.imds_compat
        && headers
            .all("accept")
            .filter_map(|v| match v {
                JSON => Some(true),
                TEXT => Some(false),
                _ => None,
            })
            .last()
            .unwrap_or(false);
    if json {
        return Response::new(200, JSON, value.to_string());
    }
    match imds_format(value) {
        Some(body) => Response::text(200, body),
        None => Response::text(
            501,
            "Cannot retrieve value. The value has an unsupported type.",
        ),
    }
}

/// The IMDS (EC2 metadata) text of a value: an object's keys one per line, with '/'
/// after those holding objects; a string as is; `None` for other types.
fn imds_format(value: &Value) -> Option<String> {
    match value {
        Value::Object(map) => {
            let lines: Vec<String> = map
                .iter()
                .map(|(key, v)| {
                    if v.is_object() {
                        format!("{key}/")
                    } else {
                        key.clone()
                    }
                })
                .collect();
            Some(lines.join("\n"))
        }
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

fn put_token(mmds: &mut Mmds, path: &str, headers: &Headers, now: Instant) -> Response {
    if let Some((name, _)) = headers.find(&[FORWARDED_FOR]) {
        return Response::text(
            400,
            format!("Invalid header. Reason: Unsupported header name. Key: {name}"),
        );
    }
    if collapse_slashes(path) != TOKEN_PATH {
        return Response::text(404, format!("Resource not found: {path}."));
    }
    let Some((name, value)) = headers.find(&TTL_HEADERS) else {
        return Response::text(
            400,
            "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or \
             `X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime.",
        );
    };
    let Ok(ttl) = value.parse::<u32>() else {
        return Response::text(
            400,
            format!("Invalid header. Reason: Invalid value. Key:{name}; Value:{value}"),
        );
    };
    match mmds.tokens.issue(ttl, now) {
        // The header name is an HTTP token (httparse checked it), safe to echo.
        Ok(token) => Response::text(200, token).header(name, ttl.to_string()),
        Err(e) => Response::text(400, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmds::token::TOKEN_LEN;
    use proptest::prelude::*;
    use serde_json::json;
    use std::time::Duration;

    fn doc() -> Value {
        json!({
            "latest": {
                "meta-data": {"ami-id": "ami-1", "tags": {"a": "b"}, "empty": {}},
                "user-data": "#cloud-config\nhostname: vm\n"
            },
            "age": 43,
            "list": ["x", "y"],
            "flag": true,
            "nothing": null
        })
    }

    fn mmds_with(version: Version, imds_compat: bool) -> Mmds {
        let mut mmds = Mmds::default();
        mmds.store.put(doc()).unwrap();
        mmds.version = version;
        mmds.imds_compat = imds_compat;
        mmds
    }

    fn v1() -> Mmds {
        mmds_with(Version::V1, false)
    }

    /// Serves `request`, expecting a reply: (response as text, consumed, close).
    fn serve_at(mmds: &mut Mmds, request: &[u8], now: Instant) -> (String, usize, bool) {
        match serve(mmds, request, now) {
            Served::Reply {
                consumed,
                response,
                close,
            } => (String::from_utf8(response).unwrap(), consumed, close),
            Served::NeedMore => panic!("NeedMore for {:?}", String::from_utf8_lossy(request)),
        }
    }

    fn serve_ok(mmds: &mut Mmds, request: &str) -> String {
        let (response, consumed, close) = serve_at(mmds, request.as_bytes(), Instant::now());
        assert_eq!(consumed, request.len());
        assert!(!close, "closed after {request:?}");
        response
    }

    fn expected(status: &str, extra: &str, content_type: &str, body: &str, close: bool) -> String {
        let connection = if close { "close" } else { "keep-alive" };
        format!(
            "HTTP/1.1 {status}\r\nConnection: {connection}\r\n{extra}Content-Type: \
             {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    fn text(status: &str, body: &str) -> String {
        expected(status, "", "text/plain", body, false)
    }

    fn get(path: &str, extra_headers: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra_headers}\r\n")
    }

    #[test]
    fn get_object_without_accept_is_imds_listing_with_slash_after_objects() {
        let mut mmds = v1();
        assert_eq!(
            serve_ok(&mut mmds, &get("/latest/meta-data", "")),
            text("200 OK", "ami-id\nempty/\ntags/")
        );
        // The root, keys sorted, no final newline.
        assert_eq!(
            serve_ok(&mut mmds, &get("/", "")),
            text("200 OK", "age\nflag\nlatest/\nlist\nnothing")
        );
        // An empty object lists nothing.
        assert_eq!(
            serve_ok(&mut mmds, &get("/latest/meta-data/empty", "")),
            text("200 OK", "")
        );
    }

    #[test]
    fn get_string_leaf_in_imds_format_is_the_raw_string() {
        let mut mmds = v1();
        assert_eq!(
            serve_ok(
                &mut mmds,
                &get("/latest/user-data", "Accept: text/plain\r\n")
            ),
            text("200 OK", "#cloud-config\nhostname: vm\n")
        );
        assert_eq!(
            serve_ok(&mut mmds, &get("/list/1", "")),
            text("200 OK", "y")
        );
    }

    #[test]
    fn get_non_string_leaf_in_imds_format_is_501() {
        let mut mmds = v1();
        for path in ["/age", "/list", "/flag", "/nothing"] {
            assert_eq!(
                serve_ok(&mut mmds, &get(path, "")),
                text(
                    "501 Not Implemented",
                    "Cannot retrieve value. The value has an unsupported type."
                ),
                "{path}"
            );
        }
    }

    #[test]
    fn get_with_accept_json_returns_compact_subtree() {
        let mut mmds = v1();
        let accept = "Accept: application/json\r\n";
        for (path, body) in [
            (
                "/latest/meta-data",
                r#"{"ami-id":"ami-1","empty":{},"tags":{"a":"b"}}"#,
            ),
            ("/latest/meta-data/ami-id", r#""ami-1""#),
            ("/age", "43"),
            ("/list", r#"["x","y"]"#),
            ("/flag", "true"),
            ("/nothing", "null"),
        ] {
            assert_eq!(
                serve_ok(&mut mmds, &get(path, accept)),
                expected("200 OK", "", "application/json", body, false),
                "{path}"
            );
        }
    }

    #[test]
    fn accept_other_than_exactly_json_gives_imds_format() {
        let mut mmds = v1();
        for accept in [
            "*/*",
            "application/json, text/plain",
            "Application/JSON",
            "",
        ] {
            assert_eq!(
                serve_ok(&mut mmds, &get("/latest", &format!("Accept: {accept}\r\n"))),
                text("200 OK", "meta-data/\nuser-data"),
                "{accept:?}"
            );
        }
        // Surrounding blanks are ignored; the last recognised Accept header wins.
        assert_eq!(
            serve_ok(
                &mut mmds,
                &get(
                    "/age",
                    "Accept: text/plain\r\nAccept:  application/json \r\nAccept: */*\r\n"
                )
            ),
            expected("200 OK", "", "application/json", "43", false)
        );
    }

    #[test]
    fn imds_compat_forces_text_listing_whatever_accept_says() {
        let mut mmds = mmds_with(Version::V1, true);
        assert_eq!(
            serve_ok(&mut mmds, &get("/latest", "Accept: application/json\r\n")),
            text("200 OK", "meta-data/\nuser-data")
        );
        assert_eq!(
            serve_ok(&mut mmds, &get("/age", "Accept: application/json\r\n")),
            text(
                "501 Not Implemented",
                "Cannot retrieve value. The value has an unsupported type."
            )
        );
    }

    #[test]
    fn path_slashes_are_collapsed_trailing_slash_ignored_and_absolute_uri_accepted() {
        let mut mmds = v1();
        for target in [
            "/latest/meta-data/ami-id/",
            "//latest///meta-data//ami-id",
            "http://169.254.169.254/latest/meta-data/ami-id",
            "http://169.254.169.254:80//latest/meta-data/ami-id//",
        ] {
            assert_eq!(
                serve_ok(&mut mmds, &get(target, "")),
                text("200 OK", "ami-1"),
                "{target}"
            );
        }
    }

    #[test]
    fn missing_path_is_404_naming_the_path_as_sent() {
        let mut mmds = v1();
        for path in [
            "/nope",
            "/latest//nope/",
            "/latest/meta-data/ami-id/deeper",
            "/latest?x=1",
        ] {
            assert_eq!(
                serve_ok(&mut mmds, &get(path, "")),
                text("404 Not Found", &format!("Resource not found: {path}.")),
            );
        }
    }

    #[test]
    fn target_without_absolute_path_is_400_invalid_uri() {
        let mut mmds = v1();
        for target in ["latest", "http://169.254.169.254", "https://h/latest", "*"] {
            assert_eq!(
                serve_ok(&mut mmds, &get(target, "")),
                text("400 Bad Request", "Invalid URI."),
                "{target}"
            );
        }
    }

    #[test]
    fn document_never_put_reads_as_null() {
        let mut mmds = Mmds::default();
        assert_eq!(
            serve_ok(&mut mmds, &get("/", "Accept: application/json\r\n")),
            expected("200 OK", "", "application/json", "null", false)
        );
        assert_eq!(
            serve_ok(&mut mmds, &get("/", "")),
            text(
                "501 Not Implemented",
                "Cannot retrieve value. The value has an unsupported type."
            )
        );
        assert_eq!(
            serve_ok(&mut mmds, &get("/a", "")),
            text("404 Not Found", "Resource not found: /a.")
        );
    }

    #[test]
    fn get_sees_the_document_as_patched() {
        let mut mmds = v1();
        mmds.store
            .patch(json!({"latest": {"meta-data": {"ami-id": "ami-2"}}}))
            .unwrap();
        assert_eq!(
            serve_ok(&mut mmds, &get("/latest/meta-data/ami-id", "")),
            text("200 OK", "ami-2")
        );
    }

    #[test]
    fn patch_and_delete_are_405_allowing_get_and_put() {
        let mut mmds = v1();
        for method in ["PATCH", "DELETE"] {
            let request = format!("{method} /latest HTTP/1.1\r\n\r\n");
            assert_eq!(
                serve_ok(&mut mmds, &request),
                expected(
                    "405 Method Not Allowed",
                    "Allow: GET, PUT\r\n",
                    "text/plain",
                    "Not allowed HTTP method.",
                    false
                )
            );
        }
    }

    #[test]
    fn other_methods_are_501_unsupported() {
        let mut mmds = v1();
        for method in ["POST", "HEAD", "OPTIONS", "get", "FOO"] {
            let request = format!("{method} / HTTP/1.1\r\n\r\n");
            assert_eq!(
                serve_ok(&mut mmds, &request),
                text("501 Not Implemented", "Unsupported HTTP method."),
                "{method}"
            );
        }
    }

    #[test]
    fn unsupported_http_version_is_501_and_closes() {
        let mut mmds = v1();
        let request = b"GET / HTTP/2.0\r\n\r\n";
        let (response, consumed, close) = serve_at(&mut mmds, request, Instant::now());
        assert_eq!(
            response,
            expected(
                "501 Not Implemented",
                "",
                "text/plain",
                "Unsupported HTTP version.",
                true
            )
        );
        assert_eq!((consumed, close), (request.len(), true));
    }

    #[test]
    fn unparseable_request_is_400_and_closes() {
        let mut mmds = v1();
        for request in [
            &b"\x00\x01\x02\r\n\r\n"[..],
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
        ] {
            let (response, consumed, close) = serve_at(&mut mmds, request, Instant::now());
            assert_eq!(
                response,
                expected(
                    "400 Bad Request",
                    "",
                    "text/plain",
                    "Invalid request.",
                    true
                )
            );
            assert_eq!((consumed, close), (request.len(), true));
        }
    }

    #[test]
    fn non_utf8_header_value_is_400_and_closes() {
        let mut mmds = v1();
        for request in [
            &b"GET / HTTP/1.1\r\nX-Thing: \xff\xfe\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nContent-Length: \xff3\r\n\r\nabc",
        ] {
            let (response, consumed, close) = serve_at(&mut mmds, request, Instant::now());
            assert_eq!(
                response,
                expected(
                    "400 Bad Request",
                    "",
                    "text/plain",
                    "Invalid request.",
                    true
                )
            );
            assert_eq!((consumed, close), (request.len(), true));
        }
    }

    #[test]
    fn v2_get_without_token_is_401() {
        let mut mmds = mmds_with(Version::V2, false);
        assert_eq!(
            serve_ok(&mut mmds, &get("/latest", "")),
            text(
                "401 Unauthorized",
                "No MMDS token provided. Use `X-metadata-token` or `X-aws-ec2-metadata-token` \
                 header to specify the session token."
            )
        );
    }

    #[test]
    fn v2_get_with_unknown_token_is_401() {
        let mut mmds = mmds_with(Version::V2, false);
        let forged = "0".repeat(TOKEN_LEN);
        for token in ["INVALID_TOKEN", forged.as_str(), ""] {
            assert_eq!(
                serve_ok(
                    &mut mmds,
                    &get("/latest", &format!("X-metadata-token: {token}\r\n"))
                ),
                text("401 Unauthorized", "MMDS token not valid."),
                "{token:?}"
            );
        }
    }

    fn issue(mmds: &mut Mmds, ttl: u32, now: Instant) -> String {
        let request = format!(
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: {ttl}\r\n\r\n"
        );
        let (response, _, _) = serve_at(mmds, request.as_bytes(), now);
        let (head, token) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        token.to_string()
    }

    #[test]
    fn v2_get_with_issued_token_is_served_under_either_header_name() {
        let mut mmds = mmds_with(Version::V2, false);
        let now = Instant::now();
        let token = issue(&mut mmds, 60, now);
        for header in [
            "X-metadata-token",
            "x-aws-ec2-metadata-token",
            "X-METADATA-TOKEN",
        ] {
            let request = get("/latest", &format!("{header}: {token}\r\n"));
            let (response, _, _) = serve_at(&mut mmds, request.as_bytes(), now);
            assert_eq!(
                response,
                text("200 OK", "meta-data/\nuser-data"),
                "{header}"
            );
        }
    }

    #[test]
    fn v2_token_expires_after_its_ttl() {
        let mut mmds = mmds_with(Version::V2, false);
        let t0 = Instant::now();
        let token = issue(&mut mmds, 2, t0);
        let request = get(
            "/latest/meta-data/ami-id",
            &format!("X-metadata-token: {token}\r\n"),
        );
        let at = |secs_ms: u64| t0 + Duration::from_millis(secs_ms);
        let (response, _, _) = serve_at(&mut mmds, request.as_bytes(), at(1999));
        assert_eq!(response, text("200 OK", "ami-1"));
        let (response, _, _) = serve_at(&mut mmds, request.as_bytes(), at(2000));
        assert_eq!(response, text("401 Unauthorized", "MMDS token not valid."));
    }

    #[test]
    fn v1_get_is_served_with_any_token_or_none() {
        let mut mmds = v1();
        for extra in ["", "X-metadata-token: INVALID_TOKEN\r\n"] {
            assert_eq!(
                serve_ok(&mut mmds, &get("/latest/meta-data/ami-id", extra)),
                text("200 OK", "ami-1")
            );
        }
    }

    #[test]
    fn token_put_returns_token_and_echoes_the_ttl_header_as_sent() {
        for version in [Version::V1, Version::V2] {
            let mut mmds = mmds_with(version, false);
            for (header, value, echoed) in [
                ("X-metadata-token-ttl-seconds", "60", "60"),
                ("x-aws-ec2-metadata-token-ttl-seconds", " 21600 ", "21600"),
                ("X-metadata-token-ttl-seconds", "+1", "1"),
            ] {
                let request = format!(
                    "PUT http://169.254.169.254/latest/api/token HTTP/1.1\r\n{header}:{value}\r\n\r\n"
                );
                let response = serve_ok(&mut mmds, &request);
                let (head, token) = response.split_once("\r\n\r\n").unwrap();
                assert_eq!(token.len(), TOKEN_LEN);
                assert_eq!(
                    response,
                    expected(
                        "200 OK",
                        &format!("{header}: {echoed}\r\n"),
                        "text/plain",
                        token,
                        false
                    ),
                    "{head}"
                );
                assert!(mmds.tokens.is_valid(token, Instant::now()));
            }
        }
    }

    #[test]
    fn token_put_with_x_forwarded_for_is_400_on_any_path() {
        let mut mmds = mmds_with(Version::V2, false);
        for (header, path) in [
            ("X-Forwarded-For", "/latest/api/token"),
            ("x-fOrWaRdEd-FoR", "/latest/api/token"),
            ("X-Forwarded-For", "/elsewhere"),
        ] {
            let request = format!(
                "PUT {path} HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\
                 {header}: 203.0.113.195\r\n\r\n"
            );
            assert_eq!(
                serve_ok(&mut mmds, &request),
                text(
                    "400 Bad Request",
                    &format!("Invalid header. Reason: Unsupported header name. Key: {header}")
                )
            );
        }
        assert!(mmds.tokens.is_empty());
    }

    #[test]
    fn token_put_elsewhere_is_404() {
        let mut mmds = v1();
        for path in ["/token", "/latest/api/token/", "/latest/api/token2"] {
            let request =
                format!("PUT {path} HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n");
            assert_eq!(
                serve_ok(&mut mmds, &request),
                text("404 Not Found", &format!("Resource not found: {path}."))
            );
        }
        // Doubled slashes are collapsed before the comparison.
        let request =
            "PUT //latest//api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n";
        assert!(serve_ok(&mut mmds, request).starts_with("HTTP/1.1 200 OK\r\n"));
    }

    #[test]
    fn token_put_without_ttl_is_400() {
        let mut mmds = v1();
        assert_eq!(
            serve_ok(&mut mmds, "PUT /latest/api/token HTTP/1.1\r\n\r\n"),
            text(
                "400 Bad Request",
                "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or \
                 `X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime."
            )
        );
    }

    #[test]
    fn token_put_with_non_numeric_ttl_is_400_naming_header_and_value() {
        let mut mmds = v1();
        for value in ["application/json", "-1", "4294967296", "1.5"] {
            let request = format!(
                "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: {value}\r\n\r\n"
            );
            assert_eq!(
                serve_ok(&mut mmds, &request),
                text(
                    "400 Bad Request",
                    &format!(
                        "Invalid header. Reason: Invalid value. \
                         Key:X-metadata-token-ttl-seconds; Value:{value}"
                    )
                )
            );
        }
    }

    #[test]
    fn token_put_with_out_of_range_ttl_is_400() {
        let mut mmds = v1();
        for ttl in [0u32, 21601, u32::MAX] {
            let request = format!(
                "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: {ttl}\r\n\r\n"
            );
            assert_eq!(
                serve_ok(&mut mmds, &request),
                text(
                    "400 Bad Request",
                    &format!(
                        "Invalid time to live value provided for token: {ttl}. \
                         Please provide a value between 1 and 21600."
                    )
                )
            );
        }
        assert!(mmds.tokens.is_empty());
    }

    #[test]
    fn request_with_body_waits_for_it_then_is_400_and_stays_in_step() {
        let mut mmds = v1();
        let head = "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\
                    Content-Length: 3\r\n\r\n";
        let partial = format!("{head}ab");
        assert_eq!(
            serve(&mut mmds, partial.as_bytes(), Instant::now()),
            Served::NeedMore
        );
        let whole = format!("{head}abc{}", get("/latest/meta-data/ami-id", ""));
        let (response, consumed, close) = serve_at(&mut mmds, whole.as_bytes(), Instant::now());
        assert_eq!(response, text("400 Bad Request", "Invalid request."));
        assert_eq!((consumed, close), (head.len() + 3, false));
        // The next request starts right after the body.
        let (response, _, _) = serve_at(&mut mmds, &whole.as_bytes()[consumed..], Instant::now());
        assert_eq!(response, text("200 OK", "ami-1"));
        assert!(mmds.tokens.is_empty());
        // Content-Length: 0 is no body.
        let request = get("/latest/meta-data/ami-id", "Content-Length: 0\r\n");
        assert_eq!(serve_ok(&mut mmds, &request), text("200 OK", "ami-1"));
    }

    #[test]
    fn bad_content_length_is_400_and_closes() {
        let mut mmds = v1();
        for value in ["alpha", "-1", "99999999999"] {
            let request = get("/", &format!("Content-Length: {value}\r\n"));
            let (response, consumed, close) =
                serve_at(&mut mmds, request.as_bytes(), Instant::now());
            assert_eq!(
                response,
                expected(
                    "400 Bad Request",
                    "",
                    "text/plain",
                    &format!("Invalid value. Key:Content-Length; Value: {value}"),
                    true
                )
            );
            assert_eq!((consumed, close), (request.len(), true));
        }
    }

    #[test]
    fn chunked_transfer_encoding_is_501_and_closes() {
        let mut mmds = v1();
        let request = get("/", "Transfer-Encoding: chunked\r\n");
        let (response, _, close) = serve_at(&mut mmds, request.as_bytes(), Instant::now());
        assert_eq!(
            response,
            expected(
                "501 Not Implemented",
                "",
                "text/plain",
                "Unsupported header value. Key:Transfer-Encoding; Value:chunked",
                true
            )
        );
        assert!(close);
        let request = get(
            "/age",
            "Transfer-Encoding: identity\r\nAccept: application/json\r\n",
        );
        assert_eq!(
            serve_ok(&mut mmds, &request),
            expected("200 OK", "", "application/json", "43", false)
        );
    }

    #[test]
    fn incomplete_request_needs_more_at_every_prefix() {
        let mut mmds = v1();
        let request = get("/latest/meta-data/ami-id", "Accept: text/plain\r\n");
        for end in 0..request.len() {
            assert_eq!(
                serve(&mut mmds, &request.as_bytes()[..end], Instant::now()),
                Served::NeedMore,
                "prefix {end}"
            );
        }
        assert_eq!(serve_ok(&mut mmds, &request), text("200 OK", "ami-1"));
    }

    #[test]
    fn pipelined_requests_are_served_one_at_a_time() {
        let mut mmds = v1();
        let first = get("/latest/meta-data/ami-id", "");
        let second = get("/age", "Accept: application/json\r\n");
        let both = format!("{first}{second}GET /par");
        let (response, consumed, close) = serve_at(&mut mmds, both.as_bytes(), Instant::now());
        assert_eq!(
            (response.as_str(), consumed, close),
            (text("200 OK", "ami-1").as_str(), first.len(), false)
        );
        let rest = &both.as_bytes()[consumed..];
        let (response, consumed, _) = serve_at(&mut mmds, rest, Instant::now());
        assert_eq!(
            response,
            expected("200 OK", "", "application/json", "43", false)
        );
        assert_eq!(consumed, second.len());
        assert_eq!(
            serve(&mut mmds, &rest[consumed..], Instant::now()),
            Served::NeedMore
        );
    }

    #[test]
    fn connection_close_and_http10_close_after_the_response() {
        let mut mmds = v1();
        for (request, close) in [
            ("GET /age HTTP/1.1\r\nConnection: close\r\n\r\n", true),
            (
                "GET /age HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n",
                true,
            ),
            ("GET /age HTTP/1.0\r\n\r\n", true),
            ("GET /age HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", false),
            ("GET /age HTTP/1.1\r\nConnection: keep-alive\r\n\r\n", false),
            ("GET /age HTTP/1.1\r\n\r\n", false),
        ] {
            let (response, consumed, closed) =
                serve_at(&mut mmds, request.as_bytes(), Instant::now());
            assert_eq!((consumed, closed), (request.len(), close), "{request:?}");
            assert_eq!(
                response,
                expected(
                    "501 Not Implemented",
                    "",
                    "text/plain",
                    "Cannot retrieve value. The value has an unsupported type.",
                    close
                )
            );
        }
    }

    #[test]
    fn bare_lf_line_endings_are_accepted() {
        let mut mmds = v1();
        let request = "GET /latest/meta-data/ami-id HTTP/1.1\nAccept: application/json\n\n";
        assert_eq!(
            serve_ok(&mut mmds, request),
            expected("200 OK", "", "application/json", r#""ami-1""#, false)
        );
    }

    #[test]
    fn request_head_reaching_max_request_is_413_and_closes() {
        let mut mmds = v1();
        let mut request = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        request.resize(MAX_REQUEST - 1, b'a');
        assert_eq!(serve(&mut mmds, &request, Instant::now()), Served::NeedMore);
        request.push(b'a');
        let (response, consumed, close) = serve_at(&mut mmds, &request, Instant::now());
        assert_eq!(
            response,
            expected(
                "413 Payload Too Large",
                "",
                "text/plain",
                &format!(
                    "Request of at least {MAX_REQUEST} bytes is larger than the limit of \
                     {MAX_REQUEST} bytes."
                ),
                true
            )
        );
        assert_eq!((consumed, close), (MAX_REQUEST, true));
    }

    #[test]
    fn content_length_beyond_max_request_is_413_at_once() {
        let mut mmds = v1();
        let head = "PUT /latest/api/token HTTP/1.1\r\nContent-Length: ";
        // Head (with the 4-digit length and the blank line) plus body is one byte over.
        let over = MAX_REQUEST + 1 - (head.len() + 4 + 4);
        let request = format!("{head}{over}\r\n\r\n");
        let (response, _, close) = serve_at(&mut mmds, request.as_bytes(), Instant::now());
        assert!(response.starts_with("HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\n"));
        assert!(close);
        // A body that fits is waited for.
        let request = format!("{head}{}\r\n\r\n", over - 1);
        assert_eq!(
            serve(&mut mmds, request.as_bytes(), Instant::now()),
            Served::NeedMore
        );
    }

    #[test]
    fn too_many_headers_is_431_and_closes() {
        let mut mmds = v1();
        let headers: String = (0..=MAX_HEADERS).map(|i| format!("H{i}: v\r\n")).collect();
        let request = get("/", &headers);
        let (response, _, close) = serve_at(&mut mmds, request.as_bytes(), Instant::now());
        assert_eq!(
            response,
            expected(
                "431 Request Header Fields Too Large",
                "",
                "text/plain",
                &format!("A request may have at most {MAX_HEADERS} headers."),
                true
            )
        );
        assert!(close);
    }

    /// Checks `response` is one well-formed HTTP/1.1 response whose Content-Length is
    /// the length of what follows its head, and whose Connection header matches `close`.
    fn check_response(response: &[u8], close: bool) {
        let mut slots = [httparse::EMPTY_HEADER; 8];
        let mut parsed = httparse::Response::new(&mut slots);
        let head = match parsed.parse(response) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!(
                "bad response head {other:?}: {:?}",
                String::from_utf8_lossy(response)
            ),
        };
        assert_eq!(parsed.version, Some(1));
        assert!(parsed.code.is_some_and(|c| (200..600).contains(&c)));
        let value = |name: &str| {
            parsed
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| std::str::from_utf8(h.value).unwrap().to_string())
        };
        let length: usize = value("content-length").unwrap().parse().unwrap();
        assert_eq!(response.len(), head + length);
        assert_eq!(
            value("connection").unwrap(),
            if close { "close" } else { "keep-alive" }
        );
    }

    /// Serves `input` like a connection whose bytes arrive in `chunks`: appends each chunk
    /// to a buffer and serves while replies come. Returns the responses and the bytes
    /// left over.
    fn drive(mmds: &mut Mmds, input: &[u8], cuts: &[usize]) -> (Vec<(Vec<u8>, bool)>, usize) {
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        bounds.push(input.len());
        bounds.sort_unstable();
        let now = Instant::now();
        let mut buffer = Vec::new();
        let mut fed = 0;
        let mut responses = Vec::new();
        for bound in bounds {
            buffer.extend_from_slice(&input[fed..bound]);
            fed = bound;
            loop {
                match serve(mmds, &buffer, now) {
                    Served::NeedMore => {
                        assert!(buffer.len() < MAX_REQUEST);
                        break;
                    }
                    Served::Reply {
                        consumed,
                        response,
                        close,
                    } => {
                        assert!(consumed <= buffer.len());
                        assert!(consumed > 0);
                        check_response(&response, close);
                        responses.push((response, close));
                        buffer.drain(..consumed);
                        if close {
                            return (responses, buffer.len() + input.len() - fed);
                        }
                    }
                }
            }
        }
        (responses, buffer.len())
    }

    /// Requests whose responses do not depend on randomness (no token is issued).
    fn request_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(get("/latest/meta-data/ami-id", "")),
            Just(get("/latest", "Accept: application/json\r\n")),
            Just(get("//latest//meta-data/", "X-metadata-token: x\r\n")),
            Just(get("/nope", "")),
            Just(get("/age", "")),
            Just("PATCH / HTTP/1.1\r\n\r\n".to_string()),
            Just("POST / HTTP/1.1\r\n\r\n".to_string()),
            Just("PUT /latest/api/token HTTP/1.1\r\n\r\n".to_string()),
            Just(
                "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 0\r\n\r\n"
                    .to_string()
            ),
            Just("PUT /x HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody".to_string()),
            Just("GET latest HTTP/1.1\r\n\r\n".to_string()),
            "[a-z/]{0,40}".prop_map(|p| get(&format!("/{p}"), "")),
        ]
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_and_replies_are_well_formed(
            input in proptest::collection::vec(any::<u8>(), 0..(MAX_REQUEST + 200)),
            v2 in any::<bool>(),
        ) {
            let mut mmds = mmds_with(if v2 { Version::V2 } else { Version::V1 }, false);
            match serve(&mut mmds, &input, Instant::now()) {
                Served::NeedMore => prop_assert!(input.len() < MAX_REQUEST),
                Served::Reply { consumed, response, close } => {
                    prop_assert!(consumed > 0 && consumed <= input.len());
                    check_response(&response, close);
                }
            }
        }

        #[test]
        fn mutated_requests_never_panic_and_replies_are_well_formed(
            request in request_strategy(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 0..6),
            cuts in proptest::collection::vec(any::<usize>(), 0..5),
        ) {
            let mut bytes = request.into_bytes();
            for (at, byte, kind) in edits {
                let at = at % (bytes.len() + 1);
                match kind {
                    0 => bytes.insert(at, byte),
                    1 if at < bytes.len() => { bytes.remove(at); }
                    _ if at < bytes.len() => bytes[at] = byte,
                    _ => {}
                }
            }
            let mut mmds = v1();
            drive(&mut mmds, &bytes, &cuts);
        }

        #[test]
        fn split_pipelined_requests_get_the_same_responses_as_whole(
            requests in proptest::collection::vec(request_strategy(), 1..6),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let input: Vec<u8> = requests.concat().into_bytes();
            let (whole, _) = drive(&mut v1(), &input, &[]);
            let (split, _) = drive(&mut v1(), &input, &cuts);
            prop_assert_eq!(whole.len(), requests.len());
            prop_assert_eq!(split, whole);
        }

        #[test]
        fn endless_request_is_cut_off_at_max_request(
            chunk in proptest::collection::vec(b'a'..=b'z', 1..300),
        ) {
            let mut mmds = v1();
            let mut buffer = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
            loop {
                match serve(&mut mmds, &buffer, Instant::now()) {
                    Served::NeedMore => {
                        prop_assert!(buffer.len() < MAX_REQUEST);
                        buffer.extend_from_slice(&chunk);
                    }
                    Served::Reply { response, close, .. } => {
                        prop_assert!(close);
                        prop_assert!(response.starts_with(b"HTTP/1.1 413 "));
                        prop_assert!(buffer.len() >= MAX_REQUEST);
                        break;
                    }
                }
            }
        }
    }
}
