//! Connection records (one per open connection, so that a crash can be reconciled at the
//! next start: `$disconnect` for every connection it cut) and room memberships.
//!
//! Shards never touch sled: they hand record changes to a [`RecordWriter`], whose thread
//! applies them as one sled batch per wake-up.

use crossbeam_channel::{Receiver, Sender};
use std::path::PathBuf;

/// Most changes folded into one sled batch.
const MAX_BATCH: usize = 4096;

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

enum Change {
    Upsert(ConnectionRecord),
    Remove(String),
    Join {
        room: String,
        connection_id: String,
    },
    Leave {
        room: String,
        connection_id: String,
    },
    /// Apply everything before this, flush, answer, and stop.
    Close(Sender<()>),
}

/// Handle to the batching writer thread. Cloning is cheap; [`RecordWriter::close`] drains
/// every pending change and flushes.
#[derive(Clone)]
pub struct RecordWriter {
    changes: Sender<Change>,
}

impl RecordWriter {
    pub(crate) fn spawn(trees: Trees, dir: PathBuf) -> Self {
        // Unbounded on purpose: each connection sends at most one upsert and one remove,
        // so the backlog is bounded by the connection limit, and a shard never blocks.
        let (changes, receiver) = crossbeam_channel::unbounded();
        let spawned = std::thread::Builder::new()
            .name("switchboard-records".into())
            .spawn(move || write_batches(trees, &receiver, &dir));
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the connection record writer");
        }
        Self { changes }
    }

    /// Records an open connection.
    pub fn upsert(&self, record: ConnectionRecord) {
        let _ = self.changes.send(Change::Upsert(record));
    }

    /// Forgets a connection that has closed and been reported to `$disconnect`.
    pub fn remove(&self, connection_id: String) {
        let _ = self.changes.send(Change::Remove(connection_id));
    }

    /// Records that `connection_id` is in `room`.
    pub fn join(&self, room: String, connection_id: String) {
        let _ = self.changes.send(Change::Join {
            room,
            connection_id,
        });
    }

    /// Records that `connection_id` left `room` (or disconnected).
    pub fn leave(&self, room: String, connection_id: String) {
        let _ = self.changes.send(Change::Leave {
            room,
            connection_id,
        });
    }

    /// Stops the writer after it has applied and flushed everything sent so far; later
    /// changes are dropped. Blocks until the flush is done.
    pub fn close(&self) {
        let (done, finished) = crossbeam_channel::bounded(1);
        if self.changes.send(Change::Close(done)).is_ok() {
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

fn write_batches(trees: Trees, changes: &Receiver<Change>, dir: &std::path::Path) {
    let mut closed_by = None;
    while closed_by.is_none() {
        let first = match changes.recv() {
            Ok(change) => change,
            Err(_) => break,
        };
        let mut batch = sled::Batch::default();
        let mut rooms = sled::Batch::default();
        let mut count = 0;
        for change in std::iter::once(first).chain(changes.try_iter().take(MAX_BATCH - 1)) {
            match change {
                Change::Upsert(record) => {
                    batch.insert(record.connection_id.as_bytes(), record.encode())
                }
                Change::Remove(id) => batch.remove(id.as_bytes()),
                Change::Join {
                    room,
                    connection_id,
                } => rooms.insert(membership_key(&room, &connection_id), &[]),
                Change::Leave {
                    room,
                    connection_id,
                } => rooms.remove(membership_key(&room, &connection_id)),
                Change::Close(done) => {
                    closed_by = Some(done);
                    break;
                }
            }
            count += 1;
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
