//! Rooms that remember: offsets and epochs, the history API, joins that replay the past
//! (`history`, `since` + `epoch`) with no gap and no duplicate while the room is published
//! to at full speed, the envelope, the bounds, and what a restart does to memory history.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

const ROUTES: &str = r#"
[routes.join]
integration = { type = "room_join", room = "$request.body.room", history = "$request.body.history", since = "$request.body.since", epoch = "$request.body.epoch" }
[routes.publish]
integration = { type = "room_publish", room = "$request.body.room", data = "$request.body.data", members_only = false }
[routes."$default"]
integration = { type = "echo" }
"#;

async fn start(rooms: &str) -> (TestGateway, Backend) {
    let backend = Backend::start().await;
    let config = config_with(&backend, &format!("[rooms]\n{rooms}\n{ROUTES}"));
    (TestGateway::start(&config).await, backend)
}

async fn publish(gateway: &TestGateway, room: &str, body: &str) -> Value {
    post_for_json(gateway.api_url(&format!("/@rooms/{room}")), body.to_owned()).await
}

async fn history(gateway: &TestGateway, room: &str, query: &str) -> (u16, Value) {
    let url = gateway.api_url(&format!("/@rooms/{room}/history{query}"));
    let response = http().get(url).send().await.unwrap();
    let status = response.status().as_u16();
    let body = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or(Value::Null);
    (status, body)
}

async fn wait_for_members(gateway: &TestGateway, room: &str, count: usize) {
    for _ in 0..200 {
        let url = gateway.api_url(&format!("/@rooms/{room}"));
        let listed: Value =
            serde_json::from_slice(&http().get(url).send().await.unwrap().bytes().await.unwrap())
                .unwrap();
        if listed["count"] == count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{room} never had {count} members");
}

async fn join(ws: &mut Ws, options: Value) {
    let mut frame = json!({"action": "join"});
    frame
        .as_object_mut()
        .unwrap()
        .extend(options.as_object().unwrap().clone());
    send_text(ws, &frame.to_string()).await;
}

/// The offsets in the next `count` envelope frames of `room`.
async fn offsets(ws: &mut Ws, count: usize) -> Vec<u64> {
    let mut offsets = Vec::with_capacity(count);
    while offsets.len() < count {
        let frame = next_json(ws).await;
        assert_eq!(frame["type"], "message", "{frame}");
        offsets.push(frame["offset"].as_u64().unwrap());
    }
    offsets
}

#[tokio::test]
async fn a_late_member_gets_the_last_messages_then_the_live_ones() {
    let (gateway, _backend) = start("history_size = 50").await;
    let mut epoch = None;
    for n in 1..=5u64 {
        let answer = publish(&gateway, "lobby", &format!("m{n}")).await;
        assert_eq!(answer, json!({"delivered": 0, "offset": n}));
        let (_, kept) = history(&gateway, "lobby", "").await;
        epoch.get_or_insert(kept["epoch"].clone());
        assert_eq!(kept["epoch"], epoch.clone().unwrap(), "one epoch");
    }
    let mut late = gateway.connect().await;
    join(&mut late, json!({"room": "lobby", "history": 3})).await;
    let joined = next_json(&mut late).await;
    assert_eq!(
        joined,
        json!({"type": "joined", "room": "lobby", "epoch": epoch.unwrap(), "offset": 5, "recovered": true})
    );
    for n in 3..=5 {
        assert_eq!(next_text(&mut late).await, format!("m{n}"));
    }
    let answer = publish(&gateway, "lobby", "m6").await;
    assert_eq!(answer, json!({"delivered": 1, "offset": 6}));
    assert_eq!(next_text(&mut late).await, "m6");
    // A plain join is answered as always (nothing), and `history: 1` is the latest value.
    let mut plain = gateway.connect().await;
    join(&mut plain, json!({"room": "lobby"})).await;
    let mut latest = gateway.connect().await;
    join(&mut latest, json!({"room": "lobby", "history": 1})).await;
    assert_eq!(next_json(&mut latest).await["offset"], 6);
    assert_eq!(next_text(&mut latest).await, "m6");
    wait_for_members(&gateway, "lobby", 3).await;
    publish(&gateway, "lobby", "m7").await;
    assert_eq!(next_text(&mut plain).await, "m7", "no joined frame first");
    assert_eq!(next_text(&mut latest).await, "m7");
    gateway.stop().await;
}

#[tokio::test]
async fn a_new_connection_recovers_what_it_missed_from_its_offset_and_epoch() {
    let (gateway, _backend) = start("history_size = 5\nenvelope = true").await;
    let mut first = gateway.connect().await;
    join(&mut first, json!({"room": "chat", "history": 0})).await;
    let joined = next_json(&mut first).await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    assert_eq!(
        (&joined["offset"], &joined["recovered"]),
        (&json!(0), &json!(true))
    );
    publish(&gateway, "chat", r#"{"text":"one"}"#).await;
    let delivered = next_json(&mut first).await;
    assert_eq!(
        delivered,
        json!({"type": "message", "room": "chat", "offset": 1, "data": {"text": "one"}})
    );
    drop(first);
    for n in 2..=4 {
        publish(&gateway, "chat", &format!("plain {n}")).await;
    }
    // Back on a new connection: everything after offset 1, once, then live.
    let mut again = gateway.connect().await;
    join(
        &mut again,
        json!({"room": "chat", "since": 1, "epoch": epoch}),
    )
    .await;
    let joined = next_json(&mut again).await;
    assert_eq!(
        (&joined["offset"], &joined["recovered"]),
        (&json!(4), &json!(true))
    );
    let replayed = next_json(&mut again).await;
    assert_eq!(
        replayed["data"], "plain 2",
        "text that is not JSON is a string"
    );
    assert_eq!(offsets(&mut again, 2).await, vec![3, 4]);
    publish(&gateway, "chat", "5").await;
    assert_eq!(offsets(&mut again, 1).await, vec![5]);
    // Another epoch, or an offset older than what is kept: nothing replayed, told so.
    for (since, epoch, top) in [(4, "other-epoch".to_owned(), 5), (0, epoch.clone(), 6)] {
        let mut stale = gateway.connect().await;
        join(
            &mut stale,
            json!({"room": "chat", "since": since, "epoch": epoch}),
        )
        .await;
        let joined = next_json(&mut stale).await;
        assert_eq!(
            (&joined["offset"], &joined["recovered"]),
            (&json!(top), &json!(false))
        );
        publish(&gateway, "chat", "live").await;
        let next = next_json(&mut stale).await;
        assert_eq!(
            next["data"], "live",
            "no replay before the live message: {next}"
        );
        assert_eq!(offsets(&mut again, 1).await.len(), 1);
    }
    // A member that joins again gets no replay: it has had the room all along.
    join(
        &mut again,
        json!({"room": "chat", "since": 1, "epoch": epoch}),
    )
    .await;
    let joined = next_json(&mut again).await;
    assert_eq!(
        (&joined["type"], &joined["recovered"]),
        (&json!("joined"), &json!(false))
    );
    publish(&gateway, "chat", "after").await;
    assert_eq!(
        next_json(&mut again).await["data"],
        "after",
        "live, no replay first"
    );
    // An offset without its epoch is not trusted.
    let mut careless = gateway.connect().await;
    join(&mut careless, json!({"room": "chat", "since": 6})).await;
    assert_eq!(next_json(&mut careless).await["recovered"], false);
    // Bad options are an error frame; the connection stays.
    join(&mut again, json!({"room": "chat", "history": "lots"})).await;
    let refused = next_json(&mut again).await;
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .starts_with("Bad request"),
        "{refused}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn the_history_api_pages_and_bounds_what_is_kept() {
    let (gateway, _backend) = start(
        "history_size = 3\nhistory_ttl_secs = 1\n[[rooms.class]]\npattern = \"pipe:*\"\nhistory_size = 0",
    )
    .await;
    for n in 1..=4 {
        publish(&gateway, "r", &format!("m{n}")).await;
    }
    let binary = reqwest::Body::from(vec![0xffu8, 0x00]);
    post_body(gateway.api_url("/@rooms/r"), binary).await;
    let (status, all) = history(&gateway, "r", "").await;
    assert_eq!(status, 200);
    assert_eq!(
        (&all["room"], &all["offset"], &all["first"]),
        (&json!("r"), &json!(5), &json!(3))
    );
    let messages = all["messages"].as_array().unwrap();
    let offsets: Vec<u64> = messages
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![3, 4, 5], "only the last history_size");
    assert_eq!(messages[0]["data"], "m3");
    assert!(messages[0]["time"].as_u64().unwrap() > 1_600_000_000_000);
    assert_eq!(messages[2]["data_base64"], "/wA=");
    let (_, page) = history(&gateway, "r", "?since=3&limit=1").await;
    assert_eq!(page["messages"], json!([all["messages"][1]]));
    for bad in ["?since=-1", "?limit=x"] {
        let (status, error) = history(&gateway, "r", bad).await;
        assert_eq!(status, 400, "{bad}: {error}");
    }
    // A class that keeps nothing: no history, no offsets.
    let (status, _) = history(&gateway, "pipe:a", "").await;
    assert_eq!(status, 404);
    assert_eq!(
        publish(&gateway, "pipe:a", "x").await,
        json!({"delivered": 0})
    );
    let mut asking = gateway.connect().await;
    join(&mut asking, json!({"room": "pipe:a", "history": 5})).await;
    assert_eq!(
        next_json(&mut asking).await,
        json!({"type": "joined", "room": "pipe:a", "epoch": "", "offset": 0, "recovered": false})
    );
    // After the TTL nothing is kept, and offsets go on.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (_, expired) = history(&gateway, "r", "").await;
    assert_eq!(
        (&expired["offset"], &expired["first"]),
        (&json!(5), &json!(6))
    );
    assert_eq!(expired["messages"], json!([]));
    assert_eq!(publish(&gateway, "r", "m6").await["offset"], 6);
    gateway.stop().await;
}

#[tokio::test]
async fn memory_history_starts_a_new_epoch_after_a_restart() {
    let backend = Backend::start().await;
    let config = config_with(&backend, &format!("[rooms]\nhistory_size = 10\n{ROUTES}"));
    let gateway = TestGateway::start(&config).await;
    publish(&gateway, "r", "before").await;
    let (_, before) = history(&gateway, "r", "").await;
    let data_dir = gateway.data_dir.clone();
    gateway.stop().await;
    let gateway = TestGateway::start_in(&config, data_dir).await;
    let mut client = gateway.connect().await;
    join(
        &mut client,
        json!({"room": "r", "since": 1, "epoch": before["epoch"]}),
    )
    .await;
    let joined = next_json(&mut client).await;
    assert_ne!(joined["epoch"], before["epoch"]);
    assert_eq!(
        (&joined["offset"], &joined["recovered"]),
        (&json!(0), &json!(false))
    );
    gateway.stop().await;
}

/// Joiners arrive on both shards while a client publishes as fast as it can: each gets
/// every offset from where its replay starts to the last, once, in order.
#[tokio::test]
async fn joins_during_a_full_speed_publish_miss_nothing_and_get_nothing_twice() {
    const MESSAGES: u64 = 3_000;
    let (gateway, _backend) = start(
        "history_size = 100000\nenvelope = true\n[limits]\nmessages_per_sec = 1000000\nmessage_burst = 1000000\noutbound_queue_frames = 8192",
    )
    .await;
    let mut publisher = gateway.connect().await;
    let publishing = tokio::spawn(async move {
        for n in 1..=MESSAGES {
            let frame = json!({"action": "publish", "room": "fast", "data": n});
            send_text(&mut publisher, &frame.to_string()).await;
        }
        publisher
    });
    let mut joiners = Vec::new();
    for round in 0..8u64 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let mut ws = gateway.connect().await;
        let (options, from_all) = match round % 2 {
            0 => (json!({"room": "fast", "since": 0}), true),
            _ => (json!({"room": "fast", "history": 5}), false),
        };
        joiners.push(tokio::spawn(async move {
            join(&mut ws, options).await;
            let joined = next_json(&mut ws).await;
            assert_eq!(joined["recovered"], true, "{joined}");
            let top = joined["offset"].as_u64().unwrap();
            let start = if from_all {
                1
            } else {
                top.saturating_sub(4).max(1)
            };
            let got = offsets(&mut ws, (MESSAGES - start + 1) as usize).await;
            (round, top, start, got)
        }));
    }
    let _publisher = publishing.await.unwrap();
    for joiner in joiners {
        let (round, top, start, got) = joiner.await.unwrap();
        let expected: Vec<u64> = (start..=MESSAGES).collect();
        assert_eq!(got, expected, "joiner {round} (replay top {top})");
    }
    gateway.stop().await;
}

#[tokio::test]
async fn durable_history_survives_a_restart_in_the_same_epoch() {
    let backend = Backend::start().await;
    let rooms =
        "[rooms]\nhistory_size = 10\n[[rooms.class]]\npattern = \"kept:*\"\nhistory_durable = true";
    let config = config_with(&backend, &format!("{rooms}\n{ROUTES}"));
    let gateway = TestGateway::start(&config).await;
    for n in 1..=3 {
        assert_eq!(
            publish(&gateway, "kept:r", &format!("m{n}")).await["offset"],
            n
        );
        publish(&gateway, "memory", "m").await;
    }
    let (_, before) = history(&gateway, "kept:r", "").await;
    let (_, memory_before) = history(&gateway, "memory", "").await;
    let data_dir = gateway.data_dir.clone();
    gateway.stop().await;
    let gateway = TestGateway::start_in(&config, data_dir).await;
    let (_, after) = history(&gateway, "kept:r", "").await;
    assert_eq!(after, before, "the same epoch, offsets and messages");
    let (_, memory_after) = history(&gateway, "memory", "").await;
    assert_ne!(
        memory_after["epoch"], memory_before["epoch"],
        "memory history starts anew"
    );
    let mut client = gateway.connect().await;
    join(
        &mut client,
        json!({"room": "kept:r", "since": 2, "epoch": before["epoch"]}),
    )
    .await;
    let joined = next_json(&mut client).await;
    assert_eq!(
        (&joined["offset"], &joined["recovered"]),
        (&json!(3), &json!(true))
    );
    assert_eq!(next_text(&mut client).await, "m3");
    assert_eq!(publish(&gateway, "kept:r", "m4").await["offset"], 4);
    assert_eq!(next_text(&mut client).await, "m4");
    gateway.stop().await;
}
