//! The handshake is `$connect`: paths, backend verdicts, sub-protocols, the CONNECT event,
//! connection limits.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::*;

fn connect_route(url: &str) -> String {
    format!("[routes.\"$connect\"]\nintegration = {{ type = \"http\", url = \"{url}\" }}\n")
}

#[tokio::test]
async fn no_connect_route_accepts() {
    let gateway = TestGateway::start("").await;
    assert_eq!(request_status(&gateway.ws_url()).await, 101);
    gateway.stop().await;
}

#[tokio::test]
async fn unknown_stage_path_is_404_before_upgrading() {
    let gateway = TestGateway::start("").await;
    let url = format!("ws://{}/prod", gateway.ws_addr);
    assert_eq!(request_status(&url).await, 404);
    let url = format!("ws://{}/", gateway.ws_addr);
    assert_eq!(request_status(&url).await, 404);
    gateway.stop().await;
}

#[tokio::test]
async fn plain_http_request_gets_400() {
    let gateway = TestGateway::start("").await;
    let mut stream = TcpStream::connect(gateway.ws_addr).await.unwrap();
    stream
        .write_all(b"GET /dev HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut stream).await.starts_with("HTTP/1.1 400"));
    gateway.stop().await;
}

#[tokio::test]
async fn backend_status_is_passed_through_verbatim() {
    let backend = Backend::start().await;
    for code in [401u16, 403, 301, 501] {
        let config = connect_route(&format!("{}/status/{code}", backend.url));
        let gateway = TestGateway::start(&config).await;
        assert_eq!(request_status(&gateway.ws_url()).await, code);
        gateway.stop().await;
    }
    let config = connect_route(&format!("{}/http-status/403", backend.url));
    let gateway = TestGateway::start(&config).await;
    assert_eq!(request_status(&gateway.ws_url()).await, 403);
    gateway.stop().await;
}

#[tokio::test]
async fn unreachable_backend_is_502() {
    let config = connect_route(&dead_url().await);
    let gateway = TestGateway::start(&config).await;
    assert_eq!(request_status(&gateway.ws_url()).await, 502);
    gateway.stop().await;
}

#[tokio::test]
async fn backend_chosen_subprotocol_is_echoed() {
    let backend = Backend::start().await;
    let config = connect_route(&format!("{}/protocol", backend.url));
    let gateway = TestGateway::start(&config).await;
    let mut request = gateway.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "chat, superchat".parse().unwrap());
    let (_ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "chat");
    gateway.stop().await;
}

#[tokio::test]
async fn connect_event_carries_headers_query_and_identity() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, "")).await;
    let url = format!("{}?token=abc&tag=1&tag=2", gateway.ws_url());
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("User-Agent", "switchboard-test".parse().unwrap());
    let (_ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let event = backend.wait_for("/connect-log", |_| true).await;
    let context = &event["requestContext"];
    assert_eq!(context["eventType"], "CONNECT");
    assert_eq!(context["routeKey"], "$connect");
    assert_eq!(context["stage"], "dev");
    assert_eq!(context["messageDirection"], "IN");
    assert_eq!(context["identity"]["sourceIp"], "127.0.0.1");
    assert_eq!(context["identity"]["userAgent"], "switchboard-test");
    assert!(context["connectedAt"].as_u64().unwrap() > 1_700_000_000_000);
    assert!(context["requestTimeEpoch"].as_u64().is_some());
    assert!(context["requestTime"].as_str().unwrap().ends_with(" +0000"));
    for field in [
        "requestId",
        "extendedRequestId",
        "domainName",
        "apiId",
        "connectionId",
    ] {
        assert!(
            context[field].as_str().is_some_and(|s| !s.is_empty()),
            "{field}"
        );
    }
    assert_eq!(event["queryStringParameters"]["token"], "abc");
    assert_eq!(
        event["multiValueQueryStringParameters"]["tag"],
        serde_json::json!(["1", "2"])
    );
    // Header names arrive as the client spelled them (this client lower-cases them).
    let header = |name: &str| {
        event["headers"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header("User-Agent").unwrap(), "switchboard-test");
    assert!(header("Sec-WebSocket-Key").is_some());
    assert!(
        event["multiValueHeaders"]
            .as_object()
            .unwrap()
            .values()
            .all(|v| v.is_array())
    );
    gateway.stop().await;
}

#[tokio::test]
async fn connection_limit_answers_503() {
    let gateway = TestGateway::start("[server]\nmax_connections = 2").await;
    let _a = gateway.connect().await;
    let _b = gateway.connect().await;
    assert_eq!(request_status(&gateway.ws_url()).await, 503);
    drop(_a);
    // The freed slot becomes available once the gateway has seen the close.
    let mut admitted = false;
    for _ in 0..50 {
        if request_status(&gateway.ws_url()).await == 101 {
            admitted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(admitted, "a slot frees up after a client leaves");
    gateway.stop().await;
}

#[tokio::test]
async fn silent_client_is_dropped_after_the_handshake_timeout() {
    let gateway = TestGateway::start("[limits]\nhandshake_timeout_secs = 1").await;
    let mut stream = TcpStream::connect(gateway.ws_addr).await.unwrap();
    stream.write_all(b"GET /dev HTTP/1.1\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut stream, &mut buf),
    )
    .await
    .expect("the gateway hangs up within the timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "connection closed");
    gateway.stop().await;
}

#[tokio::test]
async fn malformed_upgrades_get_400_not_101() {
    let gateway = TestGateway::start("").await;
    let valid = "GET /dev HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    for (from, to) in [
        ("HTTP/1.1", "HTTP/1.0"),
        ("Host: x\r\n", ""),
        ("dGhlIHNhbXBsZSBub25jZQ==", "***not-base64-at-all***"),
        ("dGhlIHNhbXBsZSBub25jZQ==", "dG9vIHNob3J0"),
    ] {
        let mut stream = TcpStream::connect(gateway.ws_addr).await.unwrap();
        let request = valid.replace(from, to);
        stream.write_all(request.as_bytes()).await.unwrap();
        let head = read_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{from} -> {to}: {head}");
    }
    let mut stream = TcpStream::connect(gateway.ws_addr).await.unwrap();
    stream.write_all(valid.as_bytes()).await.unwrap();
    assert!(read_head(&mut stream).await.starts_with("HTTP/1.1 101"));
    gateway.stop().await;
}
