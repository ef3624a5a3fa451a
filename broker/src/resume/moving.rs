//! Resume across cluster nodes: a client that comes back to another node takes its session
//! along.
//!
//! The new node runs the authorizer first, then asks the old one (over NATS, `Op::Move`)
//! for the connection, with the principal it found and a proof derived from the token's
//! secret (which never travels). The old node checks them as a local resume would, hands
//! over the facts, the rooms and every frame the client has not received, forgets the
//! connection without reporting it, and keeps a forwarding entry: pushes, GETs and DELETEs
//! addressed to the connectionId (which names the old node) reach the new home. The new
//! node runs `$connect` (`resumed`) and carries the connection on under a local alias, with
//! the same connectionId in every event; its `resumed` frame brings a new token. Before it
//! asks for the connection, the new node asks for its rooms (`Op::MoveRooms`) and listens to
//! them; from then until it has registered the connection, broadcasts to those rooms, and
//! calls the old node forwards once it has let go, wait on the new node's shard
//! (`shard/arrivals.rs`) and apply in order once it is there. A broadcast published while
//! the connection moves reaches the old node's queue or the new node's hold or both; the
//! old node says, by their stamps, which it had queued (`rooms::Brought`), and the new node
//! drops those copies: each arrives once. In a room that numbers its messages the old node
//! says instead the newest offset the connection had there (`MovedOut::standing`): the new
//! node drops what is at or below it, and mends a gap above it from the room's history
//! (`shard/numbered.rs`), such as a broadcast that reached neither node because the new
//! node's interest had not yet reached the NATS server it was published through. The old
//! node hands over only well within the asking node's request timeout (or not at all), and
//! never while a DELETE or an overflow is pending; then it asks the new node whether the
//! connection arrived (the answer may have been lost on the way) and reports the end of one
//! that did not. A forwarding entry lasts as long as the connection could.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;

use crate::auth::authorizer::principal_of;
use crate::cluster::remote::Op;
use crate::cluster::{Cluster, MoveOutcome};
use crate::connection::{Connection, Earlier};
use crate::connection_id::ConnectionId;
use crate::disconnect::DisconnectReason;
use crate::message::Message;
use crate::resume::attach::{charge_resume, claim, open_new, refuse_newcomer};
use crate::resume::forget_token;
use crate::resume::handoff::Resuming;
use crate::resume::moved::{MoveRequest, MovedIn, MovedOut};
use crate::resume::{Refusal, ResumeToken, SecretHash};
use crate::rooms::RoomName;
use crate::session::admit::{self, Accepted};
use crate::session::live;
use crate::shard::Shard;

/// On the old node, on the shard that owns connection `id`: checks the request as a local
/// resume would, then lets go of the connection (`DisconnectReason::Moved`: no
/// `$disconnect`) and returns what it carries.
pub(crate) async fn move_out(
    shard: Rc<Shard>,
    id: ConnectionId,
    request: MoveRequest,
) -> Result<MovedOut, Refusal> {
    let alias: ConnectionId = request.alias.parse().map_err(|_| Refusal::Unknown)?;
    let (Some(cluster), Some(config)) = (
        shard.gateway.cluster.clone(),
        shard.gateway.config.api.resume.as_ref(),
    ) else {
        return Err(Refusal::Unknown);
    };
    let connection = proven(&shard, id, &request)?;
    if !connection.take_resume() {
        // Resumed too often lately: it stays here.
        return Err(Refusal::Unknown);
    }
    if alias.node == cluster.node_id {
        // A connection moves to another node, never onto this one's ids.
        return Err(Refusal::Unknown);
    }
    // Where the asking node will file it, as it is now: anything filed there later is
    // from this stay (the connection may have been on that node's run before).
    let connection_id = &connection.facts.connection_id;
    let subject = (cluster.subjects).mirror_record(alias.node, alias.epoch, connection_id);
    let filed_before = cluster.mirror_sequence(&subject).await;
    // The asking node gives up after `cluster.request_timeout_ms`: hand over only well
    // within it (counting from when it asked), or the connection would be forgotten here
    // with no one carrying it on.
    // (A wait longer than the asker's whole timeout is clocks that disagree, not a wait.)
    let timeout = cluster.config.request_timeout;
    let waited = request
        .sent_at_ms
        .map(|sent| Duration::from_millis(crate::clock::now_ms().saturating_sub(sent)))
        .filter(|waited| *waited <= timeout)
        .unwrap_or_default();
    let budget = (timeout / 2).saturating_sub(waited);
    if budget.is_zero() {
        return Err(Refusal::Unknown);
    }
    let deadline = std::time::Instant::now() + budget;
    let guard = claim(connection, request.received, None, budget).await?;
    let connection = guard.0.clone();
    if std::time::Instant::now() >= deadline || connection.close_requested() {
        // Too late to answer in time, or a DELETE (or an overflow) came first: it stays
        // here, and that close takes effect once this attempt lets go.
        return Err(Refusal::Unknown);
    }
    // The tokens that resume it, taken before the queue changes (a token whose `resumed`
    // frame is still queued counts, and the client may hold it).
    let secret_hashes = connection.secret_hashes();
    let frames = {
        // Checked by `claim`, with nothing in between that could change it.
        let mut queue = connection.outbound().borrow_mut();
        queue.rewind(request.received)?;
        queue.take_frames()
    };
    let api = crate::event::ApiFacts {
        stage: &shard.gateway.config.api.stage,
        api_id: &shard.gateway.config.api.id,
    };
    let facts = crate::stored_event::context(api, &connection.facts);
    let rooms = shard.rooms_of(&connection);
    // Taken with the frames (nothing in between yields): what the new node holds beyond
    // this is what its client has not had.
    let brought = shard.brought(&rooms);
    let standing = shard.standing(connection.id.sequence, &rooms);
    let lifetime_left = connection.lifetime_left();
    let until = std::time::Instant::now() + lifetime_left + config.window;
    cluster.note_moved(&connection.id.to_string(), alias, until);
    connection.request_close(DisconnectReason::Moved);
    drop(guard);
    // Until the asking node says the connection arrived, this node answers for its end.
    let settle = settle_handover(
        shard.clone(),
        cluster.clone(),
        connection.facts.clone(),
        (alias, filed_before),
    );
    shard.tasks.spawn_local(settle);
    crate::crash::reached(crate::crash::Point::MoveHandedOver);
    Ok(MovedOut {
        facts: String::from_utf8_lossy(&facts).into_owned(),
        rooms: rooms.iter().map(|room| room.as_str().to_owned()).collect(),
        frames: (frames.iter())
            .map(|message| STANDARD.encode(message.to_portable()))
            .collect(),
        lifetime_left_ms: Some(u64::try_from(lifetime_left.as_millis()).unwrap_or(u64::MAX)),
        secret_hashes: secret_hashes
            .iter()
            .map(|hash| STANDARD.encode(hash))
            .collect(),
        ids: (connection.earlier_ids().iter())
            .chain([&connection.id])
            .map(ConnectionId::to_string)
            .collect(),
        handled: connection.handled(),
        brought,
        standing,
    })
}

/// Connection `id`, if `request` proves a token of it and comes from the identity it was
/// opened with. One that ended says how (asked by a client whose token is from before it
/// moved here, through the node it left: perhaps from this very node).
fn proven(
    shard: &Shard,
    id: ConnectionId,
    request: &MoveRequest,
) -> Result<Rc<Connection>, Refusal> {
    let Some(proof) = decode_hash(&request.proof) else {
        return Err(Refusal::Unknown);
    };
    let connection = shard.resumable_by(id, |hash| {
        crate::resume::same_hash(&crate::resume::move_proof(hash, &request.alias), &proof)
    })?;
    if principal_of(connection.facts.authorizer.as_deref()) != request.principal {
        // A token, but someone else's identity: not theirs to take.
        return Err(Refusal::Unknown);
    }
    Ok(connection)
}

/// On the old node: the rooms of connection `id`, for the node its client resumed on,
/// which listens to them before it asks for the connection. Changes nothing.
pub(crate) fn rooms_for_move(
    shard: &Shard,
    id: ConnectionId,
    request: &MoveRequest,
) -> Result<Vec<String>, Refusal> {
    let connection = proven(shard, id, request)?;
    let rooms = shard.rooms_of(&connection);
    Ok(rooms.iter().map(|room| room.as_str().to_owned()).collect())
}

/// On the new node: asks the old node for the connection `token` names and carries it on
/// here, or opens a new connection that says why not.
///
/// It listens to the connection's rooms first, and holds their broadcasts for it, before
/// the old node takes the frames it has not sent: a broadcast published while the
/// connection moves then reaches one node or both, never neither. The old node says which
/// it had queued ([`MovedOut::brought`]), and those copies are dropped here.
pub(crate) async fn move_in(
    shard: Rc<Shard>,
    mut resuming: Resuming,
    token: ResumeToken,
    received: u64,
    cluster: Arc<Cluster>,
) {
    if let Err(refused) = charge_resume(&shard, resuming.peer, None) {
        return refuse_newcomer(&shard, resuming, refused).await;
    }
    resuming.request.resumed = true;
    forget_token(&mut resuming.request);
    // Who the client is, before anything moves: the old node hands the connection over
    // only to the identity it was opened with, and a refusal leaves it where it is.
    let asking = provisional_facts(&resuming, &token);
    let principal = match admit::check_request(&shard, &asking, &resuming.request).await {
        Ok(context) => principal_of(context.as_deref()),
        Err(refused) => return refuse_newcomer(&shard, resuming, refused).await,
    };
    let alias = shard.ids.borrow_mut().connection_id();
    // Calls the old node forwards once it has let go wait here until the connection is
    // registered, instead of finding it gone.
    let arrival = shard.expect(alias.sequence);
    let rooms = ask_rooms(&cluster, &token, alias, principal.clone()).await;
    shard.expect_rooms(alias.sequence, &rooms, Default::default());
    for room in &rooms {
        cluster.room_ready(room).await;
    }
    cluster.note_move(alias, MoveOutcome::Pending);
    let asked = ask_for(&cluster, &token, received, alias, principal).await;
    // What the old node will ask: whether the connection arrived (an unreadable one did:
    // it is reported here).
    let arrived = !matches!(asked, Err(MoveFailure::Refused(_)));
    cluster.note_move(
        alias,
        if arrived {
            MoveOutcome::Taken
        } else {
            MoveOutcome::Abandoned
        },
    );
    let moved = match asked {
        Ok(moved) => {
            crate::crash::reached(crate::crash::Point::MoveTaken);
            moved
        }
        Err(failure) => {
            drop(arrival);
            return match failure {
                MoveFailure::Refused(refusal) => open_new(shard, resuming, refusal).await,
                MoveFailure::Unreadable => handed_over_unreadable(shard, resuming, &token).await,
            };
        }
    };
    let Ok(facts) = crate::stored_event::decode_facts(moved.facts.as_bytes()) else {
        drop(arrival);
        return handed_over_unreadable(shard, resuming, &token).await;
    };
    // Backends know it by the id it was opened with (a broadcast's `exclude`), its client's
    // tokens by the ids it had on the nodes it left.
    let earlier_ids: Vec<ConnectionId> =
        moved.ids.iter().filter_map(|id| id.parse().ok()).collect();
    let original = facts.connection_id.parse().ok();
    let known: Vec<ConnectionId> = (earlier_ids.iter().copied())
        .chain(original)
        .chain([token.id])
        .collect();
    let _known_here = KnownHere::new(&cluster, known, alias);
    let frames: Vec<Message> = (moved.frames.iter())
        .filter_map(|frame| STANDARD.decode(frame).ok())
        .filter_map(|portable| Message::from_portable(portable.into()))
        .collect();
    let rooms: Vec<RoomName> = moved
        .rooms
        .iter()
        .filter_map(|room| RoomName::parse(room).ok())
        .collect();
    let standing = (moved.standing.iter())
        .filter_map(|(room, position)| Some((RoomName::parse(room).ok()?, *position)))
        .collect();
    shard.expect_rooms(alias.sequence, &rooms, (moved.brought.clone(), standing));
    // From here on this node owns the connection: whatever happens, it reports its end.
    // (Its events keep the authorizer context it was opened with, as on one node.)
    let metrics = &shard.gateway.metrics;
    let wire = resuming.answer.wire();
    let deflate = resuming.answer.deflate();
    let timeout = shard.gateway.config.limits.handshake_timeout;
    let protocol = match admit::run_connect(&shard, &facts, &resuming.request).await {
        Ok(protocol) => protocol,
        Err(refused) => {
            drop(arrival);
            metrics.resumes.with_label_values(&["refused"]).inc();
            crate::dispatch::fire_disconnect(&shard, facts, DisconnectReason::ResumeRefused);
            admit::refuse(&shard, resuming.answer, refused).await;
            return;
        }
    };
    let Some((socket, leftover)) = resuming.answer.accept(protocol.as_deref(), timeout).await
    else {
        drop(arrival);
        crate::dispatch::fire_disconnect(&shard, facts, DisconnectReason::ConnectionLost);
        return;
    };
    metrics.resumes.with_label_values(&["resumed"]).inc();
    metrics.resume_replayed.inc_by(frames.len() as u64);
    admit::opened(&shard, &facts, wire, "resumed");
    tracing::debug!(connection_id = %facts.connection_id, from = token.id.node, "connection resumed from another node");
    let accepted = Accepted {
        id: alias,
        facts,
        leftover,
        resume_refused: None,
        moved_in: Some(Box::new(MovedIn {
            received,
            handled: moved.handled,
            frames,
            rooms,
            lifetime_left: moved.lifetime_left_ms.map(std::time::Duration::from_millis),
            earlier: Earlier {
                ids: earlier_ids,
                secret_hashes: (moved.secret_hashes.iter())
                    .filter_map(|hash| decode_hash(hash))
                    .collect(),
                frame: None,
            },
        })),
        deflate,
    };
    // Registering the connection ends the arrival: what waited for it applies then.
    let _arrival = arrival;
    live::live(shard, socket, accepted, resuming.ticket).await;
}

/// On the node that handed a connection over: asks the node that asked for it whether it
/// arrived, until it says. The answer travelled over NATS and may have been lost (this
/// node could not publish it, or the asking node gave up first): then that node opened a
/// new connection for its client and this one is reported here, with its `$disconnect`,
/// once. A node that does not answer for twice `cluster.node_timeout_ms` is taken for lost:
/// the connection is its takeover's to report if that node had mirrored it, and this node's
/// otherwise.
async fn settle_handover(
    shard: Rc<Shard>,
    cluster: Arc<Cluster>,
    facts: crate::event::ConnectionFacts,
    (alias, filed_before): (ConnectionId, Result<Option<u64>, String>),
) {
    let patience = cluster.config.node_timeout * 2;
    let started = std::time::Instant::now();
    let alias_text = alias.to_string();
    loop {
        // Stopping: one last question, answered or not (the shard waits for this task).
        let stopping = tokio::select! {
            _ = shard.shutdown.cancelled() => true,
            _ = tokio::time::sleep(cluster.config.request_timeout) => false,
        };
        let answer = cluster
            .call(alias.node, Op::MoveStatus, &alias_text, None, Bytes::new())
            .await;
        let said = answer
            .ok()
            .filter(|reply| reply.status == 200)
            .map(|reply| reply.body);
        let arrived = match said.as_deref() {
            Some(b"taken") => true,
            Some(b"abandoned") => false,
            Some(b"pending") if !stopping => continue,
            Some(b"pending") => true,
            // No answer, or a node that does not remember asking (it restarted): if it
            // stays that way, its mirror tells.
            _ if !stopping && started.elapsed() < patience => continue,
            _ => mirrored_there(&cluster, alias, &facts.connection_id, filed_before).await,
        };
        if !arrived {
            tracing::warn!(connection_id = %facts.connection_id, to = alias.node, "a connection handed to another node never arrived; reporting it here");
            // A tombstone where that node would have filed it: if it did keep it locally
            // and restarts, it does not report it again.
            let subject =
                (cluster.subjects).mirror_record(alias.node, alias.epoch, &facts.connection_id);
            cluster.mark_reported(subject).await;
            crate::dispatch::fire_disconnect(&shard, facts, DisconnectReason::MoveLost);
        }
        return;
    }
}

/// Whether the incarnation of node `alias.node` that asked for connection `connection_id`
/// (as `alias`) filed it in the mirror after `filed_before` (what was filed there when it
/// was handed over): then its takeover reports it, or has (and left a tombstone), or it
/// closed there and was reported then. (Cannot tell: yes, rather than report it twice.)
async fn mirrored_there(
    cluster: &Cluster,
    alias: ConnectionId,
    connection_id: &str,
    filed_before: Result<Option<u64>, String>,
) -> bool {
    let subject = (cluster.subjects).mirror_record(alias.node, alias.epoch, connection_id);
    match (filed_before, cluster.mirror_sequence(&subject).await) {
        (Ok(before), Ok(now)) => now > before,
        _ => true,
    }
}

/// While it lives, this node knows a connection that moved here by the ids it had before.
struct KnownHere {
    cluster: Arc<Cluster>,
    earlier: Vec<ConnectionId>,
    alias: ConnectionId,
}

impl KnownHere {
    fn new(cluster: &Arc<Cluster>, earlier: Vec<ConnectionId>, alias: ConnectionId) -> Self {
        for id in &earlier {
            cluster.note_arrived(*id, alias);
        }
        Self {
            cluster: cluster.clone(),
            earlier,
            alias,
        }
    }
}

impl Drop for KnownHere {
    fn drop(&mut self) {
        for id in &self.earlier {
            self.cluster.note_departed(*id, self.alias);
        }
    }
}

/// A hash as sent between nodes (base64).
fn decode_hash(text: &str) -> Option<SecretHash> {
    let mut hash = SecretHash::default();
    (STANDARD.decode_slice(text, &mut hash) == Ok(hash.len())).then_some(hash)
}

/// Why the old node did not hand a connection over.
enum MoveFailure {
    /// It said no (or is gone): the client gets a new connection that says why.
    Refused(Refusal),
    /// It handed it over in a form this node cannot read.
    Unreadable,
}

/// Asks the old node for the connection `token` names, to live on here as `alias`.
/// What the new node sends the old one, for the connection `token` names, as `alias`.
fn move_request(
    token: &ResumeToken,
    received: u64,
    alias: ConnectionId,
    principal: Option<String>,
) -> Bytes {
    let alias = alias.to_string();
    let proof = crate::resume::move_proof(&crate::resume::hash_secret(&token.secret), &alias);
    let request = MoveRequest {
        proof: STANDARD.encode(proof),
        principal,
        received,
        alias,
        sent_at_ms: Some(crate::clock::now_ms()),
    };
    Bytes::from(serde_json::to_vec(&request).unwrap_or_default())
}

/// The rooms of the connection `token` names (none if the old node will not say: the
/// move itself then fails too, or the rooms come with it).
async fn ask_rooms(
    cluster: &Cluster,
    token: &ResumeToken,
    alias: ConnectionId,
    principal: Option<String>,
) -> Vec<RoomName> {
    let body = move_request(token, 0, alias, principal);
    let id = token.id.to_string();
    let reply = cluster.call(token.id.node, Op::MoveRooms, &id, None, body);
    let Ok(reply) = reply.await else {
        return Vec::new();
    };
    let names: Vec<String> = match reply.status {
        200 => serde_json::from_slice(&reply.body).unwrap_or_default(),
        _ => Vec::new(),
    };
    names
        .iter()
        .filter_map(|name| RoomName::parse(name).ok())
        .collect()
}

async fn ask_for(
    cluster: &Cluster,
    token: &ResumeToken,
    received: u64,
    alias: ConnectionId,
    principal: Option<String>,
) -> Result<MovedOut, MoveFailure> {
    let body = move_request(token, received, alias, principal);
    let reply = cluster
        .call(token.id.node, Op::Move, &token.id.to_string(), None, body)
        .await
        // The old node is gone: its connections are reported by the survivors.
        .map_err(|_| MoveFailure::Refused(Refusal::Unknown))?;
    if reply.status != 200 {
        return Err(MoveFailure::Refused(match &reply.body[..] {
            b"expired" => Refusal::Expired,
            b"overflow" => Refusal::Overflow,
            _ => Refusal::Unknown,
        }));
    }
    serde_json::from_slice(&reply.body).map_err(|_| MoveFailure::Unreadable)
}

/// The facts of a client asking to move its connection here, before the old node has
/// handed over the real ones: what the authorizer sees.
fn provisional_facts(resuming: &Resuming, token: &ResumeToken) -> crate::event::ConnectionFacts {
    crate::event::ConnectionFacts {
        connection_id: token.id.to_string(),
        connected_at_ms: crate::clock::now_ms(),
        source_ip: resuming.peer.ip().to_string(),
        user_agent: resuming.user_agent.clone(),
        domain_name: resuming.host.clone(),
        authorizer: None,
    }
}

/// The old node handed a connection over in a form this node cannot read (nodes of
/// different versions): it is reported ended here, and the client gets a new connection.
async fn handed_over_unreadable(shard: Rc<Shard>, resuming: Resuming, token: &ResumeToken) {
    tracing::error!(connection_id = %token.id, "a connection moved from another node does not decode");
    let facts = provisional_facts(&resuming, token);
    crate::dispatch::fire_disconnect(&shard, facts, DisconnectReason::ResumeRefused);
    open_new(shard, resuming, Refusal::Unknown).await;
}
