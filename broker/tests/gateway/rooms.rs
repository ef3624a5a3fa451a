//! Rooms and fan-out: membership through routes and the API, one-call broadcasts, bulk
//! pushes, slow consumers, and every malformed request.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

const ROOM_ROUTES: &str = r#"
[routes.join]
integration = { type = "room_join", room = "$request.body.room" }
[routes.leave]
integration = { type = "room_leave", room = "$request.body.room" }
[routes.publish]
integration = { type = "room_publish", room = "$request.body.room", data = "$request.body.data" }
[routes.shout]
integration = { type = "room_publish", room = "$request.body.room", exclude_sender = true }
[routes."$default"]
integration = { type = "echo" }
"#;

async fn start(extra: &str) -> (TestGateway, Backend) {
    let backend = Backend::start().await;
    let gateway =
        TestGateway::start(&config_with(&backend, &format!("{extra}\n{ROOM_ROUTES}"))).await;
    (gateway, backend)
}

/// Joins `room` through the route and waits until the API lists the member.
async fn join(gateway: &TestGateway, ws: &mut Ws, room: &str, expected_count: usize) {
    send_text(ws, &json!({"action": "join", "room": room}).to_string()).await;
    wait_for_count(gateway, room, expected_count).await;
}

async fn room(gateway: &TestGateway, room: &str) -> Value {
    let response = http()
        .get(gateway.api_url(&format!("/@rooms/{room}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

async fn wait_for_count(gateway: &TestGateway, name: &str, count: usize) {
    for _ in 0..200 {
        if room(gateway, name).await["count"] == count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("room {name} never reached {count} members");
}

/// reqwest is built without its `json` feature; this is the one helper that needs it.
trait JsonBody {
    async fn json_body(self, body: &Value) -> (u16, Value);
}

impl JsonBody for reqwest::RequestBuilder {
    async fn json_body(self, body: &Value) -> (u16, Value) {
        let response = self
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let bytes = response.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

#[tokio::test]
async fn members_joined_by_route_get_publishes_from_clients_and_the_api() {
    let (gateway, backend) = start("").await;
    let (mut alice, alice_id) = gateway.connect_with_id(&backend).await;
    let mut bob = gateway.connect().await;
    join(&gateway, &mut alice, "lobby", 1).await;
    join(&gateway, &mut bob, "lobby", 2).await;

    send_text(
        &mut alice,
        r#"{"action":"publish","room":"lobby","data":"hello all"}"#,
    )
    .await;
    assert_eq!(next_text(&mut alice).await, "hello all");
    assert_eq!(next_text(&mut bob).await, "hello all");

    let shout = r#"{"action":"shout","room":"lobby"}"#;
    send_text(&mut alice, shout).await;
    assert_eq!(
        next_text(&mut bob).await,
        shout,
        "the whole frame by default"
    );

    let response = http()
        .post(gateway.api_url("/@rooms/lobby"))
        .body("from the API")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body, json!({"delivered": 2}));
    assert_eq!(
        next_text(&mut alice).await,
        "from the API",
        "sender excluded from the shout"
    );
    assert_eq!(next_text(&mut bob).await, "from the API");

    let url = gateway.api_url(&format!("/@rooms/lobby?exclude={alice_id}"));
    let response = http().post(&url).body("not alice").send().await.unwrap();
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body, json!({"delivered": 1}));
    assert_eq!(next_text(&mut bob).await, "not alice");

    send_text(&mut alice, r#"{"action":"leave","room":"lobby"}"#).await;
    wait_for_count(&gateway, "lobby", 1).await;
    send_text(&mut alice, "echo check").await;
    assert_eq!(
        next_text(&mut alice).await,
        "echo check",
        "nothing else arrived for alice"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn membership_through_the_api_and_leave_on_disconnect() {
    let (gateway, backend) = start("").await;
    let (mut ws, id) = gateway.connect_with_id(&backend).await;
    let client = http();
    let member_url = gateway.api_url(&format!("/@rooms/ticker:BTC/connections/{id}"));
    assert_eq!(client.put(&member_url).send().await.unwrap().status(), 204);
    assert_eq!(
        client.put(&member_url).send().await.unwrap().status(),
        204,
        "idempotent"
    );
    let listed = room(&gateway, "ticker:BTC").await;
    assert_eq!(
        listed,
        json!({"room": "ticker:BTC", "count": 1, "connectionIds": [id]})
    );

    http()
        .post(gateway.api_url("/@rooms/ticker:BTC"))
        .body("42000")
        .send()
        .await
        .unwrap();
    assert_eq!(next_text(&mut ws).await, "42000");

    assert_eq!(
        client.delete(&member_url).send().await.unwrap().status(),
        204
    );
    assert_eq!(room(&gateway, "ticker:BTC").await["count"], 0);
    assert_eq!(client.put(&member_url).send().await.unwrap().status(), 204);

    ws.close(None).await.unwrap();
    wait_for_count(&gateway, "ticker:BTC", 0).await;
    assert_eq!(client.put(&member_url).send().await.unwrap().status(), 410);
    assert_eq!(
        room(&gateway, "never-used").await["count"],
        0,
        "unknown rooms are empty"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn bulk_push_reports_delivered_and_gone() {
    let (gateway, backend) = start("").await;
    let (mut a, a_id) = gateway.connect_with_id(&backend).await;
    let mut b = gateway.connect().await;
    let b_id = backend
        .wait_for("/connect-log", |e| connection_id(e) != a_id)
        .await;
    let b_id = connection_id(&b_id);
    let (c, c_id) = {
        let ws = gateway.connect().await;
        let event = backend
            .wait_for("/connect-log", |e| {
                ![&a_id, &b_id].contains(&&connection_id(e))
            })
            .await;
        (ws, connection_id(&event))
    };
    drop(c);
    backend
        .wait_for("/disconnect", |e| connection_id(e) == c_id)
        .await;

    let url = gateway.api_url("/@connections");
    let ids = json!([a_id, "not-an-id", b_id, c_id]);
    let (status, body) = http()
        .post(&url)
        .json_body(&json!({"connectionIds": ids, "data": "bulk text"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["delivered"], 2);
    assert_eq!(body["gone"], json!(["not-an-id", c_id]));
    assert_eq!(next_text(&mut a).await, "bulk text");
    assert_eq!(next_text(&mut b).await, "bulk text");

    // An id named twice is sent once; a gone id named twice is reported once.
    let twice = json!([a_id, a_id, c_id, c_id]);
    let (status, body) = http()
        .post(&url)
        .json_body(&json!({"connectionIds": twice, "data": "once"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["delivered"], 1);
    assert_eq!(body["gone"], json!([c_id]));
    assert_eq!(next_text(&mut a).await, "once");

    let binary = json!({"connectionIds": [a_id], "data_base64": "AAEC/w=="});
    let (status, body) = http().post(&url).json_body(&binary).await;
    assert_eq!((status, body["delivered"].clone()), (200, json!(1)));
    assert_eq!(
        next_message(&mut a).await,
        Message::binary(vec![0u8, 1, 2, 255])
    );

    let response = http()
        .post(gateway.api_url("/@rooms/none"))
        .body(vec![0xffu8, 0x00])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "binary room payloads are accepted");
    gateway.stop().await;
}

#[tokio::test]
async fn binary_room_payloads_arrive_as_binary_frames() {
    let (gateway, backend) = start("").await;
    let (mut ws, id) = gateway.connect_with_id(&backend).await;
    let member = gateway.api_url(&format!("/@rooms/bin/connections/{id}"));
    http().put(&member).send().await.unwrap();
    http()
        .post(gateway.api_url("/@rooms/bin"))
        .body(vec![0xffu8, 0xfe, 0x00])
        .send()
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut ws).await,
        Message::binary(vec![0xffu8, 0xfe, 0x00])
    );
    gateway.stop().await;
}

#[tokio::test]
async fn malformed_requests_get_400_with_a_message() {
    let (gateway, _backend) = start("[limits]\nmax_bulk_connection_ids = 3").await;
    let url = gateway.api_url("/@connections");
    let cases = [
        "not json".to_owned(),
        json!({"data": "x"}).to_string(),
        json!({"connectionIds": ["a"]}).to_string(),
        json!({"connectionIds": ["a"], "data": "x", "data_base64": "eA=="}).to_string(),
        json!({"connectionIds": ["a"], "data_base64": "***"}).to_string(),
        json!({"connectionIds": "a", "data": "x"}).to_string(),
        json!({"connectionIds": ["a"], "data": "x", "extra": 1}).to_string(),
    ];
    for body in cases {
        let response = http().post(&url).body(body.clone()).send().await.unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
    let too_many = json!({"connectionIds": ["a", "b", "c", "d"], "data": "x"});
    let (status, error) = http().post(&url).json_body(&too_many).await;
    assert_eq!(status, 413);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("max_bulk_connection_ids")
    );

    let bad_room = gateway.api_url("/@rooms/has%20space");
    let response = http().post(&bad_room).body("x").send().await.unwrap();
    assert_eq!(response.status(), 400);
    let response = http().get(&bad_room).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let bad_exclude = gateway.api_url("/@rooms/ok?exclude=nope");
    assert_eq!(
        http()
            .post(&bad_exclude)
            .body("x")
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    gateway.stop().await;
}

#[tokio::test]
async fn bad_room_names_from_clients_get_an_error_frame() {
    let (gateway, _backend) = start("").await;
    let mut ws = gateway.connect().await;
    let long = "r".repeat(129);
    for frame in [
        json!({"action": "join", "room": "has space"}),
        json!({"action": "join", "room": long}),
        json!({"action": "join"}),
        json!({"action": "publish", "room": "ok"}),
    ] {
        send_text(&mut ws, &frame.to_string()).await;
        let error = next_json(&mut ws).await;
        let message = error["message"].as_str().unwrap();
        assert!(message.starts_with("Bad request"), "{frame}: {message}");
        assert!(error["connectionId"].is_string());
    }
    send_text(&mut ws, "still open").await;
    assert_eq!(next_text(&mut ws).await, "still open");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_post_reaches_a_2000_member_room() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    // Every member connects from 127.0.0.1: lift the per-address limits.
    let (gateway, _backend) =
        start("[limits]\nmax_connections_per_ip = 0\nconnects_per_sec_per_ip = 0").await;
    let mut members = Vec::new();
    for _ in 0..2000 {
        let mut ws = gateway.connect().await;
        send_text(&mut ws, r#"{"action":"join","room":"big"}"#).await;
        members.push(ws);
    }
    wait_for_count(&gateway, "big", 2000).await;
    for seq in 0..3 {
        let response = http()
            .post(gateway.api_url("/@rooms/big"))
            .body(format!("broadcast {seq}"))
            .send()
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(body, json!({"delivered": 2000}));
    }
    for ws in &mut members {
        for seq in 0..3 {
            assert_eq!(
                next_text(ws).await,
                format!("broadcast {seq}"),
                "in order, once"
            );
        }
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_client_is_disconnected_while_others_get_everything() {
    let config = "[limits]\noutbound_queue_frames = 64\noutbound_queue_bytes = 262144";
    let (gateway, backend) = start(config).await;
    let mut readers = Vec::new();
    for _ in 0..2 {
        let mut ws = gateway.connect().await;
        send_text(&mut ws, r#"{"action":"join","room":"firehose"}"#).await;
        readers.push(ws);
    }
    // The stalled client joins, then never reads again.
    let mut stalled = RawClient::connect(&gateway).await;
    let before = backend.events("/connect-log").len();
    assert_eq!(before, 3);
    let stalled_id = connection_id(backend.events("/connect-log").last().unwrap());
    stalled
        .send_frame(true, 0x1, br#"{"action":"join","room":"firehose"}"#)
        .await;
    wait_for_count(&gateway, "firehose", 3).await;

    const MESSAGES: usize = 600;
    let payload = "x".repeat(16 * 1024 - 8);
    let publisher = {
        let url = gateway.api_url("/@rooms/firehose");
        tokio::spawn(async move {
            let client = http();
            for seq in 0..MESSAGES {
                let body = format!("{seq:08}{payload}");
                let response = client.post(&url).body(body).send().await.unwrap();
                assert_eq!(response.status(), 200);
            }
        })
    };
    let mut receivers = Vec::new();
    for mut ws in readers {
        receivers.push(tokio::spawn(async move {
            for seq in 0..MESSAGES {
                let text = match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
                    Ok(Some(Ok(Message::Text(text)))) => text,
                    other => panic!("message {seq}: {other:?}"),
                };
                assert_eq!(&text[..8], format!("{seq:08}"), "every message, in order");
            }
        }));
    }
    publisher.await.unwrap();
    for receiver in receivers {
        receiver.await.unwrap();
    }
    let event = backend
        .wait_for("/disconnect", |e| connection_id(e) == stalled_id)
        .await;
    assert_eq!(event["requestContext"]["disconnectReason"], "slow consumer");
    assert_eq!(event["requestContext"]["disconnectStatusCode"], 1008);
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("switchboard_slow_consumer_disconnects_total 1"),
        "{metrics}"
    );
    let _ = stalled.stream.shutdown().await;
    gateway.stop().await;
}

#[tokio::test]
async fn the_authorizer_decides_which_rooms_a_client_may_join_and_publish_to() {
    let backend = Backend::start().await;
    let config = config_with(
        &backend,
        r#"
[authorizer]
type = "jwt"
token = "query:token"
secret = "room-permissions-test-secret"
[routes.join]
integration = { type = "room_join", room = "$request.body.room", allow = "$context.authorizer.rooms" }
[routes.inbox]
integration = { type = "room_join", room = "user:${context.authorizer.sub}" }
[routes.publish]
integration = { type = "room_publish", room = "$request.body.room", data = "${context.authorizer.sub}: ${request.body.text}", allow = "$context.authorizer.rooms" }
"#,
    );
    let gateway = TestGateway::start(&config).await;
    let token = |sub: &str, rooms: Value| {
        let claims = json!({"sub": sub, "rooms": rooms, "exp": 4_000_000_000u64});
        crate::authorizers::hs256(claims, "room-permissions-test-secret")
    };
    let open = |token: String| {
        let url = format!("{}?token={token}", gateway.ws_url());
        async move { tokio_tungstenite::connect_async(url).await.unwrap().0 }
    };
    let mut alice = open(token("alice", json!(["lobby", "ticker:*"]))).await;
    let mut mallory = open(token("mallory", json!("lobby"))).await;
    // Allowed: a named room and one that matches a pattern.
    join(&gateway, &mut alice, "lobby", 1).await;
    join(&gateway, &mut alice, "ticker:ACME", 1).await;
    join(&gateway, &mut mallory, "lobby", 2).await;
    // Not granted: an error frame, and no membership.
    for room in ["ticker:ACME", "admin"] {
        let frame = json!({"action": "join", "room": room}).to_string();
        send_text(&mut mallory, &frame).await;
        let error = next_json(&mut mallory).await;
        let message = error["message"].as_str().unwrap();
        assert!(message.starts_with("Forbidden"), "{room}: {message}");
    }
    assert_eq!(room(&gateway, "ticker:ACME").await["count"], 1);
    // Publishing is checked the same way, and the sender's identity is stamped by the
    // gateway, not taken from the frame.
    let spoof = json!({"action": "publish", "room": "ticker:ACME", "text": "crash!"});
    send_text(&mut mallory, &spoof.to_string()).await;
    assert!(
        next_json(&mut mallory).await["message"]
            .as_str()
            .unwrap()
            .starts_with("Forbidden")
    );
    let hello = json!({"action": "publish", "room": "lobby", "text": "hi", "sub": "alice"});
    send_text(&mut mallory, &hello.to_string()).await;
    assert_eq!(next_text(&mut alice).await, "mallory: hi");
    // A room named after the principal: each joins only its own.
    send_text(
        &mut mallory,
        &json!({"action": "inbox", "sub": "alice"}).to_string(),
    )
    .await;
    wait_for_count(&gateway, "user:mallory", 1).await;
    assert_eq!(room(&gateway, "user:alice").await["count"], 0);
    gateway.stop().await;
}

#[tokio::test]
async fn presence_lists_members_with_their_users_and_counts_distinct_users() {
    let backend = Backend::start().await;
    let config = config_with(
        &backend,
        r#"
[authorizer]
type = "jwt"
token = "query:token"
secret = "presence-test-secret"
[routes.join]
integration = { type = "room_join", room = "$request.body.room" }
"#,
    );
    let gateway = TestGateway::start(&config).await;
    let open = |sub: &str| {
        let claims = json!({"sub": sub, "exp": 4_000_000_000u64});
        let token = crate::authorizers::hs256(claims, "presence-test-secret");
        let url = format!("{}?token={token}", gateway.ws_url());
        async move { tokio_tungstenite::connect_async(url).await.unwrap().0 }
    };
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut alice_phone = open("alice").await;
    let mut alice_laptop = open("alice").await;
    let mut bob = open("bob").await;
    join(&gateway, &mut alice_phone, "lobby", 1).await;
    join(&gateway, &mut alice_laptop, "lobby", 2).await;
    join(&gateway, &mut bob, "lobby", 3).await;
    let presence = |query: &'static str| {
        let url = gateway.api_url(&format!("/@rooms/lobby/presence{query}"));
        async move {
            let response = http().get(url).send().await.unwrap();
            let status = response.status().as_u16();
            let body = response.bytes().await.unwrap();
            (status, serde_json::from_slice::<Value>(&body).unwrap())
        }
    };
    let (status, full) = presence("").await;
    assert_eq!(status, 200);
    assert_eq!(
        (&full["room"], &full["count"], &full["users"]),
        (&json!("lobby"), &json!(3), &json!(2))
    );
    let members = full["members"].as_array().unwrap();
    let mut users: Vec<&str> = members
        .iter()
        .map(|m| m["user"].as_str().unwrap())
        .collect();
    users.sort();
    assert_eq!(users, ["alice", "alice", "bob"]);
    for member in members {
        assert!(member["connectionId"].as_str().unwrap().len() > 10);
        assert!(member["joinedAt"].as_u64().unwrap() >= before);
    }
    // Only the counts, for a big room.
    let (_, counts) = presence("?members=false").await;
    assert_eq!(counts, json!({"room": "lobby", "count": 3, "users": 2}));
    let (status, refused) = presence("?members=maybe").await;
    assert_eq!(status, 400, "{refused}");
    // A member that disconnects leaves presence.
    bob.close(None).await.unwrap();
    wait_for_count(&gateway, "lobby", 2).await;
    let (_, after) = presence("?members=false").await;
    assert_eq!((&after["count"], &after["users"]), (&json!(2), &json!(1)));
    gateway.stop().await;
}

#[tokio::test]
async fn a_member_asks_who_is_in_its_room_and_a_stranger_may_not() {
    let (gateway, _backend) = start(
        r#"[[rooms.class]]
pattern = "private:*"
presence = false
[routes.presence]
integration = { type = "room_presence", room = "$request.body.room" }"#,
    )
    .await;
    let mut alice = gateway.connect().await;
    let mut bob = gateway.connect().await;
    let mut stranger = gateway.connect().await;
    join(&gateway, &mut alice, "lobby", 1).await;
    join(&gateway, &mut bob, "lobby", 2).await;
    let ask = json!({"action": "presence", "room": "lobby"}).to_string();
    send_text(&mut alice, &ask).await;
    let answer = next_json(&mut alice).await;
    assert_eq!(
        (&answer["room"], &answer["count"], &answer["users"]),
        (&json!("lobby"), &json!(2), &json!(0))
    );
    assert_eq!(answer["members"].as_array().unwrap().len(), 2);
    send_text(&mut stranger, &ask).await;
    let refused = next_json(&mut stranger).await;
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .starts_with("Forbidden"),
        "{refused}"
    );
    // A class with presence off: neither the API nor a member may ask.
    join(&gateway, &mut alice, "private:board", 1).await;
    let off = json!({"action": "presence", "room": "private:board"}).to_string();
    send_text(&mut alice, &off).await;
    let message = next_json(&mut alice).await["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.starts_with("Forbidden: presence is off"),
        "{message}"
    );
    let url = gateway.api_url("/@rooms/private:board/presence");
    let response = http().get(url).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["x-amzn-ErrorType"], "NotFoundException");
    gateway.stop().await;
}
