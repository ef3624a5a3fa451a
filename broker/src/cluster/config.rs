//! `[cluster]`: where NATS is and how patient the node is with the others.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::check::ConfigError;

/// One URL or several (any server of the NATS cluster; the client learns the rest).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NatsUrls {
    One(String),
    Many(Vec<String>),
}

/// `[cluster]` as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub nats_url: NatsUrls,
    /// A NATS `.creds` file (JWT and NKey seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<PathBuf>,
    /// A NATS auth token (or `${ENV}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A NATS user, with `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The NATS user's password (or `${ENV}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// A PEM CA file to verify NATS servers' TLS certificates (`tls://` URLs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// A PEM client certificate chain for NATS servers that verify clients (with `tls_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's PEM private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// How long a call to another node may take before it counts as unreachable (410).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// How long a room broadcast or listing waits for the other nodes' answers.
    #[serde(default = "default_gather_wait_ms")]
    pub gather_wait_ms: u64,
    /// How often the node renews its registration.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// A node not heard from for this long is lost: its connections are reported to
    /// `$disconnect` by a surviving node.
    #[serde(default = "default_node_timeout_ms")]
    pub node_timeout_ms: u64,
    /// JetStream replicas of the queue streams; 0: as many as the NATS cluster has
    /// servers, at most 3.
    #[serde(default)]
    pub replicas: usize,
    /// Connection records are mirrored to NATS in batches this often.
    #[serde(default = "default_mirror_interval_ms")]
    pub mirror_interval_ms: u64,
}

fn default_request_timeout_ms() -> u64 {
    1000
}

fn default_gather_wait_ms() -> u64 {
    100
}

fn default_heartbeat_ms() -> u64 {
    1000
}

fn default_node_timeout_ms() -> u64 {
    5000
}

fn default_mirror_interval_ms() -> u64 {
    50
}

/// `[cluster]`, validated.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub nats_urls: Vec<String>,
    pub credentials: Option<PathBuf>,
    pub token: Option<String>,
    /// User and password.
    pub user_password: Option<(String, String)>,
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key.
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// Every URL names a loopback host or uses TLS: nothing crosses a network in clear.
    pub encrypted_or_local: bool,
    pub request_timeout: Duration,
    pub gather_wait: Duration,
    pub heartbeat: Duration,
    pub node_timeout: Duration,
    pub replicas: usize,
    pub mirror_interval: Duration,
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: format!("cluster.{key}"),
        reason: reason.into(),
    }
}

fn millis(
    key: &str,
    value: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Duration, ConfigError> {
    if range.contains(&value) {
        Ok(Duration::from_millis(value))
    } else {
        Err(invalid(
            key,
            format!("must be from {} to {} ms", range.start(), range.end()),
        ))
    }
}

impl RawCluster {
    pub fn validate(&self) -> Result<ClusterConfig, ConfigError> {
        let nats_urls = match &self.nats_url {
            NatsUrls::One(url) => vec![url.clone()],
            NatsUrls::Many(urls) => urls.clone(),
        };
        if nats_urls.is_empty() {
            return Err(invalid("nats_url", "names no server"));
        }
        for url in &nats_urls {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| invalid("nats_url", format!("`{url}` is not a NATS URL: {e}")))?;
        }
        for (key, path) in [
            ("credentials", &self.credentials),
            ("tls_ca", &self.tls_ca),
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
        ] {
            if let Some(path) = path.as_ref().filter(|p| !p.is_file()) {
                return Err(invalid(
                    key,
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
        let ways = [
            self.credentials.is_some(),
            self.token.is_some(),
            self.user.is_some() || self.password.is_some(),
        ];
        if ways.iter().filter(|&&way| way).count() > 1 {
            return Err(invalid(
                "token",
                "give one of credentials, token, or user and password",
            ));
        }
        let secret = |key: &str, value: &Option<String>| {
            value
                .as_deref()
                .map(crate::secret::resolve)
                .transpose()
                .map_err(|reason| invalid(key, reason))
        };
        let token = secret("token", &self.token)?;
        let user_password = match (&self.user, secret("password", &self.password)?) {
            (Some(user), Some(password)) => Some((user.clone(), password)),
            (None, None) => None,
            _ => return Err(invalid("password", "user and password go together")),
        };
        let tls_client = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            _ => return Err(invalid("tls_key", "tls_cert and tls_key go together")),
        };
        let tls = self.tls_ca.is_some() || tls_client.is_some();
        let in_clear: Vec<String> = nats_urls
            .iter()
            .filter(|url| !tls && !is_tls_or_loopback(url))
            .cloned()
            .collect();
        let url_credentials = nats_urls.iter().any(|url| {
            url.parse::<async_nats::ServerAddr>()
                .is_ok_and(|address| address.has_user_pass())
        });
        if url_credentials && !in_clear.is_empty() {
            return Err(invalid(
                "nats_url",
                format!(
                    "credentials in a URL would travel in clear to {}: use tls:// URLs (or \
                     cluster.tls_ca), and prefer cluster.user / password",
                    in_clear[0]
                ),
            ));
        }
        if (token.is_some() || user_password.is_some()) && !in_clear.is_empty() {
            return Err(invalid(
                if token.is_some() { "token" } else { "password" },
                format!(
                    "would travel in clear to {}: use tls:// URLs (or cluster.tls_ca) for a \
                     NATS server that is not on loopback",
                    in_clear[0]
                ),
            ));
        }
        let heartbeat = millis("heartbeat_ms", self.heartbeat_ms, 100..=60_000)?;
        let node_timeout = millis("node_timeout_ms", self.node_timeout_ms, 500..=600_000)?;
        if node_timeout < heartbeat * 3 {
            return Err(invalid(
                "node_timeout_ms",
                "must be at least three heartbeats (cluster.heartbeat_ms), or one late \
                 heartbeat would declare a live node lost",
            ));
        }
        if self.replicas > 5 {
            return Err(invalid("replicas", "JetStream allows at most 5"));
        }
        Ok(ClusterConfig {
            nats_urls,
            credentials: self.credentials.clone(),
            token,
            user_password,
            tls_ca: self.tls_ca.clone(),
            tls_client,
            encrypted_or_local: in_clear.is_empty(),
            request_timeout: millis("request_timeout_ms", self.request_timeout_ms, 10..=60_000)?,
            gather_wait: millis("gather_wait_ms", self.gather_wait_ms, 1..=10_000)?,
            heartbeat,
            node_timeout,
            replicas: self.replicas,
            mirror_interval: millis("mirror_interval_ms", self.mirror_interval_ms, 1..=10_000)?,
        })
    }
}

/// Whether `url` asks for TLS (`tls://`) or names a loopback host.
fn is_tls_or_loopback(url: &str) -> bool {
    let Ok(address) = url.parse::<async_nats::ServerAddr>() else {
        return false;
    };
    if address.tls_required() {
        return true;
    }
    let host = address.host();
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl NatsUrls {
    /// The URLs with any credentials in them replaced (what `check-config` prints).
    pub fn redacted(&self) -> Self {
        let redact = |url: &String| match url.split_once("://") {
            Some((scheme, rest)) => match rest.split_once('@') {
                Some((_, host)) => format!("{scheme}://{}@{host}", crate::secret::REDACTED),
                None => url.clone(),
            },
            None => url.clone(),
        };
        match self {
            Self::One(url) => Self::One(redact(url)),
            Self::Many(urls) => Self::Many(urls.iter().map(redact).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ClusterConfig, ConfigError> {
        toml::from_str::<RawCluster>(text)
            .map_err(|e| ConfigError::Syntax(e.to_string()))?
            .validate()
    }

    fn refused_key(text: &str) -> String {
        match parse(text) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn one_url_or_several_with_working_defaults() {
        let one = parse(r#"nats_url = "nats://127.0.0.1:4222""#).unwrap();
        assert_eq!(one.nats_urls, vec!["nats://127.0.0.1:4222"]);
        assert_eq!(one.request_timeout, Duration::from_secs(1));
        assert_eq!(one.node_timeout, Duration::from_secs(5));
        let many = parse(r#"nats_url = ["nats://a:4222", "tls://b:4222"]"#).unwrap();
        assert_eq!(many.nats_urls.len(), 2);
    }

    #[test]
    fn bad_values_name_their_key() {
        assert_eq!(refused_key("nats_url = []"), "cluster.nats_url");
        assert_eq!(
            refused_key(r#"nats_url = "http://x:1""#),
            "cluster.nats_url"
        );
        assert_eq!(
            refused_key("nats_url = \"nats://x:1\"\nheartbeat_ms = 1000\nnode_timeout_ms = 2000"),
            "cluster.node_timeout_ms"
        );
        assert_eq!(
            refused_key("nats_url = \"nats://x:1\"\ncredentials = \"/nonexistent.creds\""),
            "cluster.credentials"
        );
        assert_eq!(
            refused_key("nats_url = \"nats://x:1\"\nrequest_timeout_ms = 0"),
            "cluster.request_timeout_ms"
        );
        assert_eq!(
            refused_key("nats_url = \"nats://x:1\"\nreplicas = 7"),
            "cluster.replicas"
        );
    }

    #[test]
    fn secrets_never_travel_in_clear_off_loopback() {
        assert_eq!(
            refused_key("nats_url = \"nats://nats.internal:4222\"\ntoken = \"t\""),
            "cluster.token"
        );
        assert_eq!(
            refused_key("nats_url = \"nats://10.0.0.5:4222\"\nuser = \"sb\"\npassword = \"p\""),
            "cluster.password"
        );
        assert_eq!(
            refused_key("nats_url = \"nats://127.0.0.1:4222\"\nuser = \"sb\""),
            "cluster.password"
        );
        let local = parse("nats_url = \"nats://127.0.0.1:4222\"\ntoken = \"t\"").unwrap();
        assert!(local.encrypted_or_local && local.token.is_some());
        let tls = parse("nats_url = \"tls://nats.internal:4222\"\ntoken = \"t\"").unwrap();
        assert!(tls.encrypted_or_local);
        let clear = parse("nats_url = \"nats://nats.internal:4222\"").unwrap();
        assert!(!clear.encrypted_or_local, "warned about at start");
        assert_eq!(
            refused_key("nats_url = \"nats://sb:secret@nats.internal:4222\""),
            "cluster.nats_url"
        );
        let urls = NatsUrls::Many(vec![
            "tls://sb:secret@nats:4222".into(),
            "nats://127.0.0.1:4222".into(),
        ]);
        let NatsUrls::Many(shown) = urls.redacted() else {
            unreachable!()
        };
        assert_eq!(
            shown,
            vec!["tls://<redacted>@nats:4222", "nats://127.0.0.1:4222"]
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(matches!(
            parse("nats_url = \"nats://x:1\"\nnats_urls = []"),
            Err(ConfigError::Syntax(_))
        ));
    }
}
