//! The runtime's request bodies: what `/v1/chat/completions` and `/v1/completions` parse and
//! check before an engine sees a request.

use edgepack_runtime::server::{parse_chat_request, parse_completion_request};

/// Both endpoints' parsing of one body; the request is accepted if either endpoint takes it.
pub fn request(data: &[u8]) -> Result<(), String> {
    let chat = parse_chat_request(data);
    let completion = parse_completion_request(data);
    match (chat, completion) {
        (Ok(_), _) | (_, Ok(_)) => Ok(()),
        (Err(a), Err(b)) => Err(format!("chat: {a}; completion: {b}")),
    }
}
