//! State shared by every shard and the management API: fixed at start, read-only after
//! (atomics inside the metrics aside).

use std::sync::Arc;

use switchboard_storage::RecordWriter;

use crate::cluster::Cluster;
use crate::config::Config;
use crate::directory::Directory;
use crate::limits::{Admission, OutboundBudget};
use crate::metrics::Metrics;
use crate::queues::QueueHub;
use crate::queues::store::QueueStore;
use crate::shard::handle::ShardHandle;

pub struct Gateway {
    pub config: Config,
    pub metrics: Metrics,
    /// Batched writes of connection records.
    pub records: RecordWriter,
    /// This run's node epoch, part of every connectionId.
    pub epoch: u32,
    /// The gate every accepted socket passes: capacity, per-address limits, overload.
    pub admission: Arc<Admission>,
    /// The memory budget of all outbound queues together.
    pub outbound_budget: Arc<OutboundBudget>,
    /// Every shard, by index: where a connectionId's shard number points.
    pub shards: Arc<[ShardHandle]>,
    /// The local queue log (its queue names and offsets; the entries themselves only
    /// without a cluster).
    pub queues: Arc<QueueHub>,
    /// Where queue entries are appended, pulled and committed: the local log, or JetStream.
    pub queue_store: QueueStore,
    /// This node's membership of a cluster; `None`: a single node.
    pub cluster: Option<Arc<Cluster>>,
    /// Whether this node may act for its connections now: the cluster's lease, or always
    /// on a single node ([`crate::fence`]).
    pub fence: Arc<crate::fence::Fence>,
    /// Where connections and rooms live: every push, bulk send and broadcast goes through
    /// it, whether there is a cluster or not.
    pub directory: Directory,
}
