//! Measures the disk itself while a benchmark runs: every 5 ms it overwrites one 4 KiB
//! block of a file in DIR and calls `fdatasync`, and at the end prints the sync latency
//! and every sync slower than 10 ms with the second it started at.
//!
//! ```sh
//! disk_probe DIR SECONDS            # the in-place writer only
//! disk_probe DIR SECONDS --writers  # three writers side by side, one line each
//! ```
//!
//! Overwriting a block that is already allocated changes no file metadata, so these syncs
//! wait for no filesystem journal commit, only for the device to flush: a slow one here is
//! a stall of the disk, which every durable write in the same moment waits for too (the
//! queue benchmark runs it beside the gateway to tell the disk's stalls from the log's).
//! With `--writers`, an appending writer (its syncs do commit the journal) and one writing
//! with `O_DIRECT | O_DSYNC` (no page cache) run beside it: stalls at the same moments in
//! all three are the device's, not one file's or the journal's.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;

const BLOCK: usize = 4096;
const EVERY: Duration = Duration::from_millis(5);
const STALL: Duration = Duration::from_millis(10);

/// How a writer makes its block durable.
#[derive(Clone, Copy)]
enum Writer {
    /// Overwrites an allocated block, then `fdatasync`.
    InPlace,
    /// Appends a block, then `fdatasync` (the file grows: a journal commit each time).
    Append,
    /// Overwrites an allocated block with `O_DIRECT | O_DSYNC`: the write is the sync.
    Direct,
}

impl Writer {
    fn name(self) -> &'static str {
        match self {
            Self::InPlace => "in_place",
            Self::Append => "append",
            Self::Direct => "direct",
        }
    }

    fn open(self, path: &Path) -> std::io::Result<File> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)?;
        if matches!(self, Self::Append) {
            return Ok(file);
        }
        file.write_all_at(&[0; BLOCK], 0)?;
        file.sync_all()?;
        if matches!(self, Self::InPlace) {
            return Ok(file);
        }
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
            .open(path)
    }

    /// Writes `block` and makes it durable.
    fn write(self, file: &mut File, block: &[u8]) -> std::io::Result<()> {
        match self {
            Self::InPlace => {
                file.write_all_at(block, 0)?;
                file.sync_data()
            }
            Self::Append => {
                file.write_all(block)?;
                file.sync_data()
            }
            Self::Direct => file.write_all_at(block, 0),
        }
    }
}

/// What one writer saw.
struct Report {
    syncs: Vec<Duration>,
    stalls: Vec<String>,
}

impl Report {
    fn line(mut self, writer: Writer) -> String {
        self.syncs.sort_unstable();
        let ms = |quantile: f64| {
            let index = ((self.syncs.len() as f64 * quantile) as usize).min(self.syncs.len() - 1);
            self.syncs[index].as_secs_f64() * 1e3
        };
        format!(
            "disk_probe writer={} syncs={} p50_ms={:.2} p99_ms={:.2} max_ms={:.1} stalls_over_10ms={} [{}]",
            writer.name(),
            self.syncs.len(),
            ms(0.5),
            ms(0.99),
            ms(1.0),
            self.stalls.len(),
            self.stalls.join(" ")
        )
    }
}

/// Runs `writer` on its own file in `dir` every 5 ms until `end`.
fn probe(writer: Writer, dir: &Path, started: Instant, end: Instant) -> anyhow::Result<Report> {
    let path = dir.join(format!("disk_probe.{}", writer.name()));
    let mut file = writer
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    // `O_DIRECT` wants a block-aligned buffer: the aligned 4 KiB inside 8 KiB.
    let mut buffer = vec![0u8; 2 * BLOCK];
    let aligned = buffer.as_ptr().align_offset(BLOCK);
    let block = &mut buffer[aligned..aligned + BLOCK];
    let mut report = Report {
        syncs: Vec::new(),
        stalls: Vec::new(),
    };
    let mut next = Instant::now();
    while Instant::now() < end {
        block[0] = block[0].wrapping_add(1);
        let at = Instant::now();
        writer.write(&mut file, block)?;
        let took = at.elapsed();
        report.syncs.push(took);
        if took > STALL {
            let second = (at - started).as_secs_f64();
            let took_ms = took.as_secs_f64() * 1e3;
            report.stalls.push(format!("{second:.2}s:{took_ms:.1}ms"));
        }
        next += EVERY;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    std::fs::remove_file(&path)?;
    Ok(report)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: disk_probe DIR SECONDS [--writers]";
    let dir = std::path::PathBuf::from(args.next().context(usage)?);
    let seconds: f64 = args.next().context(usage)?.parse().context("SECONDS")?;
    anyhow::ensure!(seconds > 0.0, "SECONDS must be above 0");
    let writers = match args.next().as_deref() {
        None => vec![Writer::InPlace],
        Some("--writers") => vec![Writer::InPlace, Writer::Append, Writer::Direct],
        Some(other) => anyhow::bail!("unknown argument {other}; {usage}"),
    };
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(seconds);
    let reports = std::thread::scope(|scope| {
        let running: Vec<_> = writers
            .iter()
            .map(|&writer| {
                let dir = &dir;
                scope.spawn(move || probe(writer, dir, started, end))
            })
            .collect();
        running
            .into_iter()
            .map(|thread| thread.join().expect("a probe thread panicked"))
            .collect::<Vec<_>>()
    });
    for (writer, report) in writers.into_iter().zip(reports) {
        println!("{}", report?.line(writer));
    }
    Ok(())
}
