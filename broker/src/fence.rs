//! The node's lease on its own connections, in cluster mode. The other nodes declare a node
//! lost when its heartbeat has not changed for `cluster.node_timeout_ms` on their clocks,
//! and report its connections gone. A node that was paused (a frozen VM, `SIGSTOP`) or cut
//! off from NATS for that long must therefore not act for those connections until it knows
//! it was not declared lost: not dispatch a frame a client sent meanwhile, not deliver a
//! message that was meant for members the cluster still counted then.
//!
//! So every confirmed heartbeat extends a lease to the moment it was *sent* plus the timeout
//! less one heartbeat: no other node can have declared this one lost before then. While the
//! lease has run out the node is fenced: connections hold their inbound frames, messages
//! from other nodes and management calls wait, and nothing is taken over. The next
//! heartbeat settles it: confirmed, everything goes on; declared lost, the node closes the
//! connections that were reported gone (they were all opened before [`Fence::generation`]
//! moved on) and serves new ones.
//!
//! A single node has nothing to fence: [`Fence::open`] always holds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// See the module documentation.
#[derive(Debug)]
pub struct Fence {
    /// Where the lease's times count from.
    origin: Instant,
    /// The lease runs until this many milliseconds after `origin`; `u64::MAX`: always.
    until_ms: AtomicU64,
    /// How long a confirmed heartbeat keeps the lease.
    valid_for: Duration,
    /// Moves on each time this node learns it was declared lost.
    generation: AtomicU64,
    /// Woken whenever the lease is renewed.
    renewed: Notify,
}

impl Fence {
    /// How long a management call or a handshake waits for the lease before it is refused
    /// (503): the next heartbeat usually settles it well within this.
    pub const PATIENCE: Duration = Duration::from_secs(2);

    /// A fence that always holds (a single node).
    pub fn open() -> Self {
        Self::with(u64::MAX, Duration::ZERO)
    }

    /// A lease that each confirmed heartbeat keeps for `valid_for`, held from now (the
    /// node has just registered).
    pub fn leased(valid_for: Duration) -> Self {
        let fence = Self::with(0, valid_for);
        fence.renewed(Instant::now());
        fence
    }

    fn with(until_ms: u64, valid_for: Duration) -> Self {
        Self {
            origin: Instant::now(),
            until_ms: AtomicU64::new(until_ms),
            valid_for,
            generation: AtomicU64::new(0),
            renewed: Notify::new(),
        }
    }

    /// Whether the node may act for its connections now.
    pub fn holds(&self) -> bool {
        // Asked on every wake of every session: a single node's fence reads no clock.
        match self.until_ms.load(Ordering::Acquire) {
            u64::MAX => true,
            until => self.millis(Instant::now()) < until,
        }
    }

    /// Which run of this node's connections is current: a session that started in an
    /// earlier generation belongs to connections the cluster reported gone.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A heartbeat sent at `sent_at` was confirmed: the lease runs to `sent_at` plus its
    /// validity (never back).
    pub fn renewed(&self, sent_at: Instant) {
        let until = self.millis(sent_at + self.valid_for);
        self.until_ms.fetch_max(until, Ordering::AcqRel);
        self.renewed.notify_waiters();
    }

    /// The node learned it was declared lost: every session of the current generation is
    /// fenced for good, and the lease is gone until the next confirmed heartbeat.
    pub fn declared_lost(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.until_ms.store(0, Ordering::Release);
    }

    /// Resolves once the fence holds (at once if it does).
    pub async fn held(&self) {
        loop {
            let renewed = self.renewed.notified();
            tokio::pin!(renewed);
            renewed.as_mut().enable();
            if self.holds() {
                return;
            }
            renewed.await;
        }
    }

    /// [`Fence::held`], giving up after `patience`: whether it holds.
    pub async fn held_within(&self, patience: Duration) -> bool {
        tokio::time::timeout(patience, self.held()).await.is_ok()
    }

    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_fence_always_holds() {
        let fence = Fence::open();
        assert!(fence.holds());
        fence.declared_lost();
        assert_eq!(fence.generation(), 1);
    }

    #[test]
    fn a_lease_runs_from_the_heartbeat_sent_not_confirmed() {
        let fence = Fence::leased(Duration::from_millis(200));
        assert!(fence.holds());
        std::thread::sleep(Duration::from_millis(250));
        assert!(!fence.holds(), "ran out");
        // A heartbeat sent long ago and confirmed only now gives nothing.
        fence.renewed(Instant::now() - Duration::from_millis(300));
        assert!(!fence.holds());
        fence.renewed(Instant::now());
        assert!(fence.holds());
    }

    #[test]
    fn declared_lost_ends_the_lease_and_the_generation() {
        let fence = Fence::leased(Duration::from_secs(60));
        fence.declared_lost();
        assert!(!fence.holds());
        assert_eq!(fence.generation(), 1);
        fence.renewed(Instant::now());
        assert!(fence.holds(), "a new registration holds again");
        assert_eq!(fence.generation(), 1);
    }

    #[tokio::test]
    async fn waiters_go_on_when_the_lease_is_renewed() {
        let fence = std::sync::Arc::new(Fence::leased(Duration::from_millis(50)));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(!fence.held_within(Duration::from_millis(20)).await);
        let waiter = tokio::spawn({
            let fence = fence.clone();
            async move { fence.held().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        fence.renewed(Instant::now());
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
