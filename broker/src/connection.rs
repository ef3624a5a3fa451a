//! The shard-owned state of one open connection: what pushes write to and what
//! `GET @connections` reads. Only its shard touches it (`Rc`, `Cell`, `RefCell`: no locks).

use std::cell::{Cell, OnceCell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use std::io::IoSlice;

use crate::clock;
use crate::connection_id::ConnectionId;
use crate::disconnect::DisconnectReason;
use crate::event::{ApiFacts, ConnectionFacts};
use crate::limits::AdmissionTicket;
use crate::limits::overload::CUT_AT_CROSSING;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::outbound::{
    self, MAX_IOVECS, OutboundQueue, PushError, Pushed, RewindError, SharedFrame,
};
use crate::resume::config::ResumeConfig;
use crate::resume::{self, ResumeToken, Secret, SecretHash};
use crate::session::lifecycle::{self, ClaimError, Lifecycle, ParkStep, Stop};
use crate::transport::Socket;

mod resumable;

pub(crate) use resumable::Earlier;
use resumable::Resumable;

/// The connection is closed or closing: the push was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// What `GET @connections/{id}` reports.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub connected_at_ms: u64,
    pub last_active_at_ms: u64,
    pub source_ip: String,
    pub user_agent: String,
}

impl ConnectionInfo {
    /// The body of `GET @connections/{id}`, as AWS answers it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "connectedAt": clock::iso8601(self.connected_at_ms),
            "identity": {"sourceIp": self.source_ip, "userAgent": self.user_agent},
            "lastActiveAt": clock::iso8601(self.last_active_at_ms),
        })
    }
}

pub struct Connection {
    pub id: ConnectionId,
    /// The socket (TCP, TLS or WebTransport). Shared by the session (reads, its own
    /// replies) and the shard's fan-out write pass; both run on the shard's thread, never at
    /// once. Replaced when a parked connection is resumed on a new socket.
    stream: RefCell<Rc<Socket>>,
    /// Live, parked, closing; a close asked for; a resume's claim.
    life: RefCell<Lifecycle>,
    /// What makes it resumable, if it is (boxed: most connections are not).
    resume: RefCell<Option<Box<Resumable>>>,
    /// Queued on the shard's list for its next write pass.
    dirty: Cell<bool>,
    pub facts: ConnectionFacts,
    /// Encoded frames waiting for the socket.
    outbound: RefCell<OutboundQueue>,
    /// Set when the session has something to do: frames were queued, a close was
    /// requested, or an in-flight integration finished.
    signaled: Cell<bool>,
    /// The session task, while it waits. A plain cell, not `tokio::sync::Notify`: this is
    /// touched once per recipient per broadcast, only ever from the owning shard.
    waker: Cell<Option<Waker>>,
    /// Monotonic time of the last frame in either direction, for the idle timeout.
    last_active: Cell<Instant>,
    /// The same moment as wall-clock epoch milliseconds, for `lastActiveAt`.
    last_active_ms: Cell<u64>,
    /// Integration calls running for this connection's messages.
    in_flight: Cell<usize>,
    /// Queue appends waiting for the disk: how many, and the bytes of their entries.
    appends_in_flight: Cell<(usize, usize)>,
    /// When `limits.max_connection_secs` runs out.
    expires_at: Instant,
    /// The facts as the context of its queue entries (see [`crate::stored_event`]),
    /// encoded at its first queued message.
    queue_context: OnceCell<Arc<[u8]>>,
    /// Its place under the connection limits: that of the socket it is served on now.
    admission: RefCell<Option<AdmissionTicket>>,
}

impl Connection {
    pub fn new(
        id: ConnectionId,
        facts: ConnectionFacts,
        stream: Socket,
        queue: OutboundQueue,
        expires_at: Instant,
    ) -> Self {
        Self {
            stream: RefCell::new(Rc::new(stream)),
            life: RefCell::new(Lifecycle::new()),
            resume: RefCell::new(None),
            dirty: Cell::new(false),
            expires_at,
            id,
            last_active: Cell::new(Instant::now()),
            last_active_ms: Cell::new(facts.connected_at_ms),
            facts,
            outbound: RefCell::new(queue),
            signaled: Cell::new(false),
            waker: Cell::new(None),
            in_flight: Cell::new(0),
            appends_in_flight: Cell::new((0, 0)),
            queue_context: OnceCell::new(),
            admission: RefCell::new(None),
        }
    }

    /// The context its queue entries share: the facts every one of its events repeats.
    pub fn queue_context(&self, api: ApiFacts<'_>) -> Arc<[u8]> {
        self.queue_context
            .get_or_init(|| crate::stored_event::context(api, &self.facts))
            .clone()
    }

    /// Queues a message, counts it as sent and wakes the session to write it (the path for
    /// a connection's own replies).
    pub fn push(&self, message: Message, metrics: &Metrics) -> Result<(), Gone> {
        self.enqueue(outbound::shared(message), metrics)?;
        metrics.messages_sent.inc();
        self.wake();
        Ok(())
    }

    /// Queues a shared message without waking anyone: the caller (the shard's fan-out)
    /// writes it, and counts it, in batches. A connection that cannot take it is closed as a
    /// slow consumer and reports [`Gone`].
    pub fn enqueue(&self, frame: SharedFrame, metrics: &Metrics) -> Result<(), Gone> {
        if !self.takes_frames() {
            return Err(Gone);
        }
        let pushed = self.outbound.borrow_mut().push(frame.clone());
        self.settle(pushed, frame, metrics)
    }

    /// [`Connection::enqueue`] with a conflation key: a queued, unsent frame with the same
    /// key is replaced in place (and counted in `switchboard_conflated_messages_total`).
    pub fn enqueue_keyed(
        &self,
        frame: SharedFrame,
        key: u64,
        metrics: &Metrics,
    ) -> Result<(), Gone> {
        if !self.takes_frames() {
            return Err(Gone);
        }
        let pushed = self.outbound.borrow_mut().push_keyed(frame.clone(), key);
        if pushed == Ok(Pushed::Replaced) {
            metrics.conflated_messages.inc();
        }
        self.settle(pushed.map(drop), frame, metrics)
    }

    /// What a refused push does: the connection is closed as a slow consumer, or (the
    /// gateway out of outbound memory) cut or let through.
    fn settle(
        &self,
        pushed: Result<(), PushError>,
        frame: SharedFrame,
        metrics: &Metrics,
    ) -> Result<(), Gone> {
        match pushed {
            Ok(()) => Ok(()),
            Err(PushError::Full) => {
                metrics.slow_consumer_disconnects.inc();
                self.request_close(DisconnectReason::SlowConsumer);
                Err(Gone)
            }
            // The gateway's outbound memory is used up: a connection holding a big queue is
            // cut now, its queue given back; a reader that keeps up gets its frame (the
            // shard sheds the biggest queues at once).
            Err(PushError::OverBudget) if self.queued_bytes() >= CUT_AT_CROSSING => {
                metrics.overload_disconnects.inc();
                self.request_close(DisconnectReason::Overloaded);
                self.outbound.borrow_mut().shed_unstarted();
                Err(Gone)
            }
            Err(PushError::OverBudget) => {
                self.outbound.borrow_mut().push_unbounded(frame);
                Ok(())
            }
        }
    }

    /// Sends `frame` as a datagram, past the queue, if the connection takes datagrams
    /// (a WebTransport session that asked for them) and it fits in one.
    pub(crate) fn send_datagram(&self, frame: &SharedFrame) -> bool {
        if !self.takes_frames() || !self.life.borrow().is_writable() {
            return false;
        }
        match &**self.stream.borrow() {
            Socket::WebTransport(session) => session.send_datagram(frame.datagram()),
            _ => false,
        }
    }

    /// Not closing, nor asked to close.
    fn takes_frames(&self) -> bool {
        self.life.borrow().takes_frames()
    }

    /// Bytes waiting in the outbound queue.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.outbound
            .try_borrow()
            .map_or(0, |queue| queue.queued_bytes())
    }

    /// Whether the outbound queue is less than half full: the session handles more of the
    /// client's messages only then, so its own replies never overflow the queue.
    pub(crate) fn has_room_for_replies(&self) -> bool {
        self.outbound.borrow().is_under_half()
    }

    /// Marks the connection as having frames for the shard's next write pass; false if it
    /// was marked already.
    pub(crate) fn mark_dirty(&self) -> bool {
        !self.dirty.replace(true)
    }

    /// Writes as much of the outbound queue as the socket takes without waiting, one
    /// vectored write per batch of frames. Returns whether bytes remain queued.
    pub(crate) fn flush(&self, metrics: &Metrics) -> std::io::Result<bool> {
        self.dirty.set(false);
        if self.is_parked() {
            // Held for a resume; written once a new socket is attached.
            return Ok(false);
        }
        let stream = self.stream.borrow();
        let mut queue = self.outbound.borrow_mut();
        let mut wrote = false;
        loop {
            if queue.is_empty() {
                if wrote {
                    self.touch();
                }
                // TLS may still hold records the socket had no room for.
                return stream.flush_pending();
            }
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let count = queue.io_slices(&mut slices);
            match stream.try_write_vectored(&slices[..count]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(written) => {
                    metrics.write_batch_bytes.observe(written as f64);
                    queue.consume(written);
                    wrote = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) => return Err(e),
            }
        }
    }

    /// The connection's socket.
    pub(crate) fn stream(&self) -> Rc<Socket> {
        self.stream.borrow().clone()
    }

    /// Makes the connection resumable with `token`: from now on its data frames are
    /// numbered and the last ones written kept (see [`crate::resume`]).
    /// `resumes`: how often it may be resumed (`None`: unlimited).
    pub(crate) fn make_resumable(
        &self,
        token: &ResumeToken,
        config: &ResumeConfig,
        resumes: Option<crate::limits::Rate>,
        handled: u64,
    ) {
        *self.resume.borrow_mut() = Some(Box::new(Resumable {
            secret: token.secret,
            handover: None,
            handled,
            resumes: resumes.map(|rate| crate::limits::TokenBucket::new(rate, Instant::now())),
            earlier: None,
        }));
        self.outbound
            .borrow_mut()
            .keep_for_resend(config.buffer_frames, config.buffer_bytes);
    }

    /// Counts a data message of its client's as handled (resumable connections only).
    pub(crate) fn note_handled(&self) {
        if let Some(resume) = self.resume.borrow_mut().as_mut() {
            resume.handled += 1;
        }
    }

    /// How many of its client's data messages it has handled (0 unless resumable).
    pub(crate) fn handled(&self) -> u64 {
        self.resume
            .borrow()
            .as_ref()
            .map_or(0, |resume| resume.handled)
    }

    /// Accepts the tokens it had before it moved here, besides its own, until `frame` (the
    /// `resumed` frame with its token here) is written.
    pub(crate) fn accept_earlier(&self, mut earlier: Earlier, frame: SharedFrame) {
        earlier.frame = Some(frame);
        if let Some(resume) = self.resume.borrow_mut().as_mut() {
            resume.earlier = Some(earlier);
        }
    }

    /// The ids it had on the nodes it moved here from, oldest first.
    pub(crate) fn earlier_ids(&self) -> Vec<ConnectionId> {
        let resume = self.resume.borrow();
        let earlier = resume.as_ref().and_then(|resume| resume.earlier.as_ref());
        earlier
            .map(|earlier| earlier.ids.clone())
            .unwrap_or_default()
    }

    /// The hashes of the secrets of the tokens that resume it now: its own, the one a resume
    /// replaced while the frame with the new one is unwritten, and those it had before a
    /// move while the frame of the move is unwritten.
    pub(crate) fn secret_hashes(&self) -> Vec<SecretHash> {
        let resume = self.resume.borrow();
        let Some(resume) = resume.as_ref() else {
            return Vec::new();
        };
        let unwritten = |frame: &SharedFrame| self.outbound.borrow().holds(frame);
        let replaced = (resume.handover.as_ref())
            .filter(|(_, frame)| unwritten(frame))
            .map(|(secret, _)| resume::hash_secret(secret));
        let earlier = (resume.earlier.as_ref())
            .filter(|earlier| earlier.frame.as_ref().is_some_and(unwritten))
            .map(|earlier| earlier.secret_hashes.clone())
            .unwrap_or_default();
        std::iter::once(resume::hash_secret(&resume.secret))
            .chain(replaced)
            .chain(earlier)
            .collect()
    }

    /// Charges one resume; false when they come faster than its rate allows.
    pub(crate) fn take_resume(&self) -> bool {
        let mut resume = self.resume.borrow_mut();
        let bucket = resume.as_mut().and_then(|resume| resume.resumes.as_mut());
        bucket.is_none_or(|bucket| bucket.try_take(1, Instant::now()).is_ok())
    }

    pub(crate) fn is_resumable(&self) -> bool {
        self.resume.borrow().is_some()
    }

    /// A resume handshake claims it (see [`Lifecycle::claim`]).
    pub(crate) fn claim(&self) -> Result<(), ClaimError> {
        self.life.borrow_mut().claim()
    }

    /// The resume handshake settled: the parked session looks again.
    pub(crate) fn release(&self) {
        self.life.borrow_mut().release();
        self.wake();
    }

    /// Asks the session to let go of its socket and park (a resume takes over).
    pub(crate) fn let_go(&self) {
        if self.life.borrow_mut().let_go() {
            self.wake();
        }
    }

    /// Whether the serving loop must stop now (see [`Lifecycle::stop`]).
    pub(crate) fn stop(&self) -> Option<Stop> {
        self.life.borrow_mut().stop()
    }

    /// Whether a client that received `received` data frames could resume now.
    pub(crate) fn can_rewind(&self, received: u64) -> Result<usize, RewindError> {
        self.outbound.borrow().check_rewind(received)
    }

    /// Its socket is gone: frames queue (within the same bounds) but are not written
    /// until a resume attaches a socket or `window` runs out.
    pub(crate) fn park(&self, window: std::time::Duration) {
        self.life.borrow_mut().park(Instant::now(), window);
    }

    pub(crate) fn is_parked(&self) -> bool {
        self.life.borrow().is_parked()
    }

    /// What the parked session does next (see [`Lifecycle::poll_parked`]).
    pub(crate) fn poll_parked(&self) -> ParkStep {
        self.life.borrow_mut().poll_parked(Instant::now())
    }

    /// Resumes a parked connection on `socket` for a client that received `received`
    /// data frames: queues the `resumed` frame and every frame after the count. Returns how
    /// many were replayed.
    /// `proven` is the secret the client resumed with: the one it still holds until the
    /// `resumed` frame with the next reaches it.
    pub(crate) fn attach(
        &self,
        socket: Socket,
        deflate: Option<crate::compression::Deflate>,
        received: u64,
        leftover: Vec<u8>,
        proven: Secret,
    ) -> Result<usize, RewindError> {
        if !self.is_parked() {
            // Ended meanwhile: nothing to resume onto.
            return Err(RewindError::NotKept);
        }
        // What is sent again goes as the new socket agreed (frames keep their messages).
        let replayed = self.outbound.borrow_mut().rewind_onto(deflate, received)?;
        // Every resume gets a new token: one that leaked with an old URL resumes nothing
        // once the new one is on its way to the client.
        let token = ResumeToken::mint(self.id);
        let resumed = outbound::shared(crate::protocol::resumed(
            &self.facts.connection_id,
            replayed,
            self.handled(),
            &token,
        ));
        if let Some(resume) = self.resume.borrow_mut().as_mut() {
            resume.secret = token.secret;
            resume.handover = Some((proven, resumed.clone()));
        }
        self.outbound.borrow_mut().push_front(resumed);
        *self.stream.borrow_mut() = Rc::new(socket);
        (self.life.borrow_mut().attach(leftover)).map_err(|_| RewindError::NotKept)?;
        self.touch();
        self.wake();
        Ok(replayed)
    }

    /// Asks the session to close with `reason` (the first request wins).
    pub fn request_close(&self, reason: DisconnectReason) {
        let taken = self.life.borrow_mut().request_close(reason);
        if taken {
            self.wake();
        }
    }

    /// A close was asked for and not yet acted on.
    pub(crate) fn close_requested(&self) -> bool {
        self.life.borrow().close_requested()
    }

    pub(crate) fn begin_closing(&self) {
        self.life.borrow_mut().begin_closing();
    }

    pub(crate) fn outbound(&self) -> &RefCell<OutboundQueue> {
        &self.outbound
    }

    pub(crate) fn wake(&self) {
        self.signaled.set(true);
        // Woken by reference and kept: the task's waker does not change between waits.
        if let Some(waker) = self.waker.take() {
            waker.wake_by_ref();
            self.waker.set(Some(waker));
        }
    }

    /// Resolves once [`Connection::wake`] has been called since the last time it resolved.
    pub(crate) fn woken(&self) -> Woken<'_> {
        Woken(self)
    }

    /// Gives back the outbound queue's memory if it is empty (called by the shard's sweep,
    /// so busy connections keep their allocation and idle ones shed it).
    pub(crate) fn shrink_idle_queue(&self) {
        if let Ok(mut queue) = self.outbound.try_borrow_mut() {
            queue.shrink_if_empty();
        }
    }

    pub(crate) fn touch(&self) {
        self.last_active.set(Instant::now());
        self.last_active_ms.set(clock::now_ms());
    }

    /// Holds `ticket` as its place under the limits, giving back the one it held (`None`
    /// when it ends).
    pub(crate) fn admitted_as(&self, ticket: Option<AdmissionTicket>) {
        drop(self.admission.replace(ticket));
    }

    /// How much longer it may live (`limits.max_connection_secs` from when it opened).
    pub(crate) fn lifetime_left(&self) -> std::time::Duration {
        self.expires_at.saturating_duration_since(Instant::now())
    }

    /// Why this connection should be closed at `now`, if a time limit has run out.
    pub(crate) fn expired(
        &self,
        now: Instant,
        idle_timeout: std::time::Duration,
    ) -> Option<DisconnectReason> {
        lifecycle::timed_out(now, self.expires_at, self.last_active.get(), idle_timeout)
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Counts an integration call for the duration of the returned guard.
    pub(crate) fn start_call(self: &std::rc::Rc<Self>) -> InFlightCall {
        self.in_flight.set(self.in_flight.get() + 1);
        InFlightCall(self.clone())
    }

    /// Queue appends waiting for the disk, and their bytes.
    pub(crate) fn appends_in_flight(&self) -> (usize, usize) {
        self.appends_in_flight.get()
    }

    /// Counts a queue append of `bytes` until the returned guard is dropped.
    pub(crate) fn start_append(self: &std::rc::Rc<Self>, bytes: usize) -> InFlightAppend {
        let (count, total) = self.appends_in_flight.get();
        self.appends_in_flight.set((count + 1, total + bytes));
        InFlightAppend {
            connection: self.clone(),
            bytes,
        }
    }

    pub fn info(&self) -> ConnectionInfo {
        ConnectionInfo {
            connected_at_ms: self.facts.connected_at_ms,
            last_active_at_ms: self.last_active_ms.get(),
            source_ip: self.facts.source_ip.clone(),
            user_agent: self.facts.user_agent.clone(),
        }
    }
}

/// See [`Connection::woken`].
pub(crate) struct Woken<'a>(&'a Connection);

impl Future for Woken<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let connection = self.0;
        if connection.signaled.replace(false) {
            return Poll::Ready(());
        }
        let waker = match connection.waker.take() {
            Some(waker) if waker.will_wake(cx.waker()) => waker,
            _ => cx.waker().clone(),
        };
        connection.waker.set(Some(waker));
        Poll::Pending
    }
}

/// Marks one queue append in flight; dropping it lets the session read again.
pub(crate) struct InFlightAppend {
    connection: std::rc::Rc<Connection>,
    bytes: usize,
}

impl Drop for InFlightAppend {
    fn drop(&mut self) {
        let (count, total) = self.connection.appends_in_flight.get();
        let now = (count.saturating_sub(1), total.saturating_sub(self.bytes));
        self.connection.appends_in_flight.set(now);
        self.connection.wake();
    }
}

/// Marks one integration call in flight; dropping it lets the session read again.
pub(crate) struct InFlightCall(std::rc::Rc<Connection>);

impl Drop for InFlightCall {
    fn drop(&mut self) {
        self.0
            .in_flight
            .set(self.0.in_flight.get().saturating_sub(1));
        self.0.wake();
    }
}
