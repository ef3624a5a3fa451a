//! Faults the chaos tests inject, beyond signals to processes: a TCP relay between a node
//! and NATS that can be cut like a pulled cable (the sockets stay open, nothing passes
//! either way, and what was sent waits) and healed again, or reset (its connections
//! closed, and what waited in them lost); and a small disk of its own that fills up.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A relay to one TCP address, with a switch that stops all traffic through it.
pub(crate) struct TcpRelay {
    pub(crate) address: SocketAddr,
    open: Arc<watch::Sender<bool>>,
    accepting: tokio::task::JoinHandle<()>,
    pipes: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl TcpRelay {
    pub(crate) async fn start(target: SocketAddr) -> Self {
        Self::start_on([127, 0, 0, 1].into(), target).await
    }

    /// A relay listening on `ip` (an address of a link the test made).
    pub(crate) async fn start_on(ip: std::net::IpAddr, target: SocketAddr) -> Self {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let address = listener.local_addr().unwrap();
        let open = Arc::new(watch::channel(true).0);
        let pipes = Arc::new(Mutex::new(Vec::new()));
        let (switch, piping) = (open.clone(), pipes.clone());
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                let mut piping = piping.lock().unwrap();
                piping.push(tokio::spawn(pipe(
                    client_read,
                    server_write,
                    switch.subscribe(),
                )));
                piping.push(tokio::spawn(pipe(
                    server_read,
                    client_write,
                    switch.subscribe(),
                )));
            }
        });
        Self {
            address,
            open,
            accepting,
            pipes,
        }
    }

    /// `nats://` URL of the relay.
    pub(crate) fn nats_url(&self) -> String {
        format!("nats://{}", self.address)
    }

    /// Nothing passes from now on, either way; the connections stay open.
    pub(crate) fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Traffic flows again, what waited first.
    pub(crate) fn heal(&self) {
        self.open.send_replace(true);
    }

    /// Closes every connection through it: what waited in them is lost, as when a
    /// connection breaks. New ones are relayed (once healed, if cut).
    pub(crate) fn reset(&self) {
        for pipe in self.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// Copies `from` to `to` while the switch is open.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut open: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if open.wait_for(|open| *open).await.is_err() {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            _ = open.wait_for(|open| !*open) => continue,
        };
        let Ok(n @ 1..) = read else { return };
        // Read just as the cut came: held until it heals.
        if open.wait_for(|open| *open).await.is_err() || to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// A tmpfs of its own (under a gateway's data dir), unmounted when dropped.
pub(crate) struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    /// Mounts `mib` MiB at `path` (the tests run as root).
    pub(crate) fn mount(path: &std::path::Path, mib: u32) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(path)
            .status()
            .unwrap();
        assert!(
            mounted.success(),
            "this test mounts a {mib} MiB tmpfs (needs root)"
        );
        Self {
            path: path.to_owned(),
        }
    }

    /// Writes a file until not one more byte fits; returns it (removing it gives the space
    /// back).
    pub(crate) fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let ballast = self.path.join("ballast");
        let mut file = std::fs::File::create(&ballast).unwrap();
        for chunk in [64 * 1024, 4096, 512, 1] {
            while file.write_all(&vec![0u8; chunk]).is_ok() {}
        }
        ballast
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}
