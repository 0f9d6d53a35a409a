//! The share's private parsers, for the fuzz targets in `fuzz/` (feature
//! `fuzzing`): they read what a spec (mount options, share paths) or the
//! kernel (mountinfo) hands the shim.

use std::path::PathBuf;

use nix::mount::MsFlags;

use crate::share::{self, ShareError};

/// Splits mount options into flags and the data string.
pub fn parse_options(options: &[String]) -> (MsFlags, String) {
    share::parse_options(options)
}

/// Unescapes one mountinfo field.
pub fn unescape_mountinfo(field: &str) -> String {
    share::unescape_mountinfo(field)
}

/// A bind's share path as a path under container `id`'s directory.
pub fn share_path_of(id: &str, share_path: &str) -> Result<PathBuf, ShareError> {
    share::share_path_of(id, share_path)
}
