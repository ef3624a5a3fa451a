//! Presence events (`presence_events = true`): members of a room are told when another
//! member joins or leaves, as `{"type":"presence","room":R,"event":"join"|"leave",
//! "connectionId":…,"user":…}`.
//!
//! Told naively, a reconnect storm costs members × changes frames: 10 k members of a room
//! rejoining send 10 k × 10 k. So a node collects a room's changes for a short window
//! ([`WINDOW_MS`], from the first change) and then sends them: a join and a leave of the
//! same connection within the window cancel out; up to [`MOST_SINGLE_EVENTS`] changes go
//! one frame each; more become one summary frame, `{"type":"presence","room":R,
//! "event":"many","joined":J,"left":L}`, after which a client that shows the member list
//! asks for it again (`room_presence`). A member therefore gets at most
//! [`MOST_SINGLE_EVENTS`] presence frames per room per window from each node, however
//! big the storm. Changes are sent to the room's members when the window closes, so a
//! member may hear of changes up to a window before it joined (in a summary, its own
//! join among them). Pure code: time comes in as `now_ms`.

use std::collections::HashMap;

use serde_json::json;

use super::RoomName;
use crate::connection_id::ConnectionId;
use crate::message::Message;

/// How long a room's changes are collected before they are sent.
pub const WINDOW_MS: u64 = 100;
/// More changes than this in one window are summarised in one frame.
pub const MOST_SINGLE_EVENTS: usize = 16;

/// A member joined or left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Join,
    Leave,
}

/// One member's change of membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEvent {
    pub change: Change,
    pub connection: ConnectionId,
    pub user: Option<String>,
}

/// What to send to a room once its window closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flush {
    /// Each to every member but the one it is about.
    Each(Vec<PresenceEvent>),
    /// One summary to every member.
    Many { joined: usize, left: usize },
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Coalescer {
    windows: HashMap<RoomName, Window>,
}

#[derive(Debug)]
struct Window {
    closes_at_ms: u64,
    /// In arrival order; a cancelled change leaves `None`.
    events: Vec<Option<PresenceEvent>>,
    /// Where each connection's last uncancelled change is in `events`.
    last: HashMap<ConnectionId, usize>,
}

impl Coalescer {
    /// Notes `event` in `room`.
    pub fn note(&mut self, room: RoomName, event: PresenceEvent, now_ms: u64) {
        let window = self.windows.entry(room).or_insert_with(|| Window {
            closes_at_ms: now_ms + WINDOW_MS,
            events: Vec::new(),
            last: HashMap::new(),
        });
        // A join then a leave of one connection (or the other way round) is no change.
        if let Some(&index) = window.last.get(&event.connection)
            && window.events[index]
                .as_ref()
                .is_some_and(|earlier| earlier.change != event.change)
        {
            window.events[index] = None;
            window.last.remove(&event.connection);
            return;
        }
        window.last.insert(event.connection, window.events.len());
        window.events.push(Some(event));
    }

    /// When the next window closes, if any is open.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.windows.values().map(|w| w.closes_at_ms).min()
    }

    /// The rooms whose window has closed by `now_ms`, with what to send them.
    pub fn due(&mut self, now_ms: u64) -> Vec<(RoomName, Flush)> {
        let closed: Vec<RoomName> = (self.windows.iter())
            .filter(|(_, window)| window.closes_at_ms <= now_ms)
            .map(|(room, _)| room.clone())
            .collect();
        closed
            .into_iter()
            .filter_map(|room| {
                let events: Vec<_> = self.windows.remove(&room)?.events;
                let events: Vec<_> = events.into_iter().flatten().collect();
                (!events.is_empty()).then(|| (room, flush(events)))
            })
            .collect()
    }
}

fn flush(events: Vec<PresenceEvent>) -> Flush {
    if events.len() <= MOST_SINGLE_EVENTS {
        return Flush::Each(events);
    }
    let joined = events.iter().filter(|e| e.change == Change::Join).count();
    Flush::Many {
        joined,
        left: events.len() - joined,
    }
}

impl PresenceEvent {
    /// The frame members get.
    pub fn frame(&self, room: &RoomName) -> Message {
        let event = match self.change {
            Change::Join => "join",
            Change::Leave => "leave",
        };
        let frame = json!({
            "type": "presence",
            "room": room.as_str(),
            "event": event,
            "connectionId": self.connection.to_string(),
            "user": self.user,
        });
        Message::text(frame.to_string())
    }
}

/// The summary frame of a window with more than [`MOST_SINGLE_EVENTS`] changes.
pub fn many_frame(room: &RoomName, joined: usize, left: usize) -> Message {
    let frame = json!({
        "type": "presence",
        "room": room.as_str(),
        "event": "many",
        "joined": joined,
        "left": left,
    });
    Message::text(frame.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(change: Change, sequence: u64) -> PresenceEvent {
        PresenceEvent {
            change,
            connection: ConnectionId {
                node: 0,
                shard: 0,
                epoch: 1,
                sequence,
            },
            user: Some(format!("u{sequence}")),
        }
    }

    fn room(name: &str) -> RoomName {
        RoomName::parse(name).unwrap()
    }

    #[test]
    fn a_window_collects_a_rooms_changes_then_sends_each() {
        let mut coalescer = Coalescer::default();
        coalescer.note(room("a"), event(Change::Join, 1), 1_000);
        coalescer.note(room("a"), event(Change::Leave, 2), 1_050);
        coalescer.note(room("b"), event(Change::Join, 3), 1_060);
        assert_eq!(coalescer.next_due_ms(), Some(1_100));
        assert!(coalescer.due(1_099).is_empty());
        let due = coalescer.due(1_100);
        assert_eq!(
            due,
            vec![(
                room("a"),
                Flush::Each(vec![event(Change::Join, 1), event(Change::Leave, 2)])
            )]
        );
        assert_eq!(coalescer.next_due_ms(), Some(1_160));
    }

    #[test]
    fn a_join_and_leave_of_one_connection_cancel_out() {
        let mut coalescer = Coalescer::default();
        coalescer.note(room("a"), event(Change::Join, 1), 0);
        coalescer.note(room("a"), event(Change::Leave, 1), 10);
        coalescer.note(room("a"), event(Change::Leave, 2), 20);
        coalescer.note(room("a"), event(Change::Join, 2), 30);
        assert!(coalescer.due(1_000).is_empty(), "nothing changed");
        assert_eq!(coalescer.next_due_ms(), None);
    }

    #[test]
    fn a_storm_becomes_one_summary() {
        let mut coalescer = Coalescer::default();
        for sequence in 0..10_000 {
            coalescer.note(room("big"), event(Change::Leave, sequence), 0);
        }
        for sequence in 10_000..15_000 {
            coalescer.note(room("big"), event(Change::Join, sequence), 50);
        }
        let due = coalescer.due(100);
        assert_eq!(
            due,
            vec![(
                room("big"),
                Flush::Many {
                    joined: 5_000,
                    left: 10_000
                }
            )]
        );
    }

    #[test]
    fn frames_carry_the_pinned_fields() {
        let frame = event(Change::Join, 7).frame(&room("a"));
        let json: serde_json::Value = serde_json::from_slice(&frame.payload).unwrap();
        assert_eq!(json["type"], "presence");
        assert_eq!(json["event"], "join");
        assert_eq!(json["user"], "u7");
        assert!(json["connectionId"].as_str().unwrap().len() > 10);
        let many: serde_json::Value =
            serde_json::from_slice(&many_frame(&room("a"), 3, 4).payload).unwrap();
        assert_eq!(
            (&many["event"], &many["joined"]),
            (&json!("many"), &json!(3))
        );
    }
}
