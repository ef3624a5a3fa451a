//! WebTransport: a real `wtransport` client against the real gateway over QUIC on
//! loopback. A session is a connection like any other: `$connect` with its query string,
//! routes, acks, pushes, rooms shared with WebSocket clients, `DELETE`, and `$disconnect`
//! exactly once however it ends (client close, bad frame, a client that vanishes).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures_util::StreamExt as _;
use serde_json::{Value, json};
use wtransport::endpoint::endpoint_side::Client;
use wtransport::error::{ConnectingError, ConnectionError};
use wtransport::{ClientConfig, Endpoint, RecvStream, SendStream};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(10);

/// A gateway config with WebTransport on, the demo's room routes, a queue route and
/// `$connect`/`$disconnect` recorded by `backend`; `webtransport` adds keys to
/// `[server.webtransport]`.
fn config(backend: &Backend, webtransport: &str) -> String {
    config_with(
        backend,
        &format!(
            r#"
[server.webtransport]
listen = "127.0.0.1:0"
{webtransport}
[api]
route_selection_expression = "$request.body.action"
[storage]
fsync = "batch"
flush_interval_ms = 2
[routes.join]
integration = {{ type = "room_join", room = "$request.body.room" }}
[routes.publish]
integration = {{ type = "room_publish", room = "$request.body.room", data = "$request.body.data" }}
[routes.whoami]
integration = {{ type = "mock", body = "{{\"connectionId\":\"$context.connectionId\"}}" }}
response = true
[routes.enqueue]
integration = {{ type = "queue", queue = "jobs", ack = true }}
[routes."$default"]
integration = {{ type = "echo" }}
"#
        ),
    )
}

/// The discovery document, as a browser fetches it.
async fn discovery(gateway: &TestGateway) -> Value {
    discovery_at(&gateway.api_url("")).await
}

/// The discovery document of the management API at `api` (with the stage).
async fn discovery_at(api: &str) -> Value {
    http()
        .get(format!("{api}/@webtransport"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A WebTransport client session and its message stream.
struct WtClient {
    session: wtransport::Connection,
    send: SendStream,
    recv: RecvStream,
    received: Vec<u8>,
    _endpoint: Endpoint<Client>,
}

impl WtClient {
    /// Opens a session to `url` (with the query string) trusting the certificate hash the
    /// discovery document names, and opens the message stream.
    async fn connect(gateway: &TestGateway, query: &str) -> Result<Self, ConnectingError> {
        let document = discovery(gateway).await;
        Self::connect_to(document["url"].as_str().unwrap(), &document, query).await
    }

    async fn connect_to(url: &str, document: &Value, query: &str) -> Result<Self, ConnectingError> {
        let config = ClientConfig::builder()
            .with_bind_default()
            .with_server_certificate_hashes([pinned_hash(document)])
            .build();
        let endpoint = Endpoint::client(config).unwrap();
        let session = endpoint.connect(format!("{url}{query}")).await?;
        let (send, recv) = session.open_bi().await.unwrap().await.unwrap();
        let mut client = Self {
            session,
            send,
            recv,
            received: Vec::new(),
            _endpoint: endpoint,
        };
        // The stream reaches the gateway with its first bytes.
        client.send.write_all(&[]).await.unwrap();
        Ok(client)
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.unwrap();
    }

    async fn send_text(&mut self, text: &str) {
        self.send_raw(&frame(1, text.as_bytes())).await;
    }

    async fn send_json(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    /// The next message: its kind and payload; `None` once the stream or session ended.
    async fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.received.len() >= 5 {
                let length = u32::from_be_bytes(self.received[1..5].try_into().unwrap()) as usize;
                if self.received.len() >= 5 + length {
                    let kind = self.received[0];
                    let payload = self.received[5..5 + length].to_vec();
                    self.received.drain(..5 + length);
                    return Some((kind, payload));
                }
            }
            let mut buffer = [0; 4096];
            let read = tokio::time::timeout(WAIT, self.recv.read(&mut buffer))
                .await
                .expect("a message within 10 s");
            match read {
                Ok(Some(n)) => self.received.extend_from_slice(&buffer[..n]),
                _ => return None,
            }
        }
    }

    async fn next_text(&mut self) -> String {
        let (kind, payload) = self.next().await.expect("a message");
        assert_eq!(kind, 1, "a text message");
        String::from_utf8(payload).unwrap()
    }

    async fn next_json(&mut self) -> Value {
        serde_json::from_str(&self.next_text().await).unwrap()
    }

    /// The next datagram's bytes.
    async fn next_datagram(&self) -> Vec<u8> {
        let datagram = tokio::time::timeout(WAIT, self.session.receive_datagram())
            .await
            .expect("a datagram within 10 s")
            .unwrap();
        datagram.payload().to_vec()
    }

    /// How the gateway closed the session: its code and reason.
    async fn closed(&self) -> (u64, String) {
        let error = tokio::time::timeout(WAIT, self.session.closed())
            .await
            .expect("closed within 10 s");
        match error {
            ConnectionError::ApplicationClosed(close) => (
                close.code().into_inner(),
                String::from_utf8_lossy(close.reason()).into_owned(),
            ),
            other => panic!("closed by the gateway with a code, not {other:?}"),
        }
    }
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![kind];
    bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

#[tokio::test]
async fn discovery_names_the_session_url_and_the_certificate_hash() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config(&backend, "")).await;
    let response = http()
        .get(gateway.api_url("/@webtransport"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["access-control-allow-origin"], "*");
    let document: Value = response.json().await.unwrap();
    let wt_addr = gateway.wt_addr.unwrap();
    assert_eq!(document["url"], format!("https://{wt_addr}/dev"));
    let hash = &document["serverCertificateHashes"][0];
    assert_eq!(hash["algorithm"], "sha-256");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(hash["value"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes.len(), 32);

    let wrong_stage = http()
        .get(format!("http://{}/prod/@webtransport", gateway.api_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_stage.status(), 404);
    let without = TestGateway::start(&config_with(&backend, "")).await;
    let disabled = http()
        .get(without.api_url("/@webtransport"))
        .send()
        .await
        .unwrap();
    assert_eq!(disabled.status(), 404);
    assert!(
        disabled
            .text()
            .await
            .unwrap()
            .contains("server.webtransport")
    );
}

#[tokio::test]
async fn a_session_is_a_connection_from_connect_to_disconnect() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config(&backend, "")).await;
    let mut client = WtClient::connect(&gateway, "?room=lobby&token=abc")
        .await
        .unwrap();
    let connect = backend.wait_for("/connect-log", |_| true).await;
    let id = connection_id(&connect);
    assert_eq!(connect["requestContext"]["eventType"], "CONNECT");
    assert_eq!(
        connect["queryStringParameters"],
        json!({"room": "lobby", "token": "abc"})
    );
    assert_eq!(
        connect["requestContext"]["identity"]["sourceIp"],
        "127.0.0.1"
    );

    // Routes: a mock answer, an echo of text and of binary.
    client.send_json(json!({"action": "whoami"})).await;
    assert_eq!(client.next_json().await["connectionId"], id);
    client.send_text("not json").await;
    assert_eq!(client.next_text().await, "not json");
    client.send_raw(&frame(2, &[0, 1, 2, 255])).await;
    assert_eq!(client.next().await, Some((2, vec![0, 1, 2, 255])));

    // A durable queue's ack.
    client
        .send_json(json!({"action": "enqueue", "order": 1}))
        .await;
    let ack = client.next_json().await;
    assert_eq!(ack["type"], "ack");

    // @connections: push, status.
    let pushed = post_body(gateway.api_url(&format!("/@connections/{id}")), "pushed").await;
    assert_eq!(pushed.status(), 200);
    assert_eq!(client.next_text().await, "pushed");
    let status: Value = http()
        .get(gateway.api_url(&format!("/@connections/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["identity"]["sourceIp"], "127.0.0.1");

    let metrics = gateway.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "switchboard_connections_active{transport=\"webtransport\"}"
        ),
        1.0
    );

    // DELETE: the client learns why, the backend hears once.
    let deleted = http()
        .delete(gateway.api_url(&format!("/@connections/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(
        client.closed().await,
        (1000, "connection deleted via @connections".into())
    );
    let event = disconnect_event(&backend, &id).await;
    assert_eq!(
        status_and_reason(&event),
        (1000, "connection deleted via @connections".into())
    );
    let gone = post_body(gateway.api_url(&format!("/@connections/{id}")), "late").await;
    assert_eq!(gone.status(), 410);
}

#[tokio::test]
async fn websocket_and_webtransport_members_share_a_room() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config(&backend, "")).await;
    let mut quic = WtClient::connect(&gateway, "").await.unwrap();
    let mut ws = gateway.connect().await;
    for join in [
        json!({"action": "join", "room": "mixed"}),
        json!({"action": "whoami"}),
    ] {
        quic.send_json(join.clone()).await;
        send_text(&mut ws, &join.to_string()).await;
    }
    let quic_id = quic.next_json().await["connectionId"]
        .as_str()
        .unwrap()
        .to_owned();
    next_json(&mut ws).await;

    // A broadcast through the management API reaches both, counted once each.
    let answer: Value = post_for_json(gateway.api_url("/@rooms/mixed"), "to everyone").await;
    assert_eq!(answer["delivered"], 2);
    assert_eq!(quic.next_text().await, "to everyone");
    assert_eq!(next_text(&mut ws).await, "to everyone");

    // Clients publish to each other across transports.
    quic.send_json(json!({"action": "publish", "room": "mixed", "data": "from quic"}))
        .await;
    assert_eq!(next_text(&mut ws).await, "from quic");
    assert_eq!(quic.next_text().await, "from quic");
    send_text(
        &mut ws,
        &json!({"action": "publish", "room": "mixed", "data": "from tcp"}).to_string(),
    )
    .await;
    assert_eq!(quic.next_text().await, "from tcp");
    assert_eq!(next_text(&mut ws).await, "from tcp");

    // Bulk to both.
    let ws_id = backend.connected_ids(2).await;
    let bulk: Value = http()
        .post(gateway.api_url("/@connections"))
        .json(&json!({"connectionIds": ws_id, "data": "bulk"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(bulk["delivered"], 2, "{bulk}");
    assert_eq!(quic.next_text().await, "bulk");
    assert_eq!(next_text(&mut ws).await, "bulk");

    // The client's own close: its code and reason reach `$disconnect`.
    quic.session
        .close(wtransport::VarInt::from_u32(4000), b"bye");
    let event = disconnect_event(&backend, &quic_id).await;
    assert_eq!(
        status_and_reason(&event),
        (4000, "client closed: bye".into())
    );
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn malformed_frames_close_the_session_with_a_reason() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config(&backend, "")).await;
    let mut bystander = WtClient::connect(&gateway, "").await.unwrap();
    let cases: [(Vec<u8>, u64, &str); 3] = [
        (frame(7, b"x"), 1002, "unknown WebTransport frame kind"),
        (frame(1, &[0xff, 0xfe]), 1007, "not valid UTF-8"),
        (vec![1, 0x7f, 0, 0, 0], 1009, "exceeds max_message_bytes"),
    ];
    for (bytes, code, reason) in cases {
        backend.clear();
        let mut client = WtClient::connect(&gateway, "").await.unwrap();
        let id = connection_id(&backend.wait_for("/connect-log", |_| true).await);
        client.send_raw(&bytes).await;
        let (closed_code, closed_reason) = client.closed().await;
        assert_eq!(closed_code, code, "{closed_reason}");
        assert!(closed_reason.contains(reason), "{closed_reason}");
        let event = disconnect_event(&backend, &id).await;
        let (reported, description) = status_and_reason(&event);
        assert_eq!(reported, code);
        assert!(description.contains(reason), "{description}");
    }
    // Nothing else was hurt.
    bystander.send_text("still here").await;
    assert_eq!(bystander.next_text().await, "still here");
}

#[tokio::test]
async fn sessions_the_gateway_refuses_are_refused_before_any_stream() {
    let backend = Backend::start().await;
    let config = format!(
        r#"
[server.webtransport]
listen = "127.0.0.1:0"
[routes."$connect"]
integration = {{ type = "http", url = "{}/status/401" }}
"#,
        backend.url
    );
    let gateway = TestGateway::start(&config).await;
    let refused = WtClient::connect(&gateway, "").await;
    assert!(matches!(refused, Err(ConnectingError::SessionRejected)));
    let document = discovery(&gateway).await;
    let url = document["url"].as_str().unwrap().replace("/dev", "/prod");
    let wrong_path = WtClient::connect_to(&url, &document, "").await;
    assert!(matches!(wrong_path, Err(ConnectingError::SessionRejected)));
    let metrics = gateway.metrics().await;
    for result in ["rejected", "not_found"] {
        let name = format!(
            "switchboard_connections_total{{result=\"{result}\",transport=\"webtransport\"}}"
        );
        assert_eq!(metric_value(&metrics, &name), 1.0, "{name}");
    }
    assert!(backend.events("/disconnect").is_empty());
}

#[tokio::test]
async fn a_client_that_vanishes_is_reported_once_when_quic_gives_up() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config(&backend, "quic_idle_timeout_secs = 1")).await;
    let relay = UdpRelay::start(gateway.wt_addr.unwrap()).await;
    let document = discovery(&gateway).await;
    let url = format!("https://{}/dev", relay.address);
    let mut client = WtClient::connect_to(&url, &document, "").await.unwrap();
    client.send_json(json!({"action": "whoami"})).await;
    let id = client.next_json().await["connectionId"]
        .as_str()
        .unwrap()
        .to_owned();
    // Keep-alives hold an idle session open well past the idle timeout.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(backend.events("/disconnect").is_empty());
    client.send_text("still alive").await;
    assert_eq!(client.next_text().await, "still alive");

    relay.cut();
    let event = disconnect_event(&backend, &id).await;
    assert_eq!(status_and_reason(&event), (1006, "connection lost".into()));
    let gone = post_body(gateway.api_url(&format!("/@connections/{id}")), "late").await;
    assert_eq!(gone.status(), 410);
}

/// A UDP relay between one client and the gateway that can go silent at once, as a
/// client's network does when it vanishes (no close, no further packets).
struct UdpRelay {
    address: SocketAddr,
    cut: Arc<std::sync::atomic::AtomicBool>,
}

impl UdpRelay {
    async fn start(server: SocketAddr) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::net::UdpSocket;
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        back.connect(server).await.unwrap();
        let address = front.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let client = Arc::new(std::sync::Mutex::new(None));
        let (up_front, up_back, up_cut, up_client) =
            (front.clone(), back.clone(), cut.clone(), client.clone());
        tokio::spawn(async move {
            let mut buffer = vec![0; 65_536];
            while let Ok((n, from)) = up_front.recv_from(&mut buffer).await {
                *up_client.lock().unwrap() = Some(from);
                if !up_cut.load(Ordering::Relaxed) {
                    let _ = up_back.send(&buffer[..n]).await;
                }
            }
        });
        let down_cut = cut.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0; 65_536];
            while let Ok(n) = back.recv(&mut buffer).await {
                let to = *client.lock().unwrap();
                if let (Some(to), false) = (to, down_cut.load(Ordering::Relaxed)) {
                    let _ = front.send_to(&buffer[..n], to).await;
                }
            }
        });
        Self { address, cut }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[tokio::test]
async fn a_session_that_stops_reading_is_cut_as_a_slow_consumer() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&format!(
        "{}\n[limits]\noutbound_queue_bytes = 65536\n",
        config(&backend, "")
    ))
    .await;
    // Connected, then never read from: QUIC flow control and the send window fill, then
    // the outbound queue.
    let stalled = WtClient::connect(&gateway, "").await.unwrap();
    let id = connection_id(&backend.wait_for("/connect-log", |_| true).await);
    let mut reader = WtClient::connect(&gateway, "").await.unwrap();
    let chunk = "x".repeat(30_000);
    let mut refused = false;
    for _ in 0..1000 {
        let status = post_body(
            gateway.api_url(&format!("/@connections/{id}")),
            chunk.clone(),
        )
        .await
        .status();
        if status == 410 {
            refused = true;
            break;
        }
        assert_eq!(status, 200);
    }
    assert!(refused, "the stalled session was never cut");
    let event = disconnect_event(&backend, &id).await;
    assert_eq!(status_and_reason(&event), (1008, "slow consumer".into()));
    drop(stalled);
    // The gateway and its other sessions are fine.
    reader.send_text("after the cut").await;
    assert_eq!(reader.next_text().await, "after the cut");
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric_value(&metrics, "switchboard_slow_consumer_disconnects_total"),
        1.0
    );
}

#[tokio::test]
async fn the_admission_gate_limits_sessions_per_address() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&format!(
        "{}\n[limits]\nmax_connections_per_ip = 1\n",
        config(&backend, "")
    ))
    .await;
    let mut first = WtClient::connect(&gateway, "").await.unwrap();
    let second = WtClient::connect(&gateway, "").await;
    assert!(matches!(second, Err(ConnectingError::SessionRejected)));
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "switchboard_connections_total{result=\"ip_limit\",transport=\"webtransport\"}"
        ),
        1.0
    );
    // The first is untouched; once it leaves, its place is free again.
    first.send_text("still here").await;
    assert_eq!(first.next_text().await, "still here");
    first.session.close(wtransport::VarInt::from_u32(1000), b"");
    drop(first);
    let id = connection_id(&backend.wait_for("/connect-log", |_| true).await);
    disconnect_event(&backend, &id).await;
    WtClient::connect(&gateway, "").await.unwrap();
}

#[tokio::test]
async fn the_authorizer_runs_on_the_session_request() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(
        &backend,
        r#"
[server.webtransport]
listen = "127.0.0.1:0"
[authorizer]
type = "api_key"
token = "query:key"
keys = ["first", "second"]
"#,
    ))
    .await;
    let missing = WtClient::connect(&gateway, "").await;
    assert!(matches!(missing, Err(ConnectingError::SessionRejected)));
    let wrong = WtClient::connect(&gateway, "?key=guess").await;
    assert!(matches!(wrong, Err(ConnectingError::SessionRejected)));
    assert!(backend.events("/connect-log").is_empty(), "no backend call");
    let _client = WtClient::connect(&gateway, "?key=second").await.unwrap();
    let connect = backend.wait_for("/connect-log", |_| true).await;
    assert!(
        connect["requestContext"]["authorizer"].is_object(),
        "{connect}"
    );
    let metrics = gateway.metrics().await;
    for (result, count) in [("unauthorized", 1.0), ("forbidden", 1.0)] {
        let name = format!(
            "switchboard_connections_total{{result=\"{result}\",transport=\"webtransport\"}}"
        );
        assert_eq!(metric_value(&metrics, &name), count, "{name}");
    }
}

#[tokio::test]
async fn unreliable_broadcasts_reach_sessions_that_asked_as_datagrams() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config(&backend, "")).await;
    let mut datagrams = WtClient::connect(&gateway, "?datagrams=1").await.unwrap();
    let mut stream_only = WtClient::connect(&gateway, "").await.unwrap();
    let mut ws = gateway.connect().await;
    let join = json!({"action": "join", "room": "ticker"});
    datagrams.send_json(join.clone()).await;
    stream_only.send_json(join.clone()).await;
    send_text(&mut ws, &join.to_string()).await;
    for client in [&mut datagrams, &mut stream_only] {
        client.send_json(json!({"action": "whoami"})).await;
        client.next_json().await;
    }
    send_text(&mut ws, &json!({"action": "whoami"}).to_string()).await;
    next_json(&mut ws).await;

    let broadcast = |query: &str, body: String| {
        post_body(gateway.api_url(&format!("/@rooms/ticker{query}")), body)
    };
    let answer: Value = broadcast("?unreliable=1", "price 101".into())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["delivered"], 3);
    assert_eq!(datagrams.next_datagram().await, b"\x01price 101");
    assert_eq!(stream_only.next_text().await, "price 101");
    assert_eq!(next_text(&mut ws).await, "price 101");

    // Too big for a datagram, or not marked unreliable: the stream, in order.
    let big = "x".repeat(4000);
    broadcast("?unreliable=true", big.clone()).await;
    broadcast("", "reliable".into()).await;
    assert_eq!(datagrams.next_text().await, big);
    assert_eq!(datagrams.next_text().await, "reliable");

    let refused = broadcast("?unreliable=maybe", "x".into()).await;
    assert_eq!(refused.status(), 400);
}

#[tokio::test]
async fn an_unreliable_broadcast_keeps_its_mark_across_cluster_nodes() {
    let Some(binary) = crate::nats::binary() else {
        return;
    };
    let server = crate::nats::NatsServer::start(&binary);
    let backend = Backend::start().await;
    let webtransport = "[server.webtransport]\nlisten = \"127.0.0.1:0\"\n";
    let (nodes, _files) =
        crate::cluster::start_nodes(&[server.url()], &backend, webtransport).await;
    // A session on node 2 that takes datagrams; the broadcast goes through node 1.
    let document = discovery_at(&nodes[1].api_url).await;
    let url = document["url"].as_str().unwrap();
    let mut client = WtClient::connect_to(url, &document, "?datagrams=1")
        .await
        .unwrap();
    client
        .send_json(json!({"action": "join", "room": "ticker"}))
        .await;
    crate::cluster::wait_for_members(&nodes[0], "ticker", 1).await;
    let answer: Value = post_for_json(
        format!("{}/@rooms/ticker?unreliable=1", nodes[0].api_url),
        "price 102",
    )
    .await;
    assert_eq!(answer["delivered"], 1);
    assert_eq!(client.next_datagram().await, b"\x01price 102");
}

/// `config` with `[api] resume = true`.
fn resumable_config(backend: &Backend, webtransport: &str) -> String {
    config(backend, webtransport).replace("[api]\n", "[api]\nresume = true\n")
}

async fn push(gateway: &TestGateway, id: &str, body: &str) {
    let url = gateway.api_url(&format!("/@connections/{id}"));
    assert_eq!(post_body(url, body.to_owned()).await.status(), 200);
}

#[tokio::test]
async fn a_session_resumes_over_webtransport_with_what_it_missed() {
    let backend = Backend::start().await;
    let gateway =
        TestGateway::start(&resumable_config(&backend, "quic_idle_timeout_secs = 1")).await;
    // Through a relay that can go silent: the session is lost, not closed.
    let relay = UdpRelay::start(gateway.wt_addr.unwrap()).await;
    let document = discovery(&gateway).await;
    let url = format!("https://{}/dev", relay.address);
    let mut client = WtClient::connect_to(&url, &document, "").await.unwrap();
    let welcome = client.next_json().await;
    assert_eq!(welcome["type"], "welcome");
    let id = welcome["connectionId"].as_str().unwrap().to_owned();
    let token = welcome["resumeToken"].as_str().unwrap().to_owned();
    push(&gateway, &id, "m1").await;
    assert_eq!(client.next_text().await, "m1");
    relay.cut();
    push(&gateway, &id, "m2").await;
    // QUIC gives up on the silent client; the connection parks instead of ending.
    gateway.wait_for_parked(1.0).await;
    push(&gateway, &id, "m3").await;
    let query = format!("?resume={token}&received=1");
    let mut resumed = WtClient::connect(&gateway, &query).await.unwrap();
    let first = resumed.next_json().await;
    assert_eq!(first["type"], "resumed", "{first}");
    assert_eq!(first["connectionId"], id.as_str());
    assert_eq!(first["replayed"], 2);
    assert_eq!(resumed.next_text().await, "m2");
    assert_eq!(resumed.next_text().await, "m3");
    // Live again, frames both ways.
    resumed.send_text("echo me").await;
    assert_eq!(resumed.next_text().await, "echo me");
    assert!(backend.events("/disconnect").is_empty(), "no $disconnect");
    // A WebTransport session does not resume a WebSocket connection's token.
    let (_ws, _, ws_token) = open_resumable(&gateway.ws_url()).await;
    let mut other = WtClient::connect(&gateway, &format!("?resume={ws_token}&received=0"))
        .await
        .unwrap();
    assert_eq!(other.next_json().await["reason"], "unknown");
    gateway.stop().await;
}

#[tokio::test]
async fn a_webtransport_resume_takes_over_a_session_that_still_looks_alive() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&resumable_config(&backend, "")).await;
    let mut old = WtClient::connect(&gateway, "").await.unwrap();
    let welcome = old.next_json().await;
    let id = welcome["connectionId"].as_str().unwrap().to_owned();
    let mut token = welcome["resumeToken"].as_str().unwrap().to_owned();
    for n in 1..=3 {
        push(&gateway, &id, &format!("m{n}")).await;
    }
    assert_eq!(old.next_text().await, "m1");
    // Several tries land on either shard; each one takes over from the last.
    let mut received = 1;
    for round in 0..4 {
        let query = format!("?resume={token}&received={received}");
        let mut new = WtClient::connect(&gateway, &query).await.unwrap();
        let first = new.next_json().await;
        assert_eq!(first["type"], "resumed", "round {round}: {first}");
        token = first["resumeToken"].as_str().unwrap().to_owned();
        assert_eq!(new.next_text().await, format!("m{}", received + 1));
        received += 1;
        push(&gateway, &id, &format!("m{}", received + 2)).await;
        old = new;
    }
    while received < 7 {
        received += 1;
        assert_eq!(old.next_text().await, format!("m{received}"));
    }
    assert!(backend.events("/disconnect").is_empty());
    gateway.stop().await;
}

/// The certificate hash a discovery document pins, as a WebTransport client takes it.
fn pinned_hash(document: &Value) -> wtransport::tls::Sha256Digest {
    let value = document["serverCertificateHashes"][0]["value"]
        .as_str()
        .unwrap();
    let hash = base64::engine::general_purpose::STANDARD
        .decode(value)
        .unwrap();
    wtransport::tls::Sha256Digest::new(hash.try_into().unwrap())
}

/// The QUIC client config a browser would use for the gateway's pinned certificate.
async fn pinned_quic_config(gateway: &TestGateway) -> wtransport::quinn::ClientConfig {
    let document = discovery(gateway).await;
    ClientConfig::builder()
        .with_bind_default()
        .with_server_certificate_hashes([pinned_hash(&document)])
        .build()
        .quic_config()
        .clone()
}

#[tokio::test]
async fn handshakes_that_never_ask_for_a_session_cannot_lock_others_out() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config(&backend, "max_handshakes_per_ip = 4")).await;
    let wt_addr = gateway.wt_addr.unwrap();
    let quic = pinned_quic_config(&gateway).await;
    // QUIC and TLS complete, then silence: no HTTP/3 CONNECT ever comes. Past 256
    // handshakes in progress every client must prove its address (a Retry, which quinn
    // follows), and a proven address holds at most 4 at once.
    // Eight at a time: the burst must outrun the gateway's handshake timeout, which frees
    // silent handshakes' places, on a loaded machine too.
    let endpoint = wtransport::quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let attempts = (0..(256 + 4 + 8)).map(|_| {
        endpoint
            .connect_with(quic.clone(), wt_addr, "localhost")
            .unwrap()
    });
    let outcomes: Vec<_> = futures_util::stream::iter(attempts)
        .buffer_unordered(8)
        .collect()
        .await;
    let (silent, refused): (Vec<_>, Vec<_>) = outcomes.into_iter().partition(Result::is_ok);
    assert!(
        !refused.is_empty(),
        "one address's handshakes are bounded ({} held)",
        silent.len()
    );
    assert!(silent.len() <= 256 + 4, "{} held", silent.len());
    // Another address is not held back by them.
    let document = discovery(&gateway).await;
    let other = ClientConfig::builder()
        .with_bind_address("127.0.0.2:0".parse().unwrap())
        .with_server_certificate_hashes([pinned_hash(&document)])
        .build();
    let other = Endpoint::client(other).unwrap();
    let url = document["url"].as_str().unwrap();
    let session = other.connect(url).await.expect("another address connects");
    drop(session);
    let metrics = gateway.metrics().await;
    let errors: Vec<String> = (refused.into_iter())
        .filter_map(|outcome| outcome.err().map(|error| error.to_string()))
        .collect();
    assert!(
        metric_value(
            &metrics,
            "switchboard_connections_total{result=\"ip_limit\",transport=\"webtransport\"}"
        ) >= 1.0,
        "refused by the per-address limit, not otherwise: {errors:?}"
    );
    drop(silent);
    gateway.stop().await;
}
