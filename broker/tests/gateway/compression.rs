//! permessage-deflate on the wire: what is negotiated, a compressed message in and out, a
//! broadcast compressed once for the members that negotiated it and sent plain to the
//! others, small messages left alone, a decompression bomb closed 1009, and Python's
//! `websockets` talking to it as it does by default.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
    let mut stream = TcpStream::connect(gateway.ws_addr).await.unwrap();
    let offer = extensions.map_or(String::new(), |e| {
        format!("Sec-WebSocket-Extensions: {e}\r\n")
    });
    let request = format!(
        "GET /{} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n",
        gateway.stage
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

#[tokio::test]
async fn offers_are_answered_with_no_context_takeover_or_passed_over() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, CONFIG)).await;
    let answer = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
    for offer in [
        "permessage-deflate",
        "permessage-deflate; client_max_window_bits",
        "permessage-deflate; server_max_window_bits=10, permessage-deflate; client_no_context_takeover",
    ] {
        assert_eq!(
            open(&gateway, Some(offer)).await.1.as_deref(),
            Some(answer),
            "{offer}"
        );
    }
    for offer in [
        None,
        Some("permessage-deflate; server_max_window_bits=9"),
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
    let packed = switchboard::compression::compress(text.as_bytes(), 6);
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
async fn a_decompression_bomb_is_closed_1009_and_rsv1_without_deflate_1002() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, CONFIG)).await;
    let (mut client, _) = open(&gateway, Some("permessage-deflate")).await;
    let bomb = switchboard::compression::compress(&vec![0u8; 16 << 20], 9);
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
