//! TFLite export: lowers the decoder description to a LiteRT model with a `prefill_<L>` and a
//! `decode` signature (LiteRT's generative layout, KV cache as explicit inputs and outputs,
//! static shapes), in fp32, fp16 weights, dynamic-range int8, or static integer linears from
//! calibration statistics, and streams it to disk one weight at a time behind a flatbuffer of
//! our own schema subset ([`schema`]). `docs/tflite.md` describes the file.

pub mod builder;
pub mod integer;
pub mod lower;
pub mod schema;
pub mod support;
pub mod weights;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use self::builder::{Buffers, Graph, Payload};
use self::lower::ActWidth;
use self::lower::{placed, prefill_key, signature_def, weight_key, LowerCtx, DECODE};
use self::schema::{
    layout, ModelDef, Quantization, TensorType, BUFFER_LOCATION_KEY, BUFFER_LOCATION_VALUE,
};
use self::support::OpSupport;
use self::weights::{Encoding, WeightSource};
use crate::error::{Error, Result};
use crate::export::graph::{DecoderGraph, WeightKind};
use crate::io::AtomicFile;
use crate::model::stats::CalibStats;
use crate::model::Model;
use crate::progress::Progress;
use crate::transform::smooth::{smooth, Alpha, Scope};

/// Metadata entry names (`Model.metadata`): the tokenizer and its config (with the chat
/// template) as Hugging Face writes them, and our own description of the signatures.
pub const META_TOKENIZER: &str = "tokenizer.json";
pub const META_SENTENCEPIECE: &str = "tokenizer.model";
pub const META_TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const META_EDGEPACK: &str = "edgepack.json";

/// How weights and activations are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// Every weight f32.
    Fp32,
    /// Embedding and linear weights f16 (DEQUANTIZE to f32 at load), norms f32.
    Fp16,
    /// Embedding and linear weights int8 with one scale per output row; activations stay f32
    /// and the kernels quantize them on the fly ("hybrid" kernels).
    DynamicInt8,
    /// Full integer ([`integer`]): int8 per-channel weights, every operator integer, int8
    /// activations into the smoothed linears (q/k/v, gate/up), int16 activations elsewhere
    /// (TFLite's 16x8 kernels) and in the KV cache, scales calibrated on the statistics
    /// file's samples; float logits through one final DEQUANTIZE.
    Int8,
    /// As [`Precision::Int8`] with int16 activations everywhere (TFLite's 16x8 scheme), the
    /// more accurate full-integer graph.
    Int8A16,
}

impl Precision {
    pub fn parse(s: &str) -> Option<Precision> {
        match s {
            "fp32" => Some(Precision::Fp32),
            "fp16" => Some(Precision::Fp16),
            "dynamic-int8" => Some(Precision::DynamicInt8),
            "int8" => Some(Precision::Int8),
            "int8-a16" => Some(Precision::Int8A16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::DynamicInt8 => "dynamic-int8",
            Precision::Int8 => "int8",
            Precision::Int8A16 => "int8-a16",
        }
    }

    pub const ALL: &'static str = "fp32, fp16, dynamic-int8, int8, int8-a16";

    /// Whether activations get static scales from calibration statistics.
    pub fn is_static(self) -> bool {
        matches!(self, Precision::Int8 | Precision::Int8A16)
    }
}

/// Options of a TFLite export.
#[derive(Debug, Clone)]
pub struct TfliteOptions {
    pub precision: Precision,
    /// KV cache length: the most positions one conversation can hold.
    pub seq_len: usize,
    /// Tokens per prefill call (`prefill_<L>`); at most `seq_len`.
    pub prefill_len: usize,
    /// The NPU's op list to check against, if a target was named.
    pub target: Option<OpSupport>,
    /// Activation statistics (and SmoothQuant strength) for the static precisions.
    pub calibration: Option<Calibration>,
}

/// Where static activation scales come from.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub stats: CalibStats,
    /// The statistics file, named in errors.
    pub path: PathBuf,
    /// SmoothQuant strength; `None` leaves the model unsmoothed.
    pub alpha: Option<Alpha>,
}

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct TfliteReport {
    pub path: String,
    pub precision: Precision,
    pub bytes: u64,
    pub seq_len: usize,
    pub signatures: Vec<SignatureReport>,
    /// Operator counts over all signatures, by schema name.
    pub ops: BTreeMap<String, usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<support::TargetReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SignatureReport {
    pub key: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub operators: usize,
}

/// A model ready to be written: the flatbuffer description and the payload of every buffer.
pub struct Prepared {
    pub def: ModelDef,
    pub payloads: Vec<Option<Payload>>,
    pub report: TfliteReport,
}

/// How a weight is stored for a precision.
fn encoding_for(kind: WeightKind, precision: Precision) -> Option<TensorType> {
    match (kind, precision) {
        (WeightKind::Norm | WeightKind::Bias(_), _) | (_, Precision::Fp32) => None,
        (_, Precision::Fp16) => Some(TensorType::Float16),
        (_, Precision::DynamicInt8 | Precision::Int8 | Precision::Int8A16) => {
            Some(TensorType::Int8)
        }
    }
}

/// Builds the model description (no file is written; weights are read only to compute int8
/// scales). Fails before anything is written on what the precision or target cannot express.
pub fn prepare(model: &Model, opts: &TfliteOptions, progress: &dyn Progress) -> Result<Prepared> {
    let smoothed;
    let model = match (opts.precision, &opts.calibration) {
        (p, None) if p.is_static() => {
            return Err(Error::Invalid(format!(
            "--precision {} needs --stats: static activation scales come from `edgepack calibrate`",
            p.name()
        )))
        }
        (p, Some(c)) if p.is_static() => {
            c.stats.check_model(model, &c.path)?;
            match &c.alpha {
                Some(a) => {
                    // Norm groups only: the scale code divides by those factors.
                    smoothed = smooth(model, &c.stats, &c.path, a, Scope::Norms)?.model;
                    &smoothed
                }
                None => model,
            }
        }
        (_, Some(_)) => {
            return Err(Error::Invalid(format!(
                "--stats and --smooth apply to --precision int8 and int8-a16, not {}",
                opts.precision.name()
            )))
        }
        (_, None) => model,
    };
    let src = &model.source;
    let dg = DecoderGraph::build(model)?;
    if opts.seq_len == 0 || opts.prefill_len == 0 || opts.prefill_len > opts.seq_len {
        return Err(Error::Invalid(format!(
            "TFLite export: prefill length {} must be between 1 and the sequence length {}",
            opts.prefill_len, opts.seq_len
        )));
    }
    if opts.seq_len > dg.dims.context_length {
        return Err(Error::unsupported(
            src,
            "max_position_embeddings",
            format!(
                "--seq-len {} exceeds the model's context of {} positions",
                opts.seq_len, dg.dims.context_length
            ),
        ));
    }
    // TFLite shapes are int32: every dimension must fit.
    for w in &dg.weights {
        if let Some(d) = w.shape.iter().find(|&&d| d > i32::MAX as usize) {
            return Err(Error::unsupported(
                src,
                &w.name,
                format!("dimension {d} exceeds TFLite's int32 shapes"),
            ));
        }
    }
    if opts.seq_len > i32::MAX as usize {
        return Err(Error::Invalid(format!(
            "--seq-len {} exceeds TFLite's int32 shapes",
            opts.seq_len
        )));
    }
    let mut buffers = Buffers::new();
    let integer_graph = match &opts.calibration {
        Some(cal) if opts.precision.is_static() => {
            let ranges =
                integer::calibrate(model, &dg, &cal.stats.sample_tokens, &cal.path, progress)?;
            let act = if opts.precision == Precision::Int8 {
                ActWidth::I8
            } else {
                ActWidth::I16
            };
            let fc = integer::place(&dg, &ranges, &mut buffers, act)?;
            Some((ranges, fc))
        }
        _ => None,
    };
    for (id, w) in dg.weights.iter().enumerate() {
        let key = weight_key(&dg, id);
        // The integer graph placed its weights; its norm gains become constants.
        if integer_graph.is_some() || buffers.placed(&key).is_some() {
            continue;
        }
        let source = WeightSource::plain(w.clone());
        let (encoding, dtype, quant) = match encoding_for(w.kind, opts.precision) {
            None => (Encoding::F32, TensorType::Float32, None),
            Some(TensorType::Float16) => (Encoding::F16, TensorType::Float16, None),
            Some(_) => {
                let scales = source.int8_row_scales()?;
                let q = Quantization::per_channel(scales.clone(), 0);
                (
                    Encoding::Int8 {
                        scales: Arc::new(scales),
                    },
                    TensorType::Int8,
                    Some(q),
                )
            }
        };
        let buffer = buffers.push(Payload::Weight { source, encoding });
        buffers.place(&key, placed(buffer, &w.shape, dtype, quant));
    }

    let ctx = LowerCtx {
        dg: &dg,
        max_seq_len: opts.seq_len,
    };
    let mut def = ModelDef {
        description: format!("edgepack {} ({})", model.name, opts.precision.name()),
        ..Default::default()
    };
    for (key, t) in [
        (prefill_key(opts.prefill_len), opts.prefill_len),
        (DECODE.to_string(), 1),
    ] {
        let mut g = Graph::new(&mut buffers, &key);
        let lowered = match &integer_graph {
            Some((ranges, fc)) => integer::IntLower {
                dg: &dg,
                max_seq_len: opts.seq_len,
                ranges,
                fc,
            }
            .signature(&mut g, t)?,
            None => ctx.signature(&mut g, t)?,
        };
        let index = def.subgraphs.len() as u32;
        def.signatures.push(signature_def(&key, index, &lowered));
        def.subgraphs.push(lowered.subgraph);
    }

    let mut ops: BTreeMap<String, usize> = BTreeMap::new();
    for sg in &def.subgraphs {
        for op in &sg.operators {
            *ops.entry(op.op.name().to_string()).or_default() += 1;
        }
    }
    let target = opts.target.as_ref().map(|t| t.check(&def));

    let tok = &model.tokenizer;
    let mut meta = Vec::new();
    if let Some(j) = &tok.tokenizer_json {
        meta.push((META_TOKENIZER.to_string(), j.clone().into_bytes()));
    }
    if let Some(spm) = &tok.sentencepiece_model {
        meta.push((META_SENTENCEPIECE.to_string(), spm.clone()));
    }
    if meta.is_empty() {
        return Err(Error::format(
            src,
            "tokenizer.json",
            "missing (and no tokenizer.model): the TFLite model carries the tokenizer as metadata",
        ));
    }
    if let Some(cfg) = &model.tokenizer.tokenizer_config {
        meta.push((
            META_TOKENIZER_CONFIG.to_string(),
            cfg.to_string().into_bytes(),
        ));
    }
    let about = serde_json::json!({
        "format": "edgepack-tflite",
        "precision": opts.precision.name(),
        "seq_len": opts.seq_len,
        "prefill_len": opts.prefill_len,
        "signatures": def.signatures.iter().map(|s| s.key.clone()).collect::<Vec<_>>(),
        "kv_cache_layout": "BTNH",
        "n_layers": dg.dims.n_layers,
        "n_kv_heads": dg.dims.n_kv_heads,
        "head_dim": dg.dims.head_dim,
        "vocab_size": dg.dims.vocab,
        "chat_template": model.tokenizer.chat_template(),
        "bos_token_id": model.tokenizer.generation_config.as_ref().and_then(|g| g.get("bos_token_id").cloned()),
        "eos_token_id": model.tokenizer.generation_config.as_ref().and_then(|g| g.get("eos_token_id").cloned()),
    });
    meta.push((META_EDGEPACK.to_string(), about.to_string().into_bytes()));
    meta.push((
        BUFFER_LOCATION_KEY.to_string(),
        BUFFER_LOCATION_VALUE.as_bytes().to_vec(),
    ));
    for (name, bytes) in meta {
        let b = buffers.push_inline(bytes);
        def.metadata.push((name, b));
    }
    def.buffers = buffers.defs;

    let report = TfliteReport {
        path: String::new(),
        precision: opts.precision,
        bytes: 0,
        seq_len: opts.seq_len,
        signatures: def
            .signatures
            .iter()
            .map(|s| SignatureReport {
                key: s.key.clone(),
                inputs: s.inputs.iter().map(|m| m.name.clone()).collect(),
                outputs: s.outputs.iter().map(|m| m.name.clone()).collect(),
                operators: def.subgraphs[s.subgraph_index as usize].operators.len(),
            })
            .collect(),
        ops,
        target,
    };
    Ok(Prepared {
        def,
        payloads: buffers.payloads,
        report,
    })
}

/// Writes a prepared model to `out` atomically, streaming each weight.
pub fn write(prepared: Prepared, out: &Path, progress: &dyn Progress) -> Result<TfliteReport> {
    let l = layout(&prepared.def);
    let mut f = AtomicFile::create(out)?;
    f.write_all(&l.flatbuffer)?;
    let mut at = l.flatbuffer.len() as u64;
    progress.start("writing TFLite", l.file_size);
    for &(index, offset, size) in &l.payloads {
        let pad = (offset - at) as usize;
        f.write_all(&vec![0u8; pad])?;
        at = offset;
        let mut written = 0u64;
        let mut sink = |b: &[u8]| -> Result<()> {
            written += b.len() as u64;
            progress.advance(b.len() as u64, "");
            f.write_all(b)
        };
        match prepared.payloads[index as usize]
            .as_ref()
            .expect("appended buffers have payloads")
        {
            Payload::Bytes(b) => sink(b)?,
            Payload::Weight { source, encoding } => source.write(encoding, &mut sink)?,
        }
        if written != size {
            return Err(Error::Invalid(format!(
                "{}: buffer {index} produced {written} bytes, {size} planned",
                out.display()
            )));
        }
        at += size;
    }
    f.commit()?;
    progress.finish();
    let mut report = prepared.report;
    report.path = out.display().to_string();
    report.bytes = l.file_size;
    Ok(report)
}

/// Exports `model` as a TFLite file at `out`.
pub fn export_tflite(
    model: &Model,
    out: &Path,
    opts: &TfliteOptions,
    progress: &dyn Progress,
) -> Result<TfliteReport> {
    let prepared = prepare(model, opts, progress)?;
    write(prepared, out, progress)
}
