//! `[storage]` and `[queues.NAME]`: the durable queues' keys as written, validated into
//! [`StorageConfig`] and each queue's retention and push settings ([`QueueConfig`] is
//! completed by the config's assembly, which knows the routes that append to a queue).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::check::{ConfigError, invalid};

/// Most entries in one push batch.
const MAX_PUSH_BATCH: usize = 10_000;
/// Most push batches in flight at once.
const MAX_PUSH_IN_FLIGHT: usize = 64;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawStorage {
    /// When queue appends are synced to disk: "always" (every write batch), "batch"
    /// (at most every flush_interval_ms), "never" (the OS writes back when it likes).
    pub fsync: String,
    pub flush_interval_ms: u64,
    /// A queue segment with a corrupt record in its middle is cut there (the records after
    /// it are lost) instead of refusing to start.
    pub repair: bool,
}

impl Default for RawStorage {
    fn default() -> Self {
        Self {
            fsync: "batch".into(),
            flush_interval_ms: 2,
            repair: false,
        }
    }
}

/// Retention of one durable queue. Bytes and age are bounded by default, so no client
/// can fill the disk through a queue route; `max_messages` is unbounded unless set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawQueue {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_messages: Option<u64>,
    /// Stored bytes kept (oldest segments go first).
    pub max_bytes: u64,
    pub max_age_secs: u64,
    /// `deliver_to` push: entries per POST (1: the event itself, AWS-like; more: a
    /// `{"Records": [...]}` batch).
    pub batch_size: usize,
    /// `deliver_to` push: batches POSTed at once (1: strict order; more: order within a
    /// batch only).
    pub max_in_flight: usize,
}

impl Default for RawQueue {
    fn default() -> Self {
        Self {
            max_messages: None,
            max_bytes: 1 << 30,
            max_age_secs: 7 * 24 * 3600,
            batch_size: 1,
            max_in_flight: 1,
        }
    }
}

impl RawQueue {
    pub fn push(&self, key: &str) -> Result<PushConfig, ConfigError> {
        if !(1..=MAX_PUSH_BATCH).contains(&self.batch_size) {
            return Err(invalid(
                format!("{key}.batch_size"),
                format!("must be from 1 to {MAX_PUSH_BATCH}"),
            ));
        }
        if !(1..=MAX_PUSH_IN_FLIGHT).contains(&self.max_in_flight) {
            return Err(invalid(
                format!("{key}.max_in_flight"),
                format!("must be from 1 to {MAX_PUSH_IN_FLIGHT}"),
            ));
        }
        Ok(PushConfig {
            batch_size: self.batch_size,
            max_in_flight: self.max_in_flight,
        })
    }

    pub fn retention(&self, key: &str) -> Result<switchboard_storage::Retention, ConfigError> {
        if self.max_messages == Some(0) || self.max_bytes == 0 || self.max_age_secs == 0 {
            return Err(invalid(key, "retention limits must be greater than 0"));
        }
        Ok(switchboard_storage::Retention {
            max_messages: self.max_messages,
            max_bytes: Some(self.max_bytes),
            max_age: Some(Duration::from_secs(self.max_age_secs)),
        })
    }
}

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub fsync: switchboard_storage::FsyncPolicy,
    pub repair: bool,
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub name: String,
    pub retention: switchboard_storage::Retention,
    /// Push delivery target, from the route(s) that append to it.
    pub deliver_to: Option<reqwest::Url>,
    pub push: PushConfig,
    pub format: PushFormat,
}

/// What a push POSTs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushFormat {
    /// The event itself, or `{"Records": [...]}` (AWS-like).
    Events,
    /// `{"time_ms", "events": [...]}`, signed with this secret ([`crate::webhooks`]).
    Webhook { secret: std::sync::Arc<str> },
}

/// How a queue's `deliver_to` push sends its entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushConfig {
    pub batch_size: usize,
    pub max_in_flight: usize,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            batch_size: 1,
            max_in_flight: 1,
        }
    }
}

impl RawStorage {
    pub fn validate(&self) -> Result<StorageConfig, ConfigError> {
        use switchboard_storage::FsyncPolicy;
        let fsync = match self.fsync.as_str() {
            "always" => FsyncPolicy::Always,
            "never" => FsyncPolicy::Never,
            "batch" if self.flush_interval_ms == 0 => {
                return Err(invalid(
                    "storage.flush_interval_ms",
                    "must be greater than 0",
                ));
            }
            "batch" => FsyncPolicy::Batch {
                interval: Duration::from_millis(self.flush_interval_ms),
            },
            other => {
                return Err(invalid(
                    "storage.fsync",
                    format!("`{other}` is not one of \"always\", \"batch\", \"never\""),
                ));
            }
        };
        Ok(StorageConfig {
            fsync,
            repair: self.repair,
        })
    }
}

/// Queue names: 1–64 characters from `A-Z a-z 0-9 _ - .`.
pub fn is_valid_queue_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

pub fn check_queue_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if is_valid_queue_name(name) {
        Ok(())
    } else {
        Err(invalid(
            key,
            "queue names are 1-64 characters from A-Z a-z 0-9 _ - .",
        ))
    }
}
