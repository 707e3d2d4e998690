//! The microVM metadata service (MMDS), compatible with Firecracker's: a JSON document
//! the host sets through the API ([`store`]) and the guest reads over HTTP at a
//! link-local address (169.254.169.254 by default). The guest's frames for that address
//! are taken off a virtio-net interface's TX path and answered by a small TCP/IP
//! responder inside Ferrite ([`stack`]); its HTTP requests are served by [`http`], with
//! V2 session tokens from [`token`].
//!
//! Threads: the store is shared ([`SharedMmds`]) between the API thread (PUT/PATCH/GET
//! `/mmds`) and the event-loop thread (the net devices that answer the guest). Each
//! holds the lock only for one operation and takes no other lock under it.

pub mod http;
pub mod stack;
pub mod store;
pub mod token;

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Firecracker's default MMDS address.
pub const DEFAULT_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// The MMDS version: V1 (plain GETs) or V2 (session tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Version {
    #[default]
    V1,
    V2,
}

/// How the guest reaches the MMDS (Firecracker's `mmds-config`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmdsConfig {
    pub version: Version,
    /// The net interfaces (by id) whose TX path answers for `ipv4`.
    pub network_interfaces: Vec<String>,
    pub ipv4: Ipv4Addr,
    /// EC2 IMDS compatibility: text/plain listings whatever the `Accept` header.
    pub imds_compat: bool,
}

impl Default for MmdsConfig {
    fn default() -> Self {
        MmdsConfig {
            version: Version::V1,
            network_interfaces: Vec::new(),
            ipv4: DEFAULT_IPV4,
            imds_compat: false,
        }
    }
}

/// What the HTTP layer made of the bytes a guest connection has sent so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// No complete request yet: keep the bytes and wait for more.
    NeedMore,
    /// A complete request (its first `consumed` bytes) and the whole response to send.
    /// With `close` the connection is closed after the response.
    Reply {
        consumed: usize,
        response: Vec<u8>,
        close: bool,
    },
}

/// The metadata service's state: the document, the guest-facing settings and the V2
/// session tokens.
#[derive(Debug, Default)]
pub struct Mmds {
    pub store: store::Store,
    pub version: Version,
    pub imds_compat: bool,
    pub tokens: token::Tokens,
}

/// The MMDS as shared between the API thread and the event-loop thread.
pub type SharedMmds = Arc<Mutex<Mmds>>;

impl Mmds {
    /// Serves the bytes a guest connection has sent so far (see [`Served`]).
    pub fn serve(&mut self, request: &[u8], now: Instant) -> Served {
        http::serve(self, request, now)
    }
}

/// What the MMDS refuses. The texts of the store's refusals are Firecracker's (its API
/// prefixes them, e.g. "MMDS limit exceeded error: "), so clients that match on them
/// keep working; the fields say what was refused for logs and callers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PUT or PATCH whose result would serialize to more than the size limit.
    #[error("The MMDS patch request doesn't fit.")]
    LimitExceeded {
        /// Compact JSON size of the refused document, in bytes.
        size: usize,
        /// The store's limit, in bytes.
        limit: usize,
    },
    /// A PATCH before any successful PUT.
    #[error("The MMDS data store is not initialized.")]
    NotInitialized,
    /// A session token asked for with a lifetime outside Firecracker's range.
    #[error(
        "Invalid time to live value provided for token: {0}. Please provide a value between {min} and {max}.",
        min = token::MIN_TTL_SECONDS,
        max = token::MAX_TTL_SECONDS
    )]
    InvalidTtl(u32),
    /// The OS random source failed while minting a session token.
    #[error("cannot read random bytes for an MMDS session token: {0}")]
    Random(getrandom::Error),
    /// A document file (`--metadata`, `ferrite mmds --put`) that cannot be opened or read.
    #[error("cannot read the MMDS document {path}")]
    ReadMetadata {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A document file that is too long or not JSON.
    #[error("the MMDS document {path} is not valid JSON: {msg}")]
    ParseMetadata { path: String, msg: String },
    /// A native `--mmds` on a VM without network interfaces.
    #[error("--mmds needs a network interface to answer on: add one with --net tap=NAME")]
    NoNet,
    /// A native `--mmds OPTIONS` that does not parse or names a bad address.
    #[error("--mmds {given}: {msg}")]
    Options { given: String, msg: String },
}

/// Firecracker's MMDS addresses: 169.254.0.0/16 less its first and last /24 (RFC 3927
/// reserves them). Both front ends check an address with it.
pub fn address_ok(a: Ipv4Addr) -> bool {
    matches!(a.octets(), [169, 254, x, _] if x != 0 && x != 255)
}

/// The most of a `--metadata` file read: its JSON may be spaced out well beyond the
/// document's compact size, but a path such as /dev/zero must not be read for ever.
pub fn metadata_read_limit(mmds_limit: usize) -> u64 {
    (mmds_limit as u64).saturating_mul(16).max(64 << 20)
}

/// The document of a `--metadata FILE` (both front ends): any JSON value, read up to
/// `max` bytes.
pub fn read_metadata(path: &std::path::Path, max: u64) -> Result<serde_json::Value, Error> {
    use std::io::Read;
    let shown = path.display().to_string();
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut text))
        .map_err(|source| Error::ReadMetadata {
            path: shown.clone(),
            source,
        })?;
    if text.len() as u64 > max {
        return Err(Error::ParseMetadata {
            path: shown,
            msg: format!("it is longer than {max} bytes"),
        });
    }
    serde_json::from_slice(&text).map_err(|e| Error::ParseMetadata {
        path: shown,
        msg: e.to_string(),
    })
}

/// The native `ferrite run --mmds [OPTIONS]`: comma-separated `version=v1|v2`,
/// `address=169.254.X.Y`, `imds-compat[=on|off]` and `net=TAP` (repeatable; without
/// one, every `--net` interface answers). The native default version is V2: its
/// session tokens keep a guest process that can merely be made to send a GET (an
/// open proxy, an SSRF) from reading the metadata, and Firecracker itself marks V1
/// deprecated; the Firecracker front door keeps Firecracker's V1 default.
impl MmdsConfig {
    pub fn parse(s: &str) -> Result<MmdsConfig, Error> {
        let bad = |msg: String| Error::Options {
            given: s.to_owned(),
            msg,
        };
        let mut c = MmdsConfig {
            version: Version::V2,
            ..MmdsConfig::default()
        };
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (part, None),
            };
            match (key, value) {
                ("version", Some(v)) if v.eq_ignore_ascii_case("v1") => c.version = Version::V1,
                ("version", Some(v)) if v.eq_ignore_ascii_case("v2") => c.version = Version::V2,
                ("version", _) => return Err(bad(format!("'{part}': the version is v1 or v2"))),
                ("address", Some(v)) => {
                    let a: Ipv4Addr = v
                        .parse()
                        .map_err(|_| bad(format!("'{v}' is not an IPv4 address")))?;
                    if !address_ok(a) {
                        return Err(bad(format!(
                            "{a} is not link-local: the address is in 169.254.1.0 to \
                             169.254.254.255"
                        )));
                    }
                    c.ipv4 = a;
                }
                ("imds-compat", None | Some("on")) => c.imds_compat = true,
                ("imds-compat", Some("off")) => c.imds_compat = false,
                ("net", Some(t)) if !t.is_empty() => c.network_interfaces.push(t.to_owned()),
                _ => {
                    return Err(bad(format!(
                        "'{part}' is not an option (version=v1|v2, address=IP, \
                         imds-compat[=on|off], net=TAP)"
                    )))
                }
            }
        }
        Ok(c)
    }

    /// The indices of `taps` (the `--net` TAP names, in order) that answer: those named
    /// by `net=`, or all of them. Refused when there is no interface or a name is not
    /// one of them.
    pub fn answering(&self, taps: &[&str]) -> Result<Vec<usize>, Error> {
        let bad = |msg: String| Error::Options {
            given: format!("net={}", self.network_interfaces.join(",net=")),
            msg,
        };
        if taps.is_empty() {
            return Err(Error::NoNet);
        }
        if self.network_interfaces.is_empty() {
            return Ok((0..taps.len()).collect());
        }
        self.network_interfaces
            .iter()
            .map(|n| {
                taps.iter().position(|t| t == n).ok_or_else(|| {
                    bad(format!(
                        "'{n}' is not the TAP of any --net ({})",
                        taps.join(", ")
                    ))
                })
            })
            .collect::<Result<Vec<usize>, Error>>()
            .map(|mut v| {
                v.sort_unstable();
                v.dedup();
                v
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_metadata_file_is_read_up_to_a_bound_and_must_be_json() {
        let dir = std::env::temp_dir().join(format!("ferrite-mmds-meta-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("m.json");
        std::fs::write(&f, r#"{"a": [1, 2]}"#).unwrap();
        assert_eq!(
            read_metadata(&f, 100).unwrap(),
            serde_json::json!({"a": [1, 2]})
        );
        // An endless file is not read to its end.
        let e = read_metadata(Path::new("/dev/zero"), 1000).unwrap_err();
        assert!(e.to_string().contains("longer than 1000 bytes"), "{e}");
        std::fs::write(&f, "{").unwrap();
        let e = read_metadata(&f, 100).unwrap_err().to_string();
        assert!(e.contains("m.json") && e.contains("not valid JSON"), "{e}");
        let e = read_metadata(&dir.join("none.json"), 100).unwrap_err();
        assert!(e.to_string().contains("none.json"), "{e}");
        assert_eq!(metadata_read_limit(51200), 64 << 20);
        assert_eq!(metadata_read_limit(16 << 20), 256 << 20);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn native_mmds_options_parse_with_v2_default_and_refuse_bad_ones() {
        let c = MmdsConfig::parse("").unwrap();
        assert_eq!(
            (c.version, c.ipv4, c.imds_compat),
            (Version::V2, DEFAULT_IPV4, false)
        );
        assert!(c.network_interfaces.is_empty());
        let c = MmdsConfig::parse("version=V1,address=169.254.1.2,imds-compat,net=tap1").unwrap();
        assert_eq!(c.version, Version::V1);
        assert_eq!(c.ipv4, Ipv4Addr::new(169, 254, 1, 2));
        assert!(c.imds_compat);
        assert_eq!(c.network_interfaces, ["tap1"]);
        for bad in [
            "version=v3",
            "address=169.254.0.1",
            "address=169.254.255.1",
            "address=10.0.0.1",
            "address=nope",
            "imds-compat=maybe",
            "net=",
            "colour=red",
        ] {
            let e = MmdsConfig::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--mmds {bad}:")), "{bad}: {e}");
        }
    }

    #[test]
    fn native_mmds_without_a_net_or_on_an_unknown_tap_is_refused() {
        let all = MmdsConfig::parse("").unwrap();
        let e = all.answering(&[]).unwrap_err().to_string();
        assert!(e.contains("--net"), "{e}");
        assert_eq!(all.answering(&["a", "b"]).unwrap(), [0, 1]);
        let one = MmdsConfig::parse("net=b,net=b").unwrap();
        assert_eq!(one.answering(&["a", "b"]).unwrap(), [1]);
        let e = MmdsConfig::parse("net=c")
            .unwrap()
            .answering(&["a"])
            .unwrap_err();
        assert!(e.to_string().contains("'c' is not the TAP"), "{e}");
    }
}
