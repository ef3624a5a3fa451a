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
use bytes::Bytes;

use super::Cluster;
use super::interest::{BROADCAST, OP, delivered, delivery_of, room_headers};
use super::remote::{Op, ROOM};
use crate::fanout;
use crate::message::Message;
use crate::rooms::history::{Replay, Want};
use crate::rooms::{Published, RoomDelivery, RoomName};

/// Why a numbered room could not be reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the node that numbers room {room} (node {owner}) did not answer: {reason}")]
pub struct OwnerUnreachable {
    pub room: String,
    pub owner: u16,
    pub reason: String,
}

impl Cluster {
    /// The node that numbers `room`'s messages. When the live nodes changed since the last
    /// call, this node first forgets the logs of the rooms it no longer owns.
    pub fn room_owner(&self, room: &RoomName) -> u16 {
        let peers = self.registry.live_peer_ids();
        let owner = owner_among(room, self.node_id, &peers);
        let view = self.registry.view();
        let seen = self
            .rooms_view
            .swap(view, std::sync::atomic::Ordering::AcqRel);
        if seen != view {
            let me = self.node_id;
            self.rooms
                .retain(|room| owner_among(room, me, &peers) == me);
        }
        owner
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
            return Ok(self.number_here(room, message, delivery).await);
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
            return Ok(self.replay_here(room, want).await);
        }
        self.room_ready(room).await;
        let request = Bytes::from(serde_json::to_vec(want).unwrap_or_default());
        let body = self.ask_owner(owner, room, Op::History, HeaderMap::new(), request);
        let body = body.await?;
        let json = serde_json::from_slice(&body).ok();
        json.as_ref()
            .and_then(Replay::from_json)
            .ok_or_else(|| unreachable(room, owner, "an answer that is not a replay"))
    }

    /// Answers another node's `Op::Publish` or `Op::History` for a room this node owns.
    pub async fn answer_owned_room(&self, op: Op, request: &async_nats::Message) -> (u16, Bytes) {
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
                let published = self.number_here(&room, &message, delivery).await;
                serde_json::to_vec(&published)
            }
            _ => {
                let Ok(want) = serde_json::from_slice::<Want>(&request.payload) else {
                    return (400, Bytes::from_static(b"not a replay request"));
                };
                let replay = self.replay_here(&room, &want).await;
                serde_json::to_vec(&replay.to_json(&room))
            }
        };
        (200, Bytes::from(answer.unwrap_or_default()))
    }

    /// Numbers `message` here (this node owns the room), queues it to the local members
    /// and publishes it to the other nodes' members while the log is locked.
    async fn number_here(
        &self,
        room: &RoomName,
        message: &Message,
        delivery: RoomDelivery,
    ) -> Published {
        let exclude_here = delivery.exclude.map(|id| self.here_as(id));
        let numbered = fanout::number(
            &self.rooms,
            &self.shards,
            room,
            message,
            delivery,
            exclude_here,
        );
        // Durable history is refused in cluster mode at start: storing cannot fail here.
        let Ok(numbered) = numbered.await else {
            return Published::default();
        };
        let headers = room_headers(BROADCAST, numbered.delivery);
        let sent = self.send_gather(room, headers, numbered.message.to_portable());
        let sent = sent.await;
        let (offset, count) = numbered.release();
        let remote = match sent {
            Some(sent) => delivered(&self.collect(sent, "broadcast").await),
            None => 0,
        };
        Published {
            delivered: count.total().await + remote,
            offset: Some(offset),
        }
    }

    async fn replay_here(&self, room: &RoomName, want: &Want) -> Replay {
        let history = self.rooms.settings(room).history;
        let mut log = self.rooms.log(room).lock_owned().await;
        log.read(want, crate::clock::now_ms(), history)
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
    OwnerUnreachable {
        room: room.to_string(),
        owner,
        reason: reason.to_string(),
    }
}

/// Of `me` and `peers`, the node with the highest score for `room` (FNV-1a of the name and
/// the node id: the same on every node and every build).
fn owner_among(room: &RoomName, me: u16, peers: &[u16]) -> u16 {
    let score = |node: u16| {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in room.as_str().bytes().chain(node.to_be_bytes()) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        (hash, node)
    };
    std::iter::once(me)
        .chain(peers.iter().copied())
        .max_by_key(|node| score(*node))
        .unwrap_or(me)
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
