//! The control channel between the shim and the `arrow-vmm serve` it
//! started: one end of a socket pair the shim creates, inherited by the VMM
//! (`--control-fd N`). No path names it, so nothing else can connect to it,
//! and it is the VMM's lifeline: when the shim's end closes (the shim
//! exited or was killed) the VMM stops the VM and exits. Feature
//! `vm-record`.
//!
//! One JSON object a line each way. The VMM speaks first, once:
//! [`VmmMessage::Ready`] when the guest's agent answers (or it exits, which
//! the shim reads as the end of the channel). Then the shim sends
//! [`ControlRequest`]s, one at a time, and each gets exactly one reply.
//!
//! The VMM handles everything a hostile guest sends, so the shim reads its
//! lines as untrusted input: bounded ([`MAX_LINE`]) and strict (no unknown
//! fields or variants).

use std::io::{self, BufRead, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::vm_counters::VmCounters;
use crate::vmm_ready::VmmReady;

/// The longest line read either way; a real one is a few hundred bytes.
pub const MAX_LINE: usize = 64 * 1024;

/// What the shim asks of its VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlRequest {
    /// Stop the VM (whatever its guest does) and exit; replied to with
    /// [`VmmMessage::Done`] before the VM stops.
    Stop,
    /// Park every vCPU: the guest stops running, its memory and devices
    /// stay as they are.
    Pause,
    /// Let paused vCPUs run again.
    Resume,
    /// The devices' counters now.
    Counters,
}

/// What the VMM sends on the channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VmmMessage {
    /// The guest's agent answers; the first message, sent once.
    Ready(VmmReady),
    /// The request succeeded.
    Done,
    /// The reply to [`ControlRequest::Counters`].
    Counters(VmCounters),
    /// The request failed, and why.
    Failed(String),
}

/// Why a message could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the control channel is closed")]
    Closed,
    #[error("control channel: {0}")]
    Io(#[from] io::Error),
    #[error("a control message longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("bad control message {line:?}: {source}")]
    Malformed {
        line: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Writes `msg` as one line, with one `write_all`, so two threads writing
/// whole messages to one channel never interleave inside a line.
pub fn write_message<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), ControlError> {
    let mut line =
        serde_json::to_vec(msg).map_err(|e| ControlError::Io(io::Error::other(e.to_string())))?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()?;
    Ok(())
}

/// Reads one message; [`ControlError::Closed`] when the channel ended
/// before its first byte. Never reads more than [`MAX_LINE`] bytes.
pub fn read_message<T: DeserializeOwned>(r: &mut impl BufRead) -> Result<T, ControlError> {
    let mut line = Vec::new();
    r.take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(ControlError::Closed);
    }
    if line.len() > MAX_LINE {
        return Err(ControlError::TooLong);
    }
    if line.last() != Some(&b'\n') {
        // The peer closed mid-line.
        return Err(ControlError::Closed);
    }
    serde_json::from_slice(&line).map_err(|source| ControlError::Malformed {
        line: String::from_utf8_lossy(&line).trim_end().to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm_counters::NetCounters;
    use std::io::BufReader;

    fn round_trip<T: Serialize + DeserializeOwned>(msg: &T) -> (String, T) {
        let mut buf = Vec::new();
        write_message(&mut buf, msg).unwrap();
        let text = String::from_utf8(buf.clone()).unwrap();
        let back = read_message(&mut BufReader::new(&buf[..])).unwrap();
        (text, back)
    }

    #[test]
    fn requests_and_replies_are_one_line_each() {
        let (line, back) = round_trip(&ControlRequest::Pause);
        assert_eq!(line, "\"pause\"\n");
        assert_eq!(back, ControlRequest::Pause);
        let ready = VmmReady {
            ready: true,
            cloned: true,
            pid: 7,
            vsock_uds: "/run/a\nb".into(),
            ready_ms: 12,
        };
        let (line, back) = round_trip(&VmmMessage::Ready(ready.clone()));
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert_eq!(back, VmmMessage::Ready(ready));
        let counters = VmCounters {
            net: Some(NetCounters {
                rx_frames: 3,
                ..Default::default()
            }),
            fs: None,
        };
        assert_eq!(
            round_trip(&VmmMessage::Counters(counters)).1,
            VmmMessage::Counters(counters)
        );
        assert_eq!(round_trip(&VmmMessage::Done).0, "\"done\"\n");
        assert_eq!(
            round_trip(&VmmMessage::Failed("no".into())).1,
            VmmMessage::Failed("no".into())
        );
    }

    #[test]
    fn several_messages_are_read_in_order() {
        let mut buf = Vec::new();
        for req in [ControlRequest::Stop, ControlRequest::Counters] {
            write_message(&mut buf, &req).unwrap();
        }
        let mut r = BufReader::new(&buf[..]);
        assert_eq!(
            read_message::<ControlRequest>(&mut r).unwrap(),
            ControlRequest::Stop
        );
        assert_eq!(
            read_message::<ControlRequest>(&mut r).unwrap(),
            ControlRequest::Counters
        );
        assert!(matches!(
            read_message::<ControlRequest>(&mut r),
            Err(ControlError::Closed)
        ));
    }

    #[test]
    fn hostile_lines_are_refused() {
        let read = |bytes: &[u8]| read_message::<VmmMessage>(&mut BufReader::new(bytes));
        assert!(matches!(read(b""), Err(ControlError::Closed)));
        assert!(matches!(read(b"\"done"), Err(ControlError::Closed)));
        assert!(matches!(
            read(b"garbage\n"),
            Err(ControlError::Malformed { .. })
        ));
        assert!(matches!(
            read(b"\"reboot\"\n"),
            Err(ControlError::Malformed { .. })
        ));
        assert!(matches!(
            read(br#"{"counters":{"net":null,"fs":null,"extra":1}}"#),
            Err(ControlError::Closed | ControlError::Malformed { .. })
        ));
        assert!(matches!(
            read(b"{\"counters\":{\"net\":null,\"fs\":null,\"extra\":1}}\n"),
            Err(ControlError::Malformed { .. })
        ));
        let long = format!("\"{}\"\n", "x".repeat(MAX_LINE));
        assert!(matches!(read(long.as_bytes()), Err(ControlError::TooLong)));
        // An endless line without a newline is refused after MAX_LINE bytes.
        let mut endless = io::repeat(b'x');
        let mut r = BufReader::new(&mut endless);
        assert!(matches!(
            read_message::<VmmMessage>(&mut r),
            Err(ControlError::TooLong)
        ));
    }
}
