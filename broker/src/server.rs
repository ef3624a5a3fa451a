//! Wiring: bind the sockets, open storage, start the shards and the management API, and
//! stop them all in order on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use switchboard_storage::{ConnectionRecord, Storage, StorageError};
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::config::Config;
use crate::directory::Directory;
use crate::gateway::Gateway;
use crate::integration::HttpIntegration;
use crate::limits::{Admission, OutboundBudget};
use crate::management::{self, ApiState};
use crate::metrics::Metrics;
use crate::queues::store::QueueStore;
use crate::queues::{self, QueueHub};
use crate::rooms::sequencer::Sequencer;
use crate::shard;
use crate::transport::webtransport;

/// Pending connections the kernel queues per listening socket.
const LISTEN_BACKLOG: i32 = 4096;
/// How long shutdown waits for QUIC connections to finish closing.
const ENDPOINT_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(
        "the open-files limit ({open_files}) leaves no room for clients after server.fd_reserve \
         ({reserve}); raise the limit (ulimit -n, systemd LimitNOFILE) or lower the reserve"
    )]
    NoFileDescriptors { open_files: u64, reserve: usize },
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The OS error is part of the message (printed once).
    #[error("cannot listen on {address} ({key}): {reason}")]
    Bind {
        key: &'static str,
        address: SocketAddr,
        reason: std::io::Error,
    },
    #[error("cannot start {what}: {reason}")]
    Start {
        what: &'static str,
        reason: std::io::Error,
    },
}

/// The bound sockets: one SO_REUSEPORT listener per shard for clients, one for the
/// management API. Bound before [`serve`] so callers (and tests, with port 0) know the
/// addresses.
pub struct Listeners {
    gateway: Vec<std::net::TcpListener>,
    management: std::net::TcpListener,
    /// `server.webtransport.listen`, when WebTransport is on.
    webtransport: Option<std::net::UdpSocket>,
}

impl Listeners {
    /// Binds `server.listen` once per shard and `management.listen`; an error names the
    /// listener that failed.
    pub fn bind(config: &Config) -> Result<Self, ServeError> {
        let failed = |key, address| {
            move |reason| ServeError::Bind {
                key,
                address,
                reason,
            }
        };
        let gateway_failed = failed("server.listen", config.server.listen);
        let address = claim_address(config.server.listen).map_err(gateway_failed)?;
        let first = reuseport_listener(address).map_err(gateway_failed)?;
        let mut gateway = vec![first];
        for _ in 1..config.server.shards {
            gateway.push(reuseport_listener(address).map_err(gateway_failed)?);
        }
        let management_failed = failed("management.listen", config.management.listen);
        let management =
            std::net::TcpListener::bind(config.management.listen).map_err(management_failed)?;
        management
            .set_nonblocking(true)
            .map_err(management_failed)?;
        let webtransport = match &config.server.webtransport {
            Some(webtransport) => Some(
                crate::transport::webtransport::bind(webtransport)
                    .map_err(failed("server.webtransport.listen", webtransport.listen))?,
            ),
            None => None,
        };
        Ok(Self {
            gateway,
            management,
            webtransport,
        })
    }

    /// Where WebTransport clients connect (UDP), when it is on.
    pub fn webtransport_addr(&self) -> Option<SocketAddr> {
        self.webtransport.as_ref()?.local_addr().ok()
    }

    /// Where clients connect.
    pub fn gateway_addr(&self) -> SocketAddr {
        self.gateway[0]
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Where the management API listens.
    pub fn management_addr(&self) -> SocketAddr {
        self.management
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}

/// Checks that no other process listens on `address` and resolves port 0.
///
/// The shards' listeners share the port through SO_REUSEPORT, which would let a second
/// gateway (or anything else run by the same user) join the group silently and get half of
/// the clients. A socket bound without SO_REUSEPORT cannot join a listening group, so this
/// probe fails with "address in use" exactly when someone listens there already (SO_REUSEADDR
/// keeps connections of a gateway that just exited in TIME_WAIT from counting).
fn claim_address(address: SocketAddr) -> std::io::Result<SocketAddr> {
    let probe = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    probe.set_reuse_address(true)?;
    probe.bind(&address.into()).map_err(|error| {
        if error.kind() == std::io::ErrorKind::AddrInUse {
            std::io::Error::new(
                error.kind(),
                "address in use: another process (another gateway?) already listens there",
            )
        } else {
            error
        }
    })?;
    probe
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an IP address"))
}

fn reuseport_listener(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&address.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// How long a stopping node tries to deregister from the cluster.
const LEAVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long shutdown waits for the webhook events of the last moments to be stored.
const FEED_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long queue deliverers and cluster duties get to stop, together.
const DUTIES_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the gateway until `shutdown` is cancelled, then closes every connection with 1001,
/// fires `$disconnect` for each, flushes storage and returns.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let addresses = (listeners.gateway_addr(), listeners.management_addr());
    let webtransport_addr = listeners.webtransport_addr();
    // From here on the config names the bound addresses (port 0 resolved): what the
    // discovery document and the demo page tell clients.
    let mut config = config;
    (config.server.listen, config.management.listen) = addresses;
    if let (Some(webtransport), Some(address)) =
        (&mut config.server.webtransport, webtransport_addr)
    {
        webtransport.listen = address;
    }
    let storage = Storage::open(&config.server.data_dir)?;
    let epoch = storage.next_epoch()?;
    let (orphans, records) = storage.start_records()?;
    let (handles, inboxes) = shard::handle::channels(listeners.gateway.len());
    let admission = admission(&config)?;
    let metrics = Metrics::new();
    metrics.register_routes(
        config.routes.keys().filter(|key| {
            (config.routes.get(key)).is_some_and(|route| route.integration.kind() == "http")
        }),
        config.authorizer.as_ref().is_some_and(|a| a.is_http()),
    );
    metrics
        .connection_capacity
        .set(admission.0.capacity() as i64);
    let queues = Arc::new(QueueHub::open(
        &storage,
        &config.queues,
        &config.storage,
        &metrics,
    )?);
    let shards: Arc<[shard::handle::ShardHandle]> = handles.into();
    let (presence_events, presence_changes) = tokio::sync::mpsc::unbounded_channel();
    let dropped = metrics.webhook_events.with_label_values(&["dropped"]);
    let (webhook_events, webhook_feed) = crate::webhooks::WebhookSender::new(dropped);
    let sequencer = Arc::new(Sequencer::new(
        config.rooms.clone(),
        config.server.node_id,
        epoch,
    ));
    let cluster = match &config.cluster {
        Some(cluster_config) => {
            let node = crate::cluster::registry::NodeIdentity {
                node_id: config.server.node_id,
                epoch,
                instance: storage.instance_id()?,
            };
            let cluster = Cluster::join(
                cluster_config,
                node,
                &config.api.stage,
                &config.queues,
                crate::cluster::LocalParts {
                    shards: shards.clone(),
                    rooms: sequencer.clone(),
                    webhook_events: (config.webhooks.is_some()).then(|| webhook_events.clone()),
                },
                metrics.clone(),
            )
            .await?;
            tracing::info!(
                node_id = config.server.node_id,
                nats = %cluster_config.nats_urls.join(","),
                "joined the cluster"
            );
            Some(cluster)
        }
        None => None,
    };
    let webhooks = (config.webhooks.clone()).map(|webhooks| (webhooks, webhook_events));
    let directory = Directory::new(
        config.server.node_id,
        epoch,
        shards.clone(),
        cluster.clone(),
        sequencer.clone(),
        presence_events,
        webhooks,
    );
    let queue_store = match &cluster {
        Some(cluster) => QueueStore::JetStream(cluster.clone()),
        None => QueueStore::Local(queues.clone()),
    };
    if config.rooms.durable_ttl_ms().is_some() {
        // One node reads its durable history back now; in cluster mode a room's owner
        // reads it from JetStream when it first uses the room.
        if cluster.is_none() {
            let rooms = sequencer.restore(stored_history(&queues)?, crate::clock::now_ms());
            tracing::info!(rooms, "durable room history read back");
        }
        sequencer.keep_with(Arc::new(queue_store.clone()));
    }
    let gateway = Arc::new(Gateway {
        directory,
        queue_store,
        outbound_budget: admission.1,
        admission: admission.0,
        config,
        metrics,
        records,
        epoch,
        shards,
        queues,
        fence: (cluster.as_ref()).map_or_else(
            || Arc::new(crate::fence::Fence::open()),
            |cluster| cluster.fence.clone(),
        ),
        cluster,
    });
    let local_queues = gateway.cluster.is_none();
    let mut deliverers: Vec<_> = gateway
        .config
        .queues
        .iter()
        .filter(|_| local_queues)
        .filter_map(|queue| {
            let url = queue.deliver_to.clone()?;
            Some(tokio::spawn(queues::deliver(
                gateway.queues.clone(),
                queue.name.clone(),
                url,
                (queue.push, queue.format.clone()),
                gateway.metrics.clone(),
                shutdown.clone(),
            )))
        })
        .collect();
    deliverers.extend(crate::cluster::duties::run(&gateway, &shutdown));
    let orphan_report = tokio::spawn(report_orphans(gateway.clone(), orphans));
    tokio::spawn(sweep_room_logs(gateway.directory.clone(), shutdown.clone()));
    let directory = gateway.directory.clone();
    tokio::spawn(directory.tell_presence(presence_changes, shutdown.clone()));
    // Stopped once the shards are: the leaves of the connections shutdown closes are sent.
    let occupancy_stop = CancellationToken::new();
    let feed_stop = CancellationToken::new();
    let webhook_feed = (gateway.config.webhooks.clone()).map(|config| {
        let store = gateway.queue_store.clone();
        let origin = format!("{:x}.{:x}", gateway.config.server.node_id, gateway.epoch);
        let stored = gateway
            .metrics
            .webhook_events
            .with_label_values(&["stored"]);
        let feed = crate::webhooks::feed::Feed::new(store, webhook_feed, config, origin, stored);
        tokio::spawn(feed.run(feed_stop.clone()))
    });
    let occupancy = (gateway.cluster.clone()).map(|cluster| {
        tokio::spawn(crate::cluster::occupancy::track(
            cluster,
            occupancy_stop.clone(),
        ))
    });
    if let Some(crate::auth::authorizer::Check::Jwks { keys, .. }) =
        gateway.config.authorizer.as_ref().map(|a| &a.check)
    {
        tokio::spawn(crate::auth::authorizer::refresh_jwks(
            keys.clone(),
            HttpIntegration::new(),
            shutdown.clone(),
        ));
    }

    let mut threads = Vec::new();
    for (index, (listener, inbox)) in listeners.gateway.into_iter().zip(inboxes).enumerate() {
        let thread = shard::run::spawn(
            index as u16,
            listener,
            inbox,
            gateway.clone(),
            shutdown.clone(),
        )
        .map_err(|reason| ServeError::Start {
            what: "shard thread",
            reason,
        })?;
        threads.push(thread);
    }
    tracing::info!(
        shards = threads.len(),
        epoch,
        stage = %gateway.config.api.stage,
        "gateway started"
    );

    let management = tokio::net::TcpListener::from_std(listeners.management).map_err(|reason| {
        ServeError::Start {
            what: "management listener",
            reason,
        }
    })?;
    let webtransport = match listeners.webtransport {
        Some(socket) => {
            let config = (gateway.config.server.webtransport.as_ref())
                .expect("a WebTransport socket is bound only when it is configured");
            let started =
                webtransport::start(socket, config, webtransport_gate(&gateway), &shutdown);
            Some(started.map_err(|reason| ServeError::Start {
                what: "WebTransport endpoint",
                reason,
            })?)
        }
        None => None,
    };
    log_listening(&gateway.config, addresses, webtransport_addr);
    let app = management::router(ApiState {
        gateway: gateway.clone(),
    });
    management::listener::serve(
        management,
        app,
        &gateway.config.management,
        shutdown.clone(),
    )
    .await;

    // Shards close their connections and wait (bounded) for `$disconnect` calls.
    let joined = tokio::task::spawn_blocking(move || {
        for thread in threads {
            let _ = thread.join();
        }
    });
    let _ = joined.await;
    // The rooms the shutdown emptied are reported, then every event noted is stored.
    occupancy_stop.cancel();
    if let Some(occupancy) = occupancy {
        let _ = tokio::time::timeout(FEED_STOP_WAIT, occupancy).await;
    }
    feed_stop.cancel();
    if let Some(feed) = webhook_feed {
        let _ = tokio::time::timeout(FEED_STOP_WAIT, feed).await;
    }
    if let Some(endpoint) = webtransport {
        endpoint.close(wtransport::VarInt::from_u32(0), b"server shutdown");
        let _ = tokio::time::timeout(ENDPOINT_CLOSE_WAIT, endpoint.wait_idle()).await;
    }
    // Unreported orphans keep their records and are reported at the next start.
    orphan_report.abort();
    let _ = orphan_report.await;
    // Each stops at the shutdown, but one may be waiting on NATS (gone): it is cut off
    // past the deadline. A queue delivery cut short is delivered again at the next start.
    let deadline = tokio::time::Instant::now() + DUTIES_STOP_WAIT;
    for deliverer in deliverers {
        let abort = deliverer.abort_handle();
        if tokio::time::timeout_at(deadline, deliverer).await.is_err() {
            abort.abort();
        }
    }
    if let Some(cluster) = &gateway.cluster {
        // With NATS gone, leaving would wait for it forever (a flush waits for a reconnect).
        if tokio::time::timeout(LEAVE_TIMEOUT, crate::cluster::duties::leave(cluster))
            .await
            .is_err()
        {
            tracing::warn!(
                "could not leave the cluster within {LEAVE_TIMEOUT:?} (NATS unreachable): the \
                 other nodes will take this node for lost and report its connections again"
            );
        }
    }
    let records = gateway.records.clone();
    let queue_log = gateway.queues.log.clone();
    let _ = tokio::task::spawn_blocking(move || {
        records.close();
        queue_log.close();
    })
    .await;
    storage.flush()?;
    tracing::info!("gateway stopped");
    Ok(())
}

/// Says where the gateway serves, once it does (storage open, cluster joined, shards
/// accepting): scripts and tests wait for this line.
fn log_listening(
    config: &Config,
    (gateway, management): (SocketAddr, SocketAddr),
    webtransport: Option<SocketAddr>,
) {
    let scheme = |tls: bool, secure: &'static str, plain: &'static str| {
        if tls { secure } else { plain }
    };
    if let Some(address) = webtransport {
        tracing::info!(
            webtransport = %format!("https://{address}/{}", config.api.stage),
            "WebTransport listening (UDP)"
        );
        if config.management.tls.is_none() && !management.ip().is_loopback() {
            tracing::warn!(
                "the WebTransport discovery document (its certificate hash) is served over plain \
                 http off loopback, where it can be swapped on the way: set [management.tls]"
            );
        }
    }
    let management_scheme = scheme(config.management.tls.is_some(), "https", "http");
    tracing::info!(
        gateway = %format!(
            "{}://{gateway}/{}",
            scheme(config.server.tls.is_some(), "wss", "ws"),
            config.api.stage
        ),
        management = %format!("{management_scheme}://{management}/{}/@connections", config.api.stage),
        data_dir = %config.server.data_dir.display(),
        "listening"
    );
    if crate::management::demo::is_served(config) {
        tracing::info!(
            page = %format!("{management_scheme}://{management}/demo"),
            "demo chat page"
        );
    }
}

/// The admission gate and the outbound budget it consults. Capacity is
/// `server.max_connections`, capped by the open-files limit less `server.fd_reserve`.
fn admission(config: &Config) -> Result<(Arc<Admission>, Arc<OutboundBudget>), ServeError> {
    let open_files = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(u64::MAX, |(soft, _)| soft);
    let reserve = config.server.fd_reserve;
    let capacity = Admission::capacity_for(config.server.max_connections, open_files, reserve);
    if capacity == 0 {
        return Err(ServeError::NoFileDescriptors {
            open_files,
            reserve,
        });
    }
    if capacity < config.server.max_connections {
        // Said once, with what to do; a warning only when the operator asked for more.
        let advice = "raise the open-files limit (LimitNOFILE=1048576 in a systemd unit, \
                      `ulimit -n` before starting) or lower server.max_connections";
        if config.server.max_connections == crate::config::DEFAULT_MAX_CONNECTIONS {
            tracing::info!(
                capacity,
                open_files,
                fd_reserve = reserve,
                advice,
                "connections capped by the open-files limit"
            );
        } else {
            tracing::warn!(
                capacity,
                open_files,
                fd_reserve = reserve,
                advice,
                "the open-files limit caps connections below server.max_connections"
            );
        }
    }
    let budget = Arc::new(OutboundBudget::new(config.limits.outbound_memory_bytes));
    let admission = Admission::new(capacity, config.limits.per_ip, budget.clone());
    Ok((Arc::new(admission), budget))
}

/// Reports connections a crash cut (records left by the previous run) to `$disconnect`;
/// in cluster mode through the cluster's recovery, which other nodes may have run first.
async fn report_orphans(gateway: Arc<Gateway>, orphans: Vec<ConnectionRecord>) {
    if gateway.cluster.is_some() {
        crate::cluster::duties::recover_previous_runs(&gateway, orphans).await;
        return;
    }
    if !orphans.is_empty() {
        crate::orphans::report_cut(&gateway, orphans).await;
    }
}

/// The WebTransport endpoint's side of the gateway: its admission gate, and the shards it
/// hands sessions to, round robin.
fn webtransport_gate(gateway: &Arc<Gateway>) -> webtransport::Gate {
    let shards = gateway.shards.clone();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hand_off: webtransport::HandOff = Arc::new(move |incoming, slot| {
        let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % shards.len();
        let shard = shards[index].clone();
        Box::pin(async move { shard.adopt_webtransport(incoming, slot).await })
    });
    webtransport::Gate {
        admission: gateway.admission.clone(),
        outcomes: gateway.metrics.connections_total.clone(),
        hand_off,
    }
}

/// Every entry of the durable history queue, oldest first, read in batches as they are
/// folded in (a read error is logged and ends them).
fn stored_history(queues: &QueueHub) -> Result<impl Iterator<Item = Vec<u8>> + '_, StorageError> {
    let queue = crate::rooms::history::QUEUE;
    let (mut next, _) = queues.log.bounds(queue)?;
    let mut batch = std::collections::VecDeque::new();
    Ok(std::iter::from_fn(move || {
        if batch.is_empty() {
            match queues.log.read(queue, next, 4096) {
                Ok(read) => {
                    next = read.next;
                    batch.extend(read.entries.into_iter().map(|entry| entry.payload));
                }
                Err(error) => tracing::error!(%error, "durable room history not read back"),
            }
        }
        batch.pop_front()
    }))
}

/// Once a minute, forgets the logs of rooms that keep nothing and have been quiet for
/// their TTL ([`crate::rooms::sequencer`]).
async fn sweep_room_logs(directory: Directory, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => directory.sweep_rooms(),
        }
    }
}
