//! Room scenarios: a reconnect storm that rejoins one room with a history replay, and
//! presence queries on a big room.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::client::{Client, ServerFrame};
use crate::scenario::{Endpoints, Percentiles, histogram, ramp, wait_for_members};

/// Joins sent at once (a storm, not a queue).
const JOIN_CONCURRENCY: usize = 1024;

#[derive(Debug, Serialize)]
pub(crate) struct RejoinReport {
    pub(crate) connections: usize,
    pub(crate) history: usize,
    pub(crate) connect_secs: f64,
    /// From the first join sent to the last member that has its `joined` frame and its
    /// whole replay.
    pub(crate) rejoin_secs: f64,
    pub(crate) replayed_frames: u64,
    /// Time from a member's join to its last replayed frame.
    pub(crate) join_ms: Percentiles,
    /// The gateway's CPU time during the rejoin (user + system), with `--server-pid`.
    pub(crate) server_cpu_secs: Option<f64>,
    pub(crate) verdict: &'static str,
}

/// Publishes `history` messages to `room`, then C connections join it at once asking for
/// them (`{"action":"join","room":R,"history":K}`): a reconnect storm on a room with history.
pub(crate) async fn rejoin(
    endpoints: &Endpoints,
    connections: usize,
    room: &str,
    history: usize,
    server_pid: Option<u32>,
) -> anyhow::Result<RejoinReport> {
    let http = reqwest::Client::new();
    for n in 0..history {
        let url = format!("{}/@rooms/{room}", endpoints.api);
        let answer = http.post(url).body(format!("history {n}")).send().await?;
        if !answer.status().is_success() {
            bail!("publishing the history: {}", answer.status());
        }
    }
    let started = Instant::now();
    let (clients, failed) = ramp(endpoints, connections).await;
    if failed > 0 {
        bail!("{failed} of {connections} connections failed");
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let cpu_before = server_pid.and_then(cpu_secs);
    let join = json!({"action": "join", "room": room, "history": history}).to_string();
    let permits = Arc::new(Semaphore::new(JOIN_CONCURRENCY));
    let rejoin_started = Instant::now();
    let mut tasks = Vec::with_capacity(connections);
    for client in clients {
        let permit = permits.clone().acquire_owned().await?;
        let join = join.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            rejoin_one(client, &join, history + 1).await
        }));
    }
    let mut latencies = histogram();
    let mut replayed_frames = 0;
    let mut incomplete = 0;
    for task in tasks {
        match task.await.context("a joiner panicked")? {
            Ok(elapsed) => {
                replayed_frames += history as u64;
                let _ = latencies.record((elapsed.as_micros() as u64).max(1));
            }
            Err(_) => incomplete += 1,
        }
    }
    let rejoin_secs = rejoin_started.elapsed().as_secs_f64();
    let server_cpu_secs = match (cpu_before, server_pid.and_then(cpu_secs)) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    Ok(RejoinReport {
        connections,
        history,
        connect_secs,
        rejoin_secs,
        replayed_frames,
        join_ms: Percentiles::of(&latencies),
        server_cpu_secs,
        verdict: if incomplete == 0 { "ok" } else { "INCOMPLETE" },
    })
}

/// Sends the join and reads `frames` data frames (`joined` and the replay).
async fn rejoin_one(mut client: Client, join: &str, frames: usize) -> anyhow::Result<Duration> {
    let sent = Instant::now();
    client.send_text(join).await?;
    let mut received = 0;
    while received < frames {
        let read = client.read_frames(|frame| {
            if let ServerFrame::Data(_) = frame {
                received += 1;
            }
        });
        let open = tokio::time::timeout(Duration::from_secs(60), read).await??;
        if !open && received < frames {
            bail!("closed after {received} of {frames} frames");
        }
    }
    Ok(sent.elapsed())
}

#[derive(Debug, Serialize)]
pub(crate) struct PresenceReport {
    pub(crate) members: usize,
    pub(crate) queries: usize,
    /// `GET @rooms/{room}/presence`: every member listed.
    pub(crate) full_ms: Percentiles,
    pub(crate) full_bytes: usize,
    /// `?members=false`: the counts only.
    pub(crate) counts_ms: Percentiles,
}

/// C connections join `room`; then `queries` presence requests of each kind, one at a time.
pub(crate) async fn presence(
    endpoints: &Endpoints,
    connections: usize,
    room: &str,
    queries: usize,
) -> anyhow::Result<PresenceReport> {
    let http = reqwest::Client::new();
    let (mut clients, failed) = ramp(endpoints, connections).await;
    if failed > 0 {
        bail!("{failed} of {connections} connections failed");
    }
    let join = json!({"action": "join", "room": room}).to_string();
    for client in &mut clients {
        client.send_text(&join).await?;
    }
    let timeout = Duration::from_secs(120);
    wait_for_members(&http, endpoints, room, connections, timeout).await?;
    let url = format!("{}/@rooms/{room}/presence", endpoints.api);
    let time = |query: &'static str| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let mut latencies = histogram();
            let mut bytes = 0;
            for _ in 0..queries {
                let started = Instant::now();
                let body = http
                    .get(format!("{url}{query}"))
                    .send()
                    .await?
                    .bytes()
                    .await?;
                let _ = latencies.record((started.elapsed().as_micros() as u64).max(1));
                bytes = body.len();
            }
            anyhow::Ok((Percentiles::of(&latencies), bytes))
        }
    };
    let (full_ms, full_bytes) = time("").await?;
    let (counts_ms, _) = time("?members=false").await?;
    drop(clients);
    Ok(PresenceReport {
        members: connections,
        queries,
        full_ms,
        full_bytes,
        counts_ms,
    })
}

/// `pid`'s CPU time so far (user + system), from `/proc/{pid}/stat`.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
