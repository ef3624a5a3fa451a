//! A WebTransport session's message stream behind the same non-blocking calls as a TCP
//! socket: readiness futures, reads and vectored writes that never wait. The session loop
//! and the shard's fan-out write pass drive it exactly as they drive TCP.
//!
//! quinn's streams are poll-based: a write that finds the stream's flow-control window
//! full registers the caller's waker and reports "would block"; a zero-length write is the
//! readiness probe (it succeeds only while the window is open). Reads hand out the chunks
//! quinn already holds, without copying them into a buffer of our own.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use crate::disconnect::DisconnectReason;

/// Most bytes gathered from queued frames into one stream write.
const GATHER_BYTES: usize = 64 * 1024;

thread_local! {
    /// Where a shard gathers a connection's queued frames for one write.
    static GATHER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A session and its one bidirectional stream.
pub struct WebTransportSocket {
    session: wtransport::Connection,
    send: RefCell<wtransport::SendStream>,
    recv: RefCell<wtransport::RecvStream>,
    /// A chunk read while checking readiness, handed out by the next [`Self::try_read`].
    received: RefCell<Option<Bytes>>,
    /// The client finished its side of the stream.
    finished: Cell<bool>,
    /// The client asked for unreliable messages as datagrams (`?datagrams=1`).
    datagrams: bool,
}

impl WebTransportSocket {
    pub fn new(
        session: wtransport::Connection,
        send: wtransport::SendStream,
        recv: wtransport::RecvStream,
        datagrams: bool,
    ) -> Self {
        Self {
            session,
            send: RefCell::new(send),
            recv: RefCell::new(recv),
            received: RefCell::new(None),
            finished: Cell::new(false),
            datagrams,
        }
    }

    /// Waits until [`Self::try_read`] has bytes or the end to report.
    pub async fn readable(&self) -> io::Result<()> {
        poll_fn(|cx| self.poll_read_ready(cx)).await
    }

    /// Ready when [`Self::try_read`] has bytes or the end to report.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.received.borrow().is_some() || self.finished.get() {
            return Poll::Ready(Ok(()));
        }
        self.poll_chunk(cx).map_ok(|_| ())
    }

    /// Copies received bytes into `buffer` without waiting; `Ok(0)` is the end of the stream.
    pub fn try_read(&self, buffer: &mut [u8]) -> io::Result<usize> {
        if self.received.borrow().is_none() && !self.finished.get() {
            let mut cx = Context::from_waker(Waker::noop());
            if self.poll_chunk(&mut cx)?.is_pending() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        let mut received = self.received.borrow_mut();
        let Some(chunk) = received.as_mut() else {
            return Ok(0); // finished
        };
        let taken = chunk.len().min(buffer.len());
        buffer[..taken].copy_from_slice(&chunk.split_to(taken));
        if chunk.is_empty() {
            *received = None;
        }
        Ok(taken)
    }

    /// Polls quinn for the next chunk and keeps it (or notes the end).
    fn poll_chunk(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut recv = self.recv.borrow_mut();
        let read = pin!(recv.quic_stream_mut().read_chunk(usize::MAX, true));
        match read.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(chunk))) => {
                *self.received.borrow_mut() = Some(chunk.bytes);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(None)) => {
                self.finished.set(true);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(io::Error::other(error))),
        }
    }

    /// Waits until the stream's flow-control window takes more bytes.
    pub async fn writable(&self) -> io::Result<()> {
        poll_fn(|cx| self.poll_write_ready(cx)).await
    }

    /// Ready when the stream's flow-control window takes more bytes.
    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_write(cx, &[]).map_ok(|_| ())
    }

    /// Writes as much of `slices` as the stream takes without waiting. Several frames are
    /// gathered into one write: each write takes the QUIC connection's lock and wakes its
    /// driver, so one per flush instead of one per frame.
    pub fn try_write_vectored(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut cx = Context::from_waker(Waker::noop());
        let written = match slices {
            [] => Poll::Ready(0),
            [one] => self.poll_write(&mut cx, one)?,
            _ => GATHER.with_borrow_mut(|gathered| {
                gathered.clear();
                for slice in slices {
                    if !gathered.is_empty() && gathered.len() + slice.len() > GATHER_BYTES {
                        break;
                    }
                    gathered.extend_from_slice(slice);
                }
                self.poll_write(&mut cx, gathered)
            })?,
        };
        match written {
            Poll::Ready(0) if slices.iter().any(|slice| !slice.is_empty()) => {
                Err(io::ErrorKind::WouldBlock.into())
            }
            Poll::Ready(n) => Ok(n),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn poll_write(&self, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        let mut send = self.send.borrow_mut();
        tokio::io::AsyncWrite::poll_write(std::pin::Pin::new(&mut *send), cx, bytes)
    }

    /// Sends `datagram` if the client asked for datagrams and it fits in one; false: it
    /// must go through the stream.
    pub fn send_datagram(&self, datagram: &Bytes) -> bool {
        self.datagrams && self.session.send_datagram(datagram).is_ok()
    }

    /// Ends the stream in this direction: the client reads to its end.
    pub fn finish(&self) {
        let _ = self.send.borrow_mut().quic_stream_mut().finish();
    }

    /// Ends the session: finishes the stream, waits (up to `grace`) for the client to
    /// acknowledge everything sent, then closes with `code` and `reason`.
    pub async fn close(&self, code: u16, reason: &str, grace: std::time::Duration) {
        self.finish();
        let stopped = self.send.borrow_mut().quic_stream_mut().stopped();
        let _ = tokio::time::timeout(grace, stopped).await;
        self.session.close(
            wtransport::VarInt::from_u32(u32::from(code)),
            reason.as_bytes(),
        );
    }

    /// Why the session ended, once a read has failed or found the end: the client's close
    /// (with its code and reason), or a lost connection.
    pub async fn end_reason(&self) -> DisconnectReason {
        // The session's driver has the answer once it has stopped, which it has by now or
        // does within a moment; a session that is somehow still up is reported as lost.
        let ended = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            self.session.accept_uni(),
        );
        match ended.await {
            Ok(Err(wtransport::error::ConnectionError::ApplicationClosed(close))) => {
                let code = u16::try_from(close.code().into_inner())
                    .ok()
                    .filter(|c| *c != 0);
                let reason = String::from_utf8_lossy(close.reason()).into_owned();
                DisconnectReason::ClientClosed(code, reason)
            }
            // Still up: the client only finished its stream, which ends the session too.
            Err(_) if self.finished.get() => DisconnectReason::ClientClosed(None, String::new()),
            _ => DisconnectReason::ConnectionLost,
        }
    }
}
