//! Progress reporting without a UI dependency: the library calls a [`Progress`] sink; the CLI
//! turns it into progress bars on a terminal and keeps quiet in CI and `--json` mode.

/// Receives progress of long work.
pub trait Progress: Sync {
    /// A new phase of `total` units (tensors, bytes) starts.
    fn start(&self, _label: &str, _total: u64) {}
    /// `n` more units are done; `item` names the current one.
    fn advance(&self, _n: u64, _item: &str) {}
    /// The phase is over.
    fn finish(&self) {}
}

/// A sink that shows nothing.
pub struct Silent;

impl Progress for Silent {}
