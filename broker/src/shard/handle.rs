//! A shard's mailbox: the one way other threads (the management API, the WebTransport
//! endpoint, other shards, the cluster) reach the connections a shard owns. Every command
//! carries plain data and a reply channel; the shard applies them on its own thread.

use tokio::sync::{mpsc, oneshot};

use crate::connection::{ConnectionInfo, Gone};
use crate::connection_id::ConnectionId;
use crate::disconnect::DisconnectReason;
use crate::message::Message;
use crate::resume;
use crate::rooms::{PresenceMember, RoomDelivery, RoomName, TooManyRooms};
use crate::transport::webtransport::HandshakeSlot;

/// Commands waiting for a shard beyond this make the sender wait (backpressure on the
/// management API, never unbounded memory).
const COMMAND_QUEUE: usize = 4096;

/// Work sent to a shard from outside its thread.
pub(crate) enum ShardCommand {
    /// Work on its connections and rooms.
    State(StateCommand),
    /// Work that starts a task on it: a session, a resume, a move.
    Start(StartCommand),
}

/// Work on a shard's connections and rooms ([`super::Shard`] applies it).
pub(crate) enum StateCommand {
    Send {
        sequence: u64,
        message: Message,
        reply: oneshot::Sender<Result<(), Gone>>,
    },
    Disconnect {
        sequence: u64,
        reply: oneshot::Sender<Result<(), Gone>>,
    },
    Describe {
        sequence: u64,
        reply: oneshot::Sender<Result<ConnectionInfo, Gone>>,
    },
    /// Send `message` to the local members of `room`; answer how many got it.
    Broadcast {
        room: RoomName,
        message: Message,
        delivery: RoomDelivery,
        reply: Option<oneshot::Sender<usize>>,
    },
    /// Send `message` to each (sequence, request index) target; answer which were gone.
    SendMany {
        targets: Vec<(u64, u32)>,
        message: Message,
        reply: oneshot::Sender<Delivery>,
    },
    Join {
        sequence: u64,
        room: RoomName,
        reply: oneshot::Sender<Result<Result<(), TooManyRooms>, Gone>>,
    },
    Leave {
        sequence: u64,
        room: RoomName,
        reply: oneshot::Sender<Result<(), Gone>>,
    },
    ListRoom {
        room: RoomName,
        reply: oneshot::Sender<Vec<String>>,
    },
    /// The shard's members of `room`, with who they are and when they joined.
    Presence {
        room: RoomName,
        reply: oneshot::Sender<Vec<PresenceMember>>,
    },
    /// Close every connection for `reason`.
    CloseAll { reason: DisconnectReason },
}

/// Work that starts a task on a shard (its thread's top, [`super::run`], applies it).
pub(crate) enum StartCommand {
    /// Run a WebTransport session the endpoint accepted and admitted.
    AdoptWebTransport {
        incoming: Box<wtransport::endpoint::IncomingSession>,
        handshake: HandshakeSlot,
    },
    /// Continue a resume handshake another shard read: the connection it names is here.
    AdoptResume(Box<resume::handoff::Handoff>),
    /// Cluster mode: the rooms of connection `sequence`, for the node its client resumed
    /// on, which asks before it asks for the connection.
    MoveRooms {
        sequence: u64,
        request: resume::moved::MoveRequest,
        reply: oneshot::Sender<Result<Vec<String>, resume::Refusal>>,
    },
    /// Cluster mode: hand connection `sequence` over to the node its client resumed on.
    MoveOut {
        sequence: u64,
        request: resume::moved::MoveRequest,
        reply: oneshot::Sender<Result<resume::moved::MovedOut, resume::Refusal>>,
    },
}

impl From<StateCommand> for ShardCommand {
    fn from(command: StateCommand) -> Self {
        Self::State(command)
    }
}

impl From<StartCommand> for ShardCommand {
    fn from(command: StartCommand) -> Self {
        Self::Start(command)
    }
}

impl StateCommand {
    /// The connection a call is for, if it is for one.
    pub(super) fn sequence(&self) -> Option<u64> {
        match self {
            Self::Send { sequence, .. }
            | Self::Disconnect { sequence, .. }
            | Self::Describe { sequence, .. }
            | Self::Join { sequence, .. }
            | Self::Leave { sequence, .. } => Some(*sequence),
            _ => None,
        }
    }
}

/// How other threads talk to a shard.
#[derive(Clone)]
pub struct ShardHandle {
    commands: mpsc::Sender<ShardCommand>,
}

/// The receiving end of a shard's commands, handed to [`super::run::spawn`].
pub struct ShardInbox(pub(super) mpsc::Receiver<ShardCommand>);

/// Creates the command channels of `count` shards, before any shard runs, so every shard
/// (and the management API) can reach every other from the start.
pub fn channels(count: usize) -> (Vec<ShardHandle>, Vec<ShardInbox>) {
    (0..count)
        .map(|_| {
            let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
            (ShardHandle { commands }, ShardInbox(receiver))
        })
        .unzip()
}

impl ShardHandle {
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, Gone>>) -> StateCommand,
    ) -> Result<T, Gone> {
        let (reply, answer) = oneshot::channel();
        let command = command(reply);
        self.commands.send(command.into()).await.map_err(|_| Gone)?;
        answer.await.unwrap_or(Err(Gone))
    }

    /// Queues `message` to connection `id` on this shard.
    pub async fn send(&self, id: ConnectionId, message: Message) -> Result<(), Gone> {
        self.ask(|reply| StateCommand::Send {
            sequence: id.sequence,
            message,
            reply,
        })
        .await
    }

    /// Closes connection `id` (`DELETE @connections`).
    pub async fn disconnect(&self, id: ConnectionId) -> Result<(), Gone> {
        self.ask(|reply| StateCommand::Disconnect {
            sequence: id.sequence,
            reply,
        })
        .await
    }

    /// Reads connection `id`'s status (`GET @connections`).
    pub async fn describe(&self, id: ConnectionId) -> Result<ConnectionInfo, Gone> {
        self.ask(|reply| StateCommand::Describe {
            sequence: id.sequence,
            reply,
        })
        .await
    }

    /// Adds connection `id` to `room`, unless it is in too many rooms already.
    pub async fn join(
        &self,
        id: ConnectionId,
        room: RoomName,
    ) -> Result<Result<(), TooManyRooms>, Gone> {
        self.ask(|reply| StateCommand::Join {
            sequence: id.sequence,
            room,
            reply,
        })
        .await
    }

    /// Removes connection `id` from `room`.
    pub async fn leave(&self, id: ConnectionId, room: RoomName) -> Result<(), Gone> {
        self.ask(|reply| StateCommand::Leave {
            sequence: id.sequence,
            room,
            reply,
        })
        .await
    }

    /// Queues a broadcast to the shard's members of `room`. Errs if the shard has stopped.
    pub async fn broadcast(
        &self,
        room: RoomName,
        message: Message,
        delivery: RoomDelivery,
        reply: Option<oneshot::Sender<usize>>,
    ) -> Result<(), Gone> {
        let command = StateCommand::Broadcast {
            room,
            message,
            delivery,
            reply,
        };
        self.commands.send(command.into()).await.map_err(|_| Gone)
    }

    /// Queues a bulk send; on failure the targets come back (all gone).
    pub async fn send_many(
        &self,
        targets: Vec<(u64, u32)>,
        message: Message,
        reply: oneshot::Sender<Delivery>,
    ) -> Result<(), Vec<(u64, u32)>> {
        let command = StateCommand::SendMany {
            targets,
            message,
            reply,
        };
        self.commands
            .send(command.into())
            .await
            .map_err(|e| match e.0 {
                ShardCommand::State(StateCommand::SendMany { targets, .. }) => targets,
                _ => Vec::new(),
            })
    }

    /// Closes every connection of the shard for `reason`.
    pub async fn close_all(&self, reason: DisconnectReason) {
        let command = StateCommand::CloseAll { reason };
        let _ = self.commands.send(command.into()).await;
    }

    /// Hands the shard an incoming WebTransport session to run (a stopped shard drops it,
    /// which refuses it).
    pub async fn adopt_webtransport(
        &self,
        incoming: wtransport::endpoint::IncomingSession,
        handshake: HandshakeSlot,
    ) {
        let command = StartCommand::AdoptWebTransport {
            incoming: Box::new(incoming),
            handshake,
        };
        let _ = self.commands.send(command.into()).await;
    }

    /// Hands connection `id` over to the node its client resumed on (see
    /// [`resume::moving`]).
    pub async fn move_out(
        &self,
        id: ConnectionId,
        request: resume::moved::MoveRequest,
    ) -> Result<Result<resume::moved::MovedOut, resume::Refusal>, Gone> {
        let (reply, answer) = oneshot::channel();
        let command = StartCommand::MoveOut {
            sequence: id.sequence,
            request,
            reply,
        };
        self.commands.send(command.into()).await.map_err(|_| Gone)?;
        answer.await.map_err(|_| Gone)
    }

    /// The rooms of connection `id`, for a node about to ask for it (see
    /// [`resume::moving`]).
    pub async fn move_rooms(
        &self,
        id: ConnectionId,
        request: resume::moved::MoveRequest,
    ) -> Result<Result<Vec<String>, resume::Refusal>, Gone> {
        let (reply, answer) = oneshot::channel();
        let command = StartCommand::MoveRooms {
            sequence: id.sequence,
            request,
            reply,
        };
        self.commands.send(command.into()).await.map_err(|_| Gone)?;
        answer.await.map_err(|_| Gone)
    }

    /// Hands the shard a resume handshake for one of its connections (a stopped shard
    /// drops it, which closes the socket).
    pub async fn adopt_resume(&self, handoff: resume::handoff::Handoff) {
        let command = StartCommand::AdoptResume(Box::new(handoff));
        let _ = self.commands.send(command.into()).await;
    }

    /// Asks for the shard's members of `room`, with who they are and when they joined.
    pub async fn presence(
        &self,
        room: RoomName,
        reply: oneshot::Sender<Vec<PresenceMember>>,
    ) -> Result<(), Gone> {
        let command = StateCommand::Presence { room, reply };
        self.commands.send(command.into()).await.map_err(|_| Gone)
    }

    /// Asks for the shard's members of `room`.
    pub async fn list_room(
        &self,
        room: RoomName,
        reply: oneshot::Sender<Vec<String>>,
    ) -> Result<(), Gone> {
        let command = StateCommand::ListRoom { room, reply };
        self.commands.send(command.into()).await.map_err(|_| Gone)
    }
}

/// What a fan-out achieved.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Frames queued to open connections.
    pub delivered: usize,
    /// Request indices whose connection was gone.
    pub gone: Vec<u32>,
}
