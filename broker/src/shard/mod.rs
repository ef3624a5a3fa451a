//! A shard: one OS thread with a single-threaded tokio runtime that owns its connections
//! from accept to `$disconnect`.
//!
//! Each shard accepts on its own SO_REUSEPORT socket. Everything it owns (the connection
//! table, the id minter, the HTTP client pool) is touched only by its thread; the rest of
//! the gateway reaches it through its mailbox ([`handle`]), usually by way of the
//! [`crate::directory`]. This file is the shard's state; [`run`] is its thread.

mod arrivals;
mod ended;
pub mod handle;
mod member;
mod numbered;
mod rooms;
pub mod run;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use switchboard_storage::RecordChanges;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection::{Connection, Gone};
use crate::connection_id::{ConnectionId, IdMinter};
use crate::disconnect::DisconnectReason;
use crate::gateway::Gateway;
use crate::integration::HttpIntegration;
use crate::outbound::{self, SharedFrame};
use crate::queues::store::{PendingAppend, QueueAppendDone};
use crate::resume::{self, ResumeToken};
use crate::rooms::events::Change;
use crate::rooms::{Brought, Position, RoomIndex, RoomName};
use crate::shard::handle::Delivery;
use arrivals::{Arrivals, Deferred};
use ended::Ended;
use handle::StateCommand;
use member::Member;

/// The shard's own state, shared by its tasks through `Rc`.
pub struct Shard {
    pub index: u16,
    pub gateway: Arc<Gateway>,
    pub ids: RefCell<IdMinter>,
    /// Open connections by sequence number (the rest of the id is the shard's own).
    connections: RefCell<HashMap<u64, Rc<Connection>>>,
    /// Which local connections are in which room.
    rooms: RefCell<RoomIndex<Member>>,
    /// Live frames held for members whose join's replay is on its way.
    waiting: RefCell<member::Waiting>,
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
    unresumable: RefCell<Ended>,
    /// Connections moving here from another node, by the sequence they will have: what
    /// the old node forwards to them before they are registered waits here, in order.
    arriving: RefCell<Arrivals>,
    /// In cluster mode, per room with members here: the newest broadcast of each node
    /// queued to them (what a connection moving away takes along, see `resume::moving`).
    stamps_seen: RefCell<HashMap<RoomName, crate::rooms::StampsSeen>>,
    pub http: HttpIntegration,
    /// Every session and every `$disconnect` call, so shutdown can wait for them.
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
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
        let ended = self.unresumable.borrow().refusal(id.sequence, any);
        Err(ended.unwrap_or(resume::Refusal::Unknown))
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
        let mut ended = self.unresumable.borrow_mut();
        ended.note(connection.id.sequence, secret_hashes, refusal, until);
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

    /// Forgets a closed connection and its room memberships; its rooms are told it left,
    /// unless that was `told_elsewhere` (it moved to another node, where it is still a
    /// member; or its node was declared lost, and the node that took over told them).
    pub fn unregister(&self, connection: &Connection, told_elsewhere: bool) {
        self.connections
            .borrow_mut()
            .remove(&connection.id.sequence);
        let left = self.rooms.borrow_mut().leave_all(connection.id.sequence);
        (self.waiting.borrow_mut()).forget(connection.id.sequence, None);
        let directory = &self.gateway.directory;
        let authorizer = connection.facts.authorizer.as_deref();
        for room in &left {
            if !told_elsewhere {
                directory.membership_changed(room, Change::Leave, connection.id, authorizer);
            }
            directory.member_left(room);
            self.forget_stamps_if_empty(room);
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

    /// Whether `id` names a connection of this shard (node, run and shard match).
    fn owns(&self, id: &ConnectionId) -> bool {
        id.shard == self.index
            && id.node == self.gateway.config.server.node_id
            && id.epoch == self.gateway.epoch
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
                let gateway = &shard.gateway;
                gateway.queue_store.append(batch, &gateway.metrics).await;
            });
        }
    }

    /// Queues `frame` for a fan-out recipient and puts it on the write-pass list.
    fn enqueue(&self, connection: &Rc<Connection>, frame: &SharedFrame) -> bool {
        self.enqueue_keyed(connection, frame, None)
    }

    /// [`Shard::enqueue`], with a conflation key (latest wins in the queue).
    fn enqueue_keyed(
        &self,
        connection: &Rc<Connection>,
        frame: &SharedFrame,
        key: Option<u64>,
    ) -> bool {
        let metrics = &self.gateway.metrics;
        let queued = match key {
            Some(key) => connection.enqueue_keyed(frame.clone(), key, metrics),
            None => connection.enqueue(frame.clone(), metrics),
        }
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
        self.unresumable.borrow_mut().forget_past(now);
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

    /// Applies a command on its connections and rooms, unless it waits for a connection that
    /// is still arriving.
    pub(super) fn apply(self: &Rc<Self>, command: StateCommand) {
        let registered = |sequence| self.connections.borrow().contains_key(&sequence);
        let deferred =
            (self.arriving.borrow_mut()).defer(command, registered, &self.gateway.metrics);
        let Some(command) = deferred else {
            return;
        };
        match command {
            StateCommand::Send {
                sequence,
                message,
                reply,
            } => {
                let result = self
                    .connection(sequence)
                    .and_then(|c| c.push(message, &self.gateway.metrics));
                let _ = reply.send(result);
            }
            StateCommand::Disconnect { sequence, reply } => {
                let result = self
                    .connection(sequence)
                    .map(|c| c.request_close(DisconnectReason::Deleted));
                let _ = reply.send(result);
            }
            StateCommand::Describe { sequence, reply } => {
                let _ = reply.send(self.connection(sequence).map(|c| c.info()));
            }
            StateCommand::Broadcast {
                room,
                message,
                delivery,
                reply,
            } => {
                let delivered = self.broadcast_local(&room, &outbound::shared(message), delivery);
                if let Some(reply) = reply {
                    let _ = reply.send(delivered);
                }
            }
            StateCommand::SendMany {
                targets,
                message,
                reply,
            } => {
                let _ = reply.send(self.send_many(targets, &outbound::shared(message)));
            }
            StateCommand::Join {
                sequence,
                room,
                reply,
            } => {
                let _ = reply.send(self.connection(sequence).map(|c| self.join(&c, &room)));
            }
            StateCommand::Leave {
                sequence,
                room,
                reply,
            } => {
                let _ = reply.send(self.connection(sequence).map(|c| self.leave(&c, &room)));
            }
            StateCommand::CloseAll { reason } => {
                for connection in self.connections.borrow().values() {
                    connection.request_close(reason.clone());
                }
            }
            StateCommand::ListRoom { room, reply } => {
                let members = self
                    .rooms
                    .borrow()
                    .members(&room)
                    .map(|(_, member)| member.connection.facts.connection_id.clone())
                    .collect();
                let _ = reply.send(members);
            }
            StateCommand::Presence { room, reply } => {
                let rooms = self.rooms.borrow();
                let members = rooms.members(&room).map(|(_, member)| member.presence());
                let _ = reply.send(members.collect());
            }
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
        let max_bytes = self.gateway.config.limits.outbound_queue_bytes;
        self.arriving.borrow_mut().expect(sequence, max_bytes);
        Arrival {
            shard: self.clone(),
            sequence,
        }
    }

    /// Holds the broadcasts to `rooms` for connection `sequence`, which is moving here
    /// with them, until it is registered (and a member) or its arrival ends: this node
    /// listens to them from now on. Asked again with the rooms the old node handed over
    /// (`brought`: the newest broadcast of each node it had queued, per room), it listens
    /// to those and stops listening to the ones no longer among them.
    pub(crate) fn expect_rooms(
        &self,
        sequence: u64,
        rooms: &[RoomName],
        carried: (Brought, Vec<(RoomName, Position)>),
    ) {
        let changed = self
            .arriving
            .borrow_mut()
            .expect_rooms(sequence, rooms, carried);
        let Some((added, dropped)) = changed else {
            return;
        };
        for room in &added {
            self.gateway.directory.member_joined(room);
        }
        for room in &dropped {
            self.gateway.directory.member_left(room);
        }
    }

    /// Applies what waited for connection `sequence`, in order (to it, or as gone).
    fn arrived(self: &Rc<Self>, sequence: u64) {
        let Some(held) = self.arriving.borrow_mut().take(sequence) else {
            return;
        };
        // Registered, it is a member itself by now (or it never will be).
        for room in &held.rooms {
            self.gateway.directory.member_left(room);
        }
        self.stand(sequence, &held.standing);
        for call in held.calls {
            match call {
                Deferred::Frame(frame) => {
                    if let Ok(connection) = self.connection(sequence) {
                        self.enqueue(&connection, &frame);
                    }
                }
                // The old node had queued this one already: it came with the frames.
                Deferred::RoomFrame {
                    room,
                    stamp: Some(stamp),
                    ..
                } if held.brought.covers(&room, stamp) => {}
                Deferred::RoomFrame {
                    frame,
                    room,
                    position: Some(position),
                    ..
                } => self.offer_arrived(sequence, &room, position, Some(&frame)),
                Deferred::RoomFrame { frame, .. } => {
                    if let Ok(connection) = self.connection(sequence) {
                        self.enqueue(&connection, &frame);
                    }
                }
                Deferred::Passed { room, position } => {
                    self.offer_arrived(sequence, &room, position, None);
                }
                Deferred::Command(command) => self.apply(command),
            }
        }
        self.shed_if_asked();
        self.work_needed.notify_one();
    }
}
