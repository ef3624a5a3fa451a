//! The partition scenario on real links: each node in a network namespace of its own,
//! joined to the test's namespace by two veth links, one its clients (and the backend) come
//! over and one to NATS. A partition from NATS is the NATS link set down: packets are
//! dropped, sockets stay open, and the node's clients still reach it. Needs root (CI runs
//! as root); elsewhere the scenario is skipped, saying why.

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use super::checker::{Faults, check};
use super::harness::Chaos;
use super::workload::{Comeback, Workload};

/// Three nodes' namespaces and links, removed when dropped.
pub(crate) struct Namespaces {
    /// What names this run's namespaces and links (the test process's id).
    tag: u32,
}

impl Namespaces {
    /// Makes the namespaces and links; `None` (and why, on stderr) where they cannot be made.
    pub(crate) fn make() -> Option<Self> {
        let namespaces = Self {
            tag: std::process::id() % 100_000,
        };
        for node in 0..3 {
            if let Err(why) = namespaces.make_node(node) {
                eprintln!("skipped: cannot make network namespaces here ({why}); needs root");
                return None;
            }
        }
        Some(namespaces)
    }

    fn make_node(&self, node: usize) -> Result<(), String> {
        let ns = self.name(node);
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        for (link, subnet) in [("c", 231), ("n", 232)] {
            let (outside, inside) = (self.link(node, link), format!("{}i", self.link(node, link)));
            ip(&[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns", &ns,
            ])?;
            let host = format!("10.{subnet}.{}.1/24", node + 1);
            let guest = format!("10.{subnet}.{}.2/24", node + 1);
            ip(&["addr", "add", &host, "dev", &outside])?;
            ip(&["link", "set", &outside, "up"])?;
            ip(&["-n", &ns, "addr", "add", &guest, "dev", &inside])?;
            ip(&["-n", &ns, "link", "set", &inside, "up"])?;
        }
        Ok(())
    }

    /// Node `node`'s namespace.
    pub(crate) fn name(&self, node: usize) -> String {
        format!("sbchaos{}n{}", self.tag, node + 1)
    }

    /// The outer end of node `node`'s client (`c`) or NATS (`n`) link.
    fn link(&self, node: usize, kind: &str) -> String {
        format!("sb{}{kind}{}", self.tag, node + 1)
    }

    /// The node's address on its client link: where it listens.
    pub(crate) fn gateway_ip(&self, node: usize) -> IpAddr {
        [10, 231, node as u8 + 1, 2].into()
    }

    /// The test's end of the node's client link (the backend is reached there).
    pub(crate) fn client_side(&self, node: usize) -> IpAddr {
        [10, 231, node as u8 + 1, 1].into()
    }

    /// The test's end of the node's NATS link (the NATS servers are reached there).
    pub(crate) fn nats_side(&self, node: usize) -> IpAddr {
        [10, 232, node as u8 + 1, 1].into()
    }

    /// Sets node `node`'s NATS link up or down.
    pub(crate) fn set_nats_link(&self, node: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["link", "set", &self.link(node, "n"), state]).unwrap();
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for node in 0..3 {
            // Deleting a namespace deletes the links' inner ends, and with them the pairs.
            for kind in ["c", "n"] {
                let _ = ip(&["link", "del", &self.link(node, kind)]);
            }
            let _ = ip(&["netns", "del", &self.name(node)]);
        }
    }
}

/// Where the management API of a node in a namespace is reached. It listens on the
/// namespace's loopback (elsewhere it would need tokens, which the harness's calls do not
/// carry); a relay inside the namespace takes it to [`MANAGEMENT_PORT`] on the node's client
/// link, and one in the test's namespace to a loopback address there (without tokens the
/// API answers only requests whose `Host` is a loopback address).
pub(crate) const MANAGEMENT_PORT: u16 = 9090;

/// The relay: `python3 -c RELAY LISTEN_IP LISTEN_PORT TARGET_IP TARGET_PORT`.
const RELAY: &str = r#"
import socket, sys, threading
listen = socket.socket()
listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listen.bind((sys.argv[1], int(sys.argv[2])))
listen.listen(512)
def pipe(source, sink):
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    for end in (source, sink):
        try:
            end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
while True:
    client, _ = listen.accept()
    try:
        server = socket.create_connection((sys.argv[3], int(sys.argv[4])))
    except OSError:
        client.close()
        continue
    threading.Thread(target=pipe, args=(client, server), daemon=True).start()
    threading.Thread(target=pipe, args=(server, client), daemon=True).start()
"#;

/// The two relays to a node's management API.
pub(crate) struct ManagementRelay {
    _inside: RelayProcess,
    _outside: crate::faults::TcpRelay,
}

/// The relay process in a namespace, stopped when dropped.
struct RelayProcess(std::process::Child);

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Namespaces {
    /// Relays node `node`'s management API (on its namespace's loopback) across its client
    /// link to a loopback address here, and points `gateway.api_url` there.
    pub(crate) async fn expose_management(
        &self,
        node: usize,
        gateway: &mut crate::binary::GatewayProcess,
    ) -> ManagementRelay {
        let inside = gateway.api_addr();
        let outside = std::net::SocketAddr::new(self.gateway_ip(node), MANAGEMENT_PORT);
        let inside_relay = Command::new("ip")
            .args(["netns", "exec", &self.name(node), "python3", "-c", RELAY])
            .args([outside.ip().to_string(), outside.port().to_string()])
            .args([inside.ip().to_string(), inside.port().to_string()])
            .spawn()
            .map(RelayProcess)
            .unwrap();
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(outside).await.is_ok() {
                let here = crate::faults::TcpRelay::start(outside).await;
                let at = here.address.to_string();
                gateway.api_url = gateway.api_url.replace(&inside.to_string(), &at);
                return ManagementRelay {
                    _inside: inside_relay,
                    _outside: here,
                };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the management relay in {} never listened", self.name(node));
    }
}

/// Runs `ip` with `args`.
fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

/// The partition scenario with each cut a NATS link set down: long (past the node-loss
/// timeout: the node fences itself, its connections are reported, it rejoins) and short
/// (nothing declared), the workload running throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_as_links_set_down_under_load() {
    let Some(namespaces) = Namespaces::make() else {
        return;
    };
    let Some(chaos) = Chaos::start_in_namespaces("netns-partition", namespaces).await else {
        return;
    };
    let load = Workload::start(
        chaos.endpoints.clone(),
        chaos.rng.clone(),
        Comeback::SameNode,
        "chaos",
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let node = chaos.rng.below(3);
    chaos.cut(node);
    chaos
        .wait_for_health(node, 503, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    chaos.heal(node);
    chaos
        .wait_for_health(node, 200, Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let node = chaos.rng.below(3);
    chaos.cut(node);
    tokio::time::sleep(Duration::from_secs(1)).await;
    chaos.heal(node);
    tokio::time::sleep(Duration::from_secs(2)).await;
    check(&chaos, load, Faults::Injected).await;
}
