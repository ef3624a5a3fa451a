//! `switchboard-loadgen`: load generator and measurement tool for Switchboard.
//!
//! Scenarios (connect, fanout, bulk) arrive with the fan-out work; this binary reserves the
//! name and command-line shape.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "switchboard-loadgen",
    version,
    about = "Load generator for Switchboard"
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("no scenarios yet: connect, fanout and bulk arrive with the fan-out work")
}
