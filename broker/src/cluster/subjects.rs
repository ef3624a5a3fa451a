//! Every NATS name the cluster uses, derived from the stage so that several gateways (or
//! stages) can share one NATS cluster without seeing each other's traffic.
//!
//! Room and queue names may hold characters NATS gives meaning to (`.`, `*`, `>`), so they
//! travel hex-encoded: one subject token, whatever the name.

/// The names of one stage's subjects, streams and buckets.
#[derive(Debug, Clone)]
pub struct Subjects {
    stage: String,
}

impl Subjects {
    pub fn new(stage: &str) -> Self {
        Self {
            stage: stage.to_owned(),
        }
    }

    /// Requests for connections on `node` (push, status, delete, rooms, bulk).
    pub fn node(&self, node: u16) -> String {
        format!("sb.{}.node.{node}", self.stage)
    }

    /// A room's broadcasts and listings; only nodes with members subscribe.
    pub fn room(&self, room: &str) -> String {
        format!("sb.{}.room.{}", self.stage, hex(room))
    }

    /// The stream holding every node's connection records.
    pub fn mirror_stream(&self) -> String {
        format!("SB_{}_CONNECTIONS", self.stage)
    }

    /// One connection's record in the mirror stream.
    pub fn mirror_record(&self, node: u16, epoch: u32, connection_id: &str) -> String {
        format!("sb.{}.conn.{node}.{epoch}.{connection_id}", self.stage)
    }

    /// Every record of `node`, of every incarnation.
    pub fn mirror_node(&self, node: u16) -> String {
        format!("sb.{}.conn.{node}.>", self.stage)
    }

    /// Every record of one incarnation of `node`.
    pub fn mirror_incarnation(&self, node: u16, epoch: u32) -> String {
        format!("sb.{}.conn.{node}.{epoch}.>", self.stage)
    }

    /// Every record of every node (the stream's subjects).
    pub fn mirror_all(&self) -> String {
        format!("sb.{}.conn.>", self.stage)
    }

    /// The stream of durable rooms' history.
    pub fn history_stream(&self) -> String {
        format!("SB_{}_HISTORY", self.stage)
    }

    /// One durable room's history in that stream.
    pub fn history(&self, room: &str) -> String {
        format!("sb.{}.history.{}", self.stage, hex(room))
    }

    /// Every durable room's history (the stream's subjects).
    pub fn history_all(&self) -> String {
        format!("sb.{}.history.*", self.stage)
    }

    /// The key-value bucket of which nodes have members in which rooms (webhooks).
    pub fn rooms_bucket(&self) -> String {
        format!("sb_{}_rooms", self.stage)
    }

    /// The key-value bucket of node registrations and takeover claims.
    pub fn registry_bucket(&self) -> String {
        format!("sb_{}_nodes", self.stage)
    }

    /// The stream of durable queue `queue`.
    pub fn queue_stream(&self, queue: &str) -> String {
        format!("SB_{}_QUEUE_{}", self.stage, hex(queue))
    }

    /// The subject durable queue `queue` is appended on.
    pub fn queue(&self, queue: &str) -> String {
        format!("sb.{}.queue.{}", self.stage, hex(queue))
    }

    /// The key-value bucket of consumer groups' committed offsets.
    pub fn offsets_bucket(&self) -> String {
        format!("sb_{}_offsets", self.stage)
    }
}

/// Lower-case hex of `text`'s bytes: a valid subject token and key for any name.
pub fn hex(text: &str) -> String {
    use std::fmt::Write;
    text.bytes()
        .fold(String::with_capacity(text.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// The text `hex` encodes, if it is lower- or upper-case hex of UTF-8.
pub fn unhex(hex: &str) -> Option<String> {
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_nats_wildcards_become_one_token() {
        let subjects = Subjects::new("dev");
        assert_eq!(subjects.room("a.b>*"), "sb.dev.room.612e623e2a");
        assert_eq!(subjects.queue_stream("q.1"), "SB_dev_QUEUE_712e31");
        assert_eq!(subjects.node(7), "sb.dev.node.7");
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        for name in ["audit", "a.b-c_d", "ü"] {
            assert_eq!(unhex(&hex(name)).as_deref(), Some(name));
        }
        assert_eq!(unhex("6"), None);
        assert_eq!(unhex("zz"), None);
    }
}
