//! `cargo xtask`: everything that is not building the product: installing the test peers,
//! running the whole suite, fuzzing the parsers, and benchmarks against the peer tools.
//!
//! This file only parses the command line and dispatches; layers, lowest first: `util`;
//! `setup`; `dist`, `suite`, `demo`, `fuzz`; `release`; `bench` (`bench::common` below the
//! benchmarks, below the dispatch in `bench/mod.rs`).

mod bench;
mod board;
mod demo;
mod dist;
mod fuzz;
mod release;
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
    /// The main job: recipes/smollm2-assistant.toml built for four boards (report table,
    /// signed bundles), then the i.MX 93 bundle deployed to a local board (sshd on loopback,
    /// the aarch64 runtime under qemu-aarch64) and asked a question.
    #[command(after_help = "Example:\n  cargo xtask demo")]
    Demo,
    /// Benchmarks against peer tools, written as JSON.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Cross-compile edgepack-runtime for a board profile (its Rust triple and CPU) and check
    /// the binary against the board's glibc floor; the result goes to target/dist/<board>/.
    #[command(
        after_help = "Example:\n  cargo xtask dist --target imx95 --engine-libs\n  cargo xtask dist --target my-board.toml --json"
    )]
    Dist {
        /// A built-in board profile (imx95, rpi5, ...) or a profile TOML file.
        #[arg(long)]
        target: String,
        /// Also fetch the engine libraries the board loads at run time (ONNX Runtime) from
        /// their pinned wheels for its CPU, into target/dist/<board>/lib/, checked.
        #[arg(long)]
        engine_libs: bool,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Coverage-guided fuzzing of every parser of outside input (tests/fuzz/, libFuzzer on
    /// the stable toolchain): builds the instrumented targets, runs each for --seconds with a
    /// 2048 MB memory limit and a 10 s limit per input, and prints executions, exec/s, corpus
    /// size and findings per target; fails when something is found.
    #[command(
        after_help = "Example:\n  cargo xtask fuzz --seconds 60\n  cargo xtask fuzz gguf --seconds 600 --json\n  cargo xtask fuzz --seed-corpus"
    )]
    Fuzz {
        /// One target (gguf, safetensors, hf_config, tokenizer_config, adapter_config,
        /// manifest, unpack, recipe, stats, runtime_request); every target when absent.
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Print the results as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Instead of fuzzing, rewrite the checked-in seed corpora (tests/fuzz/corpus/) from
        /// real files: the SmolLM2 GGUF of `cargo xtask setup`, the shipped recipes, and files
        /// edgepack writes.
        #[arg(long, conflicts_with_all = ["target", "json"])]
        seed_corpus: bool,
    },
    /// The CI job of a recipe: build it with the release binary, verify every bundle, enforce
    /// the gates (exit 3 when one fails, 1 on an error), print the report, and optionally
    /// deploy the bundles to an inventory.
    #[command(
        after_help = "Example:\n  cargo xtask release recipes/smollm2-assistant.toml\n  cargo xtask release recipes/smollm2-assistant.toml --dist --sign release.pem --deploy fleet.toml"
    )]
    Release {
        /// The recipe file.
        recipe: std::path::PathBuf,
        /// The output folder (default: out/<recipe name>).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Sign the bundles with this key (`edgepack keygen`); its `.pub.pem` verifies them.
        #[arg(long)]
        sign: Option<std::path::PathBuf>,
        /// Cross-compile every target's runtime (`cargo xtask dist`) into its bundle.
        #[arg(long)]
        dist: bool,
        /// Deploy the bundles to the hosts of this inventory (`edgepack deploy --inventory`).
        #[arg(long)]
        deploy: Option<std::path::PathBuf>,
        /// Stages that may run at once.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// The stage cache (default: `edgepack build`'s).
        #[arg(long)]
        cache: Option<std::path::PathBuf>,
        /// Run this edgepack binary instead of building the release one (a pipeline that has
        /// built it already).
        #[arg(long, value_name = "BIN")]
        edgepack: Option<std::path::PathBuf>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Test { args } => suite::test(&args),
        Cmd::Bench(b) => bench::bench(b),
        Cmd::Demo => demo::demo(),
        Cmd::Fuzz {
            seed_corpus: true, ..
        } => fuzz::seed_corpus(),
        Cmd::Fuzz {
            target,
            seconds,
            json,
            ..
        } => fuzz::fuzz(target.as_deref(), seconds, json),
        Cmd::Dist {
            target,
            engine_libs,
            json,
        } => dist::print(&dist::dist(&target, engine_libs)?, json),
        Cmd::Release {
            recipe,
            out,
            sign,
            dist,
            deploy,
            jobs,
            cache,
            edgepack,
        } => {
            let code = release::release(&release::Release {
                recipe,
                out,
                sign,
                dist,
                deploy,
                jobs,
                cache,
                edgepack,
            })?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
    }
}
