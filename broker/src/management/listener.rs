//! The management API's own accept loop: a connection cap, a per-address cap, a reserve
//! for health checks, a header-read timeout and graceful shutdown, which `axum::serve`
//! does not offer.
//!
//! Slowloris clients (partial requests, idle keep-alive connections) would otherwise hold
//! sockets forever and share the process's file-descriptor table with the gateway. Here
//! each connection needs one of `management.max_connections` places (the rest wait in the
//! kernel's backlog), one address holds at most `management.max_connections_per_ip` of
//! them, and a connection whose next request's headers do not arrive within
//! `management.header_timeout_secs` is closed. While every place is taken, a small reserve
//! of [`HEALTH_RESERVE`] more connections answers `/health` and `/metrics` (and 503 to
//! anything else), so slow clients cannot take a node out of its load balancer. With
//! `management.tls` the TLS handshake runs in the connection's task, under the same timeout.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::limits::{Admission, OutboundBudget, PerIpLimits};
use crate::management::config::ManagementConfig;

/// Connections beyond `management.max_connections` that answer only `/health` and
/// `/metrics`, one request each, with a short header timeout.
pub const HEALTH_RESERVE: usize = 16;
/// How long a reserve connection may take to send its request's headers (and, with
/// `management.tls`, to finish its TLS handshake).
const RESERVE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// How often addresses with no management connection open are forgotten.
const PRUNE_INTERVAL: Duration = Duration::from_secs(10);

/// Pause after a failed accept (EMFILE and friends) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long shutdown waits for requests in progress (long-polls end sooner).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `shutdown` is cancelled, then lets requests in
/// progress finish (bounded by [`SHUTDOWN_GRACE`]).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: &ManagementConfig,
    shutdown: CancellationToken,
) {
    let places = Arc::new(Semaphore::new(config.max_connections + HEALTH_RESERVE));
    let full_service = Arc::new(Semaphore::new(config.max_connections));
    let per_address = Arc::new(Admission::new(
        usize::MAX,
        PerIpLimits {
            max_connections: config.max_connections_per_ip,
            connects: None,
            resumes: None,
            ipv6_prefix_len: 64,
        },
        Arc::new(OutboundBudget::new(usize::MAX)),
    ));
    let reserve_app = app
        .clone()
        .layer(axum::middleware::from_fn(health_and_metrics_only));
    let connections = TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout);
    let mut pruned_at = std::time::Instant::now();
    let mut reserve_http = http.clone();
    reserve_http
        .header_read_timeout(RESERVE_HEADER_TIMEOUT)
        .keep_alive(false);
    loop {
        let place = tokio::select! {
            _ = shutdown.cancelled() => break,
            place = places.clone().acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "management accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let now = std::time::Instant::now();
        if now.duration_since(pruned_at) >= PRUNE_INTERVAL {
            // Addresses with nothing open are forgotten: the table holds connected ones.
            per_address.forget_idle_addresses(now);
            pruned_at = now;
        }
        // Closed at once: its address holds its share already.
        let Ok(address_place) = per_address.admit(peer.ip(), now) else {
            continue;
        };
        let full = full_service.clone().try_acquire_owned().ok();
        let (http, app, handshake_timeout) = match full {
            Some(_) => (http.clone(), app.clone(), config.header_timeout),
            None => (
                reserve_http.clone(),
                reserve_app.clone(),
                RESERVE_HEADER_TIMEOUT,
            ),
        };
        let stop = shutdown.clone();
        let tls = config.tls.clone();
        connections.spawn(async move {
            let _places = (place, full, address_place);
            let Some(tls) = tls else {
                return serve_connection(&http, TokioIo::new(stream), app, stop).await;
            };
            let accepted = tokio::time::timeout(handshake_timeout, tls.acceptor().accept(stream));
            if let Ok(Ok(stream)) = accepted.await {
                serve_connection(&http, TokioIo::new(stream), app, stop).await;
            }
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "management requests still running after {SHUTDOWN_GRACE:?}; abandoning them"
        );
    }
}

/// What a reserve connection serves: `/health` and `/metrics` as usual, 503 otherwise.
async fn health_and_metrics_only(request: Request, next: Next) -> Response {
    if matches!(request.uri().path(), "/health" | "/metrics") {
        return next.run(request).await;
    }
    super::ApiError::Busy.into_response()
}

/// Serves one connection's requests until it closes, or until shutdown lets the request in
/// progress finish.
async fn serve_connection<I>(
    http: &hyper::server::conn::http1::Builder,
    io: I,
    app: Router,
    stop: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let connection = http.serve_connection(io, TowerToHyperService::new(app));
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}
