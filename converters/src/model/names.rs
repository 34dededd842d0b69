//! Canonical parameter names (Hugging Face's) and the shapes a config implies for them.

use super::spec::{Arch, ModelConfig};

/// The per-layer role of a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    InputNorm,
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    /// Phi-3's fused [Q; K; V].
    Qkv,
    O,
    PostNorm,
    Gate,
    Up,
    /// Phi-3's fused [gate; up].
    GateUp,
    Down,
}

impl Role {
    /// The HF module path under `model.layers.N.` without `.weight`/`.bias`.
    pub fn module(self) -> &'static str {
        match self {
            Role::InputNorm => "input_layernorm",
            Role::Q | Role::QBias => "self_attn.q_proj",
            Role::K | Role::KBias => "self_attn.k_proj",
            Role::V | Role::VBias => "self_attn.v_proj",
            Role::Qkv => "self_attn.qkv_proj",
            Role::O => "self_attn.o_proj",
            Role::PostNorm => "post_attention_layernorm",
            Role::Gate => "mlp.gate_proj",
            Role::Up => "mlp.up_proj",
            Role::GateUp => "mlp.gate_up_proj",
            Role::Down => "mlp.down_proj",
        }
    }

    pub fn is_bias(self) -> bool {
        matches!(self, Role::QBias | Role::KBias | Role::VBias)
    }

    pub fn hf_name(self, layer: usize) -> String {
        let suffix = if self.is_bias() { "bias" } else { "weight" };
        format!("model.layers.{layer}.{}.{suffix}", self.module())
    }
}

pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

/// The roles of one layer for an architecture.
pub fn layer_roles(arch: Arch) -> &'static [Role] {
    use Role::*;
    match arch {
        Arch::Llama => &[InputNorm, Q, K, V, O, PostNorm, Gate, Up, Down],
        Arch::Qwen2 => &[
            InputNorm, Q, QBias, K, KBias, V, VBias, O, PostNorm, Gate, Up, Down,
        ],
        Arch::Phi3 => &[InputNorm, Qkv, O, PostNorm, GateUp, Down],
    }
}

/// PyTorch shape of a role for a config.
pub fn role_shape(role: Role, c: &ModelConfig) -> Vec<usize> {
    let h = c.hidden_size;
    let q = c.n_embd_q();
    let kv = c.n_embd_kv();
    let ff = c.intermediate_size;
    match role {
        Role::InputNorm | Role::PostNorm => vec![h],
        Role::Q => vec![q, h],
        Role::K | Role::V => vec![kv, h],
        Role::QBias => vec![q],
        Role::KBias | Role::VBias => vec![kv],
        Role::Qkv => vec![q + 2 * kv, h],
        Role::O => vec![h, q],
        Role::Gate | Role::Up => vec![ff, h],
        Role::GateUp => vec![2 * ff, h],
        Role::Down => vec![h, ff],
    }
}

/// How many parameters [`expected_tensors`] lists, without building the list; `None` when the
/// count overflows. Importers compare it with the tensors the file holds before listing them,
/// so a corrupt layer count cannot make them allocate more than the file justifies.
pub fn expected_tensor_count(c: &ModelConfig) -> Option<usize> {
    let per_layer = layer_roles(c.arch).len();
    c.num_hidden_layers
        .checked_mul(per_layer)?
        .checked_add(2 + usize::from(!c.tie_word_embeddings))
}

/// Every parameter a model of this config has, with its shape, in a stable order. The LM head
/// is listed only when embeddings are not tied.
pub fn expected_tensors(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let mut v = vec![(EMBED.to_string(), vec![c.vocab_size, c.hidden_size])];
    for l in 0..c.num_hidden_layers {
        for &r in layer_roles(c.arch) {
            v.push((r.hf_name(l), role_shape(r, c)));
        }
    }
    v.push((FINAL_NORM.to_string(), vec![c.hidden_size]));
    if !c.tie_word_embeddings {
        v.push((LM_HEAD.to_string(), vec![c.vocab_size, c.hidden_size]));
    }
    v
}

/// Splits `model.layers.N.<module>.<weight|bias>` into (N, module path, suffix).
pub fn parse_layer_name(name: &str) -> Option<(usize, &str, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (n, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    Some((n.parse().ok()?, module, suffix))
}

/// The decoder-layer linear weights of `model`: the tensors W8A8 quantizes.
pub fn linear_weights(model: &super::Model) -> Vec<String> {
    let c = &model.config;
    (0..c.num_hidden_layers)
        .flat_map(|l| {
            layer_roles(c.arch)
                .iter()
                .filter(|r| !r.is_bias() && !matches!(r, Role::InputNorm | Role::PostNorm))
                .map(move |r| r.hf_name(l))
        })
        .collect()
}
