//! A shard: one OS thread with a single-threaded tokio runtime that owns its connections
//! from accept to `$disconnect`.
//!
//! Each shard accepts on its own SO_REUSEPORT socket. Everything it owns (the connection
//! table, the id minter, the HTTP client pool) is touched only by its thread; the
//! management API reaches a connection by sending a [`ShardCommand`] to the shard that the
//! connectionId names.

mod arrivals;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use switchboard_storage::RecordChanges;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection::{Connection, ConnectionInfo, Gone};
use crate::connection_id::{ConnectionId, IdMinter};
use crate::disconnect::DisconnectReason;
use crate::fanout::{Delivery, RoomDelivery};
use crate::gateway::Gateway;
use crate::handshake;
use crate::integration::HttpIntegration;
use crate::limits::Refusal;
use crate::outbound::{self, SharedFrame, Wire};
use crate::resume::{self, ResumeToken};
use crate::rooms::{RoomIndex, RoomName};
use crate::session;
use crate::transport::webtransport::HandshakeSlot;
use arrivals::Held;

/// Commands waiting for a shard beyond this make the sender wait (backpressure on the
/// management API, never unbounded memory).
const COMMAND_QUEUE: usize = 4096;
/// Connections written per write pass before the shard looks at its commands again.
const WRITE_PASS_BUDGET: usize = 32;
/// Commands applied per turn before writing.
const COMMANDS_PER_TURN: usize = 256;
/// How often a shard checks its connections' idle and age limits. Sessions poll no timers
/// of their own, which keeps a wake-up (one per fan-out batch) cheap and an idle
/// connection small.
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);
/// How long shutdown waits for sessions to close and `$disconnect` calls to finish;
/// what remains is reported as "gateway restarted" at the next start.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);
/// Pause after a failed accept (EMFILE and friends) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Refused sockets being answered at once; past this a refused socket is closed with no
/// answer, so a flood of refusals cannot itself use up descriptors.
const MAX_REFUSALS_ANSWERING: usize = 64;

/// A room join refused by `limits.max_rooms_per_connection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("connection is already in {0} rooms (limits.max_rooms_per_connection)")]
pub struct TooManyRooms(pub usize);

/// Work sent to a shard from outside its thread.
enum ShardCommand {
    Send {
        sequence: u64,
        frame: Bytes,
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
    /// Send `frame` to the local members of `room`; answer how many got it.
    Broadcast {
        room: RoomName,
        frame: Bytes,
        delivery: RoomDelivery,
        reply: Option<oneshot::Sender<usize>>,
    },
    /// Send `frame` to each (sequence, request index) target; answer which were gone.
    SendMany {
        targets: Vec<(u64, u32)>,
        frame: Bytes,
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
    /// Close every connection for `reason`.
    CloseAll { reason: DisconnectReason },
    /// Run a WebTransport session the endpoint accepted and admitted.
    AdoptWebTransport {
        incoming: Box<wtransport::endpoint::IncomingSession>,
        handshake: HandshakeSlot,
    },
    /// Continue a resume handshake another shard read: the connection it names is here.
    AdoptResume(Box<resume::attach::Handoff>),
    /// Cluster mode: hand connection `sequence` over to the node its client resumed on.
    MoveOut {
        sequence: u64,
        request: resume::moving::MoveRequest,
        reply: oneshot::Sender<Result<resume::moving::MovedOut, resume::Refusal>>,
    },
}

impl ShardCommand {
    /// The connection a call is for, if it is for one.
    fn sequence(&self) -> Option<u64> {
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

/// The receiving end of a shard's commands, handed to [`spawn`].
pub struct ShardInbox(mpsc::Receiver<ShardCommand>);

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
        command: impl FnOnce(oneshot::Sender<Result<T, Gone>>) -> ShardCommand,
    ) -> Result<T, Gone> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(command(reply)).await.map_err(|_| Gone)?;
        answer.await.unwrap_or(Err(Gone))
    }

    /// Queues `frame` to connection `id` on this shard.
    pub async fn send(&self, id: ConnectionId, frame: Bytes) -> Result<(), Gone> {
        self.ask(|reply| ShardCommand::Send {
            sequence: id.sequence,
            frame,
            reply,
        })
        .await
    }

    /// Closes connection `id` (`DELETE @connections`).
    pub async fn disconnect(&self, id: ConnectionId) -> Result<(), Gone> {
        self.ask(|reply| ShardCommand::Disconnect {
            sequence: id.sequence,
            reply,
        })
        .await
    }

    /// Reads connection `id`'s status (`GET @connections`).
    pub async fn describe(&self, id: ConnectionId) -> Result<ConnectionInfo, Gone> {
        self.ask(|reply| ShardCommand::Describe {
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
        self.ask(|reply| ShardCommand::Join {
            sequence: id.sequence,
            room,
            reply,
        })
        .await
    }

    /// Removes connection `id` from `room`.
    pub async fn leave(&self, id: ConnectionId, room: RoomName) -> Result<(), Gone> {
        self.ask(|reply| ShardCommand::Leave {
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
        frame: Bytes,
        delivery: RoomDelivery,
        reply: Option<oneshot::Sender<usize>>,
    ) -> Result<(), Gone> {
        let command = ShardCommand::Broadcast {
            room,
            frame,
            delivery,
            reply,
        };
        self.commands.send(command).await.map_err(|_| Gone)
    }

    /// Queues a bulk send; on failure the targets come back (all gone).
    pub async fn send_many(
        &self,
        targets: Vec<(u64, u32)>,
        frame: Bytes,
        reply: oneshot::Sender<Delivery>,
    ) -> Result<(), Vec<(u64, u32)>> {
        let command = ShardCommand::SendMany {
            targets,
            frame,
            reply,
        };
        self.commands.send(command).await.map_err(|e| match e.0 {
            ShardCommand::SendMany { targets, .. } => targets,
            _ => Vec::new(),
        })
    }

    /// Closes every connection of the shard for `reason`.
    pub async fn close_all(&self, reason: DisconnectReason) {
        let _ = self.commands.send(ShardCommand::CloseAll { reason }).await;
    }

    /// Hands the shard an incoming WebTransport session to run (a stopped shard drops it,
    /// which refuses it).
    pub async fn adopt_webtransport(
        &self,
        incoming: wtransport::endpoint::IncomingSession,
        handshake: HandshakeSlot,
    ) {
        let command = ShardCommand::AdoptWebTransport {
            incoming: Box::new(incoming),
            handshake,
        };
        let _ = self.commands.send(command).await;
    }

    /// Hands connection `id` over to the node its client resumed on (see
    /// [`resume::moving`]).
    pub async fn move_out(
        &self,
        id: ConnectionId,
        request: resume::moving::MoveRequest,
    ) -> Result<Result<resume::moving::MovedOut, resume::Refusal>, Gone> {
        let (reply, answer) = oneshot::channel();
        let command = ShardCommand::MoveOut {
            sequence: id.sequence,
            request,
            reply,
        };
        self.commands.send(command).await.map_err(|_| Gone)?;
        answer.await.map_err(|_| Gone)
    }

    /// Hands the shard a resume handshake for one of its connections (a stopped shard
    /// drops it, which closes the socket).
    pub async fn adopt_resume(&self, handoff: resume::attach::Handoff) {
        let _ = self
            .commands
            .send(ShardCommand::AdoptResume(Box::new(handoff)))
            .await;
    }

    /// Asks for the shard's members of `room`.
    pub async fn list_room(
        &self,
        room: RoomName,
        reply: oneshot::Sender<Vec<String>>,
    ) -> Result<(), Gone> {
        let command = ShardCommand::ListRoom { room, reply };
        self.commands.send(command).await.map_err(|_| Gone)
    }
}

/// The shard's own state, shared by its tasks through `Rc`.
pub struct Shard {
    pub index: u16,
    pub gateway: Arc<Gateway>,
    pub ids: RefCell<IdMinter>,
    /// Open connections by sequence number (the rest of the id is the shard's own).
    connections: RefCell<HashMap<u64, Rc<Connection>>>,
    /// Which local connections are in which room.
    rooms: RefCell<RoomIndex<Rc<Connection>>>,
    /// Connections with frames queued by fan-out, waiting for the next write pass.
    dirty: RefCell<VecDeque<Rc<Connection>>>,
    /// Wakes the command loop for work that arrives without a command: fan-out queued
    /// from a session (a client's publish) to write, record changes to hand off.
    work_needed: Notify,
    /// What its connections' outbound queues hold, against the gateway's memory budget.
    pub(crate) account: Rc<crate::limits::ShardAccount>,
    /// Connection and membership changes made since the last hand-off to the writer.
    records: RefCell<RecordChanges>,
    /// Refused sockets being answered right now.
    refusals_answering: std::cell::Cell<usize>,
    /// Queue appends made during this scheduler turn, handed to the writer together.
    pending_appends: RefCell<Vec<PendingAppend>>,
    /// Resumable connections that ended without their client coming back, kept for a
    /// window so that a late resume learns why ("expired", "overflow") instead of "unknown".
    unresumable: RefCell<HashMap<u64, Unresumable>>,
    /// Connections moving here from another node, by the sequence they will have: what
    /// the old node forwards to them before they are registered waits here, in order.
    arriving: RefCell<HashMap<u64, Held>>,
    pub http: HttpIntegration,
    /// Every session and every `$disconnect` call, so shutdown can wait for them.
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
}

/// Why a resumable connection ended, for a client that comes back after it did.
struct Unresumable {
    /// The hashes of the secrets of the tokens that resumed it when it ended.
    secret_hashes: Box<[resume::SecretHash]>,
    refusal: resume::Refusal,
    until: std::time::Instant,
}

impl Shard {
    /// The connection `token` resumes, or why there is none to resume. A token whose
    /// secret does not match is `Unknown` and changes nothing.
    pub(crate) fn resumable(&self, token: &ResumeToken) -> Result<Rc<Connection>, resume::Refusal> {
        self.resumable_by(token.id, |hash| token.matches(hash))
    }

    /// [`Shard::resumable`] for whoever `proves` one of the hashes of its secrets (another
    /// node asking for a move has a proof made from a hash, not the secret).
    pub(crate) fn resumable_by(
        &self,
        id: crate::connection_id::ConnectionId,
        proves: impl Fn(&resume::SecretHash) -> bool,
    ) -> Result<Rc<Connection>, resume::Refusal> {
        // Every hash is tried (no early exit), so timing does not tell which one matched.
        let any = |hashes: &[resume::SecretHash]| hashes.iter().fold(false, |f, h| f | proves(h));
        if let Some(connection) = self.connections.borrow().get(&id.sequence) {
            return match connection.id == id && any(&connection.secret_hashes()) {
                true => Ok(connection.clone()),
                false => Err(resume::Refusal::Unknown),
            };
        }
        match self.unresumable.borrow().get(&id.sequence) {
            Some(ended) if any(&ended.secret_hashes) => Err(ended.refusal),
            _ => Err(resume::Refusal::Unknown),
        }
    }

    /// Remembers that a resumable connection ended for `refusal`, for one resume window.
    pub(crate) fn note_unresumable(&self, connection: &Connection, refusal: resume::Refusal) {
        let secret_hashes: Box<[resume::SecretHash]> = connection.secret_hashes().into();
        let Some(config) = self.gateway.config.api.resume.as_ref() else {
            return;
        };
        if secret_hashes.is_empty() {
            return;
        }
        let until = std::time::Instant::now() + config.window;
        self.unresumable.borrow_mut().insert(
            connection.id.sequence,
            Unresumable {
                secret_hashes,
                refusal,
                until,
            },
        );
    }

    /// The rooms a local connection is in.
    pub(crate) fn rooms_of(&self, connection: &Connection) -> Vec<RoomName> {
        self.rooms.borrow().rooms_of(connection.id.sequence)
    }

    pub fn register(self: &Rc<Self>, connection: Rc<Connection>) {
        let sequence = connection.id.sequence;
        self.connections.borrow_mut().insert(sequence, connection);
        self.arrived(sequence);
    }

    /// Forgets a closed connection and its room memberships.
    pub fn unregister(&self, connection: &Connection) {
        self.connections
            .borrow_mut()
            .remove(&connection.id.sequence);
        let left = self.rooms.borrow_mut().leave_all(connection.id.sequence);
        if let Some(cluster) = &self.gateway.cluster {
            for room in &left {
                cluster.member_left(room);
            }
        }
        let id = &connection.facts.connection_id;
        self.record(|changes| {
            for room in left {
                changes.leave(room.as_str(), id);
            }
        });
    }

    /// Notes connection or membership changes; the command loop hands them to the record
    /// writer in its next turn.
    pub fn record(&self, change: impl FnOnce(&mut RecordChanges)) {
        change(&mut self.records.borrow_mut());
        self.work_needed.notify_one();
    }

    /// Offers the changes noted so far to the record writer; if it is behind, they stay
    /// (coalescing with later ones) for the next turn or sweep.
    fn hand_off_records(&self) {
        if self.records.borrow().is_empty() {
            return;
        }
        let changes = std::mem::take(&mut *self.records.borrow_mut());
        if let Err(mut unsent) = self.gateway.records.try_apply(changes) {
            unsent.absorb(std::mem::take(&mut *self.records.borrow_mut()));
            *self.records.borrow_mut() = unsent;
        }
    }

    /// Adds a local connection to `room` (idempotent), unless that would put it in more
    /// than `limits.max_rooms_per_connection` rooms.
    pub fn join(&self, connection: &Rc<Connection>, room: &RoomName) -> Result<(), TooManyRooms> {
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
        if rooms.join(room, sequence, connection.clone()) {
            if let Some(cluster) = &self.gateway.cluster {
                cluster.member_joined(room);
            }
            self.record(|changes| changes.join(room.as_str(), &connection.facts.connection_id));
        }
        Ok(())
    }

    /// Whether a local connection is in `room`.
    pub fn is_member(&self, connection: &Connection, room: &RoomName) -> bool {
        self.rooms.borrow().is_member(room, connection.id.sequence)
    }

    /// Removes a local connection from `room` (idempotent).
    pub fn leave(&self, connection: &Connection, room: &RoomName) {
        let left = self.rooms.borrow_mut().leave(room, connection.id.sequence);
        if left {
            if let Some(cluster) = &self.gateway.cluster {
                cluster.member_left(room);
            }
            self.record(|changes| changes.leave(room.as_str(), &connection.facts.connection_id));
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
        let mut delivered = 0;
        for (sequence, connection) in rooms.members(room) {
            if Some(sequence) == skip {
                continue;
            }
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
        drop(rooms);
        self.shed_if_asked();
        self.gateway.metrics.messages_sent.inc_by(delivered as u64);
        delivered
    }

    /// Whether `id` names a connection of this shard (node, run and shard match).
    fn owns(&self, id: &ConnectionId) -> bool {
        id.shard == self.index
            && id.node == self.gateway.config.server.node_id
            && id.epoch == self.gateway.epoch
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
        frame: Bytes,
        delivery: RoomDelivery,
    ) {
        let others: Vec<ShardHandle> = self
            .gateway
            .shards
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != usize::from(self.index))
            .map(|(_, shard)| shard.clone())
            .collect();
        let cluster = self.gateway.cluster.clone();
        if !others.is_empty() || cluster.is_some() {
            let in_flight = publisher.start_call();
            let (room, frame) = (room.clone(), frame.clone());
            self.tasks.spawn_local(async move {
                let _in_flight = in_flight;
                crate::fanout::relay(&others, &room, &frame, delivery).await;
                if let Some(cluster) = cluster {
                    cluster.publish_room(&room, frame, delivery).await;
                }
            });
        }
        self.broadcast_local(&room, &outbound::shared(frame), delivery);
        self.work_needed.notify_one();
    }

    /// Appends to a durable queue; `done` runs on this shard once the entry is durable.
    /// Appends made during one scheduler turn reach the writer thread as one hand-off, and
    /// their completions come back as one wake-up: their acks then leave together, one
    /// write per connection instead of one per ack.
    pub fn append_to_queue(
        self: &Rc<Self>,
        queue: std::sync::Arc<str>,
        context: std::sync::Arc<[u8]>,
        entry: Vec<u8>,
        done: QueueAppendDone,
    ) {
        let mut pending = self.pending_appends.borrow_mut();
        pending.push(PendingAppend {
            queue,
            context,
            entry,
            done,
        });
        if pending.len() == 1 {
            // Runs after the tasks already scheduled: everything appended this turn.
            let shard = self.clone();
            self.tasks.spawn_local(async move {
                let batch = std::mem::take(&mut *shard.pending_appends.borrow_mut());
                match shard.gateway.cluster.clone() {
                    Some(cluster) => append_batch_to_jetstream(&cluster, batch).await,
                    None => append_batch(&shard, batch).await,
                }
            });
        }
    }

    /// Queues `frame` for a fan-out recipient and puts it on the write-pass list.
    fn enqueue(&self, connection: &Rc<Connection>, frame: &SharedFrame) -> bool {
        let queued = connection
            .enqueue(frame.clone(), &self.gateway.metrics)
            .is_ok();
        if !queued {
            return false;
        }
        if connection.mark_dirty() {
            self.dirty.borrow_mut().push_back(connection.clone());
        }
        true
    }

    /// Writes the queues of up to `budget` connections on the write-pass list, each in one
    /// vectored write of everything queued for it. Returns whether more are waiting.
    fn write_pass(&self, budget: usize) -> bool {
        for _ in 0..budget {
            let Some(connection) = self.dirty.borrow_mut().pop_front() else {
                return false;
            };
            match connection.flush(&self.gateway.metrics) {
                Ok(false) => {}
                // The socket is full: the session waits for it and writes the rest.
                Ok(true) => connection.wake(),
                Err(_) => connection.request_close(DisconnectReason::ConnectionLost),
            }
        }
        !self.dirty.borrow().is_empty()
    }

    fn send_many(&self, targets: Vec<(u64, u32)>, frame: &SharedFrame) -> Delivery {
        let connections = self.connections.borrow();
        let mut arriving = self.arriving.borrow_mut();
        let mut delivery = Delivery::default();
        for (sequence, index) in targets {
            let queued = match (connections.get(&sequence), arriving.get_mut(&sequence)) {
                (Some(connection), _) => self.enqueue(connection, frame),
                (None, Some(held)) => held.hold_frame(frame),
                (None, None) => false,
            };
            if queued {
                delivery.delivered += 1;
            } else {
                delivery.gone.push(index);
            }
        }
        drop((connections, arriving));
        self.shed_if_asked();
        self.gateway
            .metrics
            .messages_sent
            .inc_by(delivery.delivered as u64);
        delivery
    }

    /// The periodic sweep: asks every connection past its idle timeout or maximum age to
    /// close, lets idle ones give back their queue memory, and reports what the shard's
    /// queues hold to the outbound budget, cutting the biggest if the budget is exceeded.
    fn sweep(&self) {
        let now = std::time::Instant::now();
        let idle_timeout = self.gateway.config.limits.idle_timeout;
        for connection in self.connections.borrow().values() {
            if let Some(reason) = connection.expired(now, idle_timeout) {
                connection.request_close(reason);
            }
            connection.shrink_idle_queue();
        }
        self.hand_off_records();
        self.rooms.borrow_mut().shrink();
        self.unresumable
            .borrow_mut()
            .retain(|_, ended| ended.until > now);
        let mut connections = self.connections.borrow_mut();
        if connections.capacity() > 4 * connections.len().max(64) {
            connections.shrink_to_fit();
        }
        drop(connections);
        self.shed_if_over();
        let budget = &self.gateway.outbound_budget;
        let metrics = &self.gateway.metrics;
        metrics.outbound_queued_bytes.set(budget.used() as i64);
        metrics.overloaded.set(i64::from(budget.is_over()));
        if self.index == 0 {
            self.gateway.admission.forget_idle_addresses(now);
        }
    }

    /// Sheds at once when a queue of this shard found the outbound budget crossed (after a
    /// fan-out, not per recipient).
    pub(crate) fn shed_if_asked(&self) {
        if self.account.take_shed_request() {
            self.shed_if_over();
        }
    }

    /// While the outbound budget is crossed, cuts this shard's share of the excess (its
    /// biggest queues first). Run by the sweep, and at once when a queue found the budget
    /// crossed.
    fn shed_if_over(&self) {
        let shed = self
            .gateway
            .outbound_budget
            .excess_share(self.account.queued());
        if shed > 0 {
            self.cut_biggest_queues(shed);
        }
    }

    /// Closes the connections with the most bytes queued until `bytes` are shed: under
    /// memory pressure the clients that read least go first.
    fn cut_biggest_queues(&self, bytes: usize) {
        let mut by_size: Vec<(usize, Rc<Connection>)> = self
            .connections
            .borrow()
            .values()
            .map(|c| (c.queued_bytes(), c.clone()))
            .filter(|(queued, _)| *queued > 0)
            .collect();
        by_size.sort_unstable_by_key(|(queued, _)| std::cmp::Reverse(*queued));
        let mut shed = 0;
        for (queued, connection) in by_size {
            if shed >= bytes {
                break;
            }
            connection.request_close(DisconnectReason::Overloaded);
            self.gateway.metrics.overload_disconnects.inc();
            shed += queued;
        }
        tracing::warn!(
            shard = self.index,
            shed,
            "outbound memory budget exceeded; cut the biggest queues"
        );
    }

    /// Asks every connection to close for shutdown.
    fn close_all(&self) {
        for connection in self.connections.borrow().values() {
            connection.request_close(DisconnectReason::ServerShutdown);
        }
    }

    fn connection(&self, sequence: u64) -> Result<Rc<Connection>, Gone> {
        self.connections
            .borrow()
            .get(&sequence)
            .cloned()
            .ok_or(Gone)
    }

    fn apply(self: &Rc<Self>, command: ShardCommand) {
        let Some(command) = self.defer(command) else {
            return;
        };
        match command {
            ShardCommand::Send {
                sequence,
                frame,
                reply,
            } => {
                let result = self
                    .connection(sequence)
                    .and_then(|c| c.push(frame, &self.gateway.metrics));
                let _ = reply.send(result);
            }
            ShardCommand::Disconnect { sequence, reply } => {
                let result = self
                    .connection(sequence)
                    .map(|c| c.request_close(DisconnectReason::Deleted));
                let _ = reply.send(result);
            }
            ShardCommand::Describe { sequence, reply } => {
                let _ = reply.send(self.connection(sequence).map(|c| c.info()));
            }
            ShardCommand::Broadcast {
                room,
                frame,
                delivery,
                reply,
            } => {
                let delivered = self.broadcast_local(&room, &outbound::shared(frame), delivery);
                if let Some(reply) = reply {
                    let _ = reply.send(delivered);
                }
            }
            ShardCommand::SendMany {
                targets,
                frame,
                reply,
            } => {
                let _ = reply.send(self.send_many(targets, &outbound::shared(frame)));
            }
            ShardCommand::Join {
                sequence,
                room,
                reply,
            } => {
                let _ = reply.send(self.connection(sequence).map(|c| self.join(&c, &room)));
            }
            ShardCommand::Leave {
                sequence,
                room,
                reply,
            } => {
                let _ = reply.send(self.connection(sequence).map(|c| self.leave(&c, &room)));
            }
            ShardCommand::CloseAll { reason } => {
                for connection in self.connections.borrow().values() {
                    connection.request_close(reason.clone());
                }
            }
            ShardCommand::AdoptWebTransport {
                incoming,
                handshake,
            } => {
                let session = session::run_webtransport(self.clone(), *incoming, handshake);
                self.tasks.spawn_local(session);
            }
            ShardCommand::MoveOut {
                sequence,
                request,
                reply,
            } => {
                let id = ConnectionId {
                    node: self.gateway.config.server.node_id,
                    shard: self.index,
                    epoch: self.gateway.epoch,
                    sequence,
                };
                let shard = self.clone();
                self.tasks.spawn_local(async move {
                    let moved = resume::moving::move_out(shard, id, request).await;
                    let _ = reply.send(moved);
                });
            }
            ShardCommand::AdoptResume(handoff) => {
                self.tasks
                    .spawn_local(resume::attach::adopt(self.clone(), *handoff));
            }
            ShardCommand::ListRoom { room, reply } => {
                let members = self
                    .rooms
                    .borrow()
                    .members(&room)
                    .map(|(_, c)| c.facts.connection_id.clone())
                    .collect();
                let _ = reply.send(members);
            }
        }
    }
}

/// Starts shard `index` on its own thread, accepting on `listener`.
pub fn spawn(
    index: u16,
    listener: std::net::TcpListener,
    inbox: ShardInbox,
    gateway: Arc<Gateway>,
    shutdown: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    listener.set_nonblocking(true)?;
    let thread = std::thread::Builder::new()
        .name(format!("switchboard-shard-{index}"))
        .spawn(move || {
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                let account = Rc::new(crate::limits::ShardAccount::new(
                    gateway.outbound_budget.clone(),
                ));
                let shard = Rc::new(Shard {
                    index,
                    ids: RefCell::new(IdMinter::new(
                        gateway.config.server.node_id,
                        index,
                        gateway.epoch,
                    )),
                    gateway,
                    connections: RefCell::new(HashMap::new()),
                    rooms: RefCell::new(RoomIndex::default()),
                    dirty: RefCell::new(VecDeque::new()),
                    work_needed: Notify::new(),
                    account,
                    records: RefCell::new(RecordChanges::default()),
                    refusals_answering: std::cell::Cell::new(0),
                    pending_appends: RefCell::new(Vec::new()),
                    unresumable: RefCell::new(HashMap::new()),
                    arriving: RefCell::new(HashMap::new()),
                    http: HttpIntegration::new(),
                    tasks: TaskTracker::new(),
                    shutdown,
                });
                run(shard, listener, inbox.0).await;
            });
        })?;
    Ok(thread)
}

/// Called on the shard with an append's offset, or why it failed.
pub type QueueAppendDone = Box<dyn FnOnce(Result<u64, AppendFailure>)>;

/// Why a queue append was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendFailure {
    /// The data dir's disk is full: the client is told so; the gateway carries on.
    DiskFull,
    /// Anything else the storage reported.
    Storage(String),
}

impl From<switchboard_storage::StorageError> for AppendFailure {
    fn from(error: switchboard_storage::StorageError) -> Self {
        match error {
            switchboard_storage::StorageError::DiskFull { .. } => Self::DiskFull,
            other => Self::Storage(other.to_string()),
        }
    }
}

/// An append waiting for the end of the turn: the queue, the entry in its stored form
/// and its context (see [`crate::stored_event`]), and who to tell.
struct PendingAppend {
    queue: std::sync::Arc<str>,
    context: std::sync::Arc<[u8]>,
    entry: Vec<u8>,
    done: QueueAppendDone,
}

/// Hands a turn's appends to the queue log and runs their completions, in order, once the
/// last of them is durable.
async fn append_batch(shard: &Shard, batch: Vec<PendingAppend>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};

    let count = batch.len();
    // Filled by the writer thread, read here after the last one: no lock per entry.
    let results: Arc<Vec<OnceLock<Result<u64, AppendFailure>>>> =
        Arc::new((0..count).map(|_| OnceLock::new()).collect());
    let remaining = Arc::new(AtomicUsize::new(count));
    let (all_done, finished) = oneshot::channel::<()>();
    let all_done = Arc::new(Mutex::new(Some(all_done)));
    let mut appends: Vec<switchboard_storage::Append> = Vec::with_capacity(count);
    let mut completions = Vec::with_capacity(count);
    for (index, pending) in batch.into_iter().enumerate() {
        completions.push(pending.done);
        let (results, remaining, all_done) = (results.clone(), remaining.clone(), all_done.clone());
        appends.push(switchboard_storage::Append {
            queue: pending.queue,
            context: Some(pending.context),
            payload: pending.entry,
            done: Box::new(move |result| {
                let _ = results[index].set(result.map_err(AppendFailure::from));
                if remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                    let sender = all_done.lock().ok().and_then(|mut s| s.take());
                    if let Some(sender) = sender {
                        let _ = sender.send(());
                    }
                }
            }),
        });
    }
    let started = std::time::Instant::now();
    shard.gateway.queues.log.append_many(appends);
    let _ = finished.await;
    shard
        .gateway
        .metrics
        .queue_append_duration
        .observe(started.elapsed().as_secs_f64());
    for (index, done) in completions.into_iter().enumerate() {
        let result = results[index]
            .get()
            .cloned()
            .unwrap_or_else(|| Err(AppendFailure::Storage("the queue log stopped".into())));
        done(result);
    }
}

/// Cluster mode: publishes a turn's appends to JetStream in order, as the event JSON a
/// backend receives, and runs their completions, in order, once their acks are back.
async fn append_batch_to_jetstream(cluster: &crate::cluster::Cluster, batch: Vec<PendingAppend>) {
    let mut appends = Vec::with_capacity(batch.len());
    let mut completions = Vec::with_capacity(batch.len());
    let mut events = crate::stored_event::Rebuilder::default();
    for pending in batch {
        match events.event(Some(&pending.context), &pending.entry) {
            Ok(event) => {
                appends.push((pending.queue.clone(), event));
                completions.push((pending.queue, pending.done));
            }
            Err(error) => (pending.done)(Err(AppendFailure::Storage(error.to_string()))),
        }
    }
    let results = cluster.append_all(appends).await;
    for ((queue, done), result) in completions.into_iter().zip(results) {
        done(result.map_err(|error| {
            tracing::error!(%queue, %error, "queue append not stored by JetStream");
            AppendFailure::Storage(error.to_string())
        }));
    }
}

/// Applies commands and runs the fan-out write passes, interleaved: a pass writes a bounded
/// number of connections, then commands that arrived meanwhile are applied (their frames
/// join the writes still to come), then sessions get a turn. A publisher waiting for
/// `{"delivered": N}` is answered within one bounded pass, and frames that pile up while
/// the shard writes leave together, in one write per connection.
async fn run_commands(shard: Rc<Shard>, mut commands: mpsc::Receiver<ShardCommand>) {
    loop {
        for _ in 0..COMMANDS_PER_TURN {
            match commands.try_recv() {
                Ok(command) => shard.apply(command),
                Err(_) => break,
            }
        }
        shard.hand_off_records();
        if shard.write_pass(WRITE_PASS_BUDGET) || !commands.is_empty() {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            command = commands.recv() => match command {
                Some(command) => shard.apply(command),
                None => return,
            },
            _ = shard.work_needed.notified() => {}
        }
    }
}

/// Answers a socket the admission gate turned away (503 or 429) without reading its
/// request, unless too many are being answered already.
fn refuse(shard: &Rc<Shard>, stream: tokio::net::TcpStream, refusal: Refusal) {
    shard
        .gateway
        .metrics
        .connections_total
        .with_label_values(&[refusal.label(), Wire::WebSocket.label()])
        .inc();
    let answering = shard.refusals_answering.get();
    if answering >= MAX_REFUSALS_ANSWERING {
        return; // dropped: the socket closes now
    }
    shard.refusals_answering.set(answering + 1);
    let shard = shard.clone();
    shard.clone().tasks.spawn_local(async move {
        let response = handshake::error_response(refusal.status(), refusal.to_string().as_bytes());
        handshake::refuse_and_close(stream, &response).await;
        shard
            .refusals_answering
            .set(shard.refusals_answering.get().saturating_sub(1));
    });
}

/// The admission gate for a socket from client `peer`, then its session.
fn admit(shard: &Rc<Shard>, stream: tokio::net::TcpStream, peer: std::net::SocketAddr) {
    match shard
        .gateway
        .admission
        .admit(peer.ip(), std::time::Instant::now())
    {
        Ok(ticket) => {
            let session = session::run(shard.clone(), stream, peer, ticket);
            shard.tasks.spawn_local(session);
        }
        Err(refusal) => refuse(shard, stream, refusal),
    }
}

/// A socket from a trusted proxy: its PROXY protocol header names the client, who is then
/// admitted as if it had connected itself. A proxy that sends none is let go.
async fn accept_proxied(
    shard: Rc<Shard>,
    mut stream: tokio::net::TcpStream,
    proxy: std::net::SocketAddr,
) {
    let timeout = shard.gateway.config.limits.handshake_timeout;
    match tokio::time::timeout(timeout, read_proxy_header(&mut stream)).await {
        Ok(Ok(client)) => admit(&shard, stream, client.unwrap_or(proxy)),
        Ok(Err(error)) => {
            tracing::debug!(%proxy, %error, "connection from a trusted proxy refused");
            shard
                .gateway
                .metrics
                .connections_total
                .with_label_values(&["bad_request", Wire::WebSocket.label()])
                .inc();
        }
        Err(_) => tracing::debug!(%proxy, "no PROXY protocol header in time"),
    }
}

/// Reads a PROXY protocol v2 header: the client it names, if any.
async fn read_proxy_header(
    stream: &mut tokio::net::TcpStream,
) -> std::io::Result<Option<std::net::SocketAddr>> {
    use crate::transport::proxy_protocol::{FIXED_LEN, client_address, decode_fixed};
    use tokio::io::AsyncReadExt;
    let invalid = |error| std::io::Error::new(std::io::ErrorKind::InvalidData, error);
    let mut fixed = [0u8; FIXED_LEN];
    stream.read_exact(&mut fixed).await?;
    let fixed = decode_fixed(&fixed).map_err(invalid)?;
    let mut body = vec![0u8; fixed.body_len];
    stream.read_exact(&mut body).await?;
    client_address(fixed, &body).map_err(invalid)
}

async fn run(
    shard: Rc<Shard>,
    listener: std::net::TcpListener,
    commands: mpsc::Receiver<ShardCommand>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(shard = shard.index, %error, "cannot register listener");
            return;
        }
    };
    let command_task = tokio::task::spawn_local(run_commands(shard.clone(), commands));
    let sweep = {
        let shard = shard.clone();
        async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                shard.sweep();
            }
        }
    };
    let sweep_task = tokio::task::spawn_local(sweep);
    loop {
        tokio::select! {
            _ = shard.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let proxies = &shard.gateway.config.server.trusted_proxies;
                    if proxies.iter().any(|proxy| proxy.contains(peer.ip())) {
                        shard.tasks.spawn_local(accept_proxied(shard.clone(), stream, peer));
                    } else {
                        admit(&shard, stream, peer);
                    }
                }
                Err(error) => {
                    tracing::warn!(shard = shard.index, %error, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }
    drop(listener);
    sweep_task.abort();
    // Sessions close with 1001 and fire `$disconnect`; the tracker waits for both.
    shard.close_all();
    shard.tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, shard.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            shard = shard.index,
            "sessions still closing after {SHUTDOWN_GRACE:?}; abandoning them"
        );
    }
    command_task.abort();
    // What the sessions and `$disconnect` calls changed last; waiting for the writer is
    // fine now that the shard has nothing else to do.
    let changes = std::mem::take(&mut *shard.records.borrow_mut());
    shard.gateway.records.apply(changes);
    tracing::debug!(shard = shard.index, "shard stopped");
}
