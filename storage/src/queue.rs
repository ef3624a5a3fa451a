//! Durable queues: per queue an append-only log of entries with u64 offsets (segment
//! files, see [`crate::segments`]), consumer groups with committed offsets (sled),
//! retention by count, stored bytes and age.
//!
//! Appends from every shard go through one [`QueueLog`] writer thread that writes them in
//! batches, one write per queue per batch, and makes them durable according to the
//! [`FsyncPolicy`] (group commit); an append is answered with its offset only after the
//! sync that covers it, so an ack never runs ahead of the disk, and readers see an entry
//! only once it is durable. Reads use their own file handles and never wait for appends.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::StorageError;
pub use crate::segments::QueueEntry;
use crate::segments::{self, NewEntry, ReadPlan, Recovery, Segments};

/// Most append requests folded into one write batch.
const MAX_BATCH: usize = 8192;
/// A segment file is closed and a new one started past this size.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// The smallest segment (a queue with a small `max_bytes` rolls at a quarter of it).
const MIN_SEGMENT_BYTES: u64 = 4096;
/// How often the writer trims queues past their retention.
const TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// When appended entries are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Every batch the writer takes is flushed before its appends are answered.
    Always,
    /// Flush at most every `interval`; appends are answered after the flush that covers
    /// them (larger groups, higher ack latency).
    Batch { interval: Duration },
    /// Answer once applied; sled flushes in the background. A crash may lose acked entries.
    Never,
}

/// Retention of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    pub max_messages: Option<u64>,
    /// Stored bytes; whole segments go, oldest first (a queue with this set rolls its
    /// segments at a quarter of it).
    pub max_bytes: Option<u64>,
    pub max_age: Option<Duration>,
}

/// Called with the offset once the entry is durable (or with the error).
pub type AppendDone = Box<dyn FnOnce(Result<u64, StorageError>) + Send>;

/// Called after every flush with the queue and its next offset (wakes long-polls).
pub type Appended = Arc<dyn Fn(&str, u64) + Send + Sync>;

/// What the writer reports after each batch, for metrics.
#[derive(Debug, Clone, Copy)]
pub struct FlushReport {
    pub entries: usize,
    pub flush: Duration,
}

/// Called after each batch flush (metrics).
pub type OnFlush = Arc<dyn Fn(FlushReport) + Send + Sync>;

/// What [`QueueLog::read`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub entries: Vec<QueueEntry>,
    /// The offset to read on from: after the last entry, or past every offset checked.
    pub next: u64,
}

/// One append.
pub struct Append {
    pub queue: Arc<str>,
    /// Bytes this entry shares with others (for the gateway: the facts about the
    /// connection that sent it). Stored once per segment file however many entries carry
    /// it, and handed back with each of them.
    pub context: Option<Arc<[u8]>>,
    pub payload: Vec<u8>,
    /// Told the offset once the entry is durable, or the error.
    pub done: AppendDone,
}

enum Request {
    /// Appends in order; one request (one wake-up of the writer) for many.
    Append(Vec<Append>),
    Close(Sender<()>),
}

/// One queue's state, shared by the writer and readers.
struct QueueState {
    segments: RwLock<Segments>,
    retention: Retention,
    /// Segments roll past this size.
    segment_bytes: u64,
    /// The next offset to be assigned, published once everything before it is durable:
    /// readers see only durable entries.
    next: AtomicU64,
    /// The oldest offset retention keeps (reads start no earlier).
    first: AtomicU64,
}

impl QueueState {
    fn segments(&self) -> std::sync::RwLockReadGuard<'_, Segments> {
        self.segments.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn segments_mut(&self) -> std::sync::RwLockWriteGuard<'_, Segments> {
        self.segments
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// What opening the queue log found (for logs and metrics).
#[derive(Debug, Default, Clone)]
pub struct QueueRecovery {
    /// Bytes of torn writes cut from the ends of segments.
    pub truncated_bytes: u64,
    /// Corrupt segments cut where their corruption starts (`[storage] repair = true`).
    pub repaired: Vec<(PathBuf, u64)>,
    /// Entries moved from the earlier sled queue store.
    pub migrated: u64,
}

/// The queue log: reads from any thread, appends through the writer thread.
#[derive(Clone)]
pub struct QueueLog {
    queues: Arc<HashMap<Arc<str>, QueueState>>,
    /// `queue NUL group` → committed offset (the next one to read); `queue NUL` → the
    /// queue's next offset and `queue NUL NUL` its first, remembered by retention.
    groups: sled::Tree,
    requests: Sender<Request>,
    dir: PathBuf,
    recovery: Arc<QueueRecovery>,
}

impl QueueLog {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        db: &sled::Db,
        dir: PathBuf,
        queues: &[(String, Retention)],
        policy: FsyncPolicy,
        repair: bool,
        appended: Appended,
        on_flush: OnFlush,
    ) -> Result<Self, StorageError> {
        let sled_error = |e| StorageError::from_sled(&dir, e);
        let groups = db.open_tree("queue-groups").map_err(sled_error)?;
        let mut states = HashMap::new();
        let mut recovery = QueueRecovery::default();
        for (name, retention) in queues {
            let segment_bytes = retention.max_bytes.map_or(SEGMENT_BYTES, |max| {
                (max / 4).clamp(MIN_SEGMENT_BYTES, SEGMENT_BYTES)
            });
            let queue_dir = dir.join("queues").join(format!("q-{name}"));
            let (mut segments, found) =
                Segments::open(&queue_dir, repair).map_err(|error| open_error(&dir, error))?;
            segments.durable = policy != FsyncPolicy::Never;
            note_recovery(name, &found, &mut recovery);
            recovery.migrated += crate::migrate::sled_queue(db, name, &mut segments, segment_bytes)
                .map_err(|detail| StorageError::Engine {
                    dir: dir.clone(),
                    detail: format!("migrating queue {name} from sled: {detail}"),
                })?;
            let remembered = |key: Vec<u8>| -> Result<u64, StorageError> {
                Ok(groups
                    .get(key)
                    .map_err(|e| StorageError::from_sled(&dir, e))?
                    .as_deref()
                    .and_then(decode_offset)
                    .unwrap_or(0))
            };
            let end = segments.segments.last().map_or(0, |s| s.end);
            // Offsets never repeat: past what the segments hold, what retention remembered,
            // and what any consumer group committed (a reused offset would be skipped).
            let mut next = end;
            for item in groups.scan_prefix(group_key(name, "")) {
                let (_, offset) = item.map_err(|e| StorageError::from_sled(&dir, e))?;
                next = next.max(decode_offset(&offset).unwrap_or(0));
            }
            let oldest = segments.segments.first().map_or(next, |s| s.base);
            let first = oldest.max(remembered(first_key(name))?).min(next);
            states.insert(
                Arc::<str>::from(name.as_str()),
                QueueState {
                    segments: RwLock::new(segments),
                    retention: *retention,
                    segment_bytes,
                    next: AtomicU64::new(next),
                    first: AtomicU64::new(first),
                },
            );
        }
        let queues = Arc::new(states);
        let (requests, receiver) = crossbeam_channel::unbounded();
        let writer = Writer {
            unsynced: Default::default(),
            assigned: queues
                .iter()
                .map(|(name, state)| (name.clone(), state.next.load(Ordering::Acquire)))
                .collect(),
            queues: queues.clone(),
            groups: groups.clone(),
            policy,
            appended,
            on_flush,
            dir: dir.clone(),
        };
        // Retention applies from the start: a reopened log serves nothing it would drop.
        writer.trim();
        std::thread::Builder::new()
            .name("switchboard-queue-log".into())
            .spawn(move || writer.run(&receiver))
            .map_err(|reason| StorageError::Io {
                dir: dir.clone(),
                reason,
            })?;
        Ok(Self {
            queues,
            groups,
            requests,
            dir,
            recovery: Arc::new(recovery),
        })
    }

    /// What opening found: torn tails cut, corrupt segments repaired, entries migrated.
    pub fn recovery(&self) -> &QueueRecovery {
        &self.recovery
    }

    pub fn has_queue(&self, queue: &str) -> bool {
        self.queues.contains_key(queue)
    }

    /// Appends `payload` to `queue`; `done` gets its offset once durable.
    pub fn append(&self, queue: Arc<str>, payload: Vec<u8>, done: AppendDone) {
        self.append_many(vec![Append {
            queue,
            context: None,
            payload,
            done,
        }]);
    }

    /// Appends several entries, in order, with one hand-off to the writer thread.
    pub fn append_many(&self, appends: Vec<Append>) {
        if let Err(crossbeam_channel::SendError(Request::Append(appends))) =
            self.requests.send(Request::Append(appends))
        {
            for Append { done, .. } in appends {
                done(Err(StorageError::Engine {
                    dir: self.dir.clone(),
                    detail: "the queue log is closed".into(),
                }));
            }
        }
    }

    /// Up to `max` entries of `queue` from `from` on, in offset order, and where to read
    /// on from.
    pub fn read(&self, queue: &str, from: u64, max: usize) -> Result<Read, StorageError> {
        let waiting = |state: &QueueState, from| Some(state.segments().plan(from));
        match self.read_with(queue, from, max, waiting) {
            Some(read) => read,
            None => unreachable!("a read that waits for the index always gets it"),
        }
    }

    /// Like [`QueueLog::read`], but `None` instead of waiting while the writer holds the
    /// queue's index (starting a segment syncs the one before, which takes as long as the
    /// disk does): for callers that must not block, to read elsewhere then.
    pub fn try_read(
        &self,
        queue: &str,
        from: u64,
        max: usize,
    ) -> Option<Result<Read, StorageError>> {
        let at_once = |state: &QueueState, from| {
            let segments = state.segments.try_read().ok()?;
            Some(segments.plan(from))
        };
        self.read_with(queue, from, max, at_once)
    }

    fn read_with(
        &self,
        queue: &str,
        from: u64,
        max: usize,
        plan: impl FnOnce(&QueueState, u64) -> Option<Vec<ReadPlan>>,
    ) -> Option<Result<Read, StorageError>> {
        let Some(state) = self.queues.get(queue) else {
            return Some(Ok(Read {
                entries: Vec::new(),
                next: from,
            }));
        };
        let until = state.next.load(Ordering::Acquire);
        let from = from.max(state.first.load(Ordering::Acquire));
        // The plan holds file handles: segments dropped by retention meanwhile stay
        // readable until it is done.
        let plans = plan(state, from)?;
        let mut entries = Vec::new();
        for plan in plans {
            if entries.len() >= max {
                break;
            }
            let read = plan.read(from, until, max, &mut entries);
            if let Err(reason) = read {
                let dir = self.dir.clone();
                return Some(Err(StorageError::Io { dir, reason }));
            }
        }
        // Short of `max`, everything before `until` was seen: offsets a crash or a repair
        // left without entries are passed over, not waited for.
        let next = match entries.last() {
            Some(last) if entries.len() >= max => last.offset + 1,
            _ => until.max(from),
        };
        Some(Ok(Read { entries, next }))
    }

    /// The oldest retained offset and the next offset to be assigned.
    pub fn bounds(&self, queue: &str) -> Result<(u64, u64), StorageError> {
        let Some(state) = self.queues.get(queue) else {
            return Ok((0, 0));
        };
        let next = state.next.load(Ordering::Acquire);
        Ok((state.first.load(Ordering::Acquire).min(next), next))
    }

    /// Segment files and their bytes, per queue (for metrics).
    pub fn segment_stats(&self) -> Vec<(Arc<str>, usize, u64)> {
        self.queues
            .iter()
            .map(|(name, state)| {
                let segments = state.segments();
                (name.clone(), segments.segments.len(), segments.bytes())
            })
            .collect()
    }

    /// The committed offset of `group` on `queue` (0 if it never committed).
    pub fn committed(&self, queue: &str, group: &str) -> Result<u64, StorageError> {
        Ok(self.read_offset(&group_key(queue, group))?.unwrap_or(0))
    }

    /// Commits `offset` (the next to read) for `group`, durably. Never moves backwards,
    /// and never past the queue's end (offsets below a commit count as handed out).
    pub fn commit(&self, queue: &str, group: &str, offset: u64) -> Result<u64, StorageError> {
        let next = self.bounds(queue)?.1;
        if offset > next {
            return Err(StorageError::PastTheEnd {
                queue: queue.to_owned(),
                offset,
                next,
            });
        }
        let key = group_key(queue, group);
        let stored = self
            .groups
            .update_and_fetch(&key, |old| {
                let old = old.and_then(decode_offset).unwrap_or(0);
                Some(old.max(offset).to_be_bytes().to_vec())
            })
            .map_err(|e| StorageError::from_sled(&self.dir, e))?;
        self.groups
            .flush()
            .map_err(|e| StorageError::from_sled(&self.dir, e))?;
        Ok(stored.as_deref().and_then(decode_offset).unwrap_or(offset))
    }

    /// Every group that has committed on `queue`, with its offset.
    pub fn groups(&self, queue: &str) -> Result<Vec<(String, u64)>, StorageError> {
        let prefix = group_key(queue, "");
        self.groups
            .scan_prefix(&prefix)
            .map(|item| {
                let (key, value) = item.map_err(|e| StorageError::from_sled(&self.dir, e))?;
                let group = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                Ok((group, decode_offset(&value).unwrap_or(0)))
            })
            .filter(|g| !matches!(g, Ok((name, _)) if name.is_empty() || name.starts_with('\0')))
            .collect()
    }

    fn read_offset(&self, key: &[u8]) -> Result<Option<u64>, StorageError> {
        Ok(self
            .groups
            .get(key)
            .map_err(|e| StorageError::from_sled(&self.dir, e))?
            .as_deref()
            .and_then(decode_offset))
    }

    /// Stops the writer after it has written and synced every append sent so far.
    pub fn close(&self) {
        let (done, finished) = crossbeam_channel::bounded(1);
        if self.requests.send(Request::Close(done)).is_ok() {
            let _ = finished.recv();
        }
    }
}

fn open_error(dir: &Path, error: segments::OpenError) -> StorageError {
    match error {
        segments::OpenError::Io { reason, .. } => StorageError::Io {
            dir: dir.to_path_buf(),
            reason,
        },
        corrupt @ segments::OpenError::Corrupt { .. } => StorageError::Corrupt {
            dir: dir.to_path_buf(),
            detail: corrupt.to_string(),
        },
    }
}

fn note_recovery(queue: &str, found: &Recovery, total: &mut QueueRecovery) {
    if found.truncated_bytes > 0 {
        tracing::warn!(
            %queue,
            bytes = found.truncated_bytes,
            "cut a torn write from the end of the queue log (never an acknowledged entry)"
        );
    }
    for (path, position) in &found.repaired {
        tracing::error!(
            %queue,
            file = %path.display(),
            position,
            "repair: cut a corrupt queue segment; the entries after this point are lost"
        );
    }
    total.truncated_bytes += found.truncated_bytes;
    total.repaired.extend(found.repaired.iter().cloned());
}

fn group_key(queue: &str, group: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(queue.len() + group.len() + 1);
    key.extend_from_slice(queue.as_bytes());
    key.push(0);
    key.extend_from_slice(group.as_bytes());
    key
}

/// Where the next offset of a trimmed queue is remembered (an empty group name, which the
/// API never accepts).
fn next_key(queue: &str) -> Vec<u8> {
    group_key(queue, "")
}

/// Where the first retained offset is remembered.
fn first_key(queue: &str) -> Vec<u8> {
    group_key(queue, "\0")
}

fn decode_offset(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An append written and waiting for its answer: its queue, who to tell, its offset.
type Waiting = (Arc<str>, AppendDone, u64);

/// The writer thread's state.
struct Writer {
    queues: Arc<HashMap<Arc<str>, QueueState>>,
    /// The next offset to assign per queue (ahead of `next` until a sync publishes it).
    assigned: HashMap<Arc<str>, u64>,
    /// Queues written since their last sync: a sync touches only these.
    unsynced: std::collections::HashSet<Arc<str>>,
    /// Where retention remembers a queue's bounds.
    groups: sled::Tree,
    policy: FsyncPolicy,
    appended: Appended,
    on_flush: OnFlush,
    dir: PathBuf,
}

impl Writer {
    fn run(mut self, requests: &Receiver<Request>) {
        let mut waiting: Vec<Waiting> = Vec::new();
        // When the last sync started.
        let mut last_flush = Instant::now();
        let mut last_trim = Instant::now();
        let mut unflushed = 0usize;
        loop {
            let timeout = match (self.policy, waiting.is_empty()) {
                (FsyncPolicy::Batch { interval }, false) => {
                    interval.saturating_sub(last_flush.elapsed())
                }
                _ => TRIM_INTERVAL,
            };
            let first = match requests.recv_timeout(timeout) {
                Ok(request) => Some(request),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            if let (FsyncPolicy::Batch { interval }, Some(_)) = (self.policy, &first) {
                // Gather until the sync is due: one write per queue and one sync per
                // interval. Waking for every arrival instead costs a write and a thread
                // switch per shard turn, which on a busy machine halves the throughput.
                let due_in = interval.saturating_sub(last_flush.elapsed());
                if !due_in.is_zero() {
                    std::thread::sleep(due_in);
                }
            }
            let mut closing = None;
            let batch: Vec<Request> = first
                .into_iter()
                .chain(requests.try_iter().take(MAX_BATCH))
                .collect();
            let mut appends = Vec::with_capacity(batch.len());
            for request in batch {
                match request {
                    Request::Append(more) => appends.extend(more),
                    Request::Close(done) => closing = Some(done),
                }
            }
            unflushed += appends.len();
            waiting.extend(self.write(appends));
            let flush_due = match self.policy {
                FsyncPolicy::Always => !waiting.is_empty() || !self.unsynced.is_empty(),
                FsyncPolicy::Batch { interval } => last_flush.elapsed() >= interval,
                FsyncPolicy::Never => false,
            };
            if flush_due || (closing.is_some() && self.policy != FsyncPolicy::Never) {
                // "One sync every interval" counts from the start of a sync, so its own
                // duration is not added to the wait of the appends that arrive during it.
                last_flush = Instant::now();
                self.flush(&mut waiting, unflushed);
                unflushed = 0;
            } else if self.policy == FsyncPolicy::Never {
                self.answer(&mut waiting);
            }
            if last_trim.elapsed() >= TRIM_INTERVAL {
                self.trim();
                last_trim = Instant::now();
            }
            if let Some(done) = closing {
                self.sync_written();
                self.answer(&mut waiting);
                drop(self);
                let _ = done.send(());
                return;
            }
        }
        // Every handle is gone: make what was written durable and answer who still waits.
        match self.policy {
            FsyncPolicy::Never => {
                self.sync_written();
                self.answer(&mut waiting);
            }
            _ => self.flush(&mut waiting, 0),
        }
    }

    /// Assigns offsets and writes each queue's share of the batch with one write; returns
    /// who waits for what. Appends a queue could not write are answered with the error;
    /// the offsets they would have had go to the next batch.
    fn write(&mut self, appends: Vec<Append>) -> Vec<Waiting> {
        /// One queue's share, in arrival order: (arrival, context, payload, completion).
        type Share = Vec<(usize, Option<Arc<[u8]>>, Vec<u8>, AppendDone)>;
        let mut shares: HashMap<Arc<str>, Share> = HashMap::new();
        for (arrival, append) in appends.into_iter().enumerate() {
            if !self.assigned.contains_key(&append.queue) {
                (append.done)(Err(StorageError::Engine {
                    dir: self.dir.clone(),
                    detail: format!("no queue named {}", append.queue),
                }));
                continue;
            }
            if !segments::fits(append.context.as_deref(), &append.payload) {
                (append.done)(Err(StorageError::Engine {
                    dir: self.dir.clone(),
                    detail: format!(
                        "an entry of {} bytes is larger than queue {} can store",
                        append.payload.len(),
                        append.queue
                    ),
                }));
                continue;
            }
            let share = shares.entry(append.queue).or_default();
            share.push((arrival, append.context, append.payload, append.done));
        }
        let now = now_ms();
        let mut pending = Vec::new();
        for (queue, share) in shares {
            let (Some(state), Some(&first)) = (self.queues.get(&queue), self.assigned.get(&queue))
            else {
                continue;
            };
            let entries: Vec<NewEntry<'_>> = share
                .iter()
                .map(|(_, context, payload, _)| NewEntry {
                    appended_at_ms: now,
                    context: context.as_deref(),
                    payload,
                })
                .collect();
            let (written, result) =
                state
                    .segments_mut()
                    .append(first, &entries, state.segment_bytes);
            drop(entries);
            if written > 0 {
                self.assigned.insert(queue.clone(), first + written as u64);
            }
            if written > 0 || result.is_err() {
                // A failed write or roll may have cost earlier appends their sync: the next
                // flush finds out.
                self.unsynced.insert(queue.clone());
            }
            let mut share = share.into_iter();
            for ((arrival, _, _, done), offset) in share.by_ref().take(written).zip(first..) {
                pending.push((arrival, queue.clone(), done, offset));
            }
            if let Err(reason) = result {
                let error = StorageError::from_io(&self.dir, reason);
                tracing::error!(%queue, %error, "queue append failed; not acknowledged");
                for (_, _, _, done) in share {
                    done(Err(error.again()));
                }
            }
        }
        // Answered in the order the appends arrived, whatever their queues.
        pending.sort_unstable_by_key(|(arrival, ..)| *arrival);
        pending
            .into_iter()
            .map(|(_, queue, done, offset)| (queue, done, offset))
            .collect()
    }

    /// Syncs the queues written since their last sync, then answers the waiting appends:
    /// those of a queue whose sync failed with the error (what it wrote since its last
    /// good sync is forgotten and cut from its file: never acknowledged, never served, and
    /// its offsets go to the next appends), the others with their offsets.
    fn flush(&mut self, waiting: &mut Vec<Waiting>, entries: usize) {
        let started = Instant::now();
        let failed = self.sync_written();
        (self.on_flush)(FlushReport {
            entries,
            flush: started.elapsed(),
        });
        // Per failed queue: the error, and the first offset it forgot.
        let mut errors = HashMap::new();
        for (queue, reason) in failed {
            let error = StorageError::from_io(&self.dir, reason);
            tracing::error!(%queue, %error, "queue sync failed; its appends since the last sync are not acknowledged");
            let forgotten = self
                .queues
                .get(&queue)
                .and_then(|state| state.segments_mut().forget_unsynced());
            let assigned = self.assigned.get(&queue).copied().unwrap_or(0);
            let forgotten_from = forgotten.unwrap_or(assigned);
            self.assigned.insert(queue.clone(), forgotten_from);
            errors.insert(queue, (error, forgotten_from));
        }
        if !errors.is_empty() {
            // Appends before the forgotten ones were synced (by the start of a segment).
            let (failed, succeeded) =
                std::mem::take(waiting)
                    .into_iter()
                    .partition(|(queue, _, offset)| {
                        errors.get(queue).is_some_and(|(_, from)| offset >= from)
                    });
            *waiting = succeeded;
            for (queue, done, _) in failed {
                done(Err(errors[&queue].0.again()));
            }
        }
        self.answer(waiting);
    }

    /// Syncs every queue written since its last sync; returns those whose sync failed.
    fn sync_written(&mut self) -> Vec<(Arc<str>, std::io::Error)> {
        let mut failed = Vec::new();
        for queue in std::mem::take(&mut self.unsynced) {
            let Some(state) = self.queues.get(&queue) else {
                continue;
            };
            // The sync runs under the read lock (readers go on); the mark takes the write
            // lock only to note it.
            let result = state.segments().sync();
            match result {
                Ok(()) => state.segments_mut().mark_synced(),
                Err(reason) => failed.push((queue, reason)),
            }
        }
        failed
    }

    /// Publishes what was written (readers may now see it) and answers the appends.
    fn answer(&self, waiting: &mut Vec<Waiting>) {
        for (queue, state) in self.queues.iter() {
            if let Some(assigned) = self.assigned.get(queue) {
                state.next.store(*assigned, Ordering::Release);
            }
        }
        for (_, done, offset) in waiting.drain(..) {
            done(Ok(offset));
        }
        for (queue, state) in self.queues.iter() {
            (self.appended)(queue, state.next.load(Ordering::Acquire));
        }
    }

    /// Applies each queue's retention: moves its first offset (reads start there) and
    /// deletes whole segments past it, oldest first. A queue whose entries all expired
    /// loses every segment; its bounds are remembered so offsets never repeat.
    fn trim(&self) {
        let now = now_ms();
        for (name, state) in self.queues.iter() {
            let next = state.next.load(Ordering::Acquire);
            if self.assigned.get(name).is_some_and(|a| *a != next) {
                continue; // written but not yet durable: trim after the sync
            }
            let retention = state.retention;
            let mut first = state.first.load(Ordering::Acquire);
            if let Some(max) = retention.max_messages {
                first = first.max(next.saturating_sub(max));
            }
            let cutoff = retention
                .max_age
                .map(|age| now.saturating_sub(age.as_millis() as u64));
            // Only this thread changes the segments: what the read lock shows stays true
            // until the write lock drops the doomed ones.
            let segments = state.segments();
            let all_expired = cutoff.is_some_and(|cutoff| {
                segments
                    .segments
                    .last()
                    .is_none_or(|s| s.newest_ms < cutoff)
            });
            if all_expired {
                first = next;
            }
            let doomed = segments.expired(
                |segment, stored| {
                    segment.end <= first
                        || cutoff.is_some_and(|cutoff| segment.newest_ms < cutoff)
                        || retention.max_bytes.is_some_and(|max| stored > max)
                },
                all_expired || first >= next,
            );
            let first = segments
                .segments
                .get(doomed)
                .map_or(next, |oldest_kept| first.max(oldest_kept.base));
            drop(segments);
            if first == state.first.load(Ordering::Acquire) && doomed == 0 {
                continue;
            }
            // Durable before any segment goes: the bounds are all that is left of a queue
            // whose segments all went, and offsets must never repeat after a crash.
            if let Err(error) = self.remember_bounds(name, first, next) {
                tracing::error!(queue = %name, %error, "cannot remember the queue's bounds; retention waits");
                continue;
            }
            let freed = state.segments_mut().drop_oldest(doomed);
            state.first.store(first, Ordering::Release);
            tracing::debug!(queue = %name, first, freed, "applied queue retention");
        }
    }

    /// Stores a queue's first and next offsets, durably.
    fn remember_bounds(&self, queue: &str, first: u64, next: u64) -> sled::Result<()> {
        self.groups.insert(next_key(queue), &next.to_be_bytes())?;
        self.groups.insert(first_key(queue), &first.to_be_bytes())?;
        self.groups.flush()?;
        Ok(())
    }
}
