//! The event JSON a backend receives: byte-for-byte the shape of an AWS Lambda proxy
//! integration event for WebSocket APIs, so backends written for AWS work unchanged.
//!
//! Pure code: callers pass everything in, including the clock reading.

use std::collections::BTreeMap;

use base64::Engine;
use serde::Serialize;

use crate::clock;

/// Facts about a connection that every one of its events repeats.
#[derive(Debug, Clone)]
pub struct ConnectionFacts {
    pub connection_id: String,
    pub connected_at_ms: u64,
    pub source_ip: String,
    pub user_agent: String,
    /// The `Host` the client connected to.
    pub domain_name: String,
    /// What the `$connect` authorizer passed on (a JSON object), as
    /// `requestContext.authorizer`.
    pub authorizer: Option<std::sync::Arc<serde_json::value::RawValue>>,
}

/// Facts about the API, fixed by the config.
#[derive(Debug, Clone, Copy)]
pub struct ApiFacts<'a> {
    pub stage: &'a str,
    pub api_id: &'a str,
}

/// The handshake request, as `$connect` sees it.
#[derive(Debug, Clone, Default)]
pub struct HandshakeRequest {
    /// Header names as the client sent them, in order.
    pub headers: Vec<(String, String)>,
    /// Decoded query string pairs, in order.
    pub query: Vec<(String, String)>,
    /// A client resuming its connection (`requestContext.resumed = true`).
    pub resumed: bool,
}

/// A message frame's content.
#[derive(Debug, Clone, Copy)]
pub enum MessageBody<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
}

/// Which event to build.
#[derive(Debug, Clone, Copy)]
pub enum EventKind<'a> {
    Connect(&'a HandshakeRequest),
    Message {
        route_key: &'a str,
        message_id: &'a str,
        body: MessageBody<'a>,
    },
    Disconnect {
        status_code: u16,
        reason: &'a str,
    },
}

/// Per-event identifiers and time.
#[derive(Debug, Clone, Copy)]
pub struct EventStamp<'a> {
    pub request_id: &'a str,
    pub now_ms: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Event<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    headers: Option<BTreeMap<&'a str, &'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    multi_value_headers: Option<BTreeMap<&'a str, Vec<&'a str>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    query_string_parameters: Option<BTreeMap<&'a str, &'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    multi_value_query_string_parameters: Option<BTreeMap<&'a str, Vec<&'a str>>>,
    request_context: RequestContext<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<std::borrow::Cow<'a, str>>,
    is_base64_encoded: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RequestContext<'a> {
    route_key: &'a str,
    event_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_id: Option<&'a str>,
    extended_request_id: &'a str,
    request_time: String,
    message_direction: &'static str,
    stage: &'a str,
    connected_at: u64,
    request_time_epoch: u64,
    identity: Identity<'a>,
    request_id: &'a str,
    domain_name: &'a str,
    connection_id: &'a str,
    api_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    authorizer: Option<&'a serde_json::value::RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disconnect_status_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disconnect_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    resumed: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Identity<'a> {
    source_ip: &'a str,
    user_agent: &'a str,
}

/// Last value wins in the single-value map; every value is kept in the multi-value one.
type Maps<'a> = (BTreeMap<&'a str, &'a str>, BTreeMap<&'a str, Vec<&'a str>>);

fn single_and_multi(pairs: &[(String, String)]) -> Option<Maps<'_>> {
    if pairs.is_empty() {
        return None;
    }
    let mut single = BTreeMap::new();
    let mut multi: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, value) in pairs {
        single.insert(name.as_str(), value.as_str());
        multi.entry(name.as_str()).or_default().push(value.as_str());
    }
    Some((single, multi))
}

/// Serializes the event for `kind` on the connection described by `facts`.
pub fn build(
    api: ApiFacts<'_>,
    facts: &ConnectionFacts,
    stamp: EventStamp<'_>,
    kind: EventKind<'_>,
) -> Vec<u8> {
    let (route_key, event_type) = match kind {
        EventKind::Connect(_) => ("$connect", "CONNECT"),
        EventKind::Message { route_key, .. } => (route_key, "MESSAGE"),
        EventKind::Disconnect { .. } => ("$disconnect", "DISCONNECT"),
    };
    let mut event = Event {
        headers: None,
        multi_value_headers: None,
        query_string_parameters: None,
        multi_value_query_string_parameters: None,
        request_context: RequestContext {
            route_key,
            event_type,
            message_id: None,
            extended_request_id: stamp.request_id,
            request_time: clock::request_time(stamp.now_ms),
            message_direction: "IN",
            stage: api.stage,
            connected_at: facts.connected_at_ms,
            request_time_epoch: stamp.now_ms,
            identity: Identity {
                source_ip: &facts.source_ip,
                user_agent: &facts.user_agent,
            },
            request_id: stamp.request_id,
            domain_name: &facts.domain_name,
            connection_id: &facts.connection_id,
            api_id: api.api_id,
            authorizer: facts.authorizer.as_deref(),
            disconnect_status_code: None,
            disconnect_reason: None,
            resumed: false,
        },
        body: None,
        is_base64_encoded: false,
    };
    match kind {
        EventKind::Connect(request) => {
            event.request_context.resumed = request.resumed;
            if let Some((single, multi)) = single_and_multi(&request.headers) {
                event.headers = Some(single);
                event.multi_value_headers = Some(multi);
            }
            if let Some((single, multi)) = single_and_multi(&request.query) {
                event.query_string_parameters = Some(single);
                event.multi_value_query_string_parameters = Some(multi);
            }
        }
        EventKind::Message {
            message_id, body, ..
        } => {
            event.request_context.message_id = Some(message_id);
            event.body = Some(match body {
                MessageBody::Text(text) => text.into(),
                MessageBody::Binary(bytes) => {
                    event.is_base64_encoded = true;
                    base64::engine::general_purpose::STANDARD
                        .encode(bytes)
                        .into()
                }
            });
        }
        EventKind::Disconnect {
            status_code,
            reason,
        } => {
            event.request_context.disconnect_status_code = Some(status_code);
            event.request_context.disconnect_reason = Some(reason);
        }
    }
    serde_json::to_vec(&event).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn facts() -> ConnectionFacts {
        ConnectionFacts {
            connection_id: "abc".into(),
            connected_at_ms: 1_000,
            source_ip: "127.0.0.1".into(),
            user_agent: "ua".into(),
            domain_name: "localhost:8080".into(),
            authorizer: None,
        }
    }

    const API: ApiFacts<'static> = ApiFacts {
        stage: "dev",
        api_id: "api",
    };
    const STAMP: EventStamp<'static> = EventStamp {
        request_id: "req",
        now_ms: 1_764_053_068_123,
    };

    fn build_json(kind: EventKind<'_>) -> Value {
        serde_json::from_slice(&build(API, &facts(), STAMP, kind)).unwrap()
    }

    #[test]
    fn message_event_has_aws_fields() {
        let event = build_json(EventKind::Message {
            route_key: "sendMessage",
            message_id: "m1",
            body: MessageBody::Text(r#"{"action":"sendMessage"}"#),
        });
        let ctx = &event["requestContext"];
        assert_eq!(ctx["routeKey"], "sendMessage");
        assert_eq!(ctx["eventType"], "MESSAGE");
        assert_eq!(ctx["messageId"], "m1");
        assert_eq!(ctx["connectionId"], "abc");
        assert_eq!(ctx["connectedAt"], 1000);
        assert_eq!(ctx["requestTime"], "25/Nov/2025:06:44:28 +0000");
        assert_eq!(ctx["requestTimeEpoch"], 1_764_053_068_123u64);
        assert_eq!(ctx["messageDirection"], "IN");
        assert_eq!(
            ctx["identity"],
            json!({"sourceIp": "127.0.0.1", "userAgent": "ua"})
        );
        assert_eq!(ctx["stage"], "dev");
        assert_eq!(ctx["apiId"], "api");
        assert_eq!(ctx["domainName"], "localhost:8080");
        assert_eq!(event["body"], r#"{"action":"sendMessage"}"#);
        assert_eq!(event["isBase64Encoded"], false);
        assert!(event.get("headers").is_none());
    }

    #[test]
    fn binary_body_is_base64() {
        let event = build_json(EventKind::Message {
            route_key: "$default",
            message_id: "m",
            body: MessageBody::Binary(&[0xff, 0x00]),
        });
        assert_eq!(event["body"], "/wA=");
        assert_eq!(event["isBase64Encoded"], true);
    }

    #[test]
    fn connect_event_carries_headers_and_query() {
        let request = HandshakeRequest {
            headers: vec![
                ("Host".into(), "h".into()),
                ("X-Multi".into(), "1".into()),
                ("X-Multi".into(), "2".into()),
            ],
            query: vec![("token".into(), "t".into())],
            resumed: false,
        };
        let event = build_json(EventKind::Connect(&request));
        assert_eq!(event["requestContext"]["eventType"], "CONNECT");
        assert_eq!(event["requestContext"]["routeKey"], "$connect");
        assert_eq!(event["headers"]["X-Multi"], "2");
        assert_eq!(event["multiValueHeaders"]["X-Multi"], json!(["1", "2"]));
        assert_eq!(event["queryStringParameters"], json!({"token": "t"}));
        assert_eq!(
            event["multiValueQueryStringParameters"],
            json!({"token": ["t"]})
        );
        assert!(event.get("body").is_none());
        assert!(
            event["requestContext"].get("resumed").is_none(),
            "only a resume says so"
        );
        let resumed = HandshakeRequest {
            resumed: true,
            ..request
        };
        let event = build_json(EventKind::Connect(&resumed));
        assert_eq!(event["requestContext"]["resumed"], true);
    }

    #[test]
    fn disconnect_event_has_status_and_reason() {
        let event = build_json(EventKind::Disconnect {
            status_code: 1001,
            reason: "idle timeout",
        });
        assert_eq!(event["requestContext"]["eventType"], "DISCONNECT");
        assert_eq!(event["requestContext"]["disconnectStatusCode"], 1001);
        assert_eq!(event["requestContext"]["disconnectReason"], "idle timeout");
    }
}
