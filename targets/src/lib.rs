//! Board profiles, bundles and deploy over SSH.
//!
//! This crate is empty until the target-profile and bundle work lands; it exists so the
//! workspace layout is the final one. It must never depend on conversion internals beyond a
//! bundle's inputs.
