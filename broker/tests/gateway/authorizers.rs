//! `$connect` authorizers and the origin allow-list: refused before any backend call,
//! with 401 (no or unreadable token) or 403 (a token that does not verify); the claims or
//! the key's name reach the backend as `requestContext.authorizer` in every event.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::*;

pub(crate) const SECRET: &str = "hs256-test-secret";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub(crate) fn hs256(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub(crate) fn claims(audience: &str, expires_in: i64) -> Value {
    json!({
        "sub": "alice",
        "iss": "https://issuer.test",
        "aud": audience,
        "exp": now() as i64 + expires_in,
        "plan": "gold",
    })
}

async fn gateway_with(backend: &Backend, authorizer: &str) -> TestGateway {
    let routes = format!(
        "{authorizer}\n[routes.talk]\nintegration = {{ type = \"http\", url = \"{}/ok\" }}",
        backend.url
    );
    TestGateway::start(&config_with(backend, &routes)).await
}

#[tokio::test]
async fn jwt_authorizer_decides_before_the_backend_and_passes_the_claims_on() {
    let backend = Backend::start().await;
    let authorizer = format!(
        "[authorizer]\ntype = \"jwt\"\ntoken = \"query:token\"\nsecret = \"{SECRET}\"\nissuer = \"https://issuer.test\"\naudience = \"switchboard\"\nleeway_secs = 0"
    );
    let gateway = gateway_with(&backend, &authorizer).await;
    let url = |token: &str| format!("{}?token={token}", gateway.ws_url());
    let refused = [
        (hs256(claims("switchboard", -60), SECRET), 403),
        (hs256(claims("someone-else", 60), SECRET), 403),
        (hs256(claims("switchboard", 60), "not-the-secret"), 403),
        ("not-a-jwt".to_owned(), 401),
    ];
    for (token, status) in refused {
        assert_eq!(request_status(&url(&token)).await, status, "{token}");
    }
    assert_eq!(request_status(&gateway.ws_url()).await, 401, "no token");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        backend.events("/connect-log").is_empty(),
        "no backend call for a refusal"
    );

    let (mut ws, _) =
        tokio_tungstenite::connect_async(url(&hs256(claims("switchboard", 60), SECRET)))
            .await
            .unwrap();
    let connect = backend.wait_for("/connect-log", |_| true).await;
    assert_eq!(
        connect["requestContext"]["authorizer"]["principalId"],
        "alice"
    );
    assert_eq!(connect["requestContext"]["authorizer"]["plan"], "gold");
    send_text(&mut ws, r#"{"action":"talk"}"#).await;
    let message = backend.wait_for("/ok", |_| true).await;
    assert_eq!(message["requestContext"]["authorizer"]["sub"], "alice");
    drop(ws);
    let disconnect = backend.wait_for("/disconnect", |_| true).await;
    assert_eq!(disconnect["requestContext"]["authorizer"]["plan"], "gold");
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric_value(&metrics, "switchboard_authorizer_total{result=\"allowed\"}"),
        1.0
    );
    assert_eq!(
        metric_value(&metrics, "switchboard_authorizer_total{result=\"denied\"}"),
        3.0
    );
    assert_eq!(
        metric_value(&metrics, "switchboard_authorizer_total{result=\"missing\"}"),
        1.0
    );
    gateway.stop().await;
}

#[tokio::test]
async fn es256_tokens_verify_against_a_pem_public_key_from_the_protocol_header() {
    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let public_key = dir.path().join("public.pem");
    std::fs::write(&public_key, key.public_key_pem()).unwrap();
    let authorizer = format!(
        "[authorizer]\ntype = \"jwt\"\ntoken = \"protocol\"\npublic_key = \"{}\"",
        public_key.display()
    );
    let gateway = gateway_with(&backend, &authorizer).await;
    let signing = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &json!({"sub": "bob", "exp": now() + 60}),
        &signing,
    )
    .unwrap();
    let mut request = gateway.ws_url().into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        format!("access_token, {token}").parse().unwrap(),
    );
    // The $connect backend picks no sub-protocol, so the 101 names none (tungstenite then
    // gives up on its side); what matters here is that the authorizer let it through.
    let result = tokio_tungstenite::connect_async(request).await;
    assert!(!matches!(
        result,
        Err(tokio_tungstenite::tungstenite::Error::Http(_))
    ));
    let connect = backend.wait_for("/connect-log", |_| true).await;
    assert_eq!(
        connect["requestContext"]["authorizer"]["principalId"],
        "bob"
    );
    // An HS256 token signed with the public key's bytes is not accepted (algorithm pinned).
    let forged = hs256(
        json!({"sub": "mallory", "exp": now() + 60}),
        &key.public_key_pem(),
    );
    let mut request = gateway.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", forged.parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 403)
        }
        other => panic!("expected 403, got {other:?}"),
    }
    gateway.stop().await;
}

#[tokio::test]
async fn api_keys_and_the_origin_allow_list() {
    let backend = Backend::start().await;
    let config = "[server]\nallowed_origins = [\"https://app.example.com\"]\n[authorizer]\ntype = \"api_key\"\ntoken = \"header:x-api-key\"\nkeys = [\"key-one\", \"key-two\"]";
    let gateway = gateway_with(&backend, config).await;
    let with = |key: Option<&str>, origin: Option<&str>| {
        let mut request = gateway.ws_url().into_client_request().unwrap();
        if let Some(key) = key {
            request
                .headers_mut()
                .insert("x-api-key", key.parse().unwrap());
        }
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("Origin", origin.parse().unwrap());
        }
        request
    };
    assert_eq!(
        request_status(with(Some("key-two"), Some("https://app.example.com"))).await,
        101
    );
    assert_eq!(
        request_status(with(Some("key-two"), None)).await,
        101,
        "no Origin: not a browser"
    );
    assert_eq!(
        request_status(with(Some("key-two"), Some("https://evil.example"))).await,
        403
    );
    assert_eq!(request_status(with(Some("key-three"), None)).await, 403);
    assert_eq!(request_status(with(None, None)).await, 401);
    let connect = backend.wait_for("/connect-log", |_| true).await;
    assert_eq!(
        connect["requestContext"]["authorizer"],
        json!({"principalId": "api-key-1"})
    );
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "switchboard_connections_total{result=\"origin_denied\",transport=\"websocket\"}"
        ),
        1.0
    );
    gateway.stop().await;
}

#[tokio::test]
async fn http_authorizer_asks_the_backend_once_per_identity() {
    let backend = Backend::start().await;
    let config = format!(
        "[authorizer]\ntype = \"http\"\nurl = \"{}/authorize\"\nidentity_sources = [\"header:Authorization\"]\ncache_ttl_secs = 300",
        backend.url
    );
    let gateway = gateway_with(&backend, &config).await;
    let url = gateway.ws_url();
    let with = |authorization: Option<&str>| {
        let mut request = url.as_str().into_client_request().unwrap();
        if let Some(value) = authorization {
            request
                .headers_mut()
                .insert("Authorization", value.parse().unwrap());
        }
        request
    };
    assert_eq!(request_status(with(Some("Bearer good"))).await, 101);
    assert_eq!(
        request_status(with(Some("Bearer good"))).await,
        101,
        "from the cache"
    );
    assert_eq!(request_status(with(Some("Bearer bad"))).await, 403);
    assert_eq!(
        request_status(with(Some("Bearer bad"))).await,
        403,
        "denials are cached too"
    );
    assert_eq!(request_status(with(Some("Bearer other"))).await, 401);
    assert_eq!(
        request_status(with(None)).await,
        401,
        "a missing identity source"
    );
    let asked = backend.events("/authorize");
    assert_eq!(asked.len(), 3, "one call per identity: good, bad, other");
    assert_eq!(asked[0]["type"], "REQUEST");
    assert!(
        asked[0]["methodArn"]
            .as_str()
            .unwrap()
            .ends_with("/dev/$connect")
    );
    assert_eq!(asked[0]["requestContext"]["eventType"], "CONNECT");
    let connect = backend.wait_for("/connect-log", |_| true).await;
    assert_eq!(
        connect["requestContext"]["authorizer"],
        json!({"principalId": "carol", "tier": "pro"})
    );
    gateway.stop().await;

    // A backend that cannot be reached is a 502, never an accept.
    let config = format!(
        "[authorizer]\ntype = \"http\"\nurl = \"{}\"",
        dead_url().await
    );
    let gateway = gateway_with(&backend, &config).await;
    let mut request = gateway.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", "Bearer good".parse().unwrap());
    assert_eq!(request_status(request).await, 502);
    gateway.stop().await;
}

/// The public half of `key` (ECDSA P-256) as a JSON Web Key named `kid`.
fn ec_jwk(key: &rcgen::KeyPair, kid: &str) -> Value {
    use base64::Engine;
    let raw = key.public_key_raw();
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65]), "kid": kid, "alg": "ES256", "use": "sig"})
}

fn es256(key: &rcgen::KeyPair, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = kid.map(str::to_owned);
    let signing = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    jsonwebtoken::encode(&header, claims, &signing).unwrap()
}

#[tokio::test]
async fn jwks_from_a_url_picks_the_key_by_kid() {
    let backend = Backend::start().await;
    let current = rcgen::KeyPair::generate().unwrap();
    let jwks = json!({"keys": [ec_jwk(&current, "k1")]});
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { axum::Json(jwks) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_url = format!("http://{}/jwks", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = format!(
        "[authorizer]\ntype = \"jwt\"\ntoken = \"query:token\"\njwks = \"{jwks_url}\"\naudience = \"chat\""
    );
    let gateway = gateway_with(&backend, &config).await;
    let url = |token: &str| format!("{}?token={token}", gateway.ws_url());
    let claims = json!({"sub": "dave", "aud": "chat", "exp": now() + 60});
    let good = es256(&current, Some("k1"), &claims);
    // The key set is fetched once the gateway runs.
    let mut status = 0;
    for _ in 0..50 {
        status = request_status(&url(&good)).await;
        if status == 101 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 101);
    let stranger = rcgen::KeyPair::generate().unwrap();
    assert_eq!(
        request_status(&url(&es256(&stranger, Some("k1"), &claims))).await,
        403
    );
    assert_eq!(
        request_status(&url(&es256(&current, Some("k2"), &claims))).await,
        403
    );
    assert_eq!(
        request_status(&url(&hs256(claims.clone(), "k1"))).await,
        403,
        "no HMAC with a key set"
    );
    // The identity provider's tokens for another application, and ones not valid yet.
    let other_app = json!({"sub": "dave", "aud": "billing", "exp": now() + 60});
    assert_eq!(
        request_status(&url(&es256(&current, Some("k1"), &other_app))).await,
        403
    );
    let early = json!({"sub": "dave", "aud": "chat", "exp": now() + 900, "nbf": now() + 600});
    assert_eq!(
        request_status(&url(&es256(&current, Some("k1"), &early))).await,
        403
    );
    gateway.stop().await;

    // The same from a file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, json!({"keys": [ec_jwk(&current, "k1")]}).to_string()).unwrap();
    let config = format!(
        "[authorizer]\ntype = \"jwt\"\ntoken = \"query:token\"\njwks = \"{}\"\naudience = \"*\"",
        file.display()
    );
    let gateway = gateway_with(&backend, &config).await;
    assert_eq!(
        request_status(&format!("{}?token={good}", gateway.ws_url())).await,
        101
    );
    gateway.stop().await;
}
