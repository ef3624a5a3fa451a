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
    /// A durable room: where its last message is stored (the store's sequence, for its
    /// compare-and-set), and whether what is stored was read in.
    stored: Option<u64>,
    loaded: bool,
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
            stored: None,
            loaded: false,
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

    /// A durable room's log made from its stored entries (oldest first; each names its
    /// epoch, and an entry of another epoch starts the log anew), or `None` if there are
    /// none. `stored` is where the last one is stored.
    pub fn from_entries(
        entries: impl IntoIterator<Item = Vec<u8>>,
        stored: Option<u64>,
        now_ms: u64,
        bound: Option<HistoryBound>,
    ) -> Option<Self> {
        let mut log: Option<Self> = None;
        for (_, epoch, kept) in entries.into_iter().filter_map(|e| Kept::from_entry(&e)) {
            let log = match &mut log {
                Some(log) if log.epoch == epoch => log,
                _ => log.insert(Self::resumed(epoch, 0, Vec::new())),
            };
            log.restore(kept, now_ms, bound);
        }
        log.map(|mut log| {
            log.stored = stored;
            log.loaded = true;
            log
        })
    }

    /// Whether a durable room's stored entries still need reading in.
    pub fn needs_loading(&self) -> bool {
        !self.loaded
    }

    /// What is stored changed elsewhere: read it in again before the next message.
    pub fn reload(&mut self) {
        self.loaded = false;
    }

    /// What is stored has been read in (or there is nothing to read).
    pub fn mark_loaded(&mut self) {
        self.loaded = true;
    }

    /// Where the last stored message is, for the next one's compare-and-set.
    pub fn stored(&self) -> Option<u64> {
        self.stored
    }

    /// The message just appended is stored at `at`.
    pub fn stored_at(&mut self, at: Option<u64>) {
        self.stored = at;
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
    /// What a join gets when there is no past to read: the room does not number its
    /// messages, or (cluster mode) its owner is unreachable. No epoch, nothing recovered.
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

    /// Whether it brings everything after `after`, a position that names its epoch only by
    /// [`epoch_id`] (a member mending a gap: a `since` without an epoch is not trusted).
    pub fn continues(&self, after: super::Position) -> bool {
        epoch_id(&self.epoch) == after.epoch
            && self.first <= after.offset.saturating_add(1)
            && after.offset <= self.top
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

/// A short hash of an epoch ([`super::fnv1a`], cut to 32 bits): what a numbered delivery
/// carries to say which epoch its offset counts in.
pub fn epoch_id(epoch: &str) -> u32 {
    super::fnv1a(epoch.bytes()) as u32
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
mod tests;
