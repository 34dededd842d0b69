//! Board profiles and the fit check, through the real binary: `targets list/show` carry the
//! profile facts, user profile files load and bad ones name the field, and `fit`'s numbers are
//! recomputed here independently: weights are the size of the GGUF `edgepack export gguf`
//! actually writes, the KV cache follows the hyperparameters gguf-py reads from that file.

use std::path::{Path, PathBuf};

use edgepack_tests::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// The runtime overhead fit documents (edgepack_targets::fit::RUNTIME_OVERHEAD_BYTES).
const OVERHEAD: u64 = 192 * MIB;
/// Presets by llama-quantize's perplexity table (tools/quantize/quantize.cpp), best first.
const QUALITY: &[&str] = &[
    "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
    "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K",
];

fn json_of(cmd: &mut std::process::Command) -> Value {
    let out = run_ok(cmd.arg("--json"));
    serde_json::from_slice(&out.stdout).expect("--json prints JSON")
}

/// SmolLM2 exported by `edgepack export gguf` at `quant`, once per test run.
fn smollm2_exported(quant: &str) -> PathBuf {
    let dir = shared_work_dir().join(format!("smollm2-export-{quant}"));
    fixtures::build_once(&dir, |tmp| {
        std::fs::create_dir_all(tmp).unwrap();
        export_gguf(&smollm2_gguf(), quant, &tmp.join("model.gguf"));
    })
    .join("model.gguf")
}

#[test]
fn every_target_and_bundle_command_has_help_with_an_example() {
    for args in [
        &["targets", "--help"][..],
        &["targets", "list", "--help"],
        &["targets", "show", "--help"],
        &["fit", "--help"],
        &["keygen", "--help"],
        &["bundle", "--help"],
        &["verify", "--help"],
    ] {
        let out = run_ok(edgepack().args(args));
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains("Example:"),
            "{args:?} has no example:\n{text}"
        );
    }
}

#[test]
fn targets_list_names_every_builtin_board_with_its_triple_and_glibc_floor() {
    let v = json_of(edgepack().args(["targets", "list"]));
    let all = v.as_array().unwrap();
    let names: Vec<&str> = all.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "imx8mp",
            "imx93",
            "imx95",
            "rpi5",
            "generic-aarch64",
            "generic-x86_64"
        ]
    );
    for p in all {
        assert!(
            p["rust_target"].as_str().unwrap().contains("-linux-gnu"),
            "{p}"
        );
        let floor = p["glibc_floor"].as_str().unwrap();
        assert!(floor.starts_with("2."), "{p}");
        assert!(!p["memory"]["ram_variants_mib"]
            .as_array()
            .unwrap()
            .is_empty());
        assert!(p["runtime"]["gguf"].is_string(), "{p}");
    }
    let by = |n: &str| all.iter().find(|p| p["name"] == n).unwrap();
    // Facts from shared/facts/tflite_targets.md §3: A53 has no dotprod, A55/A76 do; the Pi 5
    // has no NPU; the i.MX 93's Ethos-U65 runs per-tensor int8 only.
    assert_eq!(by("imx8mp")["cpu"]["dotprod"], false);
    assert_eq!(by("imx8mp")["target_cpu"], "cortex-a53");
    assert_eq!(by("imx95")["cpu"]["cores"], 6);
    assert_eq!(by("rpi5")["target_cpu"], "cortex-a76");
    assert!(by("rpi5").get("npu").is_none());
    assert_eq!(
        by("imx93")["npu"]["int8_weights"],
        serde_json::json!(["per-tensor"])
    );
    assert_eq!(
        by("generic-x86_64")["rust_target"],
        "x86_64-unknown-linux-gnu"
    );

    let text = run_ok(edgepack().args(["targets", "list"])).stdout;
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains("Ethos-U65") && text.contains("Cortex-A76"),
        "{text}"
    );
}

#[test]
fn targets_show_imx93_prints_cpu_ram_npu_and_build_facts() {
    let v = json_of(edgepack().args(["targets", "show", "imx93"]));
    assert_eq!(v["name"], "imx93");
    assert_eq!(v["cpu"]["model"], "Cortex-A55");
    assert_eq!(v["cpu"]["cores"], 2);
    assert_eq!(v["cpu"]["dotprod"], true);
    assert_eq!(v["cpu"]["i8mm"], false);
    assert_eq!(
        v["memory"]["ram_variants_mib"],
        serde_json::json!([1024, 2048])
    );
    assert_eq!(v["rust_target"], "aarch64-unknown-linux-gnu");
    assert_eq!(v["target_cpu"], "cortex-a55");
    assert_eq!(v["glibc_floor"], "2.35");
    let ops: Vec<&str> = v["npu"]["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    assert!(ops.contains(&"FULLY_CONNECTED"));
    assert!(
        !ops.contains(&"BATCH_MATMUL"),
        "the U65 has no BATCH_MATMUL"
    );

    let out = run_ok(edgepack().args(["targets", "show", "imx93"])).stdout;
    let text = String::from_utf8(out).unwrap();
    for want in ["Cortex-A55 x2", "dotprod yes", "Ethos-U65", "glibc >= 2.35"] {
        assert!(text.contains(want), "missing {want}:\n{text}");
    }
}

fn user_profile(dir: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let text = std::fs::read_to_string(root().join("targets/profiles/rpi5.toml")).unwrap();
    let p = dir.join("my-board.toml");
    std::fs::write(
        &p,
        edit(text.replace("name = \"rpi5\"", "name = \"my-board\"")),
    )
    .unwrap();
    p
}

#[test]
fn a_user_profile_file_loads_and_a_bad_field_is_named() {
    let work = tempfile::tempdir().unwrap();
    let good = user_profile(work.path(), |t| t);
    let v = json_of(edgepack().args(["targets", "show", "--profile"]).arg(&good));
    assert_eq!(v["name"], "my-board");
    assert_eq!(v["cpu"]["model"], "Cortex-A76");

    let bad = user_profile(work.path(), |t| t.replace("cores = 4", "cores = \"four\""));
    let err = run_err(edgepack().args(["targets", "show", "--profile"]).arg(&bad));
    assert!(
        err.contains("my-board.toml") && err.contains("cores"),
        "{err}"
    );

    let bad = user_profile(work.path(), |t| t.replace("\"2.36\"", "\"bookworm\""));
    let err = run_err(edgepack().args(["targets", "show", "--profile"]).arg(&bad));
    assert!(
        err.contains("my-board.toml") && err.contains("glibc_floor"),
        "{err}"
    );
}

#[test]
fn an_unknown_target_is_refused_with_the_known_ones() {
    let err = run_err(edgepack().args(["targets", "show", "imx6ull"]));
    assert!(err.contains("imx6ull") && err.contains("imx93"), "{err}");
    let err = run_err(
        edgepack()
            .arg("fit")
            .arg(smollm2_gguf())
            .args(["--target", "imx6ull"]),
    );
    assert!(err.contains("unknown target"), "{err}");
}

/// The preset `fit` should suggest for `available` bytes, from its own per-preset sizes and
/// the quality order above.
fn expected_best(sizes: &[(String, u64)], kv: u64, available: u64) -> Option<String> {
    QUALITY.iter().find_map(|q| {
        sizes
            .iter()
            .find(|(n, w)| n == q && w + kv + OVERHEAD <= available)
            .map(|(n, _)| n.clone())
    })
}

fn check_fit(v: &Value, gguf: &Path, ctx: u64, ram_mib: &[u64], os_mib: u64, bw_gbs: f64) {
    let shape = oracle("gguf_shape.py", &[&gguf]);
    let n = |k: &str| shape[k].as_u64().unwrap();
    // Weights: exactly the file the exporter wrote.
    assert_eq!(v["weights_bytes"].as_u64().unwrap(), n("file_bytes"), "{v}");
    // KV cache: K and V, f16, every layer, at the full context.
    let kv = 2 * n("layers") * ctx * n("kv_heads") * n("head_dim") * 2;
    assert_eq!(v["kv_cache_bytes"].as_u64().unwrap(), kv, "{v}");
    let needed = n("file_bytes") + kv + OVERHEAD;
    assert_eq!(v["needed_bytes"].as_u64().unwrap(), needed);
    let sizes: Vec<(String, u64)> = v["quant_sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["quant"].as_str().unwrap().to_string(),
                s["weights_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    let variants = v["variants"].as_array().unwrap();
    assert_eq!(variants.len(), ram_mib.len());
    for (var, &mib) in variants.iter().zip(ram_mib) {
        let available = (mib - os_mib) * MIB;
        let margin = available as i64 - needed as i64;
        assert_eq!(var["margin_bytes"].as_i64().unwrap(), margin, "{var}");
        assert_eq!(var["fits"].as_bool().unwrap(), margin >= 0, "{var}");
        let pct = margin as f64 * 100.0 / available as f64;
        assert!(
            (var["margin_pct"].as_f64().unwrap() - pct).abs() < 1e-9,
            "{var}"
        );
        let best = expected_best(&sizes, kv, available);
        assert_eq!(var["best_quant"].as_str().map(str::to_owned), best, "{var}");
    }
    // Decode ceiling: bandwidth over the tensor data plus the KV cache read per token.
    let per_token = n("data_bytes") + kv;
    assert_eq!(v["decode"]["bytes_per_token"].as_u64().unwrap(), per_token);
    let ceiling = bw_gbs * 1e9 / per_token as f64;
    let got = v["decode"]["tokens_per_s_ceiling"].as_f64().unwrap();
    assert!((got - ceiling).abs() < 1e-9 * ceiling, "{got} vs {ceiling}");
}

#[test]
fn fit_weights_are_the_exported_gguf_size_and_kv_follows_the_config() {
    for (quant, target, ram, bw) in [
        ("Q8_0", "imx93", &[1024u64, 2048][..], 7.5),
        ("Q4_0", "rpi5", &[1024, 2048, 4096, 8192, 16384][..], 17.0),
    ] {
        let gguf = smollm2_exported(quant);
        let v = json_of(
            edgepack()
                .arg("fit")
                .arg(smollm2_gguf())
                .args(["--target", target, "--quant", quant, "--ctx", "2048"]),
        );
        assert_eq!(v["quant"], quant);
        check_fit(&v, &gguf, 2048, ram, 256, bw);
        // The size listed for the preset is the same number.
        let listed = v["quant_sizes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["quant"] == quant)
            .unwrap();
        assert_eq!(listed["weights_bytes"], v["weights_bytes"]);
    }
}

#[test]
fn fit_on_a_tight_board_suggests_a_smaller_quant_and_reports_a_negative_margin() {
    let work = tempfile::tempdir().unwrap();
    // 256 MiB kept by the OS; 512/740/2048 MiB boards. An 8192-token KV cache (180 MiB) plus
    // the overhead (192 MiB) leaves nothing on 512, ~112 MiB of weights on 740 (less than
    // Q8_0's 138 MiB), and room for F16 on 2048.
    let profile = user_profile(work.path(), |t| {
        t.replace(
            "ram_variants_mib = [1024, 2048, 4096, 8192, 16384]",
            "ram_variants_mib = [512, 740, 2048]",
        )
    });
    let v = json_of(
        edgepack()
            .arg("fit")
            .arg(smollm2_gguf())
            .arg("--profile")
            .arg(&profile)
            .args(["--quant", "Q8_0", "--ctx", "8192"]),
    );
    check_fit(
        &v,
        &smollm2_exported("Q8_0"),
        8192,
        &[512, 740, 2048],
        256,
        17.0,
    );
    let variants = v["variants"].as_array().unwrap();
    assert_eq!(variants[0]["fits"], false);
    assert!(variants[0]["margin_bytes"].as_i64().unwrap() < 0);
    assert!(variants[0]["best_quant"].is_null(), "nothing fits 512 MiB");
    assert_eq!(variants[1]["fits"], false);
    assert_eq!(variants[2]["fits"], true);
    assert_eq!(variants[2]["best_quant"], "F16");
    let mid = variants[1]["best_quant"].as_str().unwrap();
    assert!(QUALITY.iter().position(|q| *q == mid) > QUALITY.iter().position(|q| *q == "Q8_0"));

    let text = run_ok(
        edgepack()
            .arg("fit")
            .arg(smollm2_gguf())
            .arg("--profile")
            .arg(&profile)
            .args(["--quant", "Q8_0", "--ctx", "8192"]),
    )
    .stdout;
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains("DOES NOT FIT") && text.contains("tokens/s"),
        "{text}"
    );
}

#[test]
fn fit_refuses_a_zero_context_and_an_unknown_quant() {
    let err = run_err(
        edgepack()
            .arg("fit")
            .arg(smollm2_gguf())
            .args(["--target", "imx93", "--ctx", "0"]),
    );
    assert!(err.contains("--ctx 0"), "{err}");
    let err = run_err(
        edgepack()
            .arg("fit")
            .arg(smollm2_gguf())
            .args(["--target", "imx93", "--quant", "Q9_9"]),
    );
    assert!(err.contains("Q9_9"), "{err}");
}
