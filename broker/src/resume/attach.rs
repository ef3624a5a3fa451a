//! The resume handshake: a client came back with `?resume=TOKEN&received=N`.
//!
//! It runs on the shard that owns the connection the token names (a socket the kernel gave
//! to another shard is handed over first, before anything is answered): the token and the
//! count are checked, the authorizer and `$connect` run again (with
//! `requestContext.resumed = true`), the 101 goes out and the socket is attached to the
//! parked connection, which replays what its client missed. A connection whose old socket
//! still looks alive (the client noticed the drop first) is parked on the spot. Anything
//! that cannot be resumed becomes a new connection whose welcome frame says why.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use crate::connection::Connection;
use crate::disconnect::DisconnectReason;
use crate::handshake::{self, UpgradeRequest};
use crate::limits::AdmissionTicket;
use crate::outbound::{RewindError, Wire};
use crate::resume::{Refusal, ResumeRequest, ResumeToken};
use crate::session::{self, Accepted};
use crate::shard::Shard;
use crate::transport::{SendableSocket, Socket};

/// How long a resume waits for an old socket that still looked alive to let go.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(2);

/// A socket whose upgrade request asks to resume, not answered yet.
pub struct Resuming {
    pub socket: Socket,
    pub peer: SocketAddr,
    pub upgrade: UpgradeRequest,
    pub request: ResumeRequest,
    /// The admission of the new socket: kept if it becomes a new connection.
    pub ticket: Option<AdmissionTicket>,
}

impl Resuming {
    pub(crate) fn new(
        socket: Socket,
        upgrade: UpgradeRequest,
        request: ResumeRequest,
        peer: SocketAddr,
    ) -> Box<Self> {
        Box::new(Self {
            socket,
            peer,
            upgrade,
            request,
            ticket: None,
        })
    }
}

/// A resume on its way to the shard that owns its connection.
pub struct Handoff {
    socket: SendableSocket,
    peer: SocketAddr,
    upgrade: UpgradeRequest,
    request: ResumeRequest,
    ticket: Option<AdmissionTicket>,
}

/// Resumes the connection `resuming` names, or opens a new one that says why not.
pub(crate) async fn resume(shard: Rc<Shard>, resuming: Resuming) {
    let (token, received) = match &resuming.request {
        ResumeRequest::Resume { token, received } => (token.clone(), *received),
        ResumeRequest::Malformed => return open_new(shard, resuming, Refusal::Unknown).await,
    };
    let gateway = &shard.gateway;
    if token.id.node != gateway.config.server.node_id || token.id.epoch != gateway.epoch {
        // Another node's, or from before a restart: nothing here to resume.
        return open_new(shard, resuming, Refusal::Unknown).await;
    }
    if token.id.shard != shard.index {
        let Some(owner) = gateway.shards.get(usize::from(token.id.shard)).cloned() else {
            return open_new(shard, resuming, Refusal::Unknown).await;
        };
        let Resuming {
            socket,
            peer,
            upgrade,
            request,
            ticket,
        } = resuming;
        if let Some(socket) = socket.into_sendable() {
            let handoff = Handoff {
                socket,
                peer,
                upgrade,
                request,
                ticket,
            };
            owner.adopt_resume(handoff).await;
        }
        return;
    }
    resume_here(shard, resuming, &token, received).await;
}

/// Continues a resume another shard handed over.
pub(crate) async fn adopt(shard: Rc<Shard>, handoff: Handoff) {
    let Ok(socket) = handoff.socket.into_socket() else {
        return;
    };
    let resuming = Resuming {
        socket,
        peer: handoff.peer,
        upgrade: handoff.upgrade,
        request: handoff.request,
        ticket: handoff.ticket,
    };
    Box::pin(resume(shard, resuming)).await;
}

/// Marks a connection as being resumed for as long as it lives.
struct ResumingGuard(Rc<Connection>);

impl Drop for ResumingGuard {
    fn drop(&mut self) {
        self.0.set_resuming(false);
    }
}

async fn resume_here(shard: Rc<Shard>, mut resuming: Resuming, token: &ResumeToken, received: u64) {
    let connection = match shard.resumable(token) {
        Ok(connection) if !connection.is_resuming() => connection,
        Ok(_) => return open_new(shard, resuming, Refusal::Unknown).await,
        Err(refusal) => return open_new(shard, resuming, refusal).await,
    };
    connection.set_resuming(true);
    let guard = ResumingGuard(connection.clone());
    if !connection.is_parked() && !take_over(&connection).await {
        drop(guard);
        return open_new(shard, resuming, Refusal::Unknown).await;
    }
    if let Err(error) = connection.can_rewind(received) {
        // The client gave up on this connection: it ends, and the new one says why.
        connection.request_close(DisconnectReason::ResumeRefused);
        drop(guard);
        let refusal = match error {
            RewindError::NeverSent => Refusal::Unknown,
            RewindError::NotKept => Refusal::Overflow,
        };
        return open_new(shard, resuming, refusal).await;
    }
    let metrics = &shard.gateway.metrics;
    let mut request = std::mem::take(&mut resuming.upgrade.request);
    request.resumed = true;
    forget_token(&mut request.query);
    let mut facts = connection.facts.clone();
    let protocol = match session::admit(&shard, &mut facts, &request).await {
        Ok(protocol) => protocol,
        Err(refused) => {
            metrics.resumes.with_label_values(&["refused"]).inc();
            session::count_handshake(&shard, refused.result, Wire::WebSocket);
            connection.request_close(DisconnectReason::ResumeRefused);
            let response = handshake::error_response(refused.status, &refused.body);
            answer_and_close(&resuming.socket, &response).await;
            return;
        }
    };
    let response = handshake::switching_protocols(&resuming.upgrade.key, protocol.as_deref());
    if resuming.socket.write_all(&response).await.is_err() {
        // Lost again before the 101: the connection stays parked for another try.
        return;
    }
    let leftover = std::mem::take(&mut resuming.upgrade.leftover);
    match connection.attach(resuming.socket, received, leftover) {
        Ok(replayed) => {
            metrics.resumes.with_label_values(&["resumed"]).inc();
            metrics.resume_replayed.inc_by(replayed as u64);
            session::count_handshake(&shard, "resumed", Wire::WebSocket);
            tracing::debug!(connection_id = %connection.facts.connection_id, replayed, "connection resumed");
        }
        Err(_) => {
            // What it held overflowed while `$connect` ran: it cannot be resumed any more.
            metrics.resumes.with_label_values(&["overflow"]).inc();
            connection.request_close(DisconnectReason::ResumeRefused);
        }
    }
    drop(guard);
}

/// Parks a connection whose old socket still looks alive; false if it did not park in
/// time (it ended instead, or is stuck).
async fn take_over(connection: &Connection) -> bool {
    connection.request_close(DisconnectReason::Superseded);
    let deadline = tokio::time::Instant::now() + TAKEOVER_TIMEOUT;
    while !connection.is_parked() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// A new connection for a client whose resume did not happen; its welcome says why.
async fn open_new(shard: Rc<Shard>, mut resuming: Resuming, refusal: Refusal) {
    shard
        .gateway
        .metrics
        .resumes
        .with_label_values(&[refusal.as_str()])
        .inc();
    forget_token(&mut resuming.upgrade.request.query);
    let (id, facts, response) =
        match session::decide(&shard, resuming.peer, &resuming.upgrade).await {
            Ok(decided) => decided,
            Err(response) => return answer_and_close(&resuming.socket, &response).await,
        };
    if resuming.socket.write_all(&response).await.is_err() {
        crate::dispatch::fire_disconnect(&shard, facts, DisconnectReason::ConnectionLost);
        return;
    }
    session::opened(&shard, &facts, Wire::WebSocket);
    let accepted = Accepted {
        id,
        facts,
        leftover: std::mem::take(&mut resuming.upgrade.leftover),
        resume_refused: Some(refusal),
    };
    let decoder = session::websocket_decoder(&shard);
    session::live(shard, resuming.socket, accepted, decoder).await;
    drop(resuming.ticket);
}

/// The token is a secret: backends see that a client resumed, not its token.
fn forget_token(query: &mut Vec<(String, String)>) {
    query.retain(|(name, _)| name != "resume");
}

async fn answer_and_close(socket: &Socket, response: &[u8]) {
    let _ = socket.write_all(response).await;
    socket.shutdown_write();
}
