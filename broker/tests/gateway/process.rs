//! The `switchboard` binary as an operator runs it: CLI, config errors, signals, crashes
//! (SIGKILL) and data-dir problems.

use std::time::Duration;

use crate::binary::*;
use crate::support::*;

#[test]
fn help_and_version() {
    let help = run(&["--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("serve") && text.contains("check-config"),
        "{text}"
    );
    let version = run(&["--version"]);
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn check_config_prints_the_effective_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "[routes.\"$default\"]\nintegration = { type = \"echo\" }\n",
    );
    let output = run(&["check-config", path.to_str().unwrap()]);
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("max_frame_bytes = 32768"),
        "defaults are shown: {text}"
    );
    assert!(text.contains("config OK"));
}

#[test]
fn bad_config_refuses_to_start_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[server]\nlisen = \"x\"\n", "lisen"),
        ("[limits]\nmax_frame_bytes = \"big\"\n", "max_frame_bytes"),
        (
            "[api]\nroute_selection_expression = \"$context.x\"\n",
            "api.route_selection_expression",
        ),
        ("[routes.a]\nintegration = { type = \"http\" }\n", "url"),
    ];
    for (body, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, body).unwrap();
        for args in [
            vec!["check-config", path.to_str().unwrap()],
            vec!["serve", "--config", path.to_str().unwrap()],
        ] {
            let output = run(&args);
            assert_eq!(output.status.code(), Some(64), "{args:?} with {body}");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(stderr.contains(key), "{key} named in: {stderr}");
        }
    }
    let missing = run(&["serve", "--config", "/nonexistent/switchboard.toml"]);
    assert_eq!(missing.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/switchboard.toml"));
}

#[test]
fn second_process_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "");
    let _first = GatewayProcess::start(&path, &[]);
    let second = run(&["serve", "--config", path.to_str().unwrap()]);
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("locked"), "{stderr}");
}

#[test]
fn corrupt_data_dir_is_a_clear_error_not_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("conf"),
        b"\x00garbage that is not a sled config\xff",
    )
    .unwrap();
    std::fs::write(data.join("db"), vec![0xA5u8; 8192]).unwrap();
    let output = run(&["serve", "--config", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("data dir"), "{stderr}");
    assert_eq!(
        std::fs::read(data.join("db")).unwrap(),
        vec![0xA5u8; 8192],
        "left untouched"
    );
}

#[test]
fn json_log_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "");
    let mut gateway = GatewayProcess::start(&path, &["--log-format", "json"]);
    // Right after "listening": a SIGTERM this early still shuts down gracefully.
    gateway.signal("-TERM");
    let (code, _) = gateway.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0));
    let lines = gateway.logged();
    assert!(
        lines.len() >= 3,
        "start, listening and stop are logged: {lines:?}"
    );
    for line in lines {
        serde_json::from_str::<serde_json::Value>(&line)
            .unwrap_or_else(|_| panic!("not JSON: {line}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_clients_reports_and_exits_zero() {
    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &config_with(&backend, ""));
    let mut gateway = GatewayProcess::start(&path, &[]);
    let (mut ws, _) = tokio_tungstenite::connect_async(&gateway.ws_url)
        .await
        .unwrap();
    let id = connection_id(&backend.wait_for("/connect-log", |_| true).await);
    gateway.signal("-TERM");
    assert_eq!(close_code(&mut ws).await, 1001);
    let (code, took) = tokio::task::block_in_place(|| gateway.wait(Duration::from_secs(12)));
    assert_eq!(code, Some(0));
    assert!(
        took < Duration::from_secs(10),
        "exits within 10 s, took {took:?}"
    );
    let event = backend
        .wait_for("/disconnect", |e| connection_id(e) == id)
        .await;
    assert_eq!(
        event["requestContext"]["disconnectReason"],
        "server shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_then_restart_reports_cut_connections() {
    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &config_with(&backend, ""));
    let mut gateway = GatewayProcess::start(&path, &[]);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(
            tokio_tungstenite::connect_async(&gateway.ws_url)
                .await
                .unwrap()
                .0,
        );
    }
    let ids = backend.connected_ids(3).await;
    // Each was recorded before its `$connect` ran: killed now, all three are reported.
    let api = gateway.api_url.clone();
    for id in &ids {
        let status = http()
            .get(format!("{api}/@connections/{id}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
    }
    gateway.child.kill().unwrap();
    gateway.child.wait().unwrap();
    assert!(
        backend.events("/disconnect").is_empty(),
        "a SIGKILL reports nothing"
    );

    let mut restarted = GatewayProcess::start(&path, &[]);
    for id in &ids {
        let event = backend
            .wait_for("/disconnect", |e| &connection_id(e) == id)
            .await;
        assert_eq!(
            event["requestContext"]["disconnectReason"],
            "gateway restarted"
        );
        assert_eq!(event["requestContext"]["disconnectStatusCode"], 1006);
    }
    restarted.signal("-TERM");
    let (code, _) = tokio::task::block_in_place(|| restarted.wait(Duration::from_secs(12)));
    assert_eq!(code, Some(0));
    // Reported once: a third start finds nothing left to report.
    let third = GatewayProcess::start(&path, &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(backend.events("/disconnect").len(), ids.len());
    drop(third);
}

/// Every page of `queue` for `group` from offset 0, committing as it goes.
async fn pull_all(api: &str, queue: &str, group: &str) -> Vec<serde_json::Value> {
    let mut all = Vec::new();
    loop {
        let url = format!("{api}/@queues/{queue}/messages?group={group}&max=1000");
        let body = http().get(url).send().await.unwrap().bytes().await.unwrap();
        let page: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let messages = page["messages"].as_array().unwrap().clone();
        if messages.is_empty() {
            return all;
        }
        let commit = serde_json::json!({"group": group, "offset": page["next"]}).to_string();
        let url = format!("{api}/@queues/{queue}/commit");
        assert_eq!(
            http().post(url).body(commit).send().await.unwrap().status(),
            200
        );
        all.extend(messages);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_no_acked_message() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let routes = format!(
        "[storage]\nfsync = \"batch\"\nflush_interval_ms = 2\n{}\n[routes.order]\nintegration = {{ type = \"queue\", queue = \"orders\", ack = true, deliver_to = \"{}/ok\" }}\n",
        config_with(&backend, ""),
        backend.url
    );
    let path = write_config(dir.path(), &routes);
    let mut gateway = GatewayProcess::start(&path, &[]);
    let (ws, _) = tokio_tungstenite::connect_async(&gateway.ws_url)
        .await
        .unwrap();
    let cut_id = connection_id(&backend.wait_for("/connect-log", |_| true).await);
    let (mut sink, mut stream) = ws.split();
    let sender = tokio::spawn(async move {
        for seq in 0..100_000u64 {
            let frame = serde_json::json!({"action": "order", "seq": seq}).to_string();
            if sink.send(Message::text(frame)).await.is_err() {
                return;
            }
            if seq % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
    });
    let mut acked = Vec::new();
    while acked.len() < 500 {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => acked.push(acked_id(&text)),
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    let api = gateway.api_url.clone();
    let committed = serde_json::json!({"group": "kept", "offset": 100}).to_string();
    let url = format!("{api}/@queues/orders/commit");
    assert_eq!(
        http()
            .post(url)
            .body(committed)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Keep reading acks until the very moment of the kill.
    let reader = tokio::spawn(read_acks(stream));
    tokio::time::sleep(Duration::from_millis(100)).await;
    gateway.child.kill().unwrap(); // SIGKILL
    gateway.child.wait().unwrap();
    acked.extend(reader.await.unwrap());
    sender.abort();

    let restarted = GatewayProcess::start(&path, &[]);
    let log = pull_all(&restarted.api_url, "orders", "verify").await;
    let ids: Vec<&str> = log
        .iter()
        .map(|m| m["event"]["requestContext"]["messageId"].as_str().unwrap())
        .collect();
    let unique: std::collections::HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no entry appears twice in the log");
    for id in &acked {
        assert!(
            unique.contains(id.as_str()),
            "acked message {id} survived the crash"
        );
    }
    let offsets: Vec<u64> = log.iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(
        offsets,
        (0..log.len() as u64).collect::<Vec<_>>(),
        "dense offsets"
    );

    let url = format!(
        "{}/@queues/orders/messages?group=kept&max=1",
        restarted.api_url
    );
    let page: serde_json::Value =
        serde_json::from_slice(&http().get(url).send().await.unwrap().bytes().await.unwrap())
            .unwrap();
    assert_eq!(
        page["messages"][0]["offset"], 100,
        "the committed offset held"
    );

    // Push delivery resumes and catches up with everything in the log.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let pushed: std::collections::HashSet<String> = backend
            .events("/ok")
            .iter()
            .map(|e| {
                e["requestContext"]["messageId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        if unique.iter().all(|id| pushed.contains(*id)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "push delivery resumed after the crash"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let event = backend
        .wait_for("/disconnect", |e| connection_id(e) == cut_id)
        .await;
    assert_eq!(
        event["requestContext"]["disconnectReason"],
        "gateway restarted"
    );
}

#[test]
fn every_example_config_is_valid() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let output = run(&["check-config", path.to_str().unwrap()]);
            assert!(
                output.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&output.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 2);
}

fn config_file(dir: &std::path::Path, server: &str, management_listen: &str) -> std::path::PathBuf {
    let path = dir.join("switchboard.toml");
    let text = format!("[server]\n{server}\n[management]\nlisten = \"{management_listen}\"\n");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_busy_port_is_named_once_and_nothing_claims_to_listen() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cases = [
        (
            format!(
                "listen = \"{busy_addr}\"\ndata_dir = \"{}\"",
                data.display()
            ),
            "127.0.0.1:0".to_owned(),
            "server.listen",
        ),
        (
            format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"",
                data.display()
            ),
            busy_addr.to_string(),
            "management.listen",
        ),
    ];
    for (server, management, key) in cases {
        let path = config_file(dir.path(), &server, &management);
        let (code, stderr) = refused_start(&path, Duration::from_secs(20));
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("cannot listen on {busy_addr} ({key})")),
            "{stderr}"
        );
        assert_eq!(stderr.matches("in use").count(), 1, "said once: {stderr}");
        assert!(!stderr.contains("listening"), "{stderr}");
        let other = if key == "server.listen" {
            "management.listen"
        } else {
            "server.listen"
        };
        assert!(
            !stderr.contains(other),
            "only the busy listener is named: {stderr}"
        );
    }
}

#[test]
fn a_data_dir_that_is_a_file_is_a_clear_error_for_serve_and_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let path = config_file(
        dir.path(),
        &format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"",
            file.display()
        ),
        "127.0.0.1:0",
    );
    let (code, stderr) = refused_start(&path, Duration::from_secs(20));
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr.matches("exists but is not a directory").count(),
        1,
        "{stderr}"
    );
    assert!(!stderr.contains("os error 17"), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");

    let output = run(&["check-config", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("`server.data_dir`"), "{stderr}");
    assert!(stderr.contains("not a directory"), "{stderr}");
}

#[test]
fn demo_config_prints_the_embedded_demo() {
    let output = run(&["demo-config"]);
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("[routes.whoami]") && text.contains("[routes.enqueue]"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("demo.toml");
    std::fs::write(&path, text.as_bytes()).unwrap();
    assert!(
        run(&["check-config", path.to_str().unwrap()])
            .status
            .success()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_push_deliveries_are_logged_once_per_interval() {
    use futures_util::SinkExt;
    let dead = dead_url().await;
    let dir = tempfile::tempdir().unwrap();
    let routes = format!(
        "[routes.order]\nintegration = {{ type = \"queue\", queue = \"orders\", ack = true, deliver_to = \"{dead}\" }}\n"
    );
    let path = write_config(dir.path(), &routes);
    let mut gateway = GatewayProcess::start(&path, &[]);
    let (mut ws, _) = tokio_tungstenite::connect_async(&gateway.ws_url)
        .await
        .unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        r#"{"action":"order"}"#,
    ))
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "ack");
    // Retries at 0.1, 0.2, 0.4, 0.8 s… several attempts fail within 2 s.
    tokio::time::sleep(Duration::from_secs(2)).await;
    gateway.signal("-TERM");
    gateway.wait(Duration::from_secs(15));
    let warnings: Vec<String> = gateway
        .logged()
        .into_iter()
        .filter(|line| line.contains("push delivery failing"))
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("orders") && warnings[0].contains("failures=1"));
}

/// The `messageId` of an ack frame.
fn acked_id(text: &str) -> String {
    let ack: serde_json::Value = serde_json::from_str(text).unwrap();
    ack["messageId"].as_str().unwrap().to_owned()
}

/// The ids of the acks `stream` brings until it ends (the gateway was killed).
async fn read_acks(mut stream: futures_util::stream::SplitStream<Ws>) -> Vec<String> {
    use futures_util::StreamExt;
    let mut acked = Vec::new();
    while let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) = stream.next().await {
        acked.push(acked_id(&text));
    }
    acked
}

/// Streams acked appends into the gateway until it is killed; returns the acked ids.
async fn stream_until_killed(
    gateway: &mut GatewayProcess,
    round: u64,
    kill_after: Duration,
) -> Vec<String> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let (ws, _) = tokio_tungstenite::connect_async(&gateway.ws_url)
        .await
        .unwrap();
    let (mut sink, stream) = ws.split();
    let sender = tokio::spawn(async move {
        for seq in 0..5_000u64 {
            let frame = serde_json::json!({"action": "order", "round": round, "seq": seq});
            if sink.send(Message::text(frame.to_string())).await.is_err() {
                return;
            }
            if seq % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    let reader = tokio::spawn(read_acks(stream));
    tokio::time::sleep(kill_after).await;
    gateway.child.kill().unwrap(); // SIGKILL, mid-stream or not
    gateway.child.wait().unwrap();
    sender.abort();
    reader.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_twenty_random_moments_loses_and_repeats_no_acked_message() {
    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let routes = format!(
        "[storage]\nfsync = \"batch\"\nflush_interval_ms = 2\n{}\n[routes.order]\nintegration = {{ type = \"queue\", queue = \"orders\", ack = true }}\n",
        config_with(&backend, ""),
    );
    let path = write_config(dir.path(), &routes);
    let mut acked_before: Vec<String> = Vec::new();
    let mut next_offset = 0u64;
    // A fixed pseudo-random sequence of kill moments, 15 to 250 ms into each stream.
    let mut moment = 0x2545_f491_u64;
    let mut total_acked = 0;
    for round in 0..=20u64 {
        let mut gateway = GatewayProcess::start(&path, &[]);
        // What the last round appended: every acked entry once, offsets dense.
        let log = pull_all(&gateway.api_url, "orders", "verify").await;
        let ids: Vec<&str> = log
            .iter()
            .map(|m| m["event"]["requestContext"]["messageId"].as_str().unwrap())
            .collect();
        let unique: std::collections::HashSet<&str> = ids.iter().copied().collect();
        assert_eq!(
            unique.len(),
            ids.len(),
            "round {round}: an entry appears twice"
        );
        for id in &acked_before {
            assert!(
                unique.contains(id.as_str()),
                "round {round}: acked {id} lost"
            );
        }
        for entry in &log {
            assert_eq!(
                entry["offset"].as_u64().unwrap(),
                next_offset,
                "dense offsets"
            );
            next_offset += 1;
        }
        if round == 20 {
            break;
        }
        total_acked += acked_before.len();
        moment ^= moment << 13;
        moment ^= moment >> 7;
        moment ^= moment << 17;
        let kill_after = Duration::from_millis(15 + moment % 236);
        acked_before = stream_until_killed(&mut gateway, round, kill_after).await;
    }
    total_acked += acked_before.len();
    assert!(
        total_acked > 1000,
        "only {total_acked} appends were acked: no real stream"
    );
    assert!(next_offset >= total_acked as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_queue_segment_is_refused_by_name_until_repair_is_asked_for() {
    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let body = |repair: bool| {
        format!(
            "[storage]\nfsync = \"always\"\nrepair = {repair}\n{}\n[routes.order]\nintegration = {{ type = \"queue\", queue = \"orders\", ack = true }}\n",
            config_with(&backend, ""),
        )
    };
    let path = write_config(dir.path(), &body(false));
    let mut gateway = GatewayProcess::start(&path, &[]);
    let (mut ws, _) = tokio_tungstenite::connect_async(&gateway.ws_url)
        .await
        .unwrap();
    for seq in 0..20 {
        let frame = serde_json::json!({"action": "order", "seq": seq}).to_string();
        send_text(&mut ws, &frame).await;
        assert_eq!(next_json(&mut ws).await["type"], "ack");
    }
    gateway.signal("-TERM");
    gateway.wait(Duration::from_secs(15));

    let segment = dir
        .path()
        .join("data/queues/q-orders/00000000000000000000.seg");
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&segment, &bytes).unwrap();

    let (code, stderr) = refused_start(&path, Duration::from_secs(15));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("corrupt record at byte"), "{stderr}");
    assert!(stderr.contains("q-orders"), "{stderr}");
    assert!(stderr.contains("repair = true"), "{stderr}");
    assert_eq!(std::fs::read(&segment).unwrap(), bytes, "left untouched");

    write_config(dir.path(), &body(true));
    let repaired = GatewayProcess::start(&path, &[]);
    let log = pull_all(&repaired.api_url, "orders", "check").await;
    assert!(
        !log.is_empty() && log.len() < 20,
        "{} entries kept",
        log.len()
    );
    let offsets: Vec<u64> = log.iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, (0..log.len() as u64).collect::<Vec<_>>());
    let (mut ws, _) = tokio_tungstenite::connect_async(&repaired.ws_url)
        .await
        .unwrap();
    send_text(&mut ws, &serde_json::json!({"action": "order"}).to_string()).await;
    assert_eq!(next_json(&mut ws).await["type"], "ack", "appends resume");
}

/// Connections cut by a crash have no session left to report them: a backend that refuses
/// the restarted gateway's reports at first (503) gets each again until it takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_of_cut_connections_are_sent_again_while_the_backend_refuses_them() {
    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let routes = format!(
        "[routes.\"$connect\"]\nintegration = {{ type = \"http\", url = \"{url}/connect-log\" }}\n\
         [routes.\"$disconnect\"]\nintegration = {{ type = \"http\", url = \"{url}/fail-first/6\" }}\n",
        url = backend.url
    );
    let path = write_config(dir.path(), &routes);
    let mut gateway = GatewayProcess::start(&path, &[]);
    let (_client, _) = tokio_tungstenite::connect_async(&gateway.ws_url)
        .await
        .unwrap();
    let id = backend.connected_ids(1).await.remove(0);
    // Refused six times (once more than an earlier version tried, over some 7 s), the
    // report is sent again until the backend takes it.
    gateway.child.kill().unwrap();
    gateway.child.wait().unwrap();

    let _restarted = GatewayProcess::start(&path, &[]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while backend.events("/fail-first/6").len() < 7 {
        assert!(tokio::time::Instant::now() < deadline, "reported again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calls = backend.events("/fail-first/6");
    assert!(calls.iter().all(|event| connection_id(event) == id));
    assert_eq!(
        calls[6]["requestContext"]["disconnectReason"],
        "gateway restarted"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        backend.events("/fail-first/6").len(),
        7,
        "taken once: no more calls"
    );
}
