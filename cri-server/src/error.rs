//! Errors a user can act on, each with its gRPC code: the message says what
//! failed (registry, reference) and what to do.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    DataLoss(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error in the store under `root`: a full disk says so.
    pub fn io(what: impl std::fmt::Display, root: &std::path::Path, e: &io::Error) -> Error {
        if is_disk_full(e) {
            Error::ResourceExhausted(format!(
                "{what}: no space left on the device holding {} ({e}): free space there or remove unused images (crictl rmi --prune)",
                root.display()
            ))
        } else {
            Error::Internal(format!("{what}: {e}"))
        }
    }

    pub fn message(&self) -> String {
        self.to_string()
    }
}

pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        use tonic::Code;
        let code = match &e {
            Error::NotFound(_) => Code::NotFound,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unavailable(_) => Code::Unavailable,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::DataLoss(_) => Code::DataLoss,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Internal(_) => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}
