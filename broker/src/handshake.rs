//! The HTTP side of a WebSocket connection: reading the upgrade request and answering it.
//!
//! We read the request ourselves (rather than through a WebSocket library's acceptor)
//! because `$connect` runs between request and response: the backend decides the status
//! the client gets (401, 403, 301 … verbatim) and may choose a sub-protocol.

use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::event::HandshakeRequest;

/// Largest request head accepted.
const MAX_REQUEST_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A valid upgrade request for this gateway's stage.
#[derive(Debug, Clone)]
pub struct UpgradeRequest {
    /// Headers and query string, as `$connect` sees them.
    pub request: HandshakeRequest,
    pub key: String,
    pub host: String,
    pub user_agent: String,
    /// Bytes the client sent after the request head (normally none).
    pub leftover: Vec<u8>,
}

/// Why an upgrade request is refused before `$connect` runs; each maps to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeRejection {
    #[error("malformed HTTP request")]
    Malformed,
    #[error("request head larger than {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    #[error("only GET can upgrade")]
    MethodNotAllowed,
    #[error("no such stage: {0}")]
    UnknownPath(String),
    #[error("not a WebSocket upgrade request")]
    NotWebSocket,
    #[error("unsupported Sec-WebSocket-Version (13 is required)")]
    UnsupportedVersion,
    #[error("HTTP/1.1 is required")]
    OldHttp,
    #[error("missing Host header")]
    MissingHost,
    #[error("Sec-WebSocket-Key must be 16 bytes in base64")]
    BadKey,
}

impl HandshakeRejection {
    pub fn status(&self) -> u16 {
        match self {
            Self::Malformed
            | Self::NotWebSocket
            | Self::OldHttp
            | Self::MissingHost
            | Self::BadKey => 400,
            Self::TooLarge => 431,
            Self::MethodNotAllowed => 405,
            Self::UnknownPath(_) => 404,
            Self::UnsupportedVersion => 426,
        }
    }

    /// The `result` label of `switchboard_connections_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::UnknownPath(_) => "not_found",
            _ => "bad_request",
        }
    }
}

/// Parses a complete request head. `Ok(None)`: more bytes are needed.
pub fn parse_upgrade(
    buffer: &[u8],
    stage: &str,
) -> Result<Option<UpgradeRequest>, HandshakeRejection> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(buffer) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buffer.len() >= MAX_REQUEST_BYTES => {
            return Err(HandshakeRejection::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeRejection::TooLarge),
        Err(_) => return Err(HandshakeRejection::Malformed),
    };
    let target = parsed.path.ok_or(HandshakeRejection::Malformed)?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path.strip_prefix('/').map(|p| p.trim_end_matches('/')) != Some(stage) {
        return Err(HandshakeRejection::UnknownPath(path.to_owned()));
    }
    if parsed.method != Some("GET") {
        return Err(HandshakeRejection::MethodNotAllowed);
    }
    if parsed.version != Some(1) {
        return Err(HandshakeRejection::OldHttp);
    }
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8_lossy(h.value).trim().to_owned(),
            )
        })
        .collect();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let has_token = |name: &str, token: &str| {
        find(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err(HandshakeRejection::NotWebSocket);
    }
    if find("sec-websocket-version") != Some("13") {
        return Err(HandshakeRejection::UnsupportedVersion);
    }
    let key = find("sec-websocket-key")
        .filter(|k| !k.is_empty())
        .ok_or(HandshakeRejection::NotWebSocket)?
        .to_owned();
    if !is_valid_key(&key) {
        return Err(HandshakeRejection::BadKey);
    }
    let host = find("host")
        .filter(|h| !h.is_empty())
        .ok_or(HandshakeRejection::MissingHost)?
        .to_owned();
    let user_agent = find("user-agent").unwrap_or_default().to_owned();
    let query = form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    Ok(Some(UpgradeRequest {
        request: HandshakeRequest {
            headers,
            query,
            resumed: false,
        },
        key,
        host,
        user_agent,
        leftover: buffer[head_len..].to_vec(),
    }))
}

/// RFC 6455 4.2.1: the key is a base64-encoded 16-byte nonce.
fn is_valid_key(key: &str) -> bool {
    let mut nonce = [0u8; 18];
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode_slice(key, &mut nonce)
            .is_ok_and(|len| len == 16)
}

/// Why no upgrade request could be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Rejected(#[from] HandshakeRejection),
    #[error("handshake not completed within {0:?}")]
    Timeout(Duration),
    #[error("connection closed during the handshake")]
    Closed,
}

/// Reads the request head within `timeout`.
pub async fn read_upgrade<S: AsyncRead + Unpin>(
    stream: &mut S,
    stage: &str,
    timeout: Duration,
) -> Result<UpgradeRequest, ReadError> {
    let read = async {
        let mut buffer = Vec::with_capacity(1024);
        loop {
            let n = stream
                .read_buf(&mut buffer)
                .await
                .map_err(|_| ReadError::Closed)?;
            if n == 0 {
                return Err(ReadError::Closed);
            }
            if let Some(request) = parse_upgrade(&buffer, stage)? {
                return Ok(request);
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| ReadError::Timeout(timeout))?
}

/// `Sec-WebSocket-Accept` for a client's key.
pub fn accept_key(key: &str) -> String {
    let mut sha1 = sha1_smol::Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(WEBSOCKET_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha1.digest().bytes())
}

/// Every `Sec-WebSocket-Extensions` offer of a request, as one list.
pub fn extension_offers(headers: &[(String, String)]) -> String {
    let offers = headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("sec-websocket-extensions"))
        .map(|(_, value)| value.as_str());
    offers.collect::<Vec<_>>().join(", ")
}

/// The 101 response, with the sub-protocol the backend chose, if any, and the extensions
/// agreed (permessage-deflate's answer), if any.
pub fn switching_protocols(key: &str, protocol: Option<&str>, extensions: Option<&str>) -> Vec<u8> {
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if let Some(extensions) = extensions {
        response.push_str("Sec-WebSocket-Extensions: ");
        response.push_str(extensions);
        response.push_str("\r\n");
    }
    if let Some(protocol) = protocol.filter(|p| is_header_safe(p)) {
        response.push_str("Sec-WebSocket-Protocol: ");
        response.push_str(protocol);
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    response.into_bytes()
}

/// A plain HTTP error answer to an upgrade request; the connection closes after it.
pub fn error_response(status: u16, body: &[u8]) -> Vec<u8> {
    let reason = axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let mut extra = String::new();
    if status == 426 {
        extra.push_str("Sec-WebSocket-Version: 13\r\n");
    }
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(body);
    response
}

fn is_header_safe(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

/// Answers a socket refused before its request was read: writes `response`, closes the
/// write side and discards what the client sends for a moment, so the kernel does not
/// reset the connection (and the answer with it) over unread request bytes.
pub async fn refuse_and_close(mut stream: TcpStream, response: &[u8]) {
    const LINGER: Duration = Duration::from_secs(1);
    let linger = async {
        let _ = stream.write_all(response).await;
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 1024];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    };
    let _ = tokio::time::timeout(LINGER, linger).await;
}

/// Writes `response` and closes the write side.
pub async fn respond_and_close<S: AsyncWrite + Unpin>(stream: &mut S, response: &[u8]) {
    let _ = stream.write_all(response).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const REQUEST: &str = "GET /dev?token=a%20b&x=1&x=2 HTTP/1.1\r\nHost: localhost:8080\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nUser-Agent: test-agent\r\n\r\n";

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn parses_a_valid_upgrade() {
        let request = parse_upgrade(REQUEST.as_bytes(), "dev").unwrap().unwrap();
        assert_eq!(request.host, "localhost:8080");
        assert_eq!(request.user_agent, "test-agent");
        assert_eq!(
            request.request.query,
            vec![
                ("token".into(), "a b".into()),
                ("x".into(), "1".into()),
                ("x".into(), "2".into())
            ]
        );
        assert!(request.leftover.is_empty());
    }

    #[test]
    fn partial_request_needs_more() {
        assert!(
            parse_upgrade(&REQUEST.as_bytes()[..20], "dev")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn rejections_have_statuses() {
        let wrong_stage = REQUEST.replace("GET /dev", "GET /prod");
        assert_eq!(
            parse_upgrade(wrong_stage.as_bytes(), "dev")
                .unwrap_err()
                .status(),
            404
        );
        let not_ws = REQUEST.replace("Upgrade: websocket\r\n", "");
        assert_eq!(
            parse_upgrade(not_ws.as_bytes(), "dev")
                .unwrap_err()
                .status(),
            400
        );
        let old = REQUEST.replace("Version: 13", "Version: 8");
        assert_eq!(
            parse_upgrade(old.as_bytes(), "dev").unwrap_err().status(),
            426
        );
        for (from, to) in [
            ("HTTP/1.1", "HTTP/1.0"),
            ("Host: localhost:8080\r\n", ""),
            ("dGhlIHNhbXBsZSBub25jZQ==", "not base64 at all!!!!!!!"),
            ("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="),
        ] {
            let bad = REQUEST.replace(from, to);
            assert_eq!(
                parse_upgrade(bad.as_bytes(), "dev").unwrap_err().status(),
                400,
                "{from} -> {to}"
            );
        }
        let post = REQUEST.replace("GET", "POST");
        assert_eq!(
            parse_upgrade(post.as_bytes(), "dev").unwrap_err().status(),
            405
        );
        assert_eq!(
            parse_upgrade(b"\x00\x01garbage\r\n\r\n", "dev")
                .unwrap_err()
                .status(),
            400
        );
        let huge = format!("GET /dev HTTP/1.1\r\nX: {}", "a".repeat(MAX_REQUEST_BYTES));
        assert_eq!(
            parse_upgrade(huge.as_bytes(), "dev").unwrap_err().status(),
            431
        );
    }

    #[test]
    fn unsafe_protocol_is_not_echoed() {
        let response =
            String::from_utf8(switching_protocols("k", Some("a\r\nX: y"), None)).unwrap();
        assert!(!response.contains("X: y"));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_upgrade(&bytes, "dev");
        }
    }
}
