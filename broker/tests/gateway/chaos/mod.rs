//! Faults in a three-node cluster, and what must hold through them (docs/RELIABILITY.md).
//!
//! * [`crashes`]: a node killed at one step of an operation (a crash point): handing a
//!   session over, taking one, between a queue append and its ack, mid-broadcast.
//! * [`disks`]: one node's disk full under load: newcomers refused there, clearly, until
//!   space comes back; nothing lost.
//! * [`fencing`]: one node paused, or cut off from NATS, past the node-loss timeout, and a
//!   cut shorter than it: the zombie's clients and frames, step by step.
//! * [`gaps`]: a numbered room's broadcasts lost with a broken NATS connection, mended
//!   from the room's history.
//! * [`harness`]: three gateway nodes on a three-server JetStream cluster (R3), every node's
//!   NATS links through relays that can be cut, and the faults (pause, kill, restart, cut,
//!   NATS restarts, a skewed clock), each step printed with its time and the run's seed.
//! * [`workload`]: what runs through the faults: resumable clients in a room getting
//!   numbered broadcasts and pushes through every node, producers appending to an acked
//!   queue, and every `$connect`/`$disconnect`/frame the backend hears.
//! * [`checker`]: the invariants, checked after each scenario once the faults are healed.
//! * [`netns`]: the partitions again, each node in a network namespace of its own and a cut
//!   its NATS link set down (root only; skipped elsewhere, saying why).
//! * [`reads`]: a consumer group's commit, then a read through another node: it starts
//!   after the commit.
//! * [`scenarios`]: the matrix. CI runs it all (bounded); `CHAOS_SEED=N` replays a run's
//!   choices.

mod checker;
mod crashes;
mod disks;
mod fencing;
mod gaps;
mod harness;
mod netns;
mod reads;
mod scenarios;
mod workload;
