//! The `switchboard` binary as a child process: started on a config file, its addresses
//! read from its startup log line, its resources (RSS, open files) read from /proc.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

pub(crate) fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// Runs `switchboard serve --config CONFIG`, expecting it to refuse to start: its exit code
/// and stderr, or a panic if it is still running after `limit`.
pub(crate) fn refused_start(config_path: &Path, limit: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr);
            return (status.code(), stderr);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the gateway was expected to refuse to start, but it still runs after {limit:?}");
}

/// A gateway process with its addresses, read from its startup log line.
pub(crate) struct GatewayProcess {
    pub(crate) child: Child,
    pub(crate) ws_url: String,
    pub(crate) api_url: String,
    stderr: std::sync::mpsc::Receiver<String>,
    /// Lines read while waiting for the addresses.
    startup_lines: Vec<String>,
}

impl GatewayProcess {
    pub(crate) fn start(config_path: &Path, extra_args: &[&str]) -> Self {
        let mut command = Command::new(BIN);
        command
            .args(extra_args)
            .args(["serve", "--config"])
            .arg(config_path);
        Self::launch(command)
    }

    /// Starts the gateway with `env` added to its environment.
    pub(crate) fn start_with_env(config_path: &Path, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(BIN);
        command
            .envs(env.iter().copied())
            .args(["serve", "--config"])
            .arg(config_path);
        Self::launch(command)
    }

    /// Starts the gateway in network namespace `namespace` (`ip netns exec`: the child is
    /// the gateway itself).
    pub(crate) fn start_in_namespace(
        namespace: &str,
        config_path: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let mut command = Command::new("ip");
        command
            .envs(env.iter().copied())
            .args(["netns", "exec", namespace, BIN, "serve", "--config"])
            .arg(config_path);
        Self::launch(command)
    }

    /// Starts the gateway with its open-files limit (soft and hard) set to `open_files`.
    pub(crate) fn start_with_open_files(config_path: &Path, open_files: u64) -> Self {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("ulimit -n {open_files} && exec \"$0\" \"$@\""))
            .arg(BIN)
            .args(["serve", "--config"])
            .arg(config_path);
        Self::launch(command)
    }

    #[expect(
        clippy::zombie_processes,
        reason = "Drop kills and waits for the child"
    )]
    fn launch(mut command: Command) -> Self {
        let mut child = command
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (lines, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut startup_lines = Vec::new();
        loop {
            let line = receiver
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the gateway logs its addresses at start");
            startup_lines.push(line.clone());
            let ws = field(&line, "ws://").or_else(|| field(&line, "wss://"));
            let api = field(&line, "http://").or_else(|| field(&line, "https://"));
            if let (Some(ws), Some(api)) = (ws, api) {
                return Self {
                    child,
                    ws_url: ws,
                    api_url: api.trim_end_matches("/@connections").to_owned(),
                    stderr: receiver,
                    startup_lines,
                };
            }
        }
    }

    /// `host:port` of the WebSocket listener.
    pub(crate) fn ws_addr(&self) -> std::net::SocketAddr {
        let rest = self.ws_url.split("://").nth(1).unwrap();
        rest.split('/').next().unwrap().parse().unwrap()
    }

    /// `host:port` of the management API.
    pub(crate) fn api_addr(&self) -> std::net::SocketAddr {
        let rest = self.api_url.split("://").nth(1).unwrap();
        rest.split('/').next().unwrap().parse().unwrap()
    }

    /// Resident memory, from /proc.
    pub(crate) fn rss_bytes(&self) -> u64 {
        self.memory_status("VmRSS:")
    }

    /// The most resident memory the process has had (its high-water mark), from /proc.
    pub(crate) fn peak_rss_bytes(&self) -> u64 {
        self.memory_status("VmHWM:")
    }

    fn memory_status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"));
        kib * 1024
    }

    /// File descriptors the process has open, from /proc.
    pub(crate) fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }

    /// One sample of a metric (summed over its label sets) from `/metrics`.
    pub(crate) async fn metric(&self, name: &str) -> f64 {
        let text = crate::support::http()
            .get(format!("http://{}/metrics", self.api_addr()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        crate::support::metric_value(&text, name)
    }

    pub(crate) fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([name, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; returns its code and how long it took.
    pub(crate) fn wait(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        panic!("gateway still running after {limit:?}");
    }

    /// Everything the process wrote to stderr; call after it exited (waits for the pipe's
    /// end, so no line is missed).
    pub(crate) fn logged(&self) -> Vec<String> {
        let mut lines = self.startup_lines.clone();
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(5)) {
            lines.push(line);
        }
        lines
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // A failing test shows what the gateway said.
            for line in self.logged() {
                eprintln!("[gateway {}] {line}", self.child.id());
            }
        }
    }
}

/// The URL in a log field that starts with `scheme`, without ANSI colour codes.
fn field(line: &str, scheme: &str) -> Option<String> {
    let start = line.find(scheme)?;
    let url: String = line[start..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"' && *c != '\u{1b}')
        .collect();
    Some(url)
}

pub(crate) fn write_config(dir: &Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("switchboard.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshards = 2\ndata_dir = \"{}\"\n[management]\nlisten = \"127.0.0.1:0\"\n{body}",
        dir.join("data").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}
