//! The storage crate's one error type, worded for the operator who has to fix it.

use std::path::{Path, PathBuf};

/// Why the data directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("data dir {dir} is locked by another process (is another switchboard running on it?)")]
    Locked { dir: PathBuf },
    #[error("data dir {dir} is corrupt: {detail}; move it aside to start fresh")]
    Corrupt { dir: PathBuf, detail: String },
    /// The OS error is part of the message (printed once).
    #[error("data dir {dir}: {reason}")]
    Io {
        dir: PathBuf,
        reason: std::io::Error,
    },
    #[error("data dir {dir} exists but is not a directory")]
    NotADirectory { dir: PathBuf },
    #[error("data dir {dir}: no space left on the device")]
    DiskFull { dir: PathBuf },
    #[error("data dir {dir}: {detail}")]
    Engine { dir: PathBuf, detail: String },
    #[error("offset {offset} is past the end of queue {queue} (next offset {next})")]
    PastTheEnd {
        queue: String,
        offset: u64,
        next: u64,
    },
}

impl StorageError {
    pub(crate) fn from_sled(dir: &Path, error: sled::Error) -> Self {
        let dir = dir.to_path_buf();
        match error {
            sled::Error::Io(source) if is_lock_error(&source) => Self::Locked { dir },
            sled::Error::Io(source) if is_disk_full(&source) => Self::DiskFull { dir },
            sled::Error::Io(reason) => Self::Io { dir, reason },
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
    /// A file operation's failure: a full disk is named as such.
    pub(crate) fn from_io(dir: &Path, reason: std::io::Error) -> Self {
        let dir = dir.to_path_buf();
        if is_disk_full(&reason) {
            Self::DiskFull { dir }
        } else {
            Self::Io { dir, reason }
        }
    }

    /// The same failure, once more, for each append a failed write answers.
    pub(crate) fn again(&self) -> Self {
        match self {
            Self::PastTheEnd {
                queue,
                offset,
                next,
            } => Self::PastTheEnd {
                queue: queue.clone(),
                offset: *offset,
                next: *next,
            },
            Self::DiskFull { dir } => Self::DiskFull { dir: dir.clone() },
            Self::Locked { dir }
            | Self::Corrupt { dir, .. }
            | Self::Io { dir, .. }
            | Self::NotADirectory { dir }
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
