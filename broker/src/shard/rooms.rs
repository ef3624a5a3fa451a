//! A shard's rooms: joins (with a replay of the room's past when asked), leaves, and the
//! broadcast to its local members.
//!
//! A join that asks for the past (`history`, or `since` and `epoch`) becomes a member at
//! once, so nothing published from then on can miss it, but its live frames of that room
//! are held until the replay, read from the room's sequencer, arrives. Then it gets the
//! `joined` frame, the replay, and the held frames past the replay's top; a frame at or
//! below that top that is still on its way is dropped when it comes. No gap and no
//! duplicate, however fast the room is published to (`shard/numbered.rs`).

use std::rc::Rc;

use super::Shard;
use super::member::Member;
use super::numbered::Take;
use crate::connection::Connection;
use crate::message::Message;
use crate::outbound::{self, SharedFrame};
use crate::rooms::events::Change;
use crate::rooms::history::{Replay, Want};
use crate::rooms::{Brought, RoomDelivery, RoomName, TooManyRooms};

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

    /// What a connection leaving for another node takes along of `rooms`: the newest
    /// broadcast of each node queued to their members here.
    pub(crate) fn brought(&self, rooms: &[RoomName]) -> Brought {
        let seen = self.stamps_seen.borrow();
        Brought(
            (rooms.iter())
                .filter_map(|room| Some((room.as_str().to_owned(), seen.get(room)?.clone())))
                .collect(),
        )
    }

    /// Forgets what was noted of `room`'s broadcasts once it has no member here left.
    pub(super) fn forget_stamps_if_empty(&self, room: &RoomName) {
        if self.rooms.borrow().members(room).next().is_none() {
            self.stamps_seen.borrow_mut().remove(room);
        }
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
            (self.waiting.borrow_mut()).forget(connection.id.sequence, Some(room));
            let directory = &self.gateway.directory;
            let authorizer = connection.facts.authorizer.as_deref();
            directory.membership_changed(room, Change::Leave, connection.id, authorizer);
            directory.member_left(room);
            self.record(|changes| changes.leave(room.as_str(), &connection.facts.connection_id));
            self.mirror_rooms(connection);
            self.forget_stamps_if_empty(room);
        }
    }

    /// Queues `frame` to every local member of `room` but the excluded one; returns the
    /// count. An unreliable message goes to the WebTransport members that asked for
    /// datagrams as a datagram, at once (to the others, and whenever a datagram cannot be
    /// sent, through their queue).
    pub fn broadcast_local(
        self: &Rc<Self>,
        room: &RoomName,
        frame: &SharedFrame,
        delivery: RoomDelivery,
    ) -> usize {
        let skip = delivery
            .exclude
            .filter(|id| self.owns(id))
            .map(|id| id.sequence);
        let rooms = self.rooms.borrow();
        let mut offering = self.offering(room, delivery.position);
        let mut delivered = 0;
        for (sequence, member) in rooms.members(room) {
            if Some(sequence) == skip {
                offering.pass(sequence, member);
                continue;
            }
            match offering.take(sequence, member, frame) {
                Take::Now => {}
                Take::Held => {
                    delivered += 1;
                    continue;
                }
                Take::Skip => continue,
            }
            let connection = &member.connection;
            let sent = delivery.unreliable && connection.send_datagram(frame);
            if sent || self.enqueue_keyed(connection, frame, delivery.conflation) {
                delivered += 1;
            }
        }
        let mut arriving = self.arriving.borrow_mut();
        for (sequence, held) in arriving.iter_mut() {
            if held.brings(room) {
                if Some(*sequence) == skip {
                    held.pass(room, delivery.position);
                } else if held.hold_room_frame(frame, room, delivery) {
                    delivered += 1;
                }
            } else if held.holds_all() && delivery.stamp.is_some() {
                // Perhaps one of its rooms: held, and not counted.
                held.hold_room_frame(frame, room, delivery);
            }
        }
        // Only a cluster's connections move between nodes.
        if let Some(stamp) = delivery.stamp.filter(|_| self.gateway.cluster.is_some())
            && rooms.members(room).next().is_some()
        {
            let mut seen = self.stamps_seen.borrow_mut();
            seen.entry(room.clone()).or_default().note(stamp);
        }
        let mends = std::mem::take(&mut offering.mends);
        drop((rooms, offering, arriving));
        self.mend(room, mends);
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
        let settings = directory.settings(&room);
        let delivery = RoomDelivery {
            conflation: delivery.conflation.filter(|_| settings.conflate),
            ..delivery
        };
        if settings.sequenced() {
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
        let delivery = RoomDelivery {
            stamp: directory.stamp(),
            ..delivery
        };
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

    /// A join that asked for `room`'s past: a member now, its live frames of the room held
    /// until the replay `want` asks for arrives; then `joined`, the replay, the held frames.
    /// A replay is at most half the outbound queue (`limits.outbound_queue_frames`); a
    /// `since` further behind is answered `recovered: false`. A connection that already is
    /// a member gets `joined` with `recovered: false` and no replay (it has had the room's
    /// messages all along); in a room that does not number its messages, `joined` says
    /// `recovered: false` at once.
    pub fn join_with_replay(
        self: &Rc<Self>,
        connection: &Rc<Connection>,
        room: &RoomName,
        want: Want,
    ) -> Result<(), TooManyRooms> {
        let already = self.is_member(connection, room);
        self.join(connection, room)?;
        if !self.gateway.directory.settings(room).sequenced() {
            let joined = Replay::unavailable().joined(room);
            let _ = connection.push(joined, &self.gateway.metrics);
            return Ok(());
        }
        let token = (self.waiting.borrow_mut()).begin(connection.id.sequence, room, None);
        let most = self.replay_limit();
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
            let mut replay = replay.unwrap_or_else(|unreached| {
                tracing::warn!(%room, %unreached, "a join's replay is unavailable");
                Replay::unavailable()
            });
            if already {
                replay.recovered = false;
            }
            shard.deliver_replay(&connection, &room, token, replay.for_join(most), true);
        });
        Ok(())
    }
}
