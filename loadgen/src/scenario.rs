//! The scenarios: `connect` (ramp and hold idle connections), `fanout` (room broadcasts via
//! `POST /@rooms/{room}`), `bulk` (the same through bulk `POST /@connections`) and `push`
//! (one `POST /@connections/{id}` per member and message).
//!
//! Every run is bounded: publishing stops after the message count, waiting for stragglers
//! after `--drain-secs`, and the whole run after `--timeout-secs`.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::body::Body;
use crate::client::{Client, ServerFrame, Target};
use crate::publisher::Pipeline;

/// Connections opened at once while ramping.
const RAMP_CONCURRENCY: usize = 128;
/// Frames a max-rate queue sender writes per system call.
const SEND_GROUP: usize = 16;
/// Bytes at the start of every payload: sequence (10) and send time in ns (20).
const STAMP_LEN: usize = 30;

/// Nanoseconds on a clock every process on the machine reads alike (the wall clock), so a
/// listener in another process (`fanout --listen-only`) can read the publisher's stamps.
fn now_ns() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |d| d.as_nanos() as u64)
}

/// Where the gateway is and how to reach it.
#[derive(Clone)]
pub(crate) struct Endpoints {
    /// Clients are spread over these round-robin (the nodes of a cluster).
    pub(crate) targets: Vec<Target>,
    /// `http://HOST:PORT/{stage}`.
    pub(crate) api: String,
    /// Client connections come from 127.0.0.B … 127.0.0.(B+N-1): B `source_base`, N this.
    pub(crate) source_addrs: u8,
    pub(crate) source_base: u8,
}

impl Endpoints {
    fn source(&self, index: usize) -> IpAddr {
        let offset = (index % usize::from(self.source_addrs.max(1))) as u8;
        let last = self.source_base.max(1).saturating_add(offset);
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }
}

/// Opens `count` connections, `RAMP_CONCURRENCY` at a time; returns them and the failures.
pub(crate) async fn ramp(endpoints: &Endpoints, count: usize) -> (Vec<Client>, usize) {
    let permits = Arc::new(Semaphore::new(RAMP_CONCURRENCY));
    let mut tasks = Vec::with_capacity(count);
    for index in 0..count {
        let permit = permits.clone().acquire_owned().await;
        let target = endpoints.targets[index % endpoints.targets.len()].clone();
        let source = endpoints.source(index);
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            Client::connect(&target, source).await
        }));
    }
    let mut clients = Vec::with_capacity(count);
    let mut failed = 0;
    for task in tasks {
        match task.await {
            Ok(Ok(client)) => clients.push(client),
            Ok(Err(error)) => {
                if failed == 0 {
                    eprintln!("connect failed: {error:#}");
                }
                failed += 1;
            }
            Err(_) => failed += 1,
        }
    }
    (clients, failed)
}

/// Resident set size of `pid` in KiB.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[derive(Debug, Serialize)]
pub(crate) struct ConnectReport {
    pub(crate) requested: usize,
    pub(crate) connected: usize,
    pub(crate) failed: usize,
    pub(crate) connect_secs: f64,
    pub(crate) connects_per_sec: f64,
    pub(crate) held_secs: u64,
    pub(crate) server_rss_before_kib: Option<u64>,
    pub(crate) server_rss_after_kib: Option<u64>,
    pub(crate) rss_per_connection_kib: Option<f64>,
}

pub(crate) async fn connect(
    endpoints: &Endpoints,
    count: usize,
    hold: Duration,
    server_pid: Option<u32>,
) -> ConnectReport {
    let before = server_pid.and_then(rss_kib);
    let started = Instant::now();
    let (clients, failed) = ramp(endpoints, count).await;
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(hold).await;
    let after = server_pid.and_then(rss_kib);
    let per_connection = match (before, after) {
        (Some(b), Some(a)) if !clients.is_empty() => {
            Some(a.saturating_sub(b) as f64 / clients.len() as f64)
        }
        _ => None,
    };
    let report = ConnectReport {
        requested: count,
        connected: clients.len(),
        failed,
        connect_secs,
        connects_per_sec: clients.len() as f64 / connect_secs.max(1e-9),
        held_secs: hold.as_secs(),
        server_rss_before_kib: before,
        server_rss_after_kib: after,
        rss_per_connection_kib: per_connection,
    };
    drop(clients);
    report
}

/// How a fan-out run publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Delivery {
    /// `POST /{stage}/@rooms/{room}`.
    Room,
    /// `POST /{stage}/@connections` with every member's id.
    Bulk,
    /// `POST /{stage}/@connections/{id}` to each member.
    Push,
}

#[derive(Debug, Clone)]
pub(crate) struct FanoutArgs {
    pub(crate) connections: usize,
    pub(crate) messages: usize,
    pub(crate) payload: usize,
    /// Messages per second; `None` = as fast as `window` allows.
    pub(crate) rate: Option<u32>,
    pub(crate) window: usize,
    pub(crate) room: String,
    pub(crate) body: Body,
    pub(crate) delivery: Delivery,
    pub(crate) drain: Duration,
    pub(crate) timeout: Duration,
    /// The room's members across every process, waited for before publishing.
    pub(crate) room_members: usize,
    /// Receive only: another process publishes.
    pub(crate) listen_only: bool,
}

#[derive(Debug, Serialize)]
pub(crate) struct FanoutReport {
    pub(crate) delivery: Delivery,
    pub(crate) connections: usize,
    pub(crate) messages: usize,
    pub(crate) payload_bytes: usize,
    pub(crate) body: Body,
    /// Bytes the subscribers read off the wire per message delivered: frame headers
    /// included, after permessage-deflate where it was negotiated (`--deflate`).
    pub(crate) wire_bytes_per_delivery: f64,
    pub(crate) rate: Option<u32>,
    pub(crate) expected: u64,
    pub(crate) delivered: u64,
    pub(crate) duplicates: u64,
    pub(crate) out_of_order: u64,
    pub(crate) closed_by_server: usize,
    pub(crate) publish_errors: usize,
    /// The first failed publish request and the gateway's answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) first_publish_error: Option<String>,
    pub(crate) publish_secs: f64,
    pub(crate) deliveries_per_sec: f64,
    pub(crate) latency_ms: Percentiles,
    /// Round trip of each publishing HTTP request, as the publisher saw it.
    pub(crate) request_ms: Percentiles,
    pub(crate) verdict: &'static str,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct Percentiles {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
}

impl Percentiles {
    pub(crate) fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            p50: ms(histogram.value_at_quantile(0.5)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
        }
    }
}

/// What every subscriber adds to.
#[derive(Default)]
struct Tally {
    delivered: AtomicU64,
    duplicates: AtomicU64,
    out_of_order: AtomicU64,
    closed: AtomicUsize,
    last_delivery_ns: AtomicU64,
    /// The earliest stamp read (when the first message was sent), `u64::MAX` before one.
    first_sent_ns: AtomicU64,
    wire_bytes: AtomicU64,
}

pub(crate) fn histogram() -> Histogram<u64> {
    // Microseconds, up to 10 minutes, 3 significant figures.
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

pub(crate) async fn fanout(
    endpoints: &Endpoints,
    args: &FanoutArgs,
) -> anyhow::Result<FanoutReport> {
    let http = reqwest::Client::new();
    let (mut clients, failed) = ramp(endpoints, args.connections).await;
    if failed > 0 {
        bail!("{failed} of {} connections failed", args.connections);
    }
    let join = json!({"action": "join", "room": args.room}).to_string();
    for client in &mut clients {
        client.send_text(&join).await?;
    }
    let members = wait_for_members(
        &http,
        endpoints,
        &args.room,
        args.room_members,
        args.timeout,
    )
    .await?;

    let tally = Arc::new(Tally {
        first_sent_ns: AtomicU64::new(u64::MAX),
        ..Tally::default()
    });
    let latencies = Arc::new(Mutex::new(histogram()));
    let deadline = Instant::now() + args.timeout;
    let subscribers: Vec<_> = clients
        .into_iter()
        .map(|client| {
            let tally = tally.clone();
            let latencies = latencies.clone();
            tokio::spawn(subscribe(client, args.messages, tally, latencies, deadline))
        })
        .collect();

    let published_at = Instant::now();
    let first_publish_ns = now_ns();
    let (publish_errors, first_publish_error, requests) = if args.listen_only {
        (0, None, histogram())
    } else {
        publish(endpoints, args, &members).await?
    };
    let publish_secs = published_at.elapsed().as_secs_f64();
    // Listening only, the publisher's pace is unknown: wait for everything, or the limit.
    let drain_deadline = match args.listen_only {
        true => deadline,
        false => (Instant::now() + args.drain).min(deadline),
    };
    for subscriber in subscribers {
        let remaining = drain_deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(remaining, subscriber).await.is_err() {
            // Stragglers are counted as undelivered; their tasks end at the deadline.
        }
    }

    let expected = (args.connections * args.messages) as u64;
    let delivered = tally.delivered.load(Ordering::Relaxed);
    // From the first publish; listening only, from the first message's own stamp.
    let started_ns = match args.listen_only {
        true => tally.first_sent_ns.load(Ordering::Relaxed),
        false => first_publish_ns,
    };
    let span_ns = tally
        .last_delivery_ns
        .load(Ordering::Relaxed)
        .saturating_sub(started_ns)
        .max(1);
    let closed = tally.closed.load(Ordering::Relaxed);
    let duplicates = tally.duplicates.load(Ordering::Relaxed);
    let out_of_order = tally.out_of_order.load(Ordering::Relaxed);
    let verdict = if publish_errors > 0 {
        "PUBLISHER FAILED"
    } else if closed > 0 {
        "DROPPED"
    } else if duplicates > 0 || out_of_order > 0 {
        "LOST"
    } else if delivered < expected {
        "BACKLOG"
    } else {
        "ok"
    };
    let latency = {
        let histogram = latencies
            .lock()
            .map_err(|_| anyhow::anyhow!("latency histogram poisoned"))?;
        Percentiles::of(&histogram)
    };
    Ok(FanoutReport {
        delivery: args.delivery,
        connections: args.connections,
        messages: args.messages,
        payload_bytes: args.payload,
        body: args.body,
        wire_bytes_per_delivery: tally.wire_bytes.load(Ordering::Relaxed) as f64
            / delivered.max(1) as f64,
        rate: args.rate,
        expected,
        delivered,
        duplicates,
        out_of_order,
        closed_by_server: closed,
        publish_errors,
        first_publish_error,
        publish_secs,
        deliveries_per_sec: delivered as f64 / (span_ns as f64 / 1e9),
        latency_ms: latency,
        request_ms: Percentiles::of(&requests),
        verdict,
    })
}

/// Polls `GET /@rooms/{room}` until it lists `count` members; returns their ids.
pub(crate) async fn wait_for_members(
    http: &reqwest::Client,
    endpoints: &Endpoints,
    room: &str,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let url = format!("{}/@rooms/{room}", endpoints.api);
    let deadline = Instant::now() + timeout;
    loop {
        let body = http.get(&url).send().await?.bytes().await?;
        let listing: Value = serde_json::from_slice(&body).context("GET @rooms answer")?;
        if listing["count"].as_u64() == Some(count as u64) {
            let ids = listing["connectionIds"]
                .as_array()
                .map(|ids| {
                    ids.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            return Ok(ids);
        }
        if Instant::now() > deadline {
            bail!("room {room} has {} of {count} members", listing["count"]);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn payload(seq: usize, size: usize, body: Body) -> String {
    let mut text = format!("{seq:010}{:020}", now_ns());
    crate::body::append(&mut text, body, seq, size.saturating_sub(STAMP_LEN));
    text
}

/// Publishes every message over one pipelined connection; returns the failed requests,
/// the first failure's answer and the request round trips.
async fn publish(
    endpoints: &Endpoints,
    args: &FanoutArgs,
    members: &[String],
) -> anyhow::Result<(usize, Option<String>, Histogram<u64>)> {
    let mut pipeline = Pipeline::connect(&endpoints.api, args.window).await?;
    let stage_path = endpoints
        .api
        .trim_start_matches("http://")
        .split_once('/')
        .map_or(String::new(), |(_, path)| format!("/{path}"));
    let mut ticker = args
        .rate
        .map(|rate| tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1)))));
    for seq in 0..args.messages {
        if let Some(ticker) = ticker.as_mut() {
            ticker.tick().await;
        }
        match args.delivery {
            Delivery::Room => {
                let path = format!("{stage_path}/@rooms/{}", args.room);
                pipeline
                    .post(
                        &path,
                        "application/octet-stream",
                        payload(seq, args.payload, args.body).as_bytes(),
                    )
                    .await?;
            }
            Delivery::Bulk => {
                let data = payload(seq, args.payload, args.body);
                let body = json!({"connectionIds": members, "data": data});
                let path = format!("{stage_path}/@connections");
                pipeline
                    .post(&path, "application/json", body.to_string().as_bytes())
                    .await?;
            }
            Delivery::Push => {
                let body = payload(seq, args.payload, args.body);
                for member in members {
                    let path = format!("{stage_path}/@connections/{member}");
                    pipeline
                        .post(&path, "application/octet-stream", body.as_bytes())
                        .await?;
                }
            }
        }
    }
    let requests_sent = match args.delivery {
        Delivery::Push => args.messages * members.len(),
        Delivery::Room | Delivery::Bulk => args.messages,
    };
    let outcome = pipeline.finish(requests_sent).await?;
    let mut requests = histogram();
    for us in outcome.round_trips_us {
        let _ = requests.record(us.max(1));
    }
    Ok((outcome.failures, outcome.first_failure, requests))
}

/// Reads until every message arrived, the server closed, or the deadline passed.
async fn subscribe(
    mut client: Client,
    messages: usize,
    tally: Arc<Tally>,
    latencies: Arc<Mutex<Histogram<u64>>>,
    deadline: Instant,
) {
    let mut next_seq = 0usize;
    let mut received = 0usize;
    let mut samples: Vec<u64> = Vec::with_capacity(64);
    // Messages counted but left compressed (`--deflate count`): no stamp to read.
    let mut unread = 0u64;
    let deadline = tokio::time::Instant::from_std(deadline);
    while received < messages {
        let read = client.read_frames(|frame| {
            let payload = match frame {
                ServerFrame::Data(payload) => payload,
                ServerFrame::Compressed => {
                    received += 1;
                    unread += 1;
                    return;
                }
                ServerFrame::Close | ServerFrame::Other => return,
            };
            let Some((seq, sent_ns)) = parse_stamp(payload) else {
                return;
            };
            let now = now_ns();
            tally.first_sent_ns.fetch_min(sent_ns, Ordering::Relaxed);
            samples.push(now.saturating_sub(sent_ns) / 1000);
            received += 1;
            if seq == next_seq {
                next_seq += 1;
            } else if seq < next_seq {
                tally.duplicates.fetch_add(1, Ordering::Relaxed);
            } else {
                tally.out_of_order.fetch_add(1, Ordering::Relaxed);
                next_seq = seq + 1;
            }
        });
        let open = match tokio::time::timeout_at(deadline, read).await {
            Ok(Ok(open)) => open,
            Ok(Err(_)) => false,
            Err(_) => break,
        };
        if !samples.is_empty() || unread > 0 {
            let delivered = samples.len() as u64 + std::mem::take(&mut unread);
            tally.delivered.fetch_add(delivered, Ordering::Relaxed);
            tally
                .last_delivery_ns
                .fetch_max(now_ns(), Ordering::Relaxed);
            if let Ok(mut histogram) = latencies.lock() {
                for sample in samples.drain(..) {
                    let _ = histogram.record(sample.max(1));
                }
            }
        }
        if !open {
            tally.closed.fetch_add(1, Ordering::Relaxed);
            break;
        }
    }
    (tally.wire_bytes).fetch_add(client.wire_bytes(), Ordering::Relaxed);
}

fn parse_stamp(payload: &[u8]) -> Option<(usize, u64)> {
    let text = std::str::from_utf8(payload.get(..STAMP_LEN)?).ok()?;
    Some((text[..10].parse().ok()?, text[10..].parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_stamp_round_trips() {
        let text = payload(42, 128, Body::Pad);
        assert_eq!(text.len(), 128);
        let (seq, ns) = parse_stamp(text.as_bytes()).unwrap();
        assert_eq!(seq, 42);
        assert!(ns <= now_ns());
    }
}

#[derive(Debug, Clone)]
pub(crate) struct QueueArgs {
    pub(crate) connections: usize,
    pub(crate) messages: usize,
    pub(crate) payload: usize,
    /// Frames per second over all connections; `None` = as fast as acks come back.
    pub(crate) rate: Option<u32>,
    /// The route (`action`) whose integration is a `queue` with `ack = true`.
    pub(crate) action: String,
    pub(crate) timeout: Duration,
}

#[derive(Debug, Serialize)]
pub(crate) struct QueueReport {
    pub(crate) connections: usize,
    pub(crate) messages: usize,
    pub(crate) frame_bytes: usize,
    pub(crate) rate: Option<u32>,
    pub(crate) acked: u64,
    pub(crate) errors: u64,
    /// The first frame that was not an ack (the gateway's error frame says why), and
    /// what a run that fell short saw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) first_error: Option<String>,
    pub(crate) secs: f64,
    pub(crate) acks_per_sec: f64,
    /// From sending a frame to reading its ack.
    pub(crate) ack_latency_ms: Percentiles,
    pub(crate) verdict: &'static str,
}

/// Frames go to a queue route with `ack = true`; every ack is matched to its frame (acks
/// come back in frame order) to time frame → durable → ack.
pub(crate) async fn queue(endpoints: &Endpoints, args: &QueueArgs) -> anyhow::Result<QueueReport> {
    let (clients, failed) = ramp(endpoints, args.connections).await;
    if failed > 0 {
        bail!("{failed} of {} connections failed", args.connections);
    }
    let per_connection = args.messages.div_ceil(args.connections.max(1));
    let args_timeout = args.timeout;
    let interval = args
        .rate
        .map(|rate| Duration::from_secs_f64(args.connections as f64 / f64::from(rate.max(1))));
    let latencies = Arc::new(Mutex::new(histogram()));
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<OnceLock<String>> = Arc::new(OnceLock::new());
    let deadline = tokio::time::Instant::now() + args.timeout;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut client in clients {
        let Some(mut writer) = client.take_writer() else {
            continue;
        };
        let (sent_at, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        let frame_base = json!({"action": args.action, "seq": 0, "pad": ""})
            .to_string()
            .len();
        let pad = "x".repeat(args.payload.saturating_sub(frame_base + 6));
        let action = args.action.clone();
        // The writer goes to the reader when done: dropping it would half-close the socket,
        // which the gateway rightly takes as the client leaving.
        let (handover, writer_back) = tokio::sync::oneshot::channel();
        tasks.push(tokio::spawn(async move {
            let mut ticker = interval.map(tokio::time::interval);
            // At a fixed rate every frame leaves on its tick; at max rate frames leave in
            // groups of SEND_GROUP per write, so the client's syscalls do not bound the run.
            let group = if ticker.is_some() { 1 } else { SEND_GROUP };
            let mut seq = 0;
            while seq < per_connection {
                if let Some(ticker) = ticker.as_mut() {
                    ticker.tick().await;
                }
                let count = group.min(per_connection - seq);
                let frames: Vec<String> = (seq..seq + count)
                    .map(|s| json!({"action": action, "seq": s, "pad": pad}).to_string())
                    .collect();
                let now = Instant::now();
                for _ in 0..count {
                    let _ = sent_at.send(now);
                }
                if writer.send_texts(&frames).await.is_err() {
                    break;
                }
                seq += count;
            }
            let _ = handover.send(writer);
        }));
        let (latencies, acked, errors) = (latencies.clone(), acked.clone(), errors.clone());
        let first_error = first_error.clone();
        tasks.push(tokio::spawn(async move {
            let _writer = writer_back;
            let mut received = 0;
            let mut samples = Vec::with_capacity(64);
            while received < per_connection {
                let read = client.read_frames(|frame| {
                    if let ServerFrame::Data(payload) = frame {
                        received += 1;
                        let is_ack = switchboard::protocol::is_ack(payload);
                        match sent_rx.try_recv() {
                            Ok(sent) if is_ack => samples.push(sent.elapsed().as_micros() as u64),
                            _ => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                let text = String::from_utf8_lossy(payload);
                                let _ = first_error.set(text.chars().take(300).collect());
                            }
                        }
                    }
                });
                match tokio::time::timeout_at(deadline, read).await {
                    Ok(Ok(true)) => {}
                    Ok(Ok(false)) => {
                        let _ = first_error.set("the gateway closed the connection".into());
                        break;
                    }
                    Ok(Err(error)) => {
                        let _ = first_error.set(format!("connection failed: {error:#}"));
                        break;
                    }
                    Err(_) => {
                        let _ = first_error
                            .set(format!("no ack within --timeout-secs ({:?})", args_timeout));
                        break;
                    }
                }
                acked.fetch_add(samples.len() as u64, Ordering::Relaxed);
                if let Ok(mut histogram) = latencies.lock() {
                    for sample in samples.drain(..) {
                        let _ = histogram.record(sample.max(1));
                    }
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let secs = started.elapsed().as_secs_f64();
    let acked = acked.load(Ordering::Relaxed);
    let errors = errors.load(Ordering::Relaxed);
    let expected = (per_connection * args.connections) as u64;
    let latency = {
        let histogram = latencies
            .lock()
            .map_err(|_| anyhow::anyhow!("latency histogram poisoned"))?;
        Percentiles::of(&histogram)
    };
    Ok(QueueReport {
        connections: args.connections,
        messages: expected as usize,
        frame_bytes: args.payload,
        rate: args.rate,
        acked,
        errors,
        first_error: first_error.get().cloned(),
        secs,
        acks_per_sec: acked as f64 / secs.max(1e-9),
        ack_latency_ms: latency,
        verdict: if errors > 0 {
            "ERRORS"
        } else if acked < expected {
            "INCOMPLETE"
        } else {
            "ok"
        },
    })
}
