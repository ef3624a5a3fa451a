//! A shard's record of one local connection in one room: the connection, since when it is
//! a member (what presence reports), and, in a room that numbers its messages, where its
//! join's replay left it; and the live frames held for members whose replay is on its way.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::connection::Connection;
use crate::outbound::SharedFrame;
use crate::rooms::{Position, PresenceMember, RoomName};

/// A local connection in a room, and since when.
pub(super) struct Member {
    pub(super) connection: Rc<Connection>,
    pub(super) joined_at_ms: u64,
    /// The last offset its join's replay brought (0: none pending), and the epoch it
    /// counts in: a live frame of that epoch at or below it is a duplicate. Cleared by the
    /// first live frame past it or of another epoch: a room's frames reach a shard in
    /// offset order, so no older one can follow.
    floor: Cell<u64>,
    floor_epoch: Cell<u32>,
}

impl Member {
    pub(super) fn new(connection: Rc<Connection>, joined_at_ms: u64) -> Self {
        Self {
            connection,
            joined_at_ms,
            floor: Cell::new(0),
            floor_epoch: Cell::new(0),
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

    /// Whether the frame at `position` is new to this member (not in its replay).
    pub(super) fn takes(&self, position: Position) -> bool {
        let floor = self.floor.get();
        if floor == 0 {
            return true;
        }
        if position.epoch == self.floor_epoch.get() && position.offset <= floor {
            return false;
        }
        self.floor.set(0);
        true
    }

    /// Its replay brought everything up to `position`.
    pub(super) fn replayed_up_to(&self, position: Position) {
        self.floor.set(position.offset);
        self.floor_epoch.set(position.epoch);
    }
}

/// Live frames for members whose join's replay has not arrived yet, by connection sequence
/// and room, in arrival order: numbered ones with their position, others (presence events)
/// without.
#[derive(Default)]
pub(super) struct Waiting {
    held: HashMap<u64, Vec<Wait>>,
    /// Tells one join's wait from a later one of the same connection and room.
    next_token: u64,
}

/// One member's wait for its replay of one room.
struct Wait {
    room: RoomName,
    token: u64,
    frames: HeldFrames,
}

/// Frames held for one member in one room.
pub(super) type HeldFrames = Vec<(Option<Position>, SharedFrame)>;

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
    /// `sequence` waits for its replay of `room` from now on (a wait already there is
    /// replaced: its replay will find nothing); the token names this wait.
    pub(super) fn begin(&mut self, sequence: u64, room: &RoomName) -> u64 {
        self.next_token += 1;
        let token = self.next_token;
        let waits = self.held.entry(sequence).or_default();
        waits.retain(|wait| wait.room != *room);
        waits.push(Wait {
            room: room.clone(),
            token,
            frames: Vec::new(),
        });
        token
    }

    /// Holds `frame` for `sequence` if it waits for its replay of `room`.
    pub(super) fn hold(
        &mut self,
        sequence: u64,
        room: &RoomName,
        position: Option<Position>,
        frame: &SharedFrame,
        limit: usize,
    ) -> Held {
        let wait = (self.held.get_mut(&sequence))
            .and_then(|waits| waits.iter_mut().find(|wait| wait.room == *room));
        let Some(wait) = wait else {
            return Held::No;
        };
        if wait.frames.len() >= limit {
            return Held::Overflow;
        }
        wait.frames.push((position, frame.clone()));
        Held::Yes
    }

    /// The replay of wait `token` arrived: the frames held for it, oldest first; `None`
    /// if the wait is gone (the member left, or joined again since).
    pub(super) fn finish(
        &mut self,
        sequence: u64,
        room: &RoomName,
        token: u64,
    ) -> Option<HeldFrames> {
        let waits = self.held.get_mut(&sequence)?;
        let index = waits
            .iter()
            .position(|wait| wait.room == *room && wait.token == token)?;
        let wait = waits.swap_remove(index);
        if waits.is_empty() {
            self.held.remove(&sequence);
        }
        Some(wait.frames)
    }

    /// The member left `room` (or, with `None`, every room): its waits end.
    pub(super) fn forget(&mut self, sequence: u64, room: Option<&RoomName>) {
        if let Some(waits) = self.held.get_mut(&sequence) {
            waits.retain(|wait| room.is_some_and(|room| wait.room != *room));
            if waits.is_empty() {
                self.held.remove(&sequence);
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}
