//! What `arrow`'s operations can fail with, each kind saying what to do.

use std::path::PathBuf;

/// An error of `arrow install`, `uninstall` or `check`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not TOML: {0}")]
    Toml(String),
    #[error("unsupported containerd config: {0}")]
    UnsupportedVersion(String),
    #[error("`{0}` is not a table")]
    NotATable(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Refused { path: PathBuf, what: String },
    #[error("install record {}: {what}", path.display())]
    Record { path: PathBuf, what: String },
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
