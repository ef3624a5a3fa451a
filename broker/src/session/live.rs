//! A connection from `$connect` to `$disconnect`: registered with its shard, served,
//! parked while a resumable connection waits for its client, closed with the frame its
//! reason calls for, and reported exactly once. The decisions are
//! [`super::lifecycle`]'s; this is the glue that acts on them.

use std::rc::Rc;
use std::time::Duration;

use tokio::time::Instant;

use super::admit::Accepted;
use super::lifecycle::{ParkStep, end_of_serving, farewell};
use super::serve::serve;
use crate::connection::Connection;
use crate::disconnect::DisconnectReason;
use crate::dispatch;
use crate::limits::AdmissionTicket;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::outbound::{self, OutboundQueue, Wire};
use crate::protocol;
use crate::resume::ResumeToken;
use crate::shard::Shard;
use crate::transport::Socket;

/// How long a closing connection gets to take its last frames and the close frame.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// A connection from `$connect` to `$disconnect`: registered with its shard (now), served
/// until it must end (parked in between if it is resumable and its socket drops), closed,
/// and reported. It holds its socket's place under the limits (`ticket`) until then.
///
/// Not an `async fn`: the returned future keeps only what serving needs, not the
/// handshake's results it was built from (an async fn keeps its arguments for its whole
/// life, and this one lives as long as the connection).
pub(crate) fn live(
    shard: Rc<Shard>,
    socket: Socket,
    accepted: Accepted,
    ticket: Option<AdmissionTicket>,
) -> impl Future<Output = ()> {
    let (connection, leftover) = register(&shard, socket, accepted, ticket);
    serve_and_report(shard, connection, leftover)
}

/// Makes the connection, registers it with its shard (and its rooms, if it moved here) and
/// queues its first frames; returns it and the bytes its client sent after the handshake.
fn register(
    shard: &Rc<Shard>,
    socket: Socket,
    accepted: Accepted,
    ticket: Option<AdmissionTicket>,
) -> (Rc<Connection>, Vec<u8>) {
    let Accepted {
        id,
        facts,
        leftover,
        resume_refused,
        moved_in,
        deflate,
    } = accepted;
    let gateway = shard.gateway.clone();
    let limits = &gateway.config.limits;
    let wire = socket.wire();
    let queue = OutboundQueue::new(
        wire,
        limits.outbound_queue_frames,
        limits.outbound_queue_bytes,
    )
    .deflating(deflate)
    .counted_in(shard.account.clone());
    let lifetime = moved_in
        .as_ref()
        .and_then(|moved| moved.lifetime_left)
        .map_or(limits.max_connection_duration, |left| {
            left.min(limits.max_connection_duration)
        });
    let expires_at = std::time::Instant::now() + lifetime;
    let connection = Rc::new(Connection::new(id, facts, socket, queue, expires_at));
    connection.admitted_as(ticket);
    let moved = moved_in.is_some();
    let mut rooms = Vec::new();
    if let Some(config) = &gateway.config.api.resume {
        let token = ResumeToken::mint(id);
        let connection_id = &connection.facts.connection_id;
        let first = outbound::shared(match &moved_in {
            Some(moved) => {
                protocol::resumed(connection_id, moved.frames.len(), moved.handled, &token)
            }
            None => protocol::welcome(connection_id, &token, resume_refused),
        });
        connection
            .outbound()
            .borrow_mut()
            .push_unbounded(first.clone());
        let handled = moved_in.as_ref().map_or(0, |moved| moved.handled);
        connection.make_resumable(&token, config, limits.resumes_per_connection, handled);
        if let Some(moved) = moved_in {
            connection.accept_earlier(moved.earlier, first);
            let mut queue = connection.outbound().borrow_mut();
            queue.continue_count_after(moved.received);
            for message in moved.frames {
                queue.push_unbounded(outbound::shared(message));
            }
            rooms = moved.rooms;
        }
    }
    // A new connection was recorded before its `$connect`; one that moved here is now.
    if moved {
        gateway.directory.opened(&connection.facts);
        shard.record(|changes| changes.upsert(super::admit::stored_record(&connection.facts)));
    }
    // A moved connection's rooms first: calls that waited for it (a leave among them)
    // apply on top of them as it is registered.
    for room in &rooms {
        shard.join_moved(&connection, room);
    }
    shard.register(connection.clone());
    if shard.shutdown.is_cancelled() {
        // Registered after the shutdown sweep: close like everyone else.
        connection.request_close(DisconnectReason::ServerShutdown);
    }
    (connection, leftover)
}

/// Serves a registered connection to its end, then unregisters and reports it.
async fn serve_and_report(shard: Rc<Shard>, connection: Rc<Connection>, leftover: Vec<u8>) {
    let reason = serve_to_the_end(&shard, &connection, leftover).await;
    // A moved connection's leaves are its new node's to tell; a lost node's, the node that
    // took it over told already.
    let told_elsewhere = matches!(reason, DisconnectReason::Moved | DisconnectReason::NodeLost);
    shard.unregister(&connection, told_elsewhere);
    connection.admitted_as(None);
    let wire = connection.stream().wire().label();
    let metrics = &shard.gateway.metrics;
    metrics.connections_active.with_label_values(&[wire]).dec();
    tracing::debug!(
        connection_id = %connection.facts.connection_id,
        peer = %connection.facts.source_ip,
        reason = %reason.description(),
        "connection closed"
    );
    let facts = connection.facts.clone();
    dispatch::fire_disconnect(&shard, facts, reason);
}

/// Serves the connection until it ends for good and closes it; returns why. A resumable
/// connection whose socket is lost parks instead and, if its client resumes in time, is
/// served again on the new socket.
async fn serve_to_the_end(
    shard: &Rc<Shard>,
    connection: &Rc<Connection>,
    mut leftover: Vec<u8>,
) -> DisconnectReason {
    let metrics = &shard.gateway.metrics;
    loop {
        let reason = match serve(shard, connection, leftover).await {
            DisconnectReason::ConnectionLost => {
                let lost = Box::pin(why_lost(connection));
                lost.await
            }
            reason => reason,
        };
        // The paths below run once per connection (or per drop): boxed, so the state every
        // idle connection keeps is only what `serve` needs.
        let resumable = connection.is_resumable();
        if let Some(reason) = end_of_serving(reason, resumable, shard.shutdown.is_cancelled()) {
            let closing = Box::pin(close(connection, metrics, reason));
            return closing.await;
        }
        let parked = Box::pin(park(shard, connection));
        match parked.await {
            Ok(more) => leftover = more,
            // The socket is long gone: nothing to close, only to report.
            Err(reason) => return reason,
        }
    }
}

/// Why a connection's socket was lost: QUIC knows more than TCP (the client may have closed
/// the WebTransport session with a code).
async fn why_lost(connection: &Connection) -> DisconnectReason {
    match &*connection.stream() {
        Socket::WebTransport(session) => session.end_reason().await,
        _ => DisconnectReason::ConnectionLost,
    }
}

/// Holds a resumable connection whose socket is gone until its client resumes (returns
/// the bytes that came after the new request head), or until it must end: its window ran
/// out, it was deleted, or what it held overflowed (see [`Lifecycle::poll_parked`]).
///
/// [`Lifecycle::poll_parked`]: super::lifecycle::Lifecycle::poll_parked
async fn park(shard: &Shard, connection: &Connection) -> Result<Vec<u8>, DisconnectReason> {
    let metrics = &shard.gateway.metrics;
    let resume = shard.gateway.config.api.resume.as_ref();
    connection.park(resume.map_or(Duration::ZERO, |config| config.window));
    // The old socket may still be open (a takeover): its client hears the end of it.
    connection.stream().shutdown_write();
    metrics.connections_parked.inc();
    tracing::debug!(connection_id = %connection.facts.connection_id, "connection parked for a resume");
    let outcome = loop {
        match connection.poll_parked() {
            ParkStep::Resumed(leftover) => break Ok(leftover),
            ParkStep::End { reason, refusal } => {
                if let Some(refusal) = refusal {
                    shard.note_unresumable(connection, refusal);
                }
                break Err(reason);
            }
            // A resume handshake runs: it wakes this loop when it settles.
            ParkStep::Wait { until: None } => connection.woken().await,
            ParkStep::Wait { until: Some(until) } => {
                let until = Instant::from_std(until);
                let _ = tokio::time::timeout_at(until, connection.woken()).await;
            }
        }
    };
    metrics.connections_parked.dec();
    outcome
}

/// Sends the close frame `reason` calls for (after whatever is already queued), gives the
/// socket a moment to take it, and shuts the connection down.
async fn close(
    connection: &Connection,
    metrics: &Metrics,
    reason: DisconnectReason,
) -> DisconnectReason {
    connection.begin_closing();
    let stream = connection.stream();
    let Some(farewell) = farewell(&reason, stream.wire()) else {
        return reason;
    };
    let deadline = Instant::now() + CLOSE_FLUSH;
    if let Socket::WebTransport(session) = &*stream {
        // The session's close carries the code and reason; queued messages go first.
        if farewell.abandon_queue {
            connection.outbound().borrow_mut().clear();
        }
        flush_until(connection, metrics, deadline).await;
        let grace = deadline.saturating_duration_since(Instant::now());
        session.close(farewell.code, &farewell.reason, grace).await;
        return reason;
    }
    let close = outbound::shared(Message::close(farewell.code, &farewell.reason));
    {
        let mut queue = connection.outbound().borrow_mut();
        if farewell.abandon_queue {
            // Whatever it did not read is abandoned; only the verdict goes out.
            let bytes = close.bytes(Wire::WebSocket).len();
            *queue = queue.replacement(Wire::WebSocket, 1, bytes);
        }
        queue.push_unbounded(close);
    }
    flush_until(connection, metrics, deadline).await;
    // Other holders of the connection (an in-flight integration call) may keep the socket
    // open a little longer; the FIN goes out now.
    stream.shutdown_write();
    reason
}

/// Writes the outbound queue until it is empty or `deadline` passes.
async fn flush_until(connection: &Connection, metrics: &Metrics, deadline: Instant) {
    let stream = connection.stream();
    while let Ok(true) = connection.flush(metrics) {
        if tokio::time::timeout_at(deadline, stream.writable())
            .await
            .is_err()
        {
            break;
        }
    }
}
