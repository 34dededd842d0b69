//! The handle the server holds: it starts the engine thread for the bundle's format and
//! queues requests to it.

use std::sync::mpsc;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::generate::Job;
use super::types::{EngineConfig, EngineError, Format, GenEvent, GenRequest, GenStats, ModelInfo};
use super::{litert, llama, onnx};

/// A handle to the engine thread; cheap to share.
#[derive(Debug)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    pub info: ModelInfo,
}

impl Engine {
    /// Loads the model on a new thread and returns once it is ready (or failed).
    pub fn load(config: EngineConfig) -> Result<Engine, EngineError> {
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<ModelInfo, EngineError>>();
        let format = config.format;
        std::thread::Builder::new()
            .name(format.engine().into())
            .spawn(move || match format {
                Format::Gguf => llama::run(config, jobs_rx, ready_tx),
                Format::Onnx => onnx::run(config, jobs_rx, ready_tx),
                Format::Tflite => litert::run(config, jobs_rx, ready_tx),
            })
            .map_err(|e| EngineError::Library(format!("cannot start the engine thread: {e}")))?;
        let info = ready_rx.recv().map_err(|_| EngineError::Stopped)??;
        Ok(Engine {
            jobs: jobs_tx,
            info,
        })
    }

    /// Queues a request; events arrive on the returned channel.
    pub fn submit(&self, request: GenRequest) -> UnboundedReceiver<GenEvent> {
        let (tx, rx) = unbounded_channel();
        if let Err(mpsc::SendError(job)) = self.jobs.send(Job {
            request,
            events: tx,
        }) {
            let _ = job.events.send(GenEvent::Error(EngineError::Stopped));
        }
        rx
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
