//! Recipes: a TOML file says which model (and adapters) to build for which boards, in which
//! formats, and which quality numbers each output must keep; one call builds all of it as a
//! graph of stages whose outputs are cached under content addresses, so an unchanged recipe
//! does no work and a change reruns only what depends on it.
//!
//! - [`recipe`] reads and checks the file (errors name the file, line, column and key);
//! - [`plan`] expands it into stages, each with its content address;
//! - [`cache`] stores finished stages atomically;
//! - [`stages`] does each stage's work through `edgepack-converters` and `edgepack-targets`;
//! - [`run`] schedules stages in parallel within a memory budget;
//! - [`report`] applies the gates and writes the release report;
//! - [`build`] ties them together; [`bundle`] assembles bundles for `edgepack bundle` too.

pub mod build;
pub mod bundle;
pub mod cache;
pub mod error;
pub mod plan;
pub mod recipe;
pub mod report;
pub mod run;
pub mod stages;
pub mod vela;

pub use build::{build, Outcome};
pub use error::RecipeError;
pub use recipe::Recipe;
