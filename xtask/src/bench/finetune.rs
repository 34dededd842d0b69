//! `cargo xtask bench finetune`: `edgepack finetune` against PEFT + torch (tests/python/
//! peft_train.py) on the same model, data, targets, rank, batch, sequence length, step count
//! and threads, in the same run: training tokens/s (model loading excluded, each tool's own
//! clock), wall time and peak RSS of each process. JSON out.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::common::{edgepack_release, fresh_work_dir, measure, model_or_smollm2, py, Measured};
use crate::util::{root, run};

pub struct Options {
    pub steps: u64,
    pub batch: usize,
    pub rank: usize,
    pub seq_len: usize,
    pub threads: Option<usize>,
    /// The sample budget of the data-selection comparison (0: skip it).
    pub quality: usize,
    pub output: std::path::PathBuf,
}

pub fn bench(o: Options) -> Result<()> {
    let ep = edgepack_release()?;
    let work = fresh_work_dir("finetune-work")?;
    let model = model_or_smollm2(&ep, &work, None, "f32")?;
    let data = root().join("recipes/data/tern-t3/train.jsonl");
    let threads = o
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let alpha = 2 * o.rank;

    // edgepack with the base in f32 (as PEFT's), then in bf16 (`--base-dtype`).
    let ours = |dtype: &str| -> Result<(Measured, Value)> {
        let dir = work.join(format!("edgepack-adapter-{dtype}"));
        let m = measure(
            Command::new(&ep)
                .arg("finetune")
                .arg(&model)
                .arg("--data")
                .arg(&data)
                .args(["--eval-split", "0", "--epochs", "0", "--lr", "2e-4"])
                .args(["--max-steps", &o.steps.to_string()])
                .args(["--batch", &o.batch.to_string()])
                .args(["--rank", &o.rank.to_string(), "--alpha", &alpha.to_string()])
                .args([
                    "--seq-len",
                    &o.seq_len.to_string(),
                    "--base-dtype",
                    dtype,
                    "-o",
                ])
                .arg(&dir)
                .env("CI", "1")
                .env("RAYON_NUM_THREADS", threads.to_string()),
        )?;
        let report: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("training_report.json"))
                .context("reading edgepack's training_report.json")?,
        )?;
        Ok((m, report))
    };
    let (m_ours, report) = ours("f32")?;
    let (m_bf16, report_bf16) = ours("bf16")?;

    let peer_dir = work.join("peft-adapter");
    let script = root().join("tests/python/peft_train.py");
    let m_peer = measure(
        Command::new(py())
            .arg(&script)
            .arg(&model)
            .arg(&data)
            .arg(&peer_dir)
            .args([
                o.rank.to_string(),
                alpha.to_string(),
                o.steps.to_string(),
                o.batch.to_string(),
                "2e-4".into(),
                o.seq_len.to_string(),
                threads.to_string(),
            ]),
    )?;
    let peer: Value = serde_json::from_str(
        &std::fs::read_to_string(peer_dir.join("peer_report.json"))
            .context("reading peft_train.py's report")?,
    )?;

    let ours_tps = report["tokens_per_second"].as_f64().unwrap_or(0.0);
    let peer_tps = peer["tokens_per_second"].as_f64().unwrap_or(0.0);
    let result = json!({
        "benchmark": "finetune",
        "model": model.display().to_string(),
        "data": data.display().to_string(),
        "steps": o.steps, "batch": o.batch, "rank": o.rank, "alpha": alpha,
        "seq_len": o.seq_len, "threads": threads,
        "edgepack": {
            "tokens": report["tokens_seen"], "train_seconds": report["train_seconds"],
            "tokens_per_second": ours_tps, "wall_seconds": m_ours.seconds,
            "max_rss_mib": m_ours.max_rss_mib,
            "last_loss": report["steps"].as_array().and_then(|s| s.last()).map(|s| s["loss"].clone()),
        },
        "peft": {
            "tokens": peer["tokens"], "train_seconds": peer["train_seconds"],
            "tokens_per_second": peer_tps, "wall_seconds": m_peer.seconds,
            "max_rss_mib": m_peer.max_rss_mib, "last_loss": peer["last_loss"],
        },
        "speedup": if peer_tps > 0.0 { ours_tps / peer_tps } else { 0.0 },
        "memory_ratio": m_ours.max_rss_mib / m_peer.max_rss_mib.max(1.0),
        // No PEFT row in bf16: torch's CPU bf16 training computes in bf16, not the same work.
        "edgepack_bf16_base": {
            "tokens": report_bf16["tokens_seen"], "train_seconds": report_bf16["train_seconds"],
            "tokens_per_second": report_bf16["tokens_per_second"], "wall_seconds": m_bf16.seconds,
            "max_rss_mib": m_bf16.max_rss_mib,
            "last_loss": report_bf16["steps"].as_array().and_then(|s| s.last()).map(|s| s["loss"].clone()),
        },
    });
    let mut result = result;
    if o.quality > 0 {
        result["quality"] = quality(&ep, &work, &model, &data, o.quality)?;
    }
    write(&o.output, &result)
}

/// Held-out answer similarity (the Tern T3 rewordings, scored by all-MiniLM-L6-v2 against the
/// manual's answers) of the base model and of adapters trained on: every sample (one epoch,
/// as the shipped recipe), the `k` samples `--select` scores highest, and `k` at random
/// (three epochs each, the same steps for both).
fn quality(ep: &Path, work: &Path, model: &Path, data: &Path, k: usize) -> Result<Value> {
    let common = [
        "--eval-split",
        "0.1",
        "--rank",
        "16",
        "--alpha",
        "32",
        "--lr",
        "1e-3",
        "--batch",
        "8",
        "--warmup-steps",
        "3",
        "--seq-len",
        "256",
    ];
    let ks = k.to_string();
    let runs: [(&str, Vec<&str>); 3] = [
        ("all", vec!["--epochs", "1"]),
        ("selected", vec!["--epochs", "3", "--select", &ks]),
        (
            "random",
            vec!["--epochs", "3", "--select", &ks, "--select-by", "random"],
        ),
    ];
    let mut merged = Vec::new();
    let mut rows = serde_json::Map::new();
    for (name, extra) in &runs {
        let adapter = work.join(format!("quality-{name}"));
        let m = measure(
            Command::new(ep)
                .arg("finetune")
                .arg(model)
                .arg("--data")
                .arg(data)
                .args(common)
                .args(extra)
                .arg("-o")
                .arg(&adapter)
                .env("CI", "1"),
        )?;
        let r: Value = serde_json::from_str(&std::fs::read_to_string(
            adapter.join("training_report.json"),
        )?)?;
        let out = work.join(format!("quality-{name}-merged"));
        run(Command::new(ep)
            .arg("merge")
            .arg(model)
            .arg("--lora")
            .arg(&adapter)
            .args(["--dtype", "f32", "-o"])
            .arg(&out))?;
        merged.push(out);
        rows.insert(
            name.to_string(),
            json!({
                "train_samples": r["data"]["train_samples"],
                "steps": r["steps"].as_array().map_or(0, Vec::len),
                "eval_loss_before": r["eval"][0]["loss"],
                "eval_loss_after": r["eval"].as_array().and_then(|e| e.last()).map(|e| e["loss"].clone()),
                "train_wall_seconds": m.seconds,
            }),
        );
    }
    let heldout = root().join("recipes/data/tern-t3/heldout.jsonl");
    let minilm = crate::setup::minilm(&py())?;
    let mut eval = Command::new(ep);
    eval.arg("eval").arg(model);
    for m in &merged {
        eval.arg("--against").arg(m);
    }
    let out = eval
        .arg("--qa")
        .arg(&heldout)
        .arg("--embedder")
        .arg(&minilm)
        .args([
            "--chunks",
            "1",
            "--ctx",
            "64",
            "--max-new-tokens",
            "48",
            "--json",
        ])
        .output()
        .context("running edgepack eval")?;
    anyhow::ensure!(
        out.status.success(),
        "edgepack eval failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev: Value = serde_json::from_slice(&out.stdout)?;
    let sims: Vec<f64> = ev["qa"]
        .as_array()
        .context("eval --json has no qa")?
        .iter()
        .map(|q| q["mean_similarity"].as_f64().unwrap_or(f64::NAN))
        .collect();
    anyhow::ensure!(sims.len() == 4, "expected 4 similarity rows, got {sims:?}");
    rows.insert("base".into(), json!({ "similarity": sims[0] }));
    for (i, (name, _)) in runs.iter().enumerate() {
        rows[*name]["similarity"] = json!(sims[i + 1]);
    }
    Ok(json!({
        "k": k,
        "heldout": heldout.display().to_string(),
        "questions": std::fs::read_to_string(&heldout)?.lines().count(),
        "rows": rows,
        "selected_beats_random": sims[2] > sims[3],
    }))
}

fn write(output: &Path, v: &Value) -> Result<()> {
    if let Some(d) = output.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(output, serde_json::to_string_pretty(v)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
