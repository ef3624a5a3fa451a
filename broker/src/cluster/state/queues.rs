//! The JetStream queues' state: one stream per queue, the consumer groups' committed
//! offsets, and the errors reading and writing them (see [`crate::cluster::queues`]).

use std::collections::HashMap;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;

use crate::cluster::error::ClusterError;
use crate::cluster::subjects::{Subjects, hex};
use crate::config::QueueConfig;

/// An entry read from a queue stream.
#[derive(Debug, Clone)]
pub struct StreamEntry {
    pub offset: u64,
    pub payload: Bytes,
}

/// Why a cluster queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("no such queue: {0}")]
    Unknown(String),
    #[error("JetStream: {0}")]
    JetStream(String),
}

pub(in crate::cluster) fn jetstream_error(error: impl std::fmt::Display) -> QueueError {
    QueueError::JetStream(error.to_string())
}

/// Every queue's stream and the committed offsets.
pub struct ClusterQueues {
    pub(in crate::cluster) streams: HashMap<String, stream::Stream>,
    pub(in crate::cluster) offsets: kv::Store,
    /// Held while a batch of appends is published, so batches do not interleave.
    pub(in crate::cluster) publishing: tokio::sync::Mutex<()>,
}

impl ClusterQueues {
    pub async fn open(
        jetstream: &jetstream::Context,
        subjects: &Subjects,
        queues: &[QueueConfig],
        replicas: usize,
    ) -> Result<Self, ClusterError> {
        let mut streams = HashMap::new();
        for queue in queues {
            let limit = |value: Option<u64>| value.map_or(-1, |v| v.min(i64::MAX as u64) as i64);
            let config = stream::Config {
                name: subjects.queue_stream(&queue.name),
                subjects: vec![subjects.queue(&queue.name)],
                max_messages: limit(queue.retention.max_messages),
                max_bytes: limit(queue.retention.max_bytes),
                max_age: queue.retention.max_age.unwrap_or_default(),
                num_replicas: replicas,
                allow_direct: true,
                ..Default::default()
            };
            let stream = jetstream
                .create_or_update_stream(config)
                .await
                .map_err(|e| ClusterError::JetStream(format!("queue {}: {e}", queue.name)))?;
            let _ = stream;
            let stream = jetstream
                .get_stream(subjects.queue_stream(&queue.name))
                .await
                .map_err(|e| ClusterError::JetStream(format!("queue {}: {e}", queue.name)))?;
            streams.insert(queue.name.clone(), stream);
        }
        let bucket = subjects.offsets_bucket();
        let offsets = super::bucket(jetstream, bucket, replicas).await?;
        Ok(Self {
            streams,
            offsets,
            publishing: tokio::sync::Mutex::new(()),
        })
    }

    pub(in crate::cluster) fn stream(&self, queue: &str) -> Result<&stream::Stream, QueueError> {
        self.streams
            .get(queue)
            .ok_or_else(|| QueueError::Unknown(queue.to_owned()))
    }
}

pub(in crate::cluster) fn offset_key(queue: &str, group: &str) -> String {
    format!("{}.{}", hex(queue), hex(group))
}
