//! Connection records mirrored to NATS, so that when a node dies another can tell the
//! backends which connections it held.
//!
//! Shards note changes here (a map coalesced by connectionId); every
//! `cluster.mirror_interval_ms` the changes are published to the `SB_{stage}_CONNECTIONS`
//! stream together and their acks awaited together. A new connection's record is the one
//! change waited for: it must be in the stream before `$connect` runs, and it goes out at
//! once, with whatever else is pending (a connect storm's records share their flushes).
//!
//! One subject per connection, one message kept per subject: a record is replaced by a
//! tombstone when the connection closes, and the tombstone expires by itself (a
//! per-message TTL), so the stream holds what is open, not what ever was.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Cluster;
use super::state::mirror::MirrorRecord;

/// How long a closed connection's tombstone stays in the stream.
const TOMBSTONE_TTL: &str = "60s";
/// Longest wait for one record while listing a lost node's records.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);

impl Cluster {
    /// Notes a new connection for the mirror.
    pub fn mirror_opened(&self, record: MirrorRecord) {
        self.mirror
            .note(&record.connection_id.clone(), Some(record));
    }

    /// Mirrors a new connection's record now; true once the stream acked it, false if it
    /// did not within `patience` (NATS out of reach: the record still goes out later, unless
    /// a [`Cluster::mirror_closed`] replaces it).
    pub async fn mirror_opening(&self, record: MirrorRecord, patience: Duration) -> bool {
        let (mirrored, acked) = tokio::sync::oneshot::channel();
        self.mirror.note_awaited(record, mirrored);
        matches!(tokio::time::timeout(patience, acked).await, Ok(Ok(())))
    }

    /// Notes a closed (and reported) connection for the mirror.
    pub fn mirror_closed(&self, connection_id: &str) {
        self.mirror.note(connection_id, None);
    }

    /// The open records in the mirror under `filter` (a node's, or one incarnation's),
    /// with the subject each is filed under.
    pub async fn mirrored_records(
        &self,
        filter: String,
    ) -> Result<Vec<(String, MirrorRecord)>, String> {
        let consumer = self
            .mirror
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut remaining = consumer.cached_info().num_pending;
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        // By subject, the last message seen: an ordered consumer that the client library had
        // to create again before it delivered anything replays every message, not the last
        // of each subject, and a record must not outlive its tombstone.
        let mut records = std::collections::BTreeMap::new();
        while remaining > 0 {
            let message = tokio::time::timeout(LIST_TIMEOUT, messages.next())
                .await
                .map_err(|_| "timed out listing the mirror".to_owned())?
                .ok_or("the mirror listing ended early")?
                .map_err(|e| e.to_string())?;
            remaining = message.info().map_or(0, |info| info.pending);
            let subject = message.subject.to_string();
            match serde_json::from_slice::<MirrorRecord>(&message.payload) {
                Ok(record) => records.insert(subject, record),
                Err(_) => records.remove(&subject),
            };
        }
        Ok(records.into_iter().collect())
    }

    /// Replaces the record filed under `subject` by a tombstone: a takeover reported it.
    /// (The tombstone tells a node that handed the connection over that its new node's
    /// takeover reported it, see [`Cluster::mirror_sequence`].)
    pub async fn mark_reported(&self, subject: String) {
        let published = (self.jetstream).publish_with_headers(subject, tombstone(), Bytes::new());
        let acked = match published.await {
            Ok(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        if let Err(error) = acked {
            tracing::warn!(%error, "cannot mark a reported connection in the mirror");
        }
    }

    /// Whether anything is filed under `subject` (a record, or the tombstone of one that
    /// closed or was reported).
    pub async fn was_mirrored(&self, subject: &str) -> Result<bool, String> {
        Ok(self.mirror_sequence(subject).await?.is_some())
    }

    /// The stream sequence of the last message filed under `subject`, if any: a later one
    /// means the node whose subject it is filed the connection since (a record), or its
    /// takeover reported it (a tombstone).
    pub async fn mirror_sequence(&self, subject: &str) -> Result<Option<u64>, String> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let last = self.mirror.stream.get_last_raw_message_by_subject(subject);
        match last.await {
            Ok(message) => Ok(Some(message.sequence)),
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(error) => Err(error.to_string()),
        }
    }

    /// Removes the records under `filter`: all of this incarnation's at a clean stop (each
    /// was reported by this node).
    pub async fn forget_mirrored(&self, filter: String) {
        if let Err(error) = self.mirror.stream.purge().filter(filter).await {
            tracing::warn!(%error, "cannot purge mirrored connection records");
        }
    }

    /// Publishes the pending changes; false if NATS refused (they stay pending).
    async fn flush_mirror(&self) -> bool {
        let pending = self.mirror.take();
        let changes = &pending.changes;
        if changes.is_empty() {
            return true;
        }
        // Each unawaited ack holds one of the JetStream context's permits (5,000 by default,
        // shared with heartbeats, queue appends and history): a connect storm publishing
        // them all before awaiting any would take every permit and wait for one forever,
        // and the node's heartbeats with it. So at most MIRROR_ACKS_IN_FLIGHT at a time.
        let mut acks: std::collections::VecDeque<async_nats::jetstream::context::PublishAckFuture> =
            std::collections::VecDeque::with_capacity(MIRROR_ACKS_IN_FLIGHT);
        let mut failed = false;
        for (id, record) in changes {
            if acks.len() == MIRROR_ACKS_IN_FLIGHT
                && let Some(oldest) = acks.pop_front()
                && oldest.await.is_err()
            {
                failed = true;
                break;
            }
            let subject = self
                .subjects
                .mirror_record(self.node_id, self.registry.epoch(), id);
            let published = match record {
                Some(record) => {
                    let payload = Bytes::from(serde_json::to_vec(record).unwrap_or_default());
                    self.jetstream.publish(subject, payload).await
                }
                None => {
                    (self.jetstream)
                        .publish_with_headers(subject, tombstone(), Bytes::new())
                        .await
                }
            };
            match published {
                Ok(ack) => acks.push_back(ack),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        for ack in acks {
            if ack.await.is_err() {
                failed = true;
            }
        }
        self.metrics()
            .cluster_forwarded
            .with_label_values(&["mirror"])
            .inc_by(changes.len() as u64);
        if failed {
            self.mirror.restore(pending);
        } else {
            for mirrored in pending.waiting {
                let _ = mirrored.send(());
            }
        }
        !failed
    }
}

/// The headers of a tombstone: it expires by itself after [`TOMBSTONE_TTL`].
fn tombstone() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-TTL", TOMBSTONE_TTL);
    headers
}

/// Mirror records published and not yet acknowledged, at most.
const MIRROR_ACKS_IN_FLIGHT: usize = 256;

/// Publishes the mirror's changes every `cluster.mirror_interval_ms`, and at once when a
/// connect waits for its record, until `shutdown`.
pub async fn flush_loop(cluster: Arc<Cluster>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(cluster.config.mirror_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
            _ = cluster.mirror.wanted.notified() => {}
        }
        // A flush waits for NATS; a shutdown does not wait for it (the node leaves the
        // cluster next, and its records go then).
        let flushed = tokio::select! {
            _ = shutdown.cancelled() => break,
            flushed = cluster.flush_mirror() => flushed,
        };
        if flushed == failing {
            if flushed {
                tracing::info!("connection records mirrored to NATS again");
            } else {
                tracing::warn!("cannot mirror connection records to NATS; retrying");
            }
            failing = !flushed;
        }
    }
}
