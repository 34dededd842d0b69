//! A recipe expanded into its stage graph, each stage with its content address.
//!
//! ```text
//! fetch ─> merge ─> [calibrate ─> smooth] ─> [calibrate ─> sparsify] ─┬─> export per output ─> eval
//!                                                                     ├─> imatrix (shared)      │
//!                                                                     └─> calibrate (shared) ───┘─> bundle ─> verify
//! ```
//!
//! Stages exist only where the recipe asks for them: no adapters, no merge; a model given as
//! a path, no fetch. Work that several outputs need (one calibration of the final model, one
//! importance matrix) is one stage that they all read. A stage's key covers everything that
//! decides its output, so a change reruns exactly the stages downstream of it.

use std::path::{Path, PathBuf};

use edgepack_targets::Profile;
use serde_json::{json, Value};

use crate::cache::{sha256_str, Cache};
use crate::error::{RecipeError, Result};
use crate::recipe::{AlphaSpec, Eval, Format, ModelSource, Output, Rag, Recipe, Transform};
use edgepack_converters::export::onnx::OnnxOptions;
use edgepack_converters::train::TrainConfig;

/// The version every key includes: a new edgepack may compute differently.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where a stage reads its model from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelIn {
    /// The user's HF folder or GGUF file.
    Path(PathBuf),
    /// The model another stage produced.
    Stage(usize),
}

/// Where a stage reads an adapter from.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterIn {
    /// The user's PEFT adapter folder.
    Path(PathBuf),
    /// The adapter the `finetune` stage trained.
    Stage(usize),
}

/// The work of one stage, with the indices of the stages it reads.
#[derive(Debug, Clone)]
pub enum Job {
    Fetch {
        package: String,
        version: String,
        file: Option<String>,
    },
    /// LoRA training on the base model (`edgepack finetune`).
    Finetune {
        base: ModelIn,
        data: PathBuf,
        config: Box<TrainConfig>,
        /// Checkpoint every this many steps (the stage resumes from the last one); does not
        /// change the adapter, so it is not part of the key.
        save_steps: usize,
    },
    Merge {
        base: ModelIn,
        adapters: Vec<(AdapterIn, f32)>,
    },
    Calibrate {
        model: ModelIn,
        data: Option<PathBuf>,
        samples: usize,
        seq_len: usize,
    },
    Smooth {
        model: ModelIn,
        stats: usize,
        alpha: AlphaSpec,
        scope: String,
        data: Option<PathBuf>,
        seq_len: usize,
    },
    Sparsify {
        model: ModelIn,
        stats: Option<usize>,
        method: String,
        pattern: String,
    },
    Imatrix {
        model: ModelIn,
        data: Option<PathBuf>,
        chunk: usize,
        chunks: usize,
    },
    Export {
        model: ModelIn,
        output: Output,
        profile: Box<Profile>,
        stats: Option<usize>,
        imatrix: Option<usize>,
    },
    /// The knowledge base the bundles carry (`edgepack rag build`, then `rag calibrate`).
    Rag { embedder: ModelIn, rag: Box<Rag> },
    /// The float model's own answers to the question set, scored once for every output;
    /// with `rag`, each question is asked with its passages from that stage's knowledge base.
    Answers {
        model: ModelIn,
        eval: Eval,
        embedder: ModelIn,
        rag: Option<(usize, Box<Rag>)>,
    },
    Eval {
        reference: ModelIn,
        candidate: usize,
        /// The model the output was exported from (the reference after the recipe's
        /// transforms): what a simulated candidate starts from.
        source: ModelIn,
        /// How the candidate's weights are had.
        weights: CandidateWeights,
        eval: Eval,
        /// The sentence embedder for answer similarity.
        embedder: Option<ModelIn>,
        /// The float model's scored answers.
        answers: Option<usize>,
    },
    Bundle {
        /// The model the export was made from (name, architecture, tokenizer).
        model: ModelIn,
        export: usize,
        /// The files the bundle's manifest names as the model's sources.
        source: ModelIn,
        adapters: Vec<(AdapterIn, f32)>,
        profile: Box<Profile>,
        runtime: Option<PathBuf>,
        sign: Option<PathBuf>,
        name: String,
        /// The output's format and precision (quant preset).
        format: Format,
        quant: String,
        /// The knowledge base (stage) with the encoder that built it, and its settings.
        rag: Option<(usize, ModelIn, Box<Rag>)>,
    },
    Verify {
        bundle: usize,
        sign: Option<PathBuf>,
        target: String,
    },
}

impl Job {
    pub fn kind(&self) -> &'static str {
        match self {
            Job::Fetch { .. } => "fetch",
            Job::Finetune { .. } => "finetune",
            Job::Merge { .. } => "merge",
            Job::Rag { .. } => "rag",
            Job::Calibrate { .. } => "calibrate",
            Job::Smooth { .. } => "smooth",
            Job::Sparsify { .. } => "sparsify",
            Job::Imatrix { .. } => "imatrix",
            Job::Export { .. } => "export",
            Job::Answers { .. } => "answers",
            Job::Eval { .. } => "eval",
            Job::Bundle { .. } => "bundle",
            Job::Verify { .. } => "verify",
        }
    }

    /// Whether the stage keeps every core busy by itself and so runs alone.
    pub fn exclusive(&self) -> bool {
        matches!(self, Job::Finetune { .. })
    }
}

/// Where an evaluated output's weights come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CandidateWeights {
    /// Read back from the export (a GGUF file).
    Export,
    /// The reference's weights through onnxruntime's blockwise quantizer (an int4 ONNX
    /// export's MatMulNBits), which onnxruntime dequantizes to the same values.
    Blockwise {
        bits: u32,
        block: usize,
        symmetric: bool,
    },
    /// The reference's weights through the per-row int8 quantizer of an int8 ONNX export
    /// (MatMulInteger), with inputs rounded as its DynamicQuantizeLinear rounds them.
    DynamicInt8,
    /// What an ONNX int8-static export runs: the same SmoothQuant fold (`smooth`), its
    /// per-row int8 weights, and each linear's input through QuantizeLinear at the static
    /// scale taken from the statistics of stage `stats`.
    StaticInt8 { stats: usize, smooth: Option<f32> },
    /// The reference's weights rounded to f16, every op in f32: a TFLite fp16 export (float16
    /// buffers widened by DEQUANTIZE).
    HalfWeights,
    /// The reference's weights through the TFLite exporter's per-row int8 quantizer (the
    /// embedding too), each linear's input quantized per token as a hybrid
    /// FULLY_CONNECTED does: a TFLite dynamic-int8 export.
    HybridInt8,
    /// The reference's own weights: an fp32 ONNX or TFLite export computes what the float
    /// model computes, up to the order of f32 operations.
    Float,
}

#[derive(Debug, Clone)]
pub struct Stage {
    /// A stable name for the stage's place in the recipe: `merge`, `export:imx93:gguf-Q4_0`.
    pub id: String,
    pub job: Job,
    /// Stages that must finish first.
    pub deps: Vec<usize>,
    /// What decides the output besides the inputs (shown by `--dry-run` when it changes).
    pub params: Value,
    /// Input files and their SHA-256, hashed into the key.
    pub files: Vec<(PathBuf, String)>,
    /// The content address.
    pub key: String,
    /// A rough peak of resident memory while the stage runs, in bytes.
    pub memory: u64,
    pub target: Option<String>,
}

impl Stage {
    pub fn kind(&self) -> &'static str {
        self.job.kind()
    }
}

/// Where one output of one target is made, checked and packed (stage indices).
#[derive(Debug, Clone)]
pub struct PlannedOutput {
    pub target: String,
    /// Index into the target's outputs.
    pub output: usize,
    pub export: usize,
    pub eval: Option<usize>,
    pub bundle: Option<usize>,
    pub verify: Option<usize>,
}

/// The whole graph, in an order where every stage comes after the stages it reads.
#[derive(Debug, Clone)]
pub struct Plan {
    pub stages: Vec<Stage>,
    pub outputs: Vec<PlannedOutput>,
    /// The training stage, and the base model's scored answers it is compared with.
    pub finetune: Option<usize>,
    pub base_answers: Option<usize>,
    /// The float model's scored answers (one stage every evaluated output reads).
    pub reference_answers: Option<usize>,
    /// The knowledge base, and the float model's answers asked with its passages.
    pub rag: Option<usize>,
    pub rag_answers: Option<usize>,
    /// With `[finetune]` too: the base model's answers asked with the passages.
    pub base_rag_answers: Option<usize>,
}

/// Sizes used for memory estimates: f32 weights of the whole model for stages that run the
/// forward pass, a few tensors' worth for streaming ones.
fn forward_memory(n_params: u64) -> u64 {
    n_params * 4 * 2 + (512 << 20)
}

fn streaming_memory(n_params: u64) -> u64 {
    n_params / 4 + (256 << 20)
}

/// LoRA training: the frozen weights (f32, or bf16 with `base_dtype`) and the activations a
/// pack of samples keeps for the backward pass on every core (1.48 GB measured on
/// SmolLM2-135M in f32 with packs of 64 tokens on 2 cores, 1.23 GB in bf16).
fn training_memory(n_params: u64, config: &TrainConfig) -> u64 {
    let per_param = if config.base_dtype == "bf16" { 6 } else { 8 };
    n_params * per_param + (512 << 20)
}

struct Builder<'a> {
    cache: &'a Cache,
    stages: Vec<Stage>,
}

impl Builder<'_> {
    /// Adds a stage unless an identical one (same key) exists; returns its index.
    fn add(
        &mut self,
        id: String,
        job: Job,
        params: Value,
        files: Vec<PathBuf>,
        memory: u64,
        target: Option<String>,
    ) -> Result<usize> {
        let mut deps = Vec::new();
        let mut models = Vec::new();
        let mut push_model = |m: &ModelIn, deps: &mut Vec<usize>| match m {
            ModelIn::Stage(i) => deps.push(*i),
            ModelIn::Path(p) => models.push(p.clone()),
        };
        match &job {
            Job::Fetch { .. } => {}
            Job::Finetune { base, .. } => push_model(base, &mut deps),
            Job::Merge { base, adapters } => {
                push_model(base, &mut deps);
                deps.extend(adapter_stages(adapters));
            }
            Job::Calibrate { model, .. } | Job::Imatrix { model, .. } => {
                push_model(model, &mut deps)
            }
            Job::Smooth { model, stats, .. } => {
                push_model(model, &mut deps);
                deps.push(*stats);
            }
            Job::Sparsify { model, stats, .. } => {
                push_model(model, &mut deps);
                deps.extend(*stats);
            }
            Job::Export {
                model,
                stats,
                imatrix,
                ..
            } => {
                push_model(model, &mut deps);
                deps.extend(*stats);
                deps.extend(*imatrix);
            }
            Job::Rag { embedder, .. } => push_model(embedder, &mut deps),
            Job::Answers {
                model,
                embedder,
                rag,
                ..
            } => {
                push_model(model, &mut deps);
                push_model(embedder, &mut deps);
                deps.extend(rag.as_ref().map(|r| r.0));
            }
            Job::Eval {
                reference,
                candidate,
                source,
                weights,
                embedder,
                answers,
                ..
            } => {
                push_model(reference, &mut deps);
                deps.push(*candidate);
                if source != reference {
                    push_model(source, &mut deps);
                }
                if let CandidateWeights::StaticInt8 { stats, .. } = weights {
                    deps.push(*stats);
                }
                if let Some(e) = embedder {
                    push_model(e, &mut deps);
                }
                deps.extend(*answers);
            }
            Job::Bundle {
                model,
                export,
                source,
                adapters,
                rag,
                ..
            } => {
                push_model(model, &mut deps);
                push_model(source, &mut deps);
                deps.push(*export);
                deps.extend(adapter_stages(adapters));
                if let Some((kb, encoder, _)) = rag {
                    deps.push(*kb);
                    push_model(encoder, &mut deps);
                }
            }
            Job::Verify { bundle, .. } => deps.push(*bundle),
        }
        deps.sort_unstable();
        deps.dedup();
        let mut inputs = Vec::new();
        for f in models.iter().chain(&files) {
            inputs.push((f.clone(), self.cache.hash_path(f)?));
        }
        let hashed: Vec<Value> = inputs
            .iter()
            .map(|(f, h)| json!([f.display().to_string(), h]))
            .collect();
        let dep_keys: Vec<&str> = deps.iter().map(|d| self.stages[*d].key.as_str()).collect();
        let key = sha256_str(
            &json!({
                "kind": job.kind(),
                "edgepack": TOOL_VERSION,
                "params": params,
                "deps": dep_keys,
                "files": hashed,
            })
            .to_string(),
        );
        if let Some(i) = self.stages.iter().position(|s| s.key == key) {
            return Ok(i);
        }
        self.stages.push(Stage {
            id,
            job,
            deps,
            params,
            files: inputs,
            key,
            memory,
            target,
        });
        Ok(self.stages.len() - 1)
    }
}

fn adapter_stages(adapters: &[(AdapterIn, f32)]) -> impl Iterator<Item = usize> + '_ {
    adapters.iter().filter_map(|(a, _)| match a {
        AdapterIn::Stage(i) => Some(*i),
        AdapterIn::Path(_) => None,
    })
}

fn adapter_files(adapters: &[(AdapterIn, f32)]) -> Vec<PathBuf> {
    adapters
        .iter()
        .filter_map(|(a, _)| match a {
            AdapterIn::Path(p) => Some(p.clone()),
            AdapterIn::Stage(_) => None,
        })
        .collect()
}

/// A source as a stage input: the user's path, or the stage that fetches the package.
fn fetch(b: &mut Builder<'_>, src: &ModelSource, what: &str) -> Result<ModelIn> {
    Ok(match src {
        ModelSource::Path(p) => ModelIn::Path(p.clone()),
        ModelSource::Package {
            name,
            version,
            file,
        } => ModelIn::Stage(b.add(
            format!("fetch:{what}"),
            Job::Fetch {
                package: name.clone(),
                version: version.clone(),
                file: file.clone(),
            },
            json!({"package": name, "version": version, "file": file}),
            vec![],
            256 << 20,
            None,
        )?),
    })
}

/// The parameter count of a model on disk (headers only), for memory estimates.
fn count_params(path: &Path) -> u64 {
    edgepack_converters::import::open(path)
        .map(|m| m.n_params() as u64)
        .unwrap_or(0)
}

/// Expands `recipe` into its stages. `fetched` is the model file a package source resolves to
/// when its fetch stage already ran (it sizes memory estimates); keys never depend on it.
pub fn plan(recipe: &Recipe, cache: &Cache, fetched: Option<&Path>) -> Result<Plan> {
    let n_params = match (&recipe.model, fetched) {
        (ModelSource::Path(p), _) => count_params(p),
        (_, Some(p)) => count_params(p),
        _ => 0,
    };
    let mut b = Builder {
        cache,
        stages: Vec::new(),
    };
    let fwd = forward_memory(n_params.max(1));
    let stream = streaming_memory(n_params.max(1));

    let source = fetch(&mut b, &recipe.model, "model")?;
    let embedder = recipe
        .eval
        .embedder
        .as_ref()
        .filter(|_| recipe.eval.qa.is_some())
        .map(|e| fetch(&mut b, e, "embedder"))
        .transpose()?;

    // The trained adapter is merged first, then the recipe's own, in order.
    let mut adapters: Vec<(AdapterIn, f32)> = Vec::new();
    let (mut finetune, mut base_answers, mut reference_answers) = (None, None, None);
    if let Some(f) = &recipe.finetune {
        let i = b.add(
            "finetune".into(),
            Job::Finetune {
                base: source.clone(),
                data: f.data.clone(),
                config: Box::new(f.config.clone()),
                save_steps: f.save_steps,
            },
            serde_json::to_value(&f.config).expect("a config serializes"),
            vec![f.data.clone()],
            training_memory(n_params.max(1), &f.config),
            None,
        )?;
        adapters.push((AdapterIn::Stage(i), f.weight));
        finetune = Some(i);
        // What fine-tuning is for: the base model's answers, scored as the outputs' are.
        if let (Some(emb), Some(qa)) = (&embedder, &recipe.eval.qa) {
            base_answers = Some(b.add(
                "answers:base".into(),
                Job::Answers {
                    model: source.clone(),
                    eval: recipe.eval.clone(),
                    embedder: emb.clone(),
                    rag: None,
                },
                json!({"max_new_tokens": recipe.eval.max_new_tokens}),
                vec![qa.clone()],
                fwd,
                None,
            )?);
        }
    }
    adapters.extend(
        recipe
            .adapters
            .iter()
            .map(|a| (AdapterIn::Path(a.path.clone()), a.weight)),
    );
    let merged = if adapters.is_empty() {
        source.clone()
    } else {
        let weights: Vec<f32> = adapters.iter().map(|a| a.1).collect();
        ModelIn::Stage(b.add(
            "merge".into(),
            Job::Merge {
                base: source.clone(),
                adapters: adapters.clone(),
            },
            json!({"weights": weights}),
            adapter_files(&adapters),
            stream,
            None,
        )?)
    };

    // The knowledge base, and what it adds to the float model's answers.
    let (mut rag, mut rag_answers, mut base_rag_answers) = (None, None, None);
    let mut bundle_rag = None;
    if let Some(r) = &recipe.rag {
        let encoder = fetch(&mut b, &r.embedder, "embedder")?;
        let mut files: Vec<PathBuf> = r.docs.iter().map(|d| d.0.clone()).collect();
        if let Some((i, o)) = &r.calibrate {
            files.extend([i.clone(), o.clone()]);
        }
        let kb = b.add(
            "rag".into(),
            Job::Rag {
                embedder: encoder.clone(),
                rag: Box::new(r.clone()),
            },
            json!({
                "chunk_tokens": r.chunk_tokens,
                "overlap": r.overlap,
                "precision": format!("{:?}", r.precision).to_lowercase(),
                "false_reject": r.calibrate.as_ref().map(|_| r.false_reject),
            }),
            files,
            512 << 20,
            None,
        )?;
        rag = Some(kb);
        bundle_rag = Some((kb, encoder.clone(), Box::new(r.clone())));
        if let (Some(emb), Some(qa)) = (&embedder, &recipe.eval.qa) {
            let answers = |b: &mut Builder<'_>, id: &str, model: &ModelIn| {
                b.add(
                    id.into(),
                    Job::Answers {
                        model: model.clone(),
                        eval: recipe.eval.clone(),
                        embedder: emb.clone(),
                        rag: Some((kb, Box::new(r.clone()))),
                    },
                    json!({
                        "max_new_tokens": recipe.eval.max_new_tokens,
                        "top_k": r.top_k,
                        "template": r.template,
                    }),
                    vec![qa.clone()],
                    fwd,
                    None,
                )
            };
            rag_answers = Some(answers(&mut b, "answers:rag", &merged)?);
            // Retrieval against fine-tuning: the base model with the passages.
            if base_answers.is_some() {
                base_rag_answers = Some(answers(&mut b, "answers:base+rag", &source)?);
            }
        }
    }

    let cal = &recipe.calibration;
    let data_files: Vec<PathBuf> = cal.data.iter().cloned().collect();
    let calibrate = |b: &mut Builder<'_>, model: &ModelIn, id: &str| -> Result<usize> {
        b.add(
            format!("calibrate:{id}"),
            Job::Calibrate {
                model: model.clone(),
                data: cal.data.clone(),
                samples: cal.samples,
                seq_len: cal.seq_len,
            },
            json!({"samples": cal.samples, "seq_len": cal.seq_len, "data": cal.data.is_some()}),
            data_files.clone(),
            fwd,
            None,
        )
    };

    let mut model = merged.clone();
    for (i, t) in recipe.transforms.iter().enumerate() {
        let stats = if t.needs_stats() {
            Some(calibrate(&mut b, &model, &format!("transforms[{i}]"))?)
        } else {
            None
        };
        let idx = match t {
            Transform::Smooth { alpha, scope } => b.add(
                format!("transforms[{i}]:smooth"),
                Job::Smooth {
                    model: model.clone(),
                    stats: stats.expect("smooth reads statistics"),
                    alpha: alpha.clone(),
                    scope: scope.clone(),
                    data: cal.data.clone(),
                    seq_len: cal.seq_len,
                },
                json!({"alpha": alpha.describe(), "scope": scope, "search_seq_len": cal.seq_len}),
                if *alpha == AlphaSpec::Auto {
                    data_files.clone()
                } else {
                    vec![]
                },
                if *alpha == AlphaSpec::Auto {
                    fwd
                } else {
                    stream
                },
                None,
            )?,
            Transform::Sparsify { method, pattern } => b.add(
                format!("transforms[{i}]:sparsify"),
                Job::Sparsify {
                    model: model.clone(),
                    stats,
                    method: method.clone(),
                    pattern: pattern.clone(),
                },
                json!({"method": method, "pattern": pattern}),
                vec![],
                stream,
                None,
            )?,
        };
        model = ModelIn::Stage(idx);
    }
    let last = model;

    let mut outputs = Vec::new();
    for t in &recipe.targets {
        for (oi, o) in t.outputs.iter().enumerate() {
            let mut planned = PlannedOutput {
                target: t.name.clone(),
                output: oi,
                export: 0,
                eval: None,
                bundle: None,
                verify: None,
            };
            let oid = format!("{}:{}", t.name, o.label());
            let stats = if o.needs_stats() {
                Some(calibrate(&mut b, &last, "final")?)
            } else {
                None
            };
            let imatrix = if o.imatrix {
                Some(b.add(
                    "imatrix".into(),
                    Job::Imatrix {
                        model: last.clone(),
                        data: cal.data.clone(),
                        chunk: cal.seq_len,
                        chunks: cal.samples,
                    },
                    json!({"chunk": cal.seq_len, "chunks": cal.samples, "data": cal.data.is_some()}),
                    data_files.clone(),
                    fwd,
                    None,
                )?)
            } else {
                None
            };
            // The profile matters to an export only through the NPU report of TFLite.
            let profile_param = match o.format {
                crate::recipe::Format::Tflite => json!(t.profile_source),
                _ => Value::Null,
            };
            let export = b.add(
                format!("export:{oid}"),
                Job::Export {
                    model: last.clone(),
                    output: o.clone(),
                    profile: Box::new(t.profile.clone()),
                    stats,
                    imatrix,
                },
                json!({
                    "format": o.format.name(),
                    "quant": o.quant,
                    "ctx": o.ctx,
                    "prefill": o.prefill,
                    "smooth": o.smooth.as_ref().map(AlphaSpec::describe),
                    "profile": profile_param,
                }),
                vec![],
                if o.needs_stats() { fwd } else { stream },
                Some(t.name.clone()),
            )?;
            planned.export = export;
            if o.evaluable() && (recipe.eval.text.is_some() || recipe.eval.qa.is_some()) {
                let e = &recipe.eval;
                let files: Vec<PathBuf> = e.text.iter().chain(&e.qa).cloned().collect();
                let answers = match (&embedder, &e.qa) {
                    (Some(emb), Some(qa)) => Some(b.add(
                        "answers:reference".into(),
                        Job::Answers {
                            model: merged.clone(),
                            eval: e.clone(),
                            embedder: emb.clone(),
                            rag: None,
                        },
                        json!({"max_new_tokens": e.max_new_tokens}),
                        vec![qa.clone()],
                        fwd,
                        None,
                    )?),
                    _ => None,
                };
                reference_answers = reference_answers.or(answers);
                let weights = match (o.format, o.quant.as_str()) {
                    (Format::Gguf, _) => CandidateWeights::Export,
                    (Format::Onnx, "int8") => CandidateWeights::DynamicInt8,
                    (Format::Onnx, "int4") => {
                        // The exporter's own int4 layout (the recipe takes its defaults).
                        let d = OnnxOptions::default();
                        CandidateWeights::Blockwise {
                            bits: 4,
                            block: d.block_size,
                            symmetric: d.symmetric,
                        }
                    }
                    (Format::Onnx, "int8-static") => CandidateWeights::StaticInt8 {
                        stats: stats.expect("int8-static reads statistics"),
                        smooth: o.onnx_smooth(),
                    },
                    (Format::Tflite, "fp16") => CandidateWeights::HalfWeights,
                    (Format::Tflite, "dynamic-int8") => CandidateWeights::HybridInt8,
                    _ => CandidateWeights::Float,
                };
                let mut params = json!({
                    "ctx": e.ctx,
                    "chunks": e.chunks,
                    "max_new_tokens": e.max_new_tokens,
                    "text": e.text.is_some(),
                    "qa": e.qa.is_some(),
                });
                match weights {
                    CandidateWeights::Blockwise {
                        bits,
                        block,
                        symmetric,
                    } => {
                        params["weights"] = json!({"blockwise": {"bits": bits, "block": block, "symmetric": symmetric}});
                    }
                    CandidateWeights::DynamicInt8 => {
                        params["weights"] = json!("dynamic_int8");
                    }
                    CandidateWeights::StaticInt8 { smooth, .. } => {
                        params["weights"] = json!({"int8_static": {"smooth": smooth}});
                    }
                    CandidateWeights::HalfWeights => {
                        params["weights"] = json!("half_weights");
                    }
                    CandidateWeights::HybridInt8 => {
                        params["weights"] = json!("hybrid_int8");
                    }
                    CandidateWeights::Float => {
                        params["weights"] = json!("float");
                    }
                    CandidateWeights::Export => {}
                }
                planned.eval = Some(b.add(
                    format!("eval:{oid}"),
                    Job::Eval {
                        reference: merged.clone(),
                        candidate: export,
                        source: last.clone(),
                        weights,
                        eval: e.clone(),
                        embedder: embedder.clone(),
                        answers,
                    },
                    params,
                    files,
                    fwd * 2,
                    Some(t.name.clone()),
                )?);
            }
            if o.bundle {
                // The target's first bundled output is its bundle; others add format and quant.
                let first = t.outputs.iter().position(|x| x.bundle) == Some(oi);
                let name = if first {
                    format!("{}-{}", recipe.name, t.name)
                } else {
                    format!(
                        "{}-{}-{}-{}",
                        recipe.name,
                        t.name,
                        o.format.name(),
                        o.quant.to_lowercase()
                    )
                };
                let mut files = adapter_files(&adapters);
                files.extend(t.runtime.clone());
                files.extend(recipe.sign.clone());
                let bundle = b.add(
                    format!("bundle:{oid}"),
                    Job::Bundle {
                        model: last.clone(),
                        export,
                        source: source.clone(),
                        adapters: adapters.clone(),
                        profile: Box::new(t.profile.clone()),
                        runtime: t.runtime.clone(),
                        sign: recipe.sign.clone(),
                        name: name.clone(),
                        format: o.format,
                        quant: o.quant.clone(),
                        rag: bundle_rag.clone(),
                    },
                    json!({
                        "name": name,
                        "vela": o.format == Format::Tflite
                            && o.needs_stats()
                            && t.profile.npu.as_ref().is_some_and(|n| n.vela.is_some()),
                        "profile": t.profile_source,
                        "weights": adapters.iter().map(|a| a.1).collect::<Vec<_>>(),
                        "runtime": t.runtime.is_some(),
                        "signed": recipe.sign.is_some(),
                        "rag": recipe.rag.as_ref().map(|r| json!({
                            "top_k": r.top_k,
                            "threshold": r.threshold,
                            "refusal": r.refusal,
                            "template": r.template,
                        })),
                    }),
                    files,
                    stream,
                    Some(t.name.clone()),
                )?;
                planned.bundle = Some(bundle);
                planned.verify = Some(b.add(
                    format!("verify:{oid}"),
                    Job::Verify {
                        bundle,
                        sign: recipe.sign.clone(),
                        target: t.profile.name.clone(),
                    },
                    json!({"target": t.profile.name, "signed": recipe.sign.is_some()}),
                    recipe.sign.iter().cloned().collect(),
                    64 << 20,
                    Some(t.name.clone()),
                )?);
            }
            outputs.push(planned);
        }
    }
    cache.save_hashes()?;
    if b.stages.is_empty() {
        return Err(RecipeError::Io {
            path: recipe.file.clone(),
            message: "the recipe asks for no work".into(),
        });
    }
    Ok(Plan {
        stages: b.stages,
        outputs,
        finetune,
        base_answers,
        reference_answers,
        rag,
        rag_answers,
        base_rag_answers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simulated_output_is_scored_from_the_transformed_model_it_was_exported_from() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("m")).unwrap();
        std::fs::write(d.path().join("e.txt"), "text").unwrap();
        let p = d.path().join("r.toml");
        std::fs::write(
            &p,
            "[model]\npath = \"m\"\n[eval]\ntext = \"e.txt\"\n\
             [[transforms]]\nkind = \"sparsify\"\nmethod = \"magnitude\"\npattern = \"2:4\"\n\
             [targets.imx95]\n\
             [[targets.imx95.outputs]]\nformat = \"onnx\"\nquant = \"int4\"\n\
             [[targets.imx95.outputs]]\nformat = \"onnx\"\nquant = \"int8-static\"\nsmooth = 0.5\n",
        )
        .unwrap();
        let recipe = Recipe::load(&p).unwrap();
        let cache = Cache::open(&d.path().join("cache")).unwrap();
        let plan = plan(&recipe, &cache, None).unwrap();
        let id = |i: usize| plan.stages[i].id.as_str();
        let sparse = plan
            .stages
            .iter()
            .position(|s| s.id == "transforms[0]:sparsify")
            .expect("a sparsify stage");
        for o in &plan.outputs {
            let e = o.eval.expect("both outputs are scored");
            let Job::Eval {
                source,
                weights,
                reference,
                ..
            } = &plan.stages[e].job
            else {
                panic!("{} is not an eval", id(e));
            };
            assert_eq!(*source, ModelIn::Stage(sparse), "{}", id(e));
            assert_ne!(*reference, ModelIn::Stage(sparse), "{}", id(e));
            assert!(plan.stages[e].deps.contains(&sparse), "{}", id(e));
            if let CandidateWeights::StaticInt8 { stats, smooth } = weights {
                assert_eq!(*smooth, Some(0.5));
                assert!(plan.stages[e].deps.contains(stats), "{}", id(e));
                assert!(id(*stats).starts_with("calibrate"), "{}", id(*stats));
            }
        }
    }
}
