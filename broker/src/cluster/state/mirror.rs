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

/// The mirror stream and the changes not yet published.
pub struct Mirror {
    pub(in crate::cluster) stream: stream::Stream,
    /// connectionId → its record (opened) or `None` (closed), coalesced.
    pub(in crate::cluster) pending: Mutex<HashMap<String, Option<MirrorRecord>>>,
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

    pub(in crate::cluster) fn note(&self, connection_id: &str, record: Option<MirrorRecord>) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(connection_id.to_owned(), record);
        }
    }

    pub(in crate::cluster) fn take(&self) -> HashMap<String, Option<MirrorRecord>> {
        self.pending
            .lock()
            .map(|mut pending| std::mem::take(&mut *pending))
            .unwrap_or_default()
    }

    /// Puts back changes that could not be published; newer ones win.
    pub(in crate::cluster) fn restore(&self, unsent: HashMap<String, Option<MirrorRecord>>) {
        if let Ok(mut pending) = self.pending.lock() {
            for (id, record) in unsent {
                pending.entry(id).or_insert(record);
            }
        }
    }
}
