//! The wire contract with client libraries: every frame the gateway itself writes, caught
//! from a real gateway in one scripted session, fits exactly one frame of
//! `protocol/frames.json`, and every frame there is one the gateway really sends. The SDKs'
//! tests read the same file, so neither side can drift from it unnoticed.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::support::*;

const SCHEMA: &str = include_str!("../../../protocol/frames.json");

/// The schema's frames: name → fields.
fn frames() -> Map<String, Value> {
    let schema: Value = serde_json::from_str(SCHEMA).expect("protocol/frames.json is JSON");
    schema["frames"].as_object().unwrap().clone()
}

fn fields(frame: &Value) -> &Map<String, Value> {
    frame["fields"].as_object().unwrap()
}

/// Whether `value` is an object with exactly the fields `spec` lists, each of its type.
fn fits(spec: &Map<String, Value>, value: &Value) -> bool {
    let Some(object) = value.as_object() else {
        return false;
    };
    let listed = spec.iter().all(|(name, field)| {
        let key = name.trim_end_matches('?');
        match object.get(key) {
            Some(value) => type_fits(field, value),
            None => name.ends_with('?'),
        }
    });
    let known = object
        .keys()
        .all(|key| spec.contains_key(key) || spec.contains_key(&format!("{key}?")));
    listed && known
}

fn type_fits(field: &Value, value: &Value) -> bool {
    match field {
        Value::String(types) => types.split('|').any(|kind| match kind {
            "string" => value.is_string(),
            "integer" => value.is_u64() || value.is_i64(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            "array" => value.is_array(),
            "object" => value.is_object(),
            "any" => true,
            other => panic!("protocol/frames.json: unknown type {other}"),
        }),
        Value::Array(choices) => match choices.as_slice() {
            [Value::Object(items)] => value
                .as_array()
                .is_some_and(|values| values.iter().all(|item| fits(items, item))),
            strings => strings.contains(value),
        },
        other => panic!("protocol/frames.json: a field's type is a string or a list: {other}"),
    }
}

/// The names of the schema's frames that `value` fits.
fn matching(frames: &Map<String, Value>, value: &Value) -> Vec<String> {
    frames
        .iter()
        .filter(|(_, frame)| fits(fields(frame), value))
        .map(|(name, _)| name.clone())
        .collect()
}

#[test]
fn each_example_in_the_schema_fits_its_own_frame_and_no_other() {
    let frames = frames();
    for (name, frame) in &frames {
        let examples = frame["examples"].as_array().unwrap();
        assert!(!examples.is_empty(), "{name} has an example");
        for example in examples {
            assert_eq!(matching(&frames, example), vec![name.clone()], "{example}");
        }
    }
    // The checker itself: a missing field, an unknown one, a wrong type, a wrong value.
    let ack = fields(&frames["ack"]);
    assert!(!fits(ack, &json!({"type": "ack"})));
    assert!(!fits(
        ack,
        &json!({"type": "ack", "messageId": "m", "extra": 1})
    ));
    assert!(!fits(ack, &json!({"type": "ack", "messageId": 7})));
    assert!(!fits(ack, &json!({"type": "acked", "messageId": "m"})));
}

/// One client's socket, with every gateway frame it reads checked against the schema.
struct Reader<'a> {
    ws: Ws,
    frames: &'a Map<String, Value>,
    seen: &'a mut BTreeSet<String>,
}

impl Reader<'_> {
    /// Reads until a frame that fits `name` (each frame on the way must fit one frame too).
    async fn expect(&mut self, name: &str) -> Value {
        loop {
            let frame = next_json(&mut self.ws).await;
            let names = matching(self.frames, &frame);
            assert_eq!(names.len(), 1, "fits exactly one schema frame: {frame}");
            self.seen.insert(names[0].clone());
            if names[0] == name {
                return frame;
            }
        }
    }

    async fn send(&mut self, frame: Value) {
        send_text(&mut self.ws, &frame.to_string()).await;
    }
}

const CONFIG: &str = r#"
[api]
resume = true
[rooms]
history_size = 10
envelope = true
presence_events = true
[routes.join]
integration = { type = "room_join", room = "$request.body.room", history = "$request.body.history" }
[routes.leave]
integration = { type = "room_leave", room = "$request.body.room" }
[routes.presence]
integration = { type = "room_presence", room = "$request.body.room" }
[routes.enqueue]
integration = { type = "queue", queue = "frames", ack = true }
"#;

#[tokio::test]
async fn every_frame_the_gateway_writes_is_in_the_schema_and_every_schema_frame_is_written() {
    let frames = frames();
    let mut seen = BTreeSet::new();
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config_with(&backend, CONFIG)).await;
    let rooms = gateway.api_url("/@rooms/lobby");
    post_body(rooms.clone(), r#"{"text":"before"}"#).await;

    let (ws, _) = tokio_tungstenite::connect_async(gateway.ws_url())
        .await
        .unwrap();
    let mut alice = Reader {
        ws,
        frames: &frames,
        seen: &mut seen,
    };
    alice.expect("welcome").await;
    alice
        .send(json!({"action": "join", "room": "lobby", "history": 5}))
        .await;
    alice.expect("joined").await;
    alice.expect("message").await;
    // JSON, text and binary publishes: the envelope's three shapes.
    post_body(rooms.clone(), "plain").await;
    post_body(rooms.clone(), vec![0u8, 1, 2]).await;
    for _ in 0..2 {
        alice.expect("message").await;
    }
    alice
        .send(json!({"action": "presence", "room": "lobby"}))
        .await;
    alice.expect("presence_list").await;
    alice.send(json!({"action": "enqueue", "n": 1})).await;
    alice.expect("ack").await;
    alice.send(json!({"action": "no-such-route"})).await;
    alice.expect("error").await;

    // Another member comes and goes: presence events.
    let (mut bob, _, _) = open_resumable(&gateway.ws_url()).await;
    send_text(&mut bob, r#"{"action":"join","room":"lobby"}"#).await;
    alice.expect("presence").await;
    send_text(&mut bob, r#"{"action":"leave","room":"lobby"}"#).await;
    alice.expect("presence").await;
    // A crowd at once: the summary.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut crowd = Vec::new();
    for _ in 0..40 {
        crowd.push(open_resumable(&gateway.ws_url()).await.0);
    }
    for ws in &mut crowd {
        send_text(ws, r#"{"action":"join","room":"lobby"}"#).await;
    }
    alice.expect("presence_many").await;

    // A resume, and a resume refused.
    let (_, _, token) = open_resumable(&gateway.ws_url()).await;
    gateway.wait_for_parked(1.0).await;
    let url = format!("{}?resume={token}&received=0", gateway.ws_url());
    let (ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let mut resumed = Reader {
        ws,
        frames: &frames,
        seen: alice.seen,
    };
    resumed.expect("resumed").await;
    let url = format!("{}?resume=AAAA&received=0", gateway.ws_url());
    let (ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let mut refused = Reader {
        ws,
        frames: &frames,
        seen: resumed.seen,
    };
    let welcome = refused.expect("welcome").await;
    assert_eq!(
        (&welcome["resumed"], &welcome["reason"]),
        (&json!(false), &json!("unknown"))
    );

    let all: BTreeSet<String> = frames.keys().cloned().collect();
    assert_eq!(seen, all, "the gateway wrote every frame the schema has");
    gateway.stop().await;
}
