//! The Firecracker-format logger installed as the process's logger: `log` macros reach
//! it, and a configuration moves the destination and the `log` crate's level with it.
//! (A test binary of its own: a process has one global logger.)

use std::path::PathBuf;

use ferrite::firecracker::logger::{self, LoggerConfig};

#[test]
fn installed_logger_follows_put_logger_configuration() {
    let dir = std::env::temp_dir().join(format!("ferrite-fc-logger-{}", std::process::id()));
    std::fs::create_dir(&dir).unwrap();
    let path: PathBuf = dir.join("log");
    logger::install("vm-a").unwrap();
    assert!(matches!(
        logger::install("again"),
        Err(logger::Error::AlreadyInstalled)
    ));
    assert_eq!(log::max_level(), log::LevelFilter::Info);
    logger::apply(&LoggerConfig {
        log_path: Some(path.clone()),
        level: Some(log::LevelFilter::Warn),
        show_level: Some(true),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(log::max_level(), log::LevelFilter::Warn);
    log::info!("not written");
    log::warn!("written");
    let text = std::fs::read_to_string(&path).unwrap();
    let (_time, rest) = text.split_once(' ').unwrap();
    let thread = std::thread::current().name().unwrap_or("-").to_string();
    assert_eq!(rest, format!("[vm-a:{thread}:WARN] written\n"));
    // A configuration without a level puts it back to Info.
    logger::apply(&LoggerConfig::default()).unwrap();
    assert_eq!(log::max_level(), log::LevelFilter::Info);
    std::fs::remove_dir_all(&dir).unwrap();
}
