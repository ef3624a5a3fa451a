//! Who is in the cluster: node registrations in a JetStream key-value bucket, renewed by a
//! heartbeat, and the takeover that reports a lost node's connections to `$disconnect`
//! exactly once cluster-wide.
//!
//! Keys of the `sb_{stage}_nodes` bucket:
//! * `node.{id}`: the live registration of node `id` (its data dir's instance id, epoch,
//!   start time), rewritten every `cluster.heartbeat_ms` with an expected revision, so two
//!   processes can never both hold one node id.
//! * `claim.{id}.{epoch}`: the node running the takeover of that incarnation (created
//!   atomically: one winner).
//! * `lost.{id}.{epoch}`: that incarnation's connections have been reported; a node that
//!   restarts on the same data dir reads it and does not report them a second time.
//!
//! Liveness is judged on this node's own clock (when did I last see `node.{id}` change),
//! never by comparing clocks across machines, and only after this node has itself been
//! connected to NATS for a full `cluster.node_timeout_ms` (a node that was cut off from
//! NATS does not declare everyone else dead when it comes back).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::config::ClusterConfig;
use super::error::ClusterError;
use super::state::mirror::MirrorRecord;
use super::state::{latest_entry, latest_value};
use super::subjects::Subjects;
use crate::clock;
use switchboard_storage::ConnectionRecord;

/// What a heartbeat found.
pub(super) enum Renewal {
    Renewed,
    /// NATS did not take it (the connection is down): tried again next beat.
    Failed,
    /// A takeover declared this node lost while it was paused or cut off: its registration
    /// is condemned or gone (see [`Registry::rejoin`]).
    DeclaredLost,
    /// Another process holds this node id now.
    Taken,
}

/// Who this process is.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub node_id: u16,
    /// This run's epoch (in every connectionId it issues).
    pub epoch: u32,
    /// The data dir's random id: tells a restart of this node from another process that
    /// was given the same `server.node_id` by mistake.
    pub instance: String,
}

/// What `node.{id}` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Registration {
    instance: String,
    pub(super) epoch: u32,
    started_ms: u64,
}

/// Another node as this one sees it.
#[derive(Debug, Clone)]
pub(super) struct Peer {
    pub(super) registration: Registration,
    pub(super) revision: u64,
    last_seen: Instant,
}

/// The registry bucket, this node's registration and its view of the others.
pub struct Registry {
    pub(super) store: kv::Store,
    node: NodeIdentity,
    registration: Registration,
    /// Revision of `node.{id}` as last written by this node.
    revision: AtomicU64,
    /// The incarnation of this node that ran before this one on the same data dir, if its
    /// registration was still there at start (it crashed).
    pub(super) previous: Option<Registration>,
    peers: Mutex<HashMap<u16, Peer>>,
    /// Told the live peers whenever a node joins or leaves their set.
    on_change: std::sync::OnceLock<OnChange>,
    /// Peers whose takeover this node is running.
    taking_over: Mutex<HashSet<u16>>,
}

/// What the registry tells when the live peers change: their ids.
pub type OnChange = Box<dyn Fn(&[u16]) + Send + Sync>;

fn node_key(node: u16) -> String {
    format!("node.{node}")
}

fn claim_key(node: u16, epoch: u32) -> String {
    format!("claim.{node}.{epoch}")
}

fn lost_key(node: u16, epoch: u32) -> String {
    format!("lost.{node}.{epoch}")
}

fn setup(error: impl std::fmt::Display) -> ClusterError {
    ClusterError::setup(error)
}

impl Registry {
    /// Opens the bucket and registers this node; a live node with the same id and another
    /// data dir makes this fail with [`ClusterError::DuplicateNodeId`].
    pub async fn open(
        jetstream: &jetstream::Context,
        subjects: &Subjects,
        config: &ClusterConfig,
        node: NodeIdentity,
        replicas: usize,
    ) -> Result<Self, ClusterError> {
        let bucket = subjects.registry_bucket();
        let store = super::state::bucket(jetstream, bucket.clone(), replicas).await?;
        let registration = Registration {
            instance: node.instance.clone(),
            epoch: node.epoch,
            started_ms: clock::now_ms(),
        };
        let key = node_key(node.node_id);
        let existing = latest_entry(&store, &key).await.map_err(setup)?;
        let mut previous = None;
        let expected = match existing {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let holder: Option<Registration> = serde_json::from_slice(&entry.value).ok();
                match holder {
                    Some(holder) if holder.instance == node.instance => previous = Some(holder),
                    Some(holder) => {
                        wait_until_stale(&store, &key, &entry, &holder, config, node.node_id)
                            .await?
                    }
                    None => {}
                }
                Some(entry.revision)
            }
            Some(entry) => Some(entry.revision),
            None => None,
        };
        let value = Bytes::from(serde_json::to_vec(&registration).map_err(setup)?);
        let written = match expected {
            Some(revision) => store
                .update(&key, value, revision)
                .await
                .map_err(|e| e.to_string()),
            None => store.create(&key, value).await.map_err(|e| e.to_string()),
        };
        let revision = written.map_err(|_| ClusterError::DuplicateNodeId {
            node_id: node.node_id,
            since: "just now".into(),
        })?;
        Ok(Self {
            store,
            node,
            registration,
            revision: AtomicU64::new(revision),
            previous,
            peers: Mutex::new(HashMap::new()),
            on_change: std::sync::OnceLock::new(),
            taking_over: Mutex::new(HashSet::new()),
        })
    }

    pub fn epoch(&self) -> u32 {
        self.node.epoch
    }

    /// Other nodes with a live heartbeat.
    pub fn live_peers(&self) -> usize {
        self.peers.lock().map_or(0, |peers| peers.len())
    }

    /// The ids of the other nodes with a live heartbeat.
    pub fn live_peer_ids(&self) -> Vec<u16> {
        self.peers
            .lock()
            .map_or_else(|_| Vec::new(), |peers| peers.keys().copied().collect())
    }

    /// The epoch of `node`'s live incarnation, if it is another node with a live heartbeat.
    pub fn live_epoch(&self, node: u16) -> Option<u32> {
        let peers = self.peers.lock().ok()?;
        peers.get(&node).map(|peer| peer.registration.epoch)
    }

    /// Whether `node` is another node with a live heartbeat (not judged lost).
    pub fn is_live(&self, node: u16) -> bool {
        self.peers
            .lock()
            .is_ok_and(|peers| peers.contains_key(&node))
    }

    /// `change` is told the live peers each time a node joins or leaves their set.
    pub fn on_change(&self, change: OnChange) {
        let _ = self.on_change.set(change);
    }

    fn changed(&self) {
        if let Some(change) = self.on_change.get() {
            change(&self.live_peer_ids());
        }
    }

    /// Writes this node's registration over `holder` (its entry as last read; `None`:
    /// absent), and keeps the revision for the next renewal; whether it was written.
    async fn register_over(&self, holder: Option<&kv::Entry>) -> bool {
        let key = node_key(self.node.node_id);
        let value = Bytes::from(serde_json::to_vec(&self.registration).unwrap_or_default());
        let written = match holder {
            Some(entry) => self.store.update(&key, value, entry.revision).await.ok(),
            None => self.store.create(&key, value).await.ok(),
        };
        if let Some(revision) = written {
            self.revision.store(revision, Ordering::Release);
        }
        written.is_some()
    }

    /// Renews the registration.
    pub(super) async fn renew(&self) -> Renewal {
        let value = Bytes::from(serde_json::to_vec(&self.registration).unwrap_or_default());
        let key = node_key(self.node.node_id);
        let expected = self.revision.load(Ordering::Acquire);
        match self.store.update(&key, value, expected).await {
            Ok(revision) => {
                self.revision.store(revision, Ordering::Release);
                Renewal::Renewed
            }
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                let Ok(holder) = latest_entry(&self.store, &key).await else {
                    return Renewal::Failed;
                };
                let held_by = holder.as_ref().and_then(|entry| {
                    let put = entry.operation == kv::Operation::Put;
                    let registration = serde_json::from_slice::<Registration>(&entry.value);
                    put.then_some(registration.ok()?)
                });
                match (held_by, holder) {
                    (Some(r), _) if r.instance != self.node.instance => Renewal::Taken,
                    // This node's own write, whose answer was lost: carry on from it.
                    (Some(_), Some(entry)) => match self.register_over(Some(&entry)).await {
                        true => Renewal::Renewed,
                        false => Renewal::Failed,
                    },
                    // Condemned by a takeover, or deleted once it finished.
                    _ => Renewal::DeclaredLost,
                }
            }
            Err(_) => Renewal::Failed,
        }
    }

    /// After this node was declared lost: once the takeover has reported this incarnation
    /// (its `lost` mark is there), clears that mark, since the connections this node serves
    /// from now on carry the same epoch and must be reported if it is lost again, and
    /// registers again. False while the takeover runs (or NATS cannot be reached). A
    /// registration that vanished with no takeover about it (the bucket was lost) is
    /// written again at once.
    pub(super) async fn rejoin(&self) -> bool {
        let (node, epoch) = (self.node.node_id, self.node.epoch);
        let key = node_key(node);
        if self.is_reported(node, epoch).await {
            if self.store.delete(lost_key(node, epoch)).await.is_err() {
                return false;
            }
        } else {
            // Not reported: only a registration gone with no takeover about it.
            let Ok(holder) = latest_entry(&self.store, &key).await else {
                return false;
            };
            let vanished = holder
                .as_ref()
                .is_none_or(|e| e.operation != kv::Operation::Put);
            let claimed = !matches!(
                latest_value(&self.store, &claim_key(node, epoch)).await,
                Ok(None)
            );
            return vanished && !claimed && self.register_over(holder.as_ref()).await;
        }
        // The takeover may have deleted the registration since it marked the incarnation.
        let Ok(holder) = latest_entry(&self.store, &key).await else {
            return false;
        };
        self.register_over(holder.as_ref()).await
    }

    /// Removes this node's registration (clean stop).
    pub async fn deregister(&self) {
        let key = node_key(self.node.node_id);
        let revision = self.revision.load(Ordering::Acquire);
        if let Err(error) = self
            .store
            .delete_expect_revision(&key, Some(revision))
            .await
        {
            tracing::warn!(%error, "cannot remove this node's registration");
        }
    }

    fn saw(&self, node: u16, registration: Registration, revision: u64) {
        let mut new = false;
        if let Ok(mut peers) = self.peers.lock() {
            new = !peers.contains_key(&node);
            peers.insert(
                node,
                Peer {
                    registration,
                    revision,
                    last_seen: Instant::now(),
                },
            );
        }
        if new {
            self.changed();
        }
    }

    /// `node`'s registration is the mark of a takeover (at `revision`): its clock is not
    /// started afresh.
    fn condemned(&self, node: u16, revision: u64) {
        if let Ok(mut peers) = self.peers.lock()
            && let Some(peer) = peers.get_mut(&node)
        {
            peer.revision = revision;
        }
    }

    pub(super) fn forget(&self, node: u16) {
        let gone = (self.peers.lock()).is_ok_and(|mut peers| peers.remove(&node).is_some());
        if gone {
            self.changed();
        }
    }

    /// Starts `node`'s clock afresh: its takeover is someone else's for now.
    pub(super) fn postpone(&self, node: u16) {
        if let Some(peer) = self
            .peers
            .lock()
            .ok()
            .as_mut()
            .and_then(|p| p.get_mut(&node))
        {
            peer.last_seen = Instant::now();
        }
    }

    /// Starts every peer's clock afresh (after this node's own NATS outage).
    pub(super) fn refresh_all(&self) {
        if let Ok(mut peers) = self.peers.lock() {
            let now = Instant::now();
            for peer in peers.values_mut() {
                peer.last_seen = now;
            }
        }
    }

    /// Peers not heard from for `timeout` and not being taken over yet.
    pub(super) fn lapsed(&self, timeout: Duration) -> Vec<(u16, Peer)> {
        let Ok(peers) = self.peers.lock() else {
            return Vec::new();
        };
        let Ok(mut taking_over) = self.taking_over.lock() else {
            return Vec::new();
        };
        peers
            .iter()
            .filter(|(_, peer)| peer.last_seen.elapsed() >= timeout)
            .filter(|(node, _)| taking_over.insert(**node))
            .map(|(node, peer)| (*node, peer.clone()))
            .collect()
    }

    pub(super) fn takeover_finished(&self, node: u16) {
        if let Ok(mut taking_over) = self.taking_over.lock() {
            taking_over.remove(&node);
        }
    }

    /// Claims the takeover of `node`'s incarnation `epoch`; false if another live node has
    /// it or it is done.
    pub(super) async fn claim(&self, node: u16, epoch: u32) -> bool {
        if self.is_reported(node, epoch).await {
            return false;
        }
        let me = Bytes::from(self.node.node_id.to_string());
        let key = claim_key(node, epoch);
        if self.store.create(&key, me.clone()).await.is_ok() {
            return true;
        }
        // Claimed before: take it over if the claimer is gone too, or is this node (a
        // claim of an earlier run of this node, cut short: this run finishes it).
        let Ok(Some(entry)) = latest_entry(&self.store, &key).await else {
            return false;
        };
        let claimer = std::str::from_utf8(&entry.value)
            .ok()
            .and_then(|s| s.parse::<u16>().ok());
        let claimer_alive = claimer.is_some_and(|c| {
            c != self.node.node_id && self.peers.lock().is_ok_and(|p| p.contains_key(&c))
        });
        !claimer_alive && self.store.update(&key, me, entry.revision).await.is_ok()
    }

    /// Whether `node`'s incarnation `epoch` has been reported by a takeover.
    async fn is_reported(&self, node: u16, epoch: u32) -> bool {
        matches!(
            latest_value(&self.store, &lost_key(node, epoch)).await,
            Ok(Some(_))
        )
    }

    /// Marks `node`'s registration (at `revision`, as this node last saw it) lost, before
    /// anything of it is reported: a compare-and-set, which fails if the node renewed
    /// since (it is alive after all: a pause shorter than it looked from here). Once it is
    /// done, the node's next renewal fails and tells it it was declared lost, so it fences
    /// itself ([`Renewal::DeclaredLost`]). Returns the mark's revision.
    pub(super) async fn condemn(&self, node: u16, revision: u64) -> Option<u64> {
        let mark = Bytes::from_static(br#"{"lost":true}"#);
        self.store.update(node_key(node), mark, revision).await.ok()
    }

    /// Gives up the claim of a takeover that will not run.
    pub(super) async fn release(&self, node: u16, epoch: u32) {
        let _ = self.store.delete(claim_key(node, epoch)).await;
    }

    /// Marks `node`'s incarnation `epoch` reported, and drops its claim and (if still the
    /// one judged lost) its registration.
    pub(super) async fn finish(&self, node: u16, epoch: u32, registration_revision: Option<u64>) {
        let _ = self.store.put(lost_key(node, epoch), Bytes::new()).await;
        if let Some(revision) = registration_revision {
            let _ = self
                .store
                .delete_expect_revision(node_key(node), Some(revision))
                .await;
        }
        let _ = self.store.delete(claim_key(node, epoch)).await;
    }
}

/// A registration held by another data dir: refuse if it is renewed within the node
/// timeout (a live node), take it if it is not (a dead one nobody cleaned up yet).
async fn wait_until_stale(
    store: &kv::Store,
    key: &str,
    entry: &kv::Entry,
    holder: &Registration,
    config: &ClusterConfig,
    node_id: u16,
) -> Result<(), ClusterError> {
    tracing::info!(
        node_id,
        "server.node_id is registered by another data dir; checking whether that node is alive"
    );
    let deadline = Instant::now() + config.node_timeout;
    while Instant::now() < deadline {
        tokio::time::sleep(config.heartbeat / 2).await;
        let current = latest_entry(store, key).await.map_err(setup)?;
        if current.is_some_and(|c| c.revision != entry.revision) {
            return Err(ClusterError::DuplicateNodeId {
                node_id,
                since: clock::iso8601(holder.started_ms),
            });
        }
    }
    Ok(())
}

pub(super) fn observe(registry: &Registry, entry: kv::Entry) {
    let Some(node) = entry
        .key
        .strip_prefix("node.")
        .and_then(|n| n.parse::<u16>().ok())
    else {
        return;
    };
    if node == registry.node.node_id {
        return;
    }
    match entry.operation {
        kv::Operation::Put => match serde_json::from_slice(&entry.value) {
            Ok(registration) => registry.saw(node, registration, entry.revision),
            // Condemned: still lapsed, until its takeover finishes (and deletes it) or the
            // node registers again; a takeover cut short is taken over from here.
            Err(_) => registry.condemned(node, entry.revision),
        },
        kv::Operation::Delete | kv::Operation::Purge => registry.forget(node),
    }
}

impl From<MirrorRecord> for ConnectionRecord {
    fn from(record: MirrorRecord) -> Self {
        Self {
            connection_id: record.connection_id,
            connected_at_ms: record.connected_at_ms,
            last_active_at_ms: record.connected_at_ms,
            source_ip: record.source_ip,
            user_agent: record.user_agent,
        }
    }
}

impl From<ConnectionRecord> for MirrorRecord {
    fn from(record: ConnectionRecord) -> Self {
        Self {
            connection_id: record.connection_id,
            connected_at_ms: record.connected_at_ms,
            source_ip: record.source_ip,
            user_agent: record.user_agent,
            // The local records do not keep them.
            authorizer: None,
            rooms: Vec::new(),
        }
    }
}

/// The node that numbers `room`'s messages, of `me` and `peers`: the one with the highest
/// score for the room (FNV-1a of the name and the node id: the same on every node and
/// build; a node joining or leaving moves only its share of rooms).
pub fn owner_among(room: &crate::rooms::RoomName, me: u16, peers: &[u16]) -> u16 {
    let score = |node: u16| {
        let hash = crate::rooms::fnv1a(room.as_str().bytes().chain(node.to_be_bytes()));
        (hash, node)
    };
    std::iter::once(me)
        .chain(peers.iter().copied())
        .max_by_key(|node| score(*node))
        .unwrap_or(me)
}
