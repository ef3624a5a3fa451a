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
    /// Presence (`GET @rooms/{room}/presence`, `room_presence`) is served.
    pub presence: bool,
    /// `[[rooms.class]]`, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub class: Vec<RawRoomClass>,
}

impl Default for RawRooms {
    fn default() -> Self {
        Self {
            presence: true,
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
    pub presence: Option<bool>,
}

/// The settings of one room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomSettings {
    pub presence: bool,
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
    /// The settings of `room`: the first class that matches it, else `[rooms]`.
    pub fn for_room(&self, room: &RoomName) -> RoomSettings {
        (self.classes.iter())
            .find(|(pattern, _)| pattern.matches(room))
            .map_or(self.default, |(_, settings)| *settings)
    }
}

impl RawRooms {
    pub fn validate(&self) -> Result<RoomPolicy, ConfigError> {
        let default = RoomSettings {
            presence: self.presence,
        };
        let classes = (self.class.iter().enumerate())
            .map(|(index, class)| {
                let pattern = pattern(&format!("rooms.class[{index}].pattern"), &class.pattern)?;
                let settings = RoomSettings {
                    presence: class.presence.unwrap_or(default.presence),
                };
                Ok((pattern, settings))
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(RoomPolicy { classes, default })
    }
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
    fn a_pattern_that_names_no_room_is_refused_with_its_key() {
        for bad in ["", "a*b", "with space", "x**"] {
            let toml = format!("[[class]]\npattern = {bad:?}\n");
            let error = policy(&toml).unwrap_err().to_string();
            assert!(error.contains("rooms.class[0].pattern"), "{bad:?}: {error}");
        }
    }
}
