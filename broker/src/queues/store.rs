//! Where this node's durable queues live, chosen once at start: the local segment log, or
//! (cluster mode) JetStream. The shards append through it, the management API pulls and
//! commits through it, and neither asks which it is.

use std::sync::Arc;
use std::time::Duration;

use switchboard_storage::StorageError;
use tokio::sync::oneshot;

use super::QueueHub;
use crate::cluster::Cluster;
use crate::cluster::state::queues::QueueError;
use crate::metrics::Metrics;
use crate::rooms::RoomName;
use crate::rooms::sequencer::{Keeper, NotKept, Stored};
use futures_util::future::BoxFuture;

/// Called on the shard with an append's offset, or why it failed.
pub type QueueAppendDone = Box<dyn FnOnce(Result<u64, AppendFailure>)>;

/// Why a queue append was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendFailure {
    /// The data dir's disk is full: the client is told so; the gateway carries on.
    #[error("the disk is full")]
    DiskFull,
    /// Anything else the storage reported.
    #[error("{0}")]
    Storage(String),
}

impl From<switchboard_storage::StorageError> for AppendFailure {
    fn from(error: switchboard_storage::StorageError) -> Self {
        match error {
            switchboard_storage::StorageError::DiskFull { .. } => Self::DiskFull,
            other => Self::Storage(other.to_string()),
        }
    }
}

/// An append waiting for the end of the turn: the queue, the entry in its stored form
/// and its context (see [`crate::stored_event`]), and who to tell.
pub struct PendingAppend {
    pub queue: std::sync::Arc<str>,
    pub context: std::sync::Arc<[u8]>,
    pub entry: Vec<u8>,
    pub done: QueueAppendDone,
}

/// Hands a turn's appends to the queue log and runs their completions, in order, once the
/// last of them is durable.
async fn append_to_log(hub: &QueueHub, batch: Vec<PendingAppend>, metrics: &Metrics) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};

    let count = batch.len();
    // Filled by the writer thread, read here after the last one: no lock per entry.
    let results: Arc<Vec<OnceLock<Result<u64, AppendFailure>>>> =
        Arc::new((0..count).map(|_| OnceLock::new()).collect());
    let remaining = Arc::new(AtomicUsize::new(count));
    let (all_done, finished) = oneshot::channel::<()>();
    let all_done = Arc::new(Mutex::new(Some(all_done)));
    let mut appends: Vec<switchboard_storage::Append> = Vec::with_capacity(count);
    let mut completions = Vec::with_capacity(count);
    for (index, pending) in batch.into_iter().enumerate() {
        completions.push(pending.done);
        let (results, remaining, all_done) = (results.clone(), remaining.clone(), all_done.clone());
        appends.push(switchboard_storage::Append {
            queue: pending.queue,
            context: Some(pending.context),
            payload: pending.entry,
            done: Box::new(move |result| {
                let _ = results[index].set(result.map_err(AppendFailure::from));
                if remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                    let sender = all_done.lock().ok().and_then(|mut s| s.take());
                    if let Some(sender) = sender {
                        let _ = sender.send(());
                    }
                }
            }),
        });
    }
    let started = std::time::Instant::now();
    hub.log.append_many(appends);
    let _ = finished.await;
    metrics
        .queue_append_duration
        .observe(started.elapsed().as_secs_f64());
    for (index, done) in completions.into_iter().enumerate() {
        let result = results[index]
            .get()
            .cloned()
            .unwrap_or_else(|| Err(AppendFailure::Storage("the queue log stopped".into())));
        done(result);
    }
}

/// Cluster mode: publishes a turn's appends to JetStream in order, as the event JSON a
/// backend receives, and runs their completions, in order, once their acks are back.
async fn append_to_jetstream(cluster: &Cluster, batch: Vec<PendingAppend>) {
    let mut appends = Vec::with_capacity(batch.len());
    let mut completions = Vec::with_capacity(batch.len());
    let mut events = crate::stored_event::Rebuilder::default();
    for pending in batch {
        match events.event(Some(&pending.context), &pending.entry) {
            Ok(event) => {
                appends.push((pending.queue.clone(), event));
                completions.push((pending.queue, pending.done));
            }
            Err(error) => (pending.done)(Err(AppendFailure::Storage(error.to_string()))),
        }
    }
    let results = cluster.append_all(appends).await;
    for ((queue, done), result) in completions.into_iter().zip(results) {
        done(result.map_err(|error| {
            tracing::error!(%queue, %error, "queue append not stored by JetStream");
            AppendFailure::Storage(error.to_string())
        }));
    }
}

/// See the module documentation.
#[derive(Clone)]
pub enum QueueStore {
    Local(Arc<QueueHub>),
    JetStream(Arc<Cluster>),
}

/// Why a pull or a commit failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueStoreError {
    #[error("no such queue: {0}")]
    UnknownQueue(String),
    #[error("offset {offset} is past the end of queue {queue} (next offset {next})")]
    PastTheEnd {
        queue: String,
        offset: u64,
        next: u64,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Cluster mode: JetStream cannot be reached or refused.
    #[error("{0}")]
    Unavailable(String),
}

impl From<QueueError> for QueueStoreError {
    fn from(error: QueueError) -> Self {
        match error {
            QueueError::Unknown(queue) => Self::UnknownQueue(queue),
            other => Self::Unavailable(other.to_string()),
        }
    }
}

/// A consumer group's pull: `(offset, event JSON)` from its committed offset on, and the
/// offset to pull from next.
pub struct Pulled {
    pub messages: Vec<(u64, Vec<u8>)>,
    pub next: u64,
}

impl QueueStore {
    /// Stores a shard's turn of appends and runs their completions, in order.
    pub async fn append(&self, batch: Vec<PendingAppend>, metrics: &Metrics) {
        match self {
            Self::Local(hub) => append_to_log(hub, batch, metrics).await,
            Self::JetStream(cluster) => append_to_jetstream(cluster, batch).await,
        }
    }

    /// Appends `entries`, each stored as it is (no context: the entry is the event), in
    /// order; done once all are durable (or stored by JetStream).
    pub async fn append_raw(
        &self,
        queue: &str,
        entries: Vec<Vec<u8>>,
    ) -> Result<(), AppendFailure> {
        let queue: Arc<str> = queue.into();
        match self {
            Self::Local(hub) => {
                let (stored, all_stored) = tokio::sync::mpsc::unbounded_channel();
                let count = entries.len();
                let appends = (entries.into_iter())
                    .map(|payload| {
                        let stored = stored.clone();
                        switchboard_storage::Append {
                            queue: queue.clone(),
                            context: None,
                            payload,
                            done: Box::new(move |result| {
                                let _ = stored.send(result.map(drop).map_err(AppendFailure::from));
                            }),
                        }
                    })
                    .collect();
                drop(stored);
                hub.log.append_many(appends);
                let results = receive_all(all_stored, count).await;
                if results.len() < count {
                    return Err(AppendFailure::Storage("the queue log stopped".to_owned()));
                }
                results.into_iter().collect::<Result<(), _>>()
            }
            Self::JetStream(cluster) => {
                let appends = entries.into_iter().map(|entry| (queue.clone(), entry));
                let results = cluster.append_all(appends).await;
                results.into_iter().try_for_each(|result| {
                    (result.map(drop)).map_err(|e| AppendFailure::Storage(e.to_string()))
                })
            }
        }
    }

    /// Up to `max` entries of `queue` from `group`'s committed offset on; waits up to
    /// `wait` for one when there are none.
    pub async fn pull(
        &self,
        queue: &str,
        group: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Pulled, QueueStoreError> {
        match self {
            Self::Local(hub) => {
                let (first, _) = hub.log.bounds(queue)?;
                let from = hub.log.committed(queue, group)?.max(first);
                let mut read = hub.read(queue, from, max).await?;
                if read.entries.is_empty() && !wait.is_zero() {
                    if let Some(mut next) = hub.watch(queue) {
                        let arrived = next.wait_for(|next| *next > read.next);
                        let _ = tokio::time::timeout(wait, arrived).await;
                    }
                    read = hub.read(queue, read.next, max).await?;
                }
                let messages = super::events(queue, read.entries).collect();
                Ok(Pulled {
                    messages,
                    next: read.next,
                })
            }
            Self::JetStream(cluster) => {
                let (first, _) = cluster.queue_bounds(queue).await?;
                let from = cluster.committed(queue, group).await?.max(first);
                let entries = cluster.read_queue(queue, from, max, wait).await?;
                let next = entries.last().map_or(from, |e| e.offset + 1);
                let messages = (entries.iter())
                    .map(|e| (e.offset, e.payload.to_vec()))
                    .collect();
                Ok(Pulled { messages, next })
            }
        }
    }

    /// Commits `offset` (the next one to read) for `group`; returns the committed offset.
    pub async fn commit(
        &self,
        queue: &str,
        group: &str,
        offset: u64,
    ) -> Result<u64, QueueStoreError> {
        let past_the_end = |next| QueueStoreError::PastTheEnd {
            queue: queue.to_owned(),
            offset,
            next,
        };
        match self {
            Self::Local(hub) => {
                let log = hub.log.clone();
                let (_, next) = log.bounds(queue)?;
                if offset > next {
                    return Err(past_the_end(next));
                }
                let (queue, group) = (queue.to_owned(), group.to_owned());
                let committed =
                    tokio::task::spawn_blocking(move || log.commit(&queue, &group, offset));
                let committed = committed.await.map_err(|e| {
                    QueueStoreError::Unavailable(format!("commit interrupted: {e}"))
                })?;
                Ok(committed?)
            }
            Self::JetStream(cluster) => {
                let (_, next) = cluster.queue_bounds(queue).await?;
                if offset > next {
                    return Err(past_the_end(next));
                }
                Ok(cluster.commit(queue, group, offset).await?)
            }
        }
    }

    /// Sets the queue gauges (`switchboard_queue_*`) for a scrape.
    pub async fn update_gauges(&self, metrics: &Metrics) {
        match self {
            Self::Local(hub) => hub.update_gauges(metrics),
            Self::JetStream(cluster) => cluster.update_queue_gauges().await,
        }
    }
}

/// The first `count` results sent on `results` (fewer if the senders are dropped first).
async fn receive_all<T>(
    mut results: tokio::sync::mpsc::UnboundedReceiver<T>,
    count: usize,
) -> Vec<T> {
    let mut collected = Vec::with_capacity(count);
    while collected.len() < count {
        match results.recv().await {
            Some(result) => collected.push(result),
            None => break,
        }
    }
    collected
}

impl Keeper for QueueStore {
    fn keep<'a>(
        &'a self,
        room: &'a RoomName,
        entry: Vec<u8>,
        after: Option<u64>,
    ) -> BoxFuture<'a, Result<Option<u64>, NotKept>> {
        Box::pin(async move {
            match self {
                Self::Local(_) => {
                    let stored = self.append_raw(crate::rooms::history::QUEUE, vec![entry]);
                    let stored = stored.await.map_err(|e| NotKept::Failed(e.to_string()));
                    stored.map(|()| None)
                }
                Self::JetStream(cluster) => cluster.keep_history(room, entry, after).await,
            }
        })
    }

    fn load<'a>(&'a self, room: &'a RoomName) -> BoxFuture<'a, Result<Option<Stored>, NotKept>> {
        Box::pin(async move {
            match self {
                // Read back at start.
                Self::Local(_) => Ok(None),
                Self::JetStream(cluster) => cluster.load_history(room).await.map(Some),
            }
        })
    }
}
