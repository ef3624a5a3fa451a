//! What turns bytes on a socket into a connection's bytes and back: plain TCP or TLS.
//!
//! Sessions, routing and fan-out see one [`Socket`] with readiness and non-blocking
//! reads and vectored writes, whichever transport is underneath. Frames are still encoded
//! once for all recipients; with TLS each connection encrypts its own copy as it writes.

pub mod tls;

use std::io::IoSlice;

use tokio::net::TcpStream;

pub use tls::{TlsEndpoint, TlsError, TlsSocket};

/// A client connection's byte stream.
pub enum Socket {
    Plain(TcpStream),
    Tls(Box<TlsSocket>),
}

impl Socket {
    /// Waits until [`Socket::try_read`] may return bytes (or the end).
    pub async fn readable(&self) -> std::io::Result<()> {
        match self {
            Self::Plain(tcp) => tcp.readable().await,
            Self::Tls(tls) => tls.readable().await,
        }
    }

    /// Waits until the socket may take more bytes.
    pub async fn writable(&self) -> std::io::Result<()> {
        match self {
            Self::Plain(tcp) => tcp.writable().await,
            Self::Tls(tls) => tls.tcp().writable().await,
        }
    }

    /// Reads what has arrived without waiting; `Ok(0)` is the end of the stream.
    pub fn try_read(&self, buffer: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(tcp) => tcp.try_read(buffer),
            Self::Tls(tls) => tls.try_read(buffer),
        }
    }

    /// Writes as much of `slices` as the socket takes without waiting.
    pub fn try_write_vectored(&self, slices: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Self::Plain(tcp) => tcp.try_write_vectored(slices),
            Self::Tls(tls) => tls.try_write_vectored(slices),
        }
    }

    /// Pushes out bytes the transport still holds (TLS records); `Ok(true)` if some
    /// remain because the socket is full.
    pub fn flush_pending(&self) -> std::io::Result<bool> {
        match self {
            Self::Plain(_) => Ok(false),
            Self::Tls(tls) => tls.flush_pending(),
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
        };
        let _ = socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write);
    }
}
