//! GGUF import: files written by llama.cpp's own converter and quantizer come into the internal
//! layout with every tensor type dequantized exactly as gguf-py does, Q/K rows restored, and
//! tokenizer and chat template recovered; sharded safetensors written by transformers import
//! like a single file.

use edgepack_tests::fixtures::Tiny;
use edgepack_tests::*;
use safetensors::Dtype;

#[test]
fn every_tensor_type_from_llama_quantize_dequantizes_exactly_like_gguf_py() {
    let work = tempfile::tempdir().unwrap();
    let hf = tiny(
        "llama-untied-bf16",
        Tiny {
            tied: false,
            dtype: Dtype::BF16,
            ..Tiny::llama()
        },
    );
    let f32_gguf = work.path().join("llama-f32.gguf");
    llama_convert(&hf, "f32", &f32_gguf);
    let mut seen = std::collections::BTreeSet::new();
    for name in [
        "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M",
        "Q5_K_M", "Q6_K",
    ] {
        let ftype = llama_ftype(name);
        let q = work.path().join(format!("{name}.gguf"));
        llama_quantize(&f32_gguf, &q, ftype);
        let back = work.path().join(format!("{name}-back-f32.gguf"));
        export_gguf(&q, "F32", &back);
        let r = oracle("gguf_dequant_equal.py", &[&q, &back]);
        assert_eq!(r["max_abs_diff"].as_f64().unwrap(), 0.0, "{name}: {r:#}");
        assert_eq!(r["missing"].as_array().unwrap().len(), 0, "{name}: {r:#}");
        for t in r["types"].as_array().unwrap() {
            seen.insert(t.as_str().unwrap().to_string());
        }
    }
    for t in [
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
        "Q5_K", "Q6_K",
    ] {
        assert!(seen.contains(t), "type {t} was not exercised: {seen:?}");
    }
}

#[test]
fn phi3_gguf_from_llama_cpp_round_trips_through_hf_with_its_sentencepiece_tokenizer() {
    let work = tempfile::tempdir().unwrap();
    let hf = tiny("phi3-untied-spm-f32", Tiny::phi3());
    let theirs = work.path().join("phi3-llama.gguf");
    llama_convert(&hf, "f16", &theirs);
    let back_hf = work.path().join("phi3-hf");
    run_ok(
        edgepack()
            .args(["export", "hf"])
            .arg(&theirs)
            .arg("-o")
            .arg(&back_hf),
    );
    assert!(back_hf.join("tokenizer.model").is_file());
    assert!(back_hf.join("tokenizer.json").is_file());
    let ours = work.path().join("phi3-ours.gguf");
    export_gguf(&back_hf, "F16", &ours);
    let (kv, d) = gguf_diff(&ours, &theirs);
    assert!(kv.is_empty(), "{kv:#?}");
    assert_eq!(d["tensor_diff"].as_array().unwrap().len(), 0, "{d:#}");
}

#[test]
fn sharded_safetensors_from_transformers_import_like_a_single_file() {
    let work = tempfile::tempdir().unwrap();
    let hf = tiny("llama-tied-f32", Tiny::llama());
    let sharded = work.path().join("sharded");
    let r = oracle("hf_reshard.py", &[&hf, &sharded, &"20MB"]);
    assert!(r["shards"].as_array().unwrap().len() >= 2, "{r:#}");
    assert!(sharded.join("model.safetensors.index.json").is_file());
    let a = work.path().join("single.gguf");
    let b = work.path().join("sharded.gguf");
    export_gguf(&hf, "Q8_0", &a);
    export_gguf(&sharded, "Q8_0", &b);
    let d = oracle("gguf_kv_diff.py", &[&b, &a]);
    assert_eq!(d["tensor_diff"].as_array().unwrap().len(), 0, "{d:#}");
}
