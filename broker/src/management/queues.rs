//! `@queues`: pull a consumer group's entries from a durable queue and commit its offset,
//! from the local log or (cluster mode) JetStream.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::state::{ApiError, ApiState, COMMIT_BODY_BYTES};

/// Most messages one pull may ask for.
const MAX_PULL: usize = 1000;

/// Longest long-poll.
const MAX_WAIT_MS: u64 = 30_000;

/// The pull's query parameters, parsed by hand so every mistake gets a JSON 400.
#[derive(Debug, Default)]
pub(super) struct PullParams {
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

/// `GET @queues/{queue}/messages?group=G&max=N&wait_ms=W`: entries from the group's
/// committed offset on; waits up to W ms for one when there are none.
pub(super) async fn get_queue_messages(
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
    let wait = std::time::Duration::from_millis(wait);
    let pulled = state
        .gateway
        .queue_store
        .pull(&queue, group, max, wait)
        .await?;
    Ok(pull_response(pulled.messages.into_iter(), pulled.next))
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitRequest {
    group: String,
    offset: u64,
}

/// `POST @queues/{queue}/commit` with `{"group", "offset"}` (the next offset to read).
pub(super) async fn post_queue_commit(
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
    let store = &state.gateway.queue_store;
    let committed = store.commit(&queue, &group, request.offset).await?;
    Ok(axum::Json(json!({"group": request.group, "offset": committed})).into_response())
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
