//! Crash points: where the chaos tests kill a node in the middle of an operation
//! (docs/RELIABILITY.md). With `SWITCHBOARD_CRASH_AT` naming a point (`name`, or `name@N`
//! for the N-th time), the process aborts the first (N-th) time it reaches it: no
//! destructor runs, nothing is flushed or said, as with `kill -9`, but at exactly that
//! step. Unset in production, where a point costs one load of a value read once.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The variable that arms a point (the tests set it on one node).
const VARIABLE: &str = "SWITCHBOARD_CRASH_AT";

/// A step of an operation a node may die at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// A connection's `$connect` said yes (its record is stored); the client has not been
    /// answered.
    ConnectAccepted,
    /// A connection moving to another node: this node let go of it, and has not answered.
    MoveHandedOver,
    /// A connection moving here: the old node handed it over, and it is not registered.
    MoveTaken,
    /// Queue events stored by JetStream, their acks not sent to the client.
    QueueAppended,
    /// A numbered room's message: numbered and queued to this node's members, not
    /// published to the other nodes.
    BroadcastNumbered,
    /// A batch of a queue's push delivery (room webhooks among them) answered 2xx by the
    /// receiver, its offset not committed (acked) yet.
    PushDelivered,
    /// A bulk send queued to this node's recipients and sent to the other nodes', not
    /// answered.
    BulkSent,
}

impl Point {
    const ALL: [Self; 7] = [
        Self::ConnectAccepted,
        Self::MoveHandedOver,
        Self::MoveTaken,
        Self::QueueAppended,
        Self::BroadcastNumbered,
        Self::PushDelivered,
        Self::BulkSent,
    ];

    /// Its name in [`VARIABLE`].
    pub fn name(self) -> &'static str {
        match self {
            Self::ConnectAccepted => "connect.accepted",
            Self::MoveHandedOver => "move.handed_over",
            Self::MoveTaken => "move.taken",
            Self::QueueAppended => "queue.appended",
            Self::BroadcastNumbered => "broadcast.numbered",
            Self::PushDelivered => "push.delivered",
            Self::BulkSent => "bulk.sent",
        }
    }
}

/// Aborts the process if `point` is the one armed, and this is the time.
pub fn reached(point: Point) {
    static ARMED: OnceLock<Option<(Point, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let armed = ARMED.get_or_init(|| {
        let value = std::env::var(VARIABLE).ok()?;
        let armed = parse(&value);
        if armed.is_none() {
            tracing::error!(%value, "{VARIABLE} names no crash point; none is armed");
        }
        armed
    });
    let Some((armed, nth)) = *armed else {
        return;
    };
    if armed == point && HITS.fetch_add(1, Ordering::Relaxed) + 1 == nth {
        eprintln!("crash point {} reached: aborting", point.name());
        std::process::abort();
    }
}

/// `name` or `name@N` (N ≥ 1).
fn parse(value: &str) -> Option<(Point, u64)> {
    let (name, nth) = match value.split_once('@') {
        Some((name, nth)) => (name, nth.parse().ok().filter(|n| *n >= 1)?),
        None => (value, 1),
    };
    let point = Point::ALL.into_iter().find(|point| point.name() == name)?;
    Some((point, nth))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_is_armed_by_name_and_optionally_by_count() {
        assert_eq!(parse("move.taken"), Some((Point::MoveTaken, 1)));
        assert_eq!(parse("queue.appended@20"), Some((Point::QueueAppended, 20)));
        for bad in ["", "nowhere", "move.taken@0", "move.taken@x", "@3"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert!(
            Point::ALL
                .iter()
                .all(|point| parse(point.name()) == Some((*point, 1)))
        );
    }
}
