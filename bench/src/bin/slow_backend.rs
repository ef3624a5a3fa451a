//! A backend for push-delivery benchmarks: answers every POST with 200 after a fixed
//! latency, counting the entries it received (a `{"Records": [...]}` batch counts its
//! records, anything else one); `GET /` returns the count so far.
//!
//! ```sh
//! slow_backend PORT [LATENCY_MS]    # default 50 ms
//! ```
//!
//! Written in Rust, not Python, so that the instrument is not what limits the measurement:
//! a threaded Python server parsing 100-event batches saturated near 40 k entries/s here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::get;

struct Backend {
    latency: Duration,
    received: AtomicU64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args
        .next()
        .context("usage: slow_backend PORT [LATENCY_MS]")?
        .parse()
        .context("PORT")?;
    let latency_ms: u64 = args
        .next()
        .map_or(Ok(50), |ms| ms.parse())
        .context("LATENCY_MS")?;
    let backend = Arc::new(Backend {
        latency: Duration::from_millis(latency_ms),
        received: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/", get(count).post(receive))
        .with_state(backend);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn receive(State(backend): State<Arc<Backend>>, body: Bytes) -> &'static str {
    tokio::time::sleep(backend.latency).await;
    let entries = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Object(event)) => match event.get("Records") {
            Some(serde_json::Value::Array(records)) => records.len() as u64,
            _ => 1,
        },
        _ => 1,
    };
    backend.received.fetch_add(entries, Ordering::Relaxed);
    ""
}

async fn count(State(backend): State<Arc<Backend>>) -> String {
    backend.received.load(Ordering::Relaxed).to_string()
}
