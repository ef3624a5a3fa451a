//! A shard's thread: its runtime, its accept loop, and the loop that applies the commands
//! in its mailbox, writes what fan-out queued and sweeps its connections' timers. The top
//! of the shard: it starts the sessions ([`crate::session`]) and resumes
//! ([`crate::resume`]) that the shard's state ([`super::Shard`]) knows nothing of.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use switchboard_storage::RecordChanges;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Shard;
use super::handle::{ShardCommand, ShardInbox, StartCommand};
use crate::connection_id::{ConnectionId, IdMinter};
use crate::gateway::Gateway;
use crate::handshake;
use crate::integration::HttpIntegration;
use crate::limits::Refusal;
use crate::outbound::Wire;
use crate::resume;
use crate::rooms::RoomIndex;
use crate::session;

/// Connections written per write pass before the shard looks at its commands again.
const WRITE_PASS_BUDGET: usize = 32;

/// Applies one command from the shard's mailbox.
fn apply(shard: &Rc<Shard>, command: ShardCommand) {
    let command = match command {
        ShardCommand::State(command) => return shard.apply(command),
        ShardCommand::Start(command) => command,
    };
    match command {
        StartCommand::AdoptWebTransport {
            incoming,
            handshake,
        } => {
            let session = session::run_webtransport(shard.clone(), *incoming, handshake);
            shard.tasks.spawn_local(session);
        }
        StartCommand::MoveRooms {
            sequence,
            request,
            reply,
        } => {
            let id = own_id(shard, sequence);
            let _ = reply.send(resume::moving::rooms_for_move(shard, id, &request));
        }
        StartCommand::MoveOut {
            sequence,
            request,
            reply,
        } => {
            let id = own_id(shard, sequence);
            let owner = shard.clone();
            shard.tasks.spawn_local(async move {
                let moved = resume::moving::move_out(owner, id, request).await;
                let _ = reply.send(moved);
            });
        }
        StartCommand::AdoptResume(handoff) => {
            shard
                .tasks
                .spawn_local(resume::route::adopt(shard.clone(), *handoff));
        }
    }
}

/// The id of this shard's connection `sequence`.
fn own_id(shard: &Shard, sequence: u64) -> ConnectionId {
    ConnectionId {
        node: shard.gateway.config.server.node_id,
        shard: shard.index,
        epoch: shard.gateway.epoch,
        sequence,
    }
}

/// Starts shard `index` on its own thread, accepting on `listener`.
pub fn spawn(
    index: u16,
    listener: std::net::TcpListener,
    inbox: ShardInbox,
    gateway: Arc<Gateway>,
    shutdown: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    listener.set_nonblocking(true)?;
    let thread = std::thread::Builder::new()
        .name(format!("switchboard-shard-{index}"))
        .spawn(move || {
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                let account = Rc::new(crate::limits::ShardAccount::new(
                    gateway.outbound_budget.clone(),
                ));
                let shard = Rc::new(Shard {
                    index,
                    ids: RefCell::new(IdMinter::new(
                        gateway.config.server.node_id,
                        index,
                        gateway.epoch,
                    )),
                    gateway,
                    connections: RefCell::new(HashMap::new()),
                    rooms: RefCell::new(RoomIndex::default()),
                    waiting: RefCell::default(),
                    dirty: RefCell::new(VecDeque::new()),
                    work_needed: Notify::new(),
                    account,
                    records: RefCell::new(RecordChanges::default()),
                    refusals_answering: std::cell::Cell::new(0),
                    pending_appends: RefCell::new(Vec::new()),
                    unresumable: RefCell::default(),
                    arriving: RefCell::default(),
                    stamps_seen: RefCell::default(),
                    http: HttpIntegration::new(),
                    tasks: TaskTracker::new(),
                    shutdown,
                });
                run(shard, listener, inbox.0).await;
            });
        })?;
    Ok(thread)
}

/// Applies commands and runs the fan-out write passes, interleaved: a pass writes a bounded
/// number of connections, then commands that arrived meanwhile are applied (their frames
/// join the writes still to come), then sessions get a turn. A publisher waiting for
/// `{"delivered": N}` is answered within one bounded pass, and frames that pile up while
/// the shard writes leave together, in one write per connection.
async fn run_commands(shard: Rc<Shard>, mut commands: mpsc::Receiver<ShardCommand>) {
    loop {
        for _ in 0..COMMANDS_PER_TURN {
            match commands.try_recv() {
                Ok(command) => apply(&shard, command),
                Err(_) => break,
            }
        }
        shard.hand_off_records();
        if shard.write_pass(WRITE_PASS_BUDGET) || !commands.is_empty() {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            command = commands.recv() => match command {
                Some(command) => apply(&shard, command),
                None => return,
            },
            _ = shard.work_needed.notified() => {}
        }
    }
}

/// Answers a socket the admission gate turned away (503 or 429) without reading its
/// request, unless too many are being answered already.
fn refuse(shard: &Rc<Shard>, stream: tokio::net::TcpStream, refusal: Refusal) {
    shard
        .gateway
        .metrics
        .connections_total
        .with_label_values(&[refusal.label(), Wire::WebSocket.label()])
        .inc();
    let answering = shard.refusals_answering.get();
    if answering >= MAX_REFUSALS_ANSWERING {
        return; // dropped: the socket closes now
    }
    shard.refusals_answering.set(answering + 1);
    let shard = shard.clone();
    shard.clone().tasks.spawn_local(async move {
        let response = handshake::error_response(refusal.status(), refusal.to_string().as_bytes());
        handshake::refuse_and_close(stream, &response).await;
        shard
            .refusals_answering
            .set(shard.refusals_answering.get().saturating_sub(1));
    });
}

/// The admission gate for a socket from client `peer`, then its session.
fn admit(shard: &Rc<Shard>, stream: tokio::net::TcpStream, peer: std::net::SocketAddr) {
    match shard
        .gateway
        .admission
        .admit(peer.ip(), std::time::Instant::now())
    {
        Ok(ticket) => {
            let session = session::run(shard.clone(), stream, peer, ticket);
            shard.tasks.spawn_local(session);
        }
        Err(refusal) => refuse(shard, stream, refusal),
    }
}

/// A socket from a trusted proxy: its PROXY protocol header names the client, who is then
/// admitted as if it had connected itself. A proxy that sends none is let go.
async fn accept_proxied(
    shard: Rc<Shard>,
    mut stream: tokio::net::TcpStream,
    proxy: std::net::SocketAddr,
) {
    let timeout = shard.gateway.config.limits.handshake_timeout;
    match tokio::time::timeout(timeout, read_proxy_header(&mut stream)).await {
        Ok(Ok(client)) => admit(&shard, stream, client.unwrap_or(proxy)),
        Ok(Err(error)) => {
            tracing::debug!(%proxy, %error, "connection from a trusted proxy refused");
            shard
                .gateway
                .metrics
                .connections_total
                .with_label_values(&["bad_request", Wire::WebSocket.label()])
                .inc();
        }
        Err(_) => tracing::debug!(%proxy, "no PROXY protocol header in time"),
    }
}

/// Reads a PROXY protocol v2 header: the client it names, if any.
async fn read_proxy_header(
    stream: &mut tokio::net::TcpStream,
) -> std::io::Result<Option<std::net::SocketAddr>> {
    use crate::transport::proxy_protocol::{FIXED_LEN, client_address, decode_fixed};
    use tokio::io::AsyncReadExt;
    let invalid = |error| std::io::Error::new(std::io::ErrorKind::InvalidData, error);
    let mut fixed = [0u8; FIXED_LEN];
    stream.read_exact(&mut fixed).await?;
    let fixed = decode_fixed(&fixed).map_err(invalid)?;
    let mut body = vec![0u8; fixed.body_len];
    stream.read_exact(&mut body).await?;
    client_address(fixed, &body).map_err(invalid)
}

async fn run(
    shard: Rc<Shard>,
    listener: std::net::TcpListener,
    commands: mpsc::Receiver<ShardCommand>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(shard = shard.index, %error, "cannot register listener");
            return;
        }
    };
    let command_task = tokio::task::spawn_local(run_commands(shard.clone(), commands));
    let sweep = {
        let shard = shard.clone();
        async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                shard.sweep();
            }
        }
    };
    let sweep_task = tokio::task::spawn_local(sweep);
    loop {
        tokio::select! {
            _ = shard.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let proxies = &shard.gateway.config.server.trusted_proxies;
                    if proxies.iter().any(|proxy| proxy.contains(peer.ip())) {
                        shard.tasks.spawn_local(accept_proxied(shard.clone(), stream, peer));
                    } else {
                        admit(&shard, stream, peer);
                    }
                }
                Err(error) => {
                    tracing::warn!(shard = shard.index, %error, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }
    drop(listener);
    sweep_task.abort();
    // Sessions close with 1001 and fire `$disconnect`; the tracker waits for both.
    shard.close_all();
    shard.tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, shard.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            shard = shard.index,
            "sessions still closing after {SHUTDOWN_GRACE:?}; abandoning them"
        );
    }
    command_task.abort();
    // What the sessions and `$disconnect` calls changed last; waiting for the writer is
    // fine now that the shard has nothing else to do.
    let changes = std::mem::take(&mut *shard.records.borrow_mut());
    shard.gateway.records.apply(changes);
    tracing::debug!(shard = shard.index, "shard stopped");
}

/// Commands applied per turn before writing.
const COMMANDS_PER_TURN: usize = 256;

/// How often a shard checks its connections' idle and age limits. Sessions poll no timers
/// of their own, which keeps a wake-up (one per fan-out batch) cheap and an idle
/// connection small.
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);

/// How long shutdown waits for sessions to close and `$disconnect` calls to finish;
/// what remains is reported as "gateway restarted" at the next start.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// Pause after a failed accept (EMFILE and friends) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Refused sockets being answered at once; past this a refused socket is closed with no
/// answer, so a flood of refusals cannot itself use up descriptors.
const MAX_REFUSALS_ANSWERING: usize = 64;
