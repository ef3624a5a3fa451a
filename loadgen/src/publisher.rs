//! The publisher: one keep-alive HTTP/1.1 connection with up to `window` requests
//! pipelined. One connection keeps the gateway's order of publishes equal to the send order
//! (a pool of connections would let requests overtake each other), so subscribers can check
//! that every message arrives once and in order.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// What the response reader reports at the end.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) failures: usize,
    /// The first failed response: its status line and the start of its body (the
    /// gateway's JSON error says why).
    pub(crate) first_failure: Option<String>,
    /// Round trip of every request, in microseconds.
    pub(crate) round_trips_us: Vec<u64>,
}

pub(crate) struct Pipeline {
    writer: OwnedWriteHalf,
    host: String,
    window: Arc<Semaphore>,
    window_size: u32,
    sent_at: Arc<Mutex<VecDeque<Instant>>>,
    reader: JoinHandle<anyhow::Result<Outcome>>,
}

impl Pipeline {
    /// Opens the connection to the API at `base` (`http://IP:PORT/...`).
    pub(crate) async fn connect(base: &str, window: usize) -> anyhow::Result<Self> {
        let rest = base
            .strip_prefix("http://")
            .context("only http:// API URLs are supported")?;
        let authority = rest.split('/').next().unwrap_or(rest);
        let addr: SocketAddr = authority
            .parse()
            .with_context(|| format!("`{authority}` is not an IP:port"))?;
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (read, writer) = stream.into_split();
        let window_size = window.clamp(1, 1 << 16) as u32;
        let window = Arc::new(Semaphore::new(window_size as usize));
        let sent_at = Arc::new(Mutex::new(VecDeque::new()));
        let reader = tokio::spawn(read_responses(read, window.clone(), sent_at.clone()));
        Ok(Self {
            writer,
            host: authority.to_owned(),
            window,
            window_size,
            sent_at,
            reader,
        })
    }

    /// Sends one POST once the window has room.
    pub(crate) async fn post(
        &mut self,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> anyhow::Result<()> {
        self.window.acquire().await?.forget();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        if let Ok(mut sent_at) = self.sent_at.lock() {
            sent_at.push_back(Instant::now());
        }
        self.writer.write_all(head.as_bytes()).await?;
        self.writer.write_all(body).await?;
        Ok(())
    }

    /// Waits for every outstanding response.
    pub(crate) async fn finish(mut self, sent: usize) -> anyhow::Result<Outcome> {
        // Every permit back means every response is in; then close so the reader ends.
        self.window.acquire_many(self.window_size).await?.forget();
        let _ = self.writer.shutdown().await;
        let outcome = self.reader.await??;
        if outcome.round_trips_us.len() < sent {
            bail!(
                "{} of {sent} requests got no response",
                sent - outcome.round_trips_us.len()
            );
        }
        Ok(outcome)
    }
}

async fn read_responses(
    mut read: tokio::net::tcp::OwnedReadHalf,
    window: Arc<Semaphore>,
    sent_at: Arc<Mutex<VecDeque<Instant>>>,
) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::default();
    let mut buffer = Vec::with_capacity(16 * 1024);
    loop {
        while let Some((status, length)) = parse_response(&buffer) {
            if !(200..300).contains(&status) && outcome.first_failure.is_none() {
                let response = String::from_utf8_lossy(&buffer[..length]);
                let status_line = response.lines().next().unwrap_or_default().to_owned();
                let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
                let body: String = body.chars().take(300).collect();
                outcome.first_failure = Some(format!("{status_line}: {body}"));
            }
            buffer.drain(..length);
            let started = sent_at.lock().ok().and_then(|mut s| s.pop_front());
            if let Some(started) = started {
                outcome
                    .round_trips_us
                    .push(started.elapsed().as_micros() as u64);
            }
            if !(200..300).contains(&status) {
                outcome.failures += 1;
            }
            window.add_permits(1);
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = read.read(&mut chunk).await?;
        if n == 0 {
            return Ok(outcome);
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// (status, total length) of the complete response at the start of `buffer`.
fn parse_response(buffer: &[u8]) -> Option<(u16, usize)> {
    let head_end = buffer.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buffer[..head_end]).ok()?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let body = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    (buffer.len() >= head_end + body).then_some((status, head_end + body))
}

#[cfg(test)]
mod tests {
    use super::parse_response;

    #[test]
    fn parses_pipelined_responses() {
        let two = b"HTTP/1.1 200 OK\r\ncontent-length: 15\r\n\r\n{\"delivered\":1}HTTP/1.1 413 X\r\nContent-Length: 0\r\n\r\n";
        let (status, len) = parse_response(two).unwrap();
        assert_eq!((status, &two[len..len + 8]), (200, &b"HTTP/1.1"[..]));
        assert_eq!(parse_response(&two[len..]), Some((413, two.len() - len)));
        assert_eq!(parse_response(&two[..20]), None);
    }
}
