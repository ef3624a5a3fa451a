//! Fan-out: one message to many connections, encoded once.
//!
//! A room broadcast is one command per shard; a bulk push is planned here (ids decoded and
//! split by owning shard, without touching any connection) and then sent as one command
//! per shard. Every recipient on a shard shares one copy of the message.

use tokio::sync::oneshot;

use crate::connection_id::ConnectionId;
use crate::message::Message;
use crate::rooms::history::{Kept, enveloped};
use crate::rooms::sequencer::{LockedLog, NotKept, Sequencer};
use crate::rooms::{Position, PresenceMember, RoomDelivery, RoomName};
use crate::shard::handle::{Delivery, ShardHandle};

/// A bulk push split by shard. Indices refer to the request's `connectionIds`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FanoutPlan {
    /// For each shard: (sequence number, request index) of its targets.
    pub per_shard: Vec<Vec<(u64, u32)>>,
    /// Ids this node could not have issued (or issued in an earlier run): gone.
    pub invalid: Vec<u32>,
    /// Cluster mode: ids of other nodes, by node, for one request each.
    pub remote: std::collections::BTreeMap<u16, Vec<u32>>,
}

impl FanoutPlan {
    /// Splits `ids` by shard. `node` and `epoch` identify the ids this run issued; with
    /// `clustered`, ids of other nodes are grouped by node instead of being gone. An id
    /// named twice is planned once (one delivery, and at most one `gone` entry).
    pub fn for_ids<S: AsRef<str>>(
        ids: &[S],
        node: u16,
        epoch: u32,
        shards: usize,
        clustered: bool,
    ) -> Self {
        let mut plan = Self {
            per_shard: vec![Vec::new(); shards],
            invalid: Vec::new(),
            remote: std::collections::BTreeMap::new(),
        };
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        for (index, text) in ids.iter().enumerate() {
            if !seen.insert(text.as_ref()) {
                continue;
            }
            let index = index as u32;
            let parsed = text.as_ref().parse::<ConnectionId>().ok();
            if let Some(other) = parsed.filter(|id| clustered && id.node != node) {
                plan.remote.entry(other.node).or_default().push(index);
                continue;
            }
            let target = parsed
                .filter(|id| id.node == node && id.epoch == epoch)
                .and_then(|id| Some((id.sequence, plan.per_shard.get_mut(usize::from(id.shard))?)));
            match target {
                Some((sequence, targets)) => targets.push((sequence, index)),
                None => plan.invalid.push(index),
            }
        }
        plan
    }
}

/// Queues `message` to the members of `room` on each of `shards`, in order, without waiting
/// for counts (a client's publish, a broadcast relayed from another node).
pub async fn relay<'a>(
    shards: impl IntoIterator<Item = &'a ShardHandle>,
    room: &RoomName,
    message: &Message,
    delivery: RoomDelivery,
) {
    for shard in shards {
        let _ = shard
            .broadcast(room.clone(), message.clone(), delivery, None)
            .await;
    }
}

/// Sends `message` to every member of `room` on every shard; returns how many got it.
/// All shards work in parallel: every command is sent before any answer is awaited.
pub async fn broadcast(
    shards: &[ShardHandle],
    room: &RoomName,
    message: &Message,
    delivery: RoomDelivery,
) -> usize {
    start_broadcast(shards, room, message, delivery)
        .await
        .total()
        .await
}

/// Queues a broadcast on every shard, in order; the answer counts the deliveries once the
/// shards have them. Callers that relay broadcasts queue the next one without waiting for
/// the count of this one.
pub async fn start_broadcast(
    shards: &[ShardHandle],
    room: &RoomName,
    message: &Message,
    delivery: RoomDelivery,
) -> BroadcastCount {
    let mut answers = Vec::with_capacity(shards.len());
    for shard in shards {
        let (reply, answer) = oneshot::channel();
        if shard
            .broadcast(room.clone(), message.clone(), delivery, Some(reply))
            .await
            .is_ok()
        {
            answers.push(answer);
        }
    }
    BroadcastCount(answers)
}

/// The shards' answers to a broadcast.
pub struct BroadcastCount(Vec<oneshot::Receiver<usize>>);

impl BroadcastCount {
    /// How many members the broadcast was queued to.
    pub async fn total(self) -> usize {
        let mut delivered = 0;
        for answer in self.0 {
            delivered += answer.await.unwrap_or(0);
        }
        delivered
    }
}

/// A message numbered in its room's log and queued to every local shard. The room's log
/// stays locked until this is dropped, so the room's next message waits: hand it to the
/// other nodes first (in cluster mode), then drop it and count.
pub struct Numbered {
    pub offset: u64,
    /// As members get it (in the envelope, if the room uses it).
    pub message: Message,
    /// With the position.
    pub delivery: RoomDelivery,
    pub count: BroadcastCount,
    _log: LockedLog,
}

impl Numbered {
    /// Unlocks the room's log (its next message may go), keeping the offset and count.
    pub fn release(self) -> (u64, BroadcastCount) {
        (self.offset, self.count)
    }
}

/// Gives `message` the next offset of `room` (keeping it if the room keeps history; a
/// durable room's is stored first, and nothing is sent if that fails) and queues it to
/// every local shard, which skip `exclude_here` (the excluded member as this node knows it).
pub async fn number(
    sequencer: &Sequencer,
    shards: &[ShardHandle],
    room: &RoomName,
    message: &Message,
    delivery: RoomDelivery,
    exclude_here: Option<ConnectionId>,
) -> Result<Numbered, NotKept> {
    let log = sequencer.lock(room).await;
    number_locked(
        log,
        sequencer,
        shards,
        room,
        message,
        delivery,
        exclude_here,
    )
    .await
}

/// [`number`], with `room`'s log already locked (by a caller that must keep the order in
/// which messages arrived).
pub async fn number_locked(
    mut log: LockedLog,
    sequencer: &Sequencer,
    shards: &[ShardHandle],
    room: &RoomName,
    message: &Message,
    delivery: RoomDelivery,
    exclude_here: Option<ConnectionId>,
) -> Result<Numbered, NotKept> {
    let settings = sequencer.settings(room);
    let now_ms = crate::clock::now_ms();
    let offset = log.append(message.clone(), now_ms, settings.history);
    if let Some(keeper) = sequencer.keeper_for(room) {
        // Stored before anyone gets it: after a crash, no offset is given out twice.
        let kept = Kept {
            offset,
            time_ms: now_ms,
            message: message.clone(),
        };
        let entry = kept.to_entry(room, log.epoch());
        match keeper.keep(room, entry, log.stored()).await {
            Ok(at) => log.stored_at(at),
            Err(error) => {
                log.take_back(offset);
                if error == NotKept::Conflict {
                    // Another node numbered the room meanwhile: read it in again first.
                    log.reload();
                }
                return Err(error);
            }
        }
    }
    let message = match settings.envelope {
        true => enveloped(room, offset, message),
        false => message.clone(),
    };
    let delivery = RoomDelivery {
        position: Some(Position {
            epoch: log.epoch_id(),
            offset,
        }),
        ..delivery
    };
    let here = RoomDelivery {
        exclude: exclude_here,
        ..delivery
    };
    let count = start_broadcast(shards, room, &message, here).await;
    Ok(Numbered {
        offset,
        message,
        delivery,
        count,
        _log: log,
    })
}

/// Sends `message` to every target of `plan`.
pub async fn send_bulk(shards: &[ShardHandle], plan: FanoutPlan, message: &Message) -> Delivery {
    let mut delivery = Delivery {
        delivered: 0,
        gone: plan.invalid,
    };
    let mut answers = Vec::with_capacity(shards.len());
    for (shard, targets) in shards.iter().zip(plan.per_shard) {
        if targets.is_empty() {
            continue;
        }
        let (reply, answer) = oneshot::channel();
        match shard.send_many(targets, message.clone(), reply).await {
            Ok(()) => answers.push(answer),
            Err(targets) => delivery
                .gone
                .extend(targets.into_iter().map(|(_, index)| index)),
        }
    }
    for answer in answers {
        if let Ok(result) = answer.await {
            delivery.delivered += result.delivered;
            delivery.gone.extend(result.gone);
        }
    }
    delivery.gone.sort_unstable();
    delivery
}

/// Room presence (members, who they are, since when), gathered from every shard.
pub async fn room_presence(shards: &[ShardHandle], room: &RoomName) -> Vec<PresenceMember> {
    gather(shards, |shard, reply| shard.presence(room.clone(), reply)).await
}

/// Room membership, gathered from every shard.
pub async fn room_members(shards: &[ShardHandle], room: &RoomName) -> Vec<String> {
    gather(shards, |shard, reply| shard.list_room(room.clone(), reply)).await
}

/// Asks every shard (all asked before any answer is awaited) and joins their answers; a
/// stopped shard adds nothing.
async fn gather<'a, T, Ask, Asked>(shards: &'a [ShardHandle], ask: Ask) -> Vec<T>
where
    Ask: Fn(&'a ShardHandle, oneshot::Sender<Vec<T>>) -> Asked,
    Asked: std::future::Future<Output = Result<(), crate::connection::Gone>>,
{
    let mut answers = Vec::with_capacity(shards.len());
    for shard in shards {
        let (reply, answer) = oneshot::channel();
        if ask(shard, reply).await.is_ok() {
            answers.push(answer);
        }
    }
    let mut gathered = Vec::new();
    for answer in answers {
        gathered.extend(answer.await.unwrap_or_default());
    }
    gathered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(shard: u16, sequence: u64, epoch: u32) -> String {
        ConnectionId {
            node: 0,
            shard,
            epoch,
            sequence,
        }
        .to_string()
    }

    #[test]
    fn splits_by_shard_and_flags_foreign_ids() {
        let ids = vec![
            id(0, 1, 7),
            id(1, 2, 7),
            "garbage".to_owned(),
            id(0, 3, 6),
            id(5, 4, 7),
            id(1, 5, 7),
        ];
        let plan = FanoutPlan::for_ids(&ids, 0, 7, 2, false);
        assert_eq!(plan.per_shard, vec![vec![(1, 0)], vec![(2, 1), (5, 5)]]);
        assert_eq!(plan.invalid, vec![2, 3, 4]);
    }

    #[test]
    fn clustered_plans_group_other_nodes_ids_by_node() {
        let other = |node: u16, sequence: u64| {
            ConnectionId {
                node,
                shard: 0,
                epoch: 1,
                sequence,
            }
            .to_string()
        };
        let ids = vec![id(0, 1, 7), other(2, 5), other(3, 6), other(2, 7)];
        let plan = FanoutPlan::for_ids(&ids, 0, 7, 1, true);
        assert_eq!(plan.per_shard, vec![vec![(1, 0)]]);
        assert_eq!(plan.remote.get(&2), Some(&vec![1, 3]));
        assert_eq!(plan.remote.get(&3), Some(&vec![2]));
        assert!(plan.invalid.is_empty());
    }

    #[test]
    fn duplicates_are_planned_once() {
        let ids = vec![
            id(0, 1, 7),
            id(0, 1, 7),
            "x".to_owned(),
            "x".to_owned(),
            id(0, 1, 7),
        ];
        let plan = FanoutPlan::for_ids(&ids, 0, 7, 1, false);
        assert_eq!(plan.per_shard, vec![vec![(1, 0)]]);
        assert_eq!(plan.invalid, vec![2]);
    }
}
