//! The reference forward pass of the decoders edgepack supports (Llama, Qwen2, Phi-3) in f32 on
//! candle's CPU backend, with a KV cache.
//!
//! It owns: loading every weight of a [`Model`] into memory, RMSNorm, rotary embeddings (plain,
//! linear and llama3 scaling) in the HF `rotate_half` layout on HF-ordered Q/K rows,
//! grouped-query causal attention, the SiLU-gated MLP, several sequences in one pass (each
//! with its own cache, for packed training and batched generation), and the hook that shows
//! a calibration observer the input activations of every linear layer. It is the numeric
//! reference the exporters and quantizers are judged against, so it follows transformers'
//! float32 eager path rather than any fused or approximate kernel.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor as CTensor, Var, D};
use serde_json::Value as Json;

use rayon::prelude::*;

use crate::calib::w8a8::{self, W8A8};
use crate::error::{Error, Result};
use crate::model::{Arch, Model, ModelConfig};
use crate::quant::blockwise;
use crate::quant::int8::{self, DynamicU8};

/// Candle errors inside the forward pass are shape bugs or allocation failures, not input
/// problems; they carry no file, so they become [`Error::Invalid`].
fn ce(e: candle_core::Error) -> Error {
    Error::Invalid(format!("forward pass: {e}"))
}

/// A linear layer `y = x Wᵀ (+ b)` with its HF weight name, which observers see.
struct Linear {
    name: String,
    /// `[out_features, in_features]`, as PyTorch stores it.
    w: CTensor,
    b: Option<CTensor>,
    in_features: usize,
    /// How the input is rounded before the product, if at all.
    act: ActQuant,
    /// A trainable low-rank update `scale · B A x` (LoRA), when one is attached.
    lora: Option<Lora>,
}

/// Rounding of a linear's input that an integer engine applies.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ActQuant {
    None,
    /// Int8 codes of this static step (W8A8 simulation).
    Static(f32),
    /// Uint8 as onnxruntime's `DynamicQuantizeLinear` rounds, with one range per sequence of
    /// the call (the int8 ONNX export's activations).
    DynamicU8,
    /// Int8 codes of this static step as ONNX `QuantizeLinear` rounds them (zero point 0,
    /// ties to even, saturated to [-128, 127]): the int8-static ONNX export's QDQ inputs.
    Qdq(f32),
    /// Int8 with one asymmetric range per row (per token): what a TFLite hybrid
    /// FULLY_CONNECTED with `asymmetric_quantize_inputs` does to its float input before the
    /// int8 product (the `dynamic-int8` TFLite export's activations).
    DynamicRowI8,
}

/// One LoRA pair on a linear: `A` `[r, in]` and `B` `[out, r]`, the only tensors that take
/// gradients, as PEFT's `lora_A` / `lora_B`.
pub struct Lora {
    pub a: Var,
    pub b: Var,
    /// `alpha / r`, or `alpha / sqrt(r)` for rsLoRA.
    pub scale: f64,
    /// Dropout on the LoRA input while training (PEFT's `lora_dropout`).
    dropout: f32,
    /// Which pair this is (its place in the model), mixed into its dropout masks.
    id: u64,
}

thread_local! {
    /// The dropout seed of the forward pass running on this thread (`None`: no dropout).
    static DROPOUT_SEED: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
    /// The row count of each sequence in the pass running on this thread, in row order.
    static SEQUENCE_ROWS: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows `[n, k]` rounded through `DynamicQuantizeLinear`, each group of consecutive rows with
/// its own parameters (`(rows, parameters)` in row order); without `groups`, one group per
/// sequence of the pass running on this thread.
fn dynamic_u8_rows(x: &CTensor, groups: Option<&[(usize, DynamicU8)]>) -> Result<CTensor> {
    let (n, k) = x.dims2().map_err(ce)?;
    let mut v = x
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(ce)?;
    let own;
    let groups = match groups {
        Some(g) => g,
        None => {
            let lengths = SEQUENCE_ROWS.with(|r| r.borrow().clone());
            own = dynamic_u8_ranges(&v, k, &lengths)?;
            &own
        }
    };
    let mut start = 0;
    for &(rows, p) in groups {
        let end = (start + rows).min(n);
        for val in &mut v[start * k..end * k] {
            *val = p.round_trip(*val);
        }
        start = end;
    }
    if start != n {
        return Err(Error::Invalid(format!(
            "forward pass: quantization groups cover {start} of {n} rows"
        )));
    }
    CTensor::from_vec(v, (n, k), &Device::Cpu).map_err(ce)
}

/// `DynamicQuantizeLinear`'s parameters over each group of `lengths` consecutive rows of the
/// row-major values `v` (`k` per row).
fn dynamic_u8_ranges(v: &[f32], k: usize, lengths: &[usize]) -> Result<Vec<(usize, DynamicU8)>> {
    let n = v.len() / k.max(1);
    if lengths.iter().sum::<usize>() != n {
        return Err(Error::Invalid(format!(
            "forward pass: sequences of {lengths:?} rows against {n} rows"
        )));
    }
    let mut start = 0;
    Ok(lengths
        .iter()
        .map(|&rows| {
            let part = &v[start * k..(start + rows) * k];
            start += rows;
            (rows, DynamicU8::of_values(part))
        })
        .collect())
}

/// Runs `f` with LoRA dropout on (`Some(seed)`: every pair draws its masks from the seed and
/// its own place in the model) or off (`None`), on this thread only, so forward passes on
/// several threads each have their own masks.
pub fn with_dropout<R>(seed: Option<u64>, f: impl FnOnce() -> R) -> R {
    let before = DROPOUT_SEED.with(|c| c.replace(seed));
    let r = f();
    DROPOUT_SEED.with(|c| c.set(before));
    r
}

/// SplitMix64: the generator behind LoRA initialisation and dropout masks.
pub(crate) fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform draw in `[0, 1)` with 24 random bits.
pub(crate) fn uniform(state: &mut u64) -> f32 {
    (splitmix(state) >> 40) as f32 / (1u64 << 24) as f32
}

/// Receives `(weight name, input activations [n_tokens, in_features] row-major, in_features)`.
type Observer<'a> = Option<&'a mut dyn FnMut(&str, &[f32], usize)>;

/// Receives `(point, values)` at the named points of [`Forward::forward_probed`].
type Probe<'a> = Option<&'a mut dyn FnMut(&str, &CTensor)>;

fn probe(p: &mut Probe<'_>, layer: Option<usize>, point: &str, t: &CTensor) {
    if let Some(f) = p.as_mut() {
        match layer {
            Some(l) => f(&format!("{l}.{point}"), t),
            None => f(point, t),
        }
    }
}

impl Linear {
    /// The module path (`model.layers.0.self_attn.q_proj`): the weight's name without
    /// `.weight`.
    fn module(&self) -> &str {
        self.name.trim_end_matches(".weight")
    }

    fn apply(&self, x: &CTensor, observer: &mut Observer<'_>) -> Result<CTensor> {
        self.apply_grouped(x, observer, None)
    }

    /// Replaces the weight (as f32) by `f` applied to each of its rows, over all cores: what
    /// a quantizing engine's weights dequantize to.
    fn rewrite_rows(&mut self, f: impl Fn(&mut [f32]) + Sync + Send) -> Result<()> {
        self.w = map_rows(&self.w, f)?;
        Ok(())
    }

    /// [`Linear::apply`], with the dynamic int8 ranges of the input's rows given (the LM head
    /// over rows picked from longer sequences) instead of taken per sequence of the pass.
    fn apply_grouped(
        &self,
        x: &CTensor,
        observer: &mut Observer<'_>,
        groups: Option<&[(usize, DynamicU8)]>,
    ) -> Result<CTensor> {
        if let Some(obs) = observer.as_mut() {
            let vals = x.flatten_all().map_err(ce)?.to_vec1::<f32>().map_err(ce)?;
            obs(&self.name, &vals, self.in_features);
        }
        let q;
        let x = match self.act {
            ActQuant::None => x,
            ActQuant::Static(scale) => {
                let qmax = w8a8::QMAX as f64;
                q = x
                    .affine(1.0 / scale as f64, 0.0)
                    .and_then(|t| t.round())
                    .and_then(|t| t.clamp(-qmax, qmax))
                    .and_then(|t| t.affine(scale as f64, 0.0))
                    .map_err(ce)?;
                &q
            }
            ActQuant::DynamicU8 => {
                q = dynamic_u8_rows(x, groups)?;
                &q
            }
            ActQuant::DynamicRowI8 => {
                q = map_rows(x, |row| {
                    let p = DynamicU8::of_values(row);
                    for v in row {
                        *v = p.round_trip(*v);
                    }
                })?;
                &q
            }
            ActQuant::Qdq(scale) => {
                let v = x
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(ce)?;
                let v: Vec<f32> = v
                    .into_iter()
                    .map(|a| (a / scale).round_ties_even().clamp(-128.0, 127.0) * scale)
                    .collect();
                q = CTensor::from_vec(v, x.shape(), x.device()).map_err(ce)?;
                &q
            }
        };
        let y = if let Some(l) = &self.lora {
            // Base product, dropout and the low-rank update as one op: backward recomputes
            // the dropped input and `x Aᵀ` from `x` (kept anyway) instead of keeping the
            // mask, the dropped input, the base product and the update for every adapted
            // linear, which were most of a training step's memory.
            let op = LoraLinear {
                w: self.w.clone(),
                scale: l.scale,
                dropout: l.dropout,
                stream: DROPOUT_SEED
                    .with(|c| c.get())
                    .filter(|_| l.dropout > 0.0)
                    .map(|seed| seed ^ l.id.wrapping_mul(0xA24B_AED4_963E_E407)),
            };
            x.apply_op3(l.a.as_tensor(), l.b.as_tensor(), op)
                .map_err(ce)?
        } else if x.track_op() {
            // Training: the weight is frozen, so backward needs only `dy W`, never `dW`.
            x.apply_op1(Frozen(self.w.clone())).map_err(ce)?
        } else {
            frozen_xwt(x, &self.w).map_err(ce)?
        };
        match &self.b {
            Some(b) => y.broadcast_add(b).map_err(ce),
            None => Ok(y),
        }
    }
}

/// A contiguous f32 copy of an op's input, as a tensor the op can compute with.
fn op_input(
    storage: &candle_core::CpuStorage,
    layout: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<CTensor> {
    let candle_core::CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 only")
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => CTensor::from_slice(&data[start..end], layout.shape(), &Device::Cpu),
        None => candle_core::bail!("{op}: inputs must be contiguous"),
    }
}

fn op_output(y: CTensor) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
    let shape = y.shape().clone();
    let v = y.flatten_all()?.to_vec1::<f32>()?;
    Ok((candle_core::CpuStorage::F32(v), shape))
}

/// Rows of a bf16 weight widened to f32 at a time by [`frozen_xwt`] and [`frozen_dyw`]:
/// 4.5 MiB of f32 at SmolLM2's width, so no whole weight is ever held in f32.
const WIDEN_ROWS: usize = 2048;

/// `x Wᵀ` for a frozen weight `[out, in]`: f32 as it is (gemm reads the transposed view
/// through strides), bf16 widened [`WIDEN_ROWS`] output rows at a time.
fn frozen_xwt(x: &CTensor, w: &CTensor) -> candle_core::Result<CTensor> {
    if w.dtype() == DType::F32 {
        return x.matmul(&w.t()?);
    }
    let out = w.dim(0)?;
    let mut parts = Vec::with_capacity(out.div_ceil(WIDEN_ROWS));
    for start in (0..out).step_by(WIDEN_ROWS) {
        let rows = w.narrow(0, start, WIDEN_ROWS.min(out - start))?;
        parts.push(x.matmul(&rows.to_dtype(DType::F32)?.t()?)?);
    }
    if parts.len() == 1 {
        return Ok(parts.pop().expect("one part"));
    }
    CTensor::cat(&parts, D::Minus1)
}

/// `dy W` (the input gradient of `x Wᵀ`), with a bf16 `W` widened as in [`frozen_xwt`].
fn frozen_dyw(dy: &CTensor, w: &CTensor) -> candle_core::Result<CTensor> {
    if w.dtype() == DType::F32 {
        return dy.matmul(w);
    }
    let out = w.dim(0)?;
    let mut sum: Option<CTensor> = None;
    for start in (0..out).step_by(WIDEN_ROWS) {
        let n = WIDEN_ROWS.min(out - start);
        let rows = w.narrow(0, start, n)?.to_dtype(DType::F32)?;
        let part = dy
            .narrow(D::Minus1, start, n)?
            .contiguous()?
            .matmul(&rows)?;
        sum = Some(match sum {
            Some(s) => (s + part)?,
            None => part,
        });
    }
    sum.ok_or_else(|| candle_core::Error::Msg("frozen weight with no rows".into()))
}

/// `x Wᵀ + scale · (drop(x) Aᵀ) Bᵀ` over rows `x` `[n, in]`, with `W` frozen and `A`, `B`
/// the op's other two inputs (LoRA). Inverted dropout draws its mask from `stream`, so
/// backward draws the same mask again rather than keeping it.
struct LoraLinear {
    w: CTensor,
    scale: f64,
    dropout: f32,
    /// The mask's random stream: the step's dropout seed mixed with the pair's place; `None`
    /// when dropout is off.
    stream: Option<u64>,
}

impl LoraLinear {
    /// The inverted dropout mask (`0` or `1 / (1 - p)`) of `shape`, or `None` without dropout.
    fn mask(&self, shape: &candle_core::Shape) -> candle_core::Result<Option<CTensor>> {
        let Some(mut state) = self.stream else {
            return Ok(None);
        };
        let keep = 1.0 - self.dropout;
        let mask: Vec<f32> = (0..shape.elem_count())
            .map(|_| {
                if uniform(&mut state) < keep {
                    1.0 / keep
                } else {
                    0.0
                }
            })
            .collect();
        CTensor::from_vec(mask, shape, &Device::Cpu).map(Some)
    }

    fn dropped(&self, x: &CTensor) -> candle_core::Result<(CTensor, Option<CTensor>)> {
        match self.mask(x.shape())? {
            Some(m) => Ok((x.mul(&m)?, Some(m))),
            None => Ok((x.clone(), None)),
        }
    }
}

impl candle_core::CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = op_input(s1, l1, self.name())?;
        let a = op_input(s2, l2, self.name())?;
        let b = op_input(s3, l3, self.name())?;
        let y = frozen_xwt(&x, &self.w)?;
        let (xd, _) = self.dropped(&x)?;
        let u = xd
            .matmul(&a.t()?)?
            .matmul(&b.affine(self.scale, 0.0)?.t()?)?;
        op_output((y + u)?)
    }

    fn bwd(
        &self,
        x: &CTensor,
        a: &CTensor,
        b: &CTensor,
        _res: &CTensor,
        dy: &CTensor,
    ) -> candle_core::Result<(Option<CTensor>, Option<CTensor>, Option<CTensor>)> {
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let (xd, mask) = self.dropped(&x)?;
        let xa = xd.matmul(&a.t()?)?;
        let dxa = dy.matmul(&b.affine(self.scale, 0.0)?)?;
        let db = dy.t()?.matmul(&xa)?.affine(self.scale, 0.0)?;
        let da = dxa.t()?.matmul(&xd)?;
        let dxd = dxa.matmul(&a)?;
        let dx_lora = match mask {
            Some(m) => dxd.mul(&m)?,
            None => dxd,
        };
        let dx = (frozen_dyw(dy, &self.w)? + dx_lora)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// `x Wᵀ` with a frozen `W`: candle's own matmul backward would also compute (and keep) the
/// gradient of every base weight, a third of the work of a training step and the model's
/// size again in memory, which LoRA training throws away.
struct Frozen(CTensor);

impl candle_core::CustomOp1 for Frozen {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = op_input(storage, layout, self.name())?;
        op_output(frozen_xwt(&x, &self.0)?)
    }

    fn bwd(
        &self,
        _arg: &CTensor,
        _res: &CTensor,
        grad: &CTensor,
    ) -> candle_core::Result<Option<CTensor>> {
        Ok(Some(frozen_dyw(grad, &self.0)?))
    }
}

/// Q, K and V projections: separate (Llama, Qwen2) or one fused matrix with rows [Q; K; V]
/// (Phi-3). Kept fused so observers see the weight under its real name.
enum Qkv {
    Split { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// Gate and up projections: separate, or Phi-3's fused rows [gate; up].
enum GateUp {
    Split { gate: Linear, up: Linear },
    Fused(Linear),
}

struct Layer {
    attn_norm: CTensor,
    qkv: Qkv,
    o: Linear,
    mlp_norm: CTensor,
    gate_up: GateUp,
    down: Linear,
}

impl Layer {
    /// The decoder linears in execution order: Q, K, V (or QKV), O, gate, up (or gate-up),
    /// down.
    fn linears(&self) -> Vec<&Linear> {
        let mut v: Vec<&Linear> = Vec::with_capacity(7);
        match &self.qkv {
            Qkv::Split { q, k, v: vv } => v.extend([q, k, vv]),
            Qkv::Fused(l) => v.push(l),
        }
        v.push(&self.o);
        match &self.gate_up {
            GateUp::Split { gate, up } => v.extend([gate, up]),
            GateUp::Fused(l) => v.push(l),
        }
        v.push(&self.down);
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v: Vec<&mut Linear> = Vec::with_capacity(7);
        match &mut self.qkv {
            Qkv::Split { q, k, v: vv } => v.extend([q, k, vv]),
            Qkv::Fused(l) => v.push(l),
        }
        v.push(&mut self.o);
        match &mut self.gate_up {
            GateUp::Split { gate, up } => v.extend([gate, up]),
            GateUp::Fused(l) => v.push(l),
        }
        v.push(&mut self.down);
        v
    }
}

/// The keys and values of the positions run so far, per layer, after rotary embedding.
pub struct KvCache {
    /// Per layer `(k, v)`, each `[n_kv_heads, len, head_dim]`; `None` before the first token.
    layers: Vec<Option<(CTensor, CTensor)>>,
    len: usize,
    max_len: usize,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions this cache accepts in all.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Forgets every position, keeping the capacity limit.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }
}

/// A 2-D tensor (as f32) with `f` applied to each of its rows, over all cores.
fn map_rows(t: &CTensor, f: impl Fn(&mut [f32]) + Sync + Send) -> Result<CTensor> {
    let (rows, cols) = t.dims2().map_err(ce)?;
    let mut v = t
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(ce)?;
    v.par_chunks_mut(cols).for_each(f);
    CTensor::from_vec(v, (rows, cols), &Device::Cpu).map_err(ce)
}

/// A model loaded for the forward pass: every weight as an f32 candle tensor.
pub struct Forward {
    config: ModelConfig,
    source: PathBuf,
    embed: CTensor,
    layers: Vec<Layer>,
    norm: CTensor,
    lm_head: Linear,
    /// Rotary inverse frequencies, `head_dim / 2` of them, scaling already applied.
    inv_freq: Vec<f64>,
}

/// Reads `key` of `rope_scaling` as a number.
fn rope_num(scaling: &Json, key: &str, source: &std::path::Path) -> Result<f64> {
    scaling.get(key).and_then(Json::as_f64).ok_or_else(|| {
        Error::format(
            source,
            format!("rope_scaling.{key}"),
            "missing or not a number",
        )
    })
}

/// The rotary inverse frequencies transformers computes for this config
/// (`modeling_rope_utils`: default, linear and llama3), in f64.
pub(crate) fn rope_inv_freq(config: &ModelConfig, source: &std::path::Path) -> Result<Vec<f64>> {
    let d = config.head_dim;
    if d == 0 || d % 2 != 0 {
        return Err(Error::format(
            source,
            "head_dim",
            format!("{d} is not a positive even number"),
        ));
    }
    if let Some(p) = config
        .raw
        .as_ref()
        .and_then(|r| r.get("partial_rotary_factor"))
        .and_then(Json::as_f64)
    {
        if p != 1.0 {
            return Err(Error::unsupported(
                source,
                "partial_rotary_factor",
                format!("{p} (only full rotary embeddings are supported)"),
            ));
        }
    }
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / d as f64))
        .collect();
    let Some(scaling) = config.rope_scaling.as_ref() else {
        return Ok(base);
    };
    match config.rope_type().as_deref() {
        None | Some("default") => Ok(base),
        Some("linear") => {
            // Positions / factor is the same as every frequency / factor.
            let factor = rope_num(scaling, "factor", source)?;
            Ok(base.into_iter().map(|f| f / factor).collect())
        }
        Some("llama3") => {
            let factor = rope_num(scaling, "factor", source)?;
            let low = rope_num(scaling, "low_freq_factor", source)?;
            let high = rope_num(scaling, "high_freq_factor", source)?;
            let old_ctx = scaling
                .get("original_max_position_embeddings")
                .and_then(Json::as_f64)
                .or(config.original_max_position_embeddings.map(|v| v as f64))
                .ok_or_else(|| {
                    Error::format(
                        source,
                        "rope_scaling.original_max_position_embeddings",
                        "missing",
                    )
                })?;
            Ok(llama3_inv_freq(&base, factor, low, high, old_ctx))
        }
        Some(other) => Err(Error::unsupported(
            source,
            "rope_scaling",
            format!("rope type `{other}` (supported: default, linear, llama3)"),
        )),
    }
}

/// Llama 3.1's frequency scaling, as transformers' `_compute_llama3_parameters`: long
/// wavelengths are divided by `factor`, short ones kept, and the band between interpolated.
fn llama3_inv_freq(base: &[f64], factor: f64, low: f64, high: f64, old_ctx: f64) -> Vec<f64> {
    let low_wavelen = old_ctx / low;
    let high_wavelen = old_ctx / high;
    base.iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / factor
            } else {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect()
}

/// How the frozen matrices (every linear's weight and the embedding) are held: f32, or bf16
/// to halve their memory while training, widened to f32 a block at a time for each product
/// (activations, norms, biases and LoRA pairs stay f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseDtype {
    #[default]
    F32,
    Bf16,
}

impl BaseDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            BaseDtype::F32 => "f32",
            BaseDtype::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for BaseDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(BaseDtype::F32),
            "bf16" => Ok(BaseDtype::Bf16),
            _ => Err(format!("base dtype `{s}`: use f32 or bf16")),
        }
    }
}

impl Forward {
    /// Loads every weight of `model` into memory as f32 (the forward pass is the one place
    /// that holds the whole model).
    pub fn new(model: &Model) -> Result<Forward> {
        Forward::with_base(model, BaseDtype::F32)
    }

    /// As [`Forward::new`], with the frozen matrices held as `base` (one tensor at a time is
    /// ever in f32 while loading).
    pub fn with_base(model: &Model, base: BaseDtype) -> Result<Forward> {
        let c = &model.config;
        let src = &model.source;
        let dev = Device::Cpu;
        let frozen = |t: CTensor| -> Result<CTensor> {
            match base {
                BaseDtype::F32 => Ok(t),
                BaseDtype::Bf16 => t.to_dtype(DType::BF16).map_err(ce),
            }
        };
        let load = |name: &str, shape: &[usize]| -> Result<CTensor> {
            let t = model
                .tensor(name)
                .ok_or_else(|| Error::format(src, name, "missing"))?;
            if t.shape != shape {
                return Err(Error::mismatch(
                    src,
                    name,
                    format!("shape {:?}, the config implies {:?}", t.shape, shape),
                ));
            }
            CTensor::from_vec(t.to_f32()?, shape, &dev).map_err(ce)
        };
        let linear = |name: &str, out: usize, inn: usize| -> Result<Linear> {
            let w = frozen(load(name, &[out, inn])?)?;
            // Any linear may carry a bias (Qwen2's q/k/v; Llama's optional attention_bias).
            let bias_name = format!("{}.bias", name.trim_end_matches(".weight"));
            let b = match model.tensor(&bias_name) {
                Some(_) => Some(load(&bias_name, &[out])?),
                None => None,
            };
            Ok(Linear {
                name: name.to_string(),
                w,
                b,
                in_features: inn,
                act: ActQuant::None,
                lora: None,
            })
        };
        let h = c.hidden_size;
        let (q_dim, kv_dim, ff) = (c.n_embd_q(), c.n_embd_kv(), c.intermediate_size);
        let embed = frozen(load("model.embed_tokens.weight", &[c.vocab_size, h])?)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let (qkv, gate_up) = match c.arch {
                Arch::Phi3 => (
                    Qkv::Fused(linear(
                        &p("self_attn.qkv_proj.weight"),
                        q_dim + 2 * kv_dim,
                        h,
                    )?),
                    GateUp::Fused(linear(&p("mlp.gate_up_proj.weight"), 2 * ff, h)?),
                ),
                Arch::Llama | Arch::Qwen2 => (
                    Qkv::Split {
                        q: linear(&p("self_attn.q_proj.weight"), q_dim, h)?,
                        k: linear(&p("self_attn.k_proj.weight"), kv_dim, h)?,
                        v: linear(&p("self_attn.v_proj.weight"), kv_dim, h)?,
                    },
                    GateUp::Split {
                        gate: linear(&p("mlp.gate_proj.weight"), ff, h)?,
                        up: linear(&p("mlp.up_proj.weight"), ff, h)?,
                    },
                ),
            };
            layers.push(Layer {
                attn_norm: load(&p("input_layernorm.weight"), &[h])?,
                qkv,
                o: linear(&p("self_attn.o_proj.weight"), h, q_dim)?,
                mlp_norm: load(&p("post_attention_layernorm.weight"), &[h])?,
                gate_up,
                down: linear(&p("mlp.down_proj.weight"), h, ff)?,
            });
        }
        let norm = load("model.norm.weight", &[h])?;
        // The output projection is whatever matrix the checkpoint multiplies by: lm_head if it
        // has one, else the tied embedding (sharing its memory), named so observers can key
        // statistics on a tensor that exists in the model.
        let lm_head = if model.tensor("lm_head.weight").is_some() {
            linear("lm_head.weight", c.vocab_size, h)?
        } else if c.tie_word_embeddings {
            Linear {
                name: "model.embed_tokens.weight".to_string(),
                w: embed.clone(),
                b: None,
                in_features: h,
                act: ActQuant::None,
                lora: None,
            }
        } else {
            return Err(Error::format(
                src,
                "lm_head.weight",
                "missing and tie_word_embeddings is false",
            ));
        };
        Ok(Forward {
            inv_freq: rope_inv_freq(c, src)?,
            config: c.clone(),
            source: src.clone(),
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Turns the linears named in `w8a8` into what a static W8A8 engine computes: weights
    /// replaced by their int8 per-row reconstruction, inputs rounded to int8 at the given
    /// per-tensor scales. Products and accumulation stay in f32, which equals an int32
    /// accumulator rescaled once, up to float rounding. Refuses scales for unknown weights.
    pub fn simulate_w8a8(&mut self, w8a8: &W8A8) -> Result<()> {
        self.static_int8(w8a8, w8a8::fake_quant_row, ActQuant::Static)
    }

    /// Turns the linears named in `scales` into what edgepack's ONNX `int8-static` export runs
    /// in onnxruntime (QuantizeLinear / DequantizeLinear around each MatMul): weights through
    /// the export's own per-row int8 quantizer ([`int8::round_trip_row`], ties to even),
    /// inputs through `QuantizeLinear` at their per-tensor scale and back. The LM head stays
    /// float, as the export keeps it. Refuses scales for unknown weights.
    pub fn simulate_qdq_int8(&mut self, scales: &W8A8) -> Result<()> {
        self.static_int8(scales, int8::round_trip_row, ActQuant::Qdq)
    }

    /// The linears named in `w8a8` with weights through `row` and inputs quantized by `act`
    /// at their static scale.
    fn static_int8(
        &mut self,
        w8a8: &W8A8,
        row: fn(&mut [f32]),
        act: fn(f32) -> ActQuant,
    ) -> Result<()> {
        let mut seen = 0usize;
        for lin in self.layers.iter_mut().flat_map(Layer::linears_mut) {
            let Some(a) = w8a8.act.get(&lin.name) else {
                continue;
            };
            lin.rewrite_rows(row)?;
            lin.act = act(a.scale);
            seen += 1;
        }
        if seen != w8a8.act.len() {
            let known: Vec<String> = self
                .layers
                .iter_mut()
                .flat_map(Layer::linears_mut)
                .map(|l| l.name.clone())
                .collect();
            let missing: Vec<&String> = w8a8.act.keys().filter(|k| !known.contains(k)).collect();
            return Err(Error::Invalid(format!(
                "W8A8 scales name weights that are not decoder linears of {}: {missing:?}",
                self.source.display()
            )));
        }
        Ok(())
    }

    /// Turns every linear, the head too, into what a weight-only blockwise engine computes
    /// (onnxruntime's MatMulNBits, as the ONNX exporter's int4 writes it): each weight row
    /// replaced by its `bits`-bit round trip in blocks of `block` values along the input
    /// ([`crate::quant::blockwise::round_trip`]). Activations and the embedding lookup stay
    /// f32, as they do in that engine.
    pub fn simulate_blockwise(&mut self, bits: u32, block: usize, symmetric: bool) -> Result<()> {
        if !(2..=8).contains(&bits) || block == 0 {
            return Err(Error::Invalid(format!(
                "blockwise weights of {bits} bits in blocks of {block}: bits must be 2 to 8, blocks at least 1"
            )));
        }
        for lin in self.linears_and_head_mut() {
            lin.rewrite_rows(|row| {
                let q = blockwise::round_trip(row, block, bits, symmetric);
                row.copy_from_slice(&q);
            })?;
        }
        Ok(())
    }

    /// Turns every linear, the LM head included, into what edgepack's ONNX `int8` export runs
    /// in onnxruntime: weights replaced by their symmetric per-row int8 reconstruction
    /// (MatMulInteger's int8 weights), inputs rounded as `DynamicQuantizeLinear` rounds them
    /// (uint8, one range per sequence and call, as the runtime calls the model once per
    /// prompt and once per generated token). Products stay f32, which equals MatMulInteger's
    /// int32 sums rescaled once, up to float rounding.
    pub fn simulate_dynamic_int8(&mut self) -> Result<()> {
        for lin in self.linears_and_head_mut() {
            lin.rewrite_rows(int8::round_trip_row)?;
            lin.act = ActQuant::DynamicU8;
        }
        Ok(())
    }

    /// Turns the model into what LiteRT computes from edgepack's TFLite `dynamic-int8` export:
    /// the embedding table, every linear and the LM head through the export's symmetric
    /// per-row int8 weights ([`int8::round_trip_row_half_away`]); each linear's input
    /// quantized to int8 row by row (per token) over the row's own range widened to hold 0, as
    /// a hybrid FULLY_CONNECTED with asymmetric inputs does (the same 255 steps and zero point
    /// as `DynamicQuantizeLinear`, per row). Products stay f32, which equals the int32 sums
    /// rescaled once, up to float rounding; norms, attention and the residual stay float.
    pub fn simulate_hybrid_int8(&mut self) -> Result<()> {
        for lin in self.linears_and_head_mut() {
            lin.rewrite_rows(int8::round_trip_row_half_away)?;
            lin.act = ActQuant::DynamicRowI8;
        }
        self.embed = map_rows(&self.embed, int8::round_trip_row_half_away)?;
        Ok(())
    }

    /// Turns the model into what an engine computes from half-precision weights widened to
    /// f32 (a TFLite `fp16` export: float16 buffers behind DEQUANTIZE, every op in f32): the
    /// embedding table, every linear and the LM head rounded to the nearest f16 (ties to
    /// even, as the exporter writes them). Norm weights and biases stay f32, as the exporter
    /// keeps them.
    pub fn simulate_half_weights(&mut self) -> Result<()> {
        let to_half = |row: &mut [f32]| {
            for v in row {
                *v = half::f16::from_f32(*v).to_f32();
            }
        };
        for lin in self.linears_and_head_mut() {
            lin.rewrite_rows(to_half)?;
        }
        self.embed = map_rows(&self.embed, to_half)?;
        Ok(())
    }

    /// Every decoder linear, then the LM head.
    fn linears_and_head_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(Layer::linears_mut)
            .chain(std::iter::once(&mut self.lm_head))
    }

    /// The module paths of every decoder linear (`model.layers.0.self_attn.q_proj`), which
    /// LoRA targets name by their last component.
    pub fn linear_modules(&self) -> Vec<String> {
        self.layers
            .iter()
            .flat_map(Layer::linears)
            .map(|x| x.module().to_string())
            .collect()
    }

    /// Attaches a LoRA pair to every decoder linear whose module path is one of `targets` or
    /// ends with `.` and one of them (PEFT's `target_modules` matching), initialised as PEFT
    /// does: A kaiming-uniform (`a = sqrt(5)`, so uniform in `±1/sqrt(in)`) from `seed`, B zero.
    /// Returns the module paths adapted, in model order.
    pub fn attach_lora(
        &mut self,
        targets: &[String],
        rank: usize,
        alpha: f64,
        rslora: bool,
        dropout: f32,
        seed: u64,
    ) -> Result<Vec<String>> {
        // PEFT's `target_modules` matching: the whole path, or its tail after a `.`.
        let names = |m: &str, t: &str| m == t || m.ends_with(&format!(".{t}"));
        let modules = self.linear_modules();
        for t in targets {
            if !modules.iter().any(|m| names(m, t)) {
                let mut kinds: Vec<&str> = modules
                    .iter()
                    .filter_map(|m| m.rsplit('.').next())
                    .collect();
                kinds.sort_unstable();
                kinds.dedup();
                return Err(Error::Invalid(format!(
                    "LoRA target `{t}` names no linear of {}; its modules are: {}",
                    self.source.display(),
                    kinds.join(", ")
                )));
            }
        }
        if rank == 0 {
            return Err(Error::Invalid("LoRA rank must be at least 1".into()));
        }
        let scale = if rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        };
        let mut state = seed ^ 0x4C6F_5261_496E_6974;
        let mut adapted = Vec::new();
        for lin in self.layers.iter_mut().flat_map(Layer::linears_mut) {
            let module = lin.module().to_string();
            if !targets.iter().any(|t| names(&module, t)) {
                continue;
            }
            let (out, inn) = lin.w.dims2().map_err(ce)?;
            if rank > out.min(inn) {
                return Err(Error::Invalid(format!(
                    "LoRA rank {rank} is larger than {module} ({out} x {inn}) allows"
                )));
            }
            let bound = 1.0 / (inn as f32).sqrt();
            let a: Vec<f32> = (0..rank * inn)
                .map(|_| (uniform(&mut state) * 2.0 - 1.0) * bound)
                .collect();
            lin.lora = Some(Lora {
                a: Var::from_vec(a, (rank, inn), &Device::Cpu).map_err(ce)?,
                b: Var::zeros((out, rank), candle_core::DType::F32, &Device::Cpu).map_err(ce)?,
                scale,
                dropout,
                id: adapted.len() as u64,
            });
            adapted.push(module);
        }
        Ok(adapted)
    }

    /// The attached LoRA pairs by module path, in model order.
    pub fn loras(&self) -> Vec<(String, &Lora)> {
        self.layers
            .iter()
            .flat_map(Layer::linears)
            .filter_map(|x| x.lora.as_ref().map(|lo| (x.module().to_string(), lo)))
            .collect()
    }

    /// Logits `[tokens.len(), vocab]` of one sequence from position 0, as a tensor that keeps
    /// the graph back to the LoRA pairs (training).
    /// Only the rows of positions `rows` are computed past the last layer when given (the
    /// positions a loss is taken on).
    pub fn logits_graph(&self, tokens: &[u32], rows: Option<&[u32]>) -> Result<CTensor> {
        let mut cache = self.cache(tokens.len());
        self.run_tensor(tokens, &mut [&mut cache], &[tokens.len()], None, None, rows)
    }

    /// As [`Forward::logits_graph`] over several sequences packed one after another in
    /// `tokens` (`lengths` each): every linear runs once over all their rows, while positions
    /// and attention stay within each sequence, so the result equals running them one by one.
    pub fn logits_graph_packed(
        &self,
        tokens: &[u32],
        lengths: &[usize],
        rows: Option<&[u32]>,
    ) -> Result<CTensor> {
        let mut caches: Vec<KvCache> = lengths.iter().map(|&len| self.cache(len)).collect();
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        self.run_tensor(tokens, &mut refs, lengths, None, None, rows)
    }

    /// Runs several sequences in one pass, each continuing its own cache: `seqs[i]` is
    /// appended after what `caches[i]` holds (a prompt, or the one token sampled last).
    /// Every linear runs once over all their rows, so `k` sequences cost about what one does
    /// while the weights dominate; positions and attention stay within each sequence.
    /// Returns the logits of each sequence's last token, `[seqs.len(), vocab]` row-major.
    /// Bad input is refused before any cache changes.
    pub fn forward_last(&self, seqs: &[&[u32]], caches: &mut [&mut KvCache]) -> Result<Vec<f32>> {
        if seqs.len() != caches.len() {
            return Err(Error::Invalid(format!(
                "forward pass: {} sequences with {} caches",
                seqs.len(),
                caches.len()
            )));
        }
        let lengths: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let mut rows = Vec::with_capacity(seqs.len());
        let mut end = 0u32;
        for &len in &lengths {
            end += len as u32;
            rows.push(end.saturating_sub(1));
        }
        let tokens: Vec<u32> = seqs.concat();
        self.run_tensor(&tokens, caches, &lengths, None, None, Some(&rows))?
            .flatten_all()
            .map_err(ce)?
            .to_vec1::<f32>()
            .map_err(ce)
    }

    /// A fresh KV cache for up to `max_len` positions.
    pub fn cache(&self, max_len: usize) -> KvCache {
        KvCache {
            layers: vec![None; self.layers.len()],
            len: 0,
            max_len,
        }
    }

    /// Runs `tokens` (appended after what the cache holds) and returns logits
    /// `[tokens.len(), vocab]` row-major f32. Bad input (an id outside the vocabulary, more
    /// positions than the cache takes) is refused before the cache changes.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        self.run(tokens, cache, None, None)
    }

    /// As [`Forward::forward`], and calls `probe(point, values)` at these points, `L.` being
    /// the layer index: `L.attn_in` and `L.mlp_in` (the residual stream `[n, hidden]` before
    /// each norm), `L.attn_norm` and `L.mlp_norm` (the norms' outputs), `L.q`, `L.k`, `L.v`
    /// (projections `[n, width]`), `L.q_rot` and `L.k_rot` (`[heads, n, head_dim]` after
    /// rotary), `L.scores` (`q·k` before the `1/sqrt(head_dim)` scale, `[heads, n, past + n]`),
    /// `L.attn` (attention output `[n, heads·head_dim]`), `L.o`, `L.gate`, `L.up`, `L.silu`,
    /// `L.h` (`silu(gate)·up`), `L.down`, then `final_in`, `final_norm` and `logits`.
    pub fn forward_probed(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        probe: &mut dyn FnMut(&str, &CTensor),
    ) -> Result<Vec<f32>> {
        self.run(tokens, cache, None, Some(probe))
    }

    /// As [`Forward::forward`], and calls `observer(weight name, inputs, in_features)` with the
    /// input activations `[tokens.len(), in_features]` of every linear layer, in execution
    /// order. Q, K and V (and gate and up) share one input and are reported once per weight.
    pub fn forward_observed(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        observer: &mut dyn FnMut(&str, &[f32], usize),
    ) -> Result<Vec<f32>> {
        self.run(tokens, cache, Some(observer), None)
    }

    fn run(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        observer: Observer<'_>,
        pr: Probe<'_>,
    ) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        self.run_tensor(tokens, &mut [cache], &[tokens.len()], observer, pr, None)?
            .flatten_all()
            .map_err(ce)?
            .to_vec1::<f32>()
            .map_err(ce)
    }

    /// The logits `[tokens.len(), vocab]` (or of `rows` only) as a tensor, which keeps the
    /// autograd graph of any LoRA attached. `tokens` holds one run of `lengths[i]` tokens per
    /// sequence, each appended after what `caches[i]` holds.
    fn run_tensor(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
        lengths: &[usize],
        mut observer: Observer<'_>,
        mut pr: Probe<'_>,
        rows: Option<&[u32]>,
    ) -> Result<CTensor> {
        let c = &self.config;
        let n = tokens.len();
        if n == 0 {
            return Err(Error::Invalid("forward pass: no tokens".into()));
        }
        if lengths.len() != caches.len()
            || lengths.iter().sum::<usize>() != n
            || lengths.contains(&0)
        {
            return Err(Error::Invalid(format!(
                "forward pass: sequence lengths {lengths:?} do not split {n} tokens over {} caches",
                caches.len()
            )));
        }
        for (cache, &len) in caches.iter().zip(lengths) {
            if cache.layers.len() != self.layers.len() {
                return Err(Error::Invalid(format!(
                    "forward pass: the KV cache has {} layers, {} has {}",
                    cache.layers.len(),
                    self.source.display(),
                    self.layers.len()
                )));
            }
            if cache.len + len > cache.max_len {
                return Err(Error::Invalid(format!(
                    "forward pass: {} positions held + {len} new exceed the cache's {}",
                    cache.len, cache.max_len
                )));
            }
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::Invalid(format!(
                "forward pass: token id {bad} is outside the vocabulary of {} ({} ids)",
                self.source.display(),
                c.vocab_size
            )));
        }
        if let Some(&bad) = rows.and_then(|r| r.iter().find(|&&r| r as usize >= n)) {
            return Err(Error::Invalid(format!(
                "forward pass: row {bad} of {n} positions asked for"
            )));
        }
        SEQUENCE_ROWS.with(|r| *r.borrow_mut() = lengths.to_vec());
        let ids = CTensor::from_slice(tokens, n, &Device::Cpu).map_err(ce)?;
        let mut x = self
            .embed
            .index_select(&ids, 0)
            .and_then(|x| x.to_dtype(DType::F32))
            .map_err(ce)?;
        // Each sequence's rows: where they start, and what they may attend to.
        let mut positions = Vec::with_capacity(n);
        let mut parts = Vec::with_capacity(lengths.len());
        let mut start = 0;
        for (cache, &len) in caches.iter().zip(lengths) {
            positions.extend(cache.len..cache.len + len);
            parts.push((start, causal_mask(cache.len, len)?));
            start += len;
        }
        // Probes see one sequence's tensors only.
        if parts.len() > 1 {
            pr = None;
        }
        let (cos, sin) = self.rope_tables(&positions)?;
        for (l, layer) in self.layers.iter().enumerate() {
            probe(&mut pr, Some(l), "attn_in", &x);
            let xn = rms_norm(&x, &layer.attn_norm, c.rms_norm_eps)?;
            probe(&mut pr, Some(l), "attn_norm", &xn);
            let mut slots: Vec<&mut Option<(CTensor, CTensor)>> =
                caches.iter_mut().map(|c| &mut c.layers[l]).collect();
            let a = self.attention(
                layer,
                &xn,
                &mut slots,
                &cos,
                &sin,
                &parts,
                &mut observer,
                &mut pr,
                l,
            )?;
            x = (x + a).map_err(ce)?;
            probe(&mut pr, Some(l), "mlp_in", &x);
            let xn = rms_norm(&x, &layer.mlp_norm, c.rms_norm_eps)?;
            probe(&mut pr, Some(l), "mlp_norm", &xn);
            let m = mlp(layer, &xn, c.intermediate_size, &mut observer, &mut pr, l)?;
            x = (x + m).map_err(ce)?;
        }
        for (cache, &len) in caches.iter_mut().zip(lengths) {
            cache.len += len;
        }
        let mut head_groups = None;
        if let Some(rows) = rows {
            if self.lm_head.act == ActQuant::DynamicU8 {
                // onnxruntime runs the head over every row of a call, so each sequence's
                // range spans all of its rows, picked or not.
                let all = rms_norm(&x, &self.norm, c.rms_norm_eps)?
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(ce)?;
                let ranges = dynamic_u8_ranges(&all, c.hidden_size, lengths)?;
                let mut of_row = Vec::with_capacity(n);
                for &(len, p) in &ranges {
                    of_row.extend(std::iter::repeat_n(p, len));
                }
                head_groups = Some(
                    rows.iter()
                        .map(|&r| (1, of_row[r as usize]))
                        .collect::<Vec<_>>(),
                );
            }
            let idx = CTensor::from_slice(rows, rows.len(), &Device::Cpu).map_err(ce)?;
            x = x.index_select(&idx, 0).map_err(ce)?;
        }
        probe(&mut pr, None, "final_in", &x);
        let x = rms_norm(&x, &self.norm, c.rms_norm_eps)?;
        probe(&mut pr, None, "final_norm", &x);
        let logits = self
            .lm_head
            .apply_grouped(&x, &mut observer, head_groups.as_deref())?;
        probe(&mut pr, None, "logits", &logits);
        Ok(logits)
    }

    /// cos and sin of `positions`, `[positions.len(), head_dim]` each, with the frequencies
    /// repeated over both halves as transformers' `cat((freqs, freqs))` does.
    fn rope_tables(&self, positions: &[usize]) -> Result<(CTensor, CTensor)> {
        let d = self.config.head_dim;
        let half = d / 2;
        let n = positions.len();
        let mut cos = vec![0f32; n * d];
        let mut sin = vec![0f32; n * d];
        for (i, &p) in positions.iter().enumerate() {
            let pos = p as f64;
            for (j, f) in self.inv_freq.iter().enumerate() {
                let (s, co) = (pos * f).sin_cos();
                cos[i * d + j] = co as f32;
                cos[i * d + j + half] = co as f32;
                sin[i * d + j] = s as f32;
                sin[i * d + j + half] = s as f32;
            }
        }
        let dev = Device::Cpu;
        Ok((
            CTensor::from_vec(cos, (n, d), &dev).map_err(ce)?,
            CTensor::from_vec(sin, (n, d), &dev).map_err(ce)?,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        x: &CTensor,
        slots: &mut [&mut Option<(CTensor, CTensor)>],
        cos: &CTensor,
        sin: &CTensor,
        parts: &[(usize, CTensor)],
        observer: &mut Observer<'_>,
        pr: &mut Probe<'_>,
        l: usize,
    ) -> Result<CTensor> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let n = x.dim(0).map_err(ce)?;
        let (q, k, v) = match &layer.qkv {
            Qkv::Split { q, k, v } => (
                q.apply(x, observer)?,
                k.apply(x, observer)?,
                v.apply(x, observer)?,
            ),
            Qkv::Fused(qkv) => {
                let y = qkv.apply(x, observer)?;
                let (qd, kvd) = (nh * hd, nkv * hd);
                (
                    y.narrow(1, 0, qd).map_err(ce)?,
                    y.narrow(1, qd, kvd).map_err(ce)?,
                    y.narrow(1, qd + kvd, kvd).map_err(ce)?,
                )
            }
        };
        // [n, heads * hd] -> [heads, n, hd]
        let heads = |t: CTensor, h: usize| -> Result<CTensor> {
            t.reshape((n, h, hd))
                .and_then(|t| t.transpose(0, 1))
                .and_then(|t| t.contiguous())
                .map_err(ce)
        };
        probe(pr, Some(l), "q", &q);
        probe(pr, Some(l), "k", &k);
        probe(pr, Some(l), "v", &v);
        let q = rope(&heads(q, nh)?, cos, sin)?;
        let k = rope(&heads(k, nkv)?, cos, sin)?;
        let v = heads(v, nkv)?;
        probe(pr, Some(l), "q_rot", &q);
        probe(pr, Some(l), "k_rot", &k);
        // Each sequence attends to its own cache and new rows only.
        let mut outs = Vec::with_capacity(parts.len());
        for ((start, mask), slot) in parts.iter().zip(slots.iter_mut()) {
            let len = mask.dim(0).map_err(ce)?;
            let part = |t: &CTensor| -> Result<CTensor> {
                if parts.len() == 1 {
                    return Ok(t.clone());
                }
                t.narrow(1, *start, len)
                    .and_then(|t| t.contiguous())
                    .map_err(ce)
            };
            let (k, v) = match slot.take() {
                Some((pk, pv)) => (
                    CTensor::cat(&[&pk, &part(&k)?], 1).map_err(ce)?,
                    CTensor::cat(&[&pv, &part(&v)?], 1).map_err(ce)?,
                ),
                None => (part(&k)?, part(&v)?),
            };
            outs.push(self.attend(&part(&q)?, &k, &v, mask, pr, l)?);
            **slot = Some((k, v));
        }
        let out = if outs.len() == 1 {
            outs.pop().expect("one part")
        } else {
            CTensor::cat(&outs, 0).map_err(ce)?
        };
        probe(pr, Some(l), "attn", &out);
        let o = layer.o.apply(&out, observer)?;
        probe(pr, Some(l), "o", &o);
        Ok(o)
    }

    /// Attention of queries `[heads, n, hd]` over keys and values `[kv_heads, t, hd]` under
    /// `mask` `[n, t]`, as rows `[n, heads * hd]`.
    fn attend(
        &self,
        q: &CTensor,
        k: &CTensor,
        v: &CTensor,
        mask: &CTensor,
        pr: &mut Probe<'_>,
        l: usize,
    ) -> Result<CTensor> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let n = q.dim(1).map_err(ce)?;
        let t = k.dim(1).map_err(ce)?;
        // Grouped-query attention without repeating K/V: query heads g*j .. g*(j+1) share KV
        // head j, so folding them into the row dimension turns it into one batched matmul per
        // KV head.
        let g = nh / nkv;
        let q = q.reshape((nkv, g * n, hd)).map_err(ce)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let raw = q.matmul(&k.t().map_err(ce)?).map_err(ce)?;
        if pr.is_some() {
            // Only the causally visible scores: the masked ones never reach the softmax
            // (zeroed, they cannot raise the largest |value|).
            let past = t - n;
            let visible: Vec<f32> = (0..n)
                .flat_map(|i| (0..t).map(move |j| if j <= past + i { 1.0 } else { 0.0 }))
                .collect();
            let visible = CTensor::from_vec(visible, (n, t), &Device::Cpu).map_err(ce)?;
            let seen = raw
                .reshape((nh, n, t))
                .and_then(|r| r.broadcast_mul(&visible))
                .map_err(ce)?;
            probe(pr, Some(l), "scores", &seen);
        }
        let scores = raw
            .affine(scale, 0.0)
            .and_then(|s| s.reshape((nh, n, t)))
            .and_then(|s| s.broadcast_add(mask))
            .map_err(ce)?;
        let probs = softmax_last(&scores)?;
        let out = probs
            .reshape((nkv, g * n, t))
            .and_then(|p| p.matmul(v))
            .and_then(|o| o.reshape((nh, n, hd)))
            .and_then(|o| o.transpose(0, 1))
            .and_then(|o| o.contiguous())
            .and_then(|o| o.reshape((n, nh * hd)))
            .map_err(ce)?;
        Ok(out)
    }
}

/// SiLU-gated MLP: `down(silu(gate(x)) * up(x))`.
fn mlp(
    layer: &Layer,
    x: &CTensor,
    ff: usize,
    observer: &mut Observer<'_>,
    pr: &mut Probe<'_>,
    l: usize,
) -> Result<CTensor> {
    let (gate, up) = match &layer.gate_up {
        GateUp::Split { gate, up } => (gate.apply(x, observer)?, up.apply(x, observer)?),
        GateUp::Fused(gu) => {
            let y = gu.apply(x, observer)?;
            (
                y.narrow(1, 0, ff).map_err(ce)?,
                y.narrow(1, ff, ff).map_err(ce)?,
            )
        }
    };
    probe(pr, Some(l), "gate", &gate);
    probe(pr, Some(l), "up", &up);
    let silu = gate.silu().map_err(ce)?;
    probe(pr, Some(l), "silu", &silu);
    let h = (silu * up).map_err(ce)?;
    probe(pr, Some(l), "h", &h);
    let d = layer.down.apply(&h, observer)?;
    probe(pr, Some(l), "down", &d);
    Ok(d)
}

/// RMSNorm over the last dimension of `[n, hidden]`, as HF's `LlamaRMSNorm` in f32.
fn rms_norm(x: &CTensor, w: &CTensor, eps: f64) -> Result<CTensor> {
    let inv = x
        .sqr()
        .and_then(|s| s.mean_keepdim(D::Minus1))
        .and_then(|m| m.affine(1.0, eps))
        .and_then(|m| m.sqrt())
        .and_then(|r| r.recip())
        .map_err(ce)?;
    x.broadcast_mul(&inv)
        .and_then(|y| y.broadcast_mul(w))
        .map_err(ce)
}

/// `x * cos + rotate_half(x) * sin` on `[heads, n, hd]`, where `rotate_half` pairs element
/// `i` with `i + hd/2` (the NEOX layout of HF-ordered Q/K rows).
fn rope(x: &CTensor, cos: &CTensor, sin: &CTensor) -> Result<CTensor> {
    let hd = x.dim(D::Minus1).map_err(ce)?;
    let half = hd / 2;
    let x1 = x.narrow(D::Minus1, 0, half).map_err(ce)?;
    let x2 = x.narrow(D::Minus1, half, half).map_err(ce)?;
    let rotated = CTensor::cat(&[&x2.neg().map_err(ce)?, &x1], D::Minus1).map_err(ce)?;
    let a = x.broadcast_mul(cos).map_err(ce)?;
    let b = rotated.broadcast_mul(sin).map_err(ce)?;
    (a + b).map_err(ce)
}

/// `[n, past + n]`: 0 where new token `i` (at position `past + i`) may attend key `t`, -inf
/// where `t` lies in its future.
fn causal_mask(past: usize, n: usize) -> Result<CTensor> {
    let total = past + n;
    let m: Vec<f32> = (0..n)
        .flat_map(|i| (0..total).map(move |t| if t > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    CTensor::from_vec(m, (n, total), &Device::Cpu).map_err(ce)
}

/// Softmax over the last dimension, max-subtracted so exp never overflows.
fn softmax_last(x: &CTensor) -> Result<CTensor> {
    // The shift cancels out of the result, so it needs no gradient.
    let max = x.max_keepdim(D::Minus1).map_err(ce)?.detach();
    let e = x.broadcast_sub(&max).and_then(|d| d.exp()).map_err(ce)?;
    let sum = e.sum_keepdim(D::Minus1).map_err(ce)?;
    e.broadcast_div(&sum).map_err(ce)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    /// `rows x cols` values in [-1, 1) from `seed`.
    fn values(seed: u64, rows: usize, cols: usize) -> CTensor {
        let mut state = seed;
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| uniform(&mut state) * 2.0 - 1.0)
            .collect();
        CTensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn lora_linear_gives_the_values_and_gradients_of_its_parts_with_the_mask_drawn_again() {
        let (n, inn, out, r) = (5, 12, 7, 3);
        let w = values(1, out, inn);
        let g = values(5, n, out);
        let close = |a: &CTensor, b: &CTensor, what: &str| {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            let d = d.to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "{what}: differs by {d}");
        };
        for stream in [Some(42), None] {
            let x = Var::from_tensor(&values(2, n, inn)).unwrap();
            let a = Var::from_tensor(&values(3, r, inn)).unwrap();
            let b = Var::from_tensor(&values(4, out, r)).unwrap();
            let op = LoraLinear {
                w: w.clone(),
                scale: 2.0,
                dropout: 0.3,
                stream,
            };
            let mask = op.mask(&(n, inn).into()).unwrap();
            assert_eq!(mask.is_some(), stream.is_some());
            let y = x.apply_op3(a.as_tensor(), b.as_tensor(), op).unwrap();
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();

            // The same product written out as separate ops, differentiated by candle.
            let xd = match &mask {
                Some(m) => {
                    let kept = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert!(kept.contains(&0.0) && kept.iter().any(|&k| k > 1.0));
                    x.as_tensor().mul(m).unwrap()
                }
                None => x.as_tensor().clone(),
            };
            let u = xd
                .matmul(&a.as_tensor().t().unwrap())
                .unwrap()
                .matmul(&b.as_tensor().affine(2.0, 0.0).unwrap().t().unwrap())
                .unwrap();
            let y_ref = (x.as_tensor().matmul(&w.t().unwrap()).unwrap() + u).unwrap();
            let refs = (&y_ref * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            close(&y, &y_ref, "output");
            for (v, name) in [(&x, "x"), (&a, "A"), (&b, "B")] {
                close(
                    grads.get(v.as_tensor()).unwrap(),
                    refs.get(v.as_tensor()).unwrap(),
                    name,
                );
            }
        }
    }

    fn config(extra: Json) -> ModelConfig {
        let mut cfg = json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": 16, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0});
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        ModelConfig::from_hf_json(&cfg, Path::new("m/config.json")).unwrap()
    }

    #[test]
    fn default_rope_frequencies_are_theta_powers() {
        let f = rope_inv_freq(&config(json!({})), Path::new("m")).unwrap();
        assert_eq!(f.len(), 16);
        assert_eq!(f[0], 1.0);
        assert!((f[1] - 10000f64.powf(-2.0 / 32.0)).abs() < 1e-15);
    }

    #[test]
    fn linear_rope_scaling_divides_every_frequency() {
        let plain = rope_inv_freq(&config(json!({})), Path::new("m")).unwrap();
        let cfg = config(json!({"rope_scaling": {"type": "linear", "factor": 4.0}}));
        let lin = rope_inv_freq(&cfg, Path::new("m")).unwrap();
        for (a, b) in plain.iter().zip(&lin) {
            assert!((a / 4.0 - b).abs() < 1e-15);
        }
    }

    #[test]
    fn llama3_rope_keeps_high_divides_low_and_interpolates_between() {
        // head_dim 32, theta 1e4, original context 64: wavelengths run from 2π to ~2.5e4, so
        // there are frequencies in each of the three bands (< 16, 16..64, > 64).
        let cfg = config(
            json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}}),
        );
        let base = rope_inv_freq(&config(json!({})), Path::new("m")).unwrap();
        let got = rope_inv_freq(&cfg, Path::new("m")).unwrap();
        let mut bands = [0; 3];
        for (b, g) in base.iter().zip(&got) {
            let wavelen = 2.0 * std::f64::consts::PI / b;
            if wavelen < 16.0 {
                bands[0] += 1;
                assert_eq!(g, b);
            } else if wavelen > 64.0 {
                bands[1] += 1;
                assert!((g - b / 8.0).abs() < 1e-15);
            } else {
                bands[2] += 1;
                let s = (64.0 / wavelen - 1.0) / 3.0;
                assert!((g - ((1.0 - s) * b / 8.0 + s * b)).abs() < 1e-15);
                assert!(*g < *b && *g > b / 8.0);
            }
        }
        assert!(bands.iter().all(|&k| k > 0), "{bands:?}");
    }

    #[test]
    fn other_rope_scaling_types_are_refused_naming_the_field() {
        let cfg = config(json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}));
        let err = rope_inv_freq(&cfg, Path::new("m")).unwrap_err().to_string();
        assert!(err.contains("m: rope_scaling: unsupported"), "{err}");
        assert!(err.contains("yarn"), "{err}");
    }

    #[test]
    fn causal_mask_lets_each_new_token_see_the_past_and_itself() {
        let m = causal_mask(2, 2).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m[0], [0.0, 0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(m[1], [0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn rope_rotates_pairs_half_a_head_apart() {
        // One head, hd 4, one position with angle θ for pair (0, 2) and φ for pair (1, 3).
        let (th, ph) = (0.3f32, 1.1f32);
        let cos = CTensor::new(&[[th.cos(), ph.cos(), th.cos(), ph.cos()]], &Device::Cpu).unwrap();
        let sin = CTensor::new(&[[th.sin(), ph.sin(), th.sin(), ph.sin()]], &Device::Cpu).unwrap();
        let x = CTensor::new(&[[[1f32, 2.0, 3.0, 4.0]]], &Device::Cpu).unwrap();
        let y = rope(&x, &cos, &sin).unwrap().flatten_all().unwrap();
        let y = y.to_vec1::<f32>().unwrap();
        let want = [
            th.cos() - 3.0 * th.sin(),
            2.0 * ph.cos() - 4.0 * ph.sin(),
            3.0 * th.cos() + th.sin(),
            4.0 * ph.cos() + 2.0 * ph.sin(),
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
        }
    }
}
