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

/// Record changes not yet handed to the writer, coalesced by key: the last change to a
/// connection or a membership wins. Its size is bounded by the state it describes (open
/// connections, their rooms, connections closed since the last hand-off), never by how
/// often a client toggles a room, so a writer that falls behind costs no unbounded memory.
#[derive(Debug, Default)]
pub struct RecordChanges {
    /// connectionId → the record to store, or `None` to remove it.
    connections: HashMap<String, Option<ConnectionRecord>>,
    /// membership key → joined (true) or left (false).
    memberships: HashMap<Vec<u8>, bool>,
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

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty() && self.memberships.is_empty()
    }

    /// Folds `newer` in; its changes win.
    pub fn absorb(&mut self, newer: RecordChanges) {
        self.connections.extend(newer.connections);
        self.memberships.extend(newer.memberships);
    }
    /// The changes as record log entries, appended to `entries`.
    fn into_entries(self, entries: &mut Vec<Entry>) {
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
}

impl RecordWriter {
    pub(crate) fn spawn(log: RecordLog, dir: PathBuf) -> Self {
        let (requests, receiver) = crossbeam_channel::bounded(QUEUED_HANDOFFS);
        let spawned = std::thread::Builder::new()
            .name("switchboard-records".into())
            .spawn(move || write_batches(log, &receiver, &dir));
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the connection record writer");
        }
        Self { requests }
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

fn write_batches(mut log: RecordLog, requests: &Receiver<Request>, dir: &std::path::Path) {
    let mut closed_by = None;
    // When the oldest change not yet synced was appended.
    let mut unsynced_since: Option<Instant> = None;
    while closed_by.is_none() {
        let first = match unsynced_since {
            None => requests.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(since) => requests.recv_timeout(SYNC_WITHIN.saturating_sub(since.elapsed())),
        };
        let first = match first {
            Ok(request) => request,
            Err(RecvTimeoutError::Timeout) => {
                sync(&mut log, dir);
                unsynced_since = None;
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut entries = Vec::new();
        for request in std::iter::once(first).chain(requests.try_iter().take(MAX_BATCH - 1)) {
            match request {
                Request::Apply(changes) => changes.into_entries(&mut entries),
                Request::Close(done) => {
                    closed_by = Some(done);
                    break;
                }
            }
        }
        if let Err(error) = log.append(&entries) {
            tracing::error!(dir = %dir.display(), %error, count = entries.len(), "record write failed");
        }
        unsynced_since.get_or_insert_with(Instant::now);
        if unsynced_since.is_some_and(|since| since.elapsed() >= SYNC_WITHIN) {
            sync(&mut log, dir);
            unsynced_since = None;
        }
        if log.is_due(COMPACT_ABOVE)
            && let Err(error) = log.compact()
        {
            tracing::error!(dir = %dir.display(), %error, "record log compaction failed");
        }
    }
    sync(&mut log, dir);
    // Release the log before answering, so the caller may reopen it.
    drop(log);
    if let Some(done) = closed_by {
        let _ = done.send(());
    }
}

fn sync(log: &mut RecordLog, dir: &std::path::Path) {
    if let Err(error) = log.sync() {
        tracing::error!(dir = %dir.display(), %error, "record log sync failed");
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
