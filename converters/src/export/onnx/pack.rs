//! Weight encodings of the ONNX exporter, one output row (output channel) at a time:
//! MatMulNBits block quantization (shared/facts/onnx.md §1.5–1.6); the int8 per-channel rows
//! for MatMulInteger / QDQ are `quant::int8`'s.

use half::f16;

pub use crate::quant::blockwise::block_codes;

/// MatMulNBits blocks along K for one output row: quantized bytes (`k_blocks · block · bits/8`,
/// K index `2j` in the low nibble of byte `j` for 4 bits), one scale per block, and one zero
/// point per block (asymmetric only; unpacked here, packed by [`pack_zero_points`]).
///
/// Symmetric (ORT `quant_slice_symmetric`): the scale is the block's largest-magnitude value,
/// with its sign, divided by `-2^(bits-1)`, so that value lands exactly on the most negative
/// code; codes are stored offset by `2^(bits-1)` (the implicit zero point when none is given).
/// Asymmetric (`quant_slice_asymmetric`): the range `[min(0, min), max(0, max)]` over
/// `2^bits - 1` steps, zero point `round(-min / scale)`.
pub fn nbits_row(
    row: &[f32],
    block: usize,
    bits: u32,
    symmetric: bool,
    q_out: &mut Vec<u8>,
    scales: &mut Vec<f32>,
    zps: &mut Vec<u8>,
) {
    let mut codes = vec![0u8; block];
    for vals in row.chunks(block) {
        let (scale, zp) = block_codes(vals, bits, symmetric, &mut codes);
        match bits {
            4 => q_out.extend(codes.chunks_exact(2).map(|p| p[0] | (p[1] << 4))),
            8 => q_out.extend_from_slice(&codes),
            _ => unreachable!("MatMulNBits widths used: 4 and 8"),
        }
        scales.push(scale);
        if !symmetric {
            zps.push(zp);
        }
    }
}

/// Packs per-block zero points of one row as MatMulNBits wants them: `ceil(k_blocks·bits/8)`
/// bytes, block `2j` in the low nibble for 4 bits; an odd count leaves 8 in the last high
/// nibble, as MLAS does.
pub fn pack_zero_points(zps: &[u8], bits: u32, out: &mut Vec<u8>) {
    match bits {
        4 => out.extend(
            zps.chunks(2)
                .map(|p| p[0] | (p.get(1).copied().unwrap_or(8) << 4)),
        ),
        _ => out.extend_from_slice(zps),
    }
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// Little-endian bytes of f32 values rounded to f16.
pub fn f16_bytes(v: &[f32]) -> Vec<u8> {
    let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
    bytemuck::cast_slice(&h).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dequant(q: &[u8], scales: &[f32], zps: Option<&[u8]>, block: usize, k: usize) -> Vec<f32> {
        (0..k)
            .map(|i| {
                let byte = q[i / 2];
                let code = if i % 2 == 0 { byte & 15 } else { byte >> 4 } as f32;
                let zp = zps.map_or(8.0, |z| z[i / block] as f32);
                (code - zp) * scales[i / block]
            })
            .collect()
    }

    #[test]
    fn symmetric_int4_maps_the_largest_magnitude_to_minus_eight_and_rounds_the_rest() {
        let row: Vec<f32> = (0..40).map(|i| (i as f32 - 17.0) * 0.25).collect();
        let (mut q, mut s, mut z) = (Vec::new(), Vec::new(), Vec::new());
        nbits_row(&row, 32, 4, true, &mut q, &mut s, &mut z);
        assert_eq!(q.len(), 32, "two blocks of 16 bytes, K padded to 64");
        assert!(z.is_empty());
        // Block 0 holds -4.25 ..= 3.5: the largest magnitude is -4.25, scale 4.25/8.
        assert_eq!(s[0], -4.25 / -8.0);
        assert_eq!(q[0] & 15, 0, "-4.25 is code -8, stored 0");
        let d = dequant(&q, &s, None, 32, 40);
        for (a, b) in row.iter().zip(&d) {
            assert!(
                (a - b).abs() <= s[0].abs() / 2.0 + 1e-6
                    || (a - b).abs() <= s[1].abs() / 2.0 + 1e-6
            );
        }
    }

    #[test]
    fn asymmetric_int4_spans_min_to_max_with_a_zero_point() {
        let row: Vec<f32> = (0..32).map(|i| i as f32 * 0.1 + 0.5).collect();
        let (mut q, mut s, mut z) = (Vec::new(), Vec::new(), Vec::new());
        nbits_row(&row, 32, 4, false, &mut q, &mut s, &mut z);
        // min clamps to 0 (the range always holds zero), so the zero point is 0.
        assert_eq!(z, vec![0]);
        assert!((s[0] - 3.6 / 15.0).abs() < 1e-6);
        let d = dequant(&q, &s, Some(&z), 32, 32);
        for (a, b) in row.iter().zip(&d) {
            assert!((a - b).abs() <= s[0] / 2.0 + 1e-6, "{a} vs {b}");
        }
        let mut packed = Vec::new();
        pack_zero_points(&[3, 9, 5], 4, &mut packed);
        assert_eq!(packed, vec![3 | (9 << 4), 5 | (8 << 4)]);
    }
}
