//! Who joined and left, told to the rooms' members (presence events, coalesced: see
//! [`crate::rooms::events`]) and to the webhooks ([`crate::webhooks`]).

use super::{Directory, PresenceReceiver};
use crate::connection_id::ConnectionId;
use crate::fanout;
use crate::rooms::events::{Change, Coalescer, Flush, PresenceEvent, many_frame};
use crate::rooms::{RoomDelivery, RoomName};
use crate::webhooks::{EventName, WebhookEvent};

impl Directory {
    /// Connection `connection` joined or left `room` (by a route, the API or its end; not
    /// by moving between nodes): with presence events on for the room, its other members
    /// are told, coalesced; with webhooks, `member_joined` or `member_left` is sent.
    pub fn membership_changed(
        &self,
        room: &RoomName,
        change: Change,
        connection: ConnectionId,
        authorizer: Option<&serde_json::value::RawValue>,
    ) {
        let name = match change {
            Change::Join => EventName::MemberJoined,
            Change::Leave => EventName::MemberLeft,
        };
        let to_webhooks = (self.webhooks.as_ref()).is_some_and(|w| w.config.wants(name));
        let to_members = self.settings(room).presence_events;
        if !to_webhooks && !to_members {
            return;
        }
        let user = crate::auth::authorizer::user_of(authorizer);
        if to_webhooks {
            let id = Some(connection.to_string());
            self.note_webhook(WebhookEvent::new(name, room.as_str(), id, user.clone()));
        }
        if to_members {
            let event = PresenceEvent {
                change,
                connection,
                user,
            };
            let _ = self.presence_events.send((room.clone(), event));
        }
    }

    /// Tells rooms' members of joins and leaves until shutdown: collects each room's
    /// changes for a window, then sends them (see [`crate::rooms::events`]).
    pub async fn tell_presence(
        self,
        mut changes: PresenceReceiver,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let started = std::time::Instant::now();
        let now_ms = || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut coalescer = Coalescer::default();
        loop {
            let due = coalescer.next_due_ms();
            let window_closes = async {
                match due {
                    Some(at) => {
                        let wait = at.saturating_sub(now_ms());
                        tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                change = changes.recv() => match change {
                    Some((room, event)) => coalescer.note(room, event, now_ms()),
                    None => return,
                },
                _ = window_closes => {
                    for (room, flush) in coalescer.due(now_ms()) {
                        self.send_presence(&room, flush).await;
                    }
                }
            }
        }
    }

    /// Queues a window's presence frames to `room`'s members everywhere, without counts.
    async fn send_presence(&self, room: &RoomName, flush: Flush) {
        let frames = match flush {
            Flush::Each(events) => (events.iter())
                .map(|event| {
                    let delivery = RoomDelivery {
                        exclude: Some(event.connection),
                        ..RoomDelivery::default()
                    };
                    (event.frame(room), delivery)
                })
                .collect(),
            Flush::Many { joined, left } => {
                vec![(many_frame(room, joined, left), RoomDelivery::default())]
            }
        };
        for (message, delivery) in frames {
            fanout::relay(self.shards.iter(), room, &message, self.here(delivery)).await;
            if let Some(cluster) = &self.cluster {
                cluster.publish_room(room, &message, delivery).await;
            }
        }
    }

    /// Counts a local membership of `room` in or out; with webhooks on (one node), the
    /// room's first member makes it occupied and its last vacated.
    pub(super) fn count_occupancy(&self, room: &RoomName, joined: bool) {
        let Some(webhooks) = &self.webhooks else {
            return;
        };
        if self.cluster.is_some() {
            return; // counted cluster-wide: cluster/occupancy.rs
        }
        let Ok(mut occupancy) = webhooks.occupancy.lock() else {
            return;
        };
        let members = occupancy.entry(room.clone()).or_default();
        let before = *members;
        *members = match joined {
            true => before + 1,
            false => before.saturating_sub(1),
        };
        let after = *members;
        if after == 0 {
            occupancy.remove(room);
        }
        drop(occupancy);
        let name = match (before, after) {
            (0, 1) => EventName::RoomOccupied,
            (1, 0) => EventName::RoomVacated,
            _ => return,
        };
        self.note_webhook(WebhookEvent::room(name, room.as_str()));
    }

    /// Queues `event` for the webhooks, if they want it.
    fn note_webhook(&self, event: WebhookEvent) {
        if let Some(webhooks) = &self.webhooks
            && webhooks.config.wants(event.name)
        {
            webhooks.events.note(event);
        }
    }
}
