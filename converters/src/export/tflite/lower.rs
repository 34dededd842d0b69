//! Lowering the decoder description ([`DecoderGraph`]) to TFLite subgraphs, one per signature,
//! in the layout of LiteRT's generative exporter: inputs `tokens` int32 `[1, T]`, `input_pos`
//! int32 `[T]`, and per layer `kv_cache_k_<i>` / `kv_cache_v_<i>` float32
//! `[1, max_seq_len, kv_heads, head_dim]` (BTNH); outputs `logits` `[1, T, vocab]` and the
//! updated caches under the same names. Every shape is static.
//!
//! Inside a subgraph activations are 2-D `[T, width]`. The cache write is a
//! DYNAMIC_UPDATE_SLICE at `input_pos[0]`; attention reads the whole cache with a mask built
//! from `input_pos`, so positions not yet written never count. Rotation uses the
//! `rotate_half` identity `rot(x) = x·cos + (x·R)·sin`, with `R` the constant signed
//! permutation that maps element `i` to `i ± head_dim/2` (an exact FULLY_CONNECTED).

use std::collections::HashMap;

use super::builder::{Graph, Placed, T};
use super::schema::{
    BuiltinOp as B, Options, Quantization, SignatureDef, SubGraphDef, TensorMap, TensorType as Ty,
};
use crate::error::{Error, Result};
use crate::export::graph::{DecoderGraph, Op, WeightKind, INPUT_IDS};

/// Added to the attention score of a masked position: large enough that `exp` underflows to
/// exactly 0 after softmax's max subtraction, small enough that adding it to any score stays
/// finite in f32.
pub const MASK_VALUE: f32 = -1e30;

/// Signature and tensor names of LiteRT's generative exporter (facts/tflite_targets.md §2.2).
pub const TOKENS: &str = "tokens";
pub const INPUT_POS: &str = "input_pos";
pub const LOGITS: &str = "logits";
pub const DECODE: &str = "decode";

pub fn prefill_key(len: usize) -> String {
    format!("prefill_{len}")
}

pub fn kv_name(kind: char, layer: usize) -> String {
    format!("kv_cache_{kind}_{layer}")
}

/// Placement keys of weights (the graph weight name, or the embedding for a tied head).
pub fn weight_key(dg: &DecoderGraph, id: usize) -> String {
    let w = &dg.weights[id];
    if w.tied {
        if let Some(e) = dg.weights.iter().find(|e| e.kind == WeightKind::Embedding) {
            return e.name.clone();
        }
    }
    w.name.clone()
}

/// Width of an integer graph's activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActWidth {
    /// int8 in and out, int32 bias.
    I8,
    /// int16 in and out, int64 bias (TFLite's 16x8 kernels).
    I16,
}

impl ActWidth {
    /// Largest magnitude of a symmetric activation (zero point 0; TFLite's int16 activations
    /// are always symmetric, facts/tflite_targets.md §1.5).
    pub fn max(self) -> f64 {
        match self {
            ActWidth::I8 => 127.0,
            ActWidth::I16 => 32767.0,
        }
    }

    pub fn tensor_type(self) -> Ty {
        match self {
            ActWidth::I8 => Ty::Int8,
            ActWidth::I16 => Ty::Int16,
        }
    }

    pub fn bias_type(self) -> Ty {
        match self {
            ActWidth::I8 => Ty::Int32,
            ActWidth::I16 => Ty::Int64,
        }
    }
}

/// What a lowering needs besides the graph.
pub struct LowerCtx<'a> {
    pub dg: &'a DecoderGraph,
    pub max_seq_len: usize,
}

/// One lowered signature.
pub struct Lowered {
    pub subgraph: SubGraphDef,
    pub inputs: Vec<TensorMap>,
    pub outputs: Vec<TensorMap>,
}

struct Sig<'g, 'b> {
    g: &'g mut Graph<'b>,
    t: i32,
    /// Dequantized (fp16 → f32) views of weights in this subgraph.
    deq: HashMap<String, T>,
    values: HashMap<String, T>,
    /// `input_pos` as a `[T, 1]` column, `[1]` first position, the cache write start `[4]`.
    start: T,
    mask: T,
    cos: T,
    sin: T,
    rot: T,
}

impl LowerCtx<'_> {
    /// Lowers one signature with `t` new tokens per call.
    pub fn signature(&self, g: &mut Graph<'_>, t: usize) -> Result<Lowered> {
        let dg = self.dg;
        let d = &dg.dims;
        let s = self.max_seq_len as i32;
        let ti = t as i32;
        let hd = d.head_dim as i32;
        let nkv = d.n_kv_heads as i32;
        if dg.rotary.rotary_dim != d.head_dim {
            return Err(Error::Invalid(format!(
                "TFLite export: rotary over {} of {} head elements (partial rotary) is not supported",
                dg.rotary.rotary_dim, d.head_dim
            )));
        }
        let tokens = g.input(TOKENS, &[1, ti], Ty::Int32);
        g.rename(tokens, TOKENS);
        let pos = g.input(INPUT_POS, &[ti], Ty::Int32);
        g.rename(pos, INPUT_POS);
        let mut kv_in = Vec::new();
        for l in 0..d.n_layers {
            for kind in ['k', 'v'] {
                let name = kv_name(kind, l);
                let x = g.input(&name, &[1, s, nkv, hd], Ty::Float32);
                g.rename(x, &name);
                kv_in.push((name, x));
            }
        }

        let (start, future) = cache_positions(g, pos, ti, s);
        let future_f = g.op(
            B::Cast,
            1,
            &[future],
            Options::Cast {
                from: Ty::Bool,
                to: Ty::Float32,
            },
            ("future_f", &[ti, s], Ty::Float32),
        );
        let neg = g.const_f32("mask_value", &[1], &[MASK_VALUE]);
        let mask = g.op(
            B::Mul,
            1,
            &[future_f, neg],
            Options::Mul,
            ("mask", &[ti, s], Ty::Float32),
        );
        let (cos_t, sin_t) = full_tables(&dg.rotary, self.max_seq_len, d.head_dim);
        let cos_table = g.const_f32("rope_cos", &[s, hd], &cos_t);
        let sin_table = g.const_f32("rope_sin", &[s, hd], &sin_t);
        let gather = |g: &mut Graph<'_>, table: T, name: &str| {
            let x = g.op(
                B::Gather,
                1,
                &[table, pos],
                Options::Gather { axis: 0 },
                (name, &[ti, hd], Ty::Float32),
            );
            let sh = g.const_i32("shape", &[3], &[ti, 1, hd]);
            g.op(
                B::Reshape,
                1,
                &[x, sh],
                Options::Reshape,
                (name, &[ti, 1, hd], Ty::Float32),
            )
        };
        let cos = gather(g, cos_table, "cos");
        let sin = gather(g, sin_table, "sin");
        let rot = g.const_f32("rotate_half", &[hd, hd], &rotate_half_matrix(d.head_dim));

        let mut sig = Sig {
            g,
            t: ti,
            deq: HashMap::new(),
            values: HashMap::new(),
            start,
            mask,
            cos,
            sin,
            rot,
        };
        let ids_shape = sig.g.const_i32("shape", &[1], &[ti]);
        let ids = sig.g.op(
            B::Reshape,
            1,
            &[tokens, ids_shape],
            Options::Reshape,
            ("ids", &[ti], Ty::Int32),
        );
        sig.values.insert(INPUT_IDS.to_string(), ids);

        let mut kv_out = Vec::new();
        for op in &dg.ops {
            self.lower_op(&mut sig, op, &kv_in, &mut kv_out)?;
        }
        let logits2 = sig.values[&dg.logits];
        let v = d.vocab as i32;
        let sh = sig.g.const_i32("shape", &[3], &[1, ti, v]);
        let logits = sig.g.op(
            B::Reshape,
            1,
            &[logits2, sh],
            Options::Reshape,
            (LOGITS, &[1, ti, v], Ty::Float32),
        );
        sig.g.rename(logits, LOGITS);
        sig.g.output(logits);
        let mut outputs = vec![TensorMap {
            name: LOGITS.into(),
            tensor_index: logits as u32,
        }];
        for (name, x) in kv_out {
            sig.g.output(x);
            outputs.push(TensorMap {
                name,
                tensor_index: x as u32,
            });
        }
        let mut inputs = vec![
            TensorMap {
                name: TOKENS.into(),
                tensor_index: tokens as u32,
            },
            TensorMap {
                name: INPUT_POS.into(),
                tensor_index: pos as u32,
            },
        ];
        for (name, x) in kv_in {
            inputs.push(TensorMap {
                name,
                tensor_index: x as u32,
            });
        }
        Ok(Lowered {
            subgraph: sig.g.sg.clone(),
            inputs,
            outputs,
        })
    }

    /// A weight usable as a float operand: fp16 weights go through one DEQUANTIZE per subgraph.
    fn float_weight(&self, sig: &mut Sig<'_, '_>, key: &str) -> T {
        let w = sig.g.weight(key);
        if sig.g.dtype(w) != Ty::Float16 {
            return w;
        }
        if let Some(&t) = sig.deq.get(key) {
            return t;
        }
        let shape = sig.g.shape(w).to_vec();
        let t = sig.g.op(
            B::Dequantize,
            3,
            &[w],
            Options::Dequantize,
            (key, &shape, Ty::Float32),
        );
        sig.deq.insert(key.to_string(), t);
        t
    }

    fn lower_op(
        &self,
        sig: &mut Sig<'_, '_>,
        op: &Op,
        kv_in: &[(String, T)],
        kv_out: &mut Vec<(String, T)>,
    ) -> Result<()> {
        let dg = self.dg;
        let ti = sig.t;
        let val = |sig: &Sig<'_, '_>, n: &str| -> Result<T> {
            sig.values.get(n).copied().ok_or_else(|| {
                Error::Invalid(format!(
                    "TFLite export: value `{n}` is read before it is made"
                ))
            })
        };
        match op {
            Op::Embed { table, ids, out } => {
                let key = weight_key(dg, *table);
                let ids = val(sig, ids)?;
                let w = sig.g.weight(&key);
                let h = sig.g.shape(w)[1];
                let x = if sig.g.dtype(w) == Ty::Int8 {
                    // Hybrid lookup: int8 rows with one scale per row, float output.
                    sig.g.op(
                        B::EmbeddingLookup,
                        3,
                        &[ids, w],
                        Options::None,
                        (out, &[ti, h], Ty::Float32),
                    )
                } else {
                    let w = self.float_weight(sig, &key);
                    sig.g.op(
                        B::Gather,
                        1,
                        &[w, ids],
                        Options::Gather { axis: 0 },
                        (out, &[ti, h], Ty::Float32),
                    )
                };
                sig.values.insert(out.clone(), x);
            }
            Op::RmsNorm { x, gain, eps, out } => {
                let x = val(sig, x)?;
                let key = weight_key(dg, *gain);
                let w = sig.g.weight(&key);
                let h = sig.g.shape(x)[1];
                let g = &mut *sig.g;
                let sq = g.op(
                    B::Mul,
                    1,
                    &[x, x],
                    Options::Mul,
                    ("sq", &[ti, h], Ty::Float32),
                );
                let axis = g.const_i32("axis_last", &[1], &[1]);
                let ms = g.op(
                    B::Mean,
                    1,
                    &[sq, axis],
                    Options::Reducer { keep_dims: true },
                    ("mean_sq", &[ti, 1], Ty::Float32),
                );
                let e = g.const_f32("eps", &[1], &[*eps as f32]);
                let me = g.op(
                    B::Add,
                    1,
                    &[ms, e],
                    Options::Add,
                    ("ms_eps", &[ti, 1], Ty::Float32),
                );
                let r = g.op(
                    B::Rsqrt,
                    1,
                    &[me],
                    Options::None,
                    ("rsqrt", &[ti, 1], Ty::Float32),
                );
                let n = g.op(
                    B::Mul,
                    1,
                    &[x, r],
                    Options::Mul,
                    ("normed", &[ti, h], Ty::Float32),
                );
                let y = g.op(
                    B::Mul,
                    1,
                    &[n, w],
                    Options::Mul,
                    (out, &[ti, h], Ty::Float32),
                );
                sig.values.insert(out.clone(), y);
            }
            Op::Linear {
                x,
                weight,
                bias,
                out,
            } => {
                let x = val(sig, x)?;
                let key = weight_key(dg, *weight);
                let n_out = dg.weights[*weight].n_rows() as i32;
                let w = sig.g.weight(&key);
                let hybrid = sig.g.dtype(w) == Ty::Int8;
                let w = if hybrid {
                    w
                } else {
                    self.float_weight(sig, &key)
                };
                let b = match bias {
                    Some(b) => sig.g.weight(&weight_key(dg, *b)),
                    None => -1,
                };
                let y = sig.g.op(
                    B::FullyConnected,
                    if hybrid { 7 } else { 1 },
                    &[x, w, b],
                    Options::FullyConnected {
                        keep_num_dims: false,
                        asymmetric_quantize_inputs: hybrid,
                    },
                    (out, &[ti, n_out], Ty::Float32),
                );
                sig.values.insert(out.clone(), y);
            }
            Op::Split { x, sizes, outs } => {
                let x = val(sig, x)?;
                let mut off = 0i32;
                for (n, o) in sizes.iter().zip(outs) {
                    let n = *n as i32;
                    let g = &mut *sig.g;
                    let b = g.const_i32("begin", &[2], &[0, off]);
                    let sz = g.const_i32("size", &[2], &[ti, n]);
                    let y = g.op(
                        B::Slice,
                        1,
                        &[x, b, sz],
                        Options::Slice,
                        (o, &[ti, n], Ty::Float32),
                    );
                    sig.values.insert(o.clone(), y);
                    off += n;
                }
            }
            Op::Rotary { x, heads, out } => {
                let x = val(sig, x)?;
                let hd = dg.dims.head_dim as i32;
                let nh = *heads as i32;
                let g = &mut *sig.g;
                let sh = g.const_i32("shape", &[3], &[ti, nh, hd]);
                let x3 = g.op(
                    B::Reshape,
                    1,
                    &[x, sh],
                    Options::Reshape,
                    ("heads", &[ti, nh, hd], Ty::Float32),
                );
                let r = g.op(
                    B::FullyConnected,
                    5,
                    &[x3, sig.rot, -1],
                    Options::FullyConnected {
                        keep_num_dims: true,
                        asymmetric_quantize_inputs: false,
                    },
                    ("rotate_half", &[ti, nh, hd], Ty::Float32),
                );
                let a = g.op(
                    B::Mul,
                    1,
                    &[x3, sig.cos],
                    Options::Mul,
                    ("x_cos", &[ti, nh, hd], Ty::Float32),
                );
                let b = g.op(
                    B::Mul,
                    1,
                    &[r, sig.sin],
                    Options::Mul,
                    ("rot_sin", &[ti, nh, hd], Ty::Float32),
                );
                let y3 = g.op(
                    B::Add,
                    1,
                    &[a, b],
                    Options::Add,
                    ("rotated", &[ti, nh, hd], Ty::Float32),
                );
                let sh2 = g.const_i32("shape", &[2], &[ti, nh * hd]);
                let y = g.op(
                    B::Reshape,
                    1,
                    &[y3, sh2],
                    Options::Reshape,
                    (out, &[ti, nh * hd], Ty::Float32),
                );
                sig.values.insert(out.clone(), y);
            }
            Op::Attention {
                layer,
                q,
                k,
                v,
                heads,
                kv_heads,
                head_dim,
                scale,
                out,
            } => {
                let (q, k, v) = (val(sig, q)?, val(sig, k)?, val(sig, v)?);
                let (nh, nkv, hd) = (*heads as i32, *kv_heads as i32, *head_dim as i32);
                let s = self.max_seq_len as i32;
                let grp = nh / nkv;
                let find = |kind: char| {
                    let name = kv_name(kind, *layer);
                    kv_in
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|&(_, t)| (name.clone(), t))
                        .ok_or_else(|| Error::Invalid(format!("TFLite export: no input {name}")))
                };
                let (kname, kc_in) = find('k')?;
                let (vname, vc_in) = find('v')?;
                let g = &mut *sig.g;
                let sh4 = g.const_i32("shape", &[4], &[1, ti, nkv, hd]);
                let update = |g: &mut Graph<'_>, x: T, cache: T, name: &str| {
                    let x4 = g.op(
                        B::Reshape,
                        1,
                        &[x, sh4],
                        Options::Reshape,
                        ("kv_new", &[1, ti, nkv, hd], Ty::Float32),
                    );
                    let c = g.op(
                        B::DynamicUpdateSlice,
                        1,
                        &[cache, x4, sig.start],
                        Options::DynamicUpdateSlice,
                        (name, &[1, s, nkv, hd], Ty::Float32),
                    );
                    g.rename(c, &format!("{name}_out"));
                    c
                };
                let kc = update(g, k, kc_in, &kname);
                let vc = update(g, v, vc_in, &vname);
                kv_out.push((kname, kc));
                kv_out.push((vname, vc));
                let sh3 = g.const_i32("shape", &[3], &[s, nkv, hd]);
                let perm = g.const_i32("perm_102", &[3], &[1, 0, 2]);
                let heads_first = |g: &mut Graph<'_>, c: T, n: &str| {
                    let c3 = g.op(
                        B::Reshape,
                        1,
                        &[c, sh3],
                        Options::Reshape,
                        (n, &[s, nkv, hd], Ty::Float32),
                    );
                    g.op(
                        B::Transpose,
                        1,
                        &[c3, perm],
                        Options::Transpose,
                        (n, &[nkv, s, hd], Ty::Float32),
                    )
                };
                let kt = heads_first(g, kc, "keys");
                let vt = heads_first(g, vc, "values");
                let shq = g.const_i32("shape", &[3], &[ti, nh, hd]);
                let q3 = g.op(
                    B::Reshape,
                    1,
                    &[q, shq],
                    Options::Reshape,
                    ("q_heads", &[ti, nh, hd], Ty::Float32),
                );
                let sc = g.const_f32("attn_scale", &[1], &[*scale]);
                let qs = g.op(
                    B::Mul,
                    1,
                    &[q3, sc],
                    Options::Mul,
                    ("q_scaled", &[ti, nh, hd], Ty::Float32),
                );
                let qt = g.op(
                    B::Transpose,
                    1,
                    &[qs, perm],
                    Options::Transpose,
                    ("q_t", &[nh, ti, hd], Ty::Float32),
                );
                // Query heads g·j .. g·(j+1) share KV head j: folding them into rows makes
                // grouped-query attention one batched matmul per KV head.
                let shg = g.const_i32("shape", &[3], &[nkv, grp * ti, hd]);
                let qg = g.op(
                    B::Reshape,
                    1,
                    &[qt, shg],
                    Options::Reshape,
                    ("q_groups", &[nkv, grp * ti, hd], Ty::Float32),
                );
                let scores = g.op(
                    B::BatchMatmul,
                    1,
                    &[qg, kt],
                    Options::BatchMatmul {
                        adj_x: false,
                        adj_y: true,
                        asymmetric_quantize_inputs: false,
                    },
                    ("scores", &[nkv, grp * ti, s], Ty::Float32),
                );
                let shs = g.const_i32("shape", &[3], &[nh, ti, s]);
                let s3 = g.op(
                    B::Reshape,
                    1,
                    &[scores, shs],
                    Options::Reshape,
                    ("scores_h", &[nh, ti, s], Ty::Float32),
                );
                let sm = g.op(
                    B::Add,
                    1,
                    &[s3, sig.mask],
                    Options::Add,
                    ("masked", &[nh, ti, s], Ty::Float32),
                );
                let p = g.op(
                    B::Softmax,
                    1,
                    &[sm],
                    Options::Softmax { beta: 1.0 },
                    ("probs", &[nh, ti, s], Ty::Float32),
                );
                let shp = g.const_i32("shape", &[3], &[nkv, grp * ti, s]);
                let pg = g.op(
                    B::Reshape,
                    1,
                    &[p, shp],
                    Options::Reshape,
                    ("probs_g", &[nkv, grp * ti, s], Ty::Float32),
                );
                let o = g.op(
                    B::BatchMatmul,
                    1,
                    &[pg, vt],
                    Options::BatchMatmul {
                        adj_x: false,
                        adj_y: false,
                        asymmetric_quantize_inputs: false,
                    },
                    ("attn", &[nkv, grp * ti, hd], Ty::Float32),
                );
                let sho = g.const_i32("shape", &[3], &[nh, ti, hd]);
                let o3 = g.op(
                    B::Reshape,
                    1,
                    &[o, sho],
                    Options::Reshape,
                    ("attn_h", &[nh, ti, hd], Ty::Float32),
                );
                let ot = g.op(
                    B::Transpose,
                    1,
                    &[o3, perm],
                    Options::Transpose,
                    ("attn_t", &[ti, nh, hd], Ty::Float32),
                );
                let sh2 = g.const_i32("shape", &[2], &[ti, nh * hd]);
                let y = g.op(
                    B::Reshape,
                    1,
                    &[ot, sh2],
                    Options::Reshape,
                    (out, &[ti, nh * hd], Ty::Float32),
                );
                sig.values.insert(out.clone(), y);
            }
            Op::SwiGlu { gate, up, out } => {
                let (gt, up) = (val(sig, gate)?, val(sig, up)?);
                let n = sig.g.shape(gt)[1];
                let g = &mut *sig.g;
                let sg = g.op(
                    B::Logistic,
                    1,
                    &[gt],
                    Options::None,
                    ("sigmoid", &[ti, n], Ty::Float32),
                );
                let silu = g.op(
                    B::Mul,
                    1,
                    &[gt, sg],
                    Options::Mul,
                    ("silu", &[ti, n], Ty::Float32),
                );
                let y = g.op(
                    B::Mul,
                    1,
                    &[silu, up],
                    Options::Mul,
                    (out, &[ti, n], Ty::Float32),
                );
                sig.values.insert(out.clone(), y);
            }
            Op::Add { a, b, out } => {
                let (a, b) = (val(sig, a)?, val(sig, b)?);
                let n = sig.g.shape(a)[1];
                let y = sig.g.op(
                    B::Add,
                    1,
                    &[a, b],
                    Options::Add,
                    (out, &[ti, n], Ty::Float32),
                );
                sig.values.insert(out.clone(), y);
            }
        }
        Ok(())
    }
}

/// The tensors every signature derives from `input_pos` (`[t]`, over a cache of `s`
/// positions): the cache write start `[0, input_pos[0], 0, 0]` for DYNAMIC_UPDATE_SLICE and
/// `future` `[t, s]`, true where a cache position lies after the new token's position.
pub(super) fn cache_positions(g: &mut Graph<'_>, pos: T, t: i32, s: i32) -> (T, T) {
    let b = g.const_i32("zero_1", &[1], &[0]);
    let sz = g.const_i32("one_1", &[1], &[1]);
    let pos0 = g.op(
        B::Slice,
        1,
        &[pos, b, sz],
        Options::Slice,
        ("pos0", &[1], Ty::Int32),
    );
    let z1 = g.const_i32("zero_1", &[1], &[0]);
    let z2 = g.const_i32("zero_2", &[2], &[0, 0]);
    let start = g.op(
        B::Concatenation,
        1,
        &[z1, pos0, z2],
        Options::Concatenation { axis: 0 },
        ("cache_write_start", &[4], Ty::Int32),
    );
    let range: Vec<i32> = (0..s).collect();
    let kv_pos = g.const_i32("cache_positions", &[1, s], &range);
    let pos_shape = g.const_i32("shape", &[2], &[t, 1]);
    let pos_col = g.op(
        B::Reshape,
        1,
        &[pos, pos_shape],
        Options::Reshape,
        ("pos_col", &[t, 1], Ty::Int32),
    );
    let future = g.op(
        B::Greater,
        1,
        &[kv_pos, pos_col],
        Options::Greater,
        ("future", &[t, s], Ty::Bool),
    );
    (start, future)
}

/// Full-width `[positions, head_dim]` cos and sin tables (each frequency repeated over both
/// halves, as transformers' `cat((freqs, freqs))`).
pub(super) fn full_tables(
    rotary: &crate::export::graph::Rotary,
    positions: usize,
    head_dim: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (c, s) = rotary.half_tables(positions);
    let half = head_dim / 2;
    let widen = |t: Vec<f32>| -> Vec<f32> {
        t.chunks(half)
            .flat_map(|r| r.iter().chain(r.iter()).copied().collect::<Vec<_>>())
            .collect()
    };
    (widen(c), widen(s))
}

/// `R` as FULLY_CONNECTED weights `[out, in]` such that `x·Rᵀ = rotate_half(x)`: output `i`
/// is `-x[i + half]` for the first half and `x[i - half]` for the second.
pub(super) fn rotate_half_matrix(hd: usize) -> Vec<f32> {
    let half = hd / 2;
    let mut m = vec![0f32; hd * hd];
    for i in 0..half {
        m[i * hd + i + half] = -1.0;
        m[(i + half) * hd + i] = 1.0;
    }
    m
}

/// Placement of a weight as `Placed`, for callers that compute encodings.
pub fn placed(buffer: u32, shape: &[usize], dtype: Ty, q: Option<Quantization>) -> Placed {
    Placed {
        buffer,
        shape: shape.iter().map(|&v| v as i32).collect(),
        dtype,
        quantization: q,
    }
}

/// The signature table entry for a lowered subgraph.
pub fn signature_def(key: &str, index: u32, l: &Lowered) -> SignatureDef {
    SignatureDef {
        key: key.to_string(),
        subgraph_index: index,
        inputs: l.inputs.clone(),
        outputs: l.outputs.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotate_half_matrix_negates_the_second_half_into_the_first() {
        let hd = 4;
        let m = rotate_half_matrix(hd);
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let y: Vec<f32> = (0..hd)
            .map(|i| (0..hd).map(|j| m[i * hd + j] * x[j]).sum())
            .collect();
        assert_eq!(y, [-3.0, -4.0, 1.0, 2.0]);
    }
}
