//! The resume handshake: a client came back with `?resume=TOKEN&received=N`.
//!
//! It runs on the shard that owns the connection the token names (a socket, or a
//! WebTransport session request, that reached another shard is handed over first, before
//! anything is answered): the token and the count are checked, the authorizer and `$connect`
//! run again (with `requestContext.resumed = true`), the client is answered (101, or the
//! session accepted) and its socket is attached to the parked connection, which replays
//! what its client missed. A connection whose old socket still looks alive (the client
//! noticed the drop first) is parked on the spot. Anything that cannot be resumed becomes a
//! new connection whose welcome frame says why.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use crate::connection::Connection;
use crate::disconnect::DisconnectReason;
use crate::event::HandshakeRequest;
use crate::handshake::UpgradeRequest;
use crate::limits::AdmissionTicket;
use crate::outbound::Wire;
use crate::resume::{Refusal, ResumeRequest, ResumeToken};
use crate::session::{self, Accepted, Answer};
use crate::shard::Shard;
use crate::transport::{SendableSocket, Socket};

/// How long a resume waits for an old socket that still looked alive to let go.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(2);

/// A handshake that asks to resume, not answered yet.
pub struct Resuming {
    pub(crate) answer: Answer,
    pub(crate) peer: SocketAddr,
    /// Headers and query, as `$connect` sees them.
    pub(crate) request: HandshakeRequest,
    pub(crate) user_agent: String,
    pub(crate) host: String,
    pub(crate) resume: ResumeRequest,
    /// The admission of the new socket: kept if it becomes a new connection.
    pub(crate) ticket: Option<AdmissionTicket>,
}

impl Resuming {
    /// A WebSocket upgrade request that asks to resume.
    pub(crate) fn websocket(
        socket: Socket,
        upgrade: UpgradeRequest,
        resume: ResumeRequest,
        peer: SocketAddr,
    ) -> Box<Self> {
        Box::new(Self {
            answer: Answer::WebSocket {
                socket,
                key: upgrade.key,
                leftover: upgrade.leftover,
            },
            peer,
            request: upgrade.request,
            user_agent: upgrade.user_agent,
            host: upgrade.host,
            resume,
            ticket: None,
        })
    }
}

/// A resume on its way to the shard that owns its connection.
pub struct Handoff {
    answer: SendableAnswer,
    peer: SocketAddr,
    request: HandshakeRequest,
    user_agent: String,
    host: String,
    resume: ResumeRequest,
    ticket: Option<AdmissionTicket>,
}

/// An [`Answer`] as it can cross threads: a TCP or TLS socket deregistered from its
/// runtime, or the WebTransport session request as it is.
enum SendableAnswer {
    WebSocket {
        socket: SendableSocket,
        key: String,
        leftover: Vec<u8>,
    },
    WebTransport {
        request: Box<wtransport::endpoint::SessionRequest>,
        datagrams: bool,
    },
}

impl SendableAnswer {
    fn of(answer: Answer) -> Option<Self> {
        Some(match answer {
            Answer::WebSocket {
                socket,
                key,
                leftover,
            } => Self::WebSocket {
                socket: socket.into_sendable()?,
                key,
                leftover,
            },
            Answer::WebTransport { request, datagrams } => {
                Self::WebTransport { request, datagrams }
            }
        })
    }

    fn into_answer(self) -> std::io::Result<Answer> {
        Ok(match self {
            Self::WebSocket {
                socket,
                key,
                leftover,
            } => Answer::WebSocket {
                socket: socket.into_socket()?,
                key,
                leftover,
            },
            Self::WebTransport { request, datagrams } => {
                Answer::WebTransport { request, datagrams }
            }
        })
    }
}

/// Resumes the connection `resuming` names, or opens a new one that says why not.
pub(crate) async fn resume(shard: Rc<Shard>, resuming: Resuming) {
    let (token, received) = match &resuming.resume {
        ResumeRequest::Resume { token, received } => (token.clone(), *received),
        ResumeRequest::Malformed => return open_new(shard, resuming, Refusal::Unknown).await,
    };
    let gateway = &shard.gateway;
    let token = where_it_lives(gateway.cluster.as_deref(), token);
    if token.id.node != gateway.config.server.node_id {
        // Another node's: in a cluster, the session moves here.
        return match gateway.cluster.clone() {
            Some(cluster) => {
                Box::pin(super::moving::move_in(
                    shard, resuming, token, received, cluster,
                ))
                .await
            }
            None => open_new(shard, resuming, Refusal::Unknown).await,
        };
    }
    if token.id.epoch != gateway.epoch {
        // From before a restart: nothing here to resume.
        return open_new(shard, resuming, Refusal::Unknown).await;
    }
    if token.id.shard != shard.index {
        let Some(owner) = gateway.shards.get(usize::from(token.id.shard)).cloned() else {
            return open_new(shard, resuming, Refusal::Unknown).await;
        };
        let Resuming {
            answer,
            peer,
            request,
            user_agent,
            host,
            resume,
            ticket,
        } = resuming;
        if let Some(answer) = SendableAnswer::of(answer) {
            let handoff = Handoff {
                answer,
                peer,
                request,
                user_agent,
                host,
                resume,
                ticket,
            };
            owner.adopt_resume(handoff).await;
        }
        return;
    }
    resume_here(shard, resuming, &token, received).await;
}

/// `token` naming its connection by the id it has now, if this node knows it moved: here
/// (the token is from before the move that brought it, and names the node it left) or away
/// from here (the token is from this node; the session lives on elsewhere).
fn where_it_lives(cluster: Option<&crate::cluster::Cluster>, token: ResumeToken) -> ResumeToken {
    let Some(cluster) = cluster else {
        return token;
    };
    let here = cluster.here_as(token.id);
    let id = cluster.moved_to(&here.to_string()).unwrap_or(here);
    ResumeToken { id, ..token }
}

/// Continues a resume another shard handed over.
pub(crate) async fn adopt(shard: Rc<Shard>, handoff: Handoff) {
    let Ok(answer) = handoff.answer.into_answer() else {
        return;
    };
    let resuming = Resuming {
        answer,
        peer: handoff.peer,
        request: handoff.request,
        user_agent: handoff.user_agent,
        host: handoff.host,
        resume: handoff.resume,
        ticket: handoff.ticket,
    };
    Box::pin(resume(shard, resuming)).await;
}

/// Marks a connection as being resumed for as long as it lives.
pub(crate) struct ResumingGuard(pub(crate) Rc<Connection>);

impl Drop for ResumingGuard {
    fn drop(&mut self) {
        self.0.set_resuming(false);
    }
}

async fn resume_here(shard: Rc<Shard>, mut resuming: Resuming, token: &ResumeToken, received: u64) {
    let wire = Some(resuming.answer.wire());
    let guard = match claim(&shard, token, received, wire, TAKEOVER_TIMEOUT).await {
        Ok(guard) => guard,
        Err(refusal) => return open_new(shard, resuming, refusal).await,
    };
    let connection = guard.0.clone();
    let metrics = &shard.gateway.metrics;
    let wire = resuming.answer.wire();
    resuming.request.resumed = true;
    forget_token(&mut resuming.request.query);
    let mut facts = connection.facts.clone();
    let timeout = shard.gateway.config.limits.handshake_timeout;
    let protocol = match session::admit(&shard, &mut facts, &resuming.request).await {
        Ok(protocol) => protocol,
        Err(refused) => {
            metrics.resumes.with_label_values(&["refused"]).inc();
            connection.request_close(DisconnectReason::ResumeRefused);
            // The connection ends now, whatever the client does with the answer.
            drop(guard);
            resuming.answer.refuse(&shard, refused).await;
            return;
        }
    };
    let Some((socket, leftover)) = resuming.answer.accept(protocol.as_deref(), timeout).await
    else {
        // Lost again before the answer: the connection stays parked for another try.
        return;
    };
    match connection.attach(socket, received, leftover) {
        Ok(replayed) => {
            // The connection's place under the limits is now its new socket's (which
            // may come from another address); the old one's is given back.
            if let Some(ticket) = resuming.ticket.take() {
                connection.admitted_as(Some(ticket));
            }
            metrics.resumes.with_label_values(&["resumed"]).inc();
            metrics.resume_replayed.inc_by(replayed as u64);
            session::count_handshake(&shard, "resumed", wire);
            tracing::debug!(connection_id = %connection.facts.connection_id, replayed, "connection resumed");
        }
        Err(_) => {
            // It ended while `$connect` ran (it cannot: see `session::park`), or what it
            // held no longer fits: the client's new socket is let go, and the connection
            // ends.
            metrics.resumes.with_label_values(&["overflow"]).inc();
            connection.request_close(DisconnectReason::ResumeRefused);
        }
    }
    drop(guard);
}

/// Claims the connection `token` names for a client that received `received` frames
/// (over `wire`, if it must match): marked as being resumed until the guard drops, parked
/// (a socket that still looks alive is taken over within `within`), and able to replay
/// from the count. Otherwise why not; a count it cannot replay from ends it, since its
/// client gave up on it.
pub(crate) async fn claim(
    shard: &Shard,
    token: &ResumeToken,
    received: u64,
    wire: Option<Wire>,
    within: Duration,
) -> Result<ResumingGuard, Refusal> {
    let connection = shard.resumable(token)?;
    // A session resumes over the transport it was opened with.
    if connection.is_resuming() || wire.is_some_and(|wire| connection.stream().wire() != wire) {
        return Err(Refusal::Unknown);
    }
    connection.set_resuming(true);
    let guard = ResumingGuard(connection.clone());
    if !connection.is_parked() && !take_over(&connection, within).await {
        return Err(Refusal::Unknown);
    }
    if let Err(error) = connection.can_rewind(received) {
        connection.request_close(DisconnectReason::ResumeRefused);
        return Err(error.into());
    }
    Ok(guard)
}

/// Parks a connection whose old socket still looks alive; false if it did not park in
/// time (it ended instead, or is stuck).
pub(crate) async fn take_over(connection: &Connection, within: Duration) -> bool {
    connection.supersede();
    let deadline = tokio::time::Instant::now() + within;
    while !connection.is_parked() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// A new connection for a client whose resume did not happen; its welcome says why.
pub(crate) async fn open_new(shard: Rc<Shard>, mut resuming: Resuming, refusal: Refusal) {
    shard
        .gateway
        .metrics
        .resumes
        .with_label_values(&[refusal.as_str()])
        .inc();
    forget_token(&mut resuming.request.query);
    let Resuming {
        answer,
        peer,
        request,
        user_agent,
        host,
        ticket,
        ..
    } = resuming;
    let wire = answer.wire();
    let opened = session::accept_new(&shard, answer, peer, user_agent, host, &request).await;
    let Some((socket, accepted)) = opened else {
        return;
    };
    let accepted = Accepted {
        resume_refused: Some(refusal),
        ..accepted
    };
    let decoder = session::decoder_for(&shard, wire);
    session::live(shard, socket, accepted, decoder, ticket).await;
}

/// The token is a secret: backends see that a client resumed, not its token.
pub(crate) fn forget_token(query: &mut Vec<(String, String)>) {
    query.retain(|(name, _)| name != "resume");
}
