//! What this node knows of room interest: the rooms it subscribes to while it has members
//! in them, and the scatter-gathers waiting for answers (see [`crate::cluster::interest`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::rooms::RoomName;

/// The rooms this node subscribes to, with how many local members each has.
pub struct Interest {
    pub(in crate::cluster) runtime: tokio::runtime::Handle,
    pub(in crate::cluster) rooms: Mutex<HashMap<RoomName, RoomSubscription>>,
    /// Answers to this node's counts and listings, on one subscription.
    pub gathers: Arc<Gathers>,
}

/// Every gather's answers arrive on one wildcard subscription (`{prefix}.{n}`) and are
/// routed to the gather waiting for them: no subscribe and unsubscribe per broadcast.
pub struct Gathers {
    pub(in crate::cluster) prefix: String,
    pub(in crate::cluster) next: std::sync::atomic::AtomicU64,
    pub(in crate::cluster) waiting:
        Mutex<HashMap<u64, tokio::sync::mpsc::UnboundedSender<async_nats::Message>>>,
}

/// A gather's reply subject; dropping it stops routing answers to it.
pub struct GatherInbox {
    pub subject: String,
    pub(in crate::cluster) id: u64,
    pub(in crate::cluster) gathers: Arc<Gathers>,
}

impl Drop for GatherInbox {
    fn drop(&mut self) {
        if let Ok(mut waiting) = self.gathers.waiting.lock() {
            waiting.remove(&self.id);
        }
    }
}

impl Gathers {
    pub(in crate::cluster) fn new(prefix: String) -> Self {
        Self {
            prefix,
            next: std::sync::atomic::AtomicU64::new(0),
            waiting: Mutex::new(HashMap::new()),
        }
    }

    /// A reply subject and the answers that will arrive on it.
    pub(in crate::cluster) fn open(
        self: &Arc<Self>,
    ) -> (
        GatherInbox,
        tokio::sync::mpsc::UnboundedReceiver<async_nats::Message>,
    ) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.insert(id, sender);
        }
        let inbox = GatherInbox {
            subject: format!("{}.{id}", self.prefix),
            id,
            gathers: self.clone(),
        };
        (inbox, receiver)
    }

    pub(in crate::cluster) fn route(&self, message: async_nats::Message) {
        let id = message
            .subject
            .rsplit('.')
            .next()
            .and_then(|n| n.parse::<u64>().ok());
        let Some(id) = id else { return };
        if let Ok(waiting) = self.waiting.lock()
            && let Some(sender) = waiting.get(&id)
        {
            let _ = sender.send(message);
        }
    }
}

pub(in crate::cluster) struct RoomSubscription {
    /// Local members, all shards together.
    pub(in crate::cluster) members: usize,
    pub(in crate::cluster) task: tokio::task::JoinHandle<()>,
    /// True once the subscription is in place.
    pub(in crate::cluster) ready: tokio::sync::watch::Receiver<bool>,
}

impl Interest {
    /// `inbox`: a subject prefix unique to this node, for gather answers.
    pub fn new(runtime: tokio::runtime::Handle, inbox: String) -> Self {
        Self {
            runtime,
            rooms: Mutex::new(HashMap::new()),
            gathers: Arc::new(Gathers::new(inbox)),
        }
    }

    /// Local members of `room`.
    pub(in crate::cluster) fn members(&self, room: &RoomName) -> usize {
        self.rooms
            .lock()
            .ok()
            .and_then(|rooms| rooms.get(room).map(|r| r.members))
            .unwrap_or(0)
    }
}
