//! The fuzz targets' bodies, uninstrumented, over the checked-in seed corpora
//! (tests/fuzz/corpus/<target>/): every seed is accepted and nothing panics. The instrumented
//! targets run only under `cargo xtask fuzz`.

#[path = "../fuzz/src/harness.rs"]
mod harness;

use std::path::PathBuf;

type Harness = fn(&[u8]) -> Result<(), String>;

fn fuzz_dir() -> PathBuf {
    edgepack_tests::root().join("tests/fuzz")
}

/// Every seed of `target` is accepted by its harness.
fn seeds_accepted(target: &str, f: Harness) {
    let seeds = harness::corpus(&fuzz_dir().join("corpus").join(target));
    assert!(!seeds.is_empty(), "no seeds for the fuzz target {target}");
    for (p, bytes) in seeds {
        if let Err(e) = f(&bytes) {
            panic!("{}: a seed is refused: {e}", p.display());
        }
    }
}

#[test]
fn gguf_seeds() {
    seeds_accepted("gguf", harness::gguf);
}

#[test]
fn safetensors_seeds() {
    seeds_accepted("safetensors", harness::safetensors);
}

#[test]
fn hf_config_seeds() {
    seeds_accepted("hf_config", harness::hf_config);
}

#[test]
fn tokenizer_config_seeds() {
    seeds_accepted("tokenizer_config", harness::tokenizer_config);
}

#[test]
fn adapter_config_seeds() {
    seeds_accepted("adapter_config", harness::adapter_config);
}

#[test]
fn manifest_seeds() {
    seeds_accepted("manifest", harness::manifest);
}

#[test]
fn unpack_seeds() {
    seeds_accepted("unpack", harness::unpack);
}

#[test]
fn recipe_seeds() {
    seeds_accepted("recipe", harness::recipe);
}

#[test]
fn stats_seeds() {
    seeds_accepted("stats", harness::stats);
}
