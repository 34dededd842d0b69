//! The encoder's element-wise work as fused row operations over all cores: bias + GELU,
//! bias + residual + LayerNorm, the masked softmax of attention, and the split of the fused
//! Q/K/V product into heads. Each is one pass over its rows (rayon), where candle's separate
//! operations took up to nine passes, each through candle's own spinning thread pool.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape};
use rayon::prelude::*;

/// Rows handed to one rayon task at a time.
const ROWS_PER_TASK: usize = 16;

fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(d) = s else {
        candle_core::bail!("{op}: f32 input expected")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&d[a..b]),
        None => candle_core::bail!("{op}: contiguous input expected"),
    }
}

/// The input's row width, checked against a parameter's length.
fn width(l: &Layout, want: usize, op: &str) -> candle_core::Result<usize> {
    let w = l.dims().last().copied().unwrap_or(0);
    if w != want || w == 0 {
        candle_core::bail!("{op}: rows of {w} values, parameters of {want}");
    }
    Ok(w)
}

/// erf(x) as a rational function of x (odd numerator, even denominator) on [-4, 4], where
/// it is within 5e-7 of erf in f32 arithmetic; clamped beyond (erf(4) is 1 - 1.5e-8). No
/// branch or call, so the compiler vectorizes it, where libm's erff is scalar.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_600_2e-3;
    p = p * x2 - 1.609_603_3e-2;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329e-3;
    q = q * x2 - 1.426_474e-2;
    x * p / q
}

/// `gelu(x + b)` per row, GELU by erf (BERT's `gelu`).
pub struct BiasGelu<'a>(pub &'a [f32]);

impl CustomOp1 for BiasGelu<'_> {
    fn name(&self) -> &'static str {
        "bias-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let w = width(l, self.0.len(), self.name())?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(w * ROWS_PER_TASK)
            .zip(x.par_chunks(w * ROWS_PER_TASK))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_mut(w).zip(x.chunks(w)) {
                    for ((o, x), b) in o.iter_mut().zip(x).zip(self.0) {
                        let v = x + b;
                        *o = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
                    }
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// LayerNorm parameters.
pub struct Norm<'a> {
    pub w: &'a [f32],
    pub b: &'a [f32],
    pub eps: f32,
}

impl Norm<'_> {
    fn row(&self, v: &mut [f32]) {
        let n = v.len() as f32;
        let mean = v.iter().sum::<f32>() / n;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + self.eps).sqrt();
        for ((x, w), b) in v.iter_mut().zip(self.w).zip(self.b) {
            *x = (*x - mean) * inv * w + b;
        }
    }
}

impl CustomOp1 for Norm<'_> {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut out = slice(s, l, self.name())?.to_vec();
        let w = width(l, self.w.len(), self.name())?;
        out.par_chunks_mut(w * ROWS_PER_TASK)
            .for_each(|o| o.chunks_mut(w).for_each(|r| self.row(r)));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// `LayerNorm(y + bias + residual)`: a sublayer's output, its bias, the residual stream.
pub struct AddNorm<'a> {
    pub bias: &'a [f32],
    pub norm: Norm<'a>,
}

impl CustomOp2 for AddNorm<'_> {
    fn name(&self) -> &'static str {
        "bias-residual-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = slice(s1, l1, self.name())?;
        let r = slice(s2, l2, self.name())?;
        if l1.shape() != l2.shape() {
            candle_core::bail!("{}: {:?} and {:?}", self.name(), l1.shape(), l2.shape());
        }
        let w = width(l1, self.bias.len(), self.name())?;
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(w * ROWS_PER_TASK)
            .zip(
                y.par_chunks(w * ROWS_PER_TASK)
                    .zip(r.par_chunks(w * ROWS_PER_TASK)),
            )
            .for_each(|(o, (y, r))| {
                for ((o, y), r) in o.chunks_mut(w).zip(y.chunks(w)).zip(r.chunks(w)) {
                    for (((o, y), r), b) in o.iter_mut().zip(y).zip(r).zip(self.bias) {
                        *o = y + b + r;
                    }
                    self.norm.row(o);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Softmax over each row of attention scores `[b, heads, n, n]`, scaled, with the keys of
/// padding (`keep[batch * n + key] == 0`) left out: they get probability exactly 0.
pub struct MaskedSoftmax<'a> {
    pub keep: &'a [f32],
    pub heads: usize,
    pub n: usize,
    pub scale: f32,
}

impl CustomOp1 for MaskedSoftmax<'_> {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let n = width(l, self.n, self.name())?;
        if x.len() != self.keep.len() / n * self.heads * n * n {
            candle_core::bail!("{}: scores of shape {:?}", self.name(), l.shape());
        }
        let mut out = vec![0f32; x.len()];
        let per_batch = self.heads * n;
        out.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(x.par_chunks(n * ROWS_PER_TASK))
            .enumerate()
            .for_each(|(t, (o, x))| {
                for (i, (o, x)) in o.chunks_mut(n).zip(x.chunks(n)).enumerate() {
                    let row = t * ROWS_PER_TASK + i;
                    let keep = &self.keep[row / per_batch * n..][..n];
                    let mut max = f32::NEG_INFINITY;
                    for ((o, x), k) in o.iter_mut().zip(x).zip(keep) {
                        *o = if *k != 0.0 {
                            x * self.scale
                        } else {
                            f32::NEG_INFINITY
                        };
                        max = max.max(*o);
                    }
                    if max == f32::NEG_INFINITY {
                        // No key to attend to (a sequence of padding alone).
                        o.fill(0.0);
                        continue;
                    }
                    let mut sum = 0f32;
                    for o in o.iter_mut() {
                        *o = (*o - max).exp();
                        sum += *o;
                    }
                    let inv = 1.0 / sum;
                    o.iter_mut().for_each(|o| *o *= inv);
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// The fused Q/K/V product `[b * n, 3 * hidden]` plus its bias, laid out as
/// `[3, b, heads, n, head_dim]`: Q, K and V, each split into heads.
pub struct SplitHeads<'a> {
    pub bias: &'a [f32],
    pub b: usize,
    pub n: usize,
    pub heads: usize,
}

impl CustomOp1 for SplitHeads<'_> {
    fn name(&self) -> &'static str {
        "split-qkv-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let w = width(l, self.bias.len(), self.name())?;
        let (b, n, heads) = (self.b, self.n, self.heads);
        let hidden = w / 3;
        if w % 3 != 0 || heads == 0 || hidden % heads != 0 || x.len() != b * n * w {
            candle_core::bail!("{}: {:?} for {heads} heads", self.name(), l.shape());
        }
        let hd = hidden / heads;
        let mut out = vec![0f32; x.len()];
        // One task per (part, sequence, head): a head's n rows of hd values.
        out.par_chunks_mut(n * hd).enumerate().for_each(|(t, o)| {
            let (part, rest) = (t / (b * heads), t % (b * heads));
            let (seq, head) = (rest / heads, rest % heads);
            let col = part * hidden + head * hd;
            let bias = &self.bias[col..col + hd];
            for (pos, o) in o.chunks_mut(hd).enumerate() {
                let src = &x[(seq * n + pos) * w + col..][..hd];
                for ((o, s), b) in o.iter_mut().zip(src).zip(bias) {
                    *o = s + b;
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((3, b, heads, n, hd))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rational_erf_is_within_5e_7_of_erf_everywhere() {
        // erf by its Taylor series (|x| < 3) and continued fraction (beyond), in f64.
        fn erf64(x: f64) -> f64 {
            if x.abs() < 3.0 {
                let (mut term, mut sum, mut k) = (x, x, 0.0);
                while term.abs() > 1e-17 {
                    k += 1.0;
                    term *= -x * x / k;
                    sum += term / (2.0 * k + 1.0);
                }
                sum * 2.0 / std::f64::consts::PI.sqrt()
            } else {
                let mut f = 0.0;
                for k in (1..60).rev() {
                    f = (k as f64 / 2.0) / (x.abs() + f);
                }
                let erfc = (-x * x).exp() / std::f64::consts::PI.sqrt() / (x.abs() + f);
                (1.0 - erfc).copysign(x)
            }
        }
        let mut worst = 0f64;
        for i in -60_000..=60_000 {
            let x = i as f32 / 10_000.0;
            worst = worst.max((erf(x) as f64 - erf64(x as f64)).abs());
        }
        // 4.4e-7 at worst, near 3.9 (f32 rounding in the polynomials), where GELU's input
        // is 5.5: a relative change of 1e-7 in its output.
        assert!(worst < 5e-7, "{worst}");
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(f32::INFINITY), erf(4.0));
    }
}
