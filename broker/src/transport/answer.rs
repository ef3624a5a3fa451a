//! A handshake read but not answered yet, whichever the transport: the WebSocket
//! upgrade's `101` or error response, or the WebTransport session's accept or refusal.
//! What decides the answer (the checks, `$connect`) does not care which it is.

use std::time::Duration;

use super::{Socket, WebTransportSocket};
use crate::handshake;
use crate::outbound::Wire;

/// A handshake read but not answered yet, whichever the transport.
pub(crate) enum Answer {
    /// A WebSocket upgrade: its socket, its key, the bytes sent after the request head.
    WebSocket {
        socket: Socket,
        key: String,
        leftover: Vec<u8>,
        /// permessage-deflate, if the client offered it and the gateway compresses.
        deflate: Option<crate::compression::Deflate>,
    },
    /// A WebTransport session request; `datagrams` if it asked for them.
    WebTransport {
        request: Box<wtransport::endpoint::SessionRequest>,
        datagrams: bool,
    },
}

impl Answer {
    /// The compression the answer agrees to.
    pub(crate) fn deflate(&self) -> Option<crate::compression::Deflate> {
        match self {
            Self::WebSocket { deflate, .. } => *deflate,
            Self::WebTransport { .. } => None,
        }
    }

    pub(crate) fn wire(&self) -> Wire {
        match self {
            Self::WebSocket { .. } => Wire::WebSocket,
            Self::WebTransport { .. } => Wire::WebTransport,
        }
    }

    /// Answers with `status` and `body` (a WebTransport session can only be told 429 or
    /// 403) and lets go of the client, which gets `timeout` to take the answer.
    pub(crate) async fn refuse(self, status: u16, body: &[u8], timeout: Duration) {
        match self {
            Self::WebSocket { socket, .. } => {
                let response = handshake::error_response(status, body);
                let _ = tokio::time::timeout(timeout, socket.write_all(&response)).await;
                socket.shutdown_write();
            }
            Self::WebTransport { request, .. } => match status {
                429 => request.too_many_requests().await,
                _ => request.forbidden().await,
            },
        }
    }

    /// Accepts: the 101 (with `protocol`), or the session and its stream. Returns the
    /// socket and what the client sent after its request; `None` if it left.
    pub(crate) async fn accept(
        self,
        protocol: Option<&str>,
        timeout: Duration,
    ) -> Option<(Socket, Vec<u8>)> {
        match self {
            Self::WebSocket {
                socket,
                key,
                leftover,
                deflate,
            } => {
                let extensions = deflate.map(|deflate| deflate.answer());
                let response =
                    handshake::switching_protocols(&key, protocol, extensions.as_deref());
                let written = tokio::time::timeout(timeout, socket.write_all(&response)).await;
                written.ok()?.ok()?;
                Some((socket, leftover))
            }
            Self::WebTransport { request, datagrams } => {
                let stream = async {
                    let session = request.accept().await?;
                    let (send, recv) = session.accept_bi().await?;
                    Ok::<_, wtransport::error::ConnectionError>(WebTransportSocket::new(
                        session, send, recv, datagrams,
                    ))
                };
                match tokio::time::timeout(timeout, stream).await {
                    Ok(Ok(socket)) => Some((Socket::WebTransport(Box::new(socket)), Vec::new())),
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "WebTransport session lost");
                        None
                    }
                    Err(_) => {
                        tracing::debug!("no WebTransport stream opened in time");
                        None
                    }
                }
            }
        }
    }
}
