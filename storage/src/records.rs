//! Connection records (one per open connection, so that a crash can be reconciled at the
//! next start: `$disconnect` for every connection it cut) and room memberships.
//!
//! Shards never touch the disk: they collect changes in a [`RecordChanges`] (coalesced by
//! key) and hand them to a [`RecordWriter`], whose thread appends what it has been handed to
//! the record log ([`crate::record_log`]) as one write per wake-up, synced within
//! [`SYNC_WITHIN`]. The hand-off channel is bounded; a shard whose hand-off finds it full
//! keeps coalescing and offers again later.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use crate::record_log::{ConnectionRecord, Entry, RecordLog};

/// Most hand-offs folded into one write.
const MAX_BATCH: usize = 64;
/// How long appended changes may wait for their `fdatasync`.
const SYNC_WITHIN: Duration = Duration::from_millis(200);
/// Past this size, the log is compacted once most of its entries say nothing any more.
const COMPACT_ABOVE: u64 = 64 << 20;

/// Told once changes are in the record log, or why they could not be written. Written is
/// not yet synced: the entries outlive the process (a crash, `kill -9`) at once, and a
/// machine's crash once synced, within [`SYNC_WITHIN`].
pub type Written = Box<dyn FnOnce(Result<(), String>) + Send>;

/// Record changes not yet handed to the writer, coalesced by key: the last change to a
/// connection or a membership wins. Its size is bounded by the state it describes (open
/// connections, their rooms, connections closed since the last hand-off), never by how
/// often a client toggles a room, so a writer that falls behind costs no unbounded memory.
#[derive(Default)]
pub struct RecordChanges {
    /// connectionId → the record to store, or `None` to remove it.
    connections: HashMap<String, Option<ConnectionRecord>>,
    /// membership key → joined (true) or left (false).
    memberships: HashMap<Vec<u8>, bool>,
    /// Who waits for these changes to be written (a connection's record before its
    /// `$connect` runs).
    waiting: Vec<Written>,
}

impl std::fmt::Debug for RecordChanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordChanges")
            .field("connections", &self.connections)
            .field("memberships", &self.memberships)
            .field("waiting", &self.waiting.len())
            .finish()
    }
}

impl RecordChanges {
    /// Records an open connection.
    pub fn upsert(&mut self, record: ConnectionRecord) {
        self.connections
            .insert(record.connection_id.clone(), Some(record));
    }

    /// Forgets a connection that has closed and been reported to `$disconnect`.
    pub fn remove(&mut self, connection_id: String) {
        self.connections.insert(connection_id, None);
    }

    /// Records that `connection_id` is in `room`.
    pub fn join(&mut self, room: &str, connection_id: &str) {
        self.memberships
            .insert(membership_key(room, connection_id), true);
    }

    /// Records that `connection_id` left `room` (or disconnected).
    pub fn leave(&mut self, room: &str, connection_id: &str) {
        self.memberships
            .insert(membership_key(room, connection_id), false);
    }

    /// Tells `written` once these changes (and the ones coalesced with them) are written.
    pub fn when_written(&mut self, written: Written) {
        self.waiting.push(written);
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty() && self.memberships.is_empty() && self.waiting.is_empty()
    }

    /// Folds `newer` in; its changes win.
    pub fn absorb(&mut self, newer: RecordChanges) {
        self.connections.extend(newer.connections);
        self.memberships.extend(newer.memberships);
        self.waiting.extend(newer.waiting);
    }

    /// The changes as record log entries, appended to `entries`; who waits for them, to
    /// `waiting`.
    fn into_entries(self, entries: &mut Vec<Entry>, waiting: &mut Vec<Written>) {
        waiting.extend(self.waiting);
        entries.extend(
            self.connections
                .into_iter()
                .map(|(id, record)| match record {
                    Some(record) => Entry::Record(record),
                    None => Entry::Remove(id),
                }),
        );
        entries.extend(
            (self.memberships.into_iter()).map(|(key, joined)| match joined {
                true => Entry::Join(key),
                false => Entry::Leave(key),
            }),
        );
    }
}

enum Request {
    Apply(RecordChanges),
    /// Apply everything before this, flush, answer, and stop.
    Close(Sender<()>),
}

/// Hand-offs waiting for the writer. Full: the sender keeps coalescing (see
/// [`RecordWriter::try_apply`]).
const QUEUED_HANDOFFS: usize = 64;

/// Handle to the batching writer thread. Cloning is cheap; [`RecordWriter::close`] drains
/// every pending change and flushes.
#[derive(Clone)]
pub struct RecordWriter {
    requests: Sender<Request>,
    /// Why the last write failed, until one succeeds (written again every
    /// [`SYNC_WITHIN`] meanwhile).
    failing: Failing,
}

/// Why the record log's last write failed, if it did: set by the writer thread, read by
/// anyone.
#[derive(Clone, Default)]
struct Failing(std::sync::Arc<std::sync::Mutex<Option<String>>>);

impl Failing {
    fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|failing| failing.clone())
    }

    fn set(&self, why: Option<String>) {
        if let Ok(mut failing) = self.0.lock() {
            *failing = why;
        }
    }
}

impl RecordWriter {
    pub(crate) fn spawn(log: RecordLog, dir: PathBuf) -> Self {
        let (requests, receiver) = crossbeam_channel::bounded(QUEUED_HANDOFFS);
        let failing = Failing::default();
        let writer = Writer {
            log,
            dir,
            failing: failing.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("switchboard-records".into())
            .spawn(move || writer.run(&receiver));
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the connection record writer");
        }
        Self { requests, failing }
    }

    /// Why the record log cannot be written now (a full disk), if it cannot.
    pub fn failing(&self) -> Option<String> {
        self.failing.get()
    }

    /// Hands `changes` to the writer without waiting; if it is behind, they come back to
    /// be coalesced with later ones and offered again.
    pub fn try_apply(&self, changes: RecordChanges) -> Result<(), RecordChanges> {
        match self.requests.try_send(Request::Apply(changes)) {
            Err(TrySendError::Full(Request::Apply(changes))) => Err(changes),
            _ => Ok(()),
        }
    }

    /// Hands `changes` to the writer, waiting for room (threads that may block only).
    pub fn apply(&self, changes: RecordChanges) {
        let _ = self.requests.send(Request::Apply(changes));
    }

    /// Stops the writer after it has applied and flushed everything sent so far; later
    /// changes are dropped. Blocks until the flush is done.
    pub fn close(&self) {
        let (done, finished) = crossbeam_channel::bounded(1);
        if self.requests.send(Request::Close(done)).is_ok() {
            let _ = finished.recv();
        }
    }
}

/// `room NUL connectionId`: members of a room are one prefix scan.
pub(crate) fn membership_key(room: &str, connection_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(room.len() + 1 + connection_id.len());
    key.extend_from_slice(room.as_bytes());
    key.push(0);
    key.extend_from_slice(connection_id.as_bytes());
    key
}

/// The writer thread's state.
struct Writer {
    log: RecordLog,
    dir: PathBuf,
    failing: Failing,
}

impl Writer {
    fn run(mut self, requests: &Receiver<Request>) {
        let mut closed_by = None;
        // When the oldest change not yet synced was appended (or a failed write is to be
        // tried again).
        let mut unsynced_since: Option<Instant> = None;
        while closed_by.is_none() {
            let first = match unsynced_since {
                None => requests.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(since) => requests.recv_timeout(SYNC_WITHIN.saturating_sub(since.elapsed())),
            };
            let first = match first {
                Ok(request) => request,
                Err(RecvTimeoutError::Timeout) => {
                    let written = self.failing.get().is_none() || self.append(&[]).is_ok();
                    self.sync();
                    unsynced_since = (!written).then(Instant::now);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let (mut entries, mut waiting) = (Vec::new(), Vec::new());
            for request in std::iter::once(first).chain(requests.try_iter().take(MAX_BATCH - 1)) {
                match request {
                    Request::Apply(changes) => changes.into_entries(&mut entries, &mut waiting),
                    Request::Close(done) => {
                        closed_by = Some(done);
                        break;
                    }
                }
            }
            let appended = self.append(&entries);
            for written in waiting {
                written(appended.clone());
            }
            unsynced_since.get_or_insert_with(Instant::now);
            if unsynced_since.is_some_and(|since| since.elapsed() >= SYNC_WITHIN) {
                self.sync();
                unsynced_since = None;
            }
            if self.log.is_due(COMPACT_ABOVE)
                && let Err(error) = self.log.compact()
            {
                tracing::error!(dir = %self.dir.display(), %error, "record log compaction failed");
            }
        }
        self.sync();
        // Release the log before answering, so the caller may reopen it.
        drop(self.log);
        if let Some(done) = closed_by {
            let _ = done.send(());
        }
    }

    /// Appends `entries` (after what failed to be written before); notes the outcome for
    /// [`RecordWriter::failing`].
    fn append(&mut self, entries: &[Entry]) -> Result<(), String> {
        let appended = self.log.append(entries).map_err(|error| error.to_string());
        let now_failing = appended.as_ref().err().cloned();
        match &now_failing {
            Some(error) => {
                tracing::error!(dir = %self.dir.display(), %error, count = entries.len(), "record write failed")
            }
            None if self.failing.get().is_some() => {
                tracing::info!(dir = %self.dir.display(), "record log written again")
            }
            None => {}
        }
        self.failing.set(now_failing);
        appended
    }

    fn sync(&mut self) {
        if let Err(error) = self.log.sync() {
            tracing::error!(dir = %self.dir.display(), %error, "record log sync failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_coalesce_by_key() {
        let mut changes = RecordChanges::default();
        for _ in 0..10_000 {
            changes.join("room", "a");
            changes.leave("room", "a");
        }
        changes.join("room", "b");
        assert_eq!(changes.memberships.len(), 2);
        assert!(!changes.memberships[&membership_key("room", "a")]);
        let mut newer = RecordChanges::default();
        newer.join("room", "a");
        changes.absorb(newer);
        assert!(changes.memberships[&membership_key("room", "a")]);
    }
}
