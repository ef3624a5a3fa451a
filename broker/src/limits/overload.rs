//! The overload manager's memory budget: the bytes every outbound queue holds together.
//!
//! Each shard reports what its connections have queued (from its sweep); when the sum
//! passes the budget the gateway is overloaded: new connections are refused (503) and
//! each shard cuts its biggest queues until its share of the excess is gone. It stops
//! refusing once usage is back under 90% of the budget (hysteresis, so it does not flap).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

#[derive(Debug)]
pub struct OutboundBudget {
    budget: usize,
    per_shard: Box<[AtomicUsize]>,
    over: AtomicBool,
}

impl OutboundBudget {
    pub fn new(budget: usize, shards: usize) -> Self {
        Self {
            budget,
            per_shard: (0..shards).map(|_| AtomicUsize::new(0)).collect(),
            over: AtomicBool::new(false),
        }
    }

    /// Whether new connections are being refused.
    pub fn is_over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// Bytes queued across every shard, as last reported.
    pub fn used(&self) -> usize {
        self.per_shard
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }

    /// Records that `shard` has `queued` bytes; returns how many of them it must shed.
    pub fn report(&self, shard: usize, queued: usize) -> usize {
        if let Some(slot) = self.per_shard.get(shard) {
            slot.store(queued, Ordering::Relaxed);
        }
        let used = self.used();
        let low_water = self.budget / 10 * 9;
        if used > self.budget {
            self.over.store(true, Ordering::Relaxed);
            // Every shard sheds in proportion to what it holds, down to the low-water mark.
            let excess = used - low_water;
            (queued as u128 * excess as u128 / used as u128) as usize
        } else {
            if used <= low_water {
                self.over.store(false, Ordering::Relaxed);
            }
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheds_in_proportion_and_recovers_with_hysteresis() {
        let budget = OutboundBudget::new(1000, 2);
        assert_eq!(budget.report(0, 600), 0);
        assert!(!budget.is_over());
        // 600 + 900 = 1500 > 1000: down to 900 overall, shard 1 sheds 900 * 600 / 1500.
        assert_eq!(budget.report(1, 900), 360);
        assert!(budget.is_over());
        assert_eq!(budget.report(1, 350), 0);
        assert!(
            budget.is_over(),
            "950 is under the budget but over the low-water mark"
        );
        assert_eq!(budget.report(0, 500), 0);
        assert!(!budget.is_over());
    }
}
