//! Importance matrices: `edgepack imatrix` writes llama-imatrix's GGUF format (read back by
//! gguf-py), exports weighted by it are byte-identical to llama.cpp's `llama_model_quantize`
//! given the same imatrix, the weighting lowers the error of a real model, and bad inputs are
//! refused naming the file or the tensor.

use std::path::{Path, PathBuf};

use edgepack_converters::calib::imatrix::Imatrix;
use edgepack_tests::fixtures::Tiny;
use edgepack_tests::*;
use safetensors::Dtype;

/// The tiny Llama whose rows divide into 256-element blocks (untied, BF16).
fn tiny_llama() -> PathBuf {
    tiny(
        "llama-untied-bf16",
        Tiny {
            tied: false,
            dtype: Dtype::BF16,
            ..Tiny::llama()
        },
    )
}

/// `edgepack imatrix MODEL [--data DATA] --chunk-size N --chunks K -o OUT`, which must succeed.
fn imatrix(model: &Path, data: Option<&Path>, chunk_size: usize, chunks: usize, out: &Path) {
    let mut cmd = edgepack();
    cmd.arg("imatrix").arg(model);
    if let Some(d) = data {
        cmd.arg("--data").arg(d);
    }
    cmd.args([
        "--chunk-size",
        &chunk_size.to_string(),
        "--chunks",
        &chunks.to_string(),
        "-o",
    ])
    .arg(out);
    run_ok(&mut cmd);
}

fn export_weighted(model: &Path, quant: &str, imatrix: &Path, out: &Path) {
    run_ok(
        edgepack()
            .args(["export", "gguf"])
            .arg(model)
            .args(["--quant", quant, "--imatrix"])
            .arg(imatrix)
            .arg("-o")
            .arg(out),
    );
}

#[test]
fn imatrix_weighted_exports_are_byte_identical_to_llama_quantize_with_the_same_imatrix() {
    let work = tempfile::tempdir().unwrap();
    let hf = tiny_llama();
    let im = work.path().join("imatrix.gguf");
    imatrix(&hf, None, 128, 4, &im);
    let reference = work.path().join("llama-f32.gguf");
    llama_convert(&hf, "f32", &reference);
    let legacy = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"];
    let mut summary = Vec::new();
    for preset in [
        "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K",
    ] {
        let ftype = llama_ftype(preset);
        let ours = work.path().join(format!("{preset}-ours.gguf"));
        let theirs = work.path().join(format!("{preset}-llama.gguf"));
        export_weighted(&hf, preset, &im, &ours);
        let q = oracle(
            "llama_quantize_imatrix.py",
            &[&reference, &theirs, &ftype.to_string(), &im],
        );
        assert_eq!(q["entries"], 14, "{q}");
        let d = oracle("gguf_tensor_diff.py", &[&ours, &theirs, &reference]);
        assert_eq!(
            d["type_mismatch"].as_array().unwrap().len(),
            0,
            "{preset}: per-tensor types differ from llama-quantize: {:#}",
            d["type_mismatch"]
        );
        assert_eq!(d["missing"].as_array().unwrap().len(), 0, "{d:#}");
        for (ty, t) in d["by_type"].as_object().unwrap() {
            let blocks = t["blocks"].as_u64().unwrap();
            let same = t["identical_blocks"].as_u64().unwrap();
            let ratio = t["rmse_ratio"].as_f64().unwrap_or(1.0);
            summary.push(format!(
                "{preset} {ty}: {same}/{blocks} blocks identical, RMSE ratio {ratio:.6}"
            ));
            if legacy.contains(&ty.as_str()) {
                assert_eq!(
                    same, blocks,
                    "{preset}: {ty} blocks must be identical: {t:#}"
                );
            } else if same != blocks {
                // K-quant bytes may differ on an FMA build of llama.cpp (facts §3.6); then the
                // error must be no worse than llama.cpp's.
                assert!(ratio <= 1.0 + 1e-3, "{preset}: {ty}: {t:#}");
            }
        }
        // The imatrix must change the result, or identity proves nothing about weighting.
        let plain = work.path().join(format!("{preset}-plain.gguf"));
        export_gguf(&hf, preset, &plain);
        let p = oracle("gguf_tensor_diff.py", &[&ours, &plain]);
        let (blocks, same) = (
            p["blocks"].as_u64().unwrap(),
            p["identical_blocks"].as_u64().unwrap(),
        );
        assert!(
            same < blocks,
            "{preset}: the weighted export equals the unweighted one: {p}"
        );
    }
    eprintln!("{}", summary.join("\n"));
}

#[test]
fn imatrix_file_round_trips_and_reads_back_in_gguf_py() {
    let work = tempfile::tempdir().unwrap();
    let hf = tiny_llama();
    let data = work.path().join("calib.jsonl");
    let corpus = std::fs::read_to_string(root().join("recipes/calibration/default.txt")).unwrap();
    let lines: Vec<String> = corpus
        .split("\n\n")
        .map(|p| serde_json::json!({ "text": p }).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = work.path().join("imatrix.gguf");
    imatrix(&hf, Some(&data), 64, 3, &out);

    let ours = Imatrix::read(&out).unwrap();
    let r = oracle("imatrix_read.py", &[&out]);
    let keys = &r["keys"];
    assert_eq!(keys["general.type"], "imatrix", "{keys:#}");
    assert!(keys.get("general.architecture").is_none(), "{keys:#}");
    assert_eq!(keys["imatrix.chunk_count"], 3, "{keys:#}");
    assert_eq!(keys["imatrix.chunk_size"], 64, "{keys:#}");
    assert_eq!(
        keys["imatrix.datasets"],
        serde_json::json!([data.display().to_string()])
    );
    // Every matmul weight of both blocks, nothing else: no output or embedding entry.
    let mut want = Vec::new();
    for l in 0..2 {
        for w in [
            "attn_k",
            "attn_output",
            "attn_q",
            "attn_v",
            "ffn_down",
            "ffn_gate",
            "ffn_up",
        ] {
            let ne0 = if w == "ffn_down" { 512 } else { 256 };
            let name = format!("blk.{l}.{w}.weight");
            want.push(serde_json::json!({"name": format!("{name}.in_sum2"), "type": "F32", "shape": [ne0, 1]}));
            want.push(serde_json::json!({"name": format!("{name}.counts"), "type": "F32", "shape": [1, 1]}));
        }
    }
    assert_eq!(r["tensors"], serde_json::json!(want));
    assert_eq!(ours.entries.len(), 14);
    for (name, e) in &ours.entries {
        let g = &r["weights"][name];
        // One count per token row: 3 chunks of 64.
        assert_eq!(e.counts, [192], "{name}");
        assert_eq!(g["counts"], serde_json::json!([192.0]), "{name}");
        let sum: f64 = e.sums.iter().map(|&v| v as f64).sum();
        assert!(
            (g["sum"].as_f64().unwrap() - sum).abs() <= 1e-9 * sum.abs(),
            "{name}"
        );
        assert!(e.sums.iter().all(|&v| v > 0.0), "{name}");
    }
    // Written again, the file is the same bytes.
    let again = work.path().join("again.gguf");
    ours.write_gguf(&again).unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&out).unwrap());
}

#[test]
fn q4_k_m_with_imatrix_has_lower_kl_than_without_on_smollm2() {
    let work = tempfile::tempdir().unwrap();
    let hf = smollm2_hf();
    let im = work.path().join("imatrix.gguf");
    imatrix(&hf, None, 256, 4, &im);
    let f16 = work.path().join("f16.gguf");
    let plain = work.path().join("q4_k_m.gguf");
    let weighted = work.path().join("q4_k_m-imatrix.gguf");
    export_gguf(&hf, "F16", &f16);
    export_gguf(&hf, "Q4_K_M", &plain);
    export_weighted(&hf, "Q4_K_M", &im, &weighted);
    let without = oracle("llama_compare.py", &[&f16, &plain]);
    let with = oracle("llama_compare.py", &[&f16, &weighted]);
    let (kl_without, kl_with) = (
        without["mean_kl"].as_f64().unwrap(),
        with["mean_kl"].as_f64().unwrap(),
    );
    eprintln!("SmolLM2 Q4_K_M mean KL vs F16: without imatrix {kl_without:.6}, with {kl_with:.6}");
    eprintln!("without: {without}\nwith: {with}");
    assert!(kl_with < kl_without, "with {with:#}\nwithout {without:#}");
    // The file records which imatrix shaped it, as llama-quantize does.
    let kv = oracle("gguf_check.py", &[&weighted])["kv"].clone();
    assert_eq!(
        kv["quantize.imatrix.entries_count"]["type"], "UINT32",
        "{kv:#}"
    );
    assert_eq!(kv["quantize.imatrix.chunks_count"]["value"], 4, "{kv:#}");
    assert_eq!(
        kv["quantize.imatrix.dataset"]["value"],
        "edgepack:recipes/calibration/default.txt"
    );
}

#[test]
fn empty_and_non_utf8_data_and_an_imatrix_of_another_model_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let hf = tiny_llama();
    let out = work.path().join("imatrix.gguf");
    let run = |data: &Path| {
        run_err(
            edgepack()
                .arg("imatrix")
                .arg(&hf)
                .arg("--data")
                .arg(data)
                .arg("-o")
                .arg(&out),
        )
    };
    let empty = work.path().join("empty.txt");
    std::fs::write(&empty, "  \n\n").unwrap();
    let err = run(&empty);
    assert!(err.contains(&empty.display().to_string()), "{err}");
    assert!(err.contains("empty"), "{err}");
    let latin1 = work.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9 au lait, cr\xe8me br\xfbl\xe9e").unwrap();
    let err = run(&latin1);
    assert!(err.contains(&latin1.display().to_string()), "{err}");
    assert!(err.contains("not UTF-8"), "{err}");
    let short = work.path().join("short.txt");
    std::fs::write(&short, "Only a few words.").unwrap();
    let err = run(&short);
    assert!(err.contains(&short.display().to_string()), "{err}");
    assert!(err.contains("fewer than one chunk"), "{err}");
    assert!(!out.exists());

    // SmolLM2's imatrix on the tiny model: refused naming a tensor and both shapes.
    let smol = work.path().join("smollm2-imatrix.gguf");
    imatrix(&smollm2_hf(), None, 64, 1, &smol);
    let q = work.path().join("q.gguf");
    let err = run_err(
        edgepack()
            .args(["export", "gguf"])
            .arg(&hf)
            .args(["--quant", "Q4_K_M", "--imatrix"])
            .arg(&smol)
            .arg("-o")
            .arg(&q),
    );
    assert!(err.contains("blk.0.attn_k.weight"), "{err}");
    assert!(
        err.contains("{576, 1}") && err.contains("[256, 128]"),
        "{err}"
    );
    assert!(err.contains("another model"), "{err}");
    assert!(!q.exists());
}
