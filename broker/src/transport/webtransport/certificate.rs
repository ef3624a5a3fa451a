//! The certificate the WebTransport listener serves: the configured PEM files (reloaded on
//! SIGHUP), or a self-signed one the gateway makes and renews itself.
//!
//! Browsers accept a self-signed certificate through `serverCertificateHashes` only if it
//! is an ECDSA certificate valid for at most 14 days, so the gateway makes one valid for
//! just under 14 days and makes a fresh one when half of that has passed. Sessions already
//! open keep theirs; new sessions get the new one (clients fetch its hash from
//! `GET /{stage}/@webtransport` again).

use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

use crate::transport::tls::{TlsError, load_certified_key};

/// How long a self-signed certificate is valid (browsers take at most 14 days).
const SELF_SIGNED_VALIDITY: Duration = Duration::from_secs(14 * 24 * 3600 - 3600);
/// A self-signed certificate starts this long before it is made (clocks differ a little).
const BACKDATE: Duration = Duration::from_secs(3600);
/// A self-signed certificate is replaced once it is this old.
pub const RENEW_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why no self-signed certificate could be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot make a self-signed certificate: {0}")]
pub struct SelfSignedError(#[from] rcgen::Error);

/// The served certificate, swapped whole when it is renewed or reloaded.
#[derive(Debug)]
pub struct ServedCertificate {
    /// The configured files; `None`: self-signed.
    files: Option<(PathBuf, PathBuf)>,
    current: RwLock<Current>,
}

#[derive(Debug, Clone)]
struct Current {
    key: Arc<CertifiedKey>,
    /// SHA-256 of the leaf certificate (DER).
    sha256: [u8; 32],
    /// When a self-signed certificate was made (its validity starts [`BACKDATE`] earlier).
    made_at: OffsetDateTime,
}

impl ServedCertificate {
    /// Serves the PEM files `cert` and `key`.
    pub fn from_files(cert: PathBuf, key: PathBuf) -> Result<Self, TlsError> {
        let current = Current::of(load_certified_key(&cert, &key)?, OffsetDateTime::now_utc());
        Ok(Self {
            files: Some((cert, key)),
            current: RwLock::new(current),
        })
    }

    /// Serves a fresh self-signed certificate.
    pub fn self_signed() -> Result<Self, SelfSignedError> {
        Ok(Self {
            files: None,
            current: RwLock::new(self_signed(OffsetDateTime::now_utc())?),
        })
    }

    /// The SHA-256 of the served certificate, for `serverCertificateHashes`; `None` for a
    /// configured certificate, which browsers verify the usual way.
    pub fn self_signed_hash(&self) -> Option<[u8; 32]> {
        self.files.is_none().then(|| self.read().sha256)
    }

    /// Replaces a self-signed certificate that is due; returns whether it did.
    pub fn renew_if_due(&self, now: OffsetDateTime) -> Result<bool, SelfSignedError> {
        if self.files.is_some() || now - self.read().made_at < RENEW_AFTER {
            return Ok(false);
        }
        let fresh = self_signed(now)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(true)
    }

    /// Reads the configured files again (SIGHUP); a self-signed certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let Some((cert, key)) = &self.files else {
            return Ok(());
        };
        let fresh = Current::of(load_certified_key(cert, key)?, OffsetDateTime::now_utc());
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// The TLS configuration for the QUIC endpoint: TLS 1.3 with ALPN `h3`, serving this
    /// certificate.
    pub fn tls_config(self: &Arc<Self>) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap_or_else(|_| unreachable!("ring supports TLS 1.3"))
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![wtransport::tls::WEBTRANSPORT_ALPN.to_vec()];
        config
    }

    fn read(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ResolvesServerCert for ServedCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.read().key)
    }
}

impl Current {
    fn of(key: Arc<CertifiedKey>, made_at: OffsetDateTime) -> Self {
        let leaf = key
            .cert
            .first()
            .map(|cert| cert.as_ref())
            .unwrap_or_default();
        let digest = ring::digest::digest(&ring::digest::SHA256, leaf);
        let mut sha256 = [0; 32];
        sha256.copy_from_slice(digest.as_ref());
        Self {
            key,
            sha256,
            made_at,
        }
    }
}

/// An ECDSA P-256 certificate for the loopback names, valid from shortly before `now`
/// for just under 14 days.
fn self_signed(now: OffsetDateTime) -> Result<Current, SelfSignedError> {
    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let mut params = rcgen::CertificateParams::new(names)?;
    params.not_before = now - BACKDATE;
    params.not_after = params.not_before + SELF_SIGNED_VALIDITY;
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let certificate = params.self_signed(&key_pair)?;
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
    let signing = rustls::crypto::ring::sign::any_supported_type(&private)
        .map_err(|_| rcgen::Error::KeyGenerationUnavailable)?;
    let key = CertifiedKey::new(vec![certificate.der().clone()], signing);
    Ok(Current::of(Arc::new(key), now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_certificates_stay_within_what_browsers_accept_and_renew_at_half_life() {
        let served = ServedCertificate::self_signed().unwrap();
        let first = served.self_signed_hash().unwrap();
        assert!(SELF_SIGNED_VALIDITY <= Duration::from_secs(14 * 24 * 3600));
        let now = OffsetDateTime::now_utc();
        assert!(
            !served
                .renew_if_due(now + Duration::from_secs(3600))
                .unwrap()
        );
        assert_eq!(served.self_signed_hash(), Some(first));
        assert!(served.renew_if_due(now + RENEW_AFTER).unwrap());
        assert_ne!(served.self_signed_hash(), Some(first), "a new certificate");
        assert!(
            !served.renew_if_due(now + RENEW_AFTER).unwrap(),
            "not twice"
        );
    }
}
