//! A lean WebSocket client for measurement: one socket, a small read buffer, frames parsed
//! in place. Thousands of these share two cores with the server under test, so the client
//! must cost as little as possible per delivery.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, bail};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpSocket;

/// Where to connect: `ws://IP:PORT/PATH` or `wss://IP:PORT/PATH`.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    pub(crate) path: String,
    /// For `wss://`: the client TLS config (trusting `--ca`).
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
}

impl Target {
    /// `ca`: a PEM file of certificates to trust for `wss://`.
    pub(crate) fn parse(url: &str, ca: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let (rest, secure) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
            (Some(rest), _) => (rest, false),
            (_, Some(rest)) => (rest, true),
            _ => bail!("only ws:// and wss:// URLs are supported"),
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let addr = authority
            .parse()
            .with_context(|| format!("`{authority}` is not an IP:port"))?;
        let tls = match (secure, ca) {
            (false, _) => None,
            (true, None) => bail!("wss:// needs --ca FILE (the certificate to trust)"),
            (true, Some(ca)) => Some(client_config(ca)?),
        };
        Ok(Self {
            addr,
            path: format!("/{path}"),
            tls,
        })
    }
}

fn client_config(ca: &std::path::Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("{}", ca.display()))? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

pub(crate) struct WsClient {
    reader: Reader,
    writer: Option<FrameWriter>,
    buffer: Vec<u8>,
    /// Bytes of `buffer` that hold data.
    filled: usize,
}

/// One frame from the server.
pub(crate) enum ServerFrame<'a> {
    Data(&'a [u8]),
    Close,
    Other,
}

impl WsClient {
    /// Connects from `source` (any port) and completes the upgrade.
    pub(crate) async fn connect(target: &Target, source: IpAddr) -> anyhow::Result<Self> {
        let socket = if target.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(target.addr).await?;
        stream.set_nodelay(true)?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: c3dpdGNoYm9hcmQtbG9hZA==\r\nSec-WebSocket-Version: 13\r\nUser-Agent: switchboard-loadgen\r\n\r\n",
            target.path, target.addr
        );
        let (reader, mut writer): (Reader, Writer) = match &target.tls {
            None => {
                let (reader, writer) = stream.into_split();
                (Box::new(reader), Box::new(writer))
            }
            Some(config) => {
                let name = rustls::pki_types::ServerName::from(target.addr.ip());
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, stream)
                    .await?;
                let (reader, writer) = tokio::io::split(tls);
                (Box::new(reader), Box::new(writer))
            }
        };
        writer.write_all(request.as_bytes()).await?;
        // TLS buffers what it is given: push the records out (a no-op on plain TCP).
        writer.flush().await?;
        let mut client = Self {
            reader,
            writer: Some(FrameWriter(writer)),
            buffer: vec![0; 4096],
            filled: 0,
        };
        let head_end = loop {
            if let Some(end) = find(&client.buffer[..client.filled], b"\r\n\r\n") {
                break end + 4;
            }
            client.fill().await?;
        };
        if !client.buffer.starts_with(b"HTTP/1.1 101") {
            let line = String::from_utf8_lossy(&client.buffer[..head_end.min(64)]).into_owned();
            bail!(
                "upgrade refused: {}",
                line.lines().next().unwrap_or_default()
            );
        }
        client.consume(head_end);
        Ok(client)
    }

    /// Sends one masked text frame.
    pub(crate) async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        match self.writer.as_mut() {
            Some(writer) => writer.send_text(text).await,
            None => bail!("the writer was taken"),
        }
    }

    /// Takes the sending half, so one task can send while another reads.
    pub(crate) fn take_writer(&mut self) -> Option<FrameWriter> {
        self.writer.take()
    }

    /// Reads more bytes; calls `on_frame` for every complete frame. Returns false once the
    /// server has closed.
    pub(crate) async fn read_frames(
        &mut self,
        mut on_frame: impl FnMut(ServerFrame<'_>),
    ) -> anyhow::Result<bool> {
        if self.fill().await? == 0 {
            return Ok(false);
        }
        let mut start = 0;
        let mut open = true;
        while let Some((header, len)) = parse_header(&self.buffer[start..self.filled]) {
            let total = header + len;
            if self.filled - start < total {
                if total > self.buffer.len() {
                    self.buffer.resize(total, 0);
                }
                break;
            }
            let payload = &self.buffer[start + header..start + total];
            match self.buffer[start] & 0x0F {
                0x1 | 0x2 => on_frame(ServerFrame::Data(payload)),
                0x8 => {
                    on_frame(ServerFrame::Close);
                    open = false;
                }
                _ => on_frame(ServerFrame::Other),
            }
            start += total;
        }
        self.consume(start);
        Ok(open)
    }

    async fn fill(&mut self) -> anyhow::Result<usize> {
        if self.filled == self.buffer.len() {
            self.buffer.resize(self.buffer.len() * 2, 0);
        }
        let n = self.reader.read(&mut self.buffer[self.filled..]).await?;
        self.filled += n;
        Ok(n)
    }

    fn consume(&mut self, used: usize) {
        self.buffer.copy_within(used..self.filled, 0);
        self.filled -= used;
    }
}

/// (header length, payload length) of the unmasked frame at the start of `input`.
fn parse_header(input: &[u8]) -> Option<(usize, usize)> {
    let second = *input.get(1)?;
    match second & 0x7F {
        126 => Some((
            4,
            usize::from(u16::from_be_bytes([*input.get(2)?, *input.get(3)?])),
        )),
        127 => {
            let bytes: [u8; 8] = input.get(2..10)?.try_into().ok()?;
            Some((10, u64::from_be_bytes(bytes) as usize))
        }
        small => Some((2, usize::from(small))),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The sending half of a client connection.
pub(crate) struct FrameWriter(Writer);

impl FrameWriter {
    /// Sends one masked text frame.
    pub(crate) async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        let mut frame = Vec::with_capacity(text.len() + 14);
        encode_masked(text, &mut frame);
        self.0.write_all(&frame).await?;
        self.0.flush().await?;
        Ok(())
    }

    /// Sends several masked text frames in one write.
    pub(crate) async fn send_texts(&mut self, texts: &[String]) -> anyhow::Result<()> {
        let mut frames = Vec::with_capacity(texts.iter().map(|t| t.len() + 14).sum());
        for text in texts {
            encode_masked(text, &mut frames);
        }
        self.0.write_all(&frames).await?;
        self.0.flush().await?;
        Ok(())
    }
}

/// Appends `text` as one masked client text frame to `frame`.
fn encode_masked(text: &str, frame: &mut Vec<u8>) {
    {
        let payload = text.as_bytes();
        let mask = [0x5a, 0x11, 0xc3, 0x7e];
        frame.push(0x81);
        match payload.len() {
            len @ 0..=125 => frame.push(0x80 | len as u8),
            len @ 126..=0xFFFF => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    }
}
