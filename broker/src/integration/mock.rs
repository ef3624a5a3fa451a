//! `type = "mock"`: answers with a fixed body, in which `$context.connectionId` is the
//! caller's id (as in an API Gateway mapping template: the demo's `whoami`).

use serde::{Deserialize, Serialize};

use super::context::{Caller, Received};
use crate::config::check::ConfigError;
use crate::message::Message;

pub const KIND: &str = "mock";

/// `type = "mock"`, as written.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMock {
    #[serde(default)]
    pub body: String,
}

#[derive(Debug, Clone)]
pub struct Mock {
    body: String,
}

impl RawMock {
    pub fn validate(&self, _path: &str) -> Result<Mock, ConfigError> {
        Ok(Mock {
            body: self.body.clone(),
        })
    }
}

impl Mock {
    /// Its answer is its point: a route answers by default.
    pub const RESPONDS: bool = true;

    pub fn run(&self, message: Received, caller: &dyn Caller) {
        if message.respond {
            let body = (self.body).replace("$context.connectionId", caller.connection_id());
            caller.reply(Message::text(body));
        }
    }
}
