//! A shard's record of one local connection in one room: the connection, since when it is
//! a member (what presence reports), and, in a room that numbers its messages, the newest
//! offset it has had; and the live frames held for members whose replay is on its way.
//!
//! A numbered room's frames reach a shard in offset order, so a member that is offered an
//! offset it has had already is offered a duplicate (its replay brought it), and one that is
//! offered an offset beyond the next has missed some (a core NATS message lost between
//! nodes, the seam of a move between nodes): the shard holds its frames and mends the gap
//! from the room's history (`shard/rooms.rs`).

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
    /// Where it stands in the room, if the room numbers its messages.
    pub(super) numbered: Standing,
}

/// The newest numbered frame a member was given or passed over (a broadcast that excluded
/// it), or its replay brought.
#[derive(Default)]
pub(super) struct Standing {
    last: Cell<Option<Position>>,
}

/// What a member makes of a numbered frame offered to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Offer {
    /// The next one (or the first, or one of a new epoch).
    Next,
    /// It had this one.
    Duplicate,
    /// It comes after a gap: the member's newest was `after`.
    Gap { after: Position },
}

impl Member {
    pub(super) fn new(connection: Rc<Connection>, joined_at_ms: u64) -> Self {
        Self {
            connection,
            joined_at_ms,
            numbered: Standing::default(),
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
}

impl Standing {
    /// Offers it the frame at `position`: its newest, unless it had it.
    pub(super) fn offer(&self, position: Position) -> Offer {
        let Some(last) = self.last.get().filter(|last| last.epoch == position.epoch) else {
            self.last.set(Some(position));
            return Offer::Next;
        };
        if position.offset <= last.offset {
            return Offer::Duplicate;
        }
        self.last.set(Some(position));
        match position.offset == last.offset + 1 {
            true => Offer::Next,
            false => Offer::Gap { after: last },
        }
    }

    /// It has had everything up to `position` (a replay brought it, or the node it moved
    /// from queued it).
    pub(super) fn had_up_to(&self, position: Position) {
        self.last.set(Some(position));
    }

    /// The newest numbered frame it has had.
    pub(super) fn last(&self) -> Option<Position> {
        self.last.get()
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
    /// Offsets of broadcasts that excluded it, meanwhile: its replay skips them.
    passed: Vec<u64>,
    /// The newest it had before the wait began (a mend's; none for a join).
    from: Option<Position>,
}

/// What waited for a replay that arrived.
pub(super) struct Waited {
    pub(super) frames: HeldFrames,
    pub(super) passed: Vec<u64>,
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
    /// `sequence` waits for its replay of `room` from now on, having had everything up to
    /// `from` (a wait already there is replaced: its replay will find nothing); the token
    /// names this wait.
    pub(super) fn begin(&mut self, sequence: u64, room: &RoomName, from: Option<Position>) -> u64 {
        self.next_token += 1;
        let token = self.next_token;
        let waits = self.held.entry(sequence).or_default();
        waits.retain(|wait| wait.room != *room);
        waits.push(Wait {
            room: room.clone(),
            token,
            frames: Vec::new(),
            passed: Vec::new(),
            from,
        });
        token
    }

    /// `sequence` waits for another replay of `room`, with `frames` held already and the
    /// offsets it `passed` over; the token names this wait.
    pub(super) fn refill(
        &mut self,
        sequence: u64,
        room: &RoomName,
        (from, frames, passed): (Position, HeldFrames, Vec<u64>),
    ) -> u64 {
        let token = self.begin(sequence, room, Some(from));
        if let Some(wait) = self.wait_mut(sequence, room) {
            (wait.frames, wait.passed) = (frames, passed);
        }
        token
    }

    /// The wait of `sequence` for a replay of `room`, if it waits for one.
    fn wait(&self, sequence: u64, room: &RoomName) -> Option<&Wait> {
        let waits = self.held.get(&sequence)?;
        waits.iter().find(|wait| wait.room == *room)
    }

    fn wait_mut(&mut self, sequence: u64, room: &RoomName) -> Option<&mut Wait> {
        let waits = self.held.get_mut(&sequence)?;
        waits.iter_mut().find(|wait| wait.room == *room)
    }

    /// If `sequence` waits for a replay of `room`: the newest it had before.
    pub(super) fn waits_from(&self, sequence: u64, room: &RoomName) -> Option<Option<Position>> {
        self.wait(sequence, room).map(|wait| wait.from)
    }

    /// Whether `sequence` waits for a replay of `room`.
    pub(super) fn waits(&self, sequence: u64, room: &RoomName) -> bool {
        self.wait(sequence, room).is_some()
    }

    /// Notes that a broadcast at `offset` excluded `sequence`, if it waits for a replay of
    /// `room` (which must not bring it).
    pub(super) fn pass(&mut self, sequence: u64, room: &RoomName, offset: u64) {
        if let Some(wait) = self.wait_mut(sequence, room) {
            wait.passed.push(offset);
        }
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
        let Some(wait) = self.wait_mut(sequence, room) else {
            return Held::No;
        };
        if wait.frames.len() >= limit {
            return Held::Overflow;
        }
        wait.frames.push((position, frame.clone()));
        Held::Yes
    }

    /// The replay of wait `token` arrived: the frames held for it, oldest first, and what
    /// it passed over; `None` if the wait is gone (the member left, or joined again since).
    pub(super) fn finish(&mut self, sequence: u64, room: &RoomName, token: u64) -> Option<Waited> {
        let waits = self.held.get_mut(&sequence)?;
        let index = waits
            .iter()
            .position(|wait| wait.room == *room && wait.token == token)?;
        let wait = waits.swap_remove(index);
        if waits.is_empty() {
            self.held.remove(&sequence);
        }
        Some(Waited {
            frames: wait.frames,
            passed: wait.passed,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(epoch: u32, offset: u64) -> Position {
        Position { epoch, offset }
    }

    #[test]
    fn a_member_tells_the_next_frame_from_a_duplicate_and_from_one_past_a_gap() {
        let lobby = Standing::default();
        assert_eq!(lobby.offer(at(1, 7)), Offer::Next, "the first one");
        assert_eq!(lobby.offer(at(1, 8)), Offer::Next);
        assert_eq!(lobby.offer(at(1, 8)), Offer::Duplicate);
        assert_eq!(lobby.offer(at(1, 3)), Offer::Duplicate);
        assert_eq!(lobby.offer(at(1, 11)), Offer::Gap { after: at(1, 8) });
        assert_eq!(lobby.last(), Some(at(1, 11)), "a gap is reported once");
        assert_eq!(lobby.offer(at(1, 12)), Offer::Next);
        assert_eq!(
            lobby.offer(at(2, 1)),
            Offer::Next,
            "a new epoch starts over"
        );
        lobby.had_up_to(at(2, 40));
        assert_eq!(
            lobby.offer(at(2, 40)),
            Offer::Duplicate,
            "its replay brought it"
        );
        assert_eq!(lobby.offer(at(2, 41)), Offer::Next);
    }
}
