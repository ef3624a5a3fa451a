//! `[rooms]` and `[[rooms.class]]`: settings for every room, and overrides for the rooms whose
//! names match a class's pattern (an exact name, or `prefix*`; the first class that matches
//! wins, then `[rooms]`).

use serde::{Deserialize, Serialize};

use super::RoomName;
use crate::config::check::{ConfigError, invalid};

/// `[rooms]`, as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRooms {
    /// Messages kept per room (0: none, and no offsets unless `envelope`).
    pub history_size: usize,
    /// How long a kept message is kept.
    pub history_ttl_secs: u64,
    /// Kept history survives a restart (in the segment log; one node only for now).
    pub history_durable: bool,
    /// Presence (`GET @rooms/{room}/presence`, `room_presence`) is served.
    pub presence: bool,
    /// Members are told when another member joins or leaves.
    pub presence_events: bool,
    /// Deliveries are wrapped as `{"type":"message","room","offset","data"}`.
    pub envelope: bool,
    /// A message with a key takes the place of a queued, unsent one with the same key.
    pub conflate: bool,
    /// `[[rooms.class]]`, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub class: Vec<RawRoomClass>,
}

impl Default for RawRooms {
    fn default() -> Self {
        Self {
            history_size: 0,
            history_ttl_secs: 3600,
            history_durable: false,
            presence: true,
            presence_events: false,
            envelope: false,
            conflate: false,
            class: Vec::new(),
        }
    }
}

/// `[[rooms.class]]`, as written: a pattern and the settings it overrides.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoomClass {
    pub pattern: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_ttl_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_durable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_events: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflate: Option<bool>,
}

/// Most messages a room may keep: a bound on what one room can hold in memory.
pub const MAX_HISTORY_SIZE: usize = 100_000;

/// The settings of one room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomSettings {
    /// What the room keeps, if it keeps anything.
    pub history: Option<HistoryBound>,
    /// How long a kept message lives; also how long a log that keeps nothing (an
    /// envelope-only room) lives after the room's last message.
    pub history_ttl_ms: u64,
    pub history_durable: bool,
    pub presence: bool,
    pub presence_events: bool,
    pub envelope: bool,
    /// Keyed messages conflate in members' queues (latest wins).
    pub conflate: bool,
}

impl RoomSettings {
    /// Whether the room's messages get offsets: they go through the room's one sequencer,
    /// in order, instead of straight from the publisher to the shards.
    pub fn sequenced(&self) -> bool {
        self.history.is_some() || self.envelope
    }
}

/// How much of a room's past is kept: at most `size` messages, none older than `ttl_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryBound {
    pub size: usize,
    pub ttl_ms: u64,
}

/// `[rooms]`, validated: the settings each room gets.
#[derive(Debug, Clone)]
pub struct RoomPolicy {
    classes: Vec<(Pattern, RoomSettings)>,
    default: RoomSettings,
}

/// A class's pattern: an exact room name, or every name that starts with a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn matches(&self, room: &RoomName) -> bool {
        match self {
            Self::Exact(name) => room.as_str() == name,
            Self::Prefix(prefix) => room.as_str().starts_with(prefix.as_str()),
        }
    }
}

impl RoomPolicy {
    /// How long durable history must be kept, at most (the longest TTL of the settings
    /// that keep history durably); `None` when no room keeps it durably.
    pub fn durable_ttl_ms(&self) -> Option<u64> {
        self.durable().map(|settings| settings.history_ttl_ms).max()
    }

    /// The most messages and the longest time any durable room keeps, if one does.
    pub fn durable_bounds(&self) -> Option<(usize, std::time::Duration)> {
        let most = self
            .durable()
            .filter_map(|s| s.history)
            .map(|b| b.size)
            .max()?;
        let ttl = self.durable_ttl_ms()?;
        Some((most, std::time::Duration::from_millis(ttl)))
    }

    /// The settings that keep history durably.
    fn durable(&self) -> impl Iterator<Item = &RoomSettings> {
        (self.classes.iter().map(|(_, settings)| settings))
            .chain([&self.default])
            .filter(|settings| settings.history_durable)
    }

    /// The settings of `room`: the first class that matches it, else `[rooms]`.
    pub fn for_room(&self, room: &RoomName) -> RoomSettings {
        (self.classes.iter())
            .find(|(pattern, _)| pattern.matches(room))
            .map_or(self.default, |(_, settings)| *settings)
    }
}

impl RawRooms {
    pub fn validate(&self) -> Result<RoomPolicy, ConfigError> {
        let default = settings(
            "rooms",
            self.history_size,
            self.history_ttl_secs,
            self.history_durable,
            [
                self.presence,
                self.presence_events,
                self.envelope,
                self.conflate,
            ],
        )?;
        let classes = (self.class.iter().enumerate())
            .map(|(index, class)| {
                let key = format!("rooms.class[{index}]");
                let pattern = pattern(&format!("{key}.pattern"), &class.pattern)?;
                let settings = settings(
                    &key,
                    class.history_size.unwrap_or(self.history_size),
                    class.history_ttl_secs.unwrap_or(self.history_ttl_secs),
                    class.history_durable.unwrap_or(self.history_durable),
                    [
                        class.presence.unwrap_or(self.presence),
                        class.presence_events.unwrap_or(self.presence_events),
                        class.envelope.unwrap_or(self.envelope),
                        class.conflate.unwrap_or(self.conflate),
                    ],
                )?;
                Ok((pattern, settings))
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(RoomPolicy { classes, default })
    }
}

/// One room's settings from the values written for it (`[presence, presence_events,
/// envelope, conflate]` last), checked.
fn settings(
    key: &str,
    history_size: usize,
    history_ttl_secs: u64,
    history_durable: bool,
    [presence, presence_events, envelope, conflate]: [bool; 4],
) -> Result<RoomSettings, ConfigError> {
    if history_size > MAX_HISTORY_SIZE {
        return Err(invalid(
            format!("{key}.history_size"),
            format!("at most {MAX_HISTORY_SIZE} messages per room"),
        ));
    }
    if history_ttl_secs == 0 {
        return Err(invalid(
            format!("{key}.history_ttl_secs"),
            "must be at least 1".to_owned(),
        ));
    }
    let history_ttl_ms = history_ttl_secs.saturating_mul(1000);
    let history = (history_size > 0).then_some(HistoryBound {
        size: history_size,
        ttl_ms: history_ttl_ms,
    });
    Ok(RoomSettings {
        history,
        history_ttl_ms,
        history_durable: history_durable && history.is_some(),
        presence,
        presence_events,
        envelope,
        conflate,
    })
}

/// `name`, or `prefix*`: what is left must be a room name (or, for a prefix, its start).
fn pattern(key: &str, text: &str) -> Result<Pattern, ConfigError> {
    let (name, prefix) = match text.strip_suffix('*') {
        Some(prefix) => (prefix, true),
        None => (text, false),
    };
    let checked = match (name, prefix) {
        ("", true) => Ok(()),
        (name, _) => RoomName::parse(name).map(drop),
    };
    checked.map_err(|error| {
        invalid(
            key,
            format!("`{text}` is not a room name or `prefix*`: {error}"),
        )
    })?;
    Ok(match prefix {
        true => Pattern::Prefix(name.to_owned()),
        false => Pattern::Exact(name.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(toml: &str) -> Result<RoomPolicy, ConfigError> {
        let raw: RawRooms = toml::from_str(toml).unwrap();
        raw.validate()
    }

    fn room(name: &str) -> RoomName {
        RoomName::parse(name).unwrap()
    }

    #[test]
    fn the_first_matching_class_wins_then_the_defaults() {
        let policy = policy(
            r#"
presence = true
[[class]]
pattern = "ticker:*"
presence = false
[[class]]
pattern = "ticker:ACME"
presence = true
[[class]]
pattern = "lobby"
"#,
        )
        .unwrap();
        assert!(
            !policy.for_room(&room("ticker:ACME")).presence,
            "first match"
        );
        assert!(!policy.for_room(&room("ticker:XYZ")).presence);
        assert!(
            policy.for_room(&room("lobby")).presence,
            "unset: the default"
        );
        assert!(policy.for_room(&room("other")).presence);
    }

    #[test]
    fn presence_is_on_unless_turned_off() {
        assert!(policy("").unwrap().for_room(&room("any")).presence);
        let off = policy("presence = false\n[[class]]\npattern = \"*\"\n").unwrap();
        assert!(!off.for_room(&room("any")).presence);
    }

    #[test]
    fn history_is_set_per_class_and_bounded() {
        let classes = policy(
            "history_size = 10\n[[class]]\npattern = \"ticker:*\"\nhistory_size = 1\nhistory_ttl_secs = 5\n[[class]]\npattern = \"pipe\"\nhistory_size = 0\n",
        )
        .unwrap();
        let ticker = classes.for_room(&room("ticker:A"));
        assert_eq!(
            ticker.history,
            Some(HistoryBound {
                size: 1,
                ttl_ms: 5_000
            })
        );
        assert_eq!(
            classes.for_room(&room("x")).history.unwrap().ttl_ms,
            3_600_000
        );
        let pipe = classes.for_room(&room("pipe"));
        assert!(pipe.history.is_none() && !pipe.sequenced());
        let refused = [
            ("history_size = 100001", "rooms.history_size"),
            ("history_ttl_secs = 0", "rooms.history_ttl_secs"),
            (
                "[[class]]\npattern = \"a\"\nhistory_ttl_secs = 0",
                "rooms.class[0].history_ttl_secs",
            ),
        ];
        for (toml, key) in refused {
            let error = policy(toml).unwrap_err().to_string();
            assert!(error.contains(key), "{toml}: {error}");
        }
        let durable = policy("[[class]]\npattern = \"a\"\nhistory_size = 1\nhistory_durable = true\nhistory_ttl_secs = 60\n[[class]]\npattern = \"b\"\nhistory_durable = true\n").unwrap();
        assert_eq!(
            durable.durable_ttl_ms(),
            Some(60_000),
            "only classes that keep history"
        );
        assert!(
            !durable.for_room(&room("b")).history_durable,
            "nothing kept: not durable"
        );
        assert_eq!(policy("").unwrap().durable_ttl_ms(), None);
    }

    #[test]
    fn a_pattern_that_names_no_room_is_refused_with_its_key() {
        for bad in ["", "a*b", "with space", "x**"] {
            let toml = format!("[[class]]\npattern = {bad:?}\n");
            let error = policy(&toml).unwrap_err().to_string();
            assert!(error.contains("rooms.class[0].pattern"), "{bad:?}: {error}");
        }
    }
}
