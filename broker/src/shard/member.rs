//! A shard's record of one local connection in one room: the connection, since when it is
//! a member (what presence reports), and, in a room that numbers its messages, where its
//! join's replay left it; and the live frames held for members whose replay is on its way.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::connection::Connection;
use crate::outbound::SharedFrame;
use crate::rooms::{PresenceMember, RoomName};

/// A local connection in a room, and since when.
pub(super) struct Member {
    pub(super) connection: Rc<Connection>,
    pub(super) joined_at_ms: u64,
    /// The last offset its join's replay brought (0: none pending): a live frame at or
    /// below it is a duplicate. Cleared by the first live frame past it: a room's frames
    /// reach a shard in offset order, so no older one can follow.
    floor: Cell<u64>,
}

impl Member {
    pub(super) fn new(connection: Rc<Connection>, joined_at_ms: u64) -> Self {
        Self {
            connection,
            joined_at_ms,
            floor: Cell::new(0),
        }
    }

    /// The member as presence reports it.
    pub(super) fn presence(&self) -> PresenceMember {
        let facts = &self.connection.facts;
        PresenceMember {
            connection_id: facts.connection_id.clone(),
            user: crate::auth::authorizer::user_of(facts.authorizer.as_deref()),
            joined_at_ms: self.joined_at_ms,
        }
    }

    /// Whether the frame numbered `offset` is new to this member (not in its replay).
    pub(super) fn takes(&self, offset: u64) -> bool {
        let floor = self.floor.get();
        if offset <= floor {
            return false;
        }
        if floor != 0 {
            self.floor.set(0);
        }
        true
    }

    /// Its replay brought everything up to `offset`.
    pub(super) fn replayed_up_to(&self, offset: u64) {
        self.floor.set(offset);
    }
}

/// Live frames for members whose join's replay has not arrived yet, by connection sequence
/// and room, in arrival (offset) order.
#[derive(Default)]
pub(super) struct Waiting {
    held: HashMap<u64, Vec<(RoomName, HeldFrames)>>,
}

/// Frames held for one member in one room, with their offsets.
type HeldFrames = Vec<(u64, SharedFrame)>;

/// What became of a frame offered to [`Waiting::hold`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Held {
    /// The member is not waiting for a replay in that room: deliver it.
    No,
    Yes,
    /// It waits for more than `limit` frames: it cannot keep up (a slow consumer).
    Overflow,
}

impl Waiting {
    /// `sequence` waits for its replay of `room` from now on.
    pub(super) fn begin(&mut self, sequence: u64, room: &RoomName) {
        let rooms = self.held.entry(sequence).or_default();
        if !rooms.iter().any(|(r, _)| r == room) {
            rooms.push((room.clone(), Vec::new()));
        }
    }

    /// Holds frame `offset` for `sequence` if it waits for its replay of `room`.
    pub(super) fn hold(
        &mut self,
        sequence: u64,
        room: &RoomName,
        offset: u64,
        frame: &SharedFrame,
        limit: usize,
    ) -> Held {
        let Some(rooms) = self.held.get_mut(&sequence) else {
            return Held::No;
        };
        let Some((_, frames)) = rooms.iter_mut().find(|(r, _)| r == room) else {
            return Held::No;
        };
        if frames.len() >= limit {
            return Held::Overflow;
        }
        frames.push((offset, frame.clone()));
        Held::Yes
    }

    /// The replay arrived (or the member went): the frames held for it, oldest first.
    pub(super) fn finish(&mut self, sequence: u64, room: &RoomName) -> HeldFrames {
        let Some(rooms) = self.held.get_mut(&sequence) else {
            return Vec::new();
        };
        let Some(index) = rooms.iter().position(|(r, _)| r == room) else {
            return Vec::new();
        };
        let (_, frames) = rooms.swap_remove(index);
        if rooms.is_empty() {
            self.held.remove(&sequence);
        }
        frames
    }

    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}
