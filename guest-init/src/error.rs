//! The agent's one error type: every call on processes, containers,
//! interfaces and clones fails with an [`AgentError`], which carries the
//! protocol code the host sees (`proto::agent::error::Code`).

use std::io;

use proto::agent::error::Code;

/// A failed call, carrying its protocol error code.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("process {0:?} not found")]
    NotFound(String),
    #[error("process {0:?} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{what}: {source}")]
    Internal {
        what: &'static str,
        source: io::Error,
    },
    /// A guest failure, described in full (what failed, on what, why).
    #[error("{0}")]
    Guest(String),
    #[error("container {0:?} not found")]
    ContainerNotFound(String),
    #[error("container {0:?} already exists")]
    ContainerExists(String),
    #[error("no network interface {0:?} in the guest")]
    InterfaceNotFound(String),
    /// Something the call needs is not there (a forwarded port nobody
    /// listens on), described in full.
    #[error("{0}")]
    Unavailable(String),
}

impl AgentError {
    /// The protocol code for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::NotFound(_) | Self::ContainerNotFound(_) | Self::InterfaceNotFound(_) => {
                Code::NotFound
            }
            Self::AlreadyExists(_) | Self::ContainerExists(_) => Code::AlreadyExists,
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Internal { .. } | Self::Guest(_) => Code::Internal,
            Self::Unavailable(_) => Code::Unavailable,
        }
    }

    /// The protocol form of this error.
    pub fn to_wire(&self) -> proto::agent::Error {
        proto::agent::Error {
            code: self.code() as i32,
            message: self.to_string(),
        }
    }
}
