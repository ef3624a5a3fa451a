//! Calls and broadcasts held for a connection that is moving to this node (cluster
//! resume, [`crate::resume::moving`]): between the old node letting go of it and this one
//! registering it (its `$connect` runs first), what the old node forwards, and what is
//! broadcast to the rooms it brings, waits here and is applied in order as it registers.
//! Pushes, joins, leaves and DELETEs are answered at once (the old node waits only its
//! request timeout, and must not be told the connection is gone); a GET waits.

use std::collections::HashMap;

use tokio::sync::oneshot;

use super::handle::StateCommand;
use crate::metrics::Metrics;
use crate::outbound::{self, SharedFrame};
use crate::rooms::{Brought, Position, RoomDelivery, RoomName, Stamp};

/// A call for a connection that is still arriving, applied once it is registered (or
/// found gone if it never is).
pub(super) enum Deferred {
    /// A push already answered (and counted) as delivered.
    Frame(SharedFrame),
    /// A broadcast to one of the rooms it brings: dropped if the old node had queued it
    /// already (by its stamp, [`Held::brought`]; by its offset in a numbered room,
    /// [`Held::standing`]).
    RoomFrame {
        frame: SharedFrame,
        room: RoomName,
        stamp: Option<Stamp>,
        position: Option<Position>,
    },
    /// A numbered broadcast to one of the rooms it brings that excluded it.
    Passed { room: RoomName, position: Position },
    /// A call whose caller waits for the answer.
    Command(StateCommand),
}

/// Where the reply of a call answered already goes: nowhere.
fn unanswered<T>() -> oneshot::Sender<T> {
    oneshot::channel().0
}

/// The most a transport adds to a message's payload (a WebSocket frame's longest header):
/// held frames are counted as the queue they go to will count them, or more.
const MAX_HEADER: usize = 10;

/// Most calls held for one arriving connection; past it (or past its outbound queue's
/// bytes) they are answered as gone.
const MAX_DEFERRED: usize = 1024;

/// The calls held for one arriving connection, and the bytes of their frames.
pub(super) struct Held {
    pub(super) calls: Vec<Deferred>,
    bytes: usize,
    /// The most bytes of frames held (its outbound queue's bound).
    max_bytes: usize,
    /// The rooms it brings: their broadcasts are held for it too (this node listens to
    /// them meanwhile). Until the old node has said which they are, every stamped
    /// broadcast is held ([`Held::holds_all`]).
    pub(super) rooms: Vec<RoomName>,
    rooms_known: bool,
    /// The broadcasts the old node had queued for it (they come with its frames).
    pub(super) brought: Brought,
    /// In the rooms that number their messages, the newest it had there.
    pub(super) standing: Vec<(RoomName, Position)>,
}

impl Held {
    fn new(max_bytes: usize) -> Self {
        Self {
            calls: Vec::new(),
            bytes: 0,
            max_bytes,
            rooms: Vec::new(),
            rooms_known: false,
            brought: Brought::default(),
            standing: Vec::new(),
        }
    }

    /// Whether it is moving here with `room` among its rooms.
    pub(super) fn brings(&self, room: &RoomName) -> bool {
        self.rooms.contains(room)
    }

    /// Whether it holds every stamped broadcast, whatever its room: its rooms are not
    /// known yet. One this node takes between the client's arrival and the old node's
    /// answer may have reached the old node only after it let go (NATS keeps one
    /// publisher's order per receiver, not across receivers); held, it is queued unless
    /// the old node says it had it.
    pub(super) fn holds_all(&self) -> bool {
        !self.rooms_known
    }

    /// Its rooms are `rooms`: what is held of other rooms goes.
    fn keep_rooms(&mut self, rooms: &[RoomName]) {
        let mut bytes = self.bytes;
        self.calls.retain(|call| match call {
            Deferred::RoomFrame { room, frame, .. } if !rooms.contains(room) => {
                bytes -= frame.message().payload.len() + MAX_HEADER;
                false
            }
            _ => true,
        });
        (self.bytes, self.rooms_known) = (bytes, true);
        self.rooms = rooms.to_vec();
    }

    fn has_room(&self, bytes: usize) -> bool {
        self.calls.len() < MAX_DEFERRED && self.bytes + bytes <= self.max_bytes
    }

    fn hold(&mut self, call: Deferred, bytes: usize) {
        self.bytes += bytes;
        self.calls.push(call);
    }

    /// Holds a frame sent to it (a bulk send's, a broadcast's) if there is room; whether
    /// it did.
    pub(super) fn hold_frame(&mut self, frame: &SharedFrame) -> bool {
        self.hold_if_room(Deferred::Frame(frame.clone()), frame)
    }

    /// Holds a broadcast to `room`; whether it did.
    pub(super) fn hold_room_frame(
        &mut self,
        frame: &SharedFrame,
        room: &RoomName,
        delivery: RoomDelivery,
    ) -> bool {
        let call = Deferred::RoomFrame {
            frame: frame.clone(),
            room: room.clone(),
            stamp: delivery.stamp,
            position: delivery.position,
        };
        self.hold_if_room(call, frame)
    }

    /// Notes a broadcast to `room` that excluded it, if it is numbered (its replay must
    /// not bring it, nor its absence look like a gap).
    pub(super) fn pass(&mut self, room: &RoomName, position: Option<Position>) {
        if let Some(position) = position {
            let room = room.clone();
            self.hold(Deferred::Passed { room, position }, 0);
        }
    }

    fn hold_if_room(&mut self, call: Deferred, frame: &SharedFrame) -> bool {
        let bytes = frame.message().payload.len() + MAX_HEADER;
        let room = self.has_room(bytes);
        if room {
            self.hold(call, bytes);
        }
        room
    }
}

/// Every connection arriving on a shard, by the sequence it will have.
#[derive(Default)]
pub(super) struct Arrivals(HashMap<u64, Held>);

impl Arrivals {
    /// Holds the calls for connection `sequence`, within `max_bytes` of frames.
    pub(super) fn expect(&mut self, sequence: u64, max_bytes: usize) {
        self.0.insert(sequence, Held::new(max_bytes));
    }

    /// Holds the broadcasts to `rooms` for connection `sequence` too, and notes what the
    /// old node `brought` and where it stood there; the rooms added and dropped since the
    /// last call, or `None` if it is not arriving (any more).
    pub(super) fn expect_rooms(
        &mut self,
        sequence: u64,
        rooms: &[RoomName],
        (brought, standing): (Brought, Vec<(RoomName, Position)>),
    ) -> Option<(Vec<RoomName>, Vec<RoomName>)> {
        let held = self.0.get_mut(&sequence)?;
        let added = rooms
            .iter()
            .filter(|r| !held.rooms.contains(r))
            .cloned()
            .collect();
        let dropped = held
            .rooms
            .iter()
            .filter(|r| !rooms.contains(r))
            .cloned()
            .collect();
        held.keep_rooms(rooms);
        (held.brought, held.standing) = (brought, standing);
        Some((added, dropped))
    }

    /// What was held for connection `sequence`, which has arrived (or never will).
    pub(super) fn take(&mut self, sequence: u64) -> Option<Held> {
        self.0.remove(&sequence)
    }

    pub(super) fn get_mut(&mut self, sequence: &u64) -> Option<&mut Held> {
        self.0.get_mut(sequence)
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (&u64, &mut Held)> {
        self.0.iter_mut()
    }

    /// Holds `command` if it is for a connection that is still arriving; gives it back
    /// otherwise. A push, a join, a leave and a DELETE are answered at once, as if
    /// applied: the old node that forwarded them waits only its request timeout, and must
    /// not be told the connection is gone. A GET waits for the answer.
    pub(super) fn defer(
        &mut self,
        command: StateCommand,
        registered: impl FnOnce(u64) -> bool,
        metrics: &Metrics,
    ) -> Option<StateCommand> {
        let Some(sequence) = command.sequence() else {
            return Some(command);
        };
        let Some(held) = self.0.get_mut(&sequence) else {
            return Some(command);
        };
        let bytes = match &command {
            StateCommand::Send { message, .. } => message.payload.len() + MAX_HEADER,
            _ => 0,
        };
        if !held.has_room(bytes) || registered(sequence) {
            return Some(command);
        }
        let call = match command {
            StateCommand::Send { message, reply, .. } => {
                metrics.messages_sent.inc();
                let _ = reply.send(Ok(()));
                Deferred::Frame(outbound::shared(message))
            }
            StateCommand::Join {
                sequence,
                room,
                reply,
            } => {
                let _ = reply.send(Ok(Ok(())));
                Deferred::Command(StateCommand::Join {
                    sequence,
                    room,
                    reply: unanswered(),
                })
            }
            StateCommand::Leave {
                sequence,
                room,
                reply,
            } => {
                let _ = reply.send(Ok(()));
                Deferred::Command(StateCommand::Leave {
                    sequence,
                    room,
                    reply: unanswered(),
                })
            }
            StateCommand::Disconnect { sequence, reply } => {
                let _ = reply.send(Ok(()));
                Deferred::Command(StateCommand::Disconnect {
                    sequence,
                    reply: unanswered(),
                })
            }
            command => Deferred::Command(command),
        };
        held.hold(call, bytes);
        None
    }
}
