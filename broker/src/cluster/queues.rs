//! Durable queues in cluster mode: one JetStream stream per queue (replicated over the
//! NATS cluster's servers), so an acked message survives the node that took it, and any
//! node can serve the pull API or run the push delivery.
//!
//! The contract is the local log's: an entry's offset is its stream sequence less one;
//! a group's committed offset (the next to read, never moving backwards) lives in the
//! `sb_{stage}_offsets` key-value bucket. Push delivery is a durable JetStream consumer
//! with a pinned-client priority group: every node pulls from it, the server delivers to
//! one node's pull stream only, so one node delivers at a time, in order, in batches of
//! `batch_size` with up to `max_in_flight` at once; when that node dies its unacked
//! messages go, first, to the node the pin moves to.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, kv};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Cluster;
use super::state::queues::{QueueError, StreamEntry, jetstream_error, offset_key};
use super::subjects::{hex, unhex};
use crate::config::{PushConfig, PushFormat};

/// The push consumer's name on every queue stream.
const PUSH_CONSUMER: &str = "switchboard-push";
/// How long a delivering node may hold a message without a word before another node gets
/// it: how soon delivery resumes after the delivering node dies.
const PUSH_ACK_WAIT: Duration = Duration::from_secs(5);
/// How often a deliverer tells JetStream it is still working on its message (a POST may
/// take up to its 30 s timeout, and retries take longer).
const PROGRESS_EVERY: Duration = Duration::from_millis(1500);
/// How long one pull of the push stream lasts before the next (well below the pin
/// timeout, so the pinned node keeps its pin).
const PUSH_PULL_EXPIRES: Duration = Duration::from_secs(1);
/// The push consumer's priority group: the server pins one node's pull stream in it.
const PUSH_GROUP_NAME: &str = "push";
/// How long a pinned node may stop pulling before the pin moves to another node: past the
/// ack wait, so the dead node's unacked messages are due for redelivery, first, to the
/// new pinned node, and order holds.
const PUSH_PIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a batch waits for more messages after its first.
const BATCH_GATHER: Duration = Duration::from_millis(5);
/// Longest wait for an entry known to be in the stream.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

impl Cluster {
    /// Appends events (queue, payload) in order; each answer is the event's offset once
    /// JetStream has stored it (on a quorum of replicas). The publishes leave one after
    /// another, under one lock for the whole node, so a client's events are stored in the
    /// order it sent them; their acks are awaited together.
    pub async fn append_all(
        &self,
        appends: impl IntoIterator<Item = (Arc<str>, Vec<u8>)>,
    ) -> Vec<Result<u64, QueueError>> {
        let mut pending = Vec::new();
        {
            let _in_order = self.queues.publishing.lock().await;
            for (queue, payload) in appends {
                let sent = self
                    .jetstream
                    .publish(self.subjects.queue(&queue), Bytes::from(payload))
                    .await
                    .map_err(jetstream_error);
                pending.push(sent);
            }
        }
        self.metrics()
            .cluster_forwarded
            .with_label_values(&["queue"])
            .inc_by(pending.len() as u64);
        let mut offsets = Vec::with_capacity(pending.len());
        for sent in pending {
            let stored = match sent {
                Ok(ack) => ack
                    .await
                    .map(|ack| ack.sequence.saturating_sub(1))
                    .map_err(jetstream_error),
                Err(error) => Err(error),
            };
            offsets.push(stored);
        }
        crate::crash::reached(crate::crash::Point::QueueAppended);
        offsets
    }

    /// The first retained offset and the next offset to be written.
    pub async fn queue_bounds(&self, queue: &str) -> Result<(u64, u64), QueueError> {
        let info = self
            .queues
            .stream(queue)?
            .get_info()
            .await
            .map_err(jetstream_error)?;
        let next = info.state.last_sequence;
        let first = info.state.first_sequence.saturating_sub(1).min(next);
        Ok((first, next))
    }

    /// `group`'s committed offset (0 if it never committed), as its bucket's leader has it:
    /// the bucket's own reads may be answered by any replica, a lagging one too.
    pub async fn committed(&self, queue: &str, group: &str) -> Result<u64, QueueError> {
        let key = offset_key(queue, group);
        let value = super::state::latest_value(&self.queues.offsets, &key).await;
        Ok(value.map_err(jetstream_error)?.map_or(0, parse_offset))
    }

    /// Commits `offset` for `group`; never moves backwards. Returns the stored offset.
    pub async fn commit(&self, queue: &str, group: &str, offset: u64) -> Result<u64, QueueError> {
        let key = offset_key(queue, group);
        let store = &self.queues.offsets;
        loop {
            let current = super::state::latest_entry(store, &key).await;
            let current = current.map_err(jetstream_error)?;
            let stored = (current.as_ref())
                .filter(|entry| entry.operation == kv::Operation::Put)
                .map_or(0, |entry| parse_offset(entry.value.clone()));
            let revision = current.map(|entry| entry.revision);
            if stored >= offset {
                return Ok(stored);
            }
            let value = Bytes::from(offset.to_string());
            let written = match revision {
                Some(revision) => store.update(&key, value, revision).await.is_ok(),
                None => store.create(&key, value).await.is_ok(),
            };
            if written {
                return Ok(offset);
            }
            // Another node committed meanwhile: read again.
        }
    }

    /// Up to `max` entries from offset `from`; waits up to `wait` for one if there are
    /// none.
    pub async fn read_queue(
        &self,
        queue: &str,
        from: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<StreamEntry>, QueueError> {
        let (_, next) = self.queue_bounds(queue).await?;
        if next <= from && wait.is_zero() {
            return Ok(Vec::new());
        }
        let consumer = self
            .queues
            .stream(queue)?
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(jetstream_error)?;
        let mut messages = consumer.messages().await.map_err(jetstream_error)?;
        let first_wait = if next > from { READ_TIMEOUT } else { wait };
        let mut entries = Vec::new();
        let mut timeout = first_wait;
        while entries.len() < max {
            let Ok(Some(message)) = tokio::time::timeout(timeout, messages.next()).await else {
                break;
            };
            let message = message.map_err(jetstream_error)?;
            let Ok(info) = message.info() else {
                break;
            };
            let (sequence, pending) = (info.stream_sequence, info.pending);
            // An ordered consumer that the client library had to create again before it
            // delivered anything starts from the stream's first message, not from `from`.
            if sequence <= from {
                continue;
            }
            entries.push(StreamEntry {
                offset: sequence.saturating_sub(1),
                payload: message.payload.clone(),
            });
            if pending == 0 {
                break;
            }
            timeout = READ_TIMEOUT;
        }
        Ok(entries)
    }
}

impl Cluster {
    /// Refreshes the queue depth and consumer lag gauges from JetStream (at scrape time).
    pub async fn update_queue_gauges(&self) {
        let metrics = self.metrics();
        let offset_keys = self.offset_keys().await;
        for queue in self.queues.streams.keys() {
            let Ok((first, next)) = self.queue_bounds(queue).await else {
                continue;
            };
            metrics
                .queue_depth
                .with_label_values(&[queue.as_str()])
                .set((next - first) as i64);
            let prefix = format!("{}.", hex(queue));
            let groups = offset_keys
                .iter()
                .filter_map(|key| key.strip_prefix(&prefix).and_then(unhex));
            for group in groups {
                if let Ok(committed) = self.committed(queue, &group).await {
                    metrics
                        .queue_consumer_lag
                        .with_label_values(&[queue.as_str(), group.as_str()])
                        .set(next.saturating_sub(committed) as i64);
                }
            }
        }
    }

    /// Every key of the offsets bucket (`{hex queue}.{hex group}`), listed once per scrape.
    async fn offset_keys(&self) -> Vec<String> {
        let Ok(keys) = self.queues.offsets.keys().await else {
            return Vec::new();
        };
        keys.filter_map(|key| async move { key.ok() })
            .collect()
            .await
    }
}

/// Pulls `queue`'s push consumer a batch at a time and POSTs each batch to `url` until a
/// 2xx, then acks its messages. Every node runs this, but the consumer pins one node's pull
/// stream (JetStream priority groups) and delivers only to it, so one node delivers at a
/// time, in order; when it dies, the pin moves after [`PUSH_PIN_TIMEOUT`] and its unacked
/// messages are redelivered first. At most `batch_size × max_in_flight` messages are
/// unacknowledged at once.
pub(super) async fn deliver(
    cluster: Arc<Cluster>,
    queue: String,
    url: reqwest::Url,
    (push, format): (PushConfig, PushFormat),
    metrics: crate::metrics::Metrics,
    shutdown: CancellationToken,
) {
    let http = crate::integration::HttpIntegration::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        let consumer = match push_consumer(&cluster, &queue, push).await {
            Ok(consumer) => consumer,
            Err(error) => {
                tracing::warn!(%queue, %error, "push consumer unavailable; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        // One stream per run of this loop: the server pins one node's stream and delivers
        // only to it; the others stand by until it stops pulling.
        let mut messages = match consumer
            .stream()
            .group(PUSH_GROUP_NAME)
            .max_messages_per_batch(push.batch_size)
            .expires(PUSH_PULL_EXPIRES)
            .messages()
            .await
        {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(%queue, %error, "push stream unavailable; retrying");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let mut in_flight: std::collections::VecDeque<tokio::task::JoinHandle<()>> =
            std::collections::VecDeque::new();
        loop {
            in_flight.retain(|task| !task.is_finished());
            if in_flight.len() >= push.max_in_flight {
                if let Some(oldest) = in_flight.pop_front() {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = oldest => {}
                    }
                }
                continue;
            }
            let batch = tokio::select! {
                _ = shutdown.cancelled() => return,
                batch = next_batch(&mut messages, push.batch_size) => batch,
            };
            let Some(batch) = batch else {
                break; // the stream failed: make it again
            };
            let delivery = PushBatch {
                http: http.clone(),
                queue: queue.clone(),
                url: url.clone(),
                format: format.clone(),
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
            };
            in_flight.push_back(tokio::spawn(delivery.run(batch, push.batch_size)));
        }
    }
}

/// The next batch from the pinned pull stream: the first message whenever it comes,
/// then whatever follows within [`BATCH_GATHER`], up to `size`. `None` if the stream
/// failed.
async fn next_batch(
    messages: &mut consumer::pull::Stream,
    size: usize,
) -> Option<Vec<jetstream::Message>> {
    let first = messages.next().await?.ok()?;
    let mut batch = vec![first];
    while batch.len() < size {
        match tokio::time::timeout(BATCH_GATHER, messages.next()).await {
            Ok(Some(Ok(message))) => batch.push(message),
            Ok(Some(Err(_)) | None) => return None,
            Err(_) => break,
        }
    }
    Some(batch)
}

/// One batch's delivery, on its own task.
struct PushBatch {
    http: crate::integration::HttpIntegration,
    queue: String,
    url: reqwest::Url,
    format: PushFormat,
    metrics: crate::metrics::Metrics,
    shutdown: CancellationToken,
}

impl PushBatch {
    /// POSTs `messages` until a 2xx, telling JetStream meanwhile that they are being
    /// worked on, then acks them.
    async fn run(self, messages: Vec<jetstream::Message>, batch_size: usize) {
        self.metrics
            .queue_push_batch_size
            .observe(messages.len() as f64);
        let events = messages.iter().map(|m| m.payload.to_vec()).collect();
        let request = self.format.request(events, batch_size);
        let progress = async {
            loop {
                tokio::time::sleep(PROGRESS_EVERY).await;
                for message in &messages {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
            }
        };
        // `progress` never ends: the select ends with the delivery.
        let delivered = tokio::select! {
            delivered = crate::queues::deliver_one(&self.http, &self.queue, &self.url, request, &self.metrics, &self.shutdown) => delivered,
            _ = progress => false,
        };
        if !delivered {
            return;
        }
        crate::crash::reached(crate::crash::Point::PushDelivered);
        for message in &messages {
            if let Err(error) = message.double_ack().await {
                tracing::warn!(queue = %self.queue, %error, "push delivery ack failed; it may be delivered again");
            }
        }
    }
}

async fn push_consumer(
    cluster: &Cluster,
    queue: &str,
    push: PushConfig,
) -> Result<consumer::Consumer<consumer::pull::Config>, QueueError> {
    // Create or update: a changed batch size or window takes effect at the next start.
    cluster
        .queues
        .stream(queue)?
        .create_consumer(consumer::pull::Config {
            durable_name: Some(PUSH_CONSUMER.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: PUSH_ACK_WAIT,
            max_ack_pending: (push.batch_size * push.max_in_flight) as i64,
            priority_policy: consumer::PriorityPolicy::PinnedClient,
            priority_groups: vec![PUSH_GROUP_NAME.into()],
            priority_timeout: PUSH_PIN_TIMEOUT,
            ..Default::default()
        })
        .await
        .map_err(jetstream_error)
}

/// A committed offset as the bucket stores it (decimal text; 0 if it is not that).
fn parse_offset(value: Bytes) -> u64 {
    (std::str::from_utf8(&value).ok())
        .and_then(|text| text.parse().ok())
        .unwrap_or(0)
}
