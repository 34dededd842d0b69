//! `cargo xtask`: everything that is not building the product: installing the test peers,
//! running the whole suite, and benchmarks against the peer tools.
//!
//! This file only parses the command line and dispatches; layers, lowest first: `util`;
//! `setup`; `dist`, `suite`, `demo`; `bench` (`bench::common` below the benchmarks, below the
//! dispatch in `bench/mod.rs`).

mod bench;
mod demo;
mod dist;
mod setup;
mod suite;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Project automation for edgepack")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the tests need: first the system packages of xtask/system-packages.txt
    /// (checked; installed with apt-get when run as root), then the peer Python venv (gguf,
    /// llama-cpp-python, PEFT, transformers) and the real SmolLM2 model. Idempotent.
    #[command(after_help = "Example:\n  cargo xtask setup")]
    Setup,
    /// Setup, then formatting, clippy, and the whole test suite (cargo-nextest when present).
    #[command(after_help = "Example:\n  cargo xtask test")]
    Test {
        /// Extra arguments for the test runner (a filter, for example).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The main job on the real small model: SmolLM2-135M-Instruct (from its registry
    /// package) inspected, written back as an HF folder, and exported as a Q4_K_M GGUF in out/.
    #[command(after_help = "Example:\n  cargo xtask demo")]
    Demo,
    /// Benchmarks against peer tools, written as JSON.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Cross-compile edgepack-runtime for a board profile (its Rust triple and CPU) and check
    /// the binary against the board's glibc floor; the result goes to target/dist/<board>/.
    #[command(
        after_help = "Example:\n  cargo xtask dist --target imx95\n  cargo xtask dist --target my-board.toml --json"
    )]
    Dist {
        /// A built-in board profile (imx95, rpi5, ...) or a profile TOML file.
        #[arg(long)]
        target: String,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Test { args } => suite::test(&args),
        Cmd::Bench(b) => bench::bench(b),
        Cmd::Demo => demo::demo(),
        Cmd::Dist { target, json } => dist::print(&dist::dist(&target)?, json),
    }
}
