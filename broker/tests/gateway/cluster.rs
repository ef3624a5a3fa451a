//! Cluster mode as users run it: three `switchboard` processes on one real nats-server
//! (or a three-server JetStream cluster), real clients on every node, a real backend.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::binary::{GatewayProcess, refused_start};
use crate::nats::{self, NatsServer};
use crate::support::*;

/// Cluster timings short enough for tests.
const CLUSTER_TIMINGS: &str = "heartbeat_ms = 250\nnode_timeout_ms = 3000\nrequest_timeout_ms = 500\ngather_wait_ms = 300\nmirror_interval_ms = 20\n";

/// One node's data dir and config file.
pub(crate) struct NodeFiles {
    _dir: tempfile::TempDir,
    pub(crate) config: PathBuf,
}

pub(crate) fn node_files(
    node_id: u16,
    nats_urls: &[String],
    backend: &Backend,
    extra: &str,
) -> NodeFiles {
    node_files_with_routes(node_id, nats_urls, &config_with(backend, extra))
}

/// A node's files with `routes` (and anything else) added to the cluster settings.
fn node_files_with_routes(node_id: u16, nats_urls: &[String], routes: &str) -> NodeFiles {
    node_files_listening_on("127.0.0.1", node_id, nats_urls, routes)
}

/// [`node_files_with_routes`], its client listener on `ip` (the management API stays on
/// the loopback: elsewhere it would need tokens).
pub(crate) fn node_files_listening_on(
    ip: &str,
    node_id: u16,
    nats_urls: &[String],
    routes: &str,
) -> NodeFiles {
    let dir = tempfile::tempdir().unwrap();
    let urls = nats_urls
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        r#"[server]
listen = "{ip}:0"
shards = 2
node_id = {node_id}
data_dir = "{data}"
[management]
listen = "127.0.0.1:0"
[cluster]
nats_url = [{urls}]
{CLUSTER_TIMINGS}
[routes.join]
integration = {{ type = "room_join", room = "$request.body.room" }}
[routes.publish]
integration = {{ type = "room_publish", room = "$request.body.room", data = "$request.body.data", exclude_sender = true }}
{routes}"#,
        data = dir.path().join("data").display(),
    );
    let config = dir.path().join("switchboard.toml");
    std::fs::write(&config, text).unwrap();
    NodeFiles { _dir: dir, config }
}

/// Starts a node and waits until it has joined the cluster (its management API, which
/// starts after the join, answers `/health`).
pub(crate) async fn start_node(files: &NodeFiles) -> GatewayProcess {
    let node = GatewayProcess::start(&files.config, &[]);
    wait_until_joined(&node).await;
    node
}

/// Waits (30 s at most) until `node`'s `/health` answers 200: it has joined the cluster.
pub(crate) async fn wait_until_joined(node: &GatewayProcess) {
    let url = format!("http://{}/health", node.api_addr());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !http()
        .get(&url)
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node joins within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Three nodes (ids 1, 2, 3) on `nats_urls`, with their files.
pub(crate) async fn start_nodes(
    nats_urls: &[String],
    backend: &Backend,
    extra: &str,
) -> (Vec<GatewayProcess>, Vec<NodeFiles>) {
    let files: Vec<NodeFiles> = (1..=3)
        .map(|id| node_files(id, nats_urls, backend, extra))
        .collect();
    let mut nodes = Vec::new();
    for file in &files {
        nodes.push(start_node(file).await);
    }
    (nodes, files)
}

/// Connects a client to `node` and returns it with its connectionId (from `$connect`).
pub(crate) async fn connect(node: &GatewayProcess, backend: &Backend) -> (Ws, String) {
    let before = backend.events("/connect-log").len();
    let (ws, _) = tokio_tungstenite::connect_async(&node.ws_url)
        .await
        .unwrap();
    let ids = backend.connected_ids(before + 1).await;
    (ws, ids[before].clone())
}

/// Asserts that `ws` receives no data frame within `quiet`.
async fn assert_silent(ws: &mut Ws, quiet: Duration) {
    if let Ok(Some(Ok(message))) = tokio::time::timeout(quiet, ws.next()).await {
        assert!(
            matches!(message, Message::Ping(_) | Message::Pong(_)),
            "unexpected extra message: {message:?}"
        );
    }
}

pub(crate) async fn join(ws: &mut Ws, room: &str) {
    send_text(ws, &json!({"action": "join", "room": room}).to_string()).await;
}

/// Waits until `GET /@rooms/{room}` through `node` counts `count` members.
pub(crate) async fn wait_for_members(node: &GatewayProcess, room: &str, count: usize) -> Value {
    let url = format!("{}/@rooms/{room}", node.api_url);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listing: Value = http().get(&url).send().await.unwrap().json().await.unwrap();
        if listing["count"] == count {
            return listing;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "room {room} reached {count} members: {listing}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_status_and_delete_reach_a_connection_on_another_node() {
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let (nodes, _files) = start_nodes(&[server.url()], &backend, "").await;
    let (mut client, id) = connect(&nodes[2], &backend).await;

    let post = post_body(
        format!("{}/@connections/{id}", nodes[0].api_url),
        "hello from node 1",
    )
    .await;
    assert_eq!(post.status(), 200);
    assert_eq!(next_text(&mut client).await, "hello from node 1");

    let status = http()
        .get(format!("{}/@connections/{id}", nodes[1].api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), 200);
    let status: Value = status.json().await.unwrap();
    assert_eq!(status["identity"]["sourceIp"], "127.0.0.1");
    assert!(status["connectedAt"].as_str().unwrap().ends_with('Z'));

    let delete = http()
        .delete(format!("{}/@connections/{id}", nodes[0].api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 204);
    assert_eq!(close_code(&mut client).await, 1000);
    backend
        .wait_for("/disconnect", |e| connection_id(e) == id)
        .await;

    // Gone everywhere, and the error is the AWS one SDKs understand.
    for node in &nodes {
        let gone = post_body(format!("{}/@connections/{id}", node.api_url), "late").await;
        assert_eq!(gone.status(), 410, "through {}", node.api_url);
        assert_eq!(gone.headers()["x-amzn-ErrorType"], "GoneException");
    }
    // An id of a node that does not exist: nobody answers, 410 within the timeout.
    let started = std::time::Instant::now();
    let foreign = id.replace(&id[..3], "AAk");
    let answer = post_body(format!("{}/@connections/{foreign}", nodes[0].api_url), "x").await;
    assert_eq!(answer.status(), 410);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_on_three_nodes_gets_each_broadcast_once_through_any_node() {
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let (nodes, _files) = start_nodes(&[server.url()], &backend, "").await;
    let mut members = Vec::new();
    for node in &nodes {
        for _ in 0..2 {
            let (mut ws, id) = connect(node, &backend).await;
            join(&mut ws, "lobby").await;
            members.push((ws, id));
        }
    }
    // Not a member: must get nothing.
    let (mut outsider, _) = connect(&nodes[1], &backend).await;
    let listing = wait_for_members(&nodes[0], "lobby", 6).await;
    let mut listed: Vec<String> = listing["connectionIds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    let mut expected: Vec<String> = members.iter().map(|(_, id)| id.clone()).collect();
    expected.sort();
    assert_eq!(listed, expected);
    // Presence lists the same members through every node (no authorizer: no users).
    for node in &nodes {
        let url = format!("{}/@rooms/lobby/presence", node.api_url);
        let presence: Value = http().get(url).send().await.unwrap().json().await.unwrap();
        assert_eq!(
            (presence["count"].clone(), presence["users"].clone()),
            (json!(6), json!(0))
        );
        let mut present: Vec<String> = (presence["members"].as_array().unwrap().iter())
            .map(|m| m["connectionId"].as_str().unwrap().to_owned())
            .collect();
        present.sort();
        assert_eq!(present, expected, "through {}", node.api_url);
    }

    for (round, node) in nodes.iter().enumerate() {
        let text = format!("broadcast {round}");
        let answer: Value =
            post_for_json(format!("{}/@rooms/lobby", node.api_url), text.clone()).await;
        assert_eq!(answer["delivered"], 6, "through node {}", round + 1);
        for (ws, _) in &mut members {
            assert_eq!(next_text(ws).await, text);
        }
    }

    // `exclude` names a member on another node than the one that takes the POST.
    let excluded = members[4].1.clone();
    let answer: Value = post_for_json(
        format!("{}/@rooms/lobby?exclude={excluded}", nodes[0].api_url),
        "all but one",
    )
    .await;
    assert_eq!(answer["delivered"], 5);
    for (index, (ws, _)) in members.iter_mut().enumerate() {
        if index != 4 {
            assert_eq!(next_text(ws).await, "all but one");
        }
    }

    // A client's room_publish on node 2 reaches every other member once, cluster-wide.
    let publish = json!({"action": "publish", "room": "lobby", "data": "from a client"});
    send_text(&mut members[2].0, &publish.to_string()).await;
    for (index, (ws, _)) in members.iter_mut().enumerate() {
        if index != 2 {
            assert_eq!(next_text(ws).await, "from a client");
        }
    }
    for (ws, _) in &mut members {
        assert_silent(ws, Duration::from_millis(300)).await;
    }
    assert_silent(&mut outsider, Duration::from_millis(100)).await;

    // Membership of a connection on node 3 changed through node 1.
    let (mut late, late_id) = connect(&nodes[2], &backend).await;
    let put = http()
        .put(format!(
            "{}/@rooms/lobby/connections/{late_id}",
            nodes[0].api_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 204);
    wait_for_members(&nodes[1], "lobby", 7).await;
    let answer: Value = post_for_json(format!("{}/@rooms/lobby", nodes[1].api_url), "seven").await;
    assert_eq!(answer["delivered"], 7);
    assert_eq!(next_text(&mut late).await, "seven");
    let delete = http()
        .delete(format!(
            "{}/@rooms/lobby/connections/{late_id}",
            nodes[1].api_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 204);
    wait_for_members(&nodes[0], "lobby", 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_costs_one_nats_message_per_interested_node() {
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let (nodes, _files) = start_nodes(&[server.url()], &backend, "").await;
    // Members on nodes 2 and 3 only; the POST goes to node 1.
    let mut members = Vec::new();
    for node in &nodes[1..] {
        let (mut ws, _) = connect(node, &backend).await;
        join(&mut ws, "ticker").await;
        members.push(ws);
    }
    wait_for_members(&nodes[0], "ticker", 2).await;
    let before = server.varz("out_msgs").await;
    const BROADCASTS: u64 = 20;
    for _ in 0..BROADCASTS {
        let answer: Value =
            post_for_json(format!("{}/@rooms/ticker", nodes[0].api_url), "tick").await;
        assert_eq!(answer["delivered"], 2);
    }
    let sent = server.varz("out_msgs").await - before;
    // Per broadcast: one copy to each of the two interested nodes and their two counts
    // back, plus heartbeats and mirror traffic meanwhile (a few per second).
    let per_broadcast = sent as f64 / BROADCASTS as f64;
    assert!(
        per_broadcast < 6.0,
        "{per_broadcast} NATS messages out per broadcast"
    );
    for ws in &mut members {
        for _ in 0..BROADCASTS {
            assert_eq!(next_text(ws).await, "tick");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_push_spans_nodes_with_one_request_per_node() {
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let (nodes, _files) = start_nodes(&[server.url()], &backend, "").await;
    let mut clients = Vec::new();
    for node in &nodes {
        for _ in 0..3 {
            clients.push(connect(node, &backend).await);
        }
    }
    // One client on node 3 leaves: its id is gone.
    let (mut leaving, gone_id) = clients.remove(8);
    leaving.close(None).await.unwrap();
    backend
        .wait_for("/disconnect", |e| connection_id(e) == gone_id)
        .await;
    let mut ids: Vec<String> = clients.iter().map(|(_, id)| id.clone()).collect();
    ids.push(gone_id.clone());
    ids.push("not-an-id".into());
    let before = nodes[0]
        .metric("switchboard_cluster_forwarded_total{kind=\"bulk\"}")
        .await;
    let answer = bulk_send(&nodes[0].api_url, &ids, "to all").await;
    assert_eq!(answer["delivered"], 8);
    assert_eq!(answer["gone"], json!([gone_id, "not-an-id"]));
    let after = nodes[0]
        .metric("switchboard_cluster_forwarded_total{kind=\"bulk\"}")
        .await;
    assert_eq!(after - before, 2.0, "one request to each other node");
    for (ws, _) in &mut clients {
        assert_eq!(next_text(ws).await, "to all");
        assert_silent(ws, Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_reported_once_and_the_others_carry_on() {
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let (mut nodes, files) = start_nodes(&[server.url()], &backend, "").await;
    let (mut survivor, survivor_id) = connect(&nodes[0], &backend).await;
    let mut doomed = Vec::new();
    for _ in 0..5 {
        doomed.push(connect(&nodes[2], &backend).await);
    }
    // Let the mirror catch up (it batches every 20 ms here).
    tokio::time::sleep(Duration::from_millis(300)).await;

    nodes[2].child.kill().unwrap(); // SIGKILL
    nodes[2].child.wait().unwrap();
    for (ws, _) in &mut doomed {
        let cut = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
        assert!(
            matches!(cut, Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_))))),
            "client of the killed node is cut: {cut:?}"
        );
    }
    for (_, id) in &doomed {
        let event = backend
            .wait_for("/disconnect", |e| connection_id(e) == *id)
            .await;
        assert_eq!(event["requestContext"]["disconnectReason"], "node lost");
    }
    // The others keep working: a push through node 2 to node 1's client.
    let post = post_body(
        format!("{}/@connections/{survivor_id}", nodes[1].api_url),
        "still here",
    )
    .await;
    assert_eq!(post.status(), 200);
    assert_eq!(next_text(&mut survivor).await, "still here");
    // Pushes to the dead node's connections: 410.
    let dead = post_body(
        format!("{}/@connections/{}", nodes[0].api_url, doomed[0].1),
        "x",
    )
    .await;
    assert_eq!(dead.status(), 410);

    // The node comes back on its old data dir: nothing is reported twice.
    let restarted = start_node(&files[2]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (_, id) in &doomed {
        let reports = backend
            .events("/disconnect")
            .iter()
            .filter(|e| connection_id(e) == *id)
            .count();
        assert_eq!(reports, 1, "{id} reported once");
    }
    let takeovers = nodes[0]
        .metric("switchboard_cluster_node_takeovers_total")
        .await
        + nodes[1]
            .metric("switchboard_cluster_node_takeovers_total")
            .await;
    assert_eq!(takeovers, 1.0);
    // And the restarted node serves again.
    let (mut again, again_id) = connect(&restarted, &backend).await;
    let post = post_body(
        format!("{}/@connections/{again_id}", nodes[0].api_url),
        "welcome back",
    )
    .await;
    assert_eq!(post.status(), 200);
    assert_eq!(next_text(&mut again).await, "welcome back");
    drop(files);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_reports_its_own_crash_once() {
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let files = node_files(7, &[server.url()], &backend, "");
    let mut node = start_node(&files).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect(&node, &backend).await);
    }
    let cut: Vec<String> = clients.iter().map(|(_, id)| id.clone()).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    // Back before any other node could notice (there is none): it reports them itself.
    let restarted = GatewayProcess::start(&files.config, &[]);
    for id in &cut {
        let event = backend
            .wait_for("/disconnect", |e| connection_id(e) == *id)
            .await;
        assert_eq!(event["requestContext"]["disconnectReason"], "node lost");
    }
    // Once the node has marked its crash reported, another crash and restart report
    // nothing again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while restarted
        .metric("switchboard_cluster_node_takeovers_total")
        .await
        < 1.0
    {
        assert!(tokio::time::Instant::now() < deadline, "recovery finishes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(restarted);
    drop(clients);
    let again = start_node(&files).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(backend.events("/disconnect").len(), 3, "no second report");
    drop(again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_node_id_refuses_to_start() {
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let first = node_files(4, &[server.url()], &backend, "");
    let _running = start_node(&first).await;
    let second = node_files(4, &[server.url()], &backend, "");
    let config = second.config.clone();
    let (code, stderr) =
        tokio::task::spawn_blocking(move || refused_start(&config, Duration::from_secs(20)))
            .await
            .unwrap();
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("server.node_id 4 is held by a live node"),
        "{stderr}"
    );
}

/// A node's config with `line` added to its `[cluster]` table.
fn with_cluster_key(files: &NodeFiles, line: &str) {
    let text = std::fs::read_to_string(&files.config).unwrap();
    let text = text.replace("[cluster]\n", &format!("[cluster]\n{line}\n"));
    std::fs::write(&files.config, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_credentials_are_used_and_a_wrong_one_is_a_clear_refusal() {
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start_with_token(&binary, "s3cret");
    let backend = Backend::start().await;
    let good = node_files(1, &[server.url()], &backend, "");
    with_cluster_key(&good, "token = \"s3cret\"");
    let node = start_node(&good).await;
    let (mut client, id) = connect(&node, &backend).await;
    let post = post_body(
        format!("{}/@connections/{id}", node.api_url),
        "authenticated",
    )
    .await;
    assert_eq!(post.status(), 200);
    assert_eq!(next_text(&mut client).await, "authenticated");

    let bad = node_files(2, &[server.url()], &backend, "");
    with_cluster_key(&bad, "token = \"wrong\"");
    let config = bad.config.clone();
    let (code, log) =
        tokio::task::spawn_blocking(move || refused_start(&config, Duration::from_secs(20)))
            .await
            .unwrap();
    assert_ne!(code, Some(0));
    assert!(log.contains("cannot reach NATS at"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_degrades_health_then_service_resumes_by_itself() {
    let Some(binary) = nats::binary() else { return };
    let mut server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let (nodes, _files) = start_nodes(&[server.url()], &backend, "").await;
    let (mut client, id) = connect(&nodes[1], &backend).await;
    let (mut member, _) = connect(&nodes[2], &backend).await;
    join(&mut member, "news").await;
    wait_for_members(&nodes[0], "news", 1).await;

    server.kill();
    let health_url = format!("{}/health", nodes[0].api_url.trim_end_matches("/dev"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let degraded = loop {
        let response = http().get(&health_url).send().await.unwrap();
        if response.status() == 503 {
            break response.json::<Value>().await.unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health turns degraded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(degraded["status"], "degraded");
    assert!(degraded["reason"].as_str().unwrap().contains("NATS"));
    assert_eq!(
        nodes[0].metric("switchboard_cluster_nats_connected").await,
        0.0
    );
    // Cross-node calls fail loudly meanwhile; local clients are still served.
    let post = post_body(format!("{}/@connections/{id}", nodes[0].api_url), "x").await;
    assert_eq!(post.status(), 503);
    let local = post_body(format!("{}/@connections/{id}", nodes[1].api_url), "local").await;
    assert_eq!(local.status(), 200);
    assert_eq!(next_text(&mut client).await, "local");

    server.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let healthy = http().get(&health_url).send().await.unwrap().status() == 200;
        let pushed = post_body(
            format!("{}/@connections/{id}", nodes[0].api_url),
            "after the restart",
        )
        .await
        .status()
            == 200;
        if healthy && pushed {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "service resumes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(next_text(&mut client).await, "after the restart");
    // Room interest was re-established too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer: Value =
            post_for_json(format!("{}/@rooms/news", nodes[0].api_url), "headline").await;
        if answer["delivered"] == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "room reachable again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(next_text(&mut member).await, "headline");
    // No node was declared lost by the outage.
    for node in &nodes {
        assert_eq!(
            node.metric("switchboard_cluster_node_takeovers_total")
                .await,
            0.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_queue_messages_survive_a_node_kill_on_a_replicated_jetstream() {
    let Some(binary) = nats::binary() else { return };
    let servers = nats::start_cluster(&binary).await;
    let urls: Vec<String> = servers.iter().map(NatsServer::url).collect();
    let backend = Backend::start().await;
    let queue_route = format!(
        "[queues.orders]\nbatch_size = 20\n[routes.order]\nintegration = {{ type = \"queue\", queue = \"orders\", ack = true, deliver_to = \"{}/delivered\" }}\n",
        backend.url
    );
    let (mut nodes, _files) = start_nodes(&urls, &backend, &queue_route).await;
    let (mut client, _) = connect(&nodes[2], &backend).await;
    const ORDERS: usize = 200;
    for seq in 0..ORDERS {
        send_text(
            &mut client,
            &json!({"action": "order", "seq": seq}).to_string(),
        )
        .await;
    }
    let mut acked = Vec::new();
    while acked.len() < ORDERS {
        let ack = next_json(&mut client).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        acked.push(ack["messageId"].as_str().unwrap().to_owned());
    }
    nodes[2].child.kill().unwrap();
    nodes[2].child.wait().unwrap();

    // Every acked message is readable through another node, in order.
    let url = format!(
        "{}/@queues/orders/messages?group=audit&max=1000",
        nodes[0].api_url
    );
    let pulled: Value = http().get(&url).send().await.unwrap().json().await.unwrap();
    let messages = pulled["messages"].as_array().unwrap();
    let ids: Vec<&str> = messages
        .iter()
        .map(|m| m["event"]["requestContext"]["messageId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, acked.iter().map(String::as_str).collect::<Vec<_>>());
    let offsets: Vec<u64> = messages
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, (0..ORDERS as u64).collect::<Vec<_>>());
    assert_eq!(pulled["next"], ORDERS);
    // Committing through one node is seen through another.
    let commit = http()
        .post(format!("{}/@queues/orders/commit", nodes[1].api_url))
        .json(&json!({"group": "audit", "offset": 150}))
        .send()
        .await
        .unwrap();
    assert_eq!(commit.status(), 200);
    let rest: Value = http().get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(rest["messages"].as_array().unwrap().len(), ORDERS - 150);
    // Depth and lag gauges come from JetStream in cluster mode.
    let lag = nodes[0]
        .metric("switchboard_queue_consumer_lag{group=\"audit\",queue=\"orders\"}")
        .await;
    assert_eq!(lag, 50.0);
    assert_eq!(
        nodes[1].metric("switchboard_queue_depth").await,
        ORDERS as f64
    );
    // Past the end: a clear 400.
    let past = http()
        .post(format!("{}/@queues/orders/commit", nodes[1].api_url))
        .json(&json!({"group": "audit", "offset": 10_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(past.status(), 400);

    // The push deliverer (one batch of up to 20 at a time cluster-wide) delivers every
    // message, in order; a batch the killed node was delivering goes to another node after
    // the ack wait (5 s).
    let delivered = || -> Vec<String> {
        backend
            .events("/delivered")
            .iter()
            .flat_map(|batch| batch["Records"].as_array().unwrap().clone())
            .map(|e| {
                e["requestContext"]["messageId"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let distinct: std::collections::HashSet<String> = delivered().into_iter().collect();
        if distinct.len() >= ORDERS {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {ORDERS} pushed",
            distinct.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delivered = delivered();
    let mut first_seen = Vec::new();
    for id in &delivered {
        if !first_seen.contains(id) {
            first_seen.push(id.clone());
        }
    }
    assert_eq!(first_seen, acked, "pushed in order");

    // One NATS server of the three dies: the replicated queue still serves reads.
    let mut servers = servers;
    drop(servers.remove(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let response = http().get(&url).send().await.unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        if status == 200
            && body["messages"]
                .as_array()
                .is_some_and(|m| m.len() == ORDERS - 150)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue readable after a NATS server died: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_nodes_connections_are_reported_with_their_authorizer_context() {
    use crate::authorizers::{SECRET, claims, hs256};
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let authorizer = format!(
        "[authorizer]\ntype = \"jwt\"\ntoken = \"query:token\"\nsecret = \"{SECRET}\"\naudience = \"switchboard\"\n"
    );
    let survivor_files = node_files(1, &[server.url()], &backend, &authorizer);
    let doomed_files = node_files(2, &[server.url()], &backend, &authorizer);
    let _survivor = start_node(&survivor_files).await;
    let mut doomed = start_node(&doomed_files).await;
    let token = hs256(claims("switchboard", 600), SECRET);
    let url = format!("{}?token={token}", doomed.ws_url);
    let (_client, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let id = connection_id(&backend.wait_for("/connect-log", |_| true).await);
    tokio::time::sleep(Duration::from_millis(300)).await; // the mirror batches every 20 ms
    doomed.child.kill().unwrap();
    doomed.child.wait().unwrap();
    let event = backend
        .wait_for("/disconnect", |e| connection_id(e) == id)
        .await;
    assert_eq!(event["requestContext"]["disconnectReason"], "node lost");
    assert_eq!(event["requestContext"]["authorizer"]["plan"], "gold");
    assert_eq!(
        event["requestContext"]["authorizer"]["principalId"],
        "alice"
    );
}

/// Waits until `node` holds `count` parked connections.
async fn parked_on(node: &GatewayProcess, count: f64) {
    for _ in 0..200 {
        if node.metric("switchboard_connections_parked").await == count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never {count} parked on {}", node.api_url);
}

/// A resumable connection opened on `node` whose client went away: parked there. Returns
/// its connectionId and resume token.
async fn parked_session(node: &GatewayProcess) -> (String, String) {
    let (ws, id, token) = open_resumable(&node.ws_url).await;
    drop(ws);
    parked_on(node, 1.0).await;
    (id, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_to_the_node_its_client_resumes_on_and_keeps_its_id() {
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let extra = "[api]\nresume = true\n";
    let (nodes, _files) = start_nodes(&[server.url()], &backend, extra).await;
    let (mut ws, id, mut token) = open_resumable(&nodes[0].ws_url).await;
    let member = format!("{}/@rooms/lobby/connections/{id}", nodes[1].api_url);
    assert_eq!(http().put(&member).send().await.unwrap().status(), 204);
    let push = |through: usize, body: &'static str| {
        let url = format!("{}/@connections/{id}", nodes[through].api_url);
        async move { post_body(url, body).await.status() }
    };
    assert_eq!(push(2, "one").await, 200);
    assert_eq!(next_text(&mut ws).await, "one");
    let mut received = 1;
    // Resume on node 2, then on node 3: the session moves each time.
    for (from, to) in [(0, 1), (1, 2)] {
        drop(ws);
        parked_on(&nodes[from], 1.0).await;
        assert_eq!(push(2, "held").await, 200, "held while parked");
        let url = format!("{}?resume={token}&received={received}", nodes[to].ws_url);
        let (next, first) = open_and_read_first(&url).await;
        ws = next;
        assert_eq!(first["type"], "resumed", "{first}");
        assert_eq!(first["connectionId"], id.as_str(), "the same connectionId");
        assert_eq!(first["replayed"], 1);
        token = first["resumeToken"]
            .as_str()
            .expect("a token for the new node")
            .to_owned();
        assert_eq!(next_text(&mut ws).await, "held");
        received += 1;
        // Pushes through every node reach it (the id names the first node: forwarded).
        for through in 0..3 {
            assert_eq!(
                push(through, "pushed").await,
                200,
                "through node {}",
                through + 1
            );
            assert_eq!(next_text(&mut ws).await, "pushed");
            received += 1;
        }
        // So do bulk sends naming it, through every node.
        for (through, node) in nodes.iter().enumerate() {
            let answer = bulk_send(&node.api_url, std::slice::from_ref(&id), "bulk").await;
            assert_eq!(
                answer["delivered"],
                1,
                "bulk through node {}: {answer}",
                through + 1
            );
            assert_eq!(next_text(&mut ws).await, "bulk");
            received += 1;
        }
        // Its rooms came along, and a broadcast that excludes it by its id, through any
        // node, still skips it.
        for node in &nodes {
            let excluding = format!("{}/@rooms/lobby?exclude={id}", node.api_url);
            assert!(
                post_body(excluding, "not to it")
                    .await
                    .status()
                    .is_success()
            );
        }
        let room = format!("{}/@rooms/lobby", nodes[0].api_url);
        assert!(post_body(room, "to the room").await.status().is_success());
        assert_eq!(next_text(&mut ws).await, "to the room");
        received += 1;
        parked_on(&nodes[from], 0.0).await;
    }
    let status = http()
        .get(format!("{}/@connections/{id}", nodes[0].api_url))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    assert!(
        backend.events("/disconnect").is_empty(),
        "a move is not a disconnect"
    );
    let connects = backend.events("/connect-log");
    assert_eq!(connects.len(), 3);
    assert!(
        connects[1..]
            .iter()
            .all(|c| connection_id(c) == id && c["requestContext"]["resumed"] == true)
    );
    // DELETE through the first node ends it where it lives now: exactly one $disconnect.
    let delete = http()
        .delete(format!("{}/@connections/{id}", nodes[0].api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 204);
    assert_eq!(close_code(&mut ws).await, 1000);
    let (_, reason) = status_and_reason(&disconnect_event(&backend, &id).await);
    assert_eq!(reason, "connection deleted via @connections");
}

/// A session that moved off node 1, which then died: its forwarding died with it, but calls
/// and bulk sends naming the session's first id still reach it, through every node (each
/// asks the live nodes where it went); a connection that died with node 1 is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_moved_off_a_node_that_died_is_still_reached_by_calls_and_bulk_sends() {
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let (mut nodes, _files) =
        start_nodes(&[server.url()], &backend, "[api]\nresume = true\n").await;
    let (_dies, dead_id, _) = open_resumable(&nodes[0].ws_url).await;
    let (moved_id, token) = parked_session(&nodes[0]).await;
    let url = format!("{}?resume={token}&received=0", nodes[1].ws_url);
    let (mut moved, first) = open_and_read_first(&url).await;
    assert_eq!(first["type"], "resumed", "{first}");
    let (mut local, local_id, _) = open_resumable(&nodes[2].ws_url).await;
    nodes[0].child.kill().unwrap();
    nodes[0].child.wait().unwrap();
    backend
        .wait_for("/disconnect", |e| connection_id(e) == dead_id)
        .await;
    for node in &nodes[1..] {
        let url = format!("{}/@connections/{moved_id}", node.api_url);
        assert_eq!(post_body(url, "pushed").await.status(), 200);
        assert_eq!(next_text(&mut moved).await, "pushed");
        let ids = [moved_id.clone(), local_id.clone(), dead_id.clone()];
        let answer = bulk_send(&node.api_url, &ids, "bulk").await;
        assert_eq!(answer["delivered"], 2, "{answer}");
        assert_eq!(answer["gone"], json!([dead_id]), "{answer}");
        assert_eq!(next_text(&mut moved).await, "bulk");
        assert_eq!(next_text(&mut local).await, "bulk");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_after_its_node_died_is_unknown_and_the_node_loss_report_stands() {
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let extra = "[api]\nresume = true\n";
    let (mut nodes, _files) = start_nodes(&[server.url()], &backend, extra).await;
    let (id, token) = parked_session(&nodes[0]).await;
    // Let the mirror catch up (it batches every 20 ms here), then kill the node.
    tokio::time::sleep(Duration::from_millis(300)).await;
    nodes[0].child.kill().unwrap();
    nodes[0].child.wait().unwrap();
    let url = format!("{}?resume={token}&received=0", nodes[1].ws_url);
    let (_ws, welcome) = open_and_read_first(&url).await;
    assert_eq!(welcome["resumed"], false);
    assert_eq!(welcome["reason"], "unknown");
    let (_, reason) = status_and_reason(&disconnect_event(&backend, &id).await);
    assert_eq!(reason, "node lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_during_a_move_wait_for_the_connection_instead_of_finding_it_gone() {
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    // `$connect` takes a second over resumes: a window in which the old node has let go of
    // the connection and the new one has not registered it yet.
    let routes = crate::resume::slow_resume_config(&backend, 60);
    let files: Vec<NodeFiles> = (1..=2)
        .map(|id| node_files_with_routes(id, &[server.url()], &routes))
        .collect();
    let mut nodes = Vec::new();
    for file in &files {
        nodes.push(start_node(file).await);
    }
    let (ws, id, token) = open_resumable(&nodes[0].ws_url).await;
    let member = |room: &str| format!("{}/@rooms/{room}/connections/{id}", nodes[0].api_url);
    assert_eq!(
        http().put(member("lobby")).send().await.unwrap().status(),
        204
    );
    drop(ws);
    parked_on(&nodes[0], 1.0).await;
    let url = format!("{}?resume={token}&received=0", nodes[1].ws_url);
    let resuming = tokio::spawn(async move { open_and_read_first(&url).await });
    // Node 1 has handed the connection over; node 2 is still running `$connect` (and
    // subscribes to the connection's rooms at once).
    parked_on(&nodes[0], 0.0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (through, node) in nodes.iter().enumerate() {
        let push = post_body(format!("{}/@connections/{id}", node.api_url), "pushed").await;
        assert_eq!(push.status(), 200, "a push through node {}", through + 1);
    }
    let room = format!("{}/@rooms/lobby", nodes[0].api_url);
    assert!(
        post_body(format!("{room}?exclude={id}"), "not to it")
            .await
            .status()
            .is_success()
    );
    assert!(
        post_body(room.clone(), "to the room")
            .await
            .status()
            .is_success()
    );
    assert_eq!(
        http().put(member("kitchen")).send().await.unwrap().status(),
        204
    );
    let (mut ws, first) = resuming.await.unwrap();
    assert_eq!(first["type"], "resumed", "{first}");
    for expected in ["pushed", "pushed", "to the room"] {
        assert_eq!(next_text(&mut ws).await, expected);
    }
    // The join that waited for it took effect (and node 2 now listens to that room).
    wait_for_members(&nodes[0], "kitchen", 1).await;
    let kitchen = format!("{}/@rooms/kitchen", nodes[0].api_url);
    assert!(
        post_body(kitchen, "to the kitchen")
            .await
            .status()
            .is_success()
    );
    assert_eq!(next_text(&mut ws).await, "to the kitchen");
    assert!(backend.events("/disconnect").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_resume_across_nodes_rotates_the_token_and_a_spent_one_is_refused() {
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let extra = "[api]\nresume = true\n";
    let (nodes, _files) = start_nodes(&[server.url()], &backend, extra).await;
    let (id, mut token) = parked_session(&nodes[0]).await;
    let mut spent = Vec::new();
    // The session moves to node 2, resumes there, moves on to node 3 (which asks node 2),
    // then comes back to node 1: each time with the token the last resumed frame brought.
    let mut parked = 0;
    for (received, to) in [1, 1, 2, 0].into_iter().enumerate() {
        let url = format!("{}?resume={token}&received={received}", nodes[to].ws_url);
        let (mut ws, first) = open_and_read_first(&url).await;
        assert_eq!(first["type"], "resumed", "on node {}: {first}", to + 1);
        assert_eq!(first["connectionId"], id.as_str());
        spent.push(std::mem::replace(
            &mut token,
            first["resumeToken"].as_str().unwrap().to_owned(),
        ));
        let push = format!("{}/@connections/{id}", nodes[0].api_url);
        assert_eq!(post_body(push, "here").await.status(), 200);
        assert_eq!(next_text(&mut ws).await, "here");
        drop(ws);
        if parked != to {
            parked_on(&nodes[parked], 0.0).await;
        }
        parked_on(&nodes[to], 1.0).await;
        parked = to;
    }
    // A token that was spent (it leaked with a URL, say) resumes nothing, on any node, and
    // the session stays for its client.
    for (node, old) in spent.iter().enumerate().map(|(n, t)| (n % 3, t)) {
        let url = format!("{}?resume={old}&received=4", nodes[node].ws_url);
        let (_ws, refused) = open_and_read_first(&url).await;
        assert_eq!(refused["resumed"], false, "on node {}: {refused}", node + 1);
        assert_ne!(refused["connectionId"], id.as_str());
    }
    let url = format!("{}?resume={token}&received=4", nodes[2].ws_url);
    let (_ws, first) = open_and_read_first(&url).await;
    assert_eq!(first["type"], "resumed", "{first}");
    assert_eq!(first["connectionId"], id.as_str());
    assert!(backend.events("/disconnect").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_session_that_ran_out_tells_its_client_it_expired() {
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let extra = "[api]\nresume = true\nresume_window_secs = 1\n";
    let (nodes, _files) = start_nodes(&[server.url()], &backend, extra).await;
    let (id, old_token) = parked_session(&nodes[0]).await;
    // It moves to node 2; the client stays away too long, then comes back with the token
    // the move gave it, to either node.
    let url = format!("{}?resume={old_token}&received=0", nodes[1].ws_url);
    let (ws, first) = open_and_read_first(&url).await;
    assert_eq!(first["type"], "resumed", "{first}");
    let token = first["resumeToken"].as_str().unwrap().to_owned();
    drop(ws);
    disconnect_event(&backend, &id).await;
    for node in [1, 0] {
        let url = format!("{}?resume={token}&received=0", nodes[node].ws_url);
        let (_ws, welcome) = open_and_read_first(&url).await;
        assert_eq!(welcome["resumed"], false, "{welcome}");
        assert_eq!(
            welcome["reason"],
            "expired",
            "on node {}: {welcome}",
            node + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_on_another_node_takes_over_a_socket_that_still_looks_alive() {
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let extra = "[api]\nresume = true\n";
    let (nodes, _files) = start_nodes(&[server.url()], &backend, extra).await;
    let (mut old, id, token) = open_resumable(&nodes[0].ws_url).await;
    let push = |body: &'static str| {
        let url = format!("{}/@connections/{id}", nodes[1].api_url);
        async move { post_body(url, body).await.status() }
    };
    assert_eq!(push("one").await, 200);
    assert_eq!(next_text(&mut old).await, "one");
    assert_eq!(push("two").await, 200);
    // The client gave up on its socket before node 1 noticed.
    let url = format!("{}?resume={token}&received=1", nodes[2].ws_url);
    let (mut new, first) = open_and_read_first(&url).await;
    assert_eq!(first["type"], "resumed", "{first}");
    assert_eq!(first["connectionId"], id.as_str());
    assert_eq!(next_text(&mut new).await, "two");
    assert_eq!(push("three").await, 200);
    assert_eq!(next_text(&mut new).await, "three");
    // The old socket was let go (after what had been written to it already).
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(message)) = old.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the old socket ends");
    assert!(backend.events("/disconnect").is_empty());
}

/// The `authorization { ... }` block of deploy/compose/nats.conf: the NATS users and
/// subject permissions the compose kit ships.
fn shipped_nats_authorization() -> String {
    let conf = include_str!("../../../deploy/compose/nats.conf");
    let start = conf.find("authorization {").expect("nats.conf has users");
    let mut depth = 0;
    for (offset, ch) in conf[start..].char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return conf[start..=start + offset].to_owned();
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced authorization block");
}

/// The passwords the shipped NATS config reads for its three node users.
const NODE_PASSWORDS: [(&str, &str); 3] = [
    ("NATS_NODE1_PASSWORD", "node-one-password"),
    ("NATS_NODE2_PASSWORD", "node-two-password"),
    ("NATS_NODE3_PASSWORD", "node-three-password"),
];

/// One loopback nats-server with `authorization` (TLS is the compose kit's business; a
/// password over nats:// is allowed to loopback only), and nodes 1 and 2 logged in as the
/// users `node1` and `node2`.
async fn nodes_as_nats_users(
    binary: &std::path::Path,
    authorization: &str,
    backend: &Backend,
    extra: &str,
) -> (NatsServer, Vec<GatewayProcess>, Vec<NodeFiles>) {
    let config = format!("jetstream {{}}\n{authorization}\n");
    let server = NatsServer::start_with_config(binary, &config, &NODE_PASSWORDS);
    let mut files = Vec::new();
    for (id, (_, password)) in (1..=2).zip(NODE_PASSWORDS) {
        let file = node_files(id, &[server.url()], backend, extra);
        let text = std::fs::read_to_string(&file.config).unwrap().replacen(
            "[cluster]\n",
            &format!("[cluster]\nuser = \"node{id}\"\npassword = \"{password}\"\n"),
            1,
        );
        std::fs::write(&file.config, text).unwrap();
        files.push(file);
    }
    let mut nodes = Vec::new();
    for file in &files {
        nodes.push(start_node(file).await);
    }
    (server, nodes, files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_work_under_the_least_privilege_nats_users_the_kit_ships() {
    let Some(binary) = nats::binary() else { return };
    let backend = Backend::start().await;
    let extra = "[api]\nresume = true\n[routes.order]\nintegration = { type = \"queue\", queue = \"orders\", ack = true }\n";
    let (_server, nodes, _files) =
        nodes_as_nats_users(&binary, &shipped_nats_authorization(), &backend, extra).await;
    // A push and a broadcast through the other node, an acked queue append, and a resume
    // that moves the session from node 1 to node 2: every subject a node uses.
    let (mut ws, id, token) = open_resumable(&nodes[0].ws_url).await;
    join(&mut ws, "lobby").await;
    wait_for_members(&nodes[1], "lobby", 1).await;
    let push = format!("{}/@connections/{id}", nodes[1].api_url);
    assert_eq!(post_body(push, "pushed via node 2").await.status(), 200);
    assert_eq!(next_text(&mut ws).await, "pushed via node 2");
    let room = format!("{}/@rooms/lobby", nodes[1].api_url);
    assert_eq!(post_body(room, "to the lobby").await.status(), 200);
    assert_eq!(next_text(&mut ws).await, "to the lobby");
    send_text(&mut ws, r#"{"action":"order","item":1}"#).await;
    assert_eq!(next_json(&mut ws).await["type"], "ack");
    drop(ws);
    parked_on(&nodes[0], 1.0).await;
    let url = format!("{}?resume={token}&received=3", nodes[1].ws_url);
    let (_ws, first) = open_and_read_first(&url).await;
    assert_eq!(first["type"], "resumed", "{first}");
    assert_eq!(first["connectionId"], id.as_str());
    assert!(backend.events("/disconnect").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_whose_answer_is_lost_is_reported_once_by_the_old_node() {
    let Some(binary) = nats::binary() else { return };
    let backend = Backend::start().await;
    // Node 1 may not publish replies: it hands a connection over, and its answer never
    // reaches the node that asked (as when NATS fails at that instant).
    let authorization =
        shipped_nats_authorization().replacen("\"$JS.FC.>\", \"_INBOX.>\"", "\"$JS.FC.>\"", 1);
    let (_server, nodes, _files) =
        nodes_as_nats_users(&binary, &authorization, &backend, "[api]\nresume = true\n").await;
    let (id, token) = parked_session(&nodes[0]).await;
    let url = format!("{}?resume={token}&received=0", nodes[1].ws_url);
    let (_ws, welcome) = open_and_read_first(&url).await;
    assert_eq!(welcome["resumed"], false, "{welcome}");
    assert_ne!(
        welcome["connectionId"],
        id.as_str(),
        "a new connection on node 2"
    );
    // Node 1 let go of the session; node 2 never got it. Node 1 learns that from node 2
    // and reports the session's end, exactly once.
    let event = disconnect_event(&backend, &id).await;
    let (code, reason) = status_and_reason(&event);
    assert_eq!(
        (code, reason.as_str()),
        (1006, "lost in a move to another node")
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reports = backend
        .events("/disconnect")
        .iter()
        .filter(|event| connection_id(event) == id)
        .count();
    assert_eq!(reports, 1, "reported once, by one node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stops_promptly_when_nats_is_gone() {
    let Some(binary) = nats::binary() else { return };
    let mut server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let files = node_files(1, &[server.url()], &backend, "");
    let mut node = start_node(&files).await;
    let (_ws, id) = connect(&node, &backend).await;
    server.kill();
    node.signal("-TERM");
    // Its clients are closed and reported; leaving the cluster cannot wait for NATS.
    let (code, took) = node.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "a clean exit");
    assert!(took < Duration::from_secs(20), "stopped in {took:?}");
    disconnect_event(&backend, &id).await;
}

/// The offsets in the next `count` envelope frames.
async fn envelope_offsets(ws: &mut Ws, count: usize) -> Vec<u64> {
    let mut offsets = Vec::with_capacity(count);
    while offsets.len() < count {
        let frame: Value = serde_json::from_str(&next_text(ws).await).unwrap();
        assert_eq!(frame["type"], "message", "{frame}");
        offsets.push(frame["offset"].as_u64().unwrap());
    }
    offsets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_numbered_room_has_one_history_and_replays_through_every_node() {
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let extra = r#"[rooms]
history_size = 100
envelope = true
[routes.rejoin]
integration = { type = "room_join", room = "$request.body.room", history = "$request.body.history", since = "$request.body.since", epoch = "$request.body.epoch" }
"#;
    let (nodes, _files) = start_nodes(&[server.url()], &backend, extra).await;
    // Published through every node, numbered by one owner: dense offsets.
    for n in 1..=9u64 {
        let url = format!("{}/@rooms/chat", nodes[n as usize % 3].api_url);
        let answer = post_for_json(url, format!("m{n}")).await;
        assert_eq!(answer, json!({"delivered": 0, "offset": n}));
    }
    let mut epoch = None;
    for node in &nodes {
        let url = format!("{}/@rooms/chat/history?since=6", node.api_url);
        let kept: Value = http().get(url).send().await.unwrap().json().await.unwrap();
        let offsets: Vec<u64> = (kept["messages"].as_array().unwrap().iter())
            .map(|m| m["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(offsets, vec![7, 8, 9], "through {}", node.api_url);
        assert_eq!(kept["messages"][0]["data"], "m7");
        let first = epoch.get_or_insert_with(|| kept["epoch"].clone());
        assert_eq!(&kept["epoch"], first, "one epoch through every node");
    }
    let epoch = epoch.unwrap();
    // Every node names the same owner, the node that numbers the room.
    let owners: Vec<Value> = futures_util::future::join_all(nodes.iter().map(|node| async {
        get_json(&format!("{}/@rooms/chat", node.api_url)).await["owner"].clone()
    }))
    .await;
    assert!(
        owners[0]
            .as_u64()
            .is_some_and(|owner| (1..=3).contains(&owner))
    );
    assert!(owners.iter().all(|owner| *owner == owners[0]), "{owners:?}");
    // A member on every node (none had one before) recovers from offset 3.
    let mut members = Vec::new();
    for node in &nodes {
        let (mut ws, _) = connect(node, &backend).await;
        let rejoin = json!({"action": "rejoin", "room": "chat", "since": 3, "epoch": epoch});
        send_text(&mut ws, &rejoin.to_string()).await;
        let joined: Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
        assert_eq!(
            (&joined["offset"], &joined["recovered"], &joined["epoch"]),
            (&json!(9), &json!(true), &epoch)
        );
        assert_eq!(envelope_offsets(&mut ws, 6).await, vec![4, 5, 6, 7, 8, 9]);
        members.push(ws);
    }
    // Concurrent publishes through all three nodes reach every member once, in order.
    let posts = (10..=39u64).map(|n| {
        let url = format!("{}/@rooms/chat", nodes[n as usize % 3].api_url);
        post_for_json(url, format!("m{n}"))
    });
    let answers = futures_util::future::join_all(posts).await;
    let mut offsets: Vec<u64> = answers
        .iter()
        .map(|a| a["offset"].as_u64().unwrap())
        .collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (10..=39).collect::<Vec<_>>(), "each offset once");
    for ws in &mut members {
        assert_eq!(
            envelope_offsets(ws, 30).await,
            (10..=39).collect::<Vec<_>>()
        );
    }
    for ws in &mut members {
        assert_silent(ws, Duration::from_millis(200)).await;
    }
}

/// How many webhook events named `name` about `room` the receiver got.
fn webhook_count(events: &[Value], name: &str, room: &str) -> usize {
    (events.iter())
        .filter(|e| e["name"] == name && e["room"] == room)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_events_are_told_once_across_nodes_and_when_a_node_dies() {
    use crate::webhooks::{Receiver, SECRET};
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let (receiver, url) = Receiver::start().await;
    let extra = format!(
        r#"[rooms]
presence_events = true
[webhooks]
url = "{url}"
secret = "{SECRET}"
[routes.leave]
integration = {{ type = "room_leave", room = "$request.body.room" }}
"#
    );
    let (mut nodes, _files) = start_nodes(&[server.url()], &backend, &extra).await;
    let (mut alice, _) = connect(&nodes[0], &backend).await;
    let (mut bob, _) = connect(&nodes[1], &backend).await;
    let (mut carol, carol_id) = connect(&nodes[2], &backend).await;
    join(&mut alice, "lobby").await;
    wait_for_members(&nodes[0], "lobby", 1).await;
    join(&mut bob, "lobby").await;
    wait_for_members(&nodes[0], "lobby", 2).await;
    join(&mut carol, "lobby").await;
    join(&mut carol, "solo").await;
    wait_for_members(&nodes[0], "lobby", 3).await;
    wait_for_members(&nodes[0], "solo", 1).await;
    // Alice (node 1) hears of Bob and Carol (nodes 2 and 3) joining.
    let mut heard = Vec::new();
    while heard.len() < 2 {
        let frame: Value = serde_json::from_str(&next_text(&mut alice).await).unwrap();
        assert_eq!(
            (&frame["type"], &frame["event"]),
            (&json!("presence"), &json!("join"))
        );
        heard.push(frame["connectionId"].as_str().unwrap().to_owned());
    }
    assert!(heard.contains(&carol_id), "{heard:?}");
    // Let the mirror record Carol's rooms, then kill her node.
    tokio::time::sleep(Duration::from_millis(300)).await;
    nodes[2].child.kill().unwrap();
    nodes[2].child.wait().unwrap();
    // Alice is told Carol left, within the node-loss time.
    let left = tokio::time::timeout(Duration::from_secs(15), next_text(&mut alice)).await;
    let left: Value = serde_json::from_str(&left.expect("a leave within 15 s")).unwrap();
    assert_eq!(
        (&left["event"], &left["connectionId"]),
        (&json!("leave"), &json!(carol_id))
    );
    // Everyone leaves the lobby: it is vacated once.
    send_text(&mut alice, r#"{"action":"leave","room":"lobby"}"#).await;
    send_text(&mut bob, r#"{"action":"leave","room":"lobby"}"#).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let events = receiver.events();
        let done = webhook_count(&events, "room_vacated", "lobby") >= 1
            && webhook_count(&events, "room_vacated", "solo") >= 1
            && webhook_count(&events, "member_left", "lobby") >= 3;
        if done {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{events:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = receiver.events();
    for (name, room, count) in [
        ("room_occupied", "lobby", 1),
        ("room_occupied", "solo", 1),
        ("member_joined", "lobby", 3),
        ("member_joined", "solo", 1),
        ("member_left", "lobby", 3),
        ("member_left", "solo", 1),
        ("room_vacated", "solo", 1),
        ("room_vacated", "lobby", 1),
    ] {
        assert_eq!(
            webhook_count(&events, name, room),
            count,
            "{name} {room}: {events:?}"
        );
    }
    let carol_left = events
        .iter()
        .filter(|e| e["name"] == "member_left" && e["connectionId"] == carol_id.as_str())
        .count();
    assert_eq!(carol_left, 2, "Carol left both rooms once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_room_history_outlives_every_node() {
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let extra = "[rooms]\nhistory_size = 10\nhistory_durable = true\n";
    let (mut nodes, files) = start_nodes(&[server.url()], &backend, extra).await;
    for n in 1..=5u64 {
        let url = format!("{}/@rooms/kept", nodes[n as usize % 3].api_url);
        let answer = post_for_json(url, format!("m{n}")).await;
        assert_eq!(answer["offset"], n, "{answer}");
    }
    let history = |node: &GatewayProcess| {
        let url = format!("{}/@rooms/kept/history", node.api_url);
        async move {
            http()
                .get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let before = history(&nodes[0]).await;
    assert_eq!(before["messages"].as_array().unwrap().len(), 5);
    // Every node dies at once: the history is in JetStream, not in any node.
    for node in &mut nodes {
        node.child.kill().unwrap();
        node.child.wait().unwrap();
    }
    let mut restarted = Vec::new();
    for file in &files {
        restarted.push(start_node(file).await);
    }
    for node in &restarted {
        let after = history(node).await;
        assert_eq!(
            after["epoch"], before["epoch"],
            "the same epoch through {}",
            node.api_url
        );
        assert_eq!(after["messages"], before["messages"]);
    }
    let url = format!("{}/@rooms/kept", restarted[1].api_url);
    assert_eq!(post_for_json(url, "m6").await["offset"], 6, "offsets go on");
}

/// A connect storm larger than the JetStream context's window of unacknowledged publishes
/// (5,000): the connection-record mirror publishes them a window at a time, so neither it
/// nor the node's heartbeat (which shares that window) stalls. (It used to take every
/// permit and wait for one forever: the node's lease ran out and it served nothing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_storm_larger_than_the_ack_window_stalls_nothing() {
    const STORM: usize = 6000;
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let limits = "[limits]\nconnects_per_sec_per_ip = 0\nmax_connections_per_ip = 0\n";
    // One mirror flush every 4 s: the whole storm lands in one.
    let files: Vec<NodeFiles> = (1..=2)
        .map(|id| {
            let files = node_files_with_routes(id, &[server.url()], limits);
            let text = std::fs::read_to_string(&files.config).unwrap();
            let slow = text.replace("mirror_interval_ms = 20", "mirror_interval_ms = 4000");
            std::fs::write(&files.config, slow).unwrap();
            files
        })
        .collect();
    let mut nodes = Vec::new();
    for file in &files {
        nodes.push(start_node(file).await);
    }
    let tasks: Vec<_> = (0..STORM)
        .map(|_| {
            let url = nodes[0].ws_url.clone();
            tokio::spawn(async move { tokio_tungstenite::connect_async(url).await.map(|c| c.0) })
        })
        .collect();
    let mut storm = Vec::with_capacity(STORM);
    for task in tasks {
        storm.push(task.await.unwrap().expect("every client connects"));
    }
    // Mirrored, and past a node timeout since: the node still renews its lease and serves.
    let mirrored = "switchboard_cluster_forwarded_total{kind=\"mirror\"}";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while nodes[0].metric(mirrored).await < STORM as f64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the storm is mirrored"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let health = format!("http://{}/health", nodes[0].api_addr());
    let health = http().get(health).send().await.unwrap();
    assert_eq!(health.status(), 200, "{}", health.text().await.unwrap());
    let (mut late, _) = tokio_tungstenite::connect_async(&nodes[0].ws_url)
        .await
        .unwrap();
    join(&mut late, "storm").await;
    wait_for_members(&nodes[1], "storm", 1).await;
    post_body(format!("{}/@rooms/storm", nodes[1].api_url), "still here").await;
    assert_eq!(next_text(&mut late).await, "still here");
    let takeovers = "switchboard_cluster_node_takeovers_total";
    assert_eq!(
        nodes[1].metric(takeovers).await,
        0.0,
        "nobody was judged lost"
    );
    drop(storm);
}
