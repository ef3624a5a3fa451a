//! Room webhooks against a real receiver: occupied, joined, left and vacated events, once
//! each and in order, in signed batches; delivered at least once through a receiver outage
//! and a gateway restart.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use crate::support::*;

pub(crate) const SECRET: &str = "webhook-test-secret-0123456789";

/// Each POST's body and signature header.
pub(crate) type Posts = Arc<Mutex<Vec<(Vec<u8>, String)>>>;

/// A webhook receiver: records each POST's body and signature; answers 503 while down.
#[derive(Clone, Default)]
pub(crate) struct Receiver {
    posts: Posts,
    attempts: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
}

impl Receiver {
    pub(crate) async fn start() -> (Self, String) {
        let receiver = Self::default();
        let app = axum::Router::new()
            .route("/hooks", axum::routing::post(receive))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, url)
    }

    /// Every event received so far, in order, after checking each POST's signature.
    pub(crate) fn events(&self) -> Vec<Value> {
        let posts = self.posts.lock().unwrap();
        let mut events = Vec::new();
        for (body, signature) in posts.iter() {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
            let tag = ring::hmac::sign(&key, body);
            let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(signature, &format!("sha256={hex}"), "signed");
            let post: Value = serde_json::from_slice(body).unwrap();
            assert!(post["time_ms"].as_u64().unwrap() > 1_600_000_000_000);
            let batch = post["events"].as_array().unwrap();
            assert!(!batch.is_empty() && batch.len() <= 100, "{post}");
            events.extend(batch.iter().cloned());
        }
        events
    }

    pub(crate) async fn wait_for_events(&self, count: usize) -> Vec<Value> {
        for _ in 0..500 {
            let events = self.events();
            if events.len() >= count {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{count} webhook events never arrived: {:?}", self.events());
    }
}

async fn receive(
    State(receiver): State<Receiver>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    receiver.attempts.fetch_add(1, Ordering::SeqCst);
    if receiver.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let signature = headers
        .get("x-switchboard-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    receiver
        .posts
        .lock()
        .unwrap()
        .push((body.to_vec(), signature));
    StatusCode::OK
}

fn config(backend: &Backend, url: &str) -> String {
    config_with(
        backend,
        &format!(
            r#"
[webhooks]
url = "{url}"
secret = "{SECRET}"
[routes.join]
integration = {{ type = "room_join", room = "$request.body.room" }}
[routes.leave]
integration = {{ type = "room_leave", room = "$request.body.room" }}
[routes.whoami]
integration = {{ type = "mock", body = "$context.connectionId" }}
response = true
"#
        ),
    )
}

async fn open(gateway: &TestGateway) -> (Ws, String) {
    let mut ws = gateway.connect().await;
    send_text(&mut ws, r#"{"action":"whoami"}"#).await;
    let id = next_text(&mut ws).await;
    (ws, id)
}

/// `(name, connectionId)` of each event, for comparing sequences.
fn names(events: &[Value]) -> Vec<(String, Option<String>)> {
    events
        .iter()
        .map(|e| {
            let id = e["connectionId"].as_str().map(str::to_owned);
            (e["name"].as_str().unwrap().to_owned(), id)
        })
        .collect()
}

#[tokio::test]
async fn room_events_are_posted_once_in_order_in_signed_batches() {
    let backend = Backend::start().await;
    let (receiver, url) = Receiver::start().await;
    let gateway = TestGateway::start(&config(&backend, &url)).await;
    let (mut alice, alice_id) = open(&gateway).await;
    let (mut bob, bob_id) = open(&gateway).await;
    send_text(&mut alice, r#"{"action":"join","room":"lobby"}"#).await;
    receiver.wait_for_events(2).await;
    send_text(&mut bob, r#"{"action":"join","room":"lobby"}"#).await;
    receiver.wait_for_events(3).await;
    send_text(&mut alice, r#"{"action":"leave","room":"lobby"}"#).await;
    receiver.wait_for_events(4).await;
    drop(bob);
    let events = receiver.wait_for_events(6).await;
    let named = |name: &str, id: Option<&String>| (name.to_owned(), id.cloned());
    assert_eq!(
        names(&events),
        vec![
            named("room_occupied", None),
            named("member_joined", Some(&alice_id)),
            named("member_joined", Some(&bob_id)),
            named("member_left", Some(&alice_id)),
            named("member_left", Some(&bob_id)),
            named("room_vacated", None),
        ]
    );
    assert!(events.iter().all(|e| e["room"] == "lobby"));
    assert_eq!(events[1]["user"], Value::Null, "no authorizer: no user");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.events().len(), 6, "each once");
    // Many changes at once go in few POSTs.
    let mut crowd = Vec::new();
    for _ in 0..30 {
        crowd.push(open(&gateway).await.0);
    }
    let posts_before = receiver.posts.lock().unwrap().len();
    for ws in &mut crowd {
        send_text(ws, r#"{"action":"join","room":"crowd"}"#).await;
    }
    let events = receiver.wait_for_events(6 + 31).await;
    let posts = receiver.posts.lock().unwrap().len() - posts_before;
    assert!(posts < 31, "{posts} POSTs for 31 events");
    assert_eq!(
        (&events[6]["name"], &events[6]["room"]),
        (&json!("room_occupied"), &json!("crowd"))
    );
    let ids: std::collections::HashSet<&str> =
        events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), events.len(), "every event has its own id");
    assert!(
        events
            .iter()
            .all(|e| e["time_ms"].as_u64().unwrap() > 1_600_000_000_000)
    );
    gateway.stop().await;
}

#[tokio::test]
async fn events_wait_through_a_receiver_outage_and_a_restart() {
    let backend = Backend::start().await;
    let (receiver, url) = Receiver::start().await;
    receiver.down.store(true, Ordering::SeqCst);
    let config = config(&backend, &url);
    let gateway = TestGateway::start(&config).await;
    let (mut alice, alice_id) = open(&gateway).await;
    send_text(&mut alice, r#"{"action":"join","room":"ops"}"#).await;
    for _ in 0..200 {
        if receiver.attempts.load(Ordering::SeqCst) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        receiver.attempts.load(Ordering::SeqCst) >= 2,
        "retried while down"
    );
    // The gateway stops (Alice is closed: she leaves, the room empties) while the
    // receiver is still down; the next run delivers everything.
    let data_dir = gateway.data_dir.clone();
    gateway.stop().await;
    drop(alice);
    let gateway = TestGateway::start_in(&config, data_dir).await;
    receiver.down.store(false, Ordering::SeqCst);
    let events = receiver.wait_for_events(4).await;
    let mut seen = names(&events);
    seen.dedup();
    let named = |name: &str, id: Option<&String>| (name.to_owned(), id.cloned());
    assert_eq!(
        seen,
        vec![
            named("room_occupied", None),
            named("member_joined", Some(&alice_id)),
            named("member_left", Some(&alice_id)),
            named("room_vacated", None),
        ],
        "at least once, in order"
    );
    gateway.stop().await;
}
