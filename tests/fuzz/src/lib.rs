//! The bodies of the fuzz targets, one function per parser of outside input. Each takes the
//! fuzzer's bytes, hands them to the parser's public entry (through a scratch file where the
//! parser only takes a path) and returns the parser's verdict; a panic, an allocation beyond
//! libFuzzer's `-rss_limit_mb` or a run beyond its `-timeout` is a finding.
//!
//! `harness` needs only `edgepack-converters`, `-targets` and `-recipes`, so the ordinary
//! suite compiles the same file (tests/tests/fuzz_corpus.rs) and runs it over the checked-in
//! corpus without instrumentation; `runtime` is run the same way by the runtime's own tests.

pub mod harness;
pub mod runtime;
