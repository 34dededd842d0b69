//! `cargo xtask fuzz`: the libFuzzer targets of `tests/fuzz/` (their own cargo project, outside
//! the workspace) built with the stable toolchain and run for a fixed time each.
//!
//! No cargo-fuzz and no nightly: the coverage instrumentation cargo-fuzz asks rustc for is
//! `-Cpasses=sancov-module` with LLVM's sanitizer-coverage options plus `--cfg fuzzing`, all
//! stable flags; no sanitizer is added (`-Zsanitizer` would need nightly, and the parsers are
//! safe Rust). `--target <host>` keeps the flags off build scripts and proc macros, as
//! cargo-fuzz does. libFuzzer's own corpus goes to `target/fuzz/corpus/<target>/`, the
//! checked-in seeds (`tests/fuzz/corpus/<target>/`) are read only, and findings land in
//! `target/fuzz/artifacts/<target>/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::util::{cargo, root, run};

/// Every fuzz target, as named by its binary in `tests/fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &[
    "gguf",
    "safetensors",
    "hf_config",
    "tokenizer_config",
    "adapter_config",
    "manifest",
    "unpack",
    "recipe",
    "stats",
    "runtime_request",
];

/// Memory and time per input beyond which libFuzzer reports a finding.
const RSS_LIMIT_MB: u32 = 2048;
const TIMEOUT_SECS: u32 = 10;

/// The coverage instrumentation cargo-fuzz uses (sanitizer `none`), on stable rustc.
const RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    -Cllvm-args=-sanitizer-coverage-stack-depth \
    --cfg fuzzing";

/// What one target's run did.
#[derive(Debug, Serialize)]
pub struct TargetRun {
    pub target: String,
    pub seconds: f64,
    pub executions: u64,
    pub execs_per_sec: f64,
    /// Inputs in libFuzzer's corpus at the end (seeds included).
    pub corpus: u64,
    /// Crash, leak, timeout and out-of-memory inputs written during the run.
    pub findings: Vec<PathBuf>,
    /// libFuzzer's output.
    pub log: PathBuf,
}

fn fuzz_dir() -> PathBuf {
    root().join("tests/fuzz")
}

fn out_dir() -> PathBuf {
    root().join("target/fuzz")
}

fn host_triple() -> Result<String> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("rustc -vV printed no host triple")
}

/// Writes the seed corpora from real files (the SmolLM2 GGUF of `cargo xtask setup`, the
/// shipped recipes, files the toolchain writes) into `tests/fuzz/corpus/`.
pub fn seed_corpus() -> Result<()> {
    run(cargo().args([
        "run",
        "-p",
        "edgepack-tests",
        "--example",
        "fuzz_seeds",
        "--",
        "tests/fuzz/corpus",
    ]))
}

/// Builds the instrumented targets (all, or `only`) and returns the folder of the binaries.
fn build(only: Option<&str>) -> Result<PathBuf> {
    let triple = host_triple()?;
    let mut cmd = cargo();
    cmd.args(["build", "--release", "--manifest-path"])
        .arg(fuzz_dir().join("Cargo.toml"))
        .args(["--target", &triple])
        .env("CARGO_TARGET_DIR", out_dir())
        .env("RUSTFLAGS", RUSTFLAGS)
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    match only {
        Some(t) => cmd.args(["--bin", t]),
        None => cmd.arg("--bins"),
    };
    run(&mut cmd)?;
    Ok(out_dir().join(triple).join("release"))
}

/// The files of `dir`, or none if it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The number after `key` in libFuzzer's output (`stat::number_of_executed_units: 123`).
fn stat(log: &str, key: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.trim_start_matches(':').trim().parse().ok())
}

/// The corpus size of libFuzzer's last status line (`... corp: 57/3210b ...`).
fn last_corpus(log: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        let rest = l.split("corp: ").nth(1)?;
        rest.split('/').next()?.parse().ok()
    })
}

/// Runs one target for `seconds`, restarting libFuzzer after a finding until the time is
/// spent, so one crash does not end the run.
fn run_target(bin_dir: &Path, target: &str, seconds: u64) -> Result<TargetRun> {
    let bin = bin_dir.join(target);
    let corpus = out_dir().join("corpus").join(target);
    let artifacts = out_dir().join("artifacts").join(target);
    let logs = out_dir().join("logs");
    for d in [&corpus, &artifacts, &logs] {
        fs::create_dir_all(d).with_context(|| d.display().to_string())?;
    }
    let seeds = fuzz_dir().join("corpus").join(target);
    let before: Vec<PathBuf> = files(&artifacts);
    let log_path = logs.join(format!("{target}.log"));
    let mut log_all = String::new();
    let (mut executions, mut corp) = (0u64, 0u64);
    let start = Instant::now();
    let budget = Duration::from_secs(seconds);
    while start.elapsed() + Duration::from_secs(1) <= budget {
        let left = (budget - start.elapsed()).as_secs().max(1);
        let mut prefix = artifacts.clone().into_os_string();
        prefix.push("/");
        let out = Command::new(&bin)
            .arg(&corpus)
            .arg(&seeds)
            .arg(format!("-max_total_time={left}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg(format!("-timeout={TIMEOUT_SECS}"))
            .arg("-print_final_stats=1")
            .arg({
                let mut a = std::ffi::OsString::from("-artifact_prefix=");
                a.push(&prefix);
                a
            })
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        executions += stat(&log, "stat::number_of_executed_units").unwrap_or(0);
        corp = last_corpus(&log).unwrap_or(corp);
        let finished = out.status.success();
        log_all.push_str(&log);
        if !finished && files(&artifacts).len() == before.len() {
            fs::write(&log_path, &log_all)?;
            bail!(
                "{target}: libFuzzer failed with {} and wrote no finding; see {}",
                out.status,
                log_path.display()
            );
        }
        if finished {
            break;
        }
    }
    fs::write(&log_path, &log_all)?;
    let elapsed = start.elapsed().as_secs_f64();
    let mut findings: Vec<PathBuf> = files(&artifacts)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    findings.sort();
    Ok(TargetRun {
        target: target.to_string(),
        seconds: elapsed,
        executions,
        execs_per_sec: executions as f64 / elapsed.max(f64::EPSILON),
        corpus: corp,
        findings,
        log: log_path,
    })
}

/// Builds and runs `target` (or every target) for `seconds` each, prints the table (or JSON)
/// and fails if anything was found.
pub fn fuzz(target: Option<&str>, seconds: u64, json: bool) -> Result<()> {
    if let Some(t) = target {
        if !TARGETS.contains(&t) {
            bail!(
                "unknown fuzz target `{t}` (targets: {})",
                TARGETS.join(", ")
            );
        }
    }
    let bin_dir = build(target)?;
    let targets: Vec<&str> = match target {
        Some(t) => vec![t],
        None => TARGETS.to_vec(),
    };
    let mut runs = Vec::new();
    for t in targets {
        eprintln!("fuzzing {t} for {seconds} s");
        runs.push(run_target(&bin_dir, t, seconds)?);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
    } else {
        println!(
            "{:<18} {:>8} {:>12} {:>10} {:>8} {:>9}",
            "target", "seconds", "executions", "exec/s", "corpus", "findings"
        );
        for r in &runs {
            println!(
                "{:<18} {:>8.0} {:>12} {:>10.0} {:>8} {:>9}",
                r.target,
                r.seconds,
                r.executions,
                r.execs_per_sec,
                r.corpus,
                r.findings.len()
            );
            for f in &r.findings {
                println!("  finding: {}", f.display());
            }
        }
    }
    let found: usize = runs.iter().map(|r| r.findings.len()).sum();
    if found > 0 {
        bail!("{found} finding(s); the inputs are listed above");
    }
    Ok(())
}
