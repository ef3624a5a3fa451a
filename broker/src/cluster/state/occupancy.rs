//! Which nodes have members in which rooms: the bucket and this node's channels (see
//! [`crate::cluster::occupancy`]).

use async_nats::jetstream::kv;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::cluster::error::ClusterError;
use crate::rooms::RoomName;
use crate::webhooks::WebhookEvent;

/// The occupancy bucket, and where this node's changes and the resulting events go.
pub struct Occupancy {
    pub(in crate::cluster) store: kv::Store,
    pub(in crate::cluster) changes: UnboundedSender<(RoomName, bool)>,
    pub(in crate::cluster) events: UnboundedSender<WebhookEvent>,
}

/// This node's changes, on their way to [`track`].
pub type OccupancyChanges = UnboundedReceiver<(RoomName, bool)>;

impl Occupancy {
    /// Opens (or makes) the bucket; `events` receives the room events this node reports.
    pub async fn open(
        jetstream: &async_nats::jetstream::Context,
        bucket: String,
        replicas: usize,
        events: UnboundedSender<WebhookEvent>,
    ) -> Result<(Self, OccupancyChanges), ClusterError> {
        let store = match jetstream.get_key_value(&bucket).await {
            Ok(store) => store,
            Err(_) => jetstream
                .create_key_value(kv::Config {
                    bucket,
                    history: 1,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| ClusterError::JetStream(e.to_string()))?,
        };
        let (changes, receiver) = tokio::sync::mpsc::unbounded_channel();
        let occupancy = Self {
            store,
            changes,
            events,
        };
        Ok((occupancy, receiver))
    }
}
