//! Real nats-server processes for the cluster tests: one server, or a three-server
//! JetStream cluster, on free loopback ports, with their stores in temp dirs.
//!
//! The binary comes from `SWITCHBOARD_NATS_SERVER`, the venv `.ci/run` installs
//! (`~/.cache/switchboard-nats-venv`), or `PATH`. Without one the cluster tests are
//! skipped, unless `SWITCHBOARD_REQUIRE_NATS=1` (CI) makes that a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The nats-server binary, if there is one.
pub(crate) fn binary() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("SWITCHBOARD_NATS_SERVER").map(PathBuf::from),
        std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(".cache/switchboard-nats-venv/bin/nats-server")),
    ];
    let found = candidates.into_iter().flatten().find(|path| path.is_file());
    let found = found.or_else(|| {
        let status = Command::new("nats-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status();
        status
            .is_ok_and(|s| s.success())
            .then(|| PathBuf::from("nats-server"))
    });
    if found.is_none() {
        assert!(
            std::env::var("SWITCHBOARD_REQUIRE_NATS").is_err(),
            "SWITCHBOARD_REQUIRE_NATS is set but no nats-server was found"
        );
        eprintln!("skipped: no nats-server (bash .ci/run installs one)");
    }
    found
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One nats-server process, restartable on the same port and store.
pub(crate) struct NatsServer {
    binary: PathBuf,
    args: Vec<String>,
    /// The environment its config reads (`$NAME`).
    env: Vec<(String, String)>,
    pub(crate) port: u16,
    pub(crate) monitor_port: u16,
    child: Option<Child>,
    _store: tempfile::TempDir,
}

impl NatsServer {
    /// A single JetStream server.
    pub(crate) fn start(binary: &Path) -> Self {
        Self::launch(binary, Vec::new())
    }

    /// A single JetStream server that requires `token`.
    pub(crate) fn start_with_token(binary: &Path, token: &str) -> Self {
        Self::launch(binary, vec!["--auth".into(), token.into()])
    }

    /// A single JetStream server with `config` (nats-server's own syntax; an unquoted
    /// `$NAME` in it is read from `env`), on the usual loopback port and store.
    pub(crate) fn start_with_config(binary: &Path, config: &str, env: &[(&str, &str)]) -> Self {
        let store = tempfile::tempdir().unwrap();
        let path = store.path().join("nats.conf");
        std::fs::write(&path, config).unwrap();
        let env = env
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        let extra = vec!["-c".into(), path.display().to_string()];
        Self::launch_with(binary, extra, env, store, 5).expect(FIVE_TRIES)
    }

    fn launch(binary: &Path, extra: Vec<String>) -> Self {
        Self::try_launch(binary, extra, 5).expect(FIVE_TRIES)
    }

    /// A server with `extra` arguments, on free ports, if it starts within `attempts`.
    fn try_launch(binary: &Path, extra: Vec<String>, attempts: usize) -> Option<Self> {
        let store = tempfile::tempdir().unwrap();
        Self::launch_with(binary, extra, Vec::new(), store, attempts)
    }

    fn launch_with(
        binary: &Path,
        extra: Vec<String>,
        env: Vec<(String, String)>,
        store: tempfile::TempDir,
        attempts: usize,
    ) -> Option<Self> {
        // A free port can be taken by another test's server between our look and its
        // bind: a server that exits at once is started again on other ports.
        let mut server = Self {
            binary: binary.to_path_buf(),
            args: Vec::new(),
            env,
            port: 0,
            monitor_port: 0,
            child: None,
            _store: store,
        };
        for _ in 0..attempts {
            server.port = free_port();
            server.monitor_port = free_port();
            server.args = vec![
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                server.port.to_string(),
                "-m".into(),
                server.monitor_port.to_string(),
                "-js".into(),
                "-sd".into(),
                server._store.path().display().to_string(),
            ];
            server.args.extend(extra.iter().cloned());
            if server.try_spawn() {
                return Some(server);
            }
        }
        None
    }

    /// Starts the server and waits until it listens; false if it exited first.
    fn try_spawn(&mut self) -> bool {
        let mut child = Command::new(&self.binary)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if child.try_wait().ok().flatten().is_some() {
                return false;
            }
            assert!(Instant::now() < deadline, "nats-server listens within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        true
    }

    fn spawn(&mut self) {
        assert!(self.try_spawn(), "nats-server starts again on its port");
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL).
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub(crate) fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A counter from the server's own monitoring endpoint (`/varz`), e.g. `out_msgs`.
    pub(crate) async fn varz(&self, field: &str) -> u64 {
        let url = format!("http://127.0.0.1:{}/varz", self.monitor_port);
        let varz: serde_json::Value = crate::support::http()
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        varz[field].as_u64().unwrap_or(0)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

const FIVE_TRIES: &str = "nats-server would not start on any of five pairs of free ports";

/// Three servers routed to each other, if each starts on its first ports.
fn cluster_on_free_ports(binary: &Path) -> Option<Vec<NatsServer>> {
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let route_urls = routes
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let server = |(index, port): (usize, &u16)| {
        let extra = vec![
            "--name".into(),
            format!("sb-test-{index}"),
            "--cluster_name".into(),
            "sb-test".into(),
            "--cluster".into(),
            format!("nats://127.0.0.1:{port}"),
            "--routes".into(),
            route_urls.clone(),
        ];
        NatsServer::try_launch(binary, extra, 1)
    };
    routes.iter().enumerate().map(server).collect()
}

/// Three servers in one JetStream cluster, once it has elected a meta leader.
pub(crate) async fn start_cluster(binary: &Path) -> Vec<NatsServer> {
    // A route port can be taken by another test between our look and the server's bind:
    // then the whole cluster starts again on other ports.
    let servers = (0..5)
        .find_map(|_| cluster_on_free_ports(binary))
        .expect("a nats-server cluster starts on one of five sets of free ports");
    // JetStream needs a meta leader before streams can be created.
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = format!("http://127.0.0.1:{}/jsz", servers[0].monitor_port);
    loop {
        let jsz: serde_json::Value = match crate::support::http().get(&url).send().await {
            Ok(response) => response.json().await.unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        };
        let leader = jsz["meta_cluster"]["leader"].as_str().unwrap_or_default();
        let peers = jsz["meta_cluster"]["cluster_size"].as_u64().unwrap_or(0);
        if !leader.is_empty() && peers == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "JetStream cluster has a leader within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    servers
}
