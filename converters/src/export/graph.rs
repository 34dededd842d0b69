//! The one decoder description that the ONNX and TFLite exporters lower from: a list of typed
//! ops over named values, with weights that are lazy references to model tensors.
//!
//! It owns: turning a [`Model`] into that description with every architecture difference
//! resolved (Phi-3's fused `qkv_proj` / `gate_up_proj` and Llama/Qwen2's separate projections
//! become the same packed QKV and gate-up linears; Qwen2's q/k/v biases become the packed
//! linear's bias; a tied LM head points at the embedding tensor), the rotary parameters
//! (inverse frequencies with linear or llama3 scaling already applied, exactly those of the
//! reference forward pass in `calib::forward`), and a consistency check of names and widths.
//! A lowering never looks at [`crate::model::Arch`].
//!
//! # API
//!
//! [`DecoderGraph::build`]`(&model)` returns a [`DecoderGraph`]:
//! - [`DecoderGraph::dims`]: hidden size, heads, KV heads, head size, layers, vocabulary, FFN
//!   width, context length.
//! - [`DecoderGraph::rotary`]: [`Rotary`] (`inv_freq`, `rotary_dim`); position `p` of pair `i`
//!   turns by `p · inv_freq[i]` in the `rotate_half` layout (element `i` pairs with
//!   `i + rotary_dim/2`).
//! - [`DecoderGraph::weights`]: every [`Weight`] once, by [`WeightId`] (its index). A weight is
//!   `[out, in]` (linears, PyTorch order), `[vocab, hidden]` (embedding) or `[n]` (norm gains,
//!   biases), made of one or more model tensors stacked along rows ([`Weight::parts`]); pull
//!   values with [`Weight::rows_f32`] a chunk at a time, never the whole model.
//! - [`DecoderGraph::ops`]: the [`Op`]s in execution order (every input is produced earlier or is
//!   the graph input [`INPUT_IDS`]); [`DecoderGraph::logits`] names the output value.
//!
//! Values are activations `[batch, seq, width]` (token ids: `[batch, seq]`), named by strings
//! such as `layers.3.attn.qkv`; [`DecoderGraph::widths`] gives every value's last dimension.
//! The KV cache is implicit in [`Op::Attention`]: layer `l`'s op appends this step's (rotated)
//! keys and values to what the cache holds for layer `l`, then attends causally over the whole
//! cache (a new token at position `past + i` sees cache positions `0..=past + i`, minus those
//! the attention mask zeroes). Rotation is explicit ([`Op::Rotary`] on Q and K just before the
//! attention); a lowering with a fused rotary-in-attention kernel finds the rotation's input with
//! [`DecoderGraph::unrotated`].
//!
//! One decoder layer, for every architecture:
//! ```text
//! xn   = RmsNorm(x, input_layernorm)
//! qkv  = Linear(xn, qkv_proj [+ bias])          // rows [Q; K; V]
//! q, k, v = Split(qkv, [q, kv, kv])
//! qr = Rotary(q, heads); kr = Rotary(k, kv_heads)
//! a    = Attention(layer, qr, kr, v)
//! o    = Linear(a, o_proj);  x = Add(x, o)
//! xn   = RmsNorm(x, post_attention_layernorm)
//! gu   = Linear(xn, gate_up_proj)                // rows [gate; up]
//! g, u = Split(gu, [ff, ff]);  h = SwiGlu(g, u)  // silu(g) * u
//! d    = Linear(h, down_proj);  x = Add(x, d)
//! ```
//! then `RmsNorm(x, model.norm)` and `Linear(.., lm_head)` to [`DecoderGraph::logits`].

use std::collections::HashMap;
use std::ops::Range;

use crate::calib::forward::rope_inv_freq;
use crate::error::{Error, Result};
use crate::model::names::{Role, EMBED, FINAL_NORM, LM_HEAD};
use crate::model::{Arch, Model, Tensor};

/// The graph input: token ids `[batch, seq]`.
pub const INPUT_IDS: &str = "input_ids";

/// Index of a weight in [`DecoderGraph::weights`].
pub type WeightId = usize;

/// Sizes a lowering needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dims {
    pub hidden: usize,
    pub intermediate: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// Longest sequence the model was trained for (`max_position_embeddings`).
    pub context_length: usize,
}

impl Dims {
    pub fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// Rotary position embedding parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Rotary {
    /// `rotary_dim / 2` inverse frequencies, any rope scaling already applied.
    pub inv_freq: Vec<f64>,
    /// Leading elements of each head that rotate (the head size unless partial rotary).
    pub rotary_dim: usize,
    /// `rope_theta`, for lowerings that record it.
    pub theta: f64,
}

impl Rotary {
    /// `(cos, sin)` tables `[positions, rotary_dim / 2]` row-major: the half-width caches
    /// onnxruntime's rotary kernels read and from which full-width tables are repeated.
    pub fn half_tables(&self, positions: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in &self.inv_freq {
                let (s, c) = (p as f64 * f).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        (cos, sin)
    }
}

/// What a weight is for; lowerings use it for naming and for per-kind precision choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightKind {
    Embedding,
    /// An RMSNorm gain.
    Norm,
    /// A linear layer's matrix `[out, in]`.
    Linear(LinearRole),
    /// A linear layer's bias `[out]`.
    Bias(LinearRole),
}

/// The linear layers of the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinearRole {
    /// Packed rows `[Q; K; V]`.
    Qkv,
    O,
    /// Packed rows `[gate; up]`.
    GateUp,
    Down,
    LmHead,
}

/// A parameter of the graph: model tensors stacked along rows, computed only when pulled.
#[derive(Debug, Clone)]
pub struct Weight {
    /// Unique graph-level name, e.g. `model.layers.0.attn.qkv_proj.weight`.
    pub name: String,
    pub kind: WeightKind,
    /// Layer index, for per-layer weights.
    pub layer: Option<usize>,
    /// `[rows, row_len]` for matrices, `[n]` for vectors.
    pub shape: Vec<usize>,
    /// The model tensors whose rows, in order, make this weight's rows.
    pub parts: Vec<Tensor>,
    /// For linears: the HF weight name under which calibration statistics of this linear's
    /// input are recorded (the first part; packed parts share one input).
    pub stats_key: Option<String>,
    /// For the LM head: it is the embedding table (tied), not a tensor of its own.
    pub tied: bool,
}

impl Weight {
    pub fn n_rows(&self) -> usize {
        if self.shape.len() == 1 {
            1
        } else {
            self.shape[0]
        }
    }

    pub fn row_len(&self) -> usize {
        *self.shape.last().expect("weights have a shape")
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rows `rows` in f32, row-major (a vector has one row: its parts end to end).
    pub fn rows_f32(&self, rows: Range<usize>) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(rows.len() * self.row_len());
        if self.shape.len() == 1 {
            if rows.start < rows.end {
                for p in &self.parts {
                    out.extend(p.to_f32()?);
                }
            }
            return Ok(out);
        }
        let mut base = 0;
        for p in &self.parts {
            let n = p.n_rows();
            let (lo, hi) = (rows.start.max(base), rows.end.min(base + n));
            if lo < hi {
                out.extend(p.rows_f32(lo - base..hi - base)?);
            }
            base += n;
        }
        Ok(out)
    }

    /// Every value in f32 (for small weights, or a lowering that must transpose).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.rows_f32(0..self.n_rows())
    }

    /// Rows per streamed chunk (about [`crate::model::tensor::CHUNK_VALUES`] values).
    pub fn rows_per_chunk(&self) -> usize {
        (crate::model::tensor::CHUNK_VALUES / self.row_len().max(1)).max(1)
    }
}

/// One computation step. Every op reads values produced by earlier ops (or [`INPUT_IDS`]) and
/// defines its outputs exactly once.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `out[b, s, :] = table[ids[b, s], :]`.
    Embed {
        table: WeightId,
        ids: String,
        out: String,
    },
    /// `out = x / sqrt(mean(x², last axis) + eps) · gain` (computed in f32).
    RmsNorm {
        x: String,
        gain: WeightId,
        eps: f64,
        out: String,
    },
    /// `out = x · Wᵀ (+ bias)` with `W` `[out, in]`.
    Linear {
        x: String,
        weight: WeightId,
        bias: Option<WeightId>,
        out: String,
    },
    /// Splits the last axis into consecutive pieces of `sizes`.
    Split {
        x: String,
        sizes: Vec<usize>,
        outs: Vec<String>,
    },
    /// Rotates `x` (`heads` heads of `head_dim`) by [`DecoderGraph::rotary`] at the absolute
    /// positions of the new tokens (`past .. past + seq`).
    Rotary {
        x: String,
        heads: usize,
        out: String,
    },
    /// Grouped-query causal attention over this layer's KV cache. `q` `[b, s, heads·hd]`, `k`
    /// and `v` `[b, s, kv_heads·hd]` (already rotated); query head `h` reads KV head
    /// `h / (heads / kv_heads)`; scores are scaled by `scale`. `out` is `[b, s, heads·hd]`.
    Attention {
        layer: usize,
        q: String,
        k: String,
        v: String,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        scale: f32,
        out: String,
    },
    /// `out = silu(gate) · up`.
    SwiGlu {
        gate: String,
        up: String,
        out: String,
    },
    /// `out = a + b` (the residual connections).
    Add { a: String, b: String, out: String },
}

impl Op {
    /// The values this op reads.
    pub fn inputs(&self) -> Vec<&str> {
        match self {
            Op::Embed { ids, .. } => vec![ids],
            Op::RmsNorm { x, .. } | Op::Linear { x, .. } | Op::Split { x, .. } => vec![x],
            Op::Rotary { x, .. } => vec![x],
            Op::Attention { q, k, v, .. } => vec![q, k, v],
            Op::SwiGlu { gate, up, .. } => vec![gate, up],
            Op::Add { a, b, .. } => vec![a, b],
        }
    }

    /// The values this op defines.
    pub fn outputs(&self) -> Vec<&str> {
        match self {
            Op::Split { outs, .. } => outs.iter().map(String::as_str).collect(),
            Op::Embed { out, .. }
            | Op::RmsNorm { out, .. }
            | Op::Linear { out, .. }
            | Op::Rotary { out, .. }
            | Op::Attention { out, .. }
            | Op::SwiGlu { out, .. }
            | Op::Add { out, .. } => vec![out],
        }
    }
}

/// A decoder as ops over named values; see the module documentation.
#[derive(Debug, Clone)]
pub struct DecoderGraph {
    pub dims: Dims,
    pub rotary: Rotary,
    pub rms_norm_eps: f64,
    pub weights: Vec<Weight>,
    pub ops: Vec<Op>,
    /// The value holding logits `[batch, seq, vocab]`.
    pub logits: String,
    /// The embedding and LM head share one table.
    pub tied_embeddings: bool,
}

/// Collects weights while the ops are laid out.
struct Builder<'a> {
    model: &'a Model,
    weights: Vec<Weight>,
}

impl Builder<'_> {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        self.model
            .tensor(name)
            .cloned()
            .ok_or_else(|| Error::format(&self.model.source, name, "missing"))
    }

    /// Adds a weight made of `names` stacked along rows; checks each part's shape.
    fn add(
        &mut self,
        name: String,
        kind: WeightKind,
        layer: Option<usize>,
        parts: &[(String, Vec<usize>)],
    ) -> Result<WeightId> {
        let mut tensors = Vec::with_capacity(parts.len());
        for (n, want) in parts {
            let t = self.tensor(n)?;
            if &t.shape != want {
                return Err(Error::mismatch(
                    &self.model.source,
                    n,
                    format!("shape {:?}, the config implies {:?}", t.shape, want),
                ));
            }
            tensors.push(t);
        }
        let shape = match parts[0].1.len() {
            1 => vec![parts.iter().map(|p| p.1[0]).sum()],
            _ => vec![parts.iter().map(|p| p.1[0]).sum(), parts[0].1[1]],
        };
        let stats_key = matches!(kind, WeightKind::Linear(_)).then(|| parts[0].0.clone());
        self.weights.push(Weight {
            name,
            kind,
            layer,
            shape,
            parts: tensors,
            stats_key,
            tied: false,
        });
        Ok(self.weights.len() - 1)
    }
}

impl DecoderGraph {
    /// Describes `model`'s decoder. Fails, naming the field, on what the graph cannot express
    /// (rope scaling other than linear/llama3, partial rotary, a missing or misshapen tensor).
    pub fn build(model: &Model) -> Result<DecoderGraph> {
        let c = &model.config;
        let src = &model.source;
        let dims = Dims {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            n_layers: c.num_hidden_layers,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            vocab: c.vocab_size,
            context_length: c.max_position_embeddings,
        };
        let inv_freq = rope_inv_freq(c, src)?;
        let rotary = Rotary {
            rotary_dim: inv_freq.len() * 2,
            inv_freq,
            theta: c.rope_theta,
        };
        let (h, q, kv, ff) = (
            dims.hidden,
            dims.q_width(),
            dims.kv_width(),
            dims.intermediate,
        );
        let mut b = Builder {
            model,
            weights: Vec::new(),
        };
        let mut ops = Vec::new();
        let embed = b.add(
            EMBED.to_string(),
            WeightKind::Embedding,
            None,
            &[(EMBED.to_string(), vec![dims.vocab, h])],
        )?;
        ops.push(Op::Embed {
            table: embed,
            ids: INPUT_IDS.to_string(),
            out: "embed".into(),
        });
        let mut x = "embed".to_string();
        for l in 0..dims.n_layers {
            let v = |s: &str| format!("layers.{l}.{s}");
            let w = |s: &str| format!("model.layers.{l}.{s}");
            let hf = |r: Role| r.hf_name(l);
            let norm1 = b.add(
                hf(Role::InputNorm),
                WeightKind::Norm,
                Some(l),
                &[(hf(Role::InputNorm), vec![h])],
            )?;
            let (qkv_parts, gate_up_parts) = match c.arch {
                Arch::Phi3 => (
                    vec![(hf(Role::Qkv), vec![q + 2 * kv, h])],
                    vec![(hf(Role::GateUp), vec![2 * ff, h])],
                ),
                Arch::Llama | Arch::Qwen2 => (
                    vec![
                        (hf(Role::Q), vec![q, h]),
                        (hf(Role::K), vec![kv, h]),
                        (hf(Role::V), vec![kv, h]),
                    ],
                    vec![(hf(Role::Gate), vec![ff, h]), (hf(Role::Up), vec![ff, h])],
                ),
            };
            let qkv = b.add(
                w("attn.qkv_proj.weight"),
                WeightKind::Linear(LinearRole::Qkv),
                Some(l),
                &qkv_parts,
            )?;
            // Any projection may carry a bias (Qwen2 always; Llama with attention_bias). The
            // packed bias needs all three or none.
            let bias_names: Vec<String> = qkv_parts
                .iter()
                .map(|(n, _)| format!("{}.bias", n.trim_end_matches(".weight")))
                .collect();
            let present = bias_names
                .iter()
                .filter(|n| model.tensor(n).is_some())
                .count();
            let qkv_bias = if present == 0 {
                None
            } else if present < bias_names.len() {
                return Err(Error::unsupported(
                    src,
                    &bias_names[0],
                    "only some of the q/k/v projections have a bias",
                ));
            } else {
                let parts: Vec<(String, Vec<usize>)> = bias_names
                    .iter()
                    .zip(&qkv_parts)
                    .map(|(n, (_, s))| (n.clone(), vec![s[0]]))
                    .collect();
                Some(b.add(
                    w("attn.qkv_proj.bias"),
                    WeightKind::Bias(LinearRole::Qkv),
                    Some(l),
                    &parts,
                )?)
            };
            for extra in [Role::O, Role::GateUp, Role::Gate, Role::Up, Role::Down] {
                let n = format!("model.layers.{l}.{}.bias", extra.module());
                if model.tensor(&n).is_some() {
                    return Err(Error::unsupported(src, n, "a bias on this projection"));
                }
            }
            ops.push(Op::RmsNorm {
                x: x.clone(),
                gain: norm1,
                eps: c.rms_norm_eps,
                out: v("attn_norm"),
            });
            ops.push(Op::Linear {
                x: v("attn_norm"),
                weight: qkv,
                bias: qkv_bias,
                out: v("attn.qkv"),
            });
            ops.push(Op::Split {
                x: v("attn.qkv"),
                sizes: vec![q, kv, kv],
                outs: vec![v("attn.q"), v("attn.k"), v("attn.v")],
            });
            ops.push(Op::Rotary {
                x: v("attn.q"),
                heads: dims.n_heads,
                out: v("attn.q_rot"),
            });
            ops.push(Op::Rotary {
                x: v("attn.k"),
                heads: dims.n_kv_heads,
                out: v("attn.k_rot"),
            });
            ops.push(Op::Attention {
                layer: l,
                q: v("attn.q_rot"),
                k: v("attn.k_rot"),
                v: v("attn.v"),
                heads: dims.n_heads,
                kv_heads: dims.n_kv_heads,
                head_dim: dims.head_dim,
                scale: 1.0 / (dims.head_dim as f32).sqrt(),
                out: v("attn.out"),
            });
            let o = b.add(
                w("attn.o_proj.weight"),
                WeightKind::Linear(LinearRole::O),
                Some(l),
                &[(hf(Role::O), vec![h, q])],
            )?;
            ops.push(Op::Linear {
                x: v("attn.out"),
                weight: o,
                bias: None,
                out: v("attn.o"),
            });
            ops.push(Op::Add {
                a: x.clone(),
                b: v("attn.o"),
                out: v("attn_residual"),
            });
            let norm2 = b.add(
                hf(Role::PostNorm),
                WeightKind::Norm,
                Some(l),
                &[(hf(Role::PostNorm), vec![h])],
            )?;
            ops.push(Op::RmsNorm {
                x: v("attn_residual"),
                gain: norm2,
                eps: c.rms_norm_eps,
                out: v("mlp_norm"),
            });
            let gate_up = b.add(
                w("mlp.gate_up_proj.weight"),
                WeightKind::Linear(LinearRole::GateUp),
                Some(l),
                &gate_up_parts,
            )?;
            ops.push(Op::Linear {
                x: v("mlp_norm"),
                weight: gate_up,
                bias: None,
                out: v("mlp.gate_up"),
            });
            ops.push(Op::Split {
                x: v("mlp.gate_up"),
                sizes: vec![ff, ff],
                outs: vec![v("mlp.gate"), v("mlp.up")],
            });
            ops.push(Op::SwiGlu {
                gate: v("mlp.gate"),
                up: v("mlp.up"),
                out: v("mlp.act"),
            });
            let down = b.add(
                w("mlp.down_proj.weight"),
                WeightKind::Linear(LinearRole::Down),
                Some(l),
                &[(hf(Role::Down), vec![h, ff])],
            )?;
            ops.push(Op::Linear {
                x: v("mlp.act"),
                weight: down,
                bias: None,
                out: v("mlp.down"),
            });
            ops.push(Op::Add {
                a: v("attn_residual"),
                b: v("mlp.down"),
                out: v("out"),
            });
            x = v("out");
        }
        let final_norm = b.add(
            FINAL_NORM.to_string(),
            WeightKind::Norm,
            None,
            &[(FINAL_NORM.to_string(), vec![h])],
        )?;
        ops.push(Op::RmsNorm {
            x,
            gain: final_norm,
            eps: c.rms_norm_eps,
            out: "final_norm".into(),
        });
        // The LM head is lm_head.weight when the checkpoint has one (even if the config says
        // tied), else the embedding, as the reference forward pass multiplies.
        let (head_src, tied) = if model.tensor(LM_HEAD).is_some() {
            (LM_HEAD, false)
        } else if c.tie_word_embeddings {
            (EMBED, true)
        } else {
            return Err(Error::format(
                src,
                LM_HEAD,
                "missing and tie_word_embeddings is false",
            ));
        };
        let lm_head = b.add(
            LM_HEAD.to_string(),
            WeightKind::Linear(LinearRole::LmHead),
            None,
            &[(head_src.to_string(), vec![dims.vocab, h])],
        )?;
        b.weights[lm_head].tied = tied;
        ops.push(Op::Linear {
            x: "final_norm".into(),
            weight: lm_head,
            bias: None,
            out: "logits".into(),
        });
        let g = DecoderGraph {
            dims,
            rotary,
            rms_norm_eps: c.rms_norm_eps,
            weights: b.weights,
            ops,
            logits: "logits".into(),
            tied_embeddings: tied,
        };
        g.check()?;
        Ok(g)
    }

    /// The op that defines `value`.
    pub fn producer(&self, value: &str) -> Option<&Op> {
        self.ops.iter().find(|o| o.outputs().contains(&value))
    }

    /// For a rotated value (the output of [`Op::Rotary`]), the value before rotation.
    pub fn unrotated(&self, value: &str) -> Option<&str> {
        match self.producer(value)? {
            Op::Rotary { x, .. } => Some(x),
            _ => None,
        }
    }

    /// The [`Op::Attention`] ops, one per layer, in layer order.
    pub fn attentions(&self) -> impl Iterator<Item = &Op> {
        self.ops
            .iter()
            .filter(|o| matches!(o, Op::Attention { .. }))
    }

    /// The last-axis width of every value (token ids: 1).
    pub fn widths(&self) -> Result<HashMap<String, usize>> {
        let bad = |msg: String| Error::Invalid(format!("decoder graph: {msg}"));
        let mut w: HashMap<String, usize> = HashMap::new();
        w.insert(INPUT_IDS.to_string(), 1);
        for op in &self.ops {
            for i in op.inputs() {
                if !w.contains_key(i) {
                    return Err(bad(format!("{op:?} reads `{i}` before it is defined")));
                }
            }
            let get = |n: &str| w[n];
            let outs: Vec<usize> = match op {
                Op::Embed { table, .. } => vec![self.weights[*table].row_len()],
                Op::RmsNorm { x, gain, .. } => {
                    if self.weights[*gain].numel() != get(x) {
                        return Err(bad(format!("norm gain does not fit `{x}`")));
                    }
                    vec![get(x)]
                }
                Op::Linear {
                    x, weight, bias, ..
                } => {
                    let wt = &self.weights[*weight];
                    if wt.row_len() != get(x) {
                        return Err(bad(format!(
                            "{} takes {} inputs, `{x}` has {}",
                            wt.name,
                            wt.row_len(),
                            get(x)
                        )));
                    }
                    if let Some(bi) = bias {
                        if self.weights[*bi].numel() != wt.n_rows() {
                            return Err(bad(format!("bias of {} has the wrong size", wt.name)));
                        }
                    }
                    vec![wt.n_rows()]
                }
                Op::Split { x, sizes, outs } => {
                    if sizes.iter().sum::<usize>() != get(x) || sizes.len() != outs.len() {
                        return Err(bad(format!("split of `{x}` does not add up")));
                    }
                    sizes.clone()
                }
                Op::Rotary { x, heads, .. } => {
                    if heads * self.dims.head_dim != get(x) {
                        return Err(bad(format!("`{x}` is not {heads} heads")));
                    }
                    vec![get(x)]
                }
                Op::Attention {
                    q,
                    k,
                    v,
                    heads,
                    kv_heads,
                    head_dim,
                    ..
                } => {
                    if get(q) != heads * head_dim
                        || get(k) != kv_heads * head_dim
                        || get(v) != kv_heads * head_dim
                        || heads % kv_heads != 0
                    {
                        return Err(bad(format!("attention over `{q}` has mismatched heads")));
                    }
                    vec![heads * head_dim]
                }
                Op::SwiGlu { gate, up, .. } | Op::Add { a: gate, b: up, .. } => {
                    if get(gate) != get(up) {
                        return Err(bad(format!("`{gate}` and `{up}` differ in width")));
                    }
                    vec![get(gate)]
                }
            };
            for (o, width) in op.outputs().into_iter().zip(outs) {
                if w.insert(o.to_string(), width).is_some() {
                    return Err(bad(format!("`{o}` is defined twice")));
                }
            }
        }
        Ok(w)
    }

    /// Checks that every value is defined once before it is read, widths fit, weight names are
    /// unique, and the logits are `vocab` wide.
    pub fn check(&self) -> Result<()> {
        let w = self.widths()?;
        if w.get(&self.logits) != Some(&self.dims.vocab) {
            return Err(Error::Invalid(format!(
                "decoder graph: `{}` is not {} wide",
                self.logits, self.dims.vocab
            )));
        }
        let mut names = std::collections::HashSet::new();
        for wt in &self.weights {
            if !names.insert(&wt.name) {
                return Err(Error::Invalid(format!(
                    "decoder graph: weight {} appears twice",
                    wt.name
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::names::expected_tensors;
    use crate::model::{ModelConfig, Source, SourceFormat, TokenizerFiles};
    use serde_json::json;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    /// A model of `class` whose tensor values are their flat index plus a per-tensor offset,
    /// so that stacked rows can be traced back to their source.
    fn toy(class: &str, tied: bool, extra: &[(&str, usize)]) -> Model {
        let cfg = json!({"architectures": [class], "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 10, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": tied});
        let config = ModelConfig::from_hf_json(&cfg, Path::new("toy/config.json")).unwrap();
        let mut shapes = expected_tensors(&config);
        for (n, len) in extra {
            shapes.push((n.to_string(), vec![*len]));
        }
        let tensors = shapes
            .into_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let n: usize = shape.iter().product();
                let vals = (0..n).map(|j| (i * 1000 + j) as f32).collect();
                Tensor {
                    name,
                    shape,
                    source: Source::Owned(Arc::new(vals)),
                }
            })
            .collect();
        Model {
            config,
            tensors,
            tokenizer: TokenizerFiles::default(),
            source: PathBuf::from("toy"),
            source_format: SourceFormat::HfFolder,
            name: "toy".into(),
            card: Vec::new(),
        }
    }

    fn linear(g: &DecoderGraph, name: &str) -> Weight {
        g.weights.iter().find(|w| w.name == name).unwrap().clone()
    }

    #[test]
    fn llama_qwen2_and_phi3_give_the_same_op_sequence_with_consistent_widths() {
        let qwen_biases: Vec<(String, usize)> = (0..2)
            .flat_map(|l| {
                [("q", 16), ("k", 8), ("v", 8)]
                    .map(|(p, n)| (format!("model.layers.{l}.self_attn.{p}_proj.bias"), n))
            })
            .collect();
        let qb: Vec<(&str, usize)> = qwen_biases.iter().map(|(n, s)| (n.as_str(), *s)).collect();
        let graphs = [
            DecoderGraph::build(&toy("LlamaForCausalLM", true, &[])).unwrap(),
            DecoderGraph::build(&toy("Qwen2ForCausalLM", false, &qb)).unwrap(),
            DecoderGraph::build(&toy("Phi3ForCausalLM", false, &[])).unwrap(),
        ];
        let kinds = |g: &DecoderGraph| -> Vec<std::mem::Discriminant<Op>> {
            g.ops.iter().map(std::mem::discriminant).collect()
        };
        for g in &graphs {
            g.check().unwrap();
            assert_eq!(kinds(g), kinds(&graphs[0]));
            let w = g.widths().unwrap();
            assert_eq!(w["layers.1.attn.qkv"], 16 + 2 * 8);
            assert_eq!(w["layers.0.mlp.gate_up"], 48);
            assert_eq!(w["logits"], 10);
            assert_eq!(g.attentions().count(), 2);
            assert_eq!(g.unrotated("layers.0.attn.k_rot"), Some("layers.0.attn.k"));
            assert_eq!(g.rotary.rotary_dim, 4);
            // 12 ops per layer, embed, final norm, lm_head.
            assert_eq!(g.ops.len(), 2 * 14 + 3);
        }
        // Qwen2's biases become the packed bias; Llama and Phi-3 have none.
        let with_bias = |g: &DecoderGraph| {
            g.ops
                .iter()
                .filter(|o| matches!(o, Op::Linear { bias: Some(_), .. }))
                .count()
        };
        assert_eq!(with_bias(&graphs[0]), 0);
        assert_eq!(with_bias(&graphs[1]), 2);
        assert_eq!(with_bias(&graphs[2]), 0);
        assert!(graphs[0].tied_embeddings && !graphs[1].tied_embeddings);
        let head = linear(&graphs[0], LM_HEAD);
        assert!(head.tied);
        assert_eq!(head.parts[0].name, EMBED);
    }

    #[test]
    fn packed_weights_stack_source_rows_in_q_k_v_order() {
        let m = toy("LlamaForCausalLM", true, &[]);
        let g = DecoderGraph::build(&m).unwrap();
        let qkv = linear(&g, "model.layers.1.attn.qkv_proj.weight");
        assert_eq!(qkv.shape, vec![32, 16]);
        assert_eq!(
            qkv.stats_key.as_deref(),
            Some("model.layers.1.self_attn.q_proj.weight")
        );
        // Rows 15..17 cross from Q into K; a chunk across the boundary is stitched.
        let got = qkv.rows_f32(15..17).unwrap();
        let q = m.tensor("model.layers.1.self_attn.q_proj.weight").unwrap();
        let k = m.tensor("model.layers.1.self_attn.k_proj.weight").unwrap();
        let mut want = q.rows_f32(15..16).unwrap();
        want.extend(k.rows_f32(0..1).unwrap());
        assert_eq!(got, want);
        assert_eq!(qkv.to_f32().unwrap().len(), 32 * 16);
    }

    #[test]
    fn a_packed_bias_holds_the_q_k_and_v_biases_end_to_end() {
        let qwen_biases: Vec<(String, usize)> = [("q", 16), ("k", 8), ("v", 8)]
            .map(|(p, n)| (format!("model.layers.0.self_attn.{p}_proj.bias"), n))
            .into_iter()
            .chain(
                [("q", 16), ("k", 8), ("v", 8)]
                    .map(|(p, n)| (format!("model.layers.1.self_attn.{p}_proj.bias"), n)),
            )
            .collect();
        let qb: Vec<(&str, usize)> = qwen_biases.iter().map(|(n, s)| (n.as_str(), *s)).collect();
        let m = toy("Qwen2ForCausalLM", false, &qb);
        let g = DecoderGraph::build(&m).unwrap();
        let bias = linear(&g, "model.layers.0.attn.qkv_proj.bias");
        assert_eq!(bias.shape, vec![32]);
        assert_eq!(bias.n_rows(), 1);
        let mut want = Vec::new();
        for p in ["q", "k", "v"] {
            let t = m
                .tensor(&format!("model.layers.0.self_attn.{p}_proj.bias"))
                .unwrap();
            want.extend(t.to_f32().unwrap());
        }
        assert_eq!(bias.to_f32().unwrap(), want);
    }

    #[test]
    fn unsupported_rope_scaling_is_refused_naming_the_field() {
        let mut m = toy("LlamaForCausalLM", true, &[]);
        m.config.rope_scaling = Some(json!({"rope_type": "yarn", "factor": 4.0}));
        let e = DecoderGraph::build(&m).unwrap_err().to_string();
        assert!(e.contains("rope_scaling") && e.contains("yarn"), "{e}");
    }

    #[test]
    fn a_misshapen_tensor_is_refused_naming_it() {
        let mut m = toy("Phi3ForCausalLM", false, &[]);
        m.tensor_mut("model.layers.0.mlp.down_proj.weight")
            .unwrap()
            .shape = vec![16, 23];
        let e = DecoderGraph::build(&m).unwrap_err().to_string();
        assert!(e.contains("model.layers.0.mlp.down_proj.weight"), "{e}");
    }

    #[test]
    fn half_tables_hold_cos_and_sin_of_position_times_frequency() {
        let r = Rotary {
            inv_freq: vec![1.0, 0.5],
            rotary_dim: 4,
            theta: 1.0,
        };
        let (c, s) = r.half_tables(3);
        assert_eq!(c.len(), 6);
        assert!((c[5] - 1.0f32.cos()).abs() < 1e-7 && (s[4] - 2.0f32.sin()).abs() < 1e-7);
    }
}
