//! TLS for both listeners (rustls, ring): certificates loaded from PEM files and swapped
//! in place on reload (SIGHUP), and a non-blocking TLS socket for the session loop.
//!
//! The handshake and the HTTP upgrade run through tokio-rustls; the session then takes the
//! TCP stream and the rustls connection apart ([`TlsSocket`]) and drives them with the same
//! readiness loop as plain TCP, so fan-out and backpressure work the same way.

use std::cell::{Cell, RefCell};
use std::io::{IoSlice, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::ServerConnection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::config::check::{ConfigError, invalid};
use tokio_rustls::TlsAcceptor;

/// Plaintext rustls buffers for writing before it reports the socket full.
const SEND_BUFFER_LIMIT: usize = 64 * 1024;

/// Why certificates could not be loaded. Names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate chain {path}: {detail}")]
    Certificates { path: PathBuf, detail: String },
    #[error("cannot read private key {path}: {detail}")]
    Key { path: PathBuf, detail: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
}

/// A listener's TLS: its acceptor and the certificate it serves, reloadable in place.
#[derive(Clone)]
pub struct TlsEndpoint {
    acceptor: TlsAcceptor,
    certificate: Arc<ReloadableCertificate>,
}

impl std::fmt::Debug for TlsEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsEndpoint")
            .field("cert", &self.certificate.cert)
            .field("key", &self.certificate.key)
            .finish()
    }
}

impl TlsEndpoint {
    /// Loads `cert` (PEM chain) and `key` (PEM, PKCS#8, RSA or EC): TLS 1.2 and 1.3, ALPN
    /// `http/1.1`.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let certificate = Arc::new(ReloadableCertificate {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(load_certified_key(cert, key)?),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Key {
                path: key.to_path_buf(),
                detail: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(certificate.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            certificate,
        })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Reads the certificate files again; connections made from now on get the new
    /// certificate, open ones keep theirs. On error the old certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.certificate.reload()
    }
}

/// The certificate a listener serves, swapped whole on reload.
#[derive(Debug)]
struct ReloadableCertificate {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadableCertificate {
    fn reload(&self) -> Result<(), TlsError> {
        let fresh = load_certified_key(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }
}

impl ResolvesServerCert for ReloadableCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// Reads and checks a certificate chain and its private key.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certificates {
            path: cert.to_path_buf(),
            detail: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }
    let key_error = |detail: String| TlsError::Key {
        path: key.to_path_buf(),
        detail,
    };
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| key_error(e.to_string()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&private)
        .map_err(|e| key_error(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| key_error(format!("does not match the certificate: {e}")))?;
    Ok(Arc::new(certified))
}

/// A TLS connection driven without waiting: reads and writes go through rustls's buffers
/// to the TCP stream's non-blocking calls. Only the owning shard touches it.
pub struct TlsSocket {
    tcp: TcpStream,
    tls: RefCell<ServerConnection>,
    /// Decrypted bytes are waiting in rustls: readable without the socket.
    plaintext_waiting: Cell<bool>,
}

impl TlsSocket {
    /// Takes over a connection whose handshake (and HTTP upgrade) tokio-rustls has done.
    pub fn new(tcp: TcpStream, mut tls: ServerConnection) -> Self {
        tls.set_buffer_limit(Some(SEND_BUFFER_LIMIT));
        let waiting = tls
            .process_new_packets()
            .is_ok_and(|state| state.plaintext_bytes_to_read() > 0);
        Self {
            tcp,
            tls: RefCell::new(tls),
            plaintext_waiting: Cell::new(waiting),
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The TCP stream and the TLS session, to hand the connection to another thread.
    pub fn into_parts(self) -> (TcpStream, ServerConnection) {
        (self.tcp, self.tls.into_inner())
    }

    pub async fn readable(&self) -> std::io::Result<()> {
        std::future::poll_fn(|cx| self.poll_read_ready(cx)).await
    }

    /// Ready when decrypted bytes wait, or the TCP stream has something to read.
    pub fn poll_read_ready(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.plaintext_waiting.get() {
            return std::task::Poll::Ready(Ok(()));
        }
        self.tcp.poll_read_ready(cx)
    }

    pub fn try_read(&self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let mut tls = self.tls.borrow_mut();
        loop {
            match tls.reader().read(buffer) {
                Ok(n) => {
                    let state = tls.process_new_packets().map_err(invalid_data)?;
                    self.plaintext_waiting
                        .set(state.plaintext_bytes_to_read() > 0);
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            self.plaintext_waiting.set(false);
            if tls.read_tls(&mut TcpIo(&self.tcp))? == 0 {
                return Ok(0);
            }
            let processed = tls.process_new_packets();
            // Alerts, session tickets and key updates go out whether or not that worked.
            let _ = write_records(&mut tls, &self.tcp);
            processed.map_err(invalid_data)?;
        }
    }

    pub fn try_write_vectored(&self, slices: &[IoSlice<'_>]) -> std::io::Result<usize> {
        let mut tls = self.tls.borrow_mut();
        if write_records(&mut tls, &self.tcp)? {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let accepted = tls.writer().write_vectored(slices)?;
        if accepted == 0 && slices.iter().any(|s| !s.is_empty()) {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        match write_records(&mut tls, &self.tcp) {
            Ok(_) => Ok(accepted),
            // The plaintext is taken; the records go out once the socket drains.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(accepted),
            Err(e) => Err(e),
        }
    }

    pub fn flush_pending(&self) -> std::io::Result<bool> {
        write_records(&mut self.tls.borrow_mut(), &self.tcp)
    }

    /// Queues a close_notify alert and writes what the socket takes.
    pub fn close_notify(&self) {
        let mut tls = self.tls.borrow_mut();
        tls.send_close_notify();
        let _ = write_records(&mut tls, &self.tcp);
    }
}

/// Writes pending TLS records until the socket is full; `Ok(true)` if some remain.
fn write_records(tls: &mut ServerConnection, tcp: &TcpStream) -> std::io::Result<bool> {
    while tls.wants_write() {
        match tls.write_tls(&mut TcpIo(tcp)) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

fn invalid_data(error: rustls::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, error)
}

/// `Read`/`Write` over a tokio TCP stream's non-blocking calls, for rustls.
struct TcpIo<'a>(&'a TcpStream);

impl Read for TcpIo<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        self.0.try_read(buffer)
    }
}

impl Write for TcpIo<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.try_write(bytes)
    }

    fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> std::io::Result<usize> {
        self.0.try_write_vectored(slices)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A listener's certificate and key (PEM files) as configured (`[server.tls]`,
/// `[management.tls]`); reloaded on SIGHUP.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key: PKCS#8, RSA or EC.
    pub key: PathBuf,
}

impl RawTls {
    pub(crate) fn load(&self, table: &str) -> Result<TlsEndpoint, ConfigError> {
        TlsEndpoint::load(&self.cert, &self.key).map_err(|error| {
            let key = match error {
                TlsError::Key { .. } => "key",
                _ => "cert",
            };
            invalid(format!("{table}.{key}"), error.to_string())
        })
    }
}
