//! Board profiles, fit checks and bundles.
//!
//! `profile` reads board descriptions (data files embedded in the binary, or the user's own);
//! `fit` turns a model's sizes and a profile into memory margins and a decode ceiling;
//! `bundle` writes, packs, unpacks and verifies the directory that leaves the workstation, and
//! `sign` holds its ed25519 keys; `deploy` (feature `deploy`) puts a bundle on boards over SSH,
//! and `mender` (feature `mender`) writes it as a Mender artifact with the update module that
//! installs it. Nothing here knows how a model is converted: the caller hands over finished
//! files and facts. The on-board runtime depends on this crate to verify bundles.

pub mod bundle;
#[cfg(feature = "deploy")]
pub mod deploy;
pub mod elf;
pub mod error;
pub mod fit;
mod io;
#[cfg(feature = "mender")]
pub mod mender;
pub mod profile;
pub mod sign;

pub use bundle::{verify_dir, Manifest};
pub use error::BundleError;
pub use profile::{Profile, TargetError};
