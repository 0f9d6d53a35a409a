//! What `arrow-vmm serve` reports once the pod's VM is up and its agent
//! answers: the shim reads it as the control channel's `ready` message
//! ([`crate::vmm_control`]), a CLI user, script or test as the JSON line
//! on the VMM's stdout ([`VmmReady::parse_line`]). One type, so writer and
//! readers cannot drift apart. Feature `vm-record`.
//!
//! The writer runs beside a hostile guest: the reader bounds the line
//! ([`MAX_LEN`]) and accepts only the fields below.

use serde::{Deserialize, Serialize};

/// The longest ready line read; a real one is about 100 bytes plus the
/// socket path.
pub const MAX_LEN: usize = 64 * 1024;

/// What the VMM reports once ready.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmReady {
    /// Always true in a line the VMM writes (a line saying otherwise is
    /// refused).
    pub ready: bool,
    /// Cloned from a template rather than booted.
    pub cloned: bool,
    /// The VMM's pid.
    pub pid: u32,
    /// The host end of the guest's hybrid vsock.
    pub vsock_uds: String,
    /// From the VMM's start to ready.
    #[serde(default)]
    pub ready_ms: u64,
}

/// Why a ready line was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReadyLineError {
    #[error("arrow-vmm exited before it was ready")]
    Eof,
    #[error("the ready line is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("bad ready line {line:?}: {source}")]
    Malformed {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("arrow-vmm reported {0:?}")]
    NotReady(String),
}

impl VmmReady {
    /// The line, without its newline: one JSON object.
    pub fn to_line(&self) -> String {
        // A struct of strings and integers always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses one line as the VMM wrote it (`line` may end in a newline);
    /// an empty `line` means the VMM's stdout ended.
    pub fn parse_line(line: &str) -> Result<Self, ReadyLineError> {
        if line.is_empty() {
            return Err(ReadyLineError::Eof);
        }
        if line.len() > MAX_LEN {
            return Err(ReadyLineError::TooLong);
        }
        let ready: VmmReady =
            serde_json::from_str(line.trim()).map_err(|source| ReadyLineError::Malformed {
                line: line.to_owned(),
                source,
            })?;
        if !ready.ready {
            return Err(ReadyLineError::NotReady(line.trim().to_owned()));
        }
        Ok(ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(path: &str) -> VmmReady {
        VmmReady {
            ready: true,
            cloned: true,
            pid: 42,
            vsock_uds: path.to_owned(),
            ready_ms: 731,
        }
    }

    #[test]
    fn a_line_round_trips() {
        let ready = sample("/run/arrow/ns/pod/vmm/vsock.sock");
        let line = ready.to_line();
        assert_eq!(
            line,
            r#"{"ready":true,"cloned":true,"pid":42,"vsock_uds":"/run/arrow/ns/pod/vmm/vsock.sock","ready_ms":731}"#
        );
        assert_eq!(VmmReady::parse_line(&format!("{line}\n")).unwrap(), ready);
    }

    #[test]
    fn odd_paths_stay_one_line() {
        let ready = sample("a\"b\\c\nd\t\u{1}é");
        let line = ready.to_line();
        assert!(!line.contains('\n'));
        assert_eq!(VmmReady::parse_line(&line).unwrap(), ready);
    }

    #[test]
    fn bad_lines_are_refused() {
        assert!(matches!(VmmReady::parse_line(""), Err(ReadyLineError::Eof)));
        assert!(matches!(
            VmmReady::parse_line("garbage\n"),
            Err(ReadyLineError::Malformed { .. })
        ));
        assert!(matches!(
            VmmReady::parse_line(r#"{"ready":false,"cloned":false,"pid":1,"vsock_uds":"/x"}"#),
            Err(ReadyLineError::NotReady(_))
        ));
        assert!(matches!(
            VmmReady::parse_line(
                r#"{"ready":true,"cloned":false,"pid":1,"vsock_uds":"/x","extra":1}"#
            ),
            Err(ReadyLineError::Malformed { .. })
        ));
        let long = format!("{{\"vsock_uds\":\"{}\"}}", "x".repeat(MAX_LEN));
        assert!(matches!(
            VmmReady::parse_line(&long),
            Err(ReadyLineError::TooLong)
        ));
    }
}
