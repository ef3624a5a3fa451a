//! permessage-deflate (RFC 7692), the way a fan-out gateway can afford it: with no context
//! kept between messages in either direction (`server_no_context_takeover`, and
//! `client_no_context_takeover`, which the server may ask for in its answer), so a message
//! is compressed once and the same bytes serve every member that negotiated it, and a
//! connection holds no zlib state between messages. Small messages go uncompressed.
//! Inflating a client's message stops past a cap: a decompression bomb costs its cap, no
//! more. Pure code.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The block end every message's deflate stream ends with, left off on the wire.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The window every client can inflate, and the one the server uses unless asked for less.
pub const FULL_WINDOW: u8 = 15;

/// The smallest window zlib compresses raw deflate with: a client asking for 2^8 is passed over.
pub const SMALLEST_WINDOW: u8 = 9;

/// How messages are compressed: at `level` (1–9), when at least `min_bytes`, with an LZ77
/// window of 2^`window_bits` bytes (what the client's offer allowed, 9–15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    pub level: u32,
    pub min_bytes: usize,
    pub window_bits: u8,
    /// The offer named `server_max_window_bits`: the answer must name it back.
    window_named: bool,
}

impl Deflate {
    /// The gateway's settings, for a client that left the window to the server.
    pub fn new(level: u32, min_bytes: usize) -> Self {
        Self {
            level,
            min_bytes,
            window_bits: FULL_WINDOW,
            window_named: false,
        }
    }

    /// The first of the client's `Sec-WebSocket-Extensions` offers this server can take,
    /// as these settings with its window; `None` if there is none.
    pub fn negotiate(self, offers: &str) -> Option<Self> {
        offers.split(',').find_map(|offer| {
            let mut parts = offer.split(';').map(str::trim);
            if parts.next() != Some("permessage-deflate") {
                return None;
            }
            let window = window_for(parts)?;
            Some(Self {
                window_bits: window.unwrap_or(FULL_WINDOW),
                window_named: window.is_some(),
                ..self
            })
        })
    }

    /// The `Sec-WebSocket-Extensions` answer to the offer taken: no context takeover either
    /// way (the server may ask that of the client in its answer), and the window if the
    /// client named one.
    pub fn answer(&self) -> String {
        let mut answer = String::from(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        );
        if self.window_named {
            answer.push_str(&format!("; server_max_window_bits={}", self.window_bits));
        }
        answer
    }
}

/// Whether an offer's parameters are each known and given once (`None` if not), and the
/// server window they name, if they name one.
fn window_for<'a>(parameters: impl Iterator<Item = &'a str>) -> Option<Option<u8>> {
    let mut seen: Vec<&str> = Vec::new();
    let mut window_bits = None;
    for parameter in parameters {
        let (name, value) = match parameter.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (parameter, None),
        };
        if seen.contains(&name) {
            return None;
        }
        seen.push(name);
        let bits = value.and_then(|v| v.parse::<u8>().ok());
        match name {
            "server_no_context_takeover" | "client_no_context_takeover" if value.is_none() => {}
            "server_max_window_bits"
                if bits.is_some_and(|b| (SMALLEST_WINDOW..=FULL_WINDOW).contains(&b)) =>
            {
                window_bits = bits;
            }
            "client_max_window_bits"
                if value.is_none() || bits.is_some_and(|b| (8..=15).contains(&b)) => {}
            _ => return None,
        }
    }
    Some(window_bits)
}

/// `payload` as one message's deflate data (the tail left off), with a window of
/// 2^`window_bits` bytes; `None` if zlib fails (the message then goes uncompressed).
pub fn compress(payload: &[u8], level: u32, window_bits: u8) -> Option<Vec<u8>> {
    let settings = (
        level.clamp(1, 9),
        window_bits.clamp(SMALLEST_WINDOW, FULL_WINDOW),
    );
    COMPRESSORS.with_borrow_mut(|compressors| {
        let at = match compressors.iter().position(|(made, _)| *made == settings) {
            Some(at) => at,
            None => {
                let (level, window_bits) = settings;
                let level = Compression::new(level);
                let made = Compress::new_with_window_bits(level, false, window_bits);
                compressors.push((settings, made));
                compressors.len() - 1
            }
        };
        let deflate = &mut compressors[at].1;
        // Nothing of the last message is kept: no context takeover.
        deflate.reset();
        deflate_once(deflate, payload)
    })
}

thread_local! {
    /// One deflate state per level and window on each thread that compresses (the shards),
    /// reset between messages: making one allocates and clears about 270 KiB, which is
    /// half the cost of compressing a short message.
    static COMPRESSORS: RefCell<Vec<((u32, u8), Compress)>> = const { RefCell::new(Vec::new()) };
}

fn deflate_once(deflate: &mut Compress, payload: &[u8]) -> Option<Vec<u8>> {
    // Room for stored blocks (5 bytes per 16 KiB) and the tail, so one call usually does.
    let mut out = Vec::with_capacity(payload.len() + payload.len() / 16_384 * 5 + 64);
    loop {
        let read = deflate.total_in() as usize;
        // A sync flush ends the data on a byte boundary with the tail and no final block:
        // each message is a stream of its own on the other side too.
        let flushed = deflate.compress_vec(&payload[read..], &mut out, FlushCompress::Sync);
        let all_in = deflate.total_in() as usize == payload.len();
        // The flush is complete only when the call left output room unused.
        flushed.ok()?;
        if all_in && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(1024));
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    Some(out)
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
            // The buffer grew by doubling: give back what a long-lived message would waste.
            if out.capacity() - out.len() > out.len() / 4 {
                out.shrink_to_fit();
            }
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

    fn window(offers: &str) -> Option<u8> {
        Some(Deflate::new(6, 256).negotiate(offers)?.window_bits)
    }

    #[test]
    fn offers_are_taken_or_passed_over() {
        assert_eq!(window("permessage-deflate"), Some(15));
        assert_eq!(
            window("permessage-deflate; client_max_window_bits"),
            Some(15)
        );
        assert_eq!(
            window("permessage-deflate; client_max_window_bits=9"),
            Some(15)
        );
        assert_eq!(
            window("x-webkit-deflate-frame, permessage-deflate; server_no_context_takeover"),
            Some(15)
        );
        assert_eq!(
            window("permessage-deflate; server_max_window_bits=10"),
            Some(10)
        );
        assert_eq!(
            window("permessage-deflate; server_max_window_bits=8, permessage-deflate"),
            Some(15)
        );
        assert_eq!(window("permessage-deflate; server_max_window_bits=8"), None);
        assert_eq!(window("permessage-deflate; server_max_window_bits"), None);
        assert_eq!(window("permessage-deflate; client_max_window_bits=7"), None);
        assert_eq!(window("permessage-deflate; unknown"), None);
        assert_eq!(
            window("permessage-deflate; server_no_context_takeover; server_no_context_takeover"),
            None
        );
        assert_eq!(window("x-other"), None);
    }

    #[test]
    fn the_answer_names_a_limited_window() {
        let full = Deflate::new(6, 256);
        assert_eq!(
            full.answer(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        let narrow = full.negotiate("permessage-deflate; server_max_window_bits=10");
        assert!(
            narrow
                .unwrap()
                .answer()
                .ends_with("; server_max_window_bits=10")
        );
    }

    #[test]
    fn a_narrow_window_reaches_no_further_back() {
        // 2 KiB apart: a 2^10 window cannot see the repeat, a 2^15 one can.
        let mut state = 7_u32;
        let block: Vec<u8> = (0..2048)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (state >> 16) as u8
            })
            .collect();
        let payload = [block.clone(), block].concat();
        let (narrow, full) = (
            compress(&payload, 6, 10).unwrap(),
            compress(&payload, 6, 15).unwrap(),
        );
        assert!(
            narrow.len() > 4000 && full.len() < 2200,
            "{} {}",
            narrow.len(),
            full.len()
        );
        assert_eq!(inflate(&narrow, 1 << 20).unwrap(), payload);
    }

    #[test]
    fn a_message_round_trips_and_shrinks() {
        let text = r#"{"symbol":"BTC-USD","bid":64123.5,"ask":64124.0}"#.repeat(20);
        let packed = compress(text.as_bytes(), 6, 15).unwrap();
        assert!(
            packed.len() < text.len() / 4,
            "{} of {}",
            packed.len(),
            text.len()
        );
        assert_eq!(inflate(&packed, 1 << 20).unwrap(), text.as_bytes());
        assert_eq!(inflate(&compress(b"", 6, 15).unwrap(), 10).unwrap(), b"");
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
    fn large_messages_keep_every_byte() {
        // Text-like bytes, partly repetitive, the shape that once lost its last block.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let payload: Vec<u8> = (0..(64 << 10) + 77)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let alphabet = b"abcdefgh{}\":, 0123";
                alphabet[(state % alphabet.len() as u64) as usize]
            })
            .collect();
        for length in [1, 255, 256, 16_384, 32_768, 65_536, payload.len()] {
            for (level, window) in [(1, 15), (6, 15), (9, 15), (6, 9)] {
                let packed = compress(&payload[..length], level, window).unwrap();
                let back = inflate(&packed, 1 << 20).unwrap();
                assert!(
                    back == payload[..length],
                    "{length} bytes, {level}, {window}"
                );
            }
        }
    }

    #[test]
    fn a_bomb_stops_at_its_cap() {
        let zeros = vec![0u8; 16 << 20];
        let bomb = compress(&zeros, 9, 15).unwrap();
        assert!(bomb.len() < 64 << 10, "{}", bomb.len());
        assert_eq!(
            inflate(&bomb, 128 << 10),
            Err(InflateError::TooLarge(128 << 10))
        );
        assert_eq!(inflate(b"\xff\xff\xff", 100), Err(InflateError::Corrupt));
    }
}
