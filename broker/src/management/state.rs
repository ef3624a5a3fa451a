//! What every management handler shares: the gateway, the one error type (which decides
//! status codes and the AWS error shape, `x-amzn-ErrorType`, that SDKs turn into
//! exceptions), and reading bodies within their limits and time.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::auth::sigv4;
use crate::directory::Unreached;
use crate::gateway::Gateway;
use crate::queues::store::QueueStoreError;
use crate::rooms::RoomName;

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
    #[error("{1} is off for room {0} ([rooms])")]
    RoomFeatureOff(String, &'static str),
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
    /// Storage could not take what the call needed stored.
    #[error("{0}")]
    Unavailable(String),
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
            Self::UnknownStage(_)
            | Self::UnknownQueue(_)
            | Self::RoomFeatureOff(..)
            | Self::WebTransportDisabled => (StatusCode::NOT_FOUND, "NotFoundException"),
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
            Self::ClusterUnavailable(_) | Self::Unavailable(_) | Self::Busy => (
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

pub(super) fn check_size(size: usize, limit: usize) -> Result<(), ApiError> {
    if size > limit {
        Err(ApiError::PayloadTooLarge { limit })
    } else {
        Ok(())
    }
}

pub(super) fn room_name(text: &str) -> Result<RoomName, ApiError> {
    RoomName::parse(text)
        .map_err(|e| ApiError::BadRequest(format!("invalid room name `{text}`: {e}")))
}

/// A queue commit's body: `{"group": G, "offset": N}`.
pub(super) const COMMIT_BODY_BYTES: usize = 4096;

impl ApiState {
    pub(super) fn check_stage(&self, stage: &str) -> Result<(), ApiError> {
        if stage == self.gateway.config.api.stage {
            Ok(())
        } else {
            Err(ApiError::UnknownStage(stage.to_owned()))
        }
    }

    pub(super) fn observe_fanout(&self, kind: &str, started: std::time::Instant) {
        self.gateway
            .metrics
            .fanout_duration
            .with_label_values(&[kind])
            .observe(started.elapsed().as_secs_f64());
    }
}

impl ApiState {
    /// The largest body any route takes: a bulk request, with room for its ids (quoted,
    /// comma-separated) and a base64 payload.
    /// The largest body a route reads: a bulk send's id list, a queue commit's few bytes,
    /// or one message.
    pub(super) fn body_limit(&self, method: &axum::http::Method, path: &str) -> usize {
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

    pub(super) fn largest_body(&self) -> usize {
        let limits = &self.gateway.config.limits;
        limits.max_bulk_connection_ids * 40 + limits.max_message_bytes * 2 + 1024
    }

    /// Reads a request body of at most `limit` bytes within `management.body_timeout_secs`.
    pub(super) async fn read_body(&self, body: Body, limit: usize) -> Result<Bytes, ApiError> {
        let timeout = self.gateway.config.management.body_timeout;
        tokio::time::timeout(timeout, read_body(body, limit))
            .await
            .map_err(|_| ApiError::BodyTimeout(timeout))?
    }
}

impl From<QueueStoreError> for ApiError {
    fn from(error: QueueStoreError) -> Self {
        match error {
            QueueStoreError::UnknownQueue(queue) => Self::UnknownQueue(queue),
            error @ QueueStoreError::PastTheEnd { .. } => Self::BadRequest(error.to_string()),
            QueueStoreError::Storage(error) => Self::Storage(error),
            QueueStoreError::Unavailable(reason) => Self::ClusterUnavailable(reason),
        }
    }
}

impl ApiError {
    /// Connection `id` could not be reached, as the API tells it.
    pub(super) fn unreached(id: String, unreached: Unreached) -> Self {
        match unreached {
            Unreached::Gone => Self::Gone(id),
            Unreached::ClusterUnavailable(reason) => Self::ClusterUnavailable(reason),
            Unreached::Unavailable(reason) => Self::Unavailable(reason),
            Unreached::LimitExceeded(reason) => Self::LimitExceeded(reason),
            Unreached::BadRequest(reason) => Self::BadRequest(reason),
        }
    }
}
