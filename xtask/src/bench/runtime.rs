//! `cargo xtask bench runtime`: `edgepack-runtime bench` against llama.cpp's own `llama-bench`
//! on the same GGUF, same threads, same machine: time to first token, prompt and decode
//! tokens/s, written as JSON.
//!
//! `llama-bench` is built from the llama.cpp tree llama-cpp-python vendors (the copy inside the
//! `llama-cpp-sys-2` crate the runtime links leaves out `tools/`), into the cache. Both sides
//! use the same ggml options: `GGML_NATIVE=OFF`, which on x86-64 leaves ggml's default
//! instruction sets on (SSE4.2, AVX, AVX2, FMA, F16C, BMI2), and no OpenMP; the runtime is the
//! ordinary release build (llama.cpp inside it as CMake Release, as llama-bench). Flash
//! attention is set on both sides (`--flash-attn`): llama-bench's default is `auto`, which
//! turns it on for CPUs, and the runtime's is off. The two llama.cpp versions are recorded in
//! the JSON: a difference between the tools is the runtime's overhead plus whatever changed in
//! llama.cpp between them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::common::{llama_cpp_tool, output_of, release_runtime, smollm2_bundle, LLAMA_CPP_PYTHON};
use crate::setup;
use crate::util::{cache_dir, cargo, root, run};

pub struct Options {
    pub prompt_sizes: Vec<usize>,
    pub gen_tokens: u32,
    pub repetitions: u32,
    pub threads: Option<usize>,
    /// Flash attention, set explicitly on both sides: llama-bench's own default is `auto`
    /// (on for CPUs), the runtime's is off.
    pub flash_attn: bool,
    /// `gguf`, `onnx`, `tflite`.
    pub engines: Vec<String>,
    pub output: PathBuf,
}

/// The version of `llama-cpp-sys-2` (and so of the llama.cpp) the runtime links, read from
/// Cargo.lock: `cargo metadata` would first need every platform's crates downloaded.
fn llama_sys_version() -> Result<String> {
    let lock = root().join("Cargo.lock");
    let text =
        std::fs::read_to_string(&lock).with_context(|| format!("reading {}", lock.display()))?;
    locked_version(&text, "llama-cpp-sys-2")
        .with_context(|| format!("llama-cpp-sys-2 is not in {}", lock.display()))
}

/// The version of the first `[[package]]` named `name` in a Cargo.lock.
fn locked_version(lock: &str, name: &str) -> Option<String> {
    let mut in_package = false;
    let mut current: Option<&str> = None;
    for line in lock.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[[package]]";
            current = None;
        } else if !in_package {
            continue;
        } else if let Some(v) = line.strip_prefix("name = ") {
            current = Some(v.trim_matches('"'));
        } else if let Some(v) = line.strip_prefix("version = ") {
            if current == Some(name) {
                return Some(v.trim_matches('"').to_owned());
            }
        }
    }
    None
}

/// The GGUF engine (llama.cpp, linked in) against llama-bench on the same file.
fn gguf_report(o: &Options, threads: usize, runtime: &Path) -> Result<Value> {
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
    let llama_bench = llama_cpp_tool(&src, "llama-bench")?;
    let bundle = smollm2_bundle(&work)?;
    let manifest: Value = serde_json::from_slice(&std::fs::read(bundle.join("manifest.json"))?)?;
    let gguf = bundle.join(
        manifest["model"]["file"]
            .as_str()
            .context("manifest model.file")?,
    );

    // One round = one run of each tool over every size. Rounds alternate the tools, so a
    // machine whose speed drifts (a shared VM) drifts under both alike; medians are reported.
    let run_ours = || -> Result<Value> {
        let mut cmd = Command::new(runtime);
        cmd.args(["bench", "--bundle"])
            .arg(&bundle)
            .args(["--prompt-sizes", &sizes])
            .args(["--gen-tokens", &o.gen_tokens.to_string()])
            .args(["--repetitions", "1"])
            .args(["--threads", &threads.to_string(), "--json"]);
        if o.flash_attn {
            cmd.arg("--flash-attn");
        }
        serde_json::from_slice(&output_of(&mut cmd)?).context("edgepack-runtime bench --json")
    };
    let llama_bench_rows = |args: &[&str]| -> Result<Vec<Value>> {
        let out: Value = serde_json::from_slice(&output_of(
            Command::new(&llama_bench)
                .arg("-m")
                .arg(&gguf)
                .args(args)
                .args(["-t", &threads.to_string()])
                .args(["-fa", if o.flash_attn { "on" } else { "off" }])
                .args(["-r", "1", "-o", "json"]),
        )?)
        .context("llama-bench -o json")?;
        match out {
            Value::Array(rows) => Ok(rows),
            _ => bail!("llama-bench printed no array"),
        }
    };
    let gen = o.gen_tokens.to_string();
    let mut ours_rounds = Vec::new();
    let mut peer_rounds = Vec::new();
    for _ in 0..o.repetitions.max(1) {
        ours_rounds.push(run_ours()?);
        // pp rows start from an empty context; tg rows at a depth of each prompt size, which
        // is where the runtime's decode starts after that prompt.
        let mut rows = llama_bench_rows(&["-p", &sizes, "-n", "0"])?;
        rows.extend(llama_bench_rows(&["-p", "0", "-n", &gen, "-d", &sizes])?);
        peer_rounds.push(rows);
    }
    let ours_of = |n: usize, key: &str| -> Option<f64> {
        median(ours_rounds.iter().filter_map(|r| {
            r["results"]
                .as_array()?
                .iter()
                .find(|row| row["prompt_tokens"] == n)?[key]
                .as_f64()
        }))
    };
    let peer_of = |n_prompt: usize, n_gen: u64, depth: usize| -> Option<f64> {
        median(peer_rounds.iter().filter_map(|rows| {
            rows.iter().find(|r| {
                r["n_prompt"] == n_prompt
                    && r["n_gen"].as_u64() == Some(n_gen)
                    && r["n_depth"].as_u64().unwrap_or(0) == depth as u64
            })?["avg_ts"]
                .as_f64()
        }))
    };

    let mut comparison = Vec::new();
    for &n in &o.prompt_sizes {
        let our_pp = ours_of(n, "prompt_tokens_per_s");
        let our_tg = ours_of(n, "decode_tokens_per_s");
        let peer_pp = peer_of(n, 0, 0);
        let peer_tg = peer_of(0, o.gen_tokens.into(), n);
        comparison.push(json!({
            "prompt_tokens": n,
            "ttft_ms": {
                "edgepack_runtime": ours_of(n, "ttft_ms"),
                // llama-bench does not sample; its prompt time is the floor of a TTFT.
                "llama_bench_prompt_ms": peer_pp.map(|ts| n as f64 / ts * 1e3),
            },
            "prompt_tokens_per_s": {"edgepack_runtime": our_pp, "llama_bench": peer_pp,
                "ratio": our_pp.zip(peer_pp).map(|(a, b)| a / b)},
            // Both decode after `n` tokens of context (llama-bench's `-d n`).
            "decode_tokens_per_s": {"edgepack_runtime": our_tg, "llama_bench": peer_tg,
                "ratio": our_tg.zip(peer_tg).map(|(a, b)| a / b)},
        }));
    }
    Ok(json!({
        "model": gguf.display().to_string(),
        "quant": "Q8_0",
        "flash_attn": o.flash_attn,
        "peer": "llama-bench",
        "llama_cpp": {"llama_bench_source": src.display().to_string(),
                      "llama_cpp_python": LLAMA_CPP_PYTHON, "runtime_llama_cpp_sys_2": version,
                      "build": "GGML_NATIVE=OFF (ggml's default x86-64 ISA set), no OpenMP, both sides"},
        "comparison": comparison,
        "rounds": {"edgepack_runtime": ours_rounds, "llama_bench": peer_rounds},
    }))
}

pub fn bench(o: Options) -> Result<()> {
    let threads = o.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    for e in &o.engines {
        if !["gguf", "onnx", "tflite"].contains(&e.as_str()) {
            bail!("--engines {e}: use gguf, onnx or tflite");
        }
    }
    let runtime = release_runtime()?;
    let mut report = json!({
        "benchmark": "runtime",
        "threads": threads,
        "gen_tokens": o.gen_tokens,
        "rounds_run": o.repetitions.max(1),
        "statistic": "median over rounds; each round runs both tools once per size",
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)},
    });
    let mut summary = serde_json::Map::new();
    for e in &o.engines {
        let r = match e.as_str() {
            "gguf" => gguf_report(&o, threads, &runtime)?,
            other => engine_report(&o, other, threads, &runtime)?,
        };
        summary.insert(e.clone(), r["comparison"].clone());
        report[e.as_str()] = r;
    }
    if let Some(d) = o.output.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&o.output, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", o.output.display()))?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    eprintln!("wrote {}", o.output.display());
    Ok(())
}

/// SmolLM2 bundled for this machine in `format` by the release `edgepack`: ONNX int4, or a
/// dynamic-int8 TFLite whose cache holds the longest prompt and the generated tokens.
fn engine_bundle(work: &Path, format: &str, seq_len: usize) -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "-p", "edgepack"]))?;
    let out = work.join(format!("bundle-{format}"));
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    let mut cmd = Command::new(root().join("target/release/edgepack"));
    cmd.arg("bundle")
        .arg(setup::smollm2_gguf())
        .args(["--target", "generic-x86_64", "--format", format])
        .args(["--name", "smollm2", "-o"])
        .arg(&out)
        .env("CI", "1");
    match format {
        "onnx" => cmd.args(["--precision", "int4"]),
        _ => cmd
            .args(["--precision", "dynamic-int8", "--prefill-len", "32"])
            .args(["--seq-len", &seq_len.to_string()]),
    };
    run(&mut cmd)?;
    Ok(out.join("smollm2-generic-x86_64"))
}

/// The engine's library from the peer venv's wheel: the same ONNX Runtime or LiteRT the
/// Python peer runs.
fn venv_library(format: &str) -> Result<PathBuf> {
    let site = cache_dir().join("venv/lib/python3.11/site-packages");
    let path = match format {
        "onnx" => std::fs::read_dir(site.join("onnxruntime/capi"))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so."))
            })
            .context("no libonnxruntime.so.* in the venv's onnxruntime")?,
        _ => site.join("ai_edge_litert/libLiteRt.so"),
    };
    if !path.is_file() {
        bail!("{} is missing\nhint: cargo xtask setup", path.display());
    }
    Ok(path)
}

/// An engine loaded at run time (ONNX Runtime, LiteRT) against its Python peer on the same
/// model file and library version: onnxruntime-genai's generate loop, or LiteRT's
/// interpreter running the prefill/decode signatures. Peak resident memory is each process's.
fn engine_report(o: &Options, format: &str, threads: usize, runtime: &Path) -> Result<Value> {
    let work = root().join("target/bench/runtime-work");
    std::fs::create_dir_all(&work)?;
    let longest = o.prompt_sizes.iter().copied().max().unwrap_or(0);
    let seq_len = (longest + o.gen_tokens as usize).div_ceil(32) * 32;
    let bundle = engine_bundle(&work, format, seq_len)?;
    let manifest: Value = serde_json::from_slice(&std::fs::read(bundle.join("manifest.json"))?)?;
    let model = bundle.join(manifest["model"]["file"].as_str().context("model.file")?);
    let lib = venv_library(format)?;
    let py = cache_dir().join("venv/bin/python");
    let sizes = o
        .prompt_sizes
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let gen = o.gen_tokens.to_string();
    let run_ours = || -> Result<Value> {
        serde_json::from_slice(&output_of(
            Command::new(runtime)
                .args(["bench", "--bundle"])
                .arg(&bundle)
                .arg("--engine-lib")
                .arg(&lib)
                .args(["--prompt-sizes", &sizes, "--gen-tokens", &gen])
                .args(["--repetitions", "1", "--threads", &threads.to_string()])
                // The cache the peers hold too: the longest prompt and the generated tokens.
                .args(["--ctx-size", &seq_len.to_string(), "--json"]),
        )?)
        .context("edgepack-runtime bench --json")
    };
    let run_peer = |n: usize| -> Result<Value> {
        let mut cmd = Command::new(&py);
        match format {
            "onnx" => cmd
                .arg(root().join("tests/python/onnx_genai_speed.py"))
                .arg(model.parent().context("model folder")?)
                .args([&n.to_string(), &gen, &threads.to_string()]),
            _ => cmd
                .arg(root().join("tests/python/tflite_run.py"))
                .arg("speed")
                .arg(&model)
                .args([&n.to_string(), &gen, &threads.to_string()]),
        };
        let out = output_of(&mut cmd)?;
        let text = String::from_utf8_lossy(&out);
        serde_json::from_str(text.lines().last().unwrap_or("")).context("peer JSON")
    };
    let mut ours_rounds = Vec::new();
    let mut peer_rounds: Vec<Vec<(usize, Value)>> = Vec::new();
    for _ in 0..o.repetitions.max(1) {
        ours_rounds.push(run_ours()?);
        let mut rows = Vec::new();
        for &n in &o.prompt_sizes {
            rows.push((n, run_peer(n)?));
        }
        peer_rounds.push(rows);
    }
    let ours_of = |n: usize, key: &str| -> Option<f64> {
        median(ours_rounds.iter().filter_map(|r| {
            r["results"]
                .as_array()?
                .iter()
                .find(|row| row["prompt_tokens"] == n)?[key]
                .as_f64()
        }))
    };
    let peer_of = |n: usize, key: &str| -> Option<f64> {
        median(
            peer_rounds
                .iter()
                .filter_map(|rows| rows.iter().find(|(m, _)| *m == n)?.1[key].as_f64()),
        )
    };
    let (peer_name, engine) = match format {
        "onnx" => ("onnxruntime_genai", "onnxruntime"),
        _ => ("litert_python", "litert"),
    };
    let ours_rss = median(ours_rounds.iter().filter_map(|r| r["peak_rss_mb"].as_f64()));
    let peer_rss = median(
        peer_rounds
            .iter()
            .flat_map(|rows| rows.iter().filter_map(|(_, v)| v["peak_rss_mb"].as_f64())),
    );
    let mut comparison = Vec::new();
    for &n in &o.prompt_sizes {
        let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
        let (our_tg, peer_tg) = (
            ours_of(n, "decode_tokens_per_s"),
            peer_of(n, "decode_tokens_per_s"),
        );
        let (our_ttft, peer_ttft) = (ours_of(n, "ttft_ms"), peer_of(n, "ttft_ms"));
        comparison.push(json!({
            "prompt_tokens": n,
            "ttft_ms": {"edgepack_runtime": our_ttft, peer_name: peer_ttft,
                "speedup": ratio(peer_ttft, our_ttft)},
            "decode_tokens_per_s": {"edgepack_runtime": our_tg, peer_name: peer_tg,
                "ratio": ratio(our_tg, peer_tg)},
        }));
    }
    Ok(json!({
        "engine": engine,
        "engine_version": ours_rounds.first().map(|r| r["engine_version"].clone()),
        "library": lib.display().to_string(),
        "model": model.display().to_string(),
        "precision": manifest["quant"]["preset"],
        "peer": peer_name,
        "peak_rss_mb": {"edgepack_runtime": ours_rss, peer_name: peer_rss,
            "note": "each process's peak; the peer's includes the Python interpreter and numpy"},
        "comparison": comparison,
        "rounds": {"edgepack_runtime": ours_rounds,
                   peer_name: peer_rounds.iter().map(|rows| rows.iter().map(|(n, v)| json!({"prompt_tokens": n, "result": v})).collect::<Vec<_>>()).collect::<Vec<_>>()},
    }))
}

/// The median of the values (the mean of the middle two for an even count).
fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_locked_version_is_read_from_cargo_lock() {
        let lock = "version = 4\n\n[[package]]\nname = \"llama-cpp-2\"\nversion = \"0.1.1\"\n\n\
                    [[package]]\nname = \"llama-cpp-sys-2\"\nversion = \"0.1.161\"\n\
                    source = \"registry+https://github.com/rust-lang/crates.io-index\"\n";
        assert_eq!(
            locked_version(lock, "llama-cpp-sys-2").as_deref(),
            Some("0.1.161")
        );
        assert_eq!(locked_version(lock, "cmake"), None);
        let real = std::fs::read_to_string(root().join("Cargo.lock")).unwrap();
        assert!(locked_version(&real, "llama-cpp-sys-2").is_some());
    }
}
