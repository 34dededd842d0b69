//! `edgepack eval` and `edgepack sparsify` on the real SmolLM2-135M-Instruct: the quality bars
//! (SmoothQuant helps W8A8, Wanda beats magnitude pruning, an importance matrix helps
//! Q4_K_M), the sentence embedder against transformers, and the report's contents.

use std::path::Path;

use edgepack_converters::calib::embed::Embedder;
use edgepack_tests::*;
use serde_json::Value;

/// A small evaluation: two chunks of 128 tokens of edgepack's corpus.
const EVAL_ARGS: [&str; 4] = ["--ctx", "128", "--chunks", "2"];

fn eval_json(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Value {
    let mut cmd = edgepack();
    cmd.arg("eval")
        .arg(smollm2_hf())
        .args(EVAL_ARGS)
        .arg("--json");
    for a in args {
        cmd.arg(a);
    }
    let o = run_ok(&mut cmd);
    serde_json::from_slice(&o.stdout).unwrap()
}

fn kl(report: &Value, i: usize) -> f64 {
    report["models"][i]["vs_reference"]["kl_mean"]
        .as_f64()
        .unwrap_or_else(|| panic!("no KL for model {i}: {report}"))
}

fn ppl(report: &Value, i: usize) -> f64 {
    report["models"][i]["perplexity"].as_f64().unwrap()
}

#[test]
fn w8a8_with_smoothquant_has_lower_kl_than_without_on_smollm2() {
    let stats = smollm2_stats();
    let r = eval_json(&[
        &"--stats",
        &stats,
        &"--w8a8",
        &"--w8a8-smooth",
        &"0.5",
        &"--w8a8-smooth",
        &"0.8",
    ]);
    eprintln!("{}", serde_json::to_string_pretty(&r["models"]).unwrap());
    // The reference scores itself: no divergence entry, a sane perplexity.
    assert!(r["models"][0]["vs_reference"].is_null(), "{r}");
    assert!(ppl(&r, 0) > 1.0 && ppl(&r, 0) < 200.0, "{r}");
    assert_eq!(r["models"][0]["tokens"], 2 * 127);
    let (plain, s05, s08) = (kl(&r, 1), kl(&r, 2), kl(&r, 3));
    assert!(plain > 0.0, "W8A8 must differ from float: {r}");
    assert!(
        s05 < plain,
        "SmoothQuant 0.5 KL {s05} is not below plain W8A8 {plain}"
    );
    assert!(
        s08 < plain,
        "SmoothQuant 0.8 KL {s08} is not below plain W8A8 {plain}"
    );
    let top1 = |i: usize| {
        r["models"][i]["vs_reference"]["top1_agreement"]
            .as_f64()
            .unwrap()
    };
    assert!(top1(3) > top1(1), "{r}");
}

#[test]
fn smooth_alpha_auto_picks_a_grid_alpha_per_layer_and_stays_function_preserving() {
    let stats = smollm2_stats();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("smoothed");
    let o = run_ok(
        edgepack()
            .arg("smooth")
            .arg(smollm2_hf())
            .arg("--stats")
            .arg(&stats)
            .args(["--alpha", "auto", "--json", "-o"])
            .arg(&out),
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let layers = v["alpha_search"].as_array().unwrap();
    assert_eq!(layers.len(), 30, "{v}");
    for l in layers {
        let a = l["alpha"].as_f64().unwrap();
        assert!(
            (0.0..=1.0).contains(&a) && ((a * 10.0).round() - a * 10.0).abs() < 1e-4,
            "{l}"
        );
        assert!(l["error"].as_f64().unwrap() >= 0.0, "{l}");
    }
    // The searched model computes the same function as the original.
    let ids = token_ids(16, 49152);
    let (a, b) = (our_logits(&smollm2_hf(), &ids), our_logits(&out, &ids));
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale;
    assert!(d < 1e-4, "relative logit change {d}");
}

fn sparsify(method: &str, how: &[&str], stats: Option<&Path>, out: &Path) -> Value {
    let mut cmd = edgepack();
    cmd.arg("sparsify")
        .arg(smollm2_hf())
        .args(["--method", method])
        .args(how);
    if let Some(s) = stats {
        cmd.arg("--stats").arg(s);
    }
    let o = run_ok(cmd.arg("--json").arg("-o").arg(out));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The report's per-tensor zero counts equal what numpy counts in the written files.
fn check_report_against_numpy(report: &Value, dir: &Path, nm: Option<&str>) {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&dir];
    if let Some(p) = &nm {
        args.push(p);
    }
    let counted = oracle("sparsity_count.py", &args);
    let tensors = report["sparsify"]["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 30 * 7, "every decoder linear is pruned");
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        let c = &counted["tensors"][name];
        assert_eq!(t["zeros"], c["zeros"], "{name}: report {t} vs numpy {c}");
        if nm.is_some() {
            assert_eq!(c["nm_ok"], true, "{name} breaks the pattern");
        }
    }
    // The embedding stays as it was (its Q4_1 source already holds about 1% exact zeros).
    let emb = &counted["tensors"]["model.embed_tokens.weight"];
    assert!(
        emb["zeros"].as_u64().unwrap() < emb["numel"].as_u64().unwrap() / 20,
        "{emb}"
    );
}

#[test]
fn wanda_at_half_sparsity_has_lower_perplexity_than_magnitude_on_smollm2() {
    let stats = smollm2_stats();
    let work = tempfile::tempdir().unwrap();
    let (wanda, mag) = (work.path().join("wanda"), work.path().join("magnitude"));
    let rw = sparsify("wanda", &["--ratio", "0.5"], Some(&stats), &wanda);
    let rm = sparsify("magnitude", &["--ratio", "0.5"], None, &mag);
    for r in [&rw, &rm] {
        let s = r["sparsify"]["sparsity"].as_f64().unwrap();
        assert!((s - 0.5).abs() < 0.001, "achieved sparsity {s}: {r}");
    }
    check_report_against_numpy(&rw, &wanda, None);
    check_report_against_numpy(&rm, &mag, None);
    let r = eval_json(&[&"--against", &wanda, &"--against", &mag]);
    eprintln!("{}", serde_json::to_string_pretty(&r["models"]).unwrap());
    let (p_ref, p_wanda, p_mag) = (ppl(&r, 0), ppl(&r, 1), ppl(&r, 2));
    assert!(
        p_wanda > p_ref,
        "pruning half the weights must cost something: {r}"
    );
    assert!(
        p_wanda < p_mag,
        "Wanda 50% perplexity {p_wanda} is not below magnitude 50% {p_mag}"
    );
}

#[test]
fn two_four_pattern_holds_in_every_group_of_the_written_weights() {
    let stats = smollm2_stats();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("s24");
    let r = sparsify("wanda", &["--pattern", "2:4"], Some(&stats), &out);
    assert_eq!(r["sparsify"]["pattern"], "2:4");
    check_report_against_numpy(&r, &out, Some("2:4"));
}

#[test]
fn imatrix_q4_k_m_has_lower_kl_than_plain_q4_k_m_on_smollm2() {
    let work = tempfile::tempdir().unwrap();
    let im = work.path().join("imatrix.gguf");
    run_ok(
        edgepack()
            .arg("imatrix")
            .arg(smollm2_hf())
            .args(["--chunk-size", "128", "--chunks", "8", "-o"])
            .arg(&im),
    );
    let plain = work.path().join("q4km.gguf");
    let weighted = work.path().join("q4km-imatrix.gguf");
    export_gguf(&smollm2_hf(), "Q4_K_M", &plain);
    run_ok(
        edgepack()
            .args(["export", "gguf"])
            .arg(smollm2_hf())
            .args(["--quant", "Q4_K_M", "--imatrix"])
            .arg(&im)
            .arg("-o")
            .arg(&weighted),
    );
    let r = eval_json(&[&"--against", &plain, &"--against", &weighted]);
    eprintln!("{}", serde_json::to_string_pretty(&r["models"]).unwrap());
    let (k_plain, k_im) = (kl(&r, 1), kl(&r, 2));
    assert!(k_plain > 0.0, "{r}");
    assert!(
        k_im < k_plain,
        "imatrix Q4_K_M KL {k_im} is not below plain {k_plain}"
    );
}

#[test]
fn sentence_embedder_matches_transformers_mean_pooling() {
    let dir = minilm_dir();
    let sentences = [
        "The capital of France is Paris.",
        "Paris is France's capital city.",
        "A board with an NPU runs int8 models.",
    ];
    let want = oracle(
        "embed_ref.py",
        &[&dir, &serde_json::to_string(&sentences).unwrap()],
    );
    let e = Embedder::open(&dir).unwrap();
    let mut ours = Vec::new();
    for (i, s) in sentences.iter().enumerate() {
        let got = e.embed(s).unwrap();
        let w: Vec<f32> = serde_json::from_value(want["embeddings"][i].clone()).unwrap();
        assert_eq!(got.len(), 384);
        let d = got
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-4, "{s}: max difference {d} from transformers");
        ours.push(got);
    }
    let cos = edgepack_converters::calib::embed::cosine;
    assert!(cos(&ours[0], &ours[1]) > cos(&ours[0], &ours[2]) + 0.3);
    // Opened with the weights' hash a verified bundle lists, it is the same encoder.
    let sha = e.identity().weights_sha256.clone();
    let v = Embedder::open_verified(&dir, &sha).unwrap();
    assert_eq!(v.identity(), e.identity());
    assert_eq!(v.embed(sentences[0]).unwrap(), ours[0]);
}

#[test]
fn eval_answers_questions_scores_similarity_and_plots_ttft() {
    let work = tempfile::tempdir().unwrap();
    let qa = work.path().join("qa.jsonl");
    std::fs::write(
        &qa,
        "{\"question\": \"What is the capital of France?\", \"answer\": \"The capital of France is Paris.\"}\n",
    )
    .unwrap();
    let (svg, md) = (work.path().join("ttft.svg"), work.path().join("report.md"));
    let r = eval_json(&[
        &"--qa",
        &qa,
        &"--embedder",
        &minilm_dir(),
        &"--max-new-tokens",
        &"24",
        &"--prompt-sizes",
        &"16,64,128",
        &"--gen-tokens",
        &"4",
        &"--plot",
        &svg,
        &"--markdown",
        &md,
    ]);
    let a = &r["qa"][0]["answers"][0];
    eprintln!("{a}");
    assert!(
        a["answer"].as_str().unwrap().contains("Paris"),
        "the float model should know: {a}"
    );
    let sim = a["similarity"].as_f64().unwrap();
    assert!(sim > 0.5 && sim <= 1.0 + 1e-6, "{a}");
    let speed = r["speed"].as_array().unwrap();
    assert_eq!(speed.len(), 3);
    for (t, n) in speed.iter().zip([16, 64, 128]) {
        assert_eq!(t["prompt_tokens"], n);
        assert!(t["ttft_s"].as_f64().unwrap() > 0.0, "{t}");
        assert_eq!(t["decode_tokens"], 3);
    }
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline") && svg.matches("<circle").count() == 3
    );
    let md = std::fs::read_to_string(&md).unwrap();
    assert!(
        md.contains("| model | PPL | KL mean") && md.contains("answer similarity"),
        "{md}"
    );
}

#[test]
fn eval_and_sparsify_refuse_bad_input_naming_what_is_wrong() {
    let work = tempfile::tempdir().unwrap();
    // Statistics of another model.
    let tiny = tiny("llama-tied-f32", edgepack_tests::fixtures::Tiny::llama());
    let other = work.path().join("tiny.calib");
    run_ok(
        edgepack()
            .arg("calibrate")
            .arg(&tiny)
            .args(["--samples", "1", "--seq-len", "64", "-o"])
            .arg(&other),
    );
    let e = run_err(
        edgepack()
            .arg("eval")
            .arg(smollm2_hf())
            .args(EVAL_ARGS)
            .arg("--stats")
            .arg(&other)
            .arg("--w8a8"),
    );
    assert!(e.contains("tiny.calib"), "{e}");
    // Wanda without statistics, a ratio out of range, a pattern that is not N:M.
    let out = work.path().join("o");
    let e = run_err(
        edgepack()
            .arg("sparsify")
            .arg(&tiny)
            .args(["--method", "wanda", "--ratio", "0.5", "-o"])
            .arg(&out),
    );
    assert!(e.contains("Wanda needs activation statistics"), "{e}");
    let e = run_err(
        edgepack()
            .arg("sparsify")
            .arg(&tiny)
            .args(["--method", "magnitude", "--ratio", "1.5", "-o"])
            .arg(&out),
    );
    assert!(e.contains("ratio 1.5"), "{e}");
    let e = run_err(
        edgepack()
            .arg("sparsify")
            .arg(&tiny)
            .args(["--method", "magnitude", "--pattern", "4:4", "-o"])
            .arg(&out),
    );
    assert!(e.contains("4:4"), "{e}");
    assert!(!out.exists(), "nothing is written on refusal");
    // A speed measurement longer than the text.
    let e = run_err(edgepack().arg("eval").arg(&tiny).args([
        "--ctx",
        "64",
        "--chunks",
        "1",
        "--prompt-sizes",
        "100000",
    ]));
    assert!(e.contains("--prompt-sizes 100000"), "{e}");
    // A Q&A file without answers.
    let qa = work.path().join("qa.jsonl");
    std::fs::write(&qa, "{\"question\": \"x\"}\n").unwrap();
    let e = run_err(
        edgepack()
            .arg("eval")
            .arg(&tiny)
            .args(["--ctx", "64", "--chunks", "1", "--qa"])
            .arg(&qa)
            .arg("--embedder")
            .arg(minilm_dir()),
    );
    assert!(
        e.contains("qa.jsonl: line 1") && e.contains("answer"),
        "{e}"
    );
}
