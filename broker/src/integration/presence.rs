//! `type = "room_presence"`: answers the asking client with a room's presence on every
//! node, as `GET /{stage}/@rooms/{room}/presence` does. Only members may ask, unless
//! `members_only = false`; `allow` limits it to the rooms the authorizer context names, as
//! for `room_join`.

use serde::{Deserialize, Serialize};

use super::context::{Caller, Received};
use super::expression::{allow_expression, expression};
use super::room::{allowed, is_member, select_room, yes};
use crate::config::check::ConfigError;
use crate::selection::SelectionExpression;

pub const KIND: &str = "room_presence";

/// `type = "room_presence"`, as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoomPresence {
    pub room: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<String>,
    /// Only members of the room may ask who is in it.
    #[serde(default = "yes")]
    pub members_only: bool,
}

#[derive(Debug, Clone)]
pub struct RoomPresence {
    room: SelectionExpression,
    allow: Option<SelectionExpression>,
    members_only: bool,
}

impl RawRoomPresence {
    pub fn validate(&self, path: &str) -> Result<RoomPresence, ConfigError> {
        Ok(RoomPresence {
            room: expression(path, "room", &self.room)?,
            allow: allow_expression(path, self.allow.as_deref())?,
            members_only: self.members_only,
        })
    }
}

impl RoomPresence {
    /// Its answer is its point: a route answers by default.
    pub const RESPONDS: bool = true;

    pub fn run(&self, message: Received, caller: &dyn Caller) {
        if !message.respond {
            return;
        }
        let context = caller.authorizer_context(&[Some(&self.room), self.allow.as_ref()]);
        let context = context.as_ref();
        let Some(room) = select_room(caller, &self.room, &message.body, context) else {
            return;
        };
        if !allowed(caller, &room, self.allow.as_ref(), &message.body, context) {
            return;
        }
        if self.members_only && !is_member(caller, &room) {
            return;
        }
        caller.presence(room);
    }
}
