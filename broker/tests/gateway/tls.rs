//! `wss://` and `https://`: a test CA made with rcgen, clients that trust only it, and a
//! certificate swapped under live connections with SIGHUP.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::binary::*;

/// A test certificate authority and a server certificate it issued for localhost.
struct TestPki {
    ca: CertificateDer<'static>,
    /// The server certificate (DER), to tell which one a client was shown.
    leaf: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

impl TestPki {
    fn new(name: &str) -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf_params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
        Self {
            ca: ca.der().clone(),
            leaf: leaf.der().clone(),
            cert_pem: leaf.pem(),
            key_pem: leaf_key.serialize_pem(),
        }
    }

    /// Writes the certificate and key where a config points.
    fn install(&self, cert: &Path, key: &Path) {
        std::fs::write(cert, &self.cert_pem).unwrap();
        std::fs::write(key, &self.key_pem).unwrap();
    }

    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

type TlsWs = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// A `wss://` client trusting `pki`'s CA; returns it and the certificate it was shown.
async fn wss_client(pki: &TestPki, addr: std::net::SocketAddr) -> (TlsWs, CertificateDer<'static>) {
    wss_client_at(pki, addr, "/dev").await
}

/// A `wss://` client of `path` (with its query string).
async fn wss_client_at(
    pki: &TestPki,
    addr: std::net::SocketAddr,
    path: &str,
) -> (TlsWs, CertificateDer<'static>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = TlsConnector::from(pki.client_config());
    let name = ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let shown = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (ws, _) = tokio_tungstenite::client_async(format!("wss://localhost{path}"), tls)
        .await
        .unwrap();
    (ws, shown)
}

async fn tls_text(ws: &mut TlsWs) -> String {
    use futures_util::StreamExt;
    let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    message.into_text().unwrap().as_str().to_owned()
}

async fn tls_json(ws: &mut TlsWs) -> serde_json::Value {
    serde_json::from_str(&tls_text(ws).await).unwrap()
}

async fn tls_echo(ws: &mut TlsWs, text: &str) {
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::text(text))
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply.into_text().unwrap().as_str(), text);
}

fn tls_config(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let body = "[routes.\"$default\"]\nintegration = { type = \"echo\" }\n[limits]\nmessages_per_sec = 0\nbytes_per_sec = 0\n";
    let path = write_config(dir, body);
    let tls = format!(
        "[server.tls]\ncert = \"{c}\"\nkey = \"{k}\"\n[management.tls]\ncert = \"{c}\"\nkey = \"{k}\"\n",
        c = cert.display(),
        k = key.display()
    );
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}{tls}")).unwrap();
    (path, cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_and_https_serve_clients_that_trust_the_ca_and_reload_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (config, cert, key) = tls_config(dir.path());
    let first = TestPki::new("first");
    first.install(&cert, &key);
    let gateway = GatewayProcess::start(&config, &[]);
    assert!(gateway.ws_url.starts_with("wss://"), "{}", gateway.ws_url);
    let addr = gateway.ws_addr();

    let (mut early, shown) = wss_client(&first, addr).await;
    assert_eq!(shown, first.leaf);
    tls_echo(&mut early, "over tls").await;
    // A frame near the size limit crosses several TLS records both ways.
    let big = "x".repeat(30_000);
    tls_echo(&mut early, &big).await;

    // HTTPS on the management API, with a client that trusts only the test CA.
    let https = reqwest::Client::builder()
        .use_preconfigured_tls((*first.client_config()).clone())
        .build()
        .unwrap();
    let health = https
        .get(format!(
            "https://localhost:{}/health",
            gateway.api_addr().port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    // A renewed certificate (another CA, even) is picked up on SIGHUP by new connections;
    // the connection made before keeps working.
    let second = TestPki::new("second");
    second.install(&cert, &key);
    gateway.signal("-HUP");
    let mut renewed = None;
    for _ in 0..50 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let connector = TlsConnector::from(second.client_config());
        let name = ServerName::try_from("localhost").unwrap();
        if let Ok(tls) = connector.connect(name, tcp).await {
            renewed = Some(tls.get_ref().1.peer_certificates().unwrap()[0].clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        renewed,
        Some(second.leaf.clone()),
        "the new certificate is served"
    );
    let (mut late, _) = wss_client(&second, addr).await;
    tls_echo(&mut late, "after the reload").await;
    tls_echo(&mut early, "the old connection stays").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_clients_and_bad_certificates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (config, cert, key) = tls_config(dir.path());
    let pki = TestPki::new("only");
    pki.install(&cert, &key);
    let gateway = GatewayProcess::start(&config, &[]);
    // A plain ws:// handshake gets no 101.
    let plain = format!("ws://{}/dev", gateway.ws_addr());
    assert!(tokio_tungstenite::connect_async(plain).await.is_err());
    let (mut ws, _) = wss_client(&pki, gateway.ws_addr()).await;
    tls_echo(&mut ws, "still fine").await;
    drop(gateway);

    // A key that does not match the certificate refuses to start, naming the key.
    let other = TestPki::new("other");
    std::fs::write(&key, &other.key_pem).unwrap();
    let output = run(&["check-config", config.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("server.tls.key"), "{stderr}");
    std::fs::write(&cert, "not a certificate").unwrap();
    let output = run(&["check-config", config.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("server.tls.cert"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wss_client_resumes_whichever_shard_its_new_socket_reaches() {
    use futures_util::SinkExt;
    let dir = tempfile::tempdir().unwrap();
    let (config, cert, key) = tls_config(dir.path());
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}[api]\nresume = true\n")).unwrap();
    let pki = TestPki::new("resume");
    pki.install(&cert, &key);
    let gateway = GatewayProcess::start(&config, &[]);
    let addr = gateway.ws_addr();
    let https = reqwest::Client::builder()
        .use_preconfigured_tls((*pki.client_config()).clone())
        .build()
        .unwrap();
    let metrics = format!("https://localhost:{}/metrics", gateway.api_addr().port());
    let (mut ws, _) = wss_client(&pki, addr).await;
    let welcome = tls_json(&mut ws).await;
    let (id, token) = (
        welcome["connectionId"].clone(),
        welcome["resumeToken"].clone(),
    );
    let mut token = token.as_str().unwrap().to_owned();
    let mut received = 0;
    // Two shards: each new socket lands on either, so some resumes cross to the owner.
    for round in 0..6 {
        tls_echo(&mut ws, &format!("seen {round}")).await;
        received += 1;
        // Its echo is sent, then the socket dies before the client reads it.
        ws.send(tokio_tungstenite::tungstenite::Message::text(format!(
            "lost {round}"
        )))
        .await
        .unwrap();
        drop(ws);
        let mut parked = false;
        for _ in 0..200 {
            let text = https
                .get(&metrics)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            if text.contains("switchboard_connections_parked 1") {
                parked = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(parked, "round {round}: parked");
        let path = format!("/dev?resume={token}&received={received}");
        (ws, _) = wss_client_at(&pki, addr, &path).await;
        let first = tls_json(&mut ws).await;
        assert_eq!(first["type"], "resumed", "round {round}: {first}");
        assert_eq!(first["connectionId"], id);
        assert_eq!(first["replayed"], 1);
        token = first["resumeToken"].as_str().unwrap().to_owned();
        assert_eq!(tls_text(&mut ws).await, format!("lost {round}"));
        received += 1;
    }
}
