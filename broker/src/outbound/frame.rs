//! One message as it is queued: shared by its recipients on a shard, encoded once per
//! transport (and compressed once per window) at its first recipient that needs it.

use std::cell::OnceCell;
use std::rc::Rc;

use bytes::Bytes;

use crate::compression::{FULL_WINDOW, SMALLEST_WINDOW};
use crate::message::Message;

/// A message as queued: shared within one shard.
pub type SharedFrame = Rc<OutboundFrame>;

/// Shares `message` between its recipients on this shard.
pub fn shared(message: Message) -> SharedFrame {
    Rc::new(OutboundFrame {
        message,
        websocket: OnceCell::new(),
        webtransport: OnceCell::new(),
        datagram: OnceCell::new(),
        deflated: OnceCell::new(),
        deflated_narrow: OnceCell::new(),
        in_queues: std::cell::Cell::new(0),
    })
}

/// Windows below the full one a client may ask the server to compress with: 2^9..2^14.
const NARROW_WINDOWS: usize = (FULL_WINDOW - SMALLEST_WINDOW) as usize;

/// The wire format a connection's client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    WebSocket,
    WebTransport,
}

impl Wire {
    /// The `transport` label of the connection metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::WebSocket => "websocket",
            Self::WebTransport => "webtransport",
        }
    }
}

/// One message, encoded for each transport that receives it.
#[derive(Debug)]
pub struct OutboundFrame {
    pub(super) message: Message,
    /// Encoded at its first WebSocket recipient.
    websocket: OnceCell<Bytes>,
    /// Encoded at its first WebTransport recipient.
    webtransport: OnceCell<Bytes>,
    /// The same as a QUIC datagram, at the first recipient of one.
    datagram: OnceCell<Bytes>,
    /// Compressed (permessage-deflate), at its first WebSocket recipient that negotiated
    /// it: once for all of them.
    deflated: OnceCell<Bytes>,
    /// The same for recipients that asked for a smaller window (2^9..2^14 bytes), one slot
    /// per window, made at the first of them: a pointer until then.
    deflated_narrow: OnceCell<Box<[OnceCell<Bytes>; NARROW_WINDOWS]>>,
    /// How many counted queues hold it: its memory is charged against the outbound budget
    /// while one does (once, however many: a broadcast frame is shared by every recipient on
    /// the shard), and given back when the last one lets go. Resend buffers, which keep
    /// written frames for a resume, are bounded on their own and not counted here.
    pub(super) in_queues: std::cell::Cell<usize>,
}

impl OutboundFrame {
    /// The frame's bytes on `wire`.
    pub fn bytes(&self, wire: Wire) -> &[u8] {
        match wire {
            Wire::WebSocket => self.websocket.get_or_init(|| self.message.websocket()),
            Wire::WebTransport => (self.webtransport).get_or_init(|| self.message.webtransport()),
        }
    }

    /// The frame's bytes as `encoding` gives them.
    pub fn encoded(&self, encoding: Encoding) -> &[u8] {
        match (encoding.wire, encoding.deflate) {
            (Wire::WebSocket, Some(deflate)) => {
                let slot = match deflate
                    .window_bits
                    .checked_sub(SMALLEST_WINDOW)
                    .map(usize::from)
                {
                    Some(narrow) if narrow < NARROW_WINDOWS => {
                        &self.deflated_narrow.get_or_init(Default::default)[narrow]
                    }
                    _ => &self.deflated,
                };
                // A frame that goes plain shares the plain encoding (a refcount, no copy).
                slot.get_or_init(|| {
                    (self.message.websocket_deflated(deflate)).unwrap_or_else(|| {
                        self.websocket
                            .get_or_init(|| self.message.websocket())
                            .clone()
                    })
                })
            }
            (wire, _) => self.bytes(wire),
        }
    }

    /// The frame as a WebTransport datagram (`[kind][payload]`).
    pub fn datagram(&self) -> &Bytes {
        self.datagram.get_or_init(|| self.message.datagram())
    }

    pub fn message(&self) -> &Message {
        &self.message
    }

    /// Its length encoded without compression on `wire`: what bounds what it holds, and
    /// what it takes on any socket (a session may resume without compression).
    pub fn plain_len(&self, wire: Wire) -> usize {
        let len = self.message.payload.len();
        match wire {
            Wire::WebSocket => crate::frame::header_len(len) + len,
            Wire::WebTransport => crate::transport::webtransport::framing::HEADER_BYTES + len,
        }
    }

    /// A text or binary message (what a client counts), not a control frame.
    pub(super) fn is_data(&self) -> bool {
        self.message.is_data()
    }
}

/// How a queue's frames are encoded: its transport and, on WebSocket, permessage-deflate
/// if the client negotiated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    pub wire: Wire,
    pub deflate: Option<crate::compression::Deflate>,
}
