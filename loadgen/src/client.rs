//! A lean client for measurement: one socket (or one WebTransport stream), a small read
//! buffer, frames parsed in place. Thousands of these share two cores with the server
//! under test, so the client must cost as little as possible per delivery.
//!
//! Both transports carry the same messages; only the framing differs: WebSocket frames
//! (masked from the client), or WebTransport's `[kind][length: 4 bytes BE][payload]`.
//! With `--deflate` a WebSocket client offers permessage-deflate, as browsers do, and
//! inflates what arrives compressed (`--deflate count` leaves it compressed, so that a
//! client on the same cores measures the server rather than its own inflating); every
//! client counts the bytes it read off the wire.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, bail};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpSocket;

/// Where to connect: `ws://IP:PORT/PATH`, `wss://IP:PORT/PATH`, or a WebTransport
/// session URL `https://IP:PORT/PATH`.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    pub(crate) path: String,
    /// For `wss://`: the client TLS config (trusting `--ca`).
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    /// For WebTransport: the certificate hashes to trust (from the discovery document).
    pub(crate) webtransport: Option<Arc<Vec<[u8; 32]>>>,
    /// Offer permessage-deflate (WebSocket), and what to do with compressed messages.
    pub(crate) deflate: Option<Deflate>,
}

/// What a client that offers permessage-deflate does with what arrives compressed.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Deflate {
    /// Inflates it, as a browser does.
    Inflate,
    /// Counts it, unread ([`ServerFrame::Compressed`]).
    Count,
}

/// A message's framing on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wire {
    WebSocket,
    WebTransport,
}

impl Target {
    /// The WebTransport session the gateway's `GET {api}/@webtransport` names.
    pub(crate) async fn webtransport(api: &str) -> anyhow::Result<Self> {
        use base64::Engine;
        let discovery: serde_json::Value = reqwest::get(format!("{api}/@webtransport"))
            .await?
            .error_for_status()
            .context("GET /@webtransport (is [server.webtransport] on?)")?
            .json()
            .await?;
        let url = discovery["url"].as_str().context("discovery has no url")?;
        let rest = url
            .strip_prefix("https://")
            .context("the session URL is not https://")?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut hashes = Vec::new();
        for hash in discovery["serverCertificateHashes"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(hash["value"].as_str().unwrap_or_default())?;
            hashes.push(
                bytes
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("a certificate hash is not 32 bytes"))?,
            );
        }
        if hashes.is_empty() {
            bail!(
                "the gateway serves a configured certificate; the load generator trusts only self-signed ones by hash"
            );
        }
        Ok(Self {
            addr: authority
                .parse()
                .with_context(|| format!("`{authority}` is not an IP:port"))?,
            path: format!("/{path}"),
            tls: None,
            webtransport: Some(Arc::new(hashes)),
            deflate: None,
        })
    }

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
            webtransport: None,
            deflate: None,
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

pub(crate) struct Client {
    wire: Wire,
    reader: Reader,
    writer: Option<FrameWriter>,
    buffer: Vec<u8>,
    /// Bytes of `buffer` that hold data.
    filled: usize,
    /// Bytes read off the wire since the upgrade.
    wire_bytes: u64,
    /// Set when the server took the permessage-deflate offer and messages are inflated.
    inflater: Option<Inflater>,
    /// A WebTransport client's endpoint and session, kept open as long as the client.
    _session: Option<(
        wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client>,
        wtransport::Connection,
    )>,
}

/// One frame from the server.
pub(crate) enum ServerFrame<'a> {
    Data(&'a [u8]),
    /// A data message left compressed (`--deflate count`).
    Compressed,
    Close,
    Other,
}

impl Client {
    /// Connects from `source` (any port) and completes the upgrade, or opens the
    /// WebTransport session and its stream.
    pub(crate) async fn connect(target: &Target, source: IpAddr) -> anyhow::Result<Self> {
        match &target.webtransport {
            Some(hashes) => Self::connect_webtransport(target, hashes, source).await,
            None => Self::connect_websocket(target, source).await,
        }
    }

    async fn connect_webtransport(
        target: &Target,
        hashes: &[[u8; 32]],
        source: IpAddr,
    ) -> anyhow::Result<Self> {
        let config = wtransport::ClientConfig::builder()
            .with_bind_address(SocketAddr::new(source, 0))
            .with_server_certificate_hashes(
                hashes
                    .iter()
                    .map(|hash| wtransport::tls::Sha256Digest::new(*hash)),
            )
            .build();
        let endpoint = wtransport::Endpoint::client(config)?;
        let url = format!("https://{}{}", target.addr, target.path);
        let session = endpoint.connect(url).await?;
        let (mut send, recv) = session.open_bi().await?.await?;
        // The stream reaches the gateway with its first bytes.
        send.write_all(&[]).await?;
        Ok(Self {
            wire: Wire::WebTransport,
            reader: Box::new(recv),
            writer: Some(FrameWriter(Box::new(send), Wire::WebTransport)),
            buffer: vec![0; 4096],
            filled: 0,
            wire_bytes: 0,
            inflater: None,
            _session: Some((endpoint, session)),
        })
    }

    async fn connect_websocket(target: &Target, source: IpAddr) -> anyhow::Result<Self> {
        let socket = if target.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(target.addr).await?;
        stream.set_nodelay(true)?;
        let offer = if target.deflate.is_some() {
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        } else {
            ""
        };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: c3dpdGNoYm9hcmQtbG9hZA==\r\nSec-WebSocket-Version: 13\r\nUser-Agent: switchboard-loadgen\r\n{offer}\r\n",
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
            wire: Wire::WebSocket,
            reader,
            writer: Some(FrameWriter(writer, Wire::WebSocket)),
            buffer: vec![0; 4096],
            filled: 0,
            wire_bytes: 0,
            inflater: None,
            _session: None,
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
        let head = String::from_utf8_lossy(&client.buffer[..head_end]).to_ascii_lowercase();
        let taken = head.contains("sec-websocket-extensions: permessage-deflate");
        if taken && target.deflate == Some(Deflate::Inflate) {
            client.inflater = Some(Inflater::new());
        }
        client.consume(head_end);
        client.wire_bytes = client.filled as u64;
        Ok(client)
    }

    /// Bytes read off the wire since the upgrade.
    pub(crate) fn wire_bytes(&self) -> u64 {
        self.wire_bytes
    }

    /// Sends one text message.
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
        while let Some((header, len)) = parse_header(self.wire, &self.buffer[start..self.filled]) {
            let total = header + len;
            if self.filled - start < total {
                if total > self.buffer.len() {
                    self.buffer.resize(total, 0);
                }
                break;
            }
            let mut payload = &self.buffer[start + header..start + total];
            let compressed = self.wire == Wire::WebSocket && self.buffer[start] & 0x40 != 0;
            match (compressed, self.inflater.as_mut()) {
                (true, Some(inflater)) => payload = inflater.inflate(payload)?,
                (true, None) => {
                    on_frame(ServerFrame::Compressed);
                    start += total;
                    continue;
                }
                (false, _) => {}
            }
            let opcode = match self.wire {
                Wire::WebSocket => self.buffer[start] & 0x0F,
                // Kinds 1 and 2 are text and binary, as WebSocket's opcodes.
                Wire::WebTransport => self.buffer[start],
            };
            match opcode {
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
        self.wire_bytes += n as u64;
        Ok(n)
    }

    fn consume(&mut self, used: usize) {
        self.buffer.copy_within(used..self.filled, 0);
        self.filled -= used;
    }
}

/// permessage-deflate's receiving side: one zlib stream per message (the gateway keeps no
/// context between messages), its state reset rather than made again.
struct Inflater {
    zlib: flate2::Decompress,
    out: Vec<u8>,
}

impl Inflater {
    fn new() -> Self {
        Self {
            zlib: flate2::Decompress::new(false),
            out: Vec::with_capacity(4096),
        }
    }

    /// One message's deflate data (its tail left off on the wire), inflated.
    fn inflate(&mut self, data: &[u8]) -> anyhow::Result<&[u8]> {
        const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
        self.zlib.reset(false);
        self.out.clear();
        for input in [data, &TAIL] {
            let mut read = 0;
            while read < input.len() {
                if self.out.capacity() - self.out.len() < 1024 {
                    self.out.reserve(self.out.capacity());
                }
                let before = (self.zlib.total_in(), self.out.len());
                let flush = flate2::FlushDecompress::Sync;
                self.zlib
                    .decompress_vec(&input[read..], &mut self.out, flush)?;
                read += (self.zlib.total_in() - before.0) as usize;
                if (self.zlib.total_in(), self.out.len()) == before {
                    bail!("a compressed message does not inflate");
                }
            }
        }
        Ok(&self.out)
    }
}

/// (header length, payload length) of the server frame at the start of `input`.
fn parse_header(wire: Wire, input: &[u8]) -> Option<(usize, usize)> {
    if wire == Wire::WebTransport {
        let length: [u8; 4] = input.get(1..5)?.try_into().ok()?;
        return Some((5, u32::from_be_bytes(length) as usize));
    }
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
pub(crate) struct FrameWriter(Writer, Wire);

impl FrameWriter {
    /// Sends one text message.
    pub(crate) async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        let mut frame = Vec::with_capacity(text.len() + 14);
        encode_text(self.1, text, &mut frame);
        self.0.write_all(&frame).await?;
        self.0.flush().await?;
        Ok(())
    }

    /// Sends several text messages in one write.
    pub(crate) async fn send_texts(&mut self, texts: &[String]) -> anyhow::Result<()> {
        let mut frames = Vec::with_capacity(texts.iter().map(|t| t.len() + 14).sum());
        for text in texts {
            encode_text(self.1, text, &mut frames);
        }
        self.0.write_all(&frames).await?;
        self.0.flush().await?;
        Ok(())
    }
}

/// Appends `text` as one client text message to `frame`: a masked WebSocket frame, or a
/// WebTransport message.
fn encode_text(wire: Wire, text: &str, frame: &mut Vec<u8>) {
    if wire == Wire::WebTransport {
        frame.push(1);
        frame.extend_from_slice(&(text.len() as u32).to_be_bytes());
        frame.extend_from_slice(text.as_bytes());
        return;
    }
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
