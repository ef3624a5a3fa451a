//! `type = "room_join" | "room_leave" | "room_publish"`: room operations built in, so a chat
//! needs no backend for them. The room (and a publish's payload) come from the frame or the
//! authorizer context through selection expressions; `allow` names the rooms the
//! authorizer context permits (never the frame). A refusal is an error frame and a metric;
//! the connection stays open.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::context::{Caller, Received};
use super::expression::{allow_expression, expression};
use crate::config::check::ConfigError;
use crate::frame::Incoming;
use crate::message::Message;
use crate::rooms::RoomDelivery;
use crate::rooms::RoomName;
use crate::rooms::history::Want;
use crate::selection::SelectionExpression;

pub const JOIN: &str = "room_join";
pub const LEAVE: &str = "room_leave";
pub const PUBLISH: &str = "room_publish";

/// `type = "room_join"`, as written.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoomJoin {
    pub room: String,
    /// `$context.authorizer.<path>`: the rooms (a list, or a comma-separated string;
    /// `prefix*` patterns) the authorizer lets this connection join; absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<String>,
    /// How many of the last kept messages to replay (`$request.body.history`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<String>,
    /// Replay what followed this offset (`$request.body.since`)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// …in this epoch (`$request.body.epoch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

/// `type = "room_leave"`, as written.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoomLeave {
    pub room: String,
}

/// `type = "room_publish"`, as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoomPublish {
    pub room: String,
    /// As for `room_join`: the rooms it may publish to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<String>,
    /// What to send; default: the whole frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default)]
    pub exclude_sender: bool,
    /// Only members of the room may publish to it.
    #[serde(default = "yes")]
    pub members_only: bool,
    /// Latest-value-wins data: WebTransport members that asked for datagrams get it as
    /// one (QUIC does not retransmit it).
    #[serde(default)]
    pub unreliable: bool,
    /// In a conflating room: the message's key (`$request.body.symbol`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

pub(super) fn yes() -> bool {
    true
}

#[derive(Debug, Clone)]
pub struct RoomJoin {
    room: SelectionExpression,
    allow: Option<SelectionExpression>,
    history: Option<SelectionExpression>,
    since: Option<SelectionExpression>,
    epoch: Option<SelectionExpression>,
}

#[derive(Debug, Clone)]
pub struct RoomLeave {
    room: SelectionExpression,
}

#[derive(Debug, Clone)]
pub struct RoomPublish {
    room: SelectionExpression,
    allow: Option<SelectionExpression>,
    data: Option<SelectionExpression>,
    exclude_sender: bool,
    members_only: bool,
    unreliable: bool,
    key: Option<SelectionExpression>,
}

impl RawRoomJoin {
    pub fn validate(&self, path: &str) -> Result<RoomJoin, ConfigError> {
        let optional = |key: &str, source: &Option<String>| {
            (source.as_deref())
                .map(|source| expression(path, key, source))
                .transpose()
        };
        Ok(RoomJoin {
            room: expression(path, "room", &self.room)?,
            allow: allow_expression(path, self.allow.as_deref())?,
            history: optional("history", &self.history)?,
            since: optional("since", &self.since)?,
            epoch: optional("epoch", &self.epoch)?,
        })
    }
}

impl RawRoomLeave {
    pub fn validate(&self, path: &str) -> Result<RoomLeave, ConfigError> {
        Ok(RoomLeave {
            room: expression(path, "room", &self.room)?,
        })
    }
}

impl RawRoomPublish {
    pub fn validate(&self, path: &str) -> Result<RoomPublish, ConfigError> {
        let data = self.data.as_deref();
        Ok(RoomPublish {
            room: expression(path, "room", &self.room)?,
            allow: allow_expression(path, self.allow.as_deref())?,
            data: data.map(|d| expression(path, "data", d)).transpose()?,
            exclude_sender: self.exclude_sender,
            members_only: self.members_only,
            unreliable: self.unreliable,
            key: (self.key.as_deref())
                .map(|key| expression(path, "key", key))
                .transpose()?,
        })
    }
}

impl RoomJoin {
    pub const RESPONDS: bool = false;

    pub fn run(&self, message: Received, caller: &dyn Caller) {
        let expressions = [
            Some(&self.room),
            self.allow.as_ref(),
            self.history.as_ref(),
            self.since.as_ref(),
            self.epoch.as_ref(),
        ];
        let context = caller.authorizer_context(&expressions);
        let context = context.as_ref();
        let Some(room) = select_room(caller, &self.room, &message.body, context) else {
            return;
        };
        if !allowed(caller, &room, self.allow.as_ref(), &message.body, context) {
            return;
        }
        let Ok(replay) = self.replay(&message.body, context) else {
            caller.fail("Bad request: history and since must be non-negative integers");
            return;
        };
        if let Err(refused) = caller.join(&room, replay) {
            caller.fail(&format!("Limit exceeded: {refused}"));
        }
    }

    /// The past the join asks for: `since` (in `epoch`), else the last `history`
    /// messages, else none (a plain join, answered as always: with nothing).
    fn replay(&self, body: &Value, context: Option<&Value>) -> Result<Option<Want>, ()> {
        let select = |expression: &Option<SelectionExpression>| {
            let value = expression.as_ref()?.select_value(body, context)?;
            Some(value.clone()).filter(|value| !value.is_null())
        };
        let number = |value: Value| match value {
            Value::Number(number) => number.as_u64().ok_or(()),
            Value::String(text) => text.parse().map_err(drop),
            _ => Err(()),
        };
        if let Some(since) = select(&self.since) {
            let epoch = select(&self.epoch).map(|epoch| match epoch {
                Value::String(epoch) => epoch,
                other => other.to_string(),
            });
            return Ok(Some(Want::Since {
                offset: number(since)?,
                epoch,
                limit: usize::MAX,
            }));
        }
        match select(&self.history) {
            Some(count) => Ok(Some(Want::Last(number(count)? as usize))),
            None => Ok(None),
        }
    }
}

impl RoomLeave {
    pub const RESPONDS: bool = false;

    pub fn run(&self, message: Received, caller: &dyn Caller) {
        let context = caller.authorizer_context(&[Some(&self.room)]);
        if let Some(room) = select_room(caller, &self.room, &message.body, context.as_ref()) {
            caller.leave(&room);
        }
    }
}

impl RoomPublish {
    pub const RESPONDS: bool = false;

    pub fn run(&self, message: Received, caller: &dyn Caller) {
        let expressions = [
            Some(&self.room),
            self.allow.as_ref(),
            self.data.as_ref(),
            self.key.as_ref(),
        ];
        let context = caller.authorizer_context(&expressions);
        let context = context.as_ref();
        let body = &message.body;
        let Some(room) = select_room(caller, &self.room, body, context) else {
            return;
        };
        if !allowed(caller, &room, self.allow.as_ref(), body, context) {
            return;
        }
        let Some(payload) = self.payload(message.incoming, &message.body, caller, context) else {
            return;
        };
        if self.members_only && !is_member(caller, &room) {
            return;
        }
        let key = (self.key.as_ref()).and_then(|key| key.evaluate_in(body, context));
        let delivery = RoomDelivery {
            exclude: self.exclude_sender.then(|| caller.id()),
            unreliable: self.unreliable,
            position: None,
            conflation: key.map(|key| crate::rooms::conflation_key(&room, &key)),
            // Stamped by the shard that publishes it.
            stamp: None,
        };
        caller.publish(room, payload, delivery);
    }

    /// What to send: what `data` selects, or the client's message as it is.
    fn payload(
        &self,
        incoming: Incoming,
        body: &Value,
        caller: &dyn Caller,
        context: Option<&Value>,
    ) -> Option<Message> {
        match (&self.data, incoming) {
            (Some(data), _) => match data.evaluate_in(body, context) {
                Some(payload) => Some(Message::text(payload.into_owned())),
                None => {
                    caller.fail(&format!("Bad request: {} selected no data", data.source()));
                    None
                }
            },
            (None, Incoming::Text(text)) => Some(Message::text(text)),
            (None, Incoming::Binary(bytes)) => Some(Message::binary(bytes)),
            (None, _) => None,
        }
    }
}

/// Evaluates a room expression (with the authorizer `context`, if it reads it); on a
/// missing or invalid name the client gets an error frame and `None` comes back.
pub(super) fn select_room(
    caller: &dyn Caller,
    expression: &SelectionExpression,
    body: &Value,
    context: Option<&Value>,
) -> Option<RoomName> {
    let problem = match expression.evaluate_in(body, context) {
        None => format!("Bad request: {} selected no room", expression.source()),
        Some(name) => match RoomName::parse(&name) {
            Ok(room) => return Some(room),
            Err(error) => format!("Bad request: invalid room name: {error}"),
        },
    };
    caller.fail(&problem);
    None
}

/// Whether the authorizer context lets the connection use `room` (always, without an
/// `allow`): the rooms it names, as a list or a comma-separated string, each exact or a
/// `prefix*`. A refusal is an error frame `Forbidden: ...` and a metric.
pub(super) fn allowed(
    caller: &dyn Caller,
    room: &RoomName,
    allow: Option<&SelectionExpression>,
    body: &Value,
    context: Option<&Value>,
) -> bool {
    let Some(allow) = allow else {
        return true;
    };
    let permits = |pattern: &str| match pattern.trim().strip_suffix('*') {
        Some(prefix) => room.as_str().starts_with(prefix),
        None => pattern.trim() == room.as_str(),
    };
    let granted = match allow.select_value(body, context) {
        Some(Value::Array(rooms)) => rooms.iter().filter_map(Value::as_str).any(permits),
        Some(Value::String(rooms)) => rooms.split(',').any(permits),
        _ => false,
    };
    if !granted {
        caller.count_refusal("room_not_allowed");
        caller.fail(&format!(
            "Forbidden: room {room} is not allowed for this connection"
        ));
    }
    granted
}

/// Whether the caller is a member of `room`; if not, it gets `Forbidden: ...` and the
/// refusal is counted.
pub(super) fn is_member(caller: &dyn Caller, room: &RoomName) -> bool {
    let member = caller.is_member(room);
    if !member {
        caller.count_refusal("not_a_member");
        caller.fail(&format!("Forbidden: not a member of room {room}"));
    }
    member
}
