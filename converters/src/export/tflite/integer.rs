//! The full-integer graphs of `--precision int8` and `int8-a16`: every operator between the
//! token lookup and the logits works on integers, as the i.MX NPU delegates require. Weights
//! are int8 per-channel; activations are int16 (TFLite's 16x8 kernels), except that `int8`
//! feeds the SmoothQuant-ed linears (q/k/v and gate/up) int8; the KV cache is int16; a final
//! DEQUANTIZE gives float logits.
//!
//! Every activation scale comes from running the (smoothed) model over the calibration
//! samples kept in the statistics file, as plain text and as conversations in the model's
//! chat template ([`calibrate`]): symmetric per-tensor ranges at every point of the graph,
//! widened by [`HEADROOM`] for int16.
//!
//! Three parts of an LLM do not survive a plain per-tensor scheme (SmolLM2-135M carries 22552
//! in one residual channel at the first position, against an rms of 5 elsewhere):
//!
//! - The residual stream is kept divided by a per-channel factor `c`: 1, or for channels whose
//!   range exceeds [`RESIDUAL_SPREAD`] times the median channel's, one shared power of two.
//!   The embedding columns and the o_proj / down_proj output rows are divided by `c` (for
//!   per-channel int8 weights only their scales change) and every RMSNorm multiplies `c` back
//!   into its gain.
//! - RMSNorm: LiteRT's int16 RSQRT is a 513-entry table that is exact only far from zero, and
//!   sums of squares span five decades across tokens, so the sum is taken in stages of
//!   [`STAGE_RATIO`] each ([`norm_stages`]): squares at the stage's scale (MUL), added in 32
//!   bits (MEAN), plain channels and outlier channels (times `c²`) apart. A token takes the
//!   first stage that does not saturate. Epsilon lies below the int16 step and is left out.
//! - MLP channels whose range exceeds [`FF_SPREAD`] times the layer's median run as their own
//!   gate/up rows, SiLU and down_proj columns, with their own scales.
//!
//! The int16 softmax looks exp up on [-10, 0] and gives every masked position (pushed to the
//! bottom of the score range) the table's smallest value, one code in 32768: a masked position
//! keeps at most that weight.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor as CTensor;

use super::builder::{Buffers, Graph, Payload, T};
use super::lower::{
    cache_positions, full_tables, kv_name, placed, rotate_half_matrix, weight_key, ActWidth,
    Lowered, INPUT_POS, LOGITS, TOKENS,
};
use super::schema::{BuiltinOp as B, Options, Quantization, TensorMap, TensorType as Ty};
use super::weights::{Encoding, WeightSource};
use crate::calib::forward::Forward;
use crate::error::{Error, Result};
use crate::export::graph::{DecoderGraph, LinearRole, Op, Weight, WeightKind, INPUT_IDS};
use crate::model::chat::{Message, Prompter};
use crate::model::Model;
use crate::progress::Progress;

/// Channels of the residual stream whose range is within this factor of the median channel's
/// are stored as they are; larger ones are divided down to it.
pub const RESIDUAL_SPREAD: f32 = 8.0;

/// The largest residual channel factor (a power of two).
pub const MAX_RESIDUAL_FACTOR: f32 = 128.0;

/// Each stage of a norm's mean square covers this ratio of values (see [`norm_stages`]).
pub const STAGE_RATIO: f32 = 16.0;

/// At most this many stages per norm.
pub const MAX_STAGES: usize = 8;

/// The upper ends of the ranges a norm's mean square is computed in. TFLite's int16 RSQRT
/// interpolates a 513-entry table over the whole int16 range, which is exact only for inputs
/// far from zero; mean squares span four or five decades across tokens (massive-activation
/// tokens), so each stage holds a window of [`STAGE_RATIO`] (inputs at least 1/16 of full
/// scale) and a token takes the first stage that does not saturate.
pub fn norm_stages(ms_min: f32, ms_max: f32) -> Vec<f32> {
    let mut top = ms_min.max(f32::MIN_POSITIVE) * STAGE_RATIO;
    let mut v = vec![top];
    // Twice the calibrated maximum, for inputs beyond the calibration text.
    while top < 2.0 * ms_max && v.len() < MAX_STAGES {
        top *= STAGE_RATIO;
        v.push(top);
    }
    v
}

/// Activation ranges are widened by this factor over what calibration saw, for text unlike
/// the calibration samples (int16 has bits to spare; a saturated value is an error).
pub const HEADROOM: f32 = 2.0;

/// An MLP channel whose range exceeds this many times the layer's median channel range is an
/// outlier channel.
pub const FF_SPREAD: f32 = 16.0;

/// At most this many outlier channels per layer (the largest).
pub const MAX_FF_OUTLIERS: usize = 64;

/// The MLP values calibrated per channel, for the outlier split.
const FF_VALUES: [&str; 4] = ["mlp.gate", "mlp.up", "mlp.silu", "mlp.act"];

/// At most this many calibration samples are run for the activation ranges.
pub const RANGE_SAMPLES: usize = 8;

/// The activation ranges of the integer graph.
#[derive(Debug, Clone)]
pub struct IntRanges {
    /// Per residual channel, the factor the stream is divided by (≥ 1).
    pub c: Vec<f32>,
    /// Largest |value| per graph value (residual values already divided by `c`), per norm
    /// `<norm>#ms_min` / `#ms_max` (the mean square of the residual over tokens) and `#n`
    /// (the normalized stream before the gain), `layers.L.attn.scores` (unscaled `q·k`),
    /// `layers.L.mlp.silu`, and the MLP values per channel group (`#N`, `#O`).
    pub absmax: HashMap<String, f32>,
    /// Per layer, the MLP channels (of `ff`) whose range dwarfs the rest ([`FF_SPREAD`]);
    /// they run in their own tensors (`#O`), the others in `#N`.
    pub ff_outliers: HashMap<usize, Vec<usize>>,
}

impl IntRanges {
    /// The range of `name` with [`HEADROOM`].
    fn get(&self, name: &str) -> Result<f32> {
        Ok(HEADROOM * self.seen(name)?)
    }

    /// The range of `name` for an activation of width `act`: int8 has no bits to spare for
    /// headroom and takes the calibrated range as it is.
    fn for_width(&self, name: &str, act: ActWidth) -> Result<f32> {
        match act {
            ActWidth::I8 => self.seen(name),
            ActWidth::I16 => self.get(name),
        }
    }

    /// The largest |value| calibration saw at `name` (the smallest, for `#ms_min`).
    fn seen(&self, name: &str) -> Result<f32> {
        let v = self.absmax.get(name).copied().ok_or_else(|| {
            Error::Invalid(format!(
                "TFLite int8: no calibrated range for `{name}` (the calibration run never reached it)"
            ))
        })?;
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else if v == 0.0 {
            // A value that was always zero still needs a usable scale.
            Ok(1.0)
        } else {
            Err(Error::Invalid(format!(
                "TFLite int8: the calibrated range of `{name}` is {v}"
            )))
        }
    }
}

/// The graph value a probe point of the reference forward pass stands for, and whether it
/// lives in the residual stream.
fn graph_value(point: &str, n_layers: usize, logits: &str) -> Option<(String, bool)> {
    match point {
        "final_in" => return Some((format!("layers.{}.out", n_layers - 1), true)),
        "final_norm" => return Some(("final_norm".into(), false)),
        "logits" => return Some((logits.to_string(), false)),
        _ => {}
    }
    let (l, what) = point.split_once('.')?;
    let l: usize = l.parse().ok()?;
    let v = |s: &str| format!("layers.{l}.{s}");
    Some(match what {
        "attn_in" if l == 0 => ("embed".into(), true),
        "attn_in" => (format!("layers.{}.out", l - 1), true),
        "attn_norm" => (v("attn_norm"), false),
        "q" | "k" | "v" | "q_rot" | "k_rot" | "scores" => (v(&format!("attn.{what}")), false),
        "attn" => (v("attn.out"), false),
        "o" => (v("attn.o"), true),
        "mlp_in" => (v("attn_residual"), true),
        "mlp_norm" => (v("mlp_norm"), false),
        "gate" | "up" | "silu" => (v(&format!("mlp.{what}")), false),
        "h" => (v("mlp.act"), false),
        "down" => (v("mlp.down"), true),
        _ => return None,
    })
}

/// The norm a residual probe point feeds.
fn norm_of(point: &str) -> Option<String> {
    if point == "final_in" {
        return Some("final_norm".into());
    }
    let (l, what) = point.split_once('.')?;
    match what {
        "attn_in" => Some(format!("layers.{l}.attn_norm")),
        "mlp_in" => Some(format!("layers.{l}.mlp_norm")),
        _ => None,
    }
}

fn values(t: &CTensor) -> Result<(Vec<f32>, usize)> {
    let width = *t.dims().last().unwrap_or(&1);
    let v = t
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| Error::Invalid(format!("TFLite int8 calibration: {e}")))?;
    Ok((v, width))
}

/// The calibration samples as conversations, for a model with a chat template: the first half
/// of a sample's text as the user's turn (the template adds its system prompt and markers),
/// the second half as the assistant's answer. Chat markers and system prompts put activations
/// the plain text never reaches (the first position of SmolLM2's prompt, `<|im_start|>`, has
/// a larger mean square than any calibration text gives).
fn chat_samples(model: &Model, samples: &[Vec<u32>]) -> Result<Vec<Vec<u32>>> {
    if model.tokenizer.chat_template().is_none() || model.tokenizer.tokenizer_json.is_none() {
        return Ok(Vec::new());
    }
    let p = Prompter::new(model)?;
    let limit = model.config.max_position_embeddings;
    let mut out = Vec::new();
    for s in samples {
        let half = s.len() / 2;
        let user = p.decode(&s[..half])?;
        let answer = p.decode(&s[half..])?;
        let mut ids = p.chat(&[Message::user(&user)])?;
        ids.extend(p.encode(&answer, false)?);
        if limit > 0 {
            ids.truncate(limit);
        }
        out.push(ids);
    }
    Ok(out)
}

/// Runs `model` (already smoothed, if it is) over up to [`RANGE_SAMPLES`] of `samples`, and
/// the same texts as conversations ([`chat_samples`]), twice:
/// once for the ranges of every graph value and the residual channels, once for the norm
/// internals under the chosen `c` and `A`.
pub fn calibrate(
    model: &Model,
    dg: &DecoderGraph,
    samples: &[Vec<u32>],
    stats_path: &std::path::Path,
    progress: &dyn Progress,
) -> Result<IntRanges> {
    if samples.is_empty() {
        return Err(Error::format(
            stats_path,
            crate::model::stats::SAMPLE_TOKENS,
            "missing: the full-integer export reruns the calibration samples, which this file \
             (written by an older edgepack) does not keep; run `edgepack calibrate` again",
        ));
    }
    let mut samples = samples[..samples.len().min(RANGE_SAMPLES)].to_vec();
    samples.extend(chat_samples(model, &samples)?);
    let samples = &samples[..];
    let fwd = Forward::new(model)?;
    let n_layers = dg.dims.n_layers;
    let hidden = dg.dims.hidden;
    let mut scalar: HashMap<String, f32> = HashMap::new();
    let mut channels: HashMap<String, Vec<f32>> = HashMap::new();
    let mut ff_channels: HashMap<String, Vec<f32>> = HashMap::new();
    let mut failed: Option<Error> = None;
    progress.start("calibrating int8 ranges", 2 * samples.len() as u64);
    for s in samples {
        let mut cache = fwd.cache(s.len());
        fwd.forward_probed(s, &mut cache, &mut |point, t| {
            if failed.is_some() {
                return;
            }
            let Some((name, residual)) = graph_value(point, n_layers, &dg.logits) else {
                return;
            };
            let (v, width) = match values(t) {
                Ok(x) => x,
                Err(e) => {
                    failed = Some(e);
                    return;
                }
            };
            let ff = FF_VALUES.iter().any(|f| name.ends_with(f));
            if residual || ff {
                let map = if residual {
                    &mut channels
                } else {
                    &mut ff_channels
                };
                let pc = map.entry(name).or_insert_with(|| vec![0.0; width]);
                for row in v.chunks_exact(width) {
                    for (m, x) in pc.iter_mut().zip(row) {
                        *m = m.max(x.abs());
                    }
                }
            } else {
                let m = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                let e = scalar.entry(name).or_insert(0.0);
                *e = e.max(m);
            }
        })?;
        if let Some(e) = failed.take() {
            return Err(e);
        }
        progress.advance(1, "");
    }
    // Per-channel factors of the residual stream.
    let mut per = vec![0f32; hidden];
    for pc in channels.values() {
        for (m, x) in per.iter_mut().zip(pc) {
            *m = m.max(*x);
        }
    }
    let mut sorted = per.clone();
    sorted.sort_by(f32::total_cmp);
    let median = sorted[sorted.len() / 2];
    let clip = if median > 0.0 {
        RESIDUAL_SPREAD * median
    } else {
        1.0
    };
    // One factor for every outlier channel (a power of two), so that each norm's sum of
    // squares is two sums: plain channels, and outliers times c².
    let top = per.iter().fold(0f32, |m, v| m.max(*v));
    let c_out = if top > clip {
        (top / clip).log2().ceil().exp2().min(MAX_RESIDUAL_FACTOR)
    } else {
        1.0
    };
    let c: Vec<f32> = per
        .iter()
        .map(|m| if *m > clip { c_out } else { 1.0 })
        .collect();
    for (name, pc) in &channels {
        let m = pc.iter().zip(&c).fold(0f32, |m, (x, c)| m.max(x / c));
        scalar.insert(name.clone(), m);
    }
    // MLP outlier channels, and the ranges of each group.
    let mut ff_outliers = HashMap::new();
    for l in 0..n_layers {
        let Some(h) = ff_channels.get(&format!("layers.{l}.mlp.act")) else {
            continue;
        };
        let mut sorted = h.clone();
        sorted.sort_by(f32::total_cmp);
        let median = sorted[sorted.len() / 2];
        let mut out: Vec<usize> = (0..h.len())
            .filter(|&k| h[k] > FF_SPREAD * median)
            .collect();
        out.sort_by(|&a, &b| h[b].total_cmp(&h[a]));
        out.truncate(MAX_FF_OUTLIERS);
        out.sort_unstable();
        for f in FF_VALUES {
            let name = format!("layers.{l}.{f}");
            let Some(pc) = ff_channels.get(&name) else {
                continue;
            };
            let (mut n, mut o) = (0f32, 0f32);
            for (k, v) in pc.iter().enumerate() {
                if out.binary_search(&k).is_ok() {
                    o = o.max(*v);
                } else {
                    n = n.max(*v);
                }
            }
            scalar.insert(format!("{name}#N"), n);
            scalar.insert(format!("{name}#O"), o);
            scalar.insert(name, n.max(o));
        }
        ff_outliers.insert(l, out);
    }
    // Norm internals.
    let eps = dg.rms_norm_eps as f32;
    for s in samples {
        let mut cache = fwd.cache(s.len());
        fwd.forward_probed(s, &mut cache, &mut |point, t| {
            if failed.is_some() {
                return;
            }
            let Some(norm) = norm_of(point) else {
                return;
            };
            let (v, width) = match values(t) {
                Ok(x) => x,
                Err(e) => {
                    failed = Some(e);
                    return;
                }
            };
            let (mut lo, mut hi, mut n) = (f32::INFINITY, 0f32, 0f32);
            for row in v.chunks_exact(width) {
                let mut sum = 0f64;
                let mut big = 0f32;
                for (x, cj) in row.iter().zip(&c) {
                    let xs = x.abs() / cj;
                    sum += (*x as f64) * (*x as f64);
                    big = big.max(xs);
                }
                let m = (sum / width as f64) as f32;
                if m > 0.0 {
                    lo = lo.min(m);
                }
                hi = hi.max(m);
                n = n.max(big / (m + eps).sqrt());
            }
            for (k, val, keep_min) in [("ms_min", lo, true), ("ms_max", hi, false), ("n", n, false)]
            {
                let e = scalar.entry(format!("{norm}#{k}")).or_insert(if keep_min {
                    f32::INFINITY
                } else {
                    0.0
                });
                *e = if keep_min { e.min(val) } else { e.max(val) };
            }
        })?;
        if let Some(e) = failed.take() {
            return Err(e);
        }
        progress.advance(1, "");
    }
    progress.finish();
    Ok(IntRanges {
        c,
        absmax: scalar,
        ff_outliers,
    })
}

/// A piece of a linear before placement: its key, weight and bias.
type Piece = (String, Weight, Option<Weight>);

/// One FULLY_CONNECTED of an integer linear.
#[derive(Debug, Clone)]
pub struct IntPiece {
    pub weight_key: String,
    pub rows: usize,
    pub bias_key: Option<String>,
    /// Range of this piece's output.
    pub out_absmax: f32,
    /// The value this piece reads and its range, when not the linear's input (a column
    /// group of the down projection).
    pub input: Option<(String, f32)>,
}

/// An integer linear: int8 input (smoothed linears) or int16, one or more pieces whose
/// outputs are the values `outs` (the following split's outputs when there is one per
/// piece, else the linear's output).
#[derive(Debug, Clone)]
pub struct IntFc {
    pub act: ActWidth,
    pub in_absmax: f32,
    pub pieces: Vec<IntPiece>,
    pub outs: Vec<String>,
    /// The pieces' outputs are partial sums of the one output `outs[0]`.
    pub sum: bool,
}

/// Places one int8 per-channel weight (rows divided by `row_div` in its scales) and returns
/// its row count and int8 row scales.
fn place_int8(
    buffers: &mut Buffers,
    key: &str,
    source: WeightSource,
    row_div: Option<&[f32]>,
) -> Result<(usize, Vec<f32>)> {
    let shape = source.shape();
    let w_scales = source.int8_row_scales()?;
    let q_scales: Vec<f32> = match row_div {
        Some(c) => w_scales.iter().zip(c).map(|(s, c)| s / c).collect(),
        None => w_scales.clone(),
    };
    let buffer = buffers.push(Payload::Weight {
        source,
        encoding: Encoding::Int8 {
            scales: Arc::new(w_scales.clone()),
        },
    });
    buffers.place(
        key,
        placed(
            buffer,
            &shape,
            Ty::Int8,
            Some(Quantization::per_channel(q_scales, 0)),
        ),
    );
    Ok((shape[0], w_scales))
}

/// The MLP of layer `l` split into channel groups (`N`, and `O` if it has outlier channels):
/// gate/up pieces by row group and down pieces by column group, summed.
fn place_mlp_groups(
    dg: &DecoderGraph,
    ranges: &IntRanges,
    buffers: &mut Buffers,
    op_index: usize,
    act: ActWidth,
) -> Result<Option<IntFc>> {
    let Op::Linear {
        weight, bias, out, ..
    } = &dg.ops[op_index]
    else {
        return Ok(None);
    };
    let w = &dg.weights[*weight];
    let (Some(l), WeightKind::Linear(role)) = (w.layer, w.kind) else {
        return Ok(None);
    };
    let Some(outliers) = ranges.ff_outliers.get(&l) else {
        return Ok(None);
    };
    if !matches!(role, LinearRole::GateUp | LinearRole::Down) {
        return Ok(None);
    }
    if bias.is_some() {
        return Err(Error::Invalid(format!(
            "TFLite int8: {} has a bias, which the integer MLP does not support",
            w.name
        )));
    }
    let ff = dg.dims.intermediate;
    let plain: Vec<usize> = (0..ff)
        .filter(|k| outliers.binary_search(k).is_err())
        .collect();
    let mut groups = vec![("N", plain)];
    if !outliers.is_empty() {
        groups.push(("O", outliers.clone()));
    }
    let key = weight_key(dg, *weight);
    let v = |s: &str| format!("layers.{l}.{s}");
    let mut pieces = Vec::new();
    let mut outs = Vec::new();
    let sum = role == LinearRole::Down;
    for (half, offset) in [("gate", 0), ("up", ff)] {
        if sum {
            break;
        }
        for (g, idx) in &groups {
            let rows: Vec<usize> = idx.iter().map(|k| k + offset).collect();
            let pkey = format!("{key}#{half}#{g}");
            let source = WeightSource {
                row_select: Some(Arc::new(rows)),
                ..WeightSource::plain(w.clone())
            };
            let (n, _) = place_int8(buffers, &pkey, source, None)?;
            let name = v(&format!("mlp.{half}#{g}"));
            pieces.push(IntPiece {
                weight_key: pkey,
                rows: n,
                bias_key: None,
                out_absmax: ranges.for_width(&name, act)?,
                input: None,
            });
            outs.push(name);
        }
    }
    if sum {
        let total = ranges.get(out)?;
        for (g, idx) in &groups {
            let pkey = format!("{key}#{g}");
            let source = WeightSource {
                col_select: Some(Arc::new(idx.clone())),
                ..WeightSource::plain(w.clone())
            };
            let (n, _) = place_int8(buffers, &pkey, source, Some(&ranges.c))?;
            let input = v(&format!("mlp.act#{g}"));
            let in_absmax = ranges.get(&input)?;
            pieces.push(IntPiece {
                weight_key: pkey,
                rows: n,
                bias_key: None,
                out_absmax: if groups.len() > 1 { 2.0 * total } else { total },
                input: Some((input, in_absmax)),
            });
        }
        outs.push(out.clone());
    }
    let in_absmax = match &dg.ops[op_index] {
        Op::Linear { x, .. } if !sum => ranges.for_width(x, act)?,
        _ => 0.0,
    };
    Ok(Some(IntFc {
        act: if sum { ActWidth::I16 } else { act },
        in_absmax,
        pieces,
        outs,
        sum,
    }))
}

/// Placement key of the int16 lookup table.
pub fn table_key(dg: &DecoderGraph) -> Option<String> {
    dg.weights
        .iter()
        .find(|w| w.kind == WeightKind::Embedding)
        .map(|w| format!("{}#int16", w.name))
}

/// Places the int16 embedding table and every linear's int8 weights and integer biases.
/// `activations` is the width of the smoothed linears' inputs (q/k/v and gate/up); every
/// other activation is int16.
pub fn place(
    dg: &DecoderGraph,
    ranges: &IntRanges,
    buffers: &mut Buffers,
    activations: ActWidth,
) -> Result<HashMap<String, IntFc>> {
    let emb = dg
        .weights
        .iter()
        .find(|w| w.kind == WeightKind::Embedding)
        .ok_or_else(|| Error::Invalid("TFLite int8: the graph has no embedding".into()))?;
    let inv_c: Vec<f32> = ranges.c.iter().map(|c| 1.0 / c).collect();
    let src = WeightSource {
        col_scale: Some(Arc::new(inv_c)),
        ..WeightSource::plain(emb.clone())
    };
    let m = src.abs_max()?;
    let scale = if m > 0.0 { m / 32767.0 } else { 1.0 };
    let buffer = buffers.push(Payload::Weight {
        source: src,
        encoding: Encoding::Int16 { scale },
    });
    let key = table_key(dg).expect("embedding found above");
    buffers.place(
        &key,
        placed(
            buffer,
            &emb.shape,
            Ty::Int16,
            Some(Quantization::per_tensor(scale, 0)),
        ),
    );

    let mut out = HashMap::new();
    for (i, op) in dg.ops.iter().enumerate() {
        let Op::Linear {
            x,
            weight,
            bias,
            out: y,
        } = op
        else {
            continue;
        };
        let w = &dg.weights[*weight];
        let key = weight_key(dg, *weight);
        let role = match w.kind {
            WeightKind::Linear(r) => r,
            _ => continue,
        };
        if let Some(fc) = place_mlp_groups(dg, ranges, buffers, i, activations)? {
            out.insert(key, fc);
            continue;
        }
        let act = match role {
            LinearRole::Qkv | LinearRole::GateUp => activations,
            _ => ActWidth::I16,
        };
        let residual_rows = matches!(role, LinearRole::O | LinearRole::Down);
        if residual_rows && bias.is_some() {
            return Err(Error::Invalid(format!(
                "TFLite int8: {} has a bias; a bias on a projection into the residual stream is not supported by the integer graph",
                w.name
            )));
        }
        let in_absmax = ranges.for_width(x, act)?;
        let in_scale = (in_absmax as f64 / act.max()) as f32;
        let split_outs: Option<Vec<String>> = dg.ops.get(i + 1).and_then(|n| match n {
            Op::Split { x, outs, .. } if x == y => Some(outs.clone()),
            _ => None,
        });
        let per_part =
            matches!(&split_outs, Some(o) if o.len() == w.parts.len() && w.parts.len() > 1);
        let (outs, pieces): (Vec<String>, Vec<Piece>) = if per_part {
            let outs = split_outs.clone().expect("checked");
            let mut v = Vec::new();
            for (pi, p) in w.parts.iter().enumerate() {
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
                    part(format!("{}#{pi}", bw.name), &bw.parts[pi])
                });
                v.push((format!("{key}#{pi}"), part(format!("{key}#{pi}"), p), b));
            }
            (outs, v)
        } else {
            (
                vec![y.clone()],
                vec![(
                    format!("{key}#int"),
                    w.clone(),
                    bias.map(|b| dg.weights[b].clone()),
                )],
            )
        };
        let mut placed_pieces = Vec::new();
        for (pi, (pkey, pw, pb)) in pieces.into_iter().enumerate() {
            let out_absmax = if per_part {
                ranges.for_width(&outs[pi], act)?
            } else if let Some(so) = &split_outs {
                let mut m = 0f32;
                for o in so {
                    m = m.max(ranges.for_width(o, act)?);
                }
                m
            } else {
                ranges.for_width(y, act)?
            };
            let (rows, w_scales) = place_int8(
                buffers,
                &pkey,
                WeightSource::plain(pw),
                residual_rows.then_some(&ranges.c[..]),
            )?;
            let bias_key = match pb {
                Some(bw) => {
                    let bk = format!("{}#{}", bw.name, act.bias_type().name());
                    let scales: Vec<f32> = w_scales.iter().map(|s| s * in_scale).collect();
                    let q = Quantization::per_channel(scales.clone(), 0);
                    let scales = Arc::new(scales);
                    let buffer = buffers.push(Payload::Weight {
                        source: WeightSource::plain(bw),
                        encoding: match act {
                            ActWidth::I8 => Encoding::Int32 { scales },
                            ActWidth::I16 => Encoding::Int64 { scales },
                        },
                    });
                    buffers.place(&bk, placed(buffer, &[rows], act.bias_type(), Some(q)));
                    Some(bk)
                }
                None => None,
            };
            placed_pieces.push(IntPiece {
                weight_key: pkey,
                rows,
                bias_key,
                out_absmax,
                input: None,
            });
        }
        out.insert(
            key,
            IntFc {
                act,
                in_absmax,
                pieces: placed_pieces,
                outs,
                sum: false,
            },
        );
    }
    Ok(out)
}

fn q16(absmax: f32) -> Quantization {
    Quantization::per_tensor(absmax / 32767.0, 0)
}

fn q8(absmax: f32) -> Quantization {
    Quantization::per_tensor(absmax / 127.0, 0)
}

/// int16 codes of `v` under `q16(absmax)`, little-endian.
fn i16_bytes(v: &[f32], absmax: f32) -> Vec<u8> {
    let s = absmax / 32767.0;
    v.iter()
        .flat_map(|x| ((x / s).round().clamp(-32767.0, 32767.0) as i16).to_le_bytes())
        .collect()
}

/// Lowers signatures of the integer graph.
pub struct IntLower<'a> {
    pub dg: &'a DecoderGraph,
    pub max_seq_len: usize,
    pub ranges: &'a IntRanges,
    pub fc: &'a HashMap<String, IntFc>,
}

struct Sig<'g, 'b> {
    g: &'g mut Graph<'b>,
    t: i32,
    values: HashMap<String, T>,
    start: T,
    future: T,
    cos: T,
    sin: T,
    rot: T,
}

impl Sig<'_, '_> {
    fn val(&self, n: &str) -> Result<T> {
        self.values.get(n).copied().ok_or_else(|| {
            Error::Invalid(format!(
                "TFLite export: value `{n}` is read before it is made"
            ))
        })
    }

    fn quant(&self, t: T) -> Option<Quantization> {
        self.g.sg.tensors[t as usize].quantization.clone()
    }

    /// An int16 op output quantized as `q`.
    #[allow(clippy::too_many_arguments)]
    fn op16(
        &mut self,
        op: B,
        version: i32,
        inputs: &[T],
        options: Options,
        name: &str,
        shape: &[i32],
        q: Quantization,
    ) -> T {
        self.g.op_q(
            op,
            version,
            inputs,
            options,
            (name, shape, Ty::Int16),
            Some(q),
        )
    }

    /// A shape change that keeps the input's type and quantization.
    fn reshape(&mut self, x: T, shape: &[i32], name: &str) -> T {
        let q = self.quant(x);
        let ty = self.g.dtype(x);
        let sh = self.g.const_i32("shape", &[shape.len() as i32], shape);
        self.g.op_q(
            B::Reshape,
            1,
            &[x, sh],
            Options::Reshape,
            (name, shape, ty),
            q,
        )
    }

    fn transpose(&mut self, x: T, perm: T, shape: &[i32], name: &str) -> T {
        let q = self.quant(x);
        let ty = self.g.dtype(x);
        self.g.op_q(
            B::Transpose,
            1,
            &[x, perm],
            Options::Transpose,
            (name, shape, ty),
            q,
        )
    }
}

impl IntLower<'_> {
    fn input_q(g: &mut Graph<'_>, name: &str, shape: &[i32], ty: Ty, q: Option<Quantization>) -> T {
        let t = g.activation(name, shape, ty, q);
        g.sg.inputs.push(t);
        g.rename(t, name);
        t
    }

    /// Lowers one signature with `t` new tokens per call.
    pub fn signature(&self, g: &mut Graph<'_>, t: usize) -> Result<Lowered> {
        let dg = self.dg;
        let d = &dg.dims;
        let s = self.max_seq_len as i32;
        let ti = t as i32;
        let hd = d.head_dim as i32;
        let nkv = d.n_kv_heads as i32;
        if dg.rotary.rotary_dim != d.head_dim {
            return Err(Error::Invalid(format!(
                "TFLite export: rotary over {} of {} head elements (partial rotary) is not supported",
                dg.rotary.rotary_dim, d.head_dim
            )));
        }
        let tokens = Self::input_q(g, TOKENS, &[1, ti], Ty::Int32, None);
        let pos = Self::input_q(g, INPUT_POS, &[ti], Ty::Int32, None);
        let mut kv_in = Vec::new();
        for l in 0..d.n_layers {
            for (kind, value) in [('k', "attn.k_rot"), ('v', "attn.v")] {
                let name = kv_name(kind, l);
                let r = self.ranges.get(&format!("layers.{l}.{value}"))?;
                let x = Self::input_q(g, &name, &[1, s, nkv, hd], Ty::Int16, Some(q16(r)));
                kv_in.push((name, x));
            }
        }
        let (start, future) = cache_positions(g, pos, ti, s);
        let (cos_t, sin_t) = full_tables(&dg.rotary, self.max_seq_len, d.head_dim);
        let unit = Quantization::per_tensor(1.0 / 32767.0, 0);
        let cos_table = g.const_q(
            "rope_cos",
            &[s, hd],
            Ty::Int16,
            i16_bytes(&cos_t, 1.0),
            unit.clone(),
        );
        let sin_table = g.const_q(
            "rope_sin",
            &[s, hd],
            Ty::Int16,
            i16_bytes(&sin_t, 1.0),
            unit.clone(),
        );
        let rot_codes: Vec<u8> = rotate_half_matrix(d.head_dim)
            .iter()
            .map(|&v| (v as i8) as u8)
            .collect();
        let rot = g.const_q(
            "rotate_half",
            &[hd, hd],
            Ty::Int8,
            rot_codes,
            Quantization::per_channel(vec![1.0; d.head_dim], 0),
        );
        let mut sig = Sig {
            g,
            t: ti,
            values: HashMap::new(),
            start,
            future,
            cos: 0,
            sin: 0,
            rot,
        };
        for (table, name) in [(cos_table, "cos"), (sin_table, "sin")] {
            let x = sig.g.op_q(
                B::Gather,
                1,
                &[table, pos],
                Options::Gather { axis: 0 },
                (name, &[ti, hd], Ty::Int16),
                Some(unit.clone()),
            );
            let x = sig.reshape(x, &[ti, 1, hd], name);
            if name == "cos" {
                sig.cos = x;
            } else {
                sig.sin = x;
            }
        }
        let ids_shape = sig.g.const_i32("shape", &[1], &[ti]);
        let ids = sig.g.op(
            B::Reshape,
            1,
            &[tokens, ids_shape],
            Options::Reshape,
            ("ids", &[ti], Ty::Int32),
        );
        sig.values.insert(INPUT_IDS.to_string(), ids);

        let mut kv_out = Vec::new();
        for op in &dg.ops {
            self.lower_op(&mut sig, op, &kv_in, &mut kv_out)?;
        }
        let logits16 = sig.val(&dg.logits)?;
        let v = d.vocab as i32;
        // The one float operator: the graph's output, dequantized at the boundary.
        let l3 = sig.reshape(logits16, &[1, ti, v], "logits_q");
        let logits = sig.g.op(
            B::Dequantize,
            4,
            &[l3],
            Options::Dequantize,
            (LOGITS, &[1, ti, v], Ty::Float32),
        );
        sig.g.rename(logits, LOGITS);
        sig.g.output(logits);
        let mut outputs = vec![TensorMap {
            name: LOGITS.into(),
            tensor_index: logits as u32,
        }];
        for (name, x) in kv_out {
            sig.g.output(x);
            outputs.push(TensorMap {
                name,
                tensor_index: x as u32,
            });
        }
        let mut inputs = vec![
            TensorMap {
                name: TOKENS.into(),
                tensor_index: tokens as u32,
            },
            TensorMap {
                name: INPUT_POS.into(),
                tensor_index: pos as u32,
            },
        ];
        for (name, x) in kv_in {
            inputs.push(TensorMap {
                name,
                tensor_index: x as u32,
            });
        }
        Ok(Lowered {
            subgraph: sig.g.sg.clone(),
            inputs,
            outputs,
        })
    }

    fn lower_op(
        &self,
        sig: &mut Sig<'_, '_>,
        op: &Op,
        kv_in: &[(String, T)],
        kv_out: &mut Vec<(String, T)>,
    ) -> Result<()> {
        let dg = self.dg;
        let r = self.ranges;
        let ti = sig.t;
        match op {
            Op::Embed { ids, out, .. } => {
                let key = table_key(dg).expect("graphs have an embedding");
                let ids = sig.val(ids)?;
                let w = sig.g.weight(&key);
                let h = sig.g.shape(w)[1];
                let q = sig.quant(w);
                let x = sig.g.op_q(
                    B::Gather,
                    1,
                    &[w, ids],
                    Options::Gather { axis: 0 },
                    (out, &[ti, h], Ty::Int16),
                    q,
                );
                // The table's range is the embedding's: later ops read it from `absmax`.
                sig.values.insert(out.clone(), x);
            }
            Op::RmsNorm { x, gain, out, .. } => {
                let x = sig.val(x)?;
                let h = sig.g.shape(x)[1];
                let gain = dg.weights[*gain].to_f32()?;
                let c = &r.c;
                // x holds r / c. The sum of squares of r is Σ_plain x_j² + c_O²·Σ_outliers x_j²;
                // each stage squares at its own scale, so the rounding is relative to the
                // stage, never to the largest token.
                let c_out = c.iter().fold(1f32, |m, v| m.max(*v));
                let hf = h as f32;
                let outliers: Vec<i32> = (0..c.len())
                    .filter(|&j| c[j] > 1.0)
                    .map(|j| j as i32)
                    .collect();
                let plain: Vec<i32> = (0..c.len())
                    .filter(|&j| c[j] <= 1.0)
                    .map(|j| j as i32)
                    .collect();
                let mut groups: Vec<(T, i32, f32)> = Vec::new();
                for (idx, factor) in [(&plain, 1.0f32), (&outliers, c_out * c_out)] {
                    if idx.is_empty() {
                        continue;
                    }
                    // The group's channels by a 0/1 mask (a MUL, which NPUs take where
                    // they may not take GATHER); the other channels add zeros.
                    let xs = if idx.len() == c.len() {
                        x
                    } else {
                        let mut mask = vec![0i16; c.len()];
                        for &j in idx.iter() {
                            mask[j as usize] = 1;
                        }
                        let bytes: Vec<u8> = mask.iter().flat_map(|v| v.to_le_bytes()).collect();
                        let m = sig.g.const_q(
                            "channel_mask",
                            &[h],
                            Ty::Int16,
                            bytes,
                            Quantization::per_tensor(1.0, 0),
                        );
                        let q = sig.quant(x).expect("integer activations are quantized");
                        sig.op16(B::Mul, 1, &[x, m], Options::Mul, "channels", &[ti, h], q)
                    };
                    let k = h;
                    groups.push((xs, k, factor));
                }
                let stages = norm_stages(
                    r.seen(&format!("{out}#ms_min"))?,
                    r.seen(&format!("{out}#ms_max"))?,
                );
                // n = x / sqrt(sum of squares) = x / (sqrt(H)·rms); sqrt(H) joins the gain.
                let nq = q16(r.get(&format!("{out}#n"))? / hf.sqrt());
                let mut normed = Vec::new();
                for (k, top) in stages.iter().enumerate() {
                    let top_sum = top * hf;
                    let mut parts = Vec::new();
                    for &(xs, kg, factor) in &groups {
                        // Squares at the stage's scale: one element may hold the whole sum,
                        // and MEAN adds the codes in 32 bits before it rounds once.
                        let sq = sig.op16(
                            B::Mul,
                            1,
                            &[xs, xs],
                            Options::Mul,
                            "sq",
                            &[ti, kg],
                            q16(top_sum / factor),
                        );
                        let axis = sig.g.const_i32("axis_last", &[1], &[1]);
                        let mean = sig.op16(
                            B::Mean,
                            1,
                            &[sq, axis],
                            Options::Reducer { keep_dims: true },
                            "mean_sq",
                            &[ti, 1],
                            q16(top_sum / factor / kg as f32),
                        );
                        // × group size (and c² for the outliers): this group's share of the sum.
                        let w = sig.g.const_q(
                            "group_weight",
                            &[1],
                            Ty::Int16,
                            1i16.to_le_bytes().to_vec(),
                            Quantization::per_tensor(factor * kg as f32, 0),
                        );
                        parts.push(sig.op16(
                            B::Mul,
                            1,
                            &[mean, w],
                            Options::Mul,
                            "sum_sq",
                            &[ti, 1],
                            q16(top_sum),
                        ));
                    }
                    let ms = if parts.len() == 1 {
                        parts[0]
                    } else {
                        sig.op16(
                            B::Add,
                            1,
                            &parts,
                            Options::Add,
                            "sum_sq",
                            &[ti, 1],
                            q16(top_sum),
                        )
                    };
                    // The smallest input this stage serves well: the previous stage's top,
                    // or a sixteenth of the calibrated minimum for the first.
                    let floor = if k == 0 {
                        top / (STAGE_RATIO * STAGE_RATIO)
                    } else {
                        top / STAGE_RATIO
                    };
                    let inv = sig.op16(
                        B::Rsqrt,
                        1,
                        &[ms],
                        Options::None,
                        "rsqrt",
                        &[ti, 1],
                        q16(1.0 / (floor * hf).sqrt()),
                    );
                    let n = sig.op16(
                        B::Mul,
                        1,
                        &[x, inv],
                        Options::Mul,
                        "normed",
                        &[ti, h],
                        nq.clone(),
                    );
                    let sat = if k + 1 < stages.len() {
                        let thr = sig.g.const_q(
                            "stage_top",
                            &[1],
                            Ty::Int16,
                            32000i16.to_le_bytes().to_vec(),
                            q16(top_sum),
                        );
                        Some(sig.g.op(
                            B::Greater,
                            1,
                            &[ms, thr],
                            Options::Greater,
                            ("saturated", &[ti, 1], Ty::Bool),
                        ))
                    } else {
                        None
                    };
                    normed.push((n, sat));
                }
                // From the top stage down: a token keeps the higher stage's result where the
                // lower one saturated.
                let (mut n, _) = normed.pop().expect("at least one stage");
                while let Some((nk, sat)) = normed.pop() {
                    let sat = sat.expect("lower stages have a saturation test");
                    n = sig.op16(
                        B::SelectV2,
                        1,
                        &[sat, n, nk],
                        Options::None,
                        "normed",
                        &[ti, h],
                        nq.clone(),
                    );
                }
                let cg: Vec<f32> = gain.iter().zip(c).map(|(g, c)| g * c * hf.sqrt()).collect();
                let cgmax = cg
                    .iter()
                    .fold(0f32, |m, v| m.max(v.abs()))
                    .max(f32::MIN_POSITIVE);
                let cgt = sig.g.const_q(
                    "norm_gain",
                    &[h],
                    Ty::Int16,
                    i16_bytes(&cg, cgmax),
                    q16(cgmax),
                );
                let y = sig.op16(
                    B::Mul,
                    1,
                    &[n, cgt],
                    Options::Mul,
                    out,
                    &[ti, h],
                    q16(r.get(out)?),
                );
                sig.values.insert(out.clone(), y);
            }
            Op::Linear { x, weight, out, .. } => {
                let x = x.clone();
                let key = weight_key(dg, *weight);
                let fq = self.fc.get(&key).ok_or_else(|| {
                    Error::Invalid(format!("TFLite int8: linear {key} was not placed"))
                })?;
                let xv = x;
                let mut inputs: HashMap<String, T> = HashMap::new();
                let mut ys = Vec::new();
                for p in &fq.pieces {
                    let (name, absmax) = match &p.input {
                        Some((n, a)) => (n.clone(), *a),
                        None => (xv.clone(), fq.in_absmax),
                    };
                    let xin = match inputs.get(&name) {
                        Some(&t) => t,
                        None => {
                            let x = sig.val(&name)?;
                            let n_in = sig.g.shape(x)[1];
                            let t = match fq.act {
                                ActWidth::I8 => sig.g.op_q(
                                    B::Quantize,
                                    4,
                                    &[x],
                                    Options::Quantize,
                                    ("x_q", &[ti, n_in], Ty::Int8),
                                    Some(q8(absmax)),
                                ),
                                ActWidth::I16 => x,
                            };
                            inputs.insert(name, t);
                            t
                        }
                    };
                    let w = sig.g.weight(&p.weight_key);
                    let b = match &p.bias_key {
                        Some(k) => sig.g.weight(k),
                        None => -1,
                    };
                    let rows = p.rows as i32;
                    let oq = match fq.act {
                        ActWidth::I8 => q8(p.out_absmax),
                        ActWidth::I16 => q16(p.out_absmax),
                    };
                    let y = sig.g.op_q(
                        B::FullyConnected,
                        11,
                        &[xin, w, b],
                        Options::FullyConnected {
                            keep_num_dims: false,
                            asymmetric_quantize_inputs: false,
                        },
                        (out, &[ti, rows], fq.act.tensor_type()),
                        Some(oq),
                    );
                    let y = match fq.act {
                        ActWidth::I8 => sig.op16(
                            B::Quantize,
                            4,
                            &[y],
                            Options::Quantize,
                            out,
                            &[ti, rows],
                            q16(p.out_absmax),
                        ),
                        ActWidth::I16 => y,
                    };
                    ys.push(y);
                }
                if fq.sum {
                    let mut acc = ys[0];
                    let rows = sig.g.shape(acc)[1];
                    for &y in &ys[1..] {
                        acc = sig.op16(
                            B::Add,
                            1,
                            &[acc, y],
                            Options::Add,
                            out,
                            &[ti, rows],
                            q16(r.get(out)?),
                        );
                    }
                    sig.values.insert(out.clone(), acc);
                } else if ys.len() == fq.outs.len() {
                    for (o, y) in fq.outs.iter().zip(ys) {
                        sig.values.insert(o.clone(), y);
                    }
                } else {
                    return Err(Error::Invalid(format!(
                        "TFLite int8: linear {key} has {} pieces for {} outputs",
                        ys.len(),
                        fq.outs.len()
                    )));
                }
            }
            Op::Split { x, sizes, outs } => {
                // Already made by the linear's pieces (whole, or as channel groups).
                if outs.iter().all(|o| {
                    sig.values.contains_key(o) || sig.values.contains_key(&format!("{o}#N"))
                }) {
                    return Ok(());
                }
                let x = sig.val(x)?;
                let q = sig.quant(x);
                let mut off = 0i32;
                for (n, o) in sizes.iter().zip(outs) {
                    let n = *n as i32;
                    let b = sig.g.const_i32("begin", &[2], &[0, off]);
                    let sz = sig.g.const_i32("size", &[2], &[ti, n]);
                    let y = sig.g.op_q(
                        B::Slice,
                        1,
                        &[x, b, sz],
                        Options::Slice,
                        (o, &[ti, n], Ty::Int16),
                        q.clone(),
                    );
                    sig.values.insert(o.clone(), y);
                    off += n;
                }
            }
            Op::Rotary { x, heads, out } => {
                let x = sig.val(x)?;
                let hd = dg.dims.head_dim as i32;
                let nh = *heads as i32;
                let qx = sig.quant(x).expect("integer activations are quantized");
                let x3 = sig.reshape(x, &[ti, nh, hd], "heads");
                let (rot, cos, sin) = (sig.rot, sig.cos, sig.sin);
                let rh = sig.op16(
                    B::FullyConnected,
                    11,
                    &[x3, rot, -1],
                    Options::FullyConnected {
                        keep_num_dims: true,
                        asymmetric_quantize_inputs: false,
                    },
                    "rotate_half",
                    &[ti, nh, hd],
                    qx.clone(),
                );
                let a = sig.op16(
                    B::Mul,
                    1,
                    &[x3, cos],
                    Options::Mul,
                    "x_cos",
                    &[ti, nh, hd],
                    qx.clone(),
                );
                let b = sig.op16(
                    B::Mul,
                    1,
                    &[rh, sin],
                    Options::Mul,
                    "rot_sin",
                    &[ti, nh, hd],
                    qx,
                );
                let y3 = sig.op16(
                    B::Add,
                    1,
                    &[a, b],
                    Options::Add,
                    "rotated",
                    &[ti, nh, hd],
                    q16(r.get(out)?),
                );
                let y = sig.reshape(y3, &[ti, nh * hd], out);
                sig.values.insert(out.clone(), y);
            }
            Op::Attention {
                layer,
                q,
                k,
                v,
                heads,
                kv_heads,
                head_dim,
                scale,
                out,
            } => {
                let (q, k, v) = (sig.val(q)?, sig.val(k)?, sig.val(v)?);
                let (nh, nkv, hd) = (*heads as i32, *kv_heads as i32, *head_dim as i32);
                let s = self.max_seq_len as i32;
                let grp = nh / nkv;
                let find = |kind: char| {
                    let name = kv_name(kind, *layer);
                    kv_in
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|&(_, t)| (name.clone(), t))
                        .ok_or_else(|| Error::Invalid(format!("TFLite export: no input {name}")))
                };
                let (kname, kc_in) = find('k')?;
                let (vname, vc_in) = find('v')?;
                // The cache holds V at the range of `attn.v`; a fused QKV gives V the scale of
                // the whole projection, so requantize it to the cache's.
                let v = if sig.quant(v) == sig.quant(vc_in) {
                    v
                } else {
                    let qc = sig.quant(vc_in).expect("the cache is quantized");
                    let shape = sig.g.shape(v).to_vec();
                    sig.op16(
                        B::Quantize,
                        4,
                        &[v],
                        Options::Quantize,
                        "v_cache_scale",
                        &shape,
                        qc,
                    )
                };
                let mut update = |sig: &mut Sig<'_, '_>, x: T, cache: T, name: &str| {
                    let x4 = sig.reshape(x, &[1, ti, nkv, hd], "kv_new");
                    let qc = sig.quant(cache);
                    let start = sig.start;
                    let c = sig.g.op_q(
                        B::DynamicUpdateSlice,
                        1,
                        &[cache, x4, start],
                        Options::DynamicUpdateSlice,
                        (name, &[1, s, nkv, hd], Ty::Int16),
                        qc,
                    );
                    sig.g.rename(c, &format!("{name}_out"));
                    kv_out.push((name.to_string(), c));
                    c
                };
                let kc = update(sig, k, kc_in, &kname);
                let vc = update(sig, v, vc_in, &vname);
                let perm = sig.g.const_i32("perm_102", &[3], &[1, 0, 2]);
                let kt = sig.reshape(kc, &[s, nkv, hd], "keys");
                let kt = sig.transpose(kt, perm, &[nkv, s, hd], "keys");
                let vt = sig.reshape(vc, &[s, nkv, hd], "values");
                let vt = sig.transpose(vt, perm, &[nkv, s, hd], "values");
                let q3 = sig.reshape(q, &[ti, nh, hd], "q_heads");
                let qt = sig.transpose(q3, perm, &[nh, ti, hd], "q_t");
                let qg = sig.reshape(qt, &[nkv, grp * ti, hd], "q_groups");
                // Raw q·k, with room below the calibrated range for the mask value: masked
                // positions sit 20 (after scaling) under the lowest real score.
                let raw = r.get(&format!("layers.{layer}.attn.scores"))?;
                let span = 2.0 * raw + 20.0 / scale;
                let sq = q16(span);
                let scores = sig.op16(
                    B::BatchMatmul,
                    1,
                    &[qg, kt],
                    Options::BatchMatmul {
                        adj_x: false,
                        adj_y: true,
                        asymmetric_quantize_inputs: false,
                    },
                    "scores",
                    &[nkv, grp * ti, s],
                    sq.clone(),
                );
                let s3 = sig.reshape(scores, &[nh, ti, s], "scores_h");
                let neg = sig.g.const_q(
                    "mask_value",
                    &[1],
                    Ty::Int16,
                    (-32767i16).to_le_bytes().to_vec(),
                    sq.clone(),
                );
                let future = sig.future;
                let masked = sig.op16(
                    B::SelectV2,
                    1,
                    &[future, neg, s3],
                    Options::None,
                    "masked",
                    &[nh, ti, s],
                    sq,
                );
                let p = sig.op16(
                    B::Softmax,
                    1,
                    &[masked],
                    Options::Softmax { beta: *scale },
                    "probs",
                    &[nh, ti, s],
                    Quantization::per_tensor(1.0 / 32768.0, 0),
                );
                let pg = sig.reshape(p, &[nkv, grp * ti, s], "probs_g");
                let o = sig.op16(
                    B::BatchMatmul,
                    1,
                    &[pg, vt],
                    Options::BatchMatmul {
                        adj_x: false,
                        adj_y: false,
                        asymmetric_quantize_inputs: false,
                    },
                    "attn",
                    &[nkv, grp * ti, hd],
                    q16(r.get(out)?),
                );
                let o3 = sig.reshape(o, &[nh, ti, hd], "attn_h");
                let ot = sig.transpose(o3, perm, &[ti, nh, hd], "attn_t");
                let y = sig.reshape(ot, &[ti, nh * hd], out);
                sig.values.insert(out.clone(), y);
            }
            Op::SwiGlu { gate, up, out } => {
                let silu_name = out.replace("mlp.act", "mlp.silu");
                let groups: Vec<&str> = if sig.values.contains_key(&format!("{gate}#N")) {
                    ["N", "O"]
                        .into_iter()
                        .filter(|g| sig.values.contains_key(&format!("{gate}#{g}")))
                        .collect()
                } else {
                    vec![""]
                };
                for g in groups {
                    let sfx = if g.is_empty() {
                        String::new()
                    } else {
                        format!("#{g}")
                    };
                    let gt = sig.val(&format!("{gate}{sfx}"))?;
                    let upv = sig.val(&format!("{up}{sfx}"))?;
                    let n = sig.g.shape(gt)[1];
                    let sg = sig.op16(
                        B::Logistic,
                        1,
                        &[gt],
                        Options::None,
                        "sigmoid",
                        &[ti, n],
                        Quantization::per_tensor(1.0 / 32768.0, 0),
                    );
                    let silu = sig.op16(
                        B::Mul,
                        1,
                        &[gt, sg],
                        Options::Mul,
                        "silu",
                        &[ti, n],
                        q16(r.get(&format!("{silu_name}{sfx}"))?),
                    );
                    let name = format!("{out}{sfx}");
                    let y = sig.op16(
                        B::Mul,
                        1,
                        &[silu, upv],
                        Options::Mul,
                        &name,
                        &[ti, n],
                        q16(r.get(&name)?),
                    );
                    sig.values.insert(name, y);
                }
            }
            Op::Add { a, b, out } => {
                let (a, b) = (sig.val(a)?, sig.val(b)?);
                let n = sig.g.shape(a)[1];
                let y = sig.op16(
                    B::Add,
                    1,
                    &[a, b],
                    Options::Add,
                    out,
                    &[ti, n],
                    q16(r.get(out)?),
                );
                sig.values.insert(out.clone(), y);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_stages_cover_the_calibrated_mean_squares_with_sixteenfold_windows() {
        // A narrow range needs one stage; it still reaches twice the maximum.
        let one = norm_stages(4.0, 30.0);
        assert_eq!(one, [64.0]);
        // SmolLM2's layer 12: rms 4 on ordinary tokens, ~946 on the first one.
        let many = norm_stages(16.0, 946.0 * 946.0);
        assert_eq!(many.len(), 5, "{many:?}");
        assert!(many.windows(2).all(|w| w[1] == w[0] * STAGE_RATIO));
        assert!(*many.last().unwrap() >= 2.0 * 946.0 * 946.0);
        // Every stage's lower end (a sixteenth of its top) is the previous stage's top.
        assert_eq!(many[0] / STAGE_RATIO, 16.0);
        assert!(norm_stages(1e-12, 1e12).len() <= MAX_STAGES);
    }

    #[test]
    fn probe_points_name_graph_values_and_the_residual_stream() {
        let g = |p: &str| graph_value(p, 30, "logits");
        assert_eq!(g("0.attn_in"), Some(("embed".into(), true)));
        assert_eq!(g("3.attn_in"), Some(("layers.2.out".into(), true)));
        assert_eq!(g("3.mlp_in"), Some(("layers.3.attn_residual".into(), true)));
        assert_eq!(g("3.o"), Some(("layers.3.attn.o".into(), true)));
        assert_eq!(g("3.down"), Some(("layers.3.mlp.down".into(), true)));
        assert_eq!(g("3.k_rot"), Some(("layers.3.attn.k_rot".into(), false)));
        assert_eq!(g("3.h"), Some(("layers.3.mlp.act".into(), false)));
        assert_eq!(g("final_in"), Some(("layers.29.out".into(), true)));
        assert_eq!(g("3.nonsense"), None);
        assert_eq!(norm_of("3.mlp_in").as_deref(), Some("layers.3.mlp_norm"));
        assert_eq!(norm_of("final_in").as_deref(), Some("final_norm"));
    }
}
