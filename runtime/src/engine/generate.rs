//! The generation loop every engine runs: tokenize, prefill, then sample, stream text and
//! decode one token at a time until a stop, the length limit, or the client hanging up.

use std::sync::mpsc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::load::{Load, Ticket};
use super::sample::Sampler;
use super::types::{
    EngineError, FinishReason, Forward, GenEvent, GenRequest, GenStats, ModelInfo, Prompt, Vocab,
};
use crate::stop::StopFilter;

/// Tokens per forward call while reading a prompt: llama.cpp's default batch, and a bound on
/// the activations an ONNX or LiteRT prefill allocates at once.
pub const PROMPT_BATCH: usize = 512;

/// One queued request and where its events go.
pub struct Job {
    pub request: GenRequest,
    pub events: UnboundedSender<GenEvent>,
    /// The job's place in the queue, given back when the job is done.
    pub(super) _ticket: Ticket,
}

/// Reports the loaded model, then runs jobs one at a time until every handle is dropped.
/// A job whose client went away (its receiver dropped) is skipped if it is still waiting
/// and stopped at its next token if it runs; `tally` counts both.
pub fn serve(
    vocab: &dyn Vocab,
    model: &mut dyn Forward,
    info: ModelInfo,
    jobs: mpsc::Receiver<Job>,
    ready: mpsc::Sender<Result<ModelInfo, EngineError>>,
    tally: &Load,
) {
    if ready.send(Ok(info)).is_err() {
        return;
    }
    while let Ok(job) = jobs.recv() {
        let started = Instant::now();
        tally.start();
        let result = if job.events.is_closed() {
            Err(EngineError::Cancelled { generated: 0 })
        } else {
            run(vocab, model, &job, started)
        };
        if let Err(EngineError::Cancelled { generated }) = result {
            tally.cancel(generated);
        }
        tally.finish(started.elapsed());
        // The queue place is free before the client hears the end, so a client that sends
        // its next request at once finds it free.
        let Job {
            events, _ticket, ..
        } = job;
        drop(_ticket);
        let _ = events.send(match result {
            Ok(stats) => GenEvent::Done(stats),
            Err(e) => GenEvent::Error(e),
        });
    }
}

/// The prompt's tokens and the tokens that may be generated after it in a context of
/// `n_ctx`. `max_tokens` is cut to what the context leaves; a prompt that leaves nothing is
/// refused unless the request asks for truncation, which drops the oldest chat turns (after
/// any system messages, never the last turn) and then the oldest tokens, until `max_tokens`
/// (at most half the context) fits after the prompt.
fn fit(
    vocab: &dyn Vocab,
    req: &GenRequest,
    n_ctx: usize,
) -> Result<(Vec<i32>, usize), EngineError> {
    let mut prompt = vocab.tokenize(&req.prompt)?;
    if req.truncate && n_ctx > 1 {
        let room = (req.max_tokens as usize).clamp(1, n_ctx / 2);
        let keep = n_ctx - room;
        if let Prompt::Chat(messages) = &req.prompt {
            let mut messages = messages.clone();
            while prompt.len() > keep {
                let Some(oldest) = messages.iter().position(|m| m.role != "system") else {
                    break;
                };
                if messages[oldest..]
                    .iter()
                    .filter(|m| m.role != "system")
                    .count()
                    < 2
                {
                    break;
                }
                messages.remove(oldest);
                prompt = vocab.tokenize(&Prompt::Chat(messages.clone()))?;
            }
        }
        if prompt.len() > keep {
            prompt.drain(..prompt.len() - keep);
        }
    }
    if prompt.len() >= n_ctx {
        return Err(EngineError::TooLong {
            prompt: prompt.len(),
            n_ctx: n_ctx as u32,
        });
    }
    let max_tokens = (req.max_tokens as usize).min(n_ctx - prompt.len());
    Ok((prompt, max_tokens))
}

fn run(
    vocab: &dyn Vocab,
    model: &mut dyn Forward,
    job: &Job,
    started: Instant,
) -> Result<GenStats, EngineError> {
    let req = &job.request;
    let (prompt, max_tokens) = fit(vocab, req, model.n_ctx() as usize)?;
    if prompt.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    let n_vocab = vocab.n_vocab();
    if let Some(&id) = prompt.iter().find(|&&t| t < 0 || t as usize >= n_vocab) {
        return Err(EngineError::BadToken { id, n_vocab });
    }
    model.reset()?;
    let mut sampler = Sampler::new(req.temperature, req.top_p, req.seed);
    let mut token = 0u32;
    let n_chunks = prompt.len().div_ceil(PROMPT_BATCH);
    for (i, chunk) in prompt.chunks(PROMPT_BATCH).enumerate() {
        if job.events.is_closed() {
            return Err(EngineError::Cancelled { generated: 0 });
        }
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
    while generated < max_tokens {
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
                return Err(EngineError::Cancelled { generated });
            }
        } else {
            held.push_str(&emit);
        }
        if stopped {
            finish = FinishReason::Stop;
            break;
        }
        if generated == max_tokens {
            break;
        }
        if job.events.is_closed() {
            return Err(EngineError::Cancelled { generated });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::types::{ChatMessage, Detokenizer};

    /// One token per byte; a chat is each message as `role:content|`.
    struct Bytes;

    impl Vocab for Bytes {
        fn tokenize(&self, prompt: &Prompt) -> Result<Vec<i32>, EngineError> {
            let text = match prompt {
                Prompt::Text(t) => t.clone(),
                Prompt::Chat(ms) => ms
                    .iter()
                    .map(|m| format!("{}:{}|", m.role, m.content))
                    .collect(),
                Prompt::Tokens(ids) => return Ok(ids.clone()),
            };
            Ok(text.bytes().map(i32::from).collect())
        }
        fn is_eog(&self, _: i32) -> bool {
            false
        }
        fn detokenizer(&self) -> Box<dyn Detokenizer + '_> {
            unreachable!("fit never detokenizes")
        }
        fn n_vocab(&self) -> usize {
            256
        }
    }

    fn request(prompt: Prompt, max_tokens: u32, truncate: bool) -> GenRequest {
        GenRequest {
            prompt,
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: vec![],
            truncate,
            ignore_eos: false,
            stream: false,
        }
    }

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn max_tokens_is_cut_to_what_the_context_leaves() {
        let text = Prompt::Text("x".repeat(10));
        let (p, max) = fit(&Bytes, &request(text.clone(), 500, false), 64).unwrap();
        assert_eq!((p.len(), max), (10, 54));
        let (_, max) = fit(&Bytes, &request(text, 5, false), 64).unwrap();
        assert_eq!(max, 5);
    }

    #[test]
    fn a_prompt_that_fills_the_context_is_refused_with_its_numbers() {
        let err = fit(&Bytes, &request(Prompt::Text("x".repeat(64)), 8, false), 64).unwrap_err();
        assert!(
            matches!(
                err,
                EngineError::TooLong {
                    prompt: 64,
                    n_ctx: 64
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("\"truncate\": true"), "{err}");
    }

    #[test]
    fn truncation_keeps_the_end_of_a_text_prompt_and_room_for_max_tokens() {
        let text: String = (0..100u8).map(|i| char::from(b'0' + i % 10)).collect();
        let (p, max) = fit(&Bytes, &request(Prompt::Text(text.clone()), 16, true), 64).unwrap();
        assert_eq!((p.len(), max), (48, 16));
        assert_eq!(p, text.bytes().skip(52).map(i32::from).collect::<Vec<_>>());
        // At most half the context is kept free, whatever max_tokens asks.
        let (p, max) = fit(&Bytes, &request(Prompt::Text(text), 1000, true), 64).unwrap();
        assert_eq!((p.len(), max), (32, 32));
    }

    #[test]
    fn truncation_drops_the_oldest_chat_turns_but_keeps_the_system_message_and_the_last() {
        let chat = Prompt::Chat(vec![
            msg("system", "be brief"),
            msg("user", &"a".repeat(30)),
            msg("assistant", &"b".repeat(30)),
            msg("user", "last?"),
        ]);
        let (p, _) = fit(&Bytes, &request(chat, 8, true), 64).unwrap();
        let text: String = p.iter().map(|&t| char::from(t as u8)).collect();
        assert_eq!(text, "system:be brief|user:last?|");
    }
}
