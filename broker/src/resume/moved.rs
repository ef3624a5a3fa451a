//! What travels when a connection moves to another node (its client resumed there): the
//! new node's request, the old node's answer, and what the new node starts the connection
//! with. Plain data, so the shards' mailboxes and the cluster's wire can carry it.

use serde::{Deserialize, Serialize};

use crate::connection::Earlier;
use crate::message::Message;
use crate::rooms::{Brought, Position, RoomName};

/// What the new node asks the old one for.
#[derive(Debug, Serialize, Deserialize)]
pub struct MoveRequest {
    /// Proof that the client holds a token of the connection, base64: the token's secret
    /// never travels ([`crate::resume::move_proof`]).
    pub proof: String,
    /// Who the authorizer says the client is now ([`principal_of`]); the old node hands the
    /// connection over only to the identity it was opened with.
    #[serde(default)]
    pub principal: Option<String>,
    pub received: u64,
    /// Where the connection will live: the new node's id for it.
    pub alias: String,
    /// When the new node asked (its clock, epoch ms): time the request spent queued before
    /// the old node took it up counts against the answer's deadline.
    #[serde(default)]
    pub sent_at_ms: Option<u64>,
}

/// What the old node hands over.
#[derive(Debug, Serialize, Deserialize)]
pub struct MovedOut {
    /// The connection's facts, as a queue entry's context (`stored_event`).
    pub facts: String,
    pub rooms: Vec<String>,
    /// The messages its client has not received, in their portable form
    /// ([`Message::to_portable`], as every version sends them), base64, in order.
    pub frames: Vec<String>,
    /// How much longer it may live, in milliseconds (a move does not restart
    /// `limits.max_connection_secs`); absent from nodes that predate it.
    #[serde(default)]
    pub lifetime_left_ms: Option<u64>,
    /// The hashes of the secrets of the tokens that resume it there (base64): its client may
    /// not have read the `resumed` frame with the new one.
    #[serde(default)]
    pub secret_hashes: Vec<String>,
    /// The ids those tokens name: its id there and on the nodes before, oldest first.
    #[serde(default)]
    pub ids: Vec<String>,
    /// Its client's data messages handled there and before (0 from nodes that predate it).
    #[serde(default)]
    pub handled: u64,
    /// Per room, the newest broadcast of each node queued to it there, when its frames
    /// were taken: the new node drops the copies it holds of those.
    #[serde(default)]
    pub brought: Brought,
    /// Per room that numbers its messages (by name), the newest offset it had there.
    #[serde(default)]
    pub standing: Vec<(String, Position)>,
}

/// What a connection brings from the node it left.
pub struct MovedIn {
    pub received: u64,
    /// Its client's data messages handled on the nodes it left.
    pub handled: u64,
    pub frames: Vec<Message>,
    pub rooms: Vec<RoomName>,
    pub lifetime_left: Option<std::time::Duration>,
    pub(crate) earlier: Earlier,
}
