//! Blockwise integer weights as onnxruntime quantizes them for MatMulNBits: one scale (and,
//! asymmetric, one zero point) per block of `block` values along a row. The ONNX exporter
//! writes these codes; the host forward pass can run with their values to score an export
//! (see `calib::forward::Forward::simulate_blockwise`).

/// Quantizes one block (`vals`, at most `codes.len()` values; the rest of `codes` is padding
/// at the zero point) to unsigned codes `0..2^bits`; returns (scale, zero point). Symmetric
/// codes carry the implicit zero point `2^(bits-1)`. Rounding and tie-breaking follow MLAS's
/// blockwise quantizer (`q4_dq.cpp`: `range2scale`, `range2scalezp`, `roundf(v / s + zp)`), so
/// the codes are the ones onnxruntime's own MatMulNBits quantizer produces.
pub fn block_codes(vals: &[f32], bits: u32, symmetric: bool, codes: &mut [u8]) -> (f32, u8) {
    let levels = ((1u32 << bits) - 1) as f32;
    let mid = (1u32 << (bits - 1)) as f32;
    let lo = vals.iter().copied().fold(f32::MAX, f32::min);
    let hi = vals.iter().copied().fold(-f32::MAX, f32::max);
    let (scale, zp) = if symmetric {
        // The value of largest magnitude, the negative one on a tie, lands on code 0 (-mid).
        let big = if hi.abs() > lo.abs() { hi } else { lo };
        (big / -mid, mid)
    } else {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let s = (hi - lo) / levels;
        let zp = if s == 0.0 { lo } else { 0.0 - lo / s };
        (s, zp.clamp(0.0, levels).round())
    };
    let inv = if scale == 0.0 { 0.0 } else { 1.0 / scale };
    // Past the values, MLAS leaves the buffer's zeros, except the partner of an odd last
    // value, which it sets to the zero point.
    codes.iter_mut().for_each(|c| *c = 0);
    if let Some(c) = codes.get_mut(vals.len()).filter(|_| vals.len() % 2 == 1) {
        *c = zp as u8;
    }
    for (c, &v) in codes.iter_mut().zip(vals) {
        *c = (v * inv + zp).round().clamp(0.0, levels) as u8;
    }
    (scale, zp as u8)
}

/// The values `row` takes after blockwise quantization to `bits` with blocks of `block`
/// (the last block may be short): each code times its block's scale, less the zero point,
/// as onnxruntime's MatMulNBits dequantizes them.
pub fn round_trip(row: &[f32], block: usize, bits: u32, symmetric: bool) -> Vec<f32> {
    let mut codes = vec![0u8; block];
    let mut out = Vec::with_capacity(row.len());
    for vals in row.chunks(block) {
        let (scale, zp) = block_codes(vals, bits, symmetric, &mut codes);
        out.extend(
            codes[..vals.len()]
                .iter()
                .map(|&c| (c as f32 - zp as f32) * scale),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_trip_lands_each_value_within_half_a_step_and_keeps_the_extreme_exactly() {
        let row: Vec<f32> = (0..40).map(|i| (i as f32 - 17.0) * 0.25).collect();
        for symmetric in [true, false] {
            let back = round_trip(&row, 32, 4, symmetric);
            assert_eq!(back.len(), 40);
            for (blk, vals) in row.chunks(32).enumerate() {
                let got = &back[blk * 32..blk * 32 + vals.len()];
                let (lo, hi) = vals
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                let step = if symmetric {
                    lo.abs().max(hi.abs()) / 8.0
                } else {
                    (hi.max(0.0) - lo.min(0.0)) / 15.0
                };
                for (a, b) in vals.iter().zip(got) {
                    assert!(
                        (a - b).abs() <= step / 2.0 + 1e-6,
                        "{symmetric}: {a} -> {b}"
                    );
                }
            }
            // Symmetric: the value of largest magnitude is a code exactly.
            if symmetric {
                assert_eq!(back[0], row[0]);
            }
        }
    }
}
