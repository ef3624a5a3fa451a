//! Shared setup for the gateway's integration tests: the real gateway on port 0 with sled
//! in a temp dir, a real HTTP backend (axum) that records every event it receives, real
//! WebSocket clients, and a raw-socket client for frames no well-behaved library sends.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard::{Listeners, RawConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(10);

/// A gateway running in this process.
pub(crate) struct TestGateway {
    pub(crate) ws_addr: SocketAddr,
    pub(crate) api_addr: SocketAddr,
    /// The WebTransport (UDP) address, with `[server.webtransport]`.
    pub(crate) wt_addr: Option<SocketAddr>,
    pub(crate) stage: String,
    shutdown: CancellationToken,
    served: Option<tokio::task::JoinHandle<Result<(), switchboard::ServeError>>>,
    /// Keeps the data dir alive as long as the gateway (and for a restart on it).
    pub(crate) data_dir: Arc<tempfile::TempDir>,
}

impl TestGateway {
    /// Starts a gateway with `config` (TOML) on ephemeral ports and 2 shards.
    pub(crate) async fn start(config: &str) -> Self {
        Self::start_in(config, Arc::new(tempfile::tempdir().unwrap())).await
    }

    /// Starts a gateway on an existing data dir.
    pub(crate) async fn start_in(config: &str, data_dir: Arc<tempfile::TempDir>) -> Self {
        let mut raw = RawConfig::parse(config).expect("test config parses");
        raw.server.listen = "127.0.0.1:0".into();
        raw.management.listen = "127.0.0.1:0".into();
        if let Some(webtransport) = &mut raw.server.webtransport {
            webtransport.listen = "127.0.0.1:0".into();
        }
        if raw.server.shards == 0 {
            raw.server.shards = 2;
        }
        raw.server.data_dir = data_dir.path().to_path_buf();
        let config = raw.validate().expect("test config is valid");
        let listeners = Listeners::bind(&config).unwrap();
        let shutdown = CancellationToken::new();
        let ws_addr = listeners.gateway_addr();
        let api_addr = listeners.management_addr();
        let wt_addr = listeners.webtransport_addr();
        let stage = config.api.stage.clone();
        let served = tokio::spawn(switchboard::serve(config, listeners, shutdown.clone()));
        Self {
            ws_addr,
            api_addr,
            wt_addr,
            stage,
            shutdown,
            served: Some(served),
            data_dir,
        }
    }

    pub(crate) fn ws_url(&self) -> String {
        format!("ws://{}/{}", self.ws_addr, self.stage)
    }

    pub(crate) fn api_url(&self, path: &str) -> String {
        format!("http://{}/{}{}", self.api_addr, self.stage, path)
    }

    pub(crate) async fn connect(&self) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(self.ws_url())
            .await
            .unwrap();
        ws
    }

    /// Connects and learns the connectionId from the echo/`whoami` route's answer.
    pub(crate) async fn connect_with_id(&self, backend: &Backend) -> (Ws, String) {
        let ws = self.connect().await;
        let event = backend.wait_for("/connect-log", |_| true).await;
        (ws, connection_id(&event))
    }

    /// The Prometheus exposition from `/metrics`.
    pub(crate) async fn metrics(&self) -> String {
        http()
            .get(format!("http://{}/metrics", self.api_addr))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits until the gateway holds `count` parked (resumable, socket gone) connections.
    pub(crate) async fn wait_for_parked(&self, count: f64) {
        for _ in 0..200 {
            let parked = metric_value(&self.metrics().await, "switchboard_connections_parked");
            if parked == count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("never {count} parked connections");
    }

    /// Stops the gateway gracefully and waits for it.
    pub(crate) async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(served) = self.served.take() {
            tokio::time::timeout(Duration::from_secs(15), served)
                .await
                .expect("gateway stops within 15 s")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub(crate) fn connection_id(event: &Value) -> String {
    event["requestContext"]["connectionId"]
        .as_str()
        .expect("event has a connectionId")
        .to_owned()
}

/// A real HTTP backend that records every event it gets, by path.
#[derive(Clone)]
pub(crate) struct Backend {
    pub(crate) url: String,
    /// Every request: its path, its JSON body, and when it arrived.
    events: Arc<Mutex<Vec<(String, Value, std::time::Instant)>>>,
    arrived: Arc<Notify>,
}

impl Backend {
    /// The same backend, reached at `url` (through a relay).
    pub(crate) fn reached_at(&self, url: String) -> Self {
        Self {
            url,
            ..self.clone()
        }
    }

    /// Paths:
    /// * `/ok`, `/connect-log`, `/disconnect`: 200, empty body;
    /// * `/reply`: a Lambda-proxy answer whose body is `reply:` + the event's body;
    /// * `/status/{code}`: a Lambda-proxy answer with that statusCode;
    /// * `/http-status/{code}`: a plain HTTP answer with that status;
    /// * `/protocol`: accepts and picks the sub-protocol `chat`;
    /// * `/fail-first/{n}`: 503 for the first n requests, then 200;
    /// * `/flaky`: 503 for every third request;
    /// * `/slow`: answers after 3 s;
    /// * `/authorize`: an IAM policy allowing `Bearer good`, denying `Bearer bad`, else 401.
    pub(crate) async fn start() -> Self {
        let backend = Self {
            url: String::new(),
            events: Arc::default(),
            arrived: Arc::default(),
        };
        let app = Router::new()
            .route("/{*path}", axum::routing::post(record))
            .with_state(backend.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, ..backend }
    }

    /// Waits for an event on `path` that satisfies `predicate`.
    pub(crate) async fn wait_for(&self, path: &str, predicate: impl Fn(&Value) -> bool) -> Value {
        let found = tokio::time::timeout(WAIT, async {
            loop {
                let arrived = self.arrived.notified();
                if let Some(event) = self.find(path, &predicate) {
                    return event;
                }
                arrived.await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no matching event on {path} within {WAIT:?}"))
    }

    fn find(&self, path: &str, predicate: &impl Fn(&Value) -> bool) -> Option<Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .find(|(p, e, _)| p == path && predicate(e))
            .map(|(_, e, _)| e.clone())
    }

    /// The connectionIds of the first `count` `$connect` events on `/connect-log`, waiting
    /// (bounded) until that many arrived.
    pub(crate) async fn connected_ids(&self, count: usize) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.events("/connect-log").len() < count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{count} connects within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.events("/connect-log")
            .iter()
            .map(connection_id)
            .collect()
    }

    /// Forgets every event received so far.
    pub(crate) fn clear(&self) {
        self.events.lock().unwrap().clear();
    }

    /// Every event received on `path` so far.
    pub(crate) fn events(&self, path: &str) -> Vec<Value> {
        self.timed_events(path)
            .into_iter()
            .map(|(e, _)| e)
            .collect()
    }

    /// Every event received on `path` so far, with when it arrived.
    pub(crate) fn timed_events(&self, path: &str) -> Vec<(Value, std::time::Instant)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, e, at)| (e.clone(), *at))
            .collect()
    }
}

async fn record(
    State(backend): State<Backend>,
    Path(path): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = format!("/{path}");
    backend
        .events
        .lock()
        .unwrap()
        .push((path.clone(), event.clone(), std::time::Instant::now()));
    backend.arrived.notify_waiters();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["reply"] => {
            let body = format!("reply:{}", event["body"].as_str().unwrap_or_default());
            axum::Json(json!({"statusCode": 200, "body": body})).into_response()
        }
        ["status", code] => {
            let code: u16 = code.parse().unwrap();
            axum::Json(json!({"statusCode": code, "body": "denied by backend"})).into_response()
        }
        ["http-status", code] => {
            let code = StatusCode::from_u16(code.parse().unwrap()).unwrap();
            (code, "plain failure").into_response()
        }
        ["protocol"] => axum::Json(json!({
            "statusCode": 200,
            "headers": {"Sec-WebSocket-Protocol": "chat"}
        }))
        .into_response(),
        ["slow-resumed"] => {
            // A `$connect` backend that takes a second over resumes.
            if event["requestContext"]["resumed"] == true {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            StatusCode::OK.into_response()
        }
        ["refuse-resumed"] => {
            // A `$connect` backend that lets new connections in and refuses resumes.
            let code = match event["requestContext"]["resumed"] == true {
                true => 403,
                false => 200,
            };
            axum::Json(json!({"statusCode": code})).into_response()
        }
        ["fail-first", count] => {
            // Fails the first `count` requests on this path, then succeeds.
            let seen = backend.events(&path).len();
            if seen <= count.parse::<usize>().unwrap() {
                StatusCode::SERVICE_UNAVAILABLE.into_response()
            } else {
                StatusCode::OK.into_response()
            }
        }
        ["authorize"] => {
            // A Lambda REQUEST authorizer: an IAM policy from the Authorization header.
            let authorization = event["headers"].as_object().and_then(|headers| {
                headers
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case("authorization"))
                    .and_then(|(_, value)| value.as_str())
            });
            let effect = match authorization {
                Some("Bearer good") => "Allow",
                Some("Bearer bad") => "Deny",
                _ => return StatusCode::UNAUTHORIZED.into_response(),
            };
            axum::Json(json!({
                "principalId": "carol",
                "policyDocument": {"Version": "2012-10-17", "Statement": [
                    {"Action": "execute-api:Invoke", "Effect": effect, "Resource": event["methodArn"]}
                ]},
                "context": {"tier": "pro"}
            }))
            .into_response()
        }
        ["flaky"] => {
            // Every third request fails: a backend that fails now and then.
            if backend.events(&path).len() % 3 == 0 {
                StatusCode::SERVICE_UNAVAILABLE.into_response()
            } else {
                StatusCode::OK.into_response()
            }
        }
        ["slow"] => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            StatusCode::OK.into_response()
        }
        _ => StatusCode::OK.into_response(),
    }
}

/// Whether python3 can import `module`.
pub(crate) fn python_has(module: &str) -> bool {
    std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success())
}

/// A URL on which nothing listens.
pub(crate) async fn dead_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/gone")
}

/// Reads the next data or close message, failing after 10 s.
pub(crate) async fn next_message(ws: &mut Ws) -> Message {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message within 10 s")
            .expect("stream not ended")
            .expect("no protocol error");
        if !matches!(message, Message::Ping(_) | Message::Pong(_)) {
            return message;
        }
    }
}

pub(crate) async fn next_text(ws: &mut Ws) -> String {
    match next_message(ws).await {
        Message::Text(text) => text.to_string(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

pub(crate) async fn next_json(ws: &mut Ws) -> Value {
    serde_json::from_str(&next_text(ws).await).unwrap()
}

/// Opens `url` and reads the first frame (with resume on: the welcome or resumed frame).
pub(crate) async fn open_and_read_first(url: &str) -> (Ws, Value) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let first = next_json(&mut ws).await;
    (ws, first)
}

/// Opens a new resumable connection to `url`: the socket, and its connectionId and resume
/// token from the welcome frame.
pub(crate) async fn open_resumable(url: &str) -> (Ws, String, String) {
    let (ws, welcome) = open_and_read_first(url).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let id = welcome["connectionId"].as_str().unwrap().to_owned();
    let token = welcome["resumeToken"].as_str().unwrap().to_owned();
    (ws, id, token)
}

/// Waits for the server's close frame and returns its code.
pub(crate) async fn close_code(ws: &mut Ws) -> u16 {
    match next_message(ws).await {
        Message::Close(Some(frame)) => frame.code.into(),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

pub(crate) async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
}

/// A management API client.
pub(crate) fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// `POST url` with `body`.
pub(crate) async fn post_body(url: String, body: impl Into<reqwest::Body>) -> reqwest::Response {
    http().post(url).body(body).send().await.unwrap()
}

/// `POST url` with `body`, answered with JSON.
/// A GET's JSON body (`null` if there is none, or no answer).
pub(crate) async fn get_json(url: &str) -> Value {
    match http().get(url).send().await {
        Ok(response) => response.json().await.unwrap_or_default(),
        Err(_) => Value::Null,
    }
}

pub(crate) async fn post_for_json(url: String, body: impl Into<reqwest::Body>) -> Value {
    post_body(url, body).await.json().await.unwrap()
}

/// A bulk send through the management API at `api`: `data` to `ids`; its JSON answer.
pub(crate) async fn bulk_send(api: &str, ids: &[String], data: &str) -> Value {
    http()
        .post(format!("{api}/@connections"))
        .json(&json!({"connectionIds": ids, "data": data}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Opens WebSocket connections to `url` until one is refused (at most `at_most`); returns
/// those opened, and the refusal's status and body.
pub(crate) async fn connect_until_refused(url: &str, at_most: usize) -> (Vec<Ws>, u16, String) {
    let mut opened = Vec::new();
    loop {
        assert!(
            opened.len() < at_most,
            "{at_most} connections opened, none refused"
        );
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => opened.push(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let body = response.body().clone().unwrap_or_default();
                let body = String::from_utf8_lossy(&body).into_owned();
                return (opened, response.status().as_u16(), body);
            }
            Err(other) => panic!("handshake failed without an HTTP status: {other}"),
        }
    }
}

/// A WebSocket client on a bare socket, for frames a library would refuse to send.
pub(crate) struct RawClient {
    pub(crate) stream: TcpStream,
}

impl RawClient {
    pub(crate) async fn connect(gateway: &TestGateway) -> Self {
        let mut stream = TcpStream::connect(gateway.ws_addr).await.unwrap();
        let request = format!(
            "GET /{} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            gateway.stage
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let head = read_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        Self { stream }
    }

    /// Sends one masked frame.
    pub(crate) async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let frame = switchboard::frame::encode_masked(fin, opcode, payload, [1, 2, 3, 4]);
        // The server may close mid-write on an oversize frame; that is the point.
        let _ = self.stream.write_all(&frame).await;
    }

    /// Reads frames until a close frame; returns its code.
    pub(crate) async fn close_code(&mut self) -> u16 {
        let mut buffer = Vec::new();
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(code) = find_close(&buffer) {
                    return code;
                }
                let mut chunk = [0u8; 4096];
                let n = self.stream.read(&mut chunk).await.unwrap_or(0);
                assert!(n > 0, "connection ended without a close frame");
                buffer.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("a close frame within 10 s")
    }
}

/// Scans unmasked server frames for a close frame.
fn find_close(mut buffer: &[u8]) -> Option<u16> {
    while buffer.len() >= 2 {
        let opcode = buffer[0] & 0x0F;
        let (len, header) = match buffer[1] & 0x7F {
            126 if buffer.len() >= 4 => {
                (usize::from(u16::from_be_bytes([buffer[2], buffer[3]])), 4)
            }
            127 if buffer.len() >= 10 => (
                u64::from_be_bytes(buffer[2..10].try_into().ok()?) as usize,
                10,
            ),
            126 | 127 => return None,
            small => (usize::from(small), 2),
        };
        if buffer.len() < header + len {
            return None;
        }
        if opcode == 0x8 {
            return Some(u16::from_be_bytes([buffer[header], buffer[header + 1]]));
        }
        buffer = &buffer[header + len..];
    }
    None
}

/// Reads an HTTP response head (status line and headers).
/// Connects to `addr` from the loopback address `source` (each 127.0.0.x is a client
/// address of its own for the per-address limits).
pub(crate) async fn connect_from(source: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(std::net::IpAddr::from(source), 0))?;
    socket.connect(addr).await
}

pub(crate) async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .expect("a response within 10 s")
            .unwrap();
        if n == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The HTTP status a handshake request (a URL, or a request with headers) is answered with.
pub(crate) async fn request_status(
    request: impl tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
) -> u16 {
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("handshake failed without an HTTP status: {other}"),
    }
}

/// A config with every route pointed at `backend`, plus `extra` TOML.
pub(crate) fn config_with(backend: &Backend, extra: &str) -> String {
    format!(
        r#"
[routes."$connect"]
integration = {{ type = "http", url = "{url}/connect-log" }}
[routes."$disconnect"]
integration = {{ type = "http", url = "{url}/disconnect" }}
{extra}
"#,
        url = backend.url
    )
}

/// The value of metric `name` in a Prometheus exposition, summed over its label sets;
/// `name` may include labels (`x_total{result="ok"}`) to pick one.
pub(crate) fn metric_value(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(key, _)| {
            *key == name || (key.starts_with(name) && key[name.len()..].starts_with('{'))
        })
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .sum()
}

/// Waits for `id`'s `$disconnect`, then makes sure no second one follows.
pub(crate) async fn disconnect_event(backend: &Backend, id: &str) -> serde_json::Value {
    let event = backend
        .wait_for("/disconnect", |e| connection_id(e) == id)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let count = backend
        .events("/disconnect")
        .iter()
        .filter(|e| connection_id(e) == id)
        .count();
    assert_eq!(count, 1, "$disconnect fires exactly once");
    assert_eq!(event["requestContext"]["eventType"], "DISCONNECT");
    assert_eq!(event["requestContext"]["routeKey"], "$disconnect");
    event
}

pub(crate) fn status_and_reason(event: &serde_json::Value) -> (u64, String) {
    (
        event["requestContext"]["disconnectStatusCode"]
            .as_u64()
            .unwrap(),
        event["requestContext"]["disconnectReason"]
            .as_str()
            .unwrap()
            .to_owned(),
    )
}
