//! Who may connect and how much they may do: the protections that keep one client (or
//! one address) from hurting the others.
//!
//! * [`rate`]: token buckets, the one rate-limiting mechanism (per connection for inbound
//!   messages and bytes, per client address for new connections).
//! * [`admission`]: the gate at `accept`, before a byte is read: global capacity (which
//!   also keeps a reserve of file descriptors), per-address connection counts and connect
//!   rates, and the overload flag.
//! * [`overload`]: the global memory budget for outbound queues, charged by each shard's
//!   account as frames are queued.
//!
//! Pure bookkeeping: callers pass the time in, and sockets stay at the edges.

pub mod admission;
pub mod config;
pub mod overload;
pub mod rate;

pub use admission::{Admission, AdmissionTicket, PerIpLimits, Refusal};
pub use overload::{OutboundBudget, ShardAccount};
pub use rate::{InboundLimiter, Rate, TokenBucket};
