//! connectionIds and request ids.
//!
//! A connectionId is opaque to users (22 URL-safe characters) but encodes the node, the
//! shard that owns the connection, the node's epoch (bumped at every start, so ids never
//! repeat across restarts) and a 64-bit key the shard files the connection under. On one
//! node a push therefore reaches its connection with no lookup table: decode, send to the
//! shard, done. In cluster mode a connection whose client resumed on another node lives on
//! under that node's id: the [`crate::directory`] consults the moved-to map first.
//!
//! The key is the shard's counter passed through a keyed permutation (a Feistel network
//! over SipHash with a key drawn at start), so ids do not betray their neighbours:
//! applications that let clients address each other by connectionId rely on that, as
//! they do on AWS. A permutation never repeats, so keys stay unique without a check.
//! Request ids live in their own space: the shard field carries [`REQUEST_ID_MARK`], which
//! no shard number has, and their key comes from a permutation with another key.

use std::fmt;
use std::str::FromStr;

use std::hash::{BuildHasher, Hasher};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

const ID_BYTES: usize = 16;
/// Set in a request id's shard field; shard numbers stay below it (at most 1024 shards).
pub const REQUEST_ID_MARK: u16 = 0x8000;
/// Feistel rounds: four make a keyed permutation indistinguishable from a random one.
const FEISTEL_ROUNDS: u32 = 4;

/// Identifies one connection for its whole life and beyond.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId {
    pub node: u16,
    pub shard: u16,
    pub epoch: u32,
    /// The shard's key for the connection: its sequence number, permuted (unguessable).
    pub sequence: u64,
}

impl ConnectionId {
    /// The 16 bytes the text form encodes.
    pub fn to_bytes(self) -> [u8; ID_BYTES] {
        let mut bytes = [0; ID_BYTES];
        bytes[0..2].copy_from_slice(&self.node.to_be_bytes());
        bytes[2..4].copy_from_slice(&self.shard.to_be_bytes());
        bytes[4..8].copy_from_slice(&self.epoch.to_be_bytes());
        bytes[8..16].copy_from_slice(&self.sequence.to_be_bytes());
        bytes
    }

    pub fn from_bytes(bytes: [u8; ID_BYTES]) -> Self {
        let [n0, n1, s0, s1, e0, e1, e2, e3, rest @ ..] = bytes;
        Self {
            node: u16::from_be_bytes([n0, n1]),
            shard: u16::from_be_bytes([s0, s1]),
            epoch: u32::from_be_bytes([e0, e1, e2, e3]),
            sequence: u64::from_be_bytes(rest),
        }
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 24];
        let len = URL_SAFE_NO_PAD
            .encode_slice(self.to_bytes(), &mut buf)
            .map_err(|_| fmt::Error)?;
        f.write_str(std::str::from_utf8(&buf[..len]).map_err(|_| fmt::Error)?)
    }
}

/// The text is not a connectionId this gateway could have issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid connectionId")]
pub struct InvalidConnectionId;

impl FromStr for ConnectionId {
    type Err = InvalidConnectionId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; ID_BYTES];
        let decoded = URL_SAFE_NO_PAD
            .decode_slice(text.trim_end_matches('='), &mut bytes)
            .map_err(|_| InvalidConnectionId)?;
        if decoded != ID_BYTES {
            return Err(InvalidConnectionId);
        }
        Ok(Self::from_bytes(bytes))
    }
}

/// A keyed permutation of `u64`: a balanced Feistel network whose round function is
/// SipHash keyed at random (std's `RandomState`, seeded from the OS per process).
#[derive(Debug, Clone)]
pub struct Scrambler {
    key: std::collections::hash_map::RandomState,
}

impl Scrambler {
    /// A permutation with a fresh random key.
    pub fn random() -> Self {
        Self {
            key: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Maps `value` to its image; distinct inputs give distinct outputs.
    pub fn permute(&self, value: u64) -> u64 {
        let (mut left, mut right) = ((value >> 32) as u32, value as u32);
        for round in 0..FEISTEL_ROUNDS {
            let mut hasher = self.key.build_hasher();
            hasher.write_u32(round);
            hasher.write_u32(right);
            (left, right) = (right, left ^ hasher.finish() as u32);
        }
        (u64::from(left) << 32) | u64::from(right)
    }
}

/// Mints connectionIds and request ids for one shard. Not shared: each shard owns one.
#[derive(Debug)]
pub struct IdMinter {
    node: u16,
    shard: u16,
    epoch: u32,
    next_connection: u64,
    next_request: u64,
    connections: Scrambler,
    requests: Scrambler,
}

impl IdMinter {
    pub fn new(node: u16, shard: u16, epoch: u32) -> Self {
        Self {
            node,
            shard,
            epoch,
            next_connection: 1,
            next_request: 1,
            connections: Scrambler::random(),
            requests: Scrambler::random(),
        }
    }

    pub fn connection_id(&mut self) -> ConnectionId {
        let sequence = self.connections.permute(self.next_connection);
        self.next_connection += 1;
        ConnectionId {
            node: self.node,
            shard: self.shard,
            epoch: self.epoch,
            sequence,
        }
    }

    /// A unique id in the style of AWS's `requestId` / `messageId` (22 URL-safe chars).
    /// Never equal to a connectionId: its shard field carries [`REQUEST_ID_MARK`].
    pub fn request_id(&mut self) -> String {
        let sequence = self.requests.permute(self.next_request);
        self.next_request += 1;
        let id = ConnectionId {
            node: self.node,
            shard: self.shard | REQUEST_ID_MARK,
            epoch: self.epoch,
            sequence,
        };
        URL_SAFE_NO_PAD.encode(id.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn minted_ids_are_distinct_and_url_safe() {
        let mut minter = IdMinter::new(1, 2, 3);
        let a = minter.connection_id().to_string();
        let b = minter.connection_id().to_string();
        assert_ne!(a, b);
        assert_eq!(a.len(), 22);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }

    #[test]
    fn epochs_separate_restarts() {
        let before = IdMinter::new(0, 0, 1).connection_id();
        let after = IdMinter::new(0, 0, 2).connection_id();
        assert_ne!(before.to_string(), after.to_string());
    }

    #[test]
    fn garbage_is_rejected() {
        for text in [
            "",
            "abc",
            "!!!!!!!!!!!!!!!!!!!!!!",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(
                text.parse::<ConnectionId>(),
                Err(InvalidConnectionId),
                "{text}"
            );
        }
    }

    #[test]
    fn request_ids_are_distinct() {
        let mut minter = IdMinter::new(0, 1, 7);
        assert_ne!(minter.request_id(), minter.request_id());
        // Shards and nodes past 255 must not alias lower ones.
        assert_ne!(
            IdMinter::new(0, 0, 7).request_id(),
            IdMinter::new(0, 256, 7).request_id()
        );
        assert_ne!(
            IdMinter::new(1, 0, 7).request_id(),
            IdMinter::new(257, 0, 7).request_id()
        );
    }

    #[test]
    fn consecutive_ids_look_unrelated() {
        let mut minter = IdMinter::new(0, 0, 1);
        let first = minter.connection_id();
        let second = minter.connection_id();
        // The shard-local keys share no structure: about half their bits differ.
        let differing = (first.sequence ^ second.sequence).count_ones();
        assert!((12..=52).contains(&differing), "{differing} bits differ");
        assert_ne!(first.to_string(), "AAAAAAAAAAEAAAAAAAAAAQ");
    }

    #[test]
    fn request_ids_never_parse_as_a_shard() {
        let mut minter = IdMinter::new(0, 3, 7);
        let id: ConnectionId = minter.request_id().parse().unwrap();
        assert_eq!(id.shard, 3 | REQUEST_ID_MARK);
    }

    proptest! {
        #[test]
        fn permutation_is_injective(a: u64, b: u64) {
            let scrambler = Scrambler::random();
            prop_assert_eq!(scrambler.permute(a) == scrambler.permute(b), a == b);
        }

        #[test]
        fn round_trips(node: u16, shard: u16, epoch: u32, sequence: u64) {
            let id = ConnectionId { node, shard, epoch, sequence };
            prop_assert_eq!(id.to_string().parse::<ConnectionId>(), Ok(id));
        }

        #[test]
        fn parse_never_panics(text in ".{0,40}") {
            let _ = text.parse::<ConnectionId>();
        }
    }
}
