//! `switchboard-loadgen`: load generator and measurement tool for Switchboard.
//!
//! Loopback only, bounded in count and time. Prints a human table, or JSON with `--json`.

mod body;
mod client;
mod publisher;
mod rooms;
mod scenario;

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::body::Body;
use crate::client::Target;
use crate::scenario::{Delivery, Endpoints, FanoutArgs};

#[derive(Parser)]
#[command(
    name = "switchboard-loadgen",
    version,
    about = "Load generator for Switchboard (loopback only)"
)]
struct Cli {
    /// Gateway WebSocket URL; several, comma-separated, spread the clients over them
    /// round-robin (the nodes of a cluster).
    #[arg(
        long,
        global = true,
        default_value = "ws://127.0.0.1:8080/dev",
        value_delimiter = ','
    )]
    url: Vec<String>,
    /// Management API base URL, with the stage.
    #[arg(long, global = true, default_value = "http://127.0.0.1:9090/dev")]
    api: String,
    /// PEM certificate(s) to trust for a wss:// --url.
    #[arg(long, global = true)]
    ca: Option<std::path::PathBuf>,
    /// Spread client connections over 127.0.0.1 … 127.0.0.N (each adds ~28,000 ports).
    #[arg(long, global = true, default_value_t = 1)]
    source_addrs: u8,
    /// The first source address is 127.0.0.B (several load generators side by side each
    /// take their own addresses, and so their own ports).
    #[arg(long, global = true, default_value_t = 1)]
    source_base: u8,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// WebSocket clients offer permessage-deflate (as browsers do) and inflate what comes
    /// compressed; `--deflate count` counts compressed messages without inflating them (no
    /// latency or order for those: the client's inflating then costs nothing, so a client
    /// sharing the server's cores measures the server).
    #[arg(long, global = true, value_enum, num_args = 0..=1, default_missing_value = "inflate")]
    deflate: Option<client::Deflate>,
    /// Client transport: `websocket` (to --url), or `webtransport` (to the session URL and
    /// certificate hash that `GET {api}/@webtransport` names).
    #[arg(long, global = true, value_enum, default_value_t = Transport::Websocket)]
    transport: Transport,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Transport {
    Websocket,
    Webtransport,
}

#[derive(Subcommand)]
enum Scenario {
    /// Ramp C connections, hold them idle, report connect rate and server RSS.
    Connect {
        #[arg(long, short = 'c', default_value_t = 1000)]
        connections: usize,
        /// Seconds to hold the connections before measuring and closing.
        #[arg(long, default_value_t = 5)]
        hold_secs: u64,
        /// Measure this process's RSS before and after (the gateway's PID).
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// C connections join a room; publish M messages with `POST /@rooms/{room}`.
    Fanout(FanoutOptions),
    /// The same through bulk `POST /@connections` naming every member.
    Bulk(FanoutOptions),
    /// The same through one `POST /@connections/{id}` per member and message.
    Push(FanoutOptions),
    /// Publish K messages to a room, then C connections join it at once with `history: K`
    /// (a reconnect storm): time until every member has its replay, and the server's CPU.
    Rejoin {
        #[arg(long, short = 'c', default_value_t = 5000)]
        connections: usize,
        /// Messages replayed to each member (the room must keep at least this many).
        #[arg(long, default_value_t = 50)]
        history: usize,
        #[arg(long, default_value = "loadgen-rejoin")]
        room: String,
        /// The gateway's PID, for its CPU time.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// C connections join a room; time `GET @rooms/{room}/presence`, full and counts only.
    Presence {
        #[arg(long, short = 'c', default_value_t = 50_000)]
        connections: usize,
        #[arg(long, default_value_t = 20)]
        queries: usize,
        #[arg(long, default_value = "loadgen-presence")]
        room: String,
    },
    /// C members join a conflating room; a tenth read at a tenth of the publish rate; the
    /// API publishes keyed ticks at a steady rate: nobody cut, no key back in time.
    Conflate {
        #[arg(long, short = 'c', default_value_t = 5000)]
        connections: usize,
        #[arg(long, default_value_t = 50)]
        keys: usize,
        /// Ticks per second.
        #[arg(long, default_value_t = 200)]
        rate: u32,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Tick bytes.
        #[arg(long, short = 'p', default_value_t = 200)]
        payload: usize,
        /// Percent of members that read slowly.
        #[arg(long, default_value_t = 10)]
        slow_percent: usize,
        #[arg(long, default_value = "ticker:loadgen")]
        room: String,
        /// The gateway's PID, for its CPU time and memory.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// C connections send M frames to a `queue` route with `ack = true`; time each ack.
    Queue {
        #[arg(long, short = 'c', default_value_t = 10)]
        connections: usize,
        #[arg(long, short = 'm', default_value_t = 100_000)]
        messages: usize,
        /// Frame bytes (JSON, padded).
        #[arg(long, short = 'p', default_value_t = 200)]
        payload: usize,
        /// Frames per second over all connections; omit to send as fast as possible.
        #[arg(long)]
        rate: Option<u32>,
        /// The `action` whose route appends to a queue with `ack = true`.
        #[arg(long, default_value = "enqueue")]
        action: String,
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
}

#[derive(Args, Clone)]
struct FanoutOptions {
    #[arg(long, short = 'c', default_value_t = 1000)]
    connections: usize,
    /// Messages to publish.
    #[arg(long, short = 'm', default_value_t = 1000)]
    messages: usize,
    /// Payload bytes (at least 30: sequence and timestamp).
    #[arg(long, short = 'p', default_value_t = 128)]
    payload: usize,
    /// Messages per second; omit to publish as fast as the window allows.
    #[arg(long)]
    rate: Option<u32>,
    /// Publishing requests in flight at once.
    #[arg(long, default_value_t = 32)]
    window: usize,
    #[arg(long, default_value = "loadgen")]
    room: String,
    /// What follows each payload's stamp: `pad` (one repeated letter), `ticker` (quote
    /// records as market data feeds send them) or `chat` (short JSON chat lines).
    #[arg(long, value_enum, default_value_t = Body::Pad)]
    body: Body,
    /// Seconds to wait for stragglers after the last publish.
    #[arg(long, default_value_t = 5)]
    drain_secs: u64,
    /// Hard limit on the whole run.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Members the room must have before publishing starts: several processes' clients
    /// together (one process holds at most its open-files limit); default `-c`.
    #[arg(long)]
    room_members: Option<usize>,
    /// Join and receive the `-m` messages another process publishes; publish nothing.
    #[arg(long)]
    listen_only: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api = cli.api.trim_end_matches('/').to_owned();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let targets = match cli.transport {
        Transport::Websocket => cli
            .url
            .iter()
            .map(|url| Target::parse(url, cli.ca.as_deref()))
            .map(|target| {
                target.map(|t| Target {
                    deflate: cli.deflate,
                    ..t
                })
            })
            .collect::<anyhow::Result<_>>()?,
        Transport::Webtransport => vec![runtime.block_on(Target::webtransport(&api))?],
    };
    let endpoints = Endpoints {
        targets,
        api,
        source_addrs: cli.source_addrs,
        source_base: cli.source_base,
    };
    if endpoints.targets.iter().any(|t| !t.addr.ip().is_loopback()) {
        bail!("switchboard-loadgen only targets loopback addresses (127.0.0.0/8, ::1)");
    }
    let needed = match &cli.scenario {
        Scenario::Connect { connections, .. }
        | Scenario::Queue { connections, .. }
        | Scenario::Rejoin { connections, .. }
        | Scenario::Presence { connections, .. }
        | Scenario::Conflate { connections, .. } => *connections,
        Scenario::Fanout(o) | Scenario::Bulk(o) | Scenario::Push(o) => o.connections,
    };
    raise_open_files(needed)?;
    runtime.block_on(async {
        match cli.scenario {
            Scenario::Connect {
                connections,
                hold_secs,
                server_pid,
            } => {
                let hold = Duration::from_secs(hold_secs);
                let report = scenario::connect(&endpoints, connections, hold, server_pid).await;
                output(&report, cli.json)
            }
            Scenario::Fanout(options) => {
                let report =
                    scenario::fanout(&endpoints, &options.into_args(Delivery::Room)).await?;
                output(&report, cli.json)
            }
            Scenario::Queue {
                connections,
                messages,
                payload,
                rate,
                action,
                timeout_secs,
            } => {
                let args = scenario::QueueArgs {
                    connections,
                    messages,
                    payload,
                    rate,
                    action,
                    timeout: Duration::from_secs(timeout_secs),
                };
                output(&scenario::queue(&endpoints, &args).await?, cli.json)
            }
            Scenario::Rejoin {
                connections,
                history,
                room,
                server_pid,
            } => {
                let report =
                    rooms::rejoin(&endpoints, connections, &room, history, server_pid).await?;
                output(&report, cli.json)
            }
            Scenario::Presence {
                connections,
                queries,
                room,
            } => {
                let report = rooms::presence(&endpoints, connections, &room, queries).await?;
                output(&report, cli.json)
            }
            Scenario::Conflate {
                connections,
                keys,
                rate,
                seconds,
                payload,
                slow_percent,
                room,
                server_pid,
            } => {
                let args = rooms::ConflateArgs {
                    connections,
                    keys,
                    rate,
                    seconds,
                    payload,
                    slow_percent,
                    room,
                    server_pid,
                };
                output(&rooms::conflate(&endpoints, args).await?, cli.json)
            }
            Scenario::Bulk(options) => {
                let report =
                    scenario::fanout(&endpoints, &options.into_args(Delivery::Bulk)).await?;
                output(&report, cli.json)
            }
            Scenario::Push(options) => {
                let report =
                    scenario::fanout(&endpoints, &options.into_args(Delivery::Push)).await?;
                output(&report, cli.json)
            }
        }
    })
}

impl FanoutOptions {
    fn into_args(self, delivery: Delivery) -> FanoutArgs {
        FanoutArgs {
            connections: self.connections,
            messages: self.messages,
            payload: self.payload.max(30),
            rate: self.rate,
            window: self.window,
            room: self.room,
            body: self.body,
            delivery,
            drain: Duration::from_secs(self.drain_secs),
            timeout: Duration::from_secs(self.timeout_secs),
            room_members: self.room_members.unwrap_or(self.connections),
            listen_only: self.listen_only,
        }
    }
}

/// Raises RLIMIT_NOFILE to its hard limit, and says so when `connections` will not fit.
fn raise_open_files(connections: usize) -> anyhow::Result<()> {
    let limit = rlimit::increase_nofile_limit(u64::MAX).context("cannot raise RLIMIT_NOFILE")?;
    let needed = connections as u64 + 64;
    if needed > limit {
        bail!(
            "{connections} connections need ~{needed} open files but RLIMIT_NOFILE is {limit} (its hard limit); \
             run several loadgen processes, or raise the hard limit (ulimit -Hn, systemd LimitNOFILE)"
        );
    }
    if connections > 1000 {
        eprintln!("RLIMIT_NOFILE raised to {limit}");
    }
    Ok(())
}

fn output(report: &impl Serialize, json: bool) -> anyhow::Result<()> {
    let value = serde_json::to_value(report)?;
    if json {
        println!("{value}");
        return Ok(());
    }
    print_table("", &value);
    Ok(())
}

fn print_table(prefix: &str, value: &serde_json::Value) {
    match value {
        serde_json::Value::Object(fields) => {
            for (key, field) in fields {
                let name = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                print_table(&name, field);
            }
        }
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => println!("{prefix:<28} {f:>14.3}"),
            _ => println!("{prefix:<28} {n:>14}"),
        },
        other => println!("{prefix:<28} {:>14}", other.to_string().trim_matches('"')),
    }
}
