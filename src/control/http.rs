//! HTTP/1.1 for the control socket, with no I/O and no fds: [`RequestReader`] turns
//! bytes read from a non-blocking socket into [`Request`]s, and [`Response::to_bytes`]
//! turns an answer into bytes to write.
//!
//! * The head is parsed by `httparse` (at most [`MAX_HEADERS`] headers); a body is
//!   delimited by `Content-Length` only. `Transfer-Encoding` (chunked or other) is
//!   refused with 411, a missing `Content-Length` means an empty body.
//! * Limits: head ≤ [`MAX_HEAD`], body ≤ [`MAX_BODY`], bytes buffered per connection ≤
//!   [`MAX_BUFFERED`]. Beyond them, [`HttpError::TooLarge`] (413).
//! * Bytes may arrive in any split, down to one byte per read; pipelined requests come
//!   out one by one. Pipelined input may exceed [`MAX_BUFFERED`] in total as long as
//!   it is read at most [`RequestReader::room`] (and [`READ_CHUNK`]) at a time, with
//!   the complete requests taken out before each read. After an error the reader is poisoned (it returns the same error
//!   again): answer with [`HttpError::response`] and close the connection.
//! * Nothing here panics on peer data; error messages quote the offending input escaped
//!   and truncated.
#![forbid(unsafe_code)]

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest request head (request line and headers, with the blank line).
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body (`Content-Length`).
pub const MAX_BODY: usize = 64 * 1024;
/// Most bytes a [`RequestReader`] holds at once.
pub const MAX_BUFFERED: usize = 80 * 1024;
/// Most headers in a request head.
pub const MAX_HEADERS: usize = 32;
/// Largest read to hand to [`RequestReader::push`] at once: with the reader drained
/// (`next_request` until `None`) before each push, a request of the largest allowed
/// head and body plus one such read never exceeds [`MAX_BUFFERED`].
pub const READ_CHUNK: usize = MAX_BUFFERED - MAX_HEAD - MAX_BODY;
/// The interim answer to a head with `Expect: 100-continue` whose body has not
/// arrived (see [`RequestReader::take_continue`]).
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// How many bytes of peer input an error message quotes.
const EXCERPT: usize = 48;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("{what} exceeds the limit of {limit} bytes (got {size})")]
    TooLarge {
        what: &'static str,
        size: u64,
        limit: usize,
    },
    #[error("Transfer-Encoding {0:?} is not supported: send the body with Content-Length")]
    LengthRequired(String),
    #[error("HTTP version {0:?} is not supported (only HTTP/1.0 and HTTP/1.1)")]
    UnsupportedVersion(String),
}

impl HttpError {
    /// The HTTP status that answers this error.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed(_) => 400,
            HttpError::TooLarge { .. } => 413,
            HttpError::LengthRequired(_) => 411,
            HttpError::UnsupportedVersion(_) => 505,
        }
    }

    /// The answer to send (with `keep_alive` false) before closing the connection:
    /// [`status`](Self::status) and `{"error": "<this error>"}`.
    pub fn response(&self) -> Response {
        Response::error(self.status(), self)
    }
}

/// A request method; methods are case-sensitive, so `get` is `Other("get")`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    Patch,
    Post,
    Delete,
    Other(String),
}

impl Method {
    fn parse(s: &str) -> Method {
        match s {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "POST" => Method::Post,
            "DELETE" => Method::Delete,
            other => Method::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Post => "POST",
            Method::Delete => "DELETE",
            Method::Other(s) => s,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The target up to `?`, always starting with `/`; not percent-decoded.
    pub path: String,
    /// The target after the first `?`, if there is one.
    pub query: Option<String>,
    pub body: Vec<u8>,
    /// False for `Connection: close`, and for HTTP/1.0 without `Connection: keep-alive`.
    pub keep_alive: bool,
}

impl Request {
    /// Decodes the body as JSON; an empty or invalid body is [`HttpError::Malformed`].
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HttpError> {
        if self.body.trim_ascii().is_empty() {
            return Err(HttpError::Malformed(format!(
                "{} {} needs a JSON body",
                self.method, self.path
            )));
        }
        serde_json::from_slice(&self.body).map_err(|e| {
            HttpError::Malformed(format!(
                "invalid JSON body for {} {}: {e}",
                self.method, self.path
            ))
        })
    }
}

/// A parsed head whose body has not fully arrived yet.
#[derive(Debug)]
struct Head {
    method: Method,
    path: String,
    query: Option<String>,
    keep_alive: bool,
    head_len: usize,
    body_len: usize,
    expect_continue: bool,
}

/// Incremental request parser for one connection.
///
/// The loop-friendly use: for each readable event, read at most [`READ_CHUNK`] bytes,
/// [`push`](Self::push) them, then call [`next_request`](Self::next_request) until it
/// returns `Ok(None)`. [`feed`](Self::feed) does one push and one `next_request`.
#[derive(Debug, Default)]
pub struct RequestReader {
    buf: Vec<u8>,
    pending: Option<Head>,
    failed: Option<HttpError>,
    continue_wanted: bool,
}

impl RequestReader {
    pub fn new() -> RequestReader {
        RequestReader::default()
    }

    /// Appends bytes read from the peer. Fails with [`HttpError::TooLarge`] if that
    /// would hold more than [`MAX_BUFFERED`] bytes.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), HttpError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let total = self.buf.len().saturating_add(bytes.len());
        if total > MAX_BUFFERED {
            return Err(self.fail(HttpError::TooLarge {
                what: "the data buffered for this connection",
                size: total as u64,
                limit: MAX_BUFFERED,
            }));
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// The next complete request, if the buffered bytes hold one.
    pub fn next_request(&mut self) -> Result<Option<Request>, HttpError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.parse().map_err(|e| self.fail(e))
    }

    /// [`push`](Self::push) then [`next_request`](Self::next_request). Further
    /// pipelined requests stay buffered: fetch them with `next_request`.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<Request>, HttpError> {
        self.push(bytes)?;
        self.next_request()
    }

    /// Bytes buffered and not yet returned as a request.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// How many more bytes [`push`](Self::push) accepts now: what is left of
    /// [`MAX_BUFFERED`], 0 once the reader has failed. A server reads at most this
    /// much (and at most [`READ_CHUNK`]) so that it never takes bytes it must refuse.
    pub fn room(&self) -> usize {
        if self.failed.is_some() {
            return 0;
        }
        MAX_BUFFERED.saturating_sub(self.buf.len())
    }

    /// True if nothing is buffered: the peer closing now ends the connection cleanly,
    /// rather than in the middle of a request.
    pub fn is_idle(&self) -> bool {
        self.buf.is_empty() && self.pending.is_none()
    }

    /// True once after a head with `Expect: 100-continue` whose body has not all
    /// arrived: the server may then write `HTTP/1.1 100 Continue\r\n\r\n` (clients such
    /// as curl otherwise wait about a second before sending a large body).
    pub fn take_continue(&mut self) -> bool {
        std::mem::take(&mut self.continue_wanted)
    }

    /// The error that poisoned this reader, if any.
    pub fn error(&self) -> Option<&HttpError> {
        self.failed.as_ref()
    }

    fn fail(&mut self, e: HttpError) -> HttpError {
        self.failed = Some(e.clone());
        self.continue_wanted = false;
        e
    }

    fn parse(&mut self) -> Result<Option<Request>, HttpError> {
        if self.pending.is_none() {
            let Some(head) = parse_head(&self.buf)? else {
                return Ok(None);
            };
            self.continue_wanted = head.expect_continue
                && head.body_len > 0
                && self.buf.len() < head.head_len + head.body_len;
            self.pending = Some(head);
        }
        let Some(head) = &self.pending else {
            return Ok(None);
        };
        let end = head.head_len + head.body_len;
        if self.buf.len() < end {
            return Ok(None);
        }
        let Some(head) = self.pending.take() else {
            return Ok(None);
        };
        let body = self.buf[head.head_len..end].to_vec();
        self.buf.drain(..end);
        self.continue_wanted = false;
        Ok(Some(Request {
            method: head.method,
            path: head.path,
            query: head.query,
            body,
            keep_alive: head.keep_alive,
        }))
    }
}

/// Parses a head at the start of `buf`: `None` if it is not complete yet.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return Err(HttpError::TooLarge {
                    what: "the request head",
                    size: buf.len() as u64,
                    limit: MAX_HEAD,
                });
            }
            return Ok(None);
        }
        Err(httparse::Error::Version) => {
            return Err(HttpError::UnsupportedVersion(version_excerpt(buf)))
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::Malformed(format!(
                "more than {MAX_HEADERS} headers"
            )))
        }
        Err(e) => {
            return Err(HttpError::Malformed(format!(
                "{e} in {:?}",
                excerpt(first_line(buf))
            )))
        }
    };
    if head_len > MAX_HEAD {
        return Err(HttpError::TooLarge {
            what: "the request head",
            size: head_len as u64,
            limit: MAX_HEAD,
        });
    }
    let incomplete = || HttpError::Malformed("incomplete request line".to_owned());
    let method = Method::parse(req.method.ok_or_else(incomplete)?);
    let target = req.path.ok_or_else(incomplete)?;
    let http11 = match req.version.ok_or_else(incomplete)? {
        0 => false,
        1 => true,
        v => return Err(HttpError::UnsupportedVersion(format!("HTTP/1.{v}"))),
    };
    if !target.starts_with('/') {
        return Err(HttpError::Malformed(format!(
            "request target {:?} is not an absolute path",
            excerpt(target.as_bytes())
        )));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.to_owned(), None),
    };

    let mut content_length: Option<u64> = None;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let value = h.value.trim_ascii();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = parse_content_length(value)?;
            if content_length.is_some_and(|old| old != n) {
                return Err(HttpError::Malformed(
                    "conflicting Content-Length headers".to_owned(),
                ));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::LengthRequired(excerpt(value)));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive_token = true;
                }
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > MAX_BODY as u64 {
        return Err(HttpError::TooLarge {
            what: "the request body",
            size: body_len,
            limit: MAX_BODY,
        });
    }
    Ok(Some(Head {
        method,
        path,
        query,
        keep_alive: !close && (http11 || keep_alive_token),
        head_len,
        // At most MAX_BODY, checked above.
        body_len: body_len as usize,
        expect_continue,
    }))
}

fn parse_content_length(value: &[u8]) -> Result<u64, HttpError> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(HttpError::Malformed(format!(
            "invalid Content-Length {:?}",
            excerpt(value)
        )));
    }
    // Only digits: the only possible failure is overflow.
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or(HttpError::TooLarge {
            what: "the request body",
            size: u64::MAX,
            limit: MAX_BODY,
        })
}

fn first_line(buf: &[u8]) -> &[u8] {
    let end = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    &buf[..end]
}

/// The version token of the request line (its last word), for error messages.
fn version_excerpt(buf: &[u8]) -> String {
    let line = first_line(buf).trim_ascii();
    let start = line.iter().rposition(|&b| b == b' ').map_or(0, |i| i + 1);
    excerpt(&line[start..])
}

/// Peer bytes for an error message: escaped, at most [`EXCERPT`] of them.
fn excerpt(bytes: &[u8]) -> String {
    let mut s = bytes[..bytes.len().min(EXCERPT)].escape_ascii().to_string();
    if bytes.len() > EXCERPT {
        s.push_str("...");
    }
    s
}

/// An answer: a status and a JSON body. A `Null` body, and any body of a 1xx, 204 or
/// 304 answer, is sent as no body at all.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: serde_json::Value,
    /// Sends `Deprecation: true` (Firecracker's mark on an answer to a request that
    /// used a deprecated field).
    pub deprecation: bool,
}

impl Response {
    /// `status` with `value` as JSON; a value that cannot be encoded gives a 500.
    pub fn json(status: u16, value: &impl Serialize) -> Response {
        match serde_json::to_value(value) {
            Ok(body) => Response {
                status,
                body,
                deprecation: false,
            },
            Err(e) => Response::error(500, format!("cannot encode the response: {e}")),
        }
    }

    /// `status` with `{"error": msg}` ([`super::protocol::ErrorBody`]).
    pub fn error(status: u16, msg: impl fmt::Display) -> Response {
        let e = super::protocol::ErrorBody {
            error: msg.to_string(),
        };
        Response {
            status,
            // A struct of one string always encodes; were it ever not to, the status
            // alone still says what happened.
            body: serde_json::to_value(e).unwrap_or_default(),
            deprecation: false,
        }
    }

    /// 204 No Content.
    pub fn no_content() -> Response {
        Response {
            status: 204,
            body: serde_json::Value::Null,
            deprecation: false,
        }
    }

    /// The response as bytes for the wire, with `Connection: keep-alive` or `close`.
    /// A JSON body ends with a newline (for terminals; JSON parsers ignore it).
    pub fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let bodyless = matches!(self.status, 100..=199 | 204 | 304);
        let body = if bodyless || self.body.is_null() {
            Vec::new()
        } else {
            // Encoding a Value cannot fail (its map keys are strings); fall back to an
            // empty body rather than panic if it ever did.
            let mut b = serde_json::to_vec(&self.body).unwrap_or_default();
            b.push(b'\n');
            b
        };
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: ferrite\r\nConnection: {connection}\r\n",
            self.status,
            reason_phrase(self.status)
        );
        if self.deprecation {
            out.push_str("Deprecation: true\r\n");
        }
        if !bodyless {
            if !body.is_empty() {
                out.push_str("Content-Type: application/json\r\n");
            }
            out.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&body);
        bytes
    }
}

/// The reason phrase for a status code; empty for codes not listed.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The message of an error answer.
    fn error_message(r: &Response) -> String {
        serde_json::from_value::<crate::control::protocol::ErrorBody>(r.body.clone())
            .map(|e| e.error)
            .unwrap_or_else(|e| panic!("not an error body ({e}): {}", r.body))
    }

    /// Feeds `input` in chunks of `sizes` (cycled), draining after each push.
    fn drain_all(input: &[u8], sizes: &[usize]) -> Result<Vec<Request>, HttpError> {
        let mut r = RequestReader::new();
        let mut out = Vec::new();
        let mut rest = input;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].clamp(1, rest.len());
            i += 1;
            r.push(&rest[..n])?;
            rest = &rest[n..];
            while let Some(req) = r.next_request()? {
                out.push(req);
            }
        }
        Ok(out)
    }

    fn one(input: &[u8]) -> Result<Option<Request>, HttpError> {
        RequestReader::new().feed(input)
    }

    #[test]
    fn simple_get() {
        let req = one(b"GET /vm HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(req.method, Method::Get);
        assert_eq!(req.path, "/vm");
        assert_eq!(req.query, None);
        assert!(req.body.is_empty());
        assert!(req.keep_alive);
    }

    #[test]
    fn query_and_other_method() {
        let req = one(b"PATCH /vm/stats?x=1&y HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(req.method, Method::Patch);
        assert_eq!(req.path, "/vm/stats");
        assert_eq!(req.query.as_deref(), Some("x=1&y"));
    }

    #[test]
    fn put_with_json_body() {
        let body = br#"{"state_before":"running","state":"paused"}"#;
        let mut input = format!(
            "PUT /vm/state HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        input.extend_from_slice(body);
        let mut r = RequestReader::new();
        // Head alone: nothing yet.
        let split = input.len() - 5;
        assert_eq!(r.feed(&input[..split]).unwrap(), None);
        let req = r.feed(&input[split..]).unwrap().unwrap();
        assert_eq!(req.method, Method::Put);
        assert_eq!(req.body, body);
        let v: crate::control::protocol::StateAnswer = req.json().unwrap();
        assert_eq!(v.state, crate::control::protocol::VmState::Paused);
        assert!(r.is_idle());
    }

    #[test]
    fn json_helper_errors() {
        let req = one(b"PUT /vm HTTP/1.1\r\nContent-Length: 3\r\n\r\n{x}")
            .unwrap()
            .unwrap();
        let e = req
            .json::<crate::control::protocol::StateAnswer>()
            .unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("PUT /vm"), "{e}");
        let req = one(b"PUT /vm HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert!(req.json::<crate::control::protocol::StateAnswer>().is_err());
    }

    #[test]
    fn pipelined_requests() {
        let input = b"GET /a HTTP/1.1\r\n\r\nPUT /b HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiDELETE /c HTTP/1.1\r\nConnection: close\r\n\r\n";
        let mut r = RequestReader::new();
        let first = r.feed(input).unwrap().unwrap();
        assert_eq!(first.path, "/a");
        let second = r.next_request().unwrap().unwrap();
        assert_eq!((second.method, second.body), (Method::Put, b"hi".to_vec()));
        let third = r.next_request().unwrap().unwrap();
        assert_eq!(third.method, Method::Delete);
        assert!(!third.keep_alive);
        assert_eq!(r.next_request().unwrap(), None);
        assert!(r.is_idle());
    }

    #[test]
    fn one_byte_drip() {
        let input = b"POST /vm/x?y HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello";
        let mut r = RequestReader::new();
        for (i, b) in input.iter().enumerate() {
            let got = r.feed(std::slice::from_ref(b)).unwrap();
            if i + 1 < input.len() {
                assert_eq!(got, None, "complete too early at byte {i}");
                assert!(!r.is_idle());
            } else {
                let req = got.unwrap();
                assert_eq!(req.body, b"hello");
                assert_eq!(req.query.as_deref(), Some("y"));
            }
        }
    }

    #[test]
    fn oversized_head() {
        let mut input = b"GET / HTTP/1.1\r\nX: ".to_vec();
        input.resize(MAX_HEAD + 1, b'a');
        let e = one(&input).unwrap_err();
        assert!(matches!(
            e,
            HttpError::TooLarge {
                what: "the request head",
                ..
            }
        ));
        assert_eq!(e.status(), 413);
        // Complete but too long.
        input.extend_from_slice(b"\r\n\r\n");
        assert_eq!(one(&input).unwrap_err().status(), 413);
        // Just under the limit is fine.
        let mut ok = b"GET / HTTP/1.1\r\nX: ".to_vec();
        ok.resize(MAX_HEAD - 4, b'a');
        ok.extend_from_slice(b"\r\n\r\n");
        assert!(one(&ok).unwrap().is_some());
    }

    #[test]
    fn oversized_body() {
        let input = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        let e = one(input.as_bytes()).unwrap_err();
        assert!(matches!(
            e,
            HttpError::TooLarge {
                what: "the request body",
                ..
            }
        ));
        let e =
            one(b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n").unwrap_err();
        assert_eq!(e.status(), 413);
        // The largest body is accepted, even in one push.
        let mut input =
            format!("PUT / HTTP/1.1\r\nContent-Length: {MAX_BODY}\r\n\r\n").into_bytes();
        input.resize(input.len() + MAX_BODY, b'z');
        assert_eq!(one(&input).unwrap().unwrap().body.len(), MAX_BODY);
    }

    #[test]
    fn too_much_buffered_and_poisoned() {
        let mut r = RequestReader::new();
        r.push(&vec![b'x'; MAX_BUFFERED]).unwrap();
        let e = r.push(b"y").unwrap_err();
        assert!(
            matches!(
                e,
                HttpError::TooLarge {
                    limit: MAX_BUFFERED,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.status(), 413);
        assert_eq!(r.error(), Some(&e));
        assert_eq!(r.push(b"GET / HTTP/1.1\r\n\r\n").unwrap_err(), e);
        assert_eq!(r.next_request().unwrap_err(), e);
        // Blank lines before a request line are skipped, but count against the head.
        let mut r = RequestReader::new();
        assert_eq!(r.feed(&[b'\n'; MAX_HEAD]).unwrap(), None);
        assert_eq!(r.feed(b"\n").unwrap_err().status(), 413);
    }

    #[test]
    fn content_length_missing_or_invalid() {
        // Missing: empty body; the would-be body is then a bad next request.
        let mut r = RequestReader::new();
        let req = r
            .feed(b"PUT /vm HTTP/1.1\r\n\r\n{\"a\":1}\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(req.body.is_empty());
        assert_eq!(r.next_request().unwrap_err().status(), 400);

        for bad in ["abc", "-1", "+5", "1 2", "5, 5", "0x10", ""] {
            let input = format!("PUT / HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n");
            let e = one(input.as_bytes()).unwrap_err();
            assert!(matches!(e, HttpError::Malformed(_)), "{bad:?}: {e}");
            assert_eq!(e.status(), 400);
        }
        let e =
            one(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n").unwrap_err();
        assert!(e.to_string().contains("conflicting"), "{e}");
        // The same value twice is tolerated.
        assert!(
            one(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 1\r\n\r\nx")
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn chunked_refused() {
        let e =
            one(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
                .unwrap_err();
        assert_eq!(e, HttpError::LengthRequired("chunked".into()));
        assert_eq!(e.status(), 411);
        let resp = e.response();
        assert_eq!(resp.status, 411);
        assert!(error_message(&resp).contains("chunked"));
    }

    #[test]
    fn garbage_and_binary() {
        for input in [
            &b"\x00\x01\x02\xff\xfe"[..],
            b"hello world\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
            b"GET / HTTP/1.1\r\nX\x01: y\r\n\r\n",
            b"GET vm HTTP/1.1\r\n\r\n",
            b"GET * HTTP/1.1\r\n\r\n",
            b"G\xc3\xa9T / HTTP/1.1\r\n\r\n",
        ] {
            let e = one(input).unwrap_err();
            assert_eq!(e.status(), 400, "{input:?}: {e}");
        }
        let e = one(b"GET / HTTP/2.0\r\n\r\n").unwrap_err();
        assert_eq!(e, HttpError::UnsupportedVersion("HTTP/2.0".into()));
        assert_eq!(e.status(), 505);
        let e = one(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03").unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("\\x16"), "{e}");
    }

    #[test]
    fn too_many_headers() {
        let mut input = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            input.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        input.extend_from_slice(b"\r\n");
        assert_eq!(one(&input).unwrap_err().status(), 400);
    }

    #[test]
    fn http10_and_connection_header() {
        assert!(!one(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap().keep_alive);
        assert!(
            one(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                .unwrap()
                .unwrap()
                .keep_alive
        );
        assert!(
            !one(b"GET / HTTP/1.1\r\nConnection: foo, CLOSE\r\n\r\n")
                .unwrap()
                .unwrap()
                .keep_alive
        );
        assert!(
            !one(b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n")
                .unwrap()
                .unwrap()
                .keep_alive
        );
        assert!(
            one(b"GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n")
                .unwrap()
                .unwrap()
                .keep_alive
        );
    }

    #[test]
    fn expect_continue() {
        let mut r = RequestReader::new();
        assert_eq!(
            r.feed(b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
                .unwrap(),
            None
        );
        assert!(r.take_continue());
        assert!(!r.take_continue());
        assert_eq!(r.feed(b"ok").unwrap().unwrap().body, b"ok");
        // Body already there: no 100 needed.
        let mut r = RequestReader::new();
        r.feed(b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok")
            .unwrap();
        assert!(!r.take_continue());
    }

    #[test]
    fn continue_answer_is_a_bare_100() {
        assert_eq!(CONTINUE, b"HTTP/1.1 100 Continue\r\n\r\n");
        // Only for a body still to come, and once.
        let mut r = RequestReader::new();
        r.feed(b"PUT / HTTP/1.1\r\nexpect: 100-Continue\r\nContent-Length: 3\r\n\r\na")
            .unwrap();
        assert!(r.take_continue());
        assert_eq!(r.feed(b"b").unwrap(), None);
        assert!(!r.take_continue());
        // No body: nothing to wait for.
        let mut r = RequestReader::new();
        assert!(r
            .feed(b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n")
            .unwrap()
            .is_some());
        assert!(!r.take_continue());
    }

    #[test]
    fn room_tracks_what_push_accepts() {
        let mut r = RequestReader::new();
        assert_eq!(r.room(), MAX_BUFFERED);
        r.push(b"GET / HTTP/1.1\r\n").unwrap();
        assert_eq!(r.room(), MAX_BUFFERED - 16);
        r.push(&vec![b'x'; r.room()]).unwrap();
        assert_eq!(r.room(), 0);
        assert!(r.push(b"y").is_err());
        // A failed reader takes nothing.
        let mut r = RequestReader::new();
        assert!(r.feed(b"\x00\r\n\r\n").is_err());
        assert_eq!(r.room(), 0);
    }

    /// Issue 13, defect 7: far more than MAX_BUFFERED of pipelined requests arrive in
    /// one write; read `room` (at most READ_CHUNK) at a time and drained in between,
    /// every one of them comes out.
    #[test]
    fn pipelined_requests_beyond_max_buffered_all_parse_when_read_by_room() {
        let one = b"GET /vm HTTP/1.1\r\nHost: x\r\n\r\n";
        let count = 3 * MAX_BUFFERED / one.len() + 7;
        let input: Vec<u8> = one
            .iter()
            .copied()
            .cycle()
            .take(one.len() * count)
            .collect();
        assert!(input.len() > 2 * MAX_BUFFERED);
        let mut r = RequestReader::new();
        let mut rest = &input[..];
        let mut got = 0;
        while !rest.is_empty() {
            let n = r.room().min(READ_CHUNK).min(rest.len());
            assert!(n > 0, "reader full after {got} requests");
            r.push(&rest[..n]).unwrap();
            rest = &rest[n..];
            while let Some(req) = r.next_request().unwrap() {
                assert_eq!(req.path, "/vm");
                got += 1;
            }
        }
        assert_eq!(got, count);
        assert!(r.is_idle());
    }

    #[test]
    fn response_bytes() {
        let r = Response::json(200, &crate::control::protocol::NmiAnswer { nmi: 2 });
        let text = String::from_utf8(r.to_bytes(true)).unwrap();
        let body = "{\"nmi\":2}\n";
        assert_eq!(
            text,
            format!(
                "HTTP/1.1 200 OK\r\nServer: ferrite\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        );
        let text =
            String::from_utf8(Response::error(404, "no such path: /x").to_bytes(false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"));
        assert!(
            text.ends_with("\r\n\r\n{\"error\":\"no such path: /x\"}\n"),
            "{text}"
        );
        let text = String::from_utf8(Response::no_content().to_bytes(true)).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 204 No Content\r\nServer: ferrite\r\nConnection: keep-alive\r\n\r\n"
        );
        let text = String::from_utf8(
            Response {
                status: 200,
                body: serde_json::Value::Null,
                deprecation: false,
            }
            .to_bytes(false),
        )
        .unwrap();
        assert!(text.ends_with("Content-Length: 0\r\n\r\n"), "{text}");
        assert_eq!(reason_phrase(599), "");
    }

    #[test]
    fn response_json_encode_failure_is_500() {
        let mut m = std::collections::BTreeMap::new();
        m.insert(vec![1u8], 2u8);
        let r = Response::json(200, &m);
        assert_eq!(r.status, 500);
        assert!(error_message(&r).contains("cannot encode"));
    }

    /// A request as the generator builds it, and its expected parse.
    fn request_strategy() -> impl Strategy<Value = (Vec<u8>, Request)> {
        (
            prop::sample::select(vec!["GET", "PUT", "POST", "DELETE", "PATCH"]),
            "/[a-z0-9/_.-]{0,20}",
            prop::option::of("[a-z0-9=&%]{0,12}"),
            prop::collection::vec(any::<u8>(), 0..200),
            any::<bool>(),
            any::<bool>(),
            prop::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,10}", "[ -~]{0,20}"), 0..5),
            any::<bool>(),
        )
            .prop_filter("reserved header names", |(.., extra, _)| {
                extra.iter().all(|(n, _)| {
                    let n = n.to_ascii_lowercase();
                    ![
                        "content-length",
                        "transfer-encoding",
                        "connection",
                        "expect",
                    ]
                    .contains(&n.as_str())
                })
            })
            .prop_map(
                |(method, path, query, body, http11, close, extra, lf_only)| {
                    let eol = if lf_only { "\n" } else { "\r\n" };
                    let target = match &query {
                        Some(q) => format!("{path}?{q}"),
                        None => path.clone(),
                    };
                    let version = if http11 { "HTTP/1.1" } else { "HTTP/1.0" };
                    let mut head = format!("{method} {target} {version}{eol}");
                    for (n, v) in &extra {
                        head.push_str(&format!("{n}: {v}{eol}"));
                    }
                    if close {
                        head.push_str(&format!("Connection: close{eol}"));
                    }
                    if !body.is_empty() || method == "PUT" {
                        head.push_str(&format!("Content-Length: {}{eol}", body.len()));
                    }
                    head.push_str(eol);
                    let mut bytes = head.into_bytes();
                    bytes.extend_from_slice(&body);
                    let req = Request {
                        method: Method::parse(method),
                        path,
                        query,
                        body,
                        keep_alive: http11 && !close,
                    };
                    (bytes, req)
                },
            )
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(
            input in prop::collection::vec(any::<u8>(), 0..4096),
            sizes in prop::collection::vec(1usize..64, 1..8),
        ) {
            let _ = drain_all(&input, &sizes);
        }

        #[test]
        fn mutated_requests_never_panic(
            (bytes, _) in request_strategy(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            sizes in prop::collection::vec(1usize..32, 1..8),
        ) {
            let mut bytes = bytes;
            for (i, b) in flips {
                let i = i.index(bytes.len());
                bytes[i] = b;
            }
            let _ = drain_all(&bytes, &sizes);
        }

        #[test]
        fn valid_requests_parse_identically_however_split(
            reqs in prop::collection::vec(request_strategy(), 1..4),
            sizes in prop::collection::vec(1usize..40, 1..8),
        ) {
            let input: Vec<u8> = reqs.iter().flat_map(|(b, _)| b.clone()).collect();
            let expected: Vec<Request> = reqs.into_iter().map(|(_, r)| r).collect();
            let whole = drain_all(&input, &[input.len()]).unwrap();
            prop_assert_eq!(&whole, &expected);
            let split = drain_all(&input, &sizes).unwrap();
            prop_assert_eq!(&split, &expected);
            let drip = drain_all(&input, &[1]).unwrap();
            prop_assert_eq!(&drip, &expected);
        }
    }
}
