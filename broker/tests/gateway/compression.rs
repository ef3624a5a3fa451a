//! permessage-deflate on the wire: what is negotiated, compressed messages in and out (whole,
//! fragmented, mixed with plain ones), a broadcast compressed once per window for the members
//! that negotiated it and sent plain to the others, small messages left alone, decompression
//! bombs closed 1009 with the gateway's memory flat, and Python's `websockets` talking to it
//! as it does by default.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::binary::{GatewayProcess, write_config};
use crate::support::*;

const CONFIG: &str = r#"
[server.compression]
enabled = true
min_bytes = 64
[routes.join]
integration = { type = "room_join", room = "$request.body.room" }
[routes."$default"]
integration = { type = "echo" }
"#;

/// A client on a bare socket that offers `extensions`; the 101's extension answer.
async fn open(gateway: &TestGateway, extensions: Option<&str>) -> (TcpStream, Option<String>) {
    open_at(gateway.ws_addr, &gateway.stage, extensions).await
}

async fn open_at(
    addr: std::net::SocketAddr,
    stage: &str,
    extensions: Option<&str>,
) -> (TcpStream, Option<String>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let offer = extensions.map_or(String::new(), |e| {
        format!("Sec-WebSocket-Extensions: {e}\r\n")
    });
    let request = format!(
        "GET /{stage} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let answer = (head.lines())
        .find_map(|line| line.strip_prefix("Sec-WebSocket-Extensions: "))
        .map(str::to_owned);
    (stream, answer)
}

/// One server frame: (RSV1 set, opcode, payload).
async fn read_frame(stream: &mut TcpStream) -> (bool, u8, Vec<u8>) {
    let read = async {
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await.unwrap();
        let len = match head[1] & 0x7F {
            126 => u64::from(stream.read_u16().await.unwrap()),
            127 => stream.read_u64().await.unwrap(),
            small => u64::from(small),
        };
        let mut payload = vec![0u8; len as usize];
        stream.read_exact(&mut payload).await.unwrap();
        (head[0] & 0x40 != 0, head[0] & 0x0F, payload)
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a frame")
}

fn masked(rsv1: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let first = opcode | if rsv1 { 0x40 } else { 0 };
    switchboard::frame::encode_masked(true, first, payload, [7, 7, 7, 7])
}

/// `data` inflated by a client whose window is 2^`window_bits` bytes, as a browser with
/// that window would (zlib refuses a distance past its window).
fn inflate_in_window(data: &[u8], window_bits: u8) -> Result<Vec<u8>, flate2::DecompressError> {
    let mut inflater = flate2::Decompress::new_with_window_bits(false, window_bits);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    inflater.decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)?;
    Ok(out)
}

#[tokio::test]
async fn offers_are_answered_with_no_context_takeover_or_passed_over() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, CONFIG)).await;
    let answer = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
    let narrow = format!("{answer}; server_max_window_bits=10");
    for (offer, expected) in [
        ("permessage-deflate", answer),
        ("permessage-deflate; client_max_window_bits", answer),
        ("permessage-deflate; client_max_window_bits=10", answer),
        ("permessage-deflate; client_no_context_takeover", answer),
        (
            "permessage-deflate; server_max_window_bits=15",
            &format!("{answer}; server_max_window_bits=15"),
        ),
        ("permessage-deflate; server_max_window_bits=10", &narrow),
        (
            "permessage-deflate; server_max_window_bits=8, permessage-deflate; client_no_context_takeover",
            answer,
        ),
        ("x-webkit-deflate-frame, permessage-deflate", answer),
    ] {
        assert_eq!(
            open(&gateway, Some(offer)).await.1.as_deref(),
            Some(expected),
            "{offer}"
        );
    }
    // Nothing offered, an unknown or repeated parameter, a window zlib cannot keep to, an
    // unknown extension: no extension, and the connection still opens.
    for offer in [
        None,
        Some("permessage-deflate; server_max_window_bits=8"),
        Some("permessage-deflate; mystery=1"),
        Some("permessage-deflate; client_max_window_bits=16"),
        Some("permessage-deflate; client_no_context_takeover; client_no_context_takeover"),
        Some("x-unknown"),
    ] {
        assert_eq!(
            open(&gateway, offer).await.1,
            None,
            "{offer:?}: no compression"
        );
    }
    gateway.stop().await;
}

#[tokio::test]
async fn a_compressed_message_in_and_out_and_small_ones_plain() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, CONFIG)).await;
    let (mut client, answer) = open(&gateway, Some("permessage-deflate")).await;
    assert!(answer.is_some());
    let text = json!({"ticker": "BTC-USD", "bid": 64_123.5, "pad": "abc".repeat(200)}).to_string();
    let packed = switchboard::compression::compress(text.as_bytes(), 6, 15).unwrap();
    client.write_all(&masked(true, 0x1, &packed)).await.unwrap();
    let (rsv1, opcode, payload) = read_frame(&mut client).await;
    assert!(rsv1 && opcode == 0x1, "the echo comes back compressed");
    assert!(
        payload.len() < text.len() / 3,
        "{} bytes for {}",
        payload.len(),
        text.len()
    );
    let inflated = switchboard::compression::inflate(&payload, 1 << 20).unwrap();
    assert_eq!(inflated, text.as_bytes());
    // Under min_bytes: plain, either way.
    client.write_all(&masked(false, 0x1, b"hi")).await.unwrap();
    assert_eq!(read_frame(&mut client).await, (false, 0x1, b"hi".to_vec()));
    gateway.stop().await;
}

#[tokio::test]
async fn a_broadcast_is_compressed_for_who_negotiated_it_and_plain_for_the_rest() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, CONFIG)).await;
    let (mut deflating, _) = open(&gateway, Some("permessage-deflate")).await;
    let (mut plain, _) = open(&gateway, None).await;
    for client in [&mut deflating, &mut plain] {
        let join = json!({"action": "join", "room": "r"}).to_string();
        client
            .write_all(&masked(false, 0x1, join.as_bytes()))
            .await
            .unwrap();
    }
    for _ in 0..200 {
        let url = gateway.api_url("/@rooms/r");
        let listing = http().get(url).send().await.unwrap().text().await.unwrap();
        if listing.contains("\"count\":2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let news = "the same words again and again ".repeat(40);
    post_for_json(gateway.api_url("/@rooms/r"), news.clone()).await;
    let (rsv1, _, payload) = read_frame(&mut deflating).await;
    assert!(rsv1);
    let inflated = switchboard::compression::inflate(&payload, 1 << 20).unwrap();
    assert_eq!(inflated, news.as_bytes());
    assert_eq!(
        read_frame(&mut plain).await,
        (false, 0x1, news.into_bytes())
    );
    gateway.stop().await;
}

#[tokio::test]
async fn members_that_asked_for_a_smaller_window_get_bytes_made_for_it() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, CONFIG)).await;
    let mut members = Vec::new();
    for offer in [
        "permessage-deflate",
        "permessage-deflate; server_max_window_bits=10",
        "permessage-deflate; client_max_window_bits",
        "permessage-deflate; server_max_window_bits=10; client_no_context_takeover",
    ] {
        let (mut member, _) = open(&gateway, Some(offer)).await;
        let join = json!({"action": "join", "room": "windows"}).to_string();
        member
            .write_all(&masked(false, 0x1, join.as_bytes()))
            .await
            .unwrap();
        members.push(member);
    }
    for _ in 0..200 {
        let url = gateway.api_url("/@rooms/windows");
        let listing = http().get(url).send().await.unwrap().text().await.unwrap();
        if listing.contains("\"count\":4") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 2 KiB of letters, twice: the full window reaches the repeat, a 2^10 one cannot.
    let mut state = 11_u32;
    let half: String = (0..2048)
        .map(|_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            char::from(b'a' + (state >> 16) as u8 % 26)
        })
        .collect();
    let news = half.repeat(2);
    post_for_json(gateway.api_url("/@rooms/windows"), news.clone()).await;
    let mut frames = Vec::new();
    for member in &mut members {
        let (rsv1, opcode, payload) = read_frame(member).await;
        assert!(rsv1 && opcode == 0x1);
        frames.push(payload);
    }
    // Members with the same parameters got the same bytes; each inflates in its window.
    assert_eq!(frames[0], frames[2]);
    assert_eq!(frames[1], frames[3]);
    assert_eq!(inflate_in_window(&frames[0], 15).unwrap(), news.as_bytes());
    assert_eq!(inflate_in_window(&frames[1], 10).unwrap(), news.as_bytes());
    // The full window used the repeat 2 KiB back; the narrow one could not.
    let sizes = (frames[0].len(), frames[1].len());
    assert!(sizes.0 < 2000 && sizes.1 > 2048, "{sizes:?}");
    gateway.stop().await;
}

#[tokio::test]
async fn fragmented_compressed_messages_and_plain_ones_mix() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, CONFIG)).await;
    let (mut client, _) = open(&gateway, Some("permessage-deflate")).await;
    let text = json!({"chat": "hello there, ".repeat(50)}).to_string();
    let packed = switchboard::compression::compress(text.as_bytes(), 6, 15).unwrap();
    let third = packed.len() / 3;
    // RSV1 on the first frame only; a ping between the fragments.
    let mut frames = switchboard::frame::encode_masked(false, 0x41, &packed[..third], [1; 4]);
    frames.extend(masked(false, 0x9, b"ping"));
    let middle = &packed[third..2 * third];
    frames.extend(switchboard::frame::encode_masked(
        false, 0x0, middle, [2; 4],
    ));
    let last = &packed[2 * third..];
    frames.extend(switchboard::frame::encode_masked(true, 0x0, last, [3; 4]));
    // Then a large message sent plain, and a compressed one again.
    let plain = "plain and large ".repeat(30);
    frames.extend(masked(false, 0x1, plain.as_bytes()));
    frames.extend(masked(true, 0x1, &packed));
    client.write_all(&frames).await.unwrap();
    assert_eq!(
        read_frame(&mut client).await,
        (false, 0xA, b"ping".to_vec())
    );
    for expected in [&text, &plain, &text] {
        let (rsv1, opcode, payload) = read_frame(&mut client).await;
        assert!(
            rsv1 && opcode == 0x1,
            "echoes above min_bytes go compressed"
        );
        let inflated = switchboard::compression::inflate(&payload, 1 << 20).unwrap();
        assert_eq!(inflated, expected.as_bytes());
    }
    // RSV1 on a continuation frame is a protocol error.
    let mut bad = switchboard::frame::encode_masked(false, 0x41, &packed[..third], [1; 4]);
    bad.extend(switchboard::frame::encode_masked(
        true,
        0x40,
        &packed[third..],
        [2; 4],
    ));
    client.write_all(&bad).await.unwrap();
    let (_, opcode, payload) = read_frame(&mut client).await;
    assert_eq!(
        (opcode, u16::from_be_bytes([payload[0], payload[1]])),
        (0x8, 1002)
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_decompression_bomb_is_closed_1009_and_rsv1_without_deflate_1002() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, CONFIG)).await;
    let (mut client, _) = open(&gateway, Some("permessage-deflate")).await;
    let bomb = switchboard::compression::compress(&vec![0u8; 16 << 20], 9, 15).unwrap();
    assert!(bomb.len() < 32 << 10, "{}", bomb.len());
    client.write_all(&masked(true, 0x2, &bomb)).await.unwrap();
    let (_, opcode, payload) = read_frame(&mut client).await;
    assert_eq!(opcode, 0x8);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1009);
    // Without the extension, RSV1 is a protocol error.
    let (mut plain, _) = open(&gateway, None).await;
    plain.write_all(&masked(true, 0x1, b"x")).await.unwrap();
    let (_, opcode, payload) = read_frame(&mut plain).await;
    assert_eq!(
        (opcode, u16::from_be_bytes([payload[0], payload[1]])),
        (0x8, 1002)
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_burst_of_small_compressed_frames_that_inflate_large_is_served_in_full() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, CONFIG)).await;
    let (mut client, _) = open(&gateway, Some("permessage-deflate")).await;
    // 200 frames of about 40 bytes in one write, each 32 KiB inflated: 6.4 MiB in all.
    let frames: Vec<u8> = (0..200u8)
        .flat_map(|n| {
            let message = vec![b'a' + n % 26; 32 << 10];
            let packed = switchboard::compression::compress(&message, 6, 15).unwrap();
            masked(true, 0x2, &packed)
        })
        .collect();
    assert!(frames.len() < 16 << 10, "{}", frames.len());
    client.write_all(&frames).await.unwrap();
    for n in 0..200u8 {
        let (rsv1, opcode, payload) = read_frame(&mut client).await;
        assert!(rsv1 && opcode == 0x2);
        let echoed = switchboard::compression::inflate(&payload, 1 << 20).unwrap();
        assert_eq!(echoed, vec![b'a' + n % 26; 32 << 10], "message {n}");
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bombs_from_many_clients_at_once_leave_the_gateways_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let routes = CONFIG.replace(
        "min_bytes = 64\n",
        "min_bytes = 64\n[limits]\nmax_message_bytes = 1048576\n",
    );
    let gateway = GatewayProcess::start(&write_config(dir.path(), &routes), &[]);
    let bomb = switchboard::compression::compress(&vec![0u8; 16 << 20], 9, 15).unwrap();
    let frame = masked(true, 0x2, &bomb);
    let mut clients = Vec::new();
    for _ in 0..16 {
        let (client, answer) = open_at(gateway.ws_addr(), "dev", Some("permessage-deflate")).await;
        assert!(answer.is_some());
        clients.push(client);
    }
    let baseline = gateway.peak_rss_bytes();
    // 16 bombs of 16 MiB each, at once: 256 MiB if they were inflated.
    let closes = clients.iter_mut().map(async |client| {
        client.write_all(&frame).await.unwrap();
        let (_, opcode, payload) = read_frame(client).await;
        (opcode, u16::from_be_bytes([payload[0], payload[1]]))
    });
    for close in futures_util::future::join_all(closes).await {
        assert_eq!(close, (0x8, 1009));
    }
    let growth = gateway.peak_rss_bytes().saturating_sub(baseline);
    assert!(growth < 16 << 20, "peak RSS grew {} MiB", growth >> 20);
    // The gateway still serves.
    let (mut client, _) = open_at(gateway.ws_addr(), "dev", None).await;
    client
        .write_all(&masked(false, 0x1, b"still here"))
        .await
        .unwrap();
    assert_eq!(
        read_frame(&mut client).await,
        (false, 0x1, b"still here".to_vec())
    );
}

/// The next data message's payload, inflated if it came compressed.
async fn read_message(stream: &mut TcpStream) -> (bool, Vec<u8>) {
    let (rsv1, opcode, payload) = read_frame(stream).await;
    assert!(opcode == 0x1 || opcode == 0x2, "opcode {opcode}");
    match rsv1 {
        true => (
            true,
            switchboard::compression::inflate(&payload, 1 << 20).unwrap(),
        ),
        false => (false, payload),
    }
}

#[tokio::test]
async fn a_resumed_session_is_sent_again_as_its_new_socket_agreed() {
    let backend = Backend::start().await;
    let config = format!("{CONFIG}[api]\nresume = true\nresume_window_secs = 30\n");
    let gateway = TestGateway::start(&config_with(&backend, &config)).await;
    let (mut client, _) = open(&gateway, Some("permessage-deflate")).await;
    let welcome: serde_json::Value =
        serde_json::from_slice(&read_message(&mut client).await.1).unwrap();
    let id = welcome["connectionId"].as_str().unwrap().to_owned();
    let token = |frame: &serde_json::Value| frame["resumeToken"].as_str().unwrap().to_owned();
    let big = |n: usize| format!("{n:03} {}", "send me again ".repeat(30));
    let push = async |n: usize| {
        let url = gateway.api_url(&format!("/@connections/{id}"));
        assert_eq!(post_body(url, big(n)).await.status(), 200);
    };
    for n in 1..=4 {
        push(n).await;
    }
    assert_eq!(read_message(&mut client).await, (true, big(1).into_bytes()));
    drop(client);
    gateway.wait_for_parked(1.0).await;
    // Back without an offer: the rest comes plain.
    let path = format!("{}?resume={}&received=1", gateway.stage, token(&welcome));
    let (mut plain, answer) = open_at(gateway.ws_addr, &path, None).await;
    assert_eq!(answer, None);
    let (rsv1, resumed) = read_message(&mut plain).await;
    let resumed: serde_json::Value = serde_json::from_slice(&resumed).unwrap();
    assert!(!rsv1 && resumed["type"] == "resumed", "{resumed}");
    for n in 2..=4 {
        assert_eq!(read_message(&mut plain).await, (false, big(n).into_bytes()));
    }
    drop(plain);
    gateway.wait_for_parked(1.0).await;
    push(5).await;
    // And with one again: compressed again, from the same kept messages.
    let path = format!("{}?resume={}&received=3", gateway.stage, token(&resumed));
    let (mut deflating, answer) = open_at(gateway.ws_addr, &path, Some("permessage-deflate")).await;
    assert!(answer.is_some());
    let resumed: serde_json::Value =
        serde_json::from_slice(&read_message(&mut deflating).await.1).unwrap();
    assert_eq!(resumed["replayed"], 2, "{resumed}");
    for n in 4..=5 {
        assert_eq!(
            read_message(&mut deflating).await,
            (true, big(n).into_bytes())
        );
    }
    gateway.stop().await;
}

#[tokio::test]
async fn python_websockets_negotiates_it_and_round_trips() {
    if !python_has("websockets") {
        return;
    }
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, CONFIG)).await;
    let script = r#"
import asyncio, json, sys, websockets
async def main(url):
    async with websockets.connect(url) as ws:
        big = json.dumps({"data": "x" * 5000})
        await ws.send(big)
        assert await ws.recv() == big
        await ws.send("hi")
        assert await ws.recv() == "hi"
        print(ws.response.headers.get("Sec-WebSocket-Extensions"))
asyncio.run(main(sys.argv[1]))
"#;
    let output = tokio::process::Command::new("python3")
        .args(["-c", script, &gateway.ws_url()])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.starts_with("permessage-deflate"), "{stdout}");
    gateway.stop().await;
}
