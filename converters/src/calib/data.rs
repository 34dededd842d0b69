//! Calibration and evaluation text: reading a user's data (plain UTF-8 text, or JSONL with a
//! `text` field or chat `messages` per line, the latter rendered with the model's chat
//! template) and the small default corpus of edgepack's own that ships in
//! `recipes/calibration/`.

use std::path::Path;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::model::chat::{self, Message};
use crate::model::Model;

/// One unit of data: plain text, or a conversation to render with the chat template.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    Text(String),
    Chat(Vec<Message>),
}

/// edgepack's own calibration text, used when no data is given.
pub const DEFAULT_CORPUS: &str = include_str!("../../../recipes/calibration/default.txt");
/// How the default corpus is named in files that record their dataset.
pub const DEFAULT_CORPUS_NAME: &str = "edgepack:recipes/calibration/default.txt";

/// Reads data: JSONL (a `text` string or a `messages` list of `{role, content}` per line) when
/// the file is `.jsonl` or its first non-blank line starts with `{`, else the whole file as
/// one text. Empty data and non-UTF-8 bytes are errors naming the file.
pub fn read_samples(path: &Path) -> Result<Vec<Sample>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::format(
            path,
            "encoding",
            format!(
                "calibration data is not UTF-8 text (invalid byte at offset {})\nhint: give plain UTF-8 text or JSONL with a \"text\" field",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    let Some(first) = text.lines().find(|l| !l.trim().is_empty()) else {
        return Err(Error::format(
            path,
            "text",
            "calibration data is empty\nhint: give a few kilobytes of text like what the model will see",
        ));
    };
    let jsonl =
        path.extension().is_some_and(|e| e == "jsonl") || first.trim_start().starts_with('{');
    if !jsonl {
        return Ok(vec![Sample::Text(text)]);
    }
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let field = format!("line {}", i + 1);
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::format(path, &field, format!("not JSON: {e}")))?;
        if let Some(m) = v.get("messages") {
            let msgs: Vec<Message> = serde_json::from_value(m.clone()).map_err(|e| {
                Error::format(
                    path,
                    format!("{field}: messages"),
                    format!("not a list of {{\"role\", \"content\"}} objects: {e}"),
                )
            })?;
            samples.push(Sample::Chat(msgs));
            continue;
        }
        let t = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
            Error::format(
                path,
                &field,
                "no string field \"text\" and no \"messages\"\nhint: JSONL data needs {\"text\": \"...\"} or {\"messages\": [{\"role\": \"user\", \"content\": \"...\"}]} per line",
            )
        })?;
        samples.push(Sample::Text(t.to_string()));
    }
    let blank = |s: &Sample| match s {
        Sample::Text(t) => t.trim().is_empty(),
        Sample::Chat(m) => m.is_empty(),
    };
    if samples.iter().all(blank) {
        return Err(Error::format(
            path,
            "text",
            "the data is empty (every \"text\" is blank)",
        ));
    }
    Ok(samples)
}

/// The samples of `path` as texts for `model`: conversations rendered with its chat template.
pub fn read_texts(path: &Path, model: &Model) -> Result<Vec<String>> {
    read_samples(path)?
        .into_iter()
        .map(|s| match s {
            Sample::Text(t) => Ok(t),
            Sample::Chat(m) => chat::render(&model.tokenizer, &m, false, &model.source),
        })
        .collect()
}

/// The texts of `path`, or the default corpus when no path is given, with the dataset name
/// that files record.
pub fn texts_or_default(path: Option<&Path>, model: &Model) -> Result<(Vec<String>, String)> {
    match path {
        Some(p) => Ok((read_texts(p, model)?, p.display().to_string())),
        None => Ok((
            vec![DEFAULT_CORPUS.to_string()],
            DEFAULT_CORPUS_NAME.to_string(),
        )),
    }
}

/// llama-imatrix ignores matmuls over fewer token rows than this (`src1->ne[1] < 16`).
pub const MIN_CHUNK_SIZE: usize = 16;

/// Calibration text cut into model-sized token chunks (what imatrix, the statistics and eval
/// run over).
#[derive(Debug, Clone)]
pub struct Chunks {
    /// Every token of the text (BOS first when the tokenizer adds one).
    pub n_tokens: usize,
    /// The chunks that will run, BOS already in place.
    pub chunks: Vec<Vec<u32>>,
}

/// The model's `tokenizer.json` loaded by the tokenizers library; a missing or unreadable one
/// is an error naming the model.
pub(crate) fn tokenizer(model: &Model) -> Result<tokenizers::Tokenizer> {
    let src = &model.source;
    let json = model.tokenizer.tokenizer_json.as_deref().ok_or_else(|| {
        Error::format(
            src,
            "tokenizer.json",
            "missing: edgepack tokenizes text with the model's tokenizer.json",
        )
    })?;
    tokenizers::Tokenizer::from_str(json).map_err(|e| {
        Error::format(
            src,
            "tokenizer.json",
            format!("the tokenizers library cannot load it: {e}"),
        )
    })
}

/// The BOS id the tokenizer's post-processor puts in front of a text, if it does.
pub(crate) fn added_bos(tok: &tokenizers::Tokenizer, src: &Path) -> Result<Option<u32>> {
    let enc = |special: bool| -> Result<Vec<u32>> {
        tok.encode("a", special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::format(src, "tokenizer.json", format!("cannot encode: {e}")))
    };
    let (with, without) = (enc(true)?, enc(false)?);
    Ok(match with.first() {
        Some(&first) if with.len() > without.len() && with[1..].starts_with(&without) => {
            Some(first)
        }
        _ => None,
    })
}

/// Tokenizes `texts` (joined by blank lines, as one document) with the model's tokenizer and
/// cuts the tokens into chunks as llama-imatrix does. Fewer tokens than one chunk is an error.
pub fn chunk_tokens(
    model: &Model,
    texts: &[String],
    chunk_size: usize,
    max_chunks: Option<usize>,
) -> Result<Chunks> {
    let src = &model.source;
    if chunk_size < MIN_CHUNK_SIZE {
        return Err(Error::Invalid(format!(
            "chunk size {chunk_size} is below {MIN_CHUNK_SIZE}: llama-imatrix records nothing for batches that small"
        )));
    }
    let tok = tokenizer(model)?;
    let bos = added_bos(&tok, src)?;
    let text = texts.join("\n\n");
    let ids = tok
        .encode(text.as_str(), false)
        .map_err(|e| Error::format(src, "tokenizer.json", format!("cannot encode: {e}")))?;
    let mut tokens = Vec::with_capacity(ids.len() + 1);
    tokens.extend(bos);
    tokens.extend_from_slice(ids.get_ids());
    let n_max = tokens.len() / chunk_size;
    if n_max == 0 {
        return Err(Error::Invalid(format!(
            "the text tokenizes to {} tokens, fewer than one chunk of {chunk_size}; give more text or a smaller chunk size",
            tokens.len()
        )));
    }
    let n = max_chunks.map_or(n_max, |m| m.min(n_max));
    let chunks = tokens
        .chunks_exact(chunk_size)
        .take(n)
        .map(|c| {
            let mut c = c.to_vec();
            if let Some(b) = bos {
                c[0] = b;
            }
            c
        })
        .collect();
    Ok(Chunks {
        n_tokens: tokens.len(),
        chunks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_lines_become_texts_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.jsonl");
        std::fs::write(
            &p,
            "{\"text\": \"a\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"b\"}]}\n",
        )
        .unwrap();
        assert_eq!(
            read_samples(&p).unwrap(),
            vec![
                Sample::Text("a".into()),
                Sample::Chat(vec![Message::user("b")])
            ]
        );
        std::fs::write(&p, "{\"text\": \"a\"}\n{\"x\": 1}\n").unwrap();
        let err = read_samples(&p).unwrap_err().to_string();
        assert!(err.contains("c.jsonl: line 2"), "{err}");
        std::fs::write(&p, "{\"messages\": [{\"role\": 1}]}\n").unwrap();
        let err = read_samples(&p).unwrap_err().to_string();
        assert!(err.contains("c.jsonl: line 1: messages"), "{err}");
    }

    #[test]
    fn empty_and_non_utf8_data_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.txt");
        std::fs::write(&p, "  \n\n").unwrap();
        assert!(read_samples(&p)
            .unwrap_err()
            .to_string()
            .contains("c.txt: text"));
        std::fs::write(&p, b"caf\xe9").unwrap();
        let err = read_samples(&p).unwrap_err().to_string();
        assert!(
            err.contains("not UTF-8") && err.contains("offset 3"),
            "{err}"
        );
        assert!(!DEFAULT_CORPUS.is_empty());
    }
}
