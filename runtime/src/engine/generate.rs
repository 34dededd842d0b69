//! The generation loop every engine runs: tokenize, prefill, then sample, stream text and
//! decode one token at a time until a stop, the length limit, or the client hanging up.

use std::sync::mpsc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::sample::Sampler;
use super::types::{
    EngineError, FinishReason, Forward, GenEvent, GenRequest, GenStats, ModelInfo, Vocab,
};
use crate::stop::StopFilter;

/// Tokens per forward call while reading a prompt: llama.cpp's default batch, and a bound on
/// the activations an ONNX or LiteRT prefill allocates at once.
pub const PROMPT_BATCH: usize = 512;

/// One queued request and where its events go.
pub struct Job {
    pub request: GenRequest,
    pub events: UnboundedSender<GenEvent>,
}

/// Reports the loaded model, then runs jobs one at a time until every handle is dropped.
pub fn serve(
    vocab: &dyn Vocab,
    model: &mut dyn Forward,
    info: ModelInfo,
    jobs: mpsc::Receiver<Job>,
    ready: mpsc::Sender<Result<ModelInfo, EngineError>>,
) {
    if ready.send(Ok(info)).is_err() {
        return;
    }
    while let Ok(job) = jobs.recv() {
        let started = Instant::now();
        let result = run(vocab, model, &job, started);
        let _ = job.events.send(match result {
            Ok(stats) => GenEvent::Done(stats),
            Err(e) => GenEvent::Error(e),
        });
    }
}

fn run(
    vocab: &dyn Vocab,
    model: &mut dyn Forward,
    job: &Job,
    started: Instant,
) -> Result<GenStats, EngineError> {
    let req = &job.request;
    let prompt = vocab.tokenize(&req.prompt)?;
    if prompt.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    let n_vocab = vocab.n_vocab();
    if let Some(&id) = prompt.iter().find(|&&t| t < 0 || t as usize >= n_vocab) {
        return Err(EngineError::BadToken { id, n_vocab });
    }
    let n_ctx = model.n_ctx();
    if prompt.len() + req.max_tokens as usize > n_ctx as usize {
        return Err(EngineError::TooLong {
            prompt: prompt.len(),
            max_tokens: req.max_tokens,
            n_ctx,
        });
    }
    model.reset()?;
    let mut sampler = Sampler::new(req.temperature, req.top_p, req.seed);
    let mut token = 0u32;
    let n_chunks = prompt.len().div_ceil(PROMPT_BATCH);
    for (i, chunk) in prompt.chunks(PROMPT_BATCH).enumerate() {
        let logits = model.forward(chunk)?;
        if i + 1 == n_chunks {
            token = sampler.sample(logits);
        }
    }

    let mut detok = vocab.detokenizer();
    let mut filter = StopFilter::new(req.stop.clone());
    let mut held = String::new();
    let mut generated = 0usize;
    let mut first_token_at: Option<Instant> = None;
    let mut finish = FinishReason::Length;
    while generated < req.max_tokens as usize {
        generated += 1;
        first_token_at.get_or_insert_with(Instant::now);
        let id = token as i32;
        if !req.ignore_eos && vocab.is_eog(id) {
            finish = FinishReason::Stop;
            break;
        }
        let text = detok.push(id)?;
        let (emit, stopped) = filter.push(&text);
        if req.stream {
            if !emit.is_empty() && job.events.send(GenEvent::Text(emit)).is_err() {
                // The client went away: nobody reads the rest.
                return Err(EngineError::Stopped);
            }
        } else if job.events.is_closed() {
            return Err(EngineError::Stopped);
        } else {
            held.push_str(&emit);
        }
        if stopped {
            finish = FinishReason::Stop;
            break;
        }
        if generated == req.max_tokens as usize {
            break;
        }
        token = sampler.sample(model.forward(&[id])?);
    }
    let mut rest = held;
    if finish == FinishReason::Length {
        let (emit, _) = filter.push(&detok.finish());
        rest.push_str(&emit);
    }
    rest.push_str(&filter.finish());
    if !rest.is_empty() {
        let _ = job.events.send(GenEvent::Text(rest));
    }
    let now = Instant::now();
    let first = first_token_at.unwrap_or(now);
    Ok(GenStats {
        prompt_tokens: prompt.len(),
        completion_tokens: generated,
        finish_reason: finish,
        ttft: first - started,
        decode: now - first,
    })
}
