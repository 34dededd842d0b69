//! Calibration statistics (`edgepack calibrate`) and SmoothQuant (`edgepack smooth`): the
//! smoothed model computes the same function as the original (transformers' and our forward
//! pass's logits) on tiny Llama, Qwen2 and Phi-3 models while its weights did change; the
//! statistics file round-trips and is refused for another model; truncation and bad data are
//! reported.

use std::path::{Path, PathBuf};

use edgepack_converters::calib::stats;
use edgepack_converters::import;
use edgepack_converters::model::stats::CalibStats;
use edgepack_converters::progress::Silent;
use edgepack_tests::fixtures::Tiny;
use edgepack_tests::*;

/// Max |a - b| relative to max |a| (the logit scale).
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    d / a.iter().fold(0f32, |m, v| m.max(v.abs()))
}

fn fixtures() -> Vec<(&'static str, PathBuf)> {
    vec![
        ("llama", tiny("llama-tied-f32", Tiny::llama())),
        (
            "qwen2",
            tiny(
                "qwen2-untied-f32",
                Tiny {
                    arch: "qwen2",
                    tied: false,
                    ..Tiny::llama()
                },
            ),
        ),
        // Calibration tokenizes with tokenizer.json: SmolLM2's BPE instead of the SPM fixture.
        (
            "phi3",
            tiny(
                "phi3-untied-bpe-f32",
                Tiny {
                    spm: false,
                    vocab: 49152,
                    ..Tiny::phi3()
                },
            ),
        ),
    ]
}

fn calibrate(model: &Path, data: Option<&Path>, out: &Path) -> std::process::Output {
    let mut cmd = edgepack();
    cmd.arg("calibrate").arg(model);
    if let Some(d) = data {
        cmd.arg("--data").arg(d);
    }
    cmd.args(["--samples", "2", "--seq-len", "64", "-o"])
        .arg(out);
    run_ok(&mut cmd)
}

/// Largest |a_i - b_i| between two tensors of an HF folder's safetensors.
fn tensor_max_diff(a: &Path, b: &Path, name: &str) -> f32 {
    let load = |d: &Path| {
        import::open(d)
            .unwrap()
            .tensor(name)
            .unwrap_or_else(|| panic!("{name} missing in {}", d.display()))
            .to_f32()
            .unwrap()
    };
    load(a)
        .iter()
        .zip(load(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A fixture's name and folder, with its smoothed folders by scope.
type Smoothed = (&'static str, PathBuf, Vec<(&'static str, PathBuf)>);

#[test]
fn smoothed_model_is_function_preserving() {
    let work = tempfile::tempdir().unwrap();
    let mut smoothed: Vec<Smoothed> = Vec::new();
    for (name, dir) in fixtures() {
        let st = work.path().join(format!("{name}.calib"));
        calibrate(&dir, None, &st);
        let mut outs = Vec::new();
        // `all` also folds v -> o and up -> down; `norms` only the two norm groups per layer.
        for (scope, groups) in [("all", 8), ("norms", 4)] {
            let out = work.path().join(format!("{name}-smoothed-{scope}"));
            let o = run_ok(
                edgepack()
                    .arg("smooth")
                    .arg(&dir)
                    .arg("--stats")
                    .arg(&st)
                    .args(["--alpha", "0.5", "--scope", scope, "--json", "-o"])
                    .arg(&out),
            );
            let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(report["smooth"]["groups"], groups, "{name}: {report}");
            assert_eq!(report["dtype"], "F32", "{name}: {report}");

            // The weights changed: norms divided by s, consumers' columns multiplied by s.
            let mut changed = vec![
                "model.layers.0.input_layernorm.weight",
                "model.layers.1.post_attention_layernorm.weight",
            ];
            let mut same = vec!["model.norm.weight", "model.embed_tokens.weight"];
            let folded = [
                "model.layers.0.self_attn.o_proj.weight",
                "model.layers.1.mlp.down_proj.weight",
            ];
            if scope == "all" {
                changed.extend(folded);
            } else {
                same.extend(folded);
            }
            for t in changed {
                let d = tensor_max_diff(&dir, &out, t);
                eprintln!("{name} {scope}: {t} max change {d}");
                assert!(d > 1e-3, "{name} {scope}: {t} did not change ({d})");
            }
            // What the scope does not touch is bit-identical.
            for t in same {
                assert_eq!(tensor_max_diff(&dir, &out, t), 0.0, "{name} {scope}: {t}");
            }

            outs.push((scope, out));
        }
        smoothed.push((name, dir, outs));
    }
    // Transformers runs every folder once, at the end, in one process.
    let ids = token_ids(24, 520);
    let folders: Vec<&Path> = smoothed
        .iter()
        .flat_map(|(_, dir, outs)| std::iter::once(dir).chain(outs.iter().map(|(_, o)| o)))
        .map(PathBuf::as_path)
        .collect();
    let mut hf = hf_logits_many(&folders, &ids).into_iter();
    for (name, dir, outs) in &smoothed {
        let (want, ours) = (hf.next().unwrap(), our_logits(dir, &ids));
        for (scope, out) in outs {
            let d_hf = rel_diff(&want, &hf.next().unwrap());
            let d_ours = rel_diff(&ours, &our_logits(out, &ids));
            eprintln!(
                "{name} {scope}: relative logit difference transformers {d_hf:e}, ours {d_ours:e}"
            );
            assert!(
                d_hf < 1e-4,
                "{name} {scope}: transformers logits moved by {d_hf}"
            );
            assert!(
                d_ours < 1e-4,
                "{name} {scope}: our logits moved by {d_ours}"
            );
        }
    }
}

#[test]
fn per_layer_alpha_is_applied_and_a_wrong_count_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let dir = tiny("llama-tied-f32", Tiny::llama());
    let st = work.path().join("s.calib");
    calibrate(&dir, None, &st);
    let smooth = |alpha: &str, out: &Path| {
        let mut c = edgepack();
        c.arg("smooth")
            .arg(&dir)
            .arg("--stats")
            .arg(&st)
            .args(["--alpha", alpha, "-o"])
            .arg(out);
        c
    };
    // α = 0 in layer 0 leaves s = 1 / max|W_:,j|; α = 1 in layer 1 gives s = max|X_j|, so the
    // per-layer run equals the uniform runs layer by layer.
    let (a0, a1, mixed) = (
        work.path().join("a0"),
        work.path().join("a1"),
        work.path().join("mixed"),
    );
    run_ok(&mut smooth("0", &a0));
    run_ok(&mut smooth("1", &a1));
    run_ok(&mut smooth("0,1", &mixed));
    let n0 = "model.layers.0.input_layernorm.weight";
    let n1 = "model.layers.1.input_layernorm.weight";
    assert_eq!(tensor_max_diff(&a0, &mixed, n0), 0.0);
    assert_eq!(tensor_max_diff(&a1, &mixed, n1), 0.0);
    assert!(tensor_max_diff(&a0, &a1, n0) > 1e-3);
    let err = run_err(&mut smooth("0.5,0.5,0.5", &work.path().join("bad")));
    assert!(err.contains("3 values given for 2 layers"), "{err}");
    let err = run_err(&mut smooth("half", &work.path().join("bad")));
    assert!(err.contains("--alpha half"), "{err}");
}

#[test]
fn stats_file_round_trips_and_refuses_another_model() {
    let work = tempfile::tempdir().unwrap();
    let dir = tiny("llama-tied-f32", Tiny::llama());
    let model = import::open(&dir).unwrap();
    let texts = vec![edgepack_converters::calib::data::DEFAULT_CORPUS.to_string()];
    let mut s = stats::compute(&model, &texts, 64, Some(2), &Silent).unwrap();
    s.dataset = "default".into();
    assert_eq!(s.samples, 2);
    assert_eq!(s.tokens_used, 128);
    // Every linear input of both layers (q, k, v, o, gate, up, down) and the tied output.
    assert_eq!(s.entries.len(), 2 * 7 + 1, "{:?}", s.entries.keys());
    let q = &s.entries["model.layers.0.self_attn.q_proj.weight"];
    assert_eq!(q, &s.entries["model.layers.0.self_attn.v_proj.weight"]);
    assert_eq!(q.count, 128);
    assert_eq!(q.absmax.len(), 256);
    let p = q.percentile(99.99);
    assert!(
        p > 0.0 && p <= q.abs_max() && q.min < 0.0 && q.max > 0.0,
        "{p} {q:?}"
    );
    let path = work.path().join("tiny.calib");
    s.write(&path).unwrap();
    let back = CalibStats::read(&path).unwrap();
    assert_eq!(back, s);
    back.check_model(&model, &path).unwrap();

    // The CLI's file reads back too, with the same per-channel maxima (same text, same model).
    let cli = work.path().join("cli.calib");
    calibrate(&dir, None, &cli);
    let c = CalibStats::read(&cli).unwrap();
    assert_eq!(c.entries[q_name()].absmax, q.absmax);
    assert_eq!(c.identity, s.identity);

    // Another model: refused naming the field, in the library and the CLI.
    let smol = smollm2_hf();
    let other = import::open(&smol).unwrap();
    let err = back.check_model(&other, &path).unwrap_err().to_string();
    assert!(
        err.contains("tiny.calib: identity.hidden_size") && err.contains("256"),
        "{err}"
    );
    let err = run_err(
        edgepack()
            .arg("smooth")
            .arg(&smol)
            .arg("--stats")
            .arg(&path)
            .arg("-o")
            .arg(work.path().join("out")),
    );
    assert!(err.contains("tiny.calib: identity.hidden_size"), "{err}");
    assert!(!work.path().join("out").exists());

    // Another architecture of the same size.
    let qwen = import::open(&fixtures()[1].1).unwrap();
    let err = back.check_model(&qwen, &path).unwrap_err().to_string();
    assert!(err.contains("tiny.calib: identity.architecture"), "{err}");
    // Same config numbers, other tensors (an untied lm_head): named by the tensor hash.
    let untied = tiny(
        "llama-untied-f32-smooth",
        Tiny {
            tied: false,
            ..Tiny::llama()
        },
    );
    let err = back
        .check_model(&import::open(&untied).unwrap(), &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tiny.calib: identity.tensors_sha256"), "{err}");
}

fn q_name() -> &'static str {
    "model.layers.0.self_attn.q_proj.weight"
}

#[test]
fn calibration_reports_truncation_of_long_texts() {
    let work = tempfile::tempdir().unwrap();
    let dir = tiny("llama-tied-f32", Tiny::llama());
    let data = work.path().join("long.txt");
    std::fs::write(
        &data,
        edgepack_converters::calib::data::DEFAULT_CORPUS.repeat(2),
    )
    .unwrap();
    let out = work.path().join("s.calib");
    let o = calibrate(&dir, Some(&data), &out);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("note: truncated") && text.contains("128 were used (2 samples x 64 tokens)"),
        "{text}"
    );
    let o = run_ok(
        edgepack()
            .arg("calibrate")
            .arg(&dir)
            .arg("--data")
            .arg(&data)
            .args(["--samples", "2", "--seq-len", "64", "--json", "-o"])
            .arg(work.path().join("j.calib")),
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let total = v["tokens_total"].as_u64().unwrap();
    assert_eq!(v["tokens_used"], 128, "{v}");
    assert_eq!(v["tokens_truncated"].as_u64().unwrap(), total - 128, "{v}");
    assert!(total > 128, "{v}");
    let s = CalibStats::read(&out).unwrap();
    assert_eq!((s.tokens_total as u64, s.tokens_used), (total, 128));
    assert_eq!(s.dataset, data.display().to_string());
}

#[test]
fn bad_calibration_data_and_lengths_are_refused_naming_the_file() {
    let work = tempfile::tempdir().unwrap();
    let dir = tiny("llama-tied-f32", Tiny::llama());
    let empty = work.path().join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    let out = work.path().join("s.calib");
    let err = run_err(
        edgepack()
            .arg("calibrate")
            .arg(&dir)
            .arg("--data")
            .arg(&empty)
            .arg("-o")
            .arg(&out),
    );
    assert!(
        err.contains("empty.txt: text") && err.contains("empty"),
        "{err}"
    );
    assert!(!out.exists());
    // More tokens per sample than the model's context.
    let err = run_err(
        edgepack()
            .arg("calibrate")
            .arg(&dir)
            .args(["--seq-len", "4096", "-o"])
            .arg(&out),
    );
    assert!(err.contains("max_position_embeddings 2048"), "{err}");
    // Not a stats file.
    let err = run_err(
        edgepack()
            .arg("smooth")
            .arg(&dir)
            .arg("--stats")
            .arg(&empty)
            .arg("-o")
            .arg(work.path().join("o")),
    );
    assert!(err.contains("empty.txt: header"), "{err}");
}
