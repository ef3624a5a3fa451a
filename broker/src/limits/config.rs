//! `[limits]`: the keys as written, validated into [`Limits`] (token-bucket rates, per-address
//! limits, timeouts, the outbound memory budget).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::check::{ConfigError, invalid};

/// The largest message the gateway takes (a queue entry must stay well within what the
/// queue log stores as one record).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLimits {
    pub max_frame_bytes: usize,
    pub max_message_bytes: usize,
    pub idle_timeout_secs: u64,
    pub max_connection_secs: u64,
    pub handshake_timeout_secs: u64,
    pub outbound_queue_frames: usize,
    pub outbound_queue_bytes: usize,
    /// Most connectionIds one bulk `POST @connections` may name (more: 413).
    pub max_bulk_connection_ids: usize,
    /// Per connection, inbound messages per second (token bucket; 0 = unlimited)...
    pub messages_per_sec: u32,
    /// ...and how many may come at once.
    pub message_burst: u32,
    /// Per connection, inbound bytes per second (token bucket; 0 = unlimited)...
    pub bytes_per_sec: u64,
    /// ...and how many may come at once.
    pub bytes_burst: u64,
    /// A connection held back by its rate limit for this long without a break is closed
    /// with 1008.
    pub throttle_disconnect_secs: u64,
    /// Rooms one connection may be in at once.
    pub max_rooms_per_connection: usize,
    /// Open (or opening) connections from one client address (0 = unlimited).
    pub max_connections_per_ip: usize,
    /// New connections per second from one client address (token bucket; 0 = unlimited)...
    pub connects_per_sec_per_ip: u32,
    /// ...and how many may come at once.
    pub connect_burst_per_ip: u32,
    /// Resumes per second from one client address (token bucket; 0 = unlimited): each
    /// replays what its connection missed and runs the authorizer and `$connect` again...
    pub resumes_per_sec_per_ip: u32,
    /// ...and how many may come at once.
    pub resume_burst_per_ip: u32,
    /// Resumes per second of one connection (token bucket; 0 = unlimited)...
    pub resumes_per_sec_per_connection: u32,
    /// ...and how many may come at once.
    pub resume_burst_per_connection: u32,
    /// IPv6 clients are counted by this prefix (one subscriber usually holds a /64).
    pub ipv6_prefix_len: u8,
    /// Bytes all outbound queues together may hold; past it the biggest queues are cut
    /// (1013) and new connections get 503 until usage is back under 90%.
    pub outbound_memory_bytes: usize,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 32 * 1024,
            max_message_bytes: 128 * 1024,
            idle_timeout_secs: 600,
            max_connection_secs: 7200,
            handshake_timeout_secs: 10,
            outbound_queue_frames: 1024,
            outbound_queue_bytes: 4 * 1024 * 1024,
            max_bulk_connection_ids: 100_000,
            messages_per_sec: 100,
            message_burst: 200,
            bytes_per_sec: 1 << 20,
            bytes_burst: 2 << 20,
            throttle_disconnect_secs: 10,
            max_rooms_per_connection: 100,
            max_connections_per_ip: 1000,
            connects_per_sec_per_ip: 100,
            connect_burst_per_ip: 500,
            resumes_per_sec_per_ip: 50,
            resume_burst_per_ip: 200,
            resumes_per_sec_per_connection: 1,
            resume_burst_per_connection: 10,
            ipv6_prefix_len: 64,
            outbound_memory_bytes: 256 << 20,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_message_bytes: usize,
    pub idle_timeout: Duration,
    pub max_connection_duration: Duration,
    pub handshake_timeout: Duration,
    pub outbound_queue_frames: usize,
    pub outbound_queue_bytes: usize,
    pub max_bulk_connection_ids: usize,
    /// Per-connection inbound budget.
    pub inbound: InboundRate,
    pub throttle_disconnect: Duration,
    pub max_rooms_per_connection: usize,
    pub per_ip: crate::limits::PerIpLimits,
    /// Resumes one connection takes; `None`: unlimited.
    pub resumes_per_connection: Option<crate::limits::Rate>,
    pub outbound_memory_bytes: usize,
}

/// The per-connection token buckets; `None`: that dimension is unlimited.
#[derive(Debug, Clone, Copy)]
pub struct InboundRate {
    pub messages: Option<crate::limits::Rate>,
    pub bytes: Option<crate::limits::Rate>,
}

impl RawLimits {
    pub fn validate(&self) -> Result<Limits, ConfigError> {
        let positive = |key: &str, value: u64| {
            if value == 0 {
                Err(invalid(format!("limits.{key}"), "must be greater than 0"))
            } else {
                Ok(value)
            }
        };
        positive("max_frame_bytes", self.max_frame_bytes as u64)?;
        positive("outbound_queue_frames", self.outbound_queue_frames as u64)?;
        positive("outbound_queue_bytes", self.outbound_queue_bytes as u64)?;
        positive(
            "max_bulk_connection_ids",
            self.max_bulk_connection_ids as u64,
        )?;
        positive(
            "max_rooms_per_connection",
            self.max_rooms_per_connection as u64,
        )?;
        positive("outbound_memory_bytes", self.outbound_memory_bytes as u64)?;
        if self.ipv6_prefix_len == 0 || self.ipv6_prefix_len > 128 {
            return Err(invalid("limits.ipv6_prefix_len", "must be from 1 to 128"));
        }
        if self.max_message_bytes < self.max_frame_bytes {
            return Err(invalid(
                "limits.max_message_bytes",
                "must be at least limits.max_frame_bytes",
            ));
        }
        if self.max_message_bytes > MAX_MESSAGE_BYTES {
            return Err(invalid(
                "limits.max_message_bytes",
                format!("must be at most {MAX_MESSAGE_BYTES} (64 MiB)"),
            ));
        }
        Ok(Limits {
            max_frame_bytes: self.max_frame_bytes,
            max_message_bytes: self.max_message_bytes,
            idle_timeout: Duration::from_secs(positive(
                "idle_timeout_secs",
                self.idle_timeout_secs,
            )?),
            max_connection_duration: Duration::from_secs(positive(
                "max_connection_secs",
                self.max_connection_secs,
            )?),
            handshake_timeout: Duration::from_secs(positive(
                "handshake_timeout_secs",
                self.handshake_timeout_secs,
            )?),
            outbound_queue_frames: self.outbound_queue_frames,
            outbound_queue_bytes: self.outbound_queue_bytes,
            max_bulk_connection_ids: self.max_bulk_connection_ids,
            inbound: InboundRate {
                messages: rate(
                    "message_burst",
                    u64::from(self.messages_per_sec),
                    u64::from(self.message_burst),
                )?,
                bytes: rate("bytes_burst", self.bytes_per_sec, self.bytes_burst)?,
            },
            throttle_disconnect: Duration::from_secs(positive(
                "throttle_disconnect_secs",
                self.throttle_disconnect_secs,
            )?),
            max_rooms_per_connection: self.max_rooms_per_connection,
            per_ip: crate::limits::PerIpLimits {
                max_connections: self.max_connections_per_ip,
                connects: rate(
                    "connect_burst_per_ip",
                    u64::from(self.connects_per_sec_per_ip),
                    u64::from(self.connect_burst_per_ip),
                )?,
                resumes: rate(
                    "resume_burst_per_ip",
                    u64::from(self.resumes_per_sec_per_ip),
                    u64::from(self.resume_burst_per_ip),
                )?,
                ipv6_prefix_len: self.ipv6_prefix_len,
            },
            resumes_per_connection: rate(
                "resume_burst_per_connection",
                u64::from(self.resumes_per_sec_per_connection),
                u64::from(self.resume_burst_per_connection),
            )?,
            outbound_memory_bytes: self.outbound_memory_bytes,
        })
    }
}

/// A token bucket from its `*_per_sec` and `*_burst` keys: `None` when the rate is 0
/// (unlimited); a burst must hold at least one second's worth.
fn rate(
    burst_key: &str,
    per_sec: u64,
    burst: u64,
) -> Result<Option<crate::limits::Rate>, ConfigError> {
    if per_sec == 0 {
        return Ok(None);
    }
    if burst < per_sec {
        return Err(invalid(
            format!("limits.{burst_key}"),
            "must be at least the per-second rate",
        ));
    }
    Ok(Some(crate::limits::Rate { per_sec, burst }))
}
