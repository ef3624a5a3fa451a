//! `MessageDecoder` on a client byte stream cut into reads at fuzzer-chosen points: never
//! panics, and the cut points change nothing — the messages (and the error, if any) equal
//! those of decoding the whole stream in one read.
//!
//! Input: `[frame limit][message limit][cut count][cut lengths…][stream…]`. Limits stay
//! within what a config can set (TOML integers stop at `i64::MAX`). Like the session, no
//! read is decoded after a Close message (the decoder drops the rest of that read).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::frame::{Incoming, MessageDecoder, ProtocolError};

fn limit(byte: u8, unit: usize) -> usize {
    if byte == u8::MAX { i64::MAX as usize } else { usize::from(byte) * unit }
}

fn decode<'a>(
    limits: (usize, usize),
    reads: impl IntoIterator<Item = &'a [u8]>,
) -> (Vec<Incoming>, Result<(), ProtocolError>) {
    let mut decoder = MessageDecoder::new(limits.0, limits.1);
    let mut out = Vec::new();
    for read in reads {
        if let Err(e) = decoder.decode(read, &mut out) {
            return (out, Err(e));
        }
        if matches!(out.last(), Some(Incoming::Close(..))) {
            break;
        }
    }
    (out, Ok(()))
}

fuzz_target!(|data: &[u8]| {
    let [frame, message, cuts, rest @ ..] = data else { return };
    let limits = (limit(*frame, 8), limit(*message, 16));
    let cuts = usize::from(*cuts % 8).min(rest.len());
    let (lengths, stream) = rest.split_at(cuts);

    let mut reads = Vec::new();
    let mut tail = stream;
    for &len in lengths {
        let (read, after) = tail.split_at(usize::from(len).min(tail.len()));
        reads.push(read);
        tail = after;
    }
    reads.push(tail);

    let whole = decode(limits, [stream]);
    let split = decode(limits, reads);
    assert_eq!(whole, split, "result depends on how the stream was cut");
});
