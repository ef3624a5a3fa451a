//! The management API (axum, its own listener): AWS ApiGatewayManagementApi's
//! `@connections` wire format under `/{stage}`, plus `/health` and `/metrics`.
//!
//! Handlers decode the connectionId, send one command to the owning shard and translate
//! the answer; every failure goes through [`ApiError`], the one place that decides status
//! codes and the AWS error shape (`x-amzn-ErrorType`) SDKs turn into exceptions.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::clock;
use crate::connection_id::ConnectionId;
use crate::frame;
use crate::gateway::Gateway;
use crate::shard::ShardHandle;

/// What every handler needs.
#[derive(Clone)]
pub struct ApiState {
    pub gateway: Arc<Gateway>,
    pub shards: Arc<[ShardHandle]>,
}

/// Every way a management request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("connection {0} is gone")]
    Gone(String),
    #[error("payload exceeds limits.max_message_bytes ({limit} bytes)")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    BadRequest(String),
    #[error("no such stage: {0}")]
    UnknownStage(String),
    #[error("missing or invalid credentials")]
    Unauthorized,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error_type) = match &self {
            Self::Gone(_) => (StatusCode::GONE, "GoneException"),
            Self::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLargeException")
            }
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "BadRequestException"),
            Self::UnknownStage(_) => (StatusCode::NOT_FOUND, "NotFoundException"),
            Self::Unauthorized => (StatusCode::FORBIDDEN, "ForbiddenException"),
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
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(authenticated)
        .route(
            "/health",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// With `management.tokens` set, a request needs `Authorization: Bearer TOKEN`, or an AWS
/// SigV4 header whose access key id is a token (so SDK clients can authenticate with the
/// token as their access key; the signature itself is not checked).
async fn authenticate(
    State(state): State<ApiState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let tokens = &state.gateway.config.management.tokens;
    if tokens.is_empty() {
        return Ok(next.run(request).await);
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(presented_token);
    match presented {
        Some(token) if tokens.iter().any(|t| t == token) => Ok(next.run(request).await),
        _ => Err(ApiError::Unauthorized),
    }
}

fn presented_token(authorization: &str) -> Option<&str> {
    if let Some(token) = authorization.strip_prefix("Bearer ") {
        return Some(token.trim());
    }
    let credential = authorization
        .strip_prefix("AWS4-HMAC-SHA256 ")?
        .split(',')
        .find_map(|part| part.trim().strip_prefix("Credential="))?;
    credential.split('/').next()
}

async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
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

    /// The connection's id and the shard that owns it; ids this node could not have
    /// issued are gone, like closed ones.
    fn locate(&self, text: &str) -> Result<(ConnectionId, &ShardHandle), ApiError> {
        let gone = || ApiError::Gone(text.to_owned());
        let id: ConnectionId = text.parse().map_err(|_| gone())?;
        if id.node != self.gateway.config.server.node_id || id.epoch != self.gateway.epoch {
            return Err(gone());
        }
        let shard = self.shards.get(usize::from(id.shard)).ok_or_else(gone)?;
        Ok((id, shard))
    }
}

async fn post_to_connection(
    State(state): State<ApiState>,
    Path((stage, id)): Path<(String, String)>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    state.check_stage(&stage)?;
    let payload = read_body(body, state.gateway.config.limits.max_message_bytes).await?;
    let (connection_id, shard) = state.locate(&id)?;
    shard
        .send(connection_id, frame::encode_data(&payload))
        .await
        .map_err(|_| ApiError::Gone(id))?;
    Ok(StatusCode::OK)
}

async fn get_connection(
    State(state): State<ApiState>,
    Path((stage, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    state.check_stage(&stage)?;
    let (connection_id, shard) = state.locate(&id)?;
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
    let (connection_id, shard) = state.locate(&id)?;
    shard
        .disconnect(connection_id)
        .await
        .map_err(|_| ApiError::Gone(id))?;
    Ok(StatusCode::NO_CONTENT)
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

#[cfg(test)]
mod tests {
    use super::presented_token;

    #[test]
    fn tokens_from_bearer_and_sigv4() {
        assert_eq!(presented_token("Bearer abc"), Some("abc"));
        assert_eq!(
            presented_token(
                "AWS4-HMAC-SHA256 Credential=tok/20261125/us-east-1/execute-api/aws4_request, SignedHeaders=host, Signature=x"
            ),
            Some("tok")
        );
        assert_eq!(presented_token("Basic xyz"), None);
    }
}
