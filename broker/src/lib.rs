//! Switchboard: a self-hosted WebSocket API gateway and fan-out broker, wire-compatible
//! with Amazon API Gateway's WebSocket APIs.
//!
//! The library is the whole gateway; the `switchboard` binary only parses the command
//! line, binds [`Listeners`] and calls [`serve`] with a shutdown token wired to signals.
//!
//! Map of the crate, edges to core:
//! * [`server`] binds sockets and starts [`shard`]s (one thread each) and the
//!   [`management`] API; [`session`] runs one connection; [`dispatch`] runs routes;
//!   [`queues`] appends frames to durable queues and pushes them to backends.
//! * [`limits`]: how much a client may do (admission, rate limits, the outbound memory
//!   budget); [`auth`]: who may connect (`$connect` authorizers) and who may call the
//!   management API (tokens, SigV4).
//! * [`transport`]: plain TCP, TLS or WebTransport under one socket type, so sessions do
//!   not care.
//! * [`resume`]: a client that lost its socket comes back to the same connection.
//! * [`cluster`]: several nodes as one API over NATS (absent without `[cluster]`).
//! * Pure logic: [`config`] (its secrets: [`secret`]), [`selection`], [`connection_id`], [`frame`], [`event`],
//!   [`stored_event`], [`integration`]'s reply parsing, [`outbound`], [`disconnect`],
//!   [`protocol`] (every frame the gateway itself writes),
//!   [`rooms`], the [`fanout`] planner.

pub mod auth;
pub mod clock;
pub mod cluster;
pub mod compression;
pub mod config;
pub mod connection;
pub mod connection_id;
pub mod crash;
pub mod directory;
pub mod disconnect;
pub mod dispatch;
pub mod event;
pub mod fanout;
pub mod fence;
pub mod frame;
pub mod gateway;
pub mod handshake;
pub mod integration;
pub mod limits;
pub mod management;
pub mod message;
pub mod metrics;
pub mod orphans;
pub mod outbound;
pub mod protocol;
pub mod queues;
pub mod resume;
pub mod rooms;
pub mod secret;
pub mod selection;
pub mod server;
pub mod session;
pub mod shard;
pub mod stored_event;
pub mod transport;
pub mod webhooks;

pub use config::{Config, ConfigError, RawConfig};
pub use server::{Listeners, ServeError, serve};
