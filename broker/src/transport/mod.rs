//! What turns bytes on the network into a connection's messages and back: WebSocket over
//! plain TCP or TLS, or WebTransport over QUIC.
//!
//! Sessions, routing and fan-out see one [`Socket`] with readiness and non-blocking
//! reads and vectored writes, and one [`Decoder`], whichever transport is underneath.
//! Frames are still encoded once for all recipients (once per transport); with TLS or QUIC
//! each connection encrypts its own copy as it writes.

pub mod answer;
pub mod proxy_protocol;
pub mod tls;
pub mod webtransport;

use std::io::IoSlice;
use std::task::{Context, Poll};

use tokio::net::TcpStream;

use crate::frame::{Incoming, MessageDecoder, ProtocolError};
use crate::outbound::Wire;

pub use tls::{TlsEndpoint, TlsError, TlsSocket};
pub use webtransport::WebTransportSocket;

/// A client connection's byte stream.
pub enum Socket {
    Plain(TcpStream),
    Tls(Box<TlsSocket>),
    WebTransport(Box<WebTransportSocket>),
}

/// A TCP or TLS socket on its way to another shard: deregistered from the runtime it was
/// accepted on, registered again by [`SendableSocket::into_socket`] on the one it joins.
pub enum SendableSocket {
    Plain(std::net::TcpStream),
    Tls(std::net::TcpStream, Box<rustls::ServerConnection>),
}

impl SendableSocket {
    /// Registers the socket with the current runtime.
    pub fn into_socket(self) -> std::io::Result<Socket> {
        Ok(match self {
            Self::Plain(tcp) => Socket::Plain(TcpStream::from_std(tcp)?),
            Self::Tls(tcp, session) => {
                let tcp = TcpStream::from_std(tcp)?;
                Socket::Tls(Box::new(TlsSocket::new(tcp, *session)))
            }
        })
    }
}

/// Turns a connection's bytes into messages: WebSocket frames, or WebTransport's
/// length-prefixed messages.
#[derive(Debug)]
pub enum Decoder {
    WebSocket(MessageDecoder),
    WebTransport(webtransport::framing::FrameDecoder),
}

impl Decoder {
    /// Feeds bytes read from the socket; complete messages are appended to `out`.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<Incoming>) -> Result<(), ProtocolError> {
        match self {
            Self::WebSocket(decoder) => decoder.decode(input, out),
            Self::WebTransport(decoder) => decoder.decode(input, out),
        }
    }

    /// Whether the last decode kept complete input back (its inflating budget was spent):
    /// decode again, with nothing new, once its messages are handled.
    pub fn is_holding(&self) -> bool {
        match self {
            Self::WebSocket(decoder) => decoder.is_holding(),
            Self::WebTransport(_) => false,
        }
    }
}

impl Socket {
    /// The wire format frames take on this socket.
    pub fn wire(&self) -> Wire {
        match self {
            Self::Plain(_) | Self::Tls(_) => Wire::WebSocket,
            Self::WebTransport(_) => Wire::WebTransport,
        }
    }

    /// Waits until [`Socket::try_read`] may return bytes (or the end).
    pub async fn readable(&self) -> std::io::Result<()> {
        std::future::poll_fn(|cx| self.poll_read_ready(cx)).await
    }

    /// Waits until the socket may take more bytes.
    pub async fn writable(&self) -> std::io::Result<()> {
        std::future::poll_fn(|cx| self.poll_write_ready(cx)).await
    }

    /// Ready when [`Socket::try_read`] may return bytes (or the end). A poll, not a
    /// future: a connection waiting for its socket keeps no future for it.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self {
            Self::Plain(tcp) => tcp.poll_read_ready(cx),
            Self::Tls(tls) => tls.poll_read_ready(cx),
            Self::WebTransport(session) => session.poll_read_ready(cx),
        }
    }

    /// Ready when the socket may take more bytes.
    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self {
            Self::Plain(tcp) => tcp.poll_write_ready(cx),
            Self::Tls(tls) => tls.tcp().poll_write_ready(cx),
            Self::WebTransport(session) => session.poll_write_ready(cx),
        }
    }

    /// Reads what has arrived without waiting; `Ok(0)` is the end of the stream.
    pub fn try_read(&self, buffer: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(tcp) => tcp.try_read(buffer),
            Self::Tls(tls) => tls.try_read(buffer),
            Self::WebTransport(session) => session.try_read(buffer),
        }
    }

    /// Writes as much of `slices` as the socket takes without waiting.
    pub fn try_write_vectored(&self, slices: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Self::Plain(tcp) => tcp.try_write_vectored(slices),
            Self::Tls(tls) => tls.try_write_vectored(slices),
            Self::WebTransport(session) => session.try_write_vectored(slices),
        }
    }

    /// Pushes out bytes the transport still holds (TLS records); `Ok(true)` if some
    /// remain because the socket is full.
    pub fn flush_pending(&self) -> std::io::Result<bool> {
        match self {
            Self::Plain(_) | Self::WebTransport(_) => Ok(false),
            Self::Tls(tls) => tls.flush_pending(),
        }
    }

    /// Writes all of `bytes`, waiting for the socket as needed (a handshake's answer).
    pub async fn write_all(&self, mut bytes: &[u8]) -> std::io::Result<()> {
        loop {
            if !bytes.is_empty() {
                match self.try_write_vectored(&[IoSlice::new(bytes)]) {
                    Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                    Ok(written) => bytes = &bytes[written..],
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            let held = self.flush_pending()?;
            if bytes.is_empty() && !held {
                return Ok(());
            }
            self.writable().await?;
        }
    }

    /// The socket as it can cross to another shard's thread (a WebTransport session never
    /// does: `None`).
    pub fn into_sendable(self) -> Option<SendableSocket> {
        match self {
            Self::Plain(tcp) => tcp.into_std().ok().map(SendableSocket::Plain),
            Self::Tls(tls) => {
                let (tcp, session) = tls.into_parts();
                let tcp = tcp.into_std().ok()?;
                Some(SendableSocket::Tls(tcp, Box::new(session)))
            }
            Self::WebTransport(_) => None,
        }
    }

    /// Ends the stream in this direction (TLS: close_notify first).
    pub fn shutdown_write(&self) {
        let tcp = match self {
            Self::Plain(tcp) => tcp,
            Self::Tls(tls) => {
                tls.close_notify();
                tls.tcp()
            }
            Self::WebTransport(session) => return session.finish(),
        };
        let _ = socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write);
    }
}
