//! The record mirror's state: the stream every node's connection records are mirrored to,
//! and the changes not yet published (see [`crate::cluster::mirror`]).

use std::collections::HashMap;
use std::sync::Mutex;

use async_nats::jetstream::{self, stream};
use serde::{Deserialize, Serialize};

use crate::cluster::error::ClusterError;
use crate::cluster::subjects::Subjects;

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
    /// The rooms it is in, so that the node that reports it lost tells those rooms it left.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rooms: Vec<String>,
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
            rooms: Vec::new(),
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

/// Told once the changes it waited for are acked by the stream.
pub(in crate::cluster) type Mirrored = tokio::sync::oneshot::Sender<()>;

/// The mirror stream and the changes not yet published.
pub struct Mirror {
    pub(in crate::cluster) stream: stream::Stream,
    /// connectionId → its record (opened) or `None` (closed), coalesced; and who waits for
    /// them to be acked.
    pending: Mutex<Pending>,
    /// Woken when someone waits: the changes go out now, not at the next interval.
    pub(in crate::cluster) wanted: tokio::sync::Notify,
}

/// Changes not yet published, and who waits for them.
#[derive(Default)]
pub(in crate::cluster) struct Pending {
    pub(in crate::cluster) changes: HashMap<String, Option<MirrorRecord>>,
    pub(in crate::cluster) waiting: Vec<Mirrored>,
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
            pending: Mutex::new(Pending::default()),
            wanted: tokio::sync::Notify::new(),
        })
    }

    pub(in crate::cluster) fn note(&self, connection_id: &str, record: Option<MirrorRecord>) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.changes.insert(connection_id.to_owned(), record);
        }
    }

    /// [`Mirror::note`], telling `mirrored` once the change is acked; it goes out now.
    pub(in crate::cluster) fn note_awaited(&self, record: MirrorRecord, mirrored: Mirrored) {
        if let Ok(mut pending) = self.pending.lock() {
            let id = record.connection_id.clone();
            pending.changes.insert(id, Some(record));
            pending.waiting.push(mirrored);
        }
        self.wanted.notify_one();
    }

    pub(in crate::cluster) fn take(&self) -> Pending {
        self.pending
            .lock()
            .map(|mut pending| std::mem::take(&mut *pending))
            .unwrap_or_default()
    }

    /// Puts back changes that could not be published (newer ones win), and who waits for
    /// them.
    pub(in crate::cluster) fn restore(&self, unsent: Pending) {
        if let Ok(mut pending) = self.pending.lock() {
            for (id, record) in unsent.changes {
                pending.changes.entry(id).or_insert(record);
            }
            pending.waiting.extend(unsent.waiting);
        }
    }
}
