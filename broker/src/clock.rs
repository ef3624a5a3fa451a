//! Wall-clock time in the formats AWS puts on the wire.

use std::time::{SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;
use time::format_description::{BorrowedFormatItem, well_known::Rfc3339};

/// `requestTime`'s format: `25/Nov/2026:06:44:28 +0000`, checked at compile time.
const REQUEST_TIME: &[BorrowedFormatItem<'static>] = time::macros::format_description!(
    "[day]/[month repr:short]/[year]:[hour]:[minute]:[second] +0000"
);

/// Moves this process's wall clock by so many milliseconds (either way): a fault the chaos
/// tests inject into one node (docs/RELIABILITY.md). Unset in production.
const SKEW_VARIABLE: &str = "SWITCHBOARD_FAKE_CLOCK_SKEW_MS";

/// The wall clock as this process reads it: the system's, moved by [`SKEW_VARIABLE`].
pub fn now() -> SystemTime {
    static SKEW_MS: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let skew = *SKEW_MS.get_or_init(|| {
        let value = std::env::var(SKEW_VARIABLE).ok();
        value.and_then(|v| v.parse().ok()).unwrap_or(0)
    });
    let by = std::time::Duration::from_millis(skew.unsigned_abs());
    if skew >= 0 {
        SystemTime::now() + by
    } else {
        SystemTime::now() - by
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn datetime(epoch_ms: u64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(epoch_ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// `dd/MMM/yyyy:HH:mm:ss +0000`, as in `requestContext.requestTime`.
pub fn request_time(epoch_ms: u64) -> String {
    datetime(epoch_ms).format(REQUEST_TIME).unwrap_or_default()
}

/// ISO-8601 (RFC 3339, UTC), as in the `GET @connections` response.
pub fn iso8601(epoch_ms: u64) -> String {
    datetime(epoch_ms).format(&Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_match_aws() {
        let ms = 1_764_053_068_123; // 2025-11-25T06:44:28.123Z
        assert_eq!(request_time(ms), "25/Nov/2025:06:44:28 +0000");
        assert_eq!(iso8601(ms), "2025-11-25T06:44:28.123Z");
    }
}
