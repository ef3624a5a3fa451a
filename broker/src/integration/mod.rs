//! Integrations: what a route does with a client's message. One file per kind, each with
//! its configuration as written, its validation and its run: [`http`] (call a backend),
//! [`mock`], [`echo`], [`room`] (join, leave, publish), [`presence`] (who is in a room),
//! [`queue`] (append to a durable queue). [`registry`] lists them: a new kind is a file,
//! its `mod` line here and a line there. A kind acts on the connection only through
//! [`context::Caller`], which the shard's dispatch provides.

pub mod config;
pub mod context;
pub mod echo;
pub mod expression;
pub mod http;
pub mod mock;
pub mod presence;
pub mod queue;
pub mod registry;
pub mod room;

pub use http::{BackendReply, HttpIntegration, IntegrationError, parse_reply};
pub use registry::{Integration, RawIntegration};
