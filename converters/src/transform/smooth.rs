//! SmoothQuant (Xiao et al. 2023; `mit-han-lab/smoothquant` `smooth.py`): moves activation
//! outliers into the weights with an exact rescaling, so that int8 activations lose less.
//!
//! For every input channel `j` of a group of linears that read the output of one RMSNorm,
//! `s_j = max|X_j|^α / max|W_:,j|^(1−α)`, where the weight maximum runs over every weight of
//! the group and is clamped to at least 1e-5, and `s_j` itself is clamped to at least 1e-5, as
//! the reference does. The norm's weight is divided by `s` and every weight's column `j`
//! multiplied by `s_j`: `(x·γ/s)·(W·diag(s))ᵀ = (x·γ)·Wᵀ`, so the model computes the same
//! function (up to float rounding).
//!
//! Groups (shared/facts/onnx.md §4): `input_layernorm` → q/k/v (Phi-3: `qkv_proj`) and
//! `post_attention_layernorm` → gate/up (Phi-3: `gate_up_proj`), the reference's choice; and,
//! with [`Scope::All`] (the default), v → o and up → down, where the producing projection's
//! rows absorb `1/s` (AWQ's extra mappings; exact because attention mixes value rows linearly
//! and `silu(gate) · up` is linear in up's rows). Under GQA, the query heads that read one KV
//! head share that head's factors.
//!
//! Only the changed tensors are computed (as `Source::Owned` f32); everything else keeps its
//! lazy source.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::calib::w8a8::{self, W8A8};
use crate::error::{Error, Result};
use crate::model::names::Role;
use crate::model::stats::CalibStats;
use crate::model::{Arch, Model, ModelConfig, Source};

/// Lower bound of weight maxima and of scales (the reference's `clamp(min=1e-5)`).
pub const MIN_SCALE: f32 = 1e-5;

/// Migration strength α: one for every layer, or one per layer.
#[derive(Debug, Clone, PartialEq)]
pub enum Alpha {
    Global(f32),
    PerLayer(Vec<f32>),
}

impl Alpha {
    fn for_layer(&self, l: usize) -> f32 {
        match self {
            Alpha::Global(a) => *a,
            Alpha::PerLayer(v) => v[l],
        }
    }

    fn validate(&self, n_layers: usize) -> Result<()> {
        let vals: &[f32] = match self {
            Alpha::Global(a) => std::slice::from_ref(a),
            Alpha::PerLayer(v) => {
                if v.len() != n_layers {
                    return Err(Error::Invalid(format!(
                        "alpha: {} values given for {n_layers} layers (give one, or one per layer)",
                        v.len()
                    )));
                }
                v
            }
        };
        if let Some(a) = vals.iter().find(|a| !(0.0..=1.0).contains(*a)) {
            return Err(Error::Invalid(format!(
                "alpha {a} is outside 0..=1 (0.5 is the usual choice; up to 0.85 for strong outliers)"
            )));
        }
        Ok(())
    }
}

/// What was smoothed.
#[derive(Debug, Clone, Serialize)]
pub struct SmoothReport {
    /// Groups folded (a norm or a producing projection, and its consumers).
    pub groups: usize,
    /// Tensors replaced.
    pub tensors: usize,
    /// Over all groups: the largest max|X_j| before and after smoothing (max|X_j| / s_j).
    pub act_max_before: f32,
    pub act_max_after: f32,
}

/// A smoothed model, with the factor each consuming linear's input was divided by.
#[derive(Debug, Clone)]
pub struct Smoothed {
    pub model: Model,
    pub report: SmoothReport,
    /// Consuming weight name → `s` per input channel: the smoothed model's input of that linear
    /// is the original input divided by `s` (so its statistics scale the same way).
    pub factors: BTreeMap<String, Vec<f32>>,
}

/// Smooths `model` with `alpha` (if given, every fold) and takes the static W8A8 activation
/// scales of the result from `stats` (computed on `model`, read from `stats_path`). Returns the
/// model the int8 engine runs (smoothed or not) and its scales.
pub fn prepare_w8a8(
    model: &Model,
    stats: &CalibStats,
    stats_path: &Path,
    alpha: Option<&Alpha>,
) -> Result<(Model, W8A8)> {
    stats.check_model(model, stats_path)?;
    let (m, factors) = match alpha {
        Some(a) => {
            let s = smooth(model, stats, stats_path, a, Scope::All)?;
            (s.model, s.factors)
        }
        None => (model.clone(), BTreeMap::new()),
    };
    let scales = w8a8::scales(&m, stats, stats_path, &factors)?;
    Ok((m, scales))
}

/// Which folds to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// Only the RMSNorm → projection groups (the reference's choice for Llama).
    Norms,
    /// Also v → o and up → down, which are exact too: attention output is a weighted sum of
    /// value rows, and the MLP's down input is `silu(gate) · up`, both linear in the rows of
    /// the producing projection.
    #[default]
    All,
}

/// What precedes a group and absorbs `1/s`.
enum Prev {
    /// An RMSNorm weight: element `j` is divided by `s_j`.
    Norm(String),
    /// Rows `start..start + s.len()` of a projection (and of its bias) are divided by `s`.
    Rows {
        weight: String,
        bias: Option<String>,
        start: usize,
    },
}

/// One fold: the producer, the consumers (whose input columns are multiplied by `s`), and how
/// a consumer's input channel maps to a factor (GQA: query heads share a KV head's values).
struct Group {
    prev: Prev,
    consumers: Vec<String>,
    /// Consumer input channel → index into `s`; `None` is the identity.
    map: Option<Vec<usize>>,
}

/// The smoothing groups of layer `l`.
fn groups(c: &ModelConfig, l: usize, scope: Scope) -> Vec<Group> {
    let names = |rs: &[Role]| rs.iter().map(|r| r.hf_name(l)).collect::<Vec<_>>();
    let norm_groups = |attn: &[Role], mlp: &[Role]| {
        vec![
            Group {
                prev: Prev::Norm(Role::InputNorm.hf_name(l)),
                consumers: names(attn),
                map: None,
            },
            Group {
                prev: Prev::Norm(Role::PostNorm.hf_name(l)),
                consumers: names(mlp),
                map: None,
            },
        ]
    };
    let mut out = match c.arch {
        Arch::Phi3 => norm_groups(&[Role::Qkv], &[Role::GateUp]),
        Arch::Llama | Arch::Qwen2 => {
            norm_groups(&[Role::Q, Role::K, Role::V], &[Role::Gate, Role::Up])
        }
    };
    if scope == Scope::All {
        let (v, v_start, up, up_start) = match c.arch {
            Arch::Phi3 => (
                Role::Qkv,
                c.n_embd_q() + c.n_embd_kv(),
                Role::GateUp,
                c.intermediate_size,
            ),
            Arch::Llama | Arch::Qwen2 => (Role::V, 0, Role::Up, 0),
        };
        let v_bias = match c.arch {
            Arch::Qwen2 => Some(Role::VBias.hf_name(l)),
            _ => None,
        };
        // o's input channel (head h, dim d) reads value channel (h / group, d).
        let (hd, g) = (
            c.head_dim,
            c.num_attention_heads / c.num_key_value_heads.max(1),
        );
        let o_map = (0..c.n_embd_q())
            .map(|ch| (ch / hd / g) * hd + ch % hd)
            .collect();
        out.push(Group {
            prev: Prev::Rows {
                weight: v.hf_name(l),
                bias: v_bias,
                start: v_start,
            },
            consumers: names(&[Role::O]),
            map: Some(o_map),
        });
        out.push(Group {
            prev: Prev::Rows {
                weight: up.hf_name(l),
                bias: None,
                start: up_start,
            },
            consumers: names(&[Role::Down]),
            map: None,
        });
    }
    out
}

/// The scales for one group: `act` is max|X_j|, `weights` the consuming `[out, in]` matrices.
pub fn scales(act: &[f32], weights: &[&[f32]], alpha: f32) -> Vec<f32> {
    let n = act.len();
    let mut wmax = vec![0f32; n];
    for w in weights {
        for row in w.chunks_exact(n) {
            for (m, &v) in wmax.iter_mut().zip(row) {
                *m = m.max(v.abs());
            }
        }
    }
    scales_from_max(act, &wmax, alpha)
}

/// `s_j = max|X_j|^α / max(max|W_j|, 1e-5)^(1−α)`, clamped to at least 1e-5.
fn scales_from_max(act: &[f32], wmax: &[f32], alpha: f32) -> Vec<f32> {
    act.iter()
        .zip(wmax)
        .map(|(&a, &w)| {
            let w = w.max(MIN_SCALE) as f64;
            let s = (a as f64).powf(alpha as f64) / w.powf(1.0 - alpha as f64);
            (s as f32).max(MIN_SCALE)
        })
        .collect()
}

/// Returns `model` smoothed with `stats` (read from `stats_path`, named in errors) at `alpha`.
/// The statistics must belong to this model ([`CalibStats::check_model`]).
pub fn smooth(
    model: &Model,
    stats: &CalibStats,
    stats_path: &Path,
    alpha: &Alpha,
    scope: Scope,
) -> Result<Smoothed> {
    stats.check_model(model, stats_path)?;
    let n_layers = model.config.num_hidden_layers;
    alpha.validate(n_layers)?;
    let mut out = Smoothed {
        model: model.clone(),
        report: SmoothReport {
            groups: 0,
            tensors: 0,
            act_max_before: 0.0,
            act_max_after: 0.0,
        },
        factors: BTreeMap::new(),
    };
    for l in 0..n_layers {
        for g in groups(&model.config, l, scope) {
            fold(model, stats, stats_path, &g, alpha.for_layer(l), &mut out)?;
        }
    }
    Ok(out)
}

/// A group's inputs to the factor formula.
struct Prepared {
    /// Consumer input channel → factor index.
    map: Vec<usize>,
    /// Per factor: pooled max|X| and max|W| over the consumers.
    amax: Vec<f32>,
    wmax: Vec<f32>,
    /// The consumers' weights `[out, in]`, f32.
    ws: Vec<Vec<f32>>,
}

impl Prepared {
    fn n_in(&self) -> usize {
        self.map.len()
    }

    /// The factor of every consumer input channel at `alpha`.
    fn per_channel(&self, alpha: f32) -> (Vec<f32>, Vec<f32>) {
        let s = scales_from_max(&self.amax, &self.wmax, alpha);
        let pc = self.map.iter().map(|&k| s[k]).collect();
        (s, pc)
    }
}

/// Reads a group's statistics and consumer weights (from `weights`, which may already hold
/// earlier folds), checking shapes against the statistics.
fn prepare_group(
    weights: &Model,
    stats: &CalibStats,
    stats_path: &Path,
    g: &Group,
) -> Result<Prepared> {
    let src = &weights.source;
    let first = &g.consumers[0];
    let act = &stats
        .entries
        .get(first)
        .ok_or_else(|| {
            Error::format(
                stats_path,
                first,
                "no statistics for this weight (computed on another model, or with an older edgepack?)",
            )
        })?
        .absmax;
    let n_in = act.len();
    let map: Vec<usize> = match &g.map {
        Some(m) => m.clone(),
        None => (0..n_in).collect(),
    };
    if map.len() != n_in {
        return Err(Error::mismatch(
            stats_path,
            first,
            format!("{n_in} input channels, the model has {}", map.len()),
        ));
    }
    let n_s = map.iter().max().map_or(0, |m| m + 1);
    let mut ws = Vec::with_capacity(g.consumers.len());
    for c in &g.consumers {
        let t = weights
            .tensor(c)
            .ok_or_else(|| Error::format(src, c, "missing"))?;
        if t.shape.len() != 2 || t.shape[1] != n_in {
            return Err(Error::mismatch(
                src,
                c,
                format!(
                    "shape {:?}, the statistics have {n_in} input channels",
                    t.shape
                ),
            ));
        }
        ws.push(t.to_f32()?);
    }
    // Channels that share a factor pool their maxima.
    let (mut amax, mut wmax) = (vec![0f32; n_s], vec![0f32; n_s]);
    for (ch, &k) in map.iter().enumerate() {
        amax[k] = amax[k].max(act[ch]);
    }
    for w in &ws {
        for row in w.chunks_exact(n_in) {
            for (&v, &k) in row.iter().zip(&map) {
                wmax[k] = wmax[k].max(v.abs());
            }
        }
    }
    Ok(Prepared {
        map,
        amax,
        wmax,
        ws,
    })
}

/// Computes the factors of one group and writes the changed tensors into `out` (reading
/// weights from `out`, since an earlier group may have changed them: Phi-3's fused qkv is both
/// a consumer of the norm and the producer of v).
fn fold(
    model: &Model,
    stats: &CalibStats,
    stats_path: &Path,
    g: &Group,
    alpha: f32,
    out: &mut Smoothed,
) -> Result<()> {
    let src = &model.source;
    let p = prepare_group(&out.model, stats, stats_path, g)?;
    let n_in = p.n_in();
    let (s, per_channel) = p.per_channel(alpha);
    let n_s = s.len();
    for (x, si) in p.amax.iter().zip(&s) {
        out.report.act_max_before = out.report.act_max_before.max(*x);
        out.report.act_max_after = out.report.act_max_after.max(x / si);
    }
    // The producer absorbs 1/s.
    let divide = |name: &str, start: usize, out: &mut Smoothed| -> Result<()> {
        let t = out
            .model
            .tensor(name)
            .ok_or_else(|| Error::format(src, name, "missing"))?;
        // A vector (norm weight, bias) has one value per row.
        let (rows, rl) = match t.shape.len() {
            1 => (t.numel(), 1),
            _ => (t.n_rows(), t.row_len()),
        };
        if rows < start + n_s {
            return Err(Error::mismatch(
                src,
                name,
                format!("shape {:?} has no rows {start}..{}", t.shape, start + n_s),
            ));
        }
        let mut v = t.to_f32()?;
        for (k, si) in s.iter().enumerate() {
            v[(start + k) * rl..(start + k + 1) * rl]
                .iter_mut()
                .for_each(|x| *x /= si);
        }
        set_owned(&mut out.model, name, v);
        out.report.tensors += 1;
        Ok(())
    };
    match &g.prev {
        Prev::Norm(norm) => divide(norm, 0, out)?,
        Prev::Rows {
            weight,
            bias,
            start,
        } => {
            divide(weight, *start, out)?;
            if let Some(b) = bias {
                divide(b, *start, out)?;
            }
        }
    }
    for (c, mut w) in g.consumers.iter().zip(p.ws) {
        for row in w.chunks_exact_mut(n_in) {
            row.iter_mut()
                .zip(&per_channel)
                .for_each(|(v, si)| *v *= si);
        }
        set_owned(&mut out.model, c, w);
        out.report.tensors += 1;
        // A consumer folded twice (never with these groups) would compose its factors.
        match out.factors.get_mut(c) {
            Some(f) => f.iter_mut().zip(&per_channel).for_each(|(a, b)| *a *= b),
            None => {
                out.factors.insert(c.clone(), per_channel.clone());
            }
        }
    }
    out.report.groups += 1;
    Ok(())
}

/// The α grid the automatic search tries: 0, 0.1, ..., 1 (the reference sweeps the same
/// range; finer steps changed the chosen α's error by well under 1% on SmolLM2).
pub const ALPHA_GRID_STEP: f32 = 0.1;

/// Tokens of calibration activations the search keeps per linear input; enough for stable
/// error estimates, small enough to hold every layer's inputs at once.
pub const SEARCH_TOKENS: usize = 256;

/// The result of the automatic α search for one layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSearch {
    pub layer: usize,
    pub alpha: f32,
    /// Relative int8 output error ‖Y − Ŷ‖² / ‖Y‖² summed over the layer's groups, at the chosen
    /// α and without smoothing (α = 0 is not "no smoothing": it still rescales by 1/max|W|).
    pub error: f64,
    pub error_unsmoothed: f64,
}

/// The α an int8 export smooths with when asked for `auto` (`export tflite --smooth auto`,
/// `bundle`, and a recipe output's `smooth = "auto"` alike): [`search_alpha`] over the
/// built-in calibration corpus in samples of the export's prefill length (kept within 16 to
/// 256 tokens), the length the exported graph sees its prompts in, over the norm-fed groups the
/// exports smooth (`Scope::Norms`).
pub fn search_alpha_for_export(
    model: &Model,
    stats: &CalibStats,
    stats_path: &Path,
    prefill_len: usize,
    progress: &dyn crate::progress::Progress,
) -> Result<Alpha> {
    let texts = [crate::calib::data::DEFAULT_CORPUS.to_string()];
    let seq_len = prefill_len.clamp(16, 256);
    let (alpha, _) = search_alpha(
        model,
        stats,
        stats_path,
        &texts,
        seq_len,
        Scope::Norms,
        progress,
    )?;
    Ok(alpha)
}

/// Chooses α per layer by minimizing the W8A8 output error of each layer's linears on
/// calibration activations: for every group and α on the grid, the consumers' outputs with
/// int8 per-tensor activations (scale from the statistics, after smoothing) and int8 per-row
/// weights are compared with the float outputs. `texts` are run through the model in samples
/// of `seq_len` tokens until [`SEARCH_TOKENS`] tokens are seen.
pub fn search_alpha(
    model: &Model,
    stats: &CalibStats,
    stats_path: &Path,
    texts: &[String],
    seq_len: usize,
    scope: Scope,
    progress: &dyn crate::progress::Progress,
) -> Result<(Alpha, Vec<LayerSearch>)> {
    use crate::calib::forward::Forward;
    stats.check_model(model, stats_path)?;
    let c = &model.config;
    let n_layers = c.num_hidden_layers;
    let all: Vec<Vec<Group>> = (0..n_layers).map(|l| groups(c, l, scope)).collect();
    let wanted: std::collections::BTreeSet<String> = all
        .iter()
        .flatten()
        .map(|g| g.consumers[0].clone())
        .collect();
    let n_samples = SEARCH_TOKENS.div_ceil(seq_len).max(1);
    let chunks = crate::calib::data::chunk_tokens(model, texts, seq_len, Some(n_samples))?;
    let fwd = Forward::new(model)?;
    let mut acts: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for chunk in &chunks.chunks {
        let mut cache = fwd.cache(chunk.len());
        fwd.forward_observed(chunk, &mut cache, &mut |name, x, _| {
            if wanted.contains(name) {
                acts.entry(name.to_string())
                    .or_default()
                    .extend_from_slice(x);
            }
        })?;
    }
    drop(fwd);
    let grid: Vec<f32> = (0..=(1.0 / ALPHA_GRID_STEP).round() as usize)
        .map(|i| i as f32 * ALPHA_GRID_STEP)
        .collect();
    progress.start("searching alpha", n_layers as u64);
    let mut out = Vec::with_capacity(n_layers);
    for (l, gs) in all.iter().enumerate() {
        let mut errs = vec![0f64; grid.len()];
        let mut base = 0f64;
        for g in gs {
            let p = prepare_group(model, stats, stats_path, g)?;
            let x = &acts[&g.consumers[0]];
            let act_absmax = &stats.entries[&g.consumers[0]].absmax;
            let reference = float_outputs(&p, x)?;
            base += w8a8_error(&p, x, &reference, act_absmax, None)?;
            for (e, &a) in errs.iter_mut().zip(&grid) {
                *e += w8a8_error(&p, x, &reference, act_absmax, Some(a))?;
            }
        }
        let (best, err) = errs
            .iter()
            .enumerate()
            .fold(
                (0, f64::INFINITY),
                |(bi, be), (i, &e)| if e < be { (i, e) } else { (bi, be) },
            );
        out.push(LayerSearch {
            layer: l,
            alpha: grid[best],
            error: err,
            error_unsmoothed: base,
        });
        progress.advance(1, &format!("layer {l}: alpha {}", grid[best]));
    }
    progress.finish();
    Ok((Alpha::PerLayer(out.iter().map(|s| s.alpha).collect()), out))
}

fn search_err(e: candle_core::Error) -> Error {
    Error::Invalid(format!("alpha search: {e}"))
}

/// The float outputs `x Wᵀ` of every consumer of a group, with their squared norms.
fn float_outputs(p: &Prepared, x: &[f32]) -> Result<Vec<(candle_core::Tensor, f64)>> {
    use candle_core::{Device, Tensor as CTensor};
    let n_in = p.n_in();
    let xf = CTensor::from_slice(x, (x.len() / n_in, n_in), &Device::Cpu).map_err(search_err)?;
    p.ws.iter()
        .map(|w| {
            let wf =
                CTensor::from_slice(w, (w.len() / n_in, n_in), &Device::Cpu).map_err(search_err)?;
            let y = xf
                .matmul(&wf.t().map_err(search_err)?)
                .map_err(search_err)?;
            let n = y
                .sqr()
                .and_then(|d| d.sum_all())
                .and_then(|d| d.to_scalar::<f32>())
                .map_err(search_err)?;
            Ok((y, n as f64))
        })
        .collect()
}

/// Relative output error of a group's consumers under W8A8 at `alpha` (`None`: unsmoothed),
/// on activations `x` (`[tokens, in]`) whose float outputs are `reference`.
fn w8a8_error(
    p: &Prepared,
    x: &[f32],
    reference: &[(candle_core::Tensor, f64)],
    act_absmax: &[f32],
    alpha: Option<f32>,
) -> Result<f64> {
    use crate::calib::w8a8::{fake_quant_row, QMAX};
    use candle_core::{Device, Tensor as CTensor};
    let n_in = p.n_in();
    let tokens = x.len() / n_in;
    let s = match alpha {
        Some(a) => p.per_channel(a).1,
        None => vec![1f32; n_in],
    };
    let scale = act_absmax
        .iter()
        .zip(&s)
        .map(|(a, s)| a / s)
        .fold(0f32, f32::max)
        .max(f32::MIN_POSITIVE)
        / QMAX;
    let xq: Vec<f32> = x
        .chunks_exact(n_in)
        .flat_map(|row| {
            row.iter()
                .zip(&s)
                .map(|(v, si)| (v / si / scale).round().clamp(-QMAX, QMAX) * scale)
        })
        .collect();
    let xq = CTensor::from_vec(xq, (tokens, n_in), &Device::Cpu).map_err(search_err)?;
    let (mut num, mut den) = (0f64, 0f64);
    for (w, (y, norm)) in p.ws.iter().zip(reference) {
        let mut wq = w.clone();
        for row in wq.chunks_exact_mut(n_in) {
            row.iter_mut().zip(&s).for_each(|(v, si)| *v *= si);
            fake_quant_row(row);
        }
        let wq = CTensor::from_vec(wq, (w.len() / n_in, n_in), &Device::Cpu).map_err(search_err)?;
        let d = xq
            .matmul(&wq.t().map_err(search_err)?)
            .and_then(|yq| y - yq)
            .and_then(|d| d.sqr())
            .and_then(|d| d.sum_all())
            .and_then(|d| d.to_scalar::<f32>())
            .map_err(search_err)?;
        num += d as f64;
        den += norm;
    }
    Ok(if den > 0.0 { num / den } else { 0.0 })
}

fn set_owned(model: &mut Model, name: &str, vals: Vec<f32>) {
    let t = model
        .tensor_mut(name)
        .expect("checked to exist in the source model");
    t.source = Source::Owned(Arc::new(vals));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_follow_the_reference_formula_with_its_clamps() {
        // Two channels, two weights sharing the input: weight max per column over both.
        let act = [4.0f32, 0.0];
        let w1 = [1.0f32, -0.5, 0.25, 0.0];
        let w2 = [-2.0f32, 0.0];
        let s = scales(&act, &[&w1, &w2], 0.5);
        assert!(
            (s[0] - (4.0f32.sqrt() / 2.0f32.sqrt())).abs() < 1e-6,
            "{s:?}"
        );
        // max|X| = 0 gives 0, clamped to 1e-5.
        assert_eq!(s[1], MIN_SCALE);
        // alpha 1: s = max|X|; alpha 0: s = 1 / max|W| (weight max clamped to 1e-5).
        assert_eq!(scales(&[3.0], &[&[0.5]], 1.0), [3.0]);
        assert_eq!(scales(&[3.0], &[&[0.0]], 0.0), [1.0 / MIN_SCALE]);
    }

    #[test]
    fn alpha_is_checked_per_layer_and_range() {
        assert!(Alpha::Global(0.5).validate(3).is_ok());
        assert!(Alpha::PerLayer(vec![0.5, 0.8, 0.9]).validate(3).is_ok());
        let e = Alpha::PerLayer(vec![0.5])
            .validate(3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 values given for 3 layers"), "{e}");
        let e = Alpha::Global(1.5).validate(3).unwrap_err().to_string();
        assert!(e.contains("alpha 1.5"), "{e}");
    }
}
