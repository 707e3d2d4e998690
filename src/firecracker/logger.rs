//! Firecracker-format logging: the `log::Log` Ferrite installs instead of its own
//! stderr logger when it runs as `firecracker`, configured from the command line
//! (`--log-path`, `--level`, `--show-level`, `--show-log-origin`, `--module`) or by
//! `PUT /logger` with a [`LoggerConfig`].
//!
//! What Firecracker does, and so what this does:
//! * A line is `<local time> [<instance id>:<thread name>(:<LEVEL>)(:<file>:<line>)] <message>`;
//!   the time is `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn` in local time, the level is spelled as
//!   the `log` crate prints it (`ERROR`, `WARN`, `INFO`, `DEBUG`, `TRACE`), a thread
//!   without a name is `-`, and an unknown origin is `?`.
//! * Until a `log_path` is given, lines go to stdout (interleaved with the guest console).
//! * The level is `Info` until configured, and every configuration sets it again: a
//!   configuration without `level` puts it back to `Info`. The other settings keep their
//!   value when a configuration leaves them out. Level names are case-insensitive and
//!   `Warn` is accepted beside `Warning`.
//! * `module` keeps only records whose module path starts with it.
//! * The destination is opened read-write, non-blocking, created if missing, so a FIFO
//!   with no reader yet opens at once (this process holds a read end, so writes never
//!   see `EPIPE`; they fill the pipe and then would block). Ferrite also opens it
//!   append-only, so an existing file is added to rather than overwritten from its start.
//! * A line that cannot be written is dropped and counted in the metrics'
//!   `logger.missed_log_count`; logging never blocks the thread that logs (stdout, before
//!   configuration, is written as Firecracker does: blocking).
//!
//! A line is written whole or not at all: a pipe that takes only part of a line keeps
//! the rest in [`Sink`], which finishes it before anything else is written, so a reader
//! never sees two lines mixed.
#![allow(unsafe_code)]

use std::fmt::Write as _;

use std::io::{self, IsTerminal, Write};

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::metrics::METRICS;
pub use super::sink::{Sink, Written};

/// The instance id in log lines when `--id` is not given.
pub const DEFAULT_INSTANCE_ID: &str = "anonymous-instance";
/// The level before any configuration, and after one without `level`.
pub const DEFAULT_LEVEL: log::LevelFilter = log::LevelFilter::Info;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the log destination {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot install the Firecracker logger: another logger is already installed")]
    AlreadyInstalled,
    #[error("'{0}' is not a log level (Error, Warning, Info, Debug, Trace, Off)")]
    BadLevel(String),
}

/// The body of `PUT /logger` (Firecracker's field names; unknown fields are refused).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// A file or FIFO for the log lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    /// The most verbose level written; `None` means [`DEFAULT_LEVEL`].
    #[serde(
        default,
        deserialize_with = "de_level",
        serialize_with = "ser_level",
        skip_serializing_if = "Option::is_none"
    )]
    pub level: Option<log::LevelFilter>,
    /// Whether lines show their level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Whether lines show the file and line that logged them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only records whose module path starts with this are written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// Firecracker's name of a level (`GET /vm/config`).
pub fn level_name(l: log::LevelFilter) -> &'static str {
    match l {
        log::LevelFilter::Off => "Off",
        log::LevelFilter::Error => "Error",
        log::LevelFilter::Warn => "Warning",
        log::LevelFilter::Info => "Info",
        log::LevelFilter::Debug => "Debug",
        log::LevelFilter::Trace => "Trace",
    }
}

fn ser_level<S: Serializer>(l: &Option<log::LevelFilter>, s: S) -> Result<S::Ok, S::Error> {
    match l {
        Some(l) => s.serialize_str(level_name(*l)),
        None => s.serialize_none(),
    }
}

/// Parses a level name as Firecracker accepts it: `Error`, `Warning` (or `Warn`),
/// `Info`, `Debug`, `Trace`, `Off`, in any case.
pub fn parse_level(s: &str) -> Result<log::LevelFilter, Error> {
    match s.to_ascii_lowercase().as_str() {
        "off" => Ok(log::LevelFilter::Off),
        "error" => Ok(log::LevelFilter::Error),
        "warn" | "warning" => Ok(log::LevelFilter::Warn),
        "info" => Ok(log::LevelFilter::Info),
        "debug" => Ok(log::LevelFilter::Debug),
        "trace" => Ok(log::LevelFilter::Trace),
        _ => Err(Error::BadLevel(s.to_string())),
    }
}

fn de_level<'de, D: Deserializer<'de>>(d: D) -> Result<Option<log::LevelFilter>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| parse_level(&s).map_err(serde::de::Error::custom))
        .transpose()
}

struct State {
    /// `None`: stdout.
    sink: Option<Sink>,
    show_level: bool,
    show_log_origin: bool,
    module: Option<String>,
    /// `None`: [`DEFAULT_INSTANCE_ID`].
    instance_id: Option<String>,
}

/// The Firecracker-format logger. [`LOGGER`] is the one [`install`] makes global; tests
/// make their own.
pub struct FcLogger {
    /// A `log::LevelFilter` as usize (Off = 0 … Trace = 5).
    level: AtomicUsize,
    state: Mutex<State>,
    /// Lines this logger could not write.
    dropped: AtomicU64,
}

impl Default for FcLogger {
    fn default() -> Self {
        Self::new()
    }
}

impl FcLogger {
    pub const fn new() -> Self {
        Self {
            level: AtomicUsize::new(DEFAULT_LEVEL as usize),
            state: Mutex::new(State {
                sink: None,
                show_level: false,
                show_log_origin: false,
                module: None,
                instance_id: None,
            }),
            dropped: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state whole (plain fields).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the instance id shown in every line (Firecracker's `--id`).
    pub fn set_instance_id(&self, id: &str) {
        self.lock().instance_id = Some(id.to_string());
    }

    /// Applies a configuration: opens `log_path` first (nothing changes if that fails),
    /// then sets the level (to [`DEFAULT_LEVEL`] when absent) and whatever else is given.
    pub fn apply(&self, cfg: &LoggerConfig) -> Result<(), Error> {
        let sink = cfg
            .log_path
            .as_deref()
            .map(|path| {
                Sink::open(path).map_err(|source| Error::Open {
                    path: path.to_path_buf(),
                    source,
                })
            })
            .transpose()?;
        let mut st = self.lock();
        if let Some(sink) = sink {
            st.sink = Some(sink);
        }
        if let Some(v) = cfg.show_level {
            st.show_level = v;
        }
        if let Some(v) = cfg.show_log_origin {
            st.show_log_origin = v;
        }
        if let Some(m) = &cfg.module {
            st.module = Some(m.clone());
        }
        self.level.store(
            cfg.level.unwrap_or(DEFAULT_LEVEL) as usize,
            Ordering::Relaxed,
        );
        Ok(())
    }

    /// The most verbose level written.
    pub fn level(&self) -> log::LevelFilter {
        match self.level.load(Ordering::Relaxed) {
            0 => log::LevelFilter::Off,
            1 => log::LevelFilter::Error,
            2 => log::LevelFilter::Warn,
            3 => log::LevelFilter::Info,
            4 => log::LevelFilter::Debug,
            _ => log::LevelFilter::Trace,
        }
    }

    /// Lines this logger could not write.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        METRICS.logger.missed_log_count.inc();
    }
}

/// One log line, end included.
fn format_line(
    time: &str,
    instance_id: &str,
    thread: &str,
    level: Option<log::Level>,
    origin: Option<(Option<&str>, Option<u32>)>,
    args: &std::fmt::Arguments<'_>,
    eol: &str,
) -> String {
    let mut s = String::with_capacity(96);
    // Writing to a String cannot fail.
    let _ = write!(s, "{time} [{instance_id}:{thread}");
    if let Some(level) = level {
        let _ = write!(s, ":{level}");
    }
    if let Some((file, line)) = origin {
        let _ = write!(s, ":{}:", file.unwrap_or("?"));
        match line {
            Some(l) => {
                let _ = write!(s, "{l}");
            }
            None => s.push('?'),
        }
    }
    let _ = write!(s, "] {args}{eol}");
    s
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn` in local time (seconds since the epoch if the
/// time cannot be broken down).
pub fn local_timestamp(now: SystemTime) -> String {
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let Ok(secs) = libc::time_t::try_from(d.as_secs()) else {
        return format!("{}.{:09}", d.as_secs(), d.subsec_nanos());
    };
    let mut tm = libc::tm {
        tm_sec: 0,
        tm_min: 0,
        tm_hour: 0,
        tm_mday: 0,
        tm_mon: 0,
        tm_year: 0,
        tm_wday: 0,
        tm_yday: 0,
        tm_isdst: 0,
        tm_gmtoff: 0,
        tm_zone: std::ptr::null(),
    };
    // SAFETY: localtime_r reads the time_t and writes only the tm it is given; both
    // are live locals. It is the thread-safe variant (no shared static result).
    let r = unsafe { libc::localtime_r(&secs, &mut tm) };
    if r.is_null() {
        return format!("{}.{:09}", d.as_secs(), d.subsec_nanos());
    }
    format!(
        "{}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        d.subsec_nanos()
    )
}

fn stdout_line_end() -> &'static str {
    // A terminal in raw mode (Ferrite's console) needs the carriage return spelled out.
    static EOL: OnceLock<&'static str> = OnceLock::new();
    EOL.get_or_init(|| {
        if io::stdout().is_terminal() {
            "\r\n"
        } else {
            "\n"
        }
    })
}

impl log::Log for FcLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut st = self.lock();
        if let Some(m) = &st.module {
            if !record
                .module_path()
                .is_some_and(|p| p.starts_with(m.as_str()))
            {
                return;
            }
        }
        let thread = std::thread::current();
        let line = format_line(
            &local_timestamp(SystemTime::now()),
            st.instance_id.as_deref().unwrap_or(DEFAULT_INSTANCE_ID),
            thread.name().unwrap_or("-"),
            st.show_level.then(|| record.level()),
            st.show_log_origin.then(|| (record.file(), record.line())),
            record.args(),
            if st.sink.is_some() {
                "\n"
            } else {
                stdout_line_end()
            },
        );
        let written = match st.sink.as_mut() {
            Some(sink) => matches!(sink.write_line(line.as_bytes()), Ok(Written::Line)),
            None => {
                drop(st);
                io::stdout().lock().write_all(line.as_bytes()).is_ok()
            }
        };
        if !written {
            self.count_dropped();
        }
    }

    fn flush(&self) {}
}

/// The logger [`install`] makes global.
pub static LOGGER: FcLogger = FcLogger::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Makes [`LOGGER`] the process's logger (in place of `cli`'s stderr logger, which must
/// then not be installed), with `instance_id` in its lines and level [`DEFAULT_LEVEL`].
pub fn install(instance_id: &str) -> Result<(), Error> {
    log::set_logger(&LOGGER).map_err(|_| Error::AlreadyInstalled)?;
    LOGGER.set_instance_id(instance_id);
    INSTALLED.store(true, Ordering::SeqCst);
    log::set_max_level(LOGGER.level());
    Ok(())
}

/// Applies `cfg` to [`LOGGER`] (see [`FcLogger::apply`]); when it is installed, the
/// `log` crate's maximum level follows.
pub fn apply(cfg: &LoggerConfig) -> Result<(), Error> {
    LOGGER.apply(cfg)?;
    if INSTALLED.load(Ordering::SeqCst) {
        log::set_max_level(LOGGER.level());
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::fs::File;
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::FileTypeExt;
    use std::path::Path;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    use log::Log;

    use super::*;

    /// A fresh directory of the test's own, removed on drop.
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new() -> io::Result<Self> {
            static N: AtomicUsize = AtomicUsize::new(0);
            let d = std::env::temp_dir().join(format!(
                "ferrite-fc-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir(&d)?;
            Ok(Self(d))
        }

        pub(crate) fn as_path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mkfifo(dir: &TempDir, name: &str) -> PathBuf {
        let path = dir.as_path().join(name);
        let st = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(st.success());
        assert!(std::fs::metadata(&path).unwrap().file_type().is_fifo());
        path
    }

    fn record_at(logger: &FcLogger, level: log::Level, module: &str, msg: &str) {
        logger.log(
            &log::Record::builder()
                .args(format_args!("{msg}"))
                .level(level)
                .module_path(Some(module))
                .file(Some("src/firecracker/x.rs"))
                .line(Some(42))
                .build(),
        );
    }

    fn record(logger: &FcLogger, level: log::Level, msg: &str) {
        record_at(logger, level, "ferrite::firecracker", msg);
    }

    fn to_file(dir: &TempDir, cfg: LoggerConfig) -> (FcLogger, PathBuf) {
        let path = dir.as_path().join("log");
        let logger = FcLogger::new();
        logger
            .apply(&LoggerConfig {
                log_path: Some(path.clone()),
                ..cfg
            })
            .unwrap();
        (logger, path)
    }

    /// Splits a line into its timestamp and the rest, checking the timestamp's shape.
    fn split_time(line: &str) -> (&str, &str) {
        let (time, rest) = line.split_once(' ').unwrap();
        let b = time.as_bytes();
        assert_eq!(time.len(), 29, "{time}");
        for (i, c) in b.iter().enumerate() {
            match i {
                4 | 7 => assert_eq!(*c, b'-', "{time}"),
                10 => assert_eq!(*c, b'T', "{time}"),
                13 | 16 => assert_eq!(*c, b':', "{time}"),
                19 => assert_eq!(*c, b'.', "{time}"),
                _ => assert!(c.is_ascii_digit(), "{time}"),
            }
        }
        (time, rest)
    }

    #[test]
    fn fifo_without_reader_neither_blocks_nor_fails_and_counts_drops() {
        let dir = TempDir::new().unwrap();
        let fifo = mkfifo(&dir, "log.fifo");
        let logger = FcLogger::new();
        logger
            .apply(&LoggerConfig {
                log_path: Some(fifo),
                ..Default::default()
            })
            .unwrap();
        let before = METRICS.logger.missed_log_count.count();
        // 4000 lines of ~100 bytes: several times a 64 KiB pipe.
        let msg = "x".repeat(60);
        let start = Instant::now();
        for _ in 0..4000 {
            record(&logger, log::Level::Error, &msg);
        }
        assert!(start.elapsed() < Duration::from_secs(20));
        assert!(logger.dropped() > 0, "nothing was dropped");
        assert!(logger.dropped() < 4000, "nothing was written");
        assert!(METRICS.logger.missed_log_count.count() - before >= logger.dropped());
    }

    #[test]
    fn fifo_with_reader_gets_whole_lines_in_firecracker_format() {
        let dir = TempDir::new().unwrap();
        let fifo = mkfifo(&dir, "log.fifo");
        let logger = FcLogger::new();
        logger.set_instance_id("vm-7");
        logger
            .apply(&LoggerConfig {
                log_path: Some(fifo.clone()),
                level: Some(log::LevelFilter::Debug),
                show_level: Some(true),
                show_log_origin: Some(true),
                module: None,
            })
            .unwrap();
        // The logger holds a write end, so this open does not wait.
        let reader = BufReader::new(File::open(&fifo).unwrap());
        let t = std::thread::Builder::new()
            .name("fc_test".into())
            .spawn(move || {
                record(&logger, log::Level::Warn, "first");
                record(&logger, log::Level::Debug, "second");
                logger.apply(&LoggerConfig::default()).unwrap();
                // Level back to Info, the rest kept.
                record(&logger, log::Level::Debug, "hidden");
                record(&logger, log::Level::Info, "third");
            })
            .unwrap();
        t.join().unwrap();
        let mut lines = reader.lines();
        let mut next = || lines.next().unwrap().unwrap();
        let l = next();
        assert_eq!(
            split_time(&l).1,
            "[vm-7:fc_test:WARN:src/firecracker/x.rs:42] first"
        );
        let l = next();
        assert_eq!(
            split_time(&l).1,
            "[vm-7:fc_test:DEBUG:src/firecracker/x.rs:42] second"
        );
        let l = next();
        assert_eq!(
            split_time(&l).1,
            "[vm-7:fc_test:INFO:src/firecracker/x.rs:42] third"
        );
    }

    #[test]
    fn plain_line_has_no_level_or_origin_and_default_instance() {
        let dir = TempDir::new().unwrap();
        let (logger, path) = to_file(&dir, LoggerConfig::default());
        let name = std::thread::current().name().unwrap_or("-").to_string();
        record(&logger, log::Level::Info, "hello");
        let text = std::fs::read_to_string(path).unwrap();
        assert_eq!(
            split_time(&text).1,
            format!("[{DEFAULT_INSTANCE_ID}:{name}] hello\n")
        );
    }

    #[test]
    fn level_filters_records_below_it() {
        let dir = TempDir::new().unwrap();
        let (logger, path) = to_file(
            &dir,
            LoggerConfig {
                level: Some(log::LevelFilter::Warn),
                ..Default::default()
            },
        );
        record(&logger, log::Level::Info, "info");
        record(&logger, log::Level::Debug, "debug");
        record(&logger, log::Level::Warn, "warn");
        record(&logger, log::Level::Error, "error");
        let text = std::fs::read_to_string(&path).unwrap();
        let msgs: Vec<&str> = text
            .lines()
            .map(|l| l.rsplit(' ').next().unwrap())
            .collect();
        assert_eq!(msgs, ["warn", "error"]);
        logger
            .apply(&LoggerConfig {
                level: Some(log::LevelFilter::Off),
                ..Default::default()
            })
            .unwrap();
        record(&logger, log::Level::Error, "off");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }

    #[test]
    fn module_filter_keeps_only_that_module() {
        let dir = TempDir::new().unwrap();
        let (logger, path) = to_file(
            &dir,
            LoggerConfig {
                module: Some("ferrite::devices".into()),
                ..Default::default()
            },
        );
        record_at(
            &logger,
            log::Level::Info,
            "ferrite::devices::serial",
            "kept",
        );
        record_at(&logger, log::Level::Info, "ferrite::vcpu", "gone");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(text.ends_with("] kept\n"), "{text}");
    }

    #[test]
    fn existing_file_is_appended_to() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("log");
        std::fs::write(&path, "earlier\n").unwrap();
        let (logger, path) = to_file(&dir, LoggerConfig::default());
        record(&logger, log::Level::Info, "later");
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.starts_with("earlier\n"), "{text}");
        assert!(text.ends_with("] later\n"), "{text}");
    }

    #[test]
    fn unknown_field_in_logger_config_is_refused() {
        let e =
            serde_json::from_str::<LoggerConfig>(r#"{"log_path":"x","colour":true}"#).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn level_names_are_firecrackers_in_any_case() {
        for (name, want) in [
            ("Error", log::LevelFilter::Error),
            ("WARNING", log::LevelFilter::Warn),
            ("warn", log::LevelFilter::Warn),
            ("Info", log::LevelFilter::Info),
            ("dEbUg", log::LevelFilter::Debug),
            ("Trace", log::LevelFilter::Trace),
            ("Off", log::LevelFilter::Off),
        ] {
            let cfg: LoggerConfig =
                serde_json::from_str(&format!(r#"{{"level":"{name}"}}"#)).unwrap();
            assert_eq!(cfg.level, Some(want), "{name}");
        }
        assert!(serde_json::from_str::<LoggerConfig>(r#"{"level":"verbose"}"#).is_err());
        let cfg: LoggerConfig = serde_json::from_str(
            r#"{"log_path":"/tmp/l","level":null,"show_level":true,"show_log_origin":false,"module":"m"}"#,
        )
        .unwrap();
        assert_eq!(
            cfg,
            LoggerConfig {
                log_path: Some("/tmp/l".into()),
                level: None,
                show_level: Some(true),
                show_log_origin: Some(false),
                module: Some("m".into()),
            }
        );
    }

    #[test]
    fn unopenable_log_path_is_refused_naming_it_and_changes_nothing() {
        let dir = TempDir::new().unwrap();
        let bad = dir.as_path().join("no-such-dir").join("log");
        let logger = FcLogger::new();
        let e = logger
            .apply(&LoggerConfig {
                log_path: Some(bad.clone()),
                level: Some(log::LevelFilter::Trace),
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains(&*bad.to_string_lossy()), "{e}");
        assert_eq!(logger.level(), DEFAULT_LEVEL);
    }

    #[test]
    fn partial_line_is_finished_before_the_next_and_nothing_is_mixed() {
        let dir = TempDir::new().unwrap();
        let fifo = mkfifo(&dir, "s.fifo");
        let mut sink = Sink::open(&fifo).unwrap();
        // Lines longer than PIPE_BUF, so the pipe takes some only in part.
        let mut sent = Vec::new();
        for i in 0..200u8 {
            let line = format!("{}\n", char::from(b'a' + i % 26).to_string().repeat(5000));
            if sink.write_line(line.as_bytes()).unwrap() == Written::Line {
                sent.push(line);
            }
        }
        assert!(sent.len() < 200);
        let mut reader = BufReader::new(File::open(&fifo).unwrap());
        // Drain what is buffered; then let the sink finish its pending line.
        let mut got = Vec::new();
        let mut line = String::new();
        while got.len() + 1 < sent.len() {
            line.clear();
            reader.read_line(&mut line).unwrap();
            got.push(line.clone());
        }
        assert_eq!(sink.write_line(b"end\n").unwrap(), Written::Line);
        for _ in 0..2 {
            line.clear();
            reader.read_line(&mut line).unwrap();
            got.push(line.clone());
        }
        sent.push("end\n".into());
        assert_eq!(got, sent);
    }
}
