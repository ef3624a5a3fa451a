//! Numbered rooms across nodes. Offsets are dense per room only if one node numbers a
//! room's messages: its **owner**, chosen by rendezvous hashing of the room's name over the
//! live nodes (every node computes the same owner from the registry; a node joining or
//! leaving moves only its share of rooms). Other nodes forward publishes and replay reads
//! to the owner (`Op::Publish`, `Op::History`); the owner numbers a message, queues it to
//! its shards and publishes it on the room's subject while the room's log is locked, so
//! every node gets the room's messages in offset order.
//!
//! A node that will replay a room for a joining member first waits for its subscription to
//! the room: then every message past the replay reaches it. History is kept in the owner's
//! memory; when a room's owner changes, the new owner starts a new epoch (the old owner
//! drops its log when it notices the change), and joins with `since` are answered
//! `recovered: false`.

use async_nats::HeaderMap;
use async_nats::jetstream::consumer;
use bytes::Bytes;
use futures_util::StreamExt;

use super::Cluster;
use super::interest::{BROADCAST, OP, delivered, delivery_of, room_headers};
use super::registry::owner_among;
use super::remote::{Op, ROOM};
use crate::fanout;
use crate::message::Message;
use crate::rooms::history::{Replay, Want};
use crate::rooms::sequencer::{LockedLog, NotKept, Stored};
use crate::rooms::{Published, RoomDelivery, RoomName};

/// Why a numbered room could not be published to or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnerUnreachable {
    #[error("the node that numbers room {room} (node {owner}) did not answer: {reason}")]
    Owner {
        room: String,
        owner: u16,
        reason: String,
    },
    /// A durable room's message could not be stored.
    #[error(transparent)]
    NotKept(#[from] NotKept),
}

impl Cluster {
    /// The node that numbers `room`'s messages (the registry drops the logs of the rooms
    /// this node stops owning whenever the live nodes change, see `Cluster::join`).
    pub fn room_owner(&self, room: &RoomName) -> u16 {
        owner_among(room, self.node_id, &self.registry.live_peer_ids())
    }

    /// Publishes to a numbered room, through its owner.
    pub async fn publish_numbered(
        &self,
        room: &RoomName,
        message: &Message,
        delivery: RoomDelivery,
    ) -> Result<Published, OwnerUnreachable> {
        let owner = self.room_owner(room);
        if owner == self.node_id {
            return Ok(self.number_here(room, message, delivery, None).await?);
        }
        let headers = room_headers(Op::Publish.label(), delivery);
        let reply = self.ask_owner(owner, room, Op::Publish, headers, message.to_portable());
        let body = reply.await?;
        serde_json::from_slice(&body).map_err(|error| unreachable(room, owner, error))
    }

    /// What `want` asks of `room`'s past, from its owner, once this node receives the
    /// room's messages.
    pub async fn replay(&self, room: &RoomName, want: &Want) -> Result<Replay, OwnerUnreachable> {
        let owner = self.room_owner(room);
        if owner == self.node_id {
            return Ok(self.rooms.read(room, want).await);
        }
        self.room_ready(room).await;
        let mut replay = self.ask_replay(owner, room, want).await?;
        let wanted = match want {
            Want::Last(count) => *count,
            Want::Since { limit, .. } => *limit,
        };
        // An answer holds what fits one NATS message; the rest up to the first answer's
        // top comes in pages (later messages reach this node live).
        while replay.more {
            let Some(last) = replay.messages.last().map(|kept| kept.offset) else {
                break;
            };
            let next = Want::Since {
                offset: last,
                epoch: Some(replay.epoch.clone()),
                limit: wanted.saturating_sub(replay.messages.len()),
            };
            let page = self.ask_replay(owner, room, &next).await?;
            if page.epoch != replay.epoch || !page.recovered {
                // Pruned or renumbered between the pages: not one replay any more.
                replay.recovered = false;
                replay.more = false;
                break;
            }
            let top = replay.top;
            replay.more = page.more && page.messages.last().is_some_and(|k| k.offset < top);
            replay
                .messages
                .extend(page.messages.into_iter().filter(|k| k.offset <= top));
        }
        Ok(replay)
    }

    /// One answer of the owner to `want`.
    async fn ask_replay(
        &self,
        owner: u16,
        room: &RoomName,
        want: &Want,
    ) -> Result<Replay, OwnerUnreachable> {
        let request = Bytes::from(serde_json::to_vec(want).unwrap_or_default());
        let body = self.ask_owner(owner, room, Op::History, HeaderMap::new(), request);
        let body = body.await?;
        let json = serde_json::from_slice(&body).ok();
        json.as_ref()
            .and_then(Replay::from_json)
            .ok_or_else(|| unreachable(room, owner, "an answer that is not a replay"))
    }

    /// For another node's `Op::Publish` to a room this node owns: the room's log, locked
    /// (in the order the requests arrive, before each one's task runs, so one publisher's
    /// messages are numbered in the order it sent them).
    pub async fn lock_for_publish(&self, request: &async_nats::Message) -> Option<LockedLog> {
        let headers = request.headers.as_ref()?;
        if headers.get(OP).map(|v| v.as_str()) != Some(Op::Publish.label()) {
            return None;
        }
        let room = RoomName::parse(headers.get(ROOM)?.as_str()).ok()?;
        if self.room_owner(&room) != self.node_id {
            return None;
        }
        Some(self.rooms.lock(&room).await)
    }

    /// Answers another node's `Op::Publish` (with its room's log locked, if
    /// [`Cluster::lock_for_publish`] took it) or `Op::History` for a room this node owns.
    pub async fn answer_owned_room(
        &self,
        op: Op,
        request: &async_nats::Message,
        locked: Option<LockedLog>,
    ) -> (u16, Bytes) {
        let headers = request.headers.as_ref();
        let room = headers.and_then(|h| h.get(ROOM)).map(|v| v.as_str());
        let Some(room) = room.and_then(|room| RoomName::parse(room).ok()) else {
            return (400, Bytes::from_static(b"no room"));
        };
        if self.room_owner(&room) != self.node_id {
            return (409, Bytes::from_static(b"not this room's owner"));
        }
        let answer = match op {
            Op::Publish => {
                let Some(message) = Message::from_portable(request.payload.clone()) else {
                    return (400, Bytes::from_static(b"not a message"));
                };
                let delivery = delivery_of(self, headers);
                match self.number_here(&room, &message, delivery, locked).await {
                    Ok(published) => serde_json::to_vec(&published).unwrap_or_default(),
                    Err(error) => return (503, Bytes::from(error.to_string())),
                }
            }
            _ => {
                let Ok(want) = serde_json::from_slice::<Want>(&request.payload) else {
                    return (400, Bytes::from_static(b"not a replay request"));
                };
                let replay = self.rooms.read(&room, &want).await;
                // What fits one NATS message (with room for the headers).
                let budget = (self.client.server_info().max_payload).saturating_sub(4096);
                replay.fit(&room, budget.max(4096))
            }
        };
        (200, Bytes::from(answer))
    }

    /// Numbers `message` here (this node owns the room), queues it to the local members
    /// and publishes it to the other nodes' members while the log is locked.
    async fn number_here(
        &self,
        room: &RoomName,
        message: &Message,
        delivery: RoomDelivery,
        locked: Option<LockedLog>,
    ) -> Result<Published, NotKept> {
        let exclude_here = delivery.exclude.map(|id| self.here_as(id));
        let log = match locked {
            Some(log) => log,
            None => self.rooms.lock(room).await,
        };
        let (shards, rooms) = (&self.shards, &self.rooms);
        let numbered =
            fanout::number_locked(log, rooms, shards, room, message, delivery, exclude_here);
        let numbered = numbered.await?;
        crate::crash::reached(crate::crash::Point::BroadcastNumbered);
        let headers = room_headers(BROADCAST, numbered.delivery);
        // Handed to NATS while the log is locked (bounded: a stuck connection must not
        // hold the room's next messages for longer than a request may take).
        let sent = self.send_gather(room, headers, numbered.message.to_portable());
        let sent = tokio::time::timeout(self.config.request_timeout, sent);
        let sent = sent.await.ok().flatten();
        let (offset, count) = numbered.release();
        let remote = match sent {
            Some(sent) => delivered(&self.collect(sent, "broadcast").await),
            None => 0,
        };
        Ok(Published {
            delivered: count.total().await + remote,
            offset: Some(offset),
        })
    }

    /// Stores a durable room's entry in its subject of the history stream, after the
    /// message stored at `after` (JetStream's expected last subject sequence: if another
    /// node stored one meanwhile, this one is refused); returns its stream sequence.
    pub async fn keep_history(
        &self,
        room: &RoomName,
        entry: Vec<u8>,
        after: Option<u64>,
    ) -> Result<Option<u64>, NotKept> {
        let failed = |e: &dyn std::fmt::Display| NotKept::Failed(e.to_string());
        if self.history.is_none() {
            return Err(failed(&"no history stream"));
        }
        let publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(Bytes::from(entry))
            .expected_last_subject_sequence(after.unwrap_or(0));
        let subject = self.subjects.history(room.as_str());
        let sent = self.jetstream.send_publish(subject, publish).await;
        let ack = sent.map_err(|e| failed(&e))?.await;
        match ack {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(error)
                if error.kind()
                    == async_nats::jetstream::context::PublishErrorKind::WrongLastSequence =>
            {
                Err(NotKept::Conflict)
            }
            Err(error) => Err(failed(&error)),
        }
    }

    /// A durable room's stored entries, oldest first, and the last one's stream sequence.
    pub async fn load_history(&self, room: &RoomName) -> Result<Stored, NotKept> {
        let failed = |e: &dyn std::fmt::Display| NotKept::Failed(e.to_string());
        let Some(history) = &self.history else {
            return Err(failed(&"no history stream"));
        };
        let consumer = history
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.subjects.history(room.as_str()),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| failed(&e))?;
        let mut remaining = consumer.cached_info().num_pending;
        let mut messages = consumer.messages().await.map_err(|e| failed(&e))?;
        let (mut entries, mut last) = (Vec::new(), None);
        while remaining > 0 {
            let next = tokio::time::timeout(self.config.request_timeout, messages.next());
            let message = (next.await.map_err(|e| failed(&e))?)
                .ok_or_else(|| failed(&"the history ended early"))?
                .map_err(|e| failed(&e))?;
            let info = message.info().map_err(|e| failed(&e))?;
            (remaining, last) = (info.pending, Some(info.stream_sequence));
            entries.push(message.payload.to_vec());
        }
        Ok((entries, last))
    }

    /// Request `op` to `room`'s owner; its body if it answered 200.
    async fn ask_owner(
        &self,
        owner: u16,
        room: &RoomName,
        op: Op,
        mut headers: HeaderMap,
        payload: Bytes,
    ) -> Result<Bytes, OwnerUnreachable> {
        headers.insert(OP, op.label());
        headers.insert(ROOM, room.as_str());
        match self.request(owner, op.label(), headers, payload).await {
            Ok(reply) if reply.status == 200 => Ok(reply.body),
            Ok(reply) => {
                let body = String::from_utf8_lossy(&reply.body);
                Err(unreachable(room, owner, format!("{} {body}", reply.status)))
            }
            Err(error) => Err(unreachable(room, owner, error)),
        }
    }
}

fn unreachable(room: &RoomName, owner: u16, reason: impl std::fmt::Display) -> OwnerUnreachable {
    OwnerUnreachable::Owner {
        room: room.to_string(),
        owner,
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_node_picks_the_same_owner_and_a_leaving_node_moves_only_its_rooms() {
        let rooms: Vec<RoomName> = (0..300)
            .map(|n| RoomName::parse(&format!("room-{n}")).unwrap())
            .collect();
        let nodes = [1u16, 2, 3];
        for room in &rooms {
            let seen: Vec<u16> = nodes
                .iter()
                .map(|me| {
                    let peers: Vec<u16> = nodes.iter().copied().filter(|n| n != me).collect();
                    owner_among(room, *me, &peers)
                })
                .collect();
            assert!(seen.windows(2).all(|pair| pair[0] == pair[1]), "{room}");
        }
        let mut counts = [0usize; 4];
        for room in &rooms {
            let before = owner_among(room, 1, &[2, 3]);
            counts[usize::from(before)] += 1;
            let after = owner_among(room, 1, &[2]);
            if before != 3 {
                assert_eq!(before, after, "{room} moved though its owner stayed");
            }
        }
        assert!(counts[1..].iter().all(|count| *count > 50), "{counts:?}");
    }
}
