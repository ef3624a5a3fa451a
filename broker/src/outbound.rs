//! A connection's bounded queue of messages waiting to be written.
//!
//! Frames are [`SharedFrame`]s: one [`Message`] shared by every recipient of a broadcast
//! on a shard through a non-atomic `Rc` (a queue never leaves its shard, so no recipient
//! pays for an atomic refcount). The first recipient on each transport encodes it for that
//! transport and the others share the encoding: once per transport, never once per member. The writer drains the queue with vectored
//! writes, so whatever piled up while the socket was busy leaves in one system call.
//! Overflow rule: a push that would exceed either bound is refused, and the caller
//! disconnects the connection as a slow consumer.
//!
//! A resumable connection's queue also numbers its data frames and keeps the last ones it
//! wrote (bounded by frames and bytes; a shared frame costs a pointer): a client that comes
//! back saying how many it received gets the rest again, in order (see [`crate::resume`]).

use std::collections::VecDeque;
use std::io::IoSlice;
use std::rc::Rc;

use crate::limits::overload::{Charge, ShardAccount, footprint};
use crate::message::Message;

mod frame;

pub use frame::{Encoding, OutboundFrame, SharedFrame, Wire, shared};

/// A queued frame and how much of it the socket has taken.
#[derive(Debug)]
struct Queued {
    frame: SharedFrame,
    written: usize,
    /// Its number among the data frames, on a resumable connection.
    number: Option<u64>,
    /// Its conflation key (a conflating room's message with a key): a later message with
    /// the same key takes its place while it is not begun.
    key: Option<u64>,
}

/// What became of a frame offered to [`OutboundQueue::push_keyed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued at the back.
    Queued,
    /// It took the place of a queued frame with the same key (latest wins, in place).
    Replaced,
}

impl Queued {
    fn remaining(&self, encoding: Encoding) -> &[u8] {
        &self.frame.encoded(encoding)[self.written..]
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
    /// permessage-deflate, when the client negotiated it.
    deflate: Option<crate::compression::Deflate>,
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
            deflate: None,
            frames: VecDeque::new(),
            queued_bytes: 0,
            max_frames,
            max_bytes,
            resend: None,
            account: None,
        }
    }

    /// Compresses what it sends (permessage-deflate was negotiated), if `deflate`.
    pub fn deflating(mut self, deflate: Option<crate::compression::Deflate>) -> Self {
        self.set_deflate(deflate);
        self
    }

    fn set_deflate(&mut self, deflate: Option<crate::compression::Deflate>) {
        self.deflate = deflate.filter(|_| self.wire == Wire::WebSocket);
    }

    /// [`OutboundQueue::rewind`] for a resumed session's new socket, compressing from now
    /// on as it agreed (every frame is counted and started again in that encoding).
    pub fn rewind_onto(
        &mut self,
        deflate: Option<crate::compression::Deflate>,
        received: u64,
    ) -> Result<usize, RewindError> {
        self.set_deflate(deflate);
        self.rewind(received)
    }

    /// How its frames are encoded.
    pub fn encoding(&self) -> Encoding {
        Encoding {
            wire: self.wire,
            deflate: self.deflate,
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
            // One size for every queue, whatever its encoding: what is charged here is
            // what the last queue to let go refunds.
            let own = footprint(frame.message.payload.len());
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
            account.refund(footprint(frame.message.payload.len()));
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
                key: None,
            })
            .collect();
        self.queued_bytes = self
            .frames
            .iter()
            .map(|q| q.frame.encoded(self.encoding()).len())
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
            // Uncompressed: the frames must fit however the client comes back.
            .fold((0, 0), |(count, bytes), (_, frame)| {
                (count + 1, bytes + frame.plain_len(self.wire))
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

    /// Empties the queue, returning its messages in order (a connection moving to another
    /// node takes them along).
    pub fn take_frames(&mut self) -> Vec<Message> {
        for queued in &self.frames {
            self.leave(&queued.frame);
        }
        self.queued_bytes = 0;
        std::mem::take(&mut self.frames)
            .into_iter()
            .map(|q| q.frame.message.clone())
            .collect()
    }

    /// Puts an uncounted frame before everything queued (the answer to a resume).
    pub fn push_front(&mut self, frame: SharedFrame) {
        let _ = self.enter(&frame, false);
        self.queued_bytes += frame.encoded(self.encoding()).len();
        self.frames.push_front(Queued {
            frame,
            written: 0,
            number: None,
            key: None,
        });
    }

    /// Queues `frame`, or refuses it if its bound, or the gateway's budget, would be
    /// exceeded.
    pub fn push(&mut self, frame: SharedFrame) -> Result<(), PushError> {
        let len = frame.encoded(self.encoding()).len();
        if self.frames.len() >= self.max_frames || self.queued_bytes + len > self.max_bytes {
            return Err(PushError::Full);
        }
        self.enter(&frame, true)?;
        self.queued_bytes += len;
        self.append(frame);
        Ok(())
    }

    /// Queues `frame` with conflation key `key`: if a frame with the same key is queued and
    /// not begun, `frame` takes its place (keeping its place in line, and its number on a
    /// resumable connection), whatever the bounds; otherwise as [`OutboundQueue::push`].
    pub fn push_keyed(&mut self, frame: SharedFrame, key: u64) -> Result<Pushed, PushError> {
        let begun = usize::from(self.frames.front().is_some_and(|q| q.written > 0));
        let same = (self.frames.iter().skip(begun)).position(|q| q.key == Some(key));
        let Some(index) = same.map(|index| index + begun) else {
            self.push(frame)?;
            if let Some(back) = self.frames.back_mut() {
                back.key = Some(key);
            }
            return Ok(Pushed::Queued);
        };
        let _ = self.enter(&frame, false);
        let new_len = frame.encoded(self.encoding()).len();
        let old = std::mem::replace(&mut self.frames[index].frame, frame);
        self.queued_bytes = self.queued_bytes - old.encoded(self.encoding()).len() + new_len;
        self.leave(&old);
        Ok(Pushed::Replaced)
    }

    /// Queues a frame regardless of the bounds (a close frame must always get out).
    pub fn push_unbounded(&mut self, frame: SharedFrame) {
        let _ = self.enter(&frame, false);
        self.queued_bytes += frame.encoded(self.encoding()).len();
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
            key: None,
        });
    }

    /// Drops every frame not begun (a connection cut while the gateway is out of memory
    /// for queues): one partly written stays, so the stream stays whole for a close frame.
    pub fn shed_unstarted(&mut self) {
        let keep = usize::from(self.frames.front().is_some_and(|q| q.written > 0));
        let dropped: Vec<Queued> = self.frames.drain(keep..).collect();
        let bytes: usize = dropped
            .iter()
            .map(|q| q.frame.encoded(self.encoding()).len())
            .sum();
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
            *slot = IoSlice::new(queued.remaining(self.encoding()));
            filled += 1;
        }
        filled
    }

    /// Drops `written` bytes from the front (a partial frame keeps its tail).
    pub fn consume(&mut self, mut written: usize) {
        let encoding = self.encoding();
        self.queued_bytes -= written.min(self.queued_bytes);
        while written > 0 {
            let Some(front) = self.frames.front_mut() else {
                break;
            };
            let remaining = front.remaining(encoding).len();
            if written >= remaining {
                written -= remaining;
                let Some(done) = self.frames.pop_front() else {
                    break;
                };
                self.leave(&done.frame);
                if let (Some(resend), Some(number)) = (self.resend.as_mut(), done.number) {
                    resend.remember(done.frame, number, encoding.wire);
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
    /// Counted uncompressed: what it holds, and what it would send again.
    fn remember(&mut self, frame: SharedFrame, number: u64, wire: Wire) {
        if self.written.is_empty() {
            self.first_written = number;
        }
        self.written_bytes += frame.plain_len(wire);
        self.written.push_back(frame);
        while self.written.len() > self.max_frames || self.written_bytes > self.max_bytes {
            let Some(dropped) = self.written.pop_front() else {
                break;
            };
            self.written_bytes -= dropped.plain_len(wire);
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
mod tests;
