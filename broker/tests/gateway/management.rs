//! The `@connections` API in AWS's wire format, `/health` and `/metrics`.

use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// A management token as an operator makes one (`openssl rand -hex 16` is 32 bytes).
const TOKEN: &str = "0f3b5c1e9a7d4b2c8e6f1a3d5b7c9e2f";

#[tokio::test]
async fn post_get_delete_round_trip() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, "")).await;
    let (mut ws, id) = gateway.connect_with_id(&backend).await;
    let client = http();
    let url = gateway.api_url(&format!("/@connections/{id}"));

    let response = client.post(&url).body("pushed text").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(next_text(&mut ws).await, "pushed text");

    let response = client
        .post(&url)
        .body(vec![0xffu8, 0xfe])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        next_message(&mut ws).await,
        Message::binary(vec![0xffu8, 0xfe])
    );

    let response = client.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let status: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert!(status["connectedAt"].as_str().unwrap().ends_with('Z'));
    assert!(status["lastActiveAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(status["identity"]["sourceIp"], "127.0.0.1");
    assert!(status["identity"]["userAgent"].is_string());

    let response = client.delete(&url).send().await.unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(close_code(&mut ws).await, 1000);
    let event = backend.wait_for("/disconnect", |_| true).await;
    assert_eq!(event["requestContext"]["connectionId"], id.as_str());

    let response = client.post(&url).body("late").send().await.unwrap();
    assert_eq!(response.status(), 410);
    gateway.stop().await;
}

#[tokio::test]
async fn percent_encoded_ids_are_decoded() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, "")).await;
    let (mut ws, id) = gateway.connect_with_id(&backend).await;
    // SDKs percent-encode every character outside the unreserved set.
    let encoded: String = id
        .chars()
        .map(|c| {
            if c == '-' || c == '_' {
                format!("%{:02X}", c as u8)
            } else {
                c.to_string()
            }
        })
        .collect();
    let url = gateway.api_url(&format!("/@connections/{encoded}"));
    let response = http()
        .post(&url)
        .body("via encoded id")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(next_text(&mut ws).await, "via encoded id");
    gateway.stop().await;
}

#[tokio::test]
async fn unknown_ids_are_gone_with_the_aws_error_shape() {
    let gateway = TestGateway::start("").await;
    let client = http();
    for id in ["nonsense", "abc%3D", "AAAAAAAAAAAAAAAAAAAAAA"] {
        for method in [
            reqwest::Method::POST,
            reqwest::Method::GET,
            reqwest::Method::DELETE,
        ] {
            let url = gateway.api_url(&format!("/@connections/{id}"));
            let response = client.request(method.clone(), &url).send().await.unwrap();
            assert_eq!(response.status(), 410, "{method} {id}");
            assert_eq!(response.headers()["x-amzn-errortype"], "GoneException");
            let body: serde_json::Value =
                serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
            assert!(body["message"].as_str().unwrap().contains("gone"));
        }
    }
    gateway.stop().await;
}

#[tokio::test]
async fn oversize_push_is_413_and_the_connection_is_unharmed() {
    let backend = Backend::start().await;
    let config = config_with(
        &backend,
        "[limits]\nmax_frame_bytes = 1024\nmax_message_bytes = 2048",
    );
    let gateway = TestGateway::start(&config).await;
    let (mut ws, id) = gateway.connect_with_id(&backend).await;
    let url = gateway.api_url(&format!("/@connections/{id}"));
    let response = http()
        .post(&url)
        .body(vec![b'x'; 2049])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(
        response.headers()["x-amzn-errortype"],
        "PayloadTooLargeException"
    );
    let response = http()
        .post(&url)
        .body(vec![b'y'; 2048])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(next_text(&mut ws).await, "y".repeat(2048));
    gateway.stop().await;
}

#[tokio::test]
async fn wrong_stage_is_404() {
    let gateway = TestGateway::start("").await;
    let url = format!("http://{}/prod/@connections/abc", gateway.api_addr);
    let response = http().post(&url).body("x").send().await.unwrap();
    assert_eq!(response.status(), 404);
    gateway.stop().await;
}

#[tokio::test]
async fn tokens_guard_the_api() {
    let backend = Backend::start().await;
    let config = config_with(&backend, &format!("[management]\ntokens = [\"{TOKEN}\"]"));
    let gateway = TestGateway::start(&config).await;
    let (mut ws, id) = gateway.connect_with_id(&backend).await;
    let url = gateway.api_url(&format!("/@connections/{id}"));
    let client = http();
    assert_eq!(
        client.post(&url).body("x").send().await.unwrap().status(),
        403
    );
    let wrong = client
        .post(&url)
        .bearer_auth("nope")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 403);
    let right = client
        .post(&url)
        .bearer_auth(TOKEN)
        .body("ok")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    assert_eq!(next_text(&mut ws).await, "ok");
    // A token is no access key: an unverifiable signature naming it is refused.
    let sigv4 = format!(
        "AWS4-HMAC-SHA256 Credential={TOKEN}/20261125/us-east-1/execute-api/aws4_request, SignedHeaders=host, Signature=0"
    );
    let signed = client
        .get(&url)
        .header("Authorization", sigv4)
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), 403);
    assert_eq!(
        signed.headers()["x-amzn-ErrorType"],
        "UnrecognizedClientException"
    );
    let health = client
        .get(format!("http://{}/health", gateway.api_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "health needs no token");
    gateway.stop().await;
}

#[tokio::test]
async fn health_and_metrics() {
    let backend = Backend::start().await;
    let config = config_with(
        &backend,
        &format!(
            "[routes.talk]\nintegration = {{ type = \"http\", url = \"{}/reply\" }}\nresponse = true\n[routes.\"$default\"]\nintegration = {{ type = \"echo\" }}",
            backend.url
        ),
    );
    let gateway = TestGateway::start(&config).await;
    let client = http();
    let health = client
        .get(format!("http://{}/health", gateway.api_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    let mut ws = gateway.connect().await;
    send_text(&mut ws, r#"{"action":"talk"}"#).await;
    next_text(&mut ws).await;
    send_text(&mut ws, "echo me").await;
    next_text(&mut ws).await;
    assert_eq!(
        request_status(&format!("ws://{}/nope", gateway.ws_addr)).await,
        404
    );

    let text = gateway.metrics().await;
    for expected in [
        "switchboard_connections_active{transport=\"websocket\"} 1",
        "switchboard_connections_total{result=\"accepted\",transport=\"websocket\"} 1",
        "switchboard_connections_total{result=\"not_found\",transport=\"websocket\"} 1",
        "switchboard_messages_received_total{route=\"talk\"} 1",
        "switchboard_messages_received_total{route=\"$default\"} 1",
        "switchboard_messages_sent_total 2",
        "switchboard_integration_duration_seconds_count{integration=\"http\",route=\"talk\"} 1",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
    drop(ws);
    gateway.stop().await;
}

/// Whether python3 can import boto3; where it cannot, the boto3 tests skip, except in CI
/// (SWITCHBOARD_REQUIRE_BOTO3 set), where that is a failure.
fn boto3_available() -> bool {
    let has_boto3 = python_has("boto3");
    if !has_boto3 {
        assert!(
            std::env::var_os("SWITCHBOARD_REQUIRE_BOTO3").is_none(),
            "boto3 is required (SWITCHBOARD_REQUIRE_BOTO3 is set) but python3 cannot import it"
        );
        eprintln!("skipping: python3 with boto3 not found (pip install boto3)");
    }
    has_boto3
}

/// boto3's own client against the gateway. Runs wherever python3 has boto3; `.ci/run`
/// installs it and sets SWITCHBOARD_REQUIRE_BOTO3=1 so CI never skips it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_apigatewaymanagementapi_client_works() {
    if !boto3_available() {
        return;
    }
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, "")).await;
    let (mut ws, id) = gateway.connect_with_id(&backend).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/boto3_client.py");
    let endpoint = gateway.api_url("");
    let output = tokio::process::Command::new("python3")
        .args([script, &endpoint, &id])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "boto3 script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.lines().count(), 5, "{stdout}");
    assert_eq!(next_text(&mut ws).await, "hello from boto3");
    assert_eq!(close_code(&mut ws).await, 1000);
    gateway.stop().await;
}

/// The exact requests botocore sends (captured from boto3 1.43), for machines without it.
#[tokio::test]
async fn botocore_wire_requests_are_understood() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, "")).await;
    let (mut ws, id) = gateway.connect_with_id(&backend).await;
    let url = gateway.api_url(&format!("/@connections/{id}"));
    let sigv4 = "AWS4-HMAC-SHA256 Credential=x/20261125/us-east-1/execute-api/aws4_request, SignedHeaders=host;x-amz-date, Signature=34e1a47e";
    let client = http();
    let post = client
        .post(&url)
        .header("Authorization", sigv4)
        .header("X-Amz-Date", "20261125T070509Z")
        .header("amz-sdk-request", "attempt=1")
        .header("Accept-Encoding", "identity")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 200);
    assert_eq!(next_text(&mut ws).await, "hello");
    let get = client
        .get(&url)
        .header("Authorization", sigv4)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 200);
    let delete = client
        .delete(&url)
        .header("Authorization", sigv4)
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 204);
    gateway.stop().await;
}

#[tokio::test]
async fn metrics_need_a_token_off_loopback_or_when_configured() {
    let backend = Backend::start().await;
    let config = config_with(
        &backend,
        &format!("[management]\ntokens = [\"{TOKEN}\"]\npublic_metrics = false"),
    );
    let gateway = TestGateway::start(&config).await;
    let url = format!("http://{}/metrics", gateway.api_addr);
    let client = http();
    assert_eq!(client.get(&url).send().await.unwrap().status(), 403);
    let authorized = client.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(authorized.status(), 200);
    gateway.stop().await;
    // On loopback with no setting, /metrics stays open for a local Prometheus.
    let gateway = TestGateway::start(&config_with(
        &backend,
        &format!("[management]\ntokens = [\"{TOKEN}\"]"),
    ))
    .await;
    let url = format!("http://{}/metrics", gateway.api_addr);
    assert_eq!(http().get(&url).send().await.unwrap().status(), 200);
    gateway.stop().await;
}

#[tokio::test]
async fn connection_ids_do_not_betray_their_neighbours() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(
        &backend,
        "[server]\nshards = 1\n[routes.canned]\nintegration = { type = \"http\", url = \"BACKEND/http-status/500\" }\nresponse = true",
    )
    .replace("BACKEND", &backend.url))
    .await;
    let (mut first, a) = gateway.connect_with_id(&backend).await;
    let _second = gateway.connect().await;
    let ids = backend.connected_ids(2).await;
    let b = ids[1].clone();
    assert_ne!(a, "AAAAAAAAAAEAAAAAAAAAAQ");
    // The shard-local halves differ in about half their characters, not just the last.
    let differing = a[11..]
        .chars()
        .zip(b[11..].chars())
        .filter(|(x, y)| x != y)
        .count();
    assert!(differing >= 5, "{a} vs {b}");
    // A requestId (here from an error frame) is never a connectionId of this gateway.
    send_text(&mut first, r#"{"action":"canned"}"#).await;
    let error = next_json(&mut first).await;
    let request_id = error["requestId"].as_str().unwrap();
    let status = http()
        .get(gateway.api_url(&format!("/@connections/{request_id}")))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 410);
    gateway.stop().await;
}

const AWS_KEYS: &str = "[[management.aws_keys]]\naccess_key_id = \"AKIDSWITCHBOARD\"\nsecret_access_key = \"c2VjcmV0LWtleS1mb3ItdGVzdHM\"\n";

/// boto3 signing with the right and a wrong secret, and an id that needs percent-encoding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_signatures_are_verified() {
    if !boto3_available() {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/boto3_signatures.py");
    sdk_signs("python3", script, None, "signed by boto3").await;
}

/// A signature made with the right secret but a clock 10 minutes off is refused, and so is
/// an unsigned request; the same signature made now is accepted.
#[tokio::test]
async fn signatures_outside_the_clock_window_are_refused() {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, AWS_KEYS)).await;
    let (mut ws, id) = gateway.connect_with_id(&backend).await;
    let path = format!("/{}/@connections/{id}", gateway.stage);
    let host = gateway.api_addr.to_string();
    let signed = |at: std::time::SystemTime| {
        let identity = aws_credential_types::Credentials::new(
            "AKIDSWITCHBOARD",
            "c2VjcmV0LWtleS1mb3ItdGVzdHM",
            None,
            None,
            "test",
        )
        .into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region("us-east-1")
            .name("execute-api")
            .time(at)
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let headers = [("host", host.as_str())];
        let request = SignableRequest::new(
            "POST",
            path.as_str(),
            headers.into_iter(),
            SignableBody::Bytes(b"timely"),
        )
        .unwrap();
        let (instructions, _) = sign(request, &params).unwrap().into_parts();
        instructions
            .headers()
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect::<Vec<_>>()
    };
    let send = async |headers: Vec<(String, String)>| {
        let mut request = http()
            .post(gateway.api_url(&format!("/@connections/{id}")))
            .body("timely");
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.send().await.unwrap()
    };
    let late = std::time::SystemTime::now() - std::time::Duration::from_secs(600);
    let refused = send(signed(late)).await;
    assert_eq!(refused.status(), 403);
    assert_eq!(
        refused.headers()["x-amzn-ErrorType"],
        "InvalidSignatureException"
    );
    assert_eq!(send(Vec::new()).await.status(), 403);
    let accepted = send(signed(std::time::SystemTime::now())).await;
    assert_eq!(accepted.status(), 200);
    assert_eq!(next_text(&mut ws).await, "timely");
    gateway.stop().await;
}

/// The AWS JS SDK v3 signing the same way. `.ci/run` installs the SDK into a cache directory
/// and points SWITCHBOARD_AWS_JS_SDK at it (with SWITCHBOARD_REQUIRE_AWS_JS=1, so CI never
/// skips this); elsewhere the test runs when that variable is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_js_sdk_v3_signatures_are_verified() {
    let Some(sdk) = std::env::var_os("SWITCHBOARD_AWS_JS_SDK") else {
        assert!(
            std::env::var_os("SWITCHBOARD_REQUIRE_AWS_JS").is_none(),
            "SWITCHBOARD_REQUIRE_AWS_JS is set but SWITCHBOARD_AWS_JS_SDK is not"
        );
        return;
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/aws_js_sdk.mjs");
    let modules = std::path::Path::new(&sdk)
        .join("node_modules")
        .into_os_string();
    sdk_signs(
        "node",
        script,
        Some(("NODE_PATH", modules)),
        "signed by the js sdk",
    )
    .await;
}

/// Runs an SDK script (`program script ENDPOINT CONNECTION_ID KEY SECRET`) that signs with
/// the test key pair; checks it succeeded and printed its three lines, and that the client
/// got `expected`.
async fn sdk_signs(
    program: &str,
    script: &str,
    env: Option<(&str, std::ffi::OsString)>,
    expected: &str,
) {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, AWS_KEYS)).await;
    let (mut ws, id) = gateway.connect_with_id(&backend).await;
    let mut command = tokio::process::Command::new(program);
    if let Some((name, value)) = env {
        command.env(name, value);
    }
    let output = command
        .args([
            script,
            &gateway.api_url(""),
            &id,
            "AKIDSWITCHBOARD",
            "c2VjcmV0LWtleS1mb3ItdGVzdHM",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    assert_eq!(next_text(&mut ws).await, expected);
    gateway.stop().await;
}

#[tokio::test]
async fn the_demo_page_is_served_only_where_its_routes_exist() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, "")).await;
    let page = http()
        .get(format!("http://{}/demo", gateway.api_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 404);
    let reason = page.text().await.unwrap();
    assert!(reason.contains("demo-config"), "{reason}");
    gateway.stop().await;
    let demo = TestGateway::start(switchboard::config::DEMO_CONFIG).await;
    let page = http()
        .get(format!("http://{}/demo", demo.api_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    demo.stop().await;
}
