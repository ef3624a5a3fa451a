//! Limits, bad frames, and `$disconnect` firing exactly once for every way a connection
//! ends, with the status code and reason the backend sees.

use std::time::Duration;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::*;

#[tokio::test]
async fn client_close_reports_its_code() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, "")).await;
    let (mut ws, id) = gateway.connect_with_id(&backend).await;
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    assert_eq!(close_code(&mut ws).await, 1001, "the close is echoed");
    let (code, reason) = status_and_reason(&disconnect_event(&backend, &id).await);
    assert_eq!(code, 1001);
    assert!(reason.contains("bye"), "{reason}");
    gateway.stop().await;
}

#[tokio::test]
async fn dropped_tcp_connection_is_reported() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, "")).await;
    let (ws, id) = gateway.connect_with_id(&backend).await;
    drop(ws);
    let (code, _) = status_and_reason(&disconnect_event(&backend, &id).await);
    assert_eq!(code, 1006);
    gateway.stop().await;
}

#[tokio::test]
async fn delete_reports_deleted() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, "")).await;
    let (mut ws, id) = gateway.connect_with_id(&backend).await;
    let url = gateway.api_url(&format!("/@connections/{id}"));
    assert_eq!(http().delete(&url).send().await.unwrap().status(), 204);
    assert_eq!(close_code(&mut ws).await, 1000);
    let (code, reason) = status_and_reason(&disconnect_event(&backend, &id).await);
    assert_eq!(code, 1000);
    assert!(reason.contains("deleted"), "{reason}");
    gateway.stop().await;
}

#[tokio::test]
async fn idle_timeout_closes_with_1001() {
    let backend = Backend::start().await;
    let config = config_with(&backend, "[limits]\nidle_timeout_secs = 1");
    let gateway = TestGateway::start(&config).await;
    let (mut ws, id) = gateway.connect_with_id(&backend).await;
    assert_eq!(close_code(&mut ws).await, 1001);
    let (code, reason) = status_and_reason(&disconnect_event(&backend, &id).await);
    assert_eq!((code, reason.as_str()), (1001, "idle timeout"));
    gateway.stop().await;
}

#[tokio::test]
async fn activity_keeps_a_connection_past_the_idle_timeout() {
    let backend = Backend::start().await;
    let config = config_with(
        &backend,
        "[limits]\nidle_timeout_secs = 1\n[routes.\"$default\"]\nintegration = { type = \"echo\" }",
    );
    let gateway = TestGateway::start(&config).await;
    let mut ws = gateway.connect().await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        send_text(&mut ws, "keepalive").await;
        assert_eq!(next_text(&mut ws).await, "keepalive");
    }
    gateway.stop().await;
}

#[tokio::test]
async fn max_connection_duration_closes_with_1001() {
    let backend = Backend::start().await;
    let config = config_with(
        &backend,
        "[limits]\nmax_connection_secs = 1\n[routes.\"$default\"]\nintegration = { type = \"echo\" }",
    );
    let gateway = TestGateway::start(&config).await;
    let (mut ws, id) = gateway.connect_with_id(&backend).await;
    send_text(&mut ws, "busy").await;
    assert_eq!(next_text(&mut ws).await, "busy");
    assert_eq!(close_code(&mut ws).await, 1001);
    let (code, reason) = status_and_reason(&disconnect_event(&backend, &id).await);
    assert_eq!(code, 1001);
    assert!(reason.contains("max connection duration"), "{reason}");
    gateway.stop().await;
}

#[tokio::test]
async fn oversize_frame_closes_with_1009() {
    let backend = Backend::start().await;
    let config = config_with(
        &backend,
        "[limits]\nmax_frame_bytes = 1024\nmax_message_bytes = 4096",
    );
    let gateway = TestGateway::start(&config).await;
    let mut client = RawClient::connect(&gateway).await;
    let id = connection_id(&backend.wait_for("/connect-log", |_| true).await);
    client.send_frame(true, 0x1, &vec![b'a'; 1025]).await;
    assert_eq!(client.close_code().await, 1009);
    let (code, reason) = status_and_reason(&disconnect_event(&backend, &id).await);
    assert_eq!(code, 1009);
    assert!(reason.contains("max_frame_bytes"), "{reason}");
    gateway.stop().await;
}

#[tokio::test]
async fn oversize_fragmented_message_closes_with_1009() {
    let backend = Backend::start().await;
    let config = config_with(
        &backend,
        "[limits]\nmax_frame_bytes = 1024\nmax_message_bytes = 2048",
    );
    let gateway = TestGateway::start(&config).await;
    let mut client = RawClient::connect(&gateway).await;
    let id = connection_id(&backend.wait_for("/connect-log", |_| true).await);
    client.send_frame(false, 0x1, &[b'a'; 1000]).await;
    client.send_frame(false, 0x0, &[b'a'; 1000]).await;
    client.send_frame(true, 0x0, &[b'a'; 1000]).await;
    assert_eq!(client.close_code().await, 1009);
    let (code, reason) = status_and_reason(&disconnect_event(&backend, &id).await);
    assert_eq!(code, 1009);
    assert!(reason.contains("max_message_bytes"), "{reason}");
    gateway.stop().await;
}

#[tokio::test]
async fn fragmented_message_within_limits_is_reassembled() {
    let gateway =
        TestGateway::start("[routes.\"$default\"]\nintegration = { type = \"echo\" }").await;
    let mut client = RawClient::connect(&gateway).await;
    client.send_frame(false, 0x1, b"hello ").await;
    client.send_frame(true, 0x9, b"ping").await;
    client.send_frame(true, 0x0, b"world").await;
    client.send_frame(true, 0x8, &1000u16.to_be_bytes()).await;
    let mut received = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut client.stream, &mut received)
        .await
        .unwrap();
    // pong "ping", text "hello world", close 1000 — unmasked server frames.
    let expected: Vec<u8> = [
        &[0x8A, 4][..],
        b"ping",
        &[0x81, 11],
        b"hello world",
        &[0x88, 2, 0x03, 0xE8],
    ]
    .concat();
    assert_eq!(received, expected);
    gateway.stop().await;
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, "")).await;
    let mut client = RawClient::connect(&gateway).await;
    let id = connection_id(&backend.wait_for("/connect-log", |_| true).await);
    client.send_frame(true, 0x1, &[0xC3, 0x28]).await;
    assert_eq!(client.close_code().await, 1007);
    let (code, _) = status_and_reason(&disconnect_event(&backend, &id).await);
    assert_eq!(code, 1007);
    gateway.stop().await;
}

#[tokio::test]
async fn unmasked_frame_closes_with_1002() {
    let gateway = TestGateway::start("").await;
    let mut client = RawClient::connect(&gateway).await;
    tokio::io::AsyncWriteExt::write_all(&mut client.stream, &[0x81, 0x02, b'h', b'i'])
        .await
        .unwrap();
    assert_eq!(client.close_code().await, 1002);
    gateway.stop().await;
}

#[tokio::test]
async fn bad_frames_on_one_connection_leave_others_alone() {
    let gateway =
        TestGateway::start("[routes.\"$default\"]\nintegration = { type = \"echo\" }").await;
    let mut good = gateway.connect().await;
    let mut bad = RawClient::connect(&gateway).await;
    bad.send_frame(true, 0x1, &[0xff]).await;
    assert_eq!(bad.close_code().await, 1007);
    send_text(&mut good, "unaffected").await;
    assert_eq!(next_text(&mut good).await, "unaffected");
    gateway.stop().await;
}

#[tokio::test]
async fn shutdown_closes_with_1001_and_reports_every_connection() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, "")).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        let ws = gateway.connect().await;
        clients.push(ws);
    }
    let ids = backend.connected_ids(5).await;
    let stopping = tokio::spawn(gateway.stop());
    for ws in &mut clients {
        assert_eq!(close_code(ws).await, 1001);
    }
    stopping.await.unwrap();
    // serve() returns only after every `$disconnect` call finished.
    let reported = backend.events("/disconnect");
    for id in &ids {
        let events: Vec<_> = reported
            .iter()
            .filter(|e| &connection_id(e) == id)
            .collect();
        assert_eq!(events.len(), 1, "one $disconnect for {id}");
        let (code, reason) = status_and_reason(events[0]);
        assert_eq!((code, reason.as_str()), (1001, "server shutdown"));
    }
}

#[tokio::test]
async fn connection_ids_are_unique_across_restarts() {
    let backend = Backend::start().await;
    let config = config_with(&backend, "");
    let gateway = TestGateway::start(&config).await;
    let data_dir = gateway.data_dir.clone();
    let (_ws, first) = gateway.connect_with_id(&backend).await;
    gateway.stop().await;
    let gateway = TestGateway::start_in(&config, data_dir).await;
    let _ws = gateway.connect().await;
    let second = backend
        .wait_for("/connect-log", |e| connection_id(e) != first)
        .await;
    assert_ne!(connection_id(&second), first);
    // The old id is gone, not routed to whoever got the same sequence number.
    let url = gateway.api_url(&format!("/@connections/{first}"));
    assert_eq!(
        http().post(&url).body("x").send().await.unwrap().status(),
        410
    );
    gateway.stop().await;
}

#[tokio::test]
async fn connections_spread_over_shards_and_all_receive_pushes() {
    let backend = Backend::start().await;
    let config = config_with(&backend, "[server]\nshards = 2");
    let gateway = TestGateway::start(&config).await;
    let mut clients = Vec::new();
    for _ in 0..40 {
        clients.push(gateway.connect().await);
    }
    let ids = backend.connected_ids(40).await;
    let shards: std::collections::HashSet<u16> = ids
        .iter()
        .map(|id| {
            id.parse::<switchboard::connection_id::ConnectionId>()
                .unwrap()
                .shard
        })
        .collect();
    assert_eq!(
        shards.len(),
        2,
        "SO_REUSEPORT spreads connections over both shards"
    );
    let client = http();
    for id in &ids {
        let url = gateway.api_url(&format!("/@connections/{id}"));
        let response = client.post(&url).body(id.clone()).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    let mut received = std::collections::HashSet::new();
    for ws in &mut clients {
        received.insert(next_text(ws).await);
    }
    assert_eq!(
        received,
        ids.into_iter().collect::<std::collections::HashSet<_>>()
    );
    gateway.stop().await;
}

#[tokio::test]
async fn invalid_close_codes_are_answered_with_1002_not_echoed() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, "")).await;
    for code in [0u16, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999] {
        let mut client = RawClient::connect(&gateway).await;
        let id = connection_id(&backend.wait_for("/connect-log", |_| true).await);
        client.send_frame(true, 8, &code.to_be_bytes()).await;
        assert_eq!(client.close_code().await, 1002, "close code {code}");
        let (reported, _) = status_and_reason(&disconnect_event(&backend, &id).await);
        assert_eq!(reported, 1002, "disconnectStatusCode for {code}");
        backend.clear();
    }
    gateway.stop().await;
}
