//! Connection records mirrored to NATS, so that when a node dies another can tell the
//! backends which connections it held.
//!
//! Shards note opens and closes here (a map coalesced by connectionId, never a NATS round
//! trip on the connect path); every `cluster.mirror_interval_ms` the changes are
//! published to the `SB_{stage}_CONNECTIONS` stream together and their acks awaited
//! together. One subject per connection, one message kept per subject: a record is
//! replaced by a tombstone when the connection closes, and the tombstone expires by
//! itself (a per-message TTL), so the stream holds what is open, not what ever was.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::subjects::Subjects;
use super::{Cluster, ClusterError};

/// How long a closed connection's tombstone stays in the stream.
const TOMBSTONE_TTL: &str = "60s";
/// Longest wait for one record while listing a lost node's records.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a surviving node needs to report a connection to `$disconnect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorRecord {
    pub connection_id: String,
    pub connected_at_ms: u64,
    pub source_ip: String,
    pub user_agent: String,
    /// What the `$connect` authorizer passed on (JSON text), so the takeover's
    /// `$disconnect` event carries `requestContext.authorizer` like the node's own would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorizer: Option<String>,
}

impl MirrorRecord {
    /// The record of a connection as its session knows it.
    pub fn of(facts: &crate::event::ConnectionFacts) -> Self {
        Self {
            connection_id: facts.connection_id.clone(),
            connected_at_ms: facts.connected_at_ms,
            source_ip: facts.source_ip.clone(),
            user_agent: facts.user_agent.clone(),
            authorizer: facts.authorizer.as_ref().map(|raw| raw.get().to_owned()),
        }
    }

    /// The authorizer context, as events carry it.
    pub fn authorizer_context(&self) -> Option<std::sync::Arc<serde_json::value::RawValue>> {
        let text = self.authorizer.clone()?;
        serde_json::value::RawValue::from_string(text)
            .ok()
            .map(Into::into)
    }
}

/// The mirror stream and the changes not yet published.
pub struct Mirror {
    stream: stream::Stream,
    /// connectionId → its record (opened) or `None` (closed), coalesced.
    pending: Mutex<HashMap<String, Option<MirrorRecord>>>,
}

impl Mirror {
    pub async fn open(
        jetstream: &jetstream::Context,
        subjects: &Subjects,
        replicas: usize,
    ) -> Result<Self, ClusterError> {
        let stream = jetstream
            .get_or_create_stream(stream::Config {
                name: subjects.mirror_stream(),
                subjects: vec![subjects.mirror_all()],
                max_messages_per_subject: 1,
                num_replicas: replicas,
                allow_message_ttl: true,
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::JetStream(e.to_string()))?;
        Ok(Self {
            stream,
            pending: Mutex::new(HashMap::new()),
        })
    }

    fn note(&self, connection_id: &str, record: Option<MirrorRecord>) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(connection_id.to_owned(), record);
        }
    }

    fn take(&self) -> HashMap<String, Option<MirrorRecord>> {
        self.pending
            .lock()
            .map(|mut pending| std::mem::take(&mut *pending))
            .unwrap_or_default()
    }

    /// Puts back changes that could not be published; newer ones win.
    fn restore(&self, unsent: HashMap<String, Option<MirrorRecord>>) {
        if let Ok(mut pending) = self.pending.lock() {
            for (id, record) in unsent {
                pending.entry(id).or_insert(record);
            }
        }
    }
}

impl Cluster {
    /// Notes a new connection for the mirror.
    pub fn mirror_opened(&self, record: MirrorRecord) {
        self.mirror
            .note(&record.connection_id.clone(), Some(record));
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
        let mut records = Vec::new();
        while remaining > 0 {
            let message = tokio::time::timeout(LIST_TIMEOUT, messages.next())
                .await
                .map_err(|_| "timed out listing the mirror".to_owned())?
                .ok_or("the mirror listing ended early")?
                .map_err(|e| e.to_string())?;
            remaining = message.info().map_or(0, |info| info.pending);
            if let Ok(record) = serde_json::from_slice::<MirrorRecord>(&message.payload) {
                records.push((message.subject.to_string(), record));
            }
        }
        Ok(records)
    }

    /// Removes the records under `filter`: one reported by a takeover, or all of this
    /// incarnation's at a clean stop (each was reported by this node).
    pub async fn forget_mirrored(&self, filter: String) {
        if let Err(error) = self.mirror.stream.purge().filter(filter).await {
            tracing::warn!(%error, "cannot purge mirrored connection records");
        }
    }

    /// Publishes the pending changes; false if NATS refused (they stay pending).
    async fn flush_mirror(&self) -> bool {
        let changes = self.mirror.take();
        if changes.is_empty() {
            return true;
        }
        let mut acks = Vec::with_capacity(changes.len());
        let mut failed = false;
        for (id, record) in &changes {
            let subject = self
                .subjects
                .mirror_record(self.node_id, self.registry.epoch(), id);
            let published = match record {
                Some(record) => {
                    let payload = Bytes::from(serde_json::to_vec(record).unwrap_or_default());
                    self.jetstream.publish(subject, payload).await
                }
                None => {
                    let mut headers = HeaderMap::new();
                    headers.insert("Nats-TTL", TOMBSTONE_TTL);
                    self.jetstream
                        .publish_with_headers(subject, headers, Bytes::new())
                        .await
                }
            };
            match published {
                Ok(ack) => acks.push(ack),
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
            self.mirror.restore(changes);
        }
        !failed
    }
}

/// Publishes the mirror's changes every `cluster.mirror_interval_ms` until `shutdown`,
/// then once more.
pub async fn flush_loop(cluster: Arc<Cluster>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(cluster.config.mirror_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let flushed = cluster.flush_mirror().await;
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
