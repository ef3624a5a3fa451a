use super::*;
use crate::message::Message;

/// A binary message: its WebSocket frame is the payload and 2 bytes of header.
fn frame(payload: &'static [u8]) -> SharedFrame {
    shared(Message::binary(payload))
}

#[test]
fn bounds_refuse_overflow() {
    let mut queue = OutboundQueue::new(Wire::WebSocket, 2, 10);
    assert!(queue.push(frame(b"aaaa")).is_ok());
    assert!(queue.push(frame(b"bbbbbbb")).is_err());
    assert!(queue.push(frame(b"bb")).is_ok());
    assert_eq!(queue.push(frame(b"c")), Err(PushError::Full));
    queue.push_unbounded(frame(b"close"));
    assert_eq!(queue.queued_bytes(), 6 + 4 + 7);
}

#[test]
fn partial_writes_keep_the_tail() {
    let mut queue = OutboundQueue::new(Wire::WebSocket, 10, 100);
    queue.push(frame(b"hello")).unwrap();
    queue.push(frame(b"world")).unwrap();
    queue.consume(7 + 4); // `hello` and the next frame's header and `wo`
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
    let frame = shared(Message::text("hi"));
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
    shared(Message::text(body.to_owned()))
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
    queue.push(shared(Message::close(1000, ""))).unwrap();
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
    let counted = || OutboundQueue::new(Wire::WebSocket, 10, 10_000).counted_in(account.clone());
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

#[test]
fn a_keyed_frame_takes_the_place_of_the_queued_one_with_its_key() {
    let mut queue = OutboundQueue::new(Wire::WebSocket, 3, 1 << 20);
    let frame = |text: &str| shared(Message::text(text.to_owned()));
    let texts = |queue: &OutboundQueue| -> Vec<String> {
        let mut slices = [IoSlice::new(&[]); 8];
        let filled = queue.io_slices(&mut slices);
        (slices[..filled].iter())
            .map(|s| String::from_utf8_lossy(&s[2..]).into_owned())
            .collect()
    };
    assert_eq!(queue.push_keyed(frame("a1"), 1), Ok(Pushed::Queued));
    assert_eq!(queue.push_keyed(frame("b1"), 2), Ok(Pushed::Queued));
    queue.push(frame("plain")).unwrap();
    // Full, but a key already queued still goes: in place, latest wins.
    assert_eq!(queue.push_keyed(frame("a2"), 1), Ok(Pushed::Replaced));
    assert_eq!(texts(&queue), vec!["a2", "b1", "plain"]);
    assert_eq!(queue.push_keyed(frame("c1"), 3), Err(PushError::Full));
    // A frame the socket has begun is not replaced: the new one would queue behind it.
    queue.consume(1);
    assert_eq!(queue.push_keyed(frame("a3"), 1), Err(PushError::Full));
    let before = queue.queued_bytes();
    assert_eq!(queue.push_keyed(frame("b22"), 2), Ok(Pushed::Replaced));
    assert_eq!(
        queue.queued_bytes(),
        before + 1,
        "bytes follow the new frame"
    );
    assert_eq!(texts(&queue)[1..], ["b22", "plain"]);
}
