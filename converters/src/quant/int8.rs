//! onnxruntime's 8-bit integer path as edgepack's ONNX `int8` export uses it: weights
//! quantized symmetrically per output row (MatMulInteger's int8 B, zero point 0), and
//! activations quantized per call by `DynamicQuantizeLinear` (uint8, asymmetric, one scale
//! and zero point over the whole input tensor). The exporter writes the weight codes; the
//! host forward pass that scores an int8 output replays both. The TFLite exporter's int8
//! weight codes (rounded half away from zero) live here too, for the same reason.

/// Symmetric int8 of one output row: scale `max|w| / 127`, codes in `[-127, 127]`, ties to
/// even. Returns the scale (0 for a row of zeros, whose codes are all 0).
pub fn symmetric_row(row: &[f32], q_out: &mut [i8]) -> f32 {
    let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    for (q, &v) in q_out.iter_mut().zip(row) {
        let x = if scale == 0.0 { 0.0 } else { v / scale };
        *q = x.round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    scale
}

/// Replaces a row by what its [`symmetric_row`] codes dequantize to.
pub fn round_trip_row(row: &mut [f32]) {
    let mut q = vec![0i8; row.len()];
    let scale = symmetric_row(row, &mut q);
    for (v, &c) in row.iter_mut().zip(&q) {
        *v = f32::from(c) * scale;
    }
}

/// A symmetric int8 weight code as edgepack's TFLite exporter writes it: `x / scale` rounded
/// half away from zero, clamped to `[-127, 127]`.
pub fn code_half_away(x: f32, scale: f32) -> i8 {
    (x / scale).round().clamp(-127.0, 127.0) as i8
}

/// The TFLite exporter's int8 scale of a weight row: `max|w| / 127`, and 1 for a row of zeros
/// (which then dequantizes to zeros without a division by zero).
pub fn row_scale_nonzero(row: &[f32]) -> f32 {
    let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax > 0.0 {
        amax / 127.0
    } else {
        1.0
    }
}

/// Replaces a row by its TFLite int8 reconstruction: [`row_scale_nonzero`], codes by
/// [`code_half_away`].
pub fn round_trip_row_half_away(row: &mut [f32]) {
    let scale = row_scale_nonzero(row);
    for v in row {
        *v = f32::from(code_half_away(*v, scale)) * scale;
    }
}

/// `DynamicQuantizeLinear`'s parameters for a tensor whose values span `[min, max]`: the
/// range widened to hold 0, over 255 steps, and the zero point that puts 0 on a code.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DynamicU8 {
    pub scale: f32,
    pub zero_point: u8,
}

impl DynamicU8 {
    pub fn of_range(min: f32, max: f32) -> DynamicU8 {
        let (min, max) = (min.min(0.0), max.max(0.0));
        let scale = if max == min { 1.0 } else { (max - min) / 255.0 };
        let zero_point = (-min / scale).clamp(0.0, 255.0).round_ties_even() as u8;
        DynamicU8 { scale, zero_point }
    }

    /// The uint8 code of `x`: `x / scale` rounded to even, plus the zero point, saturated.
    pub fn code(&self, x: f32) -> u8 {
        ((x / self.scale).round_ties_even() + f32::from(self.zero_point)).clamp(0.0, 255.0) as u8
    }

    /// The value `x` comes back as: its code less the zero point, times the scale.
    pub fn round_trip(&self, x: f32) -> f32 {
        (f32::from(self.code(x)) - f32::from(self.zero_point)) * self.scale
    }

    /// The parameters of a tensor's values.
    pub fn of_values(values: &[f32]) -> DynamicU8 {
        let (lo, hi) = values
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
                (lo.min(x), hi.max(x))
            });
        DynamicU8::of_range(lo, hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_symmetric_over_127_levels() {
        let row = [1.27f32, -0.64, 0.0];
        let mut q = [0i8; 3];
        let s = symmetric_row(&row, &mut q);
        assert!((s - 0.01).abs() < 1e-8);
        assert_eq!(q, [127, -64, 0]);
        let mut r = row;
        round_trip_row(&mut r);
        assert!((r[0] - 1.27).abs() < 1e-6 && (r[1] + 0.64).abs() < 1e-6 && r[2] == 0.0);
        let mut zeros = [0f32; 4];
        round_trip_row(&mut zeros);
        assert_eq!(zeros, [0.0; 4]);
    }

    #[test]
    fn dynamic_u8_spans_the_range_with_zero_on_a_code() {
        // [-1, 3]: 4/255 per step, zero point round(255/4) = 64.
        let p = DynamicU8::of_range(-1.0, 3.0);
        assert_eq!(p.zero_point, 64);
        assert!((p.scale - 4.0 / 255.0).abs() < 1e-9);
        assert_eq!(p.round_trip(0.0), 0.0);
        assert!((p.round_trip(3.0) - 3.0).abs() <= p.scale);
        assert!((p.round_trip(-1.0) + 1.0).abs() <= p.scale);
        // Values beyond the range saturate at the end codes.
        assert_eq!(p.round_trip(100.0), (255.0 - 64.0) * p.scale);
        // A positive-only tensor starts at 0; an all-zero one keeps its zeros.
        assert_eq!(DynamicU8::of_range(0.5, 2.0).zero_point, 0);
        assert_eq!(DynamicU8::of_range(0.0, 0.0).round_trip(0.0), 0.0);
    }
}
