//! The command line itself: every command documents itself with an example.

use edgepack_tests::*;

#[test]
fn every_command_has_help_with_an_example() {
    for args in [
        vec!["--help"],
        vec!["inspect", "--help"],
        vec!["merge", "--help"],
        vec!["export", "gguf", "--help"],
        vec!["export", "hf", "--help"],
        vec!["export", "gguf-lora", "--help"],
        vec!["build", "--help"],
        vec!["cache", "size", "--help"],
        vec!["cache", "gc", "--help"],
        vec!["mender", "--help"],
    ] {
        let out = run_ok(edgepack().args(&args));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Example"),
            "{args:?} help has no example:\n{text}"
        );
    }
}

#[test]
fn unknown_quantization_names_the_choices() {
    let err =
        run_err(edgepack().args(["export", "gguf", ".", "--quant", "Q4_K_X", "-o", "x.gguf"]));
    assert!(err.contains("Q4_K_X") && err.contains("Q4_K_M"), "{err}");
}
