//! `[webhooks]`: where room events are POSTed, which ones, and the secret that signs them.

use serde::{Deserialize, Serialize};

use super::EventName;
use crate::config::check::{ConfigError, invalid, parse_http_url};

/// `[webhooks]`, as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhooks {
    pub url: String,
    /// Which events are sent (default: all).
    #[serde(default = "all_events")]
    pub events: Vec<String>,
    /// Signs each POST (`X-Switchboard-Signature: sha256=HEX`); `${ENV}` allowed.
    pub secret: String,
}

fn all_events() -> Vec<String> {
    EventName::ALL
        .iter()
        .map(|name| name.as_str().to_owned())
        .collect()
}

/// `[webhooks]`, validated.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: reqwest::Url,
    pub events: Vec<EventName>,
    pub secret: String,
}

impl WebhookConfig {
    pub fn wants(&self, name: EventName) -> bool {
        self.events.contains(&name)
    }
}

impl RawWebhooks {
    pub fn validate(&self) -> Result<WebhookConfig, ConfigError> {
        let url = parse_http_url("webhooks.url", &self.url)?;
        let events = (self.events.iter())
            .map(|name| {
                EventName::parse(name).ok_or_else(|| {
                    invalid(
                        "webhooks.events",
                        format!("`{name}` is not one of {}", all_events().join(", ")),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let secret = crate::secret::resolve(&self.secret)
            .map_err(|reason| invalid("webhooks.secret", reason))?;
        if secret.len() < 16 {
            return Err(invalid(
                "webhooks.secret",
                "must be at least 16 bytes (make one with `openssl rand -hex 32`)",
            ));
        }
        Ok(WebhookConfig {
            url,
            events,
            secret,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(toml: &str) -> Result<WebhookConfig, ConfigError> {
        toml::from_str::<RawWebhooks>(toml).unwrap().validate()
    }

    #[test]
    fn every_event_by_default_and_bad_values_are_named() {
        let all =
            validate("url = \"http://127.0.0.1:1/hook\"\nsecret = \"0123456789abcdef\"").unwrap();
        assert_eq!(all.events.len(), 4);
        assert!(all.wants(EventName::RoomVacated));
        let some = validate(
            "url = \"http://h/\"\nsecret = \"0123456789abcdef\"\nevents = [\"member_joined\"]",
        )
        .unwrap();
        assert!(some.wants(EventName::MemberJoined) && !some.wants(EventName::MemberLeft));
        for (toml, key) in [
            (
                "url = \"ftp://h/\"\nsecret = \"0123456789abcdef\"",
                "webhooks.url",
            ),
            ("url = \"http://h/\"\nsecret = \"short\"", "webhooks.secret"),
            (
                "url = \"http://h/\"\nsecret = \"0123456789abcdef\"\nevents = [\"room_opened\"]",
                "webhooks.events",
            ),
        ] {
            let error = validate(toml).unwrap_err().to_string();
            assert!(error.contains(key), "{toml}: {error}");
        }
    }
}
