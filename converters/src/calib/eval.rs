//! Evaluation with the reference forward pass: perplexity of a model on a text, and how far a
//! candidate (a quantized GGUF, a smoothed or sparse model, a simulated W8A8 engine) moves
//! from the float model, with the statistics llama-perplexity's `--kl-divergence` reports:
//! mean/percentile/max KL divergence of the candidate's next-token distribution from the
//! reference's, top-1 agreement, and logit differences. Also greedy generation with time to
//! first token and decode speed.
//!
//! The text is cut into chunks of `ctx` tokens, each run from an empty cache with BOS in its
//! first position (as llama-perplexity does); every position but the last of a chunk predicts
//! the next token, so a chunk scores `ctx - 1` tokens. All statistics are over those positions.

use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::calib::embed::Embedder;
use crate::calib::forward::{Forward, KvCache};
use crate::error::{Error, Result};
use crate::model::chat::{Message, Prompter};
use crate::progress::Progress;

/// Statistics of one model on the text (and, for a candidate, against the reference).
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub name: String,
    /// Positions scored.
    pub tokens: usize,
    /// exp(mean negative log-likelihood of the next token).
    pub perplexity: f64,
    /// Against the reference; `None` for the reference itself.
    pub vs_reference: Option<Divergence>,
}

/// How a candidate's next-token distributions differ from the reference's.
#[derive(Debug, Clone, Serialize)]
pub struct Divergence {
    /// KL(reference ‖ candidate) in nats: mean, 99th percentile, maximum over positions.
    pub kl_mean: f64,
    pub kl_p99: f64,
    pub kl_max: f64,
    /// Share of positions whose most likely token is the same.
    pub top1_agreement: f64,
    /// |logit difference| over all positions and vocabulary entries.
    pub logit_diff_max: f64,
    pub logit_diff_mean: f64,
}

/// Per position: log-softmax of a logits row, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
    row.iter().map(|&v| v as f64 - lse).collect()
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// What one position contributes to a candidate's statistics.
#[derive(Default, Clone, Copy)]
struct PosStats {
    nll: f64,
    kl: f64,
    top1: bool,
    diff_max: f64,
    diff_mean: f64,
}

/// Compares a candidate's logits `[n, vocab]` with the reference's at every position that has
/// a next token in `chunk`.
fn compare_chunk(reference: &[f32], cand: &[f32], chunk: &[u32], vocab: usize) -> Vec<PosStats> {
    (0..chunk.len() - 1)
        .into_par_iter()
        .map(|i| {
            let r = &reference[i * vocab..(i + 1) * vocab];
            let c = &cand[i * vocab..(i + 1) * vocab];
            let (lr, lc) = (log_softmax(r), log_softmax(c));
            let kl = lr
                .iter()
                .zip(&lc)
                .map(|(a, b)| a.exp() * (a - b))
                .sum::<f64>()
                .max(0.0);
            let (mut dmax, mut dsum) = (0f64, 0f64);
            for (a, b) in r.iter().zip(c) {
                let d = (*a as f64 - *b as f64).abs();
                dmax = dmax.max(d);
                dsum += d;
            }
            PosStats {
                nll: -lc[chunk[i + 1] as usize],
                kl,
                top1: argmax(r) == argmax(c),
                diff_max: dmax,
                diff_mean: dsum / vocab as f64,
            }
        })
        .collect()
}

/// Runs the reference and every candidate over `chunks` and scores them. Each model runs one
/// chunk at a time, so memory holds one chunk's logits per model, not the text's.
pub fn evaluate(
    reference: (&str, &Forward),
    candidates: &[(String, &Forward)],
    chunks: &[Vec<u32>],
    progress: &dyn Progress,
) -> Result<Vec<Scores>> {
    let vocab = reference.1.config().vocab_size;
    for (name, f) in candidates {
        if f.config().vocab_size != vocab {
            return Err(Error::Invalid(format!(
                "candidate {name} has a vocabulary of {} ids, the reference {vocab}",
                f.config().vocab_size
            )));
        }
    }
    let mut per_model: Vec<Vec<PosStats>> = vec![Vec::new(); candidates.len() + 1];
    progress.start("evaluating", chunks.len() as u64);
    for (k, chunk) in chunks.iter().enumerate() {
        if chunk.len() < 2 {
            continue;
        }
        let run = |f: &Forward| -> Result<Vec<f32>> {
            let mut cache = f.cache(chunk.len());
            f.forward(chunk, &mut cache)
        };
        let r = run(reference.1)?;
        per_model[0].extend(compare_chunk(&r, &r, chunk, vocab));
        for (j, (_, f)) in candidates.iter().enumerate() {
            let c = run(f)?;
            per_model[j + 1].extend(compare_chunk(&r, &c, chunk, vocab));
        }
        progress.advance(1, &format!("chunk {}/{}", k + 1, chunks.len()));
    }
    progress.finish();
    let names =
        std::iter::once(reference.0.to_string()).chain(candidates.iter().map(|c| c.0.clone()));
    Ok(names
        .zip(per_model)
        .enumerate()
        .map(|(j, (name, pos))| summarize(name, &pos, j > 0))
        .collect())
}

fn summarize(name: String, pos: &[PosStats], candidate: bool) -> Scores {
    let n = pos.len().max(1) as f64;
    let nll = pos.iter().map(|p| p.nll).sum::<f64>() / n;
    let vs_reference = candidate.then(|| {
        let mut kls: Vec<f64> = pos.iter().map(|p| p.kl).collect();
        kls.sort_by(f64::total_cmp);
        let p99 = kls
            .get(((kls.len() as f64 * 0.99).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0.0);
        Divergence {
            kl_mean: kls.iter().sum::<f64>() / n,
            kl_p99: p99,
            kl_max: kls.last().copied().unwrap_or(0.0),
            top1_agreement: pos.iter().filter(|p| p.top1).count() as f64 / n,
            logit_diff_max: pos.iter().fold(0f64, |m, p| m.max(p.diff_max)),
            logit_diff_mean: pos.iter().map(|p| p.diff_mean).sum::<f64>() / n,
        }
    });
    Scores {
        name,
        tokens: pos.len(),
        perplexity: nll.exp(),
        vs_reference,
    }
}

/// Timings of one greedy generation.
#[derive(Debug, Clone, Serialize)]
pub struct GenTiming {
    pub prompt_tokens: usize,
    /// Prefill of the prompt and the first sampled token, in seconds.
    pub ttft_s: f64,
    /// Tokens generated after the first, and their rate.
    pub decode_tokens: usize,
    pub decode_tokens_per_s: f64,
}

/// Greedy decoding of up to `max_new` tokens after `prompt`, stopping after any of `stop`
/// (which is not returned). Deterministic: ties go to the lowest id.
pub fn generate(
    f: &Forward,
    prompt: &[u32],
    max_new: usize,
    stop: &[u32],
) -> Result<(Vec<u32>, GenTiming)> {
    if prompt.is_empty() {
        return Err(Error::Invalid("generation needs a non-empty prompt".into()));
    }
    let vocab = f.config().vocab_size;
    let mut cache = f.cache(prompt.len() + max_new);
    let t0 = Instant::now();
    let logits = f.forward(prompt, &mut cache)?;
    let mut next = argmax(&logits[logits.len() - vocab..]) as u32;
    let ttft = t0.elapsed().as_secs_f64();
    let mut out = Vec::new();
    let t1 = Instant::now();
    while out.len() < max_new && !stop.contains(&next) {
        out.push(next);
        if out.len() == max_new {
            break;
        }
        let l = f.forward(&[next], &mut cache)?;
        next = argmax(&l) as u32;
    }
    let decode_tokens = out.len().saturating_sub(1);
    let dt = t1.elapsed().as_secs_f64();
    Ok((
        out,
        GenTiming {
            prompt_tokens: prompt.len(),
            ttft_s: ttft,
            decode_tokens,
            decode_tokens_per_s: if dt > 0.0 {
                decode_tokens as f64 / dt
            } else {
                0.0
            },
        },
    ))
}

/// How many questions [`answer_qa`] has the model answer at once. Measured on SmolLM2-135M,
/// 64 questions, 40 tokens each, 2 cores: 199 s one at a time, 72 s 16 at once, 60 s 32 at
/// once (100 MB more), 56 s 64 at once.
pub const QA_BATCH: usize = 32;

/// At most this many rows (prompt tokens, and one per answer in progress) go into one step of
/// [`generate_many`].
const STEP_ROWS: usize = 2048;

/// Greedy answers to several prompts, up to `width` of them decoded together: each step runs
/// the next token of every answer in progress (and the prompt of any that starts) as one pass
/// of [`Forward::forward_last`], so the weights are read once for all of them. A finished
/// answer makes room for the next prompt. Each answer is the one [`generate`] gives alone, up
/// to the rounding of the batched products (a near tie can go the other way). Answers come
/// back in the order of `prompts`, without the stop token.
pub fn generate_many(
    f: &Forward,
    prompts: &[Vec<u32>],
    max_new: usize,
    stop: &[u32],
    width: usize,
) -> Result<Vec<Vec<u32>>> {
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(Error::Invalid(format!(
            "generation needs a non-empty prompt (prompt {i} is empty)"
        )));
    }
    if max_new == 0 {
        return Ok(vec![Vec::new(); prompts.len()]);
    }
    let vocab = f.config().vocab_size;
    let mut done: Vec<Option<Vec<u32>>> = vec![None; prompts.len()];
    struct Running {
        at: usize,
        cache: KvCache,
        feed: Vec<u32>,
        out: Vec<u32>,
    }
    let mut waiting = prompts.iter().enumerate().peekable();
    let mut running: Vec<Running> = Vec::new();
    loop {
        // Prompts start while the step stays within STEP_ROWS rows (one always does), which
        // bounds the activations a step holds.
        let mut rows: usize = running.iter().map(|r| r.feed.len()).sum();
        while running.len() < width.max(1) {
            let Some(&(_, p)) = waiting.peek() else { break };
            if !running.is_empty() && rows + p.len() > STEP_ROWS {
                break;
            }
            let Some((at, p)) = waiting.next() else { break };
            rows += p.len();
            running.push(Running {
                at,
                cache: f.cache(p.len() + max_new),
                feed: p.clone(),
                out: Vec::new(),
            });
        }
        if running.is_empty() {
            break;
        }
        let feeds: Vec<Vec<u32>> = running
            .iter_mut()
            .map(|r| std::mem::take(&mut r.feed))
            .collect();
        let seqs: Vec<&[u32]> = feeds.iter().map(Vec::as_slice).collect();
        let mut caches: Vec<&mut KvCache> = running.iter_mut().map(|r| &mut r.cache).collect();
        let logits = f.forward_last(&seqs, &mut caches)?;
        let mut i = 0;
        running.retain_mut(|r| {
            let next = argmax(&logits[i * vocab..(i + 1) * vocab]) as u32;
            i += 1;
            let finished = stop.contains(&next) || {
                r.out.push(next);
                r.out.len() == max_new
            };
            if finished {
                done[r.at] = Some(std::mem::take(&mut r.out));
            } else {
                r.feed = vec![next];
            }
            !finished
        });
    }
    Ok(done.into_iter().map(Option::unwrap_or_default).collect())
}

/// One model's answers to a question set, scored against the reference answers.
#[derive(Debug, Clone, Serialize)]
pub struct QaScore {
    pub model: String,
    /// Mean cosine similarity of the answers' and the reference answers' embeddings.
    pub mean_similarity: f64,
    pub answers: Vec<QaAnswer>,
}

#[derive(Debug, Clone, Serialize)]
pub struct QaAnswer {
    pub question: String,
    pub answer: String,
    pub similarity: f32,
}

/// Reads question/answer pairs: JSONL with string fields `question` and `answer` per line
/// (blank lines skipped). An empty set is an error.
pub fn read_qa(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("line {}", i + 1);
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::format(path, &at, format!("not JSON: {e}")))?;
        let field = |k: &str| -> Result<String> {
            v.get(k)
                .and_then(|s| s.as_str())
                .map(str::to_owned)
                .ok_or_else(|| Error::format(path, &at, format!("no string field \"{k}\"")))
        };
        out.push((field("question")?, field("answer")?));
    }
    if out.is_empty() {
        return Err(Error::format(path, "questions", "the file holds none"));
    }
    Ok(out)
}

/// Lets the model `f` answer every question greedily through its chat template (at most
/// `max_new` tokens, [`QA_BATCH`] questions decoded together) and scores each answer by its
/// embedding's cosine similarity to the reference answer.
pub fn answer_qa(
    name: &str,
    f: &Forward,
    p: &Prompter,
    e: &Embedder,
    items: &[(String, String)],
    max_new: usize,
) -> Result<QaScore> {
    let prompts = items
        .iter()
        .map(|(q, _)| p.chat(&[Message::user(q)]))
        .collect::<Result<Vec<_>>>()?;
    let outs = generate_many(f, &prompts, max_new, p.stop_ids(), QA_BATCH)?;
    let mut answers = Vec::with_capacity(items.len());
    for ((q, reference), out) in items.iter().zip(outs) {
        let answer = p.decode(&out)?;
        let similarity = e.similarity(&answer, reference)?;
        answers.push(QaAnswer {
            question: q.clone(),
            answer,
            similarity,
        });
    }
    Ok(QaScore {
        model: name.to_string(),
        mean_similarity: answers.iter().map(|a| a.similarity as f64).sum::<f64>()
            / answers.len().max(1) as f64,
        answers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_logits_have_zero_divergence_and_full_agreement() {
        let logits = [1.0f32, 2.0, 0.5, 0.0, 3.0, 1.0];
        let s = compare_chunk(&logits, &logits, &[0, 1], 3);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].kl, 0.0);
        assert!(s[0].top1);
        // nll of token 1 at position 0: -log softmax([1, 2, 0.5])[1].
        let want = -(2.0f64 - (1f64.exp() + 2f64.exp() + 0.5f64.exp()).ln());
        assert!((s[0].nll - want).abs() < 1e-12);
    }

    #[test]
    fn kl_matches_the_closed_form_of_two_distributions() {
        // p = softmax([0, 0]) = (0.5, 0.5); q = softmax([ln 3, 0]) = (0.75, 0.25).
        let r = [0.0f32, 0.0];
        let c = [3f32.ln(), 0.0];
        let s = compare_chunk(&r, &c, &[0, 0], 2);
        let want = 0.5 * (0.5f64 / 0.75).ln() + 0.5 * (0.5f64 / 0.25).ln();
        assert!((s[0].kl - want).abs() < 1e-7, "{} vs {want}", s[0].kl);
        assert!(!s[0].top1 || argmax(&r) == argmax(&c));
    }
}
