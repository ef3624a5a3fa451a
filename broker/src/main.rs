//! The `switchboard` command: parse the CLI, load the config, bind, run until a signal.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use switchboard::transport::TlsEndpoint;
use switchboard::{Listeners, RawConfig};
use tokio_util::sync::CancellationToken;

/// jemalloc with a background purging thread gives freed memory back to the OS within
/// about a second (`.cargo/config.toml` sets its decay); glibc's malloc keeps it in
/// per-thread arenas. After a flood of connections or rooms ends, RSS comes back down
/// (docs/SECURITY.md has the measurement).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// `EX_USAGE`: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "Self-hosted WebSocket API gateway and fan-out broker"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (with no --config: the embedded demo).
    Serve {
        /// TOML config file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate a config file and print the effective configuration.
    CheckConfig {
        /// TOML config file.
        file: PathBuf,
    },
    /// Print the embedded demo config (what `serve` runs without --config).
    DemoConfig,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::DemoConfig => {
            print!("{}", switchboard::config::DEMO_CONFIG);
            ExitCode::SUCCESS
        }
        Command::Serve { config } => {
            let raw = match config.as_deref().map(RawConfig::load) {
                None => RawConfig::parse(switchboard::config::DEMO_CONFIG),
                Some(loaded) => loaded,
            };
            let config = match raw.and_then(|raw| raw.validate()) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("switchboard: {error}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("switchboard: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    let raw = match RawConfig::load(file) {
        Ok(raw) => raw,
        Err(error) => {
            eprintln!("switchboard: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match raw.validate() {
        Ok(config) => {
            if let Some(problem) = data_dir_problem(&config.server.data_dir) {
                eprintln!("switchboard: invalid config: `server.data_dir`: {problem}");
                return ExitCode::from(EXIT_CONFIG);
            }
            if let Err(error) =
                switchboard_storage::Storage::check_not_in_use(&config.server.data_dir)
            {
                eprintln!("switchboard: `server.data_dir`: {error}");
                return ExitCode::from(EXIT_CONFIG);
            }
            print!("{}", raw.redacted().to_toml());
            println!(
                "# config OK: {} shard(s), stage `{}`",
                config.server.shards, config.api.stage
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("switchboard: {error}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// Why the gateway could not use `dir` as its data dir, if it could not: it must be a
/// directory it can write to, or creatable under one.
fn data_dir_problem(dir: &std::path::Path) -> Option<String> {
    let existing = dir.ancestors().find(|path| path.exists())?;
    if !existing.is_dir() {
        return Some(format!(
            "{} exists but is not a directory",
            existing.display()
        ));
    }
    let probe = existing.join(".switchboard-write-check");
    match std::fs::write(&probe, b"") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            None
        }
        Err(error) => Some(format!("{} is not writable: {error}", existing.display())),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: logs piped to a file or a collector stay plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(config: switchboard::Config) -> anyhow::Result<()> {
    // Each client holds a file descriptor: take the whole hard limit (capacity then keeps
    // `server.fd_reserve` of it back for everything else).
    if let Err(error) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(%error, "cannot raise the open-files limit");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("switchboard-management")
        .enable_all()
        .build()
        .context("cannot start the management runtime")?;
    runtime.block_on(async {
        let listeners = Listeners::bind(&config)?;
        // Signal handlers first: a SIGTERM that arrives once the gateway has said it is
        // listening must shut down gracefully, not kill the process.
        let signals = ShutdownSignals::install().context("cannot install signal handlers")?;
        let shutdown = CancellationToken::new();
        let mut endpoints: Vec<Reloadable> = [&config.server.tls, &config.management.tls]
            .into_iter()
            .flatten()
            .cloned()
            .map(Reloadable::Tls)
            .collect();
        if let Some(webtransport) = config
            .server
            .webtransport
            .as_ref()
            .filter(|w| w.certificate.self_signed_hash().is_none())
        {
            endpoints.push(Reloadable::WebTransport(webtransport.certificate.clone()));
        }
        if !endpoints.is_empty() {
            let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .context("cannot install the SIGHUP handler")?;
            tokio::spawn(reload_certificates_on_hangup(hangups, endpoints));
        }
        tokio::spawn(signals.stop(shutdown.clone()));
        switchboard::serve(config, listeners, shutdown).await?;
        Ok(())
    })
}

/// A listener whose certificate files SIGHUP reloads.
#[derive(Debug)]
enum Reloadable {
    Tls(TlsEndpoint),
    WebTransport(std::sync::Arc<switchboard::transport::webtransport::ServedCertificate>),
}

impl Reloadable {
    fn reload(&self) -> Result<(), switchboard::transport::TlsError> {
        match self {
            Self::Tls(endpoint) => endpoint.reload(),
            Self::WebTransport(certificate) => certificate.reload(),
        }
    }
}

/// Reloads every listener's certificate files at each SIGHUP (certbot renewals): new
/// connections get the new certificate, open ones are not touched.
async fn reload_certificates_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    endpoints: Vec<Reloadable>,
) {
    while hangups.recv().await.is_some() {
        for endpoint in &endpoints {
            match endpoint.reload() {
                Ok(()) => tracing::info!(?endpoint, "certificate reloaded"),
                Err(error) => {
                    tracing::error!(%error, "certificate reload failed; keeping the old one")
                }
            }
        }
    }
}

/// SIGTERM and SIGINT, registered before the gateway announces itself.
struct ShutdownSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Cancels `shutdown` at the first signal.
    async fn stop(mut self, shutdown: CancellationToken) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
        tracing::info!("shutting down");
        shutdown.cancel();
    }
}
