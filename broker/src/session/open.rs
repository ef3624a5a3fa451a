//! The handshakes that open a connection: TLS and the WebSocket upgrade on a TCP
//! stream, or QUIC and the HTTP/3 session request for WebTransport; a request to resume
//! goes to [`crate::resume::attach`], any other through [`super::admit`] into
//! [`super::live`].

use std::net::SocketAddr;
use std::rc::Rc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::admit::{Accepted, accept_new, count_handshake};
use super::live::live;
use crate::handshake::{self, ReadError};
use crate::limits::AdmissionTicket;
use crate::outbound::Wire;
use crate::resume::handoff::Resuming;
use crate::resume::{self, ResumeRequest};
use crate::shard::Shard;
use crate::transport::answer::Answer;
use crate::transport::webtransport::HandshakeSlot;
use crate::transport::{Socket, TlsSocket};

/// Runs a WebSocket connection accepted by `shard` and admitted under `ticket`, which its
/// connection holds until it ends (a resume hands both to the connection it resumes).
pub async fn run(shard: Rc<Shard>, stream: TcpStream, peer: SocketAddr, ticket: AdmissionTicket) {
    let _ = stream.set_nodelay(true);
    // Boxed: the handshake state is gone before the connection settles in for hours.
    // A `let` of its own: a temporary in the `match` head would keep its storage in this
    // future for the whole connection.
    let opened = Box::pin(open(&shard, stream, peer)).await;
    match opened {
        Some(Opened::Connected(opened)) => {
            let (socket, accepted) = *opened;
            live(shard, socket, accepted, Some(ticket)).await;
        }
        Some(Opened::Resume(resuming)) => {
            let resuming = Resuming {
                ticket: Some(ticket),
                ..*resuming
            };
            Box::pin(resume::route::resume(shard, resuming)).await;
        }
        None => {}
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
            live(shard, socket, accepted, Some(ticket)).await;
        }
        Some((Opened::Resume(resuming), ticket)) => {
            let resuming = Resuming {
                ticket: Some(ticket),
                ..*resuming
            };
            Box::pin(resume::route::resume(shard, resuming)).await;
        }
        None => {}
    }
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
    let offers = handshake::extension_offers(&upgrade.request.headers);
    let compression = shard.gateway.config.server.compression;
    let deflate = compression.and_then(|deflate| deflate.negotiate(&offers));
    if shard.gateway.config.api.resume.is_some()
        && let Some(resume) = ResumeRequest::from_request(&upgrade.request)
    {
        return Some(Opened::Resume(Resuming::websocket(
            socket, upgrade, resume, peer, deflate,
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
        deflate,
    };
    let (socket, accepted) = accept_new(shard, answer, peer, user_agent, host, &request).await?;
    Some(Opened::Connected(Box::new((socket, accepted))))
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

/// What the WebSocket handshake opened.
enum Opened {
    Connected(Box<(Socket, Accepted)>),
    /// A client asking to resume: the resume handshake takes it from here.
    Resume(Box<Resuming>),
}
