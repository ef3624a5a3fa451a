//! The cluster the scenarios break: three gateway nodes on a three-server JetStream
//! cluster (queues and history replicated three times), each node's links to the NATS
//! servers through relays that can be cut, a real backend, and the faults. Every fault is a
//! step of the schedule, printed with its time since the start and the run's seed.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::netns::Namespaces;
use crate::binary::GatewayProcess;
use crate::cluster::{NodeFiles, node_files, node_files_listening_on, wait_until_joined};
use crate::faults::TcpRelay;
use crate::nats::{self, NatsServer};
use crate::support::*;

/// A little deterministic randomness: the scenario's choices, replayed by its seed.
#[derive(Clone)]
pub(crate) struct Rng(Arc<Mutex<u64>>);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(seed.max(1))))
    }

    /// xorshift64*.
    pub(crate) fn below(&self, bound: usize) -> usize {
        let mut state = self.0.lock().unwrap();
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) % bound as u64) as usize
    }
}

/// The seed: `CHAOS_SEED`, or one made now (printed either way).
fn seed() -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            now.map_or(1, |d| d.as_nanos() as u64)
        })
}

/// Where a node can be reached right now (it moves when the node restarts).
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    pub(crate) ws_url: String,
    pub(crate) api_url: String,
    pub(crate) up: bool,
}

/// The route every scenario's nodes have, besides the cluster tests' `join` and `publish`.
fn routes(backend: &Backend) -> String {
    format!(
        r#"[api]
resume = true
resume_window_secs = 10
[limits]
connects_per_sec_per_ip = 0
max_connections_per_ip = 0
resumes_per_sec_per_ip = 0
resumes_per_sec_per_connection = 0
[routes."$default"]
integration = {{ type = "http", url = "{url}/message" }}
[routes.order]
integration = {{ type = "queue", queue = "orders", ack = true }}
[[rooms.class]]
pattern = "numbered:*"
history_size = 100
"#,
        url = backend.url
    )
}

/// The variable that arms a crash point in a node (`broker/src/crash.rs`).
pub(crate) const CRASH_AT: &str = "SWITCHBOARD_CRASH_AT";

pub(crate) struct Chaos {
    pub(crate) name: &'static str,
    pub(crate) rng: Rng,
    seed: u64,
    started: Instant,
    pub(crate) backend: Backend,
    pub(crate) nats: Vec<NatsServer>,
    /// `links[node][server]`: node → NATS server, cuttable.
    links: Vec<Vec<TcpRelay>>,
    files: Vec<NodeFiles>,
    /// Extra environment per node (a skewed clock).
    env: Vec<Vec<(String, String)>>,
    pub(crate) nodes: Vec<Option<GatewayProcess>>,
    pub(crate) endpoints: Arc<RwLock<Vec<Endpoint>>>,
    /// In namespaces: each node's way to the backend, across its client link.
    _backend_links: Vec<TcpRelay>,
    /// In namespaces: each node's management API, relayed to its client link.
    management_relays: Vec<Option<super::netns::ManagementRelay>>,
    /// Where the nodes run, if each has a network namespace of its own (dropped last: the
    /// nodes stop first).
    namespaces: Option<Namespaces>,
}

impl Chaos {
    /// The cluster, or `None` where there is no nats-server (CI always has one).
    pub(crate) async fn start(name: &'static str) -> Option<Self> {
        Self::start_with_env(name, vec![Vec::new(); 3]).await
    }

    /// The cluster with `env[i]` in node `i`'s environment.
    pub(crate) async fn start_with_env(
        name: &'static str,
        env: Vec<Vec<(String, String)>>,
    ) -> Option<Self> {
        let mut chaos = Self::prepare(name, env).await?;
        chaos.launch_all().await;
        Some(chaos)
    }

    /// The cluster with no node started yet: the scenario may set up their data dirs
    /// ([`Chaos::data_dir`]) before [`Chaos::launch_all`].
    pub(crate) async fn prepare(
        name: &'static str,
        env: Vec<Vec<(String, String)>>,
    ) -> Option<Self> {
        Self::prepare_on(name, env, None).await
    }

    /// The cluster with each node in a network namespace of its own ([`Namespaces`]): a
    /// partition from NATS is then a link set down.
    pub(crate) async fn start_in_namespaces(
        name: &'static str,
        namespaces: Namespaces,
    ) -> Option<Self> {
        let mut chaos = Self::prepare_on(name, vec![Vec::new(); 3], Some(namespaces)).await?;
        chaos.launch_all().await;
        Some(chaos)
    }

    async fn prepare_on(
        name: &'static str,
        env: Vec<Vec<(String, String)>>,
        namespaces: Option<Namespaces>,
    ) -> Option<Self> {
        let binary = nats::binary()?;
        let seed = seed();
        eprintln!("chaos {name}: seed {seed} (replay with CHAOS_SEED={seed})");
        let nats = nats::start_cluster(&binary).await;
        let backend = Backend::start().await;
        let (mut links, mut files, mut backend_links) = (Vec::new(), Vec::new(), Vec::new());
        for node in 0..3u16 {
            let index = usize::from(node);
            let nats_side =
                (namespaces.as_ref()).map_or([127, 0, 0, 1].into(), |n| n.nats_side(index));
            let mut relays = Vec::new();
            for server in &nats {
                let server = ([127, 0, 0, 1], server.port).into();
                relays.push(TcpRelay::start_on(nats_side, server).await);
            }
            // Each node prefers its own server, and fails over to the others.
            relays.rotate_left(index);
            let urls: Vec<String> = relays.iter().map(TcpRelay::nats_url).collect();
            files.push(match &namespaces {
                None => node_files(node + 1, &urls, &backend, &routes(&backend)),
                Some(namespaces) => {
                    // The backend, reached from the namespace across its client link.
                    let address = backend.url.trim_start_matches("http://").parse().unwrap();
                    let relay = TcpRelay::start_on(namespaces.client_side(index), address).await;
                    let reached = backend.reached_at(format!("http://{}", relay.address));
                    backend_links.push(relay);
                    let routes = config_with(&reached, &routes(&reached));
                    let ip = namespaces.gateway_ip(index).to_string();
                    node_files_listening_on(&ip, node + 1, &urls, &routes)
                }
            });
            links.push(relays);
        }
        Some(Self {
            name,
            rng: Rng::new(seed),
            seed,
            started: Instant::now(),
            backend,
            nats,
            links,
            files,
            env,
            nodes: vec![None, None, None],
            endpoints: Arc::new(RwLock::new(Vec::new())),
            _backend_links: backend_links,
            management_relays: vec![None, None, None],
            namespaces,
        })
    }

    /// Starts every node.
    pub(crate) async fn launch_all(&mut self) {
        for node in 0..3 {
            self.launch(node).await;
        }
    }

    /// Where node `node` keeps its data.
    pub(crate) fn data_dir(&self, node: usize) -> std::path::PathBuf {
        let config = &self.files[node].config;
        config
            .parent()
            .expect("a config in a directory")
            .join("data")
    }

    /// Prints a step of the schedule.
    pub(crate) fn step(&self, what: &str) {
        let at = self.started.elapsed().as_secs_f64();
        eprintln!("chaos {} [seed {}] +{at:.2}s: {what}", self.name, self.seed);
    }

    async fn launch(&mut self, node: usize) {
        let env: Vec<(&str, &str)> = (self.env[node].iter())
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let config = &self.files[node].config;
        let process = match &self.namespaces {
            Some(namespaces) => {
                let name = namespaces.name(node);
                let mut process = GatewayProcess::start_in_namespace(&name, config, &env);
                let relay = namespaces.expose_management(node, &mut process).await;
                self.management_relays[node] = Some(relay);
                process
            }
            None => GatewayProcess::start_with_env(config, &env),
        };
        wait_until_joined(&process).await;
        let endpoint = Endpoint {
            ws_url: process.ws_url.clone(),
            api_url: process.api_url.clone(),
            up: true,
        };
        let mut endpoints = self.endpoints.write().unwrap();
        if endpoints.len() <= node {
            endpoints.push(endpoint);
        } else {
            endpoints[node] = endpoint;
        }
        drop(endpoints);
        self.nodes[node] = Some(process);
    }

    pub(crate) fn node(&self, node: usize) -> &GatewayProcess {
        self.nodes[node].as_ref().expect("the node is running")
    }

    /// `SIGSTOP`: frozen, sockets open.
    pub(crate) fn pause(&self, node: usize) {
        self.step(&format!("pause node {}", node + 1));
        self.node(node).signal("-STOP");
    }

    pub(crate) fn resume(&self, node: usize) {
        self.step(&format!("resume node {}", node + 1));
        self.node(node).signal("-CONT");
    }

    /// `SIGKILL`.
    pub(crate) fn kill(&mut self, node: usize) {
        self.step(&format!("kill -9 node {}", node + 1));
        self.endpoints.write().unwrap()[node].up = false;
        if let Some(mut process) = self.nodes[node].take() {
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
    }

    /// Starts a killed node again on its data dir.
    pub(crate) async fn restart(&mut self, node: usize) {
        self.step(&format!("restart node {}", node + 1));
        self.launch(node).await;
    }

    /// The node's clients still reach it; NATS does not (nothing passes either way).
    pub(crate) fn cut(&self, node: usize) {
        self.step(&format!("cut node {} off from NATS", node + 1));
        match &self.namespaces {
            Some(namespaces) => namespaces.set_nats_link(node, false),
            None => self.links[node].iter().for_each(TcpRelay::cut),
        }
    }

    pub(crate) fn heal(&self, node: usize) {
        self.step(&format!("heal node {}'s link to NATS", node + 1));
        match &self.namespaces {
            Some(namespaces) => namespaces.set_nats_link(node, true),
            None => self.links[node].iter().for_each(TcpRelay::heal),
        }
    }

    /// Runs for `how_long`, restarting on its data dir (disarmed) every node that crashed
    /// meanwhile, at once; how many did.
    pub(crate) async fn restart_crashed_for(&mut self, how_long: Duration) -> usize {
        self.step(&format!("restart what crashes, for {how_long:?}"));
        let until = Instant::now() + how_long;
        let mut crashed = 0;
        while Instant::now() < until {
            for node in 0..3 {
                let process = self.nodes[node].as_mut();
                if process.is_none_or(|p| p.child.try_wait().ok().flatten().is_none()) {
                    continue;
                }
                crashed += 1;
                let noticed = Instant::now();
                self.step(&format!(
                    "node {} crashed (noticed at {noticed:?})",
                    node + 1
                ));
                self.endpoints.write().unwrap()[node].up = false;
                self.nodes[node] = None;
                self.env[node].retain(|(name, _)| name != CRASH_AT);
                self.restart(node).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        crashed
    }

    /// Kills NATS server `server` and starts it again on its store.
    pub(crate) fn restart_nats(&mut self, server: usize) {
        self.step(&format!("restart nats-server {}", server + 1));
        self.nats[server].restart();
    }

    pub(crate) fn stop_nats(&mut self, server: usize) {
        self.step(&format!("stop nats-server {}", server + 1));
        self.nats[server].kill();
    }

    pub(crate) fn start_nats(&mut self, server: usize) {
        self.step(&format!("start nats-server {}", server + 1));
        self.nats[server].restart();
    }

    pub(crate) async fn health(&self, node: usize) -> u16 {
        health(self.node(node)).await
    }

    /// Waits (bounded) until node `node`'s `/health` answers `status`.
    pub(crate) async fn wait_for_health(&self, node: usize, status: u16, within: Duration) {
        wait_for_health(self.node(node), status, within).await;
        self.step(&format!("node {} /health {status}", node + 1));
    }

    /// Every running node healthy again.
    pub(crate) async fn settle(&self) {
        for node in 0..3 {
            if self.nodes[node].is_some() {
                self.wait_for_health(node, 200, Duration::from_secs(30))
                    .await;
            }
        }
    }
}

/// `node`'s `/health` status (0 if it does not answer).
pub(crate) async fn health(node: &GatewayProcess) -> u16 {
    let url = format!("http://{}/health", node.api_addr());
    match http().get(url).send().await {
        Ok(response) => response.status().as_u16(),
        Err(_) => 0,
    }
}

/// Waits (bounded) until `node`'s `/health` answers `status`.
pub(crate) async fn wait_for_health(node: &GatewayProcess, status: u16, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let now = health(node).await;
        if now == status {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/health answered {now}, not {status}, for {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
