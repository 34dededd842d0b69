//! GGUF export checked against llama.cpp's own tools on the same inputs: float exports are
//! byte-identical to `convert_hf_to_gguf.py`, quantized exports pick the same type per tensor as
//! llama-quantize, legacy blocks are byte-identical, and K-quant blocks are compared by bytes
//! and by error.

use edgepack_tests::fixtures::{self, Tiny};
use edgepack_tests::*;
use safetensors::Dtype;

fn variants() -> Vec<(&'static str, Tiny)> {
    vec![
        ("llama-tied-f32", Tiny::llama()),
        (
            "llama-untied-bf16",
            Tiny {
                tied: false,
                dtype: Dtype::BF16,
                ..Tiny::llama()
            },
        ),
        (
            "qwen2-tied-f16",
            Tiny {
                arch: "qwen2",
                dtype: Dtype::F16,
                ..Tiny::llama()
            },
        ),
        ("phi3-untied-spm-f32", Tiny::phi3()),
        (
            "llama-untied-spm-f16",
            Tiny {
                tied: false,
                dtype: Dtype::F16,
                vocab: fixtures::SPM_VOCAB,
                spm: true,
                ..Tiny::llama()
            },
        ),
    ]
}

#[test]
fn float_exports_are_byte_identical_to_llama_cpp_convert_hf_to_gguf() {
    let work = tempfile::tempdir().unwrap();
    let mut pairs = Vec::new();
    let mut peer_jobs = Vec::new();
    for (name, spec) in variants() {
        if spec.arch == "qwen2" {
            // transformers 5 tokenizes any qwen2 model with its own Qwen2Tokenizer pipeline,
            // whose pre-tokenizer hash on this fixture's (SmolLM2) vocabulary is unknown to the
            // converter, so the peer cannot convert it; qwen2 is checked by logits below.
            continue;
        }
        let hf = tiny(name, spec);
        for (quant, outtype) in [("F32", "f32"), ("F16", "f16"), ("BF16", "bf16")] {
            let ours = work.path().join(format!("{name}-{quant}-ours.gguf"));
            let theirs = work.path().join(format!("{name}-{quant}-llama.gguf"));
            export_gguf(&hf, quant, &ours);
            peer_jobs.push((hf.clone(), outtype, theirs.clone()));
            pairs.push((format!("{name} {quant}"), ours, theirs));
        }
    }
    // The peer converts every file in one process.
    llama_convert_many(&peer_jobs);
    for (what, ours, theirs) in &pairs {
        let (kv, d) = gguf_diff(ours, theirs);
        assert!(
            kv.is_empty(),
            "{what}: metadata differs from llama.cpp: {kv:#?}"
        );
        assert_eq!(
            d["tensor_diff"].as_array().unwrap().len(),
            0,
            "{what}: tensors differ from llama.cpp: {:#}",
            d["tensor_diff"]
        );
        let check = oracle("gguf_check.py", &[ours]);
        assert_eq!(check["problems"].as_array().unwrap().len(), 0, "{check:#}");
    }
}

#[test]
fn f32_exports_give_transformers_logits_in_llama_cpp_for_every_architecture() {
    let work = tempfile::tempdir().unwrap();
    for (name, spec) in variants() {
        let hf = tiny(name, spec);
        let ours = work.path().join(format!("{name}.gguf"));
        export_gguf(&hf, "F32", &ours);
        let cmp = oracle("hf_vs_llama.py", &[&hf, &ours]);
        let diff = cmp["max_abs_logit_diff"].as_f64().unwrap();
        assert!(diff < 1e-3, "{name}: llama.cpp vs transformers: {cmp:#}");
        assert_eq!(cmp["top1"].as_f64().unwrap(), 1.0, "{name}: {cmp:#}");
    }
}

#[test]
fn quantized_exports_match_llama_quantize_type_choices_and_blocks() {
    let work = tempfile::tempdir().unwrap();
    let hf = tiny("llama-untied-bf16", variants()[1].1);
    let reference = work.path().join("llama-f32.gguf");
    llama_convert(&hf, "f32", &reference);
    let legacy = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"];
    let mut summary = Vec::new();
    for preset in [
        "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M",
        "Q6_K",
    ] {
        let ftype = llama_ftype(preset);
        let ours = work.path().join(format!("{preset}-ours.gguf"));
        let theirs = work.path().join(format!("{preset}-llama.gguf"));
        export_gguf(&hf, preset, &ours);
        llama_quantize(&reference, &theirs, ftype);
        let d = oracle("gguf_tensor_diff.py", &[&ours, &theirs, &reference]);
        assert_eq!(
            d["type_mismatch"].as_array().unwrap().len(),
            0,
            "{preset}: per-tensor types differ from llama-quantize: {:#}",
            d["type_mismatch"]
        );
        assert_eq!(d["missing"].as_array().unwrap().len(), 0, "{d:#}");
        for (ty, t) in d["by_type"].as_object().unwrap() {
            let blocks = t["blocks"].as_f64().unwrap();
            let same = t["identical_blocks"].as_f64().unwrap();
            if legacy.contains(&ty.as_str()) || ty == "F32" || ty == "F16" {
                assert_eq!(
                    same, blocks,
                    "{preset}: {ty} blocks must be byte-identical: {t:#}"
                );
            } else {
                // K-quants: held to error (facts §3.6), and reported by bytes.
                let ratio = t["rmse_ratio"].as_f64().unwrap_or(1.0);
                assert!(
                    ratio <= 1.0 + 1e-3,
                    "{preset}: {ty} error ratio {ratio} vs llama.cpp"
                );
                summary.push(format!(
                    "{preset} {ty}: {same}/{blocks} blocks identical, RMSE ratio {ratio:.6}"
                ));
            }
        }
    }
    eprintln!(
        "K-quant agreement with llama-quantize:\n{}",
        summary.join("\n")
    );
}
