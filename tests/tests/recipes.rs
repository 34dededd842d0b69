//! `edgepack build`: a recipe is one cached, gated job. The cache is proved by what `--json`
//! says ran (nothing on an unchanged recipe; one branch after a quant change; the merge and
//! everything after it when an adapter's bytes change), an interrupted build resumes and gives
//! a clean build's bytes, gates decide the exit status, bad recipes are refused by file, line
//! and key, and the shipped SmolLM2 recipe builds and its bundles verify.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use edgepack_tests::fixtures::Tiny;
use edgepack_tests::*;
use serde_json::Value;

fn build(recipe: &Path, work: &Path, extra: &[&str]) -> std::process::Output {
    let mut cmd = edgepack();
    cmd.arg("build")
        .arg(recipe)
        .arg("--out")
        .arg(work.join("out"))
        .arg("--cache")
        .arg(work.join("cache"))
        .args(extra)
        .arg("--json")
        .env("EDGEPACK_PYTHON", python());
    cmd.output().expect("spawn edgepack build")
}

fn build_ok(recipe: &Path, work: &Path, extra: &[&str]) -> Value {
    let out = build(recipe, work, extra);
    assert!(
        out.status.success(),
        "edgepack build failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json output")
}

/// The ids of the stages with `status`.
fn with_status(v: &Value, status: &str) -> Vec<String> {
    v["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .filter(|s| s["status"] == status)
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Evaluation text: the calibration corpus that ships with edgepack.
fn eval_text(dir: &Path) -> PathBuf {
    let p = dir.join("eval.txt");
    let corpus = std::fs::read_to_string(root().join("recipes/calibration/default.txt")).unwrap();
    write(&p, &corpus[..6000]);
    p
}

fn two_board_recipe(model: &Path, eval: &Path, rpi5_quant: &str, adapter: Option<&Path>) -> String {
    let adapters = adapter
        .map(|a| format!("[[adapters]]\npath = \"{}\"\n", a.display()))
        .unwrap_or_default();
    format!(
        "name = \"tiny\"\n[model]\npath = \"{}\"\n{adapters}[calibration]\nsamples = 2\nseq_len = 64\n\
         [eval]\ntext = \"{}\"\nctx = 64\nchunks = 2\n\
         [targets.imx93]\n[[targets.imx93.outputs]]\nquant = \"Q4_0\"\n\
         [targets.rpi5]\n[[targets.rpi5.outputs]]\nquant = \"{rpi5_quant}\"\nimatrix = true\n",
        model.display(),
        eval.display()
    )
}

#[test]
fn an_unchanged_recipe_runs_no_stage_and_a_changed_quant_reruns_only_its_branch() {
    let work = tempfile::tempdir().unwrap();
    let model = tiny("llama", Tiny::llama());
    let eval = eval_text(work.path());
    let recipe = work.path().join("tiny.toml");
    write(&recipe, &two_board_recipe(&model, &eval, "Q8_0", None));

    let first = build_ok(&recipe, work.path(), &[]);
    assert_eq!(first["counts"]["fresh"], 0, "{:#}", first["counts"]);
    let ran = with_status(&first, "ran");
    for id in [
        "imatrix",
        "export:imx93:gguf-Q4_0",
        "eval:imx93:gguf-Q4_0",
        "bundle:imx93:gguf-Q4_0",
        "verify:imx93:gguf-Q4_0",
        "export:rpi5:gguf-Q8_0",
        "bundle:rpi5:gguf-Q8_0",
    ] {
        assert!(ran.contains(&id.to_string()), "{id} did not run: {ran:?}");
    }
    let out = work.path().join("out");
    for f in [
        "tiny-imx93.tar.zst",
        "tiny-rpi5.tar.zst",
        "report.json",
        "report.md",
        "report.svg",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["schema"], 1);
    assert_eq!(report["outputs"].as_array().unwrap().len(), 2);
    let kl = report["outputs"][0]["metrics"]["kl_mean"].as_f64().unwrap();
    assert!(
        kl > 0.0 && kl.is_finite(),
        "Q4_0 differs from the float model: {kl}"
    );
    assert!(
        report["outputs"][0]["fit"]["variants"]
            .as_array()
            .unwrap()
            .len()
            >= 2
    );
    // The chart has one point per evaluated output and is well-formed enough for a browser.
    let svg = std::fs::read_to_string(out.join("report.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<circle").count(), 2, "{svg}");

    // Unchanged: every stage is fresh, nothing runs, the bundles are the same bytes.
    let before = std::fs::read(out.join("tiny-imx93.tar.zst")).unwrap();
    let t0 = Instant::now();
    let second = build_ok(&recipe, work.path(), &[]);
    eprintln!("warm rebuild: {:.2} s", t0.elapsed().as_secs_f64());
    assert_eq!(second["counts"]["ran"], 0, "{:#}", second["counts"]);
    assert_eq!(second["counts"]["fresh"], second["counts"]["total"]);
    assert_eq!(
        std::fs::read(out.join("tiny-imx93.tar.zst")).unwrap(),
        before
    );

    // One target's quant changes: the dry run says which stages and why, the build reruns
    // exactly that branch.
    write(&recipe, &two_board_recipe(&model, &eval, "Q5_0", None));
    let dry = build_ok(&recipe, work.path(), &["--dry-run"]);
    let planned = with_status(&dry, "would-run");
    assert_eq!(
        planned,
        [
            "export:rpi5:gguf-Q5_0",
            "eval:rpi5:gguf-Q5_0",
            "bundle:rpi5:gguf-Q5_0",
            "verify:rpi5:gguf-Q5_0"
        ],
        "{dry:#}"
    );
    let why = dry["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "export:rpi5:gguf-Q5_0")
        .unwrap()["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        why.contains("not built before") || why.contains("quant"),
        "{why}"
    );
    let third = build_ok(&recipe, work.path(), &[]);
    assert_eq!(with_status(&third, "ran"), planned);
    assert_eq!(
        std::fs::read(out.join("tiny-imx93.tar.zst")).unwrap(),
        before
    );

    // `cache gc` drops the Q8_0 branch that no recipe uses any more, and nothing else.
    let size = |w: &Path| -> u64 {
        let o = run_ok(
            edgepack()
                .args(["cache", "size", "--json", "--cache"])
                .arg(w.join("cache")),
        );
        serde_json::from_slice::<Value>(&o.stdout).unwrap()["bytes"]
            .as_u64()
            .unwrap()
    };
    let before_gc = size(work.path());
    let o = run_ok(
        edgepack()
            .args(["cache", "gc", "--json", "--cache"])
            .arg(work.path().join("cache"))
            .arg(&recipe),
    );
    let gc: Value = serde_json::from_slice(&o.stdout).unwrap();
    let freed = gc["freed_bytes"].as_u64().unwrap();
    assert!(freed > 0, "{gc:#}");
    assert_eq!(size(work.path()), before_gc - freed);
    let fourth = build_ok(&recipe, work.path(), &[]);
    assert_eq!(
        fourth["counts"]["ran"], 0,
        "gc kept every stage the recipe uses"
    );
}

#[test]
fn changing_an_adapters_bytes_reruns_the_merge_and_everything_after_it() {
    let work = tempfile::tempdir().unwrap();
    let model = tiny("llama", Tiny::llama());
    let eval = eval_text(work.path());
    let adapter = work.path().join("adapter");
    let merged = work.path().join("peft-merged");
    oracle("peft_make.py", &[&model, &adapter, &merged, &"plain", &"1"]);
    let recipe = work.path().join("tiny.toml");
    write(
        &recipe,
        &two_board_recipe(&model, &eval, "Q8_0", Some(&adapter)),
    );
    let first = build_ok(&recipe, work.path(), &[]);
    assert!(with_status(&first, "ran").contains(&"merge".to_string()));
    let n = first["counts"]["total"].as_u64().unwrap();

    // The same adapter files again: nothing runs.
    let again = build_ok(&recipe, work.path(), &[]);
    assert_eq!(again["counts"]["ran"], 0);

    // Other weights under the same names: the merge and every stage after it rerun.
    std::fs::remove_dir_all(&adapter).unwrap();
    std::fs::remove_dir_all(&merged).unwrap();
    oracle("peft_make.py", &[&model, &adapter, &merged, &"plain", &"2"]);
    let dry = build_ok(&recipe, work.path(), &["--dry-run"]);
    let planned = with_status(&dry, "would-run");
    assert_eq!(
        planned.len() as u64,
        n,
        "every stage depends on the merge: {planned:?}"
    );
    let merge = dry["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "merge")
        .unwrap();
    assert!(
        merge["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("{} changed", adapter.display())),
        "{merge:#}"
    );
    let after = build_ok(&recipe, work.path(), &[]);
    assert_eq!(after["counts"]["ran"].as_u64().unwrap(), n);
}

#[test]
fn bad_recipes_are_refused_by_file_line_and_key_before_any_stage_runs() {
    let work = tempfile::tempdir().unwrap();
    let model = tiny("llama", Tiny::llama());
    let recipe = work.path().join("bad.toml");
    let cases: [(String, &str); 5] = [
        (
            format!(
                "[model]\npath = \"{}\"\nquant = \"Q4_0\"\n[targets.imx93]\n",
                model.display()
            ),
            "bad.toml:3:1: unknown field `quant`",
        ),
        (
            format!("[model]\npath = \"{}\"\n[targets.imx42]\n", model.display()),
            "bad.toml:3:1: `targets.imx42.profile`: `imx42` is not a built-in board",
        ),
        (
            format!(
                "[model]\npath = \"{}\"\n[calibration]\nsamples = \"all\"\n[targets.rpi5]\n",
                model.display()
            ),
            "bad.toml:4:11: invalid type: string \"all\", expected usize",
        ),
        (
            format!(
                "[model]\npath = \"{}\"\n[gates]\nmin_similarity = 0.5\n[targets.rpi5]\n",
                model.display()
            ),
            "bad.toml:4:18: `gates.min_similarity`: answer similarity needs `eval.qa`",
        ),
        (
            format!(
                "[model]\npath = \"{}\"\n[[adapters]]\npath = \"nowhere\"\n[targets.rpi5]\n",
                model.display()
            ),
            "bad.toml:4:8: `adapters[0].path`:",
        ),
    ];
    for (text, want) in cases {
        write(&recipe, &text);
        let out = build(&recipe, work.path(), &[]);
        assert_eq!(out.status.code(), Some(1), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "wanted {want:?} in\n{err}");
        assert!(
            !work.path().join("cache/stages").exists()
                || std::fs::read_dir(work.path().join("cache/stages"))
                    .unwrap()
                    .next()
                    .is_none(),
            "a stage ran for {text}"
        );
    }

    // An adapter trained on a model of another width is refused with the recipe's line and key.
    let narrow = tiny(
        "llama-128",
        Tiny {
            hidden: 128,
            ..Tiny::llama()
        },
    );
    let adapter = work.path().join("narrow-adapter");
    let merged = work.path().join("narrow-merged");
    oracle(
        "peft_make.py",
        &[&narrow, &adapter, &merged, &"plain", &"0"],
    );
    write(
        &recipe,
        &format!(
            "[model]\npath = \"{}\"\n[[adapters]]\npath = \"{}\"\n[targets.rpi5]\n",
            model.display(),
            adapter.display()
        ),
    );
    let out = build(&recipe, work.path(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("bad.toml:4:8: `adapters[0].path`:"), "{err}");
    assert!(err.contains("another base model"), "{err}");
}

#[test]
fn a_failed_gate_exits_3_naming_the_target_and_a_passing_recipe_exits_0() {
    let work = tempfile::tempdir().unwrap();
    let model = tiny("llama", Tiny::llama());
    let eval = eval_text(work.path());
    let recipe = work.path().join("gated.toml");
    let text = |limit: &str| {
        format!(
            "[model]\npath = \"{}\"\n[eval]\ntext = \"{}\"\nctx = 64\nchunks = 2\n\
             [targets.imx93]\n[[targets.imx93.outputs]]\nquant = \"Q4_0\"\n[targets.imx93.gates]\nmax_kl = {limit}\nmin_fit_margin = 0.1\n",
            model.display(),
            eval.display()
        )
    };
    write(&recipe, &text("0.0"));
    let out = build(&recipe, work.path(), &[]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("imx93 gguf-Q4_0 max_kl: limit 0, measured"),
        "{err}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["passed"], false);
    let report = std::fs::read_to_string(work.path().join("out/report.md")).unwrap();
    assert!(
        report.contains("| imx93 | gguf-Q4_0 | max_kl | 0 |"),
        "{report}"
    );

    // The CI job on the same recipe and cache: it stops at the gate with exit 3.
    let key = work.path().join("release");
    run_ok(edgepack().arg("keygen").arg("-o").arg(&key));
    let release = || {
        let mut c =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        c.current_dir(root())
            .args(["xtask", "release"])
            .arg(&recipe)
            .arg("--out")
            .arg(work.path().join("out"))
            .arg("--cache")
            .arg(work.path().join("cache"))
            .arg("--sign")
            .arg(key.with_extension("pem"))
            .arg("--edgepack")
            .arg(edgepack_bin())
            .env("EDGEPACK_PYTHON", python());
        c.output().expect("spawn cargo xtask release")
    };
    let out = release();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("release stopped: a quality gate failed"),
        "{err}"
    );

    // A limit the output keeps: the same (cached) build passes.
    write(&recipe, &text("100.0"));
    let v = build_ok(&recipe, work.path(), &[]);
    assert_eq!(v["passed"], true);
    assert_eq!(v["counts"]["ran"], 0, "gates are read from the cached eval");

    // And the release goes through: every signed bundle verified again from its archive
    // with the key's public half, and the report printed.
    let out = release();
    let (text_out, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{text_out}\n{err}");
    assert!(
        err.contains("verify") && err.contains("gated-imx93.tar.zst") && err.contains("--key"),
        "{err}"
    );
    assert!(
        text_out.contains("| imx93 | gguf-Q4_0 | max_kl | 100 |"),
        "{text_out}"
    );
}

#[test]
fn onnx_and_tflite_outputs_are_scored_by_their_replays_and_held_to_their_own_gates() {
    let work = tempfile::tempdir().unwrap();
    let model = tiny("llama", Tiny::llama());
    let eval = eval_text(work.path());
    let recipe = work.path().join("onnx.toml");
    let text = |limit: &str| {
        format!(
            "[model]\npath = \"{}\"\n[eval]\ntext = \"{}\"\nctx = 64\nchunks = 2\n\
             [targets.imx95]\n[targets.imx95.gates]\nmax_kl = 100.0\n\
             [[targets.imx95.outputs]]\nformat = \"onnx\"\nquant = \"int4\"\n\
             [targets.imx95.outputs.gates]\nmax_kl = {limit}\n\
             [[targets.imx95.outputs]]\nformat = \"onnx\"\nquant = \"int8\"\n\
             [[targets.imx95.outputs]]\nformat = \"tflite\"\nquant = \"fp16\"\n\
             [[targets.imx95.outputs]]\nformat = \"onnx\"\nquant = \"fp32\"\n\
             [[targets.imx95.outputs]]\nformat = \"onnx\"\nquant = \"int8-static\"\nsmooth = 0.5\n\
             [[targets.imx95.outputs]]\nformat = \"tflite\"\nquant = \"dynamic-int8\"\n",
            model.display(),
            eval.display()
        )
    };
    write(&recipe, &text("0.0"));
    let out = build(&recipe, work.path(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("imx95 onnx-int4 max_kl: limit 0, measured"),
        "the output's own limit, not the target's: {err}"
    );
    assert!(
        !err.contains("onnx-int8 max_kl"),
        "int8 passes its target's limit: {err}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let kl = |i: usize| v["report"]["outputs"][i]["metrics"]["kl_mean"].as_f64();
    for (i, name) in [
        (0, "int4"),
        (1, "int8"),
        (2, "tflite fp16"),
        (4, "int8-static"),
        (5, "tflite dynamic-int8"),
    ] {
        let m = &v["report"]["outputs"][i]["metrics"];
        for k in ["kl_mean", "top1", "ppl_ratio"] {
            assert!(
                m[k].as_f64().is_some_and(f64::is_finite),
                "{name} {k}: {m:#}"
            );
        }
        assert!(
            m["kl_mean"].as_f64().unwrap() > 0.0,
            "{name} weights change the logits: {m:#}"
        );
        assert!(
            m["host_tokens_per_s"].is_null(),
            "simulated weights have no speed of their own: {m:#}"
        );
    }
    // f16 weights move the logits far less than 8-bit ones; fp32 computes the float model.
    assert!(kl(2) < kl(1), "{:#}", v["report"]["outputs"]);
    assert!(kl(2) < kl(5), "{:#}", v["report"]["outputs"]);
    let fp32 = &v["report"]["outputs"][3]["metrics"];
    assert_eq!(fp32["kl_mean"].as_f64(), Some(0.0), "{fp32:#}");
    assert_eq!(fp32["top1"].as_f64(), Some(1.0), "{fp32:#}");

    write(&recipe, &text("100.0"));
    let v = build_ok(&recipe, work.path(), &[]);
    assert_eq!(v["passed"], true);
    assert_eq!(v["counts"]["ran"], 0, "gates are read from the cached eval");
}

/// The SmolLM2 export of the interrupted-build test: a Q8_0 GGUF bundle straight from the
/// registry model's file.
/// Starts `edgepack build` of `recipe` in `work` (no `--json`) and kills it with SIGKILL as
/// soon as `ready` says so; false when the build ended first or `limit` passed.
fn kill_build_when(recipe: &Path, work: &Path, limit: Duration, ready: impl Fn() -> bool) -> bool {
    let mut child = edgepack()
        .arg("build")
        .arg(recipe)
        .arg("--out")
        .arg(work.join("out"))
        .arg("--cache")
        .arg(work.join("cache"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut killed = false;
    while t0.elapsed() < limit {
        if ready() {
            child.kill().unwrap();
            killed = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.wait();
    killed
}

fn smollm2_recipe(dir: &Path) -> PathBuf {
    let r = dir.join("smollm2-q8.toml");
    write(
        &r,
        &format!(
            "name = \"smollm2-q8\"\n[model]\npath = \"{}\"\n[targets.rpi5]\n[[targets.rpi5.outputs]]\nquant = \"Q8_0\"\n",
            smollm2_gguf().display()
        ),
    );
    r
}

#[test]
fn a_build_killed_mid_export_resumes_and_gives_the_bytes_of_a_clean_build() {
    let work = tempfile::tempdir().unwrap();
    let recipe = smollm2_recipe(work.path());
    // Wait until the export has written part of its file, then kill -9.
    let tmp = work.path().join("cache/tmp");
    let killed_mid_export = kill_build_when(&recipe, work.path(), Duration::from_secs(120), || {
        let partial = std::fs::read_dir(&tmp).ok().and_then(|rd| {
            rd.flatten()
                .find(|e| e.file_name().to_string_lossy().starts_with("export-"))
                .map(|e| e.path().join("out/model.gguf"))
        });
        partial.as_ref().is_some_and(|p| {
            std::fs::read_dir(p.parent().unwrap())
                .map(|rd| {
                    rd.flatten()
                        .any(|f| f.metadata().map(|m| m.len() > 0).unwrap_or(false))
                })
                .unwrap_or(false)
        })
    });
    assert!(
        killed_mid_export,
        "the export finished before it could be interrupted"
    );
    assert!(!work.path().join("out/smollm2-q8-rpi5.tar.zst").exists());

    // The next build finishes the job; a build in a fresh cache gives the same bytes.
    let resumed = build_ok(&recipe, work.path(), &[]);
    assert!(with_status(&resumed, "ran").contains(&"export:rpi5:gguf-Q8_0".to_string()));
    let leftovers: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
    assert!(
        leftovers.is_empty(),
        "temporary entries left: {leftovers:?}"
    );
    let clean = tempfile::tempdir().unwrap();
    build_ok(&recipe, clean.path(), &[]);
    for f in [
        "smollm2-q8-rpi5.tar.zst",
        "smollm2-q8-rpi5/model/smollm2-q8-rpi5.gguf",
    ] {
        assert!(
            std::fs::read(work.path().join("out").join(f)).unwrap()
                == std::fs::read(clean.path().join("out").join(f)).unwrap(),
            "{f} differs from a clean build's"
        );
    }
}

/// A recipe that fine-tunes a tiny model on the Tern questions for many short steps,
/// checkpointing every fifth step.
fn tiny_finetune_recipe(dir: &Path) -> PathBuf {
    let r = dir.join("tiny-ft.toml");
    write(
        &r,
        &format!(
            "name = \"tiny-ft\"\n[model]\npath = \"{}\"\n\
             [finetune]\ndata = \"{}\"\nrank = 4\nalpha = 8\nbatch = 2\nseq_len = 96\n\
             epochs = 10\nsave_steps = 5\n\
             [targets.rpi5]\n[[targets.rpi5.outputs]]\nquant = \"Q8_0\"\n",
            tiny("llama-tied-f32", Tiny::llama()).display(),
            root().join("recipes/data/tern-t3/qa.jsonl").display()
        ),
    );
    r
}

#[test]
fn a_build_killed_mid_training_resumes_from_its_checkpoint_and_gives_a_clean_builds_adapter() {
    let work = tempfile::tempdir().unwrap();
    let recipe = tiny_finetune_recipe(work.path());
    // Kill -9 once training has saved a checkpoint.
    let resume = work.path().join("cache/resume");
    let killed_mid_training =
        kill_build_when(&recipe, work.path(), Duration::from_secs(300), || {
            std::fs::read_dir(&resume).ok().is_some_and(|rd| {
                rd.flatten().any(|e| {
                    std::fs::read_dir(e.path().join("adapter")).is_ok_and(|rd| {
                        rd.flatten()
                            .any(|c| c.file_name().to_string_lossy().starts_with("checkpoint-"))
                    })
                })
            })
        });
    assert!(
        killed_mid_training,
        "the training finished before it could be interrupted"
    );

    // The next build continues from the checkpoint and ends where an uninterrupted one does.
    let resumed = build_ok(&recipe, work.path(), &[]);
    let from = resumed["report"]["finetune"]["resumed_from_step"]
        .as_u64()
        .unwrap();
    assert!(from >= 5, "resumed from step {from}");
    assert!(
        std::fs::read_dir(&resume).unwrap().next().is_none(),
        "the finished stage's checkpoints are removed"
    );
    let clean = tempfile::tempdir().unwrap();
    let fresh = build_ok(&recipe, clean.path(), &[]);
    assert_eq!(fresh["report"]["finetune"]["resumed_from_step"], 0);
    let adapter =
        |d: &Path| std::fs::read(d.join("out/adapter/adapter_model.safetensors")).unwrap();
    assert!(
        adapter(work.path()) == adapter(clean.path()),
        "the resumed adapter differs from a clean build's"
    );
}

#[test]
fn the_shipped_smollm2_recipe_builds_every_board_and_its_bundles_verify() {
    // Built once for every suite that reads it (the fine-tuning suite checks the adapter).
    let work = shipped_recipe_build();
    let key = release_key();
    let recipe = root().join("recipes/smollm2-assistant.toml");
    let pem = key.with_extension("pem").display().to_string();
    let v: Value =
        serde_json::from_slice(&std::fs::read(work.join("build.json")).unwrap()).unwrap();
    assert_eq!(v["passed"], true, "{:#}", v["report"]["gates"]);
    let report = &v["report"];
    // The adapter trained first is published, merged, and named in every bundle.
    let ft = &report["finetune"];
    assert!(
        ft["eval_loss_after"].as_f64().unwrap() < ft["eval_loss_before"].as_f64().unwrap(),
        "{ft:#}"
    );
    for k in ["similarity_base", "similarity_tuned"] {
        assert!(ft[k].as_f64().is_some_and(f64::is_finite), "{k}: {ft:#}");
    }
    assert!(work.join("out/adapter/adapter_model.safetensors").is_file());
    assert!(work.join("out/adapter/training_report.json").is_file());
    // The knowledge base: published, its guard calibrated, and its passages lift the base
    // model's answers clearly (the fine-tuned model already knows most facts).
    let rag = &report["rag"];
    assert_eq!(rag["documents"], 2, "{rag:#}");
    let g = &rag["guard"];
    assert!(g["auc"].as_f64().unwrap() >= 0.95, "{rag:#}");
    assert!(g["in_domain_passed"].as_f64().unwrap() >= 0.9, "{rag:#}");
    assert!(
        g["out_of_domain_refused"].as_f64().unwrap() >= 0.95,
        "{rag:#}"
    );
    let sim = |k: &str| rag[k].as_f64().unwrap_or_else(|| panic!("{k}: {rag:#}"));
    assert!(
        sim("similarity_base_with") > sim("similarity_base_without") + 0.05,
        "{rag:#}"
    );
    assert!(sim("similarity_with").is_finite());
    assert!(work.join("out/kb/kb.safetensors").is_file());
    let outs = report["outputs"].as_array().unwrap();
    let labels: Vec<String> = outs
        .iter()
        .map(|o| {
            format!(
                "{}:{}",
                o["target"].as_str().unwrap(),
                o["output"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        labels,
        [
            "imx8mp:gguf-Q4_0",
            "imx8mp:tflite-int8",
            "imx93:gguf-Q4_0",
            "imx95:gguf-Q4_K_M",
            "imx95:onnx-int4",
            "rpi5:gguf-Q4_K_M"
        ]
    );
    // One export serves both Q4_0 boards; one calibration serves the TFLite graph.
    let ids: Vec<&str> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids.iter()
            .filter(|i| i.starts_with("export:") && i.ends_with("gguf-Q4_0"))
            .count(),
        1,
        "{ids:?}"
    );
    // Every GGUF output is scored, and the int4 ONNX one (on the host, over the weights
    // onnxruntime computes with).
    let scored = outs
        .iter()
        .filter(|o| o["format"] == "gguf" || o["output"] == "onnx-int4");
    assert_eq!(scored.clone().count(), 5);
    for o in scored {
        let m = &o["metrics"];
        for k in ["kl_mean", "top1", "ppl_ratio", "similarity"] {
            assert!(
                m[k].as_f64().is_some_and(f64::is_finite),
                "{k} of {}: {m:#}",
                o["output"]
            );
        }
    }
    let pubkey = key.with_extension("pub.pem");
    for (target, name) in [
        ("imx8mp", "smollm2-assistant-imx8mp"),
        ("imx93", "smollm2-assistant-imx93"),
        ("imx95", "smollm2-assistant-imx95"),
        ("rpi5", "smollm2-assistant-rpi5"),
    ] {
        let archive = work.join("out").join(format!("{name}.tar.zst"));
        run_ok(
            edgepack()
                .arg("verify")
                .arg(&archive)
                .arg("--key")
                .arg(&pubkey)
                .args(["--target", target]),
        );
    }
    // The accelerators' outputs are bundles too, each naming its engine (and delegate).
    for (target, name, engine, delegate, model) in [
        (
            "imx8mp",
            "smollm2-assistant-imx8mp-tflite-int8",
            "litert",
            Some("vx"),
            "model/smollm2-assistant-imx8mp-tflite-int8.tflite",
        ),
        (
            "imx95",
            "smollm2-assistant-imx95-onnx-int4",
            "onnxruntime",
            None,
            "model/model.onnx",
        ),
    ] {
        let archive = work.join("out").join(format!("{name}.tar.zst"));
        run_ok(
            edgepack()
                .arg("verify")
                .arg(&archive)
                .arg("--key")
                .arg(&pubkey)
                .args(["--target", target]),
        );
        let m: Value = serde_json::from_slice(
            &std::fs::read(work.join("out").join(name).join("manifest.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(m["engine"]["name"], engine, "{m}");
        assert_eq!(
            m["model"]["adapters"].as_array().map(Vec::len),
            Some(1),
            "{m}"
        );
        assert_eq!(m["engine"]["delegate"].as_str(), delegate, "{m}");
        assert_eq!(m["model"]["file"], model, "{m}");
        // Every bundle carries the knowledge base with the recipe's settings.
        let r = &m["retrieval"];
        assert_eq!(r["top_k"], 2, "{m}");
        assert_eq!(
            r["refusal"],
            "I can only answer questions about the Tern T3 thermostat."
        );
        let t = r["threshold"].as_f64().unwrap() - g["threshold"].as_f64().unwrap();
        assert!(t.abs() < 1e-6, "the calibrated threshold: {m}");
    }
    // A rerun of the unchanged recipe does no work.
    let t0 = Instant::now();
    let again = build_ok(&recipe, &work, &["--sign", &pem]);
    assert_eq!(again["counts"]["ran"], 0);
    eprintln!(
        "warm rerun of the shipped recipe: {:.2} s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn every_shipped_recipe_checks_and_plans() {
    let work = tempfile::tempdir().unwrap();
    let mut n = 0;
    for e in std::fs::read_dir(root().join("recipes")).unwrap().flatten() {
        let p = e.path();
        // recipes/ also holds the crate that reads them.
        if p.extension().is_none_or(|x| x != "toml") || p.ends_with("Cargo.toml") {
            continue;
        }
        let v = build_ok(&p, work.path(), &["--dry-run"]);
        assert!(
            v["counts"]["total"].as_u64().unwrap() > 2,
            "{}: {v:#}",
            p.display()
        );
        n += 1;
    }
    assert!(n >= 2, "the shipped recipes are missing");
}
