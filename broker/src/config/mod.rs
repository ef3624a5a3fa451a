//! The TOML configuration: parsed with unknown keys refused, then validated once into typed,
//! ready-to-use values (compiled selection expressions, parsed URLs, durations).
//!
//! Every key has a working default; `switchboard serve` with no file runs [`DEMO_CONFIG`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod check;

pub use crate::auth::config::RawAuthorizer;
use crate::integration::config::validate_routes;
pub use crate::integration::config::{
    CONNECT_ROUTE, DEFAULT_ROUTE, DISCONNECT_ROUTE, RawRoute, Route, RouteTable,
};
pub use crate::integration::registry::{Integration, RawIntegration};
pub use crate::limits::config::{InboundRate, Limits, RawLimits};
pub use crate::management::config::{ManagementConfig, RawAwsKey, RawManagement};
use crate::queues::config::check_queue_name;
pub use crate::queues::config::{
    PushConfig, PushFormat, QueueConfig, RawQueue, RawStorage, StorageConfig,
};
pub use crate::resume::config::ResumeConfig;
pub use crate::rooms::config::{RawRooms, RoomPolicy};
pub use crate::transport::tls::RawTls;
pub use crate::transport::webtransport::config::RawWebTransport;
pub use check::ConfigError;
use check::{invalid, parse_addr, parse_http_url};

use crate::selection::SelectionExpression;
use crate::transport::TlsEndpoint;
use crate::transport::webtransport::config::WebTransportConfig;

/// `server.max_connections` unless configured.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;

/// The embedded demo: echo on `$default`, rooms on join/leave/publish, no backend needed.
pub const DEMO_CONFIG: &str = include_str!("../demo.toml");

/// The file as written. Serialized back by `check-config` to show the effective values.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    pub server: RawServer,
    pub management: RawManagement,
    pub api: RawApi,
    pub limits: RawLimits,
    pub storage: RawStorage,
    pub queues: std::collections::BTreeMap<String, RawQueue>,
    pub routes: std::collections::BTreeMap<String, RawRoute>,
    pub rooms: RawRooms,
    /// Runs on every upgrade request before the `$connect` integration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorizer: Option<RawAuthorizer>,
    /// Scale-out over NATS; absent: one node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::config::RawCluster>,
    /// Room events POSTed to a URL; absent: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<crate::webhooks::config::RawWebhooks>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawServer {
    /// Clients connect to `ws://LISTEN/{stage}`.
    pub listen: String,
    /// Shard threads; 0 = one per CPU core but one (at least one).
    pub shards: usize,
    pub data_dir: PathBuf,
    /// Connections beyond this get 503 at the upgrade.
    pub max_connections: usize,
    /// This node's id, encoded in every connectionId (distinct per node when scaled out).
    pub node_id: u16,
    /// File descriptors kept back from client sockets, so the management API, backend
    /// calls, storage and the 503 answer still work when clients hold every other one.
    pub fd_reserve: usize,
    /// `wss://` on `listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawTls>,
    /// Browser origins allowed to connect (the `Origin` header); empty: any. A request
    /// without `Origin` (not a browser) is not checked.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_origins: Vec<String>,
    /// Load balancers (addresses or CIDR ranges) whose connections begin with a PROXY
    /// protocol v2 header naming the client; empty: none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
    /// WebTransport (HTTP/3 over QUIC) beside WebSocket; off without this table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webtransport: Option<RawWebTransport>,
    /// permessage-deflate for WebSocket clients that offer it.
    pub compression: RawCompression,
}

/// `[server.compression]`, as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawCompression {
    /// Clients that offer permessage-deflate get it.
    pub enabled: bool,
    /// Messages shorter than this go uncompressed.
    pub min_bytes: usize,
    /// 1 (fastest) to 9 (smallest).
    pub level: u32,
}

impl Default for RawCompression {
    fn default() -> Self {
        // On: a broadcast is compressed once for all its members, which costs the server
        // nothing measurable and halves the bytes on the wire (docs/PERFORMANCE.md).
        Self {
            enabled: true,
            min_bytes: 256,
            level: 6,
        }
    }
}

impl RawCompression {
    fn validate(&self) -> Result<Option<crate::compression::Deflate>, ConfigError> {
        if !(1..=9).contains(&self.level) {
            return Err(invalid("server.compression.level", "must be 1 to 9"));
        }
        let deflate = crate::compression::Deflate::new(self.level, self.min_bytes);
        Ok(self.enabled.then_some(deflate))
    }
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            shards: 0,
            data_dir: "./data".into(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            node_id: 0,
            fd_reserve: 1024,
            tls: None,
            allowed_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            webtransport: None,
            compression: RawCompression::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawApi {
    pub stage: String,
    pub route_selection_expression: String,
    /// Reported as `requestContext.apiId`.
    pub id: String,
    /// A client whose connection drops may come back with its resume token within
    /// `resume_window_secs` and keep its connectionId, rooms and every message (off by
    /// default, as on AWS; see README "Resume").
    pub resume: bool,
    pub resume_window_secs: u64,
    /// Data frames (and their bytes) each connection keeps after writing them, to send
    /// again to a client that resumes: what may have died in kernel buffers with its socket.
    pub resume_buffer_frames: usize,
    pub resume_buffer_bytes: usize,
}

impl Default for RawApi {
    fn default() -> Self {
        Self {
            stage: "dev".into(),
            route_selection_expression: "$request.body.action".into(),
            id: "switchboard".into(),
            resume: false,
            resume_window_secs: 120,
            resume_buffer_frames: 128,
            resume_buffer_bytes: 256 * 1024,
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub management: ManagementConfig,
    pub api: ApiConfig,
    pub limits: Limits,
    pub routes: RouteTable,
    /// `[rooms]`: what each room keeps and serves.
    pub rooms: RoomPolicy,
    pub storage: StorageConfig,
    /// Every durable queue: declared under `[queues]` or named by a `queue` route.
    pub queues: Vec<QueueConfig>,
    pub authorizer: Option<crate::auth::authorizer::Authorizer>,
    pub cluster: Option<crate::cluster::config::ClusterConfig>,
    pub webhooks: Option<crate::webhooks::config::WebhookConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Resolved: never 0.
    pub shards: usize,
    pub data_dir: PathBuf,
    pub max_connections: usize,
    pub node_id: u16,
    pub fd_reserve: usize,
    pub tls: Option<TlsEndpoint>,
    pub allowed_origins: Vec<String>,
    pub trusted_proxies: Vec<crate::transport::proxy_protocol::Cidr>,
    pub webtransport: Option<WebTransportConfig>,
    /// permessage-deflate, when `[server.compression] enabled`.
    pub compression: Option<crate::compression::Deflate>,
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub stage: String,
    pub route_selector: SelectionExpression,
    pub id: String,
    /// Set when `api.resume` is on.
    pub resume: Option<ResumeConfig>,
}

impl RawConfig {
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))
    }

    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    /// The configuration with every default filled in, as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// The configuration as `check-config` shows it: every secret written in the file
    /// replaced by [`crate::secret::REDACTED`] (an `${ENV}` reference stays, it holds no
    /// value), and only the keys of the authorizer type in use.
    pub fn redacted(&self) -> Self {
        use crate::secret::redact;
        let mut shown = self.clone();
        shown.management.tokens = shown.management.tokens.iter().map(|t| redact(t)).collect();
        for key in &mut shown.management.aws_keys {
            key.secret_access_key = redact(&key.secret_access_key);
        }
        if let Some(authorizer) = &mut shown.authorizer {
            authorizer.secret = authorizer.secret.as_deref().map(redact);
            authorizer.keys = authorizer.keys.iter().map(|k| redact(k)).collect();
            if authorizer.kind != "http" {
                authorizer.cache_ttl_secs = None;
                authorizer.timeout_ms = None;
                authorizer.identity_sources.clear();
            }
            if authorizer.kind != "jwt" {
                authorizer.leeway_secs = None;
            }
        }
        if let Some(cluster) = &mut shown.cluster {
            cluster.nats_url = cluster.nats_url.redacted();
            cluster.token = cluster.token.as_deref().map(redact);
            cluster.password = cluster.password.as_deref().map(redact);
        }
        shown
    }

    /// Validates everything and compiles the ready-to-use form.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let webhooks = (self.webhooks.as_ref())
            .map(crate::webhooks::config::RawWebhooks::validate)
            .transpose()?;
        let rooms = self.rooms.validate()?;
        Ok(Config {
            server: self.server.validate()?,
            management: self.management.validate()?,
            api: self.api.validate()?,
            limits: self.limits.validate()?,
            routes: validate_routes(&self.routes)?,
            // One node keeps durable history in a queue of its log; a cluster in a stream.
            queues: self.validate_queues(
                webhooks.as_ref(),
                (rooms.durable_ttl_ms()).filter(|_| self.cluster.is_none()),
            )?,
            rooms,
            storage: self.storage.validate()?,
            authorizer: self
                .authorizer
                .as_ref()
                .map(RawAuthorizer::validate)
                .transpose()?,
            cluster: self
                .cluster
                .as_ref()
                .map(crate::cluster::config::RawCluster::validate)
                .transpose()?,
            webhooks,
        })
    }

    fn validate_queues(
        &self,
        webhooks: Option<&crate::webhooks::config::WebhookConfig>,
        durable_history_ms: Option<u64>,
    ) -> Result<Vec<QueueConfig>, ConfigError> {
        let mut queues: std::collections::BTreeMap<String, QueueConfig> = self
            .queues
            .iter()
            .map(|(name, raw)| {
                check_queue_name(&format!("queues.{name}"), name)?;
                check_not_reserved(&format!("queues.{name}"), name)?;
                let retention = raw.retention(&format!("queues.{name}"))?;
                let push = raw.push(&format!("queues.{name}"))?;
                Ok((
                    name.clone(),
                    QueueConfig {
                        name: name.clone(),
                        retention,
                        deliver_to: None,
                        push,
                        format: PushFormat::Events,
                    },
                ))
            })
            .collect::<Result<_, _>>()?;
        for (key, route) in &self.routes {
            let RawIntegration::Queue(crate::integration::queue::RawQueue {
                queue,
                deliver_to,
                ..
            }) = &route.integration
            else {
                continue;
            };
            let path = format!("routes.\"{key}\".integration");
            check_not_reserved(&format!("{path}.queue"), queue)?;
            let entry = queues.entry(queue.clone()).or_insert_with(|| QueueConfig {
                name: queue.clone(),
                retention: RawQueue::default().retention("queues").unwrap_or_default(),
                deliver_to: None,
                push: PushConfig::default(),
                format: PushFormat::Events,
            });
            if let Some(url) = deliver_to {
                let url = parse_http_url(&format!("{path}.deliver_to"), url)?;
                if entry.deliver_to.as_ref().is_some_and(|other| *other != url) {
                    return Err(invalid(
                        format!("{path}.deliver_to"),
                        format!("queue `{queue}` already delivers to another URL"),
                    ));
                }
                entry.deliver_to = Some(url);
            }
        }
        let mut queues: Vec<QueueConfig> = queues.into_values().collect();
        if let Some(webhooks) = webhooks {
            queues.push(QueueConfig {
                name: crate::webhooks::QUEUE.to_owned(),
                retention: RawQueue::default().retention("queues").unwrap_or_default(),
                deliver_to: Some(webhooks.url.clone()),
                push: PushConfig {
                    batch_size: crate::webhooks::BATCH,
                    max_in_flight: 1,
                },
                format: PushFormat::Webhook {
                    secret: webhooks.secret.as_str().into(),
                },
            });
        }
        if let Some(ttl_ms) = durable_history_ms {
            queues.push(QueueConfig {
                name: crate::rooms::history::QUEUE.to_owned(),
                retention: switchboard_storage::Retention {
                    max_age: Some(std::time::Duration::from_millis(ttl_ms)),
                    ..RawQueue::default().retention("queues").unwrap_or_default()
                },
                deliver_to: None,
                push: PushConfig::default(),
                format: PushFormat::Events,
            });
        }
        Ok(queues)
    }
}

/// The webhook and durable history queues' names are the gateway's own.
fn check_not_reserved(key: &str, name: &str) -> Result<(), ConfigError> {
    match [crate::webhooks::QUEUE, crate::rooms::history::QUEUE].contains(&name) {
        true => Err(invalid(key, format!("`{name}` is the gateway's own queue"))),
        false => Ok(()),
    }
}

impl RawServer {
    fn validate(&self) -> Result<ServerConfig, ConfigError> {
        if self.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        let shards = match self.shards {
            0 => default_shards(std::thread::available_parallelism().map_or(1, usize::from)),
            n if n > 1024 => return Err(invalid("server.shards", "at most 1024")),
            n => n,
        };
        Ok(ServerConfig {
            listen: parse_addr("server.listen", &self.listen)?,
            shards,
            data_dir: self.data_dir.clone(),
            max_connections: self.max_connections,
            node_id: self.node_id,
            fd_reserve: self.fd_reserve,
            tls: self
                .tls
                .as_ref()
                .map(|tls| tls.load("server.tls"))
                .transpose()?,
            allowed_origins: self.allowed_origins.clone(),
            trusted_proxies: self
                .trusted_proxies
                .iter()
                .map(|text| {
                    crate::transport::proxy_protocol::Cidr::parse(text).ok_or_else(|| {
                        invalid(
                            "server.trusted_proxies",
                            format!("`{text}` is not an IP address or CIDR range"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
            webtransport: self
                .webtransport
                .as_ref()
                .map(RawWebTransport::validate)
                .transpose()?,
            compression: self.compression.validate()?,
        })
    }
}

/// `server.shards = 0`: one shard per core but one, at least one. The spare core runs the
/// management API, the storage writers and the kernel's network work; measured on 2 cores
/// shared with the client, one shard delivered 1.9× what two did (docs/PERFORMANCE.md).
pub fn default_shards(cores: usize) -> usize {
    cores.saturating_sub(1).max(1)
}

impl RawApi {
    fn validate(&self) -> Result<ApiConfig, ConfigError> {
        let url_safe = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !url_safe(&self.stage) {
            return Err(invalid(
                "api.stage",
                "must be non-empty and use only letters, digits, `-` and `_`",
            ));
        }
        let route_selector = SelectionExpression::parse(&self.route_selection_expression)
            .map_err(|e| invalid("api.route_selection_expression", e.to_string()))?;
        if route_selector.uses_authorizer() {
            return Err(invalid(
                "api.route_selection_expression",
                "selects from `$request.body` only (as on AWS)",
            ));
        }
        if !(1..=86_400).contains(&self.resume_window_secs) {
            return Err(invalid(
                "api.resume_window_secs",
                "must be between 1 and 86400",
            ));
        }
        if !(1..=4096).contains(&self.resume_buffer_frames) {
            return Err(invalid(
                "api.resume_buffer_frames",
                "must be between 1 and 4096",
            ));
        }
        if self.resume_buffer_bytes == 0 {
            return Err(invalid("api.resume_buffer_bytes", "must be greater than 0"));
        }
        let resume = self.resume.then(|| ResumeConfig {
            window: Duration::from_secs(self.resume_window_secs),
            buffer_frames: self.resume_buffer_frames,
            buffer_bytes: self.resume_buffer_bytes,
        });
        Ok(ApiConfig {
            stage: self.stage.clone(),
            route_selector,
            id: self.id.clone(),
            resume,
        })
    }
}

#[cfg(test)]
mod tests;
