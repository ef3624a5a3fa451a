//! `api.resume*`, validated: how resumable connections are kept.

use std::time::Duration;

/// How resumable connections are kept (`api.resume*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeConfig {
    /// How long a dropped connection waits for its client.
    pub window: Duration,
    /// The resend buffer: data frames kept after writing, at most this many and bytes.
    pub buffer_frames: usize,
    pub buffer_bytes: usize,
}
