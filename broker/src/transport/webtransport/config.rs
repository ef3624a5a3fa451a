//! `[server.webtransport]`: the keys as written, validated into a [`WebTransportConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::certificate::ServedCertificate;
use crate::config::check::{ConfigError, invalid, parse_addr};

/// `[server.webtransport]`, validated.
#[derive(Debug, Clone)]
pub struct WebTransportConfig {
    pub listen: SocketAddr,
    /// The configured certificate, or a self-signed one.
    pub certificate: Arc<ServedCertificate>,
    /// A session that hears nothing from its client for this long is lost; the gateway
    /// sends QUIC keep-alives every third of it.
    pub quic_idle_timeout: Duration,
    /// QUIC handshakes one client address may have in progress at once.
    pub max_handshakes_per_ip: usize,
}

/// `[server.webtransport]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawWebTransport {
    /// UDP address: clients open `https://LISTEN/{stage}`.
    pub listen: String,
    /// PEM certificate chain; without `cert` and `key`, a self-signed ECDSA P-256
    /// certificate valid for under 14 days, renewed by the gateway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// A session whose client is silent this long is lost (keep-alives every third).
    pub quic_idle_timeout_secs: u64,
    /// QUIC handshakes one client address may have in progress at once.
    pub max_handshakes_per_ip: usize,
}

impl Default for RawWebTransport {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:4433".into(),
            cert: None,
            key: None,
            quic_idle_timeout_secs: 30,
            max_handshakes_per_ip: 64,
        }
    }
}

impl RawWebTransport {
    pub fn validate(&self) -> Result<WebTransportConfig, ConfigError> {
        let certificate = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => ServedCertificate::from_files(cert.clone(), key.clone())
                .map_err(|error| {
                    let key = match error {
                        crate::transport::tls::TlsError::Key { .. } => "key",
                        _ => "cert",
                    };
                    invalid(format!("server.webtransport.{key}"), error.to_string())
                })?,
            (None, None) => ServedCertificate::self_signed()
                .map_err(|error| invalid("server.webtransport", error.to_string()))?,
            (Some(_), None) => return Err(invalid("server.webtransport.key", "cert needs a key")),
            (None, Some(_)) => return Err(invalid("server.webtransport.cert", "key needs a cert")),
        };
        if !(1..=600).contains(&self.quic_idle_timeout_secs) {
            return Err(invalid(
                "server.webtransport.quic_idle_timeout_secs",
                "must be 1 to 600",
            ));
        }
        if self.max_handshakes_per_ip == 0 {
            return Err(invalid(
                "server.webtransport.max_handshakes_per_ip",
                "must be at least 1",
            ));
        }
        Ok(WebTransportConfig {
            listen: parse_addr("server.webtransport.listen", &self.listen)?,
            certificate: std::sync::Arc::new(certificate),
            quic_idle_timeout: Duration::from_secs(self.quic_idle_timeout_secs),
            max_handshakes_per_ip: self.max_handshakes_per_ip,
        })
    }
}
