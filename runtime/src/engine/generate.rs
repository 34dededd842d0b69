//! The generation loop every engine runs: tokenize, prefill, then sample, stream text and
//! decode one token at a time until a stop, the length limit, or the client hanging up.

use std::sync::mpsc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::load::{Load, Ticket};
use super::sample::Sampler;
use super::types::{
    Detokenizer, EngineError, FinishReason, Forward, GenEvent, GenRequest, GenStats, ModelInfo,
    Prompt, Vocab,
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

/// A generation the engine has taken on: sampling, text, stop strings and counts from the
/// first generated token to the last. Engines feed it the logits after each token they run;
/// it says which token to run next, or that the generation is over.
pub(super) struct Stream<'v> {
    vocab: &'v dyn Vocab,
    sampler: Sampler,
    detok: Box<dyn Detokenizer + 'v>,
    filter: StopFilter,
    /// Text held back until the end (requests that do not stream).
    held: String,
    stream: bool,
    ignore_eos: bool,
    prompt_tokens: usize,
    max_tokens: usize,
    generated: usize,
    started: Instant,
    first_token_at: Option<Instant>,
    finish: FinishReason,
}

impl<'v> Stream<'v> {
    /// Fits the request's prompt into a context of `n_ctx` tokens and checks its ids; the
    /// prompt to run and the generation that follows it. `started` is when the engine took
    /// the request (time to first token counts from there).
    pub(super) fn begin(
        vocab: &'v dyn Vocab,
        req: &GenRequest,
        n_ctx: usize,
        started: Instant,
    ) -> Result<(Vec<i32>, Stream<'v>), EngineError> {
        let (prompt, max_tokens) = fit(vocab, req, n_ctx)?;
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let n_vocab = vocab.n_vocab();
        if let Some(&id) = prompt.iter().find(|&&t| t < 0 || t as usize >= n_vocab) {
            return Err(EngineError::BadToken { id, n_vocab });
        }
        let stream = Stream {
            vocab,
            sampler: Sampler::new(req.temperature, req.top_p, req.seed),
            detok: vocab.detokenizer(),
            filter: StopFilter::new(req.stop.clone()),
            held: String::new(),
            stream: req.stream,
            ignore_eos: req.ignore_eos,
            prompt_tokens: prompt.len(),
            max_tokens,
            generated: 0,
            started,
            first_token_at: None,
            finish: FinishReason::Length,
        };
        Ok((prompt, stream))
    }

    /// Whether any token may follow the prompt (not when `max_tokens` is 0).
    pub(super) fn wants_tokens(&self) -> bool {
        self.generated < self.max_tokens
    }

    /// Picks a token from the logits after the last token run and hands its text on; the
    /// token to run next, or `None` when the generation is over (end of generation, a stop
    /// string, the length limit). A client that went away stops it.
    pub(super) fn step(
        &mut self,
        logits: &[f32],
        events: &UnboundedSender<GenEvent>,
    ) -> Result<Option<i32>, EngineError> {
        let id = self.sampler.sample(logits) as i32;
        self.generated += 1;
        self.first_token_at.get_or_insert_with(Instant::now);
        if !self.ignore_eos && self.vocab.is_eog(id) {
            self.finish = FinishReason::Stop;
            return Ok(None);
        }
        let text = self.detok.push(id)?;
        let (emit, stopped) = self.filter.push(&text);
        if self.stream {
            if !emit.is_empty() && events.send(GenEvent::Text(emit)).is_err() {
                // The client went away: nobody reads the rest.
                return Err(EngineError::Cancelled {
                    generated: self.generated,
                });
            }
        } else {
            self.held.push_str(&emit);
        }
        if stopped {
            self.finish = FinishReason::Stop;
            return Ok(None);
        }
        if self.generated == self.max_tokens {
            return Ok(None);
        }
        if events.is_closed() {
            return Err(EngineError::Cancelled {
                generated: self.generated,
            });
        }
        Ok(Some(id))
    }

    /// Sends what was held back and returns the generation's statistics.
    pub(super) fn end(mut self, events: &UnboundedSender<GenEvent>) -> GenStats {
        let mut rest = std::mem::take(&mut self.held);
        if self.finish == FinishReason::Length {
            let (emit, _) = self.filter.push(&self.detok.finish());
            rest.push_str(&emit);
        }
        rest.push_str(&self.filter.finish());
        if !rest.is_empty() {
            let _ = events.send(GenEvent::Text(rest));
        }
        let now = Instant::now();
        let first = self.first_token_at.unwrap_or(now);
        GenStats {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.generated,
            finish_reason: self.finish,
            ttft: first - self.started,
            decode: now - first,
        }
    }
}

/// Ends a job the engine took at `started`: counts it, gives its place in the queue back,
/// then tells the client (so a client that sends its next request at once finds room).
pub(super) fn conclude(
    job: Job,
    result: Result<GenStats, EngineError>,
    started: Instant,
    tally: &Load,
) {
    if let Err(EngineError::Cancelled { generated }) = result {
        tally.cancel(generated);
    }
    tally.finish(started.elapsed());
    let Job {
        events, _ticket, ..
    } = job;
    drop(_ticket);
    let _ = events.send(match result {
        Ok(stats) => GenEvent::Done(stats),
        Err(e) => GenEvent::Error(e),
    });
}

/// Takes a job off the queue: counts it as running and returns it with the time it was
/// taken, unless its client already went away (then it is ended unrun and counted).
pub(super) fn accept(job: Job, tally: &Load) -> Option<(Job, Instant)> {
    let started = Instant::now();
    tally.start();
    if job.events.is_closed() {
        conclude(
            job,
            Err(EngineError::Cancelled { generated: 0 }),
            started,
            tally,
        );
        return None;
    }
    Some((job, started))
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
        if let Some((job, started)) = accept(job, tally) {
            let result = run(vocab, model, &job, started);
            conclude(job, result, started, tally);
        }
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
    let (prompt, mut stream) = Stream::begin(vocab, &job.request, model.n_ctx() as usize, started)?;
    model.reset()?;
    let n_chunks = prompt.len().div_ceil(PROMPT_BATCH);
    let mut next = None;
    for (i, chunk) in prompt.chunks(PROMPT_BATCH).enumerate() {
        if job.events.is_closed() {
            return Err(EngineError::Cancelled { generated: 0 });
        }
        let logits = model.forward(chunk)?;
        if i + 1 == n_chunks && stream.wants_tokens() {
            next = stream.step(logits, &job.events)?;
        }
    }
    while let Some(id) = next {
        next = stream.step(model.forward(&[id])?, &job.events)?;
    }
    Ok(stream.end(&job.events))
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
