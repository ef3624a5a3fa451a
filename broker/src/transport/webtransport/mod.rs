//! WebTransport (HTTP/3 over QUIC, through `wtransport` on quinn): a second client
//! transport, equal to WebSocket in everything a backend sees.
//!
//! One QUIC endpoint runs on the management runtime and only accepts; each incoming
//! session passes the admission gate there and is handed, round robin, to a shard, which
//! runs its handshake (`$connect`), its QUIC connection's driver and its session loop on
//! its own thread, like a WebSocket connection's. The session URL is
//! `https://HOST:PORT/{stage}?query`; the client opens one bidirectional stream and
//! messages travel on it in the [`framing`] format. Room messages marked unreliable go to
//! sessions opened with `?datagrams=1` as QUIC datagrams instead.

pub mod certificate;
pub mod config;
pub mod framing;
pub mod socket;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use tokio_util::sync::CancellationToken;

use crate::limits::Admission;
use crate::outbound::Wire;

pub use certificate::ServedCertificate;
pub use config::WebTransportConfig;
pub use socket::WebTransportSocket;

/// Kernel receive and send buffer asked for the UDP socket.
const SOCKET_BUFFER: usize = 8 * 1024 * 1024;
/// How often the self-signed certificate's age is checked.
const RENEWAL_CHECK: Duration = Duration::from_secs(3600);
/// Bytes a session may have sent but not yet acknowledged (quinn would buffer 10 MB): what
/// a client that stops reading makes the gateway hold beyond its outbound queue, like a TCP
/// socket's send buffer.
const SEND_WINDOW: u64 = 256 * 1024;
/// Bytes a client may send ahead on its message stream before the gateway reads them; past
/// it, its sends wait (backpressure, as TCP's receive window).
const STREAM_RECEIVE_WINDOW: u32 = 256 * 1024;
/// The same for all of a session's streams together.
const RECEIVE_WINDOW: u32 = 1024 * 1024;
/// Packets a client may receive before it must acknowledge (with the ACK frequency
/// extension; QUIC's default is 2).
const ACK_ELICITING_THRESHOLD: u32 = 10;
/// QUIC handshakes in progress past which a new client must first prove its address with a
/// stateless Retry (one more round trip; a flood of spoofed Initial packets then leaves no
/// state behind).
const RETRY_ABOVE: usize = 256;
/// QUIC handshakes in progress past which new clients are refused.
const MAX_HANDSHAKES: usize = 4096;
/// Datagrams a session may have received but not read (the gateway reads none: clients
/// have nothing to send that way); sent ones carry unreliable room messages.
const DATAGRAM_BUFFER: usize = 16 * 1024;

/// Binds the listener's UDP socket (before [`start`], so callers know the port), with
/// kernel buffers of [`SOCKET_BUFFER`]: every client's packets arrive on this one socket,
/// and a burst (handshakes, acknowledgements during a fan-out) that overflows the default
/// ~200 KiB is dropped and has to be retransmitted.
pub fn bind(config: &WebTransportConfig) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(config.listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    // Capped by the kernel (net.core.rmem_max / wmem_max); a smaller buffer still works.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&config.listen.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The listener's QUIC endpoint.
pub type Endpoint = Arc<wtransport::Endpoint<wtransport::endpoint::endpoint_side::Server>>;

/// A session that passed the endpoint's gate, on its way to the shard that runs it.
pub type HandOff = Arc<
    dyn Fn(
            wtransport::endpoint::IncomingSession,
            HandshakeSlot,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// What the endpoint needs of the gateway: its admission gate, the counter of handshake
/// outcomes (`switchboard_connections_total`) and where sessions go.
pub struct Gate {
    pub admission: Arc<Admission>,
    pub outcomes: prometheus::IntCounterVec,
    pub hand_off: HandOff,
}

/// Starts the endpoint on `socket`: accepts sessions until `shutdown`, and keeps a
/// self-signed certificate fresh. Must run inside the management runtime.
pub fn start(
    socket: std::net::UdpSocket,
    config: &WebTransportConfig,
    gate: Gate,
    shutdown: &CancellationToken,
) -> std::io::Result<Endpoint> {
    let quic = wtransport::ServerConfig::builder()
        .with_bind_socket(socket)
        .with_custom_tls_and_transport(config.certificate.tls_config(), transport_config(config)?)
        .build();
    let endpoint = Arc::new(wtransport::Endpoint::server(quic)?);
    tokio::spawn(accept_sessions(
        endpoint.clone(),
        gate,
        config.max_handshakes_per_ip,
        shutdown.clone(),
    ));
    tokio::spawn(renew_certificate(
        config.certificate.clone(),
        shutdown.clone(),
    ));
    Ok(endpoint)
}

/// What one session may make the gateway hold, and when a silent one is lost.
fn transport_config(
    config: &WebTransportConfig,
) -> std::io::Result<wtransport::quinn::TransportConfig> {
    use wtransport::quinn::{IdleTimeout, VarInt};
    let idle = IdleTimeout::try_from(config.quic_idle_timeout).map_err(|_| {
        std::io::Error::other("server.webtransport.quic_idle_timeout_secs is too large")
    })?;
    let mut transport = wtransport::quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(config.quic_idle_timeout / 3))
        .send_window(SEND_WINDOW)
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(RECEIVE_WINDOW))
        .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER))
        .ack_frequency_config(Some(ack_frequency()))
        // The HTTP/3 CONNECT stream and the message stream; HTTP/3's control stream and
        // its two QPACK streams. A client gets no more streams to fill with data.
        .max_concurrent_bidi_streams(VarInt::from_u32(2))
        .max_concurrent_uni_streams(VarInt::from_u32(3));
    Ok(transport)
}

/// Asks clients that support the QUIC ACK frequency extension (quinn-based ones; browsers
/// ignore it) to acknowledge every [`ACK_ELICITING_THRESHOLD`]-th packet instead of every
/// second: each acknowledgement costs the gateway a datagram received, decrypted and handed
/// to the connection's shard, which at fan-out rates was a large share of its work.
fn ack_frequency() -> wtransport::quinn::AckFrequencyConfig {
    let mut config = wtransport::quinn::AckFrequencyConfig::default();
    config.ack_eliciting_threshold(wtransport::quinn::VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    config
}

/// Hands each incoming session on through the gate. Under a flood of handshakes, clients
/// first prove their address with a stateless Retry; past a hard cap they are refused.
///
/// One address (an IPv6 /64) holds at most `max_handshakes_per_ip` handshakes with a proven
/// address at once, and one that has used up its connect rate (`limits.connects_per_sec_per_ip`)
/// starts none: past either, a client whose address is not proven yet gets a Retry, and one
/// whose address is proven is refused. Unproven handshakes are not counted per address (a
/// spoofed source could fill a victim's share); they are bounded by the Retry that every
/// client gets past [`RETRY_ABOVE`]. So handshakes that never send their CONNECT cannot lock
/// others out.
async fn accept_sessions(
    endpoint: Endpoint,
    gate: Gate,
    per_address: usize,
    shutdown: CancellationToken,
) {
    let handshakes = Arc::new(Handshakes::default());
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => return,
            incoming = endpoint.accept() => incoming,
        };
        let validated = incoming.remote_address_validated();
        let address = gate
            .admission
            .address_key(incoming.remote_address().ip().to_canonical());
        let pending = handshakes.total.load(Ordering::Relaxed);
        let too_many_here = handshakes.at(address) >= per_address
            || gate
                .admission
                .connect_rate_exhausted(address, std::time::Instant::now());
        if !validated && (pending >= RETRY_ABOVE || too_many_here) {
            incoming.retry();
            continue;
        }
        if pending >= MAX_HANDSHAKES || (validated && too_many_here) {
            let result = if too_many_here {
                "ip_limit"
            } else {
                "over_capacity"
            };
            gate.outcomes
                .with_label_values(&[result, Wire::WebTransport.label()])
                .inc();
            incoming.refuse();
            continue;
        }
        let slot = HandshakeSlot::take(&handshakes, validated.then_some(address));
        (gate.hand_off)(incoming, slot).await;
    }
}

/// The QUIC handshakes in progress: in all, and per client address.
#[derive(Debug, Default)]
struct Handshakes {
    total: AtomicUsize,
    per_address: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

impl Handshakes {
    fn at(&self, address: std::net::IpAddr) -> usize {
        let per_address = self
            .per_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        per_address.get(&address).copied().unwrap_or(0)
    }
}

/// One QUIC handshake in progress, counted (in all and for its address) until dropped.
/// The admission gate proper (capacity, open connections per address) is passed once the
/// session request has arrived over the proven address.
pub struct HandshakeSlot {
    handshakes: Arc<Handshakes>,
    /// The proven address it counts under, if any.
    address: Option<std::net::IpAddr>,
}

impl HandshakeSlot {
    fn take(handshakes: &Arc<Handshakes>, address: Option<std::net::IpAddr>) -> Self {
        handshakes.total.fetch_add(1, Ordering::Relaxed);
        if let Some(address) = address {
            let mut per_address = handshakes
                .per_address
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *per_address.entry(address).or_default() += 1;
        }
        Self {
            handshakes: handshakes.clone(),
            address,
        }
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.handshakes.total.fetch_sub(1, Ordering::Relaxed);
        let Some(address) = self.address else {
            return;
        };
        let mut per_address = self
            .handshakes
            .per_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = per_address.get_mut(&address) {
            *count -= 1;
            if *count == 0 {
                per_address.remove(&address);
            }
        }
    }
}

/// Replaces a self-signed certificate at half its life.
async fn renew_certificate(certificate: Arc<ServedCertificate>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(RENEWAL_CHECK);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match certificate.renew_if_due(time::OffsetDateTime::now_utc()) {
            Ok(true) => tracing::info!("WebTransport self-signed certificate renewed"),
            Ok(false) => {}
            Err(error) => tracing::error!(%error, "keeping the old WebTransport certificate"),
        }
    }
}

/// What a browser passes to `new WebTransport(url, {serverCertificateHashes})` (with each
/// `value` decoded to bytes): the session URL for `stage`, and the self-signed
/// certificate's hash. `host` is the name the client reached the management API by,
/// used when the listener is bound to all interfaces.
pub fn discovery(
    config: &WebTransportConfig,
    host: Option<&str>,
    stage: &str,
) -> serde_json::Value {
    let address = config.listen;
    let host = public_host(address, host);
    let url = format!("https://{host}:{}/{stage}", address.port());
    match config.certificate.self_signed_hash() {
        Some(hash) => serde_json::json!({
            "url": url,
            "serverCertificateHashes": [{
                "algorithm": "sha-256",
                "value": base64::engine::general_purpose::STANDARD.encode(hash),
            }],
        }),
        None => serde_json::json!({ "url": url }),
    }
}

/// The host name clients reach a listener bound to `listen` by: its address, or, when it
/// is bound to all interfaces, the name the client used for the management API (`host`,
/// its `Host` header), else `localhost`.
pub fn public_host(listen: std::net::SocketAddr, host: Option<&str>) -> String {
    if listen.ip().is_unspecified() {
        host.map(host_without_port)
            .unwrap_or("localhost")
            .to_owned()
    } else if listen.is_ipv6() {
        format!("[{}]", listen.ip())
    } else {
        listen.ip().to_string()
    }
}

/// `host:port` or `[v6]:port` without the port.
fn host_without_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(':') => {
            name
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(listen: &str, certificate: ServedCertificate) -> WebTransportConfig {
        WebTransportConfig {
            listen: listen.parse().unwrap(),
            certificate: Arc::new(certificate),
            quic_idle_timeout: Duration::from_secs(30),
            max_handshakes_per_ip: 64,
        }
    }

    #[test]
    fn discovery_pins_only_a_self_signed_certificate() {
        let pinned = discovery(
            &config("127.0.0.1:4433", ServedCertificate::self_signed().unwrap()),
            Some("127.0.0.1:9090"),
            "dev",
        );
        assert_eq!(pinned["url"], "https://127.0.0.1:4433/dev");
        assert_eq!(pinned["serverCertificateHashes"][0]["algorithm"], "sha-256");

        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["gateway.example".into()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let configured = ServedCertificate::from_files(cert_path, key_path).unwrap();
        let document = discovery(
            &config("0.0.0.0:4433", configured),
            Some("gateway.example:9090"),
            "prod",
        );
        assert_eq!(
            document,
            serde_json::json!({"url": "https://gateway.example:4433/prod"})
        );
    }

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(host_without_port("example.com:9090"), "example.com");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert_eq!(host_without_port("[::1]:9090"), "[::1]");
        assert_eq!(host_without_port("::1"), "::1");
    }
}
