//! A full disk on one node. A node writes little to its disk in cluster mode (queues and
//! history live in JetStream), but it must write a connection's record before that
//! connection's `$connect` runs: while it cannot, it refuses new connections (503, and
//! `/health` says why), serves the ones it has, and takes sessions that move to it. Once
//! space comes back it writes by itself and serves again; nothing is lost or doubled.

use std::time::Duration;

use super::checker::{Faults, check};
use super::harness::Chaos;
use super::workload::{Comeback, Workload};
use crate::faults::SmallDisk;
use crate::support::connect_until_refused;

/// The node whose disk fills up: node 2, by index.
const SMALL: usize = 1;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_disk_fills_up_under_load() {
    let Some(mut chaos) = Chaos::prepare("full-disk", vec![Vec::new(); 3]).await else {
        return;
    };
    let disk = SmallDisk::mount(&chaos.data_dir(SMALL), 8);
    chaos.launch_all().await;
    let room = "chaos";
    let load = Workload::start(
        chaos.endpoints.clone(),
        chaos.rng.clone(),
        Comeback::AnyNode,
        room,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    chaos.step(&format!("fill node {}'s disk", SMALL + 1));
    let ballast = disk.fill();
    // The record log's last page may take a few more records; then a newcomer is refused,
    // told why, and so is /health.
    let node = chaos.node(SMALL);
    let (opened, status, body) = connect_until_refused(&node.ws_url, 200).await;
    chaos.step(&format!(
        "a newcomer refused after {} opened: {status} {body}",
        opened.len()
    ));
    assert_eq!(status, 503);
    assert!(body.contains("cannot record the connection"), "{body}");
    chaos
        .wait_for_health(SMALL, 503, Duration::from_secs(5))
        .await;
    drop(opened);
    tokio::time::sleep(Duration::from_secs(3)).await;
    chaos.step(&format!("give node {}'s disk its space back", SMALL + 1));
    std::fs::remove_file(ballast).unwrap();
    chaos
        .wait_for_health(SMALL, 200, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    check(&chaos, load, Faults::Injected).await;
    drop(chaos);
}
