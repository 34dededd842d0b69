//! Documents cut into chunks by the encoder's own tokens: windows of `tokens` tokens that
//! overlap by `overlap`, each kept as a byte range of the document so a passage can be shown
//! and traced to its source.

use tokenizers::Tokenizer;

use crate::error::{EncoderError, Result};

/// A chunk of a document: bytes `start..end` of its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

/// Cuts `text` into windows of `tokens` tokens overlapping by `overlap` (no special tokens;
/// the encoder adds its own when it embeds a chunk). An empty or all-whitespace text has none.
pub fn chunk(tok: &Tokenizer, text: &str, tokens: usize, overlap: usize) -> Result<Vec<Span>> {
    if tokens == 0 || overlap >= tokens {
        return Err(EncoderError::Invalid(format!(
            "chunks of {tokens} tokens overlapping by {overlap}: the overlap must be smaller than the chunk"
        )));
    }
    // The encoder's tokenizer truncates at its maximum length; a document must not be.
    let mut whole = tok.clone();
    whole
        .with_truncation(None)
        .map_err(|e| EncoderError::Invalid(format!("tokenizer: {e}")))?;
    let enc = whole
        .encode(text, false)
        .map_err(|e| EncoderError::Invalid(format!("tokenizer: cannot encode: {e}")))?;
    let offsets: Vec<(usize, usize)> = enc
        .get_offsets()
        .iter()
        .copied()
        .filter(|(s, e)| e > s)
        .collect();
    let mut out = Vec::new();
    let step = tokens - overlap;
    let mut i = 0;
    while i < offsets.len() {
        let last = (i + tokens).min(offsets.len()) - 1;
        out.push(Span {
            start: offsets[i].0,
            end: offsets[last].1,
        });
        if last + 1 == offsets.len() {
            break;
        }
        i += step;
    }
    Ok(out)
}
