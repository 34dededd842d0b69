//! Calibration and evaluation text: reading a user's data (plain UTF-8 text, or JSONL with a
//! `text` field or chat `messages` per line, the latter rendered with the model's chat
//! template) and the small default corpus of edgepack's own that ships in
//! `recipes/calibration/`.

use std::path::Path;

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
