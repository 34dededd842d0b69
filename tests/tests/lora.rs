//! LoRA: edgepack's merge against PEFT's own `merge_and_unload` on adapters PEFT itself made,
//! and the GGUF adapter applied by llama.cpp at run time against edgepack's merged export.

use std::path::{Path, PathBuf};

use edgepack_tests::fixtures::Tiny;
use edgepack_tests::*;

/// PEFT makes an adapter (`variant`) on `base` and its own merged reference.
fn peft_make(base: &Path, work: &Path, variant: &str, seed: u32) -> (PathBuf, PathBuf) {
    let adapter = work.join(format!("adapter-{variant}-{seed}"));
    let merged = work.join(format!("peft-merged-{variant}-{seed}"));
    oracle(
        "peft_make.py",
        &[&base, &adapter, &merged, &variant, &seed.to_string()],
    );
    (adapter, merged)
}

fn merge(base: &Path, loras: &[String], out: &Path) {
    let mut cmd = edgepack();
    cmd.arg("merge").arg(base);
    for l in loras {
        cmd.args(["--lora", l]);
    }
    cmd.args(["--dtype", "f32", "-o"]).arg(out);
    run_ok(&mut cmd);
}

#[test]
fn merge_agrees_with_peft_merge_and_unload_for_every_adapter_kind() {
    let work = tempfile::tempdir().unwrap();
    let llama = tiny("llama-tied-f32", Tiny::llama());
    let qwen = tiny(
        "qwen2-untied-f32",
        Tiny {
            arch: "qwen2",
            tied: false,
            ..Tiny::llama()
        },
    );
    let cases = [
        (&llama, "plain"),
        (&llama, "rslora"),
        (&llama, "dora"),
        (&llama, "patterns"),
        (&llama, "all_linear"),
        (&llama, "layers"),
        (&llama, "regex"),
        (&llama, "embed"),
        (&qwen, "modules_to_save"),
        (&qwen, "all_linear"),
    ];
    // PEFT makes every adapter and its merge_and_unload() in one process, and transformers
    // compares every pair in one more: torch is imported twice, not twenty times.
    let mut jobs: Vec<PathBuf> = Vec::new();
    let mut pairs: Vec<PathBuf> = Vec::new();
    let mut merges = Vec::new();
    for (i, (base, variant)) in cases.iter().enumerate() {
        let adapter = work.path().join(format!("adapter-{i}-{variant}"));
        let reference = work.path().join(format!("peft-merged-{i}-{variant}"));
        let ours = work.path().join(format!("ours-{i}-{variant}"));
        jobs.extend([
            base.to_path_buf(),
            adapter.clone(),
            reference.clone(),
            PathBuf::from(variant),
            PathBuf::from("0"),
        ]);
        merges.push((*base, adapter, ours.clone()));
        pairs.extend([ours, reference]);
    }
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"--many"];
    args.extend(jobs.iter().map(|j| j as &dyn AsRef<std::ffi::OsStr>));
    oracle("peft_make.py", &args);
    for (base, adapter, ours) in &merges {
        merge(base, &[adapter.display().to_string()], ours);
    }
    let args: Vec<&dyn AsRef<std::ffi::OsStr>> = pairs
        .iter()
        .map(|p| p as &dyn AsRef<std::ffi::OsStr>)
        .collect();
    let cmps = oracle("hf_compare.py", &args);
    for ((_, variant), cmp) in cases.iter().zip(cmps.as_array().unwrap()) {
        assert_eq!(
            cmp["missing"].as_array().unwrap().len(),
            0,
            "{variant}: {cmp:#}"
        );
        let err = cmp["max_rel_err"].as_f64().unwrap();
        assert!(
            err <= 1e-5,
            "{variant}: max relative error {err} vs PEFT: {cmp:#}"
        );
    }
}

#[test]
fn weighted_adapters_merge_as_the_weighted_sum_of_their_updates() {
    let work = tempfile::tempdir().unwrap();
    let base = tiny("llama-tied-f32", Tiny::llama());
    let (a, ref_a) = peft_make(&base, work.path(), "plain", 1);
    let (b, ref_b) = peft_make(&base, work.path(), "all_linear", 2);
    let ours = work.path().join("ours-ab");
    merge(
        &base,
        &[
            format!("{}:1.0", a.display()),
            format!("{}:0.5", b.display()),
        ],
        &ours,
    );
    let r = oracle(
        "hf_lincomb.py",
        &[&ours, &base, &ref_a, &ref_b, &"1.0", &"0.5"],
    );
    assert!(r["max_rel_err"].as_f64().unwrap() <= 1e-5, "{r:#}");
}

#[test]
fn gguf_lora_applied_by_llama_cpp_agrees_with_the_merged_export() {
    let work = tempfile::tempdir().unwrap();
    let base = smollm2_hf();
    let base_gguf = work.path().join("base-f32.gguf");
    export_gguf(&base, "F32", &base_gguf);
    for variant in ["all_linear", "patterns"] {
        let (adapter, _) = peft_make(&base, work.path(), variant, 3);
        let merged = work.path().join(format!("merged-{variant}.gguf"));
        run_ok(
            edgepack()
                .args(["export", "gguf"])
                .arg(&base)
                .arg("--lora")
                .arg(&adapter)
                .args(["--quant", "F32", "-o"])
                .arg(&merged),
        );
        let lora = work.path().join(format!("lora-{variant}.gguf"));
        run_ok(
            edgepack()
                .args(["export", "gguf-lora"])
                .arg(&adapter)
                .arg("--base")
                .arg(&base)
                .arg("-o")
                .arg(&lora),
        );
        let cmp = oracle(
            "llama_compare.py",
            &[&merged, &base_gguf, &"--lora-b", &lora],
        );
        let (top1, kl) = (
            cmp["top1"].as_f64().unwrap(),
            cmp["mean_kl"].as_f64().unwrap(),
        );
        eprintln!("{variant}: merged vs runtime LoRA: {cmp}");
        assert!(top1 >= 0.99 && kl < 1e-3, "{variant}: {cmp:#}");
        // The adapter must actually change the model, or the check above proves nothing.
        let plain = oracle("llama_compare.py", &[&merged, &base_gguf]);
        assert!(plain["mean_kl"].as_f64().unwrap() > 10.0 * kl, "{plain:#}");
    }
}

#[test]
fn dora_and_modules_to_save_adapters_are_refused_as_gguf_lora_with_a_hint() {
    let work = tempfile::tempdir().unwrap();
    let llama = tiny("llama-tied-f32", Tiny::llama());
    let (dora, _) = peft_make(&llama, work.path(), "dora", 4);
    let out = work.path().join("x.gguf");
    let err = run_err(
        edgepack()
            .args(["export", "gguf-lora"])
            .arg(&dora)
            .arg("--base")
            .arg(&llama)
            .arg("-o")
            .arg(&out),
    );
    assert!(err.contains("use_dora") && err.contains("hint:"), "{err}");
    assert!(!out.exists());
}

#[test]
fn adapter_for_another_base_is_refused_naming_the_tensor() {
    let work = tempfile::tempdir().unwrap();
    let llama = tiny("llama-tied-f32", Tiny::llama());
    let (adapter, _) = peft_make(&llama, work.path(), "plain", 5);
    let out = work.path().join("merged");
    let err = run_err(
        edgepack()
            .arg("merge")
            .arg(smollm2_hf())
            .arg("--lora")
            .arg(&adapter)
            .arg("-o")
            .arg(&out),
    );
    assert!(err.contains("adapter_model.safetensors"), "{err}");
    assert!(err.contains("lora_A.weight"), "{err}");
    assert!(err.contains("another base"), "{err}");
    assert!(!out.exists());
}

#[test]
fn pickle_adapter_is_refused_and_never_unpickled() {
    let work = tempfile::tempdir().unwrap();
    let llama = tiny("llama-tied-f32", Tiny::llama());
    let adapter = work.path().join("pickled");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}"#,
    )
    .unwrap();
    // Not a real pickle: edgepack must refuse by name without reading it.
    std::fs::write(adapter.join("adapter_model.bin"), b"\x80\x04not read").unwrap();
    let err = run_err(
        edgepack()
            .arg("merge")
            .arg(&llama)
            .arg("--lora")
            .arg(&adapter)
            .arg("-o")
            .arg(work.path().join("m")),
    );
    assert!(
        err.contains("adapter_model.bin") && err.contains("never unpickled"),
        "{err}"
    );
}
