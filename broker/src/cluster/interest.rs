//! Rooms across nodes, interest-based: a node subscribes to a room's subject only while
//! one of its shards has a member in it, so a broadcast is one NATS message per
//! interested node and none to the others. Each receiving node fans out with the local,
//! encode-once path: the message crosses NATS in its portable form
//! ([`crate::message::Message::to_portable`]), and each node encodes it once per transport.
//!
//! Counting members cluster-wide (`{"delivered": N}`, `GET @rooms`) is a scatter-gather:
//! the request carries a reply inbox and the node takes the answers that arrive within
//! `cluster.gather_wait_ms`, or stops early once every other live node has answered.

use std::sync::Arc;
use std::time::Instant;

use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures_util::StreamExt;

use super::Cluster;
use super::state::interest::RoomSubscription;
use crate::connection_id::ConnectionId;
use crate::fanout;
use crate::message::Message;
use crate::rooms::{Position, PresenceMember, RoomDelivery, RoomName, Stamp};

pub(super) const OP: &str = "Sb-Op";
const EXCLUDE: &str = "Sb-Exclude";
/// Present on a broadcast that may be sent as datagrams (see `RoomDelivery::unreliable`).
const UNRELIABLE: &str = "Sb-Unreliable";
/// A numbered room's offset for the message and its epoch ([`RoomDelivery::position`]).
const OFFSET: &str = "Sb-Offset";
const EPOCH: &str = "Sb-Epoch";
/// A conflating room's message key ([`RoomDelivery::conflation`]).
const KEY: &str = "Sb-Key";
/// A broadcast's [`Stamp`] (`node.seq`).
const STAMP: &str = "Sb-Stamp";
pub(super) const BROADCAST: &str = "broadcast";
const LIST: &str = "list";
const PRESENCE: &str = "presence";

/// Routes gather answers until the subscription ends (at shutdown).
pub async fn route_gathers(cluster: Arc<Cluster>, shutdown: tokio_util::sync::CancellationToken) {
    let subject = format!("{}.*", cluster.interest.gathers.prefix);
    let mut answers = match cluster.client.subscribe(subject).await {
        Ok(subscriber) => subscriber,
        Err(error) => {
            tracing::error!(%error, "cannot subscribe to gather answers");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            answer = answers.next() => match answer {
                Some(answer) => cluster.interest.gathers.route(answer),
                None => break,
            },
        }
    }
}

impl Cluster {
    /// A local connection joined `room`: with the node's first member, the node
    /// subscribes to the room. Called from shard threads; never blocks on NATS.
    pub fn member_joined(self: &Arc<Self>, room: &RoomName) {
        let Ok(mut rooms) = self.interest.rooms.lock() else {
            return;
        };
        if let Some(subscription) = rooms.get_mut(room) {
            subscription.members += 1;
            return;
        }
        let (subscribed, ready) = tokio::sync::watch::channel(false);
        let task =
            (self.interest.runtime).spawn(serve_room(self.clone(), room.clone(), subscribed));
        let subscription = RoomSubscription {
            members: 1,
            task,
            ready,
        };
        rooms.insert(room.clone(), subscription);
        self.note_occupancy(room, true);
        self.metrics().cluster_room_interest.set(rooms.len() as i64);
    }

    /// A local connection left `room`: with the node's last member gone, the node
    /// unsubscribes.
    pub fn member_left(&self, room: &RoomName) {
        let Ok(mut rooms) = self.interest.rooms.lock() else {
            return;
        };
        let Some(subscription) = rooms.get_mut(room) else {
            return;
        };
        subscription.members -= 1;
        if subscription.members == 0 {
            if let Some(subscription) = rooms.remove(room) {
                subscription.task.abort();
                self.note_occupancy(room, false);
            }
            self.metrics().cluster_room_interest.set(rooms.len() as i64);
        }
    }

    /// Waits (at most `cluster.request_timeout_ms`) until this node receives `room`'s
    /// messages: its subscription, made when its first local member joined, is in place.
    pub async fn room_ready(&self, room: &RoomName) {
        let ready = (self.interest.rooms.lock().ok()).and_then(|rooms| {
            rooms
                .get(room)
                .map(|subscription| subscription.ready.clone())
        });
        if let Some(mut ready) = ready {
            let subscribed = ready.wait_for(|subscribed| *subscribed);
            let _ = tokio::time::timeout(self.config.request_timeout, subscribed).await;
        }
    }

    /// Sends `message` to the members of `room` on the other nodes, without waiting for
    /// counts (a client's `room_publish`).
    pub async fn publish_room(&self, room: &RoomName, message: &Message, delivery: RoomDelivery) {
        let headers = room_headers(BROADCAST, delivery);
        self.metrics()
            .cluster_forwarded
            .with_label_values(&["broadcast"])
            .inc();
        let subject = self.subjects.room(room.as_str());
        if let Err(error) = self
            .client
            .publish_with_headers(subject, headers, message.to_portable())
            .await
        {
            tracing::warn!(%error, "room broadcast not forwarded to other nodes");
        }
    }

    /// Sends `message` to the members of `room` on the other nodes; returns how many got
    /// it (as counted by the nodes that answered in time).
    pub async fn broadcast_room(
        &self,
        room: &RoomName,
        message: &Message,
        delivery: RoomDelivery,
    ) -> usize {
        self.metrics()
            .cluster_forwarded
            .with_label_values(&["broadcast"])
            .inc();
        let headers = room_headers(BROADCAST, delivery);
        delivered(&(self.gather(room, "broadcast", headers, message.to_portable())).await)
    }

    /// The members of `room` on the other nodes.
    pub async fn list_room(&self, room: &RoomName) -> Vec<String> {
        let headers = room_headers(LIST, RoomDelivery::default());
        self.gather(room, "list", headers, Bytes::new())
            .await
            .iter()
            .filter_map(|answer| serde_json::from_slice::<Vec<String>>(answer).ok())
            .flatten()
            .collect()
    }

    /// The members of `room` on the other nodes, with who they are and when they joined.
    pub async fn room_presence(&self, room: &RoomName) -> Vec<PresenceMember> {
        let headers = room_headers(PRESENCE, RoomDelivery::default());
        self.gather(room, PRESENCE, headers, Bytes::new())
            .await
            .iter()
            .filter_map(|answer| serde_json::from_slice::<Vec<PresenceMember>>(answer).ok())
            .flatten()
            .collect()
    }

    /// Publishes a request on the room's subject and collects answers for
    /// `cluster.gather_wait_ms`, or until every other live node has answered.
    async fn gather(
        &self,
        room: &RoomName,
        label: &'static str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Vec<Bytes> {
        match self.send_gather(room, headers, payload).await {
            Some(sent) => self.collect(sent, label).await,
            None => Vec::new(),
        }
    }

    /// The first half of a gather: the request is on its way (in order with this node's
    /// other messages on the room's subject).
    pub(super) async fn send_gather(
        &self,
        room: &RoomName,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Option<SentGather> {
        let started = Instant::now();
        let (inbox, answers) = self.interest.gathers.open();
        let subject = self.subjects.room(room.as_str());
        if let Err(error) = self
            .client
            .publish_with_reply_and_headers(subject, inbox.subject.clone(), headers, payload)
            .await
        {
            tracing::warn!(%error, "room request not sent to other nodes");
            return None;
        }
        Some(SentGather {
            started,
            inbox,
            answers,
        })
    }

    /// The second half: the answers that arrive in time.
    pub(super) async fn collect(&self, sent: SentGather, label: &'static str) -> Vec<Bytes> {
        let SentGather {
            started,
            inbox,
            mut answers,
        } = sent;
        let peers = self.registry.live_peers();
        let mut collected = Vec::new();
        let deadline = tokio::time::sleep(self.config.gather_wait);
        tokio::pin!(deadline);
        while collected.len() < peers {
            tokio::select! {
                _ = &mut deadline => break,
                answer = answers.recv() => match answer {
                    // No node has members: NATS says so at once.
                    Some(answer) if answer.status == Some(StatusCode::NO_RESPONDERS) => break,
                    Some(answer) => collected.push(answer.payload),
                    None => break,
                },
            }
        }
        drop(inbox);
        self.metrics()
            .cluster_request_duration
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        collected
    }
}

/// A gather whose request is sent; its answers are still to be collected.
pub(super) struct SentGather {
    started: Instant,
    inbox: crate::cluster::state::interest::GatherInbox,
    answers: tokio::sync::mpsc::UnboundedReceiver<async_nats::Message>,
}

/// The counts in a broadcast gather's answers, added up.
pub(super) fn delivered(answers: &[Bytes]) -> usize {
    answers
        .iter()
        .filter_map(|answer| std::str::from_utf8(answer).ok()?.parse::<usize>().ok())
        .sum()
}

pub(super) fn room_headers(op: &str, delivery: RoomDelivery) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(OP, op);
    if let Some(exclude) = delivery.exclude {
        headers.insert(EXCLUDE, exclude.to_string().as_str());
    }
    if delivery.unreliable {
        headers.insert(UNRELIABLE, "1");
    }
    if let Some(position) = delivery.position {
        headers.insert(OFFSET, position.offset.to_string().as_str());
        headers.insert(EPOCH, position.epoch.to_string().as_str());
    }
    if let Some(key) = delivery.conflation {
        headers.insert(KEY, key.to_string().as_str());
    }
    if let Some(stamp) = delivery.stamp {
        headers.insert(STAMP, stamp.encode().as_str());
    }
    headers
}

/// Serves one room's subject while the node has members in it: broadcasts are handed to
/// every local shard in arrival order; requests with a reply inbox get this node's count
/// or member list.
async fn serve_room(
    cluster: Arc<Cluster>,
    room: RoomName,
    subscribed: tokio::sync::watch::Sender<bool>,
) {
    let subject = cluster.subjects.room(room.as_str());
    let mut messages = match cluster.client.subscribe(subject).await {
        Ok(subscriber) => subscriber,
        Err(error) => {
            tracing::error!(%room, %error, "cannot subscribe to room");
            return;
        }
    };
    let _ = subscribed.send(true);
    while let Some(message) = messages.next().await {
        // Published while this node may have been declared lost: delivered only once it
        // knows (its lost connections are closed by then, and get none of it).
        cluster.fence.held().await;
        let headers = message.headers.as_ref();
        let op = headers.and_then(|h| h.get(OP)).map(|v| v.as_str());
        let delivery = delivery_of(&cluster, headers);
        let broadcast = Message::from_portable(message.payload.clone());
        let answer = match (op, message.reply.is_some(), &broadcast) {
            (Some(BROADCAST), _, None) => {
                tracing::warn!(%room, "a room message from another node is not one; dropped");
                continue;
            }
            (Some(BROADCAST), false, Some(broadcast)) => {
                fanout::relay(cluster.shards().iter(), &room, broadcast, delivery).await;
                continue;
            }
            (Some(BROADCAST), true, Some(broadcast))
                if delivery.exclude.is_none_or(|id| id.node != cluster.node_id) =>
            {
                // No local member excluded: the count is the node's member count, answered
                // at once; the message is queued to the shards in order.
                let delivered = cluster.interest.members(&room);
                fanout::relay(cluster.shards().iter(), &room, broadcast, delivery).await;
                Bytes::from(delivered.to_string())
            }
            (Some(BROADCAST), true, Some(broadcast)) => {
                // A local member may be excluded: the shards count. Queued in order now;
                // counted and answered while the next one is queued.
                let count =
                    fanout::start_broadcast(cluster.shards(), &room, broadcast, delivery).await;
                let (cluster, reply) = (cluster.clone(), message.reply);
                tokio::spawn(async move {
                    let delivered = count.total().await;
                    if let Some(reply) = reply {
                        let answer = Bytes::from(delivered.to_string());
                        let _ = cluster.client.publish(reply, answer).await;
                    }
                });
                continue;
            }
            (Some(LIST), true, _) => {
                let members = fanout::room_members(cluster.shards(), &room).await;
                Bytes::from(serde_json::to_vec(&members).unwrap_or_default())
            }
            (Some(PRESENCE), true, _) => {
                let members = fanout::room_presence(cluster.shards(), &room).await;
                Bytes::from(serde_json::to_vec(&members).unwrap_or_default())
            }
            _ => continue,
        };
        if let Some(reply) = message.reply {
            let _ = cluster.client.publish(reply, answer).await;
        }
    }
}

/// How a room message from another node reaches this node's members: its headers, with
/// an excluded connection that moved here named as it is here.
pub(super) fn delivery_of(cluster: &Cluster, headers: Option<&HeaderMap>) -> RoomDelivery {
    RoomDelivery {
        exclude: headers
            .and_then(|h| h.get(EXCLUDE))
            .and_then(|v| v.as_str().parse::<ConnectionId>().ok())
            .map(|id| cluster.here_as(id)),
        unreliable: headers.is_some_and(|h| h.get(UNRELIABLE).is_some()),
        position: headers.and_then(|h| {
            Some(Position {
                offset: h.get(OFFSET)?.as_str().parse().ok()?,
                epoch: h.get(EPOCH)?.as_str().parse().ok()?,
            })
        }),
        conflation: headers
            .and_then(|h| h.get(KEY))
            .and_then(|v| v.as_str().parse().ok()),
        stamp: headers
            .and_then(|h| h.get(STAMP))
            .and_then(|v| Stamp::decode(v.as_str())),
    }
}
