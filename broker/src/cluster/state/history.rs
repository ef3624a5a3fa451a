//! The stream that keeps durable rooms' history in cluster mode: one subject per room, at
//! most the largest `history_size` of the durable settings per subject, nothing older than
//! their longest TTL (see [`crate::cluster::history`]).

use async_nats::jetstream::{self, stream};

use crate::cluster::error::ClusterError;
use crate::cluster::subjects::Subjects;

/// See the module documentation.
pub struct HistoryStream {
    pub(in crate::cluster) stream: stream::Stream,
}

impl HistoryStream {
    /// Opens (or makes, or updates to `most` per room and `ttl`) the stream.
    pub async fn open(
        jetstream: &jetstream::Context,
        subjects: &Subjects,
        replicas: usize,
        (most, ttl): (usize, std::time::Duration),
    ) -> Result<Self, ClusterError> {
        let config = stream::Config {
            name: subjects.history_stream(),
            subjects: vec![subjects.history_all()],
            max_messages_per_subject: i64::try_from(most).unwrap_or(i64::MAX),
            max_age: ttl,
            num_replicas: replicas,
            allow_direct: true,
            ..Default::default()
        };
        let failed = |e: &dyn std::fmt::Display| ClusterError::JetStream(e.to_string());
        let stream = match jetstream.get_stream(&config.name).await {
            Ok(_) => {
                let info = jetstream.update_stream(&config).await;
                info.map_err(|e| failed(&e))?;
                jetstream
                    .get_stream(&config.name)
                    .await
                    .map_err(|e| failed(&e))?
            }
            Err(_) => (jetstream.create_stream(config).await).map_err(|e| failed(&e))?,
        };
        Ok(Self { stream })
    }
}
