//! Who may call the management API: a bearer token or an AWS Signature V4 checked before
//! a byte of the body is read; with no credentials configured, loopback callers that are
//! not web pages.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

use super::state::{ApiError, ApiState};
use crate::auth::{self, sigv4};
use crate::fence::Fence;

/// With `management.tokens` or `management.aws_keys` set, a request needs
/// `Authorization: Bearer TOKEN` or an AWS Signature V4 that verifies against one of the
/// keys. Everything the headers can tell is checked before a byte of the body is read (the
/// token; SigV4's key, scope and date; the declared length against the route's limit), so
/// an unauthenticated request costs no body read. With neither set (the loopback-only
/// default) a request passes once [`loopback_only`] agrees.
pub(super) async fn authenticate(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let management = &state.gateway.config.management;
    let limit = state.body_limit(request.method(), request.uri().path());
    if !management.has_credentials() {
        loopback_only(request.headers())?;
        check_declared_length(request.headers(), limit)?;
        return Ok(next.run(request).await);
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if let Some(token) = authorization.strip_prefix("Bearer ") {
        if !auth::is_known_token(&management.tokens, token.trim()) {
            return Err(ApiError::Unauthorized);
        }
        check_declared_length(request.headers(), limit)?;
        return Ok(next.run(request).await);
    }
    let Some(signature) = sigv4::Authorization::parse(&authorization) else {
        return Err(ApiError::Unauthorized);
    };
    let signature = signature.map_err(ApiError::Signature)?;
    let now = crate::clock::now();
    let (parts, body) = request.into_parts();
    let headers: Vec<(&str, &str)> = parts
        .headers
        .iter()
        .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)))
        .collect();
    sigv4::check_headers(&signature, &headers, &management.aws_keys, now)
        .map_err(ApiError::Signature)?;
    check_declared_length(&parts.headers, limit)?;
    let body = state.read_body(body, limit).await?;
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let received = sigv4::ReceivedRequest {
        method: parts.method.as_str(),
        path_and_query,
        headers,
        body: &body,
    };
    sigv4::verify(&signature, &received, &management.aws_keys, now).map_err(ApiError::Signature)?;
    Ok(next.run(Request::from_parts(parts, Body::from(body))).await)
}

/// Public routes that still tell something (`/metrics`): when no credentials are
/// configured at all, only loopback requests without an `Origin` ([`loopback_only`]).
pub(super) async fn guard_unauthenticated(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !state.gateway.config.management.has_credentials() {
        loopback_only(request.headers())?;
    }
    Ok(next.run(request).await)
}

/// 413 before reading when the request declares a body longer than `limit`.
fn check_declared_length(headers: &axum::http::HeaderMap, limit: usize) -> Result<(), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > limit as u64 => Err(ApiError::PayloadTooLarge { limit }),
        _ => Ok(()),
    }
}

/// With no credentials configured the API listens on loopback only, and trusts whoever can
/// reach it there: local processes. A web page in the operator's browser can reach it too
/// (a cross-site `text/plain` POST needs no preflight, and DNS rebinding lets a page read
/// answers under its own host name), so a request that carries an `Origin` (a browser's)
/// or a `Host` that is not a loopback name or address is refused.
fn loopback_only(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    if headers.contains_key(header::ORIGIN) {
        return Err(ApiError::NotLoopback(
            "requests from web pages (with an Origin header) are refused while no \
             management.tokens or aws_keys are configured",
        ));
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !is_loopback_host(host) {
        return Err(ApiError::NotLoopback(
            "the Host header must name a loopback address (localhost, 127.0.0.1, [::1]) \
             while no management.tokens or aws_keys are configured",
        ));
    }
    Ok(())
}

/// `localhost`, `127.x.x.x` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Calls for connections wait while this node's cluster lease is out (it was paused, or
/// cut off from NATS, long enough to be declared lost): by the time it holds again, the
/// connections the cluster reported gone are closed here too, and a call for one of them
/// answers 410 as it would anywhere else. Past [`Fence::PATIENCE`]: 503.
pub(super) async fn wait_for_lease(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !state.gateway.fence.held_within(Fence::PATIENCE).await {
        return Err(ApiError::ClusterUnavailable(
            "this node has not confirmed its place in the cluster (paused or cut off from \
             NATS); try another node"
                .into(),
        ));
    }
    Ok(next.run(request).await)
}
