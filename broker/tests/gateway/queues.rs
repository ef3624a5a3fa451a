//! Durable queues: acked appends, the pull API with consumer groups and long-polls, push
//! delivery through a failing backend, retention, restarts, and bad requests.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

fn queue_config(extra_route: &str, extra: &str) -> String {
    format!(
        r#"
[storage]
fsync = "batch"
flush_interval_ms = 2
{extra}
[routes.order]
integration = {{ type = "queue", queue = "orders", ack = true {extra_route} }}
[routes.log]
integration = {{ type = "queue", queue = "audit" }}
[routes."$default"]
integration = {{ type = "echo" }}
"#
    )
}

async fn pull(gateway: &TestGateway, queue: &str, query: &str) -> (u16, Value) {
    let url = gateway.api_url(&format!("/@queues/{queue}/messages?{query}"));
    let response = http().get(url).send().await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or(Value::Null),
    )
}

async fn commit(gateway: &TestGateway, queue: &str, body: &str) -> (u16, Value) {
    let url = gateway.api_url(&format!("/@queues/{queue}/commit"));
    let response = http().post(url).body(body.to_owned()).send().await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or(Value::Null),
    )
}

/// Sends `count` order frames and returns the acked messageIds, in ack order.
async fn send_orders(ws: &mut Ws, range: std::ops::Range<usize>) -> Vec<String> {
    for seq in range.clone() {
        send_text(ws, &json!({"action": "order", "seq": seq}).to_string()).await;
    }
    let mut acks = Vec::new();
    for _ in range {
        let ack = next_json(ws).await;
        assert_eq!(ack["type"], "ack");
        acks.push(ack["messageId"].as_str().unwrap().to_owned());
    }
    acks
}

/// The offsets of a pulled page's messages.
fn offsets(page: &Value) -> Vec<u64> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect()
}

fn seq_of(message: &Value) -> u64 {
    let body: Value = serde_json::from_str(message["event"]["body"].as_str().unwrap()).unwrap();
    body["seq"].as_u64().unwrap()
}

#[tokio::test]
async fn acked_frames_are_pulled_in_order_and_commits_move_the_group() {
    let gateway = TestGateway::start(&queue_config("", "")).await;
    let mut ws = gateway.connect().await;
    let acks = send_orders(&mut ws, 0..50).await;

    let (status, page) = pull(&gateway, "orders", "group=billing&max=20").await;
    assert_eq!(status, 200);
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 20);
    for (i, message) in messages.iter().enumerate() {
        assert_eq!(message["offset"], i as u64);
        assert_eq!(seq_of(message), i as u64, "frames kept their order");
        let context = &message["event"]["requestContext"];
        assert_eq!(context["eventType"], "MESSAGE");
        assert_eq!(context["routeKey"], "order");
        assert_eq!(
            context["messageId"],
            acks[i].as_str(),
            "acks came in frame order"
        );
    }
    assert_eq!(page["next"], 20);

    let (status, again) = pull(&gateway, "orders", "group=billing&max=5").await;
    assert_eq!(status, 200);
    assert_eq!(
        again["messages"][0]["offset"], 0,
        "uncommitted messages are handed out again"
    );

    let (status, committed) =
        commit(&gateway, "orders", r#"{"group":"billing","offset":20}"#).await;
    assert_eq!((status, committed["offset"].clone()), (200, json!(20)));
    let (_, rest) = pull(&gateway, "orders", "group=billing&max=1000").await;
    let rest = rest["messages"].as_array().unwrap();
    assert_eq!(rest.len(), 30);
    assert_eq!(rest[0]["offset"], 20);
    let (_, other_group) = pull(&gateway, "orders", "group=analytics&max=1").await;
    assert_eq!(
        other_group["messages"][0]["offset"], 0,
        "groups are independent"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn queue_without_ack_sends_nothing_back() {
    let gateway = TestGateway::start(&queue_config("", "")).await;
    let mut ws = gateway.connect().await;
    send_text(&mut ws, r#"{"action":"log","n":1}"#).await;
    send_text(&mut ws, "marker").await;
    assert_eq!(next_text(&mut ws).await, "marker");
    let (_, page) = pull(&gateway, "audit", "group=g&wait_ms=2000").await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 1);
    gateway.stop().await;
}

#[tokio::test]
async fn long_poll_wakes_on_arrival() {
    let gateway = TestGateway::start(&queue_config("", "")).await;
    let url = gateway.api_url("/@queues/orders/messages?group=g&wait_ms=20000");
    let poll = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let body = http().get(url).send().await.unwrap().bytes().await.unwrap();
        (
            started.elapsed(),
            serde_json::from_slice::<Value>(&body).unwrap(),
        )
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ws = gateway.connect().await;
    send_orders(&mut ws, 7..8).await;
    let (waited, page) = poll.await.unwrap();
    assert_eq!(seq_of(&page["messages"][0]), 7);
    assert!(
        waited < Duration::from_secs(10),
        "woken by the arrival, not the 20 s timeout"
    );

    let started = std::time::Instant::now();
    let (_, empty) = pull(&gateway, "orders", "group=g&max=10").await;
    assert_eq!(empty["messages"][0]["offset"], 0);
    let (_, nothing) = pull(&gateway, "audit", "group=g&wait_ms=200").await;
    assert_eq!(nothing, json!({"messages": [], "next": 0}));
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "an empty queue waits wait_ms"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn push_delivery_survives_a_failing_backend_in_order() {
    let backend = Backend::start().await;
    let route = format!(r#", deliver_to = "{}/fail-first/4""#, backend.url);
    let gateway = TestGateway::start(&queue_config(&route, "")).await;
    let mut ws = gateway.connect().await;
    send_orders(&mut ws, 0..10).await;
    // 4 failures, then all 10 entries, in order, each once after its success.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while backend.events("/fail-first/4").len() < 14 {
        assert!(
            std::time::Instant::now() < deadline,
            "push delivery recovered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let attempts = backend.events("/fail-first/4");
    let delivered: Vec<u64> = attempts[4..]
        .iter()
        .map(|event| {
            let body: Value = serde_json::from_str(event["body"].as_str().unwrap()).unwrap();
            body["seq"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(delivered, (0..10).collect::<Vec<_>>());
    assert!(
        attempts[..4]
            .iter()
            .all(|e| e["body"].as_str().unwrap().contains("\"seq\":0"))
    );
    let metrics = gateway.metrics().await;
    for expected in [
        "switchboard_queue_delivery_attempts_total{queue=\"orders\",result=\"error\"} 4",
        "switchboard_queue_delivery_attempts_total{queue=\"orders\",result=\"ok\"} 10",
        "switchboard_queue_appended_total{queue=\"orders\"} 10",
        "switchboard_queue_depth{queue=\"orders\"} 10",
        "switchboard_queue_consumer_lag{group=\"switchboard.push\",queue=\"orders\"} 0",
        "switchboard_storage_flush_duration_seconds_count",
        "switchboard_queue_flush_batch_size_count",
    ] {
        assert!(
            metrics.contains(expected),
            "missing `{expected}` in:\n{metrics}"
        );
    }
    gateway.stop().await;
}

/// Waits until the push group has committed every entry of `orders`.
async fn wait_until_pushed(gateway: &TestGateway) {
    let caught_up = "switchboard_queue_consumer_lag{group=\"switchboard.push\",queue=\"orders\"} 0";
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !gateway.metrics().await.contains(caught_up) {
        assert!(
            std::time::Instant::now() < deadline,
            "push delivery caught up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The order seqs of each batch a backend received on `path` (failed attempts included).
fn batches(backend: &Backend, path: &str) -> Vec<Vec<u64>> {
    backend
        .events(path)
        .iter()
        .map(|batch| {
            batch["Records"]
                .as_array()
                .expect("a batch is {\"Records\": [...]}")
                .iter()
                .map(|event| {
                    let body: Value =
                        serde_json::from_str(event["body"].as_str().unwrap()).unwrap();
                    body["seq"].as_u64().unwrap()
                })
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn batched_push_with_a_window_delivers_every_entry_through_a_flaky_backend() {
    let backend = Backend::start().await;
    let route = format!(r#", deliver_to = "{}/flaky""#, backend.url);
    let queues = "[queues.orders]\nbatch_size = 10\nmax_in_flight = 4\n";
    let gateway = TestGateway::start(&queue_config(&route, queues)).await;
    let mut ws = gateway.connect().await;
    send_orders(&mut ws, 0..200).await;
    wait_until_pushed(&gateway).await;
    let batches = batches(&backend, "/flaky");
    let mut seen = std::collections::BTreeSet::new();
    for batch in &batches {
        assert!(!batch.is_empty() && batch.len() <= 10, "{batch:?}");
        assert!(
            batch.windows(2).all(|pair| pair[1] == pair[0] + 1),
            "a batch is consecutive: {batch:?}"
        );
        seen.extend(batch.iter().copied());
    }
    assert_eq!(seen, (0..200).collect());
    assert!(batches.len() > 20, "some batches failed and were retried");
    let metrics = gateway.metrics().await;
    assert!(metrics.contains("switchboard_queue_push_batch_size_count"));
    gateway.stop().await;
}

#[tokio::test]
async fn batched_push_with_one_in_flight_keeps_strict_order() {
    let backend = Backend::start().await;
    let route = format!(r#", deliver_to = "{}/flaky""#, backend.url);
    let queues = "[queues.orders]\nbatch_size = 5\n";
    let gateway = TestGateway::start(&queue_config(&route, queues)).await;
    let mut ws = gateway.connect().await;
    send_orders(&mut ws, 0..50).await;
    wait_until_pushed(&gateway).await;
    let mut first_seen = Vec::new();
    for seq in batches(&backend, "/flaky").into_iter().flatten() {
        if !first_seen.contains(&seq) {
            first_seen.push(seq);
        }
    }
    assert_eq!(first_seen, (0..50).collect::<Vec<_>>());
    gateway.stop().await;
}

#[tokio::test]
async fn commits_and_entries_survive_a_restart() {
    let config = queue_config("", "");
    let gateway = TestGateway::start(&config).await;
    let data_dir = gateway.data_dir.clone();
    let mut ws = gateway.connect().await;
    send_orders(&mut ws, 0..5).await;
    commit(&gateway, "orders", r#"{"group":"g","offset":3}"#).await;
    drop(ws);
    gateway.stop().await;

    let gateway = TestGateway::start_in(&config, data_dir).await;
    let (_, page) = pull(&gateway, "orders", "group=g").await;
    let offsets = offsets(&page);
    assert_eq!(offsets, vec![3, 4]);
    let mut ws = gateway.connect().await;
    send_orders(&mut ws, 5..6).await;
    let (_, page) = pull(&gateway, "orders", "group=g").await;
    assert_eq!(
        page["messages"][2]["offset"], 5,
        "offsets continue after the restart"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn retention_trims_old_entries() {
    let config = queue_config("", "[queues.orders]\nmax_messages = 3\n");
    let gateway = TestGateway::start(&config).await;
    let mut ws = gateway.connect().await;
    send_orders(&mut ws, 0..10).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    send_orders(&mut ws, 10..11).await;
    let (_, page) = pull(&gateway, "orders", "group=late").await;
    let offsets = offsets(&page);
    assert!(
        offsets.len() <= 4 && offsets.first() >= Some(&7),
        "{offsets:?}"
    );
    assert_eq!(offsets.last(), Some(&10));
    gateway.stop().await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let gateway = TestGateway::start(&queue_config("", "")).await;
    let (status, body) = pull(&gateway, "nope", "group=g").await;
    assert_eq!(status, 404);
    assert!(body["message"].as_str().unwrap().contains("nope"));
    for query in [
        "",
        "group=",
        "group=a%20b",
        "group=g&max=abc",
        "group=g&max=0",
        "group=g&max=-1",
        "group=g&wait_ms=999999",
        "group=g&colour=red",
    ] {
        let (status, body) = pull(&gateway, "orders", query).await;
        assert_eq!(status, 400, "{query}");
        assert!(body["message"].is_string(), "{query}");
    }
    for bad in [
        "nope",
        "{}",
        r#"{"group":"g"}"#,
        r#"{"group":"g","offset":-1}"#,
        r#"{"group":"","offset":0}"#,
        r#"{"group":"g","offset":99}"#,
    ] {
        let (status, body) = commit(&gateway, "orders", bad).await;
        assert_eq!(status, 400, "{bad}");
        assert!(body["message"].is_string(), "{bad}");
    }
    let (status, _) = commit(&gateway, "nope", r#"{"group":"g","offset":0}"#).await;
    assert_eq!(status, 404);
    gateway.stop().await;
}
