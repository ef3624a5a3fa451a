//! A message for a client before it meets a wire: its kind and its payload. Everything the
//! gateway sends (a push, a broadcast, a reply, its own protocol frames, a pong, a close)
//! is made as a message; each transport encodes it its own way, once per shard however many
//! recipients share it ([`crate::outbound`]). Between nodes it travels in its portable
//! form and is decoded back into a message on arrival: each node encodes for its own
//! clients' transports.

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{self, Opcode};
use crate::transport::webtransport::framing;

/// What a message is, for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// UTF-8 text.
    Text,
    Binary,
    /// The answer to a WebSocket ping.
    Pong,
    /// The WebSocket close frame: a 2-byte code and a reason.
    Close,
}

impl Kind {
    /// The kind's byte in the portable form: the WebSocket opcode.
    fn byte(self) -> u8 {
        self.opcode() as u8
    }

    fn opcode(self) -> Opcode {
        match self {
            Self::Text => Opcode::Text,
            Self::Binary => Opcode::Binary,
            Self::Pong => Opcode::Pong,
            Self::Close => Opcode::Close,
        }
    }

    fn from_byte(byte: u8) -> Option<Self> {
        [Self::Text, Self::Binary, Self::Pong, Self::Close]
            .into_iter()
            .find(|kind| kind.byte() == byte)
    }
}

/// See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: Kind,
    pub payload: Bytes,
}

impl Message {
    pub fn text(payload: impl Into<Bytes>) -> Self {
        Self {
            kind: Kind::Text,
            payload: payload.into(),
        }
    }

    pub fn binary(payload: impl Into<Bytes>) -> Self {
        Self {
            kind: Kind::Binary,
            payload: payload.into(),
        }
    }

    /// Text if `payload` is UTF-8, binary otherwise (what a backend's POST becomes).
    pub fn data(payload: impl Into<Bytes>) -> Self {
        let payload = payload.into();
        match std::str::from_utf8(&payload) {
            Ok(_) => Self::text(payload),
            Err(_) => Self::binary(payload),
        }
    }

    pub fn pong(payload: impl Into<Bytes>) -> Self {
        Self {
            kind: Kind::Pong,
            payload: payload.into(),
        }
    }

    /// A close with `code` and a reason cut to fit a control frame.
    pub fn close(code: u16, reason: &str) -> Self {
        let reason = frame::truncate_utf8(reason, 123);
        let mut payload = BytesMut::with_capacity(2 + reason.len());
        payload.put_u16(code);
        payload.put_slice(reason.as_bytes());
        Self {
            kind: Kind::Close,
            payload: payload.freeze(),
        }
    }

    /// A text or binary message (what a client counts), not a control frame.
    pub fn is_data(&self) -> bool {
        matches!(self.kind, Kind::Text | Kind::Binary)
    }

    /// As a server WebSocket frame.
    pub fn websocket(&self) -> Bytes {
        frame::encode(self.kind.opcode(), &self.payload)
    }

    /// As a server WebSocket frame on a connection that negotiated permessage-deflate:
    /// compressed (RSV1) if it is data of at least `deflate.min_bytes` and compressing
    /// makes it smaller; `None` if it goes as [`Message::websocket`].
    pub fn websocket_deflated(&self, deflate: crate::compression::Deflate) -> Option<Bytes> {
        if !self.is_data() || self.payload.len() < deflate.min_bytes {
            return None;
        }
        let (level, window) = (deflate.level, deflate.window_bits);
        let compressed = crate::compression::compress(&self.payload, level, window)?;
        (compressed.len() < self.payload.len())
            .then(|| frame::encode_compressed(self.kind.opcode(), &compressed))
    }

    /// As a message on a WebTransport session's stream ([`framing`]). Only data messages
    /// reach a session; anything that is not text goes as binary.
    pub fn webtransport(&self) -> Bytes {
        framing::encode(self.webtransport_kind(), &self.payload)
    }

    /// As a WebTransport datagram: `[kind][payload]`, no length.
    pub fn datagram(&self) -> Bytes {
        let mut datagram = BytesMut::with_capacity(1 + self.payload.len());
        datagram.put_u8(self.webtransport_kind());
        datagram.put_slice(&self.payload);
        datagram.freeze()
    }

    fn webtransport_kind(&self) -> u8 {
        match self.kind {
            Kind::Text => framing::TEXT,
            _ => framing::BINARY,
        }
    }

    /// The portable form: how a message crosses NATS or moves with a connection to another
    /// node. It is the message as an unmasked, final WebSocket frame, the form every
    /// version of the gateway has sent between nodes, so nodes of two versions can share a
    /// cluster during a rolling upgrade.
    pub fn to_portable(&self) -> Bytes {
        self.websocket()
    }

    /// A message from its portable form; `None` if it is not one.
    pub fn from_portable(mut portable: Bytes) -> Option<Self> {
        let (&first, rest) = portable.split_first()?;
        let (&second, rest) = rest.split_first()?;
        if first & 0xF0 != 0x80 || second & 0x80 != 0 {
            return None; // not final, reserved bits, or masked
        }
        let kind = Kind::from_byte(first & 0x0F)?;
        let (length, header) = match second & 0x7F {
            126 => (
                u64::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)),
                4,
            ),
            127 => (u64::from_be_bytes(rest.get(..8)?.try_into().ok()?), 10),
            short => (u64::from(short), 2),
        };
        if portable.len() as u64 != header as u64 + length {
            return None;
        }
        let payload = portable.split_off(header);
        Some(Self { kind, payload })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Incoming, MessageDecoder};

    /// What a client decodes from `message`'s WebSocket frame.
    fn decoded(message: &Message) -> Incoming {
        let frame = message.websocket();
        // Clients receive unmasked frames; the decoder reads client (masked) ones.
        let masked = frame::encode_masked(true, frame[0] & 0x0F, &message.payload, [7; 4]);
        let mut decoder = MessageDecoder::new(1 << 16, 1 << 16);
        let mut out = Vec::new();
        decoder.decode(&masked, &mut out).unwrap();
        out.pop().unwrap()
    }

    #[test]
    fn each_kind_is_the_websocket_frame_clients_expect() {
        assert_eq!(&Message::text("hi").websocket()[..], b"\x81\x02hi");
        assert_eq!(
            &Message::binary(vec![0, 1]).websocket()[..],
            b"\x82\x02\x00\x01"
        );
        assert_eq!(&Message::pong("p").websocket()[..], b"\x8a\x01p");
        assert_eq!(
            decoded(&Message::close(1008, "too fast")),
            Incoming::Close(Some(1008), "too fast".into())
        );
    }

    #[test]
    fn data_is_text_when_it_is_utf8() {
        assert_eq!(Message::data("é").kind, Kind::Text);
        assert_eq!(Message::data(vec![0xff]).kind, Kind::Binary);
    }

    #[test]
    fn webtransport_encodings_carry_the_payload_once() {
        let text = Message::text("price 101");
        assert_eq!(&text.webtransport()[..], b"\x01\x00\x00\x00\x09price 101");
        assert_eq!(&text.datagram()[..], b"\x01price 101");
        assert_eq!(
            &Message::binary(vec![0, 255]).datagram()[..],
            b"\x02\x00\xff"
        );
    }

    #[test]
    fn the_portable_form_round_trips_and_refuses_what_is_not_one() {
        for message in [
            Message::text("a"),
            Message::binary(vec![1, 2]),
            Message::binary(vec![7; 300]),
            Message::text(vec![b'x'; 70_000]),
            Message::pong(""),
            Message::close(1000, "bye"),
        ] {
            assert_eq!(Message::from_portable(message.to_portable()), Some(message));
        }
        // What nodes of the previous version send: a server WebSocket frame.
        let legacy = frame::encode(Opcode::Text, b"from an older node");
        assert_eq!(
            Message::from_portable(legacy),
            Some(Message::text("from an older node"))
        );
        for garbage in [
            &b""[..],
            b"\x81",
            b"\x03x",
            b"\x81\x05abc",
            b"\x01\x01a",
            b"\x81\x81a",
        ] {
            assert_eq!(
                Message::from_portable(Bytes::copy_from_slice(garbage)),
                None
            );
        }
    }
}
