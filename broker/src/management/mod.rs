//! The management API (axum, its own listener): AWS ApiGatewayManagementApi's
//! `@connections` wire format under `/{stage}`, plus `/health` and `/metrics`.
//!
//! Handlers decode the connectionId, send one command to the owning shard and translate
//! the answer; every failure goes through [`ApiError`], the one place that decides status
//! codes and the AWS error shape (`x-amzn-ErrorType`) SDKs turn into exceptions.
//! [`listener`] serves the routes with a connection cap and slowloris timeouts.

pub mod config;
pub mod demo;
pub mod listener;

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::extract::{Query, RawQuery};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::{self, sigv4};
use crate::clock;
use crate::cluster::Cluster;
use crate::cluster::remote::{Op, RemoteError, Reply};
use crate::connection_id::ConnectionId;
use crate::fanout::{self, FanoutPlan};
use crate::frame;
use crate::gateway::Gateway;
use crate::rooms::RoomName;
use crate::shard::handle::ShardHandle;

/// What every handler needs.
#[derive(Clone)]
pub struct ApiState {
    pub gateway: Arc<Gateway>,
}

/// Every way a management request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("connection {0} is gone")]
    Gone(String),
    #[error("payload exceeds limits.max_message_bytes ({limit} bytes)")]
    PayloadTooLarge { limit: usize },
    #[error("{count} connectionIds exceed limits.max_bulk_connection_ids ({limit})")]
    TooManyIds { count: usize, limit: usize },
    #[error("{0}")]
    BadRequest(String),
    #[error("no such stage: {0}")]
    UnknownStage(String),
    #[error("no such queue: {0}")]
    UnknownQueue(String),
    #[error("storage failed: {0}")]
    Storage(#[from] switchboard_storage::StorageError),
    #[error("missing or invalid credentials")]
    Unauthorized,
    #[error("request body not received within {0:?}")]
    BodyTimeout(std::time::Duration),
    #[error("{0}")]
    LimitExceeded(String),
    #[error("{0}")]
    Signature(sigv4::SigV4Error),
    /// Cluster mode: this node cannot reach the cluster right now.
    #[error("cluster unavailable: {0}")]
    ClusterUnavailable(String),
    #[error("WebTransport is not enabled ([server.webtransport])")]
    WebTransportDisabled,
    /// Every management connection is taken: a reserve connection answers this.
    #[error("management API busy (management.max_connections reached); try again")]
    Busy,
    /// No credentials are configured, so only requests a browser page cannot forge are
    /// served (see [`loopback_only`]).
    #[error("{0}")]
    NotLoopback(&'static str),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error_type) = match &self {
            Self::Gone(_) => (StatusCode::GONE, "GoneException"),
            Self::PayloadTooLarge { .. } | Self::TooManyIds { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLargeException")
            }
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "BadRequestException"),
            Self::UnknownStage(_) | Self::UnknownQueue(_) | Self::WebTransportDisabled => {
                (StatusCode::NOT_FOUND, "NotFoundException")
            }
            Self::Storage(switchboard_storage::StorageError::PastTheEnd { .. }) => {
                (StatusCode::BAD_REQUEST, "BadRequestException")
            }
            Self::Storage(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerErrorException",
            ),
            Self::Unauthorized => (StatusCode::FORBIDDEN, "ForbiddenException"),
            Self::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "RequestTimeoutException"),
            Self::LimitExceeded(_) => (StatusCode::TOO_MANY_REQUESTS, "LimitExceededException"),
            Self::Signature(error) => (StatusCode::FORBIDDEN, error.error_type()),
            Self::ClusterUnavailable(_) | Self::Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailableException",
            ),
            Self::NotLoopback(_) => (StatusCode::FORBIDDEN, "ForbiddenException"),
        };
        let mut response =
            (status, axum::Json(json!({ "message": self.to_string() }))).into_response();
        response
            .headers_mut()
            .insert("x-amzn-ErrorType", HeaderValue::from_static(error_type));
        response
    }
}

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
        .route(
            "/{stage}/@rooms/{room}/connections/{id}",
            put(put_room_member).delete(delete_room_member),
        )
        .route("/{stage}/@queues/{queue}/messages", get(get_queue_messages))
        .route("/{stage}/@queues/{queue}/commit", post(post_queue_commit));
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
        .with_state(state)
}

/// `{"status": "ok"}`, or 503 `{"status": "degraded", "reason": …}` while this node's
/// cluster delivery is broken (it still serves its own clients).
async fn health(State(state): State<ApiState>) -> Response {
    match state.gateway.cluster.as_ref().and_then(|c| c.degraded()) {
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

/// With `management.tokens` or `management.aws_keys` set, a request needs
/// `Authorization: Bearer TOKEN` or an AWS Signature V4 that verifies against one of the
/// keys. Everything the headers can tell is checked before a byte of the body is read (the
/// token; SigV4's key, scope and date; the declared length against the route's limit), so
/// an unauthenticated request costs no body read. With neither set (the loopback-only
/// default) a request passes once [`loopback_only`] agrees.
async fn authenticate(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let management = &state.gateway.config.management;
    let limit = state.body_limit(request.method(), request.uri().path());
    if !management.has_credentials() {
        loopback_only(request.headers())?;
        check_declared_length(request.headers(), limit)?;
        return Ok(next.run(request).await);
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if let Some(token) = authorization.strip_prefix("Bearer ") {
        if !auth::is_known_token(&management.tokens, token.trim()) {
            return Err(ApiError::Unauthorized);
        }
        check_declared_length(request.headers(), limit)?;
        return Ok(next.run(request).await);
    }
    let Some(signature) = sigv4::Authorization::parse(&authorization) else {
        return Err(ApiError::Unauthorized);
    };
    let signature = signature.map_err(ApiError::Signature)?;
    let now = std::time::SystemTime::now();
    let (parts, body) = request.into_parts();
    let headers: Vec<(&str, &str)> = parts
        .headers
        .iter()
        .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)))
        .collect();
    sigv4::check_headers(&signature, &headers, &management.aws_keys, now)
        .map_err(ApiError::Signature)?;
    check_declared_length(&parts.headers, limit)?;
    let body = state.read_body(body, limit).await?;
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let received = sigv4::ReceivedRequest {
        method: parts.method.as_str(),
        path_and_query,
        headers,
        body: &body,
    };
    sigv4::verify(&signature, &received, &management.aws_keys, now).map_err(ApiError::Signature)?;
    Ok(next.run(Request::from_parts(parts, Body::from(body))).await)
}

/// Public routes that still tell something (`/metrics`): when no credentials are
/// configured at all, only loopback requests without an `Origin` ([`loopback_only`]).
async fn guard_unauthenticated(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !state.gateway.config.management.has_credentials() {
        loopback_only(request.headers())?;
    }
    Ok(next.run(request).await)
}

/// 413 before reading when the request declares a body longer than `limit`.
fn check_declared_length(headers: &axum::http::HeaderMap, limit: usize) -> Result<(), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > limit as u64 => Err(ApiError::PayloadTooLarge { limit }),
        _ => Ok(()),
    }
}

/// With no credentials configured the API listens on loopback only, and trusts whoever can
/// reach it there: local processes. A web page in the operator's browser can reach it too
/// (a cross-site `text/plain` POST needs no preflight, and DNS rebinding lets a page read
/// answers under its own host name), so a request that carries an `Origin` (a browser's)
/// or a `Host` that is not a loopback name or address is refused.
fn loopback_only(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    if headers.contains_key(header::ORIGIN) {
        return Err(ApiError::NotLoopback(
            "requests from web pages (with an Origin header) are refused while no \
             management.tokens or aws_keys are configured",
        ));
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !is_loopback_host(host) {
        return Err(ApiError::NotLoopback(
            "the Host header must name a loopback address (localhost, 127.0.0.1, [::1]) \
             while no management.tokens or aws_keys are configured",
        ));
    }
    Ok(())
}

/// `localhost`, `127.x.x.x` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
    match &state.gateway.cluster {
        Some(cluster) => cluster.update_queue_gauges().await,
        None => state.gateway.queues.update_gauges(&state.gateway.metrics),
    }
    let open_sockets = state.gateway.admission.open();
    state.gateway.metrics.open_sockets.set(open_sockets as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.gateway.metrics.render(),
    )
}

impl ApiState {
    fn check_stage(&self, stage: &str) -> Result<(), ApiError> {
        if stage == self.gateway.config.api.stage {
            Ok(())
        } else {
            Err(ApiError::UnknownStage(stage.to_owned()))
        }
    }

    /// Where the connection lives: a local shard, or (cluster mode) another node. Ids
    /// no node of this gateway could have issued are gone, like closed ones.
    fn locate(&self, text: &str) -> Result<Target<'_>, ApiError> {
        let gone = || ApiError::Gone(text.to_owned());
        let id: ConnectionId = text.parse().map_err(|_| gone())?;
        let cluster = self.gateway.cluster.as_deref();
        // A connection of this node whose client resumed on another node lives there now.
        let moved = cluster.and_then(|cluster| cluster.moved_to(text));
        if id.node != self.gateway.config.server.node_id || moved.is_some() {
            let cluster = cluster.ok_or_else(gone)?;
            if let Some(reason) = cluster.degraded() {
                return Err(ApiError::ClusterUnavailable(reason));
            }
            let (node, name) = match moved {
                Some(alias) => (alias.node, alias.to_string()),
                None => (id.node, text.to_owned()),
            };
            return Ok(Target::Remote(node, cluster, name));
        }
        if id.epoch != self.gateway.epoch {
            return Err(gone());
        }
        let shard = self
            .gateway
            .shards
            .get(usize::from(id.shard))
            .ok_or_else(gone)?;
        Ok(Target::Local(id, shard))
    }

    fn shards(&self) -> &[ShardHandle] {
        &self.gateway.shards
    }

    fn observe_fanout(&self, kind: &str, started: std::time::Instant) {
        self.gateway
            .metrics
            .fanout_duration
            .with_label_values(&[kind])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Where a connection lives.
enum Target<'a> {
    Local(ConnectionId, &'a ShardHandle),
    /// Cluster mode: on this node, under this id (its own, or the one it moved to).
    Remote(u16, &'a Cluster, String),
}

/// A remote node's answer as the API's: 410 when the node did not answer in time (see
/// docs/CLUSTER.md for why), its own error otherwise.
fn remote_outcome(id: &str, outcome: Result<Reply, RemoteError>) -> Result<Reply, ApiError> {
    let reply = match outcome {
        Ok(reply) => reply,
        Err(RemoteError::Unreachable { .. }) => return Err(ApiError::Gone(id.to_owned())),
        Err(RemoteError::Nats(reason)) => return Err(ApiError::ClusterUnavailable(reason)),
    };
    let text = || String::from_utf8_lossy(&reply.body).into_owned();
    match reply.status {
        200..=299 => Ok(reply),
        410 => Err(ApiError::Gone(id.to_owned())),
        429 => Err(ApiError::LimitExceeded(text())),
        400 => Err(ApiError::BadRequest(text())),
        status => Err(ApiError::ClusterUnavailable(format!(
            "node answered {status}: {}",
            text()
        ))),
    }
}

fn room_name(text: &str) -> Result<RoomName, ApiError> {
    RoomName::parse(text)
        .map_err(|e| ApiError::BadRequest(format!("invalid room name `{text}`: {e}")))
}

/// `POST @connections`: one message to many connectionIds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkRequest {
    #[serde(rename = "connectionIds")]
    pub connection_ids: Vec<String>,
    /// Sent as a text frame.
    #[serde(default)]
    pub data: Option<String>,
    /// Decoded and sent as a binary frame.
    #[serde(default)]
    pub data_base64: Option<String>,
}

impl BulkRequest {
    /// Parses and checks a bulk body; returns the request and its encoded frame.
    pub fn parse(
        body: &[u8],
        max_ids: usize,
        max_message: usize,
    ) -> Result<(Self, Bytes), ApiError> {
        let request: Self = serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("malformed bulk request: {e}")))?;
        if request.connection_ids.len() > max_ids {
            return Err(ApiError::TooManyIds {
                count: request.connection_ids.len(),
                limit: max_ids,
            });
        }
        let frame = match (&request.data, &request.data_base64) {
            (Some(text), None) => {
                check_size(text.len(), max_message)?;
                frame::encode(frame::Opcode::Text, text.as_bytes())
            }
            (None, Some(encoded)) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map_err(|e| ApiError::BadRequest(format!("data_base64 is not base64: {e}")))?;
                check_size(bytes.len(), max_message)?;
                frame::encode(frame::Opcode::Binary, &bytes)
            }
            _ => {
                return Err(ApiError::BadRequest(
                    "exactly one of `data` and `data_base64` is required".into(),
                ));
            }
        };
        Ok((request, frame))
    }
}

fn check_size(size: usize, limit: usize) -> Result<(), ApiError> {
    if size > limit {
        Err(ApiError::PayloadTooLarge { limit })
    } else {
        Ok(())
    }
}

async fn post_bulk(
    State(state): State<ApiState>,
    Path(stage): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    state.check_stage(&stage)?;
    let limits = &state.gateway.config.limits;
    let body = state.read_body(body, state.largest_body()).await?;
    let (request, frame) = BulkRequest::parse(
        &body,
        limits.max_bulk_connection_ids,
        limits.max_message_bytes,
    )?;
    let started = std::time::Instant::now();
    let config = &state.gateway.config;
    let cluster = state.gateway.cluster.as_deref();
    // Connections of this node that moved to another one are sent where they live.
    let ids = match cluster {
        Some(cluster) => cluster.where_they_live(&request.connection_ids),
        None => request.connection_ids.clone(),
    };
    let mut plan = FanoutPlan::for_ids(
        &ids,
        config.server.node_id,
        state.gateway.epoch,
        state.shards().len(),
        cluster.is_some(),
    );
    let remote_ids = std::mem::take(&mut plan.remote);
    let remote = async {
        match cluster {
            Some(cluster) if !remote_ids.is_empty() => {
                cluster.send_bulk(&remote_ids, &ids, &frame).await
            }
            _ => crate::shard::handle::Delivery::default(),
        }
    };
    let (mut delivery, remote) =
        futures_util::join!(fanout::send_bulk(state.shards(), plan, &frame), remote);
    delivery.delivered += remote.delivered;
    delivery.gone.extend(remote.gone);
    delivery.gone.sort_unstable();
    state.observe_fanout("bulk", started);
    let gone: Vec<&str> = delivery
        .gone
        .iter()
        .filter_map(|&index| {
            request
                .connection_ids
                .get(index as usize)
                .map(String::as_str)
        })
        .collect();
    Ok(axum::Json(json!({"delivered": delivery.delivered, "gone": gone})).into_response())
}

#[derive(Debug, Deserialize)]
struct RoomPublishParams {
    exclude: Option<String>,
    /// `1` or `true`: WebTransport members that asked for datagrams get it as one.
    unreliable: Option<String>,
}

async fn post_to_room(
    State(state): State<ApiState>,
    Path((stage, room)): Path<(String, String)>,
    Query(params): Query<RoomPublishParams>,
    body: Body,
) -> Result<Response, ApiError> {
    state.check_stage(&stage)?;
    let room = room_name(&room)?;
    let exclude = params
        .exclude
        .map(|id| {
            id.parse::<ConnectionId>()
                .map_err(|_| ApiError::BadRequest(format!("exclude: `{id}` is not a connectionId")))
        })
        .transpose()?;
    let unreliable = match params.unreliable.as_deref() {
        None | Some("0" | "false") => false,
        Some("1" | "true") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "unreliable: `{other}` is not 1, 0, true or false"
            )));
        }
    };
    let delivery = crate::shard::handle::RoomDelivery {
        exclude,
        unreliable,
    };
    let payload = state
        .read_body(body, state.gateway.config.limits.max_message_bytes)
        .await?;
    let started = std::time::Instant::now();
    let frame = frame::encode_data(&payload);
    let remote = async {
        match &state.gateway.cluster {
            Some(cluster) => cluster.broadcast_room(&room, frame.clone(), delivery).await,
            None => 0,
        }
    };
    let here = crate::shard::handle::RoomDelivery {
        exclude: match &state.gateway.cluster {
            Some(cluster) => exclude.map(|id| cluster.here_as(id)),
            None => exclude,
        },
        ..delivery
    };
    let (local, remote) = futures_util::join!(
        fanout::broadcast(state.shards(), &room, &frame, here),
        remote
    );
    state.observe_fanout("room", started);
    Ok(axum::Json(json!({"delivered": local + remote})).into_response())
}

async fn get_room(
    State(state): State<ApiState>,
    Path((stage, room)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    state.check_stage(&stage)?;
    let room = room_name(&room)?;
    let remote = async {
        match &state.gateway.cluster {
            Some(cluster) => cluster.list_room(&room).await,
            None => Vec::new(),
        }
    };
    let (mut members, remote) =
        futures_util::join!(fanout::room_members(state.shards(), &room), remote);
    members.extend(remote);
    Ok(axum::Json(json!({
        "room": room.as_str(),
        "count": members.len(),
        "connectionIds": members,
    }))
    .into_response())
}

async fn put_room_member(
    State(state): State<ApiState>,
    Path(path): Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    change_membership(&state, path, Membership::Join).await
}

async fn delete_room_member(
    State(state): State<ApiState>,
    Path(path): Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    change_membership(&state, path, Membership::Leave).await
}

enum Membership {
    Join,
    Leave,
}

/// `PUT|DELETE @rooms/{room}/connections/{id}`, on the shard that owns the connection.
async fn change_membership(
    state: &ApiState,
    (stage, room, id): (String, String, String),
    change: Membership,
) -> Result<StatusCode, ApiError> {
    state.check_stage(&stage)?;
    let room = room_name(&room)?;
    let (connection_id, shard) = match state.locate(&id)? {
        Target::Local(connection_id, shard) => (connection_id, shard),
        Target::Remote(node, cluster, target) => {
            let op = match change {
                Membership::Join => Op::Join,
                Membership::Leave => Op::Leave,
            };
            let outcome = cluster
                .call(node, op, &target, Some(room.as_str()), Bytes::new())
                .await;
            remote_outcome(&id, outcome)?;
            return Ok(StatusCode::NO_CONTENT);
        }
    };
    match change {
        Membership::Join => shard
            .join(connection_id, room)
            .await
            .map_err(|_| ApiError::Gone(id))?
            .map_err(|refused| ApiError::LimitExceeded(refused.to_string()))?,
        Membership::Leave => shard
            .leave(connection_id, room)
            .await
            .map_err(|_| ApiError::Gone(id))?,
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn post_to_connection(
    State(state): State<ApiState>,
    Path((stage, id)): Path<(String, String)>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    state.check_stage(&stage)?;
    let payload = state
        .read_body(body, state.gateway.config.limits.max_message_bytes)
        .await?;
    let frame = frame::encode_data(&payload);
    match state.locate(&id)? {
        Target::Local(connection_id, shard) => shard
            .send(connection_id, frame)
            .await
            .map_err(|_| ApiError::Gone(id))?,
        Target::Remote(node, cluster, target) => {
            let outcome = cluster.call(node, Op::Send, &target, None, frame).await;
            remote_outcome(&id, outcome)?;
        }
    }
    Ok(StatusCode::OK)
}

async fn get_connection(
    State(state): State<ApiState>,
    Path((stage, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    state.check_stage(&stage)?;
    let (connection_id, shard) = match state.locate(&id)? {
        Target::Local(connection_id, shard) => (connection_id, shard),
        Target::Remote(node, cluster, target) => {
            let outcome = cluster
                .call(node, Op::Describe, &target, None, Bytes::new())
                .await;
            let reply = remote_outcome(&id, outcome)?;
            return Ok(([(header::CONTENT_TYPE, "application/json")], reply.body).into_response());
        }
    };
    let info = shard
        .describe(connection_id)
        .await
        .map_err(|_| ApiError::Gone(id))?;
    Ok(axum::Json(json!({
        "connectedAt": clock::iso8601(info.connected_at_ms),
        "identity": {"sourceIp": info.source_ip, "userAgent": info.user_agent},
        "lastActiveAt": clock::iso8601(info.last_active_at_ms),
    }))
    .into_response())
}

async fn delete_connection(
    State(state): State<ApiState>,
    Path((stage, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.check_stage(&stage)?;
    match state.locate(&id)? {
        Target::Local(connection_id, shard) => shard
            .disconnect(connection_id)
            .await
            .map_err(|_| ApiError::Gone(id))?,
        Target::Remote(node, cluster, target) => {
            let outcome = cluster
                .call(node, Op::Disconnect, &target, None, Bytes::new())
                .await;
            remote_outcome(&id, outcome)?;
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

impl ApiState {
    /// The largest body any route takes: a bulk request, with room for its ids (quoted,
    /// comma-separated) and a base64 payload.
    /// The largest body a route reads: a bulk send's id list, a queue commit's few bytes,
    /// or one message.
    fn body_limit(&self, method: &axum::http::Method, path: &str) -> usize {
        if method == axum::http::Method::GET || method == axum::http::Method::DELETE {
            return 0;
        }
        if path.ends_with("/@connections") {
            self.largest_body()
        } else if path.ends_with("/commit") {
            COMMIT_BODY_BYTES
        } else {
            self.gateway.config.limits.max_message_bytes
        }
    }

    fn largest_body(&self) -> usize {
        let limits = &self.gateway.config.limits;
        limits.max_bulk_connection_ids * 40 + limits.max_message_bytes * 2 + 1024
    }

    /// Reads a request body of at most `limit` bytes within `management.body_timeout_secs`.
    async fn read_body(&self, body: Body, limit: usize) -> Result<Bytes, ApiError> {
        let timeout = self.gateway.config.management.body_timeout;
        tokio::time::timeout(timeout, read_body(body, limit))
            .await
            .map_err(|_| ApiError::BodyTimeout(timeout))?
    }
}

/// Reads a request body of at most `limit` bytes.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|error| {
        let too_large = std::error::Error::source(&error)
            .is_some_and(|e| e.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::BadRequest(format!("cannot read request body: {error}"))
        }
    })
}

/// A queue commit's body: `{"group": G, "offset": N}`.
const COMMIT_BODY_BYTES: usize = 4096;

/// Most messages one pull may ask for.
const MAX_PULL: usize = 1000;
/// Longest long-poll.
const MAX_WAIT_MS: u64 = 30_000;

/// The pull's query parameters, parsed by hand so every mistake gets a JSON 400.
#[derive(Debug, Default)]
struct PullParams {
    group: Option<String>,
    max: Option<String>,
    wait_ms: Option<String>,
}

impl PullParams {
    fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let mut params = Self::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let slot = match key.as_ref() {
                "group" => &mut params.group,
                "max" => &mut params.max,
                "wait_ms" => &mut params.wait_ms,
                other => {
                    return Err(ApiError::BadRequest(format!(
                        "unknown parameter `{other}` (expected group, max, wait_ms)"
                    )));
                }
            };
            *slot = Some(value.into_owned());
        }
        Ok(params)
    }
}

fn check_group(group: Option<&str>) -> Result<&str, ApiError> {
    let group = group.ok_or_else(|| ApiError::BadRequest("`group` is required".into()))?;
    if crate::queues::config::is_valid_queue_name(group) {
        Ok(group)
    } else {
        Err(ApiError::BadRequest(
            "`group` must be 1-64 characters from A-Z a-z 0-9 _ - .".into(),
        ))
    }
}

fn number_param(
    name: &str,
    value: Option<&str>,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ApiError> {
    let Some(value) = value else {
        return Ok(default);
    };
    match value.parse::<u64>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(ApiError::BadRequest(format!(
            "`{name}` must be an integer from {} to {}",
            range.start(),
            range.end()
        ))),
    }
}

impl ApiState {
    fn check_queue(&self, queue: &str) -> Result<(), ApiError> {
        if self.gateway.queues.log.has_queue(queue) {
            Ok(())
        } else {
            Err(ApiError::UnknownQueue(queue.to_owned()))
        }
    }
}

/// `GET @queues/{queue}/messages?group=G&max=N&wait_ms=W`: entries from the group's
/// committed offset on; waits up to W ms for one when there are none.
async fn get_queue_messages(
    State(state): State<ApiState>,
    Path((stage, queue)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    state.check_stage(&stage)?;
    state.check_queue(&queue)?;
    let params = PullParams::parse(query.as_deref())?;
    let group = check_group(params.group.as_deref())?;
    let max = number_param("max", params.max.as_deref(), 100, 1..=MAX_PULL as u64)? as usize;
    let wait = number_param("wait_ms", params.wait_ms.as_deref(), 0, 0..=MAX_WAIT_MS)?;
    if let Some(cluster) = &state.gateway.cluster {
        let wait = std::time::Duration::from_millis(wait);
        let (first, _) = cluster
            .queue_bounds(&queue)
            .await
            .map_err(cluster_queue_error)?;
        let from = cluster
            .committed(&queue, group)
            .await
            .map_err(cluster_queue_error)?
            .max(first);
        let entries = cluster
            .read_queue(&queue, from, max, wait)
            .await
            .map_err(cluster_queue_error)?;
        let next = entries.last().map_or(from, |e| e.offset + 1);
        let messages = entries.iter().map(|e| (e.offset, e.payload.to_vec()));
        return Ok(pull_response(messages, next));
    }
    let hub = &state.gateway.queues;
    let (first, _) = hub.log.bounds(&queue)?;
    let from = hub.log.committed(&queue, group)?.max(first);
    let mut read = hub.read(&queue, from, max).await?;
    if read.entries.is_empty() && wait > 0 {
        if let Some(mut next) = state.gateway.queues.watch(&queue) {
            let arrived = next.wait_for(|next| *next > read.next);
            let _ = tokio::time::timeout(std::time::Duration::from_millis(wait), arrived).await;
        }
        read = hub.read(&queue, read.next, max).await?;
    }
    Ok(pull_response(
        crate::queues::events(&queue, read.entries),
        read.next,
    ))
}

/// The pull's answer: `{"messages": [{"offset", "event"}], "next"}`.
fn pull_response(entries: impl Iterator<Item = (u64, Vec<u8>)>, next: u64) -> Response {
    let messages: Vec<Value> = entries
        .map(|(offset, event)| {
            let event: Value = serde_json::from_slice(&event).unwrap_or(Value::Null);
            json!({"offset": offset, "event": event})
        })
        .collect();
    axum::Json(json!({"messages": messages, "next": next})).into_response()
}

fn cluster_queue_error(error: crate::cluster::queues::QueueError) -> ApiError {
    match error {
        crate::cluster::queues::QueueError::Unknown(queue) => ApiError::UnknownQueue(queue),
        other => ApiError::ClusterUnavailable(other.to_string()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitRequest {
    group: String,
    offset: u64,
}

fn check_commit_offset(offset: u64, next: u64, queue: &str) -> Result<(), ApiError> {
    if offset > next {
        return Err(ApiError::BadRequest(format!(
            "offset {offset} is past the end of queue {queue} (next offset {next})"
        )));
    }
    Ok(())
}

/// `POST @queues/{queue}/commit` with `{"group", "offset"}` (the next offset to read).
async fn post_queue_commit(
    State(state): State<ApiState>,
    Path((stage, queue)): Path<(String, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    state.check_stage(&stage)?;
    state.check_queue(&queue)?;
    let body = state.read_body(body, COMMIT_BODY_BYTES).await?;
    let request: CommitRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("malformed commit request: {e}")))?;
    let group = check_group(Some(&request.group))?.to_owned();
    if let Some(cluster) = &state.gateway.cluster {
        let (_, next) = cluster
            .queue_bounds(&queue)
            .await
            .map_err(cluster_queue_error)?;
        check_commit_offset(request.offset, next, &queue)?;
        let committed = cluster
            .commit(&queue, &group, request.offset)
            .await
            .map_err(cluster_queue_error)?;
        return Ok(
            axum::Json(json!({"group": request.group, "offset": committed})).into_response(),
        );
    }
    let log = state.gateway.queues.log.clone();
    let (_, next) = log.bounds(&queue)?;
    check_commit_offset(request.offset, next, &queue)?;
    let committed = tokio::task::spawn_blocking(move || log.commit(&queue, &group, request.offset))
        .await
        .map_err(|e| ApiError::BadRequest(format!("commit interrupted: {e}")))??;
    Ok(axum::Json(json!({"group": request.group, "offset": committed})).into_response())
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
