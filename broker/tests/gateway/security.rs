//! The second security review's findings, each reproduced as an attacker would try it and
//! shown refused: guessable management tokens, secrets in `check-config`'s output, a second
//! process on the client port, unauthenticated work on the management API, browser pages
//! driving a credential-less API, permissive JWT settings and repeated identity sources.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::binary::*;
use crate::support::*;

/// A token as an operator makes one.
const TOKEN: &str = "5b0d8a1f3c7e9b2d4f6a8c0e1b3d5f7a";

fn check_config(path: &std::path::Path, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let output = std::process::Command::new(BIN)
        .arg("check-config")
        .arg(path)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn guessable_management_tokens_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for token in ["change-me", "compose-demo-token", "short"] {
        let path = write_config(dir.path(), &format!("tokens = [\"{token}\"]\n"));
        let (code, stderr) = refused_start(&path, Duration::from_secs(20));
        assert_eq!(code, Some(64), "{token}: {stderr}");
        assert!(stderr.contains("management.tokens"), "{stderr}");
        assert!(stderr.contains("openssl rand -hex 32"), "{stderr}");
    }
    // A token from the environment: refused while the variable is unset, used once set.
    let path = write_config(dir.path(), "tokens = [\"${SB_SECURITY_TEST_TOKEN}\"]\n");
    let (code, _, stderr) = check_config(&path, &[]);
    assert_eq!(code, Some(64));
    assert!(
        stderr.contains("SB_SECURITY_TEST_TOKEN is not set"),
        "{stderr}"
    );
    let (code, stdout, stderr) = check_config(&path, &[("SB_SECURITY_TEST_TOKEN", TOKEN)]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("${SB_SECURITY_TEST_TOKEN}"), "{stdout}");
    // A weak value in the environment is as bad as one in the file.
    let (code, _, stderr) = check_config(&path, &[("SB_SECURITY_TEST_TOKEN", "change-me")]);
    assert_eq!(code, Some(64), "{stderr}");
    // A token file (a mounted secret).
    let secret = dir.path().join("token");
    std::fs::write(&secret, format!("# rotated today\n{TOKEN}\n")).unwrap();
    let path = write_config(
        dir.path(),
        &format!("tokens_file = \"{}\"\n", secret.display()),
    );
    let (code, _, stderr) = check_config(&path, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    std::fs::write(&secret, "change-me\n").unwrap();
    let (code, _, stderr) = check_config(&path, &[]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("management.tokens_file"), "{stderr}");
}

#[test]
fn check_config_shows_no_secret_and_refuses_a_data_dir_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "tokens = [\"{TOKEN}\"]\n[[management.aws_keys]]\naccess_key_id = \"AKIDEXAMPLE\"\nsecret_access_key = \"wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY\"\n[authorizer]\ntype = \"jwt\"\nsecret = \"hs256-signing-secret\"\n"
    );
    let path = write_config(dir.path(), &body);
    let (code, stdout, stderr) = check_config(&path, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    for secret in [TOKEN, "wJalrXUtnFEMI", "hs256-signing-secret"] {
        assert!(!stdout.contains(secret), "{secret} printed: {stdout}");
    }
    assert!(stdout.contains("AKIDEXAMPLE"), "key ids are not secret");
    assert!(stdout.contains("<redacted>"));
    // Only the keys of the authorizer type in use.
    assert!(!stdout.contains("cache_ttl_secs"), "{stdout}");
    // While a gateway runs on the data dir, the config is not OK to start a second one.
    let _running = GatewayProcess::start(&path, &[]);
    let (code, _, stderr) = check_config(&path, &[]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("locked"), "{stderr}");
}

#[test]
fn a_second_gateway_cannot_share_the_client_port() {
    let first_dir = tempfile::tempdir().unwrap();
    let first = GatewayProcess::start(&write_config(first_dir.path(), ""), &[]);
    let second_dir = tempfile::tempdir().unwrap();
    let path = write_config(second_dir.path(), "")
        .to_str()
        .map(|p| {
            let text = std::fs::read_to_string(p).unwrap().replacen(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"{}\"", first.ws_addr()),
                1,
            );
            std::fs::write(p, text).unwrap();
            std::path::PathBuf::from(p)
        })
        .unwrap();
    let (code, stderr) = refused_start(&path, Duration::from_secs(20));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("server.listen"), "{stderr}");
    assert!(stderr.contains("already listens"), "{stderr}");
}

/// Sends `head` (a request without its body) and reads the answer's status line.
async fn status_before_body(addr: std::net::SocketAddr, head: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    head.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn unauthenticated_requests_are_refused_before_their_body_is_read() {
    let backend = Backend::start().await;
    let config = config_with(
        &backend,
        &format!(
            "[management]\ntokens = [\"{TOKEN}\"]\nbody_timeout_secs = 60\n[[management.aws_keys]]\naccess_key_id = \"AKIDEXAMPLE\"\nsecret_access_key = \"wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY\""
        ),
    );
    let gateway = TestGateway::start(&config).await;
    let api = gateway.api_addr;
    // Each announces a 4 MB body and sends none: the answer cannot wait for it (the body
    // timeout is a minute; `read_head` gives up after 10 s).
    let post = |authorization: &str| {
        format!(
            "POST /dev/@connections HTTP/1.1\r\nHost: localhost\r\n{authorization}Content-Length: 4000000\r\n\r\n"
        )
    };
    let no_credentials = status_before_body(api, &post("")).await;
    assert!(no_credentials.contains("403"), "{no_credentials}");
    let wrong_token = status_before_body(api, &post("Authorization: Bearer nope\r\n")).await;
    assert!(wrong_token.contains("403"), "{wrong_token}");
    let unknown_key = status_before_body(
        api,
        &post("Authorization: AWS4-HMAC-SHA256 Credential=AKIDNOBODY/20261207/us-east-1/execute-api/aws4_request, SignedHeaders=host;x-amz-date, Signature=00\r\nX-Amz-Date: 20261207T000000Z\r\n"),
    )
    .await;
    assert!(unknown_key.contains("403"), "{unknown_key}");
    let stale = status_before_body(
        api,
        &post("Authorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20200101/us-east-1/execute-api/aws4_request, SignedHeaders=host;x-amz-date, Signature=00\r\nX-Amz-Date: 20200101T000000Z\r\n"),
    )
    .await;
    assert!(stale.contains("403"), "{stale}");
    // A valid token, but more than the route reads (one message): 413 before a byte is read.
    let too_long = post(&format!("Authorization: Bearer {TOKEN}\r\n"))
        .replace("/dev/@connections", "/dev/@connections/abc");
    let too_long = status_before_body(api, &too_long).await;
    assert!(too_long.contains("413"), "{too_long}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_the_management_pool_and_health_keeps_answering() {
    let backend = Backend::start().await;
    let config = config_with(
        &backend,
        "[management]\nmax_connections = 8\nmax_connections_per_ip = 4\nheader_timeout_secs = 30",
    );
    let gateway = TestGateway::start(&config).await;
    let api = gateway.api_addr;
    let partial = |source: [u8; 4]| async move {
        let mut stream = connect_from(source, api).await.unwrap();
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
            .await
            .unwrap();
        stream
    };
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(partial([127, 0, 0, 2]).await);
    }
    // The address's fifth is closed at once, unanswered.
    let mut fifth = partial([127, 0, 0, 2]).await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), fifth.read(&mut buf))
        .await
        .expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Two more addresses fill the pool.
    for source in [[127, 0, 0, 3], [127, 0, 0, 4]] {
        for _ in 0..2 {
            held.push(partial(source).await);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The load balancer's health check still gets its answer, other calls a quick 503.
    let ask = |path: &'static str| async move {
        let mut stream = connect_from([127, 0, 0, 5], api).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        read_head(&mut stream).await
    };
    let health = ask("/health").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let busy = ask("/dev/@connections/abc").await;
    assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
    drop(held);
    gateway.stop().await;
}

#[tokio::test]
async fn without_credentials_web_pages_cannot_drive_the_api() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, "")).await;
    let (_ws, id) = gateway.connect_with_id(&backend).await;
    let api = gateway.api_addr;
    let url = format!("http://{api}/dev/@rooms/lobby");
    // A cross-site text/plain POST (no preflight) from a page in the operator's browser.
    let forged = http()
        .post(&url)
        .header("Origin", "https://evil.example")
        .header("Content-Type", "text/plain")
        .body("pwned")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    // DNS rebinding: the page's own host name resolving to 127.0.0.1.
    for path in [
        "/dev/@rooms/lobby",
        "/metrics",
        &format!("/dev/@connections/{id}"),
    ] {
        let mut stream = tokio::net::TcpStream::connect(api).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: evil.example:9090\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let head = read_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 403"), "{path}: {head}");
    }
    // Local tools (curl, SDKs) are served as before; so are the public routes.
    let local = http().post(&url).body("hello").send().await.unwrap();
    assert_eq!(local.status(), 200);
    let health = http()
        .get(format!("http://{api}/health"))
        .header("Origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    gateway.stop().await;
}

#[test]
fn jwt_and_nats_settings_that_would_let_strangers_in_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, r#"{"keys": []}"#).unwrap();
    let cases = [
        (
            format!("[authorizer]\ntype = \"jwt\"\njwks = \"{}\"\n", jwks.display()),
            "authorizer.audience",
        ),
        (
            "[authorizer]\ntype = \"jwt\"\njwks = \"http://idp.example/keys\"\naudience = \"chat\"\n"
                .to_owned(),
            "authorizer.jwks",
        ),
        (
            "[cluster]\nnats_url = \"nats://nats.internal:4222\"\ntoken = \"t\"\n".to_owned(),
            "cluster.token",
        ),
    ];
    for (body, key) in cases {
        let path = write_config(dir.path(), &body);
        let (code, _, stderr) = check_config(&path, &[]);
        assert_eq!(code, Some(64), "{body}: {stderr}");
        assert!(stderr.contains(key), "{key} in {stderr}");
    }
    let any_audience = format!(
        "[authorizer]\ntype = \"jwt\"\njwks = \"{}\"\naudience = \"*\"\n",
        jwks.display()
    );
    let (code, _, stderr) = check_config(&write_config(dir.path(), &any_audience), &[]);
    assert_eq!(code, Some(0), "written out explicitly: {stderr}");
}

#[tokio::test]
async fn a_repeated_identity_source_is_a_bad_request() {
    let backend = Backend::start().await;
    let config = config_with(
        &backend,
        "[authorizer]\ntype = \"api_key\"\ntoken = \"query:key\"\nkeys = [\"good-key\"]",
    );
    let gateway = TestGateway::start(&config).await;
    let url = |query: &str| format!("{}?{query}", gateway.ws_url());
    assert_eq!(request_status(url("key=good-key")).await, 101);
    // The authorizer would read the first, the backend's event the last.
    assert_eq!(request_status(url("key=good-key&key=forged")).await, 400);
    assert_eq!(request_status(url("key=forged&key=good-key")).await, 400);
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let header_config = config_with(
        &backend,
        "[authorizer]\ntype = \"api_key\"\ntoken = \"header:x-api-key\"\nkeys = [\"good-key\"]",
    );
    let other = TestGateway::start(&header_config).await;
    let mut request = other.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .append("x-api-key", "good-key".parse().unwrap());
    request
        .headers_mut()
        .append("x-api-key", "forged".parse().unwrap());
    assert_eq!(request_status(request).await, 400);
    assert_eq!(
        backend.events("/connect-log").len(),
        1,
        "only the good request reached $connect"
    );
    other.stop().await;
    gateway.stop().await;
}

/// A PROXY protocol v2 header for a TCP over IPv4 client `client:port`.
fn proxy_header(client: [u8; 4], port: u16) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend([0x21, 0x11, 0, 12]);
    header.extend(client);
    header.extend([127, 0, 0, 1]);
    header.extend(port.to_be_bytes());
    header.extend(8080u16.to_be_bytes());
    header
}

const UPGRADE: &str = "GET /dev HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// Connects from `source`, sends `prefix` and an upgrade request; the answer's head.
async fn upgrade_via(
    source: [u8; 4],
    gateway: &TestGateway,
    prefix: &[u8],
) -> (tokio::net::TcpStream, String) {
    let mut stream = connect_from(source, gateway.ws_addr).await.unwrap();
    let mut request = prefix.to_vec();
    request.extend(UPGRADE.as_bytes());
    stream.write_all(&request).await.unwrap();
    let head = read_head(&mut stream).await;
    (stream, head)
}

#[tokio::test]
async fn behind_a_trusted_proxy_limits_count_each_client_not_the_proxy() {
    let backend = Backend::start().await;
    let config = config_with(
        &backend,
        "[server]\ntrusted_proxies = [\"127.0.0.2\"]\n[limits]\nmax_connections_per_ip = 1",
    );
    let gateway = TestGateway::start(&config).await;
    let (_first, head) = upgrade_via(
        [127, 0, 0, 2],
        &gateway,
        &proxy_header([198, 51, 100, 1], 40000),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let connect = backend.wait_for("/connect-log", |_| true).await;
    assert_eq!(
        connect["requestContext"]["identity"]["sourceIp"],
        "198.51.100.1"
    );
    // The same client again through the proxy: its own limit, not the proxy's.
    let (_again, head) = upgrade_via(
        [127, 0, 0, 2],
        &gateway,
        &proxy_header([198, 51, 100, 1], 40001),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    // Another client through the same proxy has a place of its own.
    let (_other, head) = upgrade_via(
        [127, 0, 0, 2],
        &gateway,
        &proxy_header([198, 51, 100, 2], 40002),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // A trusted proxy that sends no header is let go unanswered.
    let mut bare = connect_from([127, 0, 0, 2], gateway.ws_addr).await.unwrap();
    bare.write_all(UPGRADE.as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), bare.read(&mut buf))
        .await
        .expect("let go at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Anyone else's header is not believed: it is not even a request.
    let (_forged, head) = upgrade_via(
        [127, 0, 0, 3],
        &gateway,
        &proxy_header([198, 51, 100, 9], 1),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    gateway.stop().await;
}
