//! The gateway side of durable queues: opening the log, waking long-polls when entries
//! land, and the push deliverers that POST each entry to a queue's `deliver_to` URL.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use switchboard_storage::{FlushReport, QueueLog, Storage, StorageError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::QueueConfig;
use crate::metrics::Metrics;

/// The consumer group a push deliverer commits as.
pub const PUSH_GROUP: &str = "switchboard.push";
/// Entries a deliverer reads at a time (it still POSTs them one by one, in order).
const DELIVERY_READ: usize = 64;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// At most one warning per queue this often while deliveries keep failing.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(30);
/// A delivery attempt that takes longer than this counts as failed.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The queue log plus one watch per queue carrying its next offset.
pub struct QueueHub {
    pub log: QueueLog,
    next_offsets: Arc<HashMap<String, watch::Sender<u64>>>,
}

impl QueueHub {
    pub fn open(
        storage: &Storage,
        queues: &[QueueConfig],
        policy: switchboard_storage::FsyncPolicy,
        metrics: &Metrics,
    ) -> Result<Self, StorageError> {
        let next_offsets: Arc<HashMap<String, watch::Sender<u64>>> = Arc::new(
            queues
                .iter()
                .map(|q| (q.name.clone(), watch::Sender::new(0)))
                .collect(),
        );
        let signals = next_offsets.clone();
        let appended = Arc::new(move |queue: &str, next: u64| {
            if let Some(sender) = signals.get(queue) {
                sender.send_if_modified(|current| {
                    let changed = *current != next;
                    *current = next;
                    changed
                });
            }
        });
        let flush_metrics = metrics.clone();
        let on_flush = Arc::new(move |report: FlushReport| {
            flush_metrics
                .storage_flush_duration
                .observe(report.flush.as_secs_f64());
            flush_metrics
                .queue_flush_batch_size
                .observe(report.entries as f64);
        });
        let specs: Vec<_> = queues
            .iter()
            .map(|q| (q.name.clone(), q.retention))
            .collect();
        let log = storage.open_queue_log(&specs, policy, appended, on_flush)?;
        for queue in queues {
            let (_, next) = log.bounds(&queue.name)?;
            if let Some(sender) = next_offsets.get(&queue.name) {
                sender.send_replace(next);
            }
        }
        Ok(Self { log, next_offsets })
    }

    /// Watches `queue`'s next offset; `None` for an unknown queue.
    pub fn watch(&self, queue: &str) -> Option<watch::Receiver<u64>> {
        self.next_offsets.get(queue).map(watch::Sender::subscribe)
    }

    /// Refreshes the depth and lag gauges (called when /metrics is scraped).
    pub fn update_gauges(&self, metrics: &Metrics) {
        for queue in self.next_offsets.keys() {
            let Ok((first, next)) = self.log.bounds(queue) else {
                continue;
            };
            metrics
                .queue_depth
                .with_label_values(&[queue.as_str()])
                .set((next - first) as i64);
            for (group, committed) in self.log.groups(queue).unwrap_or_default() {
                metrics
                    .queue_consumer_lag
                    .with_label_values(&[queue.as_str(), group.as_str()])
                    .set(next.saturating_sub(committed) as i64);
            }
        }
    }
}

/// POSTs every entry of `queue` to `url` in offset order, retrying each with exponential
/// backoff and jitter until it gets a 2xx, committing as [`PUSH_GROUP`] after each. Starts
/// from the committed offset, so it resumes where it stopped, across restarts.
pub async fn deliver(
    hub: Arc<QueueHub>,
    queue: String,
    url: reqwest::Url,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let Some(mut next_offset) = hub.watch(&queue) else {
        return;
    };
    let http = crate::integration::HttpIntegration::new();
    let mut position = match hub.log.committed(&queue, PUSH_GROUP) {
        Ok(offset) => offset,
        Err(error) => {
            tracing::error!(%queue, %error, "push deliverer cannot read its offset");
            return;
        }
    };
    loop {
        let (first, _) = hub.log.bounds(&queue).unwrap_or((position, position));
        position = position.max(first);
        let entries = match hub.log.read(&queue, position, DELIVERY_READ) {
            Ok(entries) => entries,
            Err(error) => {
                tracing::error!(%queue, %error, "push deliverer cannot read the queue");
                return;
            }
        };
        if entries.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = next_offset.wait_for(|next| *next > position) => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            continue;
        }
        for entry in entries {
            if !deliver_one(&http, &queue, &url, entry.payload, &metrics, &shutdown).await {
                return;
            }
            position = entry.offset + 1;
            if let Err(error) = hub.log.commit(&queue, PUSH_GROUP, position) {
                tracing::error!(%queue, %error, "push deliverer cannot commit");
            }
        }
    }
}

/// Retries one entry until a 2xx; false if shutdown came first.
pub(crate) async fn deliver_one(
    http: &crate::integration::HttpIntegration,
    queue: &str,
    url: &reqwest::Url,
    payload: Vec<u8>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = BACKOFF_START;
    let mut failures = 0u64;
    let mut last_logged: Option<std::time::Instant> = None;
    loop {
        let outcome = http.call(url, DELIVERY_TIMEOUT, payload.clone()).await;
        let delivered = matches!(&outcome, Ok(reply) if reply.is_success());
        if !delivered {
            failures += 1;
            // The first failure and then one line per interval: a backend that is down
            // for an hour is reported, not logged thousands of times.
            if last_logged.is_none_or(|at| at.elapsed() >= FAILURE_LOG_INTERVAL) {
                let problem = match &outcome {
                    Ok(reply) => format!("answered {}", reply.http_status),
                    Err(error) => error.to_string(),
                };
                tracing::warn!(%queue, %url, failures, %problem, "push delivery failing; retrying with backoff");
                last_logged = Some(std::time::Instant::now());
            }
        } else if failures > 0 {
            tracing::info!(%queue, failures, "push delivery recovered");
        }
        let result = if delivered { "ok" } else { "error" };
        metrics
            .queue_delivery_attempts
            .with_label_values(&[queue, result])
            .inc();
        if delivered {
            return true;
        }
        let pause = with_jitter(backoff);
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(pause) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// `base` plus up to 50% random jitter, so deliverers do not retry in lockstep.
fn with_jitter(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let fraction = f64::from(nanos % 1000) / 2000.0;
    base + base.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_again() {
        for _ in 0..100 {
            let pause = with_jitter(Duration::from_millis(100));
            assert!(pause >= Duration::from_millis(100) && pause <= Duration::from_millis(150));
        }
    }
}
