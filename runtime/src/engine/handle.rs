//! The handle the server holds: it starts the engine thread for the bundle's format, queues
//! requests to it (bounded when asked), and reads what the thread reports about its load.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::generate::Job;
use super::load::{Load, LoadCounts, Ticket};
use super::types::{EngineConfig, EngineError, Format, GenEvent, GenRequest, GenStats, ModelInfo};
use super::{litert, llama, onnx};

/// A handle to the engine thread; cheap to share.
#[derive(Debug)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    load: Arc<Load>,
    pub info: ModelInfo,
}

/// The queue already holds as many waiting requests as it may.
#[derive(Debug, Clone, Copy)]
pub struct QueueFull {
    pub waiting: usize,
}

impl Engine {
    /// Loads the model on a new thread and returns once it is ready (or failed).
    pub fn load(config: EngineConfig) -> Result<Engine, EngineError> {
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<ModelInfo, EngineError>>();
        let format = config.format;
        let load = Arc::new(Load::default());
        let thread_load = load.clone();
        std::thread::Builder::new()
            .name(format.engine().into())
            .spawn(move || match format {
                Format::Gguf => llama::run(config, jobs_rx, ready_tx, &thread_load),
                Format::Onnx => onnx::run(config, jobs_rx, ready_tx, &thread_load),
                Format::Tflite => litert::run(config, jobs_rx, ready_tx, &thread_load),
            })
            .map_err(|e| EngineError::Library(format!("cannot start the engine thread: {e}")))?;
        let info = ready_rx.recv().map_err(|_| EngineError::Stopped)??;
        Ok(Engine {
            jobs: jobs_tx,
            load,
            info,
        })
    }

    /// Queues a request unless `max_waiting` requests already wait for the engine; events
    /// arrive on the returned channel.
    pub fn try_submit(
        &self,
        request: GenRequest,
        max_waiting: usize,
    ) -> Result<UnboundedReceiver<GenEvent>, QueueFull> {
        let running = self.load.running.load(Ordering::Relaxed);
        // Pending counts the requests running too: one per sequence the engine serves.
        let cap = max_waiting.saturating_add(self.info.slots.max(1) as usize);
        self.load
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                (p < cap).then_some(p + 1)
            })
            .map_err(|p| QueueFull {
                waiting: p.saturating_sub(running),
            })?;
        Ok(self.send(request))
    }

    /// Queues a request with no bound on the queue; events arrive on the returned channel.
    pub fn submit(&self, request: GenRequest) -> UnboundedReceiver<GenEvent> {
        self.load.pending.fetch_add(1, Ordering::AcqRel);
        self.send(request)
    }

    /// Sends a request whose place in the queue is already counted.
    fn send(&self, request: GenRequest) -> UnboundedReceiver<GenEvent> {
        let (tx, rx) = unbounded_channel();
        if let Err(mpsc::SendError(job)) = self.jobs.send(Job {
            request,
            events: tx,
            _ticket: Ticket::new(self.load.clone()),
        }) {
            let _ = job.events.send(GenEvent::Error(EngineError::Stopped));
        }
        rx
    }

    /// What the engine is doing and has done.
    pub fn load_counts(&self) -> LoadCounts {
        let l = &self.load;
        let pending = l.pending.load(Ordering::Relaxed);
        let running = l.running.load(Ordering::Relaxed).min(pending);
        LoadCounts {
            waiting: pending - running,
            running,
            cancelled: l.cancelled.load(Ordering::Relaxed),
            cancelled_tokens: l.cancelled_tokens.load(Ordering::Relaxed),
            finished: l.finished.load(Ordering::Relaxed),
            busy_ms: l.busy_ms.load(Ordering::Relaxed),
        }
    }

    /// Runs a request to the end from synchronous code: the text and the stats.
    pub fn generate_blocking(
        &self,
        request: GenRequest,
    ) -> Result<(String, GenStats), EngineError> {
        let mut rx = self.submit(request);
        let mut text = String::new();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                GenEvent::Text(t) => text.push_str(&t),
                GenEvent::Done(stats) => return Ok((text, stats)),
                GenEvent::Error(e) => return Err(e),
            }
        }
        Err(EngineError::Stopped)
    }
}
