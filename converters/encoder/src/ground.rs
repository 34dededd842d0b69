//! A question grounded in passages: the prompt the model answers when retrieval found
//! something. The runtime on the board and the recipe's evaluation on the workstation build
//! it here, so the answers a release report scores are asked the way the board asks them.

use crate::kb::Hit;

/// Passages a retrieval bundle puts into the prompt unless told otherwise.
pub const DEFAULT_TOP_K: u32 = 3;
/// The answer to an out-of-domain question unless told otherwise.
pub const DEFAULT_REFUSAL: &str =
    "I can only answer questions about the documentation I was given, and this question is not covered by it.";
/// The user turn a retrieval bundle sends to the model unless told otherwise.
pub const DEFAULT_TEMPLATE: &str = "Answer the question using only the passages below. If they do not answer it, say that you do not know.\n\n{context}\n\nQuestion: {question}";

/// The passages as the prompt numbers them: `[1] text`, blank-line separated, best first.
pub fn context(hits: &[Hit]) -> String {
    hits.iter()
        .enumerate()
        .map(|(i, h)| format!("[{}] {}", i + 1, h.text.trim()))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// `template` with `{context}` and `{question}` filled in, in one pass so that text inside a
/// passage or the question is never itself substituted; other braces stay as they are.
pub fn fill(template: &str, context: &str, question: &str) -> String {
    let mut out = String::with_capacity(template.len() + context.len() + question.len());
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("{context}") {
            out.push_str(context);
            rest = t;
        } else if let Some(t) = tail.strip_prefix("{question}") {
            out.push_str(question);
            rest = t;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The user turn for `question` answered from `hits`.
pub fn prompt(template: &str, hits: &[Hit], question: &str) -> String {
    fill(template, &context(hits), question)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(text: &str) -> Hit {
        Hit {
            chunk: 0,
            score: 0.5,
            source: "manual.txt".into(),
            start: 0,
            end: text.len() as u64,
            text: text.into(),
        }
    }

    #[test]
    fn passages_are_numbered_and_keys_filled_once_leaving_braces_in_text_alone() {
        let hits = [
            hit(" E1 means {question} overheating. "),
            hit("Reset: hold 5 s."),
        ];
        assert_eq!(
            context(&hits),
            "[1] E1 means {question} overheating.\n\n[2] Reset: hold 5 s."
        );
        assert_eq!(
            prompt("Use:\n{context}\nQ: {question} {other", &hits, "What is {context}?"),
            "Use:\n[1] E1 means {question} overheating.\n\n[2] Reset: hold 5 s.\nQ: What is {context}? {other"
        );
    }
}
