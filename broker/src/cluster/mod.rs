//! Cluster mode: several nodes behind a load balancer serve one API, coordinated through
//! NATS (JetStream for what must survive a node).
//!
//! [`Cluster`] is the seam: the rest of the gateway asks it to reach another node (a push,
//! a room broadcast, a queue append) and tells it what changes locally (room interest,
//! connection records). Underneath, one module per duty:
//! * [`subjects`]: every NATS subject, stream and bucket name, in one place.
//! * [`remote`]: `@connections` calls for connections on other nodes, as NATS requests.
//! * [`interest`]: a node subscribes to a room's subject only while it has local members.
//! * [`registry`]: node registration (unique `server.node_id`), heartbeats, and the
//!   takeover that reports a lost node's connections to `$disconnect`, once.
//! * [`mirror`]: connection records copied to a JetStream stream, batched.
//! * [`queues`]: durable queues as JetStream streams.
//!
//! Without `[cluster]` none of this runs and the gateway is one node, as before.

pub mod config;
pub mod duties;
pub mod error;
pub mod find;
pub mod history;
pub mod interest;
pub mod mirror;
pub mod occupancy;
pub mod queues;
pub mod registry;
pub mod remote;
pub mod state;
pub mod subjects;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use async_nats::jetstream;

pub use config::{ClusterConfig, RawCluster};
pub use error::ClusterError;

use crate::connection_id::ConnectionId;
use crate::metrics::Metrics;
use crate::rooms::sequencer::Sequencer;
use crate::shard::handle::ShardHandle;
use subjects::Subjects;

/// How long joining retries while JetStream settles (leader elections at a cold start).
const SETUP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(20);

/// What of this node the cluster works with: its shards (for calls from other nodes), its
/// room logs (the rooms it owns) and, with webhooks, where room events go.
pub struct LocalParts {
    pub shards: Arc<[ShardHandle]>,
    pub rooms: Arc<Sequencer>,
    pub webhook_events: Option<crate::webhooks::WebhookSender>,
}

/// This node's membership of the cluster.
pub struct Cluster {
    pub node_id: u16,
    pub config: ClusterConfig,
    pub subjects: Subjects,
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
    /// Every local shard, for calls that arrive from other nodes.
    shards: Arc<[ShardHandle]>,
    /// The logs of the numbered rooms this node owns ([`history`]).
    rooms: Arc<Sequencer>,
    /// With webhooks: which nodes have members in which rooms ([`occupancy`]).
    occupancy: Option<state::occupancy::Occupancy>,
    /// With durable rooms: their history ([`history`]).
    history: Option<state::history::HistoryStream>,
    metrics: Metrics,
    /// Why cluster delivery is broken right now, if it is (reported by `/health`).
    degraded: Arc<Mutex<Option<String>>>,
    pub interest: state::interest::Interest,
    pub mirror: state::mirror::Mirror,
    pub registry: registry::Registry,
    /// This node's lease on its connections, kept by its heartbeat ([`crate::fence`]).
    pub fence: Arc<crate::fence::Fence>,
    pub queues: state::queues::ClusterQueues,
    /// Connections of this node whose clients resumed on another node: connectionId →
    /// the id the other node carries them under, until when. Calls for them are forwarded
    /// there; an entry is dropped once the connection cannot be alive any more.
    moved: Mutex<Moved>,
    /// The other way round: connections that moved here, by the id backends know them
    /// by → the id this node carries them under (a broadcast's `exclude` names the first).
    arrived: Mutex<HashMap<ConnectionId, ConnectionId>>,
    /// What became of the moves this node asked for, by the alias it asked under: the node
    /// that handed a connection over asks (`Op::MoveStatus`), so that a connection whose
    /// hand-over never arrived is reported there, once.
    moves_asked: Mutex<HashMap<ConnectionId, (MoveOutcome, Instant)>>,
}

/// What became of a move a node asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveOutcome {
    /// Asked; no answer yet.
    Pending,
    /// The connection arrived: this node carries it (and reports its end).
    Taken,
    /// No answer in time (or an error): this node opened a new connection instead.
    Abandoned,
}

impl MoveOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Taken => "taken",
            Self::Abandoned => "abandoned",
        }
    }
}

/// How long a node remembers what became of a move it asked for.
const MOVE_MEMORY: std::time::Duration = std::time::Duration::from_secs(600);

/// The forwarding entries of moved connections.
#[derive(Default)]
struct Moved {
    /// connectionId → (where it lives now, until when it could live).
    entries: HashMap<String, (ConnectionId, Instant)>,
    /// When expired entries were last dropped (at most once a second: a move must not cost
    /// a walk over every entry).
    pruned_at: Option<Instant>,
}

impl Moved {
    fn alias(&self, connection_id: &str) -> Option<ConnectionId> {
        let (alias, until) = self.entries.get(connection_id)?;
        (*until > Instant::now()).then_some(*alias)
    }
}

impl Cluster {
    /// Remembers what became of the move asked for under `alias` (entries older than
    /// [`MOVE_MEMORY`] go).
    pub fn note_move(&self, alias: ConnectionId, outcome: MoveOutcome) {
        let mut moves = self
            .moves_asked
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        moves.retain(|_, (_, at)| now.duration_since(*at) < MOVE_MEMORY);
        moves.insert(alias, (outcome, now));
    }

    /// What became of the move asked for under `alias`, if this node remembers asking.
    pub fn move_outcome(&self, alias: ConnectionId) -> Option<MoveOutcome> {
        let moves = self
            .moves_asked
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        moves.get(&alias).map(|(outcome, _)| *outcome)
    }

    /// Notes that local connection `connection_id` now lives on another node as `alias`
    /// (at most until `until`: as long as it could live), and drops the entries of
    /// connections that cannot be alive any more.
    pub fn note_moved(&self, connection_id: &str, alias: ConnectionId, until: Instant) {
        if let Ok(mut moved) = self.moved.lock() {
            let now = Instant::now();
            if moved
                .pruned_at
                .is_none_or(|at| now.duration_since(at) >= std::time::Duration::from_secs(1))
            {
                moved.entries.retain(|_, (_, until)| *until > now);
                moved.pruned_at = Some(now);
            }
            moved
                .entries
                .insert(connection_id.to_owned(), (alias, until));
        }
    }

    /// Notes that a local connection that moved away moved on from there to `alias` (a
    /// move this node passed on), keeping how long it could live.
    pub fn note_moved_on(&self, connection_id: &str, alias: ConnectionId) {
        if let Ok(mut moved) = self.moved.lock()
            && let Some(entry) = moved.entries.get_mut(connection_id)
        {
            entry.0 = alias;
        }
    }

    /// Notes that connection `original` lives here now, as `alias`.
    pub fn note_arrived(&self, original: ConnectionId, alias: ConnectionId) {
        if let Ok(mut arrived) = self.arrived.lock() {
            arrived.insert(original, alias);
        }
    }

    /// Notes that connection `original`, which moved here as `alias`, ended or moved on
    /// (unless it has come back under another alias since).
    pub fn note_departed(&self, original: ConnectionId, alias: ConnectionId) {
        if let Ok(mut arrived) = self.arrived.lock()
            && arrived.get(&original) == Some(&alias)
        {
            arrived.remove(&original);
        }
    }

    /// The id this node knows connection `id` by: its alias if it moved here.
    pub fn here_as(&self, id: ConnectionId) -> ConnectionId {
        self.arrived_as(id).unwrap_or(id)
    }

    /// The alias of connection `id` if it moved here from another node.
    pub fn arrived_as(&self, id: ConnectionId) -> Option<ConnectionId> {
        self.arrived.lock().ok()?.get(&id).copied()
    }

    /// Whether the run of the node that gave out `id` (opening the connection, or taking it
    /// over as an alias) still runs: if not (that node restarted, or was lost), the
    /// forwarding it kept for connections that moved away went with it
    /// ([`Cluster::find_moved`]).
    pub fn issuer_runs(&self, id: ConnectionId) -> bool {
        match id.node == self.node_id {
            true => id.epoch == self.registry.epoch(),
            false => self.registry.live_epoch(id.node) == Some(id.epoch),
        }
    }

    /// Where a local connection that moved to another node lives now.
    pub fn moved_to(&self, connection_id: &str) -> Option<ConnectionId> {
        self.moved.lock().ok()?.alias(connection_id)
    }

    /// `ids` with those of moved connections replaced by where they live now: those this
    /// node forwards, and those that moved here.
    pub fn where_they_live(&self, ids: &[String]) -> Vec<String> {
        let (Ok(moved), Ok(arrived)) = (self.moved.lock(), self.arrived.lock()) else {
            return ids.to_vec();
        };
        if moved.entries.is_empty() && arrived.is_empty() {
            return ids.to_vec();
        }
        let here = |id: &String| arrived.get(&id.parse().ok()?).copied();
        ids.iter()
            .map(|id| {
                (moved.alias(id).or_else(|| here(id)))
                    .map_or_else(|| id.clone(), |alias| alias.to_string())
            })
            .collect()
    }

    /// Connects to NATS, sets up the streams and buckets, and registers the node: refused
    /// if a live node holds `node_id` already.
    pub async fn join(
        config: &ClusterConfig,
        node: registry::NodeIdentity,
        stage: &str,
        queues: &[crate::config::QueueConfig],
        local: LocalParts,
        metrics: Metrics,
    ) -> Result<Arc<Self>, ClusterError> {
        let LocalParts {
            shards,
            rooms,
            webhook_events,
        } = local;
        let node_id = node.node_id;
        let degraded = Arc::new(Mutex::new(None));
        let client = connect(config, node_id, degraded.clone(), metrics.clone()).await?;
        let jetstream = jetstream::new(client.clone());
        let subjects = Subjects::new(stage);
        let replicas = replicas(config, &client);
        // A JetStream cluster that is still electing leaders (or replicating a bucket
        // another node just created) answers "no responders" for a moment: retry.
        let deadline = std::time::Instant::now() + SETUP_PATIENCE;
        let (registry, mirror, queues) = loop {
            let setup = async {
                let registry =
                    registry::Registry::open(&jetstream, &subjects, config, node.clone(), replicas)
                        .await?;
                let mirror = state::mirror::Mirror::open(&jetstream, &subjects, replicas).await?;
                let queues =
                    state::queues::ClusterQueues::open(&jetstream, &subjects, queues, replicas)
                        .await?;
                Ok::<_, ClusterError>((registry, mirror, queues))
            };
            match setup.await {
                Ok(done) => break done,
                Err(error @ ClusterError::DuplicateNodeId { .. }) => return Err(error),
                Err(error) if std::time::Instant::now() >= deadline => return Err(error),
                Err(error) => {
                    tracing::info!(%error, "JetStream not ready yet; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
            }
        };
        // Whenever the live nodes change, the logs of the rooms another node numbers now
        // go (at once, so a room that comes back later starts a new epoch here).
        let logs = rooms.clone();
        registry.on_change(Box::new(move |peers| {
            logs.retain(|room| registry::owner_among(room, node_id, peers) == node_id);
        }));
        let history = match rooms.durable_bounds() {
            Some(bounds) => {
                let stream =
                    state::history::HistoryStream::open(&jetstream, &subjects, replicas, bounds);
                Some(stream.await?)
            }
            None => None,
        };
        let occupancy = match webhook_events {
            Some(events) => {
                let bucket = subjects.rooms_bucket();
                let opened =
                    state::occupancy::Occupancy::open(&jetstream, bucket, replicas, events);
                Some(opened.await?)
            }
            None => None,
        };
        metrics.cluster_nats_connected.set(1);
        Ok(Arc::new(Self {
            node_id,
            config: config.clone(),
            interest: state::interest::Interest::new(
                tokio::runtime::Handle::current(),
                client.new_inbox(),
            ),
            subjects,
            client,
            jetstream,
            shards,
            rooms,
            occupancy,
            history,
            metrics,
            degraded,
            mirror,
            registry,
            fence: Arc::new(crate::fence::Fence::leased(
                config.node_timeout.saturating_sub(config.heartbeat),
            )),
            queues,
            moved: Mutex::new(Moved::default()),
            arrived: Mutex::new(HashMap::new()),
            moves_asked: Mutex::new(HashMap::new()),
        }))
    }

    /// Why cluster delivery is broken, if it is.
    pub fn degraded(&self) -> Option<String> {
        self.degraded.lock().ok().and_then(|reason| reason.clone())
    }

    fn set_degraded(&self, reason: Option<String>) {
        set_degraded(&self.degraded, reason);
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn shards(&self) -> &Arc<[ShardHandle]> {
        &self.shards
    }
}

fn set_degraded(slot: &Mutex<Option<String>>, reason: Option<String>) {
    if let Ok(mut slot) = slot.lock() {
        *slot = reason;
    }
}

/// Connects with reconnection forever: a node that loses NATS keeps serving its local
/// clients and comes back by itself; the connection state drives `/health` and a gauge.
async fn connect(
    config: &ClusterConfig,
    node_id: u16,
    degraded: Arc<Mutex<Option<String>>>,
    metrics: Metrics,
) -> Result<async_nats::Client, ClusterError> {
    let urls = config.nats_urls.join(", ");
    let connect_error = |reason: String| ClusterError::Connect {
        urls: urls.clone(),
        reason,
    };
    let mut options = match &config.credentials {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| connect_error(format!("cluster.credentials: {e}")))?,
        None => async_nats::ConnectOptions::new(),
    };
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let Some((user, password)) = &config.user_password {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &config.tls_client {
        options = options
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    if !config.encrypted_or_local {
        tracing::warn!(
            urls = %urls,
            "cluster traffic to NATS is unencrypted and leaves this host: anyone on that \
             network can read pushes and resume secrets and forge node calls; use tls:// \
             URLs with cluster.tls_ca (docs/SECURITY.md)"
        );
    }
    let on_event = move |event: async_nats::Event| {
        let degraded = degraded.clone();
        let metrics = metrics.clone();
        async move {
            match event {
                async_nats::Event::Connected => {
                    tracing::info!("NATS connection (re)established");
                    metrics.cluster_nats_connected.set(1);
                    set_degraded(&degraded, None);
                }
                async_nats::Event::Disconnected => {
                    tracing::error!(
                        "NATS connection lost: cross-node calls fail until it is back; \
                         reconnecting"
                    );
                    metrics.cluster_nats_connected.set(0);
                    set_degraded(&degraded, Some("NATS connection lost; reconnecting".into()));
                }
                other => tracing::warn!(event = %other, "NATS client event"),
            }
        }
    };
    let addresses: Vec<async_nats::ServerAddr> = config
        .nats_urls
        .iter()
        .filter_map(|url| url.parse().ok())
        .collect();
    options
        .name(format!("switchboard-node-{node_id}"))
        .no_echo()
        .connection_timeout(std::time::Duration::from_secs(5))
        .request_timeout(Some(config.request_timeout))
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            std::time::Duration::from_millis((100 * attempts as u64).min(2000))
        })
        .event_callback(on_event)
        .connect(addresses)
        .await
        .map_err(|e| connect_error(e.to_string()))
}

/// JetStream replicas: as configured, or as many servers as the NATS cluster has (at most
/// three).
fn replicas(config: &ClusterConfig, client: &async_nats::Client) -> usize {
    if config.replicas > 0 {
        return config.replicas;
    }
    let servers = client.server_info().connect_urls.len().max(1);
    servers.min(3)
}
