//! Connection records (one per open connection, so that a crash can be reconciled at the
//! next start: `$disconnect` for every connection it cut) and room memberships.
//!
//! Shards never touch sled: they collect changes in a [`RecordChanges`] (coalesced by key)
//! and hand them to a [`RecordWriter`], whose thread applies what it has been handed as one
//! sled batch per wake-up. The hand-off channel is bounded; a shard whose hand-off finds
//! it full keeps coalescing and offers again later.

use std::collections::HashMap;
use std::path::PathBuf;

use crossbeam_channel::{Receiver, Sender, TrySendError};

/// Most hand-offs folded into one sled batch.
const MAX_BATCH: usize = 64;

/// What is stored for an open connection (rkyv-encoded).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ConnectionRecord {
    pub connection_id: String,
    /// Epoch milliseconds of the handshake.
    pub connected_at_ms: u64,
    /// Epoch milliseconds of the last frame in either direction, as of the last write.
    pub last_active_at_ms: u64,
    pub source_ip: String,
    pub user_agent: String,
}

impl ConnectionRecord {
    fn encode(&self) -> Vec<u8> {
        rkyv::to_bytes::<rkyv::rancor::Error>(self)
            .map(|bytes| bytes.to_vec())
            .unwrap_or_default()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, String> {
        // sled values carry no alignment guarantee; rkyv needs one.
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        rkyv::from_bytes::<Self, rkyv::rancor::Error>(&aligned).map_err(|e| e.to_string())
    }
}

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
    pub(crate) fn spawn(trees: Trees, dir: PathBuf) -> Self {
        let (requests, receiver) = crossbeam_channel::bounded(QUEUED_HANDOFFS);
        let spawned = std::thread::Builder::new()
            .name("switchboard-records".into())
            .spawn(move || write_batches(trees, &receiver, &dir));
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

/// The trees the writer applies changes to.
pub(crate) struct Trees {
    pub(crate) connections: sled::Tree,
    pub(crate) rooms: sled::Tree,
}

/// `room NUL connectionId`: members of a room are one prefix scan.
pub(crate) fn membership_key(room: &str, connection_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(room.len() + 1 + connection_id.len());
    key.extend_from_slice(room.as_bytes());
    key.push(0);
    key.extend_from_slice(connection_id.as_bytes());
    key
}

fn write_batches(trees: Trees, requests: &Receiver<Request>, dir: &std::path::Path) {
    let mut closed_by = None;
    while closed_by.is_none() {
        let first = match requests.recv() {
            Ok(request) => request,
            Err(_) => break,
        };
        let mut batch = sled::Batch::default();
        let mut rooms = sled::Batch::default();
        let mut count = 0;
        for request in std::iter::once(first).chain(requests.try_iter().take(MAX_BATCH - 1)) {
            let changes = match request {
                Request::Apply(changes) => changes,
                Request::Close(done) => {
                    closed_by = Some(done);
                    break;
                }
            };
            for (id, record) in changes.connections {
                match record {
                    Some(record) => batch.insert(id.as_bytes(), record.encode()),
                    None => batch.remove(id.as_bytes()),
                }
                count += 1;
            }
            for (key, joined) in changes.memberships {
                if joined {
                    rooms.insert(key, &[]);
                } else {
                    rooms.remove(key);
                }
                count += 1;
            }
        }
        let applied = trees
            .connections
            .apply_batch(batch)
            .and_then(|()| trees.rooms.apply_batch(rooms));
        if let Err(error) = applied {
            tracing::error!(dir = %dir.display(), %error, count, "record batch failed");
        }
    }
    if let Err(error) = trees.connections.flush() {
        tracing::error!(dir = %dir.display(), %error, "final connection record flush failed");
    }
    // Release the database before answering, so the caller may reopen it.
    drop(trees);
    if let Some(done) = closed_by {
        let _ = done.send(());
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
