//! The form a queued MESSAGE event takes on disk, and the event rebuilt from it.
//!
//! Most of an event repeats for every message of a connection: its id, address, user
//! agent, host, authorizer context, the stage. Those facts are the entry's *context*, which
//! the queue log stores once per segment file however many entries refer to it; each entry
//! keeps only what differs:
//!
//! ```text
//! [format: 1][flags: bit 0 binary body][request time, epoch ms: u64 LE]
//! [route key][message id][request id][body: the rest]
//! ```
//!
//! where each of the three strings is a u16 LE length and its bytes; the top bit of the
//! length marks one of our ids stored as its 16 raw bytes instead of 22 base64 characters.
//! A 200-byte frame costs about 280 bytes on disk this way, against ~750 for the event JSON.
//! On read the event is rebuilt with [`event::build`], the same code that serializes it for
//! an `http` integration, so a backend cannot tell a queued event from a called one.
//! Entries stored as event JSON (before this form existed) have no context and are
//! served as they are.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::event::{self, ApiFacts, ConnectionFacts, EventKind, EventStamp, MessageBody};

/// The first byte of an entry in this form.
const FORMAT: u8 = 1;
/// Flag: the body is binary (base64 in the event).
const BINARY: u8 = 1;
/// Length flag: the string is an id kept as its raw bytes.
const RAW_ID: u16 = 1 << 15;
/// Bytes in one of our ids (a connection or request id) before base64.
const ID_BYTES: usize = 16;

/// Why a stored entry could not be turned back into its event.
#[derive(Debug, thiserror::Error)]
pub enum StoredEventError {
    #[error("unknown stored event format {0}")]
    Format(u8),
    #[error("stored event cut short")]
    Truncated,
    #[error("stored event has invalid UTF-8 in {0}")]
    Utf8(&'static str),
    #[error("stored connection facts do not decode: {0}")]
    Facts(#[from] serde_json::Error),
}

/// The context of a connection's entries: the facts its events repeat.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredFacts<'a> {
    #[serde(borrow)]
    stage: Cow<'a, str>,
    #[serde(borrow)]
    api_id: Cow<'a, str>,
    #[serde(borrow)]
    connection_id: Cow<'a, str>,
    connected_at: u64,
    #[serde(borrow)]
    source_ip: Cow<'a, str>,
    #[serde(borrow)]
    user_agent: Cow<'a, str>,
    #[serde(borrow)]
    domain_name: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authorizer: Option<Box<serde_json::value::RawValue>>,
}

/// The context for entries appended by the connection described by `facts`.
pub fn context(api: ApiFacts<'_>, facts: &ConnectionFacts) -> Arc<[u8]> {
    let stored = StoredFacts {
        stage: api.stage.into(),
        api_id: api.api_id.into(),
        connection_id: facts.connection_id.as_str().into(),
        connected_at: facts.connected_at_ms,
        source_ip: facts.source_ip.as_str().into(),
        user_agent: facts.user_agent.as_str().into(),
        domain_name: facts.domain_name.as_str().into(),
        authorizer: facts.authorizer.as_deref().map(|raw| raw.to_owned()),
    };
    serde_json::to_vec(&stored).unwrap_or_default().into()
}

/// What an entry keeps of a MESSAGE event.
#[derive(Debug, Clone, Copy)]
pub struct StoredMessage<'a> {
    pub route_key: &'a str,
    pub message_id: &'a str,
    pub request_id: &'a str,
    pub now_ms: u64,
    pub body: MessageBody<'a>,
}

/// The entry for `message`.
pub fn encode(message: &StoredMessage<'_>) -> Vec<u8> {
    let (flags, body) = match message.body {
        MessageBody::Text(text) => (0, text.as_bytes()),
        MessageBody::Binary(bytes) => (BINARY, bytes),
    };
    let mut out = Vec::with_capacity(64 + body.len());
    out.extend_from_slice(&[FORMAT, flags]);
    out.extend_from_slice(&message.now_ms.to_le_bytes());
    put_string(&mut out, message.route_key);
    put_string(&mut out, message.message_id);
    put_string(&mut out, message.request_id);
    out.extend_from_slice(body);
    out
}

fn put_string(out: &mut Vec<u8>, text: &str) {
    let mut raw = [0u8; ID_BYTES];
    let is_id = URL_SAFE_NO_PAD.decode_slice(text, &mut raw) == Ok(ID_BYTES)
        && URL_SAFE_NO_PAD.encode(raw) == text;
    let (len, bytes) = if is_id {
        (RAW_ID | ID_BYTES as u16, &raw[..])
    } else {
        // Route keys and ids are far below 32 KiB; cut rather than corrupt the entry.
        let len = text.len().min(usize::from(RAW_ID - 1));
        (len as u16, &text.as_bytes()[..len])
    };
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Reads entries back, decoding each context once however many entries share it.
#[derive(Default)]
pub struct Rebuilder {
    /// Decoded contexts by the address of their bytes (the log hands one allocation to
    /// every entry of a read that shares it).
    known: HashMap<usize, KnownContext>,
}

/// A decoded context, holding on to its bytes so their address stays its own.
struct KnownContext {
    _bytes: Arc<[u8]>,
    facts: ConnectionFacts,
    stage: String,
    api_id: String,
}

impl Rebuilder {
    /// The event JSON of a stored entry.
    pub fn event(
        &mut self,
        context: Option<&Arc<[u8]>>,
        payload: &[u8],
    ) -> Result<Vec<u8>, StoredEventError> {
        let Some(context) = context else {
            // Stored as the event itself.
            return Ok(payload.to_vec());
        };
        let known = match self.known.entry(context.as_ptr() as usize) {
            std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(decode_context(context)?)
            }
        };
        let api = ApiFacts {
            stage: &known.stage,
            api_id: &known.api_id,
        };
        rebuild(api, &known.facts, payload)
    }
}

/// The connection facts (and stage and API id) a context holds.
pub fn decode_facts(context: &[u8]) -> Result<ConnectionFacts, StoredEventError> {
    let stored: StoredFacts<'_> = serde_json::from_slice(context)?;
    Ok(facts_of(stored))
}

fn facts_of(stored: StoredFacts<'_>) -> ConnectionFacts {
    ConnectionFacts {
        connection_id: stored.connection_id.into_owned(),
        connected_at_ms: stored.connected_at,
        source_ip: stored.source_ip.into_owned(),
        user_agent: stored.user_agent.into_owned(),
        domain_name: stored.domain_name.into_owned(),
        authorizer: stored.authorizer.map(Arc::from),
    }
}

fn decode_context(context: &Arc<[u8]>) -> Result<KnownContext, StoredEventError> {
    let stored: StoredFacts<'_> = serde_json::from_slice(context)?;
    Ok(KnownContext {
        _bytes: context.clone(),
        stage: stored.stage.to_string(),
        api_id: stored.api_id.to_string(),
        facts: facts_of(stored),
    })
}

fn rebuild(
    api: ApiFacts<'_>,
    facts: &ConnectionFacts,
    payload: &[u8],
) -> Result<Vec<u8>, StoredEventError> {
    let mut reader = Reader(payload);
    let [format, flags] = reader.take::<2>()?;
    if format != FORMAT {
        return Err(StoredEventError::Format(format));
    }
    let now_ms = u64::from_le_bytes(reader.take::<8>()?);
    let route_key = reader.string("the route key")?;
    let message_id = reader.string("the message id")?;
    let request_id = reader.string("the request id")?;
    let body = match flags & BINARY {
        0 => MessageBody::Text(
            std::str::from_utf8(reader.0).map_err(|_| StoredEventError::Utf8("the body"))?,
        ),
        _ => MessageBody::Binary(reader.0),
    };
    let stamp = EventStamp {
        request_id: &request_id,
        now_ms,
    };
    let kind = EventKind::Message {
        route_key: &route_key,
        message_id: &message_id,
        body,
    };
    Ok(event::build(api, facts, stamp, kind))
}

/// The unread rest of an entry.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], StoredEventError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(StoredEventError::Truncated)?;
        self.0 = rest;
        Ok(*head)
    }

    fn bytes(&mut self, len: usize) -> Result<&'a [u8], StoredEventError> {
        let (head, rest) = self
            .0
            .split_at_checked(len)
            .ok_or(StoredEventError::Truncated)?;
        self.0 = rest;
        Ok(head)
    }

    fn string(&mut self, what: &'static str) -> Result<String, StoredEventError> {
        let len = u16::from_le_bytes(self.take::<2>()?);
        let bytes = self.bytes(usize::from(len & !RAW_ID))?;
        if len & RAW_ID != 0 {
            return Ok(URL_SAFE_NO_PAD.encode(bytes));
        }
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| StoredEventError::Utf8(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(authorizer: Option<&str>) -> ConnectionFacts {
        ConnectionFacts {
            connection_id: "Aa3-_zQ9aa3-_zQ9aa3-_w".into(),
            connected_at_ms: 1_764_000_000_000,
            source_ip: "10.0.0.7".into(),
            user_agent: "Mozilla/5.0 \"quoted\" ü".into(),
            domain_name: "chat.example.com".into(),
            authorizer: authorizer.map(|raw| {
                Arc::from(serde_json::value::RawValue::from_string(raw.into()).unwrap())
            }),
        }
    }

    const API: ApiFacts<'static> = ApiFacts {
        stage: "prod",
        api_id: "sb1",
    };

    fn round_trip(facts: &ConnectionFacts, message: StoredMessage<'_>) {
        let expected = event::build(
            API,
            facts,
            EventStamp {
                request_id: message.request_id,
                now_ms: message.now_ms,
            },
            EventKind::Message {
                route_key: message.route_key,
                message_id: message.message_id,
                body: message.body,
            },
        );
        let context = context(API, facts);
        let stored = encode(&message);
        let rebuilt = Rebuilder::default().event(Some(&context), &stored).unwrap();
        assert_eq!(
            String::from_utf8(rebuilt).unwrap(),
            String::from_utf8(expected).unwrap()
        );
    }

    #[test]
    fn the_rebuilt_event_is_byte_for_byte_the_one_a_backend_is_called_with() {
        let message = StoredMessage {
            route_key: "enqueue",
            message_id: "Bb3-_zQ9aa3-_zQ9aa3-_w",
            request_id: "Cc3-_zQ9aa3-_zQ9aa3-_w",
            now_ms: 1_764_053_068_123,
            body: MessageBody::Text(r#"{"action":"enqueue","data":"héllo \"x\""}"#),
        };
        round_trip(&facts(None), message);
        round_trip(&facts(Some(r#"{"user":"ann","roles":["a","b"]}"#)), message);
        let binary = StoredMessage {
            body: MessageBody::Binary(&[0, 159, 146, 150, 255]),
            route_key: "$default",
            message_id: "not one of our ids",
            ..message
        };
        round_trip(&facts(None), binary);
    }

    #[test]
    fn an_entry_keeps_only_what_differs_between_messages() {
        let body = "x".repeat(200);
        let stored = encode(&StoredMessage {
            route_key: "enqueue",
            message_id: "Bb3-_zQ9aa3-_zQ9aa3-_w",
            request_id: "Cc3-_zQ9aa3-_zQ9aa3-_w",
            now_ms: 1,
            body: MessageBody::Text(&body),
        });
        // format, flags, time, three lengths, the route key, two raw ids, the body.
        assert_eq!(stored.len(), 2 + 8 + 6 + 7 + 2 * ID_BYTES + 200);
    }

    #[test]
    fn entries_stored_as_event_json_are_served_as_they_are() {
        let json = br#"{"requestContext":{}}"#;
        assert_eq!(Rebuilder::default().event(None, json).unwrap(), json);
    }

    #[test]
    fn damaged_entries_are_errors_not_panics() {
        let context = context(API, &facts(None));
        let stored = encode(&StoredMessage {
            route_key: "r",
            message_id: "m",
            request_id: "q",
            now_ms: 1,
            body: MessageBody::Text("hi"),
        });
        let mut rebuilder = Rebuilder::default();
        for cut in 0..stored.len() - 2 {
            assert!(
                rebuilder.event(Some(&context), &stored[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut wrong_format = stored.clone();
        wrong_format[0] = 9;
        assert!(matches!(
            rebuilder.event(Some(&context), &wrong_format),
            Err(StoredEventError::Format(9))
        ));
        let garbage: Arc<[u8]> = Arc::from(&b"not json"[..]);
        assert!(rebuilder.event(Some(&garbage), &stored).is_err());
    }
}
