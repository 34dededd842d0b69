//! Command definitions (clap) and their wiring to the libraries.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use edgepack_converters::calib::data;
use edgepack_converters::calib::imatrix::{self, Imatrix};
use edgepack_converters::calib::stats::{self, CalibStats};
use edgepack_converters::export::gguf::{export_gguf, plan_types, GgufOptions};
use edgepack_converters::export::gguf_lora::export_gguf_lora;
use edgepack_converters::export::hf::export_hf;
use edgepack_converters::export::tflite::{
    self as tflite, support::OpSupport, Precision, TfliteOptions,
};
use edgepack_converters::import;
use edgepack_converters::io::ensure_not_input;
use edgepack_converters::model::Model;
use edgepack_converters::quant::preset::Preset;
use edgepack_converters::quant::GgmlType;
use edgepack_converters::transform::lora::{load_adapter, merge_adapters, LoraAdapter};
use edgepack_converters::transform::smooth::{self, Alpha};
use serde_json::json;

use crate::progress::Bars;

#[derive(Parser, Debug)]
#[command(
    name = "edgepack",
    version,
    about = "Package language models for small Linux boards",
    long_about = "edgepack imports Hugging Face folders and GGUF files, merges LoRA adapters, \
calibrates, smooths, sparsifies and quantizes, exports GGUF, ONNX and TFLite shaped for a board, \
measures what that costs, and bundles and deploys the result to boards over SSH.",
    after_help = "Examples:\n  edgepack inspect ./SmolLM2-135M-Instruct\n  edgepack export gguf ./base --lora ./adapter --quant Q4_K_M -o model.gguf"
)]
pub struct Cli {
    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show a model's architecture, parameters, dtypes, tokenizer and size per quant type.
    #[command(
        after_help = "Example:\n  edgepack inspect ./TinyLlama-1.1B-Chat\n  edgepack inspect model.gguf --json"
    )]
    Inspect {
        /// A Hugging Face model folder or a .gguf file.
        model: PathBuf,
    },
    /// Merge PEFT LoRA adapters into a base model and write a Hugging Face folder.
    #[command(
        after_help = "Example:\n  edgepack merge ./base --lora ./adapter -o ./merged\n  edgepack merge ./base --lora ./a:1.0 --lora ./b:0.5 -o ./merged --dtype f32"
    )]
    Merge {
        /// The base model: a Hugging Face folder or a .gguf file.
        base: PathBuf,
        #[command(flatten)]
        lora: LoraArgs,
        /// Weight dtype of the output: f32, f16 or bf16 (default: the base's float type).
        #[arg(long)]
        dtype: Option<String>,
        /// Output folder (must not exist or be empty).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Compute an importance matrix (llama-imatrix's GGUF format) for weighted quantization.
    #[command(
        after_help = "Example:\n  edgepack imatrix ./SmolLM2-135M-Instruct --data calib.txt -o imatrix.gguf\n  edgepack export gguf ./SmolLM2-135M-Instruct --quant Q4_K_M --imatrix imatrix.gguf -o model.gguf\n\n--data takes plain UTF-8 text, or JSONL with a \"text\" field per line (.jsonl, or lines starting with '{'). Without --data, edgepack's own calibration text is used."
    )]
    Imatrix {
        /// A Hugging Face model folder or a .gguf file.
        model: PathBuf,
        #[command(flatten)]
        lora: LoraArgs,
        /// Calibration text: plain text, or JSONL with a `text` field per line (default: edgepack's built-in corpus).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Tokens per chunk; each chunk runs from an empty context (llama-imatrix's -c).
        #[arg(long, default_value_t = 512)]
        chunk_size: usize,
        /// Run at most this many chunks (default: all the text gives).
        #[arg(long)]
        chunks: Option<usize>,
        /// Output imatrix path (.gguf).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Record activation statistics of every linear layer's input (for SmoothQuant and static int8 scales).
    #[command(
        after_help = "Example:\n  edgepack calibrate ./SmolLM2-135M-Instruct --data calib.jsonl --samples 64 --seq-len 512 -o stats.calib\n  edgepack smooth ./SmolLM2-135M-Instruct --stats stats.calib --alpha 0.5 -o ./smoothed\n\nThe texts are joined and cut into samples of --seq-len tokens (each from an empty context); text beyond --samples x --seq-len tokens is left out and reported. Without --data, edgepack's own calibration text is used.\n\nThe output is safetensors: per weight W, W.absmax, W.sum_sq and W.hist (|x| histogram), with the model identity and per-tensor min, max and 99.99th percentile of |x| in __metadata__."
    )]
    Calibrate {
        /// A Hugging Face model folder or a .gguf file.
        model: PathBuf,
        #[command(flatten)]
        lora: LoraArgs,
        /// Calibration text: plain text, or JSONL with a `text` field per line (default: edgepack's built-in corpus).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Run at most this many samples (default: all the text gives).
        #[arg(long)]
        samples: Option<usize>,
        /// Tokens per sample; each sample runs from an empty context.
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// Output statistics file (.calib, safetensors).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Apply SmoothQuant (an exact rescaling of norms, projections and their consumers) and write a Hugging Face folder.
    #[command(
        after_help = "Example:\n  edgepack calibrate ./model -o stats.calib\n  edgepack smooth ./model --stats stats.calib --alpha 0.5 -o ./smoothed\n  edgepack smooth ./model --stats stats.calib --alpha 0.5,0.5,0.8,0.8 -o ./smoothed --dtype f32\n  edgepack smooth ./model --stats stats.calib --alpha auto --data calib.txt -o ./smoothed\n\n--alpha takes one value, one per layer separated by commas, or `auto`: a search per layer for the alpha with the lowest int8 (W8A8) output error on calibration text. The result computes the same function as the input (up to float rounding); only the input of an int8-activation quantizer benefits."
    )]
    Smooth(SmoothArgs),
    /// Prune the decoder's linear weights (magnitude or Wanda; unstructured or N:M) and write a Hugging Face folder.
    #[command(
        after_help = "Example:\n  edgepack calibrate ./model -o stats.calib\n  edgepack sparsify ./model --method wanda --ratio 0.5 --stats stats.calib -o ./sparse\n  edgepack sparsify ./model --method magnitude --pattern 2:4 -o ./sparse24\n\nEmbeddings, norms and the output projection stay dense. The report lists the sparsity each tensor reached."
    )]
    Sparsify(crate::eval_cmd::SparsifyArgs),
    /// Measure quality: perplexity, KL divergence and top-1 agreement of candidates against the float model, answer similarity, and speed.
    #[command(
        after_help = "Example:\n  edgepack eval ./model --against model-Q4_K_M.gguf --data eval.txt\n  edgepack eval ./model --stats stats.calib --w8a8 --w8a8-smooth 0.5 --json\n  edgepack eval ./model --qa qa.jsonl --embedder ./all-MiniLM-L6-v2 --prompt-sizes 32,128,512 --plot ttft.svg\n\nCandidates are dequantized and run by the same f32 engine as the reference, so the figures measure the weights (and, for --w8a8, the int8 activations), not a runtime."
    )]
    Eval(crate::eval_cmd::EvalArgs),
    /// Export a model to a file format.
    #[command(subcommand)]
    Export(Export),
    #[command(flatten)]
    Targets(crate::targets_cmd::TargetCommand),
    #[command(flatten)]
    Deploy(crate::deploy_cmd::DeployCommand),
}

#[derive(Args, Debug)]
struct SmoothArgs {
    /// A Hugging Face model folder or a .gguf file (the one the statistics were computed on).
    model: PathBuf,
    /// Statistics from `edgepack calibrate`.
    #[arg(long)]
    stats: PathBuf,
    /// Migration strength α in 0..=1: one value, one per layer (comma-separated), or `auto`.
    #[arg(long, default_value = "0.5")]
    alpha: String,
    /// Calibration text for `--alpha auto` (default: edgepack's own corpus).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Tokens per sample of the `--alpha auto` search.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Which folds: `all` (norms → projections, v → o, up → down) or `norms` (only the
    /// norm groups, as the SmoothQuant reference does for Llama).
    #[arg(long, value_enum, default_value_t = ScopeArg::All)]
    scope: ScopeArg,
    /// Weight dtype of the output: f32, f16 or bf16 (default: the model's float type).
    #[arg(long)]
    dtype: Option<String>,
    /// Output folder (must not exist or be empty).
    #[arg(short, long)]
    output: PathBuf,
}

/// `--scope` of `edgepack smooth`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ScopeArg {
    All,
    Norms,
}

impl From<ScopeArg> for smooth::Scope {
    fn from(s: ScopeArg) -> smooth::Scope {
        match s {
            ScopeArg::All => smooth::Scope::All,
            ScopeArg::Norms => smooth::Scope::Norms,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Export {
    /// Write a GGUF file for llama.cpp and Ollama, quantized with llama.cpp's rules.
    #[command(
        after_help = "Example:\n  edgepack export gguf ./base --lora ./adapter --quant Q4_K_M -o model.gguf\n  edgepack export gguf ./base --quant Q4_K_M --imatrix imatrix.gguf -o model.gguf\n\nQuantizations: F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K"
    )]
    Gguf {
        /// A Hugging Face model folder or a .gguf file.
        model: PathBuf,
        #[command(flatten)]
        lora: LoraArgs,
        /// Quantization preset (llama.cpp file type), e.g. Q4_K_M, Q8_0, F16.
        #[arg(long, default_value = "F16")]
        quant: String,
        /// Give every quantizable tensor the preset's base type (no mixture), like llama-quantize --pure.
        #[arg(long)]
        pure: bool,
        /// `general.name` in the file (default: the model's name).
        #[arg(long)]
        name: Option<String>,
        /// Importance matrix (from `edgepack imatrix` or llama-imatrix, GGUF or legacy .dat) weighting the quantizers.
        #[arg(long, value_name = "FILE")]
        imatrix: Option<PathBuf>,
        /// Output .gguf path.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Write any importable model (HF folder or GGUF) as a Hugging Face folder.
    #[command(
        after_help = "Example:\n  edgepack export hf ./model.gguf -o ./hf\n  edgepack export hf ./base --lora ./adapter --dtype bf16 -o ./merged"
    )]
    Hf {
        /// A Hugging Face model folder or a .gguf file.
        model: PathBuf,
        #[command(flatten)]
        lora: LoraArgs,
        /// Weight dtype: f32, f16 or bf16 (default: the source's float type; f32 for quantized GGUF).
        #[arg(long)]
        dtype: Option<String>,
        /// Output folder (must not exist or be empty).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Write a LiteRT (TFLite) model with prefill and decode signatures and the KV cache as inputs and outputs.
    #[command(
        after_help = "Example:\n  edgepack export tflite ./merged --precision fp32 -o model.tflite\n  edgepack export tflite ./merged --precision dynamic-int8 --seq-len 256 --target imx93 -o model.tflite\n  edgepack export tflite ./merged --precision int8 --stats stats.calib --smooth 0.5 --target imx93 --seq-len 256 -o model.tflite\n\nPrecisions: fp32, fp16 (f16 weights), dynamic-int8 (int8 per-channel weights, float activations), int8 (full integer for NPUs: int8 per-channel weights, int8 activations into q/k/v and gate/up, int16 elsewhere and in the KV cache; scales calibrated on the --stats file's samples after --smooth; float logits), int8-a16 (full integer with int16 activations everywhere: more accurate, where the NPU takes 16x8).\nSignatures: prefill_<L> (tokens [1, L]) and decode (tokens [1, 1]); inputs tokens, input_pos, kv_cache_k_<i>/kv_cache_v_<i> [1, seq_len, kv_heads, head_dim]; outputs logits and the updated caches.\nThe tokenizer (tokenizer.json), tokenizer_config.json with the chat template and edgepack.json are stored as model metadata.\nWith --target, the ops the board's NPU will not take are reported before writing."
    )]
    Tflite {
        /// A Hugging Face model folder or a .gguf file.
        model: PathBuf,
        #[command(flatten)]
        lora: LoraArgs,
        /// fp32, fp16, dynamic-int8, int8 or int8-a16 (the last two need --stats).
        #[arg(long, default_value = "fp32")]
        precision: String,
        /// KV cache length (static): the most positions a conversation holds.
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        /// Tokens per prefill call (the prefill_<L> signature); default: --seq-len.
        #[arg(long)]
        prefill_len: Option<usize>,
        /// Board whose NPU op support to report (imx8mp, imx93, imx95, rpi5).
        #[arg(long)]
        target: Option<String>,
        /// A board profile file of your own instead of --target (same fields as `targets show`).
        #[arg(long, value_name = "FILE", conflicts_with = "target")]
        profile: Option<PathBuf>,
        /// Activation statistics (from `edgepack calibrate`) for --precision int8 / int8-a16.
        #[arg(long, value_name = "FILE")]
        stats: Option<PathBuf>,
        /// SmoothQuant strength applied before int8 quantization (0..1, or one per layer: 0.5,0.8,...).
        #[arg(long, value_name = "ALPHA")]
        smooth: Option<String>,
        /// Output .tflite path.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Write a PEFT LoRA adapter as a GGUF adapter (llama.cpp --lora, Ollama ADAPTER).
    #[command(
        name = "gguf-lora",
        after_help = "Example:\n  edgepack export gguf-lora ./adapter --base ./base -o adapter.gguf"
    )]
    GgufLora {
        /// The PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
        adapter: PathBuf,
        /// The base model the adapter was trained on (HF folder or GGUF).
        #[arg(long)]
        base: PathBuf,
        /// Tensor type of the adapter: f32, f16, bf16 or q8_0.
        #[arg(long, default_value = "f32")]
        outtype: String,
        /// Output .gguf path.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Write an ONNX decoder with KV cache for onnxruntime (and onnxruntime-genai with --ops contrib).
    #[command(
        after_help = "Example:\n  edgepack export onnx ./merged --precision int4 -o out/onnx\n  edgepack export onnx ./merged --precision int8-static --stats stats.calib --smooth 0.5 -o out/onnx\n  edgepack export onnx ./merged --precision fp16 --ops standard -o out/onnx\n\nPrecisions: fp32 fp16 int8 (dynamic) int4 (weight-only, MatMulNBits) int8-static (W8A8 QDQ)\nOperator sets: contrib (onnxruntime com.microsoft ops; writes genai_config.json for onnxruntime-genai)\n               standard (default-domain ONNX ops only, Optimum input names with position_ids)"
    )]
    Onnx {
        /// A Hugging Face model folder or a .gguf file.
        model: PathBuf,
        #[command(flatten)]
        lora: LoraArgs,
        /// fp32, fp16, int8, int4 or int8-static.
        #[arg(long, default_value = "fp32")]
        precision: String,
        /// Operator set: contrib or standard.
        #[arg(long, default_value = "contrib")]
        ops: String,
        /// int4 block size along the input dimension: 32, 64 or 128.
        #[arg(long, default_value_t = 32)]
        block_size: usize,
        /// int4 with a zero point per block (default: symmetric).
        #[arg(long, conflicts_with = "symmetric")]
        asymmetric: bool,
        /// int4 without zero points (the default).
        #[arg(long)]
        symmetric: bool,
        /// Calibration statistics for int8-static (from `edgepack calibrate`).
        #[arg(long, value_name = "FILE")]
        stats: Option<PathBuf>,
        /// SmoothQuant strength alpha (0..=1) applied before int8-static quantization.
        #[arg(long, value_name = "ALPHA")]
        smooth: Option<f32>,
        /// Output folder (must not exist or be empty).
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
pub(crate) struct LoraArgs {
    /// PEFT LoRA adapter folder to merge, optionally with a weight: --lora ./a:0.5 (repeatable).
    #[arg(long = "lora", value_name = "DIR[:WEIGHT]")]
    adapters: Vec<String>,
}

impl LoraArgs {
    pub(crate) fn parse(&self) -> Result<Vec<(PathBuf, f32)>> {
        self.adapters
            .iter()
            .map(|s| {
                if let Some((p, w)) = s.rsplit_once(':') {
                    if let Ok(w) = w.parse::<f32>() {
                        return Ok((PathBuf::from(p), w));
                    }
                    if !Path::new(s).exists() {
                        bail!("--lora {s}: `{w}` is not a number\nhint: --lora DIR or --lora DIR:WEIGHT");
                    }
                }
                Ok((PathBuf::from(s), 1.0))
            })
            .collect()
    }

    fn paths(&self) -> Result<Vec<PathBuf>> {
        Ok(self.parse()?.into_iter().map(|(p, _)| p).collect())
    }
}

pub(crate) fn parse_float_dtype(s: &str) -> Result<GgmlType> {
    let t: GgmlType = s.parse().map_err(anyhow::Error::msg)?;
    if !matches!(t, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        bail!("--dtype {s}: use f32, f16 or bf16");
    }
    Ok(t)
}

/// Opens a model and merges adapters into it (lazily).
pub(crate) fn load(model: &Path, lora: &LoraArgs) -> Result<(Model, Vec<LoraAdapter>)> {
    let mut m = import::open(model).with_context(|| format!("importing {}", model.display()))?;
    let mut adapters = Vec::new();
    for (p, w) in lora.parse()? {
        let ad = load_adapter(&p).with_context(|| format!("reading adapter {}", p.display()))?;
        if let Some(base) = &ad.base_model {
            let leaf = base.rsplit('/').next().unwrap_or(base);
            if !m.name.to_lowercase().contains(&leaf.to_lowercase()) {
                tracing::info!(
                    "{}: trained on `{base}`; the base given is `{}` (shapes are checked)",
                    p.display(),
                    m.name
                );
            }
        }
        adapters.push((ad, w));
    }
    merge_adapters(&mut m, &adapters).context("merging LoRA adapters")?;
    Ok((m, adapters.into_iter().map(|(a, _)| a).collect()))
}

pub(crate) fn inputs<'a>(model: &'a Path, lora: &'a [PathBuf]) -> Vec<&'a Path> {
    let mut v = vec![model];
    v.extend(lora.iter().map(PathBuf::as_path));
    v
}

pub fn run(cli: Cli) -> Result<()> {
    let json_out = cli.json;
    match cli.command {
        Command::Inspect { model } => inspect(&model, json_out),
        Command::Sparsify(a) => crate::eval_cmd::run_sparsify(&a, json_out),
        Command::Eval(a) => crate::eval_cmd::run_eval(&a, json_out),
        Command::Targets(c) => crate::targets_cmd::run(c, json_out),
        Command::Deploy(c) => crate::deploy_cmd::run(c, json_out),
        Command::Merge {
            base,
            lora,
            dtype,
            output,
        } => {
            if lora.adapters.is_empty() {
                bail!("merge needs at least one --lora adapter\nhint: edgepack merge ./base --lora ./adapter -o ./merged");
            }
            write_hf(&base, &lora, dtype.as_deref(), &output, json_out)
        }
        Command::Export(Export::Hf {
            model,
            lora,
            dtype,
            output,
        }) => write_hf(&model, &lora, dtype.as_deref(), &output, json_out),
        Command::Export(Export::Gguf {
            model,
            lora,
            quant,
            pure,
            name,
            imatrix,
            output,
        }) => {
            let preset: Preset = quant.parse().map_err(anyhow::Error::msg)?;
            let lp = lora.paths()?;
            let mut ins = inputs(&model, &lp);
            ins.extend(imatrix.as_deref());
            ensure_not_input(&output, &ins)?;
            let t0 = Instant::now();
            let (m, _) = load(&model, &lora)?;
            let (weights, extra) = match &imatrix {
                Some(p) => {
                    let im = Imatrix::read(p)
                        .with_context(|| format!("reading imatrix {}", p.display()))?;
                    let w = im.weights_for(&m, p).with_context(|| {
                        format!("imatrix {} does not fit {}", p.display(), model.display())
                    })?;
                    (Some(std::sync::Arc::new(w)), im.provenance(p))
                }
                None => (None, Default::default()),
            };
            let bars = Bars::new(json_out);
            let opts = GgufOptions {
                preset,
                pure,
                imatrix: weights,
                name,
                extra,
            };
            let report = export_gguf(&m, &output, &opts, &bars).with_context(|| {
                format!("exporting {} to {}", model.display(), output.display())
            })?;
            let secs = t0.elapsed().as_secs_f64();
            if json_out {
                let mut v = serde_json::to_value(&report)?;
                v["seconds"] = json!(secs);
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "wrote {} ({}, {:.2} MiB, {:.2} bits/weight, {} tensors) in {:.1}s",
                    report.path,
                    report.preset,
                    report.bytes as f64 / (1 << 20) as f64,
                    report.bits_per_weight,
                    report.tensors.len(),
                    secs
                );
                if report.fallbacks > 0 {
                    println!(
                        "note: {} tensors have rows that do not divide into 256-element blocks and use a fallback type (as llama-quantize does)",
                        report.fallbacks
                    );
                }
            }
            Ok(())
        }
        Command::Export(Export::Onnx {
            model,
            lora,
            precision,
            ops,
            block_size,
            asymmetric,
            symmetric: _,
            stats,
            smooth,
            output,
        }) => run_export_onnx(
            &model,
            &lora,
            OnnxArgs {
                precision: &precision,
                ops: &ops,
                block_size,
                asymmetric,
                stats: stats.as_deref(),
                smooth,
            },
            &output,
            json_out,
        ),
        Command::Imatrix {
            model,
            lora,
            data,
            chunk_size,
            chunks,
            output,
        } => run_imatrix(
            &model,
            &lora,
            data.as_deref(),
            chunk_size,
            chunks,
            &output,
            json_out,
        ),
        Command::Calibrate {
            model,
            lora,
            data,
            samples,
            seq_len,
            output,
        } => run_calibrate(
            &model,
            &lora,
            data.as_deref(),
            samples,
            seq_len,
            &output,
            json_out,
        ),
        Command::Smooth(a) => run_smooth(&a, json_out),
        Command::Export(Export::Tflite {
            model,
            lora,
            precision,
            seq_len,
            prefill_len,
            target,
            profile,
            stats,
            smooth,
            output,
        }) => run_export_tflite(TfliteArgs {
            model: &model,
            lora: &lora,
            precision: &precision,
            seq_len,
            prefill_len,
            target: target.as_deref(),
            profile: profile.as_deref(),
            stats: stats.as_deref(),
            smooth: smooth.as_deref(),
            output: &output,
            json_out,
        }),
        Command::Export(Export::GgufLora {
            adapter,
            base,
            outtype,
            output,
        }) => {
            ensure_not_input(&output, &[&adapter, &base])?;
            let ty: GgmlType = outtype.parse().map_err(anyhow::Error::msg)?;
            let m = import::open(&base).with_context(|| format!("importing {}", base.display()))?;
            let ad = load_adapter(&adapter)
                .with_context(|| format!("reading adapter {}", adapter.display()))?;
            let r = export_gguf_lora(&ad, &m, &output, ty)
                .with_context(|| format!("exporting {}", adapter.display()))?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "wrote {} ({} modules, alpha {}, {}, {:.2} MiB)",
                    r.path,
                    r.modules,
                    r.alpha,
                    r.ty,
                    r.bytes as f64 / (1 << 20) as f64
                );
            }
            Ok(())
        }
    }
}

/// The TFLite export options as given on the command line.
struct TfliteArgs<'a> {
    model: &'a Path,
    lora: &'a LoraArgs,
    precision: &'a str,
    seq_len: usize,
    prefill_len: Option<usize>,
    target: Option<&'a str>,
    profile: Option<&'a Path>,
    stats: Option<&'a Path>,
    smooth: Option<&'a str>,
    output: &'a Path,
    json_out: bool,
}

/// The TFLite operator support of a board's NPU, from its profile's `[npu]` table; `None`
/// when the board has no NPU or its NPU does not take TFLite.
fn npu_support(p: &edgepack_targets::Profile) -> Option<OpSupport> {
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

fn run_export_tflite(a: TfliteArgs<'_>) -> Result<()> {
    let TfliteArgs {
        model,
        lora,
        precision,
        seq_len,
        prefill_len,
        target,
        profile,
        stats,
        smooth,
        output,
        json_out,
    } = a;
    let precision = Precision::parse(precision)
        .with_context(|| format!("--precision {precision}: use one of {}", Precision::ALL))?;
    let lp = lora.paths()?;
    let mut ins = inputs(model, &lp);
    ins.extend(stats);
    ensure_not_input(output, &ins)?;
    let target = match (target, profile) {
        (None, None) => None,
        (t, p) => {
            let p = crate::targets_cmd::resolve_profile(t, p)?;
            let support = npu_support(&p);
            if support.is_none() && !json_out {
                eprintln!(
                    "{}: no NPU takes TFLite there; every operator runs on the CPU",
                    p.name
                );
            }
            support
        }
    };
    if smooth.is_some() && stats.is_none() {
        bail!("--smooth needs --stats (the activation statistics SmoothQuant scales come from)");
    }
    let calibration = match stats {
        Some(p) => Some(tflite::Calibration {
            stats: CalibStats::read(p).with_context(|| format!("reading {}", p.display()))?,
            path: p.to_path_buf(),
            alpha: smooth.map(parse_alpha).transpose()?,
        }),
        None => None,
    };
    let (m, _) = load(model, lora)?;
    let opts = TfliteOptions {
        precision,
        seq_len,
        prefill_len: prefill_len.unwrap_or(seq_len),
        target,
        calibration,
    };
    let started = Instant::now();
    let prepared = tflite::prepare(&m, &opts, &Bars::new(json_out))
        .with_context(|| format!("exporting {} to TFLite", model.display()))?;
    if let (Some(t), false) = (&prepared.report.target, json_out) {
        eprintln!(
            "{} ({}): {} of {} operators on the NPU; CPU fallbacks:",
            t.board, t.npu, t.on_npu, t.operators
        );
        for f in &t.cpu_fallbacks {
            eprintln!(
                "  {:>4} x {:<22} {} (first: {})",
                f.count, f.op, f.reason, f.first_output
            );
        }
    }
    let r = tflite::write(prepared, output, &Bars::new(json_out))
        .with_context(|| format!("writing {}", output.display()))?;
    if json_out {
        let mut v = serde_json::to_value(&r)?;
        v["seconds"] = json!(started.elapsed().as_secs_f64());
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let sigs: Vec<&str> = r.signatures.iter().map(|s| s.key.as_str()).collect();
        println!(
            "wrote {} ({}, signatures {}, {:.2} MiB, {:.1} s)",
            r.path,
            r.precision.name(),
            sigs.join(" + "),
            r.bytes as f64 / (1 << 20) as f64,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// What every command that runs calibration text needs: the output checked against the
/// inputs, the texts (or the default corpus) with their dataset name, and the merged model.
fn calibration_inputs(
    model: &Path,
    lora: &LoraArgs,
    data: Option<&Path>,
    output: &Path,
) -> Result<(Model, Vec<String>, String)> {
    let lp = lora.paths()?;
    let mut ins = inputs(model, &lp);
    ins.extend(data);
    ensure_not_input(output, &ins)?;
    let (m, _) = load(model, lora)?;
    let (texts, dataset) = data::texts_or_default(data, &m).context("reading calibration data")?;
    Ok((m, texts, dataset))
}

fn run_imatrix(
    model: &Path,
    lora: &LoraArgs,
    data: Option<&Path>,
    chunk_size: usize,
    chunks: Option<usize>,
    output: &Path,
    json_out: bool,
) -> Result<()> {
    if chunks == Some(0) {
        bail!("--chunks 0: give at least one chunk");
    }
    let t0 = Instant::now();
    let (m, texts, dataset) = calibration_inputs(model, lora, data, output)?;
    let bars = Bars::new(json_out);
    let mut im = imatrix::compute(&m, &texts, chunk_size, chunks, &bars).with_context(|| {
        format!(
            "computing the imatrix of {} over {dataset}",
            model.display()
        )
    })?;
    im.datasets = vec![dataset.clone()];
    im.write_gguf(output)
        .with_context(|| format!("writing {}", output.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    if json_out {
        let v = json!({
            "path": output.display().to_string(),
            "entries": im.entries.len(),
            "chunks": im.chunk_count,
            "chunk_size": im.chunk_size,
            "datasets": im.datasets,
            "seconds": secs,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "wrote {} ({} weights, {} chunks of {} tokens from {dataset}) in {:.1}s",
            output.display(),
            im.entries.len(),
            im.chunk_count,
            im.chunk_size,
            secs
        );
    }
    Ok(())
}

fn run_calibrate(
    model: &Path,
    lora: &LoraArgs,
    data: Option<&Path>,
    samples: Option<usize>,
    seq_len: usize,
    output: &Path,
    json_out: bool,
) -> Result<()> {
    if samples == Some(0) {
        bail!("--samples 0: give at least one sample");
    }
    let t0 = Instant::now();
    let (m, texts, dataset) = calibration_inputs(model, lora, data, output)?;
    let bars = Bars::new(json_out);
    let mut st = stats::compute(&m, &texts, seq_len, samples, &bars)
        .with_context(|| format!("calibrating {} over {dataset}", model.display()))?;
    st.dataset = dataset.clone();
    st.write(output)
        .with_context(|| format!("writing {}", output.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    let truncated = st.tokens_truncated();
    if json_out {
        let v = json!({
            "path": output.display().to_string(),
            "entries": st.entries.len(),
            "samples": st.samples,
            "seq_len": st.seq_len,
            "tokens_total": st.tokens_total,
            "tokens_used": st.tokens_used,
            "tokens_truncated": truncated,
            "dataset": st.dataset,
            "seconds": secs,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "wrote {} ({} weights, {} samples of {} tokens from {dataset}) in {:.1}s",
            output.display(),
            st.entries.len(),
            st.samples,
            st.seq_len,
            secs
        );
        if truncated > 0 {
            println!(
                "note: truncated: the text has {} tokens, {} were used ({} samples x {} tokens); {truncated} were left out",
                st.tokens_total, st.tokens_used, st.samples, st.seq_len
            );
        }
    }
    Ok(())
}

/// The ONNX export options as given on the command line.
struct OnnxArgs<'a> {
    precision: &'a str,
    ops: &'a str,
    block_size: usize,
    asymmetric: bool,
    stats: Option<&'a Path>,
    smooth: Option<f32>,
}

fn run_export_onnx(
    model: &Path,
    lora: &LoraArgs,
    a: OnnxArgs<'_>,
    output: &Path,
    json_out: bool,
) -> Result<()> {
    use edgepack_converters::export::onnx::{self, OnnxOptions, StaticCalibration};
    let precision: onnx::Precision = a.precision.parse().map_err(anyhow::Error::msg)?;
    let ops: onnx::OpSet = a.ops.parse().map_err(anyhow::Error::msg)?;
    if a.smooth.is_some() && a.stats.is_none() {
        bail!("--smooth needs --stats FILE (from `edgepack calibrate`)");
    }
    let lp = lora.paths()?;
    let mut ins = inputs(model, &lp);
    ins.extend(a.stats);
    ensure_not_input(output, &ins)?;
    let t0 = Instant::now();
    let (m, _) = load(model, lora)?;
    let calibration = match a.stats {
        Some(p) => Some(StaticCalibration {
            stats: CalibStats::read(p).with_context(|| format!("reading {}", p.display()))?,
            path: p.to_path_buf(),
            smooth: a.smooth,
        }),
        None => None,
    };
    let opts = OnnxOptions {
        ops,
        precision,
        block_size: a.block_size,
        symmetric: !a.asymmetric,
        calibration,
    };
    let bars = Bars::new(json_out);
    let report = onnx::export_onnx(&m, output, &opts, &bars)
        .with_context(|| format!("exporting {} to {}", model.display(), output.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    if json_out {
        let mut v = serde_json::to_value(&report)?;
        v["seconds"] = json!(secs);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "wrote {} ({} {}, {:.2} MiB of weights, {} nodes) in {:.1}s",
            report.path,
            report.precision,
            a.ops,
            report.data_bytes as f64 / (1 << 20) as f64,
            report.nodes,
            secs
        );
    }
    Ok(())
}

fn parse_alpha(s: &str) -> Result<Alpha> {
    let vals = s
        .split(',')
        .map(|v| {
            v.trim()
                .parse::<f32>()
                .map_err(|_| anyhow::anyhow!("--alpha {s}: `{v}` is not a number\nhint: --alpha 0.5, or one value per layer: --alpha 0.5,0.5,0.8"))
        })
        .collect::<Result<Vec<f32>>>()?;
    Ok(if vals.len() == 1 {
        Alpha::Global(vals[0])
    } else {
        Alpha::PerLayer(vals)
    })
}

fn run_smooth(a: &SmoothArgs, json_out: bool) -> Result<()> {
    let (model, stats_path, output) = (&a.model, &a.stats, &a.output);
    let mut ins: Vec<&Path> = vec![model, stats_path];
    ins.extend(a.data.as_deref());
    ensure_not_input(output, &ins)?;
    let t0 = Instant::now();
    let m = import::open(model).with_context(|| format!("importing {}", model.display()))?;
    let dtype = match &a.dtype {
        Some(d) => parse_float_dtype(d)?,
        None => m.float_dtype(),
    };
    let st = CalibStats::read(stats_path)
        .with_context(|| format!("reading statistics {}", stats_path.display()))?;
    let scope: smooth::Scope = a.scope.into();
    let bars = Bars::new(json_out);
    let mut search = None;
    let alpha = if a.alpha.trim() == "auto" {
        let (texts, dataset) =
            data::texts_or_default(a.data.as_deref(), &m).context("reading calibration data")?;
        let (alpha, per_layer) =
            smooth::search_alpha(&m, &st, stats_path, &texts, a.seq_len, scope, &bars)
                .with_context(|| format!("searching alpha on {dataset}"))?;
        search = Some(per_layer);
        alpha
    } else {
        parse_alpha(&a.alpha)?
    };
    let smoothed = smooth::smooth(&m, &st, stats_path, &alpha, scope).with_context(|| {
        format!(
            "smoothing {} with {}",
            model.display(),
            stats_path.display()
        )
    })?;
    let (sm, rep) = (smoothed.model, smoothed.report);
    let r = export_hf(&sm, output, dtype, &bars)
        .with_context(|| format!("writing {}", output.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    if json_out {
        let mut v = serde_json::to_value(&r)?;
        v["smooth"] = serde_json::to_value(&rep)?;
        if let Some(s) = &search {
            v["alpha_search"] = serde_json::to_value(s)?;
        }
        v["seconds"] = json!(secs);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "wrote {} ({} tensors, {}; {} groups smoothed, max |activation| {:.3} -> {:.3}) in {:.1}s",
            r.path, r.n_tensors, r.dtype, rep.groups, rep.act_max_before, rep.act_max_after, secs
        );
        if let Some(s) = &search {
            let a: Vec<String> = s.iter().map(|l| format!("{:.2}", l.alpha)).collect();
            println!(
                "alpha per layer (lowest W8A8 output error): {}",
                a.join(",")
            );
        }
    }
    Ok(())
}

fn write_hf(
    model: &Path,
    lora: &LoraArgs,
    dtype: Option<&str>,
    output: &Path,
    json_out: bool,
) -> Result<()> {
    let lp = lora.paths()?;
    ensure_not_input(output, &inputs(model, &lp))?;
    let (m, _) = load(model, lora)?;
    let dtype = match dtype {
        Some(d) => parse_float_dtype(d)?,
        None => m.float_dtype(),
    };
    let bars = Bars::new(json_out);
    let t0 = Instant::now();
    let r = export_hf(&m, output, dtype, &bars)
        .with_context(|| format!("writing {}", output.display()))?;
    if json_out {
        let mut v = serde_json::to_value(&r)?;
        v["seconds"] = json!(t0.elapsed().as_secs_f64());
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "wrote {} ({} tensors, {}, {:.2} MiB) in {:.1}s",
            r.path,
            r.n_tensors,
            r.dtype,
            r.bytes as f64 / (1 << 20) as f64,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn inspect(path: &Path, json_out: bool) -> Result<()> {
    let m = import::open(path).with_context(|| format!("importing {}", path.display()))?;
    let c = &m.config;
    let mut sizes = Vec::new();
    for p in [
        Preset::F16,
        Preset::Q8_0,
        Preset::Q6_K,
        Preset::Q5_K_M,
        Preset::Q4_K_M,
        Preset::Q4_0,
    ] {
        let opts = GgufOptions {
            preset: p,
            pure: false,
            imatrix: None,
            name: None,
            extra: Default::default(),
        };
        let plan = plan_types(&m, &opts)?;
        let bytes: usize = plan
            .iter()
            .map(|p| p.ty.bytes_for(p.ne.iter().product()).unwrap_or(0))
            .sum();
        let n: usize = plan.iter().map(|p| p.ne.iter().product::<usize>()).sum();
        sizes.push(json!({"quant": p.name(), "bytes": bytes, "bits_per_weight": bytes as f64 * 8.0 / n.max(1) as f64,
            "fallbacks": plan.iter().filter(|p| p.wanted.is_some()).count()}));
    }
    let dtypes: Vec<_> = m
        .dtypes()
        .into_iter()
        .map(|(d, n)| json!({"dtype": d.name(), "tensors": n}))
        .collect();
    let tok = &m.tokenizer;
    let tok_kind = tok.tokenizer_json.as_ref().and_then(|t| {
        serde_json::from_str::<serde_json::Value>(t)
            .ok()?
            .pointer("/model/type")?
            .as_str()
            .map(str::to_owned)
    });
    let vocab_entries = tok.tokenizer_json.as_ref().and_then(|t| {
        serde_json::from_str::<serde_json::Value>(t)
            .ok()?
            .pointer("/model/vocab")
            .map(|v| {
                v.as_object()
                    .map(|o| o.len())
                    .or(v.as_array().map(|a| a.len()))
                    .unwrap_or(0)
            })
    });
    let info = json!({
        "path": path.display().to_string(),
        "name": m.name,
        "format": match m.source_format { edgepack_converters::model::SourceFormat::HfFolder => "hf", _ => "gguf" },
        "architecture": c.arch.gguf_name(),
        "hf_class": c.arch.hf_class(),
        "n_params": m.n_params(),
        "bytes": m.source_bytes(),
        "dtypes": dtypes,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "layers": c.num_hidden_layers,
        "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "context_length": c.max_position_embeddings,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_type(),
        "tied_embeddings": c.tie_word_embeddings,
        "tokenizer": {
            "present": !tok.is_empty(),
            "kind": tok_kind,
            "vocab_entries": vocab_entries,
            "sentencepiece_model": tok.sentencepiece_model.is_some(),
            "chat_template": tok.chat_template().is_some(),
        },
        "gguf_sizes": sizes,
    });
    if json_out {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!("{}  ({})", m.name, path.display());
    println!(
        "  architecture   {} ({})",
        c.arch.gguf_name(),
        c.arch.hf_class()
    );
    println!(
        "  parameters     {:.1} M in {} tensors, {:.1} MiB as stored",
        m.n_params() as f64 / 1e6,
        m.tensors.len(),
        m.source_bytes() as f64 / (1 << 20) as f64
    );
    let dt: Vec<String> = m
        .dtypes()
        .iter()
        .map(|(d, n)| format!("{d} x{n}"))
        .collect();
    println!("  dtypes         {}", dt.join(", "));
    println!(
        "  shape          {} layers, hidden {}, ffn {}, heads {}/{} (kv), head_dim {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim
    );
    println!(
        "  vocab          {} (embeddings {})",
        c.vocab_size,
        if c.tie_word_embeddings {
            "tied"
        } else {
            "untied"
        }
    );
    println!(
        "  context        {} (rope theta {}{})",
        c.max_position_embeddings,
        c.rope_theta,
        c.rope_type()
            .map(|t| format!(", scaling {t}"))
            .unwrap_or_default()
    );
    println!(
        "  tokenizer      {}{}",
        if tok.is_empty() {
            "missing".to_string()
        } else {
            tok_kind.unwrap_or_else(|| "sentencepiece".into())
        },
        if tok.chat_template().is_some() {
            ", chat template"
        } else {
            ""
        }
    );
    println!("  GGUF size by quantization (llama-quantize's mixtures):");
    for s in sizes {
        println!(
            "    {:<8} {:>9.1} MiB  {:>5.2} bpw{}",
            s["quant"].as_str().unwrap_or(""),
            s["bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
            s["bits_per_weight"].as_f64().unwrap_or(0.0),
            match s["fallbacks"].as_u64() {
                Some(0) | None => String::new(),
                Some(n) => format!("  ({n} tensors fall back: rows not divisible by 256)"),
            }
        );
    }
    Ok(())
}
