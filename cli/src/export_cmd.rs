//! `edgepack merge` and `edgepack export gguf|hf|tflite|gguf-lora|onnx`: a model written in a
//! file format.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use edgepack_converters::calib::imatrix::Imatrix;
use edgepack_converters::export::gguf::{export_gguf, GgufOptions};
use edgepack_converters::export::gguf_lora::export_gguf_lora;
use edgepack_converters::export::hf::export_hf;
use edgepack_converters::export::tflite::{self as tflite, Precision, TfliteOptions};
use edgepack_converters::import;
use edgepack_converters::io::ensure_not_input;
use edgepack_converters::model::stats::CalibStats;
use edgepack_converters::model::Model;
use edgepack_converters::quant::preset::Preset;
use edgepack_converters::quant::GgmlType;
use edgepack_converters::transform::lora::load_adapter;
use edgepack_converters::transform::smooth;
use serde_json::json;

use edgepack_recipes::stages::npu_support;

use crate::args::{inputs, load, parse_alpha, parse_float_dtype, resolve_profile, LoraArgs};
use crate::progress::Bars;

#[derive(Subcommand, Debug)]
pub enum Export {
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
        /// SmoothQuant strength applied before int8 quantization (0..1, or one per layer: 0.5,0.8,...,
        /// or `auto`: searched per layer on the built-in calibration text at the prefill length).
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

pub fn run(cmd: Export, json_out: bool) -> Result<()> {
    match cmd {
        Export::Hf {
            model,
            lora,
            dtype,
            output,
        } => write_hf(&model, &lora, dtype.as_deref(), &output, json_out),
        Export::Gguf {
            model,
            lora,
            quant,
            pure,
            name,
            imatrix,
            output,
        } => {
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
        Export::Onnx {
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
        } => run_export_onnx(
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
        Export::Tflite {
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
        } => run_export_tflite(TfliteArgs {
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
        Export::GgufLora {
            adapter,
            base,
            outtype,
            output,
        } => {
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

/// `edgepack merge`: `export hf` that needs at least one adapter.
pub fn run_merge(
    base: &Path,
    lora: &LoraArgs,
    dtype: Option<&str>,
    output: &Path,
    json_out: bool,
) -> Result<()> {
    if lora.adapters.is_empty() {
        bail!("merge needs at least one --lora adapter\nhint: edgepack merge ./base --lora ./adapter -o ./merged");
    }
    write_hf(base, lora, dtype, output, json_out)
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
            let p = resolve_profile(t, p)?;
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
    let (m, _) = load(model, lora)?;
    let prefill_len = prefill_len.unwrap_or(seq_len);
    let calibration = match stats {
        Some(p) => Some(tflite_calibration(&m, p, smooth, prefill_len, json_out)?),
        None => None,
    };
    let opts = TfliteOptions {
        precision,
        seq_len,
        prefill_len,
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
    let alpha = match opts.calibration.as_ref().and_then(|c| c.alpha.as_ref()) {
        Some(smooth::Alpha::Global(a)) => json!(a),
        Some(smooth::Alpha::PerLayer(v)) => json!(v),
        None => serde_json::Value::Null,
    };
    let r = tflite::write(prepared, output, &Bars::new(json_out))
        .with_context(|| format!("writing {}", output.display()))?;
    if json_out {
        let mut v = serde_json::to_value(&r)?;
        v["seconds"] = json!(started.elapsed().as_secs_f64());
        // The SmoothQuant strength used, one per layer when given or searched so.
        v["smooth_alpha"] = alpha;
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

/// The statistics and SmoothQuant α of a full-integer TFLite export: `smooth` as numbers, or
/// `auto` searched as a recipe's `smooth = "auto"` is.
pub(crate) fn tflite_calibration(
    m: &Model,
    stats: &Path,
    smooth: Option<&str>,
    prefill_len: usize,
    json_out: bool,
) -> Result<tflite::Calibration> {
    let st = CalibStats::read(stats).with_context(|| format!("reading {}", stats.display()))?;
    let alpha = match smooth.map(str::trim) {
        Some("auto") => Some(
            smooth::search_alpha_for_export(m, &st, stats, prefill_len, &Bars::new(json_out))
                .with_context(|| format!("searching alpha for {}", stats.display()))?,
        ),
        Some(a) => Some(parse_alpha(a)?),
        None => None,
    };
    Ok(tflite::Calibration {
        stats: st,
        path: stats.to_path_buf(),
        alpha,
    })
}
