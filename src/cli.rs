//! Command-line interface: argument parsing, logging, and mapping results to exit codes.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::vm::{self, VmConfig};

#[derive(Debug, Parser)]
#[command(
    name = "ferrite",
    version,
    about = "A small, fast virtual machine monitor for Linux/KVM"
)]
pub struct Cli {
    /// Log level: error, warn, info, debug, trace (also FERRITE_LOG).
    #[arg(long, global = true, env = "FERRITE_LOG", default_value = "warn", value_parser = parse_level)]
    pub log_level: log::LevelFilter,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest and run it until it stops.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Guest image: Linux bzImage or vmlinux, a 64-bit ELF, or a flat binary
    /// (detected from the file).
    #[arg(long, short = 'k')]
    pub kernel: PathBuf,
    /// Initial ramdisk for a Linux kernel.
    #[arg(long, short = 'i')]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=-1"].
    #[arg(long)]
    pub cmdline: Option<String>,
    /// CPUID features to hide from the guest, e.g. "-x2apic,-cx16".
    #[arg(long, allow_hyphen_values = true, value_parser = parse_cpu_features, default_value = "")]
    pub cpu_features: HiddenFeatures,
    /// Guest memory: MiB, or a size with a K, M, G or T suffix (e.g. 16M, 1G).
    #[arg(long, short = 'm', default_value = "128", value_parser = parse_mem_size)]
    pub mem: u64,
    /// Number of vCPUs.
    #[arg(long, short = 'c', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub cpus: u32,
    /// KVM device node.
    #[arg(long, default_value = "/dev/kvm")]
    pub kvm_device: PathBuf,
    /// Add the debug-exit port (0xf4, as QEMU's isa-debug-exit): a guest write of v
    /// (0 to 95) ends the VM with exit status 32 + v.
    #[arg(long)]
    pub debug_exit: bool,
}

/// The parsed `--cpu-features` list (a newtype so clap treats it as one value).
#[derive(Debug, Clone)]
pub struct HiddenFeatures(pub Vec<crate::arch::x86_64::cpuid::Feature>);

fn parse_cpu_features(s: &str) -> Result<HiddenFeatures, String> {
    crate::arch::x86_64::cpuid::parse_hidden(s)
        .map(HiddenFeatures)
        .map_err(|e| e.to_string())
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("'{s}' is not a log level (off, error, warn, info, debug, trace)"))
}

/// Parses `--mem`: a plain number is MiB; K/M/G/T suffixes (optionally followed by
/// `iB` or `B`) are binary multiples.
pub fn parse_mem_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!("'{s}' is not a size (expected e.g. 128, 16M, 1G)"));
    }
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is too large"))?;
    let shift = match suffix
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" | "M" => 20,
        "K" => 10,
        "G" => 30,
        "T" => 40,
        _ => {
            return Err(format!(
                "'{s}' has an unknown size suffix '{suffix}' (use K, M, G or T)"
            ))
        }
    };
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))?;
    if bytes < crate::memory::MIN_MEM_SIZE {
        return Err(format!("'{s}' is below the minimum guest memory of 1 MiB"));
    }
    if bytes > crate::memory::MAX_MEM_SIZE {
        return Err(format!("'{s}' is above the maximum guest memory of 1 TiB"));
    }
    Ok(bytes)
}

struct StderrLogger(log::LevelFilter);

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.0
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            // A terminal in raw mode needs the carriage return spelled out.
            let _ = write!(
                std::io::stderr(),
                "ferrite: {}: {}\r\n",
                r.level(),
                r.args()
            );
        }
    }
    fn flush(&self) {}
}

fn init_logging(level: log::LevelFilter) {
    let logger = Box::leak(Box::new(StderrLogger(level)));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

/// Full error chain on one line: "what failed: because: because".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

/// Runs the CLI and returns the process exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    init_logging(cli.log_level);
    match cli.command {
        Command::Run(args) => {
            let cfg = VmConfig {
                kernel: args.kernel,
                initrd: args.initrd,
                cmdline: args.cmdline,
                hidden_features: args.cpu_features.0,
                mem_size: args.mem,
                vcpus: args.cpus as usize,
                kvm_device: args.kvm_device,
                debug_exit: args.debug_exit,
            };
            match vm::run(&cfg) {
                Ok(outcome) => {
                    let status = outcome.exit_status();
                    if status == 0 {
                        log::info!("stopped: {outcome}");
                    } else {
                        eprintln!("ferrite: {outcome} (exit status {status})");
                    }
                    status
                }
                Err(e) => {
                    eprintln!("ferrite: error: {}", error_chain(&e));
                    1
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_sizes() {
        assert_eq!(parse_mem_size("128").unwrap(), 128 << 20);
        assert_eq!(parse_mem_size("16M").unwrap(), 16 << 20);
        assert_eq!(parse_mem_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_mem_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_mem_size("2048k").unwrap(), 2 << 20);
        for bad in [
            "0",
            "",
            "M",
            "12Q",
            "-1",
            "99999999999999999999",
            "2000T",
            "512K",
        ] {
            assert!(parse_mem_size(bad).is_err(), "{bad}");
        }
    }
}
