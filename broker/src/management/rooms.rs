//! `@rooms`: publish to a room, list its members, and add or remove one, across every
//! shard and node ([`crate::directory`]).

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::state::{ApiError, ApiState, room_name};
use crate::connection_id::ConnectionId;
use crate::message::Message;
use crate::rooms::history::Want;

#[derive(Debug, Deserialize)]
pub(super) struct RoomPublishParams {
    exclude: Option<String>,
    /// `1` or `true`: WebTransport members that asked for datagrams get it as one.
    unreliable: Option<String>,
    /// In a conflating room: the message's key (latest wins in members' queues).
    key: Option<String>,
}

pub(super) async fn post_to_room(
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
    let unreliable = flag("unreliable", params.unreliable.as_deref(), false)?;
    let delivery = crate::rooms::RoomDelivery {
        exclude,
        unreliable,
        position: None,
        conflation: (params.key.as_deref()).map(|key| crate::rooms::conflation_key(&room, key)),
        // Stamped by the directory.
        stamp: None,
    };
    let payload = state
        .read_body(body, state.gateway.config.limits.max_message_bytes)
        .await?;
    let started = std::time::Instant::now();
    let message = Message::data(payload);
    let directory = &state.gateway.directory;
    let published = (directory.broadcast(&room, &message, delivery).await)
        .map_err(|unreached| ApiError::unreached(room.to_string(), unreached))?;
    state.observe_fanout("room", started);
    let mut answer = json!({"delivered": published.delivered});
    if let Some(offset) = published.offset {
        answer["offset"] = offset.into();
    }
    Ok(axum::Json(answer).into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct HistoryParams {
    /// Only the messages after this offset (default: all kept).
    since: Option<String>,
    /// At most this many (default: all).
    limit: Option<String>,
    /// The epoch `since` counts in; `recovered` says whether it is still this one.
    epoch: Option<String>,
}

/// `GET @rooms/{room}/history`: the messages the room keeps, oldest first.
pub(super) async fn get_history(
    State(state): State<ApiState>,
    Path((stage, room)): Path<(String, String)>,
    Query(params): Query<HistoryParams>,
) -> Result<Response, ApiError> {
    state.check_stage(&stage)?;
    let room = room_name(&room)?;
    let directory = &state.gateway.directory;
    if directory.settings(&room).history.is_none() {
        return Err(ApiError::RoomFeatureOff(
            room.as_str().to_owned(),
            "history",
        ));
    }
    let want = Want::Since {
        offset: number("since", params.since.as_deref())?.unwrap_or(0),
        epoch: params.epoch,
        limit: number("limit", params.limit.as_deref())?.map_or(usize::MAX, |n| n as usize),
    };
    let replay = (directory.replay(&room, &want).await)
        .map_err(|unreached| ApiError::unreached(room.to_string(), unreached))?;
    Ok(axum::Json(replay.to_json(&room)).into_response())
}

/// A non-negative integer query parameter, if present.
fn number(name: &str, value: Option<&str>) -> Result<Option<u64>, ApiError> {
    value
        .map(|text| {
            text.parse().map_err(|_| {
                ApiError::BadRequest(format!("{name}: `{text}` is not a non-negative integer"))
            })
        })
        .transpose()
}

#[derive(Debug, Deserialize)]
pub(super) struct PresenceParams {
    /// `false`: only the counts (cheap for a big room).
    members: Option<String>,
}

/// `GET @rooms/{room}/presence`: who is in the room on every node, and how many distinct
/// users (the authorizer's principals) that is.
pub(super) async fn get_presence(
    State(state): State<ApiState>,
    Path((stage, room)): Path<(String, String)>,
    Query(params): Query<PresenceParams>,
) -> Result<Response, ApiError> {
    state.check_stage(&stage)?;
    let room = room_name(&room)?;
    let with_members = flag("members", params.members.as_deref(), true)?;
    if !state.gateway.config.rooms.for_room(&room).presence {
        return Err(ApiError::RoomFeatureOff(
            room.as_str().to_owned(),
            "presence",
        ));
    }
    let members = state.gateway.directory.presence(&room).await;
    let body = crate::rooms::presence_json(&room, &members, with_members);
    Ok(axum::Json(body).into_response())
}

pub(super) async fn get_room(
    State(state): State<ApiState>,
    Path((stage, room)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    state.check_stage(&stage)?;
    let room = room_name(&room)?;
    let members = state.gateway.directory.members(&room).await;
    let mut body = json!({
        "room": room.as_str(),
        "count": members.len(),
        "connectionIds": members,
    });
    // In cluster mode, the node that numbers a numbered room's messages.
    if let Some(cluster) = &state.gateway.cluster
        && state.gateway.directory.settings(&room).sequenced()
    {
        body["owner"] = cluster.room_owner(&room).into();
    }
    Ok(axum::Json(body).into_response())
}

pub(super) async fn put_room_member(
    State(state): State<ApiState>,
    Path(path): Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    change_membership(&state, path, Membership::Join).await
}

pub(super) async fn delete_room_member(
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
    let directory = &state.gateway.directory;
    let changed = match change {
        Membership::Join => directory.join(&id, room).await,
        Membership::Leave => directory.leave(&id, room).await,
    };
    changed.map_err(|unreached| ApiError::unreached(id, unreached))?;
    Ok(StatusCode::NO_CONTENT)
}

/// A yes/no query parameter: `1`, `true`, `0`, `false`, or absent (`default`).
fn flag(name: &str, value: Option<&str>, default: bool) -> Result<bool, ApiError> {
    match value {
        None => Ok(default),
        Some("1" | "true") => Ok(true),
        Some("0" | "false") => Ok(false),
        Some(other) => Err(ApiError::BadRequest(format!(
            "{name}: `{other}` is not 1, 0, true or false"
        ))),
    }
}
