//! Routing: which route a frame selects, and running that route's integration for
//! `$connect`, messages and `$disconnect`.

use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::Value;

use crate::clock;
use crate::config::{CONNECT_ROUTE, DEFAULT_ROUTE, DISCONNECT_ROUTE, Integration, Route};
use crate::connection::Connection;
use crate::connection_id::ConnectionId;
use crate::disconnect::DisconnectReason;
use crate::event::{
    self, ApiFacts, ConnectionFacts, EventKind, EventStamp, HandshakeRequest, MessageBody,
};
use crate::frame::Incoming;
use crate::gateway::Gateway;
use crate::integration::context::{self, Caller};
use crate::integration::{BackendReply, HttpIntegration, IntegrationError};
use crate::message::Message;
use crate::queues::store::AppendFailure;
use crate::rooms::RoomName;
use crate::rooms::history::Want;
use crate::rooms::{RoomDelivery, TooManyRooms};
use crate::selection::SelectionExpression;
use crate::shard::Shard;
use crate::stored_event::{self, StoredMessage};

/// What `$connect` decided.
pub enum ConnectOutcome {
    Accept {
        protocol: Option<String>,
    },
    /// Answer the handshake with `status`; `result` labels the metric.
    Reject {
        status: u16,
        body: Bytes,
        result: &'static str,
    },
}

fn api_facts(gateway: &Gateway) -> ApiFacts<'_> {
    ApiFacts {
        stage: &gateway.config.api.stage,
        api_id: &gateway.config.api.id,
    }
}

/// Runs an `http` integration with timing and error metrics.
async fn call_backend(
    gateway: &Gateway,
    http: &HttpIntegration,
    route: &Route,
    event: Vec<u8>,
) -> Result<BackendReply, IntegrationError> {
    let Integration::Http(backend) = &route.integration else {
        unreachable!("call_backend is only used for http integrations");
    };
    let started = Instant::now();
    let result = http.call(&backend.url, backend.timeout, event).await;
    gateway
        .metrics
        .integration_duration
        .with_label_values(&[route.key.as_str(), "http"])
        .observe(started.elapsed().as_secs_f64());
    let error_kind = match &result {
        Ok(reply) if !reply.is_success() => Some("status"),
        Ok(_) => None,
        Err(error) => Some(error.kind()),
    };
    if let Some(kind) = error_kind {
        gateway
            .metrics
            .integration_errors
            .with_label_values(&[route.key.as_str(), kind])
            .inc();
    }
    result
}

/// The CONNECT event for an upgrade request, with a fresh request id.
fn connect_event(shard: &Shard, facts: &ConnectionFacts, request: &HandshakeRequest) -> Vec<u8> {
    let request_id = shard.ids.borrow_mut().request_id();
    let stamp = EventStamp {
        request_id: &request_id,
        now_ms: clock::now_ms(),
    };
    event::build(
        api_facts(&shard.gateway),
        facts,
        stamp,
        EventKind::Connect(request),
    )
}

/// Runs the `$connect` route: 2xx accepts, any other status is passed to the client
/// verbatim, a backend that cannot be reached is a 502. No route accepts.
pub async fn run_connect(
    shard: &Rc<Shard>,
    facts: &ConnectionFacts,
    request: &HandshakeRequest,
) -> ConnectOutcome {
    let gateway = &shard.gateway;
    let Some(route) = gateway.config.routes.get(CONNECT_ROUTE) else {
        return ConnectOutcome::Accept { protocol: None };
    };
    if !matches!(route.integration, Integration::Http(_)) {
        return ConnectOutcome::Accept { protocol: None };
    }
    let event = connect_event(shard, facts, request);
    match call_backend(gateway, &shard.http, route, event).await {
        Ok(reply) if reply.is_success() => ConnectOutcome::Accept {
            protocol: reply.header("sec-websocket-protocol").map(str::to_owned),
        },
        Ok(reply) => ConnectOutcome::Reject {
            status: if (100..600).contains(&reply.status) && reply.status >= 300 {
                reply.status
            } else {
                502
            },
            body: reply.body.unwrap_or_default(),
            result: "rejected",
        },
        Err(error) => {
            tracing::warn!(connection_id = %facts.connection_id, %error, "$connect integration failed");
            ConnectOutcome::Reject {
                status: 502,
                body: Bytes::from_static(b"Bad Gateway"),
                result: "backend_error",
            }
        }
    }
}

/// Asks an `http` authorizer's backend about an upgrade request: POSTs AWS's REQUEST
/// authorizer event (the CONNECT event's headers, query and requestContext, plus `type`
/// and `methodArn`) and reads the answer. `None`: the backend failed or answered nonsense.
pub async fn ask_authorizer(
    shard: &Rc<Shard>,
    authorizer: &crate::auth::authorizer::Authorizer,
    facts: &ConnectionFacts,
    request: &HandshakeRequest,
) -> Option<crate::auth::authorizer::Verdict> {
    let crate::auth::authorizer::Check::Http { url, timeout, .. } = &authorizer.check else {
        return None;
    };
    let gateway = &shard.gateway;
    let connect = connect_event(shard, facts, request);
    let mut event: serde_json::Map<String, Value> = serde_json::from_slice(&connect).ok()?;
    event.insert("type".into(), Value::from("REQUEST"));
    let arn = format!(
        "arn:aws:execute-api:local:000000000000:{}/{}/{CONNECT_ROUTE}",
        gateway.config.api.id, gateway.config.api.stage
    );
    event.insert("methodArn".into(), Value::from(arn));
    event.insert("stageVariables".into(), Value::Object(Default::default()));
    let body = serde_json::to_vec(&event).ok()?;
    let started = Instant::now();
    let reply = shard.http.call(url, *timeout, body).await;
    gateway
        .metrics
        .integration_duration
        .with_label_values(&[crate::metrics::AUTHORIZER_ROUTE, "http"])
        .observe(started.elapsed().as_secs_f64());
    match reply {
        Ok(reply) => crate::auth::authorizer::verdict_from_reply(
            reply.status,
            reply.body.as_deref().unwrap_or_default(),
        ),
        Err(error) => {
            tracing::warn!(connection_id = %facts.connection_id, %error, "authorizer call failed");
            None
        }
    }
}

/// Selects the route for a text or binary message and runs it.
pub fn route_message(shard: &Rc<Shard>, connection: &Rc<Connection>, message: Incoming) {
    let gateway = &shard.gateway;
    let routes = &gateway.config.routes;
    // Parsed once: route selection and room expressions read the same body.
    let body = match &message {
        Incoming::Text(text) => serde_json::from_str::<Value>(text).unwrap_or(Value::Null),
        _ => Value::Null,
    };
    // `$connect` and `$disconnect` are the gateway's to call: a frame naming them goes to
    // `$default`, as on AWS.
    let selected = gateway
        .config
        .api
        .route_selector
        .evaluate(&body)
        .filter(|key| !is_reserved_route(key))
        .and_then(|key| routes.get(key.as_ref()));
    let Some(route) = selected.or_else(|| routes.get(DEFAULT_ROUTE)).cloned() else {
        let request_id = shard.ids.borrow_mut().request_id();
        send_error(shard, connection, "Forbidden", &request_id);
        return;
    };
    gateway
        .metrics
        .messages_received
        .with_label_values(&[route.key.as_str()])
        .inc();
    let message = context::Received {
        incoming: message,
        body,
        respond: route.response,
    };
    let caller = Handling {
        shard,
        connection,
        route: &route,
    };
    route.integration.run(message, &caller);
}

/// A message of `connection` being handled by `route`: what its integration acts on.
struct Handling<'a> {
    shard: &'a Rc<Shard>,
    connection: &'a Rc<Connection>,
    route: &'a std::sync::Arc<Route>,
}

impl Caller for Handling<'_> {
    fn id(&self) -> ConnectionId {
        self.connection.id
    }

    fn connection_id(&self) -> &str {
        &self.connection.facts.connection_id
    }

    fn authorizer_context(&self, expressions: &[Option<&SelectionExpression>]) -> Option<Value> {
        if !expressions.iter().flatten().any(|e| e.uses_authorizer()) {
            return None;
        }
        let raw = self.connection.facts.authorizer.as_deref()?;
        serde_json::from_str(raw.get()).ok()
    }

    fn reply(&self, message: Message) {
        let _ = self.connection.push(message, &self.shard.gateway.metrics);
    }

    fn fail(&self, reason: &str) {
        let request_id = self.shard.ids.borrow_mut().request_id();
        send_error(self.shard, self.connection, reason, &request_id);
    }

    fn count_refusal(&self, reason: &'static str) {
        let refused = &self.shard.gateway.metrics.refused;
        refused.with_label_values(&[reason]).inc();
    }

    fn join(&self, room: &RoomName, replay: Option<Want>) -> Result<(), TooManyRooms> {
        match replay {
            Some(want) => self.shard.join_with_replay(self.connection, room, want),
            None => self.shard.join(self.connection, room),
        }
    }

    fn leave(&self, room: &RoomName) {
        self.shard.leave(self.connection, room);
    }

    fn is_member(&self, room: &RoomName) -> bool {
        self.shard.is_member(self.connection, room)
    }

    fn publish(&self, room: RoomName, message: Message, delivery: RoomDelivery) {
        self.shard.publish(self.connection, room, message, delivery);
    }

    fn presence(&self, room: RoomName) {
        if !self.shard.gateway.config.rooms.for_room(&room).presence {
            self.fail(&format!("Forbidden: presence is off for room {room}"));
            return;
        }
        let in_flight = self.connection.start_call();
        let (shard, connection) = (self.shard.clone(), self.connection.clone());
        self.shard.tasks.spawn_local(async move {
            let _in_flight = in_flight;
            let members = shard.gateway.directory.presence(&room).await;
            let body = crate::rooms::presence_json(&room, &members, true);
            let _ = connection.push(Message::text(body.to_string()), &shard.gateway.metrics);
        });
    }

    fn call_backend(&self, message: context::Received) {
        // Counted from now, not from when the task first runs, so a burst of frames
        // cannot start more calls than the limit.
        let in_flight = self.connection.start_call();
        let (shard, connection) = (self.shard.clone(), self.connection.clone());
        let call = call_message_route(shard, connection, self.route.clone(), message.incoming);
        self.shard.tasks.spawn_local(async move {
            let _in_flight = in_flight;
            call.await;
        });
    }

    fn append(&self, message: &context::Received, queue: &std::sync::Arc<str>, ack: bool) {
        let (shard, connection) = (self.shard, self.connection);
        append_to_queue(
            shard,
            connection,
            &self.route.key,
            &message.incoming,
            queue,
            ack,
        );
    }
}

/// Route keys only the gateway selects.
fn is_reserved_route(key: &str) -> bool {
    key == CONNECT_ROUTE || key == DISCONNECT_ROUTE
}

async fn call_message_route(
    shard: Rc<Shard>,
    connection: Rc<Connection>,
    route: std::sync::Arc<Route>,
    message: Incoming,
) {
    let Some(MessageParts {
        request_id,
        message_id,
        now_ms,
        body,
    }) = message_parts(&shard, &message)
    else {
        return;
    };
    let stamp = EventStamp {
        request_id: &request_id,
        now_ms,
    };
    let kind = EventKind::Message {
        route_key: &route.key,
        message_id: &message_id,
        body,
    };
    let event = event::build(api_facts(&shard.gateway), &connection.facts, stamp, kind);
    match call_backend(&shard.gateway, &shard.http, &route, event).await {
        Ok(reply) if reply.invoked() => {
            if !reply.is_success() {
                tracing::debug!(route = %route.key, status = reply.status, "backend returned a non-2xx statusCode");
            }
            if let Some(body) = reply.body.filter(|_| route.response) {
                let _ = connection.push(Message::data(body), &shard.gateway.metrics);
            }
        }
        Ok(reply) => {
            tracing::debug!(route = %route.key, status = reply.http_status, "backend answered with an HTTP error");
            send_error(&shard, &connection, "Internal server error", &request_id);
        }
        Err(error) => {
            tracing::warn!(route = %route.key, %error, "integration failed");
            send_error(&shard, &connection, "Internal server error", &request_id);
        }
    }
}

/// What a MESSAGE event carries besides the connection's facts.
struct MessageParts<'a> {
    request_id: String,
    message_id: String,
    now_ms: u64,
    body: MessageBody<'a>,
}

/// Mints the ids of the MESSAGE event for `message` (none for control frames).
fn message_parts<'a>(shard: &Shard, message: &'a Incoming) -> Option<MessageParts<'a>> {
    let body = match message {
        Incoming::Text(text) => MessageBody::Text(text),
        Incoming::Binary(bytes) => MessageBody::Binary(bytes),
        _ => return None,
    };
    let (request_id, message_id) = {
        let mut ids = shard.ids.borrow_mut();
        (ids.request_id(), ids.request_id())
    };
    Some(MessageParts {
        request_id,
        message_id,
        now_ms: clock::now_ms(),
        body,
    })
}

/// Appends the message to `queue`, stored compactly (see [`crate::stored_event`]); with
/// `ack`, the client gets `{"type": "ack", "messageId": ...}` once the entry is durable.
/// The log's writer answers appends in the order it received them, so acks keep the order
/// of the frames.
fn append_to_queue(
    shard: &Rc<Shard>,
    connection: &Rc<Connection>,
    route_key: &str,
    message: &Incoming,
    queue: &std::sync::Arc<str>,
    ack: bool,
) {
    let Some(parts) = message_parts(shard, message) else {
        return;
    };
    let entry = stored_event::encode(&StoredMessage {
        route_key,
        message_id: &parts.message_id,
        request_id: &parts.request_id,
        now_ms: parts.now_ms,
        body: parts.body,
    });
    let context = connection.queue_context(api_facts(&shard.gateway));
    let MessageParts {
        request_id,
        message_id,
        ..
    } = parts;
    let in_flight = connection.start_append(entry.len());
    let done_shard = shard.clone();
    let connection = connection.clone();
    let done_queue = queue.clone();
    let done = Box::new(move |result: Result<u64, AppendFailure>| {
        let _in_flight = in_flight;
        let shard = done_shard;
        match result {
            Ok(_offset) => {
                shard
                    .gateway
                    .metrics
                    .queue_appended
                    .with_label_values(&[&*done_queue])
                    .inc();
                if ack {
                    let frame = crate::protocol::ack(&message_id);
                    let _ = connection.push(frame, &shard.gateway.metrics);
                }
            }
            Err(AppendFailure::DiskFull) => {
                count_append_error(&shard, &done_queue, "disk_full");
                // Logged by the storage writer once per failed write, not per message.
                let reason = format!(
                    "Service unavailable: queue {done_queue} is out of disk space; the message was not stored"
                );
                send_error(&shard, &connection, &reason, &request_id);
            }
            Err(AppendFailure::Storage(error)) => {
                count_append_error(&shard, &done_queue, "io");
                tracing::error!(queue = %done_queue, %error, "queue append failed");
                send_error(&shard, &connection, "Internal server error", &request_id);
            }
        }
    });
    shard.append_to_queue(queue.clone(), context, entry, done);
}

fn count_append_error(shard: &Shard, queue: &str, kind: &str) {
    shard
        .gateway
        .metrics
        .queue_append_errors
        .with_label_values(&[queue, kind])
        .inc();
}

/// Sends the AWS-style error frame; the connection stays open.
fn send_error(shard: &Shard, connection: &Connection, message: &str, request_id: &str) {
    let frame = crate::protocol::error(message, &connection.facts.connection_id, request_id);
    let _ = connection.push(frame, &shard.gateway.metrics);
}

/// Reports a closed connection to `$disconnect` (tracked, so shutdown waits for it) and
/// forgets its record once reported. A connection closed because its node was declared
/// lost has been reported by the node that took over: it is only forgotten.
pub fn fire_disconnect(shard: &Rc<Shard>, facts: ConnectionFacts, reason: DisconnectReason) {
    let forget = |shard: &Shard, connection_id: String| {
        shard.gateway.directory.closed(&connection_id);
        shard.record(|changes| changes.remove(connection_id));
    };
    match reason {
        DisconnectReason::Moved => return forget(shard, facts.connection_id),
        // Its mirrored record is the taking-over node's to report and remove: removed from
        // here, it could vanish before that node read it.
        DisconnectReason::NodeLost => {
            return shard.record(|changes| changes.remove(facts.connection_id));
        }
        _ => {}
    }
    shard
        .gateway
        .metrics
        .disconnects
        .with_label_values(&[reason.label()])
        .inc();
    let request_id = shard.ids.borrow_mut().request_id();
    let shard_for_task = shard.clone();
    shard.tasks.spawn_local(async move {
        let shard = shard_for_task;
        let _ = report_disconnect(&shard.gateway, &shard.http, &facts, &request_id, &reason).await;
        forget(&shard, facts.connection_id);
    });
}

/// Calls the `$disconnect` route, if it has a backend, for one closed connection.
pub async fn report_disconnect(
    gateway: &Gateway,
    http: &HttpIntegration,
    facts: &ConnectionFacts,
    request_id: &str,
    reason: &DisconnectReason,
) -> Reported {
    let Some(route) = gateway.config.routes.get(DISCONNECT_ROUTE) else {
        return Reported::Done;
    };
    if !matches!(route.integration, Integration::Http(_)) {
        return Reported::Done;
    }
    let description = reason.description();
    let kind = EventKind::Disconnect {
        status_code: reason.status_code(),
        reason: &description,
    };
    let stamp = EventStamp {
        request_id,
        now_ms: clock::now_ms(),
    };
    let event = event::build(api_facts(gateway), facts, stamp, kind);
    match call_backend(gateway, http, route, event).await {
        Ok(reply) if reply.status == 429 || reply.status >= 500 => Reported::Refused,
        Ok(_) => Reported::Done,
        Err(error) => {
            tracing::warn!(connection_id = %facts.connection_id, %error, "$disconnect integration failed");
            match error {
                IntegrationError::Unreachable(_) => Reported::Refused,
                IntegrationError::Timeout(_) => Reported::Done,
            }
        }
    }
}

/// What became of a `$disconnect` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    /// Answered (or timed out: it may have been handled, so it is not sent again), or
    /// there is no backend to call.
    Done,
    /// The backend could not be reached, or said it is overloaded (429, 5xx): it did not
    /// take it.
    Refused,
}
