//! The WebTransport message framing, a public contract: on the client's bidirectional
//! stream every message in either direction is `[kind: 1 byte][length: 4 bytes big-endian]
//! [payload]`, kind 1 = text (UTF-8), 2 = binary.
//!
//! Outbound messages are encoded into it by [`crate::message::Message::webtransport`], once
//! per message per shard, however many WebTransport members receive it.

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{self, Incoming, ProtocolError};

/// Bytes before the payload: kind and length.
pub const HEADER_BYTES: usize = 5;
/// `kind` of a text message.
pub const TEXT: u8 = 1;
/// `kind` of a binary message.
pub const BINARY: u8 = 2;

/// Encodes one message.
pub fn encode(kind: u8, payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(HEADER_BYTES + payload.len());
    frame.put_u8(kind);
    frame.put_u32(payload.len() as u32);
    frame.put_slice(payload);
    frame.freeze()
}

/// Reassembles client messages from stream bytes, keeping bytes only while a message is
/// incomplete (an idle session holds no buffer).
#[derive(Debug)]
pub struct FrameDecoder {
    max_message_bytes: usize,
    pending: Vec<u8>,
}

impl FrameDecoder {
    pub fn new(max_message_bytes: usize) -> Self {
        Self {
            max_message_bytes,
            pending: Vec::new(),
        }
    }

    /// Feeds bytes read from the stream; complete messages are appended to `out`. After an
    /// error the session must be closed with [`ProtocolError::close_code`].
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<Incoming>) -> Result<(), ProtocolError> {
        let mut pending = std::mem::take(&mut self.pending);
        let result = frame::decode_after_pending(&mut pending, input, |bytes| {
            self.decode_messages(bytes, out)
        });
        self.pending = pending;
        result
    }

    /// Decodes every complete message at the start of `input`; returns the bytes used.
    fn decode_messages(
        &self,
        input: &[u8],
        out: &mut Vec<Incoming>,
    ) -> Result<usize, ProtocolError> {
        let mut used = 0;
        while let Some(header) = input.get(used..used + HEADER_BYTES) {
            let kind = header[0];
            if kind != TEXT && kind != BINARY {
                return Err(ProtocolError::Violation(
                    "unknown WebTransport frame kind (1 = text, 2 = binary)",
                ));
            }
            let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
            if length > self.max_message_bytes {
                return Err(ProtocolError::MessageTooLarge {
                    size: length,
                    limit: self.max_message_bytes,
                });
            }
            let start = used + HEADER_BYTES;
            let Some(payload) = input.get(start..start + length) else {
                break;
            };
            out.push(if kind == TEXT {
                let text = std::str::from_utf8(payload).map_err(|_| ProtocolError::InvalidUtf8)?;
                Incoming::Text(text.to_owned())
            } else {
                Incoming::Binary(payload.to_vec())
            });
            used = start + length;
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(
        decoder: &mut FrameDecoder,
        bytes: &[u8],
    ) -> Result<Vec<Incoming>, ProtocolError> {
        let mut out = Vec::new();
        decoder.decode(bytes, &mut out)?;
        Ok(out)
    }

    #[test]
    fn messages_of_every_length_carry_their_kind_and_length() {
        for size in [0, 5, 125, 126, 65_535, 65_536, 200_000] {
            let payload = vec![b'x'; size];
            let text = crate::message::Message::text(payload.clone()).webtransport();
            assert_eq!(text, encode(TEXT, &payload), "text of {size} bytes");
            let binary = crate::message::Message::binary(payload.clone()).webtransport();
            assert_eq!(binary[0], BINARY);
            assert_eq!(&binary[1..HEADER_BYTES], &(size as u32).to_be_bytes());
            assert_eq!(&binary[HEADER_BYTES..], &payload[..]);
        }
    }

    #[test]
    fn messages_split_anywhere_are_reassembled() {
        let mut wire = encode(TEXT, "héllo".as_bytes()).to_vec();
        wire.extend_from_slice(&encode(BINARY, &[0, 159, 146, 150]));
        for split in 0..=wire.len() {
            let mut decoder = FrameDecoder::new(1024);
            let mut out = decode_all(&mut decoder, &wire[..split]).unwrap();
            out.extend(decode_all(&mut decoder, &wire[split..]).unwrap());
            assert_eq!(
                out,
                vec![
                    Incoming::Text("héllo".into()),
                    Incoming::Binary(vec![0, 159, 146, 150])
                ],
                "split at {split}"
            );
            assert!(decoder.pending.capacity() == 0, "no buffer kept when idle");
        }
    }

    #[test]
    fn bad_frames_are_named() {
        let mut decoder = FrameDecoder::new(16);
        assert!(matches!(
            decode_all(&mut decoder, &[7, 0, 0, 0, 0]),
            Err(ProtocolError::Violation(_))
        ));
        let mut decoder = FrameDecoder::new(16);
        assert_eq!(
            decode_all(&mut decoder, &[TEXT, 0, 0, 0, 17]),
            Err(ProtocolError::MessageTooLarge {
                size: 17,
                limit: 16
            })
        );
        let mut decoder = FrameDecoder::new(16);
        assert_eq!(
            decode_all(&mut decoder, &encode(TEXT, &[0xff, 0xfe])),
            Err(ProtocolError::InvalidUtf8)
        );
    }
}
