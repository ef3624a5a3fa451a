//! `[management]`: the keys as written, validated into a [`ManagementConfig`] (credentials
//! resolved and checked for strength, limits, TLS).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::check::{ConfigError, invalid, parse_addr};
use crate::transport::TlsEndpoint;
use crate::transport::tls::RawTls;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawManagement {
    pub listen: String,
    /// Bearer tokens (each `${ENV}` or at least 32 bytes, no placeholder); tokens or
    /// `aws_keys` are required when `listen` is not loopback.
    pub tokens: Vec<String>,
    /// A file of bearer tokens, one per line (a mounted secret), added to `tokens`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_file: Option<PathBuf>,
    /// Key pairs whose AWS Signature V4 (service `execute-api`) the API accepts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub aws_keys: Vec<RawAwsKey>,
    /// Whether `/metrics` is served without a token. Default: only on a loopback listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_metrics: Option<bool>,
    /// Concurrent management connections; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Concurrent management connections from one address (0 = no limit).
    pub max_connections_per_ip: usize,
    /// A request whose headers have not arrived within this is dropped (slowloris); a
    /// kept-alive connection must send its next request within it too (idle timeout).
    pub header_timeout_secs: u64,
    /// A request body that has not fully arrived within this is answered 408.
    pub body_timeout_secs: u64,
    /// `https://` on `listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawTls>,
}

/// `[[management.aws_keys]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAwsKey {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl Default for RawManagement {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9090".into(),
            tokens: Vec::new(),
            tokens_file: None,
            aws_keys: Vec::new(),
            public_metrics: None,
            max_connections: 256,
            max_connections_per_ip: 64,
            header_timeout_secs: 30,
            body_timeout_secs: 30,
            tls: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ManagementConfig {
    pub listen: SocketAddr,
    pub tokens: Vec<String>,
    pub aws_keys: Vec<crate::auth::sigv4::AwsKey>,
    /// `/metrics` needs no token.
    pub public_metrics: bool,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Also the keep-alive idle timeout: the next request's headers must come within it.
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub tls: Option<TlsEndpoint>,
}

impl ManagementConfig {
    /// Whether requests must carry credentials (tokens or SigV4 keys are configured).
    pub fn has_credentials(&self) -> bool {
        !self.tokens.is_empty() || !self.aws_keys.is_empty()
    }
}

impl RawManagement {
    pub fn validate(&self) -> Result<ManagementConfig, ConfigError> {
        let listen = parse_addr("management.listen", &self.listen)?;
        let tokens = self.tokens()?;
        let aws_keys = self
            .aws_keys
            .iter()
            .map(|k| {
                let secret_access_key = crate::secret::resolve(&k.secret_access_key)
                    .map_err(|reason| invalid("management.aws_keys.secret_access_key", reason))?;
                if k.access_key_id.trim().is_empty() || secret_access_key.is_empty() {
                    return Err(invalid(
                        "management.aws_keys",
                        "access_key_id and secret_access_key must not be empty",
                    ));
                }
                Ok(crate::auth::sigv4::AwsKey {
                    access_key_id: k.access_key_id.clone(),
                    secret_access_key,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !listen.ip().is_loopback() && tokens.is_empty() && aws_keys.is_empty() {
            return Err(invalid(
                "management.tokens",
                format!(
                    "tokens (or tokens_file, or aws_keys) are required when management.listen \
                     is not a loopback address; {}",
                    crate::secret::HOW_TO_MAKE_ONE
                ),
            ));
        }
        let positive = |key: &str, value: u64| {
            if value == 0 {
                Err(invalid(
                    format!("management.{key}"),
                    "must be greater than 0",
                ))
            } else {
                Ok(value)
            }
        };
        positive("max_connections", self.max_connections as u64)?;
        Ok(ManagementConfig {
            listen,
            tokens,
            aws_keys,
            public_metrics: self.public_metrics.unwrap_or(listen.ip().is_loopback()),
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            header_timeout: Duration::from_secs(positive(
                "header_timeout_secs",
                self.header_timeout_secs,
            )?),
            body_timeout: Duration::from_secs(positive(
                "body_timeout_secs",
                self.body_timeout_secs,
            )?),
            tls: self
                .tls
                .as_ref()
                .map(|tls| tls.load("management.tls"))
                .transpose()?,
        })
    }
}

impl RawManagement {
    /// `tokens` (each `${ENV}` resolved) and the lines of `tokens_file`, every one checked
    /// for strength: a guessable token is refused, naming the key and how to make one.
    fn tokens(&self) -> Result<Vec<String>, ConfigError> {
        let mut tokens = self
            .tokens
            .iter()
            .map(|token| {
                crate::secret::resolve(token).map_err(|reason| invalid("management.tokens", reason))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for token in &tokens {
            crate::secret::check_token(token)
                .map_err(|reason| invalid("management.tokens", reason))?;
        }
        if let Some(path) = &self.tokens_file {
            let from_file = crate::secret::read_token_file(path)
                .map_err(|reason| invalid("management.tokens_file", reason))?;
            for token in &from_file {
                crate::secret::check_token(token)
                    .map_err(|reason| invalid("management.tokens_file", reason))?;
            }
            tokens.extend(from_file);
        }
        Ok(tokens)
    }
}
