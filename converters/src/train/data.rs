//! Fine-tuning data: JSONL lines of chat `messages`, `prompt`/`completion` pairs,
//! `question`/`answer` pairs (the QA format `eval --qa` reads) or plain `text`, tokenized with
//! the model's own tokenizer and chat template, with a mask of the tokens the loss is taken on
//! (the assistant's / completion's tokens by default, as TRL's SFT trainer does).

use std::ops::Range;
use std::path::Path;
use std::str::FromStr;

use serde_json::Value as Json;

use crate::calib::data::{added_bos, tokenizer};
use crate::calib::forward::splitmix;
use crate::error::{Error, Result};
use crate::model::chat::{self, Message};
use crate::model::Model;

/// Which tokens carry the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainOn {
    /// The assistant turns of a conversation, the completion of a prompt/completion pair, the
    /// answer of a question/answer pair; every token of plain text.
    Completion,
    /// Every token.
    All,
}

impl FromStr for TrainOn {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "completion" | "assistant" => Ok(TrainOn::Completion),
            "all" => Ok(TrainOn::All),
            _ => Err(format!(
                "`{s}`: give `completion` (the answer tokens) or `all`"
            )),
        }
    }
}

/// One tokenized training sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// 1-based line of the data file it came from.
    pub line: usize,
    pub ids: Vec<u32>,
    /// Per token: whether the model is trained to predict it (the first token never is).
    pub train: Vec<bool>,
}

impl Example {
    /// Tokens whose prediction is trained.
    pub fn n_labels(&self) -> usize {
        self.train.iter().skip(1).filter(|&&t| t).count()
    }
}

/// A tokenized data file and what reading it dropped.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// Samples cut at the sequence length (their head kept).
    pub truncated: usize,
    /// 1-based lines dropped because no trained token was left within the sequence length.
    pub dropped: Vec<usize>,
}

/// A sample before tokenization: text and the byte ranges of it the loss is taken on.
struct Rendered {
    text: String,
    spans: Vec<Range<usize>>,
    /// Plain text gets the tokenizer's BOS in front, as when the model reads a document.
    bos: bool,
}

fn str_field(v: &Json, key: &str, path: &Path, line: usize) -> Result<Option<String>> {
    match v.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(Error::format(
            path,
            format!("line {line}: {key}"),
            format!("expected a string, found {}", kind(other)),
        )),
    }
}

fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

fn messages(v: &Json, key: &str, path: &Path, line: usize) -> Result<Vec<Message>> {
    let msgs: Vec<Message> = serde_json::from_value(v.clone()).map_err(|e| {
        Error::format(
            path,
            format!("line {line}: {key}"),
            format!("not a list of {{\"role\", \"content\"}} objects: {e}"),
        )
    })?;
    for (i, m) in msgs.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(Error::format(
                path,
                format!("line {line}: {key}[{i}].role"),
                format!("`{}`: expected system, user or assistant", m.role),
            ));
        }
    }
    Ok(msgs)
}

/// Renders a conversation and finds the byte ranges of its assistant turns: the text the
/// template adds between the generation prompt before a turn and the end of that turn (the
/// answer and its end-of-turn marker).
fn render_chat(
    model: &Model,
    msgs: &[Message],
    path: &Path,
    line: usize,
    train_on: TrainOn,
) -> Result<Rendered> {
    let render = |m: &[Message], gen: bool| -> Result<String> {
        chat::render(&model.tokenizer, m, gen, &model.source).map_err(|e| {
            Error::format(
                path,
                format!("line {line}: messages"),
                format!("the chat template cannot render it: {e}"),
            )
        })
    };
    let text = render(msgs, false)?;
    let mut spans = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = render(&msgs[..i], true)?;
        let through = render(&msgs[..=i], false)?;
        if !through.starts_with(&before) || !text.starts_with(&through) {
            return Err(Error::unsupported(
                &model.source,
                "chat_template",
                format!(
                    "rendering {path}:{line} turn by turn does not give prefixes of the whole conversation, so the assistant tokens cannot be told apart\nhint: use --train-on all, or prompt/completion data",
                    path = path.display()
                ),
            ));
        }
        spans.push(before.len()..through.len());
    }
    if spans.is_empty() && train_on == TrainOn::Completion {
        return Err(Error::format(
            path,
            format!("line {line}: messages"),
            "the conversation has no assistant turn to train on\nhint: add one, or train on every token with --train-on all",
        ));
    }
    Ok(Rendered {
        text,
        spans,
        bos: false,
    })
}

/// Reads and tokenizes a fine-tuning JSONL file. Malformed lines, samples without an answer
/// and an empty result are errors naming the file and line.
pub fn read_dataset(
    path: &Path,
    model: &Model,
    seq_len: usize,
    train_on: TrainOn,
) -> Result<Dataset> {
    if seq_len < 2 {
        return Err(Error::Invalid(format!(
            "sequence length {seq_len}: at least 2 tokens are needed to predict one"
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::format(
            path,
            "encoding",
            format!(
                "not UTF-8 (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    let src = &model.source;
    let tok = tokenizer(model)?;
    let bos = added_bos(&tok, src)?;
    let eos = eos_id(model, &tok);

    let mut out = Dataset {
        examples: Vec::new(),
        truncated: 0,
        dropped: Vec::new(),
    };
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let v: Json = serde_json::from_str(raw)
            .map_err(|e| Error::format(path, format!("line {line}"), format!("not JSON: {e}")))?;
        if !v.is_object() {
            return Err(Error::format(
                path,
                format!("line {line}"),
                format!("expected a JSON object, found {}", kind(&v)),
            ));
        }
        let r = if let Some(m) = v.get("messages") {
            render_chat(
                model,
                &messages(m, "messages", path, line)?,
                path,
                line,
                train_on,
            )?
        } else if let Some(q) = str_field(&v, "question", path, line)? {
            let a = str_field(&v, "answer", path, line)?.ok_or_else(|| {
                Error::format(
                    path,
                    format!("line {line}"),
                    "a \"question\" without an \"answer\"",
                )
            })?;
            render_chat(
                model,
                &[Message::user(&q), Message::assistant(&a)],
                path,
                line,
                train_on,
            )?
        } else if v.get("prompt").is_some() {
            prompt_completion(model, &v, path, line, train_on)?
        } else if let Some(t) = str_field(&v, "text", path, line)? {
            let n = t.len();
            Rendered {
                text: t,
                spans: std::iter::once(0..n).collect(),
                bos: true,
            }
        } else {
            return Err(Error::format(
                path,
                format!("line {line}"),
                "no \"messages\", \"prompt\"/\"completion\", \"question\"/\"answer\" or \"text\" field\nhint: {\"messages\": [{\"role\": \"user\", \"content\": \"...\"}, {\"role\": \"assistant\", \"content\": \"...\"}]} per line",
            ));
        };
        let enc = tok
            .encode(r.text.as_str(), false)
            .map_err(|e| Error::format(src, "tokenizer.json", format!("cannot encode: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 2);
        let mut train = Vec::with_capacity(enc.len() + 2);
        if r.bos {
            if let Some(b) = bos {
                ids.push(b);
                train.push(false);
            }
        }
        for (&id, &(start, end)) in enc.get_ids().iter().zip(enc.get_offsets()) {
            ids.push(id);
            let inside = r.spans.iter().any(|s| start >= s.start && start < s.end)
                // A token that starts before a span's end and reaches into it (merged across
                // the boundary) is trained when most of it lies inside.
                || r.spans.iter().any(|s| start < s.start && end > s.start && end - s.start > s.start - start);
            train.push(train_on == TrainOn::All || inside);
        }
        if r.bos {
            // Documents end with EOS, so the model learns where they stop (as TRL adds it).
            if let Some(e) = eos {
                if ids.last() != Some(&e) {
                    ids.push(e);
                    train.push(true);
                }
            }
        }
        if ids.len() > seq_len {
            ids.truncate(seq_len);
            train.truncate(seq_len);
            out.truncated += 1;
        }
        let ex = Example { line, ids, train };
        if ex.n_labels() == 0 {
            out.dropped.push(line);
            continue;
        }
        out.examples.push(ex);
    }
    if out.examples.is_empty() {
        return Err(Error::format(
            path,
            "samples",
            if out.dropped.is_empty() {
                "the file holds no samples".to_string()
            } else {
                format!(
                    "no sample has a trained token within the sequence length of {seq_len} (lines {})\nhint: raise --seq-len",
                    list(&out.dropped)
                )
            },
        ));
    }
    Ok(out)
}

fn list(lines: &[usize]) -> String {
    let mut s: Vec<String> = lines.iter().take(10).map(|l| l.to_string()).collect();
    if lines.len() > 10 {
        s.push(format!("and {} more", lines.len() - 10));
    }
    s.join(", ")
}

/// `prompt`/`completion`: both strings (concatenated, as TRL's standard format) or both
/// message lists (conversational: the prompt turns, then the completion turns).
fn prompt_completion(
    model: &Model,
    v: &Json,
    path: &Path,
    line: usize,
    train_on: TrainOn,
) -> Result<Rendered> {
    let p = &v["prompt"];
    let c = v.get("completion").ok_or_else(|| {
        Error::format(
            path,
            format!("line {line}"),
            "a \"prompt\" without a \"completion\"",
        )
    })?;
    match (p, c) {
        (Json::String(p), Json::String(c)) => Ok(Rendered {
            text: format!("{p}{c}"),
            spans: std::iter::once(p.len()..p.len() + c.len()).collect(),
            bos: true,
        }),
        (Json::Array(_), Json::Array(_)) => {
            let mut msgs = messages(p, "prompt", path, line)?;
            let n_prompt = msgs.len();
            msgs.extend(messages(c, "completion", path, line)?);
            if msgs[n_prompt..].iter().all(|m| m.role != "assistant") {
                return Err(Error::format(
                    path,
                    format!("line {line}: completion"),
                    "the completion has no assistant turn",
                ));
            }
            let mut r = render_chat(model, &msgs, path, line, train_on)?;
            // Only the completion's turns are answers to learn.
            let prompt_end =
                chat::render(&model.tokenizer, &msgs[..n_prompt], true, &model.source)?.len();
            r.spans.retain(|s| s.start >= prompt_end);
            Ok(r)
        }
        _ => Err(Error::format(
            path,
            format!("line {line}: prompt"),
            format!(
                "prompt is {} and completion {}: give two strings or two message lists",
                kind(p),
                kind(c)
            ),
        )),
    }
}

/// The EOS id named by `tokenizer_config.json`'s `eos_token`.
fn eos_id(model: &Model, tok: &tokenizers::Tokenizer) -> Option<u32> {
    let cfg = model.tokenizer.tokenizer_config.as_ref()?;
    let e = cfg.get("eos_token")?;
    let s = e
        .as_str()
        .or_else(|| e.get("content").and_then(Json::as_str))?;
    tok.token_to_id(s)
}

/// Splits `n` samples into train and eval indices, shuffled by `seed`: the eval share is
/// `ceil(n * fraction)` samples (none at 0, at least one train sample always).
pub fn split(n: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(&mut order, seed ^ 0x5370_6C69_7400_0000);
    let n_eval = ((n as f64 * fraction).ceil() as usize).min(n.saturating_sub(1));
    let eval = order[..n_eval].to_vec();
    let mut train = order[n_eval..].to_vec();
    train.sort_unstable();
    let mut eval = eval;
    eval.sort_unstable();
    (train, eval)
}

/// Fisher-Yates with SplitMix64: the same order for the same seed on every machine.
pub fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut state = seed;
    for i in (1..v.len()).rev() {
        let j = (splitmix(&mut state) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_deterministic_disjoint_and_keeps_a_training_sample() {
        let (t, e) = split(10, 0.2, 7);
        assert_eq!((t.len(), e.len()), (8, 2));
        assert_eq!(split(10, 0.2, 7), (t.clone(), e.clone()));
        assert!(e.iter().all(|i| !t.contains(i)));
        assert_ne!(split(10, 0.2, 8).1, e);
        assert_eq!(split(1, 0.5, 0), (vec![0], vec![]));
        assert_eq!(split(5, 0.0, 0).1.len(), 0);
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<u32> = (0..100).collect();
        shuffle(&mut v, 3);
        assert_ne!(v, (0..100).collect::<Vec<_>>());
        v.sort_unstable();
        assert_eq!(v, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn train_on_parses_its_two_values() {
        assert_eq!("all".parse::<TrainOn>(), Ok(TrainOn::All));
        assert_eq!("completion".parse::<TrainOn>(), Ok(TrainOn::Completion));
        assert!("most".parse::<TrainOn>().unwrap_err().contains("most"));
    }
}
