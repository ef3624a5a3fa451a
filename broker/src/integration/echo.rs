//! `type = "echo"`: sends the client's frame back to it.

use serde::{Deserialize, Serialize};

use super::context::{Caller, Received};
use crate::config::check::ConfigError;
use crate::frame::Incoming;
use crate::message::Message;

pub const KIND: &str = "echo";

/// `type = "echo"`, as written: no keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEcho {}

#[derive(Debug, Clone)]
pub struct Echo;

impl RawEcho {
    pub fn validate(&self, _path: &str) -> Result<Echo, ConfigError> {
        Ok(Echo)
    }
}

impl Echo {
    /// Its answer is its point: a route answers by default.
    pub const RESPONDS: bool = true;

    pub fn run(&self, message: Received, caller: &dyn Caller) {
        let reply = match message.incoming {
            Incoming::Text(text) => Message::text(text),
            Incoming::Binary(bytes) => Message::binary(bytes),
            _ => return,
        };
        caller.reply(reply);
    }
}
