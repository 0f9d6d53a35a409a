//! What the error channel of an exec or attach carries when it ends: with
//! the `v4.channel.k8s.io` protocols and later, a Kubernetes `Status`
//! object as JSON (`Success`, or `Failure` with the exit code as a cause,
//! which kubectl turns into its own exit code); with the older ones, only
//! a failure's message as text.

use serde::Serialize;

use crate::runtime::exec::ExecOutcome;

#[derive(Debug, Serialize)]
struct Status<'a> {
    metadata: Empty,
    status: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<Details>,
}

#[derive(Debug, Serialize)]
struct Empty {}

#[derive(Debug, Serialize)]
struct Details {
    causes: Vec<Cause>,
}

#[derive(Debug, Serialize)]
struct Cause {
    reason: &'static str,
    message: String,
}

/// The error channel's bytes for `outcome`; empty for a success under the
/// text protocols (nothing is written then).
pub fn error_channel_bytes(outcome: &ExecOutcome, structured: bool) -> Vec<u8> {
    let (message, exit) = match outcome {
        ExecOutcome::Exited(0) => (None, None),
        ExecOutcome::Exited(code) => (
            Some(format!(
                "command terminated with non-zero exit code: exit status {code}"
            )),
            Some(*code),
        ),
        ExecOutcome::ClientGone => (Some("the client went away".to_string()), None),
        ExecOutcome::Failed(why) => (Some(why.clone()), None),
    };
    if !structured {
        return message.map(String::into_bytes).unwrap_or_default();
    }
    let status = match message {
        None => Status {
            metadata: Empty {},
            status: "Success",
            message: None,
            reason: None,
            details: None,
        },
        Some(message) => Status {
            metadata: Empty {},
            status: "Failure",
            message: Some(message),
            reason: exit.map(|_| "NonZeroExitCode").or(Some("InternalError")),
            details: exit.map(|code| Details {
                causes: vec![Cause {
                    reason: "ExitCode",
                    message: code.to_string(),
                }],
            }),
        },
    };
    serde_json::to_vec(&status).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_and_exit_codes_as_kubelet_writes_them() {
        assert_eq!(
            error_channel_bytes(&ExecOutcome::Exited(0), true),
            br#"{"metadata":{},"status":"Success"}"#
        );
        assert_eq!(
            String::from_utf8(error_channel_bytes(&ExecOutcome::Exited(3), true)).unwrap(),
            r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: exit status 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#
        );
        let failed = ExecOutcome::Failed("container c is not running".into());
        let json: serde_json::Value =
            serde_json::from_slice(&error_channel_bytes(&failed, true)).unwrap();
        assert_eq!(json["status"], "Failure");
        assert_eq!(json["message"], "container c is not running");
        assert!(json.get("details").is_none());
    }

    #[test]
    fn text_protocols_carry_only_failures() {
        assert!(error_channel_bytes(&ExecOutcome::Exited(0), false).is_empty());
        assert_eq!(
            error_channel_bytes(&ExecOutcome::Exited(2), false),
            b"command terminated with non-zero exit code: exit status 2"
        );
    }
}
