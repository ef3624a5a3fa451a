//! Calls and broadcasts held for a connection that is moving to this node (cluster
//! resume, [`crate::resume::moving`]): between the old node letting go of it and this one
//! registering it (its `$connect` runs first), what the old node forwards, and what is
//! broadcast to the rooms it brings, waits here and is applied in order as it registers.
//! Pushes, joins, leaves and DELETEs are answered at once (the old node waits only its
//! request timeout, and must not be told the connection is gone); a GET waits.

use std::rc::Rc;

use tokio::sync::oneshot;

use super::Shard;
use super::handle::StateCommand;
use crate::outbound::{self, SharedFrame, Wire};
use crate::rooms::RoomName;

/// A call for a connection that is still arriving, applied once it is registered (or
/// found gone if it never is).
enum Deferred {
    /// A push already answered (and counted) as delivered.
    Frame(SharedFrame),
    /// A call whose caller waits for the answer.
    Command(StateCommand),
}

/// Where the reply of a call answered already goes: nowhere.
fn unanswered<T>() -> oneshot::Sender<T> {
    oneshot::channel().0
}

/// Most calls held for one arriving connection; past it (or past its outbound queue's
/// bytes) they are answered as gone.
const MAX_DEFERRED: usize = 1024;

/// The calls held for one arriving connection, and the bytes of their frames.
pub(super) struct Held {
    calls: Vec<Deferred>,
    bytes: usize,
    /// The most bytes of frames held (its outbound queue's bound).
    max_bytes: usize,
    /// The rooms it brings: their broadcasts are held for it too (this node listens to
    /// them meanwhile).
    rooms: Vec<RoomName>,
}

impl Held {
    fn new(max_bytes: usize) -> Self {
        Self {
            calls: Vec::new(),
            bytes: 0,
            max_bytes,
            rooms: Vec::new(),
        }
    }

    /// Whether it is moving here with `room` among its rooms.
    pub(super) fn brings(&self, room: &RoomName) -> bool {
        self.rooms.contains(room)
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
        let bytes = frame.bytes(Wire::WebSocket).len();
        let room = self.has_room(bytes);
        if room {
            self.hold(Deferred::Frame(frame.clone()), bytes);
        }
        room
    }
}

/// Ends an arrival when dropped: what waited for a connection that never registered is
/// answered as gone.
pub(crate) struct Arrival {
    shard: Rc<Shard>,
    sequence: u64,
}

impl Drop for Arrival {
    fn drop(&mut self) {
        self.shard.arrived(self.sequence);
    }
}

impl Shard {
    /// Holds the calls for connection `sequence`, which is moving here, until it is
    /// registered or the returned arrival is dropped.
    pub(crate) fn expect(self: &Rc<Self>, sequence: u64) -> Arrival {
        let held = Held::new(self.gateway.config.limits.outbound_queue_bytes);
        self.arriving.borrow_mut().insert(sequence, held);
        Arrival {
            shard: self.clone(),
            sequence,
        }
    }

    /// Holds the broadcasts to `rooms` for connection `sequence`, which is moving here
    /// with them, until it is registered (and a member) or its arrival ends.
    pub(crate) fn expect_rooms(&self, sequence: u64, rooms: &[RoomName]) {
        if let Some(held) = self.arriving.borrow_mut().get_mut(&sequence) {
            if let Some(cluster) = &self.gateway.cluster {
                for room in rooms {
                    cluster.member_joined(room);
                }
            }
            held.rooms = rooms.to_vec();
        }
    }

    /// Applies what waited for connection `sequence`, in order (to it, or as gone).
    pub(super) fn arrived(self: &Rc<Self>, sequence: u64) {
        let Some(held) = self.arriving.borrow_mut().remove(&sequence) else {
            return;
        };
        // Registered, it is a member itself by now (or it never will be).
        if let Some(cluster) = &self.gateway.cluster {
            for room in &held.rooms {
                cluster.member_left(room);
            }
        }
        for call in held.calls {
            match call {
                Deferred::Frame(frame) => {
                    if let Ok(connection) = self.connection(sequence) {
                        self.enqueue(&connection, &frame);
                    }
                }
                Deferred::Command(command) => self.apply(command),
            }
        }
        self.shed_if_asked();
        self.work_needed.notify_one();
    }

    /// Holds `command` if it is for a connection that is still arriving; gives it back
    /// otherwise. A push, a join, a leave and a DELETE are answered at once, as if
    /// applied: the old node that forwarded them waits only its request timeout, and must
    /// not be told the connection is gone. A GET waits for the answer.
    pub(super) fn defer(&self, command: StateCommand) -> Option<StateCommand> {
        let Some(sequence) = command.sequence() else {
            return Some(command);
        };
        let mut arriving = self.arriving.borrow_mut();
        let Some(held) = arriving.get_mut(&sequence) else {
            return Some(command);
        };
        let bytes = match &command {
            StateCommand::Send { frame, .. } => frame.len(),
            _ => 0,
        };
        if !held.has_room(bytes) || self.connections.borrow().contains_key(&sequence) {
            return Some(command);
        }
        let call = match command {
            StateCommand::Send { frame, reply, .. } => {
                self.gateway.metrics.messages_sent.inc();
                let _ = reply.send(Ok(()));
                Deferred::Frame(outbound::shared(frame))
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
