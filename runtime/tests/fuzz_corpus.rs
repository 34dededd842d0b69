//! The request fuzz target's body, uninstrumented, over its checked-in seed corpus
//! (tests/fuzz/corpus/runtime_request/, every seed accepted); the instrumented target runs only
//! under `cargo xtask fuzz`.

#[path = "../../tests/fuzz/src/runtime.rs"]
mod harness;

use std::path::Path;

#[test]
fn request_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fuzz/corpus/runtime_request");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.expect("an entry").path();
        let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        if let Err(e) = harness::request(&bytes) {
            panic!("{}: a seed is refused: {e}", p.display());
        }
        n += 1;
    }
    assert!(n > 0, "no seeds in {}", dir.display());
}

#[test]
fn bad_requests_are_refused_with_the_field() {
    let cases: [(&[u8], &str); 4] = [
        (br#"{"messages": []}"#, "messages is empty"),
        (
            br#"{"messages": [{"role": "root", "content": "x"}]}"#,
            "messages[0].role",
        ),
        (br#"{"prompt": ["a", "b"]}"#, "2 prompts given"),
        (br#"{"prompt": "a", "top_p": 0}"#, "top_p 0 is outside"),
    ];
    for (body, expect) in cases {
        let e = harness::request(body).expect_err("refused");
        assert!(e.contains(expect), "{}: {e}", String::from_utf8_lossy(body));
    }
}
