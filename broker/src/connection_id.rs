//! connectionIds and request ids.
//!
//! A connectionId is opaque to users (22 URL-safe characters) but encodes the node, the
//! shard that owns the connection, the node's epoch (bumped at every start, so ids never
//! repeat across restarts) and a per-shard sequence number. A push therefore reaches its
//! connection with no lookup table: decode, send to the shard, done.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

const ID_BYTES: usize = 16;

/// Identifies one connection for its whole life and beyond.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId {
    pub node: u16,
    pub shard: u16,
    pub epoch: u32,
    pub sequence: u64,
}

impl ConnectionId {
    fn to_bytes(self) -> [u8; ID_BYTES] {
        let mut bytes = [0; ID_BYTES];
        bytes[0..2].copy_from_slice(&self.node.to_be_bytes());
        bytes[2..4].copy_from_slice(&self.shard.to_be_bytes());
        bytes[4..8].copy_from_slice(&self.epoch.to_be_bytes());
        bytes[8..16].copy_from_slice(&self.sequence.to_be_bytes());
        bytes
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
        let field = |range: std::ops::Range<usize>| &bytes[range];
        Ok(Self {
            node: u16::from_be_bytes([bytes[0], bytes[1]]),
            shard: u16::from_be_bytes([bytes[2], bytes[3]]),
            epoch: u32::from_be_bytes(field(4..8).try_into().map_err(|_| InvalidConnectionId)?),
            sequence: u64::from_be_bytes(field(8..16).try_into().map_err(|_| InvalidConnectionId)?),
        })
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
}

impl IdMinter {
    pub fn new(node: u16, shard: u16, epoch: u32) -> Self {
        Self {
            node,
            shard,
            epoch,
            next_connection: 1,
            next_request: 1,
        }
    }

    pub fn connection_id(&mut self) -> ConnectionId {
        let sequence = self.next_connection;
        self.next_connection += 1;
        ConnectionId {
            node: self.node,
            shard: self.shard,
            epoch: self.epoch,
            sequence,
        }
    }

    /// A unique id in the style of AWS's `requestId` / `messageId` (22 URL-safe chars):
    /// the same layout as a connectionId, from a separate counter.
    pub fn request_id(&mut self) -> String {
        let sequence = self.next_request;
        self.next_request += 1;
        let id = ConnectionId {
            node: self.node,
            shard: self.shard,
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

    proptest! {
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
