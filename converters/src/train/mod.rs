//! LoRA fine-tuning on the host forward pass ([`crate::calib::forward`], made differentiable
//! by attaching LoRA pairs as candle variables): data, AdamW with transformers' schedules,
//! gradient accumulation and clipping, eval loss, atomic checkpoints that resume bit for bit,
//! and a PEFT adapter folder with a training report as the result.

pub mod adapter;
pub mod data;
pub mod optim;
pub mod select;
mod threads;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor as CTensor, D};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::calib::forward::{with_dropout, BaseDtype, Forward};
use crate::error::{Error, Result};
use crate::io::{AtomicDir, AtomicFile};
use crate::model::stats::ModelIdentity;
use crate::model::Model;
use adapter::{LoraSpec, Pair};
use data::{Example, TrainOn};
use optim::{AdamW, Moments, Schedule};
use select::{SelectBy, Selection};
use threads::run_packs;
pub use threads::SingleThreadedOps;

/// Everything that decides what a run computes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub rslora: bool,
    pub targets: Vec<String>,
    pub lr: f64,
    pub epochs: u32,
    /// Stop after this many optimizer steps (before the epochs are done).
    pub max_steps: Option<u64>,
    /// Samples per forward/backward group, and groups per optimizer step.
    pub batch: usize,
    pub grad_accum: usize,
    pub seq_len: usize,
    pub warmup_steps: u64,
    pub schedule: String,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Gradient-norm clipping (0 turns it off).
    pub max_grad_norm: f64,
    pub seed: u64,
    pub eval_split: f64,
    pub train_on: String,
    /// Train on this many of the training samples only, chosen by `select_by`.
    #[serde(default)]
    pub select: Option<usize>,
    /// `score` (base-model loss and entropy with a diversity term) or `random`.
    #[serde(default = "default_select_by")]
    pub select_by: String,
    /// Weight of the diversity term against usefulness when scoring.
    #[serde(default = "default_select_diversity")]
    pub select_diversity: f64,
    /// How the frozen base weights are held: `f32`, or `bf16` for half their memory. Left
    /// out of the serialized config at `f32`, so configs (and recipe cache keys) from before
    /// it existed read the same.
    #[serde(default = "default_base_dtype", skip_serializing_if = "is_f32")]
    pub base_dtype: String,
}

fn default_base_dtype() -> String {
    BaseDtype::F32.as_str().into()
}

fn is_f32(s: &str) -> bool {
    s == BaseDtype::F32.as_str()
}

fn default_select_by() -> String {
    "score".into()
}

fn default_select_diversity() -> f64 {
    1.0
}

/// The defaults `edgepack finetune` and a recipe's `[finetune]` table use: PEFT's LoRA
/// (rank 16, alpha 32, dropout 0.05, every projection of the decoder) and transformers'
/// AdamW (betas 0.9/0.999, eps 1e-8, no weight decay, clipping at 1), 3 epochs at 2e-4 with
/// cosine decay, loss on the answers only.
impl Default for TrainConfig {
    fn default() -> TrainConfig {
        TrainConfig {
            rank: 16,
            alpha: 32.0,
            dropout: 0.05,
            rslora: false,
            targets: DEFAULT_TARGETS.iter().map(|t| t.to_string()).collect(),
            lr: 2e-4,
            epochs: 3,
            max_steps: None,
            batch: 8,
            grad_accum: 1,
            seq_len: 512,
            warmup_steps: 0,
            schedule: "cosine".into(),
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            eval_split: 0.1,
            train_on: "completion".into(),
            select: None,
            select_by: default_select_by(),
            select_diversity: default_select_diversity(),
            base_dtype: default_base_dtype(),
        }
    }
}

/// The modules adapted unless told otherwise: every linear layer of the decoder.
pub const DEFAULT_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl TrainConfig {
    fn schedule(&self) -> Result<Schedule> {
        self.schedule.parse().map_err(Error::Invalid)
    }

    fn train_on(&self) -> Result<TrainOn> {
        self.train_on.parse().map_err(Error::Invalid)
    }

    pub fn base_dtype(&self) -> Result<BaseDtype> {
        self.base_dtype
            .parse()
            .map_err(|e| Error::Invalid(format!("--base-dtype: {e}")))
    }

    fn select_by(&self) -> Result<SelectBy> {
        self.select_by
            .parse()
            .map_err(|e| Error::Invalid(format!("--select-by {e}")))
    }

    fn optimizer(&self) -> AdamW {
        AdamW {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    /// Samples per optimizer step.
    pub fn samples_per_step(&self) -> usize {
        self.batch * self.grad_accum
    }

    /// Refuses values no run can use (zero batch, a learning rate that is not positive, an
    /// unknown schedule...), naming the option.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.batch == 0 || self.grad_accum == 0 {
            return bad("--batch and --grad-accum must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("--lr {}: give a positive learning rate", self.lr));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!(
                "--dropout {}: give a value in [0, 1)",
                self.dropout
            ));
        }
        if !(0.0..1.0).contains(&self.eval_split) {
            return bad(format!(
                "--eval-split {}: give a share in [0, 1)",
                self.eval_split
            ));
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return bad("--epochs 0 without --max-steps trains nothing".into());
        }
        if self.targets.is_empty() {
            return bad("--targets names no module".into());
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return bad(format!("--alpha {}: give a positive number", self.alpha));
        }
        if self.select == Some(0) {
            return bad("--select 0 keeps no sample".into());
        }
        if !(self.select_diversity >= 0.0 && self.select_diversity.is_finite()) {
            return bad(format!(
                "--select-diversity {}: give 0 or more",
                self.select_diversity
            ));
        }
        self.schedule()?;
        self.train_on()?;
        self.select_by()?;
        self.base_dtype()?;
        Ok(())
    }
}

/// What [`preflight`] found: the samples a run would train and evaluate on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DataCounts {
    pub train: usize,
    pub eval: usize,
    pub truncated: usize,
}

/// Everything about a run that can be refused without loading the weights: the options, and
/// the data read, tokenized and split as the run will (malformed lines, samples with no
/// answer and an empty training set are errors naming the file and the line).
pub fn preflight(model: &Model, data: &Path, cfg: &TrainConfig) -> Result<DataCounts> {
    cfg.check()?;
    let ds = data::read_dataset(data, model, cfg.seq_len, cfg.train_on()?)?;
    let (train, eval) = data::split(ds.examples.len(), cfg.eval_split, cfg.seed);
    Ok(DataCounts {
        train: train.len(),
        eval: eval.len(),
        truncated: ds.truncated,
    })
}

/// One optimizer step's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    /// 1-based optimizer step.
    pub step: u64,
    pub epoch: u32,
    /// Mean cross-entropy per trained token of the step's samples.
    pub loss: f64,
    pub lr: f64,
    /// Gradient L2 norm before clipping.
    pub grad_norm: f64,
    /// Tokens run through the model (prompt and answer) in this step.
    pub tokens: u64,
    /// Tokens the loss was taken on.
    pub label_tokens: u64,
    pub seconds: f64,
}

/// An eval-loss measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalLog {
    /// Optimizer steps done when it was taken (0: the base model with the initial adapter).
    pub step: u64,
    pub loss: f64,
    pub label_tokens: u64,
}

/// What the trainer reports while it runs (the CLI draws a bar or prints JSON lines).
pub trait TrainProgress: Sync {
    fn start(&self, _total_steps: u64, _first_step: u64) {}
    fn step(&self, _log: &StepLog) {}
    fn eval(&self, _log: &EvalLog) {}
    fn checkpoint(&self, _path: &Path) {}
    fn finish(&self) {}
}

/// Where a run reads and writes.
pub struct Run<'a> {
    pub model: &'a Model,
    /// How the base is named in `adapter_config.json` (`base_model_name_or_path`).
    pub base_name: String,
    pub data: &'a Path,
    pub out: &'a Path,
    /// Initial A/B from a PEFT adapter instead of PEFT's random initialisation.
    pub init: Option<&'a Path>,
    /// A `checkpoint-N` folder of an earlier run to continue.
    pub resume: Option<&'a Path>,
    /// Save a checkpoint every this many steps (0: none).
    pub save_every: u64,
    /// Measure eval loss every this many steps (0: at the start and the end only).
    pub eval_every: u64,
    /// Checkpoints kept (oldest removed first); 0 keeps all.
    pub keep_checkpoints: usize,
    /// Threads, each running whole packs of samples. candle's own operations are fastest
    /// single-threaded under this (`RAYON_NUM_THREADS=1` before the first candle call, as
    /// `edgepack finetune` sets it); the result does not depend on the count.
    pub threads: usize,
}

/// The counts of the data as read and split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataReport {
    pub path: String,
    pub sha256: String,
    pub train_samples: usize,
    pub eval_samples: usize,
    pub truncated: usize,
    /// Lines dropped for having no trained token within the sequence length.
    pub dropped_lines: Vec<usize>,
    /// With `--select`: the candidates, scored, and which were kept.
    #[serde(default)]
    pub selection: Option<Selection>,
}

/// `training_report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    pub edgepack_version: String,
    pub base: String,
    pub base_identity: BaseIdentity,
    pub config: TrainConfig,
    pub data: DataReport,
    /// Module paths adapted.
    pub modules: Vec<String>,
    pub trainable_parameters: usize,
    pub total_steps: u64,
    pub steps: Vec<StepLog>,
    pub eval: Vec<EvalLog>,
    pub tokens_seen: u64,
    pub label_tokens_seen: u64,
    /// Wall time of the training steps (eval and checkpoints excluded), summed over resumes.
    pub train_seconds: f64,
    pub tokens_per_second: f64,
    pub peak_rss_bytes: Option<u64>,
    /// Steps this process ran (the rest came from the checkpoint resumed).
    pub resumed_from_step: u64,
}

/// What ties a checkpoint to its base: shapes and names, and the bytes of the small tensors
/// (norms, biases), which differ between fine-tunes of one architecture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseIdentity {
    #[serde(flatten)]
    pub layout: ModelIdentity,
    pub small_tensors_sha256: String,
}

impl BaseIdentity {
    pub fn of(model: &Model) -> Result<BaseIdentity> {
        let mut h = Sha256::new();
        let mut small: Vec<_> = model
            .tensors
            .iter()
            .filter(|t| t.shape.len() == 1)
            .collect();
        small.sort_by(|a, b| a.name.cmp(&b.name));
        for t in small {
            h.update(t.name.as_bytes());
            for x in t.to_f32()? {
                h.update(x.to_le_bytes());
            }
        }
        Ok(BaseIdentity {
            layout: ModelIdentity::of(model),
            small_tensors_sha256: format!("{:x}", h.finalize()),
        })
    }
}

/// `trainer_state.json` of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    report: TrainReport,
}

fn ce(e: candle_core::Error) -> Error {
    Error::Invalid(format!("training: {e}"))
}

/// The peak resident set of this process (Linux), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The trainable state: parameter values (A, B per module) and their moments.
struct Params {
    modules: Vec<String>,
    /// Per module: A then B.
    values: Vec<Vec<f32>>,
    shapes: Vec<[usize; 2]>,
    moments: Vec<Moments>,
}

impl Params {
    fn of(fwd: &Forward) -> Result<Params> {
        let mut p = Params {
            modules: Vec::new(),
            values: Vec::new(),
            shapes: Vec::new(),
            moments: Vec::new(),
        };
        for (name, l) in fwd.loras() {
            p.modules.push(name);
            for v in [&l.a, &l.b] {
                let (r, c) = v.as_tensor().dims2().map_err(ce)?;
                p.values.push(
                    v.as_tensor()
                        .flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(ce)?,
                );
                p.shapes.push([r, c]);
                p.moments.push(Moments::zeros(r * c));
            }
        }
        Ok(p)
    }

    /// Copies the values into the model's variables.
    fn load_into(&self, fwd: &Forward) -> Result<()> {
        for (i, (_, l)) in fwd.loras().into_iter().enumerate() {
            for (j, v) in [&l.a, &l.b].into_iter().enumerate() {
                let k = 2 * i + j;
                let t = CTensor::from_slice(
                    &self.values[k],
                    (self.shapes[k][0], self.shapes[k][1]),
                    &Device::Cpu,
                )
                .map_err(ce)?;
                v.set(&t).map_err(ce)?;
            }
        }
        Ok(())
    }

    fn pairs(&self) -> Vec<Pair> {
        self.modules
            .iter()
            .enumerate()
            .map(|(i, m)| Pair {
                module: m.clone(),
                a: self.values[2 * i].clone(),
                a_shape: self.shapes[2 * i],
                b: self.values[2 * i + 1].clone(),
                b_shape: self.shapes[2 * i + 1],
            })
            .collect()
    }

    fn expect(&self) -> Vec<(String, [usize; 2], [usize; 2])> {
        self.modules
            .iter()
            .enumerate()
            .map(|(i, m)| (m.clone(), self.shapes[2 * i], self.shapes[2 * i + 1]))
            .collect()
    }

    fn set_pairs(&mut self, pairs: Vec<Pair>) {
        for (i, p) in pairs.into_iter().enumerate() {
            self.values[2 * i] = p.a;
            self.values[2 * i + 1] = p.b;
        }
    }

    fn count(&self) -> usize {
        self.values.iter().map(Vec::len).sum()
    }

    fn moments_bytes(&self) -> Result<Vec<u8>> {
        let mut t = Vec::with_capacity(self.moments.len() * 2);
        for (k, m) in self.moments.iter().enumerate() {
            let part = if k % 2 == 0 { "lora_A" } else { "lora_B" };
            let module = &self.modules[k / 2];
            let shape = self.shapes[k].to_vec();
            t.push((
                format!("{module}.{part}.exp_avg"),
                m.m.as_slice(),
                shape.clone(),
            ));
            t.push((format!("{module}.{part}.exp_avg_sq"), m.v.as_slice(), shape));
        }
        adapter::safetensors_bytes(&t)
    }

    fn read_moments(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::format(path, "header", e.to_string()))?;
        for k in 0..self.moments.len() {
            let part = if k % 2 == 0 { "lora_A" } else { "lora_B" };
            let module = &self.modules[k / 2];
            for (suffix, dst) in [("exp_avg", 0), ("exp_avg_sq", 1)] {
                let name = format!("{module}.{part}.{suffix}");
                let view = st
                    .tensor(&name)
                    .map_err(|_| Error::format(path, &name, "missing"))?;
                if view.dtype() != safetensors::Dtype::F32 || view.shape() != self.shapes[k] {
                    return Err(Error::format(
                        path,
                        &name,
                        format!(
                            "{:?} {:?}, expected F32 {:?}",
                            view.dtype(),
                            view.shape(),
                            self.shapes[k]
                        ),
                    ));
                }
                let v: Vec<f32> = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                if dst == 0 {
                    self.moments[k].m = v;
                } else {
                    self.moments[k].v = v;
                }
            }
        }
        Ok(())
    }
}

/// Tokens run through the model in one forward/backward: samples are packed up to this many
/// (a longer one runs alone), and each thread takes the next pack when it is free. Small packs
/// balance the threads and bound the activations kept for backward (several MB per token for
/// a 135M model with every linear adapted). Measured on SmolLM2-135M, Tern T3 data, batch 8,
/// 2 threads, release build: 32 tokens 186 tokens/s at 1.49 GB peak RSS, 64 tokens 179 at
/// 1.49 GB, 128 tokens 179 at 1.88 GB (most samples of 64 tokens or more run alone).
pub const PACK_TOKENS: usize = 64;

/// Consecutive groups of `examples` of at most [`PACK_TOKENS`] input tokens each.
fn packs<'a>(examples: &[&'a Example]) -> Vec<Vec<&'a Example>> {
    let mut out: Vec<Vec<&Example>> = Vec::new();
    let mut used = 0;
    for &ex in examples {
        let n = ex.ids.len() - 1;
        match out.last_mut() {
            Some(p) if used + n <= PACK_TOKENS => {
                p.push(ex);
                used += n;
            }
            _ => {
                out.push(vec![ex]);
                used = n;
            }
        }
    }
    out
}

/// Sum of cross-entropy over the trained positions of a pack of samples, as a graph to the
/// LoRA pairs, and how many tokens it covers.
fn pack_loss(fwd: &Forward, pack: &[&Example]) -> Result<(CTensor, usize)> {
    let mut inputs = Vec::new();
    let mut lengths = Vec::with_capacity(pack.len());
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for ex in pack {
        let n = ex.ids.len();
        let offset = inputs.len();
        inputs.extend_from_slice(&ex.ids[..n - 1]);
        lengths.push(n - 1);
        for t in 0..n - 1 {
            if ex.train[t + 1] {
                rows.push((offset + t) as u32);
                targets.push(ex.ids[t + 1]);
            }
        }
    }
    let logits = fwd.logits_graph_packed(&inputs, &lengths, Some(&rows))?;
    let k = rows.len();
    let max = logits.max_keepdim(D::Minus1).map_err(ce)?.detach();
    let lse = logits
        .broadcast_sub(&max)
        .and_then(|x| x.exp())
        .and_then(|x| x.sum_keepdim(D::Minus1))
        .and_then(|x| x.log())
        .and_then(|x| x + max)
        .map_err(ce)?;
    let idx = CTensor::from_vec(targets, (k, 1), &Device::Cpu).map_err(ce)?;
    let picked = logits.gather(&idx, 1).map_err(ce)?;
    let loss = (lse - picked).and_then(|x| x.sum_all()).map_err(ce)?;
    Ok((loss, k))
}

/// Mean loss per trained token over `examples`, without gradients.
fn eval_loss(fwd: &Forward, examples: &[&Example], threads: usize) -> Result<(f64, u64)> {
    let all = packs(examples);
    let out = run_packs(&all, threads, |_, pack| {
        let (l, k) = pack_loss(fwd, pack)?;
        Ok((l.to_scalar::<f32>().map_err(ce)? as f64, k as u64))
    })?;
    let sum: f64 = out.iter().map(|x| x.0).sum();
    let n: u64 = out.iter().map(|x| x.1).sum();
    Ok((sum / n.max(1) as f64, n))
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("report serializes") + "\n";
    let mut f = AtomicFile::create(path)?;
    f.write_all(text.as_bytes())?;
    f.commit()
}

/// Trains; returns the report (also written to `out/training_report.json`).
pub fn train(
    run: &Run<'_>,
    cfg: &TrainConfig,
    progress: &dyn TrainProgress,
) -> Result<TrainReport> {
    cfg.check()?;
    let model = run.model;
    let identity = BaseIdentity::of(model)?;

    let data_sha256 = sha256_file(run.data)?;

    // Everything that can be refused is checked before the first step.
    let resume_state = match run.resume {
        Some(dir) => Some(read_resume(dir, cfg, &identity, run.data, &data_sha256)?),
        None => {
            check_out_dir(run.out)?;
            None
        }
    };
    let ds = data::read_dataset(run.data, model, cfg.seq_len, cfg.train_on()?)?;
    let (train_idx, eval_idx) = data::split(ds.examples.len(), cfg.eval_split, cfg.seed);
    let mut train_set: Vec<&Example> = train_idx.iter().map(|&i| &ds.examples[i]).collect();
    let eval_set: Vec<&Example> = eval_idx.iter().map(|&i| &ds.examples[i]).collect();

    let mut fwd = Forward::with_base(model, cfg.base_dtype()?)?;
    // Selection scores with the base model, before any LoRA pair exists; the held-out
    // samples stay as they are, so eval losses compare across selections.
    let selection = match cfg.select {
        Some(k) => {
            let s = select::select(
                &fwd,
                &train_set,
                k,
                cfg.select_by()?,
                cfg.select_diversity,
                cfg.seed,
                run.threads,
            )?;
            train_set = s.kept().map(|i| train_set[i]).collect();
            Some(s)
        }
        None => None,
    };
    let modules = fwd.attach_lora(
        &cfg.targets,
        cfg.rank,
        cfg.alpha,
        cfg.rslora,
        cfg.dropout,
        cfg.seed,
    )?;
    let mut params = Params::of(&fwd)?;
    let n_params = params.values.len();
    if let Some(init) = run.init {
        params.set_pairs(adapter::read_pairs(init, &params.expect())?);
    }

    let per_step = cfg.samples_per_step();
    let steps_per_epoch = train_set.len().div_ceil(per_step) as u64;
    let mut total = steps_per_epoch * cfg.epochs as u64;
    if let Some(m) = cfg.max_steps {
        total = if cfg.epochs == 0 { m } else { total.min(m) };
    }
    let schedule = cfg.schedule()?;
    let opt = cfg.optimizer();

    let data_report = DataReport {
        path: run.data.display().to_string(),
        sha256: data_sha256,
        train_samples: train_set.len(),
        eval_samples: eval_set.len(),
        truncated: ds.truncated,
        dropped_lines: ds.dropped.clone(),
        selection,
    };
    let mut report = TrainReport {
        edgepack_version: env!("CARGO_PKG_VERSION").to_string(),
        base: run.base_name.clone(),
        base_identity: identity.clone(),
        config: cfg.clone(),
        data: data_report,
        modules: modules.clone(),
        trainable_parameters: params.count(),
        total_steps: total,
        steps: Vec::new(),
        eval: Vec::new(),
        tokens_seen: 0,
        label_tokens_seen: 0,
        train_seconds: 0.0,
        tokens_per_second: 0.0,
        peak_rss_bytes: None,
        resumed_from_step: 0,
    };
    let mut start = 0u64;
    if let Some((dir, state)) = &resume_state {
        params.set_pairs(adapter::read_pairs(dir, &params.expect())?);
        params.read_moments(&dir.join("optimizer.safetensors"))?;
        start = state.step;
        report.steps = state.report.steps.clone();
        report.eval = state.report.eval.clone();
        report.tokens_seen = state.report.tokens_seen;
        report.label_tokens_seen = state.report.label_tokens_seen;
        report.train_seconds = state.report.train_seconds;
        report.resumed_from_step = start;
    }
    params.load_into(&fwd)?;
    std::fs::create_dir_all(run.out).map_err(|e| Error::io(run.out, e))?;

    progress.start(total, start);
    if start == 0 && !eval_set.is_empty() {
        let (loss, n) = eval_loss(&fwd, &eval_set, run.threads)?;
        let log = EvalLog {
            step: 0,
            loss,
            label_tokens: n,
        };
        progress.eval(&log);
        report.eval.push(log);
    }
    let mut last_checkpoint = run.resume.map(Path::to_path_buf);
    for step in start..total {
        let t0 = Instant::now();
        let epoch = (step / steps_per_epoch) as u32;
        let within = (step % steps_per_epoch) as usize;
        let mut order: Vec<usize> = (0..train_set.len()).collect();
        data::shuffle(
            &mut order,
            cfg.seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9),
        );
        let batch: Vec<&Example> = order
            [within * per_step..((within + 1) * per_step).min(order.len())]
            .iter()
            .map(|&i| train_set[i])
            .collect();
        let label_tokens: usize = batch.iter().map(|e| e.n_labels()).sum();
        let tokens: usize = batch.iter().map(|e| e.ids.len() - 1).sum();
        let step_packs = packs(&batch);
        let scale = 1.0 / label_tokens as f64;
        let per_pack = run_packs(&step_packs, run.threads, |i, pack| {
            // Each pack's dropout masks come from the seed, the step and the pack alone.
            let seed = cfg.seed
                ^ (step + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
                ^ (i as u64 + 1).wrapping_mul(0x8CB9_2BA7_2F3D_8DD7);
            with_dropout(Some(seed), || -> Result<(f64, Vec<Vec<f32>>)> {
                let (loss, _) = pack_loss(&fwd, pack)?;
                let value = loss.to_scalar::<f32>().map_err(ce)? as f64;
                if !value.is_finite() {
                    return Ok((value, Vec::new()));
                }
                // Normalised by the trained tokens of the whole step, as transformers does
                // with gradient accumulation, so the step's gradient is the mean over them.
                let gs = loss
                    .affine(scale, 0.0)
                    .and_then(|l| l.backward())
                    .map_err(ce)?;
                let mut g = Vec::with_capacity(n_params);
                for (_, l) in fwd.loras() {
                    for v in [&l.a, &l.b] {
                        g.push(match gs.get(v.as_tensor()) {
                            Some(t) => t
                                .flatten_all()
                                .and_then(|t| t.to_vec1::<f32>())
                                .map_err(ce)?,
                            None => vec![0.0; v.as_tensor().elem_count()],
                        });
                    }
                }
                Ok((value, g))
            })
        })?;
        let mut grads: Vec<Vec<f32>> = params.values.iter().map(|v| vec![0.0; v.len()]).collect();
        let mut loss_sum = 0f64;
        for (value, g) in per_pack {
            if !value.is_finite() {
                return Err(nan_error(
                    step + 1,
                    value,
                    &batch,
                    last_checkpoint.as_deref(),
                ));
            }
            loss_sum += value;
            for (acc, x) in grads.iter_mut().zip(g) {
                acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
            }
        }
        if grads.iter().flatten().any(|g| !g.is_finite()) {
            return Err(nan_error(
                step + 1,
                f64::NAN,
                &batch,
                last_checkpoint.as_deref(),
            ));
        }
        let grad_norm = optim::clip(&mut grads, cfg.max_grad_norm);
        let lr = cfg.lr * schedule.factor(step, cfg.warmup_steps, total);
        for (k, g) in grads.iter().enumerate() {
            opt.update(
                &mut params.values[k],
                g,
                &mut params.moments[k],
                step + 1,
                lr,
            );
        }
        params.load_into(&fwd)?;
        let seconds = t0.elapsed().as_secs_f64();
        let log = StepLog {
            step: step + 1,
            epoch,
            loss: loss_sum / label_tokens as f64,
            lr,
            grad_norm,
            tokens: tokens as u64,
            label_tokens: label_tokens as u64,
            seconds,
        };
        report.tokens_seen += log.tokens;
        report.label_tokens_seen += log.label_tokens;
        report.train_seconds += seconds;
        progress.step(&log);
        report.steps.push(log);

        let done = step + 1;
        let last = done == total;
        if !eval_set.is_empty() && (last || (run.eval_every > 0 && done % run.eval_every == 0)) {
            let (loss, n) = eval_loss(&fwd, &eval_set, run.threads)?;
            let log = EvalLog {
                step: done,
                loss,
                label_tokens: n,
            };
            progress.eval(&log);
            report.eval.push(log);
        }
        if run.save_every > 0 && done % run.save_every == 0 && !last {
            report.peak_rss_bytes = peak_rss_bytes();
            let dir = save_checkpoint(run, &report, &params, done)?;
            progress.checkpoint(&dir);
            last_checkpoint = Some(dir);
            prune_checkpoints(run.out, run.keep_checkpoints)?;
        }
    }
    report.tokens_per_second = report.tokens_seen as f64 / report.train_seconds.max(1e-9);
    report.peak_rss_bytes = peak_rss_bytes();
    write_final(run, &report, &params)?;
    progress.finish();
    Ok(report)
}

fn nan_error(step: u64, value: f64, batch: &[&Example], last: Option<&Path>) -> Error {
    let lines: Vec<String> = batch.iter().map(|e| e.line.to_string()).collect();
    Error::Invalid(format!(
        "training stopped at step {step}: the loss is {value} on the batch of data lines {}; no adapter was written{}\nhint: lower --lr, or check those samples",
        lines.join(", "),
        match last {
            Some(p) => format!("; the last good checkpoint is {}", p.display()),
            None => String::new(),
        }
    ))
}

/// Refuses an output folder that holds files, so a run never mixes with another's.
fn check_out_dir(out: &Path) -> Result<()> {
    if out.exists() {
        let empty = std::fs::read_dir(out)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Err(Error::Invalid(format!(
                "{}: exists and is not an empty folder\nhint: choose a new -o path, or continue a run with --resume {}/checkpoint-N",
                out.display(),
                out.display()
            )));
        }
    }
    Ok(())
}

/// Reads a checkpoint's state and checks that it belongs to this base, data and config.
fn read_resume(
    dir: &Path,
    cfg: &TrainConfig,
    identity: &BaseIdentity,
    data: &Path,
    data_sha256: &str,
) -> Result<(PathBuf, TrainerState)> {
    let p = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| Error::format(&p, "json", format!("not a trainer state: {e}")))?;
    if state.report.base_identity != *identity {
        return Err(Error::mismatch(
            &p,
            "base_identity",
            "the checkpoint was trained on another base model",
        ));
    }
    let (a, b) = (
        serde_json::to_value(&state.report.config).expect("serializes"),
        serde_json::to_value(cfg).expect("serializes"),
    );
    // Keys either side may leave out at their default (`base_dtype`) count from both sides.
    let (a, b) = (
        a.as_object().expect("an object"),
        b.as_object().expect("an object"),
    );
    for k in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
        if matches!(k.as_str(), "epochs" | "max_steps") {
            continue;
        }
        if a.get(k) != b.get(k) {
            let shown = |v: Option<&serde_json::Value>| match v {
                Some(v) => v.to_string(),
                None => "the default".into(),
            };
            return Err(Error::mismatch(
                &p,
                format!("config.{k}"),
                format!(
                    "the checkpoint was trained with {}, this run asks for {}\nhint: resume with the same options",
                    shown(a.get(k)),
                    shown(b.get(k))
                ),
            ));
        }
    }
    if state.report.data.sha256 != data_sha256 {
        return Err(Error::mismatch(
            &p,
            "data.sha256",
            format!(
                "the checkpoint was trained on other data than {}",
                data.display()
            ),
        ));
    }
    Ok((dir.to_path_buf(), state))
}

fn save_checkpoint(
    run: &Run<'_>,
    report: &TrainReport,
    params: &Params,
    step: u64,
) -> Result<PathBuf> {
    let dir = run.out.join(format!("checkpoint-{step}"));
    // A run resumed from an earlier checkpoint passes the steps of the later ones again;
    // their stale folders (this trainer's own, by their state file) give way to the new ones.
    if dir.join("trainer_state.json").is_file() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    let staging = AtomicDir::create(&dir)?;
    let spec = spec_of(&report.config);
    adapter::write_adapter(staging.staging(), &run.base_name, &spec, &params.pairs())?;
    let p = staging.staging().join("optimizer.safetensors");
    std::fs::write(&p, params.moments_bytes()?).map_err(|e| Error::io(&p, e))?;
    let state = TrainerState {
        step,
        report: report.clone(),
    };
    let p = staging.staging().join("trainer_state.json");
    std::fs::write(
        &p,
        serde_json::to_string_pretty(&state).expect("serializes"),
    )
    .map_err(|e| Error::io(&p, e))?;
    staging.commit()?;
    Ok(dir)
}

fn prune_checkpoints(out: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    found.sort();
    while found.len() > keep {
        let (_, p) = found.remove(0);
        std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

fn spec_of(cfg: &TrainConfig) -> LoraSpec {
    LoraSpec {
        rank: cfg.rank,
        alpha: cfg.alpha,
        dropout: cfg.dropout,
        rslora: cfg.rslora,
        targets: cfg.targets.clone(),
    }
}

/// The finished adapter: the files go in whole, the weights last, so a folder with a weights
/// file is a complete adapter.
fn write_final(run: &Run<'_>, report: &TrainReport, params: &Params) -> Result<()> {
    let staging = run.out.join(format!(".final.{}.tmp", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    }
    std::fs::create_dir(&staging).map_err(|e| Error::io(&staging, e))?;
    let result = (|| {
        adapter::write_adapter(
            &staging,
            &run.base_name,
            &spec_of(&report.config),
            &params.pairs(),
        )?;
        write_json(&staging.join("training_report.json"), report)?;
        for name in [
            "training_report.json",
            "adapter_config.json",
            "adapter_model.safetensors",
        ] {
            let to = run.out.join(name);
            std::fs::rename(staging.join(name), &to).map_err(|e| Error::io(&to, e))?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}
