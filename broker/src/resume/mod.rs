//! Resume: a client whose connection drops comes back within `api.resume_window_secs`
//! with the same connectionId, its rooms, and every message it had not received, in order,
//! once. The contract a client sees (README "Resume"):
//!
//! 1. The first frame of a resumable connection is
//!    `{"type":"welcome","connectionId":…,"resumeToken":…}`. The client counts the data
//!    messages it receives after it.
//! 2. To come back it opens the stage URL with `?resume=TOKEN&received=N`. Within the
//!    window, with everything after message N still held, the first frame is
//!    `{"type":"resumed","connectionId":<the same>,"replayed":K}`, then those K messages,
//!    then live traffic; the count goes on from N.
//! 3. Otherwise it gets a new connection whose welcome adds `"resumed":false` and why:
//!    `expired`, `unknown` or `overflow`.
//!
//! This module holds the contract's pieces (the token, the request; the frames are
//! [`crate::protocol`]'s); the connection keeps its resend buffer in [`crate::outbound`],
//! the session parks and resumes it, and the shard keeps parked connections findable.

pub mod attach;
pub mod config;
pub mod handoff;
pub mod moved;
pub mod moving;
pub mod route;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::connection_id::ConnectionId;

/// Bytes of the random part of a token.
const SECRET_BYTES: usize = 16;

/// What a token proves: possession of the connection's secret.
pub type Secret = [u8; SECRET_BYTES];

/// A secret's SHA-256: what nodes tell each other instead of the secret, so a token cannot
/// be read off cluster traffic (a client must present the secret itself).
pub type SecretHash = [u8; 32];

/// The hash of `secret` that nodes exchange.
pub fn hash_secret(secret: &Secret) -> SecretHash {
    sha256(&[secret])
}

/// What a node asking for a connection sends as proof that its client holds a token of
/// it: bound to the id the connection will have there, so a copy of it moves the
/// connection nowhere else.
pub fn move_proof(hash: &SecretHash, alias: &str) -> SecretHash {
    sha256(&[b"switchboard-move\0", hash, alias.as_bytes()])
}

/// Compares two hashes in constant time.
pub fn same_hash(a: &SecretHash, b: &SecretHash) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

fn sha256(parts: &[&[u8]]) -> SecretHash {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        context.update(part);
    }
    let mut hash = SecretHash::default();
    hash.copy_from_slice(context.finish().as_ref());
    hash
}

/// A resume token: the connection it names and a secret only its client was given.
/// Encoded as 43 URL-safe characters; the secret cannot be derived from the connectionId.
#[derive(Clone, PartialEq, Eq)]
pub struct ResumeToken {
    pub id: ConnectionId,
    pub secret: Secret,
}

impl std::fmt::Debug for ResumeToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never log the secret.
        f.debug_struct("ResumeToken").field("id", &self.id).finish()
    }
}

impl ResumeToken {
    /// A fresh token for connection `id`, its secret from the operating system's CSPRNG.
    pub fn mint(id: ConnectionId) -> Self {
        use ring::rand::SecureRandom;
        let mut secret = [0; SECRET_BYTES];
        if ring::rand::SystemRandom::new().fill(&mut secret).is_err() {
            // The OS random source failing is not survivable for anything using TLS either.
            panic!("the operating system's random number generator failed");
        }
        Self { id, secret }
    }

    pub fn encode(&self) -> String {
        let mut bytes = [0; 32];
        bytes[..16].copy_from_slice(&self.id.to_bytes());
        bytes[16..].copy_from_slice(&self.secret);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// `None` for anything that is not a token's shape.
    pub fn parse(text: &str) -> Option<Self> {
        let mut bytes = [0; 32];
        if URL_SAFE_NO_PAD.decode_slice(text, &mut bytes).ok()? != bytes.len() {
            return None;
        }
        let id = ConnectionId::from_bytes(bytes[..16].try_into().ok()?);
        let secret = bytes[16..].try_into().ok()?;
        Some(Self { id, secret })
    }

    /// Whether this token's secret is the one `hash` was made from, in constant time.
    pub fn matches(&self, hash: &SecretHash) -> bool {
        same_hash(&hash_secret(&self.secret), hash)
    }
}

/// Why a resume did not happen (the welcome frame's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The window passed (or the connection ended) before the client came back.
    Expired,
    /// No such resumable connection: a forged or garbled token, another node's, or a
    /// count the gateway never sent.
    Unknown,
    /// More was missed than the gateway could hold.
    Overflow,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Unknown => "unknown",
            Self::Overflow => "overflow",
        }
    }
}

impl From<crate::outbound::RewindError> for Refusal {
    /// A count the gateway never sent is unknown; one past what it still holds, overflow.
    fn from(error: crate::outbound::RewindError) -> Self {
        match error {
            crate::outbound::RewindError::NeverSent => Self::Unknown,
            crate::outbound::RewindError::NotKept => Self::Overflow,
        }
    }
}

/// What a client asked for with `?resume=TOKEN&received=N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeRequest {
    /// A token and a count, both well-formed.
    Resume { token: ResumeToken, received: u64 },
    /// Asked to resume with something malformed: answered as `unknown`.
    Malformed,
}

/// The header that carries a resume token outside the URL (clients that can set headers:
/// URLs end up in proxies' access logs), with [`RECEIVED_HEADER`].
pub const TOKEN_HEADER: &str = "x-switchboard-resume";
/// The count that goes with [`TOKEN_HEADER`].
pub const RECEIVED_HEADER: &str = "x-switchboard-received";

impl ResumeRequest {
    /// Reads the headers ([`TOKEN_HEADER`], [`RECEIVED_HEADER`]) or else the query string
    /// (`resume`, `received`); `None` if the client did not ask to resume. A request that
    /// names a token or a count twice is malformed.
    pub fn from_request(request: &crate::event::HandshakeRequest) -> Option<Self> {
        let header = |name: &str| {
            let mut values = request
                .headers
                .iter()
                .filter(|(key, _)| key.eq_ignore_ascii_case(name));
            let first = values.next().map(|(_, value)| value.as_str());
            if values.next().is_some() {
                Some(None)
            } else {
                first.map(Some)
            }
        };
        let query = |name: &str| {
            let mut values = request.query.iter().filter(|(key, _)| key == name);
            let first = values.next().map(|(_, value)| value.as_str());
            if values.next().is_some() {
                Some(None)
            } else {
                first.map(Some)
            }
        };
        let (token, received) = match header(TOKEN_HEADER) {
            Some(token) => (token, header(RECEIVED_HEADER).flatten()),
            None => (query("resume")?, query("received").flatten()),
        };
        let parsed = token
            .and_then(ResumeToken::parse)
            .zip(received.and_then(|n| n.parse::<u64>().ok()));
        Some(match parsed {
            Some((token, received)) => Self::Resume { token, received },
            None => Self::Malformed,
        })
    }
}

/// The token is a secret: backends see that a client resumed, not its token (neither in
/// the query nor in the headers).
pub fn forget_token(request: &mut crate::event::HandshakeRequest) {
    request.query.retain(|(name, _)| name != "resume");
    request
        .headers
        .retain(|(name, _)| !name.eq_ignore_ascii_case(TOKEN_HEADER));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> ConnectionId {
        ConnectionId {
            node: 1,
            shard: 2,
            epoch: 3,
            sequence: 0xdead_beef,
        }
    }

    fn pairs(query: &[(&str, &str)]) -> Vec<(String, String)> {
        query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn tokens_round_trip_and_only_their_secret_proves_them() {
        let token = ResumeToken::mint(id());
        let text = token.encode();
        assert_eq!(text.len(), 43);
        let parsed = ResumeToken::parse(&text).unwrap();
        assert_eq!(parsed, token);
        assert!(parsed.matches(&hash_secret(&token.secret)));
        let other = ResumeToken::mint(id());
        assert_ne!(other.secret, token.secret, "secrets are random");
        assert!(!parsed.matches(&hash_secret(&other.secret)));
        assert!(!format!("{token:?}").contains(&text[22..]), "never logged");
    }

    fn from_query(query: &[(String, String)]) -> Option<ResumeRequest> {
        ResumeRequest::from_request(&crate::event::HandshakeRequest {
            query: query.to_vec(),
            ..Default::default()
        })
    }

    #[test]
    fn resume_requests_parse_and_anything_malformed_is_unknown() {
        assert_eq!(from_query(&pairs(&[("room", "a")])), None);
        let token = ResumeToken::mint(id());
        let text = token.encode();
        assert_eq!(
            from_query(&pairs(&[("resume", &text), ("received", "7")])),
            Some(ResumeRequest::Resume {
                token: token.clone(),
                received: 7
            })
        );
        let in_headers = crate::event::HandshakeRequest {
            headers: pairs(&[
                ("X-Switchboard-Resume", &text),
                ("X-Switchboard-Received", "7"),
            ]),
            ..Default::default()
        };
        assert_eq!(
            ResumeRequest::from_request(&in_headers),
            Some(ResumeRequest::Resume {
                token: token.clone(),
                received: 7
            })
        );
        let mut forgotten = in_headers.clone();
        forget_token(&mut forgotten);
        assert_eq!(forgotten.headers, pairs(&[("X-Switchboard-Received", "7")]));
        for bad in [
            vec![("resume", text.as_str())],
            vec![("resume", text.as_str()), ("received", "-1")],
            vec![("resume", "short"), ("received", "1")],
            vec![("resume", &text[1..]), ("received", "1")],
            vec![("resume", &text), ("received", "1"), ("received", "2")],
            vec![("resume", &text), ("resume", &text), ("received", "1")],
        ] {
            assert_eq!(
                from_query(&pairs(&bad)),
                Some(ResumeRequest::Malformed),
                "{bad:?}"
            );
        }
    }
}
