//! Room webhooks: `room_occupied` when a room's first member joins anywhere, `room_vacated`
//! when its last one leaves, `member_joined` and `member_left` for each member, POSTed to
//! `[webhooks] url` as `{"time_ms": …, "events": [{"name", "room", "connectionId", "user"}]}`
//! and signed `X-Switchboard-Signature: sha256=HEX` (HMAC-SHA256 of the body).
//!
//! Events are not sent from where they happen: they are appended to an internal durable
//! queue ([`QUEUE`]) and its push deliverer POSTs them, up to [`BATCH`] per request, retried
//! with backoff until the receiver answers 2xx and resumed after a restart: delivered at
//! least once, in order. This file is the events' form, the body and the signature.

pub mod config;
pub mod feed;

use ring::hmac;
use serde::Serialize;

/// The internal queue the events wait in (a name no user queue may take).
pub const QUEUE: &str = "switchboard.webhooks";
/// Most events per POST.
pub const BATCH: usize = 100;
/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "x-switchboard-signature";

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventName {
    RoomOccupied,
    RoomVacated,
    MemberJoined,
    MemberLeft,
}

impl EventName {
    pub const ALL: [Self; 4] = [
        Self::RoomOccupied,
        Self::RoomVacated,
        Self::MemberJoined,
        Self::MemberLeft,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoomOccupied => "room_occupied",
            Self::RoomVacated => "room_vacated",
            Self::MemberJoined => "member_joined",
            Self::MemberLeft => "member_left",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|name| name.as_str() == text)
    }
}

/// One event, as it is queued and sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WebhookEvent {
    /// Unique per event (this node and run, and a count), given when it is stored: a
    /// receiver drops an id it has seen (delivery is at least once).
    pub id: String,
    /// When it happened, epoch milliseconds.
    pub time_ms: u64,
    pub name: EventName,
    pub room: String,
    /// The member, for `member_*`.
    #[serde(rename = "connectionId", skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<String>,
    /// Its user (the authorizer's principal), for `member_*`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl WebhookEvent {
    /// Event `name` in `room`, now (its id is given when it is stored).
    pub fn new(
        name: EventName,
        room: &str,
        connection_id: Option<String>,
        user: Option<String>,
    ) -> Self {
        Self {
            id: String::new(),
            time_ms: crate::clock::now_ms(),
            name,
            room: room.to_owned(),
            connection_id,
            user,
        }
    }

    /// A room event (`room_occupied`, `room_vacated`).
    pub fn room(name: EventName, room: &str) -> Self {
        Self::new(name, room, None, None)
    }

    /// The queue entry: the event's JSON.
    pub fn to_entry(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Most events waiting to be stored; past it they are dropped and counted (storage that
/// stays unavailable must not take the gateway's memory with it).
pub const WAITING: usize = 65_536;

/// Where a node's room events go on their way to [`feed`].
#[derive(Clone)]
pub struct WebhookSender {
    events: tokio::sync::mpsc::Sender<WebhookEvent>,
    /// `switchboard_webhook_events_total{outcome="dropped"}`.
    dropped: prometheus::IntCounter,
}

impl WebhookSender {
    /// A sender and the receiving end [`feed::feed`] takes.
    pub fn new(
        dropped: prometheus::IntCounter,
    ) -> (Self, tokio::sync::mpsc::Receiver<WebhookEvent>) {
        let (events, receiver) = tokio::sync::mpsc::channel(WAITING);
        (Self { events, dropped }, receiver)
    }

    /// Notes `event` for storing; drops (and counts) it if [`WAITING`] already wait.
    pub fn note(&self, event: WebhookEvent) {
        if self.events.try_send(event).is_err() {
            self.dropped.inc();
        }
    }
}

/// A POST's body: `{"time_ms": now, "events": [entries…]}` (each entry is an event's JSON).
pub fn body(entries: impl Iterator<Item = Vec<u8>>, time_ms: u64) -> Vec<u8> {
    let mut body = format!("{{\"time_ms\":{time_ms},\"events\":[").into_bytes();
    for (index, entry) in entries.enumerate() {
        if index > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&entry);
    }
    body.extend_from_slice(b"]}");
    body
}

/// `sha256=HEX`: the HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let tag = hmac::sign(&key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_lists_the_events_and_the_signature_is_hmac_sha256() {
        let mut joined =
            WebhookEvent::new(EventName::MemberJoined, "lobby", Some("abc".into()), None);
        (joined.id, joined.time_ms) = ("1.2.3".into(), 1_600);
        let mut occupied = WebhookEvent::room(EventName::RoomOccupied, "lobby");
        (occupied.id, occupied.time_ms) = ("1.2.2".into(), 1_500);
        let entries = vec![occupied.to_entry(), joined.to_entry()];
        let body = body(entries.into_iter(), 1_700);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"time_ms": 1700, "events": [
                {"id": "1.2.2", "time_ms": 1500, "name": "room_occupied", "room": "lobby"},
                {"id": "1.2.3", "time_ms": 1600, "name": "member_joined", "room": "lobby", "connectionId": "abc"},
            ]})
        );
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
