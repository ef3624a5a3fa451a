//! A connection's bounded queue of encoded frames waiting to be written.
//!
//! Frames are [`SharedFrame`]s: one encoded frame shared by every recipient of a
//! broadcast on a shard through a non-atomic `Rc` (a queue never leaves its shard, so no
//! recipient pays for an atomic refcount). The writer drains the queue with vectored
//! writes, so whatever piled up while the socket was busy leaves in one system call.
//! Overflow rule: a push that would exceed either bound is refused, and the caller
//! disconnects the connection as a slow consumer.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::rc::Rc;

use bytes::Bytes;

/// An encoded frame as queued: shared within one shard.
pub type SharedFrame = Rc<Bytes>;

/// A queued frame and how much of it the socket has taken.
#[derive(Debug)]
struct Queued {
    frame: SharedFrame,
    written: usize,
}

impl Queued {
    fn remaining(&self) -> &[u8] {
        &self.frame[self.written..]
    }
}

/// Most frames handed to one vectored write (Linux accepts up to 1024 iovecs).
pub const MAX_IOVECS: usize = 64;

/// The push would exceed the queue's bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

#[derive(Debug)]
pub struct OutboundQueue {
    frames: VecDeque<Queued>,
    queued_bytes: usize,
    max_frames: usize,
    max_bytes: usize,
}

impl OutboundQueue {
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        Self {
            frames: VecDeque::new(),
            queued_bytes: 0,
            max_frames,
            max_bytes,
        }
    }

    /// Queues `frame`, or refuses it if a bound would be exceeded.
    pub fn push(&mut self, frame: SharedFrame) -> Result<(), QueueFull> {
        if self.frames.len() >= self.max_frames || self.queued_bytes + frame.len() > self.max_bytes
        {
            return Err(QueueFull);
        }
        self.push_unbounded(frame);
        Ok(())
    }

    /// Queues a frame regardless of the bounds (a close frame must always get out).
    pub fn push_unbounded(&mut self, frame: SharedFrame) {
        self.queued_bytes += frame.len();
        self.frames.push_back(Queued { frame, written: 0 });
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
            *slot = IoSlice::new(queued.remaining());
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
            let remaining = front.remaining().len();
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
        Rc::new(Bytes::from_static(bytes))
    }

    #[test]
    fn bounds_refuse_overflow() {
        let mut queue = OutboundQueue::new(2, 10);
        assert!(queue.push(frame(b"aaaa")).is_ok());
        assert!(queue.push(frame(b"bbbbbbb")).is_err());
        assert!(queue.push(frame(b"bb")).is_ok());
        assert_eq!(queue.push(frame(b"c")), Err(QueueFull));
        queue.push_unbounded(frame(b"close"));
        assert_eq!(queue.queued_bytes(), 11);
    }

    #[test]
    fn partial_writes_keep_the_tail() {
        let mut queue = OutboundQueue::new(10, 100);
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
}
