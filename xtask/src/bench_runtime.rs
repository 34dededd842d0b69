//! `cargo xtask bench runtime`: `edgepack-runtime bench` against llama.cpp's own `llama-bench`
//! on the same GGUF, same threads, same machine: time to first token, prompt and decode
//! tokens/s, written as JSON.
//!
//! `llama-bench` is built from the llama.cpp tree llama-cpp-python vendors (the copy inside the
//! `llama-cpp-sys-2` crate the runtime links leaves out `tools/`), into the cache. Both sides
//! use the same ggml options: `GGML_NATIVE=OFF`, which on x86-64 leaves ggml's default
//! instruction sets on (SSE4.2, AVX, AVX2, FMA, F16C, BMI2), and no OpenMP; the runtime is the
//! ordinary release build. The two llama.cpp versions are recorded in the JSON: a difference
//! between the tools is the runtime's overhead plus whatever changed in llama.cpp between them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{cache_dir, root, run, setup};

/// The llama-cpp-python sdist whose llama.cpp tree `setup::llama_cpp_source` unpacks.
const LLAMA_CPP_PYTHON: &str = "0.3.36";

pub struct Options {
    pub prompt_sizes: Vec<usize>,
    pub gen_tokens: u32,
    pub repetitions: u32,
    pub threads: Option<usize>,
    pub output: PathBuf,
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// The version of `llama-cpp-sys-2` (and so of the llama.cpp) the runtime links.
fn llama_sys_version() -> Result<String> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--offline"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: Value = serde_json::from_slice(&out.stdout)?;
    meta["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "llama-cpp-sys-2"))
        .and_then(|p| p["version"].as_str())
        .map(str::to_owned)
        .context("llama-cpp-sys-2 is not in the dependency graph")
}

/// Builds `llama-bench` into the cache (never into the repository), once per source version.
fn llama_bench(src: &Path) -> Result<PathBuf> {
    let build = cache_dir().join(format!(
        "build/llama-bench-llama-cpp-python-{LLAMA_CPP_PYTHON}"
    ));
    let bin = build.join("bin/llama-bench");
    if bin.is_file() {
        return Ok(bin);
    }
    run(Command::new("cmake")
        .arg("-S")
        .arg(src)
        .arg("-B")
        .arg(&build)
        .args([
            "-DCMAKE_BUILD_TYPE=Release",
            // What llama-cpp-sys-2 passes when no target-cpu is given.
            "-DGGML_NATIVE=OFF",
            "-DGGML_OPENMP=OFF",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=OFF",
            // Only llama-bench and what it links.
            "-DLLAMA_BUILD_APP=OFF",
            "-DBUILD_SHARED_LIBS=OFF",
        ]))
    .context("configuring llama-bench")?;
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    run(Command::new("cmake").arg("--build").arg(&build).args([
        "--target",
        "llama-bench",
        "-j",
        &jobs.to_string(),
    ]))
    .context("building llama-bench")?;
    if !bin.is_file() {
        bail!("{} missing after the build", bin.display());
    }
    Ok(bin)
}

/// The runtime's ordinary release build.
fn release_runtime() -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "-p", "edgepack-runtime"]))
        .context("building edgepack-runtime")?;
    Ok(root().join("target/release/edgepack-runtime"))
}

/// A Q8_0 SmolLM2 bundle for this machine, made by `edgepack bundle`.
fn bundle(work: &Path) -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "-p", "edgepack"]))?;
    let ep = root().join("target/release/edgepack");
    let out = work.join("bundle");
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    run(Command::new(&ep)
        .arg("bundle")
        .arg(setup::smollm2_gguf())
        .args([
            "--target",
            "generic-x86_64",
            "--format",
            "gguf",
            "--quant",
            "Q8_0",
        ])
        .args(["--name", "smollm2", "-o"])
        .arg(&out)
        .env("CI", "1"))?;
    Ok(out.join("smollm2-generic-x86_64"))
}

fn output_of(cmd: &mut Command) -> Result<Vec<u8>> {
    eprintln!("$ {cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!("{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

pub fn bench(o: Options) -> Result<()> {
    let threads = o.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let sizes = o
        .prompt_sizes
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let work = root().join("target/bench/runtime-work");
    std::fs::create_dir_all(&work)?;
    let src = setup::llama_cpp_source()?;
    let version = llama_sys_version()?;
    let llama_bench = llama_bench(&src)?;
    let runtime = release_runtime()?;
    let bundle = bundle(&work)?;
    let manifest: Value = serde_json::from_slice(&std::fs::read(bundle.join("manifest.json"))?)?;
    let gguf = bundle.join(
        manifest["model"]["file"]
            .as_str()
            .context("manifest model.file")?,
    );

    let ours: Value = serde_json::from_slice(&output_of(
        Command::new(&runtime)
            .args(["bench", "--bundle"])
            .arg(&bundle)
            .args(["--prompt-sizes", &sizes])
            .args(["--gen-tokens", &o.gen_tokens.to_string()])
            .args(["--repetitions", &o.repetitions.to_string()])
            .args(["--threads", &threads.to_string(), "--json"]),
    )?)
    .context("edgepack-runtime bench --json")?;
    // llama-bench: pp rows (prompt only) and one tg row (generation from an empty context).
    let peer: Value = serde_json::from_slice(&output_of(
        Command::new(&llama_bench)
            .arg("-m")
            .arg(&gguf)
            .args(["-p", &sizes, "-n", &o.gen_tokens.to_string()])
            .args(["-t", &threads.to_string()])
            .args(["-r", &o.repetitions.to_string(), "-o", "json"]),
    )?)
    .context("llama-bench -o json")?;
    let peer_rows = peer.as_array().context("llama-bench printed no array")?;
    let pp = |n: usize| {
        peer_rows
            .iter()
            .find(|r| r["n_prompt"] == n && r["n_gen"] == 0)
            .and_then(|r| r["avg_ts"].as_f64())
    };
    let tg = peer_rows
        .iter()
        .find(|r| r["n_prompt"] == 0 && r["n_gen"].as_u64() == Some(o.gen_tokens.into()))
        .and_then(|r| r["avg_ts"].as_f64());

    let mut comparison = Vec::new();
    for row in ours["results"].as_array().context("runtime results")? {
        let n = row["prompt_tokens"].as_u64().unwrap_or(0) as usize;
        let our_pp = row["prompt_tokens_per_s"].as_f64();
        let our_tg = row["decode_tokens_per_s"].as_f64();
        let peer_pp = pp(n);
        comparison.push(json!({
            "prompt_tokens": n,
            "ttft_ms": {
                "edgepack_runtime": row["ttft_ms"],
                // llama-bench does not sample; its prompt time is the floor of a TTFT.
                "llama_bench_prompt_ms": peer_pp.map(|ts| n as f64 / ts * 1e3),
            },
            "prompt_tokens_per_s": {"edgepack_runtime": our_pp, "llama_bench": peer_pp,
                "ratio": our_pp.zip(peer_pp).map(|(a, b)| a / b)},
            "decode_tokens_per_s": {"edgepack_runtime": our_tg, "llama_bench": tg,
                "ratio": our_tg.zip(tg).map(|(a, b)| a / b)},
        }));
    }
    let report = json!({
        "benchmark": "runtime",
        "model": gguf.display().to_string(),
        "quant": "Q8_0",
        "threads": threads,
        "gen_tokens": o.gen_tokens,
        "repetitions": o.repetitions,
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)},
        "llama_cpp": {"llama_bench_source": src.display().to_string(),
                      "llama_cpp_python": LLAMA_CPP_PYTHON, "runtime_llama_cpp_sys_2": version,
                      "build": "GGML_NATIVE=OFF (ggml's default x86-64 ISA set), no OpenMP, both sides"},
        "comparison": comparison,
        "edgepack_runtime": ours,
        "llama_bench": peer,
    });
    if let Some(d) = o.output.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&o.output, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", o.output.display()))?;
    println!("{}", serde_json::to_string_pretty(&report["comparison"])?);
    eprintln!("wrote {}", o.output.display());
    Ok(())
}
