//! `cargo xtask bench convert`: HF folder -> quantized GGUF, edgepack against llama.cpp's
//! convert_hf_to_gguf.py + llama-quantize on the same folder (wall time, peak RSS, bytes, and
//! the agreement of the K-quant bytes). JSON out.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use super::common::{edgepack_release, fresh_work_dir, measure, model_or_smollm2, py};
use crate::setup;
use crate::util::{root, run};

fn oracle(script: &str, args: &[&Path]) -> Result<Value> {
    let out = Command::new(py())
        .arg(root().join("tests/python").join(script))
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("{script} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(text.lines().last().unwrap_or("null"))?)
}

pub fn convert(model: Option<PathBuf>, quant: &str, output: &Path) -> Result<()> {
    let ep = edgepack_release()?;
    let work = fresh_work_dir("convert-work")?;
    let model = model_or_smollm2(&ep, &work, model, "bf16")?;
    let ftype = match quant.to_ascii_uppercase().as_str() {
        "Q8_0" => 7,
        "Q4_0" => 2,
        "Q4_K_M" => 15,
        "Q4_K_S" => 14,
        "Q5_K_M" => 17,
        "Q6_K" => 18,
        other => {
            bail!("bench convert supports Q8_0, Q4_0, Q4_K_S, Q4_K_M, Q5_K_M, Q6_K, not {other}")
        }
    };

    let ours = work.join("edgepack.gguf");
    let m_ours = measure(
        Command::new(&ep)
            .args(["export", "gguf"])
            .arg(&model)
            .args(["--quant", quant, "-o"])
            .arg(&ours)
            .env("CI", "1"),
    )?;

    let llama_src = setup::llama_cpp_source()?;
    let peer_f16 = work.join("llama-f16.gguf");
    let m_convert = measure(
        Command::new(py())
            .arg(llama_src.join("convert_hf_to_gguf.py"))
            .arg(&model)
            .args(["--outtype", "f16", "--outfile"])
            .arg(&peer_f16),
    )?;
    let peer = work.join("llama.gguf");
    let m_quant = measure(
        Command::new(py())
            .arg(root().join("tests/python/llama_quantize.py"))
            .arg(&peer_f16)
            .arg(&peer)
            .arg(ftype.to_string()),
    )?;
    // A float reference for the error figures.
    let f32_ref = work.join("edgepack-f32.gguf");
    run(Command::new(&ep)
        .args(["export", "gguf"])
        .arg(&model)
        .args(["--quant", "F32", "-o"])
        .arg(&f32_ref)
        .env("CI", "1"))?;
    let diff = oracle("gguf_tensor_diff.py", &[&ours, &peer, &f32_ref])?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let report = json!({
        "benchmark": "convert",
        "model": model.display().to_string(),
        "quant": quant,
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)},
        "edgepack": {"seconds": m_ours.seconds, "max_rss_mib": m_ours.max_rss_mib, "bytes": size(&ours)},
        "llama_cpp": {
            "seconds": m_convert.seconds + m_quant.seconds,
            "max_rss_mib": m_convert.max_rss_mib.max(m_quant.max_rss_mib),
            "convert_seconds": m_convert.seconds,
            "convert_max_rss_mib": m_convert.max_rss_mib,
            "quantize_seconds": m_quant.seconds,
            "quantize_max_rss_mib": m_quant.max_rss_mib,
            "bytes": size(&peer),
        },
        "speedup": (m_convert.seconds + m_quant.seconds) / m_ours.seconds,
        "tensor_agreement": diff,
    });
    if let Some(d) = output.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(output, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
