//! The one place a room's messages get their offsets: a node's [`RoomLog`]s, one per room
//! it sequences (every room on a single node; in cluster mode the rooms it owns).
//!
//! A room's log sits behind an async lock that is held from the moment a message gets its
//! offset until it is in every shard's mailbox (and, in cluster mode, handed to NATS). A
//! join's replay is read under the same lock. So every shard sees a room's messages in
//! offset order, and a member that joins sees each offset exactly once: those up to the
//! replay's top in the replay, the later ones live, after it (see `shard/rooms.rs`).
//!
//! A log that is forgotten (swept, or its room moved to another node) is marked retired
//! under its lock, so a caller that fetched it just before locks the new one instead.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

use super::RoomName;
use super::config::{RoomPolicy, RoomSettings};
use super::history::{Kept, RoomLog};

/// Why a durable room's message was not stored (or its history not read).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotKept {
    #[error("room history could not be stored: {0}")]
    Failed(String),
    /// Another node stored the room's messages meanwhile (cluster mode, while the nodes
    /// disagree for a moment on who owns the room): read it in again.
    #[error("room history was stored by another node meanwhile")]
    Conflict,
}

/// Where durable rooms' messages are stored before they are sent: one node, the queue log
/// ([`super::history::QUEUE`], read back at start); cluster mode, a JetStream stream with
/// one subject per room, read by the room's owner when it first uses the room.
pub trait Keeper: Send + Sync {
    /// Stores `entry` ([`super::history::Kept::to_entry`]) of `room` after the one stored at
    /// `after` (a compare-and-set where the store has one: another node that numbered the
    /// room meanwhile makes it fail); returns where it is stored, once it is durable.
    fn keep<'a>(
        &'a self,
        room: &'a RoomName,
        entry: Vec<u8>,
        after: Option<u64>,
    ) -> BoxFuture<'a, Result<Option<u64>, NotKept>>;

    /// `room`'s stored entries, oldest first, and where the last one is; `None` where the
    /// store was read back at start.
    fn load<'a>(&'a self, room: &'a RoomName) -> BoxFuture<'a, Result<Option<Stored>, NotKept>>;
}

/// A room's stored entries, oldest first, and where the last one is stored.
pub type Stored = (Vec<Vec<u8>>, Option<u64>);

type BoxFuture<'a, T> = futures_util::future::BoxFuture<'a, T>;

/// A room's log, locked.
pub type LockedLog = OwnedMutexGuard<RoomLog>;

/// A room's log and whether it was forgotten.
#[derive(Debug)]
struct Slot {
    log: Arc<tokio::sync::Mutex<RoomLog>>,
    retired: AtomicBool,
}

/// See the module documentation.
pub struct Sequencer {
    policy: RoomPolicy,
    logs: Mutex<HashMap<RoomName, Arc<Slot>>>,
    /// Starts every epoch this node makes, so two nodes or two runs never share one.
    epoch_prefix: String,
    /// Stores durable rooms' messages; set once storage is open.
    keeper: std::sync::OnceLock<Arc<dyn Keeper>>,
}

impl std::fmt::Debug for Sequencer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequencer")
            .field("epoch_prefix", &self.epoch_prefix)
            .finish_non_exhaustive()
    }
}

impl Sequencer {
    pub fn new(policy: RoomPolicy, node_id: u16, node_epoch: u32) -> Self {
        Self {
            policy,
            logs: Mutex::new(HashMap::new()),
            epoch_prefix: format!("{node_id:x}.{node_epoch:x}"),
            keeper: std::sync::OnceLock::new(),
        }
    }

    /// Where durable rooms' messages are stored from now on.
    pub fn keep_with(&self, keeper: Arc<dyn Keeper>) {
        let _ = self.keeper.set(keeper);
    }

    /// Where durable rooms' messages are stored, once storage is open.
    pub fn keeper(&self) -> Option<&Arc<dyn Keeper>> {
        self.keeper.get()
    }

    /// The settings of `room` (`[rooms]`, `[[rooms.class]]`).
    pub fn settings(&self, room: &RoomName) -> RoomSettings {
        self.policy.for_room(room)
    }

    /// `room`'s log, locked; a room first seen now starts a new epoch at offset 0, unless it
    /// is durable and its store has entries: then it goes on from them.
    pub async fn lock(&self, room: &RoomName) -> LockedLog {
        loop {
            let slot = self.slot(room);
            let mut log = slot.log.clone().lock_owned().await;
            if slot.retired.load(Ordering::Acquire) {
                continue;
            }
            if log.needs_loading() {
                self.load(room, &mut log).await;
            }
            return log;
        }
    }

    /// Reads a durable room's stored entries into its fresh log; a room that is not
    /// durable, or has nothing stored, keeps its new epoch. If the store cannot be read,
    /// the log stays unloaded (asked again next time), and storing into it will fail.
    async fn load(&self, room: &RoomName, log: &mut RoomLog) {
        let settings = self.policy.for_room(room);
        let keeper = self.keeper().filter(|_| settings.history_durable);
        let Some(keeper) = keeper else {
            log.mark_loaded();
            return;
        };
        match keeper.load(room).await {
            Ok(Some((entries, stored))) => {
                let now_ms = crate::clock::now_ms();
                match RoomLog::from_entries(entries, stored, now_ms, settings.history) {
                    Some(loaded) => *log = loaded,
                    None => {
                        log.stored_at(stored);
                        log.mark_loaded();
                    }
                }
            }
            Ok(None) => log.mark_loaded(),
            Err(error) => tracing::warn!(%room, %error, "durable room history not read"),
        }
    }

    /// What `want` asks of `room`'s past, read under the room's lock.
    pub async fn read(
        &self,
        room: &RoomName,
        want: &super::history::Want,
    ) -> super::history::Replay {
        let history = self.settings(room).history;
        self.lock(room)
            .await
            .read(want, crate::clock::now_ms(), history)
    }

    /// The most messages and the longest time any durable room keeps, if one does.
    pub fn durable_bounds(&self) -> Option<(usize, std::time::Duration)> {
        self.policy.durable_bounds()
    }

    /// The keeper, if `room` keeps its history durably.
    pub fn keeper_for(&self, room: &RoomName) -> Option<&Arc<dyn Keeper>> {
        self.keeper()
            .filter(|_| self.policy.for_room(room).history_durable)
    }

    fn slot(&self, room: &RoomName) -> Arc<Slot> {
        let mut logs = self.logs();
        logs.entry(room.clone())
            .or_insert_with(|| {
                let log = RoomLog::new(self.new_epoch(), crate::clock::now_ms());
                Arc::new(Slot {
                    log: Arc::new(tokio::sync::Mutex::new(log)),
                    retired: AtomicBool::new(false),
                })
            })
            .clone()
    }

    fn logs(&self) -> std::sync::MutexGuard<'_, HashMap<RoomName, Arc<Slot>>> {
        self.logs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Forgets the logs of the rooms `keep` does not keep (cluster mode: rooms another
    /// node sequences now; their next message here would start a new epoch).
    pub fn retain(&self, keep: impl Fn(&RoomName) -> bool) {
        self.logs().retain(|room, slot| {
            let kept = keep(room);
            if !kept {
                slot.retired.store(true, Ordering::Release);
            }
            kept
        });
    }

    /// A fresh epoch: this node and run, and 64 random bits.
    fn new_epoch(&self) -> String {
        let mut random = [0u8; 8];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random);
        format!("{}.{:016x}", self.epoch_prefix, u64::from_be_bytes(random))
    }

    /// Rebuilds the logs of durable rooms from their stored entries, oldest first: each
    /// room goes on in the epoch and after the offset of its last entry, keeping what its
    /// bound keeps at `now_ms` (an entry of a newer epoch starts the room's log anew).
    /// Entries are folded in one at a time, so only what the bounds keep is held.
    pub fn restore(&self, entries: impl IntoIterator<Item = Vec<u8>>, now_ms: u64) -> usize {
        let mut restored: HashMap<RoomName, RoomLog> = HashMap::new();
        for entry in entries {
            let Some((room, epoch, kept)) = Kept::from_entry(&entry) else {
                continue;
            };
            let bound = self.policy.for_room(&room).history;
            let log = (restored.entry(room))
                .or_insert_with(|| RoomLog::resumed(epoch.clone(), 0, Vec::new()));
            if log.epoch() != epoch {
                *log = RoomLog::resumed(epoch, 0, Vec::new());
            }
            log.restore(kept, now_ms, bound);
        }
        let rooms = restored.len();
        let mut logs = self.logs();
        for (room, mut log) in restored {
            log.mark_loaded();
            let slot = Slot {
                log: Arc::new(tokio::sync::Mutex::new(log)),
                retired: AtomicBool::new(false),
            };
            logs.insert(room, Arc::new(slot));
        }
        rooms
    }

    /// Drops the logs of rooms that keep nothing and have been quiet for their TTL (their
    /// next message starts a new epoch), so the logs of rooms used once do not pile up.
    pub fn sweep(&self, now_ms: u64) {
        self.logs().retain(|room, slot| {
            let settings = self.policy.for_room(room);
            let Ok(mut log) = slot.log.try_lock() else {
                return true;
            };
            if let Some(bound) = settings.history {
                log.prune(now_ms, bound);
            }
            let quiet = now_ms.saturating_sub(log.last_ms()) >= settings.history_ttl_ms;
            let forget = log.is_empty() && quiet;
            if forget {
                slot.retired.store(true, Ordering::Release);
            }
            !forget
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;

    fn policy(toml: &str) -> RoomPolicy {
        toml::from_str::<super::super::config::RawRooms>(toml)
            .unwrap()
            .validate()
            .unwrap()
    }

    fn rooms(sequencer: &Sequencer) -> usize {
        sequencer.logs().len()
    }

    #[tokio::test]
    async fn epochs_differ_between_rooms_and_runs() {
        let policy = || policy("");
        let (one, two) = (
            Sequencer::new(policy(), 1, 7),
            Sequencer::new(policy(), 1, 8),
        );
        let room = RoomName::parse("r").unwrap();
        let first = one.lock(&room).await.epoch().to_owned();
        assert_ne!(first, two.lock(&room).await.epoch());
        assert!(first.starts_with("1.7."));
        assert_eq!(first, one.lock(&room).await.epoch(), "one log per room");
    }

    #[tokio::test]
    async fn a_forgotten_log_is_not_used_by_a_caller_that_fetched_it() {
        let sequencer = Arc::new(Sequencer::new(policy(""), 0, 1));
        let room = RoomName::parse("r").unwrap();
        let held = sequencer.lock(&room).await;
        let first = held.epoch().to_owned();
        let waiter = {
            let (sequencer, room) = (sequencer.clone(), room.clone());
            tokio::spawn(async move { sequencer.lock(&room).await.epoch().to_owned() })
        };
        tokio::task::yield_now().await;
        sequencer.retain(|_| false);
        drop(held);
        assert_ne!(waiter.await.unwrap(), first, "the waiter got the new log");
    }

    #[tokio::test]
    async fn durable_rooms_go_on_from_their_stored_entries() {
        let policy = policy("history_size = 2");
        let room = RoomName::parse("r").unwrap();
        let kept = |offset: u64, epoch: &str| {
            let kept = Kept {
                offset,
                time_ms: 1_000,
                message: Message::text(format!("m{offset}")),
            };
            kept.to_entry(&room, epoch)
        };
        let entries = vec![kept(1, "old"), kept(1, "e"), kept(2, "e"), kept(3, "e")];
        let sequencer = Sequencer::new(policy, 0, 1);
        assert_eq!(sequencer.restore(entries, 2_000), 1);
        let mut log = sequencer.lock(&room).await;
        assert_eq!(log.epoch(), "e", "the last epoch");
        let bound = Some(super::super::config::HistoryBound {
            size: 2,
            ttl_ms: 3_600_000,
        });
        let replay = log.read(&super::super::history::Want::Last(9), 2_000, bound);
        let offsets: Vec<u64> = replay.messages.iter().map(|k| k.offset).collect();
        assert_eq!((replay.top, offsets), (3, vec![2, 3]));
        assert_eq!(log.append(Message::text("m4"), 2_000, bound), 4);
    }

    #[tokio::test]
    async fn quiet_empty_logs_are_swept_and_kept_ones_stay() {
        let policy = policy(
            "envelope = true\nhistory_ttl_secs = 10\n[[class]]\npattern = \"kept\"\nhistory_size = 5\n",
        );
        let (quiet, kept) = (
            RoomName::parse("quiet").unwrap(),
            RoomName::parse("kept").unwrap(),
        );
        let sequencer = Sequencer::new(policy.clone(), 0, 1);
        for (room, at) in [(&quiet, 1_000), (&kept, 5_000)] {
            let bound = policy.for_room(room).history;
            sequencer
                .lock(room)
                .await
                .append(Message::text("m"), at, bound);
        }
        sequencer.sweep(10_999);
        assert_eq!(rooms(&sequencer), 2, "quiet for less than the TTL");
        sequencer.sweep(11_000);
        assert_eq!(rooms(&sequencer), 1, "the envelope-only room went");
        sequencer.sweep(15_000);
        assert_eq!(rooms(&sequencer), 0, "the kept message expired");
    }
}
