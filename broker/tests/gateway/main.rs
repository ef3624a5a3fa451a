//! Integration tests: the real gateway on port 0, real WebSocket clients, a real HTTP
//! backend, real sled in a temp dir. One test binary, one module per concern.

mod attacks;
mod authorizers;
mod binary;
mod browser;
mod chaos;
mod cluster;
mod compression;
mod conflation;
mod deploy;
mod disconnects;
mod faults;
mod frames;
mod handshake;
mod history;
mod management;
mod nats;
mod presence_events;
mod process;
mod queues;
mod quickstart;
mod resume;
mod rooms;
mod routing;
mod security;
mod support;
mod tls;
pub(crate) mod webhooks;
mod webtransport;
