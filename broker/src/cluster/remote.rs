//! `@connections` calls for connections on other nodes: one NATS request to the owning
//! node (`sb.{stage}.node.{id}`), which runs it on its shard and answers with a status.
//!
//! The operation and its arguments travel in headers (`Sb-Op`, `Sb-Id`, `Sb-Room`), the
//! payload as it is: a push's message in its portable form
//! ([`crate::message::Message::to_portable`]), which the owning node encodes for its
//! client's transport. A bulk push is one request per node, carrying every id of that node.

use std::sync::Arc;
use std::time::Instant;

use async_nats::HeaderMap;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Cluster;
use crate::connection_id::ConnectionId;
use crate::fanout::{self, FanoutPlan};
use crate::message::Message;
use crate::resume::moved::MoveRequest;
use crate::rooms::RoomName;

/// Requests a node works on at once; more wait (NATS buffers them).
const MAX_CONCURRENT_REQUESTS: usize = 4096;

const OP: &str = "Sb-Op";
const ID: &str = "Sb-Id";
pub(super) const ROOM: &str = "Sb-Room";
const STATUS: &str = "Sb-Status";

/// What a remote call asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Send,
    Describe,
    Disconnect,
    Join,
    Leave,
    Bulk,
    /// A client resumed on the calling node, which is about to ask for its connection:
    /// which rooms it is in (so the calling node listens to them first).
    MoveRooms,
    /// A client resumed on the calling node: hand its connection over.
    Move,
    /// Did the connection handed over as this alias arrive? Asked by the node that handed
    /// it over, of the node that asked for it.
    MoveStatus,
    /// Number and send a message to a room this node owns ([`super::history`]).
    Publish,
    /// What a room this node owns keeps ([`super::history`]).
    History,
    /// Which of these connections (a JSON list of ids) are here, moved in from another
    /// node? Asked of every node when the run that gave out their ids is gone, and its
    /// forwarding with it ([`super::find`]).
    Find,
}

impl Op {
    pub fn label(self) -> &'static str {
        match self {
            Self::Send => "send",
            Self::Describe => "get",
            Self::Disconnect => "delete",
            Self::Join => "join",
            Self::Leave => "leave",
            Self::Bulk => "bulk",
            Self::MoveRooms => "move_rooms",
            Self::Move => "move",
            Self::MoveStatus => "move_status",
            Self::Publish => "publish",
            Self::History => "history",
            Self::Find => "find",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [
            Self::Send,
            Self::Describe,
            Self::Disconnect,
            Self::Join,
            Self::Leave,
            Self::Bulk,
            Self::MoveRooms,
            Self::Move,
            Self::MoveStatus,
            Self::Publish,
            Self::History,
            Self::Find,
        ]
        .into_iter()
        .find(|op| op.label() == text)
    }
}

/// The owning node's answer: an HTTP-like status and a body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

/// Why a remote call got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// No node listens for that id (`no_responders`: it is gone), or it did not answer in
    /// time.
    #[error("node {node} did not answer within cluster.request_timeout_ms")]
    Unreachable { node: u16, no_responders: bool },
    /// NATS itself is down on this side.
    #[error("cluster unavailable: {0}")]
    Nats(String),
}

impl Cluster {
    /// Calls `op` on the node that owns `id`.
    pub async fn call(
        &self,
        node: u16,
        op: Op,
        id: &str,
        room: Option<&str>,
        payload: Bytes,
    ) -> Result<Reply, RemoteError> {
        let mut headers = HeaderMap::new();
        headers.insert(OP, op.label());
        headers.insert(ID, id);
        if let Some(room) = room {
            headers.insert(ROOM, room);
        }
        self.request(node, op.label(), headers, payload).await
    }

    /// A request to node `node`, timed and counted under `label`.
    pub(super) async fn request(
        &self,
        node: u16,
        label: &'static str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<Reply, RemoteError> {
        let metrics = self.metrics();
        let started = Instant::now();
        let request = async_nats::client::Request::new()
            .headers(headers)
            .payload(payload)
            .timeout(Some(self.config.request_timeout));
        let answer = self
            .client
            .send_request(self.subjects.node(node), request)
            .await;
        metrics
            .cluster_forwarded
            .with_label_values(&[if label == "bulk" { "bulk" } else { "push" }])
            .inc();
        match answer {
            Ok(message) => {
                metrics
                    .cluster_request_duration
                    .with_label_values(&[label])
                    .observe(started.elapsed().as_secs_f64());
                let status = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(STATUS))
                    .and_then(|v| v.as_str().parse().ok())
                    .unwrap_or(500);
                Ok(Reply {
                    status,
                    body: message.payload,
                })
            }
            Err(error) => {
                use async_nats::RequestErrorKind;
                let (kind, result) = match error.kind() {
                    unanswered @ (RequestErrorKind::TimedOut | RequestErrorKind::NoResponders) => {
                        let no_responders = unanswered == RequestErrorKind::NoResponders;
                        let kind = if no_responders {
                            "no_responders"
                        } else {
                            "timeout"
                        };
                        (
                            kind,
                            RemoteError::Unreachable {
                                node,
                                no_responders,
                            },
                        )
                    }
                    _ => ("nats", RemoteError::Nats(error.to_string())),
                };
                metrics
                    .cluster_request_errors
                    .with_label_values(&[label, kind])
                    .inc();
                Err(result)
            }
        }
    }

    /// Sends `message` to other nodes' ids (`remote`: request indices by node), one request
    /// per node. Returns how many were delivered and the request indices that were gone
    /// (or whose node did not answer).
    pub async fn send_bulk(
        &self,
        remote: &std::collections::BTreeMap<u16, Vec<u32>>,
        ids: &[String],
        message: &Message,
    ) -> crate::shard::handle::Delivery {
        let portable = message.to_portable();
        let calls = remote.iter().map(|(node, indices)| {
            let targets: Vec<&str> = indices.iter().map(|&i| ids[i as usize].as_str()).collect();
            let mut body = BytesMut::new();
            let list = serde_json::to_vec(&targets).unwrap_or_default();
            body.put_u32(list.len() as u32);
            body.put_slice(&list);
            body.put_slice(&portable);
            let mut headers = HeaderMap::new();
            headers.insert(OP, Op::Bulk.label());
            async move {
                let reply = self.request(*node, "bulk", headers, body.freeze()).await;
                (indices, reply)
            }
        });
        let mut delivery = crate::shard::handle::Delivery::default();
        for (indices, reply) in futures_util::future::join_all(calls).await {
            match reply
                .ok()
                .and_then(|r| serde_json::from_slice::<BulkAnswer>(&r.body).ok())
            {
                Some(answer) => {
                    delivery.delivered += answer.delivered;
                    delivery
                        .gone
                        .extend(answer.gone.iter().filter_map(|&p| indices.get(p).copied()));
                }
                None => delivery.gone.extend(indices.iter().copied()),
            }
        }
        delivery
    }
}

/// A node's answer to a bulk request: positions in the list it was sent.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct BulkAnswer {
    delivered: usize,
    gone: Vec<usize>,
}

/// Answers requests for this node's connections until `shutdown`.
pub async fn serve(cluster: Arc<Cluster>, shutdown: CancellationToken) {
    let subject = cluster.subjects.node(cluster.node_id);
    let mut requests = match cluster.client.subscribe(subject).await {
        Ok(subscriber) => subscriber,
        Err(error) => {
            tracing::error!(%error, "cannot subscribe to this node's request subject");
            return;
        }
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_REQUESTS));
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            message = requests.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        // A call for this node's connections waits while its lease is out (see
        // `crate::fence`): one that was reported gone meanwhile is gone by then.
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = cluster.fence.held() => {}
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let locked = cluster.lock_for_publish(&message).await;
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Some(reply_to) = message.reply.clone() else {
                return;
            };
            let (status, body) = answer(&cluster, &message, locked).await;
            let mut headers = HeaderMap::new();
            headers.insert(STATUS, status.to_string().as_str());
            let published = cluster.client.publish_with_headers(reply_to, headers, body);
            if let Err(error) = published.await {
                tracing::warn!(%error, "an answer to another node was not sent");
            }
        });
    }
    let _ = requests.unsubscribe().await;
}

fn header<'a>(message: &'a async_nats::Message, name: &str) -> Option<&'a str> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
}

/// Runs one request on the shard that owns its connection.
async fn answer(
    cluster: &Cluster,
    message: &async_nats::Message,
    locked: Option<crate::rooms::sequencer::LockedLog>,
) -> (u16, Bytes) {
    const GONE: (u16, Bytes) = (410, Bytes::new());
    let Some(op) = header(message, OP).and_then(Op::parse) else {
        return (400, Bytes::from_static(b"unknown op"));
    };
    if op == Op::Bulk {
        return bulk(cluster, &message.payload).await;
    }
    if matches!(op, Op::Publish | Op::History) {
        return cluster.answer_owned_room(op, message, locked).await;
    }
    if op == Op::Find {
        return cluster.answer_find(&message.payload);
    }
    if op == Op::MoveStatus {
        let outcome = header(message, ID)
            .and_then(|alias| alias.parse().ok())
            .and_then(|alias| cluster.move_outcome(alias));
        let answer = outcome.map_or("unknown", super::MoveOutcome::as_str);
        return (200, Bytes::from_static(answer.as_bytes()));
    }
    let Some(text) = header(message, ID) else {
        return GONE;
    };
    // A connection that moved here (back, perhaps) is known by its alias.
    let arrived = (text.parse().ok()).and_then(|id| cluster.arrived_as(id));
    let arrived = arrived.map(|alias| alias.to_string());
    let text = arrived.as_deref().unwrap_or(text);
    let Some((id, shard)) = cluster.locate(text) else {
        return GONE;
    };
    let room = header(message, ROOM).and_then(|r| RoomName::parse(r).ok());
    let (status, body) = answer_locally(op, id, shard, room.clone(), &message.payload).await;
    match cluster.moved_to(text) {
        // Its client resumed on another node: the call goes on there (a move too: a
        // client that missed the `resumed` frame of the last one comes back with this
        // node's token, which the connection still accepts).
        Some(alias) if status == 410 => {
            // It moved on from there, and that node went since: where it lives now.
            let alias = match cluster.issuer_runs(alias) {
                true => alias,
                false => cluster.find_moved(id).await.unwrap_or(alias),
            };
            let room = room.as_ref().map(RoomName::as_str);
            let alias_text = alias.to_string();
            let forwarded = cluster
                .call(alias.node, op, &alias_text, room, message.payload.clone())
                .await;
            match forwarded {
                Ok(reply) => {
                    if op == Op::Move && reply.status == 200 {
                        // Forward straight to where it went from now on, not along the chain.
                        let request = serde_json::from_slice::<MoveRequest>(&message.payload);
                        if let Some(moved_to) = request.ok().and_then(|r| r.alias.parse().ok()) {
                            cluster.note_moved_on(text, moved_to);
                        }
                    }
                    (reply.status, reply.body)
                }
                Err(_) => GONE,
            }
        }
        _ => (status, body),
    }
}

/// An answer's JSON body.
fn to_json(value: &impl serde::Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

/// Runs a call for a connection of this node on its shard.
async fn answer_locally(
    op: Op,
    id: ConnectionId,
    shard: &crate::shard::handle::ShardHandle,
    room: Option<RoomName>,
    payload: &Bytes,
) -> (u16, Bytes) {
    const GONE: (u16, Bytes) = (410, Bytes::new());
    match (op, room) {
        (Op::MoveStatus, _) => (400, Bytes::from_static(b"not a call for a connection")),
        (Op::MoveRooms | Op::Move, _) => {
            let Ok(request) = serde_json::from_slice(payload) else {
                return (400, Bytes::from_static(b"malformed move request"));
            };
            let answer = match op {
                Op::MoveRooms => shard
                    .move_rooms(id, request)
                    .await
                    .map(|r| r.map(|m| to_json(&m))),
                _ => shard
                    .move_out(id, request)
                    .await
                    .map(|r| r.map(|m| to_json(&m))),
            };
            match answer {
                Ok(Ok(body)) => (200, body),
                Ok(Err(refusal)) => (410, Bytes::from_static(refusal.as_str().as_bytes())),
                Err(_) => GONE,
            }
        }
        (Op::Send, _) => match Message::from_portable(payload.clone()) {
            Some(message) => match shard.send(id, message).await {
                Ok(()) => (200, Bytes::new()),
                Err(_) => GONE,
            },
            None => (400, Bytes::from_static(b"not a message")),
        },
        (Op::Disconnect, _) => match shard.disconnect(id).await {
            Ok(()) => (204, Bytes::new()),
            Err(_) => GONE,
        },
        (Op::Describe, _) => match shard.describe(id).await {
            Ok(info) => (200, Bytes::from(info.to_json().to_string())),
            Err(_) => GONE,
        },
        (Op::Join, Some(room)) => match shard.join(id, room).await {
            Ok(Ok(())) => (204, Bytes::new()),
            Ok(Err(refused)) => (429, Bytes::from(refused.to_string())),
            Err(_) => GONE,
        },
        (Op::Leave, Some(room)) => match shard.leave(id, room).await {
            Ok(()) => (204, Bytes::new()),
            Err(_) => GONE,
        },
        _ => (400, Bytes::from_static(b"missing or invalid room")),
    }
}

/// A bulk request: `[u32 length][JSON list of ids][frame]`.
async fn bulk(cluster: &Cluster, body: &Bytes) -> (u16, Bytes) {
    let malformed = (400, Bytes::from_static(b"malformed bulk request"));
    let Some(length) = body
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    else {
        return malformed;
    };
    let Some(list) = body.get(4..4 + length) else {
        return malformed;
    };
    let Ok(ids) = serde_json::from_slice::<Vec<String>>(list) else {
        return malformed;
    };
    let Some(message) = Message::from_portable(body.slice(4 + length..)) else {
        return malformed;
    };
    // Those that moved to another node go on there (one more hop).
    let ids = cluster.where_they_live(&ids);
    let mut plan = FanoutPlan::for_ids(
        &ids,
        cluster.node_id,
        cluster.registry.epoch(),
        cluster.shards().len(),
        true,
    );
    let moved = std::mem::take(&mut plan.remote);
    let onward = async {
        match moved.is_empty() {
            true => crate::shard::handle::Delivery::default(),
            false => cluster.send_bulk(&moved, &ids, &message).await,
        }
    };
    let (mut delivery, onward) =
        futures_util::join!(fanout::send_bulk(cluster.shards(), plan, &message), onward);
    delivery.delivered += onward.delivered;
    delivery.gone.extend(onward.gone);
    let answer = BulkAnswer {
        delivered: delivery.delivered,
        gone: delivery.gone.iter().map(|&i| i as usize).collect(),
    };
    (
        200,
        Bytes::from(serde_json::to_vec(&answer).unwrap_or_default()),
    )
}

impl Cluster {
    /// The local shard of a connectionId this node issued in this run.
    fn locate(&self, text: &str) -> Option<(ConnectionId, &crate::shard::handle::ShardHandle)> {
        let id: ConnectionId = text.parse().ok()?;
        if id.node != self.node_id || id.epoch != self.registry.epoch() {
            return None;
        }
        Some((id, self.shards().get(usize::from(id.shard))?))
    }
}
