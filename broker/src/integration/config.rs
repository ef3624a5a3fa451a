//! `[routes.KEY]`: each route's integration as written, and its validation into the
//! [`RouteTable`] the dispatcher reads (selection expressions compiled, URLs parsed, room
//! permissions checked to name only the authorizer's context).

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::registry::{Integration, RawIntegration};
use crate::config::check::{ConfigError, invalid};

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
        let integration = route.integration.validate(&path)?;
        let response = (route.response).unwrap_or(integration.responds_by_default());
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
