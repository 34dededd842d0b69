//! Float storage types: F32, F16 and BF16, rounded as ggml rounds them (shared/facts/gguf.md §3.1).

/// f32 -> bf16 bits as `ggml_compute_fp32_to_bf16`: round to nearest even, NaN forced quiet,
/// subnormals kept.
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if (bits & 0x7fff_ffff) > 0x7f80_0000 {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + (0x7fff + ((bits >> 16) & 1))) >> 16) as u16
}

pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 -> f16 bits, round to nearest even; `half` matches ggml for every finite value and inf.
pub fn f32_to_f16_bits(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

pub fn f16_bits_to_f32(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

/// Round-trips an f32 through f16, as C code does when it re-reads a stored scale.
pub fn round_f16(x: f32) -> f32 {
    f16_bits_to_f32(f32_to_f16_bits(x))
}

pub fn write_f32(x: &[f32], out: &mut [u8]) {
    for (v, o) in x.iter().zip(out.chunks_exact_mut(4)) {
        o.copy_from_slice(&v.to_le_bytes());
    }
}

pub fn write_f16(x: &[f32], out: &mut [u8]) {
    for (v, o) in x.iter().zip(out.chunks_exact_mut(2)) {
        o.copy_from_slice(&f32_to_f16_bits(*v).to_le_bytes());
    }
}

pub fn write_bf16(x: &[f32], out: &mut [u8]) {
    for (v, o) in x.iter().zip(out.chunks_exact_mut(2)) {
        o.copy_from_slice(&f32_to_bf16_bits(*v).to_le_bytes());
    }
}

pub fn read_f32(b: &[u8], out: &mut [f32]) {
    for (c, o) in b.chunks_exact(4).zip(out.iter_mut()) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

pub fn read_f16(b: &[u8], out: &mut [f32]) {
    for (c, o) in b.chunks_exact(2).zip(out.iter_mut()) {
        *o = f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]));
    }
}

pub fn read_bf16(b: &[u8], out: &mut [f32]) {
    for (c, o) in b.chunks_exact(2).zip(out.iter_mut()) {
        *o = bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even_and_keeps_nan_quiet() {
        // 1 + 2^-8 sits exactly between two bf16 values: ties go to the even one (1.0).
        assert_eq!(f32_to_bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3*2^-8 ties upward to the even mantissa.
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        let nan = f32::from_bits(0x7f80_0001);
        assert_eq!(f32_to_bf16_bits(nan) & 0x7fc0, 0x7fc0);
        assert_eq!(bf16_bits_to_f32(f32_to_bf16_bits(-2.5)), -2.5);
    }

    #[test]
    fn f16_round_trip_is_exact_on_representable_values() {
        for v in [0.0f32, -0.0, 1.0, -65504.0, 6.1035156e-5, 0.333_251_95] {
            assert_eq!(round_f16(v), v);
        }
        assert!(round_f16(1e6).is_infinite());
    }
}
