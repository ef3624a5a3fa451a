//! Crash points: where the chaos tests kill a node in the middle of an operation
//! (docs/RELIABILITY.md). With `SWITCHBOARD_CRASH_AT` naming a point, the process aborts the
//! first time it reaches it: no destructor runs, nothing is flushed or said, as with
//! `kill -9`, but at exactly that step. Unset in production, where a point costs one load
//! of a value read once.

use std::sync::OnceLock;

/// The variable that arms a point (the tests set it on one node).
const VARIABLE: &str = "SWITCHBOARD_CRASH_AT";

/// A step of an operation a node may die at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// A connection moving to another node: this node let go of it, and has not answered.
    MoveHandedOver,
    /// A connection moving here: the old node handed it over, and it is not registered.
    MoveTaken,
    /// Queue events stored by JetStream, their acks not sent to the client.
    QueueAppended,
    /// A numbered room's message: numbered and queued to this node's members, not
    /// published to the other nodes.
    BroadcastNumbered,
}

impl Point {
    const ALL: [Self; 4] = [
        Self::MoveHandedOver,
        Self::MoveTaken,
        Self::QueueAppended,
        Self::BroadcastNumbered,
    ];

    /// Its name in [`VARIABLE`].
    pub fn name(self) -> &'static str {
        match self {
            Self::MoveHandedOver => "move.handed_over",
            Self::MoveTaken => "move.taken",
            Self::QueueAppended => "queue.appended",
            Self::BroadcastNumbered => "broadcast.numbered",
        }
    }
}

/// Aborts the process if `point` is the one armed.
pub fn reached(point: Point) {
    static ARMED: OnceLock<Option<Point>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        let name = std::env::var(VARIABLE).ok()?;
        let armed = Point::ALL.into_iter().find(|point| point.name() == name);
        if armed.is_none() {
            tracing::error!(%name, "{VARIABLE} names no crash point; none is armed");
        }
        armed
    });
    if *armed == Some(point) {
        eprintln!("crash point {} reached: aborting", point.name());
        std::process::abort();
    }
}
