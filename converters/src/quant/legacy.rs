//! The legacy 32-element block types Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0: llama.cpp's reference
//! quantizers (`quantize_row_q*_ref` in ggml-quants.c) and dequantizers, ported so that the
//! bytes are identical (shared/facts/gguf.md §3.2, §3.6).
//!
//! Exactness notes: Q8_0 rounds with `roundf` (half away from zero); the others truncate after
//! adding 0.5 / 8.5 / 16.5. The inverse scale is taken from the unrounded f32 scale, as in C.

use super::scalar::{f16_bits_to_f32, f32_to_f16_bits};
use super::types::QK;

fn put_f16(out: &mut [u8], at: usize, v: f32) {
    out[at..at + 2].copy_from_slice(&f32_to_f16_bits(v).to_le_bytes());
}

fn get_f16(b: &[u8], at: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// The signed value of largest magnitude; the first one wins ties (C uses a strict `>`).
fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// Packs 32 4-bit codes: byte j holds element j (low nibble) and element j+16 (high nibble).
fn pack_nibbles(q: &[u8; QK], out: &mut [u8]) {
    for j in 0..QK / 2 {
        out[j] = (q[j] & 0x0f) | ((q[j + QK / 2] & 0x0f) << 4);
    }
}

/// Bit 4 of each 5-bit code, element j at bit j of a little-endian u32.
fn pack_high_bits(q: &[u8; QK]) -> [u8; 4] {
    let mut qh = 0u32;
    for (j, &v) in q.iter().enumerate() {
        qh |= (((v >> 4) & 1) as u32) << j;
    }
    qh.to_le_bytes()
}

pub fn quantize_row_q8_0(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(34)) {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = inverse(d);
        put_f16(ob, 0, d);
        for (j, &v) in xb.iter().enumerate() {
            ob[2 + j] = ((v * id).round() as i8) as u8;
        }
    }
}

pub fn quantize_row_q4_0(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(18)) {
        let max = signed_absmax(xb);
        let d = max / -8.0;
        let id = inverse(d);
        put_f16(ob, 0, d);
        let mut q = [0u8; QK];
        for (j, &v) in xb.iter().enumerate() {
            q[j] = ((v * id + 8.5) as i8).min(15) as u8;
        }
        pack_nibbles(&q, &mut ob[2..18]);
    }
}

pub fn quantize_row_q4_1(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(20)) {
        let (min, max) = min_max(xb);
        let d = (max - min) / 15.0;
        let id = inverse(d);
        put_f16(ob, 0, d);
        put_f16(ob, 2, min);
        let mut q = [0u8; QK];
        for (j, &v) in xb.iter().enumerate() {
            q[j] = (((v - min) * id + 0.5) as i8).min(15) as u8;
        }
        pack_nibbles(&q, &mut ob[4..20]);
    }
}

pub fn quantize_row_q5_0(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(22)) {
        let max = signed_absmax(xb);
        let d = max / -16.0;
        let id = inverse(d);
        put_f16(ob, 0, d);
        let mut q = [0u8; QK];
        for (j, &v) in xb.iter().enumerate() {
            q[j] = ((v * id + 16.5) as i8).min(31) as u8;
        }
        ob[2..6].copy_from_slice(&pack_high_bits(&q));
        pack_nibbles(&q, &mut ob[6..22]);
    }
}

pub fn quantize_row_q5_1(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(24)) {
        let (min, max) = min_max(xb);
        let d = (max - min) / 31.0;
        let id = inverse(d);
        put_f16(ob, 0, d);
        put_f16(ob, 2, min);
        let mut q = [0u8; QK];
        for (j, &v) in xb.iter().enumerate() {
            // No clamp in C: (x-min)*id + 0.5 cannot exceed 31.5 by construction.
            q[j] = ((v - min) * id + 0.5) as u8;
        }
        ob[4..8].copy_from_slice(&pack_high_bits(&q));
        pack_nibbles(&q, &mut ob[8..24]);
    }
}

fn unpack_nibble(qs: &[u8], j: usize) -> u8 {
    if j < QK / 2 {
        qs[j] & 0x0f
    } else {
        qs[j - QK / 2] >> 4
    }
}

pub fn dequantize_row_q8_0(b: &[u8], out: &mut [f32]) {
    for (bb, ob) in b.chunks_exact(34).zip(out.chunks_exact_mut(QK)) {
        let d = get_f16(bb, 0);
        for j in 0..QK {
            ob[j] = (bb[2 + j] as i8) as f32 * d;
        }
    }
}

pub fn dequantize_row_q4_0(b: &[u8], out: &mut [f32]) {
    for (bb, ob) in b.chunks_exact(18).zip(out.chunks_exact_mut(QK)) {
        let d = get_f16(bb, 0);
        for (j, o) in ob.iter_mut().enumerate() {
            *o = (unpack_nibble(&bb[2..], j) as i32 - 8) as f32 * d;
        }
    }
}

pub fn dequantize_row_q4_1(b: &[u8], out: &mut [f32]) {
    for (bb, ob) in b.chunks_exact(20).zip(out.chunks_exact_mut(QK)) {
        let d = get_f16(bb, 0);
        let m = get_f16(bb, 2);
        for (j, o) in ob.iter_mut().enumerate() {
            *o = unpack_nibble(&bb[4..], j) as f32 * d + m;
        }
    }
}

fn high_bit(qh: &[u8], j: usize) -> u8 {
    let v = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    (((v >> j) & 1) as u8) << 4
}

pub fn dequantize_row_q5_0(b: &[u8], out: &mut [f32]) {
    for (bb, ob) in b.chunks_exact(22).zip(out.chunks_exact_mut(QK)) {
        let d = get_f16(bb, 0);
        for (j, o) in ob.iter_mut().enumerate() {
            let q = unpack_nibble(&bb[6..], j) | high_bit(&bb[2..6], j);
            *o = (q as i32 - 16) as f32 * d;
        }
    }
}

pub fn dequantize_row_q5_1(b: &[u8], out: &mut [f32]) {
    for (bb, ob) in b.chunks_exact(24).zip(out.chunks_exact_mut(QK)) {
        let d = get_f16(bb, 0);
        let m = get_f16(bb, 2);
        for (j, o) in ob.iter_mut().enumerate() {
            let q = unpack_nibble(&bb[8..], j) | high_bit(&bb[4..8], j);
            *o = q as f32 * d + m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<f32> {
        // Only exactly rounded f32 arithmetic, so Python/numpy reproduces the same inputs.
        (0..64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.173 * (1 + i % 7) as f32)
            .collect()
    }

    fn rmse(a: &[f32], b: &[f32]) -> f32 {
        let s: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        (s / a.len() as f32).sqrt()
    }

    type Quant = fn(&[f32], &mut [u8]);
    type Dequant = fn(&[u8], &mut [f32]);

    #[test]
    fn legacy_round_trip_error_is_within_half_a_step() {
        let x = sample();
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
        // Bounds relative to the RMS of the input: half a quantization step of each type.
        let cases: [(Quant, Dequant, usize, f32); 5] = [
            (quantize_row_q8_0, dequantize_row_q8_0, 34, 0.01 * rms),
            (quantize_row_q4_0, dequantize_row_q4_0, 18, 0.15 * rms),
            (quantize_row_q4_1, dequantize_row_q4_1, 20, 0.12 * rms),
            (quantize_row_q5_0, dequantize_row_q5_0, 22, 0.08 * rms),
            (quantize_row_q5_1, dequantize_row_q5_1, 24, 0.06 * rms),
        ];
        for (q, dq, bytes, bound) in cases {
            let mut buf = vec![0u8; x.len() / QK * bytes];
            q(&x, &mut buf);
            let mut y = vec![0f32; x.len()];
            dq(&buf, &mut y);
            assert!(rmse(&x, &y) < bound, "rmse {} bound {bound}", rmse(&x, &y));
        }
    }

    #[test]
    fn legacy_types_match_llama_cpp_reference_bytes() {
        // Golden bytes from gguf-py's quantizers, which are byte-identical to ggml's C reference
        // (shared/facts/gguf.md §3.6), for the same 64 inputs.
        let x = sample();
        let cases = [
            (quantize_row_q8_0 as Quant, "2536e9f420b8f95ca10328e51f96e555ef0032cf177fca09d8f736b3087ef50c44e753372ba3f50ce90741d82481fc14d5fe44c01811f216bcf142a3011de4125dde3af0"),
            (quantize_row_q4_0 as Quant, "19c659b9760db872ae9856da760f9a7349a84447ab9277994778cc268aa06899e568cc74"),
            (quantize_row_q4_1 as Quant, "f64515d1a54689f2367d4167a92579f0658cb657b34644d3aca288aa4789dd269bb078aaf669dd84"),
            (quantize_row_q5_0 as Quant, "19c2dbdad292a361dc0971f45c109ba3fc0d13f57230444369694b5b3524ef327de1884b0540cf22cbc079e8"),
            (quantize_row_q5_1 as Quant, "c54115d124250d695b8d12f47dfa91df534af2f0da097cbe7c4244d36d6d6fdb584500548f03bb5c2760e145fcd2ac09"),
        ];
        for (q, hex) in cases {
            let mut buf = vec![0u8; hex.len() / 2];
            q(&x, &mut buf);
            let got: String = buf.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(got, hex);
        }
    }

    #[test]
    fn zero_blocks_quantize_to_zero_scale_without_nan() {
        let x = vec![0.0f32; 32];
        for (q, dq, bytes) in [
            (
                quantize_row_q4_0 as Quant,
                dequantize_row_q4_0 as Dequant,
                18,
            ),
            (quantize_row_q4_1, dequantize_row_q4_1, 20),
            (quantize_row_q5_0, dequantize_row_q5_0, 22),
            (quantize_row_q5_1, dequantize_row_q5_1, 24),
            (quantize_row_q8_0, dequantize_row_q8_0, 34),
        ] {
            let mut buf = vec![0u8; bytes];
            q(&x, &mut buf);
            let mut y = vec![1f32; 32];
            dq(&buf, &mut y);
            assert!(y.iter().all(|v| *v == 0.0));
        }
    }
}
