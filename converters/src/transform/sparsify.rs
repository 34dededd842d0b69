//! Sparsification: sets weights of the decoder's linear layers to zero, by magnitude or by
//! Wanda's score (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs";
//! shared/facts/onnx.md §5), unstructured at a ratio or in N:M patterns (2:4, 4:8: in every
//! group of M consecutive input weights of a row, N are kept).
//!
//! - magnitude, unstructured: the `ratio · numel` smallest |W| of each tensor (layer-wise, the
//!   classic baseline);
//! - Wanda, unstructured: per output row, the `ratio · in` smallest `|W_ij| · ‖X_j‖₂`, where
//!   `‖X_j‖₂` is the norm of input channel j over the calibration tokens (from the statistics'
//!   sums of squares), compared within the row as the paper does;
//! - N:M: per group, the M − N smallest scores (|W|, or Wanda's score) are pruned.
//!
//! Embeddings, norms and the output projection are left dense. Masks are applied lazily as
//! tensors stream to an exporter ([`Source::Masked`]); only a per-tensor threshold (magnitude)
//! needs one pass over a tensor up front, which also counts the zeros for the report.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::names::linear_weights;
use crate::model::stats::CalibStats;
use crate::model::{Mask, Model, Source, Tensor};
use crate::progress::Progress;

/// How weights are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Magnitude,
    Wanda,
}

/// Which weights go.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Pattern {
    /// This share of each tensor (magnitude) or row (Wanda).
    Unstructured(f32),
    /// Keep `n` of every `m` consecutive input weights of a row.
    NM { n: usize, m: usize },
}

impl std::str::FromStr for Pattern {
    type Err = String;

    /// `2:4` / `4:8` for N:M; unstructured patterns come from a ratio instead.
    fn from_str(s: &str) -> std::result::Result<Pattern, String> {
        let (n, m) = s
            .split_once(':')
            .ok_or_else(|| format!("pattern `{s}`: expected N:M such as 2:4 or 4:8"))?;
        let (n, m): (usize, usize) = (
            n.trim()
                .parse()
                .map_err(|_| format!("pattern `{s}`: N is not a number"))?,
            m.trim()
                .parse()
                .map_err(|_| format!("pattern `{s}`: M is not a number"))?,
        );
        if m == 0 || n == 0 || n >= m {
            return Err(format!("pattern `{s}`: need 0 < N < M"));
        }
        Ok(Pattern::NM { n, m })
    }
}

/// Achieved sparsity of one tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorSparsity {
    pub name: String,
    pub shape: Vec<usize>,
    pub zeros: usize,
    pub sparsity: f64,
}

/// What was pruned.
#[derive(Debug, Clone, Serialize)]
pub struct SparsifyReport {
    pub method: Method,
    /// `"unstructured 0.5"` or `"2:4"`.
    pub pattern: String,
    pub tensors: Vec<TensorSparsity>,
    /// Zeros over the pruned tensors' values.
    pub sparsity: f64,
    /// Zeros of the pruned tensors over every parameter of the model.
    pub model_sparsity: f64,
}

/// Sparsifies `model`. Wanda needs `stats` (computed on this model; `stats_path` names it in
/// errors).
pub fn sparsify(
    model: &Model,
    method: Method,
    pattern: Pattern,
    stats: Option<(&CalibStats, &Path)>,
    progress: &dyn Progress,
) -> Result<(Model, SparsifyReport)> {
    if let Pattern::Unstructured(r) = pattern {
        if !(0.0..1.0).contains(&r) {
            return Err(Error::Invalid(format!(
                "sparsity ratio {r} is outside 0..1 (0.5 prunes half of the weights)"
            )));
        }
    }
    if let Pattern::NM { m, .. } = pattern {
        let c = &model.config;
        for (what, n_in) in [
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("num_attention_heads * head_dim", c.n_embd_q()),
        ] {
            if n_in % m != 0 {
                return Err(Error::unsupported(
                    &model.source,
                    what,
                    format!("{n_in} input channels do not divide into groups of {m}"),
                ));
            }
        }
    }
    let stats = match (method, stats) {
        (Method::Wanda, None) => {
            return Err(Error::Invalid(
                "Wanda needs activation statistics: run `edgepack calibrate` and pass --stats"
                    .into(),
            ))
        }
        (_, Some((s, p))) => {
            s.check_model(model, p)?;
            Some((s, p))
        }
        (_, None) => None,
    };
    let names = linear_weights(model);
    let mut out = model.clone();
    let mut report = SparsifyReport {
        method,
        pattern: match pattern {
            Pattern::Unstructured(r) => format!("unstructured {r}"),
            Pattern::NM { n, m } => format!("{n}:{m}"),
        },
        tensors: Vec::with_capacity(names.len()),
        sparsity: 0.0,
        model_sparsity: 0.0,
    };
    progress.start("sparsifying", names.len() as u64);
    let (mut zeros, mut total) = (0usize, 0usize);
    for name in &names {
        let t = out
            .tensor(name)
            .ok_or_else(|| Error::format(&model.source, name, "missing"))?
            .clone();
        let col_scale = match (method, stats) {
            (Method::Wanda, Some((s, p))) => {
                let e = s
                    .entries
                    .get(name)
                    .ok_or_else(|| Error::format(p, name, "no statistics for this weight"))?;
                if e.sum_sq.len() != t.row_len() {
                    return Err(Error::mismatch(
                        p,
                        name,
                        format!(
                            "{} channels, the weight has {} inputs",
                            e.sum_sq.len(),
                            t.row_len()
                        ),
                    ));
                }
                Some(Arc::new(
                    e.sum_sq.iter().map(|s| s.sqrt() as f32).collect::<Vec<_>>(),
                ))
            }
            _ => None,
        };
        let mask = match pattern {
            Pattern::Unstructured(r) => match method {
                Method::Magnitude => Mask::Threshold(threshold(&t, r)?),
                Method::Wanda => Mask::RowLowest {
                    k: (r as f64 * t.row_len() as f64) as usize,
                    col_scale,
                },
            },
            Pattern::NM { n, m } => Mask::NM { n, m, col_scale },
        };
        let masked = Tensor {
            source: Source::Masked {
                inner: Box::new(t.source.clone()),
                mask: Arc::new(mask),
            },
            ..t.clone()
        };
        let z = count_zeros(&masked)?;
        zeros += z;
        total += t.numel();
        report.tensors.push(TensorSparsity {
            name: name.clone(),
            shape: t.shape.clone(),
            zeros: z,
            sparsity: z as f64 / t.numel() as f64,
        });
        *out.tensor_mut(name).expect("listed from this model") = masked;
        progress.advance(1, name);
    }
    progress.finish();
    report.sparsity = zeros as f64 / total.max(1) as f64;
    report.model_sparsity = zeros as f64 / model.n_params().max(1) as f64;
    Ok((out, report))
}

/// The `ratio`-quantile of |w| over a tensor: zeroing every |w| at or below it prunes (at
/// least) that share.
fn threshold(t: &Tensor, ratio: f32) -> Result<f32> {
    let k = (ratio as f64 * t.numel() as f64) as usize;
    if k == 0 {
        return Ok(-1.0);
    }
    let mut a: Vec<f32> = t.to_f32()?.into_iter().map(f32::abs).collect();
    let (_, v, _) = a.select_nth_unstable_by(k - 1, f32::total_cmp);
    Ok(*v)
}

fn count_zeros(t: &Tensor) -> Result<usize> {
    let step = t.rows_per_chunk();
    let mut z = 0;
    let mut r = 0;
    while r < t.n_rows() {
        let end = (r + step).min(t.n_rows());
        z += t.rows_f32(r..end)?.iter().filter(|v| **v == 0.0).count();
        r = end;
    }
    Ok(z)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nm_keeps_the_n_largest_of_every_group() {
        let mut w = vec![0.1f32, -0.4, 0.3, 0.2, 5.0, 1.0, -2.0, 0.5];
        Mask::NM {
            n: 2,
            m: 4,
            col_scale: None,
        }
        .apply(&mut w, 8);
        assert_eq!(w, [0.0, -0.4, 0.3, 0.0, 5.0, 0.0, -2.0, 0.0]);
    }

    #[test]
    fn wanda_scores_weights_by_their_input_norm_within_each_row() {
        // Column 0 has a large input norm: its small weight survives, the larger one in
        // column 1 (quiet input) goes.
        let scale = Some(Arc::new(vec![100.0f32, 1.0, 1.0, 1.0]));
        let mut w = vec![0.1f32, 0.5, 0.6, 0.7, 0.1, 0.5, 0.6, 0.7];
        Mask::RowLowest {
            k: 1,
            col_scale: scale,
        }
        .apply(&mut w, 4);
        assert_eq!(w, [0.1, 0.0, 0.6, 0.7, 0.1, 0.0, 0.6, 0.7]);
        let mut w = vec![0.1f32, 0.5, 0.6, 0.7];
        Mask::RowLowest {
            k: 2,
            col_scale: None,
        }
        .apply(&mut w, 4);
        assert_eq!(w, [0.0, 0.0, 0.6, 0.7]);
    }

    #[test]
    fn patterns_parse_and_refuse_nonsense() {
        assert_eq!("2:4".parse::<Pattern>(), Ok(Pattern::NM { n: 2, m: 4 }));
        assert!("4:4".parse::<Pattern>().is_err());
        assert!("x".parse::<Pattern>().is_err());
    }
}
