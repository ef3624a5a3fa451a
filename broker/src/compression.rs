//! permessage-deflate (RFC 7692), the way a fan-out gateway can afford it: with no context
//! kept between messages in either direction (`server_no_context_takeover`, and
//! `client_no_context_takeover`, which the server may ask for in its answer), so a message
//! is compressed once and the same bytes serve every member that negotiated it, and a
//! connection holds no zlib state between messages. Small messages go uncompressed.
//! Inflating a client's message stops past a cap: a decompression bomb costs its cap, no
//! more. Pure code.

use std::io::Write;

use flate2::{Compression, Decompress, FlushDecompress, Status};

/// What the server answers to an offer it takes.
pub const ANSWER: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// The block end every message's deflate stream ends with, left off on the wire.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// How messages are compressed: at `level` (1–9), when at least `min_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    pub level: u32,
    pub min_bytes: usize,
}

/// Whether one of the client's `Sec-WebSocket-Extensions` offers is a permessage-deflate
/// this server can take: one whose parameters are known, each given once, and that lets
/// the server use its full window (this deflate always uses 2^15; an offer that limits
/// `server_max_window_bits` below that is passed over).
pub fn accepts(offers: &str) -> bool {
    offers.split(',').any(|offer| {
        let mut parts = offer.split(';').map(str::trim);
        parts.next() == Some("permessage-deflate") && takes_parameters(parts)
    })
}

fn takes_parameters<'a>(parameters: impl Iterator<Item = &'a str>) -> bool {
    let mut seen: Vec<&str> = Vec::new();
    for parameter in parameters {
        let (name, value) = match parameter.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (parameter, None),
        };
        if seen.contains(&name) {
            return false;
        }
        seen.push(name);
        let bits = |value: Option<&str>| value.and_then(|v| v.parse::<u8>().ok());
        let fine = match name {
            "server_no_context_takeover" | "client_no_context_takeover" => value.is_none(),
            "server_max_window_bits" => bits(value) == Some(15),
            "client_max_window_bits" => {
                value.is_none() || bits(value).is_some_and(|b| (8..=15).contains(&b))
            }
            _ => false,
        };
        if !fine {
            return false;
        }
    }
    true
}

/// `payload` as one message's deflate data (the tail left off).
pub fn compress(payload: &[u8], level: u32) -> Vec<u8> {
    let level = Compression::new(level.clamp(1, 9));
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::with_capacity(payload.len() / 2 + 64), level);
    // A sync flush (what `flush` does) ends the data on a byte boundary with the tail;
    // no final block: each message is a stream of its own on the other side too.
    let written = encoder.write_all(payload).and_then(|()| encoder.flush());
    let mut out = std::mem::take(encoder.get_mut());
    if written.is_err() {
        out.clear();
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    out
}

/// Why a message could not be inflated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    #[error("inflates past {0} bytes")]
    TooLarge(usize),
    #[error("not deflate data")]
    Corrupt,
}

/// A message's deflate data, inflated; refused as soon as it passes `cap` bytes.
pub fn inflate(data: &[u8], cap: usize) -> Result<Vec<u8>, InflateError> {
    let mut decompress = Decompress::new(false);
    let mut out = Vec::with_capacity((data.len() * 4).clamp(64, cap.max(64)));
    let mut input = Vec::with_capacity(data.len() + TAIL.len());
    input.extend_from_slice(data);
    input.extend_from_slice(&TAIL);
    loop {
        if out.capacity() - out.len() < 1024 {
            out.reserve(out.capacity().max(1024));
        }
        let (read, written) = (decompress.total_in(), decompress.total_out());
        let status = decompress
            .decompress_vec(&input[read as usize..], &mut out, FlushDecompress::Sync)
            .map_err(|_| InflateError::Corrupt)?;
        if out.len() > cap {
            return Err(InflateError::TooLarge(cap));
        }
        let all_in = decompress.total_in() as usize == input.len();
        let quiet = decompress.total_in() == read && decompress.total_out() == written;
        // Done at the stream's end, or once every byte is in and a call gives nothing more.
        if status == Status::StreamEnd || (all_in && quiet) {
            return Ok(out);
        }
        if quiet && out.len() < out.capacity() {
            return Err(InflateError::Corrupt);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_are_taken_or_passed_over() {
        assert!(accepts("permessage-deflate"));
        assert!(accepts("permessage-deflate; client_max_window_bits"));
        assert!(accepts(
            "x-webkit-deflate-frame, permessage-deflate; server_no_context_takeover"
        ));
        assert!(accepts(
            "permessage-deflate; server_max_window_bits=10, permessage-deflate"
        ));
        assert!(!accepts("permessage-deflate; server_max_window_bits=10"));
        assert!(!accepts("permessage-deflate; client_max_window_bits=7"));
        assert!(!accepts("permessage-deflate; unknown"));
        assert!(!accepts(
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover"
        ));
        assert!(!accepts("x-other"));
    }

    #[test]
    fn a_message_round_trips_and_shrinks() {
        let text = r#"{"symbol":"BTC-USD","bid":64123.5,"ask":64124.0}"#.repeat(20);
        let packed = compress(text.as_bytes(), 6);
        assert!(
            packed.len() < text.len() / 4,
            "{} of {}",
            packed.len(),
            text.len()
        );
        assert_eq!(inflate(&packed, 1 << 20).unwrap(), text.as_bytes());
        assert_eq!(inflate(&compress(b"", 6), 10).unwrap(), b"");
    }

    #[test]
    fn inflates_what_zlib_deflates() {
        // Python's zlib, raw deflate, sync flush, the tail left off.
        let packed = [
            0xaa, 0x63, 0xa8, 0xaf, 0xaf, 0x67, 0x68, 0x68, 0x68, 0x60, 0x68, 0x6c, 0x6c, 0x64,
            0x68, 0x6a, 0x02, 0x00,
        ];
        let raw = [
            0x7e, 0x00, 0x7f, 0x7f, 0x7f, 0x00, 0x80, 0x80, 0x80, 0x00, 0x81, 0x81, 0x81, 0x00,
            0x82, 0x82,
        ];
        assert_eq!(inflate(&packed, 100).unwrap(), raw);
    }

    #[test]
    fn a_bomb_stops_at_its_cap() {
        let zeros = vec![0u8; 16 << 20];
        let bomb = compress(&zeros, 9);
        assert!(bomb.len() < 64 << 10, "{}", bomb.len());
        assert_eq!(
            inflate(&bomb, 128 << 10),
            Err(InflateError::TooLarge(128 << 10))
        );
        assert_eq!(inflate(b"\xff\xff\xff", 100), Err(InflateError::Corrupt));
    }
}
#[cfg(test)]
mod tmp_tests {
    #[test]
    fn m77() {
        let packed = std::fs::read("/tmp/m77.bin").unwrap();
        let raw = std::fs::read("/tmp/m77.raw").unwrap();
        let got = super::inflate(&packed, 1 << 24).unwrap();
        assert_eq!(got.len(), raw.len(), "inflate");
        let ours = super::compress(&raw, 6);
        std::fs::write("/tmp/ours.bin", &ours).unwrap();
        let back = super::inflate(&ours, 1 << 24).unwrap();
        assert_eq!(back.len(), raw.len(), "compress");
    }
}
