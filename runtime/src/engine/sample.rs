//! Picking the next token from logits: greedy (argmax, deterministic) or temperature plus
//! nucleus (top-p) sampling from a seeded generator, the same for every engine.

/// SplitMix64: a small, well-mixed generator; a request's seed fixes its samples.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    temperature: f32,
    top_p: f32,
    rng: SplitMix64,
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(temperature: f32, top_p: f32, seed: u32) -> Sampler {
        Sampler {
            temperature,
            top_p: top_p.clamp(f32::MIN_POSITIVE, 1.0),
            rng: SplitMix64(u64::from(seed)),
            scratch: Vec::new(),
        }
    }

    /// The next token id.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        let t = self.temperature;
        self.scratch.clear();
        self.scratch.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, ((l - max) / t).exp())),
        );
        self.scratch
            .sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f64 = self.scratch.iter().map(|&(_, p)| f64::from(p)).sum();
        // The smallest set of most likely tokens whose mass reaches top_p.
        let mut kept = 0;
        let mut mass = 0.0;
        for &(_, p) in &self.scratch {
            kept += 1;
            mass += f64::from(p);
            if mass >= f64::from(self.top_p) * total {
                break;
            }
        }
        let mut r = self.rng.next_f64() * mass;
        for &(id, p) in &self.scratch[..kept] {
            r -= f64::from(p);
            if r < 0.0 {
                return id;
            }
        }
        self.scratch[kept - 1].0
    }
}

/// Index of the largest logit, the first on ties (llama.cpp's greedy sampler does the same).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_largest_logit() {
        let mut s = Sampler::new(0.0, 1.0, 1);
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn a_seed_fixes_the_samples_and_top_p_keeps_only_the_nucleus() {
        let logits = [2.0, 1.9, -8.0, -9.0];
        let draw = |seed| {
            let mut s = Sampler::new(1.0, 0.9, seed);
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let d = draw(7);
        assert!(
            d.iter().all(|&t| t < 2),
            "tokens outside the nucleus: {d:?}"
        );
        assert!(d.contains(&0) && d.contains(&1));
    }
}
