//! A full disk on one node. A node writes little to its disk in cluster mode (queues and
//! history live in JetStream), but it must write a connection's record before that
//! connection's `$connect` runs: while it cannot, it refuses new connections (503, and
//! `/health` says why), serves the ones it has, and takes sessions that move to it. Once
//! space comes back it writes by itself and serves again; nothing is lost or doubled.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::checker::{Faults, check};
use super::harness::Chaos;
use super::workload::{Comeback, Workload};
use crate::support::connect_until_refused;

/// The node whose disk fills up: node 2, by index.
const SMALL: usize = 1;

/// A tmpfs of its own under a node's data dir, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    /// Mounts 8 MiB at `path` (the tests run as root).
    fn mount(path: &Path) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(path)
            .status()
            .unwrap();
        assert!(mounted.success(), "this test mounts a tmpfs (needs root)");
        Self {
            path: path.to_owned(),
        }
    }

    /// Writes a file until not one more byte fits; returns it (removing it gives the space
    /// back).
    fn fill(&self) -> PathBuf {
        let ballast = self.path.join("ballast");
        let mut file = std::fs::File::create(&ballast).unwrap();
        for chunk in [64 * 1024, 4096, 512, 1] {
            while file.write_all(&vec![0u8; chunk]).is_ok() {}
        }
        ballast
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_disk_fills_up_under_load() {
    let Some(mut chaos) = Chaos::prepare("full-disk", vec![Vec::new(); 3]).await else {
        return;
    };
    let disk = SmallDisk::mount(&chaos.data_dir(SMALL));
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
