//! Documents cut into chunks by the encoder's own tokens: windows of `tokens` tokens that
//! overlap by `overlap`, each kept as a byte range of the document so a passage can be shown
//! and traced to its source.
//!
//! A document is fed to a [`Chunker`] piece by piece, so one larger than memory is cut as it
//! is read; cut at whitespace, the pieces give the windows the whole text gives.

use std::collections::VecDeque;

use tokenizers::Tokenizer;

use crate::error::{EncoderError, Result};

/// A chunk of a document: bytes `start..end` of its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

/// Cuts a document fed in pieces into windows of `tokens` tokens overlapping by `overlap`
/// (no special tokens; the encoder adds its own when it embeds a chunk).
pub struct Chunker {
    tok: Tokenizer,
    tokens: usize,
    overlap: usize,
    /// Byte ranges of the tokens from the start of the next window on.
    pending: VecDeque<(usize, usize)>,
}

impl Chunker {
    pub fn new(tok: &Tokenizer, tokens: usize, overlap: usize) -> Result<Chunker> {
        if tokens == 0 || overlap >= tokens {
            return Err(EncoderError::Invalid(format!(
                "chunks of {tokens} tokens overlapping by {overlap}: the overlap must be smaller than the chunk"
            )));
        }
        // The encoder's tokenizer truncates at its maximum length; a document must not be.
        let mut tok = tok.clone();
        tok.with_truncation(None)
            .map_err(|e| EncoderError::Invalid(format!("tokenizer: {e}")))?;
        Ok(Chunker {
            tok,
            tokens,
            overlap,
            pending: VecDeque::new(),
        })
    }

    /// Feeds the next piece of the document, which starts at byte `base` of it. A piece
    /// should end where the tokenizer does not join across (whitespace); the windows it
    /// completes are returned. A window is complete once a token after it is seen, so the
    /// last one comes from [`Chunker::finish`].
    pub fn feed(&mut self, piece: &str, base: usize) -> Result<Vec<Span>> {
        let enc = self
            .tok
            .encode(piece, false)
            .map_err(|e| EncoderError::Invalid(format!("tokenizer: cannot encode: {e}")))?;
        for &(s, e) in enc.get_offsets() {
            if e <= s {
                continue;
            }
            // Chunks are sliced out of the text by these offsets.
            if e > piece.len() || !piece.is_char_boundary(s) || !piece.is_char_boundary(e) {
                return Err(EncoderError::Invalid(format!(
                    "tokenizer: a token at bytes {s}..{e} does not lie on characters of the text"
                )));
            }
            self.pending.push_back((base + s, base + e));
        }
        let mut out = Vec::new();
        let step = self.tokens - self.overlap;
        while self.pending.len() > self.tokens {
            out.push(Span {
                start: self.pending[0].0,
                end: self.pending[self.tokens - 1].1,
            });
            self.pending.drain(..step);
        }
        Ok(out)
    }

    /// Where the text still needed for the windows to come starts (`None`: no token is
    /// pending).
    pub fn needed_from(&self) -> Option<usize> {
        self.pending.front().map(|t| t.0)
    }

    /// The last window, ending at the document's last token (none for an empty or
    /// all-whitespace document).
    pub fn finish(&mut self) -> Option<Span> {
        let span = Span {
            start: self.pending.front()?.0,
            end: self.pending.back()?.1,
        };
        self.pending.clear();
        Some(span)
    }
}

/// Where to end a piece of a document read so far (`text`, not its end): after its last
/// line break, else after its last whitespace, else the whole of it (one word longer than
/// a read, which the tokenizer would not keep whole anyway).
pub fn piece_end(text: &str) -> usize {
    if let Some(i) = text.rfind('\n') {
        return i + 1;
    }
    match text.char_indices().rev().find(|(_, c)| c.is_whitespace()) {
        Some((i, c)) => i + c.len_utf8(),
        None => text.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BERT-style tokenizer (WordPiece over whitespace and punctuation, as MiniLM's).
    fn tokenizer() -> Tokenizer {
        let words = [
            "[UNK]", "the", "board", "##s", "reset", "press", "button", ",", ".", "for", "5",
            "seconds", "e", "##t", "##e", "日", "本",
        ];
        let vocab: serde_json::Map<String, serde_json::Value> = words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), i.into()))
            .collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": {"type": "BertNormalizer", "clean_text": true,
                           "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 100, "vocab": vocab},
        });
        json.to_string().parse().expect("a WordPiece tokenizer")
    }

    /// The windows of the whole of `text` fed at once (none for an empty or blank text).
    fn chunk(tok: &Tokenizer, text: &str, tokens: usize, overlap: usize) -> Result<Vec<Span>> {
        let mut c = Chunker::new(tok, tokens, overlap)?;
        let mut out = c.feed(text, 0)?;
        out.extend(c.finish());
        Ok(out)
    }

    /// What the knowledge base's reader does: pieces of about `block` bytes ending at a line
    /// break or whitespace, the last one at the end.
    fn fed_in_blocks(tok: &Tokenizer, text: &str, block: usize, t: usize, o: usize) -> Vec<Span> {
        let mut c = Chunker::new(tok, t, o).unwrap();
        let mut out = Vec::new();
        let mut at = 0;
        while at < text.len() {
            let mut end = (at + block).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            let read = &text[at..end];
            let cut = if end == text.len() {
                read.len()
            } else {
                piece_end(read)
            };
            out.extend(c.feed(&read[..cut], at).unwrap());
            at += cut;
        }
        out.extend(c.finish());
        out
    }

    #[test]
    fn a_document_fed_in_blocks_gives_the_windows_of_the_whole_text() {
        let tok = tokenizer();
        let line = "The boards reset, press the button for 5 seconds. été 日本 unknown\n";
        let mut text = String::new();
        for i in 0..40 {
            text.push_str(line);
            if i % 7 == 0 {
                // Lines of one long run of words, so some blocks end at a space.
                text.push_str(&"press button ".repeat(9));
            }
        }
        for (t, o) in [(5, 2), (4, 0), (3, 2), (128, 32)] {
            let whole = chunk(&tok, &text, t, o).unwrap();
            assert!(!whole.is_empty());
            assert_eq!(whole.last().unwrap().end, text.trim_end().len());
            for block in [17, 64, 100, 1000, text.len()] {
                assert_eq!(
                    fed_in_blocks(&tok, &text, block, t, o),
                    whole,
                    "windows of {t} overlapping by {o}, read {block} bytes at a time"
                );
            }
        }
        // Windows of 5 overlapping by 2 start every 3 tokens.
        let w = chunk(&tok, "press the button for 5 seconds . the board", 5, 2).unwrap();
        let texts: Vec<&str> = w
            .iter()
            .map(|s| &"press the button for 5 seconds . the board"[s.start..s.end])
            .collect();
        assert_eq!(
            texts,
            [
                "press the button for 5",
                "for 5 seconds . the",
                ". the board"
            ]
        );
    }

    #[test]
    fn empty_and_blank_documents_have_no_windows_and_bad_sizes_are_refused() {
        let tok = tokenizer();
        assert!(chunk(&tok, "", 4, 1).unwrap().is_empty());
        assert!(chunk(&tok, " \n\t\n", 4, 1).unwrap().is_empty());
        assert!(Chunker::new(&tok, 4, 4).is_err());
        assert!(Chunker::new(&tok, 0, 0).is_err());
    }

    #[test]
    fn a_piece_ends_at_the_last_line_break_else_the_last_whitespace() {
        assert_eq!(piece_end("a b\nc d"), 4);
        assert_eq!(piece_end("a bé\u{3000}cd"), "a bé\u{3000}".len());
        assert_eq!(piece_end("abc"), 3);
    }
}
