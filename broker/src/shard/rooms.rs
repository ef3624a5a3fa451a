//! A shard's rooms: joins (with a replay of the room's past when asked), leaves, and the
//! broadcast to its local members.
//!
//! A join that asks for the past (`history`, or `since` and `epoch`) becomes a member at
//! once, so nothing published from then on can miss it, but its live frames of that room
//! are held ([`Waiting`]) until the replay, read from the room's sequencer, arrives. Then
//! it gets the `joined` frame, the replay, and the held frames past the replay's top; a
//! frame at or below that top that is still on its way is dropped when it comes
//! ([`Member::takes`]). No gap and no duplicate, however fast the room is published to.

use std::rc::Rc;

use super::Shard;
use super::member::{Held, Member, Waiting};
use crate::connection::Connection;
use crate::disconnect::DisconnectReason;
use crate::message::Message;
use crate::outbound::{self, SharedFrame};
use crate::rooms::events::Change;
use crate::rooms::history::{Replay, Want};
use crate::rooms::{RoomDelivery, RoomName, TooManyRooms};

impl Shard {
    /// Adds a local connection to `room` (idempotent), unless that would put it in more
    /// than `limits.max_rooms_per_connection` rooms.
    pub fn join(&self, connection: &Rc<Connection>, room: &RoomName) -> Result<(), TooManyRooms> {
        if self.add_member(connection, room)? {
            let facts = &connection.facts;
            let authorizer = facts.authorizer.as_deref();
            (self.gateway.directory).membership_changed(
                room,
                Change::Join,
                connection.id,
                authorizer,
            );
        }
        Ok(())
    }

    /// A connection that moved here from another node rejoins its rooms (its members
    /// were not told it left, and are not told it is back).
    pub fn join_moved(&self, connection: &Rc<Connection>, room: &RoomName) {
        let _ = self.add_member(connection, room);
    }

    /// Adds a local connection to `room`; whether it was not a member before.
    fn add_member(
        &self,
        connection: &Rc<Connection>,
        room: &RoomName,
    ) -> Result<bool, TooManyRooms> {
        let limit = self.gateway.config.limits.max_rooms_per_connection;
        let mut rooms = self.rooms.borrow_mut();
        let sequence = connection.id.sequence;
        if rooms.room_count(sequence) >= limit && !rooms.is_member(room, sequence) {
            self.gateway
                .metrics
                .refused
                .with_label_values(&["rooms_per_connection"])
                .inc();
            return Err(TooManyRooms(limit));
        }
        let member = Member::new(connection.clone(), crate::clock::now_ms());
        let joined = rooms.join(room, sequence, member);
        drop(rooms);
        if joined {
            self.gateway.directory.member_joined(room);
            self.record(|changes| changes.join(room.as_str(), &connection.facts.connection_id));
            self.mirror_rooms(connection);
        }
        Ok(joined)
    }

    /// In cluster mode, the connection's mirrored record gets its rooms.
    fn mirror_rooms(&self, connection: &Connection) {
        let rooms = || self.rooms_of(connection);
        self.gateway
            .directory
            .rooms_changed(&connection.facts, rooms);
    }

    /// Whether a local connection is in `room`.
    pub fn is_member(&self, connection: &Connection, room: &RoomName) -> bool {
        self.rooms.borrow().is_member(room, connection.id.sequence)
    }

    /// Removes a local connection from `room` (idempotent).
    pub fn leave(&self, connection: &Connection, room: &RoomName) {
        let left = self.rooms.borrow_mut().leave(room, connection.id.sequence);
        if left {
            let directory = &self.gateway.directory;
            let authorizer = connection.facts.authorizer.as_deref();
            directory.membership_changed(room, Change::Leave, connection.id, authorizer);
            directory.member_left(room);
            self.record(|changes| changes.leave(room.as_str(), &connection.facts.connection_id));
            self.mirror_rooms(connection);
        }
    }

    /// Queues `frame` to every local member of `room` but the excluded one; returns the
    /// count. An unreliable message goes to the WebTransport members that asked for
    /// datagrams as a datagram, at once (to the others, and whenever a datagram cannot be
    /// sent, through their queue).
    pub fn broadcast_local(
        &self,
        room: &RoomName,
        frame: &SharedFrame,
        delivery: RoomDelivery,
    ) -> usize {
        let skip = delivery
            .exclude
            .filter(|id| self.owns(id))
            .map(|id| id.sequence);
        let rooms = self.rooms.borrow();
        let mut waiting = self.waiting.borrow_mut();
        let mut delivered = 0;
        for (sequence, member) in rooms.members(room) {
            if Some(sequence) == skip {
                continue;
            }
            if let Some(offset) = delivery.offset {
                match self.replay_state(member, sequence, room, offset, frame, &mut waiting) {
                    Take::Now => {}
                    Take::Held => {
                        delivered += 1;
                        continue;
                    }
                    Take::Skip => continue,
                }
            }
            let connection = &member.connection;
            let sent = delivery.unreliable && connection.send_datagram(frame);
            if sent || self.enqueue(connection, frame) {
                delivered += 1;
            }
        }
        for (sequence, held) in self.arriving.borrow_mut().iter_mut() {
            if held.brings(room) && Some(*sequence) != skip && held.hold_frame(frame) {
                delivered += 1;
            }
        }
        drop((rooms, waiting));
        self.shed_if_asked();
        self.gateway.metrics.messages_sent.inc_by(delivered as u64);
        delivered
    }

    /// A client's publish to `room`: queued to this shard's members at once (the command
    /// loop writes them in its next pass), and sent to every other shard as a command,
    /// and in cluster mode to the other nodes. Those sends count as the publisher's work
    /// in flight, so a client that publishes faster than the shards (and NATS) take its
    /// messages stops being read (backpressure), instead of piling up tasks.
    pub fn publish(
        self: &Rc<Self>,
        publisher: &Rc<Connection>,
        room: RoomName,
        message: Message,
        delivery: RoomDelivery,
    ) {
        let directory = &self.gateway.directory;
        if directory.settings(&room).sequenced() {
            // Numbered by the room's sequencer, which queues it to every shard in order.
            let in_flight = publisher.start_call();
            let directory = directory.clone();
            self.tasks.spawn_local(async move {
                let _in_flight = in_flight;
                if let Err(unreached) = directory.broadcast(&room, &message, delivery).await {
                    tracing::warn!(%room, %unreached, "a client's publish was not delivered");
                }
            });
            return;
        }
        if directory.reaches_beyond_one_shard() {
            let in_flight = publisher.start_call();
            let (directory, from) = (directory.clone(), self.index);
            let (room, message) = (room.clone(), message.clone());
            self.tasks.spawn_local(async move {
                let _in_flight = in_flight;
                directory.relay(from, &room, message, delivery).await;
            });
        }
        self.broadcast_local(&room, &outbound::shared(message), delivery);
        self.work_needed.notify_one();
    }

    /// A join that asked for `room`'s past: a member now, its live frames held until the
    /// replay `want` asks for arrives; then `joined`, the replay, the held frames. A
    /// replay is at most half the outbound queue (`limits.outbound_queue_frames`); a
    /// `since` further behind is answered `recovered: false`.
    pub fn join_with_replay(
        self: &Rc<Self>,
        connection: &Rc<Connection>,
        room: &RoomName,
        want: Want,
    ) -> Result<(), TooManyRooms> {
        self.join(connection, room)?;
        let sequence = connection.id.sequence;
        self.waiting.borrow_mut().begin(sequence, room);
        let most = self.gateway.config.limits.outbound_queue_frames / 2;
        let want = match want {
            Want::Last(count) => Want::Last(count.min(most)),
            Want::Since { offset, epoch, .. } => Want::Since {
                offset,
                epoch,
                limit: most + 1,
            },
        };
        let in_flight = connection.start_call();
        let (shard, connection, room) = (self.clone(), connection.clone(), room.clone());
        self.tasks.spawn_local(async move {
            let _in_flight = in_flight;
            let replay = shard.gateway.directory.replay(&room, &want).await;
            let replay = replay.unwrap_or_else(|unreached| {
                tracing::warn!(%room, %unreached, "a join's replay is unavailable");
                Replay::unavailable()
            });
            shard.deliver_replay(&connection, &room, replay.for_join(most));
        });
        Ok(())
    }

    /// Queues `joined`, the replay and the frames held meanwhile (those past the replay),
    /// to a member that is still in the room.
    fn deliver_replay(&self, connection: &Rc<Connection>, room: &RoomName, replay: Replay) {
        let sequence = connection.id.sequence;
        let held = self.waiting.borrow_mut().finish(sequence, room);
        let rooms = self.rooms.borrow();
        let Some((_, member)) = rooms.members(room).find(|(s, _)| *s == sequence) else {
            return;
        };
        let metrics = &self.gateway.metrics;
        let envelope = self.gateway.directory.settings(room).envelope;
        let replayed = std::iter::once(replay.joined(room)).chain(
            replay
                .messages
                .iter()
                .map(|kept| kept.delivered(room, envelope)),
        );
        for message in replayed {
            if connection.push(message, metrics).is_err() {
                return;
            }
        }
        let mut last = replay.top;
        for (offset, frame) in held.into_iter().filter(|(offset, _)| *offset > replay.top) {
            self.enqueue(connection, &frame);
            last = offset;
        }
        member.replayed_up_to(last);
    }

    /// What `member` does with the broadcast numbered `offset`.
    fn replay_state(
        &self,
        member: &Member,
        sequence: u64,
        room: &RoomName,
        offset: u64,
        frame: &SharedFrame,
        waiting: &mut Waiting,
    ) -> Take {
        if !member.takes(offset) {
            return Take::Skip;
        }
        if waiting.is_empty() {
            return Take::Now;
        }
        let limit = self.gateway.config.limits.outbound_queue_frames;
        match waiting.hold(sequence, room, offset, frame, limit) {
            Held::No => Take::Now,
            Held::Yes => Take::Held,
            Held::Overflow => {
                let connection = &member.connection;
                connection.request_close(DisconnectReason::SlowConsumer);
                Take::Skip
            }
        }
    }
}

/// What a member does with a numbered broadcast.
enum Take {
    /// Queue it now.
    Now,
    /// Its join's replay is on the way: held until then.
    Held,
    /// Not at all: its replay brought it, or it holds too much already (closed).
    Skip,
}
