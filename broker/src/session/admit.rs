//! What decides whether a client may open a connection, the same for every transport:
//! the origin allow-list, the `[authorizer]` and the `$connect` route; and what a refused
//! client is told.

use crate::fence::Fence;
use std::net::SocketAddr;
use std::rc::Rc;

use crate::auth::authorizer::{Decision, Verdict};
use crate::clock;
use crate::connection_id::ConnectionId;
use crate::disconnect::DisconnectReason;
use crate::dispatch::{self, ConnectOutcome};
use crate::event::ConnectionFacts;
use crate::outbound::Wire;
use crate::resume::{self, Refusal};
use crate::shard::Shard;
use crate::transport::Socket;
use crate::transport::answer::Answer;

/// A connection that passed `$connect` and got its 101.
pub(crate) struct Accepted {
    pub(crate) id: ConnectionId,
    pub(crate) facts: ConnectionFacts,
    /// Bytes the client sent right after its request head.
    pub(crate) leftover: Vec<u8>,
    /// It asked to resume another connection and could not: the welcome says why.
    pub(crate) resume_refused: Option<Refusal>,
    /// Cluster mode: a connection whose client resumed here from another node.
    pub(crate) moved_in: Option<Box<resume::moved::MovedIn>>,
    /// permessage-deflate, as the answer agreed.
    pub(crate) deflate: Option<crate::compression::Deflate>,
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
/// The connection is recorded before `$connect` runs, and forgotten again if it refuses.
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
    facts.authorizer = check_request(shard, &facts, request).await?;
    wait_for_lease(shard).await?;
    if let Err(refused) = record_before_connect(shard, &facts).await {
        forget_unopened(shard, &facts);
        return Err(refused);
    }
    match run_connect(shard, &facts, request).await {
        Ok(protocol) => Ok((id, facts, protocol)),
        Err(refused) => {
            forget_unopened(shard, &facts);
            Err(refused)
        }
    }
}

/// What the record log keeps of an open connection.
pub(crate) fn stored_record(facts: &ConnectionFacts) -> switchboard_storage::ConnectionRecord {
    switchboard_storage::ConnectionRecord {
        connection_id: facts.connection_id.clone(),
        connected_at_ms: facts.connected_at_ms,
        last_active_at_ms: facts.connected_at_ms,
        source_ip: facts.source_ip.clone(),
        user_agent: facts.user_agent.clone(),
    }
}

/// A backend that heard `$connect` must hear `$disconnect` once, even if this node dies the
/// next moment. So before `$connect` runs, the connection's record is in the record log
/// (written, not yet synced: a restart on the same data dir reports it) and, in cluster
/// mode, acked by the mirror (the node that takes this one over reports it). Connects
/// share the writes: the record log's one per shard turn, the mirror's one flush.
async fn record_before_connect(shard: &Shard, facts: &ConnectionFacts) -> Result<(), Refused> {
    let (told, written) = tokio::sync::oneshot::channel();
    shard.record(|changes| {
        changes.upsert(stored_record(facts));
        changes.when_written(Box::new(move |result| {
            let _ = told.send(result);
        }));
    });
    let gateway = &shard.gateway;
    let written = tokio::time::timeout(Fence::PATIENCE, written);
    let mirrored = gateway.directory.opening(facts, Fence::PATIENCE);
    let (written, mirrored) = tokio::join!(written, mirrored);
    let why = match written {
        Ok(Ok(Ok(()))) if !mirrored => "the cluster's record mirror did not answer",
        // It answered after the lease ran out: a takeover may have listed this node's
        // records without this one.
        Ok(Ok(Ok(()))) if !gateway.fence.holds() => "this node's cluster lease ran out",
        Ok(Ok(Ok(()))) => return Ok(()),
        Ok(Ok(Err(error))) => &format!("the record log cannot be written: {error}"),
        Ok(Err(_)) => "the record writer stopped",
        Err(_) => "the record log is not keeping up",
    };
    tracing::warn!(connection_id = %facts.connection_id, why, "connection refused: not recorded");
    Err(Refused {
        status: 503,
        body: format!("this node cannot record the connection ({why}); try again").into(),
        result: "unrecorded",
    })
}

/// A connection recorded for `$connect` that did not open: its records go, unreported.
fn forget_unopened(shard: &Shard, facts: &ConnectionFacts) {
    shard.gateway.directory.closed(&facts.connection_id);
    let id = facts.connection_id.clone();
    shard.record(|changes| changes.remove(id));
}

/// A node whose cluster lease is out (paused, or cut off from NATS) may have been declared
/// lost: it opens no connection until it knows, so that no `$connect` runs for a node
/// the cluster counts out. It waits [`Fence::PATIENCE`]; past that, the client is told to
/// go elsewhere.
async fn wait_for_lease(shard: &Shard) -> Result<(), Refused> {
    if shard.gateway.fence.held_within(Fence::PATIENCE).await {
        return Ok(());
    }
    Err(Refused {
        status: 503,
        body: "this node is not in touch with its cluster; try another node".into(),
        result: "fenced",
    })
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
        ConnectOutcome::Accept { protocol } => {
            crate::crash::reached(crate::crash::Point::ConnectAccepted);
            Ok(protocol)
        }
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

/// Counts the handshake as `refused` says and answers the client with its status and
/// body.
pub(crate) async fn refuse(shard: &Shard, answer: Answer, refused: Refused) {
    count_handshake(shard, refused.result, answer.wire());
    let timeout = shard.gateway.config.limits.handshake_timeout;
    answer.refuse(refused.status, &refused.body, timeout).await;
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
    let (wire, deflate) = (answer.wire(), answer.deflate());
    let timeout = shard.gateway.config.limits.handshake_timeout;
    let (id, facts, protocol) = match connect(shard, peer, user_agent, host, request).await {
        Ok(connected) => connected,
        Err(refused) => {
            refuse(shard, answer, refused).await;
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
        deflate,
    };
    Some((socket, accepted))
}
