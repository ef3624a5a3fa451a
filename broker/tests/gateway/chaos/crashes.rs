//! Kills aimed at one step of an operation. A node armed with a crash point
//! (`SWITCHBOARD_CRASH_AT`, `broker/src/crash.rs`) aborts the first time it gets there: as
//! `kill -9`, but at exactly that step, where a kill at a random moment would land only now
//! and then. It is restarted on its data dir at once, disarmed, and every invariant is
//! checked as after any kill.

use std::time::Duration;

use super::checker::{Faults, check};
use super::gaps::room_numbered_by;
use super::harness::{CRASH_AT, Chaos};
use super::workload::{Comeback, Workload};

/// The node armed: node 2 (its id), by index.
const ARMED: usize = 1;

/// Runs the workload in `room` with node 2 armed at `point`; checks that it crashed there
/// and that everything holds.
async fn crashed_at(name: &'static str, point: &str, room: Room) {
    let mut env = vec![Vec::new(); 3];
    env[ARMED] = vec![(CRASH_AT.to_owned(), point.to_owned())];
    let Some(mut chaos) = Chaos::start_with_env(name, env).await else {
        return;
    };
    let room: &'static str = match room {
        Room::Plain => "chaos",
        // A room its numbering node dies in: the armed one.
        Room::NumberedByTheArmedNode => {
            let room = room_numbered_by(chaos.node(0), ARMED as u64 + 1).await;
            Box::leak(room.into_boxed_str())
        }
    };
    chaos.step(&format!("node {} armed at {point}; room {room}", ARMED + 1));
    // The producer appends through the armed node (a queue append there is a point).
    let load = Workload::start_with_producer_on(
        chaos.endpoints.clone(),
        chaos.rng.clone(),
        Comeback::AnyNode,
        room,
        Some(ARMED),
    );
    let crashed = chaos.restart_crashed_for(Duration::from_secs(12)).await;
    assert_eq!(crashed, 1, "node {} reached {point} once", ARMED + 1);
    check(&chaos, load, Faults::Injected).await;
}

/// A node dies with a bulk send queued to its own recipients and sent to the other nodes',
/// before its answer leaves: the caller hears nothing, so nobody is owed it, and nobody
/// gets it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dies_mid_bulk_send() {
    crashed_at("crash-bulk-sent", "bulk.sent@10", Room::Plain).await;
}

/// Where the workload's room is.
enum Room {
    /// A room that does not number its messages.
    Plain,
    /// A numbered room, numbered by the armed node.
    NumberedByTheArmedNode,
}

/// The old node dies having let go of a moving session, before its answer leaves: the new
/// node opens a new session, and the old one is reported once (by the takeover).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dies_handing_a_session_over() {
    crashed_at("crash-move-handed-over", "move.handed_over", Room::Plain).await;
}

/// The new node dies having taken a session, before registering it: the old node asks
/// whether it arrived, hears nothing, and reports it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dies_taking_a_session_over() {
    crashed_at("crash-move-taken", "move.taken", Room::Plain).await;
}

/// A node dies with queue events stored by JetStream and their acks not sent: the producer
/// sends them again (a duplicate at most), and nothing acked is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dies_between_a_queue_append_and_its_ack() {
    crashed_at("crash-queue-appended", "queue.appended", Room::Plain).await;
}

/// The node that numbers a room dies with a message numbered and queued to its own members
/// only (its 20th: once the clients are settled): the publish is not answered 200, and the
/// room goes on in a new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rooms_numbering_node_dies_mid_broadcast() {
    let room = Room::NumberedByTheArmedNode;
    crashed_at("crash-broadcast-numbered", "broadcast.numbered@20", room).await;
}

/// A node dies just after a connection's `$connect` said yes, before its 101: the backend
/// heard `$connect` and must hear `$disconnect` once. (It did not, before connections were
/// recorded ahead of `$connect`: docs/RELIABILITY.md, fix 14.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dies_just_after_a_connect() {
    crashed_at("crash-connect-accepted", "connect.accepted@3", Room::Plain).await;
}

/// Every node armed at its second webhook batch answered 2xx and not acked (whichever
/// node delivers dies there): the batch is delivered again by the next node, and every
/// room event arrives, none more than twice. (The crash cuts the dying node's members:
/// their leaves are told too.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dies_between_a_webhook_batch_and_its_ack() {
    use crate::binary::GatewayProcess;
    use crate::cluster::{connect, join, node_files, wait_until_joined};
    use crate::webhooks::{Receiver, SECRET};
    use crate::{nats, support::Backend};
    let Some(binary) = nats::binary() else { return };
    let server = nats::NatsServer::start(&binary);
    let backend = Backend::start().await;
    let (receiver, url) = Receiver::start().await;
    let extra = format!("[webhooks]\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n");
    let files: Vec<_> = (1..=3)
        .map(|id| node_files(id, &[server.url()], &backend, &extra))
        .collect();
    let armed = [(CRASH_AT, "push.delivered@2")];
    let mut nodes = Vec::new();
    for file in &files {
        let node = GatewayProcess::start_with_env(&file.config, &armed);
        wait_until_joined(&node).await;
        nodes.push(node);
    }
    // Twelve members join one at a time, through every node: an event or two per batch.
    // A node that crashed is started again (disarmed) before the next one joins.
    const MEMBERS: usize = 12;
    let mut crashed = 0;
    let mut clients = Vec::new();
    for member in 0..MEMBERS {
        crashed += restart_crashed(&mut nodes, &files).await;
        let (mut ws, _) = connect(&nodes[member % 3], &backend).await;
        join(&mut ws, "hooked").await;
        clients.push(ws);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // room_occupied once, member_joined for each: every id, at least once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let events = loop {
        crashed += restart_crashed(&mut nodes, &files).await;
        let events = receiver.events();
        let joined = (events.iter())
            .filter(|e| e["name"] == "member_joined")
            .map(|e| e["connectionId"].as_str().unwrap_or_default())
            .collect::<std::collections::HashSet<_>>()
            .len();
        if joined == MEMBERS && crashed >= 1 {
            break events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{joined} of {MEMBERS} joins told after {crashed} crashes: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut times: std::collections::HashMap<String, usize> = Default::default();
    for event in &events {
        *times.entry(event["id"].to_string()).or_default() += 1;
    }
    // Each event has one id however often it is delivered: one room_occupied, a join per
    // member (and a leave for the members a crash cut).
    let ids_of = |name: &str| {
        (events.iter())
            .filter(|e| e["name"] == name)
            .map(|e| e["id"].to_string())
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    assert_eq!(ids_of("room_occupied"), 1, "{events:?}");
    assert_eq!(ids_of("member_joined"), MEMBERS, "{events:?}");
    assert!(times.values().all(|&n| n <= 2), "at most twice: {events:?}");
    assert!(
        times.values().any(|&n| n == 2),
        "the batch answered before the crash came again: {events:?}"
    );
}

/// Starts every node of `nodes` that exited again, on its data dir and disarmed; how many.
async fn restart_crashed(
    nodes: &mut [crate::binary::GatewayProcess],
    files: &[crate::cluster::NodeFiles],
) -> usize {
    let mut crashed = 0;
    for (node, file) in nodes.iter_mut().zip(files) {
        if node.child.try_wait().ok().flatten().is_some() {
            crashed += 1;
            *node = crate::binary::GatewayProcess::start(&file.config, &[]);
            crate::cluster::wait_until_joined(node).await;
        }
    }
    crashed
}
