//! Importance-matrix ("imatrix") quantizers for the legacy 32-element block types
//! `Q4_0`, `Q4_1`, `Q5_0` and `Q5_1`, ported bit-for-bit from llama.cpp's
//! `quantize_row_q4_0_impl` .. `quantize_row_q5_1_impl` (`ggml-quants.c`).
//!
//! These are what `llama-quantize` runs when an importance matrix is supplied; without one it
//! uses the single-pass `*_ref` quantizers, which live elsewhere. Each function handles one
//! row (`x.len()` a multiple of 32, `qw.len() == x.len()`, one weight per column), because the
//! per-element weights `qw[j] * sqrt(sigma2 + x[j]^2)` use `sigma2 = mean(x^2)` over the whole
//! row.
//!
//! The scale searches are shared with the K-quants (`make_qx_quants` for the symmetric types,
//! `make_qkx3_quants` for the types with a min), see [`super::kquants`]. All arithmetic is
//! sequential `f32` without `mul_add`, matching a non-FMA x86-64 build of llama.cpp; builds
//! that contract `a*b + c` into FMA (aarch64, `-mfma`) may produce different bytes.

use super::kquants::{f16_bits, make_qkx_quants, make_qx_quants, Qkx, IMPL_QKX3_GRID};

/// Elements per legacy block (`QK4_0` = `QK4_1` = `QK5_0` = `QK5_1`).
pub const QK_LEGACY: usize = 32;
/// Encoded size of one `Q4_0` block in bytes.
pub const BLOCK_Q4_0_BYTES: usize = 18;
/// Encoded size of one `Q4_1` block in bytes.
pub const BLOCK_Q4_1_BYTES: usize = 20;
/// Encoded size of one `Q5_0` block in bytes.
pub const BLOCK_Q5_0_BYTES: usize = 22;
/// Encoded size of one `Q5_1` block in bytes.
pub const BLOCK_Q5_1_BYTES: usize = 24;

fn check_row(x: &[f32], out: &[u8], qw: &[f32], block_bytes: usize) -> usize {
    assert!(
        x.len() % QK_LEGACY == 0,
        "row length {} is not a multiple of {QK_LEGACY}",
        x.len()
    );
    let nb = x.len() / QK_LEGACY;
    assert_eq!(
        out.len(),
        nb * block_bytes,
        "output size does not match {nb} blocks"
    );
    assert_eq!(
        qw.len(),
        x.len(),
        "importance weights must have one entry per column"
    );
    nb
}

/// Fills `weight` with `qw[j] * sqrt(sigma2 + x[j]^2)` for one block.
#[inline]
fn block_weights(xb: &[f32], qw: &[f32], sigma2: f32, weight: &mut [f32; QK_LEGACY]) {
    for j in 0..QK_LEGACY {
        weight[j] = qw[j] * (sigma2 + xb[j] * xb[j]).sqrt();
    }
}

/// Row variance proxy `sigma2 = sum(x^2) / n`, summed sequentially like the C loop.
#[inline]
fn row_sigma2(x: &[f32]) -> f32 {
    let mut sum_x2 = 0.0f32;
    for &v in x {
        sum_x2 += v * v;
    }
    sum_x2 / x.len() as f32
}

/// Packs 32 4-bit codes: byte `j` = `q[j] | q[j + 16] << 4`.
#[inline]
fn pack_nibbles(q: &[u8; QK_LEGACY], qs: &mut [u8]) {
    for j in 0..16 {
        qs[j] = (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4);
    }
}

/// Bit 4 of code `j` goes to bit `j` of the little-endian `qh` word.
#[inline]
fn high_bits(q: &[u8; QK_LEGACY]) -> [u8; 4] {
    let mut qh = 0u32;
    for (j, &v) in q.iter().enumerate() {
        qh |= ((v as u32 & 0x10) >> 4) << j;
    }
    qh.to_le_bytes()
}

/// Symmetric block (`Q4_0` / `Q5_0`): `make_qx_quants(32, nmax, .., rmse_type 1, weight)`,
/// returning the codes `l + nmax` as unsigned values.
fn symmetric_block(xb: &[f32], weight: &[f32; QK_LEGACY], nmax: i32) -> (f32, [u8; QK_LEGACY]) {
    let mut l = [0i8; QK_LEGACY];
    let d = make_qx_quants(xb, nmax, &mut l, Some(weight));
    let mut q = [0u8; QK_LEGACY];
    for (dst, &src) in q.iter_mut().zip(&l) {
        *dst = src as u8;
    }
    (d, q)
}

/// The row loop every weighted legacy type shares: per-block importance weights
/// (`qw · sqrt(σ² + x²)`), then `encode` writes one block.
fn weighted_blocks(
    x: &[f32],
    out: &mut [u8],
    qw: &[f32],
    block_bytes: usize,
    mut encode: impl FnMut(&[f32], &[f32; QK_LEGACY], &mut [u8]),
) {
    let nb = check_row(x, out, qw, block_bytes);
    let sigma2 = row_sigma2(x);
    let mut weight = [0.0f32; QK_LEGACY];
    for ib in 0..nb {
        let xb = &x[ib * QK_LEGACY..(ib + 1) * QK_LEGACY];
        block_weights(
            xb,
            &qw[ib * QK_LEGACY..(ib + 1) * QK_LEGACY],
            sigma2,
            &mut weight,
        );
        encode(
            xb,
            &weight,
            &mut out[ib * block_bytes..(ib + 1) * block_bytes],
        );
    }
}

/// Quantizes one row to `Q4_0` with importance weights (port of `quantize_row_q4_0_impl`):
/// signed 4-bit codes in `[-8, 7]` from the weighted `make_qx_quants` search.
pub fn quantize_row_q4_0_weighted(x: &[f32], out: &mut [u8], qw: &[f32]) {
    weighted_blocks(x, out, qw, BLOCK_Q4_0_BYTES, |xb, weight, y| {
        let (d, q) = symmetric_block(xb, weight, 8);
        y[0..2].copy_from_slice(&f16_bits(d).to_le_bytes());
        pack_nibbles(&q, &mut y[2..18]);
    });
}

/// Quantizes one row to `Q5_0` with importance weights (port of `quantize_row_q5_0_impl`):
/// signed 5-bit codes in `[-16, 15]`, high bits in the `qh` word.
pub fn quantize_row_q5_0_weighted(x: &[f32], out: &mut [u8], qw: &[f32]) {
    weighted_blocks(x, out, qw, BLOCK_Q5_0_BYTES, |xb, weight, y| {
        let (d, q) = symmetric_block(xb, weight, 16);
        y[0..2].copy_from_slice(&f16_bits(d).to_le_bytes());
        y[2..6].copy_from_slice(&high_bits(&q));
        pack_nibbles(&q, &mut y[6..22]);
    });
}

/// Asymmetric block (`Q4_1` / `Q5_1`): `make_qkx3_quants(32, nmax, .., -0.9, 0.05, 36)`,
/// returning `(d, m)` where `m = -min` is the stored (non-positive) offset.
fn asymmetric_block(
    xb: &[f32],
    weight: &[f32; QK_LEGACY],
    nmax: i32,
) -> (f32, f32, [u8; QK_LEGACY]) {
    let mut q = [0u8; QK_LEGACY];
    let (d, the_min) = make_qkx_quants(Qkx::V3, xb, weight, nmax, &mut q, IMPL_QKX3_GRID, false);
    // `the_min` is the negated internal offset (>= 0); C stores `-the_min`. For an all-zero
    // block `the_min` is -0.0, so the stored min is +0.0 exactly as in C.
    (d, -the_min, q)
}

/// Quantizes one row to `Q4_1` with importance weights (port of `quantize_row_q4_1_impl`):
/// unsigned 4-bit codes with a per-block scale and min.
pub fn quantize_row_q4_1_weighted(x: &[f32], out: &mut [u8], qw: &[f32]) {
    weighted_blocks(x, out, qw, BLOCK_Q4_1_BYTES, |xb, weight, y| {
        let (d, m, q) = asymmetric_block(xb, weight, 15);
        y[0..2].copy_from_slice(&f16_bits(d).to_le_bytes());
        y[2..4].copy_from_slice(&f16_bits(m).to_le_bytes());
        pack_nibbles(&q, &mut y[4..20]);
    });
}

/// Quantizes one row to `Q5_1` with importance weights (port of `quantize_row_q5_1_impl`):
/// unsigned 5-bit codes with a per-block scale and min, high bits in the `qh` word.
pub fn quantize_row_q5_1_weighted(x: &[f32], out: &mut [u8], qw: &[f32]) {
    weighted_blocks(x, out, qw, BLOCK_Q5_1_BYTES, |xb, weight, y| {
        let (d, m, q) = asymmetric_block(xb, weight, 31);
        y[0..2].copy_from_slice(&f16_bits(d).to_le_bytes());
        y[2..4].copy_from_slice(&f16_bits(m).to_le_bytes());
        y[4..8].copy_from_slice(&high_bits(&q));
        pack_nibbles(&q, &mut y[8..24]);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::golden::{golden_input, golden_weights, unhex};

    type WQuant = fn(&[f32], &mut [u8], &[f32]);

    fn f16_at(b: &[u8], at: usize) -> f32 {
        half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
    }

    /// Minimal test-only decoder of the four legacy layouts (offsets of `d`, `m`, `qh`, `qs`).
    fn dequantize(b: &[u8], block_bytes: usize, out: &mut [f32]) {
        for (blk, y) in b
            .chunks_exact(block_bytes)
            .zip(out.chunks_exact_mut(QK_LEGACY))
        {
            let d = f16_at(blk, 0);
            let (m, qh, qs, offset) = match block_bytes {
                BLOCK_Q4_0_BYTES => (0.0, 0u32, &blk[2..18], -8.0),
                BLOCK_Q4_1_BYTES => (f16_at(blk, 2), 0, &blk[4..20], 0.0),
                BLOCK_Q5_0_BYTES => {
                    let qh = u32::from_le_bytes(blk[2..6].try_into().unwrap());
                    (0.0, qh, &blk[6..22], -16.0)
                }
                _ => {
                    let qh = u32::from_le_bytes(blk[4..8].try_into().unwrap());
                    (f16_at(blk, 2), qh, &blk[8..24], 0.0)
                }
            };
            for j in 0..16 {
                let lo = (qs[j] & 0xF) as u32 | ((qh >> j) & 1) << 4;
                let hi = (qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
                y[j] = d * (lo as f32 + offset) + m;
                y[j + 16] = d * (hi as f32 + offset) + m;
            }
        }
    }

    // Golden vectors: bytes written by llama.cpp's `quantize_q4_0/q4_1/q5_0/q5_1(src, dst, 1,
    // 256, golden_weights(256))` (i.e. the `_impl` paths) from the `ggml-quants.c` vendored in
    // llama-cpp-python 0.3.36, built for plain x86-64 with `gcc -O2 -ffp-contract=off`, on
    // `golden_input(256)`.
    const Q4_0_IMAT: &str = concat!(
        "b6b650a8d96d03988789889afc17979699c63c42898888888898789989888888",
        "88098888eeb559bb64c67f60c869e9ac447280a75a27cfb68b99a97995c60374",
        "a58916c7684893add234e9eb518f62778b95131770b4d9c9ddc7b8b5a1973989",
        "25328b2949a664ec477aa0a70037850d938ca95ad844ad866968576babeb7d3e",
        "888877a9098687887878797986889888",
    );
    const Q4_1_IMAT: &str = concat!(
        "b136c3c1af572692fc677876776503e868696639233f46ceffeeeeeedffddeff",
        "efefeeeeff0fddee793629c196348a38708e36861653aa8c6e5794c7083673c0",
        "635545755a28fb6a4a65e81786a55b40d234d1c0e9eb518f62778b95131770b4",
        "d9c9ddc7cb3567c04d57b566c9bc63c5a5488a02a7744e470c371ec3850d938c",
        "a95ad844ad866968576babeb1b3c84caccddccfe0fdadbddbdbdcfcfcacdeddd",
    );
    const Q5_0_IMAT: &str = concat!(
        "a6b2ae46e6f6a040a2ba05100f02ff33e82d2e1c228c493edfbfaf9f11000000",
        "f11ff021010100001101ff0088b2d3434a33b265c87cfdd161d1a13799e5013e",
        "a45e3bb30fb236cbf51131f11a7c17f93a022d8ec081273a13314b70cbf8b2b6",
        "a30dd4ee062a372ee0689273a98ec1b1cc294bca422e63014a631642825dd8c8",
        "9ee4304f68337aed5dc30a1a260742b4a088490dd2c0bfd635c5813a9befeac0",
        "f000ff42030c0e11e1e0f2f3fdf02010",
    );
    const Q5_1_IMAT: &str = concat!(
        "7232c1c151b819085faf4d34f9def0ecffcb06d1c0d2cd62473b48ceffffffdf",
        "debbccbbacea9bfdbecdbbbcdd0daacbe83129c12cbca5cc4c892762f01e7d1d",
        "3db6660aefa059a0c7314cc0f0454034d5ab8bdaa430f7d484c9d02e1c5ba780",
        "da30f8c04b70cbf8c2c6a31ed4ee072a372ef078a383ba9e533177c03146b435",
        "adbf9bdca48bc7ab6b9116055f09afaf5f3210c37afd5dc32b0d462a64c6d288",
        "7c1ee4d1c0e958f80a3884caffffefff99aa88fd0ea4a7bb6b7a8e8f949acaba",
    );

    fn check_golden(quant: WQuant, block_bytes: usize, expected_hex: &str) {
        let x = golden_input(256);
        let w = golden_weights(256);
        let mut out = vec![0u8; 256 / QK_LEGACY * block_bytes];
        quant(&x, &mut out, &w);
        assert_eq!(
            out,
            unhex(expected_hex),
            "quantized bytes differ from llama.cpp"
        );
    }

    #[test]
    fn q4_0_imatrix_matches_llama_cpp_impl_bytes() {
        check_golden(quantize_row_q4_0_weighted, BLOCK_Q4_0_BYTES, Q4_0_IMAT);
    }

    #[test]
    fn q4_1_imatrix_matches_llama_cpp_impl_bytes() {
        check_golden(quantize_row_q4_1_weighted, BLOCK_Q4_1_BYTES, Q4_1_IMAT);
    }

    #[test]
    fn q5_0_imatrix_matches_llama_cpp_impl_bytes() {
        check_golden(quantize_row_q5_0_weighted, BLOCK_Q5_0_BYTES, Q5_0_IMAT);
    }

    #[test]
    fn q5_1_imatrix_matches_llama_cpp_impl_bytes() {
        check_golden(quantize_row_q5_1_weighted, BLOCK_Q5_1_BYTES, Q5_1_IMAT);
    }

    /// (name, quantizer, block bytes, max relative RMSE); bounds ~1.2x the values measured on
    /// `golden_input(4096)`: Q4_0 0.145, Q4_1 0.095, Q5_0 0.075, Q5_1 0.046.
    const ALL_TYPES: [(&str, WQuant, usize, f64); 4] = [
        ("Q4_0", quantize_row_q4_0_weighted, BLOCK_Q4_0_BYTES, 0.175),
        ("Q4_1", quantize_row_q4_1_weighted, BLOCK_Q4_1_BYTES, 0.115),
        ("Q5_0", quantize_row_q5_0_weighted, BLOCK_Q5_0_BYTES, 0.09),
        ("Q5_1", quantize_row_q5_1_weighted, BLOCK_Q5_1_BYTES, 0.055),
    ];

    #[test]
    fn round_trip_error_is_within_per_type_bounds() {
        let n = 4096;
        let x = golden_input(n);
        let w = golden_weights(n);
        let rms = (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64).sqrt();
        for (name, quant, bytes, bound) in ALL_TYPES {
            let mut q = vec![0u8; n / QK_LEGACY * bytes];
            quant(&x, &mut q, &w);
            let mut y = vec![0.0f32; n];
            dequantize(&q, bytes, &mut y);
            let err = x
                .iter()
                .zip(&y)
                .map(|(&a, &b)| (a as f64 - b as f64).powi(2));
            let rel = (err.sum::<f64>() / n as f64).sqrt() / rms;
            assert!(rel < bound, "{name}: relative RMSE {rel:.4} >= {bound}");
        }
    }

    #[test]
    fn all_zero_rows_dequantize_to_zero_without_nan() {
        let n = 128;
        let x = vec![0.0f32; n];
        let w = golden_weights(n);
        for (name, quant, bytes, _) in ALL_TYPES {
            let mut q = vec![0xAAu8; n / QK_LEGACY * bytes];
            quant(&x, &mut q, &w);
            let mut y = vec![f32::NAN; n];
            dequantize(&q, bytes, &mut y);
            assert!(
                y.iter().all(|&v| v == 0.0),
                "{name}: non-zero output for zero row"
            );
        }
    }

    #[test]
    fn zero_weight_columns_do_not_produce_nan_scales() {
        // An imatrix can contain zero entries (columns never activated); the C code then
        // degenerates gracefully and so must we.
        let n = 256;
        let x = golden_input(n);
        let w = vec![0.0f32; n];
        for (name, quant, bytes, _) in ALL_TYPES {
            let mut q = vec![0u8; n / QK_LEGACY * bytes];
            quant(&x, &mut q, &w);
            let mut y = vec![0.0f32; n];
            dequantize(&q, bytes, &mut y);
            assert!(y.iter().all(|v| v.is_finite()), "{name}: non-finite output");
        }
    }
}
