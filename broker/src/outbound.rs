//! A connection's bounded queue of encoded frames waiting to be written.
//!
//! Frames are [`SharedFrame`]s: one encoded frame shared by every recipient of a
//! broadcast on a shard through a non-atomic `Rc` (a queue never leaves its shard, so no
//! recipient pays for an atomic refcount). A frame is encoded for WebSocket; the first
//! WebTransport recipient on a shard adds its WebTransport encoding, which the others
//! share: once per transport, never once per member. The writer drains the queue with vectored
//! writes, so whatever piled up while the socket was busy leaves in one system call.
//! Overflow rule: a push that would exceed either bound is refused, and the caller
//! disconnects the connection as a slow consumer.

use std::cell::OnceCell;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::rc::Rc;

use bytes::Bytes;

use crate::transport::webtransport::framing;

/// An encoded frame as queued: shared within one shard.
pub type SharedFrame = Rc<OutboundFrame>;

/// Shares a WebSocket-encoded frame between the recipients on this shard.
pub fn shared(websocket: Bytes) -> SharedFrame {
    Rc::new(OutboundFrame {
        websocket,
        webtransport: OnceCell::new(),
        datagram: OnceCell::new(),
    })
}

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

/// One message encoded for each transport that receives it.
#[derive(Debug)]
pub struct OutboundFrame {
    websocket: Bytes,
    /// Made from the WebSocket encoding at the first WebTransport recipient.
    webtransport: OnceCell<Bytes>,
    /// The same as a QUIC datagram, at the first recipient of one.
    datagram: OnceCell<Bytes>,
}

impl OutboundFrame {
    /// The frame's bytes on `wire`.
    pub fn bytes(&self, wire: Wire) -> &[u8] {
        match wire {
            Wire::WebSocket => &self.websocket,
            Wire::WebTransport => self
                .webtransport
                .get_or_init(|| framing::from_websocket(&self.websocket)),
        }
    }

    /// The frame as a WebTransport datagram (`[kind][payload]`).
    pub fn datagram(&self) -> &Bytes {
        self.datagram
            .get_or_init(|| framing::datagram_from_websocket(&self.websocket))
    }
}

/// A queued frame and how much of it the socket has taken.
#[derive(Debug)]
struct Queued {
    frame: SharedFrame,
    written: usize,
}

impl Queued {
    fn remaining(&self, wire: Wire) -> &[u8] {
        &self.frame.bytes(wire)[self.written..]
    }
}

/// Most frames handed to one vectored write (Linux accepts up to 1024 iovecs).
pub const MAX_IOVECS: usize = 64;

/// The push would exceed the queue's bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

#[derive(Debug)]
pub struct OutboundQueue {
    wire: Wire,
    frames: VecDeque<Queued>,
    queued_bytes: usize,
    max_frames: usize,
    max_bytes: usize,
}

impl OutboundQueue {
    pub fn new(wire: Wire, max_frames: usize, max_bytes: usize) -> Self {
        Self {
            wire,
            frames: VecDeque::new(),
            queued_bytes: 0,
            max_frames,
            max_bytes,
        }
    }

    /// Queues `frame`, or refuses it if a bound would be exceeded.
    pub fn push(&mut self, frame: SharedFrame) -> Result<(), QueueFull> {
        let len = frame.bytes(self.wire).len();
        if self.frames.len() >= self.max_frames || self.queued_bytes + len > self.max_bytes {
            return Err(QueueFull);
        }
        self.push_unbounded(frame);
        Ok(())
    }

    /// Queues a frame regardless of the bounds (a close frame must always get out).
    pub fn push_unbounded(&mut self, frame: SharedFrame) {
        self.queued_bytes += frame.bytes(self.wire).len();
        self.frames.push_back(Queued { frame, written: 0 });
    }

    /// Drops every queued frame (a connection cut for not reading them).
    pub fn clear(&mut self) {
        self.frames = VecDeque::new();
        self.queued_bytes = 0;
    }

    /// Less than half of either bound is used.
    pub fn is_under_half(&self) -> bool {
        self.frames.len() < self.max_frames.div_ceil(2) && self.queued_bytes < self.max_bytes / 2
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Fills `slices` with the front of the queue; returns how many were filled.
    pub fn io_slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let mut filled = 0;
        for (slot, queued) in slices.iter_mut().zip(&self.frames) {
            *slot = IoSlice::new(queued.remaining(self.wire));
            filled += 1;
        }
        filled
    }

    /// Drops `written` bytes from the front (a partial frame keeps its tail).
    pub fn consume(&mut self, mut written: usize) {
        self.queued_bytes -= written.min(self.queued_bytes);
        while written > 0 {
            let Some(front) = self.frames.front_mut() else {
                break;
            };
            let remaining = front.remaining(self.wire).len();
            if written >= remaining {
                written -= remaining;
                self.frames.pop_front();
            } else {
                front.written += written;
                written = 0;
            }
        }
    }

    /// Frees the queue's allocation if nothing is queued: an idle connection holds none.
    pub fn shrink_if_empty(&mut self) {
        if self.frames.is_empty() && self.frames.capacity() > 0 {
            self.frames = VecDeque::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(bytes: &'static [u8]) -> SharedFrame {
        shared(Bytes::from_static(bytes))
    }

    #[test]
    fn bounds_refuse_overflow() {
        let mut queue = OutboundQueue::new(Wire::WebSocket, 2, 10);
        assert!(queue.push(frame(b"aaaa")).is_ok());
        assert!(queue.push(frame(b"bbbbbbb")).is_err());
        assert!(queue.push(frame(b"bb")).is_ok());
        assert_eq!(queue.push(frame(b"c")), Err(QueueFull));
        queue.push_unbounded(frame(b"close"));
        assert_eq!(queue.queued_bytes(), 11);
    }

    #[test]
    fn partial_writes_keep_the_tail() {
        let mut queue = OutboundQueue::new(Wire::WebSocket, 10, 100);
        queue.push(frame(b"hello")).unwrap();
        queue.push(frame(b"world")).unwrap();
        queue.consume(7);
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let n = queue.io_slices(&mut slices);
        assert_eq!(n, 1);
        assert_eq!(&*slices[0], b"rld");
        queue.consume(3);
        assert!(queue.is_empty());
        assert_eq!(queue.queued_bytes(), 0);
    }

    #[test]
    fn each_transport_gets_its_encoding_made_once() {
        let frame = shared(crate::frame::encode(crate::frame::Opcode::Text, b"hi"));
        let mut websocket = OutboundQueue::new(Wire::WebSocket, 10, 100);
        let mut webtransport = OutboundQueue::new(Wire::WebTransport, 10, 100);
        websocket.push(frame.clone()).unwrap();
        webtransport.push(frame.clone()).unwrap();
        webtransport.push(frame.clone()).unwrap();
        assert_eq!(websocket.queued_bytes(), 4);
        assert_eq!(webtransport.queued_bytes(), 14);
        let first = frame.bytes(Wire::WebTransport).as_ptr();
        assert_eq!(
            frame.bytes(Wire::WebTransport).as_ptr(),
            first,
            "encoded once"
        );
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        assert_eq!(webtransport.io_slices(&mut slices), 2);
        assert_eq!(&*slices[0], &[1, 0, 0, 0, 2, b'h', b'i']);
    }
}
