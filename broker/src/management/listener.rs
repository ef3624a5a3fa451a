//! The management API's own accept loop: a connection cap, a header-read timeout and
//! graceful shutdown, which `axum::serve` does not offer.
//!
//! Slowloris clients (partial requests, idle keep-alive connections) would otherwise hold
//! sockets forever and share the process's file-descriptor table with the gateway. Here
//! each connection needs one of `management.max_connections` permits before it is
//! accepted (the rest wait in the kernel's backlog), and a connection whose next request's
//! headers do not arrive within `management.header_timeout_secs` is closed. With
//! `management.tls` the TLS handshake runs in the connection's task, under the same timeout.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ManagementConfig;

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
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let connections = TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout);
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "management accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let (http, app, stop) = (http.clone(), app.clone(), shutdown.clone());
        let tls = config.tls.clone();
        let handshake_timeout = config.header_timeout;
        connections.spawn(async move {
            let _permit = permit;
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
