//! `type = "http"`: calls a backend with the event a Lambda proxy integration gets, and
//! reads its answer the way AWS does (`statusCode`, `headers`, `body`). Also the pooled
//! client every backend call goes through (`$connect`, `$disconnect`, the authorizer,
//! queue pushes).

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::context::{Caller, Received};
use crate::config::check::{ConfigError, invalid};

pub const KIND: &str = "http";

/// `type = "http"`, as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    pub url: String,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    29_000
}

#[derive(Debug, Clone)]
pub struct Http {
    pub url: reqwest::Url,
    pub timeout: Duration,
}

impl RawHttp {
    pub fn validate(&self, path: &str) -> Result<Http, ConfigError> {
        let url = &self.url;
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| invalid(format!("{path}.integration.url"), format!("`{url}`: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(invalid(
                format!("{path}.integration.url"),
                "must be an http:// or https:// URL",
            ));
        }
        if self.timeout_ms == 0 {
            return Err(invalid(
                format!("{path}.integration.timeout_ms"),
                "must be greater than 0",
            ));
        }
        Ok(Http {
            url: parsed,
            timeout: Duration::from_millis(self.timeout_ms),
        })
    }
}

impl Http {
    /// A backend's answer goes back only when the route asks for it.
    pub const RESPONDS: bool = false;

    pub fn run(&self, message: Received, caller: &dyn Caller) {
        caller.call_backend(message);
    }
}

/// What the backend answered, normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendReply {
    /// `statusCode` from a Lambda-proxy-shaped body, else the HTTP status.
    pub status: u16,
    /// The HTTP status itself: not 2xx means the invocation failed, whatever the body.
    pub http_status: u16,
    /// Lambda-proxy `headers`, names lower-cased.
    pub headers: HashMap<String, String>,
    /// The body to hand back to the client, if any.
    pub body: Option<Bytes>,
}

impl BackendReply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Whether the backend was invoked: it answered with a 2xx HTTP status. A Lambda-proxy
    /// answer with another `statusCode` is still an invocation that returned a body (on
    /// AWS the client gets that body; the error frame is for failed invocations).
    pub fn invoked(&self) -> bool {
        (200..300).contains(&self.http_status)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// The backend could not be asked. Always the backend's fault (or the network's).
#[derive(Debug, thiserror::Error)]
pub enum IntegrationError {
    #[error("backend did not answer within {0:?}")]
    Timeout(Duration),
    #[error("backend unreachable: {0}")]
    Unreachable(String),
}

impl IntegrationError {
    /// The `kind` label of `switchboard_integration_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::Unreachable(_) => "unreachable",
        }
    }
}

/// A pooled HTTP client. Each shard owns one so its connections stay on its runtime.
#[derive(Debug, Clone)]
pub struct HttpIntegration {
    client: reqwest::Client,
}

impl HttpIntegration {
    pub fn new() -> Self {
        // reqwest is built without a bundled crypto provider: install ring once.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
            // A backend, authorizer or key-set URL is what the config names: an answer
            // that points elsewhere is not followed.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self { client }
    }

    /// GETs `url` (a JWKS document, say) within `timeout`; the body of a 2xx answer, at
    /// most `max_bytes` of it (a longer one is an error, read no further).
    pub async fn fetch(
        &self,
        url: &reqwest::Url,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<Bytes, IntegrationError> {
        let unreachable = |e: reqwest::Error| IntegrationError::Unreachable(e.to_string());
        let mut response = self
            .client
            .get(url.clone())
            .timeout(timeout)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(unreachable)?;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
            if body.len() + chunk.len() > max_bytes {
                return Err(IntegrationError::Unreachable(format!(
                    "answer longer than {max_bytes} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.into())
    }

    /// POSTs the event JSON to `url` and reads the reply.
    pub async fn call(
        &self,
        url: &reqwest::Url,
        timeout: Duration,
        event: Vec<u8>,
    ) -> Result<BackendReply, IntegrationError> {
        self.call_with(url, timeout, event, None).await
    }

    /// [`HttpIntegration::call`], with one more header (a webhook's signature).
    pub async fn call_with(
        &self,
        url: &reqwest::Url,
        timeout: Duration,
        event: Vec<u8>,
        header: Option<(&'static str, &str)>,
    ) -> Result<BackendReply, IntegrationError> {
        let mut request = self
            .client
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        let request = request.body(event).timeout(timeout).send();
        let map_err = |e: reqwest::Error| {
            if e.is_timeout() {
                IntegrationError::Timeout(timeout)
            } else {
                IntegrationError::Unreachable(error_chain(&e))
            }
        };
        let response = request.await.map_err(map_err)?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(map_err)?;
        Ok(parse_reply(status, body))
    }
}

impl Default for HttpIntegration {
    fn default() -> Self {
        Self::new()
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Reads a backend's answer: a Lambda-proxy object (`{"statusCode", "headers", "body",
/// "isBase64Encoded"}`) is unpacked; anything else is the body itself.
pub fn parse_reply(http_status: u16, body: Bytes) -> BackendReply {
    let plain = |body: Bytes| BackendReply {
        status: http_status,
        http_status,
        headers: HashMap::new(),
        body: (!body.is_empty()).then_some(body),
    };
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(&body) else {
        return plain(body);
    };
    let Some(status) = object
        .get("statusCode")
        .and_then(Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
    else {
        return plain(body);
    };
    let headers = object
        .get("headers")
        .and_then(Value::as_object)
        .map(|h| {
            h.iter()
                .filter_map(|(k, v)| Some((k.to_ascii_lowercase(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let base64 = object.get("isBase64Encoded").and_then(Value::as_bool) == Some(true);
    let body = match object.get("body") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) if base64 => base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()
            .map(Bytes::from),
        Some(Value::String(text)) => Some(Bytes::from(text.clone())),
        Some(other) => Some(Bytes::from(other.to_string())),
    };
    BackendReply {
        status,
        http_status,
        headers,
        body: body.filter(|b| !b.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambda_proxy_object_is_unpacked() {
        let reply = parse_reply(
            200,
            Bytes::from_static(
                br#"{"statusCode":401,"headers":{"Sec-WebSocket-Protocol":"chat"},"body":"no"}"#,
            ),
        );
        assert_eq!(reply.status, 401);
        assert_eq!(reply.header("sec-websocket-protocol"), Some("chat"));
        assert_eq!(reply.body.as_deref(), Some(&b"no"[..]));
        assert!(!reply.is_success());
    }

    #[test]
    fn anything_else_is_the_body_itself() {
        let reply = parse_reply(200, Bytes::from_static(br#"{"hello":"world"}"#));
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body.as_deref(), Some(&br#"{"hello":"world"}"#[..]));
        let reply = parse_reply(503, Bytes::from_static(b"down"));
        assert_eq!(reply.status, 503);
        assert_eq!(parse_reply(204, Bytes::new()).body, None);
    }

    #[test]
    fn object_bodies_and_base64_bodies() {
        let reply = parse_reply(
            200,
            Bytes::from_static(br#"{"statusCode":200,"body":{"a":1}}"#),
        );
        assert_eq!(reply.body.as_deref(), Some(&br#"{"a":1}"#[..]));
        let reply = parse_reply(
            200,
            Bytes::from_static(br#"{"statusCode":200,"body":"/wA=","isBase64Encoded":true}"#),
        );
        assert_eq!(reply.body.as_deref(), Some(&[0xff, 0x00][..]));
    }
}
