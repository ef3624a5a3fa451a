use super::*;

const BOUND: HistoryBound = HistoryBound {
    size: 3,
    ttl_ms: 1_000,
};

fn log_with(count: u64) -> RoomLog {
    let mut log = RoomLog::new("e1".into(), 0);
    for n in 1..=count {
        assert_eq!(log.append(Message::text(n.to_string()), n, Some(BOUND)), n);
    }
    log
}

fn offsets(replay: &Replay) -> Vec<u64> {
    replay.messages.iter().map(|kept| kept.offset).collect()
}

fn since(offset: u64, epoch: Option<&str>) -> Want {
    Want::Since {
        offset,
        epoch: epoch.map(str::to_owned),
        limit: usize::MAX,
    }
}

#[test]
fn keeps_the_last_size_messages_with_dense_offsets() {
    let mut log = log_with(5);
    let replay = log.read(&since(0, None), 5, Some(BOUND));
    assert_eq!((replay.top, replay.first), (5, 3));
    assert_eq!(offsets(&replay), vec![3, 4, 5]);
    assert!(!replay.recovered, "1 and 2 are gone: not from 0");
    let without_epoch = log.read(&since(2, None), 5, Some(BOUND));
    assert!(!without_epoch.recovered, "an offset without its epoch");
    let replay = log.read(&since(2, Some("e1")), 5, Some(BOUND));
    assert!(replay.recovered);
    assert_eq!(offsets(&replay), vec![3, 4, 5]);
}

#[test]
fn since_serves_only_what_follows_without_a_gap() {
    let mut log = log_with(5);
    let read = |log: &mut RoomLog, want| log.read(&want, 5, Some(BOUND));
    assert_eq!(offsets(&read(&mut log, since(4, Some("e1")))), vec![5]);
    let at_top = read(&mut log, since(5, Some("e1")));
    assert!(at_top.recovered && at_top.messages.is_empty());
    let refused = [
        (since(1, Some("e1")), vec![3, 4, 5]),
        (since(6, Some("e1")), vec![]),
        (since(u64::MAX, Some("e1")), vec![]),
        (since(4, Some("e0")), vec![3, 4, 5]),
    ];
    for (want, kept) in refused {
        let replay = read(&mut log, want.clone());
        assert!(!replay.recovered, "{want:?}");
        assert_eq!(offsets(&replay), kept, "{want:?}: what is kept after it");
        assert!(
            replay.for_join(9).messages.is_empty(),
            "{want:?}: a join gets none"
        );
    }
    let limited = Want::Since {
        offset: 2,
        epoch: Some("e1".into()),
        limit: 2,
    };
    assert_eq!(offsets(&read(&mut log, limited)), vec![3, 4]);
}

#[test]
fn a_join_replays_only_what_fits() {
    let mut log = log_with(5);
    let replay = log.read(&since(2, Some("e1")), 5, Some(BOUND));
    assert_eq!(offsets(&replay.clone().for_join(3)), vec![3, 4, 5]);
    let too_far = replay.for_join(2);
    assert!(!too_far.recovered && too_far.messages.is_empty());
}

#[test]
fn last_n_is_the_newest_n() {
    let mut log = log_with(5);
    assert_eq!(offsets(&log.read(&Want::Last(1), 5, Some(BOUND))), vec![5]);
    assert_eq!(
        offsets(&log.read(&Want::Last(9), 5, Some(BOUND))),
        vec![3, 4, 5]
    );
    assert!(log.read(&Want::Last(0), 5, Some(BOUND)).messages.is_empty());
}

#[test]
fn expired_messages_go_and_offsets_go_on() {
    let mut log = log_with(3);
    let replay = log.read(&since(0, None), 1_002, Some(BOUND));
    assert_eq!(offsets(&replay), vec![3]);
    let replay = log.read(&since(0, None), 5_000, Some(BOUND));
    assert_eq!((replay.first, replay.top), (4, 3));
    assert!(log.is_empty());
    assert_eq!(log.append(Message::text("x"), 5_000, Some(BOUND)), 4);
}

#[test]
fn a_room_without_history_counts_but_keeps_nothing() {
    let mut log = RoomLog::new("e".into(), 0);
    assert_eq!(log.append(Message::text("a"), 1, None), 1);
    let replay = log.read(&since(0, None), 1, None);
    assert_eq!((replay.top, replay.first), (1, 2));
    assert!(!replay.recovered);
}

#[test]
fn the_json_reads_back() {
    let mut log = RoomLog::new("e1".into(), 0);
    log.append(Message::text("{\"a\":1}"), 7, Some(BOUND));
    log.append(Message::binary(vec![0xff, 0]), 8, Some(BOUND));
    let room = RoomName::parse("r").unwrap();
    let replay = log.read(&since(0, Some("e1")), 9, Some(BOUND));
    let json = replay.to_json(&room);
    assert_eq!(json["messages"][0]["data"], "{\"a\":1}");
    assert_eq!(json["messages"][1]["data_base64"], "/wA=");
    assert_eq!(Replay::from_json(&json), Some(replay));
}

#[test]
fn a_stored_entry_reads_back_and_a_message_can_be_taken_back() {
    let mut log = log_with(2);
    let kept = log.read(&Want::Last(1), 2, Some(BOUND)).messages.remove(0);
    let room = RoomName::parse("r").unwrap();
    let entry = kept.to_entry(&room, "e1");
    assert_eq!(Kept::from_entry(&entry), Some((room, "e1".into(), kept)));
    assert_eq!(Kept::from_entry(b"{}"), None);
    log.take_back(2);
    assert_eq!(offsets(&log.read(&since(0, None), 2, Some(BOUND))), vec![1]);
    assert_eq!(log.append(Message::text("again"), 3, Some(BOUND)), 2);
}

#[test]
fn a_replay_too_big_for_one_answer_says_more_follow() {
    let bound = Some(HistoryBound {
        size: 8,
        ttl_ms: 1_000,
    });
    let mut log = RoomLog::new("e1".into(), 0);
    for n in 0..8 {
        log.append(Message::text("x".repeat(100)), n, bound);
    }
    let room = RoomName::parse("r").unwrap();
    let replay = log.read(&since(0, Some("e1")), 8, bound);
    let whole = replay.clone().fit(&room, usize::MAX);
    let read = |bytes: &[u8]| Replay::from_json(&serde_json::from_slice(bytes).unwrap());
    assert_eq!(read(&whole), Some(replay.clone()));
    let part = replay.fit(&room, 700);
    assert!(part.len() <= 700);
    let part = read(&part).unwrap();
    assert!(part.more && !part.messages.is_empty() && part.messages.len() < 8);
    assert_eq!(part.messages[0].offset, 1, "the first ones");
}

#[test]
fn the_envelope_keeps_json_as_json() {
    let room = RoomName::parse("r").unwrap();
    let as_json = |message: &Message| -> Value {
        serde_json::from_slice(&enveloped(&room, 4, message).payload).unwrap()
    };
    let json = as_json(&Message::text("{\"px\":1}"));
    assert_eq!(
        json,
        json!({"type":"message","room":"r","offset":4,"data":{"px":1}})
    );
    assert_eq!(as_json(&Message::text("hi"))["data"], "hi");
    assert_eq!(as_json(&Message::binary(vec![1]))["data_base64"], "AQ==");
}

#[test]
fn a_replay_continues_a_position_named_by_its_epochs_id() {
    let mut log = log_with(5);
    let at = |offset| crate::rooms::Position {
        epoch: epoch_id("e1"),
        offset,
    };
    let replay = log.read(&since(2, None), 5, Some(BOUND));
    assert!(replay.continues(at(2)) && replay.continues(at(5)));
    assert_eq!(offsets(&replay), vec![3, 4, 5]);
    assert!(!replay.continues(at(1)), "2 is gone");
    assert!(!replay.continues(at(6)), "past the top");
    let other = crate::rooms::Position {
        epoch: epoch_id("e0"),
        offset: 2,
    };
    assert!(!replay.continues(other));
    assert!(!Replay::unavailable().continues(at(0)));
}
