//! `cargo xtask bench tflite`: per precision, the export's wall time, peak RSS and file size,
//! and LiteRT's (ai-edge-litert) prefill and decode tokens/s on the exported file.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use super::common::{edgepack_release, measure, py};
use crate::setup;
use crate::util::root;

/// The precisions benchmarked, in order.
const PRECISIONS: &[&str] = &["fp32", "fp16", "dynamic-int8", "int8", "int8-a16"];
/// Calibration for the static int8 variants: samples x tokens of edgepack's default corpus.
const CALIB_SAMPLES: usize = 8;
const CALIB_SEQ_LEN: usize = 256;
/// SmoothQuant strength of the static int8 variants.
const SMOOTH_ALPHA: &str = "0.5";

pub fn tflite(
    model: Option<PathBuf>,
    seq_len: usize,
    prefill_len: usize,
    decode_steps: usize,
    output: &Path,
) -> Result<()> {
    if prefill_len + decode_steps > seq_len {
        bail!("--prefill-len {prefill_len} + --decode-steps {decode_steps} exceed --seq-len {seq_len}");
    }
    let ep = edgepack_release()?;
    let model = match model {
        Some(m) => m,
        None => setup::smollm2_gguf(),
    };
    let work = root().join("target/bench/tflite-work");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let stats = work.join("stats.calib");
    let calib = measure(
        Command::new(&ep)
            .arg("calibrate")
            .arg(&model)
            .args(["--samples", &CALIB_SAMPLES.to_string()])
            .args(["--seq-len", &CALIB_SEQ_LEN.to_string()])
            .arg("-o")
            .arg(&stats)
            .env("CI", "1"),
    )?;
    let mut rows = Vec::new();
    for precision in PRECISIONS {
        let out = work.join(format!("{precision}.tflite"));
        let mut cmd = Command::new(&ep);
        cmd.args(["export", "tflite"])
            .arg(&model)
            .args(["--precision", precision]);
        if precision.starts_with("int8") {
            cmd.arg("--stats")
                .arg(&stats)
                .args(["--smooth", SMOOTH_ALPHA]);
        }
        let m = measure(
            cmd.args(["--seq-len", &seq_len.to_string()])
                .args(["--prefill-len", &prefill_len.to_string()])
                .arg("-o")
                .arg(&out)
                .env("CI", "1"),
        )?;
        let speed = run_speed(&out, prefill_len, decode_steps)?;
        rows.push(json!({
            "precision": precision,
            "export_seconds": m.seconds,
            "export_max_rss_mib": m.max_rss_mib,
            "bytes": std::fs::metadata(&out)?.len(),
            "litert": speed,
        }));
    }
    let report = json!({
        "benchmark": "tflite",
        "model": model.display().to_string(),
        "seq_len": seq_len,
        "prefill_len": prefill_len,
        "decode_steps": decode_steps,
        "runtime": "ai-edge-litert Interpreter (XNNPACK, 2 threads)",
        "int8_calibration": {
            "samples": CALIB_SAMPLES,
            "seq_len": CALIB_SEQ_LEN,
            "smooth": SMOOTH_ALPHA,
            "seconds": calib.seconds,
            "max_rss_mib": calib.max_rss_mib,
        },
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)},
        "precisions": rows,
    });
    if let Some(d) = output.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(output, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn run_speed(model: &Path, prefill_len: usize, steps: usize) -> Result<Value> {
    let out = Command::new(py())
        .arg(root().join("tests/python/tflite_run.py"))
        .arg("speed")
        .arg(model)
        .arg(prefill_len.to_string())
        .arg(steps.to_string())
        .output()?;
    if !out.status.success() {
        bail!(
            "tflite_run.py speed failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(text.lines().last().unwrap_or("null"))?)
}
