//! The gateway side of durable queues: opening the log, waking long-polls when entries
//! land, and the push deliverers that POST each entry to a queue's `deliver_to` URL.

pub mod config;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use switchboard_storage::{FlushReport, QueueLog, Read, Storage, StorageError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use config::{PushConfig, PushFormat, QueueConfig};

/// The consumer group a push deliverer commits as.
pub const PUSH_GROUP: &str = "switchboard.push";
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
        config: &config::StorageConfig,
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
        let log =
            storage.open_queue_log(&specs, config.fsync, config.repair, appended, on_flush)?;
        metrics
            .queue_recovered_bytes
            .inc_by(log.recovery().truncated_bytes);
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

    /// Reads up to `max` entries of `queue` from `from` on. The management runtime that
    /// serves the API and the push deliverers has one worker, which must not wait for the
    /// writer while it starts a segment (syncing the one before, as slow as the disk): such
    /// a read goes to a blocking thread. The others read on the worker: the entries are in
    /// the page cache as a rule, and a thread hop each would cost push delivery a tenth of
    /// its rate; a read of entries the page cache no longer holds waits for the disk there.
    pub async fn read(&self, queue: &str, from: u64, max: usize) -> Result<Read, StorageError> {
        if let Some(read) = self.log.try_read(queue, from, max) {
            return read;
        }
        let (log, queue) = (self.log.clone(), queue.to_owned());
        match tokio::task::spawn_blocking(move || log.read(&queue, from, max)).await {
            Ok(read) => read,
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            // Cancelled before it ran (the runtime is shutting down): nothing was read.
            Err(_) => Ok(Read {
                entries: Vec::new(),
                next: from,
            }),
        }
    }

    /// Refreshes the depth and lag gauges (called when /metrics is scraped).
    pub fn update_gauges(&self, metrics: &Metrics) {
        for (queue, segments, bytes) in self.log.segment_stats() {
            let queue = [&*queue];
            metrics
                .queue_segments
                .with_label_values(&queue)
                .set(segments as i64);
            metrics
                .queue_stored_bytes
                .with_label_values(&queue)
                .set(bytes as i64);
        }
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

/// POSTs the entries of `queue` to `url`: `push.batch_size` per request (one entry: the
/// event itself; more: `{"Records": [...]}`), up to `push.max_in_flight` requests at once,
/// each retried with exponential backoff and jitter until it gets a 2xx. The push group's
/// committed offset only moves past a batch once every batch before it was delivered, so a
/// restart resumes at the first undelivered entry (entries of later batches delivered
/// before a crash may be delivered again: at-least-once).
pub async fn deliver(
    hub: Arc<QueueHub>,
    queue: String,
    url: reqwest::Url,
    (push, format): (PushConfig, PushFormat),
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let Some(mut next_offset) = hub.watch(&queue) else {
        return;
    };
    let http = crate::integration::HttpIntegration::new();
    let mut next_read = match hub.log.committed(&queue, PUSH_GROUP) {
        Ok(offset) => offset,
        Err(error) => {
            tracing::error!(%queue, %error, "push deliverer cannot read its offset");
            return;
        }
    };
    // Batches being delivered, answered in offset order with the offset after each.
    let mut in_flight = futures_util::stream::FuturesOrdered::new();
    // After a failed read: when to read again, and how long the next pause is.
    let mut read_again_at: Option<tokio::time::Instant> = None;
    let mut read_backoff = BACKOFF_START;
    loop {
        while in_flight.len() < push.max_in_flight && read_again_at.is_none() {
            let (first, _) = hub.log.bounds(&queue).unwrap_or((next_read, next_read));
            next_read = next_read.max(first);
            let read = match hub.read(&queue, next_read, push.batch_size).await {
                Ok(read) => read,
                Err(error) => {
                    // A disk error may pass; corruption needs the operator (`repair`).
                    // Either way nothing is skipped: the read is retried with backoff.
                    tracing::error!(%queue, %error, "push deliverer cannot read the queue; retrying");
                    read_again_at = Some(tokio::time::Instant::now() + with_jitter(read_backoff));
                    read_backoff = (read_backoff * 2).min(BACKOFF_MAX);
                    break;
                }
            };
            read_backoff = BACKOFF_START;
            let entries = read.entries;
            // Offsets without entries (a crash or a repair left them) are passed over.
            next_read = read.next;
            if entries.is_empty() {
                break;
            }
            let end = next_read;
            metrics.queue_push_batch_size.observe(entries.len() as f64);
            let events: Vec<Vec<u8>> = events(&queue, entries).map(|(_, e)| e).collect();
            // Nothing readable in it (see `events`): passed over in order, not delivered.
            let request = (!events.is_empty()).then(|| format.request(events, push.batch_size));
            let (http, queue, url, metrics, shutdown) = (&http, &queue, &url, &metrics, &shutdown);
            in_flight.push_back(async move {
                match request {
                    Some(request) => deliver_one(http, queue, url, request, metrics, shutdown)
                        .await
                        .then_some(end),
                    None => Some(end),
                }
            });
        }
        let window_full = in_flight.len() >= push.max_in_flight;
        let read_paused = read_again_at.is_some();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(read_again_at.unwrap_or_else(tokio::time::Instant::now)), if read_paused => {
                read_again_at = None;
            }
            delivered = in_flight.next(), if !in_flight.is_empty() => match delivered {
                Some(Some(end)) => {
                    crate::crash::reached(crate::crash::Point::PushDelivered);
                    if let Err(error) = hub.log.commit(&queue, PUSH_GROUP, end) {
                        tracing::error!(%queue, %error, "push deliverer cannot commit");
                    }
                }
                _ => return,
            },
            changed = next_offset.wait_for(|next| *next > next_read), if !window_full && !read_paused => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// The event JSON of each entry read from the local log, with its offset. An entry that
/// cannot be rebuilt (it passed its checksum, so only a format this build does not know)
/// is logged and skipped, not served as something else.
pub(crate) fn events(
    queue: &str,
    entries: Vec<switchboard_storage::QueueEntry>,
) -> impl Iterator<Item = (u64, Vec<u8>)> {
    let mut rebuilder = crate::stored_event::Rebuilder::default();
    entries.into_iter().filter_map(move |entry| {
        match rebuilder.event(entry.context.as_ref(), &entry.payload) {
            Ok(event) => Some((entry.offset, event)),
            Err(error) => {
                tracing::error!(%queue, offset = entry.offset, %error, "queue entry cannot be read; skipped");
                None
            }
        }
    })
}

/// The body of one push: the event itself with a batch size of 1 (what an AWS-style
/// backend expects), else `{"Records": [event, ...]}` (as SQS hands batches to Lambda).
pub(crate) fn push_body(events: impl Iterator<Item = Vec<u8>>, batch_size: usize) -> Vec<u8> {
    let mut events = events.peekable();
    if batch_size == 1 {
        return events.next().unwrap_or_default();
    }
    let mut body = b"{\"Records\":[".to_vec();
    while let Some(event) = events.next() {
        body.extend_from_slice(&event);
        if events.peek().is_some() {
            body.push(b',');
        }
    }
    body.extend_from_slice(b"]}");
    body
}

/// One push: its body, and its signature if it is a webhook's.
pub(crate) struct PushRequest {
    body: Vec<u8>,
    signature: Option<String>,
}

impl PushFormat {
    /// The request that pushes `events` (entries read from the queue, oldest first).
    pub(crate) fn request(&self, events: Vec<Vec<u8>>, batch_size: usize) -> PushRequest {
        match self {
            Self::Events => PushRequest {
                body: push_body(events.into_iter(), batch_size),
                signature: None,
            },
            Self::Webhook { secret } => {
                let body = crate::webhooks::body(events.into_iter(), crate::clock::now_ms());
                let signature = crate::webhooks::signature(secret, &body);
                PushRequest {
                    body,
                    signature: Some(signature),
                }
            }
        }
    }
}

/// Retries one push until a 2xx; false if shutdown came first.
pub(crate) async fn deliver_one(
    http: &crate::integration::HttpIntegration,
    queue: &str,
    url: &reqwest::Url,
    request: PushRequest,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = BACKOFF_START;
    let mut failures = 0u64;
    let mut last_logged: Option<std::time::Instant> = None;
    let signature = (request.signature.as_deref())
        .map(|signature| (crate::webhooks::SIGNATURE_HEADER, signature));
    loop {
        let body = request.body.clone();
        let outcome = http.call_with(url, DELIVERY_TIMEOUT, body, signature).await;
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
    fn a_batch_is_the_event_itself_or_records() {
        let events = || vec![br#"{"a":1}"#.to_vec(), br#"{"b":2}"#.to_vec()].into_iter();
        assert_eq!(push_body(events().take(1), 1), br#"{"a":1}"#.to_vec());
        let batch: serde_json::Value = serde_json::from_slice(&push_body(events(), 10)).unwrap();
        assert_eq!(batch, serde_json::json!({"Records": [{"a": 1}, {"b": 2}]}));
        let one: serde_json::Value =
            serde_json::from_slice(&push_body(events().take(1), 10)).unwrap();
        assert_eq!(one, serde_json::json!({"Records": [{"a": 1}]}));
    }

    #[test]
    fn jitter_stays_within_half_again() {
        for _ in 0..100 {
            let pause = with_jitter(Duration::from_millis(100));
            assert!(pause >= Duration::from_millis(100) && pause <= Duration::from_millis(150));
        }
    }
}
