//! What follows a payload's stamp. Compression results depend entirely on the bytes, so a
//! measurement of permessage-deflate needs bodies shaped like real traffic: quote records
//! as market data feeds publish them, and chat lines. `pad` (one letter repeated) is the
//! default for everything else: it compresses absurdly well and says nothing about that.

/// The shape of a payload's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Body {
    Pad,
    Ticker,
    Chat,
}

const SYMBOLS: [&str; 10] = [
    "BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "BNBUSDT", "ADAUSDT", "DOGEUSDT", "AVAXUSDT",
    "LINKUSDT", "DOTUSDT",
];

const WORDS: [&str; 48] = [
    "the", "a", "we", "you", "it", "is", "was", "on", "in", "for", "to", "and", "but", "so",
    "just", "now", "later", "meeting", "deploy", "build", "test", "green", "red", "again", "lunch",
    "today", "tomorrow", "coffee", "anyone", "seen", "this", "that", "works", "broke", "fixed",
    "ship", "review", "please", "thanks", "sure", "ok", "ready", "room", "message", "latency",
    "numbers", "look", "great",
];

/// Appends `len` bytes of `body` for message `seq` to `text`.
pub(crate) fn append(text: &mut String, body: Body, seq: usize, len: usize) {
    let end = text.len() + len;
    let mut random = Random((seq as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    while text.len() < end {
        match body {
            Body::Pad => text.extend(std::iter::repeat_n('x', end - text.len())),
            Body::Ticker => ticker(text, seq, &mut random),
            Body::Chat => chat(text, seq, &mut random),
        }
    }
    text.truncate(end);
}

/// One 24-hour ticker record, as an exchange's public stream sends it (about 390 bytes).
fn ticker(text: &mut String, seq: usize, random: &mut Random) {
    use std::fmt::Write;
    let symbol = SYMBOLS[seq % SYMBOLS.len()];
    let last = 20_000.0 + random.below(50_000) as f64 + random.below(100) as f64 / 100.0;
    let time = 1_765_000_000_000 + seq as u64 * 10;
    let _ = write!(
        text,
        r#"{{"e":"24hrTicker","E":{time},"s":"{symbol}","p":"{:.8}","P":"{:.3}","w":"{:.8}","c":"{last:.8}","Q":"{:.8}","b":"{:.8}","B":"{:.8}","a":"{:.8}","A":"{:.8}","o":"{:.8}","h":"{:.8}","l":"{:.8}","v":"{:.8}","q":"{:.8}","O":{},"C":{time},"F":{},"L":{},"n":{}}}"#,
        random.below(2000) as f64 / 10.0 - 100.0,
        random.below(400) as f64 / 100.0 - 2.0,
        last * 0.998,
        random.below(10_000) as f64 / 1000.0,
        last - 0.01,
        random.below(5000) as f64 / 1000.0,
        last + 0.01,
        random.below(5000) as f64 / 1000.0,
        last * 1.003,
        last * 1.02,
        last * 0.97,
        random.below(100_000_000) as f64 / 1000.0,
        random.below(1_000_000_000) as f64 * 10.0,
        time - 86_400_000,
        300_000_000 + seq * 7,
        300_100_000 + seq * 7,
        100_000 + random.below(5000),
    );
}

/// One chat line: a user, a room and a sentence of a few common words.
fn chat(text: &mut String, seq: usize, random: &mut Random) {
    use std::fmt::Write;
    let _ = write!(
        text,
        r#"{{"type":"message","room":"lobby","user":"user{}","ts":{},"text":""#,
        random.below(500),
        1_765_000_000_000 + seq as u64 * 10
    );
    for word in 0..8 + random.below(14) {
        if word > 0 {
            text.push(' ');
        }
        text.push_str(WORDS[random.below(WORDS.len())]);
    }
    text.push_str("\"}");
}

/// A small deterministic generator (xorshift64*): the same bodies on every run.
struct Random(u64);

impl Random {
    fn below(&mut self, bound: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % bound.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_asked_length_and_differ_between_messages() {
        for body in [Body::Pad, Body::Ticker, Body::Chat] {
            let (mut one, mut two) = (String::new(), String::new());
            append(&mut one, body, 1, 700);
            append(&mut two, body, 2, 700);
            assert_eq!((one.len(), two.len()), (700, 700));
            assert_eq!(one != two, body != Body::Pad, "{body:?}");
        }
        let mut record = String::new();
        append(&mut record, Body::Ticker, 3, 100);
        assert!(record.starts_with(r#"{"e":"24hrTicker""#), "{record}");
    }
}
