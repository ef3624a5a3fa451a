//! Hostile clients against the real binary: each finding of the "no client can hurt the
//! others" review, run briefly and bounded on loopback, asserting what the victims see
//! and that the gateway's memory and descriptors stay bounded.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::binary::*;
use crate::support::*;

/// The demo's rooms, with a publish that skips the sender (a flooder that does not read
/// must be throttled, not cut as a slow consumer of its own messages).
const ROUTES: &str = r#"
[routes.join]
integration = { type = "room_join", room = "$request.body.room" }
[routes.leave]
integration = { type = "room_leave", room = "$request.body.room" }
[routes.publish]
integration = { type = "room_publish", room = "$request.body.room", data = "$request.body.data", exclude_sender = true }
[routes.q]
integration = { type = "queue", queue = "q", ack = true }
[routes."$default"]
integration = { type = "echo" }
"#;

const MIB: u64 = 1 << 20;

/// A gateway process with `limits` (TOML lines under `[limits]`) and `server` (lines
/// under `[server]`).
fn start(dir: &tempfile::TempDir, limits: &str, server: &str) -> GatewayProcess {
    GatewayProcess::start(&config(dir, limits, server), &[])
}

fn config(dir: &tempfile::TempDir, limits: &str, server: &str) -> std::path::PathBuf {
    let path = write_config(dir.path(), &format!("[limits]\n{limits}\n{ROUTES}"));
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "[server]\n",
        &format!("[server]\n{server}\n"),
        1,
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A TCP connection to `addr` from the loopback address `source`.
fn upgrade_request(stage: &str) -> String {
    format!(
        "GET /{stage} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Upgrades `stream`; returns the response head.
async fn upgrade(stream: &mut TcpStream) -> String {
    stream
        .write_all(upgrade_request("dev").as_bytes())
        .await
        .unwrap();
    read_head(stream).await
}

/// A raw WebSocket client from `source`, upgraded (panics if refused).
async fn raw_client(source: [u8; 4], addr: SocketAddr) -> RawClient {
    let mut stream = connect_from(source, addr).await.unwrap();
    let head = upgrade(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    RawClient { stream }
}

fn masked_text(text: &str) -> Vec<u8> {
    switchboard::frame::encode_masked(true, 1, text.as_bytes(), [9, 8, 7, 6])
}

/// Writes `frame` over and over (never reading) until `limit` passes or the gateway
/// stops taking bytes for `stall`; returns how many whole frames were written.
async fn flood(stream: &mut TcpStream, frame: &[u8], limit: Duration, stall: Duration) -> usize {
    let deadline = Instant::now() + limit;
    let mut written = 0;
    while Instant::now() < deadline {
        match tokio::time::timeout(stall, stream.write_all(frame)).await {
            Ok(Ok(())) => written += 1,
            _ => break,
        }
    }
    written
}

/// Sends a text message on a well-behaved client and waits for its echo.
async fn echo(ws: &mut Ws, text: &str) {
    send_text(ws, text).await;
    assert_eq!(next_text(ws).await, text);
}

async fn ws_client(gateway: &GatewayProcess) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(gateway.ws_url.as_str())
        .await
        .unwrap();
    ws
}

async fn health(gateway: &GatewayProcess) -> u16 {
    health_reason(gateway).await.0
}

/// /health's status and the reason it gives (empty when healthy).
async fn health_reason(gateway: &GatewayProcess) -> (u16, String) {
    let response = http()
        .get(format!("http://{}/health", gateway.api_addr()))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    (
        status,
        body["reason"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Waits (bounded) until `condition` holds for the process; panics with `what` if not.
async fn eventually(limit: Duration, what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_flood_is_throttled_then_cut_and_costs_the_others_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = start(&dir, "throttle_disconnect_secs = 3", "");
    let baseline = gateway.rss_bytes();
    let mut attacker = raw_client([127, 0, 0, 1], gateway.ws_addr()).await;
    let join = masked_text(r#"{"action":"join","room":"flood"}"#);
    attacker.stream.write_all(&join).await.unwrap();
    let mut member = ws_client(&gateway).await;
    send_text(&mut member, r#"{"action":"join","room":"flood"}"#).await;
    let mut bystander = ws_client(&gateway).await;

    let data = "x".repeat(1000);
    let publish =
        masked_text(&json!({"action": "publish", "room": "flood", "data": data}).to_string());
    let flooding = tokio::spawn(async move {
        let sent = flood(
            &mut attacker.stream,
            &publish,
            Duration::from_secs(8),
            Duration::from_secs(8),
        )
        .await;
        (attacker, sent)
    });
    // While the flood runs, the others are served as usual.
    for round in 0..20 {
        echo(&mut bystander, &format!("still here {round}")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut attacker, sent) = flooding.await.unwrap();
    assert_eq!(
        attacker.close_code().await,
        1008,
        "cut for staying over its rate limit"
    );
    assert!(
        sent > 500,
        "the attacker got {sent} frames out before the gateway stopped reading"
    );
    let growth = gateway.rss_bytes().saturating_sub(baseline);
    assert!(growth < 64 * MIB, "RSS grew {} MiB", growth / MIB);
    // The member got the publishes the limit let through, in order, and is still open.
    let mut received = 0;
    while let Ok(Some(Ok(Message::Text(text)))) =
        tokio::time::timeout(Duration::from_millis(500), member.next()).await
    {
        assert_eq!(text.as_str(), data);
        received += 1;
    }
    assert!(received >= 100, "the member received {received} publishes");
    echo(&mut member, "member still open").await;
    assert!(
        gateway
            .metric("switchboard_rate_limited_disconnects_total")
            .await
            >= 1.0
    );
    assert!(gateway.metric("switchboard_inbound_throttled_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_per_connection_are_capped_and_toggling_a_room_costs_no_memory() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = start(&dir, "messages_per_sec = 0\nbytes_per_sec = 0", "");
    let mut ws = ws_client(&gateway).await;
    for room in 0..100 {
        send_text(
            &mut ws,
            &json!({"action": "join", "room": format!("r{room}")}).to_string(),
        )
        .await;
    }
    send_text(&mut ws, r#"{"action":"join","room":"one-too-many"}"#).await;
    let refused = next_json(&mut ws).await;
    let message = refused["message"].as_str().unwrap();
    assert!(message.contains("max_rooms_per_connection"), "{message}");
    // Leaving one makes room again.
    send_text(&mut ws, r#"{"action":"leave","room":"r0"}"#).await;
    send_text(&mut ws, r#"{"action":"join","room":"one-too-many"}"#).await;
    echo(&mut ws, "joined").await;
    let members = room_members(&gateway, "one-too-many").await;
    assert_eq!(members, 1);

    let baseline = gateway.rss_bytes();
    let mut toggler = raw_client([127, 0, 0, 1], gateway.ws_addr()).await;
    let mut pair = masked_text(r#"{"action":"join","room":"toggle"}"#);
    pair.extend(masked_text(r#"{"action":"leave","room":"toggle"}"#));
    let burst: Vec<u8> = pair
        .iter()
        .copied()
        .cycle()
        .take(pair.len() * 1000)
        .collect();
    for _ in 0..100 {
        toggler.stream.write_all(&burst).await.unwrap();
    }
    // 200,000 changes later: all applied, nothing kept.
    let echo_frame = masked_text("done toggling");
    toggler.stream.write_all(&echo_frame).await.unwrap();
    let mut reply = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(30), toggler.stream.read(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&reply[..n]).contains("done toggling"));
    assert_eq!(room_members(&gateway, "toggle").await, 0);
    let growth = gateway.rss_bytes().saturating_sub(baseline);
    assert!(growth < 32 * MIB, "RSS grew {} MiB", growth / MIB);
}

async fn room_members(gateway: &GatewayProcess, room: &str) -> u64 {
    let response = http()
        .get(format!("{}/@rooms/{room}", gateway.api_url))
        .send()
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    body["count"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_one_publisher_costs_no_member_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = start(&dir, "", "");
    let mut members = Vec::new();
    for _ in 0..50 {
        let mut ws = ws_client(&gateway).await;
        send_text(&mut ws, r#"{"action":"join","room":"stage"}"#).await;
        members.push(ws);
    }
    let mut publisher = ws_client(&gateway).await;
    send_text(&mut publisher, r#"{"action":"join","room":"stage"}"#).await;
    eventually(Duration::from_secs(10), "51 members", async || {
        room_members(&gateway, "stage").await == 51
    })
    .await;

    // A non-member may not publish at all (members_only is the default).
    let mut outsider = ws_client(&gateway).await;
    send_text(
        &mut outsider,
        r#"{"action":"publish","room":"stage","data":"spam"}"#,
    )
    .await;
    let refused = next_json(&mut outsider).await;
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .starts_with("Forbidden"),
        "{refused}"
    );

    // A member's burst of 300 x 30 KB (9 MB in one go) is let through at its byte rate.
    let readers: Vec<_> = members
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                while got.len() < 300 {
                    match next_message(&mut ws).await {
                        Message::Text(text) => got.push(text.as_str()[..8].to_owned()),
                        other => panic!("member got {other:?} after {} messages", got.len()),
                    }
                }
                (got, ws)
            })
        })
        .collect();
    for seq in 0..300 {
        let data = format!("{seq:08}{}", "p".repeat(30_000));
        let frame = json!({"action": "publish", "room": "stage", "data": data}).to_string();
        publisher.feed(Message::text(frame)).await.unwrap();
    }
    publisher.flush().await.unwrap();
    let expected: Vec<String> = (0..300).map(|seq| format!("{seq:08}")).collect();
    let mut members = Vec::new();
    for reader in readers {
        let (got, ws) = reader.await.unwrap();
        assert_eq!(got, expected);
        members.push(ws);
    }
    assert_eq!(
        gateway
            .metric("switchboard_slow_consumer_disconnects_total")
            .await,
        0.0
    );
    assert!(gateway.metric("switchboard_inbound_throttled_total").await >= 1.0);
    assert_eq!(room_members(&gateway, "stage").await, 51);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_are_counted_per_address_and_answered_429_and_503() {
    let dir = tempfile::tempdir().unwrap();
    let limits =
        "max_connections_per_ip = 100\nconnects_per_sec_per_ip = 1000\nconnect_burst_per_ip = 1000";
    let gateway = start(&dir, limits, "max_connections = 250");
    let addr = gateway.ws_addr();
    // 130 sockets that never send a byte, from one address: 100 are held (handshakes
    // count), the rest are answered 429 at once.
    let mut silent = Vec::new();
    for _ in 0..130 {
        silent.push(connect_from([127, 0, 0, 1], addr).await.unwrap());
    }
    let answers = futures_util::future::join_all(silent.iter_mut().map(|stream| async move {
        let mut head = [0u8; 12];
        match tokio::time::timeout(Duration::from_millis(500), stream.read_exact(&mut head)).await {
            Ok(Ok(_)) => Some(head),
            _ => None,
        }
    }))
    .await;
    let answered: Vec<_> = answers.into_iter().flatten().collect();
    assert_eq!(answered.len(), 30);
    assert!(answered.iter().all(|head| head == b"HTTP/1.1 429"));
    // Another address is served as usual, and so is the management API.
    let mut client = raw_client([127, 0, 0, 2], addr).await;
    client.send_frame(true, 1, b"hello").await;
    assert_eq!(health(&gateway).await, 200);

    // Capacity counts handshakes too: with 100 + 1 open, 149 more silent sockets from other
    // addresses fill it, and the next socket is answered 503 without sending anything.
    for i in 0..149u8 {
        silent.push(connect_from([127, 0, 1, i], addr).await.unwrap());
    }
    eventually(Duration::from_secs(5), "250 sockets open", async || {
        gateway.metric("switchboard_open_sockets").await >= 250.0
    })
    .await;
    let mut late = connect_from([127, 0, 0, 3], addr).await.unwrap();
    assert!(read_head(&mut late).await.starts_with("HTTP/1.1 503"));
    assert!(
        gateway
            .metric(
                "switchboard_connections_total{result=\"over_capacity\",transport=\"websocket\"}"
            )
            .await
            >= 1.0
    );
    assert!(
        gateway
            .metric("switchboard_connections_total{result=\"ip_limit\",transport=\"websocket\"}")
            .await
            >= 30.0
    );
    // Closing the silent sockets gives the places back.
    drop(silent);
    eventually(Duration::from_secs(5), "places given back", async || {
        gateway.metric("switchboard_open_sockets").await <= 1.0
    })
    .await;
    let mut again = connect_from([127, 0, 0, 1], addr).await.unwrap();
    assert!(upgrade(&mut again).await.starts_with("HTTP/1.1 101"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_rate_per_address_trips_and_refills() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = start(
        &dir,
        "connects_per_sec_per_ip = 5\nconnect_burst_per_ip = 5",
        "",
    );
    let addr = gateway.ws_addr();
    let mut open = Vec::new();
    for _ in 0..5 {
        let mut stream = connect_from([127, 0, 0, 9], addr).await.unwrap();
        assert!(upgrade(&mut stream).await.starts_with("HTTP/1.1 101"));
        open.push(stream);
    }
    let mut refused = connect_from([127, 0, 0, 9], addr).await.unwrap();
    assert!(upgrade(&mut refused).await.starts_with("HTTP/1.1 429"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut later = connect_from([127, 0, 0, 9], addr).await.unwrap();
    assert!(upgrade(&mut later).await.starts_with("HTTP/1.1 101"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_descriptor_reserve_keeps_the_api_and_the_503_working() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(&dir, "max_connections_per_ip = 0", "fd_reserve = 100");
    let gateway = GatewayProcess::start_with_open_files(&path, 300);
    let addr = gateway.ws_addr();
    let mut silent = Vec::new();
    for i in 0..260u16 {
        silent.push(
            connect_from([127, 0, 2, (i % 200) as u8 + 1], addr)
                .await
                .unwrap(),
        );
    }
    eventually(Duration::from_secs(5), "200 sockets admitted", async || {
        gateway.metric("switchboard_open_sockets").await >= 200.0
    })
    .await;
    let mut late = connect_from([127, 0, 0, 4], addr).await.unwrap();
    assert!(read_head(&mut late).await.starts_with("HTTP/1.1 503"));
    assert_eq!(health(&gateway).await, 200);
    assert!(gateway.open_files() <= 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_are_cut_by_the_memory_budget_and_memory_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let limits =
        "outbound_memory_bytes = 8388608\nbytes_per_sec = 33554432\nbytes_burst = 33554432";
    let gateway = start(&dir, limits, "");
    let mut bystander = ws_client(&gateway).await;
    echo(&mut bystander, "warm").await;
    let baseline = gateway.rss_bytes();

    // 24 clients ask for echoes and never read: each queue fills to half its 4 MiB before
    // the gateway stops reading that client, far more than the 8 MiB budget.
    let payload = "e".repeat(30_000);
    let frame = masked_text(&payload);
    let mut clients = Vec::new();
    for i in 0..24u8 {
        clients.push(raw_client([127, 0, 3, i + 1], gateway.ws_addr()).await);
    }
    let mut floods = Vec::new();
    for mut client in clients {
        let frame = frame.clone();
        floods.push(tokio::spawn(async move {
            flood(
                &mut client.stream,
                &frame,
                Duration::from_secs(8),
                Duration::from_secs(1),
            )
            .await;
            client
        }));
    }
    let mut attackers = Vec::new();
    for flooding in floods {
        attackers.push(flooding.await.unwrap());
    }
    eventually(
        Duration::from_secs(15),
        "the budget cuts the biggest queues",
        async || {
            gateway
                .metric("switchboard_overload_disconnects_total")
                .await
                >= 1.0
        },
    )
    .await;
    echo(&mut bystander, "unaffected").await;
    // (A client that reads nothing cannot be told why; its `$disconnect` says 1013.)
    eventually(
        Duration::from_secs(5),
        "overloaded disconnects reported",
        async || {
            gateway
                .metric("switchboard_disconnects_total{reason=\"overloaded\"}")
                .await
                >= 1.0
        },
    )
    .await;
    drop(attackers);
    // The budget recovers: new connections are accepted again...
    eventually(Duration::from_secs(5), "no longer overloaded", async || {
        gateway.metric("switchboard_overloaded").await == 0.0
    })
    .await;
    let mut newcomer = ws_client(&gateway).await;
    echo(&mut newcomer, "welcome back").await;
    // ...and the memory comes back.
    let ceiling = 2 * baseline + 50 * MIB;
    eventually(
        Duration::from_secs(30),
        "RSS back under 2x baseline + 50 MiB",
        async || gateway.rss_bytes() <= ceiling,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_an_error_frame_and_a_clear_refusal_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("small-disk");
    let _disk = crate::faults::SmallDisk::mount(&data, 4);
    // Space to give back later, as an operator would by cleaning up.
    let ballast = data.join("ballast");
    std::fs::write(&ballast, vec![0u8; 1024 * 1024]).unwrap();
    let path = dir.path().join("full.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[management]\nlisten = \"127.0.0.1:0\"\n[storage]\nfsync = \"never\"\n[limits]\nmessages_per_sec = 0\nbytes_per_sec = 0\n{ROUTES}",
            data.join("data").display()
        ),
    )
    .unwrap();
    let gateway = GatewayProcess::start(&path, &[]);
    let mut writer = ws_client(&gateway).await;
    let body = "d".repeat(4000);
    let mut refused = None;
    for _ in 0..5000 {
        let frame = json!({"action": "q", "data": body}).to_string();
        send_text(&mut writer, &frame).await;
        let reply = next_json(&mut writer).await;
        if reply["type"] != "ack" {
            refused = Some(reply);
            break;
        }
    }
    let refused = refused.expect("the 4 MiB disk filled up");
    let message = refused["message"].as_str().unwrap();
    assert!(message.contains("out of disk space"), "{message}");
    // The gateway carries on: the same client is served, the API answers.
    echo(&mut writer, "still connected").await;
    assert!(
        gateway
            .metric("switchboard_queue_append_errors_total{kind=\"disk_full\",queue=\"q\"}")
            .await
            >= 1.0
    );
    // A new connection is refused once its record cannot be written (the record log's last
    // page may hold a few more first): a backend would hear its `$connect` and, after a
    // crash, never its `$disconnect`. The client is told why, and so is /health.
    let (_newcomers, status, body) = connect_until_refused(gateway.ws_url.as_str(), 200).await;
    assert_eq!(status, 503);
    assert!(body.contains("cannot record the connection"), "{body}");
    let (health_status, reason) = health_reason(&gateway).await;
    assert_eq!(health_status, 503);
    assert!(reason.contains("connection records"), "{reason}");
    assert!(
        gateway
            .metric("switchboard_connections_total{result=\"unrecorded\",transport=\"websocket\"}")
            .await
            >= 1.0
    );
    // Space comes back: records are written again (unasked), connections open, appends
    // are stored and acknowledged.
    std::fs::remove_file(&ballast).unwrap();
    eventually(Duration::from_secs(10), "/health ok again", async || {
        health(&gateway).await == 200
    })
    .await;
    let mut other = ws_client(&gateway).await;
    echo(&mut other, "hello").await;
    let frame = json!({"action": "q", "data": "after cleanup"}).to_string();
    send_text(&mut writer, &frame).await;
    assert_eq!(next_json(&mut writer).await["type"], "ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_slowloris_is_dropped_and_bodies_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let management =
        "[management]\nmax_connections = 20\nheader_timeout_secs = 2\nbody_timeout_secs = 2";
    let path = write_config(dir.path(), &format!("{ROUTES}\n"));
    // write_config puts [management] first; append ours as the same table's keys.
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "[management]\n",
        &format!("{management}\n"),
        1,
    );
    std::fs::write(&path, text).unwrap();
    let gateway = GatewayProcess::start(&path, &[]);
    let api = gateway.api_addr();
    let files_before = gateway.open_files();
    let mut partial = Vec::new();
    for _ in 0..60 {
        let mut stream = TcpStream::connect(api).await.unwrap();
        let _ = stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
            .await;
        partial.push(stream);
    }
    // At most max_connections of them, and the health reserve's 16, hold a descriptor in
    // the gateway.
    assert!(
        gateway.open_files() <= files_before + 20 + 16 + 5,
        "{} open",
        gateway.open_files()
    );
    // A real request is answered once the partial ones have been dropped.
    assert_eq!(health(&gateway).await, 200);
    // Every partial request is closed by the gateway, none is answered.
    for stream in &mut partial {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
            .await
            .expect("a partial request is dropped")
            .unwrap_or(0);
        assert!(
            n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    // Bodies: too large is 413, too slow is 408.
    let too_large = http()
        .post(format!("{}/@connections/x", gateway.api_url))
        .body(vec![b'a'; 200_000])
        .send()
        .await
        .unwrap();
    assert_eq!(too_large.status().as_u16(), 413);
    let mut slow = TcpStream::connect(api).await.unwrap();
    slow.write_all(
        b"POST /dev/@rooms/r HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nabc",
    )
    .await
    .unwrap();
    assert!(read_head(&mut slow).await.starts_with("HTTP/1.1 408"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_another_address_takes_the_connections_place_along() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = start(&dir, "max_connections_per_ip = 1\n[api]\nresume = true", "");
    let addr = gateway.ws_addr();
    let url = format!("ws://{addr}/dev");
    let open = |source: [u8; 4], url: String| async move {
        let stream = connect_from(source, addr).await.unwrap();
        let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
        tokio_tungstenite::client_async(url, stream).await
    };
    let (mut ws, _) = open([127, 0, 0, 2], url.clone()).await.unwrap();
    let welcome = next_json(&mut ws).await;
    let token = welcome["resumeToken"].as_str().unwrap().to_owned();
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateway.metric("switchboard_connections_parked").await != 1.0 {
        assert!(Instant::now() < deadline, "the connection parks");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Parked, it still holds its address's one place.
    assert!(open([127, 0, 0, 2], url.clone()).await.is_err());
    // Its client comes back from another address (a phone that changed networks).
    let resume = format!("{url}?resume={token}&received=0");
    let (mut resumed, _) = open([127, 0, 0, 3], resume).await.unwrap();
    assert_eq!(next_json(&mut resumed).await["type"], "resumed");
    // The place went along: the old address has its place back, the new one's is taken.
    let (_other, _) = open([127, 0, 0, 2], url.clone()).await.unwrap();
    assert!(open([127, 0, 0, 3], url).await.is_err());
}
