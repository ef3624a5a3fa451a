//! The loop that serves a live connection: reads what the socket has, hands the messages
//! [`Inbound`] lets through to dispatch, writes what is queued, and stops when the
//! connection's [`Lifecycle`](super::lifecycle::Lifecycle) says so. Timers and shutdown are
//! not polled here: the shard's sweep asks the connection to close.

use std::cell::RefCell;
use std::rc::Rc;

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep, sleep_until};

use super::inbound::{Inbound, Next};
use super::lifecycle::Stop;
use crate::connection::Connection;
use crate::disconnect::DisconnectReason;
use crate::dispatch;
use crate::fence::Fence;
use crate::frame::Incoming;
use crate::message::Message;
use crate::shard::Shard;
use crate::transport::Socket;

/// Size of the per-shard read buffer every connection on the shard borrows.
const SCRATCH_BYTES: usize = 64 * 1024;
/// Integration calls one connection may have running; past it, its frames wait in the
/// kernel's socket buffer (backpressure to the client).
const MAX_IN_FLIGHT: usize = 32;
/// Queue appends one connection may have waiting for the disk, and their bytes (past
/// which, backpressure as above). Cheap to hold, and a client streaming into a queue needs
/// many in flight: its acks wait for a sync, and throughput is what is in flight divided by
/// that wait.
const MAX_APPENDS_IN_FLIGHT: usize = 256;
const MAX_APPEND_BYTES_IN_FLIGHT: usize = 1024 * 1024;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_BYTES]);
}

/// Reads, dispatches and writes until the connection must end; returns why. `leftover`:
/// what the client sent right after its request head.
///
/// Every message a client sends passes its rate limit before it causes any work; while
/// the limit holds a message back, nothing more is read from the socket (see
/// [`super::inbound`]).
pub(super) async fn serve(
    shard: &Rc<Shard>,
    connection: &Rc<Connection>,
    leftover: Vec<u8>,
) -> DisconnectReason {
    let stream = connection.stream();
    let limits = &shard.gateway.config.limits;
    let inflating = connection.outbound().borrow().encoding().deflate.is_some();
    let decoder = super::inbound::decoder_for(limits, stream.wire(), inflating);
    let mut inbound = Inbound::new(decoder);
    inbound.received(&leftover);
    drop(leftover);
    // The throttle's timer, only while the rate limit holds a message back.
    let mut throttle: Option<Pin<Box<Sleep>>> = None;
    let lease = Lease::now(&shard.gateway.fence);
    loop {
        if lease.is_lost() {
            // The cluster reported this connection gone while the node was paused or cut
            // off: not one more frame either way (the close follows, without $disconnect).
            return DisconnectReason::NodeLost;
        }
        if let Err(reason) = handle_ready(shard, connection, &mut inbound, &lease) {
            return reason;
        }
        match connection.stop() {
            Some(Stop::Close(reason)) => return reason,
            Some(Stop::LetGo) => return DisconnectReason::Superseded,
            None => {}
        }
        let pending = match connection.flush(&shard.gateway.metrics) {
            Ok(pending) => pending,
            Err(_) => return DisconnectReason::ConnectionLost,
        };
        if inbound.is_ready() && lease.holds() && can_take_work(connection) {
            // The flush made room: carry on with the waiting messages.
            continue;
        }
        if let Some(reason) = inbound.take_broken() {
            return reason;
        }
        let can_read = !inbound.has_waiting() && below_in_flight_limits(connection);
        if can_read && inbound.was_held_back() {
            // Everything read so far is handled: if the socket holds nothing more, the
            // client is not ahead of its limit any longer.
            match read(&stream, &mut inbound) {
                Ok(Read::Nothing) => inbound.caught_up(),
                Ok(Read::Bytes) => connection.touch(),
                Err(reason) => return reason,
            }
            if inbound.has_news() {
                continue;
            }
        }
        match (inbound.held_until(), &mut throttle) {
            (Some(until), Some(timer)) if timer.deadline() != Instant::from_std(until) => {
                timer.as_mut().reset(Instant::from_std(until));
            }
            (Some(_), Some(_)) => {}
            (Some(until), None) => throttle = Some(Box::pin(sleep_until(Instant::from_std(until)))),
            (None, _) => throttle = None,
        }
        let fenced = inbound.is_ready() && !lease.holds();
        // Readiness is polled, not awaited as futures: an idle connection's task keeps
        // nothing for its socket or its timer.
        tokio::select! {
            biased;
            _ = connection.woken() => {}
            _ = shard.gateway.fence.held(), if fenced => {}
            ready = poll_fn(|cx| stream.poll_write_ready(cx)), if pending => {
                if ready.is_err() {
                    return DisconnectReason::ConnectionLost;
                }
            }
            _ = poll_fn(|cx| poll_timer(&mut throttle, cx)), if throttle.is_some() => {
                inbound.throttle_elapsed();
            }
            ready = poll_fn(|cx| stream.poll_read_ready(cx)), if can_read => {
                if ready.is_err() {
                    return DisconnectReason::ConnectionLost;
                }
                match read(&stream, &mut inbound) {
                    Ok(Read::Nothing) => {}
                    Ok(Read::Bytes) => connection.touch(),
                    Err(reason) => return reason,
                }
            }
        }
    }
}

/// Handles the messages [`Inbound`] lets through while the connection may take work;
/// `Err` ends the connection.
fn handle_ready(
    shard: &Rc<Shard>,
    connection: &Rc<Connection>,
    inbound: &mut Inbound,
    lease: &Lease,
) -> Result<(), DisconnectReason> {
    let metrics = &shard.gateway.metrics;
    loop {
        let now = std::time::Instant::now();
        let limits = &shard.gateway.config.limits;
        let may_work = lease.holds() && can_take_work(connection);
        match inbound.next(now, may_work, limits) {
            Next::Message(message) => handle_incoming(shard, connection, message)?,
            Next::HeldBack { .. } => {
                metrics.inbound_throttled.inc();
                return Ok(());
            }
            Next::OverLimit => {
                metrics.inbound_throttled.inc();
                metrics.rate_limited.inc();
                return Err(DisconnectReason::RateLimited);
            }
            Next::Idle => return Ok(()),
        }
    }
}

/// The node's lease as one session sees it: held, and in the generation the session
/// started in ([`crate::fence`]). While it does not hold, the session's frames wait.
struct Lease<'a> {
    fence: &'a Fence,
    generation: u64,
}

impl<'a> Lease<'a> {
    fn now(fence: &'a Fence) -> Self {
        let generation = fence.generation();
        Self { fence, generation }
    }

    fn holds(&self) -> bool {
        self.fence.holds() && !self.is_lost()
    }

    /// The node was declared lost since this session started.
    fn is_lost(&self) -> bool {
        self.fence.generation() != self.generation
    }
}

/// Polls the throttle's timer, if it is set.
fn poll_timer(timer: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>) -> Poll<()> {
    match timer {
        Some(timer) => timer.as_mut().poll(cx),
        None => Poll::Pending,
    }
}

/// Whether the connection may start work for another message: few enough integration
/// calls and queue appends running, and room in its outbound queue for their replies.
fn can_take_work(connection: &Connection) -> bool {
    below_in_flight_limits(connection) && connection.has_room_for_replies()
}

fn below_in_flight_limits(connection: &Connection) -> bool {
    let (appends, append_bytes) = connection.appends_in_flight();
    connection.in_flight() < MAX_IN_FLIGHT
        && appends < MAX_APPENDS_IN_FLIGHT
        && append_bytes < MAX_APPEND_BYTES_IN_FLIGHT
}

/// Acts on one client message; `Err` ends the connection (a close frame).
fn handle_incoming(
    shard: &Rc<Shard>,
    connection: &Rc<Connection>,
    message: Incoming,
) -> Result<(), DisconnectReason> {
    match message {
        Incoming::Text(_) | Incoming::Binary(_) => {
            connection.note_handled();
            dispatch::route_message(shard, connection, message);
        }
        Incoming::Ping(payload) => {
            let _ = connection.push(Message::pong(payload), &shard.gateway.metrics);
        }
        Incoming::Pong => {}
        Incoming::Close(code, reason) => return Err(DisconnectReason::ClientClosed(code, reason)),
    }
    Ok(())
}

/// What one read from the socket brought.
enum Read {
    /// Nothing was waiting (a spurious wake-up, or a check).
    Nothing,
    Bytes,
}

/// Reads what the socket has into the shard's scratch buffer and feeds it to `inbound`.
fn read(stream: &Socket, inbound: &mut Inbound) -> Result<Read, DisconnectReason> {
    SCRATCH.with_borrow_mut(|scratch| match stream.try_read(scratch) {
        Ok(0) => Err(DisconnectReason::ConnectionLost),
        Ok(n) => {
            inbound.received(&scratch[..n]);
            Ok(Read::Bytes)
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(Read::Nothing),
        Err(_) => Err(DisconnectReason::ConnectionLost),
    })
}
