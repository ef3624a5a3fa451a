//! One client connection from the first byte to `$disconnect`: handshake (with the
//! `$connect` route), then one task that reads frames, writes queued frames and keeps the
//! timers, and finally the `$disconnect` route, exactly once.
//!
//! The decisions are a pure core, tested without sockets or sleeps:
//! [`lifecycle`] (live, letting go, parked, closing; close requests and resume claims) and
//! [`inbound`] (bytes to messages under the rate limit). The rest is the tokio glue that
//! drives them: [`open`] (the WebSocket and WebTransport handshakes), [`admit`] (the
//! checks and `$connect` every transport shares), [`live`] (a connection from `$connect`
//! to `$disconnect`, parked in between if it is resumable) and [`serve`] (the loop that
//! reads, dispatches and writes).
//!
//! An idle connection holds no read or write buffer: reads go into the shard's scratch
//! buffer and only an incomplete frame is kept; the outbound queue is empty.

pub(crate) mod admit;
pub(crate) mod inbound;
pub(crate) mod lifecycle;
pub(crate) mod live;
pub(crate) mod open;
pub(crate) mod serve;

pub use open::{run, run_webtransport};
