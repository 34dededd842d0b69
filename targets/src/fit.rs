//! Fit checks: will a model run in a board's RAM, by how much, and how fast can it decode at
//! best. The caller supplies the model's sizes (weights as the exporter would write them, the
//! KV-cache shape); this module does the arithmetic against a [`Profile`].

use serde::Serialize;

use crate::profile::Profile;

const MIB: u64 = 1 << 20;

/// Memory the runtime needs beyond weights and KV cache: llama.cpp's compute buffers for a
/// 512-token batch, the logits buffer, the HTTP server and the binary itself. A round figure
/// above what llama.cpp reports for sub-2B models ("compute buffer size" of ~100 MiB at
/// 2048 context) [estimate]; large vocabularies and batches need more.
pub const RUNTIME_OVERHEAD_BYTES: u64 = 192 * MIB;

/// Bytes per KV-cache element: llama.cpp keeps K and V in f16 by default (`--cache-type-k/v`).
pub const KV_BYTES_PER_ELEMENT: u64 = 2;

/// GGUF presets from best to worst quality: llama-quantize's own table of perplexity increase
/// (tools/quantize/quantize.cpp, Llama-3-8B; F16 on Mistral-7B): F16 +0.0020, Q8_0 +0.0026,
/// Q6_K +0.0217, Q5_K_M +0.0569, Q5_K_S +0.1049, Q5_1 +0.1062, Q5_0 +0.1316, Q4_K_M +0.1754,
/// Q4_K_S +0.2689, Q4_1 +0.4511, Q4_0 +0.4685, Q3_K_L +0.5562, Q3_K_M +0.6569, Q3_K_S +1.6321,
/// Q2_K +3.5199.
pub const GGUF_QUALITY_ORDER: &[&str] = &[
    "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
    "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K",
];

/// The attention shape that sizes the KV cache.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct KvShape {
    pub layers: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
}

/// K and V for every layer at `ctx` tokens, f16: 2 * layers * ctx * kv_heads * head_dim * 2.
pub fn kv_cache_bytes(shape: KvShape, ctx: u64) -> u64 {
    2 * shape.layers * ctx * shape.kv_heads * shape.head_dim * KV_BYTES_PER_ELEMENT
}

/// How one board variant fares.
#[derive(Debug, Clone, Serialize)]
pub struct VariantFit {
    pub ram_bytes: u64,
    /// RAM left after the operating system's share.
    pub available_bytes: u64,
    /// available - needed; negative when it does not fit.
    pub margin_bytes: i64,
    /// margin as a percentage of available.
    pub margin_pct: f64,
    pub fits: bool,
}

/// Memory needed and the verdict per RAM variant.
#[derive(Debug, Clone, Serialize)]
pub struct FitReport {
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
    pub overhead_bytes: u64,
    pub needed_bytes: u64,
    pub variants: Vec<VariantFit>,
}

/// Checks `weights + kv + overhead` against every RAM variant of `profile`.
pub fn check(profile: &Profile, weights_bytes: u64, kv_bytes: u64) -> FitReport {
    let needed = weights_bytes + kv_bytes + RUNTIME_OVERHEAD_BYTES;
    let os = profile.memory.os_reserved_mib * MIB;
    let variants = profile
        .memory
        .ram_variants_mib
        .iter()
        .map(|&mib| {
            let ram = mib * MIB;
            let available = ram.saturating_sub(os);
            let margin = available as i64 - needed as i64;
            VariantFit {
                ram_bytes: ram,
                available_bytes: available,
                margin_bytes: margin,
                margin_pct: if available == 0 {
                    f64::NEG_INFINITY
                } else {
                    margin as f64 * 100.0 / available as f64
                },
                fits: margin >= 0,
            }
        })
        .collect();
    FitReport {
        weights_bytes,
        kv_cache_bytes: kv_bytes,
        overhead_bytes: RUNTIME_OVERHEAD_BYTES,
        needed_bytes: needed,
        variants,
    }
}

/// Upper bound of decode speed when memory bandwidth is the limit: every generated token reads
/// all weights and the KV cache once, so tokens/s <= bandwidth / bytes per token.
pub fn decode_ceiling_tokens_per_s(bandwidth_gbs: f64, bytes_per_token: u64) -> f64 {
    bandwidth_gbs * 1e9 / bytes_per_token.max(1) as f64
}

/// The best-quality preset of `candidates` (name, weights bytes) whose total fits `ram_mib`,
/// ranked by [`GGUF_QUALITY_ORDER`]; names not in that order are ignored.
pub fn best_fit<'a>(
    profile: &Profile,
    ram_mib: u64,
    candidates: &'a [(String, u64)],
    kv_bytes: u64,
) -> Option<&'a str> {
    let available = (ram_mib * MIB).saturating_sub(profile.memory.os_reserved_mib * MIB);
    GGUF_QUALITY_ORDER.iter().find_map(|q| {
        candidates
            .iter()
            .find(|(n, w)| n == q && w + kv_bytes + RUNTIME_OVERHEAD_BYTES <= available)
            .map(|(n, _)| n.as_str())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_cache_of_smollm2_at_2048() {
        // SmolLM2-135M: 30 layers, 3 KV heads of 64.
        let s = KvShape {
            layers: 30,
            kv_heads: 3,
            head_dim: 64,
        };
        assert_eq!(kv_cache_bytes(s, 2048), 2 * 30 * 2048 * 3 * 64 * 2);
    }

    #[test]
    fn margins_are_per_variant_and_the_best_fit_respects_quality_order() {
        let p = Profile::builtin("imx93").unwrap();
        let r = check(&p, 1500 * MIB, 100 * MIB);
        let small = &r.variants[0];
        let big = &r.variants[1];
        assert!(!small.fits && big.fits, "{r:?}");
        assert_eq!(
            big.margin_bytes,
            (2048 - 256 - 1500 - 100 - 192) as i64 * MIB as i64
        );
        let c = vec![
            ("Q4_0".to_string(), 500 * MIB),
            ("Q8_0".to_string(), 900 * MIB),
            ("F16".to_string(), 1700 * MIB),
        ];
        assert_eq!(best_fit(&p, 1024, &c, 0), Some("Q4_0"));
        assert_eq!(best_fit(&p, 2048, &c, 0), Some("Q8_0"));
        assert_eq!(best_fit(&p, 512, &c, 0), None);
    }
}
