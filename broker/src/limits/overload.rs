//! The overload manager's memory budget: the bytes every outbound queue holds together.
//!
//! Queued bytes are counted when they are queued, not sampled: each shard keeps a
//! [`ShardAccount`] that its queues charge and refund, and the account takes credit from
//! the shared [`OutboundBudget`] in chunks of [`CREDIT_CHUNK`] (one atomic operation per
//! chunk, none per frame). Credit that would take the total past the budget is refused at
//! that moment: the queue that asked, if it is one of the big ones, is cut on the spot
//! (1013), and the shard is asked to shed its biggest queues at once. While the total is
//! over, new connections are refused (503); that stops once usage is back under 90% of the
//! budget (hysteresis, so it does not flap). The most the total can exceed the budget by
//! is one chunk per shard plus the frames of connections too small to be cut.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Credit a shard takes from (and gives back to) the shared budget at a time.
pub const CREDIT_CHUNK: usize = 256 * 1024;
/// A queue that holds at least this much when the budget is crossed is cut then and there;
/// a reader that keeps up holds far less.
pub const CUT_AT_CROSSING: usize = 16 * 1024;

/// The memory a frame of `len` bytes takes, as the allocator hands it out: rounded up to
/// its size class (four per power of two, as in jemalloc, the binary's allocator), plus,
/// for a large allocation, the page jemalloc adds to randomize cache lines, plus its shared
/// header and a few queue slots. A 30 KB frame takes 36 KiB: the budget counts what the
/// process really holds, not just payload.
pub fn footprint(len: usize) -> usize {
    const PER_FRAME: usize = 128;
    const SMALL_MAX: usize = 14 * 1024;
    const PAGE: usize = 4096;
    if len <= 16 {
        return 16 + PER_FRAME;
    }
    let power = usize::BITS - 1 - (len - 1).leading_zeros();
    let step = 1usize << power.saturating_sub(2);
    let class = len.div_ceil(step) * step;
    let pad = if class > SMALL_MAX { PAGE } else { 0 };
    class + pad + PER_FRAME
}

#[derive(Debug)]
pub struct OutboundBudget {
    budget: usize,
    /// Credit taken by every shard's account: at least what their queues hold.
    used: AtomicUsize,
    over: AtomicBool,
}

impl OutboundBudget {
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            used: AtomicUsize::new(0),
            over: AtomicBool::new(false),
        }
    }

    /// Whether new connections are being refused.
    pub fn is_over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// Bytes queued across every shard (to within one chunk per shard).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `bytes` of credit, unless that would pass the budget.
    fn take(&self, bytes: usize) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let after = used.saturating_add(bytes);
                (after <= self.budget).then_some(after)
            });
        if taken.is_err() {
            self.over.store(true, Ordering::Relaxed);
        }
        taken.is_ok()
    }

    /// Takes `bytes` of credit whatever the budget says (frames that must go out: a close,
    /// a resume's answer), so that their refund later balances.
    fn force(&self, bytes: usize) {
        let after = self.used.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if after > self.budget {
            self.over.store(true, Ordering::Relaxed);
        }
    }

    fn give_back(&self, bytes: usize) {
        let after = self.used.fetch_sub(bytes, Ordering::AcqRel) - bytes;
        if after <= self.low_water() {
            self.over.store(false, Ordering::Relaxed);
        }
    }

    fn low_water(&self) -> usize {
        self.budget / 10 * 9
    }

    /// How many of `queued` bytes a shard must shed to bring the total down to the
    /// low-water mark (its share, in proportion to what it holds); 0 unless over.
    pub fn excess_share(&self, queued: usize) -> usize {
        let used = self.used();
        if !self.is_over() || used <= self.low_water() || used == 0 {
            return 0;
        }
        let excess = used - self.low_water();
        (queued as u128 * excess as u128 / used as u128) as usize
    }
}

/// Whether a charge got its bytes within the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    Within,
    /// The budget is crossed: the charge was not made.
    OverBudget,
}

/// One shard's account with the budget: its queues charge and refund here, on the shard's
/// thread, without touching the shared counter until a chunk is needed or can be returned.
#[derive(Debug)]
pub struct ShardAccount {
    budget: Arc<OutboundBudget>,
    /// Bytes the shard's queues hold.
    queued: Cell<usize>,
    /// Credit taken from the budget: at least `queued`.
    credit: Cell<usize>,
    /// A charge found the budget crossed: the shard should shed its biggest queues now.
    shed_requested: Cell<bool>,
}

impl ShardAccount {
    pub fn new(budget: Arc<OutboundBudget>) -> Self {
        Self {
            budget,
            queued: Cell::new(0),
            credit: Cell::new(0),
            shed_requested: Cell::new(false),
        }
    }

    pub fn budget(&self) -> &OutboundBudget {
        &self.budget
    }

    /// Bytes the shard's queues hold.
    pub fn queued(&self) -> usize {
        self.queued.get()
    }

    /// Charges `bytes` queued, unless that needs credit past the budget.
    pub fn charge(&self, bytes: usize) -> Charge {
        let queued = self.queued.get() + bytes;
        if queued > self.credit.get() {
            let needed = (queued - self.credit.get()).max(CREDIT_CHUNK);
            if !self.budget.take(needed) {
                self.shed_requested.set(true);
                return Charge::OverBudget;
            }
            self.credit.set(self.credit.get() + needed);
        }
        self.queued.set(queued);
        Charge::Within
    }

    /// Charges `bytes` that go out whatever the budget says.
    pub fn charge_anyway(&self, bytes: usize) {
        let queued = self.queued.get() + bytes;
        if queued > self.credit.get() {
            let needed = queued - self.credit.get();
            self.budget.force(needed);
            self.credit.set(self.credit.get() + needed);
        }
        self.queued.set(queued);
    }

    /// Refunds `bytes` that left the queues (written, dropped); spare credit beyond two
    /// chunks goes back to the budget.
    pub fn refund(&self, bytes: usize) {
        let queued = self.queued.get().saturating_sub(bytes);
        self.queued.set(queued);
        let spare = self.credit.get() - queued;
        if spare > 2 * CREDIT_CHUNK {
            let returned = spare - CREDIT_CHUNK;
            self.budget.give_back(returned);
            self.credit.set(self.credit.get() - returned);
        }
    }

    /// Whether a charge found the budget crossed since the last call.
    pub fn take_shed_request(&self) -> bool {
        self.shed_requested.replace(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_take_credit_in_chunks_and_refuse_past_the_budget() {
        let budget = Arc::new(OutboundBudget::new(4 * CREDIT_CHUNK));
        let (a, b) = (
            ShardAccount::new(budget.clone()),
            ShardAccount::new(budget.clone()),
        );
        assert_eq!(a.charge(100), Charge::Within);
        assert_eq!(budget.used(), CREDIT_CHUNK, "one chunk, not 100 bytes");
        assert_eq!(a.charge(CREDIT_CHUNK), Charge::Within);
        assert_eq!(b.charge(2 * CREDIT_CHUNK), Charge::Within);
        assert!(!budget.is_over());
        // The next chunk would pass the budget: refused at once, and a shed is asked for.
        assert_eq!(b.charge(CREDIT_CHUNK), Charge::OverBudget);
        assert!(budget.is_over());
        assert!(b.take_shed_request() && !b.take_shed_request());
        assert_eq!(
            b.queued(),
            2 * CREDIT_CHUNK,
            "the refused charge is not counted"
        );
        // A close frame goes out anyway, and its refund balances it.
        b.charge_anyway(10);
        b.refund(10);
        // Writing what was queued gives the credit back; under 90% it is not over.
        b.refund(2 * CREDIT_CHUNK);
        a.refund(CREDIT_CHUNK + 100);
        assert!(!budget.is_over());
        // Each account keeps at most two chunks of spare credit for what comes next.
        assert_eq!((a.queued(), b.queued()), (0, 0));
        assert!(budget.used() <= 2 * 2 * CREDIT_CHUNK, "{}", budget.used());
    }

    #[test]
    fn a_frame_costs_what_the_allocator_gives_it() {
        assert_eq!(footprint(1), 16 + 128);
        assert_eq!(footprint(100), 112 + 128);
        assert_eq!(footprint(30_004), 32 * 1024 + 4096 + 128);
        assert_eq!(footprint(32 * 1024), 32 * 1024 + 4096 + 128);
        assert_eq!(footprint(32 * 1024 + 1), 40 * 1024 + 4096 + 128);
        assert!((1..200_000).step_by(997).all(|len| footprint(len) >= len));
    }

    #[test]
    fn shards_shed_in_proportion_while_over() {
        let budget = Arc::new(OutboundBudget::new(10 * CREDIT_CHUNK));
        let account = ShardAccount::new(budget.clone());
        assert_eq!(account.charge(10 * CREDIT_CHUNK), Charge::Within);
        assert_eq!(budget.excess_share(account.queued()), 0, "at, not over");
        assert_eq!(account.charge(1), Charge::OverBudget);
        // Down to 90%: one chunk of the ten.
        assert_eq!(budget.excess_share(account.queued()), CREDIT_CHUNK);
    }
}
