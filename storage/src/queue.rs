//! Durable queues: per queue an append-only log of entries with u64 offsets, consumer
//! groups with committed offsets, retention by count, stored bytes and age.
//!
//! Appends from every shard go through one [`QueueLog`] writer thread that applies them
//! to sled in batches and flushes according to the [`FsyncPolicy`] (group commit); an
//! append is answered with its offset only after the flush that covers it, so an ack
//! never runs ahead of the disk.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::StorageError;

/// Most appends folded into one sled batch.
const MAX_BATCH: usize = 8192;
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
    /// Stored bytes (encoded segments); the oldest segments go first.
    pub max_bytes: Option<u64>,
    pub max_age: Option<Duration>,
}

/// Bytes of every stored segment of a queue (one scan, at open).
fn stored_bytes(entries: &sled::Tree) -> u64 {
    entries
        .iter()
        .values()
        .filter_map(Result::ok)
        .map(|value| value.len() as u64)
        .sum()
}

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct QueueEntry {
    pub offset: u64,
    /// Epoch milliseconds when it was appended.
    pub appended_at_ms: u64,
    /// The event JSON, as a backend would receive it.
    pub payload: Vec<u8>,
}

/// The entries of one queue written by one batch, stored as one sled value under the
/// first entry's offset. One insert per batch instead of one per entry: sled copies a leaf
/// on every insert, so per-entry keys made the copy, not the disk, the bottleneck.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Segment {
    entries: Vec<QueueEntry>,
}

impl Segment {
    fn encode(&self) -> Vec<u8> {
        rkyv::to_bytes::<rkyv::rancor::Error>(self)
            .map(|bytes| bytes.to_vec())
            .unwrap_or_default()
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        rkyv::from_bytes::<Self, rkyv::rancor::Error>(&aligned).map_err(|e| e.to_string())
    }

    /// The offset after this segment's last entry.
    fn end(&self) -> Option<u64> {
        self.entries.last().map(|e| e.offset + 1)
    }
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

/// One append: the queue, the payload, and who to tell.
pub type Append = (Arc<str>, Vec<u8>, AppendDone);

enum Request {
    /// Appends in order; one request (one wake-up of the writer) for many.
    Append(Vec<Append>),
    Close(Sender<()>),
}

/// One queue's state.
struct QueueTrees {
    /// first offset (big-endian) → rkyv [`Segment`].
    entries: sled::Tree,
    retention: Retention,
    /// The next offset to assign. Stored by the writer thread after each batch is applied,
    /// so readers learn a queue's end without decoding its last segment.
    next: AtomicU64,
    /// Bytes of stored segments, kept by the writer for retention by size.
    stored_bytes: AtomicU64,
}

/// The queue log: reads from any thread, appends through the writer thread.
#[derive(Clone)]
pub struct QueueLog {
    queues: Arc<HashMap<Arc<str>, QueueTrees>>,
    /// `queue NUL group` → committed offset (the next one to read).
    groups: sled::Tree,
    requests: Sender<Request>,
    dir: PathBuf,
}

impl QueueLog {
    pub(crate) fn open(
        db: &sled::Db,
        dir: PathBuf,
        queues: &[(String, Retention)],
        policy: FsyncPolicy,
        appended: Appended,
        on_flush: OnFlush,
    ) -> Result<Self, StorageError> {
        let sled_error = |e| StorageError::from_sled(&dir, e);
        let groups = db.open_tree("queue-groups").map_err(sled_error)?;
        let mut trees = HashMap::new();
        for (name, retention) in queues {
            let entries = db.open_tree(format!("queue/{name}")).map_err(sled_error)?;
            let after_last = match entries.last().map_err(sled_error)? {
                Some((key, value)) => Segment::decode(&value)
                    .ok()
                    .and_then(|segment| segment.end())
                    .unwrap_or(offset_of(&key) + 1),
                None => 0,
            };
            // A queue that retention emptied remembers its next offset in the groups tree.
            let remembered = groups
                .get(next_key(name))
                .map_err(sled_error)?
                .as_deref()
                .and_then(decode_offset)
                .unwrap_or(0);
            let stored = stored_bytes(&entries);
            trees.insert(
                Arc::<str>::from(name.as_str()),
                QueueTrees {
                    entries,
                    retention: *retention,
                    next: AtomicU64::new(after_last.max(remembered)),
                    stored_bytes: AtomicU64::new(stored),
                },
            );
        }
        let queues = Arc::new(trees);
        let (requests, receiver) = crossbeam_channel::unbounded();
        let writer = Writer {
            db: db.clone(),
            queues: queues.clone(),
            groups: groups.clone(),
            policy,
            appended,
            on_flush,
            dir: dir.clone(),
        };
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
        })
    }

    pub fn has_queue(&self, queue: &str) -> bool {
        self.queues.contains_key(queue)
    }

    /// Appends `payload` to `queue`; `done` gets its offset once durable.
    pub fn append(&self, queue: Arc<str>, payload: Vec<u8>, done: AppendDone) {
        self.append_many(vec![(queue, payload, done)]);
    }

    /// Appends several entries, in order, with one hand-off to the writer thread.
    pub fn append_many(&self, appends: Vec<Append>) {
        if let Err(crossbeam_channel::SendError(Request::Append(appends))) =
            self.requests.send(Request::Append(appends))
        {
            for (_, _, done) in appends {
                done(Err(StorageError::Engine {
                    dir: self.dir.clone(),
                    detail: "the queue log is closed".into(),
                }));
            }
        }
    }

    /// Up to `max` entries of `queue` from `from` on, in offset order.
    pub fn read(
        &self,
        queue: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<QueueEntry>, StorageError> {
        let Some(trees) = self.queues.get(queue) else {
            return Ok(Vec::new());
        };
        // Start at the segment that holds `from`: the last one keyed at or before it.
        let start = trees
            .entries
            .range(..=from.to_be_bytes())
            .next_back()
            .transpose()
            .map_err(|e| StorageError::from_sled(&self.dir, e))?
            .map_or(from, |(key, _)| offset_of(&key));
        let mut entries = Vec::new();
        for value in trees.entries.range(start.to_be_bytes()..).values() {
            let value = value.map_err(|e| StorageError::from_sled(&self.dir, e))?;
            let segment = self.decode(queue, &value)?;
            entries.extend(segment.entries.into_iter().filter(|e| e.offset >= from));
            if entries.len() >= max {
                entries.truncate(max);
                break;
            }
        }
        Ok(entries)
    }

    fn decode(&self, queue: &str, value: &[u8]) -> Result<Segment, StorageError> {
        Segment::decode(value).map_err(|detail| StorageError::Corrupt {
            dir: self.dir.clone(),
            detail: format!("queue {queue}: {detail}"),
        })
    }

    /// The oldest retained offset and the next offset to be assigned.
    pub fn bounds(&self, queue: &str) -> Result<(u64, u64), StorageError> {
        let Some(trees) = self.queues.get(queue) else {
            return Ok((0, 0));
        };
        let next = trees.next.load(Ordering::Acquire);
        let first = trees
            .entries
            .first()
            .map_err(|e| StorageError::from_sled(&self.dir, e))?
            .map_or(next, |(key, _)| offset_of(&key));
        Ok((first, next))
    }

    /// The committed offset of `group` on `queue` (0 if it never committed).
    pub fn committed(&self, queue: &str, group: &str) -> Result<u64, StorageError> {
        Ok(self.read_offset(&group_key(queue, group))?.unwrap_or(0))
    }

    /// Commits `offset` (the next to read) for `group`, durably. Never moves backwards.
    pub fn commit(&self, queue: &str, group: &str, offset: u64) -> Result<u64, StorageError> {
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
            .filter(|g| !matches!(g, Ok((name, _)) if name.is_empty()))
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

    /// Stops the writer after it has written and flushed every append sent so far.
    pub fn close(&self) {
        let (done, finished) = crossbeam_channel::bounded(1);
        if self.requests.send(Request::Close(done)).is_ok() {
            let _ = finished.recv();
        }
    }
}

fn group_key(queue: &str, group: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(queue.len() + group.len() + 1);
    key.extend_from_slice(queue.as_bytes());
    key.push(0);
    key.extend_from_slice(group.as_bytes());
    key
}

/// Where the next offset of a fully trimmed queue is remembered (an empty group name,
/// which the API never accepts).
fn next_key(queue: &str) -> Vec<u8> {
    group_key(queue, "")
}

fn offset_of(key: &[u8]) -> u64 {
    decode_offset(key).unwrap_or(0)
}

fn decode_offset(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One queue's share of a write batch: its segment and, in arrival order, each entry's
/// (arrival index, completion).
type QueueBatch = (Segment, Vec<(usize, AppendDone)>);

/// The writer thread's state.
struct Writer {
    db: sled::Db,
    queues: Arc<HashMap<Arc<str>, QueueTrees>>,
    /// Where a trimmed-empty queue's next offset is remembered.
    groups: sled::Tree,
    policy: FsyncPolicy,
    appended: Appended,
    on_flush: OnFlush,
    dir: PathBuf,
}

impl Writer {
    fn run(mut self, requests: &Receiver<Request>) {
        let mut waiting: Vec<(AppendDone, u64)> = Vec::new();
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
                FsyncPolicy::Always => !waiting.is_empty(),
                FsyncPolicy::Batch { interval } => last_flush.elapsed() >= interval,
                FsyncPolicy::Never => false,
            };
            if flush_due || (closing.is_some() && self.policy != FsyncPolicy::Never) {
                self.flush(&mut waiting, unflushed);
                unflushed = 0;
                last_flush = Instant::now();
            } else if self.policy == FsyncPolicy::Never {
                self.answer(&mut waiting);
            }
            if last_trim.elapsed() >= TRIM_INTERVAL {
                self.trim();
                last_trim = Instant::now();
            }
            if let Some(done) = closing {
                let _ = self.db.flush();
                self.answer(&mut waiting);
                // Release the database before answering, so the caller may reopen it.
                drop(self);
                let _ = done.send(());
                return;
            }
        }
        let _ = self.db.flush();
    }

    /// Assigns offsets and stores one segment per queue; returns who waits for what. A
    /// queue whose segment cannot be stored answers its appends with the error and keeps
    /// its offsets for the next batch.
    fn write(&mut self, appends: Vec<Append>) -> Vec<(AppendDone, u64)> {
        let mut batches: HashMap<Arc<str>, QueueBatch> = HashMap::new();
        let now = now_ms();
        for (arrival, (queue, payload, done)) in appends.into_iter().enumerate() {
            let Some(trees) = self.queues.get(&queue) else {
                done(Err(StorageError::Engine {
                    dir: self.dir.clone(),
                    detail: format!("no queue named {queue}"),
                }));
                continue;
            };
            let (segment, waiting) = batches.entry(queue).or_insert_with(|| {
                (
                    Segment {
                        entries: Vec::new(),
                    },
                    Vec::new(),
                )
            });
            // Only this thread assigns offsets; readers see the new end once it is stored.
            let offset = segment
                .end()
                .unwrap_or_else(|| trees.next.load(Ordering::Acquire));
            segment.entries.push(QueueEntry {
                offset,
                appended_at_ms: now,
                payload,
            });
            waiting.push((arrival, done));
        }
        let mut pending = Vec::new();
        for (queue, (segment, waiting)) in batches {
            let (Some(trees), Some(first), Some(end)) = (
                self.queues.get(&queue),
                segment.entries.first().map(|e| e.offset),
                segment.end(),
            ) else {
                continue;
            };
            let encoded = segment.encode();
            let size = encoded.len() as u64;
            match trees.entries.insert(first.to_be_bytes(), encoded) {
                Ok(_) => {
                    trees.next.store(end, Ordering::Release);
                    trees.stored_bytes.fetch_add(size, Ordering::Relaxed);
                    pending.extend(
                        waiting
                            .into_iter()
                            .zip(first..end)
                            .map(|((arrival, done), offset)| (arrival, done, offset)),
                    );
                }
                Err(error) => {
                    let error = StorageError::from_sled(&self.dir, error);
                    tracing::error!(%queue, %error, "queue append failed");
                    for (_, done) in waiting {
                        done(Err(error.again()));
                    }
                }
            }
        }
        // Answered in the order the appends arrived, whatever their queues.
        pending.sort_unstable_by_key(|(arrival, _, _)| *arrival);
        pending
            .into_iter()
            .map(|(_, done, offset)| (done, offset))
            .collect()
    }

    fn flush(&self, waiting: &mut Vec<(AppendDone, u64)>, entries: usize) {
        let started = Instant::now();
        let result = self.db.flush();
        (self.on_flush)(FlushReport {
            entries,
            flush: started.elapsed(),
        });
        match result {
            Ok(_) => self.answer(waiting),
            Err(error) => {
                let error = StorageError::from_sled(&self.dir, error);
                tracing::error!(%error, "queue flush failed; appends are not acknowledged");
                for (done, _) in waiting.drain(..) {
                    done(Err(error.again()));
                }
            }
        }
    }

    fn answer(&self, waiting: &mut Vec<(AppendDone, u64)>) {
        for (done, offset) in waiting.drain(..) {
            done(Ok(offset));
        }
        for (queue, trees) in self.queues.iter() {
            (self.appended)(queue, trees.next.load(Ordering::Acquire));
        }
    }

    /// Drops segments wholly past each queue's retention (a segment goes when its newest
    /// entry does); remembers the next offset of a queue that becomes empty so offsets
    /// never repeat.
    fn trim(&self) {
        let now = now_ms();
        for (name, trees) in self.queues.iter() {
            let next = trees.next.load(Ordering::Acquire);
            let keep_from = trees
                .retention
                .max_messages
                .map_or(0, |max| next.saturating_sub(max));
            let cutoff = trees
                .retention
                .max_age
                .map(|age| now.saturating_sub(age.as_millis() as u64));
            let stored = trees.stored_bytes.load(Ordering::Relaxed);
            let mut excess_bytes = trees
                .retention
                .max_bytes
                .map_or(0, |max| stored.saturating_sub(max));
            let mut batch = sled::Batch::default();
            let mut removed = 0;
            let mut freed = 0u64;
            for item in trees.entries.iter() {
                let Ok((key, value)) = item else {
                    break;
                };
                let Ok(segment) = Segment::decode(&value) else {
                    break;
                };
                let too_old = cutoff.is_some_and(|cutoff| {
                    segment
                        .entries
                        .last()
                        .is_some_and(|e| e.appended_at_ms < cutoff)
                });
                let too_many = segment.end().is_some_and(|end| end <= keep_from);
                let too_big = excess_bytes > 0;
                if too_old || too_many || too_big {
                    batch.remove(key);
                    removed += 1;
                    freed += value.len() as u64;
                    excess_bytes = excess_bytes.saturating_sub(value.len() as u64);
                    continue;
                }
                // The segment that straddles a limit keeps only its retained entries.
                let kept: Vec<QueueEntry> = segment
                    .entries
                    .into_iter()
                    .filter(|e| {
                        e.offset >= keep_from && cutoff.is_none_or(|c| e.appended_at_ms >= c)
                    })
                    .collect();
                if let Some(first) = kept.first().map(|e| e.offset) {
                    if first != offset_of(&key) {
                        let rewritten = Segment { entries: kept }.encode();
                        freed += (value.len() as u64).saturating_sub(rewritten.len() as u64);
                        batch.remove(key);
                        batch.insert(&first.to_be_bytes(), rewritten);
                        removed += 1;
                    }
                }
                break;
            }
            if removed > 0 {
                let _ = trees.entries.apply_batch(batch);
                trees
                    .stored_bytes
                    .fetch_sub(freed.min(stored), Ordering::Relaxed);
                let _ = self.groups.insert(next_key(name), &next.to_be_bytes());
                tracing::debug!(queue = %name, removed, "trimmed queue segments");
            }
        }
    }
}
