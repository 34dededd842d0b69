//! `edgepack export tflite` against LiteRT's own interpreter (ai-edge-litert): every precision
//! loads and runs both signatures with LiteRT's generative names and static shapes; fp32 logits
//! equal the reference forward pass on tiny Llama / Qwen2 / Phi-3 models and on SmolLM2-135M
//! over a prompt and decode steps; fp16, dynamic int8 and the full-integer graphs (calibrated,
//! smoothed) report KL against float, also over the chat prompt; greedy chat answers of fp32
//! and dynamic int8 mention Paris; the full-integer graphs leave only the final DEQUANTIZE off
//! an integer NPU; --target reports the NPU's CPU
//! fallbacks before writing; bad requests fail naming the field and write nothing.

use std::path::{Path, PathBuf};

use edgepack_converters::calib::forward::Forward;
use edgepack_converters::import;
use edgepack_converters::model::stats::CalibStats;
use edgepack_tests::fixtures::Tiny;
use edgepack_tests::{
    edgepack, edgepack_bin, kl_and_top1, max_abs_diff, oracle, root, run_err, run_ok,
    shared_work_dir, smollm2_gguf, tiny, token_ids, vela_bin,
};
use serde_json::Value;

/// Logit tolerance of fp32 against the reference forward pass (the issue's bound).
const FP32_MAX_ABS_DIFF: f32 = 1e-3;
/// Mean per-position KL(float ‖ variant) a working weight quantization stays under on SmolLM2
/// (fp16 is ~1e-5, dynamic int8 ~1e-2 in our runs; broken scales give KL ≫ 1).
const FP16_MAX_MEAN_KL: f64 = 1e-3;
const INT8_MAX_MEAN_KL: f64 = 0.1;
/// The full-integer graph with int16 activations (int8-a16), static scales from 4 calibration
/// samples: ~0.01 in our runs, below dynamic int8.
const INT8_A16_MAX_MEAN_KL: f64 = 0.05;
/// The full-integer graph with int8 activations into the smoothed linears (~0.2 in our runs)
/// stays well below an unrelated model's KL (several nats), and still answers correctly.
const INT8_A8_MAX_MEAN_KL: f64 = 1.0;

fn export(model: &Path, precision: &str, seq: usize, prefill: usize, out: &Path) -> Value {
    let stats = if precision.starts_with("int8") {
        stats_for("tiny-llama", model, 2, 32)
    } else {
        PathBuf::new()
    };
    let o = run_ok(
        edgepack()
            .args(["--json", "export", "tflite"])
            .arg(model)
            .args(precision_args(precision, &stats))
            .args(["--seq-len", &seq.to_string()])
            .args(["--prefill-len", &prefill.to_string()])
            .arg("-o")
            .arg(out),
    );
    serde_json::from_slice(&o.stdout).expect("--json prints the report")
}

/// Identifies the edgepack build, so files cached across runs are remade after a rebuild.
fn build_stamp() -> u128 {
    std::fs::metadata(edgepack_bin())
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// `path`, made by `make(tmp)` unless it exists from this same edgepack build (a sidecar
/// `.stamp` records the build). Rebuilt files replace the old ones, so nothing accumulates.
fn cached(path: PathBuf, make: impl FnOnce(&Path)) -> PathBuf {
    let stamp = path.with_extension("stamp");
    let now = build_stamp().to_string();
    if path.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(now.as_str()) {
        return path;
    }
    let ext = path.extension().unwrap().to_string_lossy().into_owned();
    let tmp = path.with_extension(format!("{}.part.{ext}", std::process::id()));
    make(&tmp);
    std::fs::rename(&tmp, &path).unwrap();
    std::fs::write(&stamp, now).unwrap();
    path
}

/// Calibration statistics of `model` (a few samples: enough for static scales), made once.
fn stats_for(name: &str, model: &Path, samples: usize, seq: usize) -> PathBuf {
    cached(
        shared_work_dir().join(format!("{name}-tflite.calib")),
        |tmp| {
            run_ok(
                edgepack()
                    .arg("calibrate")
                    .arg(model)
                    .args(["--samples", &samples.to_string()])
                    .args(["--seq-len", &seq.to_string()])
                    .arg("-o")
                    .arg(tmp),
            );
        },
    )
}

/// Extra arguments of a precision: int8 takes statistics and SmoothQuant (α 0.5, or the
/// per-layer search for `int8-auto`).
fn precision_args(precision: &str, stats: &Path) -> Vec<String> {
    let (precision, alpha) = match precision {
        "int8-auto" => ("int8", "auto"),
        p => (p, "0.5"),
    };
    let mut v = vec!["--precision".to_string(), precision.to_string()];
    if precision.starts_with("int8") {
        v.extend(["--stats".into(), stats.display().to_string()]);
        v.extend(["--smooth".into(), alpha.into()]);
    }
    v
}

/// SmolLM2 exported once per build for a precision.
fn smollm2_tflite(precision: &str) -> PathBuf {
    let gguf = smollm2_gguf();
    let stats = stats_for("smollm2", &gguf, 4, 128);
    cached(
        shared_work_dir().join(format!("smollm2-s128-p32-{precision}.tflite")),
        |tmp| {
            run_ok(
                edgepack()
                    .args(["export", "tflite"])
                    .arg(&gguf)
                    .args(precision_args(precision, &stats))
                    .args(["--seq-len", "128", "--prefill-len", "32", "-o"])
                    .arg(tmp),
            );
        },
    )
}

/// LiteRT's logits for `ids`: prefill of the first `prompt` tokens, then one decode call per
/// remaining token.
fn litert_logits(model: &Path, ids: &[u32], prompt: usize) -> Vec<f32> {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("logits.f32");
    let ids_json = serde_json::to_string(ids).unwrap();
    let meta = oracle(
        "tflite_run.py",
        &[&"logits", &model, &ids_json, &prompt.to_string(), &out],
    );
    let v: Vec<f32> = std::fs::read(&out)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(meta["shape"][0].as_u64(), Some(ids.len() as u64), "{meta}");
    v
}

fn reference_logits(model: &Path, ids: &[u32]) -> Vec<f32> {
    let m = import::open(model).unwrap();
    let fwd = Forward::new(&m).unwrap();
    fwd.forward(ids, &mut fwd.cache(ids.len())).unwrap()
}

/// Mean over positions of KL(p ‖ q), p from `float` logits and q from `other`.
fn mean_kl(float: &[f32], other: &[f32], vocab: usize) -> f64 {
    kl_and_top1(float, other, vocab).0
}

#[test]
fn every_precision_loads_in_litert_with_generative_signatures_names_and_static_shapes() {
    let dir = tiny("llama-tied-f32", Tiny::llama());
    let work = tempfile::tempdir().unwrap();
    for precision in ["fp32", "fp16", "dynamic-int8", "int8", "int8-a16"] {
        let out = work.path().join(format!("{precision}.tflite"));
        let report = export(&dir, precision, 32, 8, &out);
        assert_eq!(report["precision"], precision, "{report}");
        let info = oracle("tflite_run.py", &[&"inspect", &out]);
        assert_eq!(info["identifier"], "TFL3", "{precision}");
        assert_eq!(info["version"], 3, "{precision}");
        let sigs = info["signatures"].as_object().unwrap();
        let mut keys: Vec<&String> = sigs.keys().collect();
        keys.sort();
        assert_eq!(keys, ["decode", "prefill_8"], "{precision}");
        for (key, t) in [("prefill_8", 8), ("decode", 1)] {
            let s = &sigs[key];
            assert_eq!(s["inputs"]["tokens"]["shape"], serde_json::json!([1, t]));
            assert_eq!(s["inputs"]["tokens"]["dtype"], "int32");
            assert_eq!(s["inputs"]["input_pos"]["shape"], serde_json::json!([t]));
            assert_eq!(
                s["outputs"]["logits"]["shape"],
                serde_json::json!([1, t, 49152])
            );
            for l in 0..2 {
                for kind in ["k", "v"] {
                    let name = format!("kv_cache_{kind}_{l}");
                    // BTNH: [batch, max_seq_len, kv_heads, head_dim].
                    let want = serde_json::json!([1, 32, 2, 64]);
                    assert_eq!(
                        s["inputs"][&name]["shape"], want,
                        "{precision} {key} {name}"
                    );
                    assert_eq!(
                        s["outputs"][&name]["shape"], want,
                        "{precision} {key} {name}"
                    );
                }
            }
        }
        // DYNAMIC_UPDATE_SLICE (151) is past the byte field: 127 there, the code in builtin_code.
        let codes = info["operator_codes"].as_array().unwrap();
        assert!(
            codes
                .iter()
                .any(|c| c["builtin"] == 151 && c["deprecated"] == 127),
            "{codes:?}"
        );
        let meta: Vec<&str> = info["metadata"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap())
            .collect();
        for m in ["tokenizer.json", "tokenizer_config.json", "edgepack.json"] {
            assert!(meta.contains(&m), "{precision}: metadata {meta:?}");
        }
        assert_eq!(info["edgepack"]["seq_len"], 32);
        // Both signatures run, chained through the cache.
        let ids = token_ids(11, 49152);
        let got = litert_logits(&out, &ids, 8);
        assert!(got.iter().all(|v| v.is_finite()), "{precision}");
    }
}

#[test]
fn smooth_auto_searches_one_alpha_per_layer_and_exports_what_those_alphas_give() {
    let work = tempfile::tempdir().unwrap();
    let dir = tiny("llama-tied-f32", Tiny::llama());
    let auto = work.path().join("auto.tflite");
    let r = export(&dir, "int8-auto", 32, 8, &auto);
    let alphas: Vec<String> = r["smooth_alpha"]
        .as_array()
        .expect("auto reports one alpha per layer")
        .iter()
        .map(|a| {
            let a = a.as_f64().unwrap();
            assert!((0.0..=1.0).contains(&a), "alpha {a}");
            a.to_string()
        })
        .collect();
    let config: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        alphas.len() as u64,
        config["num_hidden_layers"].as_u64().unwrap()
    );
    // The same alphas given by hand write the same bytes.
    let stats = stats_for("tiny-llama", &dir, 2, 32);
    let given = work.path().join("given.tflite");
    let o = run_ok(
        edgepack()
            .args(["--json", "export", "tflite"])
            .arg(&dir)
            .args(["--precision", "int8", "--stats"])
            .arg(&stats)
            .args(["--smooth", &alphas.join(",")])
            .args(["--seq-len", "32", "--prefill-len", "8", "-o"])
            .arg(&given),
    );
    let r2: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r2["smooth_alpha"], r["smooth_alpha"]);
    assert!(
        std::fs::read(&auto).unwrap() == std::fs::read(&given).unwrap(),
        "--smooth auto and its own alphas given by hand wrote different files"
    );
}

#[test]
fn fp32_matches_the_reference_forward_pass_on_tiny_llama_qwen2_and_phi3() {
    let work = tempfile::tempdir().unwrap();
    for (name, spec) in [
        ("llama-tied-f32", Tiny::llama()),
        ("qwen2-untied-f32", Tiny::qwen2()),
        ("phi3-untied-spm-f32", Tiny::phi3()),
    ] {
        let dir = tiny(name, spec);
        let out = work.path().join(format!("{name}.tflite"));
        export(&dir, "fp32", 32, 8, &out);
        // Two prefill calls (8 + 4 tokens) then four decode steps.
        let ids = token_ids(16, 520);
        let want = reference_logits(&dir, &ids);
        let got = litert_logits(&out, &ids, 12);
        let d = max_abs_diff(&got, &want);
        eprintln!("{name}: LiteRT fp32 vs reference max abs diff {d:e}");
        assert!(d < FP32_MAX_ABS_DIFF, "{name}: max abs diff {d}");
    }
}

/// Mean KL of the full-integer graphs against the reference on the tiny random models (their
/// logits are nearly flat: ~5e-4 for int8, ~2e-4 for int8-a16 in our runs).
const TINY_FULL_INTEGER_MAX_MEAN_KL: f64 = 5e-3;

#[test]
fn full_integer_graphs_follow_the_reference_on_tiny_llama_qwen2_and_phi3() {
    // Qwen2 brings q/k/v biases (int32 / int64 in the integer graph), Phi-3 the fused qkv
    // and gate_up projections; the Phi-3 toy uses SmolLM2's BPE, as calibration tokenizes.
    let work = tempfile::tempdir().unwrap();
    let ids = token_ids(14, 520);
    for (name, spec) in [
        ("llama-tied-f32", Tiny::llama()),
        ("qwen2-untied-f32", Tiny::qwen2()),
        (
            "phi3-untied-bpe-f32",
            Tiny {
                spm: false,
                vocab: 49152,
                ..Tiny::phi3()
            },
        ),
    ] {
        let dir = tiny(name, spec);
        let stats = stats_for(&format!("tiny-{name}"), &dir, 2, 32);
        let want = reference_logits(&dir, &ids);
        let vocab = want.len() / ids.len();
        for precision in ["int8", "int8-a16"] {
            let out = work.path().join(format!("{name}-{precision}.tflite"));
            run_ok(
                edgepack()
                    .args(["export", "tflite"])
                    .arg(&dir)
                    .args(precision_args(precision, &stats))
                    .args(["--seq-len", "32", "--prefill-len", "8", "-o"])
                    .arg(&out),
            );
            let got = litert_logits(&out, &ids, 8);
            let kl = mean_kl(&want, &got, vocab);
            eprintln!("{name} {precision}: mean KL vs reference {kl:.3e}");
            assert!(
                kl < TINY_FULL_INTEGER_MAX_MEAN_KL,
                "{name} {precision}: mean KL {kl}"
            );
        }
    }
}

#[test]
fn smollm2_fp32_logits_match_the_reference_over_a_prompt_and_decode_steps() {
    let gguf = smollm2_gguf();
    let model = smollm2_tflite("fp32");
    let ids = token_ids(32, 49152);
    let prompt = 26;
    let want = reference_logits(&gguf, &ids);
    let got = litert_logits(&model, &ids, prompt);
    let d = max_abs_diff(&got, &want);
    eprintln!(
        "SmolLM2 fp32: {} prompt + {} decode positions, max abs diff {d:e}",
        prompt,
        ids.len() - prompt
    );
    assert!(d < FP32_MAX_ABS_DIFF, "max abs diff {d}");
}

#[test]
fn smollm2_fp16_dynamic_int8_and_static_int8_report_kl_against_float() {
    let gguf = smollm2_gguf();
    let ids = token_ids(40, 49152);
    let prompt = 32;
    let float = reference_logits(&gguf, &ids);
    for (precision, bound) in [
        ("fp16", FP16_MAX_MEAN_KL),
        ("dynamic-int8", INT8_MAX_MEAN_KL),
        ("int8", INT8_A8_MAX_MEAN_KL),
        ("int8-auto", INT8_A8_MAX_MEAN_KL),
        ("int8-a16", INT8_A16_MAX_MEAN_KL),
    ] {
        let got = litert_logits(&smollm2_tflite(precision), &ids, prompt);
        let kl = mean_kl(&float, &got, 49152);
        let top1 = float
            .chunks(49152)
            .zip(got.chunks(49152))
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count();
        eprintln!(
            "SmolLM2 {precision}: mean KL vs float {kl:.3e}, top-1 agreement {top1}/{}",
            ids.len()
        );
        assert!(kl < bound, "{precision}: mean KL {kl} (bound {bound})");
    }
}

/// Logits of SmolLM2 over 40 tokens from the float model, from LiteRT running its TFLite
/// export of `precision` (a 32-token prefill, then one decode call per token), and from the
/// host forward pass turned by `simulate` into what that export computes.
fn replayed(
    precision: &str,
    simulate: fn(&mut Forward) -> edgepack_converters::Result<()>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let gguf = smollm2_gguf();
    let ids = token_ids(40, 49152);
    let float = reference_logits(&gguf, &ids);
    let litert = litert_logits(&smollm2_tflite(precision), &ids, 32);
    let mut f = Forward::new(&import::open(&gguf).unwrap()).unwrap();
    simulate(&mut f).unwrap();
    let host = f.forward(&ids, &mut f.cache(ids.len())).unwrap();
    (float, litert, host)
}

#[test]
fn fp16_exports_score_on_the_host_as_litert_runs_them() {
    // A recipe scores a TFLite fp16 output with the host forward pass over the float weights
    // rounded to f16 (the export's float16 buffers, widened back by DEQUANTIZE). LiteRT's run
    // of the export and that replay must give the same figures: their difference is op-order
    // rounding in f32, far below what the f16 weights themselves move.
    let (float, litert, host) = replayed("fp16", Forward::simulate_half_weights);
    let (kl_litert, top1_litert) = kl_and_top1(&float, &litert, 49152);
    let (kl_host, top1_host) = kl_and_top1(&float, &host, 49152);
    let (kl_between, _) = kl_and_top1(&litert, &host, 49152);
    eprintln!(
        "fp16: KL vs float: LiteRT {kl_litert:.3e} (top-1 {top1_litert:.3}), host {kl_host:.3e} (top-1 {top1_host:.3}); between them {kl_between:.3e}"
    );
    assert!(kl_host > 0.0, "the f16 rounding moved nothing");
    assert!(
        (kl_host - kl_litert).abs() < 0.1 * kl_litert,
        "the host scores KL {kl_host}, LiteRT runs {kl_litert}"
    );
    assert!(
        kl_between < 0.1 * kl_litert,
        "host and LiteRT differ by KL {kl_between}, as much as the f16 weights move ({kl_litert})"
    );
    assert_eq!(top1_host, top1_litert);
}

#[test]
fn dynamic_int8_exports_score_on_the_host_as_litert_runs_them() {
    // A recipe scores a TFLite dynamic-int8 output with the host forward pass over the
    // export's own int8 weights (embedding, linears, head), each linear's input quantized per
    // token over its own range as the hybrid FULLY_CONNECTED does. Op for op the replay is
    // LiteRT's arithmetic: the first position, which attends only to itself, comes out equal.
    // Later positions pick up the rare inputs that float rounding puts on the other side of
    // an int8 step, on channels whose outliers make a step large, and attention spreads them:
    // the two runs then differ position by position like two draws of the same quantization
    // noise, so what must agree is the noise's size, the figure a gate reads.
    let (float, litert, host) = replayed("dynamic-int8", Forward::simulate_hybrid_int8);
    let v = 49152;
    let (kl_litert, top1_litert) = kl_and_top1(&float, &litert, v);
    let (kl_host, top1_host) = kl_and_top1(&float, &host, v);
    let (kl_between, _) = kl_and_top1(&litert, &host, v);
    let (first_between, _) = kl_and_top1(&litert[..v], &host[..v], v);
    let (first_float, _) = kl_and_top1(&float[..v], &litert[..v], v);
    eprintln!(
        "dynamic-int8: KL vs float: LiteRT {kl_litert:.3e} (top-1 {top1_litert:.3}), host {kl_host:.3e} (top-1 {top1_host:.3}); between them {kl_between:.3e}; first position: {first_between:.3e} between, {first_float:.3e} from float"
    );
    assert!(
        first_between < 1e-6 * first_float.max(1e-3),
        "the first position differs by KL {first_between}: the replay is not LiteRT's arithmetic"
    );
    assert!(
        (kl_host - kl_litert).abs() < 0.15 * kl_litert,
        "the host scores KL {kl_host}, LiteRT runs {kl_litert}"
    );
    assert!(
        (top1_host - top1_litert).abs() <= 0.05,
        "top-1 agreement: host {top1_host}, LiteRT {top1_litert}"
    );
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0
}

#[test]
fn greedy_chat_from_the_model_metadata_says_paris_for_fp32_and_dynamic_int8() {
    for precision in ["fp32", "dynamic-int8"] {
        let r = oracle(
            "tflite_run.py",
            &[
                &"chat",
                &smollm2_tflite(precision),
                &"What is the capital of France?",
                &"24",
            ],
        );
        let text = r["text"].as_str().unwrap();
        eprintln!("{precision}: {text:?}");
        assert!(text.contains("Paris"), "{precision}: {r}");
    }
}

/// Mean KL against float over the chat prompt of the greedy test; SmolLM2's first answer token
/// is a near tie in float ("The" 0.152, "L" 0.140), so a greedy answer is no measure of a
/// quantization: any variant may tip it either way.
const CHAT_INT8_A16_MAX_MEAN_KL: f64 = 0.05;
const CHAT_INT8_MAX_MEAN_KL: f64 = 0.5;

#[test]
fn full_integer_graphs_follow_float_over_the_chat_prompt() {
    use edgepack_converters::model::chat::{Message, Prompter};
    let gguf = smollm2_gguf();
    let m = import::open(&gguf).unwrap();
    let ids = Prompter::new(&m)
        .unwrap()
        .chat(&[Message::user("What is the capital of France?")])
        .unwrap();
    let float = reference_logits(&gguf, &ids);
    for (precision, bound) in [
        ("dynamic-int8", f64::INFINITY),
        ("int8-a16", CHAT_INT8_A16_MAX_MEAN_KL),
        ("int8", CHAT_INT8_MAX_MEAN_KL),
    ] {
        let model = smollm2_tflite(precision);
        let got = litert_logits(&model, &ids, ids.len());
        let kl = mean_kl(&float, &got, 49152);
        let r = oracle(
            "tflite_run.py",
            &[&"chat", &model, &"What is the capital of France?", &"24"],
        );
        eprintln!(
            "SmolLM2 {precision}: chat prompt ({} tokens) mean KL vs float {kl:.3e}; greedy answer {:?}",
            ids.len(),
            r["text"]
        );
        assert!(
            kl < bound,
            "{precision}: chat-prompt KL {kl} (bound {bound})"
        );
    }
}

/// The operators a `--target` report sends back to the CPU.
fn fallback_ops(report: &Value) -> Vec<&str> {
    report["cpu_fallbacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["op"].as_str().unwrap())
        .collect()
}

#[test]
fn target_report_lists_npu_fallbacks_before_writing() {
    let dir = tiny("llama-tied-f32", Tiny::llama());
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("m.tflite");
    let o = run_ok(
        edgepack()
            .args(["--json", "export", "tflite"])
            .arg(&dir)
            .args([
                "--precision",
                "dynamic-int8",
                "--seq-len",
                "16",
                "--target",
                "imx93",
            ])
            .arg("-o")
            .arg(&out),
    );
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let t = &r["target"];
    assert_eq!(t["board"], "imx93");
    let ops = fallback_ops(t);
    // Vela's U65 list has neither; facts/tflite_targets.md §3.4.
    assert!(ops.contains(&"BATCH_MATMUL"), "{t}");
    assert!(ops.contains(&"DYNAMIC_UPDATE_SLICE"), "{t}");
    assert!(t["on_npu"].as_u64().unwrap() < t["operators"].as_u64().unwrap());
    // Text mode prints the report on stderr before the file is written.
    let o = run_ok(
        edgepack()
            .args(["export", "tflite"])
            .arg(&dir)
            .args(["--seq-len", "16", "--target", "imx8mp", "-o"])
            .arg(work.path().join("t.tflite")),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("CPU fallbacks") && err.contains("BATCH_MATMUL"),
        "{err}"
    );
}

#[test]
fn full_integer_graphs_keep_every_operator_but_the_final_dequantize_on_an_integer_npu() {
    // The graph's structure does not depend on the weights: the tiny model shows it quickly.
    let dir = tiny("llama-tied-f32", Tiny::llama());
    let stats = stats_for("tiny-llama", &dir, 2, 32);
    let work = tempfile::tempdir().unwrap();
    for precision in ["int8", "int8-a16"] {
        let out = work.path().join(format!("{precision}.tflite"));
        let o = run_ok(
            edgepack()
                .args(["--json", "export", "tflite"])
                .arg(&dir)
                .args(precision_args(precision, &stats))
                .args(["--seq-len", "32", "--prefill-len", "8", "--target", "imx95"])
                .arg("-o")
                .arg(&out),
        );
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        let t = &r["target"];
        // The Neutron profile keeps only CUSTOM on the CPU and takes integer tensors: every
        // operator runs there except the DEQUANTIZE that hands out float logits, one per
        // signature.
        assert_eq!(fallback_ops(t), ["DEQUANTIZE"], "{precision}: {t}");
        assert_eq!(t["cpu_fallbacks"][0]["count"], 2, "{precision}: {t}");
        assert_eq!(
            t["on_npu"].as_u64().unwrap() + 2,
            t["operators"].as_u64().unwrap(),
            "{precision}: {t}"
        );
        // LiteRT sees integer caches and float logits.
        let info = oracle("tflite_run.py", &[&"inspect", &out]);
        let decode = &info["signatures"]["decode"];
        assert_eq!(decode["inputs"]["kv_cache_k_0"]["dtype"], "int16", "{info}");
        assert_eq!(
            decode["outputs"]["kv_cache_v_1"]["dtype"], "int16",
            "{info}"
        );
        assert_eq!(decode["outputs"]["logits"]["dtype"], "float32", "{info}");
    }
}

#[test]
fn a_profile_file_of_ones_own_drives_the_npu_report() {
    let dir = tiny("llama-tied-f32", Tiny::llama());
    let work = tempfile::tempdir().unwrap();
    // imx93 with an NPU that takes only FULLY_CONNECTED and keeps CUSTOM on the CPU.
    let text = std::fs::read_to_string(root().join("targets/profiles/imx93.toml")).unwrap();
    let start = text.find("ops = [").unwrap();
    let end = start + text[start..].find("]\n").unwrap() + 2;
    let text = format!(
        "{}ops = [\"FULLY_CONNECTED\"]\ncpu_ops = [\"CUSTOM\"]\n{}",
        &text[..start],
        &text[end..]
    )
    .replace("name = \"imx93\"", "name = \"my-npu-board\"");
    let profile = work.path().join("my-npu-board.toml");
    std::fs::write(&profile, text).unwrap();
    let o = run_ok(
        edgepack()
            .args(["--json", "export", "tflite"])
            .arg(&dir)
            .args([
                "--precision",
                "dynamic-int8",
                "--seq-len",
                "16",
                "--profile",
            ])
            .arg(&profile)
            .arg("-o")
            .arg(work.path().join("m.tflite")),
    );
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let t = &r["target"];
    assert_eq!(t["board"], "my-npu-board");
    let ops = fallback_ops(t);
    // Everything but FULLY_CONNECTED is off the list; the FCs themselves have float
    // activations in dynamic-int8, so nothing at all runs on this NPU.
    for op in ["ADD", "MUL", "RSQRT", "GATHER", "FULLY_CONNECTED"] {
        assert!(ops.contains(&op), "{op} in {t}");
    }
    assert_eq!(t["on_npu"], 0, "{t}");
    // A board without an NPU says so and writes the model.
    let o = run_ok(
        edgepack()
            .args(["export", "tflite"])
            .arg(&dir)
            .args(["--seq-len", "16", "--target", "rpi5", "-o"])
            .arg(work.path().join("cpu.tflite")),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("rpi5: no NPU takes TFLite"), "{err}");
    assert!(work.path().join("cpu.tflite").is_file());
}

#[test]
fn bad_requests_fail_naming_the_field_and_write_nothing() {
    let dir = tiny("llama-tied-f32", Tiny::llama());
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("bad.tflite");
    let cases: [(&[&str], &str); 6] = [
        (&["--precision", "int3"], "--precision int3"),
        (&["--precision", "int8"], "--precision int8 needs --stats"),
        (&["--smooth", "0.5"], "--smooth needs --stats"),
        (
            &["--seq-len", "16", "--prefill-len", "32"],
            "prefill length 32",
        ),
        (&["--seq-len", "100000"], "max_position_embeddings"),
        (&["--target", "imx7"], "unknown target `imx7`"),
    ];
    for (args, want) in cases {
        let err = run_err(
            edgepack()
                .args(["export", "tflite"])
                .arg(&dir)
                .args(args)
                .arg("-o")
                .arg(&out),
        );
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
    let leftovers: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Statistics without the calibration samples (as older builds wrote them) cannot give
    // the full-integer graph its ranges: the error names the file and the tensor.
    let mut stats = CalibStats::read(&stats_for("tiny-llama", &dir, 2, 32)).unwrap();
    stats.sample_tokens.clear();
    let old = work.path().join("old.calib");
    stats.write(&old).unwrap();
    let err = run_err(
        edgepack()
            .args(["export", "tflite"])
            .arg(&dir)
            .args(["--precision", "int8", "--stats"])
            .arg(&old)
            .arg("-o")
            .arg(&out),
    );
    assert!(
        err.contains("old.calib: __samples__.tokens") && err.contains("edgepack calibrate"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn buffers_placed_beyond_4_gib_load_in_litert_through_64_bit_offsets() {
    use edgepack_converters::export::tflite::schema::{
        layout, BufferDef, BuiltinOp, ModelDef, OperatorDef, Options, SignatureDef, SubGraphDef,
        TensorDef, TensorMap, TensorType,
    };
    use std::io::{Seek, SeekFrom, Write};
    // Buffer 1 is a 4.5 GiB payload no tensor uses; the constant of the ADD lands after it, so
    // its offset needs more than 32 bits. The file is sparse: only the flatbuffer and the
    // constant are written.
    let big: u64 = 9 << 29;
    let tensor = |name: &str, buffer: u32| TensorDef {
        name: name.into(),
        shape: vec![4],
        dtype: TensorType::Float32,
        buffer,
        quantization: None,
    };
    let def = ModelDef {
        description: "add".into(),
        buffers: vec![
            BufferDef::Empty,
            BufferDef::Appended { size: big },
            BufferDef::Appended { size: 16 },
        ],
        subgraphs: vec![SubGraphDef {
            name: "add".into(),
            tensors: vec![tensor("x", 0), tensor("c", 2), tensor("y", 0)],
            inputs: vec![0],
            outputs: vec![2],
            operators: vec![OperatorDef {
                op: BuiltinOp::Add,
                version: 1,
                inputs: vec![0, 1],
                outputs: vec![2],
                options: Options::Add,
            }],
        }],
        metadata: vec![],
        signatures: vec![SignatureDef {
            key: "add".into(),
            subgraph_index: 0,
            inputs: vec![TensorMap {
                name: "x".into(),
                tensor_index: 0,
            }],
            outputs: vec![TensorMap {
                name: "y".into(),
                tensor_index: 2,
            }],
        }],
    };
    let l = layout(&def);
    let (_, c_offset, _) = l.payloads[1];
    assert!(c_offset > u32::MAX as u64, "offset {c_offset}");
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("far.tflite");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&l.flatbuffer).unwrap();
    f.seek(SeekFrom::Start(c_offset)).unwrap();
    let c: [f32; 4] = [10.0, 20.0, 30.0, 40.0];
    let bytes: Vec<u8> = c.iter().flat_map(|v| v.to_le_bytes()).collect();
    f.write_all(&bytes).unwrap();
    f.set_len(l.file_size).unwrap();
    drop(f);
    let r = oracle(
        "tflite_run.py",
        &[&"call", &path, &"add", &r#"{"x": [1, 2, 3, 4]}"#],
    );
    assert_eq!(r["y"], serde_json::json!([11.0, 22.0, 33.0, 44.0]), "{r}");
}

#[test]
fn imx93_bundles_carry_velas_ethos_u65_model_and_its_parsed_report() {
    let gguf = smollm2_gguf();
    let stats = stats_for("smollm2", &gguf, 4, 128);
    let work = tempfile::tempdir().unwrap();
    let out = run_ok(
        edgepack()
            .args(["--json", "bundle"])
            .arg(&gguf)
            .args([
                "--target", "imx93", "--format", "tflite", "--name", "smollm2",
            ])
            .args(precision_args("int8", &stats))
            .args(["--seq-len", "128", "--prefill-len", "32", "--vela"])
            .arg(vela_bin())
            .arg("-o")
            .arg(work.path()),
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("bundle --json");
    let v = &r["vela"];
    eprintln!("{}", serde_json::to_string_pretty(v).unwrap());
    // Vela's own numbers, read from its summary and console, not ours.
    assert_eq!(v["version"], "5.2.0", "{v}");
    assert_eq!(v["accelerator"], "Ethos_U65_256", "{v}");
    let npu = v["npu_operators"].as_u64().unwrap();
    let cpu = v["cpu_operators"].as_u64().unwrap();
    assert!(npu > 0 && cpu > 0, "{v}");
    let fallbacks = v["cpu_fallbacks"].as_array().unwrap();
    let matmul = fallbacks
        .iter()
        .find(|f| f["op"] == "BATCH_MATMUL")
        .expect("attention's BATCH_MATMUL stays on the CPU");
    assert!(!matmul["reason"].as_str().unwrap().is_empty(), "{matmul}");
    for k in ["sram_used_kib", "inference_time_s", "core_clock_hz"] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}: {v}");
    }
    assert!(v["cycles_total"].as_u64().unwrap() >= v["cycles_npu"].as_u64().unwrap());
    assert!(
        v["verdict"]
            .as_str()
            .unwrap()
            .contains(&format!("{cpu} of {} operators stay on the CPU", npu + cpu)),
        "{v}"
    );

    // The compiled model sits beside the plain one, listed and checked like every file.
    let m = &r["manifest"];
    assert_eq!(m["engine"]["delegate"], "ethos-u", "{m}");
    let compiled = m["engine"]["delegate_model"].as_str().unwrap();
    assert!(m["files"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["path"] == compiled));
    let dir = PathBuf::from(r["dir"].as_str().unwrap());
    let codes = oracle("tflite_run.py", &[&"codes", &dir.join(compiled)]);
    assert!(codes["ops"]["ethos-u"].as_u64().unwrap() > 0, "{codes}");
    let plain = oracle(
        "tflite_run.py",
        &[&"codes", &dir.join(m["model"]["file"].as_str().unwrap())],
    );
    assert!(plain["ops"].get("ethos-u").is_none(), "{plain}");
    run_ok(edgepack().arg("verify").arg(r["archive"].as_str().unwrap()));

    // The full-integer model Vela needs takes statistics: refused up front without them.
    let err = run_err(
        edgepack()
            .arg("bundle")
            .arg(&gguf)
            .args([
                "--target",
                "imx93",
                "--format",
                "tflite",
                "--precision",
                "int8",
            ])
            .arg("-o")
            .arg(work.path().join("no-stats")),
    );
    assert!(err.contains("--stats"), "{err}");
}
