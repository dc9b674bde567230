//! The local config file: the cluster view of a ztunnel running without a controller. It is
//! read at startup (an invalid file stops startup with the reason) and polled for changes;
//! a changed file that is invalid is rejected with a message naming the field, and ztunnel
//! keeps running on the last good one.

use std::path::{Path, PathBuf};

use meshapi::{ModelError, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read config file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("config file {path} rejected: {error}")]
    Invalid { path: PathBuf, error: ModelError },
}

/// Reads and validates the file.
pub fn load(path: &Path) -> Result<(Snapshot, Vec<u8>), LoadError> {
    let bytes = std::fs::read(path).map_err(|error| LoadError::Read { path: path.to_owned(), error })?;
    let snapshot = parse(path, &bytes)?;
    Ok((snapshot, bytes))
}

/// Parses file contents.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Snapshot, LoadError> {
    let text = std::str::from_utf8(bytes).map_err(|e| LoadError::Invalid {
        path: path.to_owned(),
        error: ModelError::Yaml(format!("not UTF-8: {e}")),
    })?;
    Snapshot::from_yaml(text).map_err(|error| LoadError::Invalid { path: path.to_owned(), error })
}
