//! A shard: one OS thread with a single-threaded tokio runtime that owns its connections
//! from accept to `$disconnect`.
//!
//! Each shard accepts on its own SO_REUSEPORT socket. Everything it owns (the connection
//! table, the id minter, the HTTP client pool) is touched only by its thread; the
//! management API reaches a connection by sending a [`ShardCommand`] to the shard that the
//! connectionId names.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection::{Connection, ConnectionInfo, Gone};
use crate::connection_id::{ConnectionId, IdMinter};
use crate::disconnect::DisconnectReason;
use crate::fanout::Delivery;
use crate::gateway::Gateway;
use crate::integration::HttpIntegration;
use crate::outbound::SharedFrame;
use crate::rooms::{RoomIndex, RoomName};
use crate::session;

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
        exclude: Option<ConnectionId>,
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
        reply: oneshot::Sender<Result<(), Gone>>,
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

    /// Adds connection `id` to `room`.
    pub async fn join(&self, id: ConnectionId, room: RoomName) -> Result<(), Gone> {
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
        exclude: Option<ConnectionId>,
        reply: Option<oneshot::Sender<usize>>,
    ) -> Result<(), Gone> {
        let command = ShardCommand::Broadcast {
            room,
            frame,
            exclude,
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
    /// Queue appends made during this scheduler turn, handed to the writer together.
    pending_appends: RefCell<Vec<PendingAppend>>,
    pub http: HttpIntegration,
    /// Every session and every `$disconnect` call, so shutdown can wait for them.
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
}

impl Shard {
    pub fn register(&self, connection: Rc<Connection>) {
        self.connections
            .borrow_mut()
            .insert(connection.id.sequence, connection);
    }

    /// Forgets a closed connection and its room memberships.
    pub fn unregister(&self, connection: &Connection) {
        self.connections
            .borrow_mut()
            .remove(&connection.id.sequence);
        let left = self.rooms.borrow_mut().leave_all(connection.id.sequence);
        for room in left {
            let id = connection.facts.connection_id.clone();
            self.gateway.records.leave(room.as_str().to_owned(), id);
        }
    }

    /// Adds a local connection to `room` (idempotent).
    pub fn join(&self, connection: &Rc<Connection>, room: &RoomName) {
        let joined = self
            .rooms
            .borrow_mut()
            .join(room, connection.id.sequence, connection.clone());
        if joined {
            let id = connection.facts.connection_id.clone();
            self.gateway.records.join(room.as_str().to_owned(), id);
        }
    }

    /// Removes a local connection from `room` (idempotent).
    pub fn leave(&self, connection: &Connection, room: &RoomName) {
        if self.rooms.borrow_mut().leave(room, connection.id.sequence) {
            let id = connection.facts.connection_id.clone();
            self.gateway.records.leave(room.as_str().to_owned(), id);
        }
    }

    /// Queues `frame` to every local member of `room` but `exclude`; returns the count.
    pub fn broadcast_local(
        &self,
        room: &RoomName,
        frame: &SharedFrame,
        exclude: Option<ConnectionId>,
    ) -> usize {
        let skip = exclude
            .filter(|id| id.shard == self.index)
            .map(|id| id.sequence);
        let rooms = self.rooms.borrow();
        let mut delivered = 0;
        for (sequence, connection) in rooms.members(room) {
            if Some(sequence) != skip && self.enqueue(connection, frame) {
                delivered += 1;
            }
        }
        self.gateway.metrics.messages_sent.inc_by(delivered as u64);
        delivered
    }

    /// Publishes to `room` on every shard, this one included: each applies it in its
    /// command loop, which also runs the write passes.
    pub fn publish(self: &Rc<Self>, room: RoomName, frame: Bytes, exclude: Option<ConnectionId>) {
        let shards = self.gateway.shards.clone();
        // Sent from a task: a full command queue makes this publish wait, not the shard.
        self.tasks.spawn_local(async move {
            for shard in shards.iter() {
                let _ = shard
                    .broadcast(room.clone(), frame.clone(), exclude, None)
                    .await;
            }
        });
    }

    /// Appends to a durable queue; `done` runs on this shard once the entry is durable.
    /// Appends made during one scheduler turn reach the writer thread as one hand-off, and
    /// their completions come back as one wake-up: their acks then leave together, one
    /// write per connection instead of one per ack.
    pub fn append_to_queue(
        self: &Rc<Self>,
        queue: std::sync::Arc<str>,
        payload: Vec<u8>,
        done: QueueAppendDone,
    ) {
        let mut pending = self.pending_appends.borrow_mut();
        pending.push((queue, payload, done));
        if pending.len() == 1 {
            // Runs after the tasks already scheduled: everything appended this turn.
            let shard = self.clone();
            self.tasks.spawn_local(async move {
                let batch = std::mem::take(&mut *shard.pending_appends.borrow_mut());
                append_batch(&shard, batch).await;
            });
        }
    }

    /// Queues `frame` for a fan-out recipient and puts it on the write-pass list.
    fn enqueue(&self, connection: &Rc<Connection>, frame: &SharedFrame) -> bool {
        if connection
            .enqueue(frame.clone(), &self.gateway.metrics)
            .is_err()
        {
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
        let mut delivery = Delivery::default();
        for (sequence, index) in targets {
            let queued = connections
                .get(&sequence)
                .is_some_and(|c| self.enqueue(c, frame));
            if queued {
                delivery.delivered += 1;
            } else {
                delivery.gone.push(index);
            }
        }
        self.gateway
            .metrics
            .messages_sent
            .inc_by(delivery.delivered as u64);
        delivery
    }

    /// Asks every connection past its idle timeout or maximum age to close, and lets idle
    /// ones give back their queue memory.
    fn expire_connections(&self) {
        let now = std::time::Instant::now();
        let idle_timeout = self.gateway.config.limits.idle_timeout;
        for connection in self.connections.borrow().values() {
            if let Some(reason) = connection.expired(now, idle_timeout) {
                connection.request_close(reason);
            }
            connection.shrink_idle_queue();
        }
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

    fn apply(&self, command: ShardCommand) {
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
                exclude,
                reply,
            } => {
                let delivered = self.broadcast_local(&room, &Rc::new(frame), exclude);
                if let Some(reply) = reply {
                    let _ = reply.send(delivered);
                }
            }
            ShardCommand::SendMany {
                targets,
                frame,
                reply,
            } => {
                let _ = reply.send(self.send_many(targets, &Rc::new(frame)));
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
                    pending_appends: RefCell::new(Vec::new()),
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
pub type QueueAppendDone = Box<dyn FnOnce(Result<u64, String>)>;

/// An append waiting for the end of the turn: queue, event JSON, completion.
type PendingAppend = (std::sync::Arc<str>, Vec<u8>, QueueAppendDone);

/// Hands a turn's appends to the queue log and runs their completions, in order, once the
/// last of them is durable.
async fn append_batch(shard: &Shard, batch: Vec<PendingAppend>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};

    let count = batch.len();
    // Filled by the writer thread, read here after the last one: no lock per entry.
    let results: Arc<Vec<OnceLock<Result<u64, String>>>> =
        Arc::new((0..count).map(|_| OnceLock::new()).collect());
    let remaining = Arc::new(AtomicUsize::new(count));
    let (all_done, finished) = oneshot::channel::<()>();
    let all_done = Arc::new(Mutex::new(Some(all_done)));
    let mut appends: Vec<switchboard_storage::Append> = Vec::with_capacity(count);
    let mut completions = Vec::with_capacity(count);
    for (index, (queue, payload, done)) in batch.into_iter().enumerate() {
        completions.push(done);
        let (results, remaining, all_done) = (results.clone(), remaining.clone(), all_done.clone());
        appends.push((
            queue,
            payload,
            Box::new(move |result| {
                let _ = results[index].set(result.map_err(|e| e.to_string()));
                if remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                    let sender = all_done.lock().ok().and_then(|mut s| s.take());
                    if let Some(sender) = sender {
                        let _ = sender.send(());
                    }
                }
            }),
        ));
    }
    shard.gateway.queues.log.append_many(appends);
    let _ = finished.await;
    for (index, done) in completions.into_iter().enumerate() {
        let result = results[index]
            .get()
            .cloned()
            .unwrap_or_else(|| Err("the queue log stopped".into()));
        done(result);
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
        if shard.write_pass(WRITE_PASS_BUDGET) || !commands.is_empty() {
            tokio::task::yield_now().await;
            continue;
        }
        match commands.recv().await {
            Some(command) => shard.apply(command),
            None => return,
        }
    }
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
                shard.expire_connections();
            }
        }
    };
    let sweep_task = tokio::task::spawn_local(sweep);
    loop {
        tokio::select! {
            _ = shard.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let session = session::run(shard.clone(), stream, peer);
                    shard.tasks.spawn_local(session);
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
    tracing::debug!(shard = shard.index, "shard stopped");
}
