//! The queue's stored form of a MESSAGE event (`switchboard::stored_event`): whatever bytes a
//! context and an entry hold, rebuilding the event never panics and anything it returns is
//! JSON; and an entry encoded from fuzzer-chosen parts rebuilds to exactly the event an
//! `http` integration would have been sent.
//!
//! Input: `[selector][split][bytes…]`. An even selector feeds the bytes, split in two, to
//! the rebuilder as (context, entry); an odd one makes a message from them.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use switchboard::event::{self, ApiFacts, ConnectionFacts, EventKind, EventStamp, MessageBody};
use switchboard::stored_event::{self, Rebuilder, StoredMessage};

fuzz_target!(|data: &[u8]| {
    let [selector, split, rest @ ..] = data else {
        return;
    };
    let at = usize::from(*split).min(rest.len());
    let (left, right) = rest.split_at(at);
    if selector % 2 == 0 {
        let context: Arc<[u8]> = Arc::from(left);
        if let Ok(event) = Rebuilder::default().event(Some(&context), right) {
            serde_json::from_slice::<serde_json::Value>(&event).expect("a rebuilt event is JSON");
        }
        return;
    }
    let text = String::from_utf8_lossy(left);
    let (route_key, ids) = halves(&text);
    let (message_id, request_id) = halves(ids);
    let body = match selector % 4 {
        1 => MessageBody::Binary(right),
        _ => match std::str::from_utf8(right) {
            Ok(text) => MessageBody::Text(text),
            Err(_) => MessageBody::Binary(right),
        },
    };
    let facts = ConnectionFacts {
        connection_id: "Aa3-_zQ9aa3-_zQ9aa3-_w".into(),
        connected_at_ms: 1,
        source_ip: "10.0.0.1".into(),
        user_agent: text.to_string(),
        domain_name: "example.com".into(),
        authorizer: None,
    };
    let api = ApiFacts {
        stage: "dev",
        api_id: "switchboard",
    };
    // Route keys and ids longer than an entry keeps are cut when stored: compare only
    // what a gateway can produce (configured route keys, 22-character ids).
    if route_key.len() >= 0x7fff || message_id.len() >= 0x7fff || request_id.len() >= 0x7fff {
        return;
    }
    let message = StoredMessage {
        route_key,
        message_id,
        request_id,
        now_ms: 42,
        body,
    };
    let expected = event::build(
        api,
        &facts,
        EventStamp {
            request_id,
            now_ms: 42,
        },
        EventKind::Message {
            route_key,
            message_id,
            body,
        },
    );
    let context = stored_event::context(api, &facts);
    let rebuilt = Rebuilder::default()
        .event(Some(&context), &stored_event::encode(&message))
        .expect("an encoded entry rebuilds");
    assert_eq!(rebuilt, expected);
});

/// `text` cut near its middle, on a character boundary.
fn halves(text: &str) -> (&str, &str) {
    let middle = (0..=text.len() / 2)
        .rev()
        .find(|at| text.is_char_boundary(*at))
        .unwrap_or(0);
    text.split_at(middle)
}
