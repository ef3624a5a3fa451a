//! `@connections`: push to, describe and close one connection, or push one message to
//! many (`POST @connections`, a body of ids), wherever each lives ([`crate::directory`]).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use serde_json::json;

use super::state::{ApiError, ApiState, check_size};
use crate::message::Message;

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
    /// Parses and checks a bulk body; returns the request and its message.
    pub fn parse(
        body: &[u8],
        max_ids: usize,
        max_message: usize,
    ) -> Result<(Self, Message), ApiError> {
        let request: Self = serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("malformed bulk request: {e}")))?;
        if request.connection_ids.len() > max_ids {
            return Err(ApiError::TooManyIds {
                count: request.connection_ids.len(),
                limit: max_ids,
            });
        }
        let message = match (&request.data, &request.data_base64) {
            (Some(text), None) => {
                check_size(text.len(), max_message)?;
                Message::text(text.clone())
            }
            (None, Some(encoded)) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map_err(|e| ApiError::BadRequest(format!("data_base64 is not base64: {e}")))?;
                check_size(bytes.len(), max_message)?;
                Message::binary(bytes)
            }
            _ => {
                return Err(ApiError::BadRequest(
                    "exactly one of `data` and `data_base64` is required".into(),
                ));
            }
        };
        Ok((request, message))
    }
}

pub(super) async fn post_bulk(
    State(state): State<ApiState>,
    Path(stage): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    state.check_stage(&stage)?;
    let limits = &state.gateway.config.limits;
    let body = state.read_body(body, state.largest_body()).await?;
    let (request, message) = BulkRequest::parse(
        &body,
        limits.max_bulk_connection_ids,
        limits.max_message_bytes,
    )?;
    let started = std::time::Instant::now();
    let directory = &state.gateway.directory;
    let delivery = directory.send_bulk(&request.connection_ids, &message).await;
    state.observe_fanout("bulk", started);
    let gone: Vec<&str> = (delivery.gone.iter())
        .filter_map(|&index| request.connection_ids.get(index as usize))
        .map(String::as_str)
        .collect();
    Ok(axum::Json(json!({"delivered": delivery.delivered, "gone": gone})).into_response())
}

/// `POST @connections/{id}`: one message to one connection.
pub(super) async fn post_to_connection(
    State(state): State<ApiState>,
    Path((stage, id)): Path<(String, String)>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    state.check_stage(&stage)?;
    let limit = state.gateway.config.limits.max_message_bytes;
    let payload = state.read_body(body, limit).await?;
    let pushed = state
        .gateway
        .directory
        .push(&id, Message::data(payload))
        .await;
    pushed.map_err(|unreached| ApiError::unreached(id, unreached))?;
    Ok(StatusCode::OK)
}

/// `GET @connections/{id}`: when it connected, from where, and when it was last active.
pub(super) async fn get_connection(
    State(state): State<ApiState>,
    Path((stage, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    state.check_stage(&stage)?;
    let described = state.gateway.directory.describe(&id).await;
    let body = described.map_err(|unreached| ApiError::unreached(id, unreached))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// `DELETE @connections/{id}`: closes the connection (its `$disconnect` follows).
pub(super) async fn delete_connection(
    State(state): State<ApiState>,
    Path((stage, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.check_stage(&stage)?;
    let deleted = state.gateway.directory.disconnect(&id).await;
    deleted.map_err(|unreached| ApiError::unreached(id, unreached))?;
    Ok(StatusCode::NO_CONTENT)
}
