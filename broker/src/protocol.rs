//! Every frame the gateway itself writes to a client, as opposed to the application's
//! messages: what a client library has to understand (the resume contract's `welcome` and
//! `resumed`, a queue append's `ack`, and the error frame AWS's own gateway sends). The
//! rooms' frames (`joined`, the envelope, presence) are built beside the state they report,
//! in `rooms`. All of them are pinned in `protocol/frames.json` at the repository's root: the
//! gateway's tests check every frame it writes against that file, the SDKs' tests read it,
//! and the load generator matches acks with [`is_ack`] here.

use serde_json::json;

use crate::message::Message;
use crate::resume::{Refusal, ResumeToken};

fn text(body: &serde_json::Value) -> Message {
    Message::text(body.to_string())
}

/// `{"type":"welcome","connectionId","resumeToken"}`: the first frame of a resumable
/// connection; with `"resumed":false` and a `reason` when a resume it was opened with did not
/// happen.
pub fn welcome(connection_id: &str, token: &ResumeToken, refused: Option<Refusal>) -> Message {
    let mut body = json!({
        "type": "welcome",
        "connectionId": connection_id,
        "resumeToken": token.encode(),
    });
    if let Some(refusal) = refused {
        body["resumed"] = false.into();
        body["reason"] = refusal.as_str().into();
    }
    text(&body)
}

/// `{"type":"resumed","connectionId","replayed","resumeToken"}`: the first frame after a
/// resume; `replayed` messages follow it, and the token resumes it next time (every resume
/// brings a new one).
pub fn resumed(connection_id: &str, replayed: usize, handled: u64, token: &ResumeToken) -> Message {
    text(&json!({
        "type": "resumed",
        "connectionId": connection_id,
        "replayed": replayed,
        "handled": handled,
        "resumeToken": token.encode(),
    }))
}

/// `{"type":"ack","messageId"}`: a `queue` route with `ack = true` stored the message.
pub fn ack(message_id: &str) -> Message {
    text(&json!({"type": "ack", "messageId": message_id}))
}

/// Whether a text frame's payload is an [`ack`], told without parsing it (for lean clients
/// such as the load generator): serde_json writes the keys in sorted order.
pub fn is_ack(payload: &[u8]) -> bool {
    payload.starts_with(br#"{"messageId":""#) && payload.ends_with(br#"","type":"ack"}"#)
}

/// `{"message","connectionId","requestId"}`: a message the gateway could not route or
/// serve (AWS's error frame shape).
pub fn error(message: &str, connection_id: &str, request_id: &str) -> Message {
    text(&json!({
        "message": message,
        "connectionId": connection_id,
        "requestId": request_id,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection_id::ConnectionId;

    fn decode(message: Message) -> serde_json::Value {
        assert_eq!(message.kind, crate::message::Kind::Text);
        serde_json::from_slice(&message.payload).unwrap()
    }

    #[test]
    fn frames_say_what_the_contract_says() {
        let token = ResumeToken::mint(ConnectionId {
            node: 1,
            shard: 2,
            epoch: 3,
            sequence: 0xdead_beef,
        });
        let welcome = decode(welcome("abc", &token, None));
        assert_eq!(welcome["type"], "welcome");
        assert_eq!(welcome["connectionId"], "abc");
        assert_eq!(welcome["resumeToken"], token.encode());
        assert!(welcome.get("resumed").is_none());
        let refused = decode(super::welcome("abc", &token, Some(Refusal::Expired)));
        assert_eq!(refused["resumed"], false);
        assert_eq!(refused["reason"], "expired");
        let resumed = decode(resumed("abc", 5, 7, &token));
        assert_eq!(resumed["type"], "resumed");
        assert_eq!(resumed["replayed"], 5);
        assert_eq!(resumed["handled"], 7);
        assert_eq!(resumed["resumeToken"], token.encode());
        assert_eq!(decode(ack("m1")), json!({"type": "ack", "messageId": "m1"}));
        assert!(is_ack(&ack("m1").payload));
        assert!(!is_ack(&error("ack", "abc", "r1").payload));
        assert!(!is_ack(br#"{"messageId":"m1","type":"acked"}"#));
        assert_eq!(
            decode(error("Forbidden", "abc", "r1")),
            json!({"message": "Forbidden", "connectionId": "abc", "requestId": "r1"})
        );
    }
}
