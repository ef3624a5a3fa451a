//! Rooms: validated room names and the shard-local index of who is in which room.
//!
//! Each shard keeps its own [`RoomIndex`] over its own connections, so a broadcast is one
//! message per shard and each shard walks only its local members. Pure code.

pub mod config;
pub mod events;
pub mod history;
pub mod sequencer;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::connection_id::ConnectionId;

/// Longest room name accepted.
pub const MAX_ROOM_NAME: usize = 128;

/// A room name: 1–128 characters from `A-Z a-z 0-9 _ - . : @ /`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRoomName {
    #[error("room name is empty")]
    Empty,
    #[error("room name is longer than {MAX_ROOM_NAME} characters")]
    TooLong,
    #[error("room name may only use letters, digits and _ - . : @ /")]
    BadCharacter,
}

impl RoomName {
    pub fn parse(text: &str) -> Result<Self, InvalidRoomName> {
        if text.is_empty() {
            return Err(InvalidRoomName::Empty);
        }
        if text.len() > MAX_ROOM_NAME {
            return Err(InvalidRoomName::TooLong);
        }
        let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_-.:@/".contains(&b);
        if !text.bytes().all(allowed) {
            return Err(InvalidRoomName::BadCharacter);
        }
        Ok(Self(text.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Room membership of one shard's connections, keyed by connection sequence number. Each
/// membership holds a `V` (the shard stores its connection handle there, so a broadcast
/// walks straight to the queues without a second lookup).
#[derive(Debug)]
pub struct RoomIndex<V> {
    rooms: HashMap<RoomName, HashMap<u64, V>>,
    memberships: HashMap<u64, Vec<RoomName>>,
}

impl<V> Default for RoomIndex<V> {
    fn default() -> Self {
        Self {
            rooms: HashMap::new(),
            memberships: HashMap::new(),
        }
    }
}

impl<V> RoomIndex<V> {
    /// Adds `member` to `room`; false if it was already there.
    pub fn join(&mut self, room: &RoomName, member: u64, value: V) -> bool {
        let members = self.rooms.entry(room.clone()).or_default();
        if members.contains_key(&member) {
            return false;
        }
        members.insert(member, value);
        self.memberships
            .entry(member)
            .or_default()
            .push(room.clone());
        true
    }

    /// Removes `member` from `room`; false if it was not there.
    pub fn leave(&mut self, room: &RoomName, member: u64) -> bool {
        let Some(members) = self.rooms.get_mut(room) else {
            return false;
        };
        if members.remove(&member).is_none() {
            return false;
        }
        if members.is_empty() {
            self.rooms.remove(room);
        }
        if let Some(rooms) = self.memberships.get_mut(&member) {
            rooms.retain(|r| r != room);
            if rooms.is_empty() {
                self.memberships.remove(&member);
            }
        }
        true
    }

    /// Removes `member` from every room (it disconnected); returns the rooms it left.
    /// The rooms `member` is in.
    pub fn rooms_of(&self, member: u64) -> Vec<RoomName> {
        self.memberships.get(&member).cloned().unwrap_or_default()
    }

    pub fn leave_all(&mut self, member: u64) -> Vec<RoomName> {
        let rooms = self.memberships.remove(&member).unwrap_or_default();
        for room in &rooms {
            if let Some(members) = self.rooms.get_mut(room) {
                members.remove(&member);
                if members.is_empty() {
                    self.rooms.remove(room);
                }
            }
        }
        rooms
    }

    /// The local members of `room` and their values (none for an unknown room).
    pub fn members(&self, room: &RoomName) -> impl Iterator<Item = (u64, &V)> + '_ {
        self.rooms
            .get(room)
            .into_iter()
            .flat_map(|members| members.iter().map(|(id, v)| (*id, v)))
    }

    /// How many rooms `member` is in.
    pub fn room_count(&self, member: u64) -> usize {
        self.memberships.get(&member).map_or(0, Vec::len)
    }

    pub fn is_member(&self, room: &RoomName, member: u64) -> bool {
        self.rooms
            .get(room)
            .is_some_and(|members| members.contains_key(&member))
    }

    /// Gives back the index's spare capacity once it has shrunk to a quarter of it (after
    /// a burst of rooms or members has gone).
    pub fn shrink(&mut self) {
        if self.rooms.capacity() > 4 * self.rooms.len().max(16) {
            self.rooms.shrink_to_fit();
        }
        if self.memberships.capacity() > 4 * self.memberships.len().max(16) {
            self.memberships.shrink_to_fit();
        }
    }

    pub fn count(&self, room: &RoomName) -> usize {
        self.rooms.get(room).map_or(0, HashMap::len)
    }
}

/// How a room message reaches the members besides its frame: who is skipped, and whether
/// it may be lost (sent as a QUIC datagram to WebTransport members that asked for them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoomDelivery {
    pub exclude: Option<ConnectionId>,
    /// Latest-value-wins data (a ticker): WebTransport sessions opened with
    /// `?datagrams=1` get it as a datagram, which QUIC never retransmits.
    pub unreliable: bool,
    /// Where it is in a room that numbers its messages ([`sequencer`]): a member whose
    /// join replay already brought it skips it.
    pub position: Option<Position>,
    /// In a conflating room, a keyed message's key ([`conflation_key`]): it takes the
    /// place of a queued, unsent message with the same one.
    pub conflation: Option<u64>,
    /// In cluster mode, in a room that does not number its messages: which broadcast this
    /// is ([`Stamp`]).
    pub stamp: Option<Stamp>,
}

/// Which broadcast a message is, in a room that does not number its messages: the node
/// that took it, which run of that node (its epoch: a restarted node counts from 1 again),
/// and that run's count. Each node's broadcasts reach every node in the order it stamped
/// them, so a connection moving between nodes can tell a broadcast its old node had queued
/// for it from one that only the new node has (see `resume::moving`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stamp {
    pub node: u16,
    /// 0 from nodes that predate it.
    #[serde(default)]
    pub epoch: u32,
    pub seq: u64,
}

impl Stamp {
    /// As a header value: `node.epoch.seq`.
    pub fn encode(self) -> String {
        format!("{}.{}.{}", self.node, self.epoch, self.seq)
    }

    /// A header value, or the `node.seq` of nodes that predate epochs in stamps.
    pub fn decode(text: &str) -> Option<Self> {
        let mut parts = text.split('.');
        let node = parts.next()?.parse().ok()?;
        let (epoch, seq) = match (parts.next()?, parts.next(), parts.next()) {
            (seq, None, _) => (0, seq),
            (epoch, Some(seq), None) => (epoch.parse().ok()?, seq),
            _ => return None,
        };
        Some(Self {
            node,
            epoch,
            seq: seq.parse().ok()?,
        })
    }

    /// Whether it comes from the same run of the same node as `other`.
    fn same_run(&self, other: &Self) -> bool {
        (self.node, self.epoch) == (other.node, other.epoch)
    }
}

/// What a connection moving between nodes takes along of its rooms' broadcasts: per room
/// (by name), the newest of each node its old node had queued for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Brought(pub Vec<(String, StampsSeen)>);

impl Brought {
    /// Whether the broadcast `stamp` to `room` came along already.
    pub fn covers(&self, room: &RoomName, stamp: Stamp) -> bool {
        (self.0.iter()).any(|(name, seen)| name == room.as_str() && seen.covers(stamp))
    }
}

/// The newest broadcast a shard queued to a room's members, by the node (run) that stamped
/// it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StampsSeen(pub Vec<Stamp>);

impl StampsSeen {
    pub fn note(&mut self, stamp: Stamp) {
        match self.0.iter_mut().find(|seen| seen.same_run(&stamp)) {
            Some(seen) => seen.seq = seen.seq.max(stamp.seq),
            None => self.0.push(stamp),
        }
    }

    /// Whether `stamp`'s broadcast was queued already (its node's count reached it).
    pub fn covers(&self, stamp: Stamp) -> bool {
        self.0
            .iter()
            .any(|seen| seen.same_run(&stamp) && seen.seq >= stamp.seq)
    }
}

/// The conflation key of `key` in `room` (one queue holds many rooms' messages).
pub fn conflation_key(room: &RoomName, key: &str) -> u64 {
    fnv1a(room.as_str().bytes().chain([0]).chain(key.bytes()))
}

/// 64-bit FNV-1a: a hash that is the same on every node and every build (room owners,
/// epoch ids and conflation keys cross nodes).
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes
        .into_iter()
        .fold(0xcbf2_9ce4_8422_2325, |hash: u64, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// A numbered message's place: its offset, in the epoch its room's log counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// [`history::epoch_id`] of the epoch.
    pub epoch: u32,
    pub offset: u64,
}

/// What a room broadcast did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Published {
    /// How many members it was queued to.
    pub delivered: usize,
    /// Its offset, in a room that numbers its messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// A room join refused by `limits.max_rooms_per_connection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("connection is already in {0} rooms (limits.max_rooms_per_connection)")]
pub struct TooManyRooms(pub usize);

/// One member of a room, as presence reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PresenceMember {
    #[serde(rename = "connectionId")]
    pub connection_id: String,
    /// Who the authorizer says it is ([`crate::auth::authorizer::user_of`]), if anyone.
    pub user: Option<String>,
    /// When it joined, epoch milliseconds.
    #[serde(rename = "joinedAt")]
    pub joined_at_ms: u64,
}

/// A room's presence as the API and the `room_presence` integration answer it: the count,
/// the number of distinct users, and the members unless only the counts were asked for.
pub fn presence_json(
    room: &RoomName,
    members: &[PresenceMember],
    with_members: bool,
) -> serde_json::Value {
    let users: std::collections::HashSet<&str> =
        members.iter().filter_map(|m| m.user.as_deref()).collect();
    let mut body = serde_json::json!({
        "room": room.as_str(),
        "count": members.len(),
        "users": users.len(),
    });
    if with_members {
        body["members"] = serde_json::json!(members);
    }
    body
}

#[cfg(test)]
mod tests {
    #[test]
    fn stamps_tell_what_a_moving_connection_had_queued() {
        let stamp = |node, seq| Stamp {
            node,
            epoch: 4,
            seq,
        };
        assert_eq!(Stamp::decode(&stamp(3, 42).encode()), Some(stamp(3, 42)));
        let before_epochs = Stamp {
            node: 3,
            epoch: 0,
            seq: 42,
        };
        assert_eq!(Stamp::decode("3.42"), Some(before_epochs));
        for bad in ["", "3", "3.", "x.1", "70000.1", "1.-2", "1.2.3.4", "1.x.3"] {
            assert_eq!(Stamp::decode(bad), None, "{bad}");
        }
        let mut seen = StampsSeen::default();
        seen.note(stamp(1, 5));
        seen.note(stamp(2, 9));
        seen.note(stamp(1, 3)); // an older one changes nothing
        assert!(seen.covers(stamp(1, 5)) && seen.covers(stamp(1, 1)));
        assert!(!seen.covers(stamp(1, 6)) && !seen.covers(stamp(3, 1)));
        let restarted = Stamp {
            node: 1,
            epoch: 5,
            seq: 1,
        };
        assert!(!seen.covers(restarted), "a restarted node counts anew");
        let lobby = RoomName::parse("lobby").unwrap();
        let other = RoomName::parse("other").unwrap();
        let brought = Brought(vec![("lobby".into(), seen)]);
        assert!(brought.covers(&lobby, stamp(2, 9)));
        assert!(!brought.covers(&lobby, stamp(2, 10)));
        assert!(!brought.covers(&other, stamp(1, 1)));
    }

    use super::*;
    use proptest::prelude::*;

    fn room(name: &str) -> RoomName {
        RoomName::parse(name).unwrap()
    }

    #[test]
    fn names_are_validated() {
        assert!(RoomName::parse("lobby").is_ok());
        assert!(RoomName::parse("ticker:BTC-USD/1m@eu.west_2").is_ok());
        assert_eq!(RoomName::parse(""), Err(InvalidRoomName::Empty));
        assert_eq!(
            RoomName::parse(&"a".repeat(129)),
            Err(InvalidRoomName::TooLong)
        );
        assert_eq!(RoomName::parse("a b"), Err(InvalidRoomName::BadCharacter));
        assert_eq!(RoomName::parse("é"), Err(InvalidRoomName::BadCharacter));
    }

    #[test]
    fn join_leave_and_leave_all() {
        let mut index = RoomIndex::default();
        assert!(index.join(&room("a"), 1, ()));
        assert!(!index.join(&room("a"), 1, ()));
        index.join(&room("a"), 2, ());
        index.join(&room("b"), 1, ());
        assert_eq!(index.count(&room("a")), 2);
        assert_eq!(index.room_count(1), 2);
        assert!(index.is_member(&room("b"), 1) && !index.is_member(&room("b"), 2));
        assert!(index.leave(&room("a"), 2));
        assert!(!index.leave(&room("a"), 2));
        let mut left = index.leave_all(1);
        left.sort();
        assert_eq!(left, vec![room("a"), room("b")]);
        assert_eq!(index.count(&room("a")), 0);
        assert!(index.rooms.is_empty() && index.memberships.is_empty());
    }

    proptest! {
        #[test]
        fn index_matches_a_naive_model(ops in proptest::collection::vec((0u8..3, 0u64..5, 0usize..3), 0..200)) {
            let names = [room("x"), room("y"), room("z")];
            let mut index = RoomIndex::default();
            let mut model: std::collections::HashSet<(usize, u64)> = Default::default();
            for (op, member, r) in ops {
                match op {
                    0 => { prop_assert_eq!(index.join(&names[r], member, ()), model.insert((r, member))); }
                    1 => { prop_assert_eq!(index.leave(&names[r], member), model.remove(&(r, member))); }
                    _ => {
                        index.leave_all(member);
                        model.retain(|(_, m)| *m != member);
                    }
                }
            }
            for (r, name) in names.iter().enumerate() {
                let mut got: Vec<u64> = index.members(name).map(|(m, _)| m).collect();
                got.sort();
                let mut want: Vec<u64> = model.iter().filter(|(mr, _)| *mr == r).map(|(_, m)| *m).collect();
                want.sort();
                prop_assert_eq!(got, want);
            }
        }
    }
}
