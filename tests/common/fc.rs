//! Shared helpers for the Firecracker-compatible front door's tests: the binary under
//! test (Ferrite through a link named `firecracker`, or, to check a test itself, a real
//! Firecracker named by `FERRITE_FC_UNDER_TEST`), a minimal HTTP/1.1 client on a UNIX
//! socket with keep-alive (as firecracker-go-sdk uses it), and the tier-A kernel.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The tier-A kernel's cache directory (bzImage, vmlinux, initramfs.cpio.gz).
pub fn tier_a_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| super::build_recipe("tests/guests/linux/build-tier-a.sh"))
}

/// The binary tests start as `firecracker`: a symlink named `firecracker` to the
/// `ferrite` binary (in `dir`), or `$FERRITE_FC_UNDER_TEST` when set (a real
/// Firecracker, to check that a test describes Firecracker's behaviour).
pub fn firecracker_in(dir: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("FERRITE_FC_UNDER_TEST") {
        return PathBuf::from(p);
    }
    let link = dir.join("firecracker");
    if !link.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_ferrite"), &link)
            .unwrap_or_else(|e| panic!("symlink {}: {e}", link.display()));
    }
    link
}

/// Whether the binary under test is Ferrite (not a real Firecracker).
pub fn is_ferrite() -> bool {
    std::env::var_os("FERRITE_FC_UNDER_TEST").is_none()
}

/// A fresh private directory for one test (sockets, FIFOs, config files, disks).
pub fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrite-fc-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
    d
}

/// One HTTP response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    /// The `Deprecation` header's value (Firecracker marks answers to requests that
    /// used a deprecated field).
    pub deprecation: Option<String>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The `fault_message` of a 400 answer.
    pub fn fault(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message in {:?}", self.body))
            .to_owned()
    }
}

/// An HTTP/1.1 client on one keep-alive UNIX-socket connection.
pub struct Api {
    reader: BufReader<UnixStream>,
    stream: UnixStream,
    sock: PathBuf,
}

impl Api {
    /// Connects to `sock`, retrying until `deadline` passes (the socket may not exist
    /// yet).
    pub fn connect(sock: &Path, deadline: Duration) -> Api {
        let end = Instant::now() + deadline;
        loop {
            match UnixStream::connect(sock) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    return Api {
                        reader: BufReader::new(s.try_clone().unwrap()),
                        stream: s,
                        sock: sock.to_owned(),
                    };
                }
                Err(e) if Instant::now() > end => {
                    panic!("connect {}: {e}", sock.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    /// Sends one request (a body is sent with a trailing newline, as the Go SDK does)
    /// and reads its answer.
    pub fn call(&mut self, method: &str, path: &str, body: Option<&str>) -> Reply {
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
        match body {
            Some(b) => {
                let b = format!("{b}\n");
                req.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                    b.len()
                ));
            }
            None => req.push_str("\r\n"),
        }
        if let Err(e) = self.stream.write_all(req.as_bytes()) {
            // The server closed the connection while it was idle (Ferrite's server
            // closes idle clients after a while; Firecracker keeps them): the request
            // never arrived, so send it again on a new connection, as Go's HTTP
            // transport (firecracker-go-sdk) does.
            if !matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) {
                panic!("{method} {path}: write: {e}");
            }
            eprintln!("{method} {path}: the idle connection was closed ({e}); reconnecting");
            *self = Api::connect(&self.sock, Duration::from_secs(3));
            self.stream
                .write_all(req.as_bytes())
                .unwrap_or_else(|e| panic!("{method} {path}: write: {e}"));
        }
        self.read_reply(method, path)
    }

    fn read_reply(&mut self, method: &str, path: &str) -> Reply {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("{method} {path}: read: {e}"));
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{method} {path}: bad status line {line:?}"));
        let mut len = 0usize;
        let mut deprecation = None;
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if k.eq_ignore_ascii_case("deprecation") {
                    deprecation = Some(v.trim().to_owned());
                }
            }
        }
        let mut body = vec![0u8; len];
        self.reader.read_exact(&mut body).unwrap();
        Reply {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
            deprecation,
        }
    }

    pub fn get(&mut self, path: &str) -> Reply {
        self.call("GET", path, None)
    }
    pub fn put(&mut self, path: &str, body: &str) -> Reply {
        self.call("PUT", path, Some(body))
    }
    pub fn patch(&mut self, path: &str, body: &str) -> Reply {
        self.call("PATCH", path, Some(body))
    }

    /// `GET /`'s `state`.
    pub fn state(&mut self) -> String {
        let r = self.get("/");
        assert_eq!(r.status, 200, "GET /: {r:?}");
        r.json()["state"].as_str().unwrap_or_default().to_owned()
    }
}
