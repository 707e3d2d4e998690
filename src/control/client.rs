//! The control socket's client side, for the CLI: one blocking request per connection
//! (`Connection: close`), bounded by one overall deadline for writing the request and
//! reading the whole answer.
//!
//! The answer is parsed with `httparse`: status line, headers, and a body delimited by
//! `Content-Length` (or by the server closing the connection); a body must be empty or
//! JSON. Interim 1xx answers are skipped. [`call`] sends and reads the typed bodies of
//! [`super::protocol`]; [`request`] sends any JSON and reads any JSON, for tests and
//! tools that speak outside the protocol (hostile bodies included).
//!
//! Not bounded by the deadline: `connect` itself. On a UNIX socket it only blocks
//! while the listener's backlog is full (a server that has stopped accepting);
//! `ferrite list` bounds it by asking on a thread it abandons after its deadline.
#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Serialize;
use serde_json::Value;

use super::protocol::ErrorBody;

/// Largest answer (head and body) the client reads.
pub const MAX_RESPONSE: usize = 1 << 20;
/// Most headers in an answer.
const MAX_HEADERS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("control socket {} does not exist (is the VM running?)", socket.display())]
    NoSocket { socket: PathBuf },
    /// Connection refused: nobody listens on the socket (left behind by a VM that is
    /// gone), or the path is not a socket at all (a regular file or a device is refused
    /// in the same way); `paths::remove_stale_socket` tells the two apart.
    #[error("control socket {} refuses connections: nobody is listening (stale socket)", socket.display())]
    Stale { socket: PathBuf },
    #[error("cannot connect to control socket {}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control socket {}: no complete answer to {method} {path} within {timeout:?}", socket.display())]
    Timeout {
        socket: PathBuf,
        method: String,
        path: String,
        timeout: Duration,
    },
    #[error("control socket {}: cannot {what} for {method} {path}", socket.display())]
    Io {
        socket: PathBuf,
        what: &'static str,
        method: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("control socket {}: malformed answer to {method} {path}: {reason}", socket.display())]
    Malformed {
        socket: PathBuf,
        method: String,
        path: String,
        reason: String,
    },
    #[error("invalid request {method:?} {path:?}: {reason}")]
    InvalidRequest {
        method: String,
        path: String,
        reason: &'static str,
    },
}

/// A typed answer: the body of a 2xx answer, or the server's refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<T> {
    Ok(T),
    /// A 4xx or 5xx answer and its `{"error": ...}` message ("(no message)" without one).
    Refused {
        status: u16,
        message: String,
    },
}

/// No body, for [`call`].
pub const NO_BODY: Option<&'static ()> = None;

/// Sends `method path` with `body` encoded as JSON and decodes a 2xx answer as `T`
/// (`Answer::Refused` for a 4xx or 5xx one). An answer that is not a `T` is
/// [`ClientError::Malformed`], which names the request and the type it should have been.
pub fn call<B, T>(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&B>,
    timeout: Duration,
) -> Result<Answer<T>, ClientError>
where
    B: Serialize + ?Sized,
    T: DeserializeOwned,
{
    let ex = Exchange::new(socket, method, path, timeout);
    let bytes = match body {
        Some(b) => {
            Some(serde_json::to_vec(b).map_err(|_| ex.invalid("the body cannot be encoded"))?)
        }
        None => None,
    };
    let (status, answer) = ex.run(bytes.as_deref())?;
    if !(200..300).contains(&status) {
        let message = serde_json::from_slice::<ErrorBody>(&answer)
            .map_or_else(|_| "(no message)".to_owned(), |e| e.error);
        return Ok(Answer::Refused { status, message });
    }
    serde_json::from_slice(&answer)
        .map(Answer::Ok)
        .map_err(|e| {
            let name = std::any::type_name::<T>();
            let name = name.rsplit("::").next().unwrap_or(name);
            ex.malformed(format!("the body is not a {name}: {e}"))
        })
}

/// Sends `method path` with `body` (as JSON) to the control socket and returns the
/// status and the JSON body of the answer (`Null` if it has none), whatever it holds.
/// A 4xx or 5xx answer is returned as such, not as an error.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<(u16, Value), ClientError> {
    let ex = Exchange::new(socket, method, path, timeout);
    let bytes = match body {
        Some(b) => {
            Some(serde_json::to_vec(b).map_err(|_| ex.invalid("the body cannot be encoded"))?)
        }
        None => None,
    };
    let (status, answer) = ex.run(bytes.as_deref())?;
    if answer.is_empty() {
        return Ok((status, Value::Null));
    }
    let v = serde_json::from_slice(&answer)
        .map_err(|e| ex.malformed(format!("the body is not JSON: {e}")))?;
    Ok((status, v))
}

/// Sends `method path` with `body` (bytes, sent as JSON) and returns the status and
/// the body of the answer (empty if it has none; otherwise it is JSON).
pub fn send(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), ClientError> {
    Exchange::new(socket, method, path, timeout).run(body)
}

struct Exchange<'a> {
    socket: &'a Path,
    method: &'a str,
    path: &'a str,
    timeout: Duration,
    deadline: Instant,
}

impl<'a> Exchange<'a> {
    fn new(socket: &'a Path, method: &'a str, path: &'a str, timeout: Duration) -> Self {
        Exchange {
            socket,
            method,
            path,
            timeout,
            deadline: Instant::now() + timeout,
        }
    }

    fn invalid(&self, reason: &'static str) -> ClientError {
        ClientError::InvalidRequest {
            method: self.method.to_owned(),
            path: self.path.to_owned(),
            reason,
        }
    }

    fn run(&self, body: Option<&[u8]>) -> Result<(u16, Vec<u8>), ClientError> {
        let bytes = self.encode(body)?;
        let mut stream = UnixStream::connect(self.socket).map_err(|e| {
            let socket = self.socket.to_path_buf();
            match e.kind() {
                io::ErrorKind::NotFound => ClientError::NoSocket { socket },
                io::ErrorKind::ConnectionRefused => ClientError::Stale { socket },
                _ => ClientError::Connect { socket, source: e },
            }
        })?;
        let write_error = self.write_all(&mut stream, &bytes).err();
        match self.read_answer(&mut stream) {
            Ok(answer) => Ok(answer),
            // The server may answer early (e.g. 413) and close while we still write:
            // its answer wins; without one, report why writing failed.
            Err(read_error) => Err(write_error.unwrap_or(read_error)),
        }
    }

    fn encode(&self, body: Option<&[u8]>) -> Result<Vec<u8>, ClientError> {
        let invalid = |reason| self.invalid(reason);
        let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if self.method.is_empty() || !self.method.bytes().all(tchar) {
            return Err(invalid("the method must be a non-empty HTTP token"));
        }
        if !self.path.starts_with('/') || self.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(invalid(
                "the path must start with '/' and hold no spaces or control characters",
            ));
        }
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n",
            self.method, self.path
        );
        let body = body.unwrap_or_default();
        if !body.is_empty() {
            out.push_str("Content-Type: application/json\r\n");
        }
        if !body.is_empty() || !matches!(self.method, "GET" | "HEAD" | "DELETE") {
            out.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(body);
        Ok(bytes)
    }

    /// Time left before the deadline, or the timeout error.
    fn remaining(&self) -> Result<Duration, ClientError> {
        self.deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| self.timed_out())
    }

    fn timed_out(&self) -> ClientError {
        ClientError::Timeout {
            socket: self.socket.to_path_buf(),
            method: self.method.to_owned(),
            path: self.path.to_owned(),
            timeout: self.timeout,
        }
    }

    fn io_error(&self, what: &'static str, e: io::Error) -> ClientError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => self.timed_out(),
            _ => ClientError::Io {
                socket: self.socket.to_path_buf(),
                what,
                method: self.method.to_owned(),
                path: self.path.to_owned(),
                source: e,
            },
        }
    }

    fn malformed(&self, reason: String) -> ClientError {
        ClientError::Malformed {
            socket: self.socket.to_path_buf(),
            method: self.method.to_owned(),
            path: self.path.to_owned(),
            reason,
        }
    }

    fn write_all(&self, stream: &mut UnixStream, mut bytes: &[u8]) -> Result<(), ClientError> {
        while !bytes.is_empty() {
            let left = self.remaining()?;
            stream
                .set_write_timeout(Some(left))
                .map_err(|e| self.io_error("set the write timeout", e))?;
            match stream.write(bytes) {
                Ok(0) => {
                    return Err(self.io_error(
                        "send the request",
                        io::Error::from(io::ErrorKind::WriteZero),
                    ))
                }
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_error("send the request", e)),
            }
        }
        Ok(())
    }

    fn read_answer(&self, stream: &mut UnixStream) -> Result<(u16, Vec<u8>), ClientError> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let eof = match stream.set_read_timeout(Some(self.remaining()?)) {
                Ok(()) => match stream.read(&mut chunk) {
                    Ok(0) => true,
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        false
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // A reset after a complete answer is still an answer.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => true,
                    Err(e) => return Err(self.io_error("read the answer", e)),
                },
                Err(e) => return Err(self.io_error("set the read timeout", e)),
            };
            if let Some(answer) = parse_answer(&buf, eof).map_err(|r| self.malformed(r))? {
                return Ok(answer);
            }
            if eof {
                // parse_answer returns an answer or an error at EOF; this is a fallback.
                return Err(self.malformed("the connection closed early".to_owned()));
            }
            if buf.len() > MAX_RESPONSE {
                return Err(
                    self.malformed(format!("the answer is larger than {MAX_RESPONSE} bytes"))
                );
            }
        }
    }
}

/// Parses an answer at the start of `buf`: `None` if more bytes are needed (never at
/// `eof`). The body is empty or JSON.
fn parse_answer(buf: &[u8], eof: bool) -> Result<Option<(u16, Vec<u8>)>, String> {
    let mut start = 0;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let head_len = match resp.parse(&buf[start..]) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if !eof => return Ok(None),
            Ok(httparse::Status::Partial) if buf.is_empty() => {
                return Err("the server closed the connection without answering".to_owned())
            }
            Ok(httparse::Status::Partial) => {
                return Err("the connection closed in the middle of the head".to_owned())
            }
            Err(e) => {
                let line = buf[start..].split(|&b| b == b'\n').next().unwrap_or(&[]);
                let line = &line[..line.len().min(48)];
                return Err(format!("{e} in {:?}", line.escape_ascii().to_string()));
            }
        };
        let code = resp.code.ok_or("no status code")?;
        let body_start = start + head_len;
        if (100..200).contains(&code) {
            start = body_start;
            continue;
        }
        let mut content_length = None;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err("Transfer-Encoding is not supported".to_owned());
            }
            if h.name.eq_ignore_ascii_case("content-length") {
                let n = std::str::from_utf8(h.value.trim_ascii())
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<usize>().ok())
                    .ok_or_else(|| {
                        format!(
                            "invalid Content-Length {:?}",
                            h.value.escape_ascii().to_string()
                        )
                    })?;
                if n > MAX_RESPONSE {
                    return Err(format!("Content-Length {n} exceeds {MAX_RESPONSE}"));
                }
                content_length = Some(n);
            }
        }
        let have = &buf[body_start..];
        let body = match content_length {
            _ if code == 204 || code == 304 => &[][..],
            Some(n) if have.len() >= n => &have[..n],
            Some(n) if eof => {
                return Err(format!(
                    "the connection closed after {} of {n} body bytes",
                    have.len()
                ))
            }
            Some(_) => return Ok(None),
            None if eof => have,
            None => return Ok(None),
        };
        if body.trim_ascii().is_empty() {
            return Ok(Some((code, Vec::new())));
        }
        serde_json::from_slice::<IgnoredAny>(body)
            .map_err(|e| format!("the body is not JSON: {e}"))?;
        return Ok(Some((code, body.to_vec())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::http::{Method, RequestReader, Response};
    use crate::control::protocol::{NmiAnswer, NmiRequest, StateAnswer};
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread::JoinHandle;

    /// A socket path unique to this test, removed on drop.
    struct TempSocket(PathBuf);

    impl TempSocket {
        fn new() -> TempSocket {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "ferrite-client-test-{}-{}.sock",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_file(&p);
            TempSocket(p)
        }
    }

    impl Drop for TempSocket {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Serves one connection: reads one request with [`RequestReader`], then lets
    /// `answer` write whatever it likes.
    fn serve_one<F>(
        sock: &TempSocket,
        answer: F,
    ) -> JoinHandle<Option<crate::control::http::Request>>
    where
        F: FnOnce(&crate::control::http::Request, &mut UnixStream) + Send + 'static,
    {
        let listener = UnixListener::bind(&sock.0).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut reader = RequestReader::new();
            let mut chunk = [0u8; 512];
            loop {
                let n = s.read(&mut chunk).unwrap();
                if n == 0 {
                    return None;
                }
                if let Some(req) = reader.feed(&chunk[..n]).unwrap() {
                    answer(&req, &mut s);
                    return Some(req);
                }
            }
        })
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn round_trip_with_body() {
        let sock = TempSocket::new();
        let server = serve_one(&sock, |req, s| {
            let got = NmiRequest::parse(&req.body).unwrap();
            let resp = Response::json(
                200,
                &NmiAnswer {
                    nmi: got.vcpu.map_or(0, |v| v as usize),
                },
            );
            s.write_all(&resp.to_bytes(req.keep_alive)).unwrap();
        });
        let body = NmiRequest { vcpu: Some(2) };
        let answer = call(&sock.0, "PUT", "/vm/nmi?x=1", Some(&body), T).unwrap();
        assert_eq!(answer, Answer::Ok(NmiAnswer { nmi: 2 }));
        let req = server.join().unwrap().unwrap();
        assert_eq!(req.method, Method::Put);
        assert_eq!(req.path, "/vm/nmi");
        assert_eq!(req.query.as_deref(), Some("x=1"));
        assert!(!req.keep_alive, "the client must send Connection: close");
    }

    /// An answer that is JSON but not the expected body is an error naming the
    /// request and the type, not a default value.
    #[test]
    fn answer_of_the_wrong_shape_names_the_endpoint() {
        let sock = TempSocket::new();
        let server = serve_one(&sock, |_, s| {
            let resp = Response::json(200, &NmiAnswer { nmi: 1 });
            s.write_all(&resp.to_bytes(false)).unwrap();
        });
        let e = call::<(), StateAnswer>(&sock.0, "PUT", "/vm/pause", NO_BODY, T).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ClientError::Malformed { .. }), "{msg}");
        assert!(
            msg.contains("PUT /vm/pause") && msg.contains("not a StateAnswer"),
            "{msg}"
        );
        server.join().unwrap();
    }

    #[test]
    fn error_status_and_no_content() {
        let sock = TempSocket::new();
        let server = serve_one(&sock, |req, s| {
            s.write_all(
                &Response::error(404, format!("no such path: {}", req.path)).to_bytes(false),
            )
            .unwrap();
        });
        let answer = call::<(), StateAnswer>(&sock.0, "GET", "/nope", NO_BODY, T).unwrap();
        assert_eq!(
            answer,
            Answer::Refused {
                status: 404,
                message: "no such path: /nope".into()
            }
        );
        server.join().unwrap();

        let sock = TempSocket::new();
        let server = serve_one(&sock, |_, s| {
            s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
            s.write_all(&Response::no_content().to_bytes(false))
                .unwrap();
        });
        assert_eq!(
            send(&sock.0, "PUT", "/vm/pause", None, T).unwrap(),
            (204, Vec::new())
        );
        assert_eq!(server.join().unwrap().unwrap().body, b"");
    }

    #[test]
    fn body_delimited_by_close() {
        let sock = TempSocket::new();
        let server = serve_one(&sock, |_, s| {
            s.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n[1,")
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
            s.write_all(b"2]").unwrap();
        });
        assert_eq!(
            call::<(), Vec<u32>>(&sock.0, "GET", "/", NO_BODY, T).unwrap(),
            Answer::Ok(vec![1, 2])
        );
        server.join().unwrap();
    }

    #[test]
    fn missing_socket() {
        let sock = TempSocket::new();
        let e = request(&sock.0, "GET", "/vm", None, T).unwrap_err();
        assert!(matches!(e, ClientError::NoSocket { .. }), "{e}");
    }

    #[test]
    fn stale_socket() {
        let sock = TempSocket::new();
        drop(UnixListener::bind(&sock.0).unwrap());
        assert!(sock.0.exists());
        let e = request(&sock.0, "GET", "/vm", None, T).unwrap_err();
        assert!(matches!(e, ClientError::Stale { .. }), "{e}");
    }

    #[test]
    fn silent_server_times_out() {
        let sock = TempSocket::new();
        let listener = UnixListener::bind(&sock.0).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_millis(600));
            drop(s);
        });
        let started = Instant::now();
        let e = request(&sock.0, "GET", "/vm", None, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_millis(550));
        server.join().unwrap();
    }

    #[test]
    fn malformed_answers() {
        let answers: [&[u8]; 6] = [
            b"garbage\r\n\r\n",
            b"",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Len",
        ];
        for answer in answers {
            let sock = TempSocket::new();
            let server = serve_one(&sock, move |_, s| s.write_all(answer).unwrap());
            let e = request(&sock.0, "GET", "/vm", None, T).unwrap_err();
            assert!(
                matches!(e, ClientError::Malformed { .. }),
                "{answer:?}: {e}"
            );
            server.join().unwrap();
        }
    }

    #[test]
    fn invalid_requests_are_refused_before_connecting() {
        let sock = TempSocket::new();
        for (m, p) in [
            ("GET", "vm"),
            ("GET", "/a b"),
            ("G T", "/"),
            ("", "/"),
            ("GET", "/\r\nX: y"),
        ] {
            let e = request(&sock.0, m, p, None, T).unwrap_err();
            assert!(
                matches!(e, ClientError::InvalidRequest { .. }),
                "{m:?} {p:?}: {e}"
            );
        }
    }
}
