//! Resume: a client whose socket drops comes back with its token and count, and gets the
//! same connectionId, its rooms and every message it missed, in order, once; everything
//! that cannot be resumed is a new connection whose welcome says why, and the backend sees
//! exactly one `$disconnect` per connectionId.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

fn resume_config(backend: &Backend, extra: &str) -> String {
    config_with(
        backend,
        &format!("[api]\nresume = true\nresume_window_secs = 30\n{extra}"),
    )
}

/// Connects and reads the welcome frame: (socket, connectionId, token).
async fn connect_resumable(gateway: &TestGateway) -> (Ws, String, String) {
    open_resumable(&gateway.ws_url()).await
}

/// Opens `?resume=TOKEN&received=N` and reads the first frame.
async fn reconnect(gateway: &TestGateway, token: &str, received: &str) -> (Ws, Value) {
    open_and_read_first(&format!(
        "{}?resume={token}&received={received}",
        gateway.ws_url()
    ))
    .await
}

async fn push(gateway: &TestGateway, id: &str, body: &str) -> u16 {
    let url = gateway.api_url(&format!("/@connections/{id}"));
    post_body(url, body.to_owned()).await.status().as_u16()
}

async fn broadcast(gateway: &TestGateway, room: &str, body: &str) {
    let url = gateway.api_url(&format!("/@rooms/{room}"));
    let status = post_body(url, body.to_owned()).await.status();
    assert!(status.is_success(), "{status}");
}

async fn join(gateway: &TestGateway, room: &str, id: &str) {
    let url = gateway.api_url(&format!("/@rooms/{room}/connections/{id}"));
    let status = http().put(url).send().await.unwrap().status();
    assert_eq!(status, 204);
}

fn disconnects_of(backend: &Backend, id: &str) -> usize {
    backend
        .events("/disconnect")
        .iter()
        .filter(|event| connection_id(event) == id)
        .count()
}

#[tokio::test]
async fn a_dropped_client_resumes_with_every_broadcast_and_push_in_order_once() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&resume_config(&backend, "")).await;
    let (mut ws, id, token) = connect_resumable(&gateway).await;
    join(&gateway, "chat", &id).await;
    // Room broadcasts and direct pushes, interleaved, numbered.
    let message = |n: usize| format!("m{n}");
    let send = |n: usize| {
        let (gateway, id) = (&gateway, &id);
        async move {
            if n.is_multiple_of(2) {
                broadcast(gateway, "chat", &message(n)).await;
            } else {
                assert_eq!(push(gateway, id, &message(n)).await, 200);
            }
        }
    };
    for n in 1..=40 {
        send(n).await;
    }
    // The client reads some, then its socket dies with the rest unread.
    let mut received = 0;
    for n in 1..=25 {
        assert_eq!(next_text(&mut ws).await, message(n));
        received += 1;
    }
    drop(ws);
    gateway.wait_for_parked(1.0).await;
    // Accepted while parked: 200, not 410.
    for n in 41..=80 {
        send(n).await;
    }
    let (mut ws, first) = reconnect(&gateway, &token, &received.to_string()).await;
    assert_eq!(first["type"], "resumed", "{first}");
    assert_eq!(first["connectionId"], id.as_str());
    assert_eq!(first["replayed"], 80 - received);
    for n in received + 1..=80 {
        assert_eq!(
            next_text(&mut ws).await,
            message(n),
            "in order, nothing missing"
        );
    }
    // Live traffic goes on, and its rooms still deliver.
    broadcast(&gateway, "chat", "after").await;
    assert_eq!(next_text(&mut ws).await, "after", "nothing twice");
    gateway.wait_for_parked(0.0).await;
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric_value(&metrics, r#"switchboard_resumes_total{outcome="resumed"}"#),
        1.0
    );
    assert_eq!(
        metric_value(&metrics, "switchboard_resume_replayed_messages_total"),
        55.0
    );
    // The backend never saw the drop.
    assert_eq!(disconnects_of(&backend, &id), 0);
    let connects: Vec<Value> = backend.events("/connect-log");
    assert_eq!(connects.len(), 2, "the resume ran $connect again");
    assert_eq!(connects[1]["requestContext"]["resumed"], true);
    assert_eq!(connection_id(&connects[1]), id);
    let query = connects[1]["queryStringParameters"].as_object().unwrap();
    assert!(!query.contains_key("resume"), "the token stays a secret");
    // A clean close ends it for good: exactly one $disconnect.
    ws.close(None).await.unwrap();
    disconnect_event(&backend, &id).await;
    gateway.stop().await;
}

#[tokio::test]
async fn the_resumed_frame_says_how_many_of_the_clients_messages_were_handled() {
    let backend = Backend::start().await;
    let echo = "[routes.\"$default\"]\nintegration = { type = \"echo\" }\n";
    let gateway = TestGateway::start(&resume_config(&backend, echo)).await;
    let (mut ws, id, token) = connect_resumable(&gateway).await;
    for n in 1..=3 {
        send_text(&mut ws, &format!("m{n}")).await;
        assert_eq!(next_text(&mut ws).await, format!("m{n}"));
    }
    drop(ws);
    gateway.wait_for_parked(1.0).await;
    let (mut ws, first) = reconnect(&gateway, &token, "3").await;
    assert_eq!(
        (first["type"].as_str(), first["handled"].as_u64()),
        (Some("resumed"), Some(3))
    );
    // The count goes on over the sockets: a client sends again only what went unhandled.
    send_text(&mut ws, "m4").await;
    assert_eq!(next_text(&mut ws).await, "m4");
    let token = first["resumeToken"].as_str().unwrap().to_owned();
    drop(ws);
    gateway.wait_for_parked(1.0).await;
    let (_ws, first) = reconnect(&gateway, &token, "4").await;
    assert_eq!(first["handled"], 4, "{first}");
    assert_eq!(first["connectionId"], id.as_str());
    gateway.stop().await;
}

#[tokio::test]
async fn resuming_again_and_again_keeps_the_count_and_crosses_shards() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&resume_config(&backend, "")).await;
    let (mut ws, id, mut token) = connect_resumable(&gateway).await;
    let mut sent = 0;
    let mut received = 0u64;
    // Each reconnect lands on whichever of the 2 shards the kernel picks: some resumes are
    // handed to the owning shard, some are local.
    for round in 0..8 {
        for _ in 0..5 {
            sent += 1;
            assert_eq!(push(&gateway, &id, &format!("m{sent}")).await, 200);
        }
        // Read a few (fewer each round than were sent), then drop.
        for _ in 0..3 {
            received += 1;
            assert_eq!(
                next_text(&mut ws).await,
                format!("m{received}"),
                "round {round}"
            );
        }
        drop(ws);
        gateway.wait_for_parked(1.0).await;
        let (next, first) = reconnect(&gateway, &token, &received.to_string()).await;
        assert_eq!(first["type"], "resumed", "round {round}: {first}");
        assert_eq!(first["replayed"], sent - received, "round {round}");
        // Every resume brings a new token; the one just used is spent.
        let rotated = first["resumeToken"].as_str().unwrap().to_owned();
        assert_ne!(rotated, token, "round {round}");
        token = rotated;
        ws = next;
    }
    while received < sent {
        received += 1;
        assert_eq!(next_text(&mut ws).await, format!("m{received}"));
    }
    assert_eq!(disconnects_of(&backend, &id), 0);
    gateway.stop().await;
}

#[tokio::test]
async fn after_the_window_the_client_gets_a_new_connection_and_the_old_one_disconnects() {
    let backend = Backend::start().await;
    let config = config_with(&backend, "[api]\nresume = true\nresume_window_secs = 1\n");
    let gateway = TestGateway::start(&config).await;
    let (ws, id, token) = connect_resumable(&gateway).await;
    drop(ws);
    let (code, reason) = status_and_reason(&disconnect_event(&backend, &id).await);
    assert_eq!((code, reason.as_str()), (1001, "resume window expired"));
    let (_ws, welcome) = reconnect(&gateway, &token, "0").await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["resumed"], false);
    assert_eq!(welcome["reason"], "expired");
    assert_ne!(welcome["connectionId"], id.as_str(), "a new connection");
    assert!(welcome["resumeToken"].is_string());
    let new_id = welcome["connectionId"].as_str().unwrap();
    backend
        .wait_for("/connect-log", |e| connection_id(e) == new_id)
        .await;
    assert_eq!(disconnects_of(&backend, &id), 1, "still exactly one");
    gateway.stop().await;
}

#[tokio::test]
async fn forged_garbled_and_impossible_resumes_are_unknown() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&resume_config(&backend, "")).await;
    let (ws, id, token) = connect_resumable(&gateway).await;
    assert_eq!(push(&gateway, &id, "one").await, 200);
    drop(ws);
    gateway.wait_for_parked(1.0).await;
    // The right connection, the wrong secret.
    let mut forged = token.clone().into_bytes();
    let last = forged.len() - 2;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    // Each is a new connection of its own (kept open here, so only ours parks).
    let mut others = Vec::new();
    for (token, received) in [
        (forged.as_str(), "0"),
        ("not-a-token", "0"),
        (token.as_str(), "many"),
    ] {
        let (ws, welcome) = reconnect(&gateway, token, received).await;
        assert_eq!(welcome["reason"], "unknown", "{token} {received}");
        assert_ne!(welcome["connectionId"], id.as_str());
        others.push(ws);
    }
    // None of that touched the parked connection: it still resumes.
    assert_eq!(disconnects_of(&backend, &id), 0);
    // A count larger than what was sent, or one that would overflow: "unknown", and the
    // session stays for its real client (whoever sent it may only hold a stolen token).
    for received in ["5", "18446744073709551614"] {
        let (ws, welcome) = reconnect(&gateway, &token, received).await;
        assert_eq!(welcome["reason"], "unknown", "{received}");
        others.push(ws);
    }
    assert_eq!(disconnects_of(&backend, &id), 0);
    let (mut ws, first) = reconnect(&gateway, &token, "0").await;
    assert_eq!(first["type"], "resumed");
    assert_eq!(next_text(&mut ws).await, "one");
    drop(ws);
    gateway.wait_for_parked(1.0).await;
    // The token it resumed with is spent: only the one in the resumed frame works now.
    let (_ws, welcome) = reconnect(&gateway, &token, "1").await;
    assert_eq!(welcome["reason"], "unknown");
    let rotated = first["resumeToken"].as_str().unwrap();
    let (_ws, again) = reconnect(&gateway, rotated, "1").await;
    assert_eq!(again["type"], "resumed", "{again}");
    assert_eq!(again["connectionId"], id.as_str());
    gateway.stop().await;
}

#[tokio::test]
async fn what_a_parked_connection_cannot_hold_ends_it_as_overflow() {
    let backend = Backend::start().await;
    let limits = "[limits]\noutbound_queue_frames = 8\n";
    let gateway = TestGateway::start(&resume_config(&backend, limits)).await;
    let (ws, id, token) = connect_resumable(&gateway).await;
    drop(ws);
    gateway.wait_for_parked(1.0).await;
    for n in 0..8 {
        assert_eq!(push(&gateway, &id, &format!("held {n}")).await, 200);
    }
    // The ninth does not fit: the session can no longer be resumed.
    push(&gateway, &id, "one too many").await;
    let (_, reason) = status_and_reason(&disconnect_event(&backend, &id).await);
    assert_eq!(reason, "slow consumer");
    assert_eq!(push(&gateway, &id, "late").await, 410);
    let (_ws, welcome) = reconnect(&gateway, &token, "0").await;
    assert_eq!(welcome["reason"], "overflow");
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric_value(&metrics, r#"switchboard_resumes_total{outcome="overflow"}"#),
        1.0
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_parked_connection_is_described_and_deleted_through_the_api() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&resume_config(&backend, "")).await;
    let (ws, id, token) = connect_resumable(&gateway).await;
    drop(ws);
    gateway.wait_for_parked(1.0).await;
    let url = gateway.api_url(&format!("/@connections/{id}"));
    let described = |url: String| async move {
        let response = http().get(url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.json::<Value>().await.unwrap()
    };
    let before = described(url.clone()).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after = described(url.clone()).await;
    assert_eq!(
        before["lastActiveAt"], after["lastActiveAt"],
        "it stops moving"
    );
    let status = http().delete(&url).send().await.unwrap().status();
    assert!(status.is_success(), "{status}");
    let (_, reason) = status_and_reason(&disconnect_event(&backend, &id).await);
    assert_eq!(reason, "connection deleted via @connections");
    assert_eq!(http().get(&url).send().await.unwrap().status(), 410);
    let (_ws, welcome) = reconnect(&gateway, &token, "0").await;
    assert_eq!(welcome["resumed"], false);
    gateway.wait_for_parked(0.0).await;
    gateway.stop().await;
}

#[tokio::test]
async fn a_resume_takes_over_from_a_socket_that_still_looks_alive() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&resume_config(&backend, "")).await;
    let (mut old, id, token) = connect_resumable(&gateway).await;
    assert_eq!(push(&gateway, &id, "one").await, 200);
    assert_eq!(next_text(&mut old).await, "one");
    assert_eq!(push(&gateway, &id, "two").await, 200);
    // The client decided its socket was dead before the gateway noticed.
    let (mut new, first) = reconnect(&gateway, &token, "1").await;
    assert_eq!(first["type"], "resumed");
    assert_eq!(next_text(&mut new).await, "two");
    assert_eq!(push(&gateway, &id, "three").await, 200);
    assert_eq!(next_text(&mut new).await, "three");
    assert_eq!(disconnects_of(&backend, &id), 0);
    gateway.stop().await;
}

#[tokio::test]
async fn a_resume_connect_refuses_is_answered_and_leaves_the_session_alone() {
    let backend = Backend::start().await;
    let config = resume_config_with_connect(&backend, "refuse-resumed", 120);
    let gateway = TestGateway::start(&config).await;
    let (mut live, id, token) = connect_resumable(&gateway).await;
    // The session's own client is still connected: a refused resume does not take over.
    let url = format!("{}?resume={token}&received=0", gateway.ws_url());
    assert_eq!(request_status(url).await, 403);
    assert_eq!(push(&gateway, &id, "still here").await, 200);
    assert_eq!(next_text(&mut live).await, "still here");
    drop(live);
    gateway.wait_for_parked(1.0).await;
    let url = format!("{}?resume={token}&received=1", gateway.ws_url());
    assert_eq!(request_status(url).await, 403);
    assert_eq!(disconnects_of(&backend, &id), 0, "parked, not ended");
    gateway.stop().await;
}

#[tokio::test]
async fn the_token_may_come_in_headers_and_stays_a_secret() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&resume_config(&backend, "")).await;
    let (ws, id, token) = connect_resumable(&gateway).await;
    assert_eq!(push(&gateway, &id, "one").await, 200);
    drop(ws);
    gateway.wait_for_parked(1.0).await;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = gateway.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("X-Switchboard-Resume", token.parse().unwrap());
    request
        .headers_mut()
        .insert("X-Switchboard-Received", "0".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let first = next_json(&mut ws).await;
    assert_eq!(first["type"], "resumed", "{first}");
    assert_eq!(first["connectionId"], id.as_str());
    assert_eq!(next_text(&mut ws).await, "one");
    let connect = backend
        .wait_for("/connect-log", |e| e["requestContext"]["resumed"] == true)
        .await;
    let headers = connect["headers"].as_object().unwrap();
    assert!(
        !headers
            .keys()
            .any(|h| h.eq_ignore_ascii_case("x-switchboard-resume")),
        "the token stays a secret: {headers:?}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn resume_is_off_by_default_and_nothing_changes() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, "")).await;
    let (mut ws, id) = gateway.connect_with_id(&backend).await;
    assert_eq!(push(&gateway, &id, "first").await, 200);
    assert_eq!(next_text(&mut ws).await, "first", "no welcome frame");
    drop(ws);
    disconnect_event(&backend, &id).await;
    gateway.stop().await;
}

/// A resumable config whose `$connect` is the test backend's `connect` path, with a resume
/// window of `window_secs`.
pub(crate) fn resume_config_with_connect(
    backend: &Backend,
    connect: &str,
    window_secs: u64,
) -> String {
    format!(
        r#"
[api]
resume = true
resume_window_secs = {window_secs}
[routes."$connect"]
integration = {{ type = "http", url = "{url}/{connect}" }}
[routes."$disconnect"]
integration = {{ type = "http", url = "{url}/disconnect" }}
"#,
        url = backend.url
    )
}

/// A config whose `$connect` takes a second over resumes.
pub(crate) fn slow_resume_config(backend: &Backend, window_secs: u64) -> String {
    resume_config_with_connect(backend, "slow-resumed", window_secs)
}

#[tokio::test]
async fn the_window_does_not_run_out_under_a_resume_in_progress() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&slow_resume_config(&backend, 1)).await;
    let (ws, id, token) = connect_resumable(&gateway).await;
    assert_eq!(push(&gateway, &id, "one").await, 200);
    drop(ws);
    gateway.wait_for_parked(1.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // `$connect` takes a second: the window (1 s) passes while it runs.
    let (mut ws, first) = reconnect(&gateway, &token, "0").await;
    assert_eq!(first["type"], "resumed", "{first}");
    assert_eq!(next_text(&mut ws).await, "one");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(disconnects_of(&backend, &id), 0);
    gateway.stop().await;
}

#[tokio::test]
async fn a_delete_during_a_resume_ends_the_connection_once_after_it() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&slow_resume_config(&backend, 30)).await;
    let (ws, id, token) = connect_resumable(&gateway).await;
    drop(ws);
    gateway.wait_for_parked(1.0).await;
    let url = format!("{}?resume={token}&received=0", gateway.ws_url());
    let resume = tokio::spawn(async move {
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let first = next_json(&mut ws).await;
        (ws, first)
    });
    // While the resume's `$connect` runs: a push is held, then the DELETE.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(push(&gateway, &id, "during").await, 200);
    let delete = gateway.api_url(&format!("/@connections/{id}"));
    let status = http().delete(&delete).send().await.unwrap().status();
    assert!(status.is_success(), "{status}");
    let (mut ws, first) = resume.await.unwrap();
    assert_eq!(first["type"], "resumed", "{first}");
    assert_eq!(next_text(&mut ws).await, "during");
    assert_eq!(close_code(&mut ws).await, 1000, "then the DELETE");
    let (_, reason) = status_and_reason(&disconnect_event(&backend, &id).await);
    assert_eq!(reason, "connection deleted via @connections");
    gateway.stop().await;
}

/// One client of the load test: reads the room's messages, dropping its socket now and then
/// (sometimes parked first, sometimes taken over at once) and resuming; returns what it got.
async fn flaky_member(
    gateway: &TestGateway,
    seed: u64,
    total: usize,
    ready: tokio::sync::mpsc::Sender<String>,
) -> Vec<String> {
    let (mut ws, id, mut token) = connect_resumable(gateway).await;
    join(gateway, "load", &id).await;
    ready.send(id).await.unwrap();
    let mut state = seed;
    let mut next_random = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 33
    };
    let mut got = Vec::with_capacity(total);
    while got.len() < total {
        got.push(next_text(&mut ws).await);
        if next_random() % 100 < 3 {
            drop(ws);
            if next_random() % 2 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let (resumed, first) = reconnect(gateway, &token, &got.len().to_string()).await;
            assert_eq!(first["type"], "resumed", "member {seed}: {first}");
            token = first["resumeToken"].as_str().unwrap().to_owned();
            ws = resumed;
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_every_member_that_keeps_dropping_gets_every_message_once_in_order() {
    const MEMBERS: u64 = 30;
    const MESSAGES: usize = 1500;
    let backend = Backend::start().await;
    // Every resume is a new socket, and they come far faster than any real client's: the
    // per-address and per-connection rates would refuse them.
    let limits = "[limits]\nconnects_per_sec_per_ip = 0\nmax_connections_per_ip = 0\nresumes_per_sec_per_ip = 0\nresumes_per_sec_per_connection = 0\n";
    let gateway = std::sync::Arc::new(TestGateway::start(&resume_config(&backend, limits)).await);
    let (ready, mut joined) = tokio::sync::mpsc::channel(MEMBERS as usize);
    let members: Vec<_> = (0..MEMBERS)
        .map(|seed| {
            let (gateway, ready) = (gateway.clone(), ready.clone());
            tokio::spawn(async move { flaky_member(&gateway, seed + 1, MESSAGES, ready).await })
        })
        .collect();
    let mut ids = Vec::new();
    for _ in 0..MEMBERS {
        ids.push(joined.recv().await.unwrap());
    }
    for n in 1..=MESSAGES {
        broadcast(&gateway, "load", &format!("m{n}")).await;
    }
    let expected: Vec<String> = (1..=MESSAGES).map(|n| format!("m{n}")).collect();
    for member in members {
        let got = tokio::time::timeout(Duration::from_secs(60), member)
            .await
            .expect("every member done within 60 s")
            .unwrap();
        assert!(got == expected, "nothing missing, nothing twice, in order");
    }
    let metrics = gateway.metrics().await;
    assert!(metric_value(&metrics, r#"switchboard_resumes_total{outcome="resumed"}"#) > 0.0);
    assert_eq!(
        metric_value(&metrics, r#"switchboard_resumes_total{outcome="unknown"}"#)
            + metric_value(&metrics, r#"switchboard_resumes_total{outcome="overflow"}"#),
        0.0
    );
    for id in &ids {
        assert_eq!(disconnects_of(&backend, id), 0, "no $disconnect for {id}");
    }
}

#[tokio::test]
async fn a_stolen_token_does_not_carry_a_session_over_to_another_identity() {
    let backend = Backend::start().await;
    let config = resume_config(
        &backend,
        "[authorizer]\ntype = \"api_key\"\ntoken = \"query:key\"\nkeys = [\"alice-key\", \"mallory-key\"]\n",
    );
    let gateway = TestGateway::start(&config).await;
    let (ws, welcome) = open_and_read_first(&format!("{}?key=alice-key", gateway.ws_url())).await;
    let id = welcome["connectionId"].as_str().unwrap().to_owned();
    let token = welcome["resumeToken"].as_str().unwrap().to_owned();
    assert_eq!(push(&gateway, &id, "for alice").await, 200);
    drop(ws);
    gateway.wait_for_parked(1.0).await;
    // Mallory has the token (from a proxy's access log, say) and her own valid key.
    let stolen = format!(
        "{}?key=mallory-key&resume={token}&received=0",
        gateway.ws_url()
    );
    let (_mallory, refused) = open_and_read_first(&stolen).await;
    assert_eq!(refused["type"], "welcome", "{refused}");
    assert_eq!(refused["reason"], "unknown");
    assert_ne!(
        refused["connectionId"],
        id.as_str(),
        "her own new connection"
    );
    // Without any key, nothing at all.
    let bare = format!("{}?resume={token}&received=0", gateway.ws_url());
    assert_eq!(request_status(bare).await, 401);
    // Alice's session was not touched by either: it resumes with what she missed.
    let mine = format!(
        "{}?key=alice-key&resume={token}&received=0",
        gateway.ws_url()
    );
    let (mut ws, first) = open_and_read_first(&mine).await;
    assert_eq!(first["type"], "resumed", "{first}");
    assert_eq!(first["connectionId"], id.as_str());
    assert_eq!(next_text(&mut ws).await, "for alice");
    assert_eq!(disconnects_of(&backend, &id), 0);
    gateway.stop().await;
}

#[tokio::test]
async fn resumes_that_come_too_fast_are_refused_and_change_nothing() {
    let backend = Backend::start().await;
    let limits = "[limits]\nresumes_per_sec_per_connection = 1\nresume_burst_per_connection = 2\n";
    let gateway = TestGateway::start(&resume_config(&backend, limits)).await;
    let (ws, id, mut token) = connect_resumable(&gateway).await;
    drop(ws);
    for round in 0..2 {
        gateway.wait_for_parked(1.0).await;
        let (ws, first) = reconnect(&gateway, &token, "0").await;
        assert_eq!(first["type"], "resumed", "round {round}: {first}");
        token = first["resumeToken"].as_str().unwrap().to_owned();
        drop(ws);
    }
    gateway.wait_for_parked(1.0).await;
    // The burst is spent: the third within the second is refused, and the session waits.
    let url = format!("{}?resume={token}&received=0", gateway.ws_url());
    assert_eq!(request_status(url).await, 429);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_ws, first) = reconnect(&gateway, &token, "0").await;
    assert_eq!(first["type"], "resumed", "{first}");
    assert_eq!(first["connectionId"], id.as_str());
    assert_eq!(disconnects_of(&backend, &id), 0);
    gateway.stop().await;
}
