//! The pod runtime's error: a kind that each front door maps to its own
//! status codes in one place (the shim to ttrpc codes), and a message that
//! says what failed, with its context.

use proto::client::ClientError;

/// What kind of failure: what a caller can do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong (a malformed spec, a bad signal).
    InvalidArgument,
    /// No such container, exec or process.
    NotFound,
    /// The id is taken.
    AlreadyExists,
    /// Not in a state that allows it (a running container deleted, a
    /// start of a started process, a pod whose VM is gone).
    FailedPrecondition,
    /// The guest cannot be reached now.
    Unavailable,
    /// The guest did not answer in time.
    DeadlineExceeded,
    /// Arrow does not do this (checkpoints, a whole-pod pause).
    Unimplemented,
    /// Anything else: the host or the guest failed.
    Internal,
}

/// A failed pod runtime request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{message}")]
pub struct RuntimeError {
    pub kind: ErrorKind,
    pub message: String,
}

/// The pod runtime's result.
pub type Result<T> = std::result::Result<T, RuntimeError>;

impl RuntimeError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        RuntimeError {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// An agent call that failed while doing `context`. The guest's own
    /// verdicts keep their kind; a lost or slow connection is the guest
    /// being unavailable.
    pub fn agent(context: &str, err: ClientError) -> Self {
        let kind = match &err {
            ClientError::InvalidArgument(_) => ErrorKind::InvalidArgument,
            ClientError::NotFound(_) => ErrorKind::NotFound,
            ClientError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            ClientError::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            ClientError::ConnectionClosed(_)
            | ClientError::Io(_)
            | ClientError::Frame(_)
            | ClientError::Unavailable(_) => ErrorKind::Unavailable,
            ClientError::Timeout { .. } => ErrorKind::DeadlineExceeded,
            ClientError::Internal(_) | ClientError::UnexpectedResponse { .. } => {
                ErrorKind::Internal
            }
        };
        Self::new(kind, format!("{context}: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn agent_errors_keep_the_guests_verdict_and_name_the_context() {
        let e = RuntimeError::agent("starting", ClientError::NotFound("p".into()));
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.starts_with("starting: "), "{e}");
        let timeout = ClientError::Timeout {
            call: "ping",
            after: Duration::from_secs(1),
        };
        assert_eq!(
            RuntimeError::agent("x", timeout).kind,
            ErrorKind::DeadlineExceeded
        );
        let closed = ClientError::ConnectionClosed("eof".into());
        assert_eq!(
            RuntimeError::agent("x", closed).kind,
            ErrorKind::Unavailable
        );
    }
}
