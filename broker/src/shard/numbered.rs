//! A numbered room's frames on their way to a shard's members: each member gets each offset
//! once and in order, with its join's replay first, and a gap mended.
//!
//! A member whose replay is on its way (a join with `history` or `since`, or a mend) has its
//! live frames of the room held ([`Waiting`]); the replay, read from the room's sequencer,
//! brings everything up to its top, and the held frames past the top follow it. A frame a
//! member had already is dropped ([`Offer::Duplicate`]). A frame past a gap
//! ([`Offer::Gap`]: a core NATS message lost between nodes, or the seam of a move between
//! nodes) starts a **mend**: the member's frames are held while what it missed is read from
//! the room's history, exactly as for a join with `since`, but with no `joined` frame. A room
//! that keeps no history cannot mend: the held frames are then queued as they are, the gap
//! stays, and `switchboard_room_gaps_total{outcome="unmended"}` counts it.

use std::cell::RefMut;
use std::rc::Rc;

use super::Shard;
use super::member::{Held, Member, Offer, Waited, Waiting};
use crate::connection::Connection;
use crate::disconnect::DisconnectReason;
use crate::outbound::SharedFrame;
use crate::rooms::history::{Replay, Want, epoch_id};
use crate::rooms::{Position, RoomName};

/// What a member does with a broadcast to its room.
pub(super) enum Take {
    /// Queue it now.
    Now,
    /// A replay is on the way: held until then.
    Held,
    /// Not at all: it had it, it was excluded, or it holds too much already (closed).
    Skip,
}

/// A member's gap to mend: from after `after`, under its wait `token`.
pub(super) struct Mend {
    connection: Rc<Connection>,
    token: u64,
    after: Position,
}

/// One broadcast on its way to a shard's members of its room.
pub(super) struct Offering<'a> {
    room: &'a RoomName,
    position: Option<Position>,
    waiting: RefMut<'a, Waiting>,
    /// The gaps found on the way, mended once the offering is done.
    pub(super) mends: Vec<Mend>,
    /// The most frames held for one member (`limits.outbound_queue_frames`).
    limit: usize,
}

impl Offering<'_> {
    /// What `member` (connection `sequence`) does with the broadcast's `frame`.
    pub(super) fn take(&mut self, sequence: u64, member: &Member, frame: &SharedFrame) -> Take {
        if !self.place(sequence, member) {
            return Take::Skip;
        }
        if self.waiting.is_empty() {
            return Take::Now;
        }
        let (room, position) = (self.room, self.position);
        match self
            .waiting
            .hold(sequence, room, position, frame, self.limit)
        {
            Held::No => Take::Now,
            Held::Yes => Take::Held,
            Held::Overflow => {
                let connection = &member.connection;
                connection.request_close(DisconnectReason::SlowConsumer);
                Take::Skip
            }
        }
    }

    /// The broadcast excluded `member` (connection `sequence`): it passes it over (and a
    /// replay on its way must not bring it).
    pub(super) fn pass(&mut self, sequence: u64, member: &Member) {
        if let Some(position) = self.position.filter(|_| self.place(sequence, member)) {
            self.waiting.pass(sequence, self.room, position.offset);
        }
    }

    /// Offers a numbered broadcast to `member`; whether it is new to it. One past a gap
    /// starts a mend (unless a replay is on its way already).
    fn place(&mut self, sequence: u64, member: &Member) -> bool {
        let Some(position) = self.position else {
            return true;
        };
        match member.numbered.offer(position) {
            Offer::Duplicate => return false,
            Offer::Gap { after } if !self.waiting.waits(sequence, self.room) => {
                let token = self.waiting.begin(sequence, self.room, Some(after));
                let connection = member.connection.clone();
                (self.mends).push(Mend {
                    connection,
                    token,
                    after,
                });
            }
            Offer::Gap { .. } | Offer::Next => {}
        }
        true
    }
}

impl Shard {
    /// A broadcast to `room` on its way to this shard's members.
    pub(super) fn offering<'a>(
        &'a self,
        room: &'a RoomName,
        position: Option<Position>,
    ) -> Offering<'a> {
        Offering {
            room,
            position,
            waiting: self.waiting.borrow_mut(),
            mends: Vec::new(),
            limit: self.gateway.config.limits.outbound_queue_frames,
        }
    }

    /// Offers a broadcast held for connection `sequence` while it moved here (`frame`, or
    /// `None` for one that excluded it) now that it is a member.
    pub(super) fn offer_arrived(
        self: &Rc<Self>,
        sequence: u64,
        room: &RoomName,
        position: Position,
        frame: Option<&SharedFrame>,
    ) {
        let rooms = self.rooms.borrow();
        let Some((_, member)) = rooms.members(room).find(|(s, _)| *s == sequence) else {
            return;
        };
        let mut offering = self.offering(room, Some(position));
        match frame {
            None => offering.pass(sequence, member),
            Some(frame) => {
                if let Take::Now = offering.take(sequence, member, frame) {
                    self.enqueue(&member.connection, frame);
                }
            }
        }
        let mends = std::mem::take(&mut offering.mends);
        drop((rooms, offering));
        self.mend(room, mends);
    }

    /// A connection that moved here had every numbered broadcast up to these positions.
    pub(super) fn stand(&self, sequence: u64, standing: &[(RoomName, Position)]) {
        let rooms = self.rooms.borrow();
        for (room, position) in standing {
            if let Some((_, member)) = rooms.members(room).find(|(s, _)| *s == sequence) {
                member.numbered.had_up_to(*position);
            }
        }
    }

    /// Where connection `sequence` stands in each of `rooms` that numbers its messages (it
    /// is leaving for another node, without what is held for a replay on its way: a join's
    /// replay is lost with it, and a mend starts over there).
    pub(crate) fn standing(&self, sequence: u64, rooms: &[RoomName]) -> Vec<(String, Position)> {
        let (members, waiting) = (self.rooms.borrow(), self.waiting.borrow());
        (rooms.iter())
            .filter_map(|room| {
                let (_, member) = members.members(room).find(|(s, _)| *s == sequence)?;
                let had = (waiting.waits_from(sequence, room))
                    .unwrap_or_else(|| member.numbered.last())?;
                Some((room.as_str().to_owned(), had))
            })
            .collect()
    }

    /// Reads what each of `mends` missed of `room` from the room's history, and queues it
    /// with the frames held meanwhile.
    pub(super) fn mend(self: &Rc<Self>, room: &RoomName, mends: Vec<Mend>) {
        for mend in mends {
            let most = self.replay_limit();
            let want = Want::Since {
                offset: mend.after.offset,
                epoch: None,
                limit: most + 1,
            };
            let (shard, room) = (self.clone(), room.clone());
            self.tasks.spawn_local(async move {
                let replay = shard.gateway.directory.replay(&room, &want).await;
                let mut replay = replay.unwrap_or_else(|unreached| {
                    tracing::warn!(%room, %unreached, "a member's gap cannot be mended");
                    Replay::unavailable()
                });
                // Asked without the epoch's name: trusted here, by its id.
                replay.recovered = replay.continues(mend.after);
                let replay = replay.for_join(most);
                let outcome = if replay.recovered {
                    "mended"
                } else {
                    "unmended"
                };
                let metrics = &shard.gateway.metrics;
                metrics.room_gaps.with_label_values(&[outcome]).inc();
                shard.deliver_replay(&mend.connection, &room, mend.token, replay, false);
            });
        }
    }

    /// The most frames a replay brings: half the outbound queue (a `since` further behind
    /// is answered `recovered: false`).
    pub(super) fn replay_limit(&self) -> usize {
        self.gateway.config.limits.outbound_queue_frames / 2
    }

    /// Queues `joined` (if `announced`: a join's replay, not a mend), the replay and the
    /// frames held meanwhile (numbered ones only if the replay did not bring them) to a
    /// member that is still in the room and waited for it. A gap past the replay's top
    /// starts another mend, with the frames after it held again.
    pub(super) fn deliver_replay(
        self: &Rc<Self>,
        connection: &Rc<Connection>,
        room: &RoomName,
        token: u64,
        replay: Replay,
        announced: bool,
    ) {
        let sequence = connection.id.sequence;
        let Some(Waited { frames, passed }) =
            (self.waiting.borrow_mut()).finish(sequence, room, token)
        else {
            return;
        };
        let rooms = self.rooms.borrow();
        let Some((_, member)) = rooms.members(room).find(|(s, _)| *s == sequence) else {
            return;
        };
        let metrics = &self.gateway.metrics;
        let envelope = self.gateway.directory.settings(room).envelope;
        let replayed = (replay.messages.iter())
            .filter(|kept| !passed.contains(&kept.offset))
            .map(|kept| kept.delivered(room, envelope));
        let announce = announced.then(|| replay.joined(room));
        for message in announce.into_iter().chain(replayed) {
            if connection.push(message, metrics).is_err() {
                return;
            }
        }
        // What the replay brought: up to its top, in its epoch (nothing, if not recovered).
        let mut covered = replay.recovered.then(|| Position {
            epoch: epoch_id(&replay.epoch),
            offset: replay.top,
        });
        let mut frames = frames.into_iter();
        while let Some((position, frame)) = frames.next() {
            match Beyond::of(position, covered, &passed) {
                Beyond::Brought => continue,
                Beyond::Next => {}
                Beyond::Gap(after) => {
                    let rest = std::iter::once((position, frame)).chain(frames).collect();
                    let mut waiting = self.waiting.borrow_mut();
                    let token = waiting.refill(sequence, room, (after, rest, passed));
                    drop((waiting, rooms));
                    let connection = connection.clone();
                    let mend = Mend {
                        connection,
                        token,
                        after,
                    };
                    return self.mend(room, vec![mend]);
                }
            }
            self.enqueue(connection, &frame);
            if position.is_some() && covered.is_some() {
                covered = position;
            }
        }
        if let Some(covered) = covered {
            member.numbered.had_up_to(covered);
        }
    }
}

/// Where a held frame stands against what a replay brought.
enum Beyond {
    /// The replay brought it.
    Brought,
    /// It comes next (or cannot be placed: unnumbered, or after a replay that did not
    /// recover).
    Next,
    /// Offsets after this one (other than ones the member was passed over) are missing.
    Gap(Position),
}

impl Beyond {
    fn of(position: Option<Position>, covered: Option<Position>, passed: &[u64]) -> Self {
        let (Some(position), Some(covered)) = (position, covered) else {
            return Self::Next;
        };
        if position.epoch != covered.epoch {
            return Self::Next;
        }
        if position.offset <= covered.offset {
            return Self::Brought;
        }
        let mut between = covered.offset + 1..position.offset;
        match between.any(|offset| !passed.contains(&offset)) {
            true => Self::Gap(covered),
            false => Self::Next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: u64) -> Option<Position> {
        Some(Position { epoch: 9, offset })
    }

    #[test]
    fn a_held_frame_is_placed_against_the_replay_and_what_the_member_passed_over() {
        let top = at(10);
        assert!(matches!(Beyond::of(at(9), top, &[]), Beyond::Brought));
        assert!(matches!(Beyond::of(at(10), top, &[]), Beyond::Brought));
        assert!(matches!(Beyond::of(at(11), top, &[]), Beyond::Next));
        assert!(matches!(Beyond::of(at(13), top, &[]), Beyond::Gap(p) if Some(p) == top));
        assert!(matches!(Beyond::of(at(13), top, &[11, 12]), Beyond::Next));
        assert!(matches!(Beyond::of(at(13), top, &[12]), Beyond::Gap(_)));
        assert!(matches!(Beyond::of(at(13), None, &[]), Beyond::Next));
        assert!(matches!(Beyond::of(None, top, &[]), Beyond::Next));
        let other_epoch = Some(Position {
            epoch: 1,
            offset: 40,
        });
        assert!(matches!(Beyond::of(other_epoch, top, &[]), Beyond::Next));
    }
}
