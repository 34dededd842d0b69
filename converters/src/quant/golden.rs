//! Deterministic inputs shared by the golden-byte tests of the quantizers.

/// Deterministic test row built only from integer ops and exact/IEEE-rounded basic float
/// ops (no libm `sin`/`exp`, whose last bits differ between platforms), so the inputs of the
/// golden vectors are identical everywhere: xorshift32 values in [-0.5, 0.5) scaled by
/// 1..7, a 9x outlier every 61 elements and an exact zero every 29.
pub fn golden_input(n: usize) -> Vec<f32> {
    let mut s: u32 = 0x2545_f491;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let u = (s >> 8) as f32 / 16_777_216.0;
            let mut v = (u - 0.5) * (1 + i % 7) as f32;
            if i % 61 == 0 {
                v *= 9.0;
            }
            if i % 29 == 5 {
                v = 0.0;
            }
            v
        })
        .collect()
}

/// Deterministic importance weights in [0.25, 5.25].
pub fn golden_weights(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| 0.25 + ((i * 37) % 11) as f32 * 0.5)
        .collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
