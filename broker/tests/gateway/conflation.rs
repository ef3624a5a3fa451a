//! Conflating rooms (a ticker): a member that falls behind gets the latest value of every
//! key, never an older value after a newer one, and is not cut; the same load in a room
//! that does not conflate cuts it as a slow consumer.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// A realistic ticker: 20,000 ticks over 50 symbols, 1 KiB each (20 MB: far past what a
/// socket's buffers take while its reader stops).
const SYMBOLS: u64 = 50;
const MESSAGES: u64 = 20_000;
const TICK_BYTES: usize = 1024;

async fn start() -> (TestGateway, Backend) {
    let backend = Backend::start().await;
    let config = config_with(
        &backend,
        r#"
[limits]
outbound_queue_frames = 128
[[rooms.class]]
pattern = "ticker:*"
conflate = true
[routes.join]
integration = { type = "room_join", room = "$request.body.room" }
[routes.tick]
integration = { type = "room_publish", room = "$request.body.room", key = "$request.body.symbol", members_only = false }
"#,
    );
    (TestGateway::start(&config).await, backend)
}

async fn join(gateway: &TestGateway, ws: &mut Ws, room: &str, count: usize) {
    send_text(ws, &json!({"action": "join", "room": room}).to_string()).await;
    let url = gateway.api_url(&format!("/@rooms/{room}"));
    for _ in 0..200 {
        let body = http()
            .get(&url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        if serde_json::from_slice::<Value>(&body).unwrap()["count"] == count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{room} never had {count} members");
}

/// Publishes every tick through the API (one connection, in order), keyed by symbol; a
/// message without a key, `{"news": …}`, goes out in the middle.
async fn publish_ticks(gateway: &TestGateway, room: &str) {
    let client = http();
    let pad = "x".repeat(TICK_BYTES);
    for seq in 0..MESSAGES {
        if seq == MESSAGES / 2 {
            let url = gateway.api_url(&format!("/@rooms/{room}"));
            let sent = client.post(url).body(r#"{"news":"halfway"}"#).send().await;
            assert_eq!(sent.unwrap().status(), 200);
        }
        let symbol = format!("S{}", seq % SYMBOLS);
        let url = gateway.api_url(&format!("/@rooms/{room}?key={symbol}"));
        let tick = json!({"symbol": symbol, "seq": seq, "pad": pad}).to_string();
        let sent = client.post(url).body(tick).send().await;
        assert_eq!(sent.unwrap().status(), 200);
    }
}

/// Reads ticks until the socket is quiet; the last `seq` per symbol, checking each
/// symbol's ticks only go up, and whether the message without a key came. `None` if the
/// server closed the connection.
async fn read_ticks(ws: &mut Ws) -> Option<(HashMap<String, u64>, bool)> {
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut news = false;
    loop {
        let next = tokio::time::timeout(Duration::from_millis(500), ws.next()).await;
        let text = match next {
            Err(_) => return Some((last, news)),
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(Message::Close(_))) | Some(Err(_)) | None) => return None,
            Ok(Some(Ok(_))) => continue,
        };
        let tick: Value = serde_json::from_str(&text).unwrap();
        if tick["news"] == "halfway" {
            news = true;
            continue;
        }
        let (symbol, seq) = (
            tick["symbol"].as_str().unwrap(),
            tick["seq"].as_u64().unwrap(),
        );
        if let Some(before) = last.insert(symbol.to_owned(), seq) {
            assert!(seq > before, "{symbol}: {seq} after {before}");
        }
    }
}

#[tokio::test]
async fn a_member_behind_in_a_conflating_room_gets_the_latest_of_every_key_and_stays() {
    let (gateway, _backend) = start().await;
    let mut slow = gateway.connect().await;
    join(&gateway, &mut slow, "ticker:x", 1).await;
    publish_ticks(&gateway, "ticker:x").await;
    let (last, news) = read_ticks(&mut slow).await.expect("not cut");
    let expected: HashMap<String, u64> = (MESSAGES - SYMBOLS..MESSAGES)
        .map(|seq| (format!("S{}", seq % SYMBOLS), seq))
        .collect();
    assert_eq!(last, expected, "the latest value of every symbol");
    assert!(news, "the message without a key is delivered as it is");
    let conflated = metric_value(
        &gateway.metrics().await,
        "switchboard_conflated_messages_total",
    );
    assert!(conflated > 0.0, "{conflated}");
    // A client's keyed publish conflates the same way; still connected.
    let tick = json!({"action": "tick", "room": "ticker:x", "symbol": "S0", "seq": MESSAGES});
    send_text(&mut slow, &tick.to_string()).await;
    let echoed: Value = serde_json::from_str(&next_text(&mut slow).await).unwrap();
    assert_eq!(echoed["seq"], MESSAGES);
    gateway.stop().await;
}

#[tokio::test]
async fn the_same_load_in_a_room_that_does_not_conflate_cuts_the_member() {
    let (gateway, _backend) = start().await;
    let mut slow = gateway.connect().await;
    join(&gateway, &mut slow, "plain", 1).await;
    publish_ticks(&gateway, "plain").await;
    assert_eq!(read_ticks(&mut slow).await, None, "cut as a slow consumer");
    gateway.stop().await;
}
