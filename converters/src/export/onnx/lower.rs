//! Lowers a [`DecoderGraph`] to ONNX nodes for one operator set and precision.
//!
//! `contrib` follows onnxruntime-genai's model builder (shared/facts/onnx.md §1.2–1.4): inputs
//! `input_ids`, `attention_mask`, `past_key_values.N.key/value`; the mask becomes GQA's
//! `seqlens_k` / `total_sequence_length`; RMSNorm and residual adds become
//! SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization; the packed QKV projection
//! feeds GroupQueryAttention, which rotates Q and K itself (`do_rotary`) from half-width
//! cos/sin caches; int4 linears are MatMulNBits.
//!
//! `standard` uses default-domain opset-21 ops only, with Optimum's inputs (`position_ids`
//! added): RMSNorm spelled out in f32, rotary from full-width tables gathered at
//! `position_ids`, grouped-query attention as batched MatMuls over the concatenated cache with a
//! causal-and-padding mask, int4 as blocked DequantizeLinear (int4 type) before MatMul.
//!
//! Both: linears are MatMul on `[in, out]` weights (fp32/fp16), DynamicQuantizeLinear +
//! MatMulInteger on int8 per-channel weights (int8), or QDQ with a static per-tensor int8
//! activation scale (int8-static; the LM head stays float, as SmoothQuant W8A8 keeps it).

use std::collections::{HashMap, HashSet};

use super::builder::{
    attr_f, attr_i, attr_ints, value_info, Builder, Dim, Encoding, InitSpec, Payload,
};
use super::pack::{f16_bytes, f32_bytes};
use super::proto::dtype;
use super::{OpSet, Precision};
use crate::error::{Error, Result};
use crate::export::graph::{DecoderGraph, LinearRole, Op, WeightId, WeightKind, INPUT_IDS};

/// The com.microsoft operator domain.
pub const MS: &str = "com.microsoft";

/// MatMulNBits `accuracy_level` 4: activations quantized to int8 per block inside the kernel,
/// the model builder's CPU default (shared/facts/onnx.md §1.5).
const CPU_ACCURACY_LEVEL: i64 = 4;

/// What a lowering needs besides the graph.
pub struct Lowering<'a> {
    pub ops: OpSet,
    pub precision: Precision,
    pub block_size: usize,
    pub symmetric: bool,
    /// int8-static: the activation scale (absmax / 127) of each quantized linear's input.
    pub act_scales: &'a HashMap<WeightId, f32>,
    /// Positions served: rows of the rotary tables.
    pub context: usize,
}

/// Graph input / output names (genai's and Optimum's, which agree on these).
pub fn past_key(l: usize) -> String {
    format!("past_key_values.{l}.key")
}
pub fn past_value(l: usize) -> String {
    format!("past_key_values.{l}.value")
}
pub fn present_key(l: usize) -> String {
    format!("present.{l}.key")
}
pub fn present_value(l: usize) -> String {
    format!("present.{l}.value")
}

struct Lowerer<'a> {
    g: &'a DecoderGraph,
    o: &'a Lowering<'a>,
    b: Builder,
    /// Element type of activations, KV cache and float weights.
    io: i32,
    /// Values already in `[batch, heads, seq, head_dim]` layout (rotated Q/K, standard set).
    bhsd: HashSet<String>,
    /// How many ops read each value.
    uses: HashMap<String, usize>,
    /// Standard: `[B,1,S,T]` bool mask of allowed keys; cos/sin `[B,1,S,hd]`.
    allowed: String,
    cos: String,
    sin: String,
    /// Contrib: GQA's seqlens_k and total_sequence_length; half-width caches.
    seqlens_k: String,
    total_len: String,
}

pub fn lower(g: &DecoderGraph, o: &Lowering<'_>) -> Result<Builder> {
    let io = if o.precision == Precision::Fp16 {
        dtype::FLOAT16
    } else {
        dtype::FLOAT
    };
    let mut uses: HashMap<String, usize> = HashMap::new();
    for op in &g.ops {
        for i in op.inputs() {
            *uses.entry(i.to_string()).or_default() += 1;
        }
    }
    let mut l = Lowerer {
        g,
        o,
        b: Builder::default(),
        io,
        bhsd: HashSet::new(),
        uses,
        allowed: String::new(),
        cos: String::new(),
        sin: String::new(),
        seqlens_k: String::new(),
        total_len: String::new(),
    };
    l.interface();
    match o.ops {
        OpSet::Contrib => l.contrib_prelude(),
        OpSet::Standard => l.standard_prelude(),
    }
    let fused = l.fused_by_attention()?;
    let mut i = 0;
    while i < g.ops.len() {
        let op = &g.ops[i];
        if fused.contains(&i) {
            i += 1;
            continue;
        }
        // Contrib: a residual add followed by the norm of its sum is one
        // SkipSimplifiedLayerNormalization.
        if let (
            OpSet::Contrib,
            Op::Add { a, b, out },
            Some(Op::RmsNorm {
                x,
                gain,
                eps,
                out: nout,
            }),
        ) = (o.ops, op, g.ops.get(i + 1))
        {
            if x == out {
                let gamma = l.float_weight(*gain, false)?;
                let sum_used = l.uses.get(out).copied().unwrap_or(0) > 1;
                let outs: Vec<&str> = if sum_used {
                    vec![nout, "", "", out]
                } else {
                    vec![nout]
                };
                l.b.node_to(
                    "SkipSimplifiedLayerNormalization",
                    MS,
                    &format!("/{nout}/SkipLayerNorm"),
                    &[a, b, &gamma],
                    &outs,
                    vec![attr_f("epsilon", *eps as f32)],
                );
                i += 2;
                continue;
            }
        }
        l.op(op)?;
        i += 1;
    }
    Ok(l.b)
}

impl Lowerer<'_> {
    fn contrib(&self) -> bool {
        self.o.ops == OpSet::Contrib
    }

    /// Graph inputs and outputs.
    fn interface(&mut self) {
        let d = &self.g.dims;
        let (mask_len, past_len, total_len) = if self.contrib() {
            (
                "total_sequence_length",
                "past_sequence_length",
                "total_sequence_length",
            )
        } else {
            (
                "past_sequence_length + sequence_length",
                "past_sequence_length",
                "past_sequence_length + sequence_length",
            )
        };
        let contrib = self.contrib();
        let b = &mut self.b;
        b.inputs.push(value_info(
            INPUT_IDS,
            dtype::INT64,
            &[Dim::Sym("batch_size"), Dim::Sym("sequence_length")],
        ));
        b.inputs.push(value_info(
            "attention_mask",
            dtype::INT64,
            &[Dim::Sym("batch_size"), Dim::Sym(mask_len)],
        ));
        if !contrib {
            b.inputs.push(value_info(
                "position_ids",
                dtype::INT64,
                &[Dim::Sym("batch_size"), Dim::Sym("sequence_length")],
            ));
        }
        let kv = |len| {
            [
                Dim::Sym("batch_size"),
                Dim::Fixed(d.n_kv_heads),
                Dim::Sym(len),
                Dim::Fixed(d.head_dim),
            ]
        };
        for l in 0..d.n_layers {
            b.inputs
                .push(value_info(&past_key(l), self.io, &kv(past_len)));
            b.inputs
                .push(value_info(&past_value(l), self.io, &kv(past_len)));
        }
        b.outputs.push(value_info(
            &self.g.logits,
            self.io,
            &[
                Dim::Sym("batch_size"),
                Dim::Sym("sequence_length"),
                Dim::Fixed(d.vocab),
            ],
        ));
        for l in 0..d.n_layers {
            b.outputs
                .push(value_info(&present_key(l), self.io, &kv(total_len)));
            b.outputs
                .push(value_info(&present_value(l), self.io, &kv(total_len)));
        }
    }

    /// Float bytes in the I/O type.
    fn io_bytes(&self, v: &[f32]) -> Vec<u8> {
        if self.io == dtype::FLOAT16 {
            f16_bytes(v)
        } else {
            f32_bytes(v)
        }
    }

    /// The rotary tables as initializers: half width for GQA, full width (the halves repeated,
    /// as transformers' `cat((freqs, freqs))`) for the standard lowering.
    fn rotary_tables(&mut self, full: bool) -> (String, String) {
        let r = &self.g.rotary;
        let n = self.o.context;
        let (cos, sin) = r.half_tables(n);
        let half = r.inv_freq.len();
        let widen = |t: Vec<f32>| -> Vec<f32> {
            if !full {
                return t;
            }
            t.chunks_exact(half)
                .flat_map(|row| row.iter().chain(row).copied())
                .collect()
        };
        let width = if full { 2 * half } else { half };
        let (cos, sin) = (widen(cos), widen(sin));
        for (name, vals) in [("cos_cache", &cos), ("sin_cache", &sin)] {
            let bytes = self.io_bytes(vals);
            self.b.job(
                Payload::Bytes(bytes),
                vec![InitSpec {
                    name: name.into(),
                    dtype: self.io,
                    dims: vec![n as i64, width as i64],
                }],
            );
        }
        ("cos_cache".into(), "sin_cache".into())
    }

    fn contrib_prelude(&mut self) {
        let p = "/model/attn_mask_reformat/attn_mask_subgraph";
        let axes = self.b.i64s(&[1]);
        let rs = self.b.op(
            "ReduceSum",
            &format!("{p}/ReduceSum"),
            &["attention_mask", &axes],
            vec![attr_i("keepdims", 0)],
        );
        let one = self.b.i64_scalar(1);
        let sub = self.b.op("Sub", &format!("{p}/Sub"), &[&rs, &one], vec![]);
        self.seqlens_k = self.b.op(
            "Cast",
            &format!("{p}/Sub/Cast"),
            &[&sub],
            vec![attr_i("to", dtype::INT32 as i64)],
        );
        let sh = self
            .b
            .op("Shape", &format!("{p}/Shape"), &["attention_mask"], vec![]);
        let t = self.b.op(
            "Gather",
            &format!("{p}/Gather"),
            &[&sh, &one],
            vec![attr_i("axis", 0)],
        );
        self.total_len = self.b.op(
            "Cast",
            &format!("{p}/Gather/Cast"),
            &[&t],
            vec![attr_i("to", dtype::INT32 as i64)],
        );
        let (c, s) = self.rotary_tables(false);
        self.cos = c;
        self.sin = s;
    }

    fn standard_prelude(&mut self) {
        let p = "/model/attn_mask";
        let zero = self.b.i64_scalar(0);
        let one = self.b.i64_scalar(1);
        let msh = self.b.op(
            "Shape",
            &format!("{p}/Shape_mask"),
            &["attention_mask"],
            vec![],
        );
        let total = self.b.op(
            "Gather",
            &format!("{p}/total"),
            &[&msh, &one],
            vec![attr_i("axis", 0)],
        );
        let ish = self
            .b
            .op("Shape", &format!("{p}/Shape_ids"), &[INPUT_IDS], vec![]);
        let seq = self.b.op(
            "Gather",
            &format!("{p}/seq"),
            &[&ish, &one],
            vec![attr_i("axis", 0)],
        );
        let past = self
            .b
            .op("Sub", &format!("{p}/past"), &[&total, &seq], vec![]);
        let kidx = self.b.op(
            "Range",
            &format!("{p}/key_index"),
            &[&zero, &total, &one],
            vec![],
        );
        let qidx = self.b.op(
            "Range",
            &format!("{p}/query_index"),
            &[&past, &total, &one],
            vec![],
        );
        let ax1 = self.b.i64s(&[1]);
        let qcol = self.b.op(
            "Unsqueeze",
            &format!("{p}/query_column"),
            &[&qidx, &ax1],
            vec![],
        );
        // A new token at cache slot past + i sees slots 0..=past + i.
        let causal = self.b.op(
            "LessOrEqual",
            &format!("{p}/causal"),
            &[&kidx, &qcol],
            vec![],
        );
        let pad = self.b.op(
            "Cast",
            &format!("{p}/padding"),
            &["attention_mask"],
            vec![attr_i("to", dtype::BOOL as i64)],
        );
        let ax12 = self.b.i64s(&[1, 2]);
        let pad4 = self.b.op(
            "Unsqueeze",
            &format!("{p}/padding_4d"),
            &[&pad, &ax12],
            vec![],
        );
        self.allowed = self
            .b
            .op("And", &format!("{p}/allowed"), &[&causal, &pad4], vec![]);
        let (c, s) = self.rotary_tables(true);
        let pr = "/model/rotary";
        let cg = self.b.op(
            "Gather",
            &format!("{pr}/cos"),
            &[&c, "position_ids"],
            vec![attr_i("axis", 0)],
        );
        let sg = self.b.op(
            "Gather",
            &format!("{pr}/sin"),
            &[&s, "position_ids"],
            vec![attr_i("axis", 0)],
        );
        self.cos = self
            .b
            .op("Unsqueeze", &format!("{pr}/cos_4d"), &[&cg, &ax1], vec![]);
        self.sin = self
            .b
            .op("Unsqueeze", &format!("{pr}/sin_4d"), &[&sg, &ax1], vec![]);
    }

    /// Contrib: indices of the Split and Rotary ops that GroupQueryAttention absorbs (it takes
    /// the packed QKV and rotates itself).
    fn fused_by_attention(&self) -> Result<HashSet<usize>> {
        let mut fused = HashSet::new();
        if !self.contrib() {
            return Ok(fused);
        }
        for op in self.g.attentions() {
            let Op::Attention { q, k, v, .. } = op else {
                unreachable!()
            };
            let (Some(q0), Some(k0)) = (self.g.unrotated(q), self.g.unrotated(k)) else {
                return Err(Error::Invalid(format!(
                    "ONNX contrib lowering: attention on `{q}` is not fed by rotary embeddings"
                )));
            };
            let split = self.g.ops.iter().position(|o| {
                matches!(o, Op::Split { outs, .. } if outs.len() == 3 && outs[0] == q0 && outs[1] == k0 && outs[2] == *v)
            });
            let Some(split) = split else {
                return Err(Error::Invalid(format!(
                    "ONNX contrib lowering: attention on `{q}` does not read one packed QKV projection"
                )));
            };
            fused.insert(split);
            for (i, o) in self.g.ops.iter().enumerate() {
                if matches!(o, Op::Rotary { out, .. } if out == q || out == k) {
                    fused.insert(i);
                }
            }
        }
        Ok(fused)
    }

    /// The packed QKV value feeding a fused attention.
    fn packed_qkv(&self, q: &str) -> String {
        let q0 = self.g.unrotated(q).expect("checked in fused_by_attention");
        self.g
            .ops
            .iter()
            .find_map(|o| match o {
                Op::Split { x, outs, .. } if outs[0] == q0 => Some(x.clone()),
                _ => None,
            })
            .expect("checked in fused_by_attention")
    }

    /// Registers a float weight as an initializer (`[out, in]`, or `[in, out]` transposed).
    fn float_weight(&mut self, id: WeightId, transpose: bool) -> Result<String> {
        let w = &self.g.weights[id];
        let name = if transpose {
            format!("{}.MatMul.weight", w.name.trim_end_matches(".weight"))
        } else {
            w.name.clone()
        };
        let mut dims: Vec<i64> = w.shape.iter().map(|&d| d as i64).collect();
        if transpose {
            dims.reverse();
        }
        self.b.job(
            Payload::Weight {
                id,
                enc: Encoding::Float {
                    f16: self.io == dtype::FLOAT16,
                    transpose,
                },
            },
            vec![InitSpec {
                name: name.clone(),
                dtype: self.io,
                dims,
            }],
        );
        Ok(name)
    }

    fn op(&mut self, op: &Op) -> Result<()> {
        match op {
            Op::Embed { table, ids, out } => {
                let t = self.float_weight(*table, false)?;
                self.b.node_to(
                    "Gather",
                    "",
                    &format!("/{out}/Gather"),
                    &[&t, ids],
                    &[out],
                    vec![attr_i("axis", 0)],
                );
            }
            Op::RmsNorm { x, gain, eps, out } => {
                let gamma = self.float_weight(*gain, false)?;
                if self.contrib() {
                    self.b.node_to(
                        "SimplifiedLayerNormalization",
                        "",
                        &format!("/{out}/LayerNorm"),
                        &[x, &gamma],
                        &[out],
                        vec![
                            attr_i("axis", -1),
                            attr_f("epsilon", *eps as f32),
                            attr_i("stash_type", 1),
                        ],
                    );
                } else {
                    self.rms_norm_standard(x, &gamma, *eps, out);
                }
            }
            Op::Linear {
                x,
                weight,
                bias,
                out,
            } => self.linear(x, *weight, *bias, out)?,
            Op::Split { x, sizes, outs } => {
                let s: Vec<i64> = sizes.iter().map(|&v| v as i64).collect();
                let sc = self.b.i64s(&s);
                let o: Vec<&str> = outs.iter().map(String::as_str).collect();
                self.b.node_to(
                    "Split",
                    "",
                    &format!("/{}/Split", outs[0]),
                    &[x, &sc],
                    &o,
                    vec![attr_i("axis", -1)],
                );
            }
            Op::Rotary { x, heads, out } => self.rotary_standard(x, *heads, out)?,
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
                if self.contrib() {
                    let qkv = self.packed_qkv(q);
                    let (pk, pv, ck, cv) = (
                        past_key(*layer),
                        past_value(*layer),
                        present_key(*layer),
                        present_value(*layer),
                    );
                    let (cos, sin, sl, tl) = (
                        self.cos.clone(),
                        self.sin.clone(),
                        self.seqlens_k.clone(),
                        self.total_len.clone(),
                    );
                    self.b.node_to(
                        "GroupQueryAttention",
                        MS,
                        &format!("/model/layers.{layer}/attn/GroupQueryAttention"),
                        &[&qkv, "", "", &pk, &pv, &sl, &tl, &cos, &sin],
                        &[out, &ck, &cv],
                        vec![
                            attr_i("num_heads", *heads as i64),
                            attr_i("kv_num_heads", *kv_heads as i64),
                            attr_f("scale", *scale),
                            attr_i("do_rotary", 1),
                            attr_i("rotary_interleaved", 0),
                            attr_i("local_window_size", -1),
                            attr_f("softcap", 0.0),
                        ],
                    );
                } else {
                    self.attention_standard(
                        *layer, q, k, v, *heads, *kv_heads, *head_dim, *scale, out,
                    );
                }
            }
            Op::SwiGlu { gate, up, out } => {
                let sig = self
                    .b
                    .op("Sigmoid", &format!("/{out}/Sigmoid"), &[gate], vec![]);
                let act = self
                    .b
                    .op("Mul", &format!("/{out}/SiLU"), &[gate, &sig], vec![]);
                self.b.node_to(
                    "Mul",
                    "",
                    &format!("/{out}/Mul"),
                    &[&act, up],
                    &[out],
                    vec![],
                );
            }
            Op::Add { a, b, out } => {
                self.b
                    .node_to("Add", "", &format!("/{out}/Add"), &[a, b], &[out], vec![]);
            }
        }
        Ok(())
    }

    /// `x / sqrt(mean(x²) + eps) · γ`, normalised in f32 (transformers' LlamaRMSNorm casts up
    /// to f32, normalises, casts back, then multiplies by the weight).
    fn rms_norm_standard(&mut self, x: &str, gamma: &str, eps: f64, out: &str) {
        let p = format!("/{out}");
        let half = self.io == dtype::FLOAT16;
        let xf = if half {
            self.b.op(
                "Cast",
                &format!("{p}/Cast_up"),
                &[x],
                vec![attr_i("to", dtype::FLOAT as i64)],
            )
        } else {
            x.to_string()
        };
        let sq = self
            .b
            .op("Mul", &format!("{p}/Square"), &[&xf, &xf], vec![]);
        let axes = self.b.i64s(&[-1]);
        let ms = self.b.op(
            "ReduceMean",
            &format!("{p}/ReduceMean"),
            &[&sq, &axes],
            vec![attr_i("keepdims", 1)],
        );
        let e = self.b.float_scalar(dtype::FLOAT, eps as f32);
        let ve = self.b.op("Add", &format!("{p}/AddEps"), &[&ms, &e], vec![]);
        let r = self.b.op("Sqrt", &format!("{p}/Sqrt"), &[&ve], vec![]);
        let inv = self
            .b
            .op("Reciprocal", &format!("{p}/Reciprocal"), &[&r], vec![]);
        let mut y = self
            .b
            .op("Mul", &format!("{p}/Normalize"), &[&xf, &inv], vec![]);
        if half {
            y = self.b.op(
                "Cast",
                &format!("{p}/Cast_down"),
                &[&y],
                vec![attr_i("to", dtype::FLOAT16 as i64)],
            );
        }
        self.b.node_to(
            "Mul",
            "",
            &format!("{p}/MulGamma"),
            &[&y, gamma],
            &[out],
            vec![],
        );
    }

    /// `[B, S, heads·hd]` → `[B, heads, S, hd]`.
    fn heads_first(&mut self, x: &str, heads: usize, name: &str) -> String {
        let hd = self.g.dims.head_dim as i64;
        let shape = self.b.i64s(&[0, 0, heads as i64, hd]);
        let r = self
            .b
            .op("Reshape", &format!("{name}/Reshape"), &[x, &shape], vec![]);
        self.b.op(
            "Transpose",
            &format!("{name}/Transpose"),
            &[&r],
            vec![attr_ints("perm", &[0, 2, 1, 3])],
        )
    }

    /// `x·cos + rotate_half(x)·sin` per head; the result stays in `[B, heads, S, hd]`.
    fn rotary_standard(&mut self, x: &str, heads: usize, out: &str) -> Result<()> {
        let hd = self.g.dims.head_dim;
        if self.g.rotary.rotary_dim != hd {
            return Err(Error::Invalid(format!(
                "ONNX standard lowering: partial rotary ({} of {hd} dims) is not supported",
                self.g.rotary.rotary_dim
            )));
        }
        let p = format!("/{out}");
        let xt = self.heads_first(x, heads, &p);
        let halves = self.b.i64s(&[(hd / 2) as i64, (hd / 2) as i64]);
        let (x1, x2) = (format!("{p}/Split/output_0"), format!("{p}/Split/output_1"));
        self.b.node_to(
            "Split",
            "",
            &format!("{p}/Split"),
            &[&xt, &halves],
            &[&x1, &x2],
            vec![attr_i("axis", -1)],
        );
        let neg = self.b.op("Neg", &format!("{p}/Neg"), &[&x2], vec![]);
        let rot = self.b.op(
            "Concat",
            &format!("{p}/Concat"),
            &[&neg, &x1],
            vec![attr_i("axis", -1)],
        );
        let (cos, sin) = (self.cos.clone(), self.sin.clone());
        let a = self
            .b
            .op("Mul", &format!("{p}/MulCos"), &[&xt, &cos], vec![]);
        let bb = self
            .b
            .op("Mul", &format!("{p}/MulSin"), &[&rot, &sin], vec![]);
        self.b
            .node_to("Add", "", &format!("{p}/Add"), &[&a, &bb], &[out], vec![]);
        self.bhsd.insert(out.to_string());
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_standard(
        &mut self,
        layer: usize,
        q: &str,
        k: &str,
        v: &str,
        heads: usize,
        kv_heads: usize,
        hd: usize,
        scale: f32,
        out: &str,
    ) {
        let p = format!("/model/layers.{layer}/attn");
        let (h, kvh, hd) = (heads as i64, kv_heads as i64, hd as i64);
        let q = if self.bhsd.contains(q) {
            q.to_string()
        } else {
            self.heads_first(q, heads, &format!("{p}/q"))
        };
        let k = if self.bhsd.contains(k) {
            k.to_string()
        } else {
            self.heads_first(k, kv_heads, &format!("{p}/k"))
        };
        let v = self.heads_first(v, kv_heads, &format!("{p}/v"));
        let (pk, pv, ck, cv) = (
            past_key(layer),
            past_value(layer),
            present_key(layer),
            present_value(layer),
        );
        self.b.node_to(
            "Concat",
            "",
            &format!("{p}/present_key"),
            &[&pk, &k],
            &[&ck],
            vec![attr_i("axis", 2)],
        );
        self.b.node_to(
            "Concat",
            "",
            &format!("{p}/present_value"),
            &[&pv, &v],
            &[&cv],
            vec![attr_i("axis", 2)],
        );
        // Query heads g·j .. g·(j+1) share KV head j: folding them into the row axis makes one
        // batched MatMul per KV head, with no repeated keys or values.
        let grouped = self.b.i64s(&[0, kvh, -1, hd]);
        let qg = self.b.op(
            "Reshape",
            &format!("{p}/q_grouped"),
            &[&q, &grouped],
            vec![],
        );
        let kt = self.b.op(
            "Transpose",
            &format!("{p}/k_transposed"),
            &[&ck],
            vec![attr_ints("perm", &[0, 1, 3, 2])],
        );
        let s = self
            .b
            .op("MatMul", &format!("{p}/scores"), &[&qg, &kt], vec![]);
        let sc = self.b.float_scalar(self.io, scale);
        let s = self.b.op("Mul", &format!("{p}/scaled"), &[&s, &sc], vec![]);
        let per_head = self.b.i64s(&[0, h, -1, 0]);
        let s = self.b.op(
            "Reshape",
            &format!("{p}/scores_per_head"),
            &[&s, &per_head],
            vec![],
        );
        let lowest = self.b.float_scalar(
            self.io,
            if self.io == dtype::FLOAT16 {
                -65504.0
            } else {
                f32::MIN
            },
        );
        let allowed = self.allowed.clone();
        let s = self.b.op(
            "Where",
            &format!("{p}/masked"),
            &[&allowed, &s, &lowest],
            vec![],
        );
        let pr = self.b.op(
            "Softmax",
            &format!("{p}/Softmax"),
            &[&s],
            vec![attr_i("axis", -1)],
        );
        let kv_group = self.b.i64s(&[0, kvh, -1, 0]);
        let pg = self.b.op(
            "Reshape",
            &format!("{p}/probs_grouped"),
            &[&pr, &kv_group],
            vec![],
        );
        let o = self
            .b
            .op("MatMul", &format!("{p}/context"), &[&pg, &cv], vec![]);
        let heads_shape = self.b.i64s(&[0, h, -1, hd]);
        let o = self.b.op(
            "Reshape",
            &format!("{p}/context_per_head"),
            &[&o, &heads_shape],
            vec![],
        );
        let o = self.b.op(
            "Transpose",
            &format!("{p}/context_bshd"),
            &[&o],
            vec![attr_ints("perm", &[0, 2, 1, 3])],
        );
        let flat = self.b.i64s(&[0, 0, h * hd]);
        self.b.node_to(
            "Reshape",
            "",
            &format!("{p}/context_flat"),
            &[&o, &flat],
            &[out],
            vec![],
        );
    }

    fn linear(&mut self, x: &str, id: WeightId, bias: Option<WeightId>, out: &str) -> Result<()> {
        let w = &self.g.weights[id];
        let (n, k) = (w.shape[0], w.shape[1]);
        let base = w.name.trim_end_matches(".weight").to_string();
        let is_head = w.kind == WeightKind::Linear(LinearRole::LmHead);
        let p = format!("/{out}");
        let mm_out = if bias.is_some() {
            format!("{p}/MatMul/output_0")
        } else {
            out.to_string()
        };
        match self.o.precision {
            Precision::Fp32 | Precision::Fp16 => {
                let wt = if w.tied {
                    // A tied head multiplies by the embedding table the Gather already reads:
                    // one copy in the file, transposed in the graph (onnxruntime folds it).
                    let table = self
                        .g
                        .weights
                        .iter()
                        .find(|t| t.kind == WeightKind::Embedding)
                        .expect("a graph has an embedding")
                        .name
                        .clone();
                    self.b.op(
                        "Transpose",
                        &format!("{p}/TiedTranspose"),
                        &[&table],
                        vec![attr_ints("perm", &[1, 0])],
                    )
                } else {
                    self.float_weight(id, true)?
                };
                self.b.node_to(
                    "MatMul",
                    "",
                    &format!("{p}/MatMul"),
                    &[x, &wt],
                    &[&mm_out],
                    vec![],
                );
            }
            Precision::Int8Static if is_head => {
                let wt = self.float_weight(id, true)?;
                self.b.node_to(
                    "MatMul",
                    "",
                    &format!("{p}/MatMul"),
                    &[x, &wt],
                    &[&mm_out],
                    vec![],
                );
            }
            Precision::Int4 if self.contrib() => {
                let (bits, block) = (4u32, self.o.block_size);
                let kb = k.div_ceil(block);
                let (qn, sn, zn) = (
                    format!("{base}.MatMul.weight_Q4"),
                    format!("{base}.MatMul.weight_scales"),
                    format!("{base}.MatMul.weight_zero_points"),
                );
                let mut outs = vec![
                    InitSpec {
                        name: qn.clone(),
                        dtype: dtype::UINT8,
                        dims: vec![n as i64, kb as i64, (block * bits as usize / 8) as i64],
                    },
                    InitSpec {
                        name: sn.clone(),
                        dtype: dtype::FLOAT,
                        dims: vec![n as i64, kb as i64],
                    },
                ];
                let mut ins = vec![x.to_string(), qn, sn];
                if !self.o.symmetric {
                    outs.push(InitSpec {
                        name: zn.clone(),
                        dtype: dtype::UINT8,
                        dims: vec![n as i64, (kb * bits as usize).div_ceil(8) as i64],
                    });
                    ins.push(zn);
                }
                self.b.job(
                    Payload::Weight {
                        id,
                        enc: Encoding::NBits {
                            bits,
                            block,
                            symmetric: self.o.symmetric,
                        },
                    },
                    outs,
                );
                let ins: Vec<&str> = ins.iter().map(String::as_str).collect();
                self.b.node_to(
                    "MatMulNBits",
                    MS,
                    &format!("{p}/MatMulNBits"),
                    &ins,
                    &[&mm_out],
                    vec![
                        attr_i("K", k as i64),
                        attr_i("N", n as i64),
                        attr_i("bits", bits as i64),
                        attr_i("block_size", block as i64),
                        attr_i("accuracy_level", CPU_ACCURACY_LEVEL),
                    ],
                );
            }
            Precision::Int4 => {
                let (qn, sn, zn) = (
                    format!("{base}.MatMul.weight_int4"),
                    format!("{base}.MatMul.weight_scale"),
                    format!("{base}.MatMul.weight_zero_point"),
                );
                let block = self.o.block_size;
                let kb = k.div_ceil(block) as i64;
                let (qt, symmetric) = (
                    if self.o.symmetric {
                        dtype::INT4
                    } else {
                        dtype::UINT4
                    },
                    self.o.symmetric,
                );
                let mut outs = vec![
                    InitSpec {
                        name: qn.clone(),
                        dtype: qt,
                        dims: vec![k as i64, n as i64],
                    },
                    InitSpec {
                        name: sn.clone(),
                        dtype: dtype::FLOAT,
                        dims: vec![kb, n as i64],
                    },
                ];
                let mut ins = vec![qn, sn];
                if !symmetric {
                    outs.push(InitSpec {
                        name: zn.clone(),
                        dtype: dtype::UINT4,
                        dims: vec![kb, n as i64],
                    });
                    ins.push(zn);
                }
                self.b.job(
                    Payload::Weight {
                        id,
                        enc: Encoding::Int4Transposed { block, symmetric },
                    },
                    outs,
                );
                let ins: Vec<&str> = ins.iter().map(String::as_str).collect();
                let wd = format!("{p}/DequantizeLinear/output_0");
                self.b.node_to(
                    "DequantizeLinear",
                    "",
                    &format!("{p}/DequantizeLinear"),
                    &ins,
                    &[&wd],
                    vec![attr_i("axis", 0), attr_i("block_size", block as i64)],
                );
                self.b.node_to(
                    "MatMul",
                    "",
                    &format!("{p}/MatMul"),
                    &[x, &wd],
                    &[&mm_out],
                    vec![],
                );
            }
            Precision::Int8 => {
                let (qn, sn) = self.int8_weight(id, &base, n, k);
                let (xq, xs, xz) = (
                    format!("{p}/DynamicQuantizeLinear/output_0"),
                    format!("{p}/DynamicQuantizeLinear/output_1"),
                    format!("{p}/DynamicQuantizeLinear/output_2"),
                );
                self.b.node_to(
                    "DynamicQuantizeLinear",
                    "",
                    &format!("{p}/DynamicQuantizeLinear"),
                    &[x],
                    &[&xq, &xs, &xz],
                    vec![],
                );
                let scale = self
                    .b
                    .op("Mul", &format!("{p}/ScaleProduct"), &[&xs, &sn], vec![]);
                let mi = self.b.op(
                    "MatMulInteger",
                    &format!("{p}/MatMulInteger"),
                    &[&xq, &qn, &xz],
                    vec![],
                );
                let mf = self.b.op(
                    "Cast",
                    &format!("{p}/Cast"),
                    &[&mi],
                    vec![attr_i("to", dtype::FLOAT as i64)],
                );
                self.b.node_to(
                    "Mul",
                    "",
                    &format!("{p}/Mul"),
                    &[&mf, &scale],
                    &[&mm_out],
                    vec![],
                );
            }
            Precision::Int8Static => {
                let sx = *self.o.act_scales.get(&id).ok_or_else(|| {
                    Error::Invalid(format!(
                        "int8-static: no activation scale for {}",
                        self.g.weights[id].name
                    ))
                })?;
                let (qn, sn) = self.int8_weight(id, &base, n, k);
                let zn = format!("{base}.MatMul.weight_zero_point");
                self.b.job(
                    Payload::Bytes(vec![0u8; n]),
                    vec![InitSpec {
                        name: zn.clone(),
                        dtype: dtype::INT8,
                        dims: vec![n as i64],
                    }],
                );
                let s = self.b.float_scalar(dtype::FLOAT, sx);
                let z = self.b.constant(dtype::INT8, &[], vec![0]);
                let xq = self.b.op(
                    "QuantizeLinear",
                    &format!("{p}/input/QuantizeLinear"),
                    &[x, &s, &z],
                    vec![],
                );
                let xd = self.b.op(
                    "DequantizeLinear",
                    &format!("{p}/input/DequantizeLinear"),
                    &[&xq, &s, &z],
                    vec![],
                );
                let wd = self.b.op(
                    "DequantizeLinear",
                    &format!("{p}/weight/DequantizeLinear"),
                    &[&qn, &sn, &zn],
                    vec![attr_i("axis", 1)],
                );
                self.b.node_to(
                    "MatMul",
                    "",
                    &format!("{p}/MatMul"),
                    &[&xd, &wd],
                    &[&mm_out],
                    vec![],
                );
            }
        }
        if let Some(bi) = bias {
            let bn = self.float_weight(bi, false)?;
            self.b.node_to(
                "Add",
                "",
                &format!("{p}/Add"),
                &[&mm_out, &bn],
                &[out],
                vec![],
            );
        }
        Ok(())
    }

    /// int8 per-output-channel weight `[in, out]` and its scales `[out]`.
    fn int8_weight(&mut self, id: WeightId, base: &str, n: usize, k: usize) -> (String, String) {
        let (qn, sn) = (
            format!("{base}.MatMul.weight_quantized"),
            format!("{base}.MatMul.weight_scale"),
        );
        self.b.job(
            Payload::Weight {
                id,
                enc: Encoding::Int8Transposed,
            },
            vec![
                InitSpec {
                    name: qn.clone(),
                    dtype: dtype::INT8,
                    dims: vec![k as i64, n as i64],
                },
                InitSpec {
                    name: sn.clone(),
                    dtype: dtype::FLOAT,
                    dims: vec![n as i64],
                },
            ],
        );
        (qn, sn)
    }
}
