//! Resumable connections that ended without their client coming back, kept for a resume
//! window so that a late resume learns why ("expired", "overflow") instead of "unknown".

use std::collections::HashMap;
use std::time::Instant;

use crate::resume::{Refusal, SecretHash};

/// Why a resumable connection ended, for a client that comes back after it did.
struct Unresumable {
    /// The hashes of the secrets of the tokens that resumed it when it ended.
    secret_hashes: Box<[SecretHash]>,
    refusal: Refusal,
    until: Instant,
}

/// The shard's ended resumable connections, by sequence.
#[derive(Default)]
pub(super) struct Ended(HashMap<u64, Unresumable>);

impl Ended {
    /// Remembers that connection `sequence` ended for `refusal`, until `until`.
    pub(super) fn note(
        &mut self,
        sequence: u64,
        secret_hashes: Box<[SecretHash]>,
        refusal: Refusal,
        until: Instant,
    ) {
        let ended = Unresumable {
            secret_hashes,
            refusal,
            until,
        };
        self.0.insert(sequence, ended);
    }

    /// Why connection `sequence` cannot be resumed by whoever `proves` one of its hashes.
    pub(super) fn refusal(
        &self,
        sequence: u64,
        proves: impl Fn(&[SecretHash]) -> bool,
    ) -> Option<Refusal> {
        let ended = self.0.get(&sequence)?;
        proves(&ended.secret_hashes).then_some(ended.refusal)
    }

    /// Forgets what has outlived its window at `now`.
    pub(super) fn forget_past(&mut self, now: Instant) {
        self.0.retain(|_, ended| ended.until > now);
    }
}
