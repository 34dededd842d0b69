//! Static W8A8: int8 per-output-channel symmetric weights and int8 per-tensor symmetric
//! activations with scales fixed at calibration time, the scheme of SmoothQuant's O1-O3
//! (shared/facts/onnx.md §4) and what NPU delegates take. It owns the scales the ONNX and
//! TFLite exporters write, and the rounding they imply, so that edgepack's reference forward
//! pass can simulate exactly what an int8 engine computes ([`crate::calib::forward::Forward::
//! simulate_w8a8`]).
//!
//! Which layers: every linear inside the decoder layers (q/k/v/o, gate/up/down or Phi-3's
//! fused qkv and gate_up). The embedding and the output projection stay in float, as
//! SmoothQuant and the NPU toolchains leave them: they are lookups or a single large matmul
//! whose error goes straight into the logits.
//!
//! With smoothing, the scales are those of the smoothed model's inputs: each input channel
//! was divided by its factor `s_j`, so the per-tensor range is `max_j(max|X_j| / s_j)`, derived
//! exactly from the per-channel statistics without a second calibration run. The factors come
//! in as plain data ([`scales`]); `transform::smooth::prepare_w8a8` smooths and then asks for
//! the scales.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::names::linear_weights;
use crate::model::stats::CalibStats;
use crate::model::Model;

/// Largest int8 magnitude of a symmetric scheme (−127..=127; −128 is left unused so that the
/// range is symmetric, as ONNX Runtime's and TFLite's symmetric weight quantizers do).
pub const QMAX: f32 = 127.0;

/// The static scale of one linear layer's input.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ActScale {
    /// max |x| the scale covers (after smoothing, if any).
    pub absmax: f32,
    /// `absmax / 127`; an input `x` is stored as `round(x / scale)` clamped to ±127.
    pub scale: f32,
}

impl ActScale {
    fn of(absmax: f32) -> ActScale {
        // A channel that never fired still needs a usable, non-zero scale.
        let absmax = if absmax > 0.0 { absmax } else { 1.0 };
        ActScale {
            absmax,
            scale: absmax / QMAX,
        }
    }
}

/// The activation scales of a model's W8A8 linears, keyed by HF weight name.
#[derive(Debug, Clone, Default, Serialize)]
pub struct W8A8 {
    pub act: BTreeMap<String, ActScale>,
}

/// The static activation scales of `model`'s W8A8 linears from `stats` (read from
/// `stats_path`). `factors` are the SmoothQuant factors already folded into `model`, per
/// consuming weight (empty when it was not smoothed): a smoothed input channel `j` was divided
/// by `s_j`, so its range is `max|X_j| / s_j`.
pub fn scales(
    model: &Model,
    stats: &CalibStats,
    stats_path: &Path,
    factors: &BTreeMap<String, Vec<f32>>,
) -> Result<W8A8> {
    let mut out = W8A8 {
        act: BTreeMap::new(),
    };
    for name in linear_weights(model) {
        let e = stats.entries.get(&name).ok_or_else(|| {
            Error::format(
                stats_path,
                &name,
                "no statistics for this weight (computed on another model, or with an older edgepack?)",
            )
        })?;
        let absmax = match factors.get(&name) {
            Some(s) => e
                .absmax
                .iter()
                .zip(s)
                .map(|(a, s)| a / s)
                .fold(0f32, f32::max),
            None => e.abs_max(),
        };
        out.act.insert(name, ActScale::of(absmax));
    }
    Ok(out)
}

/// The symmetric scale of one weight row: `max|w| / 127` (1 for an all-zero row, whose codes
/// are all zero whatever the scale).
pub fn row_scale(row: &[f32]) -> f32 {
    let m = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    if m > 0.0 {
        m / QMAX
    } else {
        1.0
    }
}

/// Quantizes one weight row to int8 codes; returns its scale. Rounds half away from zero, as
/// `f32::round` and ONNX Runtime's/TFLite's quantizers do for weights.
pub fn quantize_row(row: &[f32], codes: &mut [i8]) -> f32 {
    let scale = row_scale(row);
    for (q, &v) in codes.iter_mut().zip(row) {
        *q = (v / scale).round().clamp(-QMAX, QMAX) as i8;
    }
    scale
}

/// Replaces a weight row by its int8 reconstruction `code · scale`.
pub fn fake_quant_row(row: &mut [f32]) {
    let scale = row_scale(row);
    for v in row.iter_mut() {
        *v = (*v / scale).round().clamp(-QMAX, QMAX) * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_quantize_symmetrically_with_the_row_maximum_at_127() {
        let row = [0.5f32, -1.0, 0.25, 0.0];
        let mut q = [0i8; 4];
        let s = quantize_row(&row, &mut q);
        assert_eq!(s, 1.0 / 127.0);
        assert_eq!(q, [64, -127, 32, 0]);
        let mut r = row;
        fake_quant_row(&mut r);
        assert_eq!(r[1], -1.0);
        assert!((r[0] - 64.0 / 127.0).abs() < 1e-7);
        // An all-zero row keeps zero codes and a finite scale.
        let mut z = [0i8; 2];
        assert_eq!(quantize_row(&[0.0, 0.0], &mut z), 1.0);
        assert_eq!(z, [0, 0]);
    }

    #[test]
    fn activation_scale_covers_the_range_and_never_is_zero() {
        assert_eq!(ActScale::of(12.7).scale, 0.1);
        assert_eq!(ActScale::of(0.0).scale, 1.0 / QMAX);
    }
}
