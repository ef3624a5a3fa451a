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
//!
//! A resumable connection's queue also numbers its data frames and keeps the last ones it
//! wrote (bounded by frames and bytes; a shared frame costs a pointer): a client that comes
//! back saying how many it received gets the rest again, in order (see [`crate::resume`]).

use std::cell::OnceCell;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::rc::Rc;

use bytes::Bytes;

use crate::limits::overload::{Charge, ShardAccount, footprint};
use crate::transport::webtransport::framing;

/// An encoded frame as queued: shared within one shard.
pub type SharedFrame = Rc<OutboundFrame>;

/// Shares a WebSocket-encoded frame between the recipients on this shard.
pub fn shared(websocket: Bytes) -> SharedFrame {
    Rc::new(OutboundFrame {
        websocket,
        webtransport: OnceCell::new(),
        datagram: OnceCell::new(),
        in_queues: std::cell::Cell::new(0),
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
    /// How many counted queues hold it: its memory is charged against the outbound budget
    /// while one does (once, however many: a broadcast frame is shared by every recipient on
    /// the shard), and given back when the last one lets go. Resend buffers, which keep
    /// written frames for a resume, are bounded on their own and not counted here.
    in_queues: std::cell::Cell<usize>,
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

    /// A text or binary message (what a client counts), not a control frame.
    fn is_data(&self) -> bool {
        use crate::frame::Opcode;
        let opcode = self.websocket.first().map_or(0, |b| b & 0x0f);
        opcode == Opcode::Text as u8 || opcode == Opcode::Binary as u8
    }
}

/// A queued frame and how much of it the socket has taken.
#[derive(Debug)]
struct Queued {
    frame: SharedFrame,
    written: usize,
    /// Its number among the data frames, on a resumable connection.
    number: Option<u64>,
}

impl Queued {
    fn remaining(&self, wire: Wire) -> &[u8] {
        &self.frame.bytes(wire)[self.written..]
    }
}

/// Most frames handed to one vectored write (Linux accepts up to 1024 iovecs).
pub const MAX_IOVECS: usize = 64;

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The push would exceed the queue's own bound.
    Full,
    /// The gateway's outbound memory budget is crossed (nothing was queued).
    OverBudget,
}

#[derive(Debug)]
pub struct OutboundQueue {
    wire: Wire,
    frames: VecDeque<Queued>,
    queued_bytes: usize,
    max_frames: usize,
    max_bytes: usize,
    /// Set on a resumable connection (boxed: most connections are not, and every one
    /// carries this field).
    resend: Option<Box<Resend>>,
    /// Where its entries and frames are counted against the outbound memory budget (its
    /// shard's).
    account: Option<Rc<ShardAccount>>,
}

/// What a resumable connection keeps to send again.
#[derive(Debug)]
struct Resend {
    /// The number the next data frame queued gets; the first is 1.
    next_number: u64,
    /// Data frames written, oldest first; the first is number `first_written`.
    written: VecDeque<SharedFrame>,
    first_written: u64,
    written_bytes: usize,
    max_frames: usize,
    max_bytes: usize,
}

/// Why the frames after a client's count cannot be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewindError {
    /// The client claims more than was ever sent.
    NeverSent,
    /// Some of what it missed is no longer kept.
    NotKept,
}

impl OutboundQueue {
    pub fn new(wire: Wire, max_frames: usize, max_bytes: usize) -> Self {
        Self {
            wire,
            frames: VecDeque::new(),
            queued_bytes: 0,
            max_frames,
            max_bytes,
            resend: None,
            account: None,
        }
    }

    /// Counts what it holds in `account` from now on (an empty queue's only).
    pub fn counted_in(mut self, account: Rc<ShardAccount>) -> Self {
        debug_assert_eq!(self.queued_bytes, 0);
        self.account = Some(account);
        self
    }

    /// A new, empty queue counted where this one is (this one's bytes are refunded when it
    /// is dropped).
    pub fn replacement(&self, wire: Wire, max_frames: usize, max_bytes: usize) -> Self {
        let mut queue = Self::new(wire, max_frames, max_bytes);
        queue.account = self.account.clone();
        queue
    }

    /// Charges the frame's memory to the budget when it enters the first counted queue
    /// (later recipients on the shard share it: nothing more is charged, and the fan-out
    /// path touches the account once per frame, not per recipient). Refused past the budget
    /// when `within_budget` (nothing is charged then), else charged regardless.
    fn enter(&self, frame: &SharedFrame, within_budget: bool) -> Result<(), PushError> {
        let Some(account) = &self.account else {
            return Ok(());
        };
        let holders = frame.in_queues.get();
        if holders == 0 {
            let own = footprint(frame.bytes(self.wire).len());
            if !within_budget {
                account.charge_anyway(own);
            } else if account.charge(own) == Charge::OverBudget {
                return Err(PushError::OverBudget);
            }
        }
        frame.in_queues.set(holders + 1);
        Ok(())
    }

    /// Gives the frame's memory back when the last counted queue holding it lets go.
    fn leave(&self, frame: &OutboundFrame) {
        let Some(account) = &self.account else {
            return;
        };
        let holders = frame.in_queues.get().saturating_sub(1);
        frame.in_queues.set(holders);
        if holders == 0 {
            account.refund(footprint(frame.bytes(self.wire).len()));
        }
    }

    /// From now on, numbers data frames (the first queued after this is 1) and keeps the
    /// last ones written, at most `max_frames` of them and `max_bytes`.
    pub fn keep_for_resend(&mut self, max_frames: usize, max_bytes: usize) {
        self.resend = Some(Box::new(Resend {
            next_number: 1,
            written: VecDeque::new(),
            first_written: 1,
            written_bytes: 0,
            max_frames,
            max_bytes,
        }));
    }

    /// Replaces the queue with every data frame numbered after `received`, in order, from
    /// the frames kept after writing and those still queued; control frames are dropped
    /// (they were for the lost socket). Returns how many there are.
    pub fn rewind(&mut self, received: u64) -> Result<usize, RewindError> {
        self.check_rewind(received)?;
        for queued in &self.frames {
            self.leave(&queued.frame);
        }
        let Some(resend) = self.resend.as_mut() else {
            return Err(RewindError::NeverSent);
        };
        let written = std::mem::take(&mut resend.written);
        resend.written_bytes = 0;
        let kept = (resend.first_written..).zip(written);
        let queued = std::mem::take(&mut self.frames)
            .into_iter()
            .filter_map(|q| Some((q.number?, q.frame)));
        self.frames = kept
            .chain(queued)
            .filter(|(number, _)| *number > received)
            .map(|(number, frame)| Queued {
                frame,
                written: 0,
                number: Some(number),
            })
            .collect();
        self.queued_bytes = self
            .frames
            .iter()
            .map(|q| q.frame.bytes(self.wire).len())
            .sum();
        for queued in &self.frames {
            let _ = self.enter(&queued.frame, false);
        }
        Ok(self.frames.len())
    }

    /// How many frames [`OutboundQueue::rewind`] would queue for `received`, or why it
    /// could not.
    pub fn check_rewind(&self, received: u64) -> Result<usize, RewindError> {
        let Some(resend) = self.resend.as_ref() else {
            return Err(RewindError::NeverSent);
        };
        if received >= resend.next_number {
            return Err(RewindError::NeverSent);
        }
        let first_queued = self.frames.iter().find_map(|q| q.number);
        let oldest_kept = match resend.written.is_empty() {
            false => resend.first_written,
            true => first_queued.unwrap_or(resend.next_number),
        };
        if received + 1 < oldest_kept {
            return Err(RewindError::NotKept);
        }
        // What would be queued again must fit the queue's bounds like anything queued.
        let kept = (resend.first_written..).zip(&resend.written);
        let queued = self
            .frames
            .iter()
            .filter_map(|q| Some((q.number?, &q.frame)));
        let (count, bytes) = kept
            .chain(queued)
            .filter(|(number, _)| *number > received)
            .fold((0, 0), |(count, bytes), (_, frame)| {
                (count + 1, bytes + frame.bytes(self.wire).len())
            });
        if count > self.max_frames || bytes > self.max_bytes {
            return Err(RewindError::NotKept);
        }
        Ok(count)
    }

    /// Numbers the next data frame `after + 1`: a connection moved from another node goes
    /// on counting where its client is.
    pub fn continue_count_after(&mut self, after: u64) {
        if let Some(resend) = self.resend.as_mut() {
            resend.next_number = after + 1;
            resend.first_written = after + 1;
        }
    }

    /// Empties the queue, returning the frames' WebSocket encodings in order (a connection
    /// moving to another node takes them along).
    pub fn take_frames(&mut self) -> Vec<Bytes> {
        for queued in &self.frames {
            self.leave(&queued.frame);
        }
        self.queued_bytes = 0;
        std::mem::take(&mut self.frames)
            .into_iter()
            .map(|q| q.frame.websocket.clone())
            .collect()
    }

    /// Puts an uncounted frame before everything queued (the answer to a resume).
    pub fn push_front(&mut self, frame: SharedFrame) {
        let _ = self.enter(&frame, false);
        self.queued_bytes += frame.bytes(self.wire).len();
        self.frames.push_front(Queued {
            frame,
            written: 0,
            number: None,
        });
    }

    /// Queues `frame`, or refuses it if its bound, or the gateway's budget, would be
    /// exceeded.
    pub fn push(&mut self, frame: SharedFrame) -> Result<(), PushError> {
        let len = frame.bytes(self.wire).len();
        if self.frames.len() >= self.max_frames || self.queued_bytes + len > self.max_bytes {
            return Err(PushError::Full);
        }
        self.enter(&frame, true)?;
        self.queued_bytes += len;
        self.append(frame);
        Ok(())
    }

    /// Queues a frame regardless of the bounds (a close frame must always get out).
    pub fn push_unbounded(&mut self, frame: SharedFrame) {
        let _ = self.enter(&frame, false);
        self.queued_bytes += frame.bytes(self.wire).len();
        self.append(frame);
    }

    /// Puts `frame` at the back, numbered if it is data on a resumable connection.
    fn append(&mut self, frame: SharedFrame) {
        let number = match self.resend.as_mut() {
            Some(resend) if frame.is_data() => {
                resend.next_number += 1;
                Some(resend.next_number - 1)
            }
            _ => None,
        };
        self.frames.push_back(Queued {
            frame,
            written: 0,
            number,
        });
    }

    /// Drops every frame not begun (a connection cut while the gateway is out of memory
    /// for queues): one partly written stays, so the stream stays whole for a close frame.
    pub fn shed_unstarted(&mut self) {
        let keep = usize::from(self.frames.front().is_some_and(|q| q.written > 0));
        let dropped: Vec<Queued> = self.frames.drain(keep..).collect();
        let bytes: usize = dropped.iter().map(|q| q.frame.bytes(self.wire).len()).sum();
        self.queued_bytes -= bytes.min(self.queued_bytes);
        for queued in &dropped {
            self.leave(&queued.frame);
        }
    }

    /// Drops every queued frame (a connection cut for not reading them).
    pub fn clear(&mut self) {
        for queued in &self.frames {
            self.leave(&queued.frame);
        }
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

    /// Whether `frame` (this very one, not an equal one) is still queued, not all written.
    pub fn holds(&self, frame: &SharedFrame) -> bool {
        self.frames.iter().any(|q| Rc::ptr_eq(&q.frame, frame))
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
                let Some(done) = self.frames.pop_front() else {
                    break;
                };
                self.leave(&done.frame);
                if let (Some(resend), Some(number)) = (self.resend.as_mut(), done.number) {
                    resend.remember(done.frame, number, self.wire);
                }
            } else {
                front.written += written;
                written = 0;
            }
        }
    }

    /// Frames kept after writing, for a resume (0 unless resumable).
    pub fn kept_frames(&self) -> usize {
        self.resend.as_ref().map_or(0, |r| r.written.len())
    }

    /// Frees the queue's allocation if nothing is queued: an idle connection holds none.
    pub fn shrink_if_empty(&mut self) {
        if self.frames.is_empty() && self.frames.capacity() > 0 {
            self.frames = VecDeque::new();
        }
    }
}

impl Resend {
    /// Keeps written data frame `number`, dropping the oldest past the bounds.
    fn remember(&mut self, frame: SharedFrame, number: u64, wire: Wire) {
        if self.written.is_empty() {
            self.first_written = number;
        }
        self.written_bytes += frame.bytes(wire).len();
        self.written.push_back(frame);
        while self.written.len() > self.max_frames || self.written_bytes > self.max_bytes {
            let Some(dropped) = self.written.pop_front() else {
                break;
            };
            self.written_bytes -= dropped.bytes(wire).len();
            self.first_written += 1;
        }
    }
}

impl Drop for OutboundQueue {
    /// What it holds leaves the budget with it.
    fn drop(&mut self) {
        for queued in &self.frames {
            self.leave(&queued.frame);
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
        assert_eq!(queue.push(frame(b"c")), Err(PushError::Full));
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

    fn text(body: &str) -> SharedFrame {
        shared(crate::frame::encode(
            crate::frame::Opcode::Text,
            body.as_bytes(),
        ))
    }

    /// Writes everything queued, as a socket that takes it all would.
    fn write_all(queue: &mut OutboundQueue) {
        let bytes = queue.queued_bytes();
        queue.consume(bytes);
    }

    fn bodies(queue: &OutboundQueue) -> Vec<String> {
        queue
            .frames
            .iter()
            .map(|q| String::from_utf8_lossy(&q.frame.bytes(Wire::WebSocket)[2..]).into_owned())
            .collect()
    }

    #[test]
    fn a_rewind_queues_everything_after_the_count_from_kept_and_queued_frames() {
        let mut queue = OutboundQueue::new(Wire::WebSocket, 100, 10_000);
        queue.push(text("welcome")).unwrap();
        queue.keep_for_resend(10, 10_000);
        for n in 1..=3 {
            queue.push(text(&format!("m{n}"))).unwrap();
        }
        write_all(&mut queue);
        queue.push(text("m4")).unwrap();
        queue
            .push(shared(crate::frame::encode_close(1000, "")))
            .unwrap();
        queue.push(text("m5")).unwrap();
        queue.consume(1); // m4 half written when the socket died
        assert_eq!(queue.kept_frames(), 3, "the welcome is not counted");
        assert_eq!(queue.rewind(1), Ok(4));
        assert_eq!(bodies(&queue), ["m2", "m3", "m4", "m5"]);
        assert_eq!(queue.queued_bytes(), 16);
        // The count goes on: the next message is number 6.
        queue.push(text("m6")).unwrap();
        write_all(&mut queue);
        assert_eq!(queue.rewind(5), Ok(1));
        assert_eq!(bodies(&queue), ["m6"]);
        assert_eq!(queue.rewind(6), Ok(0));
    }

    #[test]
    fn a_rewind_refuses_counts_never_sent_or_no_longer_kept() {
        let mut queue = OutboundQueue::new(Wire::WebSocket, 100, 10_000);
        assert_eq!(
            queue.rewind(0),
            Err(RewindError::NeverSent),
            "not resumable"
        );
        queue.keep_for_resend(2, 10_000);
        assert_eq!(queue.rewind(0), Ok(0));
        assert_eq!(queue.rewind(1), Err(RewindError::NeverSent));
        for n in 1..=5 {
            queue.push(text(&format!("m{n}"))).unwrap();
            write_all(&mut queue);
        }
        assert_eq!(queue.kept_frames(), 2, "bounded by frames");
        assert_eq!(queue.rewind(2), Err(RewindError::NotKept));
        assert_eq!(queue.rewind(6), Err(RewindError::NeverSent));
        assert_eq!(queue.rewind(3), Ok(2));
        assert_eq!(bodies(&queue), ["m4", "m5"]);
    }

    #[test]
    fn a_rewind_that_would_overflow_the_queue_is_refused() {
        let mut queue = OutboundQueue::new(Wire::WebSocket, 3, 10_000);
        queue.keep_for_resend(10, 10_000);
        for n in 1..=3 {
            queue.push(text(&format!("m{n}"))).unwrap();
        }
        write_all(&mut queue);
        for n in 4..=6 {
            queue.push(text(&format!("m{n}"))).unwrap();
        }
        assert_eq!(
            queue.rewind(2),
            Err(RewindError::NotKept),
            "4 frames, 3 fit"
        );
        assert_eq!(queue.rewind(3), Ok(3));
    }

    #[test]
    fn a_shared_frame_is_charged_once_while_any_queue_holds_it() {
        use crate::limits::overload::{OutboundBudget, ShardAccount};
        let account = Rc::new(ShardAccount::new(std::sync::Arc::new(OutboundBudget::new(
            1 << 30,
        ))));
        let counted =
            || OutboundQueue::new(Wire::WebSocket, 10, 10_000).counted_in(account.clone());
        let (mut a, mut b) = (counted(), counted());
        let broadcast = text("to everyone");
        let len = broadcast.bytes(Wire::WebSocket).len();
        a.push(broadcast.clone()).unwrap();
        b.push(broadcast.clone()).unwrap();
        assert_eq!(account.queued(), footprint(len), "once, for both");
        write_all(&mut a);
        assert_eq!(account.queued(), footprint(len), "b still holds it");
        b.clear();
        assert_eq!(account.queued(), 0, "the last queue gave the frame back");
        // A resend buffer keeps written frames for a resume: they are not counted, and a
        // rewind that queues them again counts them again.
        let mut resumable = counted();
        resumable.keep_for_resend(10, 10_000);
        resumable.push(broadcast.clone()).unwrap();
        write_all(&mut resumable);
        assert_eq!(account.queued(), 0, "kept, not queued");
        resumable.rewind(0).unwrap();
        assert_eq!(account.queued(), footprint(len));
        drop(resumable);
        assert_eq!(account.queued(), 0);
    }

    #[test]
    fn kept_frames_are_bounded_by_bytes_and_shared_not_copied() {
        let mut queue = OutboundQueue::new(Wire::WebSocket, 100, 10_000);
        queue.keep_for_resend(100, 10);
        let frame = text("1234");
        for _ in 0..4 {
            queue.push(frame.clone()).unwrap();
            write_all(&mut queue);
        }
        assert_eq!(queue.kept_frames(), 1, "6 bytes each, 10 kept at most");
        assert_eq!(Rc::strong_count(&frame), 2);
    }
}
