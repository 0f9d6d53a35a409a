//! The agent's log: one record per write to /dev/kmsg in the guest (the
//! serial console is far too slow for chatter), stderr elsewhere.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

static SINK: OnceLock<File> = OnceLock::new();
static DEBUG: AtomicBool = AtomicBool::new(false);

/// Severity, with its kmsg priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Error = 3,
    Info = 6,
    Debug = 7,
}

/// Sends the log to /dev/kmsg from now on (PID 1 only; best effort).
pub fn use_kmsg() {
    if let Ok(file) = OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = SINK.set(file);
    }
}

/// Enables `Level::Debug` records (`arrow.debug`).
pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

/// Whether debug records are written.
pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Writes one record; never fails (a lost log line must not hurt PID 1).
pub fn write(level: Level, args: fmt::Arguments<'_>) {
    if level == Level::Debug && !debug_enabled() {
        return;
    }
    // One buffer, one write: kmsg takes a record per write.
    let line = match SINK.get() {
        Some(_) => format!("<{}>arrow-init: {args}\n", level as u8),
        None => format!("arrow-init: {args}\n"),
    };
    match SINK.get() {
        Some(mut kmsg) => {
            let _ = kmsg.write_all(line.as_bytes());
        }
        None => {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }
}

/// Logs an error.
#[macro_export]
macro_rules! log_error {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Error, format_args!($($arg)*)) };
}

/// Logs something worth knowing in normal operation.
#[macro_export]
macro_rules! log_info {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Info, format_args!($($arg)*)) };
}

/// Logs only with `arrow.debug`.
#[macro_export]
macro_rules! log_debug {
    ($($arg:tt)*) => {
        if $crate::log::debug_enabled() {
            $crate::log::write($crate::log::Level::Debug, format_args!($($arg)*))
        }
    };
}
