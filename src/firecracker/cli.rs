//! Firecracker's command line (v1.16.1): the same flags, defaults and refusals, so a
//! tool that starts `firecracker` can start Ferrite. A flag Firecracker does not have is
//! an error (exit status 153, as Firecracker's argument errors).
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

/// Firecracker's default API socket.
pub const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";
/// Firecracker's default instance id.
pub const DEFAULT_INSTANCE_ID: &str = "anonymous-instance";
/// Firecracker's default largest API request body.
pub const DEFAULT_MAX_PAYLOAD: usize = 51200;
/// Firecracker's exit status for a command-line error.
pub const EXIT_ARG_PARSING: i32 = 153;

#[derive(Debug, Parser)]
#[command(
    name = "firecracker",
    about = "Ferrite with Firecracker's command line and API",
    disable_version_flag = true
)]
pub struct Args {
    /// Path to the API socket.
    #[arg(long, default_value = DEFAULT_API_SOCK)]
    pub api_sock: PathBuf,
    /// The microVM's id: 1 to 64 letters, digits and '-'.
    #[arg(long, default_value = DEFAULT_INSTANCE_ID)]
    pub id: String,
    /// A seccomp filter file: refused (Ferrite installs its own per-thread filters).
    #[arg(long, conflicts_with = "no_seccomp")]
    pub seccomp_filter: Option<PathBuf>,
    /// No seccomp filters.
    #[arg(long)]
    pub no_seccomp: bool,
    /// Process start time in wall-clock microseconds (for the boot timer).
    #[arg(long)]
    pub start_time_us: Option<u64>,
    /// Process start time in CPU microseconds (for the boot timer).
    #[arg(long)]
    pub start_time_cpu_us: Option<u64>,
    /// The parent's CPU time in microseconds (for the boot timer).
    #[arg(long)]
    pub parent_cpu_time_us: Option<u64>,
    /// Configure and boot the microVM from this JSON file.
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// A JSON file: the MMDS document at start.
    #[arg(long)]
    pub metadata: Option<PathBuf>,
    /// No API socket (needs --config-file).
    #[arg(long, requires = "config_file")]
    pub no_api: bool,
    /// Where the log goes (a file or FIFO); stdout without it.
    #[arg(long)]
    pub log_path: Option<PathBuf>,
    /// Log level: Error, Warning, Info, Debug, Trace, Off.
    #[arg(long)]
    pub level: Option<String>,
    /// Only this module's log lines.
    #[arg(long)]
    pub module: Option<String>,
    /// Print the level in log lines.
    #[arg(long)]
    pub show_level: bool,
    /// Print the file and line in log lines.
    #[arg(long)]
    pub show_log_origin: bool,
    /// Where metrics go (a file or FIFO).
    #[arg(long)]
    pub metrics_path: Option<PathBuf>,
    /// Log the guest's boot time when it writes the boot-timer marker.
    #[arg(long)]
    pub boot_timer: bool,
    /// Print the version and exit.
    #[arg(long)]
    pub version: bool,
    /// Print the snapshot format version and exit.
    #[arg(long)]
    pub snapshot_version: bool,
    /// Describe a snapshot file (not supported yet).
    #[arg(long)]
    pub describe_snapshot: Option<PathBuf>,
    /// Largest API request body, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_PAYLOAD)]
    pub http_api_max_payload_size: usize,
    /// Largest MMDS document, in bytes of compact JSON (default: the API's largest
    /// request body, --http-api-max-payload-size).
    #[arg(long)]
    pub mmds_size_limit: Option<usize>,
    /// PCIe devices (accepted: Ferrite's devices stay on virtio-mmio).
    #[arg(long)]
    pub enable_pci: bool,
}

/// Parses Firecracker's arguments (`args` includes the program name). `Err` is the
/// message and exit status (`--help` is status 0).
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Args, (String, i32)> {
    let a = Args::try_parse_from(args).map_err(|e| {
        let status = if e.use_stderr() { EXIT_ARG_PARSING } else { 0 };
        (e.render().to_string(), status)
    })?;
    if !valid_id(&a.id) {
        return Err((
            format!(
                "Invalid instance ID {:?}: 1 to 64 letters, digits and '-'",
                a.id
            ),
            EXIT_ARG_PARSING,
        ));
    }
    Ok(a)
}

/// Firecracker's instance ids: 1 to 64 ASCII letters, digits and '-'.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `--version`: Firecracker's first line (Kata parses its second word as the version),
/// then Ferrite's own.
pub fn version_text() -> String {
    format!(
        "Firecracker v{}\n\nFerrite {} (implements the Firecracker v{} API)\n",
        super::api::FIRECRACKER_VERSION,
        env!("CARGO_PKG_VERSION"),
        super::api::FIRECRACKER_VERSION
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Args, (String, i32)> {
        parse(
            std::iter::once("firecracker")
                .chain(args.iter().copied())
                .map(OsString::from),
        )
    }

    #[test]
    fn defaults_are_firecrackers() {
        let a = p(&[]).unwrap();
        assert_eq!(a.api_sock, PathBuf::from("/run/firecracker.socket"));
        assert_eq!(a.id, "anonymous-instance");
        assert_eq!(a.http_api_max_payload_size, 51200);
        assert!(!a.no_api && !a.boot_timer && !a.enable_pci);
    }

    #[test]
    fn an_unknown_flag_or_no_api_without_config_is_status_153() {
        assert_eq!(p(&["--bogus"]).unwrap_err().1, 153);
        assert_eq!(p(&["--no-api"]).unwrap_err().1, 153);
        assert_eq!(
            p(&["--seccomp-filter", "/f", "--no-seccomp"])
                .unwrap_err()
                .1,
            153
        );
        assert_eq!(p(&["--id", "a b"]).unwrap_err().1, 153);
        let a = p(&[
            "--no-api",
            "--config-file",
            "/c.json",
            "--id",
            "01HZXULIDULIDULID",
        ])
        .unwrap();
        assert!(a.no_api);
    }

    #[test]
    fn metadata_and_mmds_size_limit_parse_and_a_bad_limit_is_status_153() {
        let a = p(&["--metadata", "/m.json", "--mmds-size-limit", "4096"]).unwrap();
        assert_eq!(
            (a.metadata, a.mmds_size_limit),
            (Some(PathBuf::from("/m.json")), Some(4096))
        );
        assert_eq!(p(&[]).unwrap().mmds_size_limit, None);
        // Firecracker panics on it (status 134); a flag error here, as the others.
        assert_eq!(p(&["--mmds-size-limit", "abc"]).unwrap_err().1, 153);
    }

    #[test]
    fn version_first_line_is_firecrackers_form() {
        let v = version_text();
        let first = v.lines().next().unwrap();
        let word = first.split_whitespace().nth(1).unwrap();
        assert!(first.starts_with("Firecracker v"), "{first}");
        let semver: Vec<&str> = word.trim_start_matches('v').split('.').collect();
        assert_eq!(semver.len(), 3, "{word}");
        assert!(semver.iter().all(|n| n.parse::<u32>().is_ok()), "{word}");
        assert!(v.contains("Ferrite"), "{v}");
    }
}
