//! `edgepack-runtime bench`: time to first token and decode speed over prompt sizes.
//!
//! Prompts are token ids drawn from a fixed pseudo-random sequence over the vocabulary, as
//! llama.cpp's `llama-bench` does, so a prompt of N tokens is exactly N tokens and the
//! numbers compare with llama-bench's `pp` (prompt processing) and `tg` (generation) rows.

use serde::Serialize;

use crate::engine::{Engine, EngineError, GenRequest, Prompt};

/// One measured prompt size (medians over the repetitions).
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub repetitions: u32,
    /// Request taken to first generated token: prompt processing plus one sampling step.
    pub ttft_ms: f64,
    /// Prompt tokens over the time to first token.
    pub prompt_tokens_per_s: f64,
    /// Tokens after the first one over the time they took.
    pub decode_tokens_per_s: f64,
}

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub prompt_sizes: Vec<usize>,
    pub gen_tokens: u32,
    pub repetitions: u32,
}

/// Token ids of a prompt of `n` tokens (a 32-bit LCG over the vocabulary, seeded per size so
/// each size is one fixed prompt).
pub fn prompt_tokens(n: usize, n_vocab: i32) -> Vec<i32> {
    // Numerical Recipes' LCG constants; any full-period generator would do.
    let mut x: u32 = 0x9e37_79b9 ^ n as u32;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 8) as i32 % n_vocab.max(1)
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn request(tokens: Vec<i32>, gen_tokens: u32) -> GenRequest {
    GenRequest {
        prompt: Prompt::Tokens(tokens),
        max_tokens: gen_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        stop: vec![],
        truncate: false,
        ignore_eos: true,
        stream: false,
    }
}

/// Runs a warm-up request, then every size once uncounted and `repetitions` times counted;
/// `progress` hears each size.
pub fn run(
    engine: &Engine,
    cfg: &BenchConfig,
    mut progress: impl FnMut(&BenchRow),
) -> Result<Vec<BenchRow>, EngineError> {
    let n_vocab = engine.info.n_vocab;
    // The first decode pays for page faults on the mapped weights and buffer allocation.
    engine.generate_blocking(request(prompt_tokens(8, n_vocab), 2))?;
    let mut rows = Vec::new();
    for &size in &cfg.prompt_sizes {
        // A first prompt of a new length plans and allocates for its shapes (ONNX Runtime's
        // arenas, LiteRT's resized tensors); llama-bench and the Python peers warm up at
        // each size too, so every size gets one uncounted run.
        engine.generate_blocking(request(prompt_tokens(size, n_vocab), 2))?;
        let mut ttft = Vec::new();
        let mut decode = Vec::new();
        let mut generated = 0;
        for _ in 0..cfg.repetitions.max(1) {
            let (_, stats) =
                engine.generate_blocking(request(prompt_tokens(size, n_vocab), cfg.gen_tokens))?;
            ttft.push(stats.ttft.as_secs_f64());
            if let Some(tps) = stats.decode_tokens_per_second() {
                decode.push(tps);
            }
            generated = stats.completion_tokens;
        }
        let ttft_s = median(ttft);
        let row = BenchRow {
            prompt_tokens: size,
            gen_tokens: generated,
            repetitions: cfg.repetitions.max(1),
            ttft_ms: ttft_s * 1e3,
            prompt_tokens_per_s: size as f64 / ttft_s,
            decode_tokens_per_s: median(decode),
        };
        progress(&row);
        rows.push(row);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::{median, prompt_tokens};

    #[test]
    fn prompts_have_the_exact_length_and_stay_in_the_vocabulary() {
        let p = prompt_tokens(512, 49152);
        assert_eq!(p.len(), 512);
        assert!(p.iter().all(|&t| (0..49152).contains(&t)));
        assert_eq!(p, prompt_tokens(512, 49152), "a size is one fixed prompt");
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
