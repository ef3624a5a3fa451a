//! `GET /demo`: a small chat page on the TypeScript SDK (`clients/js`, served beside it as
//! one module, [`SDK_PATH`]) that speaks the embedded demo's routes over WebSocket or
//! WebTransport, so a newcomer can see both transports meet in one room from a browser, and
//! a page survive a lost network (the SDK resumes). The SDK's bundle is committed, built by
//! `npm run bundle` in clients/js (whose tests fail when it is stale), so building the gateway
//! needs no Node.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::state::ApiState;
use crate::transport::webtransport::public_host;

const PAGE: &str = include_str!("demo.html");
/// The SDK as one minified ES module.
const SDK: &str = include_str!("switchboard-client.js");
/// Where the page imports the SDK from.
pub const SDK_PATH: &str = "/demo/switchboard-client.js";
/// Where the page expects its settings.
const SETTINGS_SLOT: &str = "/*SETTINGS*/null";

/// The routes the page sends to, and the integration each must have.
const NEEDED_ROUTES: [(&str, &str); 2] = [("join", "room_join"), ("publish", "room_publish")];

/// The routes of [`NEEDED_ROUTES`] that `config` lacks.
fn missing_routes(config: &crate::config::Config) -> Vec<&'static str> {
    NEEDED_ROUTES
        .iter()
        .filter(|(key, kind)| {
            config
                .routes
                .get(key)
                .is_none_or(|route| route.integration.kind() != *kind)
        })
        .map(|(key, _)| *key)
        .collect()
}

/// Whether `config` has what the page speaks (and so `/demo` serves it).
pub fn is_served(config: &crate::config::Config) -> bool {
    missing_routes(config).is_empty()
}

/// The page, with where to connect filled in; 404 with the reason under a config that lacks
/// the routes it speaks (`switchboard demo-config` has them).
pub async fn page(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let config = &state.gateway.config;
    let missing = missing_routes(config);
    if !missing.is_empty() {
        let reason = format!(
            "The demo page needs the routes join (room_join) and publish (room_publish), which \
             this config lacks ({}). `switchboard demo-config` prints a config that has them.\n",
            missing.join(", ")
        );
        return (axum::http::StatusCode::NOT_FOUND, reason).into_response();
    }
    let stage = &config.api.stage;
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let listen = config.server.listen;
    let websocket_host = public_host(listen, host);
    let scheme = if config.server.tls.is_some() {
        "wss"
    } else {
        "ws"
    };
    let settings = json!({
        "stage": stage,
        "resume": config.api.resume.is_some(),
        "websocket": format!("{scheme}://{websocket_host}:{}/{stage}", listen.port()),
        // The SDK's `api` option: where `@webtransport` (the discovery document) is.
        "webtransport": config
            .server
            .webtransport
            .as_ref()
            .map(|_| format!("/{stage}")),
    });
    // `</` cannot occur in the JSON of these settings unescaped into a script end tag:
    // serde_json does not escape `/`, so escape `<` itself.
    let settings = settings.to_string().replace('<', "\\u003c");
    let mut response = PAGE.replace(SETTINGS_SLOT, &settings).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

/// `GET /demo/switchboard-client.js`: the SDK the page imports.
pub async fn sdk() -> Response {
    let mut response = SDK.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    response
}
