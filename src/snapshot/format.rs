//! The state file of a snapshot (`DIR/state`): a fixed header, then the payload.
//!
//! | bytes | what |
//! |---|---|
//! | 8 | magic `FERRSNAP` |
//! | 4 | format version, little-endian u32 ([`FORMAT_VERSION`]) |
//! | 2 | length of the Ferrite version string, little-endian u16 |
//! | n | the Ferrite version that wrote it (`CARGO_PKG_VERSION`, UTF-8) |
//! | 8 | payload length in bytes, little-endian u64 |
//! | 8 | CRC-64 (ECMA) of the payload, little-endian u64 |
//! | length | the payload: the [`super::Snapshot`] as JSON |
//!
//! Reading checks, in this order, and stops at the first difference: the magic, the
//! format version, the length (a truncated or overlong file), the checksum, the JSON.
//! The Ferrite version is only reported: the format version decides compatibility.
#![forbid(unsafe_code)]

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// First bytes of every state file.
pub const MAGIC: [u8; 8] = *b"FERRSNAP";
/// Bumped whenever the payload's meaning changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;
/// The Ferrite that writes state files.
pub const FERRITE_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read snapshot state file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write snapshot state file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a Ferrite snapshot state file (it starts with {found:02x?}, not \"FERRSNAP\")")]
    NotASnapshot { path: PathBuf, found: Vec<u8> },
    #[error(
        "{path} is snapshot format version {found} (written by Ferrite {written_by}); this \
         Ferrite ({FERRITE_VERSION}) reads format version {FORMAT_VERSION} only"
    )]
    FormatVersion {
        path: PathBuf,
        found: u32,
        written_by: String,
    },
    #[error("{path} is truncated: its {what} needs {expected} bytes, the file has {got}")]
    Truncated {
        path: PathBuf,
        what: &'static str,
        expected: u64,
        got: u64,
    },
    #[error(
        "{path} is corrupt: {extra} bytes follow the {expected}-byte payload its header declares"
    )]
    TrailingBytes {
        path: PathBuf,
        expected: u64,
        extra: u64,
    },
    #[error(
        "{path} is corrupt: its payload's checksum is {computed:#018x}, the header says \
         {stored:#018x}"
    )]
    Checksum {
        path: PathBuf,
        stored: u64,
        computed: u64,
    },
    #[error("{path}: the snapshot state (written by Ferrite {written_by}) does not parse")]
    Parse {
        path: PathBuf,
        written_by: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode the snapshot state")]
    Encode(#[source] serde_json::Error),
}

/// The CRC-64 (ECMA-182) of `data`.
pub fn checksum(data: &[u8]) -> u64 {
    crc64::crc64(0, data)
}

/// The whole state file for `value`.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    let payload = serde_json::to_vec(value).map_err(Error::Encode)?;
    let version = FERRITE_VERSION.as_bytes();
    let mut out = Vec::with_capacity(payload.len() + 64);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    // CARGO_PKG_VERSION is far below 64 KiB.
    out.extend_from_slice(&(version.len() as u16).to_le_bytes());
    out.extend_from_slice(version);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&checksum(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Reads a header field of `N` bytes at `*at`, or says the file is truncated there.
fn take<'a>(
    path: &Path,
    bytes: &'a [u8],
    at: &mut usize,
    n: usize,
    what: &'static str,
) -> Result<&'a [u8], Error> {
    let end = *at + n;
    if bytes.len() < end {
        return Err(Error::Truncated {
            path: path.to_path_buf(),
            what,
            expected: end as u64,
            got: bytes.len() as u64,
        });
    }
    let field = &bytes[*at..end];
    *at = end;
    Ok(field)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

/// Decodes a state file read from `path` (named in the errors).
pub fn decode<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, Error> {
    let p = || path.to_path_buf();
    let magic = &bytes[..bytes.len().min(MAGIC.len())];
    if magic != MAGIC {
        return Err(Error::NotASnapshot {
            path: p(),
            found: magic.to_vec(),
        });
    }
    let mut at = MAGIC.len();
    let v = take(path, bytes, &mut at, 4, "header")?;
    let found = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
    let n = take(path, bytes, &mut at, 2, "header")?;
    let n = usize::from(u16::from_le_bytes([n[0], n[1]]));
    let written_by = String::from_utf8_lossy(take(path, bytes, &mut at, n, "header")?).into_owned();
    if found != FORMAT_VERSION {
        return Err(Error::FormatVersion {
            path: p(),
            found,
            written_by,
        });
    }
    let len = le_u64(take(path, bytes, &mut at, 8, "header")?);
    let stored = le_u64(take(path, bytes, &mut at, 8, "header")?);
    let rest = (bytes.len() - at) as u64;
    if rest < len {
        return Err(Error::Truncated {
            path: p(),
            what: "payload",
            expected: at as u64 + len,
            got: bytes.len() as u64,
        });
    }
    if rest > len {
        return Err(Error::TrailingBytes {
            path: p(),
            expected: len,
            extra: rest - len,
        });
    }
    let payload = &bytes[at..];
    let computed = checksum(payload);
    if computed != stored {
        return Err(Error::Checksum {
            path: p(),
            stored,
            computed,
        });
    }
    serde_json::from_slice(payload).map_err(|source| Error::Parse {
        path: p(),
        written_by,
        source,
    })
}

/// Reads and checks the state file at `path`.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    decode(path, &bytes)
}

/// Writes `value` as the state file `path`, atomically: into a temporary file beside
/// it (synced), renamed over `path`, the directory synced. A crash leaves either no
/// state file or a whole one (and perhaps the temporary file). Returns the file's size.
pub fn write<T: Serialize>(path: &Path, value: &T) -> Result<u64, Error> {
    let bytes = encode(value)?;
    let err = |source| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        // Mode 0600 as the memory file: registers and device state are the guest's.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_data()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        // Only the file this call created (create_new refused an existing one).
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            let _ = std::fs::remove_file(&tmp);
        }
        return Err(err(e));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        vcpus: usize,
        name: String,
    }

    fn sample() -> Sample {
        Sample {
            vcpus: 2,
            name: "vm1".into(),
        }
    }

    fn path() -> &'static Path {
        Path::new("/snap/state")
    }

    #[test]
    fn state_file_round_trips() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(decode::<Sample>(path(), &bytes).unwrap(), sample());
    }

    #[test]
    fn wrong_magic_is_not_a_snapshot() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[0] = b'X';
        let e = decode::<Sample>(path(), &bytes).unwrap_err();
        assert!(matches!(e, Error::NotASnapshot { .. }), "{e}");
        assert!(e.to_string().contains("not a Ferrite snapshot"), "{e}");
        // An empty or short file too.
        let e = decode::<Sample>(path(), b"FERR").unwrap_err();
        assert!(matches!(e, Error::NotASnapshot { .. }), "{e}");
    }

    #[test]
    fn other_format_version_names_both_versions() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
        let e = decode::<Sample>(path(), &bytes).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::FormatVersion { found: 7, .. }), "{msg}");
        assert!(msg.contains("format version 7"), "{msg}");
        assert!(
            msg.contains(&format!("format version {FORMAT_VERSION} only")),
            "{msg}"
        );
        assert!(msg.contains(FERRITE_VERSION), "{msg}");
    }

    #[test]
    fn truncated_file_says_expected_and_got_bytes() {
        let bytes = encode(&sample()).unwrap();
        let cut = &bytes[..bytes.len() - 5];
        let e = decode::<Sample>(path(), cut).unwrap_err();
        match &e {
            Error::Truncated { expected, got, .. } => {
                assert_eq!(*expected, bytes.len() as u64);
                assert_eq!(*got, cut.len() as u64);
            }
            other => panic!("{other}"),
        }
        // Cut inside the header.
        let e = decode::<Sample>(path(), &bytes[..13]).unwrap_err();
        assert!(matches!(e, Error::Truncated { what: "header", .. }), "{e}");
    }

    #[test]
    fn flipped_payload_byte_is_a_checksum_mismatch() {
        let mut bytes = encode(&sample()).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x01;
        let e = decode::<Sample>(path(), &bytes).unwrap_err();
        assert!(matches!(e, Error::Checksum { .. }), "{e}");
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    #[test]
    fn appended_bytes_are_refused() {
        let mut bytes = encode(&sample()).unwrap();
        bytes.extend_from_slice(b"junk");
        let e = decode::<Sample>(path(), &bytes).unwrap_err();
        assert!(matches!(e, Error::TrailingBytes { extra: 4, .. }), "{e}");
    }

    #[test]
    fn payload_that_does_not_parse_is_refused_after_the_checksum() {
        // A well-formed file whose payload is not a `Sample`.
        let bytes = encode(&serde_json::json!({"vcpus": "two"})).unwrap();
        let e = decode::<Sample>(path(), &bytes).unwrap_err();
        assert!(matches!(e, Error::Parse { .. }), "{e}");
    }

    #[test]
    fn write_replaces_atomically_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("ferrite-fmt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("state");
        write(&p, &sample()).unwrap();
        assert_eq!(read::<Sample>(&p).unwrap(), sample());
        assert!(!dir.join("state.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
