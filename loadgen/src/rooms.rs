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

#[derive(Debug, Serialize)]
pub(crate) struct ConflateReport {
    pub(crate) connections: usize,
    pub(crate) slow_readers: usize,
    pub(crate) keys: usize,
    pub(crate) rate: u32,
    pub(crate) seconds: u64,
    pub(crate) published: u64,
    /// Members the gateway closed (slow consumers among them): the goal is none.
    pub(crate) cut: usize,
    /// Frames the fast and the slow readers received, on average.
    pub(crate) fast_frames_avg: f64,
    pub(crate) slow_frames_avg: f64,
    /// A key whose value went back in time for some reader (never, if conflation holds).
    pub(crate) reversed: u64,
    /// `switchboard_conflated_messages_total` at the end.
    pub(crate) conflated: Option<f64>,
    pub(crate) server_cpu_secs: Option<f64>,
    /// The gateway's RSS, sampled every second after the first two: lowest and highest.
    pub(crate) server_rss_kib_min: Option<u64>,
    pub(crate) server_rss_kib_max: Option<u64>,
    pub(crate) verdict: &'static str,
}

/// What one reader saw.
#[derive(Default)]
struct Seen {
    frames: u64,
    reversed: u64,
    cut: bool,
}

/// C members join a conflating `room`; a tenth of them (`slow_percent`) read at a tenth
/// of the publish rate; the API publishes `rate` keyed ticks a second over `keys` keys
/// for `seconds`. Nobody should be cut, and no key should go back in time.
pub(crate) async fn conflate(
    endpoints: &Endpoints,
    args: ConflateArgs,
) -> anyhow::Result<ConflateReport> {
    let http = reqwest::Client::new();
    let (mut clients, failed) = ramp(endpoints, args.connections).await;
    if failed > 0 {
        bail!("{failed} of {} connections failed", args.connections);
    }
    let join = json!({"action": "join", "room": args.room}).to_string();
    for client in &mut clients {
        client.send_text(&join).await?;
    }
    let timeout = Duration::from_secs(120);
    wait_for_members(&http, endpoints, &args.room, args.connections, timeout).await?;
    let slow_every = (100 / args.slow_percent.clamp(1, 100)).max(1);
    let stop = Instant::now() + Duration::from_secs(args.seconds) + Duration::from_secs(3);
    // A slow reader takes a tenth of the publish rate's bytes a second.
    let slow_bytes_per_sec = (f64::from(args.rate) / 10.0 * args.payload as f64).max(1.0);
    let readers: Vec<_> = (clients.into_iter().enumerate())
        .map(|(index, client)| {
            let slow = index % slow_every == 0;
            let pace = slow.then_some(slow_bytes_per_sec);
            (slow, tokio::spawn(read_keyed(client, pace, stop)))
        })
        .collect();
    let cpu_before = args.server_pid.and_then(cpu_secs);
    let sampling = args
        .server_pid
        .map(|pid| tokio::spawn(sample_rss(pid, args.seconds)));
    let published = publish_keyed(&http, endpoints, &args).await?;
    let (mut fast, mut slow) = ((0u64, 0usize), (0u64, 0usize));
    let (mut cut, mut reversed) = (0, 0);
    for (is_slow, reader) in readers {
        let seen = reader.await?;
        cut += usize::from(seen.cut);
        reversed += seen.reversed;
        let tally = if is_slow { &mut slow } else { &mut fast };
        (tally.0, tally.1) = (tally.0 + seen.frames, tally.1 + 1);
    }
    let server_cpu_secs = match (cpu_before, args.server_pid.and_then(cpu_secs)) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    let rss = match sampling {
        Some(sampling) => sampling.await?,
        None => Vec::new(),
    };
    let metrics_url = endpoints
        .api
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/metrics"));
    let conflated = match metrics_url {
        Some(url) => metric(&http, &url, "switchboard_conflated_messages_total").await,
        None => None,
    };
    let average = |(frames, readers): (u64, usize)| frames as f64 / readers.max(1) as f64;
    Ok(ConflateReport {
        connections: args.connections,
        slow_readers: slow.1,
        keys: args.keys,
        rate: args.rate,
        seconds: args.seconds,
        published,
        cut,
        fast_frames_avg: average(fast),
        slow_frames_avg: average(slow),
        reversed,
        conflated,
        server_cpu_secs,
        server_rss_kib_min: rss.iter().copied().min(),
        server_rss_kib_max: rss.iter().copied().max(),
        verdict: if cut == 0 && reversed == 0 {
            "ok"
        } else {
            "FAILED"
        },
    })
}

/// What the `conflate` scenario is asked.
pub(crate) struct ConflateArgs {
    pub(crate) connections: usize,
    pub(crate) keys: usize,
    pub(crate) rate: u32,
    pub(crate) seconds: u64,
    pub(crate) payload: usize,
    pub(crate) slow_percent: usize,
    pub(crate) room: String,
    pub(crate) server_pid: Option<u32>,
}

/// `rate` keyed ticks a second for `seconds`, in order, through the API; how many went.
async fn publish_keyed(
    http: &reqwest::Client,
    endpoints: &Endpoints,
    args: &ConflateArgs,
) -> anyhow::Result<u64> {
    let total = u64::from(args.rate) * args.seconds;
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / args.rate.max(1));
    let pad = "x".repeat(args.payload.saturating_sub(48));
    for seq in 0..total {
        ticker.tick().await;
        let key = seq % args.keys.max(1) as u64;
        let url = format!("{}/@rooms/{}?key=k{key}", endpoints.api, args.room);
        let tick = format!("{{\"key\":{key},\"seq\":{seq},\"pad\":\"{pad}\"}}");
        let answer = http.post(url).body(tick).send().await?;
        if !answer.status().is_success() {
            bail!("publishing: {}", answer.status());
        }
    }
    Ok(total)
}

/// Reads ticks until `stop` (at `pace` bytes a second, if given): frames, whether a key
/// went back in time, whether the gateway closed the connection.
async fn read_keyed(mut client: Client, pace: Option<f64>, stop: Instant) -> Seen {
    let mut seen = Seen::default();
    let mut last = std::collections::HashMap::<u64, u64>::new();
    let deadline = tokio::time::Instant::from_std(stop);
    loop {
        let mut bytes = 0usize;
        let read = client.read_frames(|frame| {
            let ServerFrame::Data(payload) = frame else {
                return;
            };
            bytes += payload.len();
            seen.frames += 1;
            let tick: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
            if let (Some(key), Some(seq)) = (tick["key"].as_u64(), tick["seq"].as_u64())
                && last.insert(key, seq).is_some_and(|before| seq < before)
            {
                seen.reversed += 1;
            }
        });
        match tokio::time::timeout_at(deadline, read).await {
            Err(_) => return seen,
            Ok(Ok(true)) => {}
            Ok(_) => {
                seen.cut = true;
                return seen;
            }
        }
        if let Some(pace) = pace {
            let pause = Duration::from_secs_f64(bytes as f64 / pace);
            if tokio::time::timeout_at(deadline, tokio::time::sleep(pause))
                .await
                .is_err()
            {
                return seen;
            }
        }
    }
}

/// The gateway's RSS once a second for `seconds`, after the first two.
async fn sample_rss(pid: u32, seconds: u64) -> Vec<u64> {
    let mut samples = Vec::new();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 2..seconds {
        samples.extend(crate::scenario::rss_kib(pid));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    samples
}

/// A metric's value from the gateway's `/metrics`.
async fn metric(http: &reqwest::Client, url: &str, name: &str) -> Option<f64> {
    let text = http.get(url).send().await.ok()?.text().await.ok()?;
    let line = text.lines().find(|line| line.starts_with(name))?;
    line.split_whitespace().last()?.parse().ok()
}
