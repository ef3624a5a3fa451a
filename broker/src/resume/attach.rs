//! The resume handshake: a client came back with `?resume=TOKEN&received=N`.
//!
//! It runs on the shard that owns the connection the token names (a socket, or a
//! WebTransport session request, that reached another shard is handed over first, before
//! anything is answered). Nothing about the session changes until the newcomer has proven
//! all of it, in this order:
//!
//! 1. the token and the count are checked, without side effects (a bad count refuses the
//!    resume and leaves the session as it was);
//! 2. the origin check and the authorizer run on the new request, and the identity they
//!    establish must be the one the session was opened with (`principalId`, or the
//!    context's hash): a stolen token alone does not carry a session over to someone else;
//! 3. the session's own resume rate is charged (the address's was, before any work);
//! 4. `$connect` runs (with `requestContext.resumed = true`), and the token and count are
//!    checked once more (they may have been spent or outrun meanwhile).
//!
//! Only then is a socket that still looks alive (the client noticed the drop first) taken
//! over, the client answered (101, or the session accepted), and its socket attached to the
//! parked connection, which replays what its client missed under a new token. A refusal by
//! the authorizer or `$connect` answers the newcomer and leaves the session alone; anything
//! else that cannot be resumed becomes a new connection whose welcome frame says why.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use crate::connection::Connection;
use crate::disconnect::DisconnectReason;
use crate::outbound::Wire;
use crate::resume::handoff::Resuming;
use crate::resume::{Refusal, ResumeToken, forget_token};
use crate::session::admit::{self, Accepted};
use crate::session::live;
use crate::shard::Shard;

/// How long a resume waits for an old socket that still looked alive to let go.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(2);

/// Marks a connection as being resumed for as long as it lives.
pub(crate) struct ResumingGuard(pub(crate) Rc<Connection>);

impl Drop for ResumingGuard {
    fn drop(&mut self) {
        self.0.release();
    }
}

pub(crate) async fn resume_here(
    shard: Rc<Shard>,
    mut resuming: Resuming,
    token: &ResumeToken,
    received: u64,
) {
    let wire = resuming.answer.wire();
    let claimed = shard
        .resumable(token)
        .and_then(|connection| check_claim(connection, received, Some(wire)));
    let guard = match claimed {
        Ok(guard) => guard,
        Err(refusal) => return open_new(shard, resuming, refusal).await,
    };
    let connection = guard.0.clone();
    let metrics = &shard.gateway.metrics;
    if let Err(refused) = charge_resume(&shard, resuming.peer, None) {
        drop(guard);
        return refuse_newcomer(&shard, resuming, refused).await;
    }
    resuming.request.resumed = true;
    forget_token(&mut resuming.request);
    let facts = connection.facts.clone();
    let checked = admit::check_request(&shard, &facts, &resuming.request).await;
    let identity = match checked {
        Ok(context) => context,
        Err(refused) => {
            drop(guard);
            return refuse_newcomer(&shard, resuming, refused).await;
        }
    };
    if !same_principal(&facts, identity.as_deref()) {
        drop(guard);
        metrics.resumes.with_label_values(&["other_identity"]).inc();
        return open_new(shard, resuming, Refusal::Unknown).await;
    }
    // Charged to the session only now: someone else's attempts do not spend its resumes.
    if let Err(refused) = charge_resume(&shard, resuming.peer, Some(&connection)) {
        drop(guard);
        return refuse_newcomer(&shard, resuming, refused).await;
    }
    let protocol = match admit::run_connect(&shard, &facts, &resuming.request).await {
        Ok(protocol) => protocol,
        Err(refused) => {
            drop(guard);
            return refuse_newcomer(&shard, resuming, refused).await;
        }
    };
    // The authorizer and `$connect` took time: the token may have been spent meanwhile (the
    // frame with its successor written) or the count outrun. Checked again, still without
    // side effects, before anything is taken over.
    let still = shard
        .resumable(token)
        .is_ok_and(|found| Rc::ptr_eq(&found, &connection))
        && connection.can_rewind(received).is_ok();
    if !still {
        drop(guard);
        return open_new(shard, resuming, Refusal::Unknown).await;
    }
    if !connection.is_parked() && !take_over(&connection, TAKEOVER_TIMEOUT).await {
        drop(guard);
        return open_new(shard, resuming, Refusal::Unknown).await;
    }
    let timeout = shard.gateway.config.limits.handshake_timeout;
    let deflate = resuming.answer.deflate();
    let Some((socket, leftover)) = resuming.answer.accept(protocol.as_deref(), timeout).await
    else {
        // Lost again before the answer: the connection stays parked for another try.
        return;
    };
    match connection.attach(socket, deflate, received, leftover, token.secret) {
        Ok(replayed) => {
            // The connection's place under the limits is now its new socket's (which
            // may come from another address); the old one's is given back.
            if let Some(ticket) = resuming.ticket.take() {
                connection.admitted_as(Some(ticket));
            }
            metrics.resumes.with_label_values(&["resumed"]).inc();
            metrics.resume_replayed.inc_by(replayed as u64);
            admit::count_handshake(&shard, "resumed", wire);
            tracing::debug!(connection_id = %connection.facts.connection_id, replayed, "connection resumed");
        }
        Err(_) => {
            // It ended while `$connect` ran (it cannot: see `Lifecycle::poll_parked`), or what it
            // held no longer fits once its old socket let go: the client's new socket is
            // let go, and the connection ends.
            metrics.resumes.with_label_values(&["overflow"]).inc();
            connection.request_close(DisconnectReason::ResumeRefused);
        }
    }
    drop(guard);
}

/// Charges a resume to its client's address (`connection: None`, before any work) or to
/// its connection (once the client is known to be the session's): resumes that come too
/// fast are answered 429 and change nothing.
pub(crate) fn charge_resume(
    shard: &Shard,
    peer: SocketAddr,
    connection: Option<&Connection>,
) -> Result<(), admit::Refused> {
    let charged = match connection {
        None => shard
            .gateway
            .admission
            .admit_resume(peer.ip(), std::time::Instant::now()),
        Some(connection) if connection.take_resume() => Ok(()),
        Some(_) => Err(crate::limits::Refusal::ResumeRate),
    };
    charged.map_err(|refusal| admit::Refused {
        status: refusal.status(),
        body: format!("Too Many Requests: {refusal}").into(),
        result: refusal.label(),
    })
}

/// The authorizer, `$connect` or a resume rate refused the client that asked to resume: it
/// gets the refusal, and the session it named goes on as if it had never asked (the caller
/// lets go of its claim first).
pub(crate) async fn refuse_newcomer(
    shard: &Rc<Shard>,
    resuming: Resuming,
    refused: admit::Refused,
) {
    shard
        .gateway
        .metrics
        .resumes
        .with_label_values(&["refused"])
        .inc();
    admit::refuse(shard, resuming.answer, refused).await;
}

/// Whether the identity the new request established (`context`, the authorizer's) is the
/// one `facts` was opened with. Without an authorizer both are none and anyone holding the
/// token is its client.
pub(crate) fn same_principal(
    facts: &crate::event::ConnectionFacts,
    context: Option<&serde_json::value::RawValue>,
) -> bool {
    use crate::auth::authorizer::principal_of;
    principal_of(facts.authorizer.as_deref()) == principal_of(context)
}

/// Checks, without changing anything, that `connection` (found by a token) can resume for
/// a client that received `received` frames (over `wire`, if it must match), and marks it
/// as being resumed until the guard drops (its window does not run out meanwhile, and no
/// second resume runs at once). A count it cannot replay from is refused like any other
/// mismatch: the session stays as it was, for its real client.
pub(crate) fn check_claim(
    connection: Rc<Connection>,
    received: u64,
    wire: Option<Wire>,
) -> Result<ResumingGuard, Refusal> {
    // A session resumes over the transport it was opened with.
    if wire.is_some_and(|wire| connection.stream().wire() != wire) {
        return Err(Refusal::Unknown);
    }
    connection.claim().map_err(|_| Refusal::Unknown)?;
    let guard = ResumingGuard(connection);
    guard.0.can_rewind(received)?;
    Ok(guard)
}

/// [`check_claim`], then takes over a socket that still looks alive within `within`, and
/// checks the count again (frames written meanwhile may have left the resend buffer).
pub(crate) async fn claim(
    connection: Rc<Connection>,
    received: u64,
    wire: Option<Wire>,
    within: Duration,
) -> Result<ResumingGuard, Refusal> {
    let guard = check_claim(connection, received, wire)?;
    let connection = guard.0.clone();
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
    connection.let_go();
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
    forget_token(&mut resuming.request);
    let Resuming {
        answer,
        peer,
        request,
        user_agent,
        host,
        ticket,
        ..
    } = resuming;
    let opened = admit::accept_new(&shard, answer, peer, user_agent, host, &request).await;
    let Some((socket, accepted)) = opened else {
        return;
    };
    let accepted = Accepted {
        resume_refused: Some(refusal),
        ..accepted
    };
    live::live(shard, socket, accepted, ticket).await;
}
