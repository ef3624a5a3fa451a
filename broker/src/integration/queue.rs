//! `type = "queue"`: appends the MESSAGE event to a durable queue (the local segment log,
//! or JetStream in cluster mode); with `ack`, the client hears `{"type": "ack"}` once the
//! entry is durable. `deliver_to` pushes the queue to a backend (see [`crate::queues`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::context::{Caller, Received};
use crate::config::check::ConfigError;
use crate::queues::config::check_queue_name;

pub const KIND: &str = "queue";

/// `type = "queue"`, as written.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    pub queue: String,
    #[serde(default)]
    pub ack: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliver_to: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Queue {
    pub queue: Arc<str>,
    pub ack: bool,
}

impl RawQueue {
    pub fn validate(&self, path: &str) -> Result<Queue, ConfigError> {
        check_queue_name(&format!("{path}.integration.queue"), &self.queue)?;
        Ok(Queue {
            queue: self.queue.as_str().into(),
            ack: self.ack,
        })
    }
}

impl Queue {
    pub const RESPONDS: bool = false;

    pub fn run(&self, message: Received, caller: &dyn Caller) {
        caller.append(&message, &self.queue, self.ack);
    }
}
