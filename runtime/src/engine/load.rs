//! What the engine thread and the handle count between them: requests waiting and running,
//! requests cancelled because their client went away, and time spent generating.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What the engine thread and the handle count between them.
#[derive(Debug, Default)]
pub struct Load {
    /// Requests handed to the engine and not yet finished: waiting or running.
    pub(super) pending: AtomicUsize,
    /// Requests the engine generates for now (at most its number of sequences).
    pub(super) running: AtomicUsize,
    /// Requests stopped because their client went away, and the tokens generated for them.
    pub(super) cancelled: AtomicU64,
    pub(super) cancelled_tokens: AtomicU64,
    /// Requests run to an end, and the wall time each took on the engine thread, summed.
    pub(super) finished: AtomicU64,
    pub(super) busy_ms: AtomicU64,
}

impl Load {
    /// The engine thread took a job off the queue.
    pub(super) fn start(&self) {
        self.running.fetch_add(1, Ordering::Relaxed);
    }

    /// The engine thread is done with a job that ran for `took`.
    pub(super) fn finish(&self, took: Duration) {
        self.running.fetch_sub(1, Ordering::Relaxed);
        self.finished.fetch_add(1, Ordering::Relaxed);
        self.busy_ms.fetch_add(
            u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The engine thread stopped a job whose client went away after `generated` tokens.
    pub(super) fn cancel(&self, generated: usize) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
        self.cancelled_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);
    }
}

/// A request's place in the engine's queue, given back when the job is dropped (finished,
/// failed or cancelled on the engine thread, or never sent).
pub(super) struct Ticket(Arc<Load>);

impl Ticket {
    pub(super) fn new(load: Arc<Load>) -> Ticket {
        Ticket(load)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A snapshot of the engine's load, for `/metrics` and `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadCounts {
    /// Requests waiting for the engine.
    pub waiting: usize,
    /// Requests the engine is generating for.
    pub running: usize,
    pub cancelled: u64,
    pub cancelled_tokens: u64,
    pub finished: u64,
    pub busy_ms: u64,
}

impl LoadCounts {
    /// Mean wall time of a finished request on the engine, if any finished.
    pub fn mean_request_time(&self) -> Option<Duration> {
        (self.finished > 0).then(|| Duration::from_millis(self.busy_ms / self.finished))
    }
}
