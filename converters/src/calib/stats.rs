//! Collects the activation statistics of [`crate::model::stats`] by running the reference
//! forward pass over calibration text.
//!
//! Samples are cut as `imatrix` cuts them: the texts are joined, tokenized once (BOS first when
//! the tokenizer adds one), cut into consecutive `seq_len`-token samples (a partial tail is
//! dropped; every sample starts with BOS), at most `max_samples` of them, each run from an empty
//! KV cache. Tokens left out (text longer than `max_samples × seq_len`, or the tail) are
//! reported in [`CalibStats::tokens_total`] / [`CalibStats::tokens_used`].

use crate::calib::data::chunk_tokens;
use crate::calib::forward::Forward;
use crate::error::{Error, Result};
use crate::model::stats::{CalibStats, ModelIdentity};
use crate::model::Model;
use crate::progress::Progress;

/// Runs `model` over `texts` in samples of `seq_len` tokens (at most `max_samples`), each from
/// an empty KV cache, recording the input statistics of every linear layer. `seq_len` beyond
/// the model's context (`max_position_embeddings`) is refused. `dataset` is left empty for the
/// caller to fill.
pub fn compute(
    model: &Model,
    texts: &[String],
    seq_len: usize,
    max_samples: Option<usize>,
    progress: &dyn Progress,
) -> Result<CalibStats> {
    let ctx = model.config.max_position_embeddings;
    if ctx > 0 && seq_len > ctx {
        return Err(Error::Invalid(format!(
            "sequence length {seq_len} exceeds the context of {} (max_position_embeddings {ctx})",
            model.source.display()
        )));
    }
    if max_samples == Some(0) {
        return Err(Error::Invalid(
            "calibration needs at least one sample".into(),
        ));
    }
    if model.tokenizer.tokenizer_json.is_none() {
        return Err(Error::format(
            &model.source,
            "tokenizer.json",
            "missing: calibration tokenizes the text with the model's tokenizer.json",
        ));
    }
    let chunks = chunk_tokens(model, texts, seq_len, max_samples)?;
    let fwd = Forward::new(model)?;
    let mut stats = CalibStats::new(ModelIdentity::of(model));
    stats.seq_len = seq_len;
    stats.tokens_total = chunks.n_tokens;
    let n = chunks.chunks.len();
    progress.start("calibrating", n as u64);
    for (i, chunk) in chunks.chunks.iter().enumerate() {
        let mut cache = fwd.cache(chunk.len());
        let mut failed: Option<Error> = None;
        fwd.forward_observed(chunk, &mut cache, &mut |name, acts, inn| {
            if failed.is_none() {
                if let Err(e) = stats.accumulate(name, acts, inn) {
                    failed = Some(e);
                }
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        stats.samples = i + 1;
        stats.tokens_used += chunk.len();
        stats.sample_tokens.push(chunk.clone());
        progress.advance(1, &format!("sample {}/{n}", i + 1));
    }
    progress.finish();
    Ok(stats)
}
