//! Hot paths of the gateway core: route selection on a typical frame, building the event
//! JSON a backend receives, encoding an outbound frame once, compressing it once
//! (permessage-deflate) and inflating a client's, and the per-message inbound rate-limit
//! check every client frame passes.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use switchboard::event::{self, ApiFacts, ConnectionFacts, EventKind, EventStamp, MessageBody};
use switchboard::frame::{self, Opcode};
use switchboard::limits::{InboundLimiter, Rate};
use switchboard::selection::SelectionExpression;

/// A typical ~200-byte chat frame.
const FRAME: &str = r#"{"action":"sendMessage","room":"lobby","message":{"text":"hello everyone, this is a fairly typical chat message body","sentAt":1764053068123},"meta":{"kind":"chat","client":"web/1.4.2"}}"#;

fn route_selection(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_selection");
    group.throughput(Throughput::Bytes(FRAME.len() as u64));
    let simple = SelectionExpression::parse("$request.body.action").unwrap();
    group.bench_function("action_200B", |b| {
        b.iter(|| simple.evaluate_frame(black_box(FRAME.as_bytes())))
    });
    let template =
        SelectionExpression::parse("${request.body.meta.kind}-${request.body.action}").unwrap();
    group.bench_function("template_200B", |b| {
        b.iter(|| template.evaluate_frame(black_box(FRAME.as_bytes())))
    });
    group.finish();
}

fn event_json(c: &mut Criterion) {
    let facts = ConnectionFacts {
        connection_id: "AAEAAgAAAAMAAAAAAAAABA".into(),
        connected_at_ms: 1_764_053_000_000,
        source_ip: "127.0.0.1".into(),
        user_agent: "Mozilla/5.0 (X11; Linux x86_64)".into(),
        domain_name: "ws.example.com".into(),
        authorizer: None,
    };
    let api = ApiFacts {
        stage: "dev",
        api_id: "switchboard",
    };
    c.bench_function("event_json/message_200B", |b| {
        b.iter(|| {
            let stamp = EventStamp {
                request_id: "AAAAAQEAAAAAAAAB",
                now_ms: 1_764_053_068_123,
            };
            let kind = EventKind::Message {
                route_key: "sendMessage",
                message_id: "AAAAAQEAAAAAAAAC",
                body: MessageBody::Text(black_box(FRAME)),
            };
            event::build(api, &facts, stamp, kind)
        })
    });
}

fn frame_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_encode");
    for size in [128usize, 4096] {
        let payload = vec![b'x'; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("text_{size}B"), |b| {
            b.iter(|| frame::encode(Opcode::Text, black_box(&payload)))
        });
    }
    group.finish();
}

/// A ~390-byte 24-hour ticker record, as exchanges' public streams send them.
const TICKER: &str = r#"{"e":"24hrTicker","E":1765000000420,"s":"BTCUSDT","p":"-12.30000000","P":"0.123","w":"64010.12345678","c":"64123.51000000","Q":"0.01200000","b":"64123.50000000","B":"1.23400000","a":"64123.51000000","A":"0.56700000","o":"64246.96000000","h":"64500.00000000","l":"62800.12000000","v":"12345.67800000","q":"789012345.12345678","O":1764913600420,"C":1765000000420,"F":300000294,"L":300100294,"n":101234}"#;

fn compression(c: &mut Criterion) {
    use switchboard::compression;
    let mut group = c.benchmark_group("compression");
    group.throughput(Throughput::Bytes(TICKER.len() as u64));
    for level in [1, 6] {
        group.bench_function(format!("deflate_ticker_level{level}"), |b| {
            b.iter(|| compression::compress(black_box(TICKER.as_bytes()), level, 15))
        });
    }
    let packed = compression::compress(TICKER.as_bytes(), 6, 15).unwrap();
    group.bench_function("inflate_ticker", |b| {
        b.iter(|| compression::inflate(black_box(&packed), 1 << 20))
    });
    group.finish();
}

fn inbound_limit(c: &mut Criterion) {
    // Limits high enough never to hold a message back: the cost of the check itself.
    let messages = Rate {
        per_sec: u64::MAX / 4,
        burst: u64::MAX / 4,
    };
    let bytes = messages;
    let mut limiter = InboundLimiter::new(Some(messages), Some(bytes), std::time::Instant::now());
    c.bench_function("inbound_limit/admit_200B", |b| {
        b.iter(|| {
            let now = std::time::Instant::now();
            limiter.admit(black_box(FRAME.len()), now)
        })
    });
}

criterion_group!(
    benches,
    route_selection,
    event_json,
    frame_encode,
    compression,
    inbound_limit
);
criterion_main!(benches);
