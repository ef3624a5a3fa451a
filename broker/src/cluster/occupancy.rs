//! Which nodes have members in which rooms, cluster-wide, for the `room_occupied` and
//! `room_vacated` webhooks: sent once each, whichever nodes the members are on.
//!
//! A key-value bucket (`sb_{stage}_rooms`) holds, per room, the nodes with local members.
//! A node changes its own entry when its first member of a room joins or its last one
//! leaves (in order, from one task), with a compare-and-set: the node whose write turns
//! the set from empty to not (or back) is the one that reports the room occupied (or
//! vacated), so each transition is reported once. A lost node is taken out of every set
//! by the node that took it over; a node that starts takes its earlier run out of them.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::TryStreamExt;
use tokio_util::sync::CancellationToken;

use super::Cluster;
use super::state::occupancy::Occupancy;
use crate::rooms::RoomName;
use crate::webhooks::{EventName, WebhookEvent};

impl Cluster {
    /// This node has (`true`) or no longer has members in `room`.
    pub(super) fn note_occupancy(&self, room: &RoomName, occupied: bool) {
        if let Some(occupancy) = &self.occupancy {
            occupancy.note(room, occupied);
        }
    }

    /// Takes `node` out of every room's set (it was lost, or it is this node's earlier
    /// run), reporting the rooms that are empty without it.
    pub async fn vacate_node(&self, node: u16) {
        let Some(occupancy) = &self.occupancy else {
            return;
        };
        let keys = match occupancy.store.keys().await {
            Ok(keys) => keys.try_collect::<Vec<String>>().await.unwrap_or_default(),
            Err(error) => {
                tracing::warn!(node, %error, "cannot list rooms' occupancy");
                return;
            }
        };
        for key in keys {
            let Some(room) = room_of(&key) else { continue };
            self.flip(occupancy, &room, node, false).await;
        }
    }

    /// Sets or clears `node` in `room`'s set until the write holds, and reports the room
    /// if that write emptied or filled it.
    async fn flip(&self, occupancy: &Occupancy, room: &RoomName, node: u16, occupied: bool) {
        let key = key_of(room);
        let mut pause = std::time::Duration::from_millis(50);
        loop {
            match swap(&occupancy.store, &key, node, occupied).await {
                Ok(Some(name)) => {
                    occupancy
                        .events
                        .note(WebhookEvent::room(name, room.as_str()));
                    return;
                }
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(%room, %error, "room occupancy not updated; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(2));
                }
            }
        }
    }
}

/// Applies this node's changes (each room's latest state) until `stop` (cancelled once
/// the shards have stopped, so the rooms shutdown empties are reported), then those noted
/// by then. A room occupied and vacated again before its change is applied is reported
/// neither way.
pub async fn track(cluster: Arc<Cluster>, stop: CancellationToken) {
    let Some(occupancy) = &cluster.occupancy else {
        return;
    };
    cluster.vacate_node(cluster.node_id).await;
    loop {
        for (room, occupied) in occupancy.take() {
            cluster
                .flip(occupancy, &room, cluster.node_id, occupied)
                .await;
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = occupancy.changed.notified() => {}
        }
    }
    for (room, occupied) in occupancy.take() {
        cluster
            .flip(occupancy, &room, cluster.node_id, occupied)
            .await;
    }
}

/// One compare-and-set of `node` in the set under `key`: the event this write caused, if
/// any; an error when the bucket cannot be reached (a lost race is retried here).
async fn swap(
    store: &kv::Store,
    key: &str,
    node: u16,
    occupied: bool,
) -> Result<Option<EventName>, String> {
    loop {
        let entry = store.entry(key).await.map_err(|e| e.to_string())?;
        let (mut nodes, revision) = match &entry {
            Some(entry) if entry.operation == kv::Operation::Put => (
                serde_json::from_slice::<BTreeSet<u16>>(&entry.value).unwrap_or_default(),
                Some(entry.revision),
            ),
            Some(entry) => (BTreeSet::new(), Some(entry.revision)),
            None => (BTreeSet::new(), None),
        };
        let was_empty = nodes.is_empty();
        let changed = match occupied {
            true => nodes.insert(node),
            false => nodes.remove(&node),
        };
        if !changed {
            return Ok(None);
        }
        let written = match (nodes.is_empty(), revision) {
            (true, revision) => store
                .delete_expect_revision(key, revision)
                .await
                .map(drop)
                .map_err(|e| {
                    (
                        e.kind() == kv::DeleteErrorKind::WrongLastRevision,
                        e.to_string(),
                    )
                }),
            (false, Some(revision)) => {
                let value = Bytes::from(serde_json::to_vec(&nodes).unwrap_or_default());
                store
                    .update(key, value, revision)
                    .await
                    .map(drop)
                    .map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    })
            }
            (false, None) => {
                let value = Bytes::from(serde_json::to_vec(&nodes).unwrap_or_default());
                store.create(key, value).await.map(drop).map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists,
                        e.to_string(),
                    )
                })
            }
        };
        match written {
            Ok(()) => {
                return Ok(match (was_empty, nodes.is_empty()) {
                    (true, false) => Some(EventName::RoomOccupied),
                    (false, true) => Some(EventName::RoomVacated),
                    _ => None,
                });
            }
            Err((true, _)) => continue,
            Err((false, error)) => return Err(error),
        }
    }
}

/// A room's key: its name in hex (a key may not hold every character a room name may).
fn key_of(room: &RoomName) -> String {
    room.as_str().bytes().map(|b| format!("{b:02x}")).collect()
}

fn room_of(key: &str) -> Option<RoomName> {
    let bytes = (0..key.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(key.get(at..at + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    RoomName::parse(std::str::from_utf8(&bytes).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_read_back_as_rooms() {
        let room = RoomName::parse("ticker:BTC/USD@x").unwrap();
        assert_eq!(room_of(&key_of(&room)), Some(room));
        assert_eq!(room_of("zz"), None);
    }
}
