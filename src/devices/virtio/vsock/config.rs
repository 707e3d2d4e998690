//! `--vsock` settings: `cid=N,uds=PATH[,max-connections=N]`.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use super::muxer::DEFAULT_MAX_CONNECTIONS;

/// A virtio-vsock device with Firecracker's host side: host clients connect to `uds`
/// (and write `CONNECT <port>\n`); a guest connecting to the host's port P reaches
/// the UNIX socket `<uds>_P`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 ..= u32::MAX - 1).
    pub cid: u64,
    /// The host side's UNIX socket path.
    pub uds: PathBuf,
    /// Open connections at most; a REQUEST beyond them is answered with RST.
    pub max_connections: usize,
}

const USAGE: &str = "expected cid=N,uds=PATH[,max-connections=N]";

impl VsockConfig {
    pub fn new(cid: u64, uds: PathBuf) -> Result<VsockConfig, String> {
        check_cid(cid)?;
        check_uds(&uds)?;
        Ok(VsockConfig {
            cid,
            uds,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        })
    }

    pub fn parse(s: &str) -> Result<VsockConfig, String> {
        let (mut cid, mut uds, mut max) = (None, None, None);
        for part in s.split(',') {
            let Some((key, value)) = part.split_once('=') else {
                return Err(format!("vsock option {part:?} is not key=value ({USAGE})"));
            };
            let dup = |k: &str| format!("vsock option {k}= given twice");
            match key {
                "cid" => {
                    let v: u64 = value
                        .parse()
                        .map_err(|_| format!("cid={value:?}: not a number ({USAGE})"))?;
                    if cid.replace(v).is_some() {
                        return Err(dup(key));
                    }
                }
                "uds" => {
                    if uds.replace(PathBuf::from(value)).is_some() {
                        return Err(dup(key));
                    }
                }
                "max-connections" => {
                    let v: usize = value.parse().map_err(|_| {
                        format!("max-connections={value:?}: not a number ({USAGE})")
                    })?;
                    if v == 0 {
                        return Err("max-connections=0: at least one connection".into());
                    }
                    if max.replace(v).is_some() {
                        return Err(dup(key));
                    }
                }
                _ => return Err(format!("unknown vsock option {key:?} ({USAGE})")),
            }
        }
        let cid = cid.ok_or_else(|| format!("cid=N is required ({USAGE})"))?;
        let uds = uds.ok_or_else(|| format!("uds=PATH is required ({USAGE})"))?;
        let mut cfg = VsockConfig::new(cid, uds)?;
        if let Some(m) = max {
            cfg.max_connections = m;
        }
        Ok(cfg)
    }
}

fn check_cid(cid: u64) -> Result<(), String> {
    if (3..u64::from(u32::MAX)).contains(&cid) {
        Ok(())
    } else {
        Err(format!(
            "cid={cid}: a guest's context id is 3 to {} (0-2 are reserved)",
            u32::MAX - 1
        ))
    }
}

/// A UNIX socket path must fit `sockaddr_un.sun_path` with room for the `_PORT`
/// suffix of guest-initiated connections (`_4294967295`).
fn check_uds(uds: &std::path::Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let len = uds.as_os_str().as_bytes().len();
    if len == 0 {
        return Err("uds=: an empty path".into());
    }
    if uds.as_os_str().as_bytes().contains(&0) {
        return Err(format!("uds={}: a NUL byte in the path", uds.display()));
    }
    // sun_path is 108 bytes with its NUL; "_" and up to 10 digits follow the path.
    const MAX: usize = 107 - 11;
    if len > MAX {
        return Err(format!(
            "uds={}: {len} bytes, at most {MAX} (a UNIX socket path, plus _PORT)",
            uds.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let c = VsockConfig::parse("cid=3,uds=/tmp/v.sock").unwrap();
        assert_eq!(c.cid, 3);
        assert_eq!(c.uds, PathBuf::from("/tmp/v.sock"));
        assert_eq!(c.max_connections, DEFAULT_MAX_CONNECTIONS);
        let c = VsockConfig::parse("uds=/a,cid=99,max-connections=7").unwrap();
        assert_eq!((c.cid, c.max_connections), (99, 7));
        for bad in [
            "",
            "cid=3",
            "uds=/a",
            "cid=2,uds=/a",
            "cid=4294967295,uds=/a",
            "cid=x,uds=/a",
            "cid=3,uds=/a,max-connections=0",
            "cid=3,uds=/a,cid=4",
            "cid=3,uds=/a,port=1",
            "cid=3,uds=",
        ] {
            assert!(VsockConfig::parse(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("cid=3,uds=/{}", "a".repeat(120));
        assert!(VsockConfig::parse(&long).unwrap_err().contains("at most"));
    }
}
