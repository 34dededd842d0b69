//! `cargo xtask bench rag`: retrieval against its peers, in one run on one machine.
//!
//! - Embedding: `edgepack rag build` of the Tern T3 documents and edgepack's calibration
//!   corpus, against transformers embedding the same chunk texts as sentence-transformers
//!   does (batches of 32, every core): chunks per second.
//! - Search: knowledge bases of `--sizes` chunks (the real chunks repeated with a little noise
//!   on their vectors, int8 as edgepack stores them), searched for the best 5 by `edgepack rag
//!   query` (its own search time per question) and by numpy and faiss-cpu's exact
//!   `IndexFlatIP` over the same vectors: median milliseconds per question, and how often
//!   the top 5 agree.
//! - The guard in the runtime: SmolLM2 (Q8_0) bundled with the first size's knowledge base and
//!   a threshold every question falls below, served by the release runtime; each chat question
//!   is refused before the model runs, so its round trip is the guard's question-to-decision
//!   latency. The same for the i.MX 93's aarch64 runtime (`cargo xtask dist`) under
//!   qemu-aarch64, fewer questions: an emulated figure, slower than the board's own cores.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::common::{edgepack_release, fresh_work_dir, output_of, py, release_runtime};
use crate::setup;
use crate::util::{root, run};

pub struct Options {
    pub sizes: Vec<usize>,
    /// Questions timed per size.
    pub questions: usize,
    pub output: PathBuf,
}

fn tern(file: &str) -> PathBuf {
    root().join("recipes/data/tern-t3").join(file)
}

fn peer(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Result<Value> {
    let mut cmd = Command::new(py());
    cmd.arg(root().join("tests/python/rag_peer.py"));
    for a in args {
        cmd.arg(a);
    }
    let out = output_of(&mut cmd)?;
    let text = String::from_utf8_lossy(&out);
    let last = text.lines().last().context("rag_peer.py printed nothing")?;
    serde_json::from_str(last).context("rag_peer.py's JSON")
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// A running `edgepack-runtime serve`, killed on drop.
struct Server(Child, u16);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serves `bundle` with the runtime `cmd` runs (the host binary, or the board's under qemu).
fn serve(mut cmd: Command, bundle: &Path, ready_within: Duration) -> Result<Server> {
    let mut child = cmd
        .args(["--json", "serve", "--bundle"])
        .arg(bundle)
        .args(["--port", "0", "--threads", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting edgepack-runtime")?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().context("stdout")?),
        &mut line,
    )?;
    let v: Value = serde_json::from_str(&line).context("the runtime's listening line")?;
    let port: u16 = v["addr"]
        .as_str()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .context("no port")?;
    let server = Server(child, port);
    let t0 = Instant::now();
    while t0.elapsed() < ready_within {
        if http(port, "GET", "/health", "").is_ok_and(|(s, _)| s == 200) {
            return Ok(server);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("the runtime was not healthy after {ready_within:?}")
}

fn http(port: u16, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    crate::util::http(port, method, path, body, Duration::from_secs(60))
}

pub fn bench(o: &Options) -> Result<()> {
    if o.sizes.is_empty() || o.questions == 0 {
        bail!("--sizes and --questions need values above 0");
    }
    let ep = edgepack_release()?;
    let runtime = release_runtime()?;
    let py = py();
    let minilm = setup::minilm(&py)?;
    // faiss-cpu is the exact-search peer; installed into the peers' venv on first use.
    let has_faiss = Command::new(&py)
        .args(["-c", "import faiss"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_faiss {
        let _ = run(Command::new(&py).args(["-m", "pip", "install", "--quiet", "faiss-cpu"]));
    }
    let work = fresh_work_dir("rag")?;

    // Embedding throughput, over the Tern documents, the calibration text and this
    // project's own docs (a few hundred chunks, so loading the encoder weighs little).
    let kb = work.join("kb");
    let mut docs: Vec<PathBuf> = vec![
        tern("manual.txt"),
        tern("conversations.txt"),
        root().join("recipes/calibration/default.txt"),
    ];
    let mut md: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    md.sort();
    docs.extend(md);
    let t0 = Instant::now();
    let built: Value = serde_json::from_slice(&output_of(
        Command::new(&ep)
            .args(["rag", "build"])
            .args(&docs)
            .arg("--embedder")
            .arg(&minilm)
            .arg("-o")
            .arg(&kb)
            .arg("--json"),
    )?)
    .context("rag build --json")?;
    let ours_s = t0.elapsed().as_secs_f64();
    let embed_s = built["seconds"]["embedding"]
        .as_f64()
        .context("rag build's embedding seconds")?;
    let kb_file = kb.join("kb.safetensors");
    let theirs = peer(&[&"embed", &minilm, &kb_file])?;
    let chunks = theirs["chunks"].as_u64().context("chunks")? as f64;
    let embedding = json!({
        "chunks": chunks,
        "edgepack": {"seconds": ours_s, "chunks_per_second": chunks / ours_s,
                     "embedding_seconds": embed_s, "chunks_per_second_embedding": chunks / embed_s,
                     "note": "seconds: the whole command (loading and hashing the encoder, reading, chunking, embedding, writing); embedding_seconds: reading, chunking and embedding, as `rag build --json` reports it"},
        "transformers": theirs,
    });

    // Questions: held-out Tern questions and general ones, alternating.
    let heldout: Vec<String> = std::fs::read_to_string(tern("heldout.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["question"].as_str().map(str::to_string))
        .collect();
    let general: Vec<String> = std::fs::read_to_string(tern("out_of_domain.txt"))?
        .lines()
        .map(str::to_string)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let mixed: Vec<String> = heldout
        .iter()
        .zip(&general)
        .flat_map(|(a, b)| [a.clone(), b.clone()])
        .take(o.questions)
        .collect();
    let qfile = work.join("questions.txt");
    std::fs::write(&qfile, mixed.join("\n") + "\n")?;

    let mut search = Vec::new();
    let mut first_kb = None;
    for &n in &o.sizes {
        let dir = work.join(format!("kb-{n}"));
        peer(&[&"synth", &kb_file, &n.to_string(), &dir])?;
        let ours: Value = serde_json::from_slice(&output_of(
            Command::new(&ep)
                .args(["rag", "query"])
                .arg(&dir)
                .arg("--embedder")
                .arg(&minilm)
                .arg("--questions")
                .arg(&qfile)
                .args(["-k", "5", "--json"]),
        )?)?;
        let results = ours["results"].as_array().context("results")?;
        let ms = |k: &str| median(results.iter().filter_map(|r| r[k].as_f64()).collect());
        let our_top: Vec<Vec<u64>> = results
            .iter()
            .map(|r| {
                r["hits"]
                    .as_array()
                    .map(|h| h.iter().filter_map(|x| x["chunk"].as_u64()).collect())
                    .unwrap_or_default()
            })
            .collect();
        let theirs = peer(&[
            &"search",
            &minilm,
            &dir.join("kb.safetensors"),
            &qfile,
            &"5",
            &"5",
        ])?;
        let agree = |tool: &str| -> Option<f64> {
            let tops = theirs[tool]["top"].as_array()?;
            let same = tops
                .iter()
                .zip(&our_top)
                .filter(|(t, o)| {
                    t.as_array()
                        .map(|t| t.iter().filter_map(Value::as_u64).collect::<Vec<_>>())
                        .as_ref()
                        == Some(*o)
                })
                .count();
            Some(same as f64 / our_top.len().max(1) as f64)
        };
        search.push(json!({
            "chunks": n,
            "edgepack": {"search_ms": ms("search_ms"), "embed_ms": ms("embed_ms")},
            "numpy": {"search_ms": theirs["numpy"]["median_ms"], "top5_agreement": agree("numpy")},
            "faiss": if theirs["faiss"].is_null() { Value::Null } else {
                json!({"search_ms": theirs["faiss"]["median_ms"], "top5_agreement": agree("faiss"),
                       "version": theirs["faiss_version"]})
            },
        }));
        first_kb.get_or_insert(dir);
    }

    // The guard in the runtime, over the first size's knowledge base: the host runtime, then
    // the board's aarch64 runtime under qemu-aarch64 (every instruction emulated, so an upper
    // bound of what a board's cores take).
    let kb_dir = first_kb.context("no size")?;
    let host_bundle = guard_bundle(
        &ep,
        &kb_dir,
        &minilm,
        &work.join("bundle"),
        "generic-x86_64",
        None,
    )?;
    let guard = guard_latency(
        Command::new(&runtime),
        &host_bundle,
        &general,
        o.questions,
        o.sizes[0],
        Duration::from_secs(120),
    )?;
    let board_runtime = crate::dist::dist(QEMU_BOARD, false)?.binary;
    let board_bundle = guard_bundle(
        &ep,
        &kb_dir,
        &minilm,
        &work.join("bundle-board"),
        QEMU_BOARD,
        Some(&board_runtime),
    )?;
    let mut qemu = Command::new("qemu-aarch64");
    qemu.args(["-L", QEMU_SYSROOT])
        .arg(board_bundle.join("bin/edgepack-runtime"));
    let mut guard_qemu = guard_latency(
        qemu,
        &board_bundle,
        &general,
        o.questions.min(QEMU_QUESTIONS),
        o.sizes[0],
        Duration::from_secs(600),
    )?;
    guard_qemu["board"] = json!(QEMU_BOARD);
    guard_qemu["emulator"] = json!("qemu-aarch64 (user mode, on this machine)");

    let report = json!({
        "machine_threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "embedding": embedding,
        "search": search,
        "runtime_guard": guard,
        "runtime_guard_qemu": guard_qemu,
    });
    if let Some(p) = o.output.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&o.output, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!("wrote {}", o.output.display());
    Ok(())
}

/// The board whose runtime the emulated guard runs (the demo's).
const QEMU_BOARD: &str = "imx93";
/// qemu's sysroot for the aarch64 loader and libraries (Debian's libc6-arm64-cross).
const QEMU_SYSROOT: &str = "/usr/aarch64-linux-gnu";
/// Questions timed under emulation.
const QEMU_QUESTIONS: usize = 10;

/// SmolLM2 (Q8_0) bundled for `target` with the knowledge base in `kb` and a threshold every
/// question falls below: each chat question is refused before the model runs, so its round
/// trip is embedding, search and decision.
fn guard_bundle(
    ep: &Path,
    kb: &Path,
    minilm: &Path,
    out: &Path,
    target: &str,
    runtime: Option<&Path>,
) -> Result<PathBuf> {
    let mut cmd = Command::new(ep);
    cmd.arg("bundle")
        .arg(setup::smollm2_gguf())
        .args(["--target", target, "--format", "gguf", "--quant", "Q8_0"])
        .args(["--name", "smollm2", "--kb"])
        .arg(kb)
        .arg("--embedder")
        .arg(minilm)
        .args(["--kb-threshold", "0.99"])
        .arg("-o")
        .arg(out)
        .env("CI", "1");
    if let Some(r) = runtime {
        cmd.arg("--runtime").arg(r);
    }
    run(&mut cmd)?;
    Ok(out.join(format!("smollm2-{target}")))
}

/// Serves `bundle` with `runtime` and asks up to `questions` of `general`: the median round
/// trip and the runtime's own decision time of the refused ones.
fn guard_latency(
    runtime: Command,
    bundle: &Path,
    general: &[String],
    questions: usize,
    chunks: usize,
    ready_within: Duration,
) -> Result<Value> {
    let server = serve(runtime, bundle, ready_within)?;
    let (mut wall, mut decided, mut refused) = (Vec::new(), Vec::new(), 0);
    for q in general.iter().take(questions) {
        let body = json!({"messages": [{"role": "user", "content": q}], "temperature": 0,
                          "max_tokens": 8})
        .to_string();
        let t0 = Instant::now();
        let (status, text) = http(server.1, "POST", "/v1/chat/completions", &body)?;
        let dt = t0.elapsed().as_secs_f64() * 1e3;
        if status != 200 {
            bail!("chat answered {status}: {text}");
        }
        let v: Value = serde_json::from_str(&text)?;
        if v["retrieval"]["guarded"] == true {
            refused += 1;
            wall.push(dt);
            decided.extend(v["retrieval"]["latency_ms"].as_f64());
        }
    }
    drop(server);
    Ok(json!({
        "chunks": chunks,
        "questions": general.len().min(questions),
        "refused": refused,
        "request_ms_median": median(wall),
        "decision_ms_median": median(decided),
        "goal_ms": 100,
    }))
}
