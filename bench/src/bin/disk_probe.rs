//! Measures the disk itself while a benchmark runs: every 5 ms it overwrites one 4 KiB
//! block of a file in DIR and calls `fdatasync`, and at the end prints the sync latency
//! and every sync slower than 10 ms with the second it started at.
//!
//! ```sh
//! disk_probe DIR SECONDS
//! ```
//!
//! Overwriting a block that is already allocated changes no file metadata, so these syncs
//! wait for no filesystem journal commit, only for the device to flush: a slow one here is
//! a stall of the disk, which every durable write in the same moment waits for too (the
//! queue benchmark runs it beside the gateway to tell the disk's stalls from the log's).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use anyhow::Context;

const BLOCK: usize = 4096;
const EVERY: Duration = Duration::from_millis(5);
const STALL: Duration = Duration::from_millis(10);

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: disk_probe DIR SECONDS";
    let dir = args.next().context(usage)?;
    let seconds: f64 = args.next().context(usage)?.parse().context("SECONDS")?;
    anyhow::ensure!(seconds > 0.0, "SECONDS must be above 0");
    let path = std::path::Path::new(&dir).join("disk_probe.block");
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    file.write_all_at(&[0; BLOCK], 0)?;
    file.sync_all()?;

    let started = Instant::now();
    let end = started + Duration::from_secs_f64(seconds);
    let mut syncs = Vec::new();
    let mut stalls = Vec::new();
    let mut next = started;
    let mut block = [0u8; BLOCK];
    while Instant::now() < end {
        block[0] = block[0].wrapping_add(1);
        let at = Instant::now();
        file.write_all_at(&block, 0)?;
        file.sync_data()?;
        let took = at.elapsed();
        syncs.push(took);
        if took > STALL {
            stalls.push(format!(
                "{:.2}s:{:.1}ms",
                (at - started).as_secs_f64(),
                took.as_secs_f64() * 1e3
            ));
        }
        next += EVERY;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    std::fs::remove_file(&path)?;

    syncs.sort_unstable();
    let ms = |quantile: f64| {
        let index = ((syncs.len() as f64 * quantile) as usize).min(syncs.len() - 1);
        syncs[index].as_secs_f64() * 1e3
    };
    println!(
        "disk_probe syncs={} p50_ms={:.2} p99_ms={:.2} max_ms={:.1} stalls_over_10ms={} [{}]",
        syncs.len(),
        ms(0.5),
        ms(0.99),
        ms(1.0),
        stalls.len(),
        stalls.join(" ")
    );
    Ok(())
}
