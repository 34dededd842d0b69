//! Board profiles, fit checks and bundles.
//!
//! `profile` reads board descriptions (data files embedded in the binary, or the user's own).
//! Nothing here knows how a model is converted. The on-board runtime depends on this crate to
//! verify bundles.

pub mod profile;

pub use profile::{Profile, TargetError};
