//! `cargo xtask`: everything that is not building the product: installing the test peers,
//! running the whole suite, and benchmarks against the peer tools.

mod bench;
mod bench_deploy;
mod bench_onnx;
mod bench_runtime;
mod bench_tflite;
mod dist;
mod quality;
mod setup;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Project automation for edgepack")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the tests need: the peer Python venv (gguf, llama-cpp-python, PEFT,
    /// transformers) and the real SmolLM2 model. Idempotent.
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

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("EDGEPACK_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp".into());
    home.join(".cache/edgepack")
}

pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {cmd:?}");
    let st = cmd
        .status()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !st.success() {
        bail!("{cmd:?} failed with {st}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn test(args: &[String]) -> Result<()> {
    setup::setup()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))
        .context("formatting differs\nhint: run `cargo fmt --all`")?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let nextest = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if nextest {
        run(cargo()
            .args(["nextest", "run", "--workspace", "--no-fail-fast"])
            .args(args))
    } else {
        run(cargo()
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(args))
    }
}

fn demo() -> Result<()> {
    let gguf = setup::smollm2(Path::new("python3"))?;
    run(cargo().args(["build", "--release", "-p", "edgepack"]))?;
    let ep = root().join("target/release/edgepack");
    let out = root().join("out");
    std::fs::create_dir_all(&out)?;
    run(Command::new(&ep).arg("inspect").arg(&gguf))?;
    let hf = out.join("smollm2-hf");
    if !hf.exists() {
        run(Command::new(&ep)
            .args(["export", "hf"])
            .arg(&gguf)
            .args(["--dtype", "bf16", "-o"])
            .arg(&hf))?;
    }
    let q = out.join("smollm2-Q4_K_M.gguf");
    run(Command::new(&ep)
        .args(["export", "gguf"])
        .arg(&hf)
        .args(["--quant", "Q4_K_M", "-o"])
        .arg(&q))?;
    eprintln!(
        "\nready: {}\n(llama.cpp: llama-cli -m {} -p \"What is the capital of France?\")",
        q.display(),
        q.display()
    );
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Test { args } => test(&args),
        Cmd::Bench(b) => bench::bench(b),
        Cmd::Demo => demo(),
        Cmd::Dist { target, json } => {
            let out = dist::dist(&target)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "{} ({} for {}{}, {}; needs {} / {}, floor glibc {})",
                    out.binary.display(),
                    out.rust_target,
                    out.target_cpu,
                    out.c_march
                        .as_deref()
                        .map(|m| format!(", C/C++ -march={m}"))
                        .unwrap_or_default(),
                    out.builder,
                    out.glibc_required.as_deref().unwrap_or("no glibc versions"),
                    out.glibcxx_required
                        .as_deref()
                        .unwrap_or("no libstdc++ versions"),
                    out.glibc_floor
                );
            }
            Ok(())
        }
    }
}
