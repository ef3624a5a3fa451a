//! The durable queue's append path: 1,000 entries of 200 bytes handed to the queue log and
//! waited for (acknowledged), per fsync policy. Measures the storage side of a `queue`
//! route: group commit through the writer thread, one write per queue per batch, the sync.
//! Each entry carries one of ten contexts (as the gateway's entries carry their
//! connection's facts), stored once per segment.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use switchboard_storage::{Append, FlushReport, FsyncPolicy, Retention, Storage};

const ENTRIES: usize = 1000;
/// Connections the entries come from.
const CONTEXTS: usize = 10;

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("queue_append");
    group.throughput(Throughput::Elements(ENTRIES as u64));
    group.sample_size(20);
    let policies = [
        ("always", FsyncPolicy::Always),
        (
            "batch_2ms",
            FsyncPolicy::Batch {
                interval: Duration::from_millis(2),
            },
        ),
        ("never", FsyncPolicy::Never),
    ];
    for (name, policy) in policies {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let log = storage
            .open_queue_log(
                &[("bench".to_owned(), Retention::default())],
                policy,
                false,
                Arc::new(|_: &str, _: u64| {}),
                Arc::new(|_: FlushReport| {}),
            )
            .unwrap();
        let queue: Arc<str> = "bench".into();
        let payload = vec![b'x'; 200];
        let contexts: Vec<Arc<[u8]>> = (0..CONTEXTS)
            .map(|n| format!("{{\"connectionId\":\"connection-{n}\",\"sourceIp\":\"127.0.0.1\"}}"))
            .map(|context| Arc::from(context.into_bytes()))
            .collect();
        group.bench_function(format!("{name}_1000x200B"), |b| {
            b.iter(|| {
                let (done, acked) = crossbeam_channel::bounded(ENTRIES);
                for n in 0..ENTRIES {
                    let done = done.clone();
                    log.append_many(vec![Append {
                        queue: queue.clone(),
                        context: Some(contexts[n % CONTEXTS].clone()),
                        payload: payload.clone(),
                        done: Box::new(move |result| {
                            let _ = done.send(result.is_ok());
                        }),
                    }]);
                }
                for _ in 0..ENTRIES {
                    assert!(acked.recv().unwrap());
                }
            })
        });
        log.close();
    }
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
