//! What an integration gets to work with: the client's message (its frame and its body
//! parsed once, for the selection expressions) and the [`Caller`], through which it acts on the
//! connection that sent it. The shard's dispatch implements the caller; integrations know
//! nothing of shards or sockets.

use std::sync::Arc;

use serde_json::Value;

use crate::connection_id::ConnectionId;
use crate::frame::Incoming;
use crate::message::Message;
use crate::rooms::RoomName;
use crate::rooms::history::Want;
use crate::rooms::{RoomDelivery, TooManyRooms};
use crate::selection::SelectionExpression;

/// A client's data message, on its way through its route.
pub struct Received {
    pub incoming: Incoming,
    /// The frame's JSON (`null` for binary or non-JSON frames).
    pub body: Value,
    /// Whether the route sends the integration's answer back (`routes.KEY.response`).
    pub respond: bool,
}

/// The connection a message came from, as an integration may act on it.
pub trait Caller {
    fn id(&self) -> ConnectionId;
    /// Its connectionId, as clients and backends see it.
    fn connection_id(&self) -> &str;
    /// Its authorizer context as JSON, when one of `expressions` reads it.
    fn authorizer_context(&self, expressions: &[Option<&SelectionExpression>]) -> Option<Value>;
    /// Queues a message to it.
    fn reply(&self, message: Message);
    /// Sends it the AWS-style error frame (`{"message", "connectionId", "requestId"}`);
    /// the connection stays open.
    fn fail(&self, reason: &str);
    /// Counts a refusal in `switchboard_refused_total{reason}`.
    fn count_refusal(&self, reason: &'static str);
    /// Makes it a member of `room`; with `replay`, it first gets the `joined` frame and
    /// the room's past as asked, then the live messages (none missed, none twice).
    fn join(&self, room: &RoomName, replay: Option<Want>) -> Result<(), TooManyRooms>;
    fn leave(&self, room: &RoomName);
    fn is_member(&self, room: &RoomName) -> bool;
    /// Answers it with `room`'s presence on every node, in the background.
    fn presence(&self, room: RoomName);
    /// Sends `message` to `room`'s members everywhere.
    fn publish(&self, room: RoomName, message: Message, delivery: RoomDelivery);
    /// Calls the route's backend with the MESSAGE event, in the background.
    fn call_backend(&self, message: Received);
    /// Appends the MESSAGE event to `queue`; with `ack`, acked once it is durable.
    fn append(&self, message: &Received, queue: &Arc<str>, ack: bool);
}
