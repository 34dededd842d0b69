//! Data selection under a budget (`--select K`): which K training samples teach the base
//! model the most. Each sample is scored with the base model alone: the mean loss and the
//! mean predictive entropy over its trained tokens (what the model does not know yet), and an
//! embedding of what it teaches (the mean of the last normalised hidden states over its
//! trained tokens, centred on the candidates' mean: a decoder's raw states all point one way,
//! and the shared chat template would dominate a mean over every token). Samples are then
//! picked greedily: the next one maximises
//!
//! ```text
//! usefulness + diversity_weight * (1 - max cosine similarity to the samples already picked) / 2
//! ```
//!
//! where usefulness is the mean of the loss and the entropy, each scaled to [0, 1] over the
//! candidates, and the diversity term lies in [0, 1] too. With a weight of 0 this keeps the K hardest samples; a larger weight spreads
//! the budget over more of the data's topics instead of several wordings of one hard fact.
//! `random` keeps K samples drawn with the run's seed, the baseline to compare against.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::data::{shuffle, Example};
use super::threads::run_packs;
use crate::calib::forward::Forward;
use crate::error::{Error, Result};

/// How `--select` picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectBy {
    Score,
    Random,
}

impl FromStr for SelectBy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<SelectBy, String> {
        match s {
            "score" => Ok(SelectBy::Score),
            "random" => Ok(SelectBy::Random),
            _ => Err(format!("`{s}`: use `score` or `random`")),
        }
    }
}

/// One candidate's record in `selection.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// 1-based line of the data file.
    pub line: usize,
    /// Mean cross-entropy of the base model over the sample's trained tokens (nats); `null`
    /// for a random selection, which scores nothing.
    pub loss: Option<f64>,
    /// Mean entropy of the base model's prediction at those tokens (nats).
    pub entropy: Option<f64>,
    /// Mean of loss and entropy, each scaled to [0, 1] over the candidates.
    pub usefulness: Option<f64>,
    /// (1 - the largest cosine similarity to the samples picked before it) / 2, 1 for the
    /// first, when it was picked; `null` if it was not.
    pub diversity: Option<f64>,
    /// Position in the pick order (0 first); `null` if not picked.
    pub picked: Option<usize>,
}

/// What a selection kept and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    pub by: String,
    pub k: usize,
    pub diversity_weight: f64,
    pub candidates: usize,
    /// Per candidate, in data order (scores are absent for `random`).
    pub samples: Vec<Scored>,
}

impl Selection {
    /// Indices of the kept candidates, in data order.
    pub fn kept(&self) -> impl Iterator<Item = usize> + '_ {
        self.samples
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.picked.map(|_| i))
    }
}

/// Loss, entropy and embedding of one sample under the base model.
struct Measure {
    loss: f64,
    entropy: f64,
    embedding: Vec<f32>,
}

fn measure(fwd: &Forward, ex: &Example) -> Result<Measure> {
    let mut cache = fwd.cache(ex.ids.len());
    let mut hidden: Option<Vec<Vec<f32>>> = None;
    let logits = fwd.forward_probed(&ex.ids, &mut cache, &mut |point, t| {
        if point == "final_norm" {
            hidden = t.to_vec2::<f32>().ok();
        }
    })?;
    let hidden = hidden.ok_or_else(|| Error::Invalid("selection: no hidden states".into()))?;
    let vocab = logits.len() / ex.ids.len();
    let (mut loss, mut entropy, mut n) = (0f64, 0f64, 0usize);
    for t in 0..ex.ids.len() - 1 {
        if !ex.train[t + 1] {
            continue;
        }
        let row = &logits[t * vocab..(t + 1) * vocab];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let mut z = 0f64;
        let mut weighted = 0f64;
        for &x in row {
            let e = (x as f64 - max).exp();
            z += e;
            weighted += e * (x as f64 - max);
        }
        let lse = max + z.ln();
        loss += lse - row[ex.ids[t + 1] as usize] as f64;
        // H = log Z - E_p[logit], with both taken relative to the row's maximum.
        entropy += z.ln() - weighted / z;
        n += 1;
    }
    // The states where the trained tokens are read (every state if none is).
    let dim = hidden.first().map_or(0, Vec::len);
    let mut embedding = vec![0f32; dim];
    let trained: Vec<&Vec<f32>> = hidden
        .iter()
        .zip(&ex.train)
        .filter(|(_, &t)| t)
        .map(|(h, _)| h)
        .collect();
    let rows = if trained.is_empty() {
        hidden.iter().collect()
    } else {
        trained
    };
    for h in &rows {
        for (e, x) in embedding.iter_mut().zip(h.iter()) {
            *e += x / rows.len() as f32;
        }
    }
    Ok(Measure {
        loss: loss / n.max(1) as f64,
        entropy: entropy / n.max(1) as f64,
        embedding,
    })
}

/// Subtracts the candidates' mean embedding and scales each to unit length.
fn centre_and_normalise(m: &mut [Measure]) {
    let Some(dim) = m.first().map(|x| x.embedding.len()) else {
        return;
    };
    let mut mean = vec![0f64; dim];
    for x in m.iter() {
        for (a, &e) in mean.iter_mut().zip(&x.embedding) {
            *a += e as f64 / m.len() as f64;
        }
    }
    for x in m.iter_mut() {
        for (e, &a) in x.embedding.iter_mut().zip(&mean) {
            *e -= a as f32;
        }
        let norm = x.embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm > 1e-12 {
            x.embedding.iter_mut().for_each(|v| *v /= norm);
        }
    }
}

/// Values scaled to [0, 1] (all 0 when they are equal).
fn unit(v: &[f64]) -> Vec<f64> {
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    v.iter()
        .map(|x| if hi > lo { (x - lo) / (hi - lo) } else { 0.0 })
        .collect()
}

/// Picks `k` of `candidates` (all of them when `k` is not smaller).
pub fn select(
    fwd: &Forward,
    candidates: &[&Example],
    k: usize,
    by: SelectBy,
    diversity_weight: f64,
    seed: u64,
    threads: usize,
) -> Result<Selection> {
    if k == 0 {
        return Err(Error::Invalid("--select 0 keeps no sample".into()));
    }
    let k = k.min(candidates.len());
    let mut samples: Vec<Scored> = candidates
        .iter()
        .map(|ex| Scored {
            line: ex.line,
            loss: None,
            entropy: None,
            usefulness: None,
            diversity: None,
            picked: None,
        })
        .collect();
    let kept = match by {
        SelectBy::Random => {
            let mut order: Vec<usize> = (0..candidates.len()).collect();
            shuffle(&mut order, seed ^ 0x5365_6C65_6374);
            order.truncate(k);
            order
        }
        SelectBy::Score => {
            let one_each: Vec<Vec<&Example>> = candidates.iter().map(|e| vec![*e]).collect();
            let mut m = run_packs(&one_each, threads, |_, p| measure(fwd, p[0]))?;
            centre_and_normalise(&mut m);
            let loss: Vec<f64> = m.iter().map(|x| x.loss).collect();
            let entropy: Vec<f64> = m.iter().map(|x| x.entropy).collect();
            let (ul, ue) = (unit(&loss), unit(&entropy));
            let useful: Vec<f64> = ul.iter().zip(&ue).map(|(a, b)| (a + b) / 2.0).collect();
            for (i, s) in samples.iter_mut().enumerate() {
                s.loss = Some(loss[i]);
                s.entropy = Some(entropy[i]);
                s.usefulness = Some(useful[i]);
            }
            // Greedy: the closest picked sample, per candidate, kept up to date.
            let mut nearest = vec![f64::NEG_INFINITY; candidates.len()];
            let mut kept = Vec::with_capacity(k);
            let mut taken = vec![false; candidates.len()];
            for _ in 0..k {
                let div = |i: usize| {
                    if nearest[i] == f64::NEG_INFINITY {
                        1.0
                    } else {
                        (1.0 - nearest[i]) / 2.0
                    }
                };
                let best = (0..candidates.len())
                    .filter(|&i| !taken[i])
                    .max_by(|&a, &b| {
                        let sa = useful[a] + diversity_weight * div(a);
                        let sb = useful[b] + diversity_weight * div(b);
                        // Ties go to the earlier sample.
                        sa.total_cmp(&sb).then(b.cmp(&a))
                    })
                    .expect("k is at most the candidates");
                samples[best].diversity = Some(div(best));
                taken[best] = true;
                kept.push(best);
                for (i, n) in nearest.iter_mut().enumerate() {
                    let cos: f32 = m[i]
                        .embedding
                        .iter()
                        .zip(&m[best].embedding)
                        .map(|(a, b)| a * b)
                        .sum();
                    *n = n.max(cos as f64);
                }
            }
            kept
        }
    };
    for (order, &i) in kept.iter().enumerate() {
        samples[i].picked = Some(order);
    }
    Ok(Selection {
        by: match by {
            SelectBy::Score => "score".into(),
            SelectBy::Random => "random".into(),
        },
        k,
        diversity_weight,
        candidates: candidates.len(),
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_scales_to_zero_one_and_flat_values_to_zero() {
        assert_eq!(unit(&[1.0, 3.0, 2.0]), vec![0.0, 1.0, 0.5]);
        assert_eq!(unit(&[2.0, 2.0]), vec![0.0, 0.0]);
    }

    #[test]
    fn select_by_names_parse_and_others_are_refused() {
        assert_eq!("score".parse::<SelectBy>(), Ok(SelectBy::Score));
        assert_eq!("random".parse::<SelectBy>(), Ok(SelectBy::Random));
        assert!("best".parse::<SelectBy>().unwrap_err().contains("score"));
    }
}
