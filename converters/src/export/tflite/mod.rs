//! TFLite export: lowers the decoder description to a LiteRT model with a `prefill_<L>` and a
//! `decode` signature (LiteRT's generative layout, KV cache as explicit inputs and outputs,
//! static shapes), in fp32, fp16 weights, dynamic-range int8, or static integer linears from
//! calibration statistics, and streams it to disk one weight at a time behind a flatbuffer of
//! our own schema subset ([`schema`]). `docs/tflite.md` describes the file.

pub mod builder;
pub mod lower;
pub mod schema;
pub mod support;
pub mod weights;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use self::builder::{Buffers, Graph, Payload};
use self::lower::{placed, prefill_key, signature_def, weight_key, LowerCtx, DECODE};
use self::lower::{ActWidth, FcPiece, FcQuant};
use self::schema::{
    layout, ModelDef, Quantization, TensorType, BUFFER_LOCATION_KEY, BUFFER_LOCATION_VALUE,
};
use self::support::OpSupport;
use self::weights::LinearRowStats;
use self::weights::{Encoding, WeightSource};
use crate::calib::stats::CalibStats;
use crate::error::{Error, Result};
use crate::export::graph::{DecoderGraph, LinearRole, Op, Weight, WeightKind};
use crate::io::AtomicFile;
use crate::model::names::Role;
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
    /// Static integer linears from calibration statistics (after SmoothQuant), int8
    /// per-channel weights: int8 activations on the smoothed linears (q/k/v, gate/up; a packed
    /// linear is split so each part has its own output scale), int16 activations on the
    /// others (o_proj, down_proj, LM head; TFLite's 16x8 kernels), whose unsmoothed inputs
    /// carry outliers int8 cannot hold. Norms, rotary and attention stay f32.
    Int8,
    /// As [`Precision::Int8`] with int16 activations on every linear (more accurate; no int8
    /// activations).
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

/// int8 outputs of a static linear cover this many of its estimated standard deviations
/// (`sqrt(Σ_j W_oj²·rms_j²)` from the calibrated per-channel second moments), or the hard
/// bound `Σ_j |W_oj|·a_j` if that is smaller. LLM activations are heavy-tailed, so the range is
/// wide; what lies beyond it saturates.
pub const OUTPUT_RANGE_SIGMAS: f64 = 8.0;

/// For the static precisions: places every linear's int8 weight and integer bias and returns
/// the static scales of its input and outputs. `act` is the widest activation type asked for:
/// with int8, only the smoothed linears (q/k/v, gate/up) take int8 and the rest int16.
///
/// The input scale is the calibrated per-channel abs-max (divided by the SmoothQuant factor
/// where the model was smoothed) over the type's maximum. LiteRT's int8-input
/// FULLY_CONNECTED writes only int8 outputs, and the statistics hold input ranges only, so
/// output scales are derived: int16 outputs cover the largest output calibrated inputs can
/// give, `Σ_j |W_oj|·a_j + |b_o|` (never saturating); int8 outputs cover
/// [`OUTPUT_RANGE_SIGMAS`] estimated standard deviations, where the bound would leave too few
/// levels.
fn place_static_linears(
    act: ActWidth,
    dg: &DecoderGraph,
    original: &Model,
    model: &Model,
    cal: &Calibration,
    buffers: &mut Buffers,
) -> Result<HashMap<String, FcQuant>> {
    let mut out = HashMap::new();
    for op in &dg.ops {
        let Op::Linear { weight, bias, .. } = op else {
            continue;
        };
        let w = &dg.weights[*weight];
        let key = weight_key(dg, *weight);
        let act = match (act, w.kind) {
            (ActWidth::I8, WeightKind::Linear(LinearRole::Qkv | LinearRole::GateUp)) => {
                ActWidth::I8
            }
            _ => ActWidth::I16,
        };
        let stats_key = w.stats_key.as_deref().unwrap_or(&w.name);
        let entry = cal.stats.entries.get(stats_key).ok_or_else(|| {
            Error::format(
                &cal.path,
                stats_key,
                format!(
                    "no statistics for the input of {} (needed for --precision int8)",
                    w.name
                ),
            )
        })?;
        if entry.absmax.len() != w.row_len() {
            return Err(Error::mismatch(
                &cal.path,
                stats_key,
                format!(
                    "{} channels, {} takes {}",
                    entry.absmax.len(),
                    w.name,
                    w.row_len()
                ),
            ));
        }
        let mut a = entry.absmax.clone();
        let mut rms = entry.rms();
        // SmoothQuant divided the norm before this linear by s: s = γ / γ'.
        let norm = match (w.kind, w.layer) {
            (WeightKind::Linear(LinearRole::Qkv), Some(l)) => Some(Role::InputNorm.hf_name(l)),
            (WeightKind::Linear(LinearRole::GateUp), Some(l)) => Some(Role::PostNorm.hf_name(l)),
            _ => None,
        };
        if let (Some(norm), Some(_)) = (norm, &cal.alpha) {
            let before = original
                .tensor(&norm)
                .ok_or_else(|| Error::format(&original.source, &norm, "missing"))?
                .to_f32()?;
            let after = model
                .tensor(&norm)
                .ok_or_else(|| Error::format(&model.source, &norm, "missing"))?
                .to_f32()?;
            for (((x, r), g0), g1) in a.iter_mut().zip(&mut rms).zip(&before).zip(&after) {
                if *g1 != 0.0 {
                    *x *= (g1 / g0).abs();
                    *r *= (g1 / g0).abs();
                }
            }
        }
        let a_max = a.iter().fold(0f32, |m, v| m.max(*v));
        if !(a_max > 0.0 && a_max.is_finite()) {
            return Err(Error::format(
                &cal.path,
                stats_key,
                format!("input abs-max {a_max} cannot give an int8 scale"),
            ));
        }
        let in_scale = (a_max as f64 / act.max()) as f32;
        // int8 outputs of a packed linear ([Q; K; V], [gate; up]) get one scale per part: their
        // ranges differ by orders of magnitude.
        let split = act == ActWidth::I8 && w.parts.len() > 1;
        let pieces: Vec<(String, Weight, Option<Weight>)> = if split {
            let mut v = Vec::new();
            for (i, p) in w.parts.iter().enumerate() {
                let part = |name: String, t: &crate::model::Tensor| Weight {
                    name,
                    kind: w.kind,
                    layer: w.layer,
                    shape: t.shape.clone(),
                    parts: vec![t.clone()],
                    stats_key: w.stats_key.clone(),
                    tied: false,
                };
                let b = bias.map(|b| {
                    let bw = &dg.weights[b];
                    part(format!("{}#{i}", bw.name), &bw.parts[i])
                });
                v.push((format!("{key}#{i}"), part(format!("{key}#{i}"), p), b));
            }
            v
        } else {
            vec![(key.clone(), w.clone(), bias.map(|b| dg.weights[b].clone()))]
        };
        let mut placed_pieces = Vec::new();
        for (pkey, pw, pb) in pieces {
            placed_pieces.push(place_piece(
                act, &pkey, pw, pb, &a, &rms, in_scale, buffers,
            )?);
        }
        out.insert(
            key,
            FcQuant {
                act,
                in_scale,
                pieces: placed_pieces,
            },
        );
    }
    Ok(out)
}

/// Places one FULLY_CONNECTED's int8 weight and integer bias; returns its output scale.
#[allow(clippy::too_many_arguments)]
fn place_piece(
    act: ActWidth,
    key: &str,
    w: Weight,
    bias: Option<Weight>,
    a: &[f32],
    rms: &[f32],
    in_scale: f32,
    buffers: &mut Buffers,
) -> Result<FcPiece> {
    let shape = w.shape.clone();
    let source = WeightSource::plain(w);
    let LinearRowStats {
        scales: w_scales,
        bounds,
        rms: out_rms,
    } = source.linear_row_stats(a, rms)?;
    let b = bias.map(WeightSource::plain);
    let b_vals = match &b {
        Some(b) => {
            let mut v = Vec::new();
            b.for_each_chunk(|_, c| {
                v.extend(c);
                Ok(())
            })?;
            v
        }
        None => vec![0.0; w_scales.len()],
    };
    let bound = bounds
        .iter()
        .zip(&b_vals)
        .map(|(o, b)| o + b.abs() as f64)
        .fold(0f64, f64::max);
    let range = match act {
        ActWidth::I16 => bound,
        ActWidth::I8 => {
            let typical = out_rms
                .iter()
                .zip(&b_vals)
                .map(|(o, b)| OUTPUT_RANGE_SIGMAS * o + b.abs() as f64)
                .fold(0f64, f64::max);
            typical.min(bound)
        }
    };
    let out_scale = (range.max(f64::MIN_POSITIVE) / act.max()) as f32;
    if buffers.placed(key).is_none() {
        let q = Quantization::per_channel(w_scales.clone(), 0);
        let buffer = buffers.push(Payload::Weight {
            source,
            encoding: Encoding::Int8 {
                scales: Arc::new(w_scales.clone()),
            },
        });
        buffers.place(key, placed(buffer, &shape, TensorType::Int8, Some(q)));
    }
    let mut bias_key = None;
    if let Some(src) = b {
        let bk = format!("{};{}", src.weight.name, act.bias_type().name());
        let scales: Vec<f32> = w_scales.iter().map(|s| s * in_scale).collect();
        let q = Quantization::per_channel(scales.clone(), 0);
        let scales = Arc::new(scales);
        let buffer = buffers.push(Payload::Weight {
            source: src,
            encoding: match act {
                ActWidth::I8 => Encoding::Int32 { scales },
                ActWidth::I16 => Encoding::Int64 { scales },
            },
        });
        buffers.place(
            &bk,
            placed(buffer, &[w_scales.len()], act.bias_type(), Some(q)),
        );
        bias_key = Some(bk);
    }
    Ok(FcPiece {
        weight_key: key.to_string(),
        rows: w_scales.len(),
        out_scale,
        bias_key,
    })
}

/// Builds the model description (no file is written; weights are read only to compute int8
/// scales). Fails before anything is written on what the precision or target cannot express.
pub fn prepare(model: &Model, opts: &TfliteOptions) -> Result<Prepared> {
    let original = model;
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
    let fc = match &opts.calibration {
        Some(cal) if opts.precision.is_static() => {
            let act = if opts.precision == Precision::Int8 {
                ActWidth::I8
            } else {
                ActWidth::I16
            };
            place_static_linears(act, &dg, original, model, cal, &mut buffers)?
        }
        _ => HashMap::new(),
    };
    // Weights and biases of static linears are placed by `place_static_linears` (possibly as
    // separate pieces); they must not be written a second time.
    let mut handled = std::collections::HashSet::new();
    if !fc.is_empty() {
        for op in &dg.ops {
            if let Op::Linear { weight, bias, .. } = op {
                handled.insert(*weight);
                handled.extend(*bias);
            }
        }
    }
    for (id, w) in dg.weights.iter().enumerate() {
        let key = weight_key(&dg, id);
        if handled.contains(&id) || buffers.placed(&key).is_some() {
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
        fc: &fc,
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
        let lowered = ctx.signature(&mut g, t)?;
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
    let prepared = prepare(model, opts)?;
    write(prepared, out, progress)
}
