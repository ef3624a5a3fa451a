//! A room's memory: the offset its next message gets, the epoch those offsets count in, and
//! the messages it keeps (at most `history_size`, none older than `history_ttl_secs`).
//!
//! Offsets are dense (1, 2, 3 …) within an epoch; an epoch is an opaque string that
//! changes whenever continuity was lost (a log made anew: a restart without durable
//! history, a new sequencer for the room). A reader that names an offset and an epoch is
//! told whether everything after that offset can be given to it ([`Replay::recovered`]):
//! only then may it trust that it missed nothing. Pure code: time comes in as `now_ms`.

use std::collections::VecDeque;

use base64::Engine;
use bytes::Bytes;
use serde_json::{Value, json};

use super::RoomName;
use super::config::HistoryBound;
use crate::message::{Kind, Message};

/// The gateway's own queue that durable rooms' messages are stored in (one node).
pub const QUEUE: &str = "switchboard.history";

/// One kept message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub offset: u64,
    /// When it was published, epoch milliseconds.
    pub time_ms: u64,
    /// What was published.
    pub message: Message,
}

/// What a reader asks of a room's past.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Want {
    /// The last `n` kept messages (`history: n` on a join; 1 is "the latest value").
    Last(usize),
    /// Everything after `offset` (at most `limit`), in `epoch` if the reader names one.
    Since {
        offset: u64,
        epoch: Option<String>,
        limit: usize,
    },
}

/// What a reader gets: where the room stands and the messages it asked for, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub epoch: String,
    /// The room's last offset (0 before its first message).
    pub top: u64,
    /// The oldest offset kept (`top + 1` when none is).
    pub first: u64,
    /// False when a `Since` cannot be served without a gap: another epoch, an offset
    /// older than `first - 1`, or one past `top`. The messages are then what is kept
    /// after the offset (all that is kept, for another epoch), for a reader that wants
    /// them anyway; a join replays none of them ([`Replay::for_join`]).
    pub recovered: bool,
    pub messages: Vec<Kept>,
    /// More messages follow that did not fit one answer between nodes
    /// ([`Replay::fit`]): ask again after the last one.
    pub more: bool,
}

/// See the module documentation.
#[derive(Debug)]
pub struct RoomLog {
    epoch: String,
    top: u64,
    kept: VecDeque<Kept>,
    /// When the last message was appended.
    last_ms: u64,
}

impl RoomLog {
    /// A log made at `now_ms` whose offsets start at 1 in `epoch`.
    pub fn new(epoch: String, now_ms: u64) -> Self {
        let mut log = Self::resumed(epoch, 0, Vec::new());
        log.last_ms = now_ms;
        log
    }

    /// A log that continues `epoch` after `top`, keeping `kept` (read back from disk).
    pub fn resumed(epoch: String, top: u64, kept: Vec<Kept>) -> Self {
        let last_ms = kept.last().map_or(0, |kept| kept.time_ms);
        Self {
            epoch,
            top,
            kept: kept.into(),
            last_ms,
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// A short stand-in for the epoch on each numbered delivery ([`epoch_id`]).
    pub fn epoch_id(&self) -> u32 {
        epoch_id(&self.epoch)
    }

    /// Gives `message` the next offset and keeps it if `bound` says so; returns the offset.
    pub fn append(&mut self, message: Message, now_ms: u64, bound: Option<HistoryBound>) -> u64 {
        self.top += 1;
        self.last_ms = now_ms;
        if let Some(bound) = bound {
            self.kept.push_back(Kept {
                offset: self.top,
                time_ms: now_ms,
                message,
            });
            self.prune(now_ms, bound);
        }
        self.top
    }

    /// Folds in a message read back from storage (oldest first), keeping what `bound`
    /// keeps at `now_ms`.
    pub fn restore(&mut self, kept: Kept, now_ms: u64, bound: Option<HistoryBound>) {
        self.top = self.top.max(kept.offset);
        self.last_ms = self.last_ms.max(kept.time_ms);
        if let Some(bound) = bound {
            self.kept.push_back(kept);
            self.prune(now_ms, bound);
        }
    }

    /// Takes back the message just appended as `offset` (it could not be stored).
    pub fn take_back(&mut self, offset: u64) {
        if self.top == offset {
            self.top -= 1;
            if self.kept.back().is_some_and(|kept| kept.offset == offset) {
                self.kept.pop_back();
            }
        }
    }

    /// Forgets what `bound` no longer keeps.
    pub fn prune(&mut self, now_ms: u64, bound: HistoryBound) {
        while self.kept.len() > bound.size {
            self.kept.pop_front();
        }
        let expired = |kept: &Kept| now_ms.saturating_sub(kept.time_ms) >= bound.ttl_ms;
        while self.kept.front().is_some_and(expired) {
            self.kept.pop_front();
        }
    }

    /// When the last message was appended, epoch milliseconds.
    pub fn last_ms(&self) -> u64 {
        self.last_ms
    }

    /// Whether nothing is kept (the log can go once its room is quiet).
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// What `want` asks for, as this log can serve it now.
    pub fn read(&mut self, want: &Want, now_ms: u64, bound: Option<HistoryBound>) -> Replay {
        match bound {
            Some(bound) => self.prune(now_ms, bound),
            None => self.kept.clear(),
        }
        let first = self.kept.front().map_or(self.top + 1, |kept| kept.offset);
        let (recovered, skip, take) = match want {
            Want::Last(n) => (true, self.kept.len().saturating_sub(*n), *n),
            Want::Since {
                offset,
                epoch,
                limit,
            } => {
                // An offset without its epoch is taken to be in this one, but it is trusted
                // (recovered) only from the start (0); one of another epoch says nothing
                // about this one: all that is kept.
                let other_epoch = epoch.as_deref().is_some_and(|epoch| epoch != self.epoch);
                let trusted = epoch.is_some() || *offset == 0;
                let after = match other_epoch {
                    true => first,
                    false => offset.saturating_add(1),
                };
                let servable = !other_epoch && trusted && after >= first && *offset <= self.top;
                (servable, after.saturating_sub(first) as usize, *limit)
            }
        };
        let messages = self.kept.iter().skip(skip).take(take).cloned().collect();
        Replay {
            epoch: self.epoch.clone(),
            top: self.top,
            first,
            recovered,
            messages,
            more: false,
        }
    }
}

impl Kept {
    /// As the history API lists it: `data` for text, `data_base64` for binary.
    pub fn to_json(&self) -> Value {
        let mut entry = json!({"offset": self.offset, "time": self.time_ms});
        match self.message.kind {
            Kind::Text => {
                entry["data"] = Value::String(String::from_utf8_lossy(&self.message.payload).into())
            }
            _ => entry["data_base64"] = base64_of(&self.message.payload),
        }
        entry
    }

    /// A durable room's stored entry: the message as the history API lists it, with its
    /// room and epoch.
    pub fn to_entry(&self, room: &RoomName, epoch: &str) -> Vec<u8> {
        let mut entry = self.to_json();
        entry["room"] = room.as_str().into();
        entry["epoch"] = epoch.into();
        entry.to_string().into_bytes()
    }

    /// Reads [`Kept::to_entry`] back.
    pub fn from_entry(bytes: &[u8]) -> Option<(RoomName, String, Self)> {
        let entry: Value = serde_json::from_slice(bytes).ok()?;
        let room = RoomName::parse(entry.get("room")?.as_str()?).ok()?;
        let epoch = entry.get("epoch")?.as_str()?.to_owned();
        Some((room, epoch, Self::from_json(&entry)?))
    }

    fn from_json(entry: &Value) -> Option<Self> {
        let message = match (entry.get("data"), entry.get("data_base64")) {
            (Some(Value::String(text)), _) => Message::text(text.clone()),
            (_, Some(Value::String(encoded))) => Message::binary(
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .ok()?,
            ),
            _ => return None,
        };
        Some(Self {
            offset: entry.get("offset")?.as_u64()?,
            time_ms: entry.get("time")?.as_u64()?,
            message,
        })
    }

    /// How a member of `room` receives it: as published, or wrapped in the envelope.
    pub fn delivered(&self, room: &RoomName, envelope: bool) -> Message {
        match envelope {
            true => enveloped(room, self.offset, &self.message),
            false => self.message.clone(),
        }
    }
}

impl Replay {
    /// What a join with `history` or `since` gets in a room that does not number its
    /// messages: no epoch, nothing recovered.
    pub fn unnumbered() -> Self {
        Self::unavailable()
    }

    /// What a join gets when the room's past cannot be read (cluster mode, its owner
    /// unreachable): no epoch, nothing recovered.
    pub fn unavailable() -> Self {
        Self {
            epoch: String::new(),
            top: 0,
            first: 1,
            recovered: false,
            messages: Vec::new(),
            more: false,
        }
    }

    /// `GET @rooms/{room}/history`'s answer (also how one node answers another).
    pub fn to_json(&self, room: &RoomName) -> Value {
        let mut body = json!({
            "room": room.as_str(),
            "epoch": self.epoch,
            "offset": self.top,
            "first": self.first,
            "recovered": self.recovered,
            "messages": self.messages.iter().map(Kept::to_json).collect::<Vec<_>>(),
        });
        if self.more {
            body["more"] = true.into();
        }
        body
    }

    /// The JSON of as many of the first messages as fit `budget` bytes (none if even one
    /// does not), with `more` set if any were left out.
    pub fn fit(mut self, room: &RoomName, budget: usize) -> Vec<u8> {
        loop {
            let body = self.to_json(room).to_string().into_bytes();
            if body.len() <= budget || self.messages.is_empty() {
                return body;
            }
            let keep = self.messages.len() / 2;
            self.messages.truncate(keep);
            self.more = true;
        }
    }

    /// Reads [`Replay::to_json`] back.
    pub fn from_json(body: &Value) -> Option<Self> {
        let messages = body.get("messages")?.as_array()?;
        Some(Self {
            epoch: body.get("epoch")?.as_str()?.to_owned(),
            top: body.get("offset")?.as_u64()?,
            first: body.get("first")?.as_u64()?,
            recovered: body.get("recovered")?.as_bool()?,
            messages: messages
                .iter()
                .map(Kept::from_json)
                .collect::<Option<_>>()?,
            more: body.get("more").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    /// What a join replays: nothing unless it is recovered (the client then reloads from
    /// its backend instead of trusting a replay with a hole in it), and nothing when more
    /// than `most` messages followed its offset (a replay must fit the member's outbound
    /// queue; so far behind, reloading is the cheaper way back).
    pub fn for_join(mut self, most: usize) -> Self {
        if self.messages.len() > most {
            self.recovered = false;
        }
        if !self.recovered {
            self.messages.clear();
        }
        self
    }

    /// The frame a joining member gets before the replayed messages.
    pub fn joined(&self, room: &RoomName) -> Message {
        let frame = json!({
            "type": "joined",
            "room": room.as_str(),
            "epoch": self.epoch,
            "offset": self.top,
            "recovered": self.recovered,
        });
        Message::text(frame.to_string())
    }
}

/// A 32-bit FNV-1a hash of an epoch: what a numbered delivery carries to say which epoch
/// its offset counts in (the same on every node and build).
pub fn epoch_id(epoch: &str) -> u32 {
    epoch.bytes().fold(0x811c_9dc5, |hash: u32, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

/// `{"type":"message","room":R,"offset":O,"data":…}`: `data` is the published JSON value
/// if it was JSON, else the text as a string; binary goes as `data_base64`.
pub fn enveloped(room: &RoomName, offset: u64, message: &Message) -> Message {
    let mut frame = json!({"type": "message", "room": room.as_str(), "offset": offset});
    match message.kind {
        Kind::Text => {
            frame["data"] = serde_json::from_slice(&message.payload).unwrap_or_else(|_| {
                Value::String(String::from_utf8_lossy(&message.payload).into_owned())
            })
        }
        _ => frame["data_base64"] = base64_of(&message.payload),
    }
    Message::text(Bytes::from(frame.to_string()))
}

fn base64_of(bytes: &[u8]) -> Value {
    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: HistoryBound = HistoryBound {
        size: 3,
        ttl_ms: 1_000,
    };

    fn log_with(count: u64) -> RoomLog {
        let mut log = RoomLog::new("e1".into(), 0);
        for n in 1..=count {
            assert_eq!(log.append(Message::text(n.to_string()), n, Some(BOUND)), n);
        }
        log
    }

    fn offsets(replay: &Replay) -> Vec<u64> {
        replay.messages.iter().map(|kept| kept.offset).collect()
    }

    fn since(offset: u64, epoch: Option<&str>) -> Want {
        Want::Since {
            offset,
            epoch: epoch.map(str::to_owned),
            limit: usize::MAX,
        }
    }

    #[test]
    fn keeps_the_last_size_messages_with_dense_offsets() {
        let mut log = log_with(5);
        let replay = log.read(&since(0, None), 5, Some(BOUND));
        assert_eq!((replay.top, replay.first), (5, 3));
        assert_eq!(offsets(&replay), vec![3, 4, 5]);
        assert!(!replay.recovered, "1 and 2 are gone: not from 0");
        let without_epoch = log.read(&since(2, None), 5, Some(BOUND));
        assert!(!without_epoch.recovered, "an offset without its epoch");
        let replay = log.read(&since(2, Some("e1")), 5, Some(BOUND));
        assert!(replay.recovered);
        assert_eq!(offsets(&replay), vec![3, 4, 5]);
    }

    #[test]
    fn since_serves_only_what_follows_without_a_gap() {
        let mut log = log_with(5);
        let read = |log: &mut RoomLog, want| log.read(&want, 5, Some(BOUND));
        assert_eq!(offsets(&read(&mut log, since(4, Some("e1")))), vec![5]);
        let at_top = read(&mut log, since(5, Some("e1")));
        assert!(at_top.recovered && at_top.messages.is_empty());
        let refused = [
            (since(1, Some("e1")), vec![3, 4, 5]),
            (since(6, Some("e1")), vec![]),
            (since(u64::MAX, Some("e1")), vec![]),
            (since(4, Some("e0")), vec![3, 4, 5]),
        ];
        for (want, kept) in refused {
            let replay = read(&mut log, want.clone());
            assert!(!replay.recovered, "{want:?}");
            assert_eq!(offsets(&replay), kept, "{want:?}: what is kept after it");
            assert!(
                replay.for_join(9).messages.is_empty(),
                "{want:?}: a join gets none"
            );
        }
        let limited = Want::Since {
            offset: 2,
            epoch: Some("e1".into()),
            limit: 2,
        };
        assert_eq!(offsets(&read(&mut log, limited)), vec![3, 4]);
    }

    #[test]
    fn a_join_replays_only_what_fits() {
        let mut log = log_with(5);
        let replay = log.read(&since(2, Some("e1")), 5, Some(BOUND));
        assert_eq!(offsets(&replay.clone().for_join(3)), vec![3, 4, 5]);
        let too_far = replay.for_join(2);
        assert!(!too_far.recovered && too_far.messages.is_empty());
    }

    #[test]
    fn last_n_is_the_newest_n() {
        let mut log = log_with(5);
        assert_eq!(offsets(&log.read(&Want::Last(1), 5, Some(BOUND))), vec![5]);
        assert_eq!(
            offsets(&log.read(&Want::Last(9), 5, Some(BOUND))),
            vec![3, 4, 5]
        );
        assert!(log.read(&Want::Last(0), 5, Some(BOUND)).messages.is_empty());
    }

    #[test]
    fn expired_messages_go_and_offsets_go_on() {
        let mut log = log_with(3);
        let replay = log.read(&since(0, None), 1_002, Some(BOUND));
        assert_eq!(offsets(&replay), vec![3]);
        let replay = log.read(&since(0, None), 5_000, Some(BOUND));
        assert_eq!((replay.first, replay.top), (4, 3));
        assert!(log.is_empty());
        assert_eq!(log.append(Message::text("x"), 5_000, Some(BOUND)), 4);
    }

    #[test]
    fn a_room_without_history_counts_but_keeps_nothing() {
        let mut log = RoomLog::new("e".into(), 0);
        assert_eq!(log.append(Message::text("a"), 1, None), 1);
        let replay = log.read(&since(0, None), 1, None);
        assert_eq!((replay.top, replay.first), (1, 2));
        assert!(!replay.recovered);
    }

    #[test]
    fn the_json_reads_back() {
        let mut log = RoomLog::new("e1".into(), 0);
        log.append(Message::text("{\"a\":1}"), 7, Some(BOUND));
        log.append(Message::binary(vec![0xff, 0]), 8, Some(BOUND));
        let room = RoomName::parse("r").unwrap();
        let replay = log.read(&since(0, Some("e1")), 9, Some(BOUND));
        let json = replay.to_json(&room);
        assert_eq!(json["messages"][0]["data"], "{\"a\":1}");
        assert_eq!(json["messages"][1]["data_base64"], "/wA=");
        assert_eq!(Replay::from_json(&json), Some(replay));
    }

    #[test]
    fn a_stored_entry_reads_back_and_a_message_can_be_taken_back() {
        let mut log = log_with(2);
        let kept = log.read(&Want::Last(1), 2, Some(BOUND)).messages.remove(0);
        let room = RoomName::parse("r").unwrap();
        let entry = kept.to_entry(&room, "e1");
        assert_eq!(Kept::from_entry(&entry), Some((room, "e1".into(), kept)));
        assert_eq!(Kept::from_entry(b"{}"), None);
        log.take_back(2);
        assert_eq!(offsets(&log.read(&since(0, None), 2, Some(BOUND))), vec![1]);
        assert_eq!(log.append(Message::text("again"), 3, Some(BOUND)), 2);
    }

    #[test]
    fn a_replay_too_big_for_one_answer_says_more_follow() {
        let bound = Some(HistoryBound {
            size: 8,
            ttl_ms: 1_000,
        });
        let mut log = RoomLog::new("e1".into(), 0);
        for n in 0..8 {
            log.append(Message::text("x".repeat(100)), n, bound);
        }
        let room = RoomName::parse("r").unwrap();
        let replay = log.read(&since(0, Some("e1")), 8, bound);
        let whole = replay.clone().fit(&room, usize::MAX);
        let read = |bytes: &[u8]| Replay::from_json(&serde_json::from_slice(bytes).unwrap());
        assert_eq!(read(&whole), Some(replay.clone()));
        let part = replay.fit(&room, 700);
        assert!(part.len() <= 700);
        let part = read(&part).unwrap();
        assert!(part.more && !part.messages.is_empty() && part.messages.len() < 8);
        assert_eq!(part.messages[0].offset, 1, "the first ones");
    }

    #[test]
    fn the_envelope_keeps_json_as_json() {
        let room = RoomName::parse("r").unwrap();
        let as_json = |message: &Message| -> Value {
            serde_json::from_slice(&enveloped(&room, 4, message).payload).unwrap()
        };
        let json = as_json(&Message::text("{\"px\":1}"));
        assert_eq!(
            json,
            json!({"type":"message","room":"r","offset":4,"data":{"px":1}})
        );
        assert_eq!(as_json(&Message::text("hi"))["data"], "hi");
        assert_eq!(as_json(&Message::binary(vec![1]))["data_base64"], "AQ==");
    }
}
