//! Where a connection or a room lives, and the one way to reach it: a connectionId names a
//! shard of this node, or (cluster mode) another node, or a node it moved away from; a
//! room has members on every shard and every node. The management API and the shards ask
//! the directory (push, describe, disconnect, join, leave, bulk, broadcast, members) and
//! never ask whether there is a cluster: on a single node the directory simply finds
//! everything here. [`events`] tells rooms and webhooks who joined and left.

mod events;

use std::sync::Arc;

use bytes::Bytes;

use crate::cluster::Cluster;
use crate::cluster::remote::{Op, RemoteError, Reply};
use crate::cluster::state::mirror::MirrorRecord;
use crate::connection_id::ConnectionId;
use crate::event::ConnectionFacts;
use crate::fanout::{self, FanoutPlan};
use crate::message::Message;
use crate::rooms::config::RoomSettings;
use crate::rooms::events::PresenceEvent;
use crate::rooms::history::{Replay, Want};
use crate::rooms::sequencer::Sequencer;
use crate::rooms::{PresenceMember, Published, RoomDelivery, RoomName, Stamp};
use crate::shard::handle::{Delivery, ShardHandle};
use crate::webhooks::WebhookSender;
use crate::webhooks::config::WebhookConfig;

/// Why a connection could not be reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreached {
    /// Closed, never issued by this gateway, or on a node that did not answer in time.
    #[error("connection is gone")]
    Gone,
    /// Cluster mode: it lives on another node and the cluster cannot be reached.
    #[error("cluster unavailable: {0}")]
    ClusterUnavailable(String),
    /// A limit refused the call (`limits.max_rooms_per_connection`).
    #[error("{0}")]
    LimitExceeded(String),
    /// The node that holds it refused the call as malformed.
    #[error("{0}")]
    BadRequest(String),
    /// Storage failed (a durable room's history could not be stored).
    #[error("{0}")]
    Unavailable(String),
}

/// Where a connection lives.
enum Place<'a> {
    Here(ConnectionId, &'a ShardHandle),
    /// On node `.0`, under id `.2` (its own, or the one it moved to).
    There(u16, &'a Cluster, String),
}

/// See the module documentation.
#[derive(Clone)]
pub struct Directory {
    node_id: u16,
    /// This run's epoch: ids of earlier runs name nothing.
    epoch: u32,
    shards: Arc<[ShardHandle]>,
    cluster: Option<Arc<Cluster>>,
    /// The logs of the rooms this node numbers, and every room's settings.
    sequencer: Arc<Sequencer>,
    /// Where joins and leaves of rooms with presence events go ([`Directory::tell_presence`]).
    presence_events: PresenceSender,
    /// `[webhooks]`: what to send, where the events go, and (one node) how many members
    /// each room has here.
    webhooks: Option<Arc<Webhooks>>,
    /// How many broadcasts this node has stamped ([`Directory::stamp`]).
    stamped: Arc<std::sync::atomic::AtomicU64>,
}

/// The directory's part of the webhooks.
struct Webhooks {
    config: WebhookConfig,
    events: WebhookSender,
    /// Local members per room (all shards): a room's first and last make it occupied and
    /// vacated.
    occupancy: std::sync::Mutex<std::collections::HashMap<RoomName, usize>>,
}

/// Joins and leaves on their way to the node's presence-event task.
pub type PresenceSender = tokio::sync::mpsc::UnboundedSender<(RoomName, PresenceEvent)>;
/// Its receiving end.
pub type PresenceReceiver = tokio::sync::mpsc::UnboundedReceiver<(RoomName, PresenceEvent)>;

impl Directory {
    pub fn new(
        node_id: u16,
        epoch: u32,
        shards: Arc<[ShardHandle]>,
        cluster: Option<Arc<Cluster>>,
        sequencer: Arc<Sequencer>,
        presence_events: PresenceSender,
        webhooks: Option<(WebhookConfig, WebhookSender)>,
    ) -> Self {
        let webhooks = webhooks.map(|(config, events)| {
            Arc::new(Webhooks {
                config,
                events,
                occupancy: Default::default(),
            })
        });
        Self {
            node_id,
            epoch,
            shards,
            cluster,
            sequencer,
            presence_events,
            webhooks,
            stamped: Arc::default(),
        }
    }

    /// A new broadcast's [`Stamp`], in cluster mode (where connections move between
    /// nodes); `None` on a single node.
    pub fn stamp(&self) -> Option<Stamp> {
        self.cluster.as_ref()?;
        let seq = self
            .stamped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        Some(Stamp {
            node: self.node_id,
            epoch: self.epoch,
            seq,
        })
    }

    /// The settings of `room`.
    pub fn settings(&self, room: &RoomName) -> RoomSettings {
        self.sequencer.settings(room)
    }

    /// Queues `message` to connection `id`.
    pub async fn push(&self, id: &str, message: Message) -> Result<(), Unreached> {
        match self.locate(id).await? {
            Place::Here(id, shard) => shard.send(id, message).await.map_err(|_| Unreached::Gone),
            Place::There(node, cluster, id) => {
                let portable = message.to_portable();
                answered(
                    cluster,
                    cluster.call(node, Op::Send, &id, None, portable).await,
                )
                .map(drop)
            }
        }
    }

    /// What `GET @connections/{id}` answers, as JSON.
    pub async fn describe(&self, id: &str) -> Result<Bytes, Unreached> {
        match self.locate(id).await? {
            Place::Here(id, shard) => {
                let info = shard.describe(id).await.map_err(|_| Unreached::Gone)?;
                Ok(Bytes::from(info.to_json().to_string()))
            }
            Place::There(node, cluster, id) => {
                let reply = cluster.call(node, Op::Describe, &id, None, Bytes::new());
                answered(cluster, reply.await).map(|reply| reply.body)
            }
        }
    }

    /// Asks connection `id` to close (`DELETE @connections/{id}`).
    pub async fn disconnect(&self, id: &str) -> Result<(), Unreached> {
        match self.locate(id).await? {
            Place::Here(id, shard) => shard.disconnect(id).await.map_err(|_| Unreached::Gone),
            Place::There(node, cluster, id) => {
                let reply = cluster.call(node, Op::Disconnect, &id, None, Bytes::new());
                answered(cluster, reply.await).map(drop)
            }
        }
    }

    /// Makes connection `id` a member of `room`.
    pub async fn join(&self, id: &str, room: RoomName) -> Result<(), Unreached> {
        match self.locate(id).await? {
            Place::Here(id, shard) => shard
                .join(id, room)
                .await
                .map_err(|_| Unreached::Gone)?
                .map_err(|refused| Unreached::LimitExceeded(refused.to_string())),
            Place::There(node, cluster, id) => {
                let reply = cluster.call(node, Op::Join, &id, Some(room.as_str()), Bytes::new());
                answered(cluster, reply.await).map(drop)
            }
        }
    }

    /// Takes connection `id` out of `room`.
    pub async fn leave(&self, id: &str, room: RoomName) -> Result<(), Unreached> {
        match self.locate(id).await? {
            Place::Here(id, shard) => shard.leave(id, room).await.map_err(|_| Unreached::Gone),
            Place::There(node, cluster, id) => {
                let reply = cluster.call(node, Op::Leave, &id, Some(room.as_str()), Bytes::new());
                answered(cluster, reply.await).map(drop)
            }
        }
    }

    /// Queues `message` to every connection of `ids`, wherever each lives; the indices of
    /// those that are gone come back sorted.
    pub async fn send_bulk(&self, ids: &[String], message: &Message) -> Delivery {
        let cluster = self.cluster.as_deref();
        // Connections that moved are sent where they live (found by asking, if the node
        // that forwarded them went).
        let ids = match cluster {
            Some(cluster) => cluster.where_they_live_now(ids).await,
            None => ids.to_vec(),
        };
        let mut plan = FanoutPlan::for_ids(
            &ids,
            self.node_id,
            self.epoch,
            self.shards.len(),
            cluster.is_some(),
        );
        let remote_ids = std::mem::take(&mut plan.remote);
        let remote = async {
            match cluster {
                Some(cluster) if !remote_ids.is_empty() => {
                    cluster.send_bulk(&remote_ids, &ids, message).await
                }
                _ => Delivery::default(),
            }
        };
        let (mut delivery, remote) =
            futures_util::join!(fanout::send_bulk(&self.shards, plan, message), remote);
        crate::crash::reached(crate::crash::Point::BulkSent);
        delivery.delivered += remote.delivered;
        delivery.gone.extend(remote.gone);
        delivery.gone.sort_unstable();
        delivery
    }

    /// Queues `message` to every member of `room` on every node. A room that numbers its
    /// messages gives it the next offset first (and keeps it, if it keeps history); that
    /// fails only in cluster mode, when the room's owner cannot be reached.
    pub async fn broadcast(
        &self,
        room: &RoomName,
        message: &Message,
        delivery: RoomDelivery,
    ) -> Result<Published, Unreached> {
        let settings = self.settings(room);
        let delivery = RoomDelivery {
            conflation: delivery.conflation.filter(|_| settings.conflate),
            ..delivery
        };
        if settings.sequenced() {
            return self.number(room, message, delivery).await;
        }
        let delivery = RoomDelivery {
            stamp: self.stamp(),
            ..delivery
        };
        let cluster = self.cluster.as_deref();
        let remote = async {
            match cluster {
                Some(cluster) => cluster.broadcast_room(room, message, delivery).await,
                None => 0,
            }
        };
        let here = self.here(delivery);
        let (local, remote) =
            futures_util::join!(fanout::broadcast(&self.shards, room, message, here), remote);
        Ok(Published {
            delivered: local + remote,
            offset: None,
        })
    }

    /// A message to a room that numbers its messages: numbered by the room's one
    /// sequencer (this node, or in cluster mode the room's owner), which queues it
    /// everywhere in offset order.
    async fn number(
        &self,
        room: &RoomName,
        message: &Message,
        delivery: RoomDelivery,
    ) -> Result<Published, Unreached> {
        if let Some(cluster) = self.cluster.as_deref() {
            let published = cluster.publish_numbered(room, message, delivery).await;
            return published.map_err(|error| Unreached::ClusterUnavailable(error.to_string()));
        }
        let numbered = fanout::number(
            &self.sequencer,
            &self.shards,
            room,
            message,
            delivery,
            delivery.exclude,
        );
        let numbered = numbered
            .await
            .map_err(|error| Unreached::Unavailable(error.to_string()))?;
        let (offset, count) = numbered.release();
        Ok(Published {
            delivered: count.total().await,
            offset: Some(offset),
        })
    }

    /// `room`'s past as `want` asks for it, read under the room's lock: every message up
    /// to the replay's top is already on its way to every member, every later one will be
    /// queued after it. In cluster mode the room's owner answers, once this node receives
    /// the room's messages.
    pub async fn replay(&self, room: &RoomName, want: &Want) -> Result<Replay, Unreached> {
        if let Some(cluster) = self.cluster.as_deref() {
            let replay = cluster.replay(room, want).await;
            return replay.map_err(|error| Unreached::ClusterUnavailable(error.to_string()));
        }
        Ok(self.sequencer.read(room, want).await)
    }

    /// Forgets the logs of rooms that keep nothing and have been quiet for their TTL.
    pub fn sweep_rooms(&self) {
        self.sequencer.sweep(crate::clock::now_ms());
    }

    /// `delivery` as this node's shards take it: a connection that moved here is
    /// excluded by the id it has here.
    fn here(&self, delivery: RoomDelivery) -> RoomDelivery {
        RoomDelivery {
            exclude: match self.cluster.as_deref() {
                Some(cluster) => delivery.exclude.map(|id| cluster.here_as(id)),
                None => delivery.exclude,
            },
            ..delivery
        }
    }

    /// Relays a message a client of shard `from` published to `room` to the members
    /// everywhere else (that shard serves its own), without waiting for counts.
    pub async fn relay(
        &self,
        from: u16,
        room: &RoomName,
        message: Message,
        delivery: RoomDelivery,
    ) {
        let others = (self.shards.iter().enumerate())
            .filter(|(index, _)| *index != usize::from(from))
            .map(|(_, shard)| shard);
        fanout::relay(others, room, &message, delivery).await;
        if let Some(cluster) = &self.cluster {
            cluster.publish_room(room, &message, delivery).await;
        }
    }

    /// Whether a room can have members beyond one shard: on another shard, or node.
    pub fn reaches_beyond_one_shard(&self) -> bool {
        self.shards.len() > 1 || self.cluster.is_some()
    }

    /// `room`'s members on every node, with who they are and when they joined.
    pub async fn presence(&self, room: &RoomName) -> Vec<PresenceMember> {
        let here = fanout::room_presence(&self.shards, room);
        self.with_other_nodes(here, |cluster| cluster.room_presence(room))
            .await
    }

    /// The connectionIds of `room`'s members on every node.
    pub async fn members(&self, room: &RoomName) -> Vec<String> {
        let here = fanout::room_members(&self.shards, room);
        self.with_other_nodes(here, |cluster| cluster.list_room(room))
            .await
    }

    /// What this node's shards answer (`here`) and, in cluster mode, what the other nodes
    /// answer (`there`), asked at the same time.
    async fn with_other_nodes<'a, T, Here, There>(
        &'a self,
        here: Here,
        there: impl FnOnce(&'a Cluster) -> There,
    ) -> Vec<T>
    where
        Here: std::future::Future<Output = Vec<T>>,
        There: std::future::Future<Output = Vec<T>>,
    {
        let remote = async {
            match self.cluster.as_deref() {
                Some(cluster) => there(cluster).await,
                None => Vec::new(),
            }
        };
        let (mut gathered, remote) = futures_util::join!(here, remote);
        gathered.extend(remote);
        gathered
    }

    /// A local connection joined `room` (or is arriving in it): other nodes send the
    /// room's messages here while it has members here.
    pub fn member_joined(&self, room: &RoomName) {
        if let Some(cluster) = &self.cluster {
            cluster.member_joined(room);
        }
        self.count_occupancy(room, true);
    }

    /// A local connection left `room`.
    pub fn member_left(&self, room: &RoomName) {
        if let Some(cluster) = &self.cluster {
            cluster.member_left(room);
        }
        self.count_occupancy(room, false);
    }

    /// A new connection is about to run `$connect` here: in cluster mode its record is
    /// mirrored first, for the node that reports it if this one is lost. False if the
    /// mirror did not ack it within `patience`.
    pub async fn opening(&self, facts: &ConnectionFacts, patience: std::time::Duration) -> bool {
        match &self.cluster {
            Some(cluster) => (cluster.mirror_opening(MirrorRecord::of(facts), patience)).await,
            None => true,
        }
    }

    /// A connection moved here from another node: in cluster mode its record is mirrored
    /// under this node, for the node that reports it if this one is lost.
    pub fn opened(&self, facts: &ConnectionFacts) {
        if let Some(cluster) = &self.cluster {
            cluster.mirror_opened(MirrorRecord::of(facts));
        }
    }

    /// A local connection's rooms changed: in cluster mode its mirrored record lists them
    /// (`rooms` is asked only then), for the node that reports it if this one is lost.
    pub fn rooms_changed(&self, facts: &ConnectionFacts, rooms: impl FnOnce() -> Vec<RoomName>) {
        if let Some(cluster) = &self.cluster {
            let mut record = MirrorRecord::of(facts);
            record.rooms = rooms()
                .iter()
                .map(|room| room.as_str().to_owned())
                .collect();
            cluster.mirror_opened(record);
        }
    }

    /// A connection of this node was reported (or needs no report): its mirror goes.
    pub fn closed(&self, connection_id: &str) {
        if let Some(cluster) = &self.cluster {
            cluster.mirror_closed(connection_id);
        }
    }

    /// Why this node cannot reach the rest of the cluster right now, if it cannot.
    pub fn degraded(&self) -> Option<String> {
        self.cluster.as_ref().and_then(|cluster| cluster.degraded())
    }

    /// Where connection `text` lives. Ids no node of this gateway could have issued are
    /// gone, like closed ones.
    async fn locate(&self, text: &str) -> Result<Place<'_>, Unreached> {
        let id: ConnectionId = text.parse().map_err(|_| Unreached::Gone)?;
        let Some(cluster) = self.cluster.as_deref() else {
            return self.local(id);
        };
        // Its client resumed here, or (from this node) on another node.
        if let Some(alias) = cluster.arrived_as(id) {
            return self.local(alias);
        }
        let moved = cluster.moved_to(text);
        if id.node == self.node_id && id.epoch == self.epoch && moved.is_none() {
            return self.local(id);
        }
        if let Some(reason) = cluster.degraded() {
            return Err(Unreached::ClusterUnavailable(reason));
        }
        let alias = match moved {
            Some(alias) if cluster.issuer_runs(alias) => alias,
            // It moved on from there, and that node went since.
            Some(_) => cluster.find_moved(id).await.ok_or(Unreached::Gone)?,
            // The node that opened it runs (or has not been judged lost yet): it answers
            // for it, forwarding it if it moved.
            None if cluster.issuer_runs(id) => id,
            // It went, and its forwarding with it: the node the connection moved to, if
            // it moved before, knows it.
            None => cluster.find_moved(id).await.ok_or(Unreached::Gone)?,
        };
        match alias.node == self.node_id {
            true => self.local(alias),
            false => Ok(Place::There(alias.node, cluster, alias.to_string())),
        }
    }

    /// Connection `id` if this node (this run of it) could have it.
    fn local(&self, id: ConnectionId) -> Result<Place<'_>, Unreached> {
        if id.node != self.node_id || id.epoch != self.epoch {
            return Err(Unreached::Gone);
        }
        let shard = self.shards.get(usize::from(id.shard));
        Ok(Place::Here(id, shard.ok_or(Unreached::Gone)?))
    }
}

/// A remote node's answer, or why there is none: gone when no node serves it, or its node
/// did not answer in time and is not a live member of the cluster (any more); when a live
/// node did not answer in time, the outcome is unknown and the caller may retry (a 503:
/// see docs/CLUSTER.md for why). Its own error otherwise.
fn answered(cluster: &Cluster, outcome: Result<Reply, RemoteError>) -> Result<Reply, Unreached> {
    let reply = match outcome {
        Ok(reply) => reply,
        Err(RemoteError::Unreachable {
            node,
            no_responders,
        }) => {
            if no_responders || !cluster.registry.is_live(node) {
                return Err(Unreached::Gone);
            }
            return Err(Unreached::ClusterUnavailable(format!(
                "node {node} did not answer in time; its connections are not known to be \
                 gone (retry)"
            )));
        }
        Err(RemoteError::Nats(reason)) => return Err(Unreached::ClusterUnavailable(reason)),
    };
    let text = || String::from_utf8_lossy(&reply.body).into_owned();
    match reply.status {
        200..=299 => Ok(reply),
        410 => Err(Unreached::Gone),
        429 => Err(Unreached::LimitExceeded(text())),
        400 => Err(Unreached::BadRequest(text())),
        status => Err(Unreached::ClusterUnavailable(format!(
            "node answered {status}: {}",
            text()
        ))),
    }
}
