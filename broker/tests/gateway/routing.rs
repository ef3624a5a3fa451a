//! Route selection and integrations, as a client and a backend see them.

use std::time::Duration;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

fn chat_config(backend: &Backend) -> String {
    config_with(
        backend,
        &format!(
            r#"
[routes.sendMessage]
integration = {{ type = "http", url = "{url}/reply" }}
response = true
[routes.fireAndForget]
integration = {{ type = "http", url = "{url}/ok" }}
[routes.canned]
integration = {{ type = "mock", body = "canned answer" }}
[routes."order-2"]
integration = {{ type = "mock", body = "templated" }}
[routes.broken]
integration = {{ type = "http", url = "{url}/http-status/500" }}
response = true
[routes.rejects]
integration = {{ type = "http", url = "{url}/status/500" }}
response = true
[routes.slow]
integration = {{ type = "http", url = "{url}/slow", timeout_ms = 300 }}
response = true
[routes."$default"]
integration = {{ type = "echo" }}
"#,
            url = backend.url
        ),
    )
}

#[tokio::test]
async fn named_route_gets_the_message_event_and_answers() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&chat_config(&backend)).await;
    let (mut ws, id) = gateway.connect_with_id(&backend).await;
    let frame = r#"{"action":"sendMessage","text":"hi"}"#;
    send_text(&mut ws, frame).await;
    assert_eq!(next_text(&mut ws).await, format!("reply:{frame}"));

    let event = backend.wait_for("/reply", |_| true).await;
    let context = &event["requestContext"];
    assert_eq!(context["routeKey"], "sendMessage");
    assert_eq!(context["eventType"], "MESSAGE");
    assert_eq!(context["connectionId"], id.as_str());
    assert!(context["messageId"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(event["body"], frame);
    assert_eq!(event["isBase64Encoded"], false);
    gateway.stop().await;
}

#[tokio::test]
async fn http_route_without_response_sends_nothing_back() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&chat_config(&backend)).await;
    let mut ws = gateway.connect().await;
    send_text(&mut ws, r#"{"action":"fireAndForget"}"#).await;
    backend.wait_for("/ok", |_| true).await;
    send_text(&mut ws, "marker").await;
    assert_eq!(
        next_text(&mut ws).await,
        "marker",
        "nothing arrived before the echo"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn unknown_route_non_json_and_binary_go_to_default() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&chat_config(&backend)).await;
    let mut ws = gateway.connect().await;
    for text in [
        r#"{"action":"nope"}"#,
        "not json at all",
        r#"{"action":"SENDMESSAGE"}"#,
    ] {
        send_text(&mut ws, text).await;
        assert_eq!(next_text(&mut ws).await, text);
    }
    ws.send(Message::binary(vec![0u8, 159, 146, 150]))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut ws).await,
        Message::binary(vec![0u8, 159, 146, 150])
    );
    gateway.stop().await;
}

#[tokio::test]
async fn binary_frames_reach_http_default_as_base64() {
    let backend = Backend::start().await;
    let config = format!(
        "[routes.\"$default\"]\nintegration = {{ type = \"http\", url = \"{}/ok\" }}\n",
        backend.url
    );
    let gateway = TestGateway::start(&config).await;
    let mut ws = gateway.connect().await;
    ws.send(Message::binary(vec![0xffu8, 0x00, 0x10]))
        .await
        .unwrap();
    let event = backend.wait_for("/ok", |_| true).await;
    assert_eq!(event["isBase64Encoded"], true);
    assert_eq!(event["body"], "/wAQ");
    assert_eq!(event["requestContext"]["routeKey"], "$default");
    gateway.stop().await;
}

#[tokio::test]
async fn mock_and_templated_selection() {
    let backend = Backend::start().await;
    let config = chat_config(&backend).replace(
        "[routes.sendMessage]",
        "[api]\nroute_selection_expression = \"${request.body.type}-${request.body.version}\"\n[routes.sendMessage]",
    );
    let gateway = TestGateway::start(&config).await;
    let mut ws = gateway.connect().await;
    send_text(&mut ws, r#"{"type":"order","version":2}"#).await;
    assert_eq!(next_text(&mut ws).await, "templated");
    gateway.stop().await;

    let gateway = TestGateway::start(&chat_config(&backend)).await;
    let mut ws = gateway.connect().await;
    send_text(&mut ws, r#"{"action":"canned"}"#).await;
    assert_eq!(next_text(&mut ws).await, "canned answer");
    gateway.stop().await;
}

#[tokio::test]
async fn no_route_and_no_default_is_forbidden_frame() {
    let gateway = TestGateway::start("[routes.known]\nintegration = { type = \"echo\" }").await;
    let mut ws = gateway.connect().await;
    send_text(&mut ws, r#"{"action":"unknown"}"#).await;
    let error = next_json(&mut ws).await;
    assert_eq!(error["message"], "Forbidden");
    assert!(
        error["connectionId"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    assert!(error["requestId"].as_str().is_some_and(|s| !s.is_empty()));
    send_text(&mut ws, r#"{"action":"known"}"#).await;
    assert_eq!(
        next_text(&mut ws).await,
        r#"{"action":"known"}"#,
        "connection stays open"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn backend_failures_become_error_frames_and_the_connection_stays() {
    let backend = Backend::start().await;
    let dead = dead_url().await;
    let config = chat_config(&backend).replace(
        "[routes.\"$default\"]",
        &format!("[routes.down]\nintegration = {{ type = \"http\", url = \"{dead}\" }}\nresponse = true\n[routes.\"$default\"]"),
    );
    let gateway = TestGateway::start(&config).await;
    let mut ws = gateway.connect().await;
    // A Lambda-proxy answer with a non-2xx statusCode is a completed invocation: as on AWS,
    // the client gets its body.
    send_text(&mut ws, r#"{"action":"rejects"}"#).await;
    assert_eq!(next_text(&mut ws).await, "denied by backend");
    // Failed invocations (HTTP error, unreachable, timeout) get the error frame.
    for action in ["broken", "down", "slow"] {
        let started = std::time::Instant::now();
        send_text(&mut ws, &format!(r#"{{"action":"{action}"}}"#)).await;
        let error = next_json(&mut ws).await;
        assert_eq!(error["message"], "Internal server error", "{action}");
        assert!(error["requestId"].is_string());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{action} answered within its timeout"
        );
        send_text(&mut ws, "still here").await;
        assert_eq!(next_text(&mut ws).await, "still here");
    }
    gateway.stop().await;
}

#[tokio::test]
async fn slow_backend_does_not_delay_other_connections() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&chat_config(&backend)).await;
    let mut slow = gateway.connect().await;
    let mut fast = gateway.connect().await;
    send_text(&mut slow, r#"{"action":"slow"}"#).await;
    let started = std::time::Instant::now();
    send_text(&mut fast, "ping").await;
    assert_eq!(next_text(&mut fast).await, "ping");
    // The slow backend takes 3 s; an answer well before that proves no head-of-line wait.
    assert!(started.elapsed() < Duration::from_secs(2));
    gateway.stop().await;
}

#[tokio::test]
async fn a_burst_of_frames_is_answered_in_full_not_cut_as_a_slow_consumer() {
    // Rate limits off: this is about replies backing up, not about how fast a client may send.
    let config = "[limits]\noutbound_queue_frames = 16\nmessages_per_sec = 0\nbytes_per_sec = 0\n[routes.\"$default\"]\nintegration = { type = \"echo\" }";
    let gateway = TestGateway::start(config).await;
    let mut ws = gateway.connect().await;
    // Queued in one go, read only afterwards: replies back up into the socket buffers and
    // the gateway reads more only as they drain.
    for seq in 0..3000 {
        ws.feed(Message::text(format!("burst {seq}")))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();
    for seq in 0..3000 {
        assert_eq!(next_text(&mut ws).await, format!("burst {seq}"));
    }
    gateway.stop().await;
}

#[tokio::test]
async fn frames_cannot_select_the_connect_or_disconnect_routes() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&chat_config(&backend)).await;
    let (mut ws, _) = gateway.connect_with_id(&backend).await;
    for action in ["$connect", "$disconnect"] {
        let frame = format!(r#"{{"action":"{action}"}}"#);
        send_text(&mut ws, &frame).await;
        assert_eq!(next_text(&mut ws).await, frame, "went to $default (echo)");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        backend.events("/connect-log").len(),
        1,
        "only the handshake"
    );
    assert!(backend.events("/disconnect").is_empty());
    gateway.stop().await;
}
