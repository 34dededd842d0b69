//! Quantization presets and the per-tensor type plan of llama-quantize
//! (`llama_tensor_get_type` in src/llama-quant.cpp; shared/facts/gguf.md §3.7).
//!
//! The plan works on GGUF tensor names and ne0, walks tensors in llama.cpp's loader order
//! ([`gguf_tensor_order`]), and reproduces the counters (`i_attention_wv`) that make the choice
//! depend on position.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use super::types::GgmlType;

/// A `--quant` choice: an llama.cpp file type (`LLAMA_FTYPE_*`).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2_K,
    Q3_K_S,
    Q3_K_M,
    Q3_K_L,
    Q4_K_S,
    Q4_K_M,
    Q5_K_S,
    Q5_K_M,
    Q6_K,
}

impl Preset {
    pub const ALL: [Preset; 17] = [
        Preset::F32,
        Preset::F16,
        Preset::BF16,
        Preset::Q8_0,
        Preset::Q4_0,
        Preset::Q4_1,
        Preset::Q5_0,
        Preset::Q5_1,
        Preset::Q2_K,
        Preset::Q3_K_S,
        Preset::Q3_K_M,
        Preset::Q3_K_L,
        Preset::Q4_K_S,
        Preset::Q4_K_M,
        Preset::Q5_K_S,
        Preset::Q5_K_M,
        Preset::Q6_K,
    ];

    pub fn name(self) -> &'static str {
        use Preset::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            BF16 => "BF16",
            Q8_0 => "Q8_0",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q2_K => "Q2_K",
            Q3_K_S => "Q3_K_S",
            Q3_K_M => "Q3_K_M",
            Q3_K_L => "Q3_K_L",
            Q4_K_S => "Q4_K_S",
            Q4_K_M => "Q4_K_M",
            Q5_K_S => "Q5_K_S",
            Q5_K_M => "Q5_K_M",
            Q6_K => "Q6_K",
        }
    }

    /// `general.file_type` (LLAMA_FTYPE id, facts §1.7).
    pub fn file_type(self) -> u32 {
        use Preset::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q8_0 => 7,
            Q5_0 => 8,
            Q5_1 => 9,
            Q2_K => 10,
            Q3_K_S => 11,
            Q3_K_M => 12,
            Q3_K_L => 13,
            Q4_K_S => 14,
            Q4_K_M => 15,
            Q5_K_S => 16,
            Q5_K_M => 17,
            Q6_K => 18,
            BF16 => 32,
        }
    }

    /// The type most tensors get (`llama_ftype_get_default_type`).
    pub fn base_type(self) -> GgmlType {
        use Preset::*;
        match self {
            F32 => GgmlType::F32,
            F16 => GgmlType::F16,
            BF16 => GgmlType::BF16,
            Q8_0 => GgmlType::Q8_0,
            Q4_0 => GgmlType::Q4_0,
            Q4_1 => GgmlType::Q4_1,
            Q5_0 => GgmlType::Q5_0,
            Q5_1 => GgmlType::Q5_1,
            Q2_K => GgmlType::Q2_K,
            Q3_K_S | Q3_K_M | Q3_K_L => GgmlType::Q3_K,
            Q4_K_S | Q4_K_M => GgmlType::Q4_K,
            Q5_K_S | Q5_K_M => GgmlType::Q5_K,
            Q6_K => GgmlType::Q6_K,
        }
    }

    /// The preset that stores every quantizable tensor as `ty`, if llama.cpp has one.
    pub fn for_type(ty: GgmlType) -> Option<Preset> {
        Preset::ALL
            .iter()
            .copied()
            .find(|p| p.base_type() == ty && !p.name().ends_with("_S") && !p.name().ends_with("_L"))
            .or(match ty {
                GgmlType::Q3_K => Some(Preset::Q3_K_M),
                GgmlType::Q4_K => Some(Preset::Q4_K_M),
                GgmlType::Q5_K => Some(Preset::Q5_K_M),
                _ => None,
            })
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let up = s.to_ascii_uppercase();
        Preset::ALL
            .iter()
            .copied()
            .find(|p| p.name() == up)
            .ok_or_else(|| {
                let names: Vec<_> = Preset::ALL.iter().map(|p| p.name()).collect();
                format!("unknown quantization `{s}` (one of {})", names.join(", "))
            })
    }
}

/// How a plan is made.
#[derive(Debug, Clone, Copy)]
pub struct PlanOptions {
    pub preset: Preset,
    /// Every quantizable tensor gets the base type, no mixture (`llama-quantize --pure`).
    pub pure: bool,
    /// An importance matrix is given (changes some legacy-type choices, as in llama.cpp).
    pub has_imatrix: bool,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// n_head / n_head_kv.
    pub n_gqa: usize,
}

/// One tensor as the planner sees it.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    pub name: &'a str,
    /// GGUF dims, ne0 first.
    pub ne: &'a [usize],
}

/// The type chosen for one tensor, and whether a shape fallback happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub ty: GgmlType,
    /// The type the mixture wanted before a shape forced a fallback (llama.cpp's warning).
    pub wanted: Option<GgmlType>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Category {
    Output,
    TokenEmbd,
    AttnQkv,
    AttnV,
    AttnK,
    AttnQ,
    AttnOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Other,
}

fn category(name: &str) -> Category {
    if name == "output.weight" {
        Category::Output
    } else if name == "token_embd.weight" {
        Category::TokenEmbd
    } else if name.contains("attn_qkv.weight") {
        Category::AttnQkv
    } else if name.contains("attn_v.weight") {
        Category::AttnV
    } else if name.contains("attn_k.weight") {
        Category::AttnK
    } else if name.contains("attn_q.weight") {
        Category::AttnQ
    } else if name.contains("attn_output.weight") {
        Category::AttnOutput
    } else if name.contains("ffn_up") {
        Category::FfnUp
    } else if name.contains("ffn_gate") {
        Category::FfnGate
    } else if name.contains("ffn_down") {
        Category::FfnDown
    } else {
        Category::Other
    }
}

/// Whether llama-quantize would quantize this tensor at all (`tensor_allows_quantization`).
pub fn allows_quantization(name: &str, n_dims: usize) -> bool {
    n_dims >= 2
        && name.ends_with("weight")
        && !name.contains("_norm.weight")
        && !name.contains("ffn_gate_inp.weight")
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// llama.cpp's loader order (`weight_name_comparer`): tensors outside blocks first, then blocks
/// by number, names sorted within each.
pub fn gguf_tensor_order(a: &str, b: &str) -> Ordering {
    let la = layer_of(a).map(|l| l as i64).unwrap_or(-1);
    let lb = layer_of(b).map(|l| l as i64).unwrap_or(-1);
    la.cmp(&lb).then_with(|| a.cmp(b))
}

fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64).rem_euclid(3) == 2
}

/// `tensor_type_fallback`: a type whose block does not divide ne0 is replaced.
fn fallback(ty: GgmlType, ne0: usize) -> GgmlType {
    if ne0 % ty.block_size() == 0 {
        return ty;
    }
    let next = match ty {
        GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::Q4_0,
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if ne0 % next.block_size() == 0 {
        next
    } else {
        GgmlType::F16
    }
}

/// Chooses a type for every tensor. `tensors` must be in [`gguf_tensor_order`]. Tensors that
/// are not quantized get `keep` (F32 for norms and other 1-D tensors).
pub fn plan(tensors: &[PlanInput<'_>], opts: &PlanOptions) -> Vec<Choice> {
    use GgmlType as T;
    use Preset as P;
    let ftype = opts.preset;
    let base = ftype.base_type();
    let tied = !tensors.iter().any(|t| t.name == "output.weight");
    let n_attention_wv = tensors
        .iter()
        .filter(|t| matches!(category(t.name), Category::AttnV | Category::AttnQkv))
        .count();
    let n_layer = opts.n_layer;
    let mut i_attention_wv = 0usize;
    let mut i_ffn_down = 0usize;

    tensors
        .iter()
        .map(|t| {
            let ne0 = t.ne.first().copied().unwrap_or(1);
            if !allows_quantization(t.name, t.ne.len()) {
                return Choice {
                    ty: T::F32,
                    wanted: None,
                };
            }
            if !base.is_quantized() {
                return Choice {
                    ty: base,
                    wanted: None,
                };
            }
            let cat = category(t.name);
            let mut ty = base;
            if !opts.pure {
                match cat {
                    Category::Output | Category::TokenEmbd if cat == Category::Output || tied => {
                        // A tied embedding doubles as the output matrix, so it gets the
                        // output's precision.
                        if ne0 % base.block_size() != 0 {
                            ty = T::Q8_0;
                        } else if ty != T::Q8_0 {
                            ty = T::Q6_K;
                        }
                    }
                    Category::Output | Category::TokenEmbd | Category::Other => {}
                    Category::AttnV | Category::AttnQkv => {
                        if ftype == P::Q2_K {
                            ty = if opts.n_gqa >= 4 { T::Q4_K } else { T::Q3_K };
                        } else if ftype == P::Q3_K_M {
                            ty = if i_attention_wv < 2 { T::Q5_K } else { T::Q4_K };
                        } else if ftype == P::Q3_K_L {
                            ty = T::Q5_K;
                        } else if matches!(ftype, P::Q4_K_M | P::Q5_K_M)
                            && use_more_bits(i_attention_wv, n_attention_wv)
                        {
                            ty = T::Q6_K;
                        } else if ftype == P::Q4_K_S && i_attention_wv < 4 {
                            ty = T::Q5_K;
                        }
                        i_attention_wv += 1;
                    }
                    Category::AttnK | Category::AttnQ | Category::FfnUp | Category::FfnGate => {}
                    Category::FfnDown => {
                        let i = layer_of(t.name).unwrap_or(i_ffn_down);
                        let n = n_layer;
                        match ftype {
                            P::Q2_K => ty = T::Q3_K,
                            P::Q3_K_M => {
                                ty = if i < n / 16 { T::Q5_K } else { T::Q4_K };
                            }
                            P::Q3_K_L => ty = T::Q5_K,
                            P::Q4_K_M if use_more_bits(i, n) => ty = T::Q6_K,
                            P::Q5_K_M if use_more_bits(i, n) => ty = T::Q6_K,
                            P::Q4_K_S if i < n / 8 => ty = T::Q5_K,
                            P::Q4_0 if opts.has_imatrix && i < n / 8 => ty = T::Q4_1,
                            P::Q5_0 if opts.has_imatrix && i < n / 8 => ty = T::Q5_1,
                            _ => {}
                        }
                        i_ffn_down += 1;
                    }
                    Category::AttnOutput => match ftype {
                        P::Q2_K => ty = T::Q3_K,
                        P::Q3_K_M => ty = T::Q4_K,
                        P::Q3_K_L => ty = T::Q5_K,
                        _ => {}
                    },
                }
            }
            let fell = fallback(ty, ne0);
            Choice {
                ty: fell,
                wanted: (fell != ty).then_some(ty),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n_layer: usize, tied: bool) -> Vec<(String, Vec<usize>)> {
        let mut v = vec![
            ("token_embd.weight".to_string(), vec![2048, 32000]),
            ("output_norm.weight".to_string(), vec![2048]),
        ];
        if !tied {
            v.push(("output.weight".to_string(), vec![2048, 32000]));
        }
        for i in 0..n_layer {
            for (n, ne) in [
                ("attn_norm.weight", vec![2048]),
                ("attn_q.weight", vec![2048, 2048]),
                ("attn_k.weight", vec![2048, 256]),
                ("attn_v.weight", vec![2048, 256]),
                ("attn_output.weight", vec![2048, 2048]),
                ("ffn_norm.weight", vec![2048]),
                ("ffn_gate.weight", vec![2048, 5632]),
                ("ffn_up.weight", vec![2048, 5632]),
                ("ffn_down.weight", vec![5632, 2048]),
            ] {
                v.push((format!("blk.{i}.{n}"), ne));
            }
        }
        v.sort_by(|a, b| gguf_tensor_order(&a.0, &b.0));
        v
    }

    fn run(preset: Preset, n_layer: usize, tied: bool) -> Vec<(String, GgmlType)> {
        let v = names(n_layer, tied);
        let inputs: Vec<_> = v.iter().map(|(n, ne)| PlanInput { name: n, ne }).collect();
        let opts = PlanOptions {
            preset,
            pure: false,
            has_imatrix: false,
            n_layer,
            n_gqa: 8,
        };
        plan(&inputs, &opts)
            .into_iter()
            .zip(v)
            .map(|(c, (n, _))| (n, c.ty))
            .collect()
    }

    fn ty(plan: &[(String, GgmlType)], name: &str) -> GgmlType {
        plan.iter().find(|(n, _)| n == name).unwrap().1
    }

    #[test]
    fn q4_k_m_gives_more_bits_to_output_and_every_third_attn_v_and_ffn_down() {
        // TinyLlama-like: 22 layers, untied.
        let p = run(Preset::Q4_K_M, 22, false);
        assert_eq!(ty(&p, "output.weight"), GgmlType::Q6_K);
        assert_eq!(ty(&p, "token_embd.weight"), GgmlType::Q4_K);
        assert_eq!(ty(&p, "output_norm.weight"), GgmlType::F32);
        // n/8 = 2: layers 0,1 more bits; 7n/8 = 19: layers 19..21; (i-2)%3==2: 4, 7, 10, 13, 16.
        let more: Vec<usize> = (0..22)
            .filter(|i| ty(&p, &format!("blk.{i}.ffn_down.weight")) == GgmlType::Q6_K)
            .collect();
        assert_eq!(more, vec![0, 1, 4, 7, 10, 13, 16, 19, 20, 21]);
        let more_v: Vec<usize> = (0..22)
            .filter(|i| ty(&p, &format!("blk.{i}.attn_v.weight")) == GgmlType::Q6_K)
            .collect();
        assert_eq!(more_v, more);
        assert_eq!(ty(&p, "blk.5.attn_q.weight"), GgmlType::Q4_K);
    }

    #[test]
    fn tied_embeddings_are_treated_as_the_output_tensor() {
        let p = run(Preset::Q4_0, 4, true);
        assert_eq!(ty(&p, "token_embd.weight"), GgmlType::Q6_K);
        let p = run(Preset::Q8_0, 4, true);
        assert_eq!(ty(&p, "token_embd.weight"), GgmlType::Q8_0);
    }

    #[test]
    fn rows_not_divisible_by_256_fall_back_like_llama_quantize() {
        assert_eq!(fallback(GgmlType::Q4_K, 576), GgmlType::Q5_0);
        assert_eq!(fallback(GgmlType::Q5_K, 896), GgmlType::Q5_1);
        assert_eq!(fallback(GgmlType::Q6_K, 960), GgmlType::Q8_0);
        assert_eq!(fallback(GgmlType::Q2_K, 576), GgmlType::Q4_0);
        assert_eq!(fallback(GgmlType::Q4_0, 100), GgmlType::F16);
    }

    #[test]
    fn presets_parse_and_map_to_llama_file_types() {
        assert_eq!("q4_k_m".parse::<Preset>().unwrap(), Preset::Q4_K_M);
        assert_eq!(Preset::Q4_K_M.file_type(), 15);
        assert_eq!(Preset::BF16.file_type(), 32);
        assert!("Q4_K_X".parse::<Preset>().is_err());
        assert_eq!(Preset::for_type(GgmlType::Q4_K), Some(Preset::Q4_K_M));
    }
}
