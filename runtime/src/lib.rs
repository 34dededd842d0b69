//! What runs on the board: verify a bundle, load the model, serve HTTP, bench.
//!
//! This crate is empty until the runtime work lands; it must stay small, never depend on
//! `edgepack-converters`, and cross-compile cleanly for aarch64.
