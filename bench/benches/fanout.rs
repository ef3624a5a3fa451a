//! Fan-out hot paths: one encoded frame pushed to 10,000 connection queues, and parsing and
//! planning a bulk `POST @connections` for 10,000 ids.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use switchboard::connection_id::IdMinter;
use switchboard::fanout::FanoutPlan;
use switchboard::limits::{OutboundBudget, ShardAccount};
use switchboard::management::BulkRequest;
use switchboard::message::Message;
use switchboard::outbound::{self, OutboundQueue, Wire};
use switchboard::rooms::{RoomIndex, RoomName};

const MEMBERS: usize = 10_000;

/// A room of `MEMBERS` queues, every `webtransport_every`-th one a WebTransport member
/// (0: none), counted against an outbound memory budget when `account` is given (as a
/// gateway's are).
fn room_of(
    room: &RoomName,
    webtransport_every: usize,
    account: Option<&Rc<ShardAccount>>,
) -> RoomIndex<RefCell<OutboundQueue>> {
    let mut minter = IdMinter::new(0, 0, 1);
    let mut index = RoomIndex::default();
    for member in 0..MEMBERS {
        let id = minter.connection_id();
        let wire = if webtransport_every > 0 && member % webtransport_every == 0 {
            Wire::WebTransport
        } else {
            Wire::WebSocket
        };
        let queue = OutboundQueue::new(wire, 1 << 20, 1 << 30);
        let queue = match account {
            Some(account) => queue.counted_in(account.clone()),
            None => queue,
        };
        index.join(room, id.sequence, RefCell::new(queue));
    }
    index
}

fn room_broadcast(c: &mut Criterion) {
    let room = RoomName::parse("bench").unwrap();
    let message = Message::text(vec![b'x'; 128]);
    let mut group = c.benchmark_group("fanout");
    group.throughput(Throughput::Elements(MEMBERS as u64));
    // What a shard does per recipient of a broadcast: walk the room index, push a
    // refcounted clone of the one shared message onto the member's bounded queue. Each
    // broadcast is a new message, so each transport's encoding is made once, at the first
    // of its members. Queues are drained between iterations, as the write
    // pass would.
    let account = Rc::new(ShardAccount::new(Arc::new(OutboundBudget::new(1 << 40))));
    for (name, webtransport_every, counted) in [
        ("room_10k_members_128B", 0, None),
        ("room_10k_members_128B_budget_counted", 0, Some(&account)),
        ("room_10k_members_128B_half_webtransport", 2, None),
    ] {
        let index = room_of(&room, webtransport_every, counted);
        group.bench_function(name, |b| {
            b.iter(|| {
                let frame = outbound::shared(message.clone());
                let mut delivered = 0;
                for (_, queue) in index.members(&room) {
                    if queue.borrow_mut().push(frame.clone()).is_ok() {
                        delivered += 1;
                    }
                }
                for (_, queue) in index.members(&room) {
                    let mut queue = queue.borrow_mut();
                    let queued = queue.queued_bytes();
                    queue.consume(queued);
                }
                black_box(delivered)
            })
        });
    }
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
                let plan = FanoutPlan::for_ids(&request.connection_ids, 0, 1, 2, false);
                black_box((plan, frame))
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, room_broadcast, bulk_request);
criterion_main!(benches);
