//! The management API (axum, its own listener): AWS ApiGatewayManagementApi's
//! `@connections` wire format under `/{stage}`, plus `/health` and `/metrics`.
//!
//! Handlers reach connections and rooms through the gateway's [`crate::directory`] and
//! translate the answer; every failure goes through [`ApiError`], the one place that
//! decides status codes and the AWS error shape (`x-amzn-ErrorType`) SDKs turn into
//! exceptions. One file per resource: [`connections`], [`rooms`], [`queues`]; [`guard`]
//! authenticates; [`listener`] serves the routes with a connection cap and slowloris
//! timeouts.

pub mod config;
mod connections;
pub mod demo;
mod guard;
pub mod listener;
mod queues;
mod rooms;
pub mod state;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::json;

pub use connections::BulkRequest;
use connections::{delete_connection, get_connection, post_bulk, post_to_connection};
use guard::{authenticate, guard_unauthenticated, wait_for_lease};
use queues::{get_queue_messages, post_queue_commit};
use rooms::{
    delete_room_member, get_history, get_presence, get_room, post_to_room, put_room_member,
};
pub use state::{ApiError, ApiState, read_body};

/// The management API's routes.
pub fn router(state: ApiState) -> Router {
    let authenticated = Router::new()
        .route(
            "/{stage}/@connections/{id}",
            get(get_connection)
                .post(post_to_connection)
                .delete(delete_connection),
        )
        .route("/{stage}/@connections", post(post_bulk))
        .route("/{stage}/@rooms/{room}", get(get_room).post(post_to_room))
        .route("/{stage}/@rooms/{room}/presence", get(get_presence))
        .route("/{stage}/@rooms/{room}/history", get(get_history))
        .route(
            "/{stage}/@rooms/{room}/connections/{id}",
            put(put_room_member).delete(delete_room_member),
        )
        .route("/{stage}/@queues/{queue}/messages", get(get_queue_messages))
        .route("/{stage}/@queues/{queue}/commit", post(post_queue_commit))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            wait_for_lease,
        ));
    // `/metrics` tells an attacker how the gateway is doing: protected unless configured
    // public (the default only on a loopback listener).
    let (authenticated, public) = if state.gateway.config.management.public_metrics {
        let public = Router::new().route("/metrics", get(metrics)).route_layer(
            middleware::from_fn_with_state(state.clone(), guard_unauthenticated),
        );
        (authenticated, public)
    } else {
        (authenticated.route("/metrics", get(metrics)), Router::new())
    };
    let authenticated =
        authenticated.route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(authenticated)
        .merge(public)
        .route("/health", get(health))
        .route("/{stage}/@webtransport", get(webtransport_discovery))
        .route("/demo", get(demo::page))
        .route(demo::SDK_PATH, get(demo::sdk))
        .with_state(state)
}

/// `{"status": "ok"}`, or 503 `{"status": "degraded", "reason": …}` while this node's
/// cluster delivery is broken (it still serves its own clients), while its cluster lease
/// has lapsed (it serves nothing: [`crate::fence`]), or while its connection record log
/// cannot be written (a full disk: it opens no new connection).
async fn health(State(state): State<ApiState>) -> Response {
    let lapsed = || {
        (!state.gateway.fence.holds()).then(|| {
            "this node has not confirmed its place in the cluster within the node timeout \
             (paused, or cut off from NATS); it serves nothing until it has"
                .to_owned()
        })
    };
    let unrecorded = || {
        (state.gateway.records.failing()).map(|error| {
            format!("this node cannot write its connection records ({error}); it refuses new connections")
        })
    };
    let degraded = (state.gateway.directory.degraded())
        .or_else(lapsed)
        .or_else(unrecorded);
    match degraded {
        None => axum::Json(json!({"status": "ok"})).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "degraded", "reason": reason})),
        )
            .into_response(),
    }
}

/// `GET /{stage}/@webtransport`: the session URL and, for a self-signed certificate, its
/// hash: what a browser passes to `new WebTransport(url, {serverCertificateHashes})`. Public
/// (browsers fetch it before connecting, from any origin); it holds nothing secret.
async fn webtransport_discovery(
    State(state): State<ApiState>,
    Path(stage): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    state.check_stage(&stage)?;
    let config = state
        .gateway
        .config
        .server
        .webtransport
        .as_ref()
        .ok_or(ApiError::WebTransportDisabled)?;
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let body = crate::transport::webtransport::discovery(config, host, &stage);
    let mut response = axum::Json(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    // A renewed certificate has a new hash: never cached.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
    let gateway = &state.gateway;
    gateway.queue_store.update_gauges(&gateway.metrics).await;
    let open_sockets = state.gateway.admission.open();
    state.gateway.metrics.open_sockets.set(open_sockets as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.gateway.metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    #[test]
    fn every_endpoint_is_in_the_reference() {
        let code: BTreeSet<&str> = include_str!("mod.rs")
            .split(".route(")
            .skip(1)
            .filter_map(|rest| rest.trim_start().strip_prefix('"')?.split('"').next())
            .filter(|path| path.starts_with('/'))
            .collect();
        let documented: BTreeSet<&str> = include_str!("../../../docs/REFERENCE.md")
            .lines()
            .filter(|line| line.starts_with("| `"))
            .filter_map(|line| line.split('|').nth(2))
            .map(|cell| cell.trim().trim_matches('`'))
            .filter(|path| path.starts_with('/'))
            .collect();
        assert_eq!(code, documented);
    }
}
