//! `cargo xtask bench onnx`: edgepack's ONNX export against onnxruntime-genai's model builder
//! (`python -m onnxruntime_genai.models.builder`, from the registry package) on the same HF
//! folder: export wall time, peak RSS and bytes per precision; then onnxruntime's prefill and
//! decode tokens/s of every exported model on this machine. JSON out.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::common::{edgepack_release, fresh_work_dir, measure, model_or_smollm2, py};
use crate::util::root;

/// edgepack variants timed: (label, arguments after the model path).
const OURS: &[(&str, &[&str])] = &[
    ("contrib-fp32", &["--ops", "contrib", "--precision", "fp32"]),
    ("contrib-fp16", &["--ops", "contrib", "--precision", "fp16"]),
    ("contrib-int8", &["--ops", "contrib", "--precision", "int8"]),
    ("contrib-int4", &["--ops", "contrib", "--precision", "int4"]),
    (
        "standard-fp32",
        &["--ops", "standard", "--precision", "fp32"],
    ),
    (
        "standard-fp16",
        &["--ops", "standard", "--precision", "fp16"],
    ),
    (
        "standard-int8",
        &["--ops", "standard", "--precision", "int8"],
    ),
    (
        "standard-int4",
        &["--ops", "standard", "--precision", "int4"],
    ),
];

/// Builder precisions with the edgepack variant that matches each (CPU execution provider).
const BUILDER: &[(&str, &str)] = &[
    ("fp32", "contrib-fp32"),
    ("int8", "contrib-int8"),
    ("int4", "contrib-int4"),
];

pub fn onnx(model: Option<PathBuf>, prefill: usize, decode: usize, output: &Path) -> Result<()> {
    let ep = edgepack_release()?;
    let work = fresh_work_dir("onnx-work")?;
    // The builder reads an HF folder through transformers: both tools get the same one.
    let model = model_or_smollm2(&ep, &work, model, "f32")?;
    let mut ours = Vec::new();
    for (label, args) in OURS {
        let out = work.join(format!("edgepack-{label}"));
        let m = measure(
            Command::new(&ep)
                .args(["export", "onnx"])
                .arg(&model)
                .args(*args)
                .arg("-o")
                .arg(&out)
                .env("CI", "1"),
        )?;
        ours.push(json!({
            "variant": label,
            "export_seconds": m.seconds,
            "export_max_rss_mib": m.max_rss_mib,
            "bytes": dir_bytes(&out)?,
            "onnxruntime": speed(&out, prefill, decode)?,
        }));
        // Measured: the folder is not needed any more (disk is shared, models add up).
        std::fs::remove_dir_all(&out)?;
    }
    // int8-static needs calibration statistics first; that time is reported on its own.
    let stats = work.join("stats.calib");
    let cal = measure(
        Command::new(&ep)
            .arg("calibrate")
            .arg(&model)
            .args(["--samples", "16", "--seq-len", "256", "-o"])
            .arg(&stats)
            .env("CI", "1"),
    )?;
    let out = work.join("edgepack-contrib-int8-static");
    let m = measure(
        Command::new(&ep)
            .args(["export", "onnx"])
            .arg(&model)
            .args(["--precision", "int8-static", "--stats"])
            .arg(&stats)
            .args(["--smooth", "0.5", "-o"])
            .arg(&out)
            .env("CI", "1"),
    )?;
    ours.push(json!({
        "variant": "contrib-int8-static-smooth0.5",
        "export_seconds": m.seconds,
        "export_max_rss_mib": m.max_rss_mib,
        "calibrate_seconds": cal.seconds,
        "calibrate_max_rss_mib": cal.max_rss_mib,
        "bytes": dir_bytes(&out)?,
        "onnxruntime": speed(&out, prefill, decode)?,
    }));
    std::fs::remove_dir_all(&out)?;

    let mut builder = Vec::new();
    for (precision, ours_label) in BUILDER {
        let out = work.join(format!("builder-{precision}"));
        let m = measure(
            Command::new(py())
                .args(["-m", "onnxruntime_genai.models.builder", "-i"])
                .arg(&model)
                .arg("-o")
                .arg(&out)
                .args(["-p", precision, "-e", "cpu", "-c"])
                .arg(work.join("builder-cache"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .context("running onnxruntime-genai's model builder")?;
        let ours_row = ours
            .iter()
            .find(|r| r["variant"] == *ours_label)
            .expect("listed in OURS");
        builder.push(json!({
            "precision": precision,
            "export_seconds": m.seconds,
            "export_max_rss_mib": m.max_rss_mib,
            "bytes": dir_bytes(&out)?,
            "onnxruntime": speed(&out, prefill, decode)?,
            "edgepack_variant": ours_label,
            "edgepack_speedup": m.seconds / ours_row["export_seconds"].as_f64().unwrap_or(f64::NAN),
        }));
        std::fs::remove_dir_all(&out)?;
    }
    let report = json!({
        "benchmark": "onnx",
        "model": model.display().to_string(),
        "prefill_tokens": prefill,
        "decode_tokens": decode,
        "runtime": "onnxruntime CPUExecutionProvider, 2 intra-op threads",
        "peer": "onnxruntime-genai model builder (python -m onnxruntime_genai.models.builder -e cpu)",
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)},
        "edgepack": ours,
        "builder": builder,
    });
    if let Some(d) = output.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(output, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Bytes of every file in a folder.
fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        n += e?.metadata()?.len();
    }
    Ok(n)
}

fn speed(model: &Path, prefill: usize, decode: usize) -> Result<Value> {
    let out = Command::new(py())
        .arg(root().join("tests/python/onnx_speed.py"))
        .arg(model)
        .arg(prefill.to_string())
        .arg(decode.to_string())
        .output()?;
    if !out.status.success() {
        bail!(
            "onnx_speed.py {} failed:\n{}",
            model.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(text.lines().last().unwrap_or("null"))?)
}
