//! One client connection from the first byte to `$disconnect`: handshake (with the
//! `$connect` route), then one task that reads frames, writes queued frames and keeps the
//! timers, and finally the `$disconnect` route, exactly once.
//!
//! An idle connection holds no read or write buffer: reads go into the shard's scratch
//! buffer and only an incomplete frame is kept; the outbound queue is empty.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::auth::authorizer::{Decision, Verdict};
use crate::clock;
use crate::connection::Connection;
use crate::connection_id::ConnectionId;
use crate::disconnect::DisconnectReason;
use crate::dispatch::{self, ConnectOutcome};
use crate::event::ConnectionFacts;
use crate::frame::{self, Incoming, MessageDecoder, Opcode, close_code};
use crate::handshake::{self, ReadError};
use crate::limits::{AdmissionTicket, InboundLimiter};
use crate::metrics::Metrics;
use crate::outbound::OutboundQueue;
use crate::shard::Shard;
use crate::transport::{Socket, TlsSocket};

/// Size of the per-shard read buffer every connection on the shard borrows.
const SCRATCH_BYTES: usize = 64 * 1024;
/// Integration calls one connection may have running; past it, its frames wait in the
/// kernel's socket buffer (backpressure to the client).
const MAX_IN_FLIGHT: usize = 32;
/// How long a closing connection gets to take its last frames and the close frame.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_BYTES]);
}

/// Runs a connection accepted by `shard` and admitted under `ticket`, which it holds
/// until the socket closes.
pub async fn run(shard: Rc<Shard>, stream: TcpStream, peer: SocketAddr, ticket: AdmissionTicket) {
    let _ticket = ticket;
    let _ = stream.set_nodelay(true);
    let Some((socket, accepted)) = open(&shard, stream, peer).await else {
        return;
    };
    let Accepted {
        id,
        facts,
        leftover,
    } = accepted;
    let gateway = shard.gateway.clone();
    let limits = &gateway.config.limits;
    let queue = OutboundQueue::new(limits.outbound_queue_frames, limits.outbound_queue_bytes);
    let expires_at = std::time::Instant::now() + limits.max_connection_duration;
    let connection = Rc::new(Connection::new(id, facts, socket, queue, expires_at));
    let record = switchboard_storage::ConnectionRecord {
        connection_id: connection.facts.connection_id.clone(),
        connected_at_ms: connection.facts.connected_at_ms,
        last_active_at_ms: connection.facts.connected_at_ms,
        source_ip: connection.facts.source_ip.clone(),
        user_agent: connection.facts.user_agent.clone(),
    };
    if let Some(cluster) = &gateway.cluster {
        cluster.mirror_opened(crate::cluster::mirror::MirrorRecord::of(&connection.facts));
    }
    shard.record(|changes| changes.upsert(record));
    shard.register(connection.clone());
    if shard.shutdown.is_cancelled() {
        // Registered after the shutdown sweep: close like everyone else.
        connection.request_close(DisconnectReason::ServerShutdown);
    }
    let mut decoder = MessageDecoder::new(limits.max_frame_bytes, limits.max_message_bytes);
    let reason = serve(&shard, &connection, &mut decoder, leftover).await;
    let reason = close(&connection, &gateway.metrics, reason).await;

    shard.unregister(&connection);
    gateway.metrics.connections_active.dec();
    tracing::debug!(
        connection_id = %connection.facts.connection_id,
        %peer,
        reason = %reason.description(),
        "connection closed"
    );
    let facts = connection.facts.clone();
    dispatch::fire_disconnect(&shard, facts, reason);
}

/// The TLS handshake (with `server.tls`), then the WebSocket handshake. Boxed so their
/// state (request headers, `$connect` call) is freed before the connection settles in for
/// hours: an idle connection keeps only what it needs.
async fn open(
    shard: &Rc<Shard>,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Option<(Socket, Accepted)> {
    let Some(tls) = shard.gateway.config.server.tls.as_ref() else {
        let accepted = Box::pin(handshake(shard, &mut stream, peer)).await?;
        return Some((Socket::Plain(stream), accepted));
    };
    let timeout = shard.gateway.config.limits.handshake_timeout;
    let mut stream = match tokio::time::timeout(timeout, tls.acceptor().accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "TLS handshake failed");
            shard
                .gateway
                .metrics
                .connections_total
                .with_label_values(&["tls_error"])
                .inc();
            return None;
        }
        Err(_) => return None,
    };
    let accepted = Box::pin(handshake(shard, &mut stream, peer)).await?;
    let (tcp, tls) = stream.into_inner();
    Some((Socket::Tls(Box::new(TlsSocket::new(tcp, tls))), accepted))
}

/// A connection that passed `$connect` and got its 101.
struct Accepted {
    id: ConnectionId,
    facts: ConnectionFacts,
    /// Bytes the client sent right after its request head.
    leftover: Vec<u8>,
}

/// Reads the upgrade request, admits the connection, runs `$connect` and answers.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    shard: &Rc<Shard>,
    stream: &mut S,
    peer: SocketAddr,
) -> Option<Accepted> {
    let gateway = &shard.gateway;
    let metrics = &gateway.metrics;
    let limits = &gateway.config.limits;
    let upgrade =
        match handshake::read_upgrade(stream, &gateway.config.api.stage, limits.handshake_timeout)
            .await
        {
            Ok(upgrade) => upgrade,
            Err(ReadError::Rejected(rejection)) => {
                metrics
                    .connections_total
                    .with_label_values(&[rejection.label()])
                    .inc();
                let body = rejection.to_string();
                let response = handshake::error_response(rejection.status(), body.as_bytes());
                handshake::respond_and_close(stream, &response).await;
                return None;
            }
            Err(error) => {
                tracing::debug!(%peer, %error, "handshake abandoned");
                return None;
            }
        };
    let id = shard.ids.borrow_mut().connection_id();
    let mut facts = ConnectionFacts {
        connection_id: id.to_string(),
        connected_at_ms: clock::now_ms(),
        source_ip: peer.ip().to_string(),
        user_agent: upgrade.user_agent,
        domain_name: upgrade.host,
        authorizer: None,
    };
    facts.authorizer = match admit_request(shard, &facts, &upgrade.request).await {
        Ok(context) => context,
        Err((status, body, result)) => {
            metrics.connections_total.with_label_values(&[result]).inc();
            let response = handshake::error_response(status, body.as_bytes());
            handshake::respond_and_close(stream, &response).await;
            return None;
        }
    };
    let protocol = match dispatch::run_connect(shard, &facts, &upgrade.request).await {
        ConnectOutcome::Accept { protocol } => protocol,
        ConnectOutcome::Reject {
            status,
            body,
            result,
        } => {
            metrics.connections_total.with_label_values(&[result]).inc();
            handshake::respond_and_close(stream, &handshake::error_response(status, &body)).await;
            return None;
        }
    };
    let response = handshake::switching_protocols(&upgrade.key, protocol.as_deref());
    if stream.write_all(&response).await.is_err() {
        // The client left before the 101; `$connect` succeeded, so `$disconnect` is owed.
        dispatch::fire_disconnect(shard, facts, DisconnectReason::ConnectionLost);
        return None;
    }
    metrics
        .connections_total
        .with_label_values(&["accepted"])
        .inc();
    metrics.connections_active.inc();
    tracing::debug!(connection_id = %facts.connection_id, %peer, "connected");
    Some(Accepted {
        id,
        facts,
        leftover: upgrade.leftover,
    })
}

/// The checks an upgrade request passes before any backend is called: the browser origin
/// allow-list (`server.allowed_origins`) and the `[authorizer]`. `Ok` carries the
/// authorizer's context; `Err` the status, body and metric label of the refusal.
async fn admit_request(
    shard: &Rc<Shard>,
    facts: &ConnectionFacts,
    request: &crate::event::HandshakeRequest,
) -> Result<Option<std::sync::Arc<serde_json::value::RawValue>>, (u16, String, &'static str)> {
    let gateway = &shard.gateway;
    let config = &gateway.config;
    let origin = request
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("origin"))
        .map(|(_, value)| value.as_str());
    if let Some(origin) = origin {
        let allowed = &config.server.allowed_origins;
        if !allowed.is_empty()
            && !allowed
                .iter()
                .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
        {
            return Err((
                403,
                format!("origin {origin} is not allowed"),
                "origin_denied",
            ));
        }
    }
    let Some(authorizer) = &config.authorizer else {
        return Ok(None);
    };
    let verdict = match authorizer.decide(request, std::time::Instant::now()) {
        Decision::Done(verdict) => verdict,
        Decision::AskBackend { identity } => {
            match dispatch::ask_authorizer(shard, authorizer, facts, request).await {
                Some(verdict) => {
                    authorizer.cache_verdict(identity, &verdict);
                    verdict
                }
                None => {
                    gateway
                        .metrics
                        .authorizer_results
                        .with_label_values(&["error"])
                        .inc();
                    return Err((
                        502,
                        "Bad Gateway: the authorizer failed".into(),
                        "backend_error",
                    ));
                }
            }
        }
    };
    gateway
        .metrics
        .authorizer_results
        .with_label_values(&[verdict.label()])
        .inc();
    match verdict {
        Verdict::Allowed(context) => Ok(Some(context)),
        Verdict::Missing => Err((401, "Unauthorized: no token".into(), "unauthorized")),
        Verdict::Malformed(why) => Err((401, format!("Unauthorized: {why}"), "unauthorized")),
        Verdict::Denied(why) => Err((403, format!("Forbidden: {why}"), "forbidden")),
    }
}

/// Reads, dispatches and writes until the connection must end; returns why. Timers and
/// shutdown are not polled here: the shard's sweep asks the connection to close.
///
/// Every message a client sends passes its rate limit before it causes any work; while
/// the limit holds a message back, nothing more is read from the socket (the client's
/// sends back up into TCP), and a client that stays behind for
/// `limits.throttle_disconnect_secs` is closed with 1008.
async fn serve(
    shard: &Rc<Shard>,
    connection: &Rc<Connection>,
    decoder: &mut MessageDecoder,
    leftover: Vec<u8>,
) -> DisconnectReason {
    let limits = &shard.gateway.config.limits;
    let mut incoming = Vec::new();
    // A protocol error ends the connection once the messages before it have been handled.
    let mut broken = decoder
        .decode(&leftover, &mut incoming)
        .err()
        .map(DisconnectReason::BadFrame);
    drop(leftover);
    // Decoded messages wait here while the connection has too much work outstanding (its
    // replies then back up into the client's socket instead of overflowing its queue) or
    // while its rate limit holds them back.
    let mut waiting: VecDeque<Incoming> = incoming.drain(..).collect();
    let mut throttle = Throttle::new(limits);
    let stream = connection.stream();
    loop {
        if let Err(reason) = handle_waiting(shard, connection, &mut waiting, &mut throttle) {
            return reason;
        }
        if let Some(reason) = connection.take_close_request() {
            return reason;
        }
        let pending = match connection.flush(&shard.gateway.metrics) {
            Ok(pending) => pending,
            Err(_) => return DisconnectReason::ConnectionLost,
        };
        if !waiting.is_empty() && throttle.until.is_none() && can_take_work(connection) {
            // The flush made room: carry on with the waiting messages.
            continue;
        }
        if waiting.is_empty() {
            if let Some(reason) = broken.take() {
                return reason;
            }
        }
        let can_read = waiting.is_empty() && connection.in_flight() < MAX_IN_FLIGHT;
        if can_read && throttle.since.is_some() {
            // Everything read so far is handled: if the socket holds nothing more, the
            // client is not ahead of its limit any longer.
            match read_frames(stream, decoder, &mut incoming) {
                Ok(ReadOutcome::Nothing) => throttle.since = None,
                Ok(ReadOutcome::Read) => connection.touch(),
                Err(reason @ DisconnectReason::BadFrame(_)) => broken = Some(reason),
                Err(reason) => return reason,
            }
            if !incoming.is_empty() || broken.is_some() {
                waiting.extend(incoming.drain(..));
                continue;
            }
        }
        tokio::select! {
            biased;
            _ = connection.woken() => {}
            ready = stream.writable(), if pending => {
                if ready.is_err() {
                    return DisconnectReason::ConnectionLost;
                }
            }
            _ = throttle.elapsed(), if throttle.until.is_some() => {
                throttle.until = None;
            }
            ready = stream.readable(), if can_read => {
                if ready.is_err() {
                    return DisconnectReason::ConnectionLost;
                }
                match read_frames(stream, decoder, &mut incoming) {
                    Ok(ReadOutcome::Nothing) => {}
                    Ok(ReadOutcome::Read) => connection.touch(),
                    Err(reason @ DisconnectReason::BadFrame(_)) => broken = Some(reason),
                    Err(reason) => return reason,
                }
                waiting.extend(incoming.drain(..));
            }
        }
    }
}

/// Handles waiting messages while the connection may take work and its rate limit lets
/// them through; `Err` ends the connection.
fn handle_waiting(
    shard: &Rc<Shard>,
    connection: &Rc<Connection>,
    waiting: &mut VecDeque<Incoming>,
    throttle: &mut Throttle,
) -> Result<(), DisconnectReason> {
    let metrics = &shard.gateway.metrics;
    while throttle.until.is_none() && can_take_work(connection) {
        let Some(message) = waiting.front() else {
            break;
        };
        let now = Instant::now();
        if let Err(wait) = throttle
            .limiter
            .admit(message_cost(message), now.into_std())
        {
            metrics.inbound_throttled.inc();
            if throttle.held_back_since(now) >= throttle.disconnect_after {
                metrics.rate_limited.inc();
                return Err(DisconnectReason::RateLimited);
            }
            throttle.until = Some(now + wait);
            break;
        }
        if let Some(reason) = waiting
            .pop_front()
            .and_then(|message| handle_incoming(shard, connection, message))
        {
            return Err(reason);
        }
    }
    Ok(())
}

/// Whether the connection may start work for another message: few enough integration
/// calls running, and room in its outbound queue for their replies.
fn can_take_work(connection: &Connection) -> bool {
    connection.in_flight() < MAX_IN_FLIGHT && connection.has_room_for_replies()
}

/// What a message costs against the inbound limits: one message and its payload bytes.
fn message_cost(message: &Incoming) -> usize {
    match message {
        Incoming::Text(text) => text.len(),
        Incoming::Binary(bytes) | Incoming::Ping(bytes) => bytes.len(),
        Incoming::Pong | Incoming::Close(..) => 0,
    }
}

/// A connection's rate-limit state in the session loop.
#[derive(Debug)]
struct Throttle {
    limiter: InboundLimiter,
    /// `limits.throttle_disconnect_secs`.
    disconnect_after: std::time::Duration,
    /// When the message at the head of the queue may go.
    until: Option<Instant>,
    /// Since when the client has been held back without ever being caught up with.
    since: Option<Instant>,
}

impl Throttle {
    fn new(limits: &crate::config::Limits) -> Self {
        let now = std::time::Instant::now();
        Self {
            limiter: InboundLimiter::new(limits.inbound.messages, limits.inbound.bytes, now),
            disconnect_after: limits.throttle_disconnect,
            until: None,
            since: None,
        }
    }

    /// Marks the client as held back now; returns for how long it has been, unbroken.
    fn held_back_since(&mut self, now: Instant) -> std::time::Duration {
        now.saturating_duration_since(*self.since.get_or_insert(now))
    }

    async fn elapsed(&self) {
        if let Some(until) = self.until {
            tokio::time::sleep_until(until).await;
        }
    }
}

/// Acts on one client message; `Some` ends the connection.
fn handle_incoming(
    shard: &Rc<Shard>,
    connection: &Rc<Connection>,
    message: Incoming,
) -> Option<DisconnectReason> {
    match message {
        Incoming::Text(_) | Incoming::Binary(_) => {
            dispatch::route_message(shard, connection, message)
        }
        Incoming::Ping(payload) => {
            let _ = connection.push(
                frame::encode(Opcode::Pong, &payload),
                &shard.gateway.metrics,
            );
        }
        Incoming::Pong => {}
        Incoming::Close(code, reason) => return Some(DisconnectReason::ClientClosed(code, reason)),
    }
    None
}

/// What one read from the socket brought.
enum ReadOutcome {
    /// Nothing was waiting (a spurious wake-up, or a check).
    Nothing,
    Read,
}

/// Reads what the socket has into the shard's scratch buffer and decodes it.
fn read_frames(
    stream: &Socket,
    decoder: &mut MessageDecoder,
    incoming: &mut Vec<Incoming>,
) -> Result<ReadOutcome, DisconnectReason> {
    SCRATCH.with_borrow_mut(|scratch| match stream.try_read(scratch) {
        Ok(0) => Err(DisconnectReason::ConnectionLost),
        Ok(n) => decoder
            .decode(&scratch[..n], incoming)
            .map(|()| ReadOutcome::Read)
            .map_err(DisconnectReason::BadFrame),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(ReadOutcome::Nothing),
        Err(_) => Err(DisconnectReason::ConnectionLost),
    })
}

/// Sends the close frame `reason` calls for (after whatever is already queued), gives the
/// socket a moment to take it, and shuts the connection down.
async fn close(
    connection: &Connection,
    metrics: &Metrics,
    reason: DisconnectReason,
) -> DisconnectReason {
    connection.begin_closing();
    if reason == DisconnectReason::ConnectionLost {
        return reason;
    }
    let close_frame = match &reason {
        DisconnectReason::ClientClosed(code, _) => {
            frame::encode_close(code.unwrap_or(close_code::NORMAL), "")
        }
        other => frame::encode_close(other.status_code(), &other.description()),
    };
    {
        let mut queue = connection.outbound().borrow_mut();
        if matches!(
            reason,
            DisconnectReason::SlowConsumer | DisconnectReason::Overloaded
        ) {
            // Whatever it did not read is abandoned; only the verdict goes out.
            *queue = OutboundQueue::new(1, close_frame.len());
        }
        queue.push_unbounded(Rc::new(close_frame));
    }
    let deadline = Instant::now() + CLOSE_FLUSH;
    let stream = connection.stream();
    while let Ok(true) = connection.flush(metrics) {
        if tokio::time::timeout_at(deadline, stream.writable())
            .await
            .is_err()
        {
            break;
        }
    }
    // Other holders of the connection (an in-flight integration call) may keep the socket
    // open a little longer; the FIN goes out now.
    stream.shutdown_write();
    reason
}
