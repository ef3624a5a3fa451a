//! The WebSocket wire format (RFC 6455), sans-IO.
//!
//! Outbound: a message is encoded into one complete frame ([`Bytes`]) exactly once and the
//! same bytes are queued to every recipient; nothing is re-encoded per connection.
//!
//! Inbound: [`MessageDecoder`] turns whatever bytes a read returned into whole messages,
//! enforcing the frame and message size limits and UTF-8 validity as it goes. It keeps
//! bytes only while a frame or a fragmented message is incomplete, so an idle connection
//! holds no buffer at all.

use bytes::{BufMut, Bytes, BytesMut};

/// Frame opcodes a server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

/// Close codes the gateway uses.
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const NO_STATUS: u16 = 1005;
    pub const ABNORMAL: u16 = 1006;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const TRY_AGAIN_LATER: u16 = 1013;

    /// Whether a peer may send `code` in a close frame (RFC 6455 7.4 and the IANA
    /// registry): 1005, 1006 and 1015 are for reporting only, and 1004, 1016-2999 are
    /// reserved or unassigned. 3000-4999 belong to libraries and applications.
    pub fn is_valid_on_the_wire(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// Encodes one unmasked, final server frame.
pub fn encode(opcode: Opcode, payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    put_header(&mut frame, 0x80 | opcode as u8, 0, payload.len());
    frame.put_slice(payload);
    frame.freeze()
}

/// Encodes one data message's deflate data as a frame with RSV1 set (permessage-deflate).
pub fn encode_compressed(opcode: Opcode, compressed: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(header_len(compressed.len()) + compressed.len());
    put_header(&mut frame, 0x80 | 0x40 | opcode as u8, 0, compressed.len());
    frame.put_slice(compressed);
    frame.freeze()
}

/// Encodes one frame the way a client must send it: masked with `mask`, FIN as given,
/// any opcode. The gateway never sends these; tests and Rust clients do.
pub fn encode_masked(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut frame = BytesMut::with_capacity(header_len(payload.len()) + 4 + payload.len());
    put_header(&mut frame, u8::from(fin) << 7 | opcode, 0x80, payload.len());
    frame.put_slice(&mask);
    let start = frame.len();
    frame.put_slice(payload);
    unmask(&mut frame[start..], mask); // masking and unmasking are the same XOR
    frame.to_vec()
}

/// The first byte, then the length in its shortest form, with `mask_bit` set for clients.
fn put_header(frame: &mut BytesMut, first: u8, mask_bit: u8, len: usize) {
    frame.put_u8(first);
    match len {
        0..=125 => frame.put_u8(mask_bit | len as u8),
        126..=0xFFFF => {
            frame.put_u8(mask_bit | 126);
            frame.put_u16(len as u16);
        }
        _ => {
            frame.put_u8(mask_bit | 127);
            frame.put_u64(len as u64);
        }
    }
}

pub(crate) fn header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
pub fn truncate_utf8(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Runs `decode_all` over the bytes kept from earlier reads followed by `input`; keeps only
/// the bytes it did not use (an incomplete message), and no allocation when it used all.
/// `decode_all` returns how many bytes it consumed.
pub(crate) fn decode_after_pending<E>(
    pending: &mut Vec<u8>,
    input: &[u8],
    decode_all: impl FnOnce(&[u8]) -> Result<usize, E>,
) -> Result<(), E> {
    if pending.is_empty() {
        let used = decode_all(input)?;
        pending.extend_from_slice(&input[used..]);
    } else {
        let mut buffer = std::mem::take(pending);
        buffer.extend_from_slice(input);
        let used = decode_all(&buffer)?;
        buffer.drain(..used);
        if buffer.is_empty() {
            buffer = Vec::new(); // give the memory back while idle
        }
        *pending = buffer;
    }
    Ok(())
}

/// A complete message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    /// The client's close frame: its code (if any) and reason.
    Close(Option<u16>, String),
}

/// Why the decoder gave up; each maps to the close code the client gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {size} bytes exceeds max_frame_bytes ({limit})")]
    FrameTooLarge { size: u64, limit: usize },
    #[error("message of {size} bytes exceeds max_message_bytes ({limit})")]
    MessageTooLarge { size: usize, limit: usize },
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    #[error("protocol violation: {0}")]
    Violation(&'static str),
}

impl ProtocolError {
    pub fn close_code(&self) -> u16 {
        match self {
            Self::FrameTooLarge { .. } | Self::MessageTooLarge { .. } => close_code::TOO_BIG,
            Self::InvalidUtf8 => close_code::INVALID_PAYLOAD,
            Self::Violation(_) => close_code::PROTOCOL_ERROR,
        }
    }
}

/// Reassembles client messages from raw bytes.
#[derive(Debug)]
pub struct MessageDecoder {
    max_frame_bytes: usize,
    max_message_bytes: usize,
    /// permessage-deflate was negotiated: a message whose first frame has RSV1 is
    /// deflate data, inflated (up to `max_message_bytes`) once it is whole.
    inflating: bool,
    /// Bytes of a frame that has not fully arrived. Empty (no allocation) when idle.
    pending: Vec<u8>,
    /// A fragmented data message in progress.
    fragments: Option<Fragmented>,
    /// Bytes inflated by the current [`MessageDecoder::decode`]: once they reach
    /// `max_message_bytes` it stops and keeps the rest of its input, so one read of small
    /// compressed frames cannot turn into hundreds of full-size messages at once.
    inflated: usize,
}

/// A data message whose first frames have arrived.
#[derive(Debug)]
struct Fragmented {
    opcode: u8,
    /// Deflate data, inflated and checked when the message is whole.
    compressed: bool,
    payload: Vec<u8>,
    /// How much of a text payload is known to be valid UTF-8: each fragment is checked as
    /// it arrives, so a bad byte closes the connection at once, not at the last fragment.
    checked: usize,
}

impl Fragmented {
    fn new(opcode: u8, compressed: bool, payload: Vec<u8>) -> Result<Self, ProtocolError> {
        let mut fragmented = Self {
            opcode,
            compressed,
            payload,
            checked: 0,
        };
        fragmented.check_utf8()?;
        Ok(fragmented)
    }

    fn append(&mut self, more: &[u8]) -> Result<(), ProtocolError> {
        self.payload.extend_from_slice(more);
        self.check_utf8()
    }

    /// Fails on an invalid sequence; a character cut at the end may still complete.
    fn check_utf8(&mut self) -> Result<(), ProtocolError> {
        if self.opcode != 0x1 || self.compressed {
            return Ok(());
        }
        match std::str::from_utf8(&self.payload[self.checked..]) {
            Ok(_) => self.checked = self.payload.len(),
            Err(error) if error.error_len().is_some() => return Err(ProtocolError::InvalidUtf8),
            Err(error) => self.checked += error.valid_up_to(),
        }
        Ok(())
    }
}

struct FrameHeader {
    fin: bool,
    /// RSV1: with permessage-deflate, the first frame of a compressed message.
    compressed: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

impl MessageDecoder {
    pub fn new(max_frame_bytes: usize, max_message_bytes: usize) -> Self {
        Self {
            max_frame_bytes,
            max_message_bytes,
            inflating: false,
            pending: Vec::new(),
            fragments: None,
            inflated: 0,
        }
    }

    /// Takes compressed messages (permessage-deflate was negotiated).
    pub fn inflating(mut self) -> Self {
        self.inflating = true;
        self
    }

    /// Feeds bytes read from the socket; complete messages are appended to `out`.
    /// After an error the connection must be closed with [`ProtocolError::close_code`].
    /// While [`MessageDecoder::is_holding`] after it, call it again (with nothing new) once
    /// the messages it gave are handled.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<Incoming>) -> Result<(), ProtocolError> {
        self.inflated = 0;
        let mut pending = std::mem::take(&mut self.pending);
        let result =
            decode_after_pending(&mut pending, input, |bytes| self.decode_frames(bytes, out));
        self.pending = pending;
        result
    }

    /// Whether the last decode stopped at its inflating budget with input left over.
    pub fn is_holding(&self) -> bool {
        self.inflated >= self.max_message_bytes && !self.pending.is_empty()
    }

    /// Decodes the complete frames at the start of `input`, until the inflating budget is
    /// spent; returns the bytes consumed.
    fn decode_frames(
        &mut self,
        input: &[u8],
        out: &mut Vec<Incoming>,
    ) -> Result<usize, ProtocolError> {
        let mut used = 0;
        while self.inflated < self.max_message_bytes
            && let Some(header) = self.parse_header(&input[used..])?
        {
            // Saturating: with limits near usize::MAX a claimed 64-bit length must not wrap.
            let total = header.header_len.saturating_add(header.payload_len);
            if input.len() - used < total {
                break;
            }
            let start = used + header.header_len;
            let mut payload = input[start..start + header.payload_len].to_vec();
            unmask(&mut payload, header.mask);
            used += total;
            if let Some(message) = self.accept_frame(&header, payload)? {
                let closing = matches!(message, Incoming::Close(..));
                out.push(message);
                if closing {
                    return Ok(input.len());
                }
            }
        }
        Ok(used)
    }

    fn parse_header(&self, input: &[u8]) -> Result<Option<FrameHeader>, ProtocolError> {
        let [first, second, ..] = *input else {
            return Ok(None);
        };
        let compressed = first & 0x40 != 0;
        if first & 0x30 != 0 || (compressed && !self.inflating) {
            return Err(ProtocolError::Violation("reserved bits set"));
        }
        if second & 0x80 == 0 {
            return Err(ProtocolError::Violation("client frames must be masked"));
        }
        let (len, mut header_len) = match second & 0x7F {
            126 => match input.get(2..4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
                None => return Ok(None),
            },
            127 => match input.get(2..10) {
                Some(b) => {
                    let mut raw = [0u8; 8];
                    raw.copy_from_slice(b);
                    (u64::from_be_bytes(raw), 10)
                }
                None => return Ok(None),
            },
            small => (u64::from(small), 2),
        };
        let opcode = first & 0x0F;
        let fin = first & 0x80 != 0;
        if opcode >= 0x8 && (len > 125 || !fin || compressed) {
            return Err(ProtocolError::Violation("invalid control frame"));
        }
        if opcode == 0x0 && compressed {
            return Err(ProtocolError::Violation("RSV1 on a continuation frame"));
        }
        let deflated = compressed || (opcode == 0x0 && self.is_continuing_compressed());
        if len > with_deflate_overhead(self.max_frame_bytes, deflated) as u64 {
            return Err(ProtocolError::FrameTooLarge {
                size: len,
                limit: self.max_frame_bytes,
            });
        }
        let Some(mask) = input.get(header_len..header_len + 4) else {
            return Ok(None);
        };
        let mask = [mask[0], mask[1], mask[2], mask[3]];
        header_len += 4;
        Ok(Some(FrameHeader {
            fin,
            compressed,
            opcode,
            mask,
            header_len,
            payload_len: len as usize,
        }))
    }

    fn accept_frame(
        &mut self,
        header: &FrameHeader,
        payload: Vec<u8>,
    ) -> Result<Option<Incoming>, ProtocolError> {
        match header.opcode {
            0x0 => {
                let Some(so_far) = self.fragments.as_ref().map(|f| f.payload.len()) else {
                    return Err(ProtocolError::Violation("continuation without a message"));
                };
                let compressed = self.is_continuing_compressed();
                self.check_message_size(so_far + payload.len(), compressed)?;
                if let Some(fragmented) = self.fragments.as_mut() {
                    fragmented.append(&payload)?;
                }
                if !header.fin {
                    return Ok(None);
                }
                match self.fragments.take() {
                    Some(done) => self.whole(done.opcode, done.compressed, done.payload),
                    None => Ok(None),
                }
            }
            0x1 | 0x2 => {
                if self.fragments.is_some() {
                    return Err(ProtocolError::Violation(
                        "new message inside a fragmented one",
                    ));
                }
                self.check_message_size(payload.len(), header.compressed)?;
                if header.fin {
                    self.whole(header.opcode, header.compressed, payload)
                } else {
                    let fragmented = Fragmented::new(header.opcode, header.compressed, payload);
                    self.fragments = Some(fragmented?);
                    Ok(None)
                }
            }
            0x8 => close_message(&payload).map(Some),
            0x9 => Ok(Some(Incoming::Ping(payload))),
            0xA => Ok(Some(Incoming::Pong)),
            _ => Err(ProtocolError::Violation("unknown opcode")),
        }
    }

    /// A whole data message: inflated first if it is compressed (at most
    /// `max_message_bytes`), then text checked as UTF-8.
    fn whole(
        &mut self,
        opcode: u8,
        compressed: bool,
        payload: Vec<u8>,
    ) -> Result<Option<Incoming>, ProtocolError> {
        let payload =
            match compressed {
                false => payload,
                true => crate::compression::inflate(&payload, self.max_message_bytes).map_err(
                    |error| match error {
                        crate::compression::InflateError::TooLarge(limit) => {
                            ProtocolError::MessageTooLarge {
                                size: limit + 1,
                                limit,
                            }
                        }
                        crate::compression::InflateError::Corrupt => {
                            ProtocolError::Violation("compressed message is not deflate data")
                        }
                    },
                )?,
            };
        if compressed {
            self.inflated += payload.len();
        }
        data_message(opcode, payload).map(Some)
    }

    /// Whether the fragmented message in progress is compressed.
    fn is_continuing_compressed(&self) -> bool {
        self.fragments.as_ref().is_some_and(|f| f.compressed)
    }

    /// Checks a message's size so far: compressed, it may carry deflate's few bytes of
    /// overhead past the limit (its inflated size is checked against the limit itself).
    fn check_message_size(&self, size: usize, compressed: bool) -> Result<(), ProtocolError> {
        if size > with_deflate_overhead(self.max_message_bytes, compressed) {
            return Err(ProtocolError::MessageTooLarge {
                size,
                limit: self.max_message_bytes,
            });
        }
        Ok(())
    }
}

/// `limit` for compressed data: deflate may grow what does not compress by a few bytes per
/// block (5 per 64 KiB stored block, and the flush), never by a 4096th.
fn with_deflate_overhead(limit: usize, compressed: bool) -> usize {
    match compressed {
        true => limit.saturating_add(limit / 4096 + 64),
        false => limit,
    }
}

fn data_message(opcode: u8, payload: Vec<u8>) -> Result<Incoming, ProtocolError> {
    if opcode == 0x1 {
        String::from_utf8(payload)
            .map(Incoming::Text)
            .map_err(|_| ProtocolError::InvalidUtf8)
    } else {
        Ok(Incoming::Binary(payload))
    }
}

fn close_message(payload: &[u8]) -> Result<Incoming, ProtocolError> {
    match payload {
        [] => Ok(Incoming::Close(None, String::new())),
        [_] => Err(ProtocolError::Violation(
            "close frame with a 1-byte payload",
        )),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code::is_valid_on_the_wire(code) {
                return Err(ProtocolError::Violation("invalid close code"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok(Incoming::Close(Some(code), reason.to_owned()))
        }
    }
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let value = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) ^ word;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i];
    }
}

#[cfg(test)]
pub(crate) mod tests;
