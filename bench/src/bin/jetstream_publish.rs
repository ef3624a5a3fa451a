//! Acked JetStream publishes of 200-byte messages, the anchor measured beside
//! `switchboard-loadgen queue` (docs/PERFORMANCE.md): P publishers, each on its own
//! connection with up to W acks in flight, M messages in all, optionally at a fixed total
//! rate. Prints acked publishes per second and the ack latency percentiles as JSON.
//!
//! ```sh
//! jetstream_publish nats://127.0.0.1:4222 10 256 300000          # max rate
//! jetstream_publish nats://127.0.0.1:4222 10 256 50000 10000     # 10,000 msgs/s
//! ```

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

const PAYLOAD_BYTES: usize = 200;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, publishers, window, messages, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: jetstream_publish NATS_URL PUBLISHERS IN_FLIGHT MESSAGES [RATE]");
    };
    let publishers: usize = publishers.parse().context("PUBLISHERS")?;
    let window: usize = window.parse().context("IN_FLIGHT")?;
    let messages: usize = messages.parse().context("MESSAGES")?;
    let rate: Option<f64> = rest
        .first()
        .map(|r| r.parse())
        .transpose()
        .context("RATE")?;

    let setup = async_nats::jetstream::new(async_nats::connect(url).await?);
    let _ = setup.delete_stream("BENCH").await;
    setup
        .create_stream(async_nats::jetstream::stream::Config {
            name: "BENCH".into(),
            subjects: vec!["bench".into()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?;

    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..publishers {
        let jetstream = async_nats::jetstream::new(async_nats::connect(url).await?);
        let count = messages / publishers;
        let interval = rate.map(|r| Duration::from_secs_f64(publishers as f64 / r));
        tasks.push(tokio::spawn(publish(jetstream, count, window, interval)));
    }
    let mut latencies = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut acked = 0u64;
    for task in tasks {
        let histogram = task.await??;
        acked += histogram.len();
        latencies.add(histogram)?;
    }
    let secs = started.elapsed().as_secs_f64();
    let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
    let report = serde_json::json!({
        "acked": acked,
        "secs": secs,
        "acks_per_sec": acked as f64 / secs,
        "ack_latency_ms": {"p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999), "max": latencies.max() as f64 / 1000.0},
    });
    println!("{report}");
    Ok(())
}

/// Publishes `count` messages keeping up to `window` acks outstanding, one every
/// `interval` if given; returns the ack latencies in microseconds.
async fn publish(
    jetstream: async_nats::jetstream::Context,
    count: usize,
    window: usize,
    interval: Option<Duration>,
) -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    let mut latencies = hdrhistogram::Histogram::<u64>::new(3)?;
    let payload = bytes::Bytes::from(vec![b'x'; PAYLOAD_BYTES]);
    let mut pending = FuturesUnordered::new();
    let mut tick = interval.map(tokio::time::interval);
    for _ in 0..count {
        if let Some(tick) = tick.as_mut() {
            // Acks are taken as they come while waiting for the next send.
            loop {
                tokio::select! {
                    biased;
                    _ = tick.tick() => break,
                    Some(result) = pending.next(), if !pending.is_empty() => {
                        record(&mut latencies, result)?;
                    }
                }
            }
        }
        while pending.len() >= window {
            if let Some(result) = pending.next().await {
                record(&mut latencies, result)?;
            }
        }
        let sent = Instant::now();
        let ack = jetstream.publish("bench", payload.clone()).await?;
        pending.push(async move { ack.await.map(|_| sent.elapsed()) });
    }
    while let Some(result) = pending.next().await {
        record(&mut latencies, result)?;
    }
    Ok(latencies)
}

fn record(
    latencies: &mut hdrhistogram::Histogram<u64>,
    result: Result<Duration, async_nats::jetstream::context::PublishError>,
) -> anyhow::Result<()> {
    latencies.record(result?.as_micros().max(1) as u64)?;
    Ok(())
}
