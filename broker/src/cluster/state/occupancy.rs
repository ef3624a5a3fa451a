//! Which nodes have members in which rooms: the bucket, this node's changes not yet
//! applied, and where the resulting events go (see [`crate::cluster::occupancy`]).

use std::collections::HashMap;
use std::sync::Mutex;

use async_nats::jetstream::kv;
use tokio::sync::Notify;

use crate::cluster::error::ClusterError;
use crate::rooms::RoomName;
use crate::webhooks::WebhookSender;

/// The occupancy bucket, and this node's changes on their way to it.
pub struct Occupancy {
    pub(in crate::cluster) store: kv::Store,
    /// Per room, whether this node has members now: only the latest state waits, so
    /// what waits is bounded by the number of rooms, whatever the churn.
    pending: Mutex<HashMap<RoomName, bool>>,
    pub(in crate::cluster) changed: Notify,
    pub(in crate::cluster) events: WebhookSender,
}

impl Occupancy {
    /// Opens (or makes) the bucket; `events` receives the room events this node reports.
    pub async fn open(
        jetstream: &async_nats::jetstream::Context,
        bucket: String,
        replicas: usize,
        events: WebhookSender,
    ) -> Result<Self, ClusterError> {
        let store = super::bucket(jetstream, bucket, replicas).await?;
        Ok(Self {
            store,
            pending: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            events,
        })
    }

    /// This node has (`true`) or no longer has members in `room`.
    pub(in crate::cluster) fn note(&self, room: &RoomName, occupied: bool) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(room.clone(), occupied);
        }
        self.changed.notify_one();
    }

    /// The changes noted since the last call.
    pub(in crate::cluster) fn take(&self) -> HashMap<RoomName, bool> {
        self.pending
            .lock()
            .map(|mut pending| std::mem::take(&mut *pending))
            .unwrap_or_default()
    }
}
