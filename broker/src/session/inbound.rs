//! What a client sent, from bytes read to messages the gateway acts on, as a pure state
//! machine: bytes go in ([`Inbound::received`]), messages come out ([`Inbound::next`]) as
//! fast as the connection's inbound rate limit and its outstanding work allow. No socket
//! and no clock of its own: the session's I/O glue feeds it and passes `now`.
//!
//! Messages wait here while the connection has too much work outstanding (its replies then
//! back up into the client's socket instead of overflowing its queue) or while its rate
//! limit holds them back. While anything waits, the glue reads nothing more, so the
//! client's sends back up into TCP. A client held back without a break for
//! `limits.throttle_disconnect_secs` is over its limit (closed 1008). A protocol error
//! ends the connection once the messages before it have been handled.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::time::Instant;

use crate::disconnect::DisconnectReason;
use crate::frame::Incoming;
use crate::frame::MessageDecoder;
use crate::limits::InboundLimiter;
use crate::limits::config::Limits;
use crate::outbound::Wire;
use crate::transport::Decoder;
use crate::transport::webtransport::framing::FrameDecoder;

thread_local! {
    /// Messages one read completed, on their way to a connection's queue: one buffer per
    /// shard, not one per connection.
    static DECODED: RefCell<Vec<Incoming>> = const { RefCell::new(Vec::new()) };
}

/// One connection's inbound side.
pub(crate) struct Inbound {
    decoder: Decoder,
    waiting: VecDeque<Incoming>,
    /// The protocol error that ends the connection once `waiting` is handled.
    broken: Option<DisconnectReason>,
    /// The rate limit's buckets, while they are not full: an idle client's refill, and a
    /// full bucket is what a new one is, so an idle connection keeps none.
    limiter: Option<Box<InboundLimiter>>,
    /// When the message at the head of the queue may go.
    until: Option<Instant>,
    /// Since when the client has been held back without ever being caught up with.
    since: Option<Instant>,
}

/// What the connection does next with its client's messages.
#[derive(Debug, PartialEq)]
pub(crate) enum Next {
    /// Act on this message.
    Message(Incoming),
    /// The rate limit holds the next message back until `until` (a throttled message).
    HeldBack { until: Instant },
    /// The client stayed over its rate limit too long: end (1008).
    OverLimit,
    /// Nothing to do until more is read, work finishes, or the throttle lifts.
    Idle,
}

impl Inbound {
    pub(crate) fn new(decoder: Decoder) -> Self {
        Self {
            decoder,
            waiting: VecDeque::new(),
            broken: None,
            limiter: None,
            until: None,
            since: None,
        }
    }

    /// Bytes read from the socket: the messages they complete join the queue; a protocol
    /// error is kept until the messages before it have been handled.
    pub(crate) fn received(&mut self, bytes: &[u8]) {
        DECODED.with_borrow_mut(|decoded| {
            if let Err(error) = self.decoder.decode(bytes, decoded) {
                self.broken = Some(DisconnectReason::BadFrame(error));
            }
            self.waiting.extend(decoded.drain(..));
        });
    }

    /// The next thing to do at `now` under `limits` (`[limits]`: the inbound rates and
    /// `throttle_disconnect_secs`); `may_work` says whether the connection may start work
    /// for another message (few enough calls in flight, room for their replies).
    pub(crate) fn next(&mut self, now: Instant, may_work: bool, limits: &Limits) -> Next {
        if self.until.is_some() || !may_work {
            return Next::Idle;
        }
        if self.waiting.is_empty() && self.decoder.is_holding() {
            self.received(&[]);
        }
        let Some(message) = self.waiting.front() else {
            if self
                .limiter
                .as_mut()
                .is_some_and(|limiter| limiter.is_full(now))
            {
                self.limiter = None;
            }
            return Next::Idle;
        };
        let limiter = self.limiter.get_or_insert_with(|| {
            let rates = &limits.inbound;
            Box::new(InboundLimiter::new(rates.messages, rates.bytes, now))
        });
        if let Err(wait) = limiter.admit(cost(message), now) {
            let since = *self.since.get_or_insert(now);
            if now.saturating_duration_since(since) >= limits.throttle_disconnect {
                return Next::OverLimit;
            }
            let until = now + wait;
            self.until = Some(until);
            return Next::HeldBack { until };
        }
        match self.waiting.pop_front() {
            Some(message) => Next::Message(message),
            None => Next::Idle,
        }
    }

    /// Whether messages wait to be handled, decoded or still held by the decoder (the glue
    /// reads nothing more meanwhile).
    pub(crate) fn has_waiting(&self) -> bool {
        !self.waiting.is_empty() || self.decoder.is_holding()
    }

    /// The protocol error that ends the connection, once every message before it has been
    /// handled.
    pub(crate) fn take_broken(&mut self) -> Option<DisconnectReason> {
        if !self.has_waiting() {
            return self.broken.take();
        }
        None
    }

    /// Whether the last read left something to act on: messages, or a protocol error.
    pub(crate) fn has_news(&self) -> bool {
        self.has_waiting() || self.broken.is_some()
    }

    /// Whether a message that waited could go now, were there room for its work.
    pub(crate) fn is_ready(&self) -> bool {
        self.has_waiting() && self.until.is_none()
    }

    /// When the rate limit lets the message at the head go, while it holds it back.
    pub(crate) fn held_until(&self) -> Option<Instant> {
        self.until
    }

    /// The throttle's time has come: the head message may try again.
    pub(crate) fn throttle_elapsed(&mut self) {
        self.until = None;
    }

    /// Whether the client was held back and not seen caught up since: once everything
    /// read is handled, the glue checks whether the socket holds more.
    pub(crate) fn was_held_back(&self) -> bool {
        self.since.is_some()
    }

    /// The socket held nothing more: the client is within its limit again.
    pub(crate) fn caught_up(&mut self) {
        self.since = None;
    }
}

/// What a message costs against the inbound limits: one message and its payload bytes.
fn cost(message: &Incoming) -> usize {
    match message {
        Incoming::Text(text) => text.len(),
        Incoming::Binary(bytes) | Incoming::Ping(bytes) => bytes.len(),
        Incoming::Pong | Incoming::Close(..) => 0,
    }
}

/// A fresh decoder for `wire` with the configured limits; `inflating` if the client
/// negotiated permessage-deflate.
pub(crate) fn decoder_for(limits: &Limits, wire: Wire, inflating: bool) -> Decoder {
    match wire {
        Wire::WebSocket => {
            let decoder = MessageDecoder::new(limits.max_frame_bytes, limits.max_message_bytes);
            Decoder::WebSocket(if inflating {
                decoder.inflating()
            } else {
                decoder
            })
        }
        Wire::WebTransport => Decoder::WebTransport(FrameDecoder::new(limits.max_message_bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{self, MessageDecoder, Opcode};
    use std::time::Duration;

    use crate::limits::Rate;
    use crate::limits::config::{InboundRate, RawLimits};

    fn limits(messages: Option<Rate>, throttle_disconnect: Duration) -> Limits {
        let mut limits = RawLimits::default().validate().unwrap();
        limits.inbound = InboundRate {
            messages,
            bytes: None,
        };
        limits.throttle_disconnect = throttle_disconnect;
        limits
    }

    fn inbound() -> Inbound {
        Inbound::new(Decoder::WebSocket(MessageDecoder::new(1 << 16, 1 << 20)))
    }

    /// A client's text frame, masked as clients must.
    fn text(payload: &str) -> Vec<u8> {
        frame::encode_masked(true, Opcode::Text as u8, payload.as_bytes(), [1, 2, 3, 4])
    }

    fn message(next: Next) -> String {
        match next {
            Next::Message(Incoming::Text(text)) => text.to_string(),
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    #[test]
    fn messages_come_out_in_order_across_reads() {
        let now = Instant::now();
        let limits = limits(None, Duration::from_secs(10));
        let mut inbound = inbound();
        let bytes = [text("one"), text("two")].concat();
        let (first, rest) = bytes.split_at(4);
        inbound.received(first);
        assert!(!inbound.has_waiting());
        inbound.received(rest);
        assert_eq!(message(inbound.next(now, true, &limits)), "one");
        assert_eq!(message(inbound.next(now, true, &limits)), "two");
        assert_eq!(inbound.next(now, true, &limits), Next::Idle);
    }

    #[test]
    fn nothing_comes_out_while_the_connection_has_too_much_work() {
        let now = Instant::now();
        let limits = limits(None, Duration::from_secs(10));
        let mut inbound = inbound();
        inbound.received(&text("wait"));
        assert_eq!(inbound.next(now, false, &limits), Next::Idle);
        assert!(inbound.is_ready());
        assert_eq!(message(inbound.next(now, true, &limits)), "wait");
    }

    #[test]
    fn a_protocol_error_ends_the_connection_after_the_messages_before_it() {
        let now = Instant::now();
        let limits = limits(None, Duration::from_secs(10));
        let mut inbound = inbound();
        // An unmasked client frame breaks the protocol.
        let bytes = [text("kept"), frame::encode(Opcode::Text, b"bad").to_vec()].concat();
        inbound.received(&bytes);
        assert!(inbound.has_news());
        assert_eq!(inbound.take_broken(), None, "a message comes first");
        assert_eq!(message(inbound.next(now, true, &limits)), "kept");
        assert_eq!(inbound.next(now, true, &limits), Next::Idle);
        assert!(matches!(
            inbound.take_broken(),
            Some(DisconnectReason::BadFrame(_))
        ));
    }

    #[test]
    fn the_rate_limit_holds_messages_back_and_lets_them_go_in_time() {
        let now = Instant::now();
        let rate = Rate {
            per_sec: 10,
            burst: 1,
        };
        let limits = limits(Some(rate), Duration::from_secs(10));
        let mut inbound = inbound();
        inbound.received(&[text("a"), text("b")].concat());
        assert_eq!(message(inbound.next(now, true, &limits)), "a");
        let Next::HeldBack { until } = inbound.next(now, true, &limits) else {
            panic!("the second message is over the burst");
        };
        assert_eq!(until, now + Duration::from_millis(100));
        assert!(inbound.was_held_back() && !inbound.is_ready());
        // Until the throttle lifts, nothing comes out.
        assert_eq!(inbound.next(until, true, &limits), Next::Idle);
        inbound.throttle_elapsed();
        assert_eq!(message(inbound.next(until, true, &limits)), "b");
        // The socket held nothing more: caught up.
        inbound.caught_up();
        assert!(!inbound.was_held_back());
    }

    #[test]
    fn an_idle_client_keeps_no_rate_limit_state() {
        let now = Instant::now();
        let rate = Rate {
            per_sec: 10,
            burst: 2,
        };
        let limits = limits(Some(rate), Duration::from_secs(10));
        let mut inbound = inbound();
        inbound.received(&text("a"));
        assert_eq!(message(inbound.next(now, true, &limits)), "a");
        assert_eq!(inbound.next(now, true, &limits), Next::Idle);
        assert!(inbound.limiter.is_some(), "its bucket is not full yet");
        let refilled = now + Duration::from_secs(1);
        assert_eq!(inbound.next(refilled, true, &limits), Next::Idle);
        assert!(inbound.limiter.is_none());
    }

    #[test]
    fn a_client_held_back_too_long_without_a_break_is_over_its_limit() {
        let start = Instant::now();
        let rate = Rate {
            per_sec: 1,
            burst: 1,
        };
        let limits = limits(Some(rate), Duration::from_secs(2));
        let mut inbound = inbound();
        inbound.received(&[text("a"), text("b"), text("c"), text("d")].concat());
        let mut now = start;
        let mut handled = 0;
        loop {
            match inbound.next(now, true, &limits) {
                Next::Message(_) => handled += 1,
                Next::HeldBack { .. } => {
                    // Not quite in time: the client stays behind.
                    now += Duration::from_millis(900);
                    inbound.throttle_elapsed();
                }
                Next::OverLimit => break,
                Next::Idle => panic!("messages wait"),
            }
        }
        assert!(now - start >= Duration::from_secs(2));
        assert!(handled >= 2, "handled {handled}");
    }

    #[test]
    fn a_client_that_caught_up_starts_a_new_count() {
        let start = Instant::now();
        let rate = Rate {
            per_sec: 1,
            burst: 1,
        };
        let limits = limits(Some(rate), Duration::from_secs(2));
        let mut inbound = inbound();
        let mut now = start;
        for _ in 0..5 {
            inbound.received(&[text("a"), text("b")].concat());
            assert!(matches!(inbound.next(now, true, &limits), Next::Message(_)));
            assert!(matches!(
                inbound.next(now, true, &limits),
                Next::HeldBack { .. }
            ));
            now += Duration::from_secs(1);
            inbound.throttle_elapsed();
            assert!(matches!(inbound.next(now, true, &limits), Next::Message(_)));
            inbound.caught_up();
            now += Duration::from_secs(1);
        }
    }
}
