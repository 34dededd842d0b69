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
//! `post_attention_layernorm` → gate/up (Phi-3: `gate_up_proj`). v→o and up→down are not
//! smoothed: nothing foldable precedes them (those are AWQ's mappings).
//!
//! Only the changed tensors are computed (as `Source::Owned` f32); everything else keeps its
//! lazy source.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::calib::stats::CalibStats;
use crate::error::{Error, Result};
use crate::model::names::Role;
use crate::model::{Arch, Model, Source};

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
    /// (norm, consumers) groups folded.
    pub groups: usize,
    /// Tensors replaced.
    pub tensors: usize,
    /// Over all groups: the largest max|X_j| before and after smoothing (max|X_j| / s_j).
    pub act_max_before: f32,
    pub act_max_after: f32,
}

/// The smoothing groups of layer `l`: (norm weight, consuming weights).
fn groups(arch: Arch, l: usize) -> Vec<(String, Vec<String>)> {
    let names = |rs: &[Role]| rs.iter().map(|r| r.hf_name(l)).collect::<Vec<_>>();
    match arch {
        Arch::Phi3 => vec![
            (Role::InputNorm.hf_name(l), names(&[Role::Qkv])),
            (Role::PostNorm.hf_name(l), names(&[Role::GateUp])),
        ],
        Arch::Llama | Arch::Qwen2 => vec![
            (
                Role::InputNorm.hf_name(l),
                names(&[Role::Q, Role::K, Role::V]),
            ),
            (Role::PostNorm.hf_name(l), names(&[Role::Gate, Role::Up])),
        ],
    }
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
    act.iter()
        .zip(&wmax)
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
) -> Result<(Model, SmoothReport)> {
    stats.check_model(model, stats_path)?;
    let n_layers = model.config.num_hidden_layers;
    alpha.validate(n_layers)?;
    let mut out = model.clone();
    let mut report = SmoothReport {
        groups: 0,
        tensors: 0,
        act_max_before: 0.0,
        act_max_after: 0.0,
    };
    let src = &model.source;
    for l in 0..n_layers {
        let a = alpha.for_layer(l);
        for (norm, consumers) in groups(model.config.arch, l) {
            let act = &stats
                .entries
                .get(&consumers[0])
                .ok_or_else(|| {
                    Error::format(
                        stats_path,
                        &consumers[0],
                        "no statistics for this weight (computed on another model, or with an older edgepack?)",
                    )
                })?
                .absmax;
            let norm_t = model
                .tensor(&norm)
                .ok_or_else(|| Error::format(src, &norm, "missing"))?;
            if norm_t.shape != [act.len()] {
                return Err(Error::mismatch(
                    src,
                    &norm,
                    format!(
                        "shape {:?}, the statistics have {} channels",
                        norm_t.shape,
                        act.len()
                    ),
                ));
            }
            let mut ws = Vec::with_capacity(consumers.len());
            for c in &consumers {
                let t = model
                    .tensor(c)
                    .ok_or_else(|| Error::format(src, c, "missing"))?;
                if t.shape.len() != 2 || t.shape[1] != act.len() {
                    return Err(Error::mismatch(
                        src,
                        c,
                        format!(
                            "shape {:?}, the statistics have {} input channels",
                            t.shape,
                            act.len()
                        ),
                    ));
                }
                ws.push(t.to_f32()?);
            }
            let refs: Vec<&[f32]> = ws.iter().map(Vec::as_slice).collect();
            let s = scales(act, &refs, a);
            for (x, si) in act.iter().zip(&s) {
                report.act_max_before = report.act_max_before.max(*x);
                report.act_max_after = report.act_max_after.max(x / si);
            }
            let gamma: Vec<f32> = norm_t
                .to_f32()?
                .iter()
                .zip(&s)
                .map(|(g, si)| g / si)
                .collect();
            set_owned(&mut out, &norm, gamma);
            for (c, mut w) in consumers.iter().zip(ws) {
                for row in w.chunks_exact_mut(s.len()) {
                    row.iter_mut().zip(&s).for_each(|(v, si)| *v *= si);
                }
                set_owned(&mut out, c, w);
            }
            report.groups += 1;
            report.tensors += 1 + consumers.len();
        }
    }
    Ok((out, report))
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
