//! Calibration text: reading a user's data (plain UTF-8 text, or JSONL with a `text` field per
//! line) and the small default corpus of edgepack's own that ships in `recipes/calibration/`.

use std::path::Path;

use crate::error::{Error, Result};

/// edgepack's own calibration text, used when no data is given.
pub const DEFAULT_CORPUS: &str = include_str!("../../../recipes/calibration/default.txt");
/// How the default corpus is named in files that record their dataset.
pub const DEFAULT_CORPUS_NAME: &str = "edgepack:recipes/calibration/default.txt";

/// Reads calibration texts: JSONL (a `text` string per line) when the file is `.jsonl` or its
/// first non-blank line starts with `{`, else the whole file as one text. Empty data and
/// non-UTF-8 bytes are errors naming the file.
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
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
        return Ok(vec![text]);
    }
    let mut texts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let field = format!("line {}", i + 1);
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::format(path, &field, format!("not JSON: {e}")))?;
        let t = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
            Error::format(
                path,
                &field,
                "no string field \"text\"\nhint: JSONL calibration data needs {\"text\": \"...\"} per line",
            )
        })?;
        texts.push(t.to_string());
    }
    if texts.iter().all(|t| t.trim().is_empty()) {
        return Err(Error::format(
            path,
            "text",
            "calibration data is empty (every \"text\" is blank)",
        ));
    }
    Ok(texts)
}

/// The texts of `path`, or the default corpus when no path is given, with the dataset name
/// that files record.
pub fn texts_or_default(path: Option<&Path>) -> Result<(Vec<String>, String)> {
    match path {
        Some(p) => Ok((read_texts(p)?, p.display().to_string())),
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
        std::fs::write(&p, "{\"text\": \"a\"}\n\n{\"text\": \"b\"}\n").unwrap();
        assert_eq!(read_texts(&p).unwrap(), vec!["a", "b"]);
        std::fs::write(&p, "{\"text\": \"a\"}\n{\"x\": 1}\n").unwrap();
        let err = read_texts(&p).unwrap_err().to_string();
        assert!(err.contains("c.jsonl: line 2"), "{err}");
    }

    #[test]
    fn empty_and_non_utf8_data_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.txt");
        std::fs::write(&p, "  \n\n").unwrap();
        assert!(read_texts(&p)
            .unwrap_err()
            .to_string()
            .contains("c.txt: text"));
        std::fs::write(&p, b"caf\xe9").unwrap();
        let err = read_texts(&p).unwrap_err().to_string();
        assert!(
            err.contains("not UTF-8") && err.contains("offset 3"),
            "{err}"
        );
        assert!(!DEFAULT_CORPUS.is_empty());
    }
}
