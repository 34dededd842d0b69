//! The trainer's threads: packs of samples spread over threads with results in pack order,
//! and candle's per-operation threading held to one thread while they run.

use crate::error::{Error, Result};

use super::data::Example;

/// Makes candle run each operation on the calling thread while it lives.
///
/// candle reads `RAYON_NUM_THREADS` at every matrix product and splits the product over that
/// many rayon tasks. The trainer already keeps every core busy with its own threads (one
/// pack of samples each), where splitting each small product again halves the throughput
/// (measured on SmolLM2-135M at 2 cores: 149 against 78 tokens/s). `edgepack finetune` sets
/// the variable once at start; a process that runs other work too (`edgepack build`) holds
/// this guard around training only, while no other stage runs. rayon's global pool is
/// created before the variable changes, so it keeps its size.
pub struct SingleThreadedOps {
    previous: Option<std::ffi::OsString>,
}

impl SingleThreadedOps {
    pub fn new() -> SingleThreadedOps {
        let _ = rayon::current_num_threads();
        let previous = std::env::var_os("RAYON_NUM_THREADS");
        std::env::set_var("RAYON_NUM_THREADS", "1");
        SingleThreadedOps { previous }
    }
}

impl Default for SingleThreadedOps {
    fn default() -> Self {
        SingleThreadedOps::new()
    }
}

impl Drop for SingleThreadedOps {
    fn drop(&mut self) {
        match &self.previous {
            Some(v) => std::env::set_var("RAYON_NUM_THREADS", v),
            None => std::env::remove_var("RAYON_NUM_THREADS"),
        }
    }
}

/// Runs `f` over every pack on `threads` threads (each taking the next pack when it is free)
/// and returns the results in pack order, so what is summed from them does not depend on
/// the thread count or on which thread ran which pack.
pub(crate) fn run_packs<T: Send>(
    all: &[Vec<&Example>],
    threads: usize,
    f: impl Fn(usize, &[&Example]) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let threads = threads.clamp(1, all.len().max(1));
    if threads == 1 {
        return all.iter().enumerate().map(|(i, p)| f(i, p)).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<Result<T>>>> =
        all.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(pack) = all.get(i) else { break };
                let r = f(i, pack);
                let failed = r.is_err();
                *slots[i].lock().expect("a pack slot") = Some(r);
                if failed {
                    // Let the other threads run out of packs too.
                    next.store(all.len(), std::sync::atomic::Ordering::Relaxed);
                    break;
                }
            });
        }
    });
    let mut out = Vec::with_capacity(all.len());
    for slot in slots {
        match slot.into_inner().expect("a pack slot") {
            Some(r) => out.push(r?),
            None => break,
        }
    }
    if out.len() != all.len() {
        return Err(Error::Invalid("training: a pack did not run".into()));
    }
    Ok(out)
}
