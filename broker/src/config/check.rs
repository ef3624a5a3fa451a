//! What every section's validation shares: the one error type a refused config gets (every
//! message names the key) and the small parsers of addresses and URLs. A leaf: the modules
//! that own a section's keys use it without depending on the config as a whole.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why a configuration was refused. Every message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Syntax(String),
    #[error("invalid config: `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

pub fn parse_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse()
        .map_err(|_| invalid(key, format!("`{text}` is not an IP:port address")))
}

pub fn parse_http_url(key: &str, url: &str) -> Result<reqwest::Url, ConfigError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| invalid(key, format!("`{url}`: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(key, "must be an http:// or https:// URL"));
    }
    Ok(parsed)
}
