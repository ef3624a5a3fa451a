//! The queue log against a model: random appends (with or without one of a few shared
//! contexts), reads, commits and reopens, with retention by count (applied at every open,
//! and once a second), and after every step the log answers what a plain vector of
//! entries would.

use std::sync::Arc;

use proptest::prelude::*;
use switchboard_storage::{
    Append, FlushReport, FsyncPolicy, QueueLog, Retention, Storage, StorageError,
};

#[derive(Debug, Clone)]
enum Op {
    /// A payload and which context it carries (none, or one of three).
    Append(Vec<u8>, Option<u8>),
    Read {
        from: u64,
        max: usize,
    },
    Commit(u64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::option::of(0u8..3)
        )
            .prop_map(|(payload, context)| Op::Append(payload, context)),
        3 => (0u64..80, 1usize..40).prop_map(|(from, max)| Op::Read { from, max }),
        1 => (0u64..80).prop_map(Op::Commit),
        1 => Just(Op::Reopen),
    ]
}

/// Retention keeps this many entries.
const KEEP: u64 = 25;

fn open(dir: &std::path::Path) -> (Storage, QueueLog) {
    let storage = Storage::open(dir).unwrap();
    // Small segments (a quarter of max_bytes) so the log rolls and reads cross files; the
    // model never stores enough for retention by bytes to trim, only by count.
    let retention = Retention {
        max_bytes: Some(40_000),
        max_messages: Some(KEEP),
        ..Retention::default()
    };
    let log = storage
        .open_queue_log(
            &[("q".to_owned(), retention)],
            FsyncPolicy::Always,
            false,
            Arc::new(|_: &str, _: u64| {}),
            Arc::new(|_: FlushReport| {}),
        )
        .unwrap();
    (storage, log)
}

/// What the model keeps of an entry: its context (if any) and its payload.
type ModelEntry = (Option<Arc<[u8]>>, Vec<u8>);

/// Context number `n`: big enough that storing it per entry would show.
fn context(n: u8) -> Arc<[u8]> {
    vec![n; 200].into()
}

fn append(log: &QueueLog, payload: &[u8], context: Option<Arc<[u8]>>) -> u64 {
    let (tx, rx) = std::sync::mpsc::channel();
    log.append_many(vec![Append {
        queue: "q".into(),
        context,
        payload: payload.to_vec(),
        done: Box::new(move |result| {
            let _ = tx.send(result);
        }),
    }]);
    rx.recv().unwrap().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_log_behaves_like_a_vector(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut opened = Some(open(dir.path()));
        let mut model: Vec<ModelEntry> = Vec::new();
        let mut committed = 0u64;
        // Retention runs once a second and at every open: the first offset is at least
        // what the last open settled, at most what the count allows now.
        let mut floor = 0u64;
        for op in ops {
            let (_, log) = opened.as_ref().unwrap();
            match op {
                Op::Append(payload, n) => {
                    let context = n.map(context);
                    prop_assert_eq!(append(log, &payload, context.clone()), model.len() as u64);
                    model.push((context, payload));
                }
                Op::Read { from, max } => {
                    let read = log.read("q", from, max).unwrap();
                    let (first_after, _) = log.bounds("q").unwrap();
                    let len = model.len() as u64;
                    // Where to read on: after the last entry if `max` came back, else past
                    // everything there is (and never before `from`).
                    match read.entries.last() {
                        Some(last) if read.entries.len() == max => {
                            prop_assert_eq!(read.next, last.offset + 1);
                        }
                        _ => {
                            prop_assert!(read.next >= len.max(from));
                            prop_assert!(read.next == len || read.next <= from.max(first_after));
                        }
                    }
                    let read = read.entries;
                    let Some(start) = read.first().map(|e| e.offset) else {
                        // Nothing: nothing retained from `from` on.
                        prop_assert!(from.max(first_after) >= len);
                        continue;
                    };
                    // From `from` on, less what retention dropped before or during the read.
                    prop_assert!(start >= from.max(floor));
                    prop_assert!(start <= from.max(first_after));
                    type Seen = (u64, Option<Arc<[u8]>>, Vec<u8>);
                    let expected: Vec<Seen> = model
                        .iter()
                        .enumerate()
                        .skip(start as usize)
                        .take(max)
                        .map(|(offset, (context, payload))| {
                            (offset as u64, context.clone(), payload.clone())
                        })
                        .collect();
                    let got: Vec<Seen> = read
                        .into_iter()
                        .map(|e| (e.offset, e.context, e.payload))
                        .collect();
                    prop_assert_eq!(got, expected);
                }
                Op::Commit(offset) if offset > model.len() as u64 => {
                    let refused = log.commit("q", "g", offset);
                    let past_the_end = matches!(refused, Err(StorageError::PastTheEnd { .. }));
                    prop_assert!(past_the_end, "{:?}", refused);
                }
                Op::Commit(offset) => {
                    committed = committed.max(offset);
                    prop_assert_eq!(log.commit("q", "g", offset).unwrap(), committed);
                }
                Op::Reopen => {
                    let (storage, log) = opened.take().unwrap();
                    log.close();
                    drop((log, storage));
                    opened = Some(open(dir.path()));
                    floor = floor.max((model.len() as u64).saturating_sub(KEEP));
                    // Applied at open, exactly.
                    let (_, log) = opened.as_ref().unwrap();
                    prop_assert_eq!(log.bounds("q").unwrap(), (floor, model.len() as u64));
                }
            }
            let (_, log) = opened.as_ref().unwrap();
            let (first, next) = log.bounds("q").unwrap();
            prop_assert_eq!(next, model.len() as u64);
            prop_assert!(first >= floor && first <= floor.max(next.saturating_sub(KEEP)));
            prop_assert_eq!(log.committed("q", "g").unwrap(), committed);
        }
        let (_, log) = opened.take().unwrap();
        log.close();
    }
}
