//! Fan-out hot paths: one encoded frame pushed to 10,000 connection queues, and parsing and
//! planning a bulk `POST @connections` for 10,000 ids.

use std::rc::Rc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use switchboard::connection::Connection;
use switchboard::connection_id::{ConnectionId, IdMinter};
use switchboard::event::ConnectionFacts;
use switchboard::fanout::FanoutPlan;
use switchboard::frame::{self, Opcode};
use switchboard::management::BulkRequest;
use switchboard::metrics::Metrics;
use switchboard::outbound::OutboundQueue;
use switchboard::rooms::{RoomIndex, RoomName};

const MEMBERS: usize = 10_000;

fn connection(id: ConnectionId) -> Rc<Connection> {
    let facts = ConnectionFacts {
        connection_id: id.to_string(),
        connected_at_ms: 0,
        source_ip: "127.0.0.1".into(),
        user_agent: String::new(),
        domain_name: String::new(),
    };
    let expires_at = std::time::Instant::now() + std::time::Duration::from_secs(3600);
    Rc::new(Connection::new(
        id,
        facts,
        OutboundQueue::new(1 << 20, 1 << 30),
        expires_at,
    ))
}

fn room_broadcast(c: &mut Criterion) {
    let metrics = Metrics::new();
    let room = RoomName::parse("bench").unwrap();
    let mut minter = IdMinter::new(0, 0, 1);
    let mut index = RoomIndex::default();
    for _ in 0..MEMBERS {
        let id = minter.connection_id();
        index.join(&room, id.sequence, connection(id));
    }
    let frame = frame::encode(Opcode::Text, &[b'x'; 128]);
    let mut group = c.benchmark_group("fanout");
    group.throughput(Throughput::Elements(MEMBERS as u64));
    // Queues grow across iterations (nothing writes them); the bound is far away, and the
    // cost measured is the per-recipient enqueue: a refcount bump, a push, a wake-up.
    group.bench_function("room_10k_members_128B", |b| {
        b.iter(|| {
            let mut delivered = 0;
            for (_, member) in index.members(&room) {
                if member.enqueue(frame.clone(), &metrics).is_ok() {
                    delivered += 1;
                }
            }
            black_box(delivered)
        })
    });
    group.finish();
}

fn bulk_request(c: &mut Criterion) {
    let mut minter = IdMinter::new(0, 0, 1);
    let ids: Vec<String> = (0..MEMBERS)
        .map(|i| {
            let mut id = minter.connection_id();
            id.shard = (i % 2) as u16;
            id.to_string()
        })
        .collect();
    let body = serde_json::json!({"connectionIds": ids, "data": "x".repeat(128)}).to_string();
    let mut group = c.benchmark_group("bulk");
    group.throughput(Throughput::Elements(MEMBERS as u64));
    group.bench_function("parse_and_plan_10k_ids", |b| {
        b.iter_batched(
            || body.clone().into_bytes(),
            |body| {
                let (request, frame) = BulkRequest::parse(&body, 100_000, 1 << 17).unwrap();
                let plan = FanoutPlan::for_ids(&request.connection_ids, 0, 1, 2);
                black_box((plan, frame))
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, room_broadcast, bulk_request);
criterion_main!(benches);
