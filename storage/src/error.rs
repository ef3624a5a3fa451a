//! The storage crate's one error type, worded for the operator who has to fix it.

use std::path::{Path, PathBuf};

/// Why the data directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("data dir {dir} is locked by another process (is another switchboard running on it?)")]
    Locked { dir: PathBuf },
    #[error("data dir {dir} is corrupt: {detail}; move it aside to start fresh")]
    Corrupt { dir: PathBuf, detail: String },
    #[error("data dir {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("data dir {dir}: no space left on the device")]
    DiskFull { dir: PathBuf },
    #[error("data dir {dir}: {detail}")]
    Engine { dir: PathBuf, detail: String },
}

impl StorageError {
    pub(crate) fn from_sled(dir: &Path, error: sled::Error) -> Self {
        let dir = dir.to_path_buf();
        match error {
            sled::Error::Io(source) if is_lock_error(&source) => Self::Locked { dir },
            sled::Error::Io(source) if is_disk_full(&source) => Self::DiskFull { dir },
            sled::Error::Io(source) => Self::Io { dir, source },
            sled::Error::Corruption { at, .. } => Self::Corrupt {
                dir,
                detail: match at {
                    Some(at) => format!("corruption at {at:?}"),
                    None => "corruption detected".into(),
                },
            },
            other => Self::Engine {
                dir,
                detail: other.to_string(),
            },
        }
    }
}

impl StorageError {
    /// The same failure, once more, for each append a failed write answers.
    pub(crate) fn again(&self) -> Self {
        match self {
            Self::DiskFull { dir } => Self::DiskFull { dir: dir.clone() },
            Self::Locked { dir }
            | Self::Corrupt { dir, .. }
            | Self::Io { dir, .. }
            | Self::Engine { dir, .. } => Self::Engine {
                dir: dir.clone(),
                detail: self.to_string(),
            },
        }
    }
}

fn is_disk_full(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::StorageFull
            | std::io::ErrorKind::QuotaExceeded
            | std::io::ErrorKind::FileTooLarge
    )
}

fn is_lock_error(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::WouldBlock || error.to_string().contains("lock")
}
