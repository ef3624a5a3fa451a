//! `[routes.KEY]`: each route's integration as written, and its validation into the
//! [`RouteTable`] the dispatcher reads (selection expressions compiled, URLs parsed, room
//! permissions checked to name only the authorizer's context).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::check::{ConfigError, invalid};
use crate::queues::config::check_queue_name;
use crate::selection::SelectionExpression;

pub const CONNECT_ROUTE: &str = "$connect";
pub const DISCONNECT_ROUTE: &str = "$disconnect";
pub const DEFAULT_ROUTE: &str = "$default";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub integration: RawIntegration,
    /// Send the integration's response body back to the client. Default: true for
    /// `mock` and `echo` (the response is their point), false for `http`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawIntegration {
    Http {
        url: String,
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
    },
    Mock {
        #[serde(default)]
        body: String,
    },
    Echo {},
    RoomJoin {
        room: String,
        /// `$context.authorizer.<path>`: the rooms (a list, or a comma-separated string;
        /// `prefix*` patterns) the authorizer lets this connection join; absent: any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        allow: Option<String>,
    },
    RoomLeave {
        room: String,
    },
    RoomPublish {
        room: String,
        /// As for `room_join`: the rooms it may publish to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        allow: Option<String>,
        /// What to send; default: the whole frame.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(default)]
        exclude_sender: bool,
        /// Only members of the room may publish to it.
        #[serde(default = "yes")]
        members_only: bool,
        /// Latest-value-wins data: WebTransport members that asked for datagrams get it
        /// as one (QUIC does not retransmit it).
        #[serde(default)]
        unreliable: bool,
    },
    Queue {
        queue: String,
        #[serde(default)]
        ack: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deliver_to: Option<String>,
    },
}

fn default_timeout_ms() -> u64 {
    29_000
}

fn yes() -> bool {
    true
}

/// The configured routes, by route key.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: HashMap<String, Arc<Route>>,
}

impl RouteTable {
    pub fn get(&self, key: &str) -> Option<&Arc<Route>> {
        self.routes.get(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    pub key: String,
    pub integration: Integration,
    pub response: bool,
}

/// A route's integration, ready to run.
#[derive(Debug, Clone)]
pub enum Integration {
    Http {
        url: reqwest::Url,
        timeout: Duration,
    },
    Mock {
        body: String,
    },
    Echo,
    /// Built-in room operations: the room (and payload) come from the frame, or from the
    /// authorizer context; `allow` names the rooms the context permits.
    RoomJoin {
        room: SelectionExpression,
        allow: Option<SelectionExpression>,
    },
    RoomLeave {
        room: SelectionExpression,
    },
    RoomPublish {
        room: SelectionExpression,
        allow: Option<SelectionExpression>,
        data: Option<SelectionExpression>,
        exclude_sender: bool,
        members_only: bool,
        unreliable: bool,
    },
    /// Append the MESSAGE event to a durable queue.
    Queue {
        queue: Arc<str>,
        ack: bool,
    },
}

impl Integration {
    /// The metric label for this integration kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Http { .. } => "http",
            Self::Mock { .. } => "mock",
            Self::Echo => "echo",
            Self::RoomJoin { .. } => "room_join",
            Self::RoomLeave { .. } => "room_leave",
            Self::RoomPublish { .. } => "room_publish",
            Self::Queue { .. } => "queue",
        }
    }
}

pub(crate) fn validate_routes(
    raw: &std::collections::BTreeMap<String, RawRoute>,
) -> Result<RouteTable, ConfigError> {
    let mut routes = HashMap::new();
    for (key, route) in raw {
        let path = format!("routes.\"{key}\"");
        if key.is_empty() {
            return Err(invalid(path, "route keys must not be empty"));
        }
        if key.starts_with('$')
            && ![CONNECT_ROUTE, DISCONNECT_ROUTE, DEFAULT_ROUTE].contains(&key.as_str())
        {
            return Err(invalid(
                path,
                "only $connect, $disconnect and $default may start with `$`",
            ));
        }
        let integration = validate_integration(&path, &route.integration)?;
        let response = route.response.unwrap_or(matches!(
            integration,
            Integration::Mock { .. } | Integration::Echo
        ));
        routes.insert(
            key.clone(),
            Arc::new(Route {
                key: key.clone(),
                integration,
                response,
            }),
        );
    }
    Ok(RouteTable { routes })
}

fn validate_integration(path: &str, raw: &RawIntegration) -> Result<Integration, ConfigError> {
    Ok(match raw {
        RawIntegration::Http { url, timeout_ms } => {
            let parsed = reqwest::Url::parse(url)
                .map_err(|e| invalid(format!("{path}.integration.url"), format!("`{url}`: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(invalid(
                    format!("{path}.integration.url"),
                    "must be an http:// or https:// URL",
                ));
            }
            if *timeout_ms == 0 {
                return Err(invalid(
                    format!("{path}.integration.timeout_ms"),
                    "must be greater than 0",
                ));
            }
            Integration::Http {
                url: parsed,
                timeout: Duration::from_millis(*timeout_ms),
            }
        }
        RawIntegration::Mock { body } => Integration::Mock { body: body.clone() },
        RawIntegration::Echo {} => Integration::Echo,
        RawIntegration::RoomJoin { room, allow } => Integration::RoomJoin {
            room: expression(path, "room", room)?,
            allow: allow_expression(path, allow.as_deref())?,
        },
        RawIntegration::RoomLeave { room } => Integration::RoomLeave {
            room: expression(path, "room", room)?,
        },
        RawIntegration::RoomPublish {
            room,
            allow,
            data,
            exclude_sender,
            members_only,
            unreliable,
        } => Integration::RoomPublish {
            room: expression(path, "room", room)?,
            allow: allow_expression(path, allow.as_deref())?,
            data: data
                .as_deref()
                .map(|d| expression(path, "data", d))
                .transpose()?,
            exclude_sender: *exclude_sender,
            members_only: *members_only,
            unreliable: *unreliable,
        },
        RawIntegration::Queue { queue, ack, .. } => {
            check_queue_name(&format!("{path}.integration.queue"), queue)?;
            Integration::Queue {
                queue: queue.as_str().into(),
                ack: *ack,
            }
        }
    })
}

fn expression(path: &str, key: &str, source: &str) -> Result<SelectionExpression, ConfigError> {
    SelectionExpression::parse(source)
        .map_err(|e| invalid(format!("{path}.integration.{key}"), e.to_string()))
}

/// A room route's `allow`: one `$context.authorizer.<path>` (what the backend decided, never
/// what the client sends).
fn allow_expression(
    path: &str,
    source: Option<&str>,
) -> Result<Option<SelectionExpression>, ConfigError> {
    let Some(source) = source else {
        return Ok(None);
    };
    let allow = expression(path, "allow", source)?;
    if allow.uses_body() || !allow.uses_authorizer() {
        return Err(invalid(
            format!("{path}.integration.allow"),
            "must be a `$context.authorizer.<path>` (the client's frame cannot grant rooms)",
        ));
    }
    Ok(Some(allow))
}
