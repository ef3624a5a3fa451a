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

use tokio::io::{AsyncRead, AsyncWrite};
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
use crate::outbound::{self, OutboundQueue, Wire};
use crate::protocol;
use crate::resume::attach::Resuming;
use crate::resume::{self, Refusal, ResumeRequest, ResumeToken};
use crate::shard::Shard;
use crate::transport::webtransport::HandshakeSlot;
use crate::transport::webtransport::framing::FrameDecoder;
use crate::transport::{Decoder, Socket, TlsSocket, WebTransportSocket};

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
/// How long a closing connection gets to take its last frames and the close frame.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_BYTES]);
}

/// Runs a WebSocket connection accepted by `shard` and admitted under `ticket`, which its
/// connection holds until it ends (a resume hands both to the connection it resumes).
pub async fn run(shard: Rc<Shard>, stream: TcpStream, peer: SocketAddr, ticket: AdmissionTicket) {
    let _ = stream.set_nodelay(true);
    // Boxed: the handshake state is gone before the connection settles in for hours.
    match Box::pin(open(&shard, stream, peer)).await {
        Some(Opened::Connected(opened)) => {
            let (socket, accepted) = *opened;
            let decoder = decoder_for(&shard, Wire::WebSocket);
            live(shard, socket, accepted, decoder, Some(ticket)).await;
        }
        Some(Opened::Resume(resuming)) => {
            let resuming = Resuming {
                ticket: Some(ticket),
                ..*resuming
            };
            Box::pin(resume::attach::resume(shard, resuming)).await;
        }
        None => {}
    }
}

/// A fresh decoder for `wire` with the configured limits.
pub(crate) fn decoder_for(shard: &Shard, wire: Wire) -> Decoder {
    let limits = &shard.gateway.config.limits;
    match wire {
        Wire::WebSocket => Decoder::WebSocket(MessageDecoder::new(
            limits.max_frame_bytes,
            limits.max_message_bytes,
        )),
        Wire::WebTransport => Decoder::WebTransport(FrameDecoder::new(limits.max_message_bytes)),
    }
}

/// Runs a WebTransport session the endpoint accepted; its QUIC handshake counts under
/// `handshake`, and the session is admitted once the handshake has proven its address.
pub async fn run_webtransport(
    shard: Rc<Shard>,
    incoming: wtransport::endpoint::IncomingSession,
    handshake: HandshakeSlot,
) {
    let opened = Box::pin(open_webtransport(&shard, incoming, handshake)).await;
    match opened {
        Some((Opened::Connected(opened), ticket)) => {
            let (socket, accepted) = *opened;
            let decoder = decoder_for(&shard, Wire::WebTransport);
            live(shard, socket, accepted, decoder, Some(ticket)).await;
        }
        Some((Opened::Resume(resuming), ticket)) => {
            let resuming = Resuming {
                ticket: Some(ticket),
                ..*resuming
            };
            Box::pin(resume::attach::resume(shard, resuming)).await;
        }
        None => {}
    }
}

/// A connection from `$connect` to `$disconnect`: registered with its shard, served until
/// it must end (parked in between if it is resumable and its socket drops), closed, and
/// reported. It holds its socket's place under the limits (`ticket`) until then.
pub(crate) async fn live(
    shard: Rc<Shard>,
    socket: Socket,
    accepted: Accepted,
    mut decoder: Decoder,
    ticket: Option<AdmissionTicket>,
) {
    let Accepted {
        id,
        facts,
        leftover,
        resume_refused,
        moved_in,
    } = accepted;
    let gateway = shard.gateway.clone();
    let limits = &gateway.config.limits;
    let wire = socket.wire();
    let queue = OutboundQueue::new(
        wire,
        limits.outbound_queue_frames,
        limits.outbound_queue_bytes,
    )
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
    let mut rooms = Vec::new();
    if let Some(config) = &gateway.config.api.resume {
        let token = ResumeToken::mint(id);
        let connection_id = &connection.facts.connection_id;
        let first = outbound::shared(match &moved_in {
            Some(moved) => protocol::resumed(connection_id, moved.frames.len(), &token),
            None => protocol::welcome(connection_id, &token, resume_refused),
        });
        connection
            .outbound()
            .borrow_mut()
            .push_unbounded(first.clone());
        connection.make_resumable(&token, config, limits.resumes_per_connection);
        if let Some(moved) = moved_in {
            connection.accept_earlier(moved.earlier, first);
            let mut queue = connection.outbound().borrow_mut();
            queue.continue_count_after(moved.received);
            for frame in moved.frames {
                queue.push_unbounded(outbound::shared(frame));
            }
            rooms = moved.rooms;
        }
    }
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
    // A moved connection's rooms first: calls that waited for it (a leave among them)
    // apply on top of them as it is registered.
    for room in &rooms {
        let _ = shard.join(&connection, room);
    }
    shard.register(connection.clone());
    if shard.shutdown.is_cancelled() {
        // Registered after the shutdown sweep: close like everyone else.
        connection.request_close(DisconnectReason::ServerShutdown);
    }
    let reason = serve_to_the_end(&shard, &connection, &mut decoder, leftover).await;

    shard.unregister(&connection);
    connection.admitted_as(None);
    gateway
        .metrics
        .connections_active
        .with_label_values(&[wire.label()])
        .dec();
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
    decoder: &mut Decoder,
    mut leftover: Vec<u8>,
) -> DisconnectReason {
    let metrics = &shard.gateway.metrics;
    loop {
        let reason = match serve(shard, connection, decoder, leftover).await {
            DisconnectReason::ConnectionLost => match &*connection.stream() {
                // QUIC knows more: the client may have closed the session with a code.
                Socket::WebTransport(session) => Box::pin(session.end_reason()).await,
                _ => DisconnectReason::ConnectionLost,
            },
            reason => reason,
        };
        // The paths below run once per connection (or per drop): boxed, so the state every
        // idle connection keeps is only what `serve` needs.
        let parks = matches!(
            reason,
            DisconnectReason::ConnectionLost | DisconnectReason::Superseded
        ) && connection.is_resumable()
            && !shard.shutdown.is_cancelled();
        if !parks {
            // A takeover that met the shutdown: the shutdown is what ended it.
            let reason = match reason {
                DisconnectReason::Superseded => DisconnectReason::ServerShutdown,
                reason => reason,
            };
            return Box::pin(close(connection, metrics, reason)).await;
        }
        match Box::pin(park(shard, connection)).await {
            Ok(more) => {
                leftover = more;
                *decoder = decoder_for(shard, connection.stream().wire());
            }
            Err(reason) => {
                // The socket is long gone: nothing to close, only to report.
                connection.begin_closing();
                return reason;
            }
        }
    }
}

/// Holds a resumable connection whose socket is gone until its client resumes (returns
/// the bytes that came after the new request head), or until it must end: its window ran
/// out, it was deleted, or what it held overflowed.
async fn park(shard: &Shard, connection: &Connection) -> Result<Vec<u8>, DisconnectReason> {
    let metrics = &shard.gateway.metrics;
    let window = shard
        .gateway
        .config
        .api
        .resume
        .as_ref()
        .map_or(Duration::ZERO, |config| config.window);
    let deadline = Instant::now() + window;
    connection.park();
    // The old socket may still be open (a takeover): its client hears the end of it.
    connection.stream().shutdown_write();
    metrics.connections_parked.inc();
    tracing::debug!(connection_id = %connection.facts.connection_id, "connection parked for a resume");
    let outcome = loop {
        if let Some(leftover) = connection.take_resumed() {
            break Ok(leftover);
        }
        // While a resume handshake runs, nothing ends the connection under it: a close
        // request (a DELETE, an overflow) waits, and is acted on by whichever session goes
        // on — the resumed one, or this one if the resume fails. The handshake wakes this
        // loop when it settles.
        let resuming = connection.is_resuming();
        if !resuming {
            if let Some(reason) = connection.take_close_request() {
                if let Some(refusal) = unresumable_because(&reason) {
                    shard.note_unresumable(connection, refusal);
                }
                break Err(reason);
            }
            if Instant::now() >= deadline {
                shard.note_unresumable(connection, Refusal::Expired);
                break Err(DisconnectReason::ResumeExpired);
            }
        }
        if resuming || Instant::now() >= deadline {
            connection.woken().await;
        } else {
            let _ = tokio::time::timeout_at(deadline, connection.woken()).await;
        }
    };
    metrics.connections_parked.dec();
    outcome
}

/// What a later resume of a connection that ended for `reason` while parked is told.
fn unresumable_because(reason: &DisconnectReason) -> Option<Refusal> {
    match reason {
        DisconnectReason::SlowConsumer | DisconnectReason::Overloaded => Some(Refusal::Overflow),
        DisconnectReason::IdleTimeout | DisconnectReason::MaxDuration => Some(Refusal::Expired),
        _ => None,
    }
}

/// What the WebSocket handshake opened.
enum Opened {
    Connected(Box<(Socket, Accepted)>),
    /// A client asking to resume: the resume handshake takes it from here.
    Resume(Box<Resuming>),
}

/// The TLS handshake (with `server.tls`), then the WebSocket handshake. Boxed so their
/// state (request headers, `$connect` call) is freed before the connection settles in for
/// hours: an idle connection keeps only what it needs.
async fn open(shard: &Rc<Shard>, mut stream: TcpStream, peer: SocketAddr) -> Option<Opened> {
    let (socket, upgrade) = match shard.gateway.config.server.tls.as_ref() {
        None => {
            let upgrade = Box::pin(read_upgrade(shard, &mut stream, peer)).await?;
            (Socket::Plain(stream), upgrade)
        }
        Some(tls) => {
            let timeout = shard.gateway.config.limits.handshake_timeout;
            let accepted = tokio::time::timeout(timeout, tls.acceptor().accept(stream)).await;
            let mut stream = match accepted {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    count_handshake(shard, "tls_error", Wire::WebSocket);
                    return None;
                }
                Err(_) => return None,
            };
            let upgrade = Box::pin(read_upgrade(shard, &mut stream, peer)).await?;
            let (tcp, tls) = stream.into_inner();
            (Socket::Tls(Box::new(TlsSocket::new(tcp, tls))), upgrade)
        }
    };
    if shard.gateway.config.api.resume.is_some()
        && let Some(resume) = ResumeRequest::from_request(&upgrade.request)
    {
        return Some(Opened::Resume(Resuming::websocket(
            socket, upgrade, resume, peer,
        )));
    }
    let handshake::UpgradeRequest {
        request,
        key,
        host,
        user_agent,
        leftover,
    } = upgrade;
    let answer = Answer::WebSocket {
        socket,
        key,
        leftover,
    };
    let (socket, accepted) = accept_new(shard, answer, peer, user_agent, host, &request).await?;
    Some(Opened::Connected(Box::new((socket, accepted))))
}

/// A connection that passed `$connect` and got its 101.
pub(crate) struct Accepted {
    pub(crate) id: ConnectionId,
    pub(crate) facts: ConnectionFacts,
    /// Bytes the client sent right after its request head.
    pub(crate) leftover: Vec<u8>,
    /// It asked to resume another connection and could not: the welcome says why.
    pub(crate) resume_refused: Option<Refusal>,
    /// Cluster mode: a connection whose client resumed here from another node.
    pub(crate) moved_in: Option<Box<resume::moving::MovedIn>>,
}

/// Counts a handshake's outcome in `switchboard_connections_total`.
pub(crate) fn count_handshake(shard: &Shard, result: &str, wire: Wire) {
    shard
        .gateway
        .metrics
        .connections_total
        .with_label_values(&[result, wire.label()])
        .inc();
}

/// A handshake `$connect` (or a check before it) refused: the status and body the client
/// gets, and the metric label.
pub(crate) struct Refused {
    pub(crate) status: u16,
    pub(crate) body: bytes::Bytes,
    pub(crate) result: &'static str,
}

/// Mints the connection's id and runs what decides whether it may open: the origin
/// allow-list, the authorizer and the `$connect` route. The same for every transport.
async fn connect(
    shard: &Rc<Shard>,
    peer: SocketAddr,
    user_agent: String,
    domain_name: String,
    request: &crate::event::HandshakeRequest,
) -> Result<(ConnectionId, ConnectionFacts, Option<String>), Refused> {
    let id = shard.ids.borrow_mut().connection_id();
    let mut facts = ConnectionFacts {
        connection_id: id.to_string(),
        connected_at_ms: clock::now_ms(),
        source_ip: peer.ip().to_string(),
        user_agent,
        domain_name,
        authorizer: None,
    };
    let protocol = admit(shard, &mut facts, request).await?;
    Ok((id, facts, protocol))
}

/// The origin allow-list, the authorizer (its context goes into `facts`) and the
/// `$connect` route, for a new connection or a resumed one. Returns the subprotocol
/// `$connect` chose.
pub(crate) async fn admit(
    shard: &Rc<Shard>,
    facts: &mut ConnectionFacts,
    request: &crate::event::HandshakeRequest,
) -> Result<Option<String>, Refused> {
    facts.authorizer = check_request(shard, facts, request).await?;
    run_connect(shard, facts, request).await
}

/// The origin allow-list and the authorizer: who the client is, or why it may not open a
/// connection. Calls no route, changes nothing.
pub(crate) async fn check_request(
    shard: &Rc<Shard>,
    facts: &ConnectionFacts,
    request: &crate::event::HandshakeRequest,
) -> Result<Option<std::sync::Arc<serde_json::value::RawValue>>, Refused> {
    admit_request(shard, facts, request)
        .await
        .map_err(|(status, body, result)| Refused {
            status,
            body: body.into(),
            result,
        })
}

/// The `$connect` route for `facts`; returns the subprotocol it chose.
pub(crate) async fn run_connect(
    shard: &Rc<Shard>,
    facts: &ConnectionFacts,
    request: &crate::event::HandshakeRequest,
) -> Result<Option<String>, Refused> {
    match dispatch::run_connect(shard, facts, request).await {
        ConnectOutcome::Accept { protocol } => Ok(protocol),
        ConnectOutcome::Reject {
            status,
            body,
            result,
        } => Err(Refused {
            status,
            body,
            result,
        }),
    }
}

/// Counts an opened connection: `accepted`, or `resumed` (moved from another node).
pub(crate) fn opened(shard: &Shard, facts: &ConnectionFacts, wire: Wire, result: &str) {
    count_handshake(shard, result, wire);
    shard
        .gateway
        .metrics
        .connections_active
        .with_label_values(&[wire.label()])
        .inc();
    tracing::debug!(connection_id = %facts.connection_id, transport = wire.label(), "connected");
}

/// Reads the upgrade request; a malformed one is answered here, and the client let go.
async fn read_upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    shard: &Shard,
    stream: &mut S,
    peer: SocketAddr,
) -> Option<handshake::UpgradeRequest> {
    let gateway = &shard.gateway;
    let limits = &gateway.config.limits;
    let read =
        handshake::read_upgrade(stream, &gateway.config.api.stage, limits.handshake_timeout).await;
    match read {
        Ok(upgrade) => Some(upgrade),
        Err(ReadError::Rejected(rejection)) => {
            count_handshake(shard, rejection.label(), Wire::WebSocket);
            let body = rejection.to_string();
            let response = handshake::error_response(rejection.status(), body.as_bytes());
            handshake::respond_and_close(stream, &response).await;
            None
        }
        Err(error) => {
            tracing::debug!(%peer, %error, "handshake abandoned");
            None
        }
    }
}

/// The WebTransport handshake: QUIC and HTTP/3 up to the session request, the admission
/// gate, the same checks and `$connect` as a WebSocket upgrade, then the client's
/// bidirectional stream. Refusals answer 404 (wrong path), 429 (the admission gate, or
/// `$connect` said 429) or 403 (anything else `$connect` or the authorizer refused): the
/// statuses WebTransport servers can send.
async fn open_webtransport(
    shard: &Rc<Shard>,
    incoming: wtransport::endpoint::IncomingSession,
    handshake: HandshakeSlot,
) -> Option<(Opened, AdmissionTicket)> {
    let gateway = &shard.gateway;
    let timeout = gateway.config.limits.handshake_timeout;
    // A dual-stack listener sees IPv4 clients as `::ffff:a.b.c.d`: limits and events
    // must see them as the IPv4 addresses they are.
    let address = incoming.remote_address();
    let peer = SocketAddr::new(address.ip().to_canonical(), address.port());
    let request = match tokio::time::timeout(timeout, incoming).await {
        Ok(Ok(request)) => request,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "WebTransport handshake failed");
            count_handshake(shard, "tls_error", Wire::WebTransport);
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "WebTransport handshake not completed in time");
            return None;
        }
    };
    drop(handshake);
    let ticket = match gateway
        .admission
        .admit(peer.ip(), std::time::Instant::now())
    {
        Ok(ticket) => ticket,
        Err(refusal) => {
            count_handshake(shard, refusal.label(), Wire::WebTransport);
            request.too_many_requests().await;
            return None;
        }
    };
    let (path, query) = request
        .path()
        .split_once('?')
        .unwrap_or((request.path(), ""));
    if path.strip_prefix('/').map(|p| p.trim_end_matches('/')) != Some(&gateway.config.api.stage) {
        count_handshake(shard, "not_found", Wire::WebTransport);
        request.not_found().await;
        return None;
    }
    let handshake_request = crate::event::HandshakeRequest {
        headers: webtransport_headers(&request),
        query: form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
        resumed: false,
    };
    let datagrams = handshake_request
        .query
        .iter()
        .any(|(name, value)| name == "datagrams" && value == "1");
    let user_agent = request.user_agent().unwrap_or_default().to_owned();
    let authority = request.authority().to_owned();
    let answer = Answer::WebTransport {
        request: Box::new(request),
        datagrams,
    };
    if gateway.config.api.resume.is_some()
        && let Some(resume) = ResumeRequest::from_request(&handshake_request)
    {
        let resuming = Resuming {
            answer,
            peer,
            request: handshake_request,
            user_agent,
            host: authority,
            resume,
            ticket: None,
        };
        return Some((Opened::Resume(Box::new(resuming)), ticket));
    }
    let opened = accept_new(
        shard,
        answer,
        peer,
        user_agent,
        authority,
        &handshake_request,
    )
    .await?;
    Some((Opened::Connected(Box::new(opened)), ticket))
}

/// A new connection from a handshake read but not answered: the checks and `$connect`,
/// then the answer. `None` if it was refused or the client left.
pub(crate) async fn accept_new(
    shard: &Rc<Shard>,
    answer: Answer,
    peer: SocketAddr,
    user_agent: String,
    host: String,
    request: &crate::event::HandshakeRequest,
) -> Option<(Socket, Accepted)> {
    let wire = answer.wire();
    let timeout = shard.gateway.config.limits.handshake_timeout;
    let (id, facts, protocol) = match connect(shard, peer, user_agent, host, request).await {
        Ok(connected) => connected,
        Err(refused) => {
            answer.refuse(shard, refused).await;
            return None;
        }
    };
    let Some((socket, leftover)) = answer.accept(protocol.as_deref(), timeout).await else {
        // `$connect` succeeded, so `$disconnect` is owed.
        dispatch::fire_disconnect(shard, facts, DisconnectReason::ConnectionLost);
        return None;
    };
    opened(shard, &facts, wire, "accepted");
    let accepted = Accepted {
        id,
        facts,
        leftover,
        resume_refused: None,
        moved_in: None,
    };
    Some((socket, accepted))
}

/// A handshake read but not answered yet, whichever the transport.
pub(crate) enum Answer {
    /// A WebSocket upgrade: its socket, its key, the bytes sent after the request head.
    WebSocket {
        socket: Socket,
        key: String,
        leftover: Vec<u8>,
    },
    /// A WebTransport session request; `datagrams` if it asked for them.
    WebTransport {
        request: Box<wtransport::endpoint::SessionRequest>,
        datagrams: bool,
    },
}

impl Answer {
    pub(crate) fn wire(&self) -> Wire {
        match self {
            Self::WebSocket { .. } => Wire::WebSocket,
            Self::WebTransport { .. } => Wire::WebTransport,
        }
    }

    /// Counts the handshake as `refused` says, answers with its status and body (a
    /// WebTransport session can only be told 429 or 403) and lets go of the client, which
    /// gets the handshake timeout to take the answer.
    pub(crate) async fn refuse(self, shard: &Shard, refused: Refused) {
        count_handshake(shard, refused.result, self.wire());
        let timeout = shard.gateway.config.limits.handshake_timeout;
        match self {
            Self::WebSocket { socket, .. } => {
                let response = handshake::error_response(refused.status, &refused.body);
                let _ = tokio::time::timeout(timeout, socket.write_all(&response)).await;
                socket.shutdown_write();
            }
            Self::WebTransport { request, .. } => match refused.status {
                429 => request.too_many_requests().await,
                _ => request.forbidden().await,
            },
        }
    }

    /// Accepts: the 101 (with `protocol`), or the session and its stream. Returns the
    /// socket and what the client sent after its request; `None` if it left.
    pub(crate) async fn accept(
        self,
        protocol: Option<&str>,
        timeout: Duration,
    ) -> Option<(Socket, Vec<u8>)> {
        match self {
            Self::WebSocket {
                socket,
                key,
                leftover,
            } => {
                let response = handshake::switching_protocols(&key, protocol);
                let written = tokio::time::timeout(timeout, socket.write_all(&response)).await;
                written.ok()?.ok()?;
                Some((socket, leftover))
            }
            Self::WebTransport { request, datagrams } => {
                let stream = async {
                    let session = request.accept().await?;
                    let (send, recv) = session.accept_bi().await?;
                    Ok::<_, wtransport::error::ConnectionError>(WebTransportSocket::new(
                        session, send, recv, datagrams,
                    ))
                };
                match tokio::time::timeout(timeout, stream).await {
                    Ok(Ok(socket)) => Some((Socket::WebTransport(Box::new(socket)), Vec::new())),
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "WebTransport session lost");
                        None
                    }
                    Err(_) => {
                        tracing::debug!("no WebTransport stream opened in time");
                        None
                    }
                }
            }
        }
    }
}

/// The session request's headers as `$connect` sees them: the regular ones sorted by
/// name, and the authority as `Host` (HTTP/3 carries it as `:authority`).
fn webtransport_headers(request: &wtransport::endpoint::SessionRequest) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .filter(|(name, _)| !name.starts_with(':'))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    headers.push(("host".into(), request.authority().to_owned()));
    headers.sort();
    headers
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
    if let Some(source) = authorizer.repeated_source(request) {
        return Err((
            400,
            format!("Bad Request: {source} appears more than once"),
            "bad_request",
        ));
    }
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
    decoder: &mut Decoder,
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
        if connection.take_superseded() {
            return DisconnectReason::Superseded;
        }
        let pending = match connection.flush(&shard.gateway.metrics) {
            Ok(pending) => pending,
            Err(_) => return DisconnectReason::ConnectionLost,
        };
        if !waiting.is_empty() && throttle.until.is_none() && can_take_work(connection) {
            // The flush made room: carry on with the waiting messages.
            continue;
        }
        if waiting.is_empty()
            && let Some(reason) = broken.take()
        {
            return reason;
        }
        let can_read = waiting.is_empty() && below_in_flight_limits(connection);
        if can_read && throttle.since.is_some() {
            // Everything read so far is handled: if the socket holds nothing more, the
            // client is not ahead of its limit any longer.
            match read_frames(&stream, decoder, &mut incoming) {
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
                match read_frames(&stream, decoder, &mut incoming) {
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
    decoder: &mut Decoder,
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
    let stream = connection.stream();
    let abandon_queue = matches!(
        reason,
        DisconnectReason::SlowConsumer | DisconnectReason::Overloaded
    );
    let deadline = Instant::now() + CLOSE_FLUSH;
    if let Socket::WebTransport(session) = &*stream {
        // The session's close carries the code and reason; queued messages go first.
        if abandon_queue {
            connection.outbound().borrow_mut().clear();
        }
        flush_until(connection, metrics, deadline).await;
        let grace = deadline.saturating_duration_since(Instant::now());
        session
            .close(reason.status_code(), &reason.description(), grace)
            .await;
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
        if abandon_queue {
            // Whatever it did not read is abandoned; only the verdict goes out.
            *queue = queue.replacement(Wire::WebSocket, 1, close_frame.len());
        }
        queue.push_unbounded(outbound::shared(close_frame));
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
