//! The fault matrix: each scenario runs the workload through its faults, heals them, and
//! checks every invariant ([`super::checker`]). Timings are the cluster tests'
//! (`node_timeout_ms = 3000`, `heartbeat_ms = 250`).

use std::time::Duration;

use super::checker::{Faults, check};
use super::harness::Chaos;
use super::workload::{Comeback, Workload};

/// Long enough for the others to judge a node lost and report it.
const PAST_THE_TIMEOUT: Duration = Duration::from_secs(7);

async fn run_for(chaos: &Chaos, how_long: Duration) {
    chaos.step(&format!("workload runs {how_long:?}"));
    tokio::time::sleep(how_long).await;
}

/// The workload, its clients coming back to the node they were on (see
/// [`moves_across_nodes_under_load`] for sessions that move).
fn workload(chaos: &Chaos) -> Workload {
    Workload::start(
        chaos.endpoints.clone(),
        chaos.rng.clone(),
        Comeback::SameNode,
        "chaos",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_node_under_load() {
    let Some(chaos) = Chaos::start("zombie").await else {
        return;
    };
    let load = workload(&chaos);
    run_for(&chaos, Duration::from_secs(3)).await;
    let node = chaos.rng.below(3);
    chaos.pause(node);
    tokio::time::sleep(PAST_THE_TIMEOUT).await;
    chaos.resume(node);
    run_for(&chaos, Duration::from_secs(3)).await;
    check(&chaos, load, Faults::Injected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_from_nats_long_and_short_under_load() {
    let Some(chaos) = Chaos::start("partition").await else {
        return;
    };
    let load = workload(&chaos);
    run_for(&chaos, Duration::from_secs(2)).await;
    let node = chaos.rng.below(3);
    chaos.cut(node);
    chaos
        .wait_for_health(node, 503, Duration::from_secs(10))
        .await;
    tokio::time::sleep(PAST_THE_TIMEOUT).await;
    chaos.heal(node);
    chaos
        .wait_for_health(node, 200, Duration::from_secs(15))
        .await;
    run_for(&chaos, Duration::from_secs(2)).await;
    let node = chaos.rng.below(3);
    chaos.cut(node);
    tokio::time::sleep(Duration::from_secs(1)).await;
    chaos.heal(node);
    run_for(&chaos, Duration::from_secs(2)).await;
    check(&chaos, load, Faults::Injected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_load_and_restarted() {
    let Some(mut chaos) = Chaos::start("kill").await else {
        return;
    };
    let load = workload(&chaos);
    // Moves, broadcasts, pushes and queue appends are all in flight at every moment.
    run_for(&chaos, Duration::from_secs(3)).await;
    let node = chaos.rng.below(3);
    chaos.kill(node);
    run_for(&chaos, PAST_THE_TIMEOUT).await;
    chaos.restart(node).await;
    run_for(&chaos, Duration::from_secs(3)).await;
    check(&chaos, load, Faults::Injected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_servers_restarted_one_then_all() {
    let Some(mut chaos) = Chaos::start("nats-restart").await else {
        return;
    };
    let load = workload(&chaos);
    run_for(&chaos, Duration::from_secs(2)).await;
    let server = chaos.rng.below(3);
    chaos.restart_nats(server);
    run_for(&chaos, Duration::from_secs(4)).await;
    for server in 0..3 {
        chaos.stop_nats(server);
    }
    for node in 0..3 {
        chaos
            .wait_for_health(node, 503, Duration::from_secs(10))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for server in 0..3 {
        chaos.start_nats(server);
    }
    chaos.settle().await;
    run_for(&chaos, Duration::from_secs(3)).await;
    check(&chaos, load, Faults::Injected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clocks_skewed_thirty_seconds_both_ways() {
    let skew = |ms: &str| vec![("SWITCHBOARD_FAKE_CLOCK_SKEW_MS".to_owned(), ms.to_owned())];
    let env = vec![skew("30000"), skew("-30000"), Vec::new()];
    let Some(chaos) = Chaos::start_with_env("clock-skew", env).await else {
        return;
    };
    let load = workload(&chaos);
    run_for(&chaos, Duration::from_secs(3)).await;
    // Node-loss timeouts are judged on each node's own monotonic clock: a skewed wall clock
    // neither hides a lost node nor declares a live one lost.
    chaos.pause(0);
    tokio::time::sleep(PAST_THE_TIMEOUT).await;
    chaos.resume(0);
    run_for(&chaos, Duration::from_secs(3)).await;
    check(&chaos, load, Faults::Injected).await;
}

/// The control: the same workload with no fault at all (clients still drop their sockets
/// and resume every second or two).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fault_at_all() {
    let Some(chaos) = Chaos::start("control").await else {
        return;
    };
    let load = workload(&chaos);
    run_for(&chaos, Duration::from_secs(10)).await;
    check(&chaos, load, Faults::None).await;
}

/// Sessions that resume on any node, so they move across nodes all the time, with no other
/// fault: every broadcast reaches every session once, in order, however it moves (it found
/// broadcasts published mid-move reaching neither node; see docs/RELIABILITY.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_across_nodes_under_load() {
    moves("moves", "chaos").await;
}

/// The same, in a room that numbers its messages: its offsets tell the copies apart, and a
/// broadcast that reached neither node is mended from the room's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_across_nodes_in_a_numbered_room() {
    moves("moves-numbered", "numbered:chaos").await;
}

async fn moves(name: &'static str, room: &'static str) {
    let Some(chaos) = Chaos::start(name).await else {
        return;
    };
    let rng = chaos.rng.clone();
    let load = Workload::start(chaos.endpoints.clone(), rng, Comeback::AnyNode, room);
    run_for(&chaos, Duration::from_secs(10)).await;
    check(&chaos, load, Faults::None).await;
}
