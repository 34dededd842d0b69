//! `edgepack inspect`, `imatrix`, `calibrate` and `smooth`: what a model holds, statistics
//! of its activations, and SmoothQuant.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use edgepack_converters::calib::data;
use edgepack_converters::calib::imatrix;
use edgepack_converters::calib::stats;
use edgepack_converters::export::gguf::{plan_types, GgufOptions};
use edgepack_converters::export::hf::export_hf;
use edgepack_converters::import;
use edgepack_converters::io::ensure_not_input;
use edgepack_converters::model::stats::CalibStats;
use edgepack_converters::model::Model;
use edgepack_converters::quant::preset::Preset;
use edgepack_converters::transform::smooth;
use serde_json::json;

use crate::args::{inputs, load, parse_alpha, parse_float_dtype, LoraArgs};
use crate::progress::Bars;

#[derive(Args, Debug)]
pub struct SmoothArgs {
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

pub fn run_imatrix(
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

pub fn run_calibrate(
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

pub fn run_smooth(a: &SmoothArgs, json_out: bool) -> Result<()> {
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

pub fn inspect(path: &Path, json_out: bool) -> Result<()> {
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
