//! A shard: one OS thread with a single-threaded tokio runtime that owns its connections
//! from accept to `$disconnect`.
//!
//! Each shard accepts on its own SO_REUSEPORT socket. Everything it owns (the connection
//! table, the id minter, the HTTP client pool) is touched only by its thread; the
//! management API reaches a connection by sending a [`ShardCommand`] to the shard that the
//! connectionId names.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection::{Connection, ConnectionInfo, Gone};
use crate::connection_id::{ConnectionId, IdMinter};
use crate::disconnect::DisconnectReason;
use crate::gateway::Gateway;
use crate::integration::HttpIntegration;
use crate::session;

/// Commands waiting for a shard beyond this make the sender wait (backpressure on the
/// management API, never unbounded memory).
const COMMAND_QUEUE: usize = 4096;
/// How long shutdown waits for sessions to close and `$disconnect` calls to finish;
/// what remains is reported as "gateway restarted" at the next start.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);
/// Pause after a failed accept (EMFILE and friends) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Work sent to a shard from outside its thread.
enum ShardCommand {
    Send {
        sequence: u64,
        frame: Bytes,
        reply: oneshot::Sender<Result<(), Gone>>,
    },
    Disconnect {
        sequence: u64,
        reply: oneshot::Sender<Result<(), Gone>>,
    },
    Describe {
        sequence: u64,
        reply: oneshot::Sender<Result<ConnectionInfo, Gone>>,
    },
}

/// How other threads talk to a shard.
#[derive(Clone)]
pub struct ShardHandle {
    commands: mpsc::Sender<ShardCommand>,
}

impl ShardHandle {
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, Gone>>) -> ShardCommand,
    ) -> Result<T, Gone> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(command(reply)).await.map_err(|_| Gone)?;
        answer.await.unwrap_or(Err(Gone))
    }

    /// Queues `frame` to connection `id` on this shard.
    pub async fn send(&self, id: ConnectionId, frame: Bytes) -> Result<(), Gone> {
        self.ask(|reply| ShardCommand::Send {
            sequence: id.sequence,
            frame,
            reply,
        })
        .await
    }

    /// Closes connection `id` (`DELETE @connections`).
    pub async fn disconnect(&self, id: ConnectionId) -> Result<(), Gone> {
        self.ask(|reply| ShardCommand::Disconnect {
            sequence: id.sequence,
            reply,
        })
        .await
    }

    /// Reads connection `id`'s status (`GET @connections`).
    pub async fn describe(&self, id: ConnectionId) -> Result<ConnectionInfo, Gone> {
        self.ask(|reply| ShardCommand::Describe {
            sequence: id.sequence,
            reply,
        })
        .await
    }
}

/// The shard's own state, shared by its tasks through `Rc`.
pub struct Shard {
    pub index: u16,
    pub gateway: Arc<Gateway>,
    pub ids: RefCell<IdMinter>,
    /// Open connections by sequence number (the rest of the id is the shard's own).
    connections: RefCell<HashMap<u64, Rc<Connection>>>,
    pub http: HttpIntegration,
    /// Every session and every `$disconnect` call, so shutdown can wait for them.
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
}

impl Shard {
    pub fn register(&self, connection: Rc<Connection>) {
        self.connections
            .borrow_mut()
            .insert(connection.id.sequence, connection);
    }

    pub fn unregister(&self, id: ConnectionId) {
        self.connections.borrow_mut().remove(&id.sequence);
    }

    fn connection(&self, sequence: u64) -> Result<Rc<Connection>, Gone> {
        self.connections
            .borrow()
            .get(&sequence)
            .cloned()
            .ok_or(Gone)
    }

    fn apply(&self, command: ShardCommand) {
        match command {
            ShardCommand::Send {
                sequence,
                frame,
                reply,
            } => {
                let result = self
                    .connection(sequence)
                    .and_then(|c| c.push(frame, &self.gateway.metrics));
                let _ = reply.send(result);
            }
            ShardCommand::Disconnect { sequence, reply } => {
                let result = self
                    .connection(sequence)
                    .map(|c| c.request_close(DisconnectReason::Deleted));
                let _ = reply.send(result);
            }
            ShardCommand::Describe { sequence, reply } => {
                let _ = reply.send(self.connection(sequence).map(|c| c.info()));
            }
        }
    }
}

/// Starts shard `index` on its own thread, accepting on `listener`.
pub fn spawn(
    index: u16,
    listener: std::net::TcpListener,
    gateway: Arc<Gateway>,
    shutdown: CancellationToken,
) -> std::io::Result<(ShardHandle, std::thread::JoinHandle<()>)> {
    let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    listener.set_nonblocking(true)?;
    let thread = std::thread::Builder::new()
        .name(format!("switchboard-shard-{index}"))
        .spawn(move || {
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                let shard = Rc::new(Shard {
                    index,
                    ids: RefCell::new(IdMinter::new(
                        gateway.config.server.node_id,
                        index,
                        gateway.epoch,
                    )),
                    gateway,
                    connections: RefCell::new(HashMap::new()),
                    http: HttpIntegration::new(),
                    tasks: TaskTracker::new(),
                    shutdown,
                });
                run(shard, listener, receiver).await;
            });
        })?;
    Ok((ShardHandle { commands }, thread))
}

async fn run(
    shard: Rc<Shard>,
    listener: std::net::TcpListener,
    mut commands: mpsc::Receiver<ShardCommand>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(shard = shard.index, %error, "cannot register listener");
            return;
        }
    };
    let command_loop = {
        let shard = shard.clone();
        async move {
            while let Some(command) = commands.recv().await {
                shard.apply(command);
            }
        }
    };
    let command_task = tokio::task::spawn_local(command_loop);
    loop {
        tokio::select! {
            _ = shard.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let session = session::run(shard.clone(), stream, peer);
                    shard.tasks.spawn_local(session);
                }
                Err(error) => {
                    tracing::warn!(shard = shard.index, %error, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }
    drop(listener);
    // Sessions see the same cancellation, close with 1001 and fire `$disconnect`.
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
    tracing::debug!(shard = shard.index, "shard stopped");
}
