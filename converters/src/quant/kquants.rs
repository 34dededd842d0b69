//! K-quant (ggml `Q2_K` .. `Q6_K`) quantizers and dequantizers, ported bit-for-bit from
//! llama.cpp's `ggml-quants.c`.
//!
//! This module owns:
//! - the reference quantizers (`quantize_row_qX_K_ref`, used by `llama-quantize` when no
//!   importance matrix is given) and the importance-weighted variants
//!   (`quantize_row_qX_K_impl`), selected by the `qw` argument of each `quantize_row_qX_k`;
//! - the matching dequantizers (`dequantize_row_qX_K`);
//! - the shared scalar helpers (`nearest_int`, `make_qx_quants`, `make_q3_quants`,
//!   `make_qkx2_quants`/`make_qkx3_quants`, `make_qp_quants`), which `super::weighted`
//!   reuses for the legacy 32-element types.
//!
//! Every function handles exactly one row: `x.len()` is a multiple of [`QK_K`] and the output
//! slice has the exact encoded size (`x.len() / QK_K` blocks).
//!
//! # Bit-exactness
//!
//! The goal is to produce the same bytes as llama.cpp. All floating-point work is done in
//! `f32` exactly where the C code uses `float`, accumulations are sequential in the C index
//! order, and `mul_add` is never used. Note that K-quant bytes depend on whether the C
//! compiler contracted `a*b + c` into FMA instructions: GCC's default `-ffp-contract=fast`
//! does so whenever the target has FMA (e.g. aarch64 builds, or x86 built with `-mfma`),
//! and those builds can legitimately emit slightly different K-quant bytes. The reference
//! this port reproduces is the plain x86-64 (non-FMA) build, which is how default x86
//! llama.cpp builds compile `ggml-quants.c` (it lives in `ggml-base`).

/// Elements per K-quant super-block (`QK_K`).
pub const QK_K: usize = 256;
/// Encoded size of one `Q2_K` super-block in bytes.
pub const BLOCK_Q2_K_BYTES: usize = 84;
/// Encoded size of one `Q3_K` super-block in bytes.
pub const BLOCK_Q3_K_BYTES: usize = 110;
/// Encoded size of one `Q4_K` super-block in bytes.
pub const BLOCK_Q4_K_BYTES: usize = 144;
/// Encoded size of one `Q5_K` super-block in bytes.
pub const BLOCK_Q5_K_BYTES: usize = 176;
/// Encoded size of one `Q6_K` super-block in bytes.
pub const BLOCK_Q6_K_BYTES: usize = 210;

/// Groups whose largest magnitude is below this are treated as all-zero (`GROUP_MAX_EPS`).
pub(crate) const GROUP_MAX_EPS: f32 = 1e-15;

/// Size of the packed 6-bit scale/min array of `Q3_K`, `Q4_K` and `Q5_K` (`K_SCALE_SIZE`).
const K_SCALE_SIZE: usize = 12;

/// 1.5 * 2^23: adding it to a float of magnitude <= 2^22 pushes the integer part into the low
/// mantissa bits, rounded half-to-even by the FPU. This is how `nearest_int` rounds.
const NEAREST_INT_MAGIC: f32 = 12_582_912.0;

/// Search grid of the reference `Q2_K` scale/min fit (`make_qkx2_quants` arguments in
/// `quantize_row_q2_K_ref`): nmax 3, rmin -0.5, rdelta 0.1, 15 steps, absolute-error metric.
const Q2_K_REF_GRID: (f32, f32, i32) = (-0.5, 0.1, 15);
/// Search grid of the reference `Q4_K` fit: rmin -1, rdelta 0.1, 20 steps, squared error.
const Q4_K_REF_GRID: (f32, f32, i32) = (-1.0, 0.1, 20);
/// Search grid of the reference `Q5_K` fit: rmin -0.5, rdelta 0.1, 15 steps, squared error.
const Q5_K_REF_GRID: (f32, f32, i32) = (-0.5, 0.1, 15);
/// Search grid of every importance-weighted `make_qkx3_quants` call (`Q2_K`, `Q4_K`, `Q5_K`,
/// `Q4_1`, `Q5_1`): rmin -0.9, rdelta 0.05, 36 steps, squared error.
pub(crate) const IMPL_QKX3_GRID: (f32, f32, i32) = (-0.9, 0.05, 36);

/// Round to nearest, ties to even, exactly like llama.cpp's `nearest_int`.
///
/// The C code adds [`NEAREST_INT_MAGIC`] and reinterprets the low 23 mantissa bits. Doing the
/// same bit trick here (instead of `round_ties_even() as i32`) keeps the result identical even
/// outside the documented `|f| <= 4194303` range, where the C trick wraps instead of saturating
/// (reachable only with degenerate scales, but it keeps the port faithful).
#[inline(always)]
pub(crate) fn nearest_int(fval: f32) -> i32 {
    let val = fval + NEAREST_INT_MAGIC;
    (val.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// `MAX(lo, MIN(hi, l))` of the C code, evaluated with `f32` min/max and returned as `f32`.
///
/// Exact: `l` comes from [`nearest_int`], so `|l| <= 2^22` and `l as f32` is lossless (and never
/// NaN), hence the float clamp yields the same integral value as the C integer clamp. It exists
/// for speed only: done on integers inside the `make_qkx*_quants` search loop, LLVM's
/// cmov-to-branch conversion turns the clamp into poorly predicted jumps (2-3x slower Q2_K).
#[inline(always)]
fn clamp_to_f32(l: i32, lo: f32, hi: f32) -> f32 {
    (l as f32).min(hi).max(lo)
}

#[inline(always)]
pub(crate) fn f16_bits(v: f32) -> u16 {
    half::f16::from_f32(v).to_bits()
}

#[inline(always)]
pub(crate) fn f16_value(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

#[inline(always)]
fn read_f16(b: &[u8], at: usize) -> f32 {
    f16_value(u16::from_le_bytes([b[at], b[at + 1]]))
}

#[inline(always)]
fn write_f16(b: &mut [u8], at: usize, v: f32) -> u16 {
    let bits = f16_bits(v);
    b[at..at + 2].copy_from_slice(&bits.to_le_bytes());
    bits
}

// ---------------------------------------------------------------------------------------------
// Shared scale-search helpers
// ---------------------------------------------------------------------------------------------

/// Symmetric quantization of `x` to integers in `[-nmax, nmax-1]` (stored `+nmax` in `out`),
/// returning the scale. Port of `make_qx_quants` with `rmse_type == 1` (the only mode the
/// K-quant and legacy `_impl` paths use): least-squares scale with weights `qw[i]` or, when
/// `qw` is `None`, `x[i]^2`, refined over 18 trial inverse scales `-(nmax + 0.1*is)/max`.
pub(crate) fn make_qx_quants(x: &[f32], nmax: i32, out: &mut [i8], qw: Option<&[f32]>) -> f32 {
    let n = x.len();
    debug_assert!(n <= 32 && out.len() >= n);
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        out[..n].fill(0);
        return 0.0;
    }
    let weight = |i: usize| match qw {
        Some(w) => w[i],
        None => x[i] * x[i],
    };
    let mut iscale = -(nmax as f32) / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        out[i] = (l + nmax) as i8;
        let w = weight(i);
        sumlx += w * x[i] * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    // C: `suml2 ? sumlx/suml2 : 0` (NaN counts as true, like `!= 0.0`).
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    let mut trial = [0i8; 32];
    for is in -9..=9i32 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1f32 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for i in 0..n {
            let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
            trial[i] = l as i8;
            let w = weight(i);
            sumlx += w * x[i] * l as f32;
            suml2 += w * l as f32 * l as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                out[i] = (trial[i] as i32 + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Port of `make_q3_quants(n, nmax, x, L, do_rmse = true)`: start from `-nmax/max` and then
/// greedily move single quants while the weighted (`x^2`) least-squares fit improves, at most
/// five sweeps. Returns the scale; `out` receives `l + nmax`.
fn make_q3_quants(x: &[f32], nmax: i32, out: &mut [i8]) -> f32 {
    let n = x.len();
    debug_assert!(n <= 16 && out.len() >= n);
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        out[..n].fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let mut ls = [0i32; 16];
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        ls[i] = l;
        let w = x[i] * x[i];
        sumlx += w * x[i] * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for i in 0..n {
            let w = x[i] * x[i];
            let li = ls[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * li * li;
                let new_l = nearest_int(x[i] * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != ls[i] {
                    slx += w * x[i] * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        ls[i] = new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    for i in 0..n {
        out[i] = (ls[i] + nmax) as i8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Which of the two near-identical asymmetric fitters to follow.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Qkx {
    /// `make_qkx2_quants` (reference K-quants): degenerate when `max == min`.
    V2,
    /// `make_qkx3_quants` (importance-weighted paths): degenerate when `max <= min`.
    V3,
}

/// Asymmetric (scale + min) quantization of `x` to `[0, nmax]` with per-element `weights`.
/// Port of `make_qkx2_quants` / `make_qkx3_quants` (with non-null weights): after an initial
/// `nmax/(max-min)` guess, tries inverse scales `(rmin + rdelta*is + nmax)/(max-min)` for
/// `is = 0..=nstep`, solves the weighted 2-parameter least-squares problem for each, and keeps
/// the candidate with strictly lower weighted error (`|diff|` if `use_mad`, else `diff^2`).
/// Returns `(scale, the_min)` where `the_min = -min >= 0` is what the C code stores.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn make_qkx_quants(
    variant: Qkx,
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    out: &mut [u8],
    grid: (f32, f32, i32),
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    // Re-slicing to `n` lets the optimizer drop bounds checks in the hot loops below.
    assert!((1..=32).contains(&n));
    let (weights, out) = (&weights[..n], &mut out[..n]);
    let (rmin, rdelta, nstep) = grid;
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    let degenerate = match variant {
        Qkx::V2 => max == min,
        Qkx::V3 => max <= min,
    };
    if degenerate {
        out[..n].fill(0);
        return (0.0, -min);
    }
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        out[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * err(diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    let nmax_f = nmax as f32;
    // Trial codes kept as f32 (exact small integers) so the hot loop has no float->int
    // conversion; they are converted to `u8` only when a trial wins.
    let mut laux = [0.0f32; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let mut sum_l = 0.0f32;
        let mut sum_l2 = 0.0f32;
        let mut sum_xl = 0.0f32;
        for i in 0..n {
            let lf = clamp_to_f32(nearest_int(iscale * (x[i] - min)), 0.0, nmax_f);
            // Performance only (no effect on values): LLVM packs the two products below into
            // one SSE register whose unused lanes may hold stale denormals, and the resulting
            // microcode assists made this loop ~3x slower. Forcing `lf` through memory gives a
            // clean `movss` load with zeroed upper lanes.
            let lf = std::hint::black_box(lf);
            laux[i] = lf;
            let w = weights[i];
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] + this_min - x[i];
                cur_error += weights[i] * err(diff);
            }
            if cur_error < best_error {
                for (o, &l) in out.iter_mut().zip(&laux[..n]) {
                    *o = l as u8;
                }
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Port of `make_qp_quants`: quantizes the non-negative sub-block scales (or mins) `x` to
/// `[0, nmax]` codes with importance weights `quant_weights`, returning the super-block scale.
/// `out` mirrors the C `uint8_t L[]`, including its wrap-around on (pathological) negative
/// codes, because later steps of the C code read the truncated values back.
fn make_qp_quants(x: &[f32], nmax: i32, out: &mut [u8], quant_weights: &[f32]) -> f32 {
    let n = x.len();
    debug_assert!(n <= 16 && out.len() >= n);
    let mut max = 0.0f32;
    for &v in x {
        // C `MAX(max, x[i])` = `max > x[i] ? max : x[i]`.
        max = if max > v { max } else { v };
    }
    if max < GROUP_MAX_EPS {
        out[..n].fill(0);
        return 0.0;
    }
    let mut iscale = nmax as f32 / max;
    for i in 0..n {
        out[i] = nearest_int(iscale * x[i]) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for i in 0..n {
        let diff = x[i] - scale * out[i] as f32;
        best_mse += quant_weights[i] * diff * diff;
    }
    for is in -4..=4i32 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1f32 * is as f32 + nmax as f32) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0.0f32;
        for i in 0..n {
            let l = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * l as f32;
            mse += quant_weights[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * x[i]).min(nmax);
        out[i] = l as u8;
        let w = quant_weights[i];
        sumlx += w * x[i] * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for i in 0..n {
            let w = quant_weights[i];
            let li = out[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            let mut sl2 = suml2 - w * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != out[i] as i32 {
                    slx += w * x[i] * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        out[i] = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

// ---------------------------------------------------------------------------------------------
// Packing helpers
// ---------------------------------------------------------------------------------------------

/// Packs four 2-bit planes: byte `32h + l` holds elements `128h + l + 32k` at bits `2k`
/// (`Q2_K` and `Q3_K` `qs`).
#[inline]
fn pack_2bit(l: &[u8; QK_K], qs: &mut [u8]) {
    for j in (0..QK_K).step_by(128) {
        for i in 0..32 {
            let v = l[j + i] as u32
                | (l[j + i + 32] as u32) << 2
                | (l[j + i + 64] as u32) << 4
                | (l[j + i + 96] as u32) << 6;
            qs[j / 4 + i] = v as u8;
        }
    }
}

/// Stores the 6-bit scale `ls` and min `lm` of sub-block `j` in the 12-byte `Q4_K`/`Q5_K`
/// layout (inverse of [`get_scale_min_k4`]). Shifts truncate to `u8` like the C stores.
#[inline]
fn put_scale_min_k4(s: &mut [u8], j: usize, ls: u8, lm: u8) {
    if j < 4 {
        s[j] = ls;
        s[j + 4] = lm;
    } else {
        s[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
        s[j - 4] |= (ls >> 4) << 6;
        s[j] |= (lm >> 4) << 6;
    }
}

/// Port of `get_scale_min_k4`: 6-bit scale and min of sub-block `j` (0..8).
#[inline]
fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Stores the 6-bit code `l` (0..64) of `Q3_K` sub-block `j` (0..16) into the 12-byte
/// scale array. Expects `s` zeroed beforehand (as the C code `memset`s it).
#[inline]
fn put_scale_q3(s: &mut [u8], j: usize, l: i32) {
    if j < 8 {
        s[j] = (l & 0xF) as u8;
    } else {
        s[j - 8] |= ((l & 0xF) << 4) as u8;
    }
    let hi = l >> 4;
    s[j % 4 + 8] |= (hi << (2 * (j / 4))) as u8;
}

/// Signed 6-bit scale of `Q3_K` sub-block `j` (-32..=31).
#[inline]
fn get_scale_q3(s: &[u8], j: usize) -> i32 {
    let lo = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 } as i32;
    let hi = ((s[8 + j % 4] >> (2 * (j / 4))) & 3) as i32;
    (lo | (hi << 4)) - 32
}

fn check_row(x_len: usize, out_len: usize, block_bytes: usize) -> usize {
    assert!(
        x_len % QK_K == 0,
        "row length {x_len} is not a multiple of {QK_K}"
    );
    let nb = x_len / QK_K;
    assert_eq!(
        out_len,
        nb * block_bytes,
        "output size does not match {nb} blocks"
    );
    nb
}

fn check_weights(qw: Option<&[f32]>, n: usize) {
    if let Some(w) = qw {
        assert_eq!(
            w.len(),
            n,
            "importance weights must have one entry per column"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Q2_K
// ---------------------------------------------------------------------------------------------

/// Largest 4-bit code of the `Q2_K` sub-block scales and mins (`q4scale`).
const Q2_K_SCALE_MAX: f32 = 15.0;

/// Quantizes one row to `Q2_K` (84 bytes per 256 values). `qw == None` follows
/// `quantize_row_q2_K_ref`; `Some(w)` follows `quantize_row_q2_K_impl`.
pub fn quantize_row_q2_k(x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    let nb = check_row(x.len(), out.len(), BLOCK_Q2_K_BYTES);
    check_weights(qw, x.len());
    for i in 0..nb {
        let xb = &x[i * QK_K..(i + 1) * QK_K];
        let yb = &mut out[i * BLOCK_Q2_K_BYTES..(i + 1) * BLOCK_Q2_K_BYTES];
        match qw {
            None => q2_k_ref_block(xb, yb),
            Some(w) => q2_k_impl_block(xb, yb, &w[i * QK_K..(i + 1) * QK_K]),
        }
    }
}

/// Re-quantizes with the stored (f16-rounded) `d`, `dmin` and 4-bit codes, then packs.
fn q2_k_finish(x: &[f32], y: &mut [u8], l: &mut [u8; QK_K], d_all: f32, m_all: f32) {
    for j in 0..QK_K / 16 {
        let sc = y[j];
        let d = d_all * (sc & 0xF) as f32;
        if d == 0.0 {
            continue;
        }
        let dm = m_all * (sc >> 4) as f32;
        for ii in 0..16 {
            let q = nearest_int((x[16 * j + ii] + dm) / d).clamp(0, 3);
            l[16 * j + ii] = q as u8;
        }
    }
    pack_2bit(l, &mut y[16..80]);
}

fn q2_k_ref_block(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut weights = [0.0f32; 16];
    let mut mins = [0.0f32; QK_K / 16];
    let mut scales = [0.0f32; QK_K / 16];
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..QK_K / 16 {
        let xs = &x[16 * j..16 * j + 16];
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = v.abs();
        }
        let (s, m) = make_qkx_quants(
            Qkx::V2,
            xs,
            &weights,
            3,
            &mut l[16 * j..16 * j + 16],
            Q2_K_REF_GRID,
            true,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let d_bits;
    if max_scale > 0.0 {
        let iscale = Q2_K_SCALE_MAX / max_scale;
        for j in 0..QK_K / 16 {
            y[j] = nearest_int(iscale * scales[j]) as u8;
        }
        d_bits = write_f16(y, 80, max_scale / Q2_K_SCALE_MAX);
    } else {
        y[..16].fill(0);
        d_bits = write_f16(y, 80, 0.0);
    }
    let m_bits;
    if max_min > 0.0 {
        let iscale = Q2_K_SCALE_MAX / max_min;
        for j in 0..QK_K / 16 {
            let lm = nearest_int(iscale * mins[j]);
            y[j] = (y[j] as i32 | (lm << 4)) as u8;
        }
        m_bits = write_f16(y, 82, max_min / Q2_K_SCALE_MAX);
    } else {
        m_bits = write_f16(y, 82, 0.0);
    }
    q2_k_finish(x, y, &mut l, f16_value(d_bits), f16_value(m_bits));
}

fn q2_k_impl_block(x: &[f32], y: &mut [u8], qw: &[f32]) {
    let mut l = [0u8; QK_K];
    let mut mins = [0.0f32; QK_K / 16];
    let mut scales = [0.0f32; QK_K / 16];
    let mut sw = [0.0f32; QK_K / 16];
    let mut weight = [0.0f32; 16];
    let mut ls = [0u8; QK_K / 16];
    let mut lm = [0u8; QK_K / 16];

    let mut sumx2 = 0.0f32;
    for &v in x {
        sumx2 += v * v;
    }
    // Q2_K uses the plain mean square here (Q3_K..Q5_K use twice the mean square).
    let sigma2 = sumx2 / QK_K as f32;
    for j in 0..QK_K / 16 {
        let xs = &x[16 * j..16 * j + 16];
        for l in 0..16 {
            weight[l] = qw[16 * j + l] * (sigma2 + xs[l] * xs[l]).sqrt();
        }
        for &w in &weight {
            sw[j] += w;
        }
        let (s, m) = make_qkx_quants(
            Qkx::V3,
            xs,
            &weight,
            3,
            &mut l[16 * j..16 * j + 16],
            IMPL_QKX3_GRID,
            false,
        );
        scales[j] = s;
        mins[j] = m;
    }
    let dm = make_qp_quants(&scales, 15, &mut ls, &sw);
    let mm = make_qp_quants(&mins, 15, &mut lm, &sw);
    let d_bits = write_f16(y, 80, dm);
    let m_bits = write_f16(y, 82, mm);
    for j in 0..QK_K / 16 {
        y[j] = (ls[j] as u32 | (lm[j] as u32) << 4) as u8;
    }
    q2_k_finish(x, y, &mut l, f16_value(d_bits), f16_value(m_bits));
}

/// Dequantizes one `Q2_K` row (port of `dequantize_row_q2_K`).
pub fn dequantize_row_q2_k(b: &[u8], out: &mut [f32]) {
    let nb = check_row(out.len(), b.len(), BLOCK_Q2_K_BYTES);
    for i in 0..nb {
        let blk = &b[i * BLOCK_Q2_K_BYTES..(i + 1) * BLOCK_Q2_K_BYTES];
        let y = &mut out[i * QK_K..(i + 1) * QK_K];
        let d = read_f16(blk, 80);
        let min = read_f16(blk, 82);
        let scales = &blk[..16];
        let mut is = 0;
        let mut o = 0;
        for half in 0..2 {
            let q = &blk[16 + 32 * half..16 + 32 * half + 32];
            for shift in (0..8).step_by(2) {
                for part in 0..2 {
                    let sc = scales[is];
                    is += 1;
                    let dl = d * (sc & 0xF) as f32;
                    let ml = min * (sc >> 4) as f32;
                    for &qb in &q[16 * part..16 * part + 16] {
                        y[o] = dl * ((qb >> shift) & 3) as f32 - ml;
                        o += 1;
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Q3_K
// ---------------------------------------------------------------------------------------------

/// Quantizes one row to `Q3_K` (110 bytes per 256 values). `qw == None` follows
/// `quantize_row_q3_K_ref`; `Some(w)` follows `quantize_row_q3_K_impl`.
pub fn quantize_row_q3_k(x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    let nb = check_row(x.len(), out.len(), BLOCK_Q3_K_BYTES);
    check_weights(qw, x.len());
    for i in 0..nb {
        let xb = &x[i * QK_K..(i + 1) * QK_K];
        let yb = &mut out[i * BLOCK_Q3_K_BYTES..(i + 1) * BLOCK_Q3_K_BYTES];
        match qw {
            None => q3_k_ref_block(xb, yb),
            Some(w) => q3_k_impl_block(xb, yb, &w[i * QK_K..(i + 1) * QK_K]),
        }
    }
}

/// Common tail of both `Q3_K` paths: re-quantize with the stored f16 `d` and 6-bit scales,
/// split off the high bit into `hmask`, pack the low 2 bits.
fn q3_k_finish(x: &[f32], y: &mut [u8], l: &mut [i8; QK_K], d_all: f32) {
    let (head, tail) = y.split_at_mut(96);
    let scales = &tail[..K_SCALE_SIZE];
    for j in 0..QK_K / 16 {
        let sc = get_scale_q3(scales, j);
        let d = d_all * sc as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d).clamp(-4, 3);
            l[16 * j + ii] = (q + 4) as i8;
        }
    }
    let (hmask, qs) = head.split_at_mut(32);
    hmask.fill(0);
    let mut lu = [0u8; QK_K];
    for j in 0..QK_K {
        let mut v = l[j];
        if v > 3 {
            hmask[j % 32] |= 1 << (j / 32);
            v -= 4;
        }
        lu[j] = v as u8;
    }
    pack_2bit(&lu, qs);
}

fn q3_k_ref_block(x: &[f32], y: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];
    let mut max_scale = 0.0f32;
    let mut amax = 0.0f32;
    for j in 0..QK_K / 16 {
        scales[j] = make_q3_quants(&x[16 * j..16 * j + 16], 4, &mut l[16 * j..16 * j + 16]);
        let scale = scales[j].abs();
        if scale > amax {
            amax = scale;
            max_scale = scales[j];
        }
    }
    y[96..108].fill(0);
    let d_bits = if max_scale != 0.0 {
        // The 6-bit signed scales span -32..31; the largest-magnitude scale maps to -32.
        let iscale = -32.0f32 / max_scale;
        for (j, &scale) in scales.iter().enumerate() {
            // C stores the rounded value in an `int8_t` before clamping.
            let lq = nearest_int(iscale * scale) as i8 as i32;
            let lq = lq.clamp(-32, 31) + 32;
            put_scale_q3(&mut y[96..108], j, lq);
        }
        write_f16(y, 108, 1.0 / iscale)
    } else {
        write_f16(y, 108, 0.0)
    };
    q3_k_finish(x, y, &mut l, f16_value(d_bits));
}

fn q3_k_impl_block(x: &[f32], y: &mut [u8], qw: &[f32]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];
    let mut weight = [0.0f32; 16];
    let mut sw = [0.0f32; QK_K / 16];
    let mut ls = [0i8; QK_K / 16];

    let mut sumx2 = 0.0f32;
    for &v in x {
        sumx2 += v * v;
    }
    let sigma2 = 2.0 * sumx2 / QK_K as f32;
    for j in 0..QK_K / 16 {
        let xs = &x[16 * j..16 * j + 16];
        for i in 0..16 {
            weight[i] = qw[16 * j + i] * (sigma2 + xs[i] * xs[i]).sqrt();
        }
        let mut sumw = 0.0f32;
        for &w in &weight {
            sumw += w;
        }
        sw[j] = sumw;
        scales[j] = make_qx_quants(xs, 4, &mut l[16 * j..16 * j + 16], Some(&weight));
    }
    y[96..108].fill(0);
    let d_block = make_qx_quants(&scales, 32, &mut ls, Some(&sw));
    for (j, &code) in ls.iter().enumerate() {
        put_scale_q3(&mut y[96..108], j, code as i32);
    }
    let d_bits = write_f16(y, 108, d_block);
    q3_k_finish(x, y, &mut l, f16_value(d_bits));
}

/// Dequantizes one `Q3_K` row (port of `dequantize_row_q3_K`).
pub fn dequantize_row_q3_k(b: &[u8], out: &mut [f32]) {
    let nb = check_row(out.len(), b.len(), BLOCK_Q3_K_BYTES);
    for i in 0..nb {
        let blk = &b[i * BLOCK_Q3_K_BYTES..(i + 1) * BLOCK_Q3_K_BYTES];
        let y = &mut out[i * QK_K..(i + 1) * QK_K];
        let d_all = read_f16(blk, 108);
        let hm = &blk[..32];
        let scales = &blk[96..108];
        let mut m = 1u8;
        let mut is = 0;
        let mut o = 0;
        for half in 0..2 {
            let q = &blk[32 + 32 * half..32 + 32 * half + 32];
            for shift in (0..8).step_by(2) {
                for part in 0..2 {
                    let dl = d_all * get_scale_q3(scales, is) as f32;
                    is += 1;
                    for l in 16 * part..16 * part + 16 {
                        let low = ((q[l] >> shift) & 3) as i32;
                        let sub = if hm[l] & m != 0 { 0 } else { 4 };
                        y[o] = dl * (low - sub) as f32;
                        o += 1;
                    }
                }
                m <<= 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Q4_K / Q5_K (shared structure: 8 sub-blocks of 32 with 6-bit scale + min)
// ---------------------------------------------------------------------------------------------

/// Largest 6-bit code of the `Q4_K`/`Q5_K` sub-block scales and mins.
const K4_SCALE_MAX: f32 = 63.0;

/// Reference scale/min search of `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref`: weights
/// `sqrt(mean(x^2)) + |x|` per 32-sub-block, `make_qkx2_quants`, then 6-bit codes relative
/// to the largest scale/min. Writes d, dmin and scales; returns the f16-rounded d and dmin.
fn k4_ref_scales(
    x: &[f32],
    y: &mut [u8],
    l: &mut [u8; QK_K],
    nmax: i32,
    grid: (f32, f32, i32),
) -> (f32, f32) {
    let mut weights = [0.0f32; 32];
    let mut mins = [0.0f32; QK_K / 32];
    let mut scales = [0.0f32; QK_K / 32];
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx_quants(
            Qkx::V2,
            xs,
            &weights,
            nmax,
            &mut l[32 * j..32 * j + 32],
            grid,
            false,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        K4_SCALE_MAX / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 {
        K4_SCALE_MAX / max_min
    } else {
        0.0
    };
    for j in 0..QK_K / 32 {
        // C assigns the rounded int to a `uint8_t` before `MIN(63, ...)`.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        put_scale_min_k4(&mut y[4..16], j, ls, lm);
    }
    let d_bits = write_f16(y, 0, max_scale / K4_SCALE_MAX);
    let m_bits = write_f16(y, 2, max_min / K4_SCALE_MAX);
    (f16_value(d_bits), f16_value(m_bits))
}

/// Importance-weighted scale/min search of `quantize_row_q4_K_impl` /
/// `quantize_row_q5_K_impl`: weights `qw * sqrt(sigma2 + x^2)` with `sigma2 = 2*mean(x^2)`,
/// `make_qkx3_quants` per sub-block, then `make_qp_quants` for the 6-bit codes.
/// `clamp_codes` reproduces the `MIN(63, ..)` that only the Q5_K variant applies.
fn k4_impl_scales(
    x: &[f32],
    y: &mut [u8],
    l: &mut [u8; QK_K],
    nmax: i32,
    qw: &[f32],
    clamp_codes: bool,
) -> (f32, f32) {
    let mut weights = [0.0f32; 32];
    let mut sw = [0.0f32; QK_K / 32];
    let mut mins = [0.0f32; QK_K / 32];
    let mut scales = [0.0f32; QK_K / 32];
    let mut ls = [0u8; QK_K / 32];
    let mut lm = [0u8; QK_K / 32];
    let mut sum_x2 = 0.0f32;
    for &v in x {
        sum_x2 += v * v;
    }
    let sigma2 = 2.0 * sum_x2 / QK_K as f32;
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        for i in 0..32 {
            weights[i] = qw[32 * j + i] * (sigma2 + xs[i] * xs[i]).sqrt();
        }
        let mut sumw = 0.0f32;
        for &w in &weights {
            sumw += w;
        }
        sw[j] = sumw;
        let (s, m) = make_qkx_quants(
            Qkx::V3,
            xs,
            &weights,
            nmax,
            &mut l[32 * j..32 * j + 32],
            IMPL_QKX3_GRID,
            false,
        );
        scales[j] = s;
        mins[j] = m;
    }
    let d_block = make_qp_quants(&scales, 63, &mut ls, &sw);
    let m_block = make_qp_quants(&mins, 63, &mut lm, &sw);
    for j in 0..QK_K / 32 {
        let (mut a, mut b) = (ls[j], lm[j]);
        if clamp_codes {
            a = a.min(63);
            b = b.min(63);
        }
        put_scale_min_k4(&mut y[4..16], j, a, b);
    }
    let d_bits = write_f16(y, 0, d_block);
    let m_bits = write_f16(y, 2, m_block);
    (f16_value(d_bits), f16_value(m_bits))
}

/// Re-quantizes every element to `[0, nmax]` with the stored f16 d/dmin and 6-bit codes.
fn k4_requantize(x: &[f32], scales: &[u8], l: &mut [u8; QK_K], d_all: f32, m_all: f32, nmax: i32) {
    for j in 0..QK_K / 32 {
        let (sc, m) = get_scale_min_k4(j, scales);
        let d = d_all * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = m_all * m as f32;
        for ii in 0..32 {
            let q = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax);
            l[32 * j + ii] = q as u8;
        }
    }
}

/// Quantizes one row to `Q4_K` (144 bytes per 256 values). `qw == None` follows
/// `quantize_row_q4_K_ref`; `Some(w)` follows `quantize_row_q4_K_impl`.
pub fn quantize_row_q4_k(x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    let nb = check_row(x.len(), out.len(), BLOCK_Q4_K_BYTES);
    check_weights(qw, x.len());
    let mut l = [0u8; QK_K];
    for i in 0..nb {
        let xb = &x[i * QK_K..(i + 1) * QK_K];
        let y = &mut out[i * BLOCK_Q4_K_BYTES..(i + 1) * BLOCK_Q4_K_BYTES];
        let (d, dmin) = match qw {
            None => k4_ref_scales(xb, y, &mut l, 15, Q4_K_REF_GRID),
            Some(w) => k4_impl_scales(xb, y, &mut l, 15, &w[i * QK_K..(i + 1) * QK_K], false),
        };
        let (head, qs) = y.split_at_mut(16);
        k4_requantize(xb, &head[4..16], &mut l, d, dmin, 15);
        for (c, chunk) in qs.chunks_exact_mut(32).enumerate() {
            let base = 64 * c;
            for (i, q) in chunk.iter_mut().enumerate() {
                *q = l[base + i] | (l[base + i + 32] << 4);
            }
        }
    }
}

/// Dequantizes one `Q4_K` row (port of `dequantize_row_q4_K`).
pub fn dequantize_row_q4_k(b: &[u8], out: &mut [f32]) {
    let nb = check_row(out.len(), b.len(), BLOCK_Q4_K_BYTES);
    for i in 0..nb {
        let blk = &b[i * BLOCK_Q4_K_BYTES..(i + 1) * BLOCK_Q4_K_BYTES];
        let y = &mut out[i * QK_K..(i + 1) * QK_K];
        let d = read_f16(blk, 0);
        let min = read_f16(blk, 2);
        let scales = &blk[4..16];
        for c in 0..4 {
            let q = &blk[16 + 32 * c..16 + 32 * c + 32];
            let (sc1, m1) = get_scale_min_k4(2 * c, scales);
            let (sc2, m2) = get_scale_min_k4(2 * c + 1, scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            for l in 0..32 {
                y[64 * c + l] = d1 * (q[l] & 0xF) as f32 - m1;
                y[64 * c + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    }
}

/// Quantizes one row to `Q5_K` (176 bytes per 256 values). `qw == None` follows
/// `quantize_row_q5_K_ref`; `Some(w)` follows `quantize_row_q5_K_impl`.
pub fn quantize_row_q5_k(x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    let nb = check_row(x.len(), out.len(), BLOCK_Q5_K_BYTES);
    check_weights(qw, x.len());
    let mut l = [0u8; QK_K];
    for i in 0..nb {
        let xb = &x[i * QK_K..(i + 1) * QK_K];
        let y = &mut out[i * BLOCK_Q5_K_BYTES..(i + 1) * BLOCK_Q5_K_BYTES];
        let (d, dmin) = match qw {
            None => k4_ref_scales(xb, y, &mut l, 31, Q5_K_REF_GRID),
            Some(w) => k4_impl_scales(xb, y, &mut l, 31, &w[i * QK_K..(i + 1) * QK_K], true),
        };
        let (head, rest) = y.split_at_mut(16);
        k4_requantize(xb, &head[4..16], &mut l, d, dmin, 31);
        let (qh, ql) = rest.split_at_mut(32);
        qh.fill(0);
        let (mut m1, mut m2) = (1u8, 2u8);
        for (c, chunk) in ql.chunks_exact_mut(32).enumerate() {
            let base = 64 * c;
            for j in 0..32 {
                let mut l1 = l[base + j];
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                let mut l2 = l[base + j + 32];
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                chunk[j] = l1 | (l2 << 4);
            }
            m1 <<= 2;
            m2 <<= 2;
        }
    }
}

/// Dequantizes one `Q5_K` row (port of `dequantize_row_q5_K`).
pub fn dequantize_row_q5_k(b: &[u8], out: &mut [f32]) {
    let nb = check_row(out.len(), b.len(), BLOCK_Q5_K_BYTES);
    for i in 0..nb {
        let blk = &b[i * BLOCK_Q5_K_BYTES..(i + 1) * BLOCK_Q5_K_BYTES];
        let y = &mut out[i * QK_K..(i + 1) * QK_K];
        let d = read_f16(blk, 0);
        let min = read_f16(blk, 2);
        let scales = &blk[4..16];
        let qh = &blk[16..48];
        let (mut u1, mut u2) = (1u8, 2u8);
        for c in 0..4 {
            let ql = &blk[48 + 32 * c..48 + 32 * c + 32];
            let (sc1, m1) = get_scale_min_k4(2 * c, scales);
            let (sc2, m2) = get_scale_min_k4(2 * c + 1, scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            for l in 0..32 {
                let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                y[64 * c + l] = d1 * ((ql[l] & 0xF) + h1) as f32 - m1;
                y[64 * c + 32 + l] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
            }
            u1 <<= 2;
            u2 <<= 2;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Q6_K
// ---------------------------------------------------------------------------------------------

/// Quantizes one row to `Q6_K` (210 bytes per 256 values). `qw == None` follows
/// `quantize_row_q6_K_ref` (weights `x^2`); `Some(w)` follows `quantize_row_q6_K_impl`, which
/// passes the importance weights unchanged to `make_qx_quants`.
pub fn quantize_row_q6_k(x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    let nb = check_row(x.len(), out.len(), BLOCK_Q6_K_BYTES);
    check_weights(qw, x.len());
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];
    for i in 0..nb {
        let xb = &x[i * QK_K..(i + 1) * QK_K];
        let y = &mut out[i * BLOCK_Q6_K_BYTES..(i + 1) * BLOCK_Q6_K_BYTES];
        let mut max_scale = 0.0f32;
        let mut max_abs_scale = 0.0f32;
        for ib in 0..QK_K / 16 {
            let w = qw.map(|w| &w[i * QK_K + 16 * ib..i * QK_K + 16 * ib + 16]);
            let scale = make_qx_quants(
                &xb[16 * ib..16 * ib + 16],
                32,
                &mut l[16 * ib..16 * ib + 16],
                w,
            );
            scales[ib] = scale;
            let abs_scale = scale.abs();
            if abs_scale > max_abs_scale {
                max_abs_scale = abs_scale;
                max_scale = scale;
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            y.fill(0);
            write_f16(y, 208, 0.0);
            continue;
        }
        // 8-bit signed sub-scales; the largest-magnitude one maps to -128.
        let iscale = -128.0f32 / max_scale;
        let d_all = f16_value(write_f16(y, 208, 1.0 / iscale));
        for ib in 0..QK_K / 16 {
            y[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
        }
        for j in 0..QK_K / 16 {
            let d = d_all * (y[192 + j] as i8) as f32;
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let q = nearest_int(xb[16 * j + ii] / d).clamp(-32, 31);
                l[16 * j + ii] = (q + 32) as i8;
            }
        }
        let (ql, rest) = y.split_at_mut(128);
        let qh = &mut rest[..64];
        for h in 0..2 {
            let j = 128 * h;
            for i in 0..32 {
                let q1 = l[j + i] as u8;
                let q2 = l[j + i + 32] as u8;
                let q3 = l[j + i + 64] as u8;
                let q4 = l[j + i + 96] as u8;
                ql[64 * h + i] = (q1 & 0xF) | ((q3 & 0xF) << 4);
                ql[64 * h + i + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
                qh[32 * h + i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
            }
        }
    }
}

/// Dequantizes one `Q6_K` row (port of `dequantize_row_q6_K`).
pub fn dequantize_row_q6_k(b: &[u8], out: &mut [f32]) {
    let nb = check_row(out.len(), b.len(), BLOCK_Q6_K_BYTES);
    for i in 0..nb {
        let blk = &b[i * BLOCK_Q6_K_BYTES..(i + 1) * BLOCK_Q6_K_BYTES];
        let y = &mut out[i * QK_K..(i + 1) * QK_K];
        let d = read_f16(blk, 208);
        for h in 0..2 {
            let ql = &blk[64 * h..64 * h + 64];
            let qh = &blk[128 + 32 * h..128 + 32 * h + 32];
            let sc = &blk[192 + 8 * h..192 + 8 * h + 8];
            let yy = &mut y[128 * h..128 * h + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                yy[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                yy[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                yy[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                yy[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::golden::{golden_input, golden_weights, unhex};

    type Quant = fn(&[f32], &mut [u8], Option<&[f32]>);
    type Dequant = fn(&[u8], &mut [f32]);

    /// FNV-1a over the f32 bit patterns: pins dequantized values bit-exactly in 8 bytes.
    fn fnv1a(v: &[f32]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for x in v {
            for b in x.to_bits().to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }

    // Golden vectors: bytes written by llama.cpp's own `quantize_qX_K(src, dst, 1, 256, qw)`
    // (`qw` = NULL for *_REF, `golden_weights(256)` for *_IMAT) from the `ggml-quants.c`
    // vendored in llama-cpp-python 0.3.36, built for plain x86-64 with
    // `gcc -O2 -ffp-contract=off`, on `golden_input(256)`. *_DEQ_FNV is `fnv1a` of what the C
    // `dequantize_row_qX_K` returns for those bytes.
    const Q2_K_REF: &str = concat!(
        "122211ff2212121211111112122222862f5979688e71a5adad5d78797d6d9125",
        "6b49594b5b1aca5a4a5ae81b9a926a698eab44ebdc2e5789a89edcd01aa6afaa",
        "a7c7a9e629daf6dab8a4a693dba7e7f7d23ab53e",
    );
    const Q2_K_REF_DEQ_FNV: u64 = 0x692a836cc1aa25c1;
    const Q2_K_IMAT: &str = concat!(
        "111211fe2211111212110111111122876f96baa8cff2e6edee5df8bbbeafd127",
        "7a5878496b39c9794959f82b699179388db140f2e43d6180b095e8e021b1beb1",
        "a787adea3d9eba8ebca49e939f9bb7b7183b9e3e",
    );
    const Q2_K_IMAT_DEQ_FNV: u64 = 0x508c63f60de483dd;
    const Q3_K_REF: &str = concat!(
        "94ff2bfbcc4b7faded85cbea39fcdfe2da9febfe6eabf7bb6fcfb39ab7b5dbdb",
        "c4142037bd48c48580e962130807d8772221733300b02030701123b0c1906142",
        "2532c4b3dd278652723f98ca312522230f0f0e401f3f302cd90c34323a361f3e",
        "d4d443d0d4c3ccf45a5a66184ab2",
    );
    const Q3_K_REF_DEQ_FNV: u64 = 0xc79ccc6165b80e18;
    const Q3_K_IMAT: &str = concat!(
        "94df2bfbcc5b7faded85cbea59fcdfe2da9febfe6eabf7bb6fcfb39ab7b5dbdb",
        "84142036bd48c4c580e962530807d8372221732300b02030701123b0c1906142",
        "213dc5b3d9208a56763f98ca4d2522230f0f0e401f3f302cd90c34323a361f3e",
        "d4d433d1d4c3cd045a5a66587ab2",
    );
    const Q3_K_IMAT_DEQ_FNV: u64 = 0x8822ba69349a53ff;
    const Q4_K_REF: &str = concat!(
        "c4275d360e3f0c8d073f06866a6c9d12efd7d6d2ecc7d7e6e7e5d3d8e7e9c6d8",
        "ead5d2d9cfe6c7f6d7d5d0dde506c5d336545b59a08fb6a6a6528b7c6f67b418",
        "695349725728f3784165eb2887a55a4dd97b516fa1d74b646387a0347959fd77",
        "5e5ec578c6b768c9a141870bad8c5d5cc6dfc3edfaabb9d4ded7faf9a8dddcdc",
        "c9d0caf90bd6dfd4bcb9c7c7c6c7ebdf",
    );
    const Q4_K_REF_DEQ_FNV: u64 = 0xf8fe0c0ccd2d7d06;
    const Q4_K_IMAT: &str = concat!(
        "3e275b360f3f4e8d073f06866b6d9014ffe7e6e2ecd7e7f6f7f5e3e8f7f9d6e8",
        "fae5e2e9dff6d7f6e7e5e0edf506d5e335646a68a09ec6b5a6529a7b7e67c417",
        "796358726728f3774165fa2796b4594cd97b516ea1d73b545387a0347959fc77",
        "5d5dc468c6b768c8a141870bac8b5d5cd5ddc3ecf9aac8d4ecd6f9f8a7dbdbdb",
        "c8d0c9f80ad5ddd4bab8c6c6c5c6e9de",
    );
    const Q4_K_IMAT_DEQ_FNV: u64 = 0x4a0f62a4a43dad43;
    const Q5_K_REF: &str = concat!(
        "692362360e3f0d8d073f06856a6c9e14b3f286d6ebe6da8acaa2e6c7f6d3fac3",
        "d792e6d363a6dab6e2c2ae93b2b8d6d6efbeccb4c9aebfdcefdab5c1dfd2acb2",
        "d4bac3b3afec9efdbfcbb0bcdb0cabc64b98959120fd6c3c2c85f4d8bdae580f",
        "b29671c59e20d6c072bab51ffd498378c307b2df43be77c9c71e606803a4fafe",
        "adcd9ae1ad8ed1a263911f175a09aba99bad86cad44672a8bc9ed4e14098a898",
        "82a174f2069cada866617e7d8c8ec5af",
    );
    const Q5_K_REF_DEQ_FNV: u64 = 0x284e2cb7209d86f5;
    const Q5_K_IMAT: &str = concat!(
        "5d235e360e3f0d8d073f06856b6c9e13b3f286d6ebe6da8acaa2e6c7f6d3fac3",
        "d792e6c363a6cab6e2c2ae93bab8d6d6efbeccb4d9aebfdcefdbb5c1dfe2acb2",
        "d4bac3b3afed9efdbfcbb0bcdb0cacc64b98959120fd6c3c2c85f5d8bdae680f",
        "b29671c59e20d6c072bab51f0d498379c105b2dc43bd75c9c61d606701a2f8fd",
        "aaca99efac8ddfa162911d155806a9a7abad86dae44672b8bcaee4f150a9b8a8",
        "92b184f206acbdb877718e8d9c9ed5bf",
    );
    const Q5_K_IMAT_DEQ_FNV: u64 = 0x326507f1b3afaf0b;
    const Q6_K_REF: &str = concat!(
        "40af0393ab202d242ef610aa0dd893c824085447d0832f81ce85cba40593f520",
        "f5c5d0c554c5f9775091b35f1be7e307f13060ef3ee31de470014f0081104e70",
        "d4eb066a58dc1c63cf5c51f0c435121c08183311895c40f495f29c7d54a06582",
        "d52d751274071c5474f950af2c0730fde71aec700f0a1d1fc5c4e9d0f3e63716",
        "20695a5bf48ee9e2e1669b858151ee1959ba9b75949a355ab9aa07d86a62868b",
        "42b648fbe4216a89b855e4d916bab37567876daa2d9db68e6c5459525f5ba7b7",
        "11110b80100cf512f3f40ff5f4eef1be4a9e",
    );
    const Q6_K_REF_DEQ_FNV: u64 = 0xef38e302b3d7b74b;
    const Q6_K_IMAT: &str = concat!(
        "40af0393ba102d242ef610aa0dd893c804284367d1724f71ee85aa9605a3d40f",
        "f5c5d0c554c5f9775091b35f1be7e307f13060ef3ee31de470014f0081104e70",
        "d4eb067a58dc1c63cf5c51f0c436121c08084311895c60d495f28c7d549075a2",
        "d52d751274071c5474f950af2c0730fde71aec700f0a1d1fc5c4e9d0f3e63716",
        "20695a5bf48ee9e2e1669b858151ee1959ba9b75949a355ab9aa07d86a62868a",
        "42b648fbe4216a89b855e4d916bab37567876daa2d9db68e6c5459525f5ba7b7",
        "11120b80100bf512f3f40ff5f4eff1bd459e",
    );
    const Q6_K_IMAT_DEQ_FNV: u64 = 0x94d979e0bd0f51c3;

    fn check_golden(
        quant: Quant,
        dequant: Dequant,
        block_bytes: usize,
        weighted: bool,
        expected_hex: &str,
        expected_fnv: u64,
    ) {
        let x = golden_input(QK_K);
        let w = golden_weights(QK_K);
        let mut out = vec![0u8; block_bytes];
        quant(&x, &mut out, weighted.then_some(&w[..]));
        assert_eq!(
            out,
            unhex(expected_hex),
            "quantized bytes differ from llama.cpp"
        );
        let mut y = vec![0.0f32; QK_K];
        dequant(&out, &mut y);
        assert_eq!(
            fnv1a(&y),
            expected_fnv,
            "dequantized values differ from llama.cpp"
        );
    }

    #[test]
    fn q2_k_matches_llama_cpp_reference_bytes() {
        let (q, d) = (quantize_row_q2_k as Quant, dequantize_row_q2_k as Dequant);
        check_golden(q, d, BLOCK_Q2_K_BYTES, false, Q2_K_REF, Q2_K_REF_DEQ_FNV);
    }

    #[test]
    fn q2_k_imatrix_matches_llama_cpp_impl_bytes() {
        let (q, d) = (quantize_row_q2_k as Quant, dequantize_row_q2_k as Dequant);
        check_golden(q, d, BLOCK_Q2_K_BYTES, true, Q2_K_IMAT, Q2_K_IMAT_DEQ_FNV);
    }

    #[test]
    fn q3_k_matches_llama_cpp_reference_bytes() {
        let (q, d) = (quantize_row_q3_k as Quant, dequantize_row_q3_k as Dequant);
        check_golden(q, d, BLOCK_Q3_K_BYTES, false, Q3_K_REF, Q3_K_REF_DEQ_FNV);
    }

    #[test]
    fn q3_k_imatrix_matches_llama_cpp_impl_bytes() {
        let (q, d) = (quantize_row_q3_k as Quant, dequantize_row_q3_k as Dequant);
        check_golden(q, d, BLOCK_Q3_K_BYTES, true, Q3_K_IMAT, Q3_K_IMAT_DEQ_FNV);
    }

    #[test]
    fn q4_k_matches_llama_cpp_reference_bytes() {
        let (q, d) = (quantize_row_q4_k as Quant, dequantize_row_q4_k as Dequant);
        check_golden(q, d, BLOCK_Q4_K_BYTES, false, Q4_K_REF, Q4_K_REF_DEQ_FNV);
    }

    #[test]
    fn q4_k_imatrix_matches_llama_cpp_impl_bytes() {
        let (q, d) = (quantize_row_q4_k as Quant, dequantize_row_q4_k as Dequant);
        check_golden(q, d, BLOCK_Q4_K_BYTES, true, Q4_K_IMAT, Q4_K_IMAT_DEQ_FNV);
    }

    #[test]
    fn q5_k_matches_llama_cpp_reference_bytes() {
        let (q, d) = (quantize_row_q5_k as Quant, dequantize_row_q5_k as Dequant);
        check_golden(q, d, BLOCK_Q5_K_BYTES, false, Q5_K_REF, Q5_K_REF_DEQ_FNV);
    }

    #[test]
    fn q5_k_imatrix_matches_llama_cpp_impl_bytes() {
        let (q, d) = (quantize_row_q5_k as Quant, dequantize_row_q5_k as Dequant);
        check_golden(q, d, BLOCK_Q5_K_BYTES, true, Q5_K_IMAT, Q5_K_IMAT_DEQ_FNV);
    }

    #[test]
    fn q6_k_matches_llama_cpp_reference_bytes() {
        let (q, d) = (quantize_row_q6_k as Quant, dequantize_row_q6_k as Dequant);
        check_golden(q, d, BLOCK_Q6_K_BYTES, false, Q6_K_REF, Q6_K_REF_DEQ_FNV);
    }

    #[test]
    fn q6_k_imatrix_matches_llama_cpp_impl_bytes() {
        let (q, d) = (quantize_row_q6_k as Quant, dequantize_row_q6_k as Dequant);
        check_golden(q, d, BLOCK_Q6_K_BYTES, true, Q6_K_IMAT, Q6_K_IMAT_DEQ_FNV);
    }

    /// (name, quantizer, dequantizer, block bytes, max relative RMSE). Bounds are ~1.2x the
    /// values measured on `golden_input(4096)` (uniform data with 9x outliers, a harder case
    /// than typical weights): Q2_K 0.36, Q3_K 0.19, Q4_K 0.098, Q5_K 0.048, Q6_K 0.027.
    const ALL_TYPES: [(&str, Quant, Dequant, usize, f64); 5] = [
        (
            "Q2_K",
            quantize_row_q2_k,
            dequantize_row_q2_k,
            BLOCK_Q2_K_BYTES,
            0.43,
        ),
        (
            "Q3_K",
            quantize_row_q3_k,
            dequantize_row_q3_k,
            BLOCK_Q3_K_BYTES,
            0.23,
        ),
        (
            "Q4_K",
            quantize_row_q4_k,
            dequantize_row_q4_k,
            BLOCK_Q4_K_BYTES,
            0.12,
        ),
        (
            "Q5_K",
            quantize_row_q5_k,
            dequantize_row_q5_k,
            BLOCK_Q5_K_BYTES,
            0.06,
        ),
        (
            "Q6_K",
            quantize_row_q6_k,
            dequantize_row_q6_k,
            BLOCK_Q6_K_BYTES,
            0.033,
        ),
    ];

    #[test]
    fn round_trip_error_is_within_per_type_bounds() {
        let n = 16 * QK_K;
        let x = golden_input(n);
        let w = golden_weights(n);
        let rms = (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64).sqrt();
        for (name, quant, dequant, bytes, bound) in ALL_TYPES {
            for qw in [None, Some(&w[..])] {
                let mut q = vec![0u8; n / QK_K * bytes];
                quant(&x, &mut q, qw);
                let mut y = vec![0.0f32; n];
                dequant(&q, &mut y);
                let err = x
                    .iter()
                    .zip(&y)
                    .map(|(&a, &b)| (a as f64 - b as f64).powi(2));
                let rmse = (err.sum::<f64>() / n as f64).sqrt();
                let rel = rmse / rms;
                assert!(
                    rel < bound,
                    "{name} (imatrix: {}): relative RMSE {rel:.4} >= {bound}",
                    qw.is_some()
                );
            }
        }
    }

    #[test]
    fn all_zero_rows_dequantize_to_zero_without_nan() {
        let n = 2 * QK_K;
        let x = vec![0.0f32; n];
        let w = golden_weights(n);
        for (name, quant, dequant, bytes, _) in ALL_TYPES {
            for qw in [None, Some(&w[..])] {
                let mut q = vec![0xAAu8; n / QK_K * bytes];
                quant(&x, &mut q, qw);
                let mut y = vec![f32::NAN; n];
                dequant(&q, &mut y);
                assert!(
                    y.iter().all(|&v| v == 0.0),
                    "{name}: non-zero output for zero row"
                );
            }
        }
    }

    #[test]
    fn multi_block_rows_match_block_by_block_quantization() {
        // Both the reference and the imatrix K-quant paths are per super-block, so a row must
        // encode to the concatenation of its blocks encoded alone.
        let n = 3 * QK_K;
        let x = golden_input(n);
        let w = golden_weights(n);
        for (name, quant, _, bytes, _) in ALL_TYPES {
            for weighted in [false, true] {
                let mut whole = vec![0u8; 3 * bytes];
                quant(&x, &mut whole, weighted.then_some(&w[..]));
                for b in 0..3 {
                    let xs = &x[b * QK_K..(b + 1) * QK_K];
                    let ws = &w[b * QK_K..(b + 1) * QK_K];
                    let mut one = vec![0u8; bytes];
                    quant(xs, &mut one, weighted.then_some(ws));
                    assert_eq!(
                        one[..],
                        whole[b * bytes..(b + 1) * bytes],
                        "{name} block {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn nearest_int_rounds_half_to_even_like_the_c_magic_number_trick() {
        let cases = [
            (0.5f32, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (-2.5, -2),
            (0.49999997, 0),
            (3.7, 4),
            (-3.7, -4),
            (4_194_303.0, 4_194_303),
            (-4_194_303.0, -4_194_303),
        ];
        for (v, want) in cases {
            assert_eq!(nearest_int(v), want, "nearest_int({v})");
        }
    }

    #[test]
    fn scale_min_k4_packing_round_trips() {
        let mut s = [0u8; K_SCALE_SIZE];
        let codes: Vec<(u8, u8)> = (0..8)
            .map(|j| ((j * 9 + 5) % 64, (j * 23 + 60) % 64))
            .collect();
        for (j, &(ls, lm)) in codes.iter().enumerate() {
            put_scale_min_k4(&mut s, j, ls, lm);
        }
        for (j, &(ls, lm)) in codes.iter().enumerate() {
            assert_eq!(get_scale_min_k4(j, &s), (ls, lm), "sub-block {j}");
        }
    }
}
