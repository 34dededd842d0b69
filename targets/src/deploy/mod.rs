//! Deploy over SSH: put a verified bundle on a board as a new release, switch to it
//! atomically, (re)start the runtime, check its health, and roll back when the check fails.
//!
//! A deploy goes: probe the board → refuse a bundle made for another target → plan each file
//! (already in `.incoming` and complete, partly there and resumable, held by an earlier
//! release with the same sha256 and linked, or sent) → upload → `sha256sum -c` on the board
//! and a check that no unlisted file came along → rename `.incoming/<id>` to `releases/<id>`
//! → switch `current` with one rename → restart the runtime → `/health` and a smoke prompt
//! through an SSH forward. The old release stays untouched until the switch and returns when
//! the check fails. [`board`] holds the layout and the scripts, [`ssh`] the transport,
//! [`health`] the checks, [`inventory`] the fleet file, [`ansible`] its import from Ansible
//! inventories, [`rollout`] a fleet's canary wave, parallel waves and failure threshold.

pub mod ansible;
pub mod board;
pub mod health;
mod host;
pub mod inventory;
pub mod rollout;
pub mod ssh;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bundle::{self, FileEntry, Manifest, MANIFEST, SIGNATURE};
use board::{quote, runtime_invocation, Layout};
use ed25519_dalek::VerifyingKey;
use health::Health;
use ssh::Conn;

pub use host::{
    DeployError, HostConfig, DEFAULT_HEALTH_TIMEOUT, DEFAULT_INSTALL_DIR, DEFAULT_KEEP,
    DEFAULT_RUNTIME_PORT, DEFAULT_SERVICE,
};

/// How often `/health` is asked while the model loads: often at first (a small model is
/// ready in well under a second), then less.
const HEALTH_POLL_FAST: Duration = Duration::from_millis(100);
const HEALTH_POLL: Duration = Duration::from_millis(500);
/// How long the fast polling lasts.
const HEALTH_FAST_FOR: Duration = Duration::from_secs(3);
/// Lines of the runtime's log quoted when it fails.
const LOG_TAIL: u32 = 15;
/// Where the runtime sits inside a release (the bundle layout's `bin/edgepack-runtime`).
const RUNTIME_IN_RELEASE: &str = "bin/edgepack-runtime";

/// Options shared by every host of a run.
#[derive(Debug, Clone)]
pub struct Options {
    pub accept_new_host_key: bool,
    /// The signer's public key (PEM): the bundle must be signed by it, and the runtime on the
    /// board checks the signature again each time it starts.
    pub trusted_key: Option<PathBuf>,
    pub health_timeout: Duration,
    /// Upload rate cap in bytes/s.
    pub limit_rate: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            accept_new_host_key: false,
            trusted_key: None,
            health_timeout: DEFAULT_HEALTH_TIMEOUT,
            limit_rate: None,
        }
    }
}

/// A bundle on the workstation, its manifest checked, with what a deploy sends. Its files are
/// read (and an archive unpacked) only when a board needs some of them: a redeploy of what a
/// board already holds hashes nothing.
#[derive(Debug)]
pub struct LocalBundle {
    /// The folder or `.tar.zst` the user named.
    pub source: PathBuf,
    pub manifest: Manifest,
    /// `<bundle folder>-<first 12 hex of sha256(manifest.json)>`: the same bundle is the same
    /// release on every board; any change to any file changes it.
    pub release_id: String,
    /// Every file a release holds: the listed files plus manifest.json (and manifest.sig).
    pub files: Vec<FileEntry>,
    trusted_key_pem: Option<String>,
    trusted_key: Option<VerifyingKey>,
    /// The bundle's folder; `None` for an archive not unpacked yet.
    folder: Option<PathBuf>,
    /// The folder holding the files (an archive unpacked), once asked for.
    files_at: std::sync::OnceLock<Result<PathBuf, String>>,
    /// The same folder with every file verified, once asked for.
    local: std::sync::OnceLock<Result<PathBuf, String>>,
    /// Where an archive was unpacked; removed with the bundle.
    unpacked: std::sync::Mutex<Option<tempfile::TempDir>>,
}

type Key = (Option<VerifyingKey>, Option<String>);

fn read_key(trusted_key: Option<&Path>) -> Result<Key, DeployError> {
    match trusted_key {
        Some(p) => {
            let k = crate::sign::read_public_key(p)?;
            let pem = std::fs::read_to_string(p).map_err(|e| DeployError::Local {
                path: p.to_path_buf(),
                message: e.to_string(),
            })?;
            Ok((Some(k), Some(pem)))
        }
        None => Ok((None, None)),
    }
}

/// Opens a bundle folder: its manifest, signature (with `trusted_key` it must verify; the
/// runtime refuses a signed bundle it has no key for, so deploy refuses it here, before
/// anything is sent) and file sizes. The files are hashed when a board needs them.
pub fn open_bundle(dir: &Path, trusted_key: Option<&Path>) -> Result<LocalBundle, DeployError> {
    let (key, pem) = read_key(trusted_key)?;
    let head = bundle::read_head(dir, key.as_ref())?;
    Ok(local_bundle(dir, head, key, pem, Some(dir.to_path_buf())))
}

/// Opens a `.tar.zst` bundle from the manifest at its head, checked as [`open_bundle`]
/// checks a folder's; it is unpacked (into a temporary folder) and verified only when a board
/// needs its files.
pub fn open_archive(
    archive: &Path,
    trusted_key: Option<&Path>,
) -> Result<LocalBundle, DeployError> {
    let (key, pem) = read_key(trusted_key)?;
    match bundle::read_archive_head(archive, key.as_ref())? {
        Some(head) => Ok(local_bundle(archive, head, key, pem, None)),
        None => {
            // Not written by edgepack (no manifest first): unpack it whole now.
            let tmp = unpack_dir(archive)?;
            let dir = bundle::unpack(archive, tmp.path())?;
            let mut b = open_bundle(&dir, trusted_key)?;
            b.source = archive.to_path_buf();
            *b.unpacked.get_mut().expect("unpacked lock") = Some(tmp);
            Ok(b)
        }
    }
}

fn unpack_dir(archive: &Path) -> Result<tempfile::TempDir, DeployError> {
    tempfile::Builder::new()
        .prefix("edgepack-deploy")
        .tempdir()
        .map_err(|e| DeployError::Local {
            path: archive.to_path_buf(),
            message: format!("making a folder to unpack it: {e}"),
        })
}

fn local_bundle(
    source: &Path,
    head: bundle::Head,
    trusted_key: Option<VerifyingKey>,
    trusted_key_pem: Option<String>,
    folder: Option<PathBuf>,
) -> LocalBundle {
    let entry = |path: &str, bytes: &[u8]| FileEntry {
        path: path.to_string(),
        size: bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(bytes)),
    };
    let mut files = head.manifest.files.clone();
    let manifest_entry = entry(MANIFEST, &head.manifest_bytes);
    let name: String = head
        .top
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let release_id = format!("{name}-{}", &manifest_entry.sha256[..12]);
    files.push(manifest_entry);
    if let Some(sig) = &head.signature {
        files.push(entry(SIGNATURE, sig));
    }
    LocalBundle {
        source: source.to_path_buf(),
        manifest: head.manifest,
        release_id,
        files,
        trusted_key_pem,
        trusted_key,
        folder,
        files_at: std::sync::OnceLock::new(),
        local: std::sync::OnceLock::new(),
        unpacked: std::sync::Mutex::new(None),
    }
}

fn cached<'a>(
    cell: &'a std::sync::OnceLock<Result<PathBuf, String>>,
    source: &Path,
    make: impl FnOnce() -> Result<PathBuf, DeployError>,
) -> Result<&'a Path, DeployError> {
    match cell.get_or_init(|| make().map_err(|e| e.to_string())) {
        Ok(p) => Ok(p),
        Err(message) => Err(DeployError::Local {
            path: source.to_path_buf(),
            message: message.clone(),
        }),
    }
}

impl LocalBundle {
    /// The folder holding the bundle's files: the folder itself, or the archive unpacked
    /// (once), not hashed. A deploy hashes each file as it sends it.
    pub fn files_dir(&self) -> Result<&Path, DeployError> {
        cached(&self.files_at, &self.source, || match &self.folder {
            Some(d) => Ok(d.clone()),
            None => {
                let tmp = unpack_dir(&self.source)?;
                let d = bundle::unpack(&self.source, tmp.path())?;
                *self.unpacked.lock().expect("unpacked lock") = Some(tmp);
                Ok(d)
            }
        })
    }

    /// The bundle's folder with every file verified against the manifest (an archive is
    /// unpacked first), done once; the manifest must still be the one the release id names.
    pub fn local_dir(&self) -> Result<&Path, DeployError> {
        cached(&self.local, &self.source, || self.materialize())
    }

    fn materialize(&self) -> Result<PathBuf, DeployError> {
        let dir = self.files_dir()?.to_path_buf();
        bundle::verify_dir(&dir, self.trusted_key.as_ref())?;
        let (_, sha) = bundle::file_digest(&dir.join(MANIFEST))?;
        let want = self.files.iter().find(|f| f.path == MANIFEST);
        if want.map(|f| &f.sha256) != Some(&sha) {
            return Err(DeployError::Local {
                path: dir.join(MANIFEST),
                message: "changed while the deploy ran; run it again".into(),
            });
        }
        Ok(dir)
    }
}

/// How a deploy ended on one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The new release runs and passed its health check.
    Deployed,
    /// The release was already current; it was checked, not restarted.
    Unchanged,
    /// The new release failed its health check; the previous one runs again.
    RolledBack,
    /// Nothing was switched (refused, unreachable, corrupted upload, broken connection).
    Failed,
    /// Not started: the rollout stopped before this host's turn (the error says why).
    Skipped,
}

/// Per-host result of a deploy.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub host: String,
    pub ok: bool,
    pub outcome: Outcome,
    pub release: Option<String>,
    /// The release `current` pointed at before.
    pub previous: Option<String>,
    /// File bytes sent over SSH.
    pub bytes_sent: u64,
    /// Bytes those files took on the SSH channels (zstd-compressed where the board has zstd
    /// and a file compresses).
    pub channel_bytes: u64,
    pub files_sent: usize,
    pub files_resumed: usize,
    /// Files an earlier release on the board already had (hard-linked there, not sent).
    pub files_reused: usize,
    /// Files already complete in `.incoming` from an interrupted deploy.
    pub files_present: usize,
    /// Files the incoming release's own runtime received (`edgepack-runtime receive`) once
    /// the board had checked its hash; the others went through the shell pipeline.
    pub files_received_by_runtime: usize,
    pub health: Option<Health>,
    pub error: Option<String>,
    pub seconds: f64,
    /// Seconds spent in each stage, in the order they ran (connecting, probing, uploading,
    /// verifying, switching, health check, ...).
    pub phases: Vec<Phase>,
}

/// One stage of a host's deploy and how long it took.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub stage: String,
    pub seconds: f64,
}

/// Wraps a progress display and times each stage it is told about.
struct Timed<'a> {
    host: &'a str,
    inner: &'a dyn HostProgress,
    marks: std::sync::Mutex<Vec<(String, Instant)>>,
}

impl Timed<'_> {
    fn phases(&self, end: Instant) -> Vec<Phase> {
        let marks = self.marks.lock().expect("marks lock");
        marks
            .iter()
            .enumerate()
            .map(|(i, (stage, at))| {
                let until = marks.get(i + 1).map(|m| m.1).unwrap_or(end);
                Phase {
                    stage: stage.clone(),
                    seconds: until.duration_since(*at).as_secs_f64(),
                }
            })
            .collect()
    }
}

impl HostProgress for Timed<'_> {
    fn stage(&self, stage: &str) {
        tracing::debug!(host = self.host, stage, "deploy stage");
        self.marks
            .lock()
            .expect("marks lock")
            .push((stage.to_string(), Instant::now()));
        self.inner.stage(stage);
    }
    fn upload_start(&self, total_bytes: u64) {
        self.inner.upload_start(total_bytes);
    }
    fn advance(&self, bytes: u64) {
        self.inner.advance(bytes);
    }
    fn finish(&self, report: &HostReport) {
        self.inner.finish(report);
    }
}

/// What a deploy tells its progress display about one host.
pub trait HostProgress: Send + Sync {
    fn stage(&self, stage: &str);
    fn upload_start(&self, total_bytes: u64);
    fn advance(&self, bytes: u64);
    fn finish(&self, report: &HostReport);
}

/// A progress display that shows nothing.
pub struct Quiet;

impl HostProgress for Quiet {
    fn stage(&self, _: &str) {}
    fn upload_start(&self, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self, _: &HostReport) {}
}

/// Facts the probe script prints.
#[derive(Debug, Default)]
struct Probe {
    arch: String,
    systemd: bool,
    sha256sum: bool,
    zstd: bool,
    current: Option<String>,
    previous: Option<String>,
    releases: Vec<String>,
}

fn release_of(link: &str) -> Option<String> {
    link.strip_prefix("releases/")
        .map(|s| s.trim_end_matches('/').to_string())
        .filter(|s| !s.is_empty())
}

impl Probe {
    /// Takes one `key value` line of the probe script; false for a key it does not know.
    fn take(&mut self, line: &str) -> bool {
        let (k, v) = line.split_once(' ').unwrap_or((line, ""));
        let v = v.trim();
        match k {
            "arch" => self.arch = v.to_string(),
            "systemd" => self.systemd = v == "yes",
            "sha256sum" => self.sha256sum = v == "yes",
            "zstd" => self.zstd = v == "yes",
            "current" => self.current = release_of(v),
            "previous" => self.previous = release_of(v),
            "release" => self.releases.push(v.to_string()),
            _ => return false,
        }
        true
    }
}

async fn probe(c: &Conn, l: &Layout) -> Result<Probe, DeployError> {
    let out = c.sh("probing the board", &l.probe()).await?;
    let mut p = Probe::default();
    for line in out.lines() {
        p.take(line);
    }
    Ok(p)
}

/// What the survey script tells a deploy (see [`Layout::survey`]).
#[derive(Debug, Default)]
struct Survey {
    probe: Probe,
    /// The supervised runtime's state lines (`running <pid> <s>` / `stopped` / `exited <n>`).
    state: Vec<String>,
    /// Sizes of the files already in `.incoming/<id>`.
    have: BTreeMap<String, u64>,
    /// Each release's manifest on the board.
    manifests: Vec<(String, Manifest)>,
    /// Bytes free in the install folder's file system, when `df` told.
    free: Option<u64>,
    /// A release an interrupted deploy switched to and never saw healthy.
    pending: Option<String>,
}

fn parse_survey(out: &[u8]) -> Survey {
    let mut sv = Survey::default();
    let mut rest = out;
    while !rest.is_empty() {
        let end = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
        let line = String::from_utf8_lossy(&rest[..end]).into_owned();
        rest = &rest[(end + 1).min(rest.len())..];
        if sv.probe.take(&line) {
            continue;
        }
        if let Some(id) = line.strip_prefix("pending ") {
            sv.pending = Some(id.trim().to_string()).filter(|s| !s.is_empty());
        } else if let Some(kib) = line.strip_prefix("free ") {
            sv.free = kib
                .trim()
                .parse::<u64>()
                .ok()
                .map(|k| k.saturating_mul(1024));
        } else if let Some(st) = line.strip_prefix("state ") {
            sv.state.push(st.trim().to_string());
        } else if let Some(sz) = line.strip_prefix("size ") {
            if let Some((n, p)) = sz.split_once(' ') {
                if let Ok(n) = n.parse() {
                    sv.have.insert(p.to_string(), n);
                }
            }
        } else if let Some(m) = line.strip_prefix("manifest ") {
            let Some((rel, n)) = m.rsplit_once(' ') else {
                break;
            };
            let Ok(n) = n.trim().parse::<usize>() else {
                break;
            };
            if n > rest.len() {
                break;
            }
            if let Ok(man) = Manifest::from_bytes(&rest[..n], Path::new(MANIFEST)) {
                sv.manifests.push((rel.to_string(), man));
            }
            // The next line starts right after the manifest's bytes, newline or not.
            rest = &rest[n..];
        }
    }
    sv
}

/// The machine names `uname -m` prints for a Rust triple's architecture.
fn arch_matches(triple: &str, uname: &str) -> bool {
    let want = triple.split('-').next().unwrap_or_default();
    match want {
        "aarch64" => matches!(uname, "aarch64" | "arm64"),
        "x86_64" => matches!(uname, "x86_64" | "amd64"),
        "armv7" | "arm" => uname.starts_with("armv7") || uname.starts_with("armv8l"),
        other => other == uname,
    }
}

/// The runtime's command line on the board.
fn runtime_command(h: &HostConfig, l: &Layout, signed: bool) -> String {
    let cur = l.path("current");
    let mut cmd = format!(
        "{} serve --bundle {} --port {}",
        runtime_invocation(h.runner.as_deref(), &format!("{cur}/{RUNTIME_IN_RELEASE}")),
        quote(&cur),
        h.runtime_port
    );
    if signed {
        cmd.push_str(&format!(
            " --trusted-key {}",
            quote(&l.path("trusted.pub.pem"))
        ));
    }
    for a in &h.runtime_args {
        cmd.push(' ');
        cmd.push_str(&quote(a));
    }
    cmd
}

/// The script that restarts the runtime of `current` (systemd unit or supervised process).
fn restart_script(h: &HostConfig, l: &Layout, p: &Probe, signed: bool) -> String {
    let cmd = runtime_command(h, l, signed);
    if p.systemd {
        l.start_systemd(&h.service, &cmd)
    } else {
        // The boot script first, so it always starts what runs now.
        let mut s = l.write_boot_script(&cmd);
        s.push_str(&l.start_supervised(&cmd));
        s
    }
}

/// Restarts the runtime of `current` (systemd unit or supervised process).
async fn restart(
    c: &Conn,
    h: &HostConfig,
    l: &Layout,
    p: &Probe,
    signed: bool,
) -> Result<(), DeployError> {
    c.sh("starting the runtime", &restart_script(h, l, p, signed))
        .await
        .map(|_| ())
}

async fn stop(c: &Conn, h: &HostConfig, l: &Layout, p: &Probe) -> Result<(), DeployError> {
    let script = if p.systemd {
        format!("systemctl stop {} || true\n", quote(&h.service))
    } else {
        l.stop_supervised()
    };
    c.sh("stopping the runtime", &script).await.map(|_| ())
}

async fn log_tail(c: &Conn, h: &HostConfig, l: &Layout, p: &Probe) -> String {
    let unit = p.systemd.then_some(h.service.as_str());
    c.sh("reading the runtime's log", &l.logs(unit, LOG_TAIL, false))
        .await
        .unwrap_or_default()
}

/// After a failed health request: the error to stop with when the SSH connection itself is
/// gone. The requests travel over its port forward, so every later one would fail too, and
/// waiting out the health timeout would only delay the error.
async fn connection_lost(c: &Conn, h: &HostConfig, last: &str) -> Option<DeployError> {
    if c.alive().await {
        return None;
    }
    Some(DeployError::Ssh {
        host: h.name.clone(),
        step: "health check".into(),
        detail: format!("the connection to the board was lost (last request: {last})"),
    })
}

/// A step of the check that failed with `reason`: the runtime's failure, unless the connection
/// itself is gone.
async fn failed(
    c: &Conn,
    h: &HostConfig,
    reason: String,
) -> Result<Result<Health, String>, DeployError> {
    match connection_lost(c, h, &reason).await {
        Some(lost) => Err(lost),
        None => Ok(Err(reason)),
    }
}

/// `e` (a lost connection) with what the board is left running.
fn left_with(e: DeployError, left: String) -> DeployError {
    match e {
        DeployError::Ssh { host, step, detail } => DeployError::Ssh {
            host,
            step,
            detail: format!("{detail}; {left}"),
        },
        other => other,
    }
}

/// What a deploy that lost the connection while checking `id`, switched to and not yet seen
/// healthy, leaves on the board.
fn left_pending(id: &str, p: &Probe) -> String {
    let boot = if p.systemd {
        ""
    } else {
        ", and boot.sh rolls it back at the next boot"
    };
    format!(
        "the board keeps {id}, marked pending: the next deploy checks it again (and rolls it back if it fails){boot}"
    )
}

/// The health check over the SSH port forward: waits for `/health` and runs the smoke prompt.
/// `Ok(Err(reason))` when the runtime failed it (with the log's tail), `Err` when the
/// connection to the board was lost on the way (nothing can be switched back then).
async fn check_health(
    c: &Conn,
    h: &HostConfig,
    l: &Layout,
    p: &Probe,
    timeout: Duration,
) -> Result<Result<Health, String>, DeployError> {
    let started = Instant::now();
    let sock = match c.forward(h.runtime_port).await {
        Ok(sock) => sock,
        Err(e) => return failed(c, h, e.to_string()).await,
    };
    let mut last = String::from("no answer yet");
    let mut polls = 0u32;
    loop {
        if started.elapsed() > timeout {
            let tail = log_tail(c, h, l, p).await;
            return Ok(Err(format!(
                "/health did not answer 200 within {timeout:?} (last: {last})\nruntime log:\n{tail}"
            )));
        }
        match health::request(&sock, "GET", "/health", None, Duration::from_secs(10)).await {
            Ok(a) if a.status == 200 => break,
            Ok(a) => last = format!("HTTP {} {}", a.status, a.body.trim()),
            Err(e) => {
                last = e.to_string();
                if let Some(lost) = connection_lost(c, h, &last).await {
                    return Err(lost);
                }
            }
        }
        polls += 1;
        // The supervisor records each exit: a runtime that cannot start fails now, not at
        // the timeout.
        if !p.systemd && polls % 4 == 0 {
            let exit = c
                .sh(
                    "checking the runtime",
                    &format!("cat {} 2>/dev/null || true", quote(&l.path("runtime.exit"))),
                )
                .await
                .unwrap_or_default();
            if !exit.trim().is_empty() {
                let tail = log_tail(c, h, l, p).await;
                return Ok(Err(format!(
                    "the runtime exited with status {} before it was ready\nruntime log:\n{tail}",
                    exit.trim()
                )));
            }
        }
        tokio::time::sleep(if started.elapsed() < HEALTH_FAST_FOR {
            HEALTH_POLL_FAST
        } else {
            HEALTH_POLL
        })
        .await;
    }
    let ready_s = started.elapsed().as_secs_f64();
    let left = timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_secs(30));
    let key = match &h.api_key_file {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(k) => Some(k.trim().to_string()),
            Err(e) => {
                return Ok(Err(format!(
                    "{}: reading the runtime's API key: {e}",
                    p.display()
                )))
            }
        },
        None => None,
    };
    match health::smoke(&sock, left, key.as_deref()).await {
        Ok(mut health) => {
            health.ready_s = ready_s;
            Ok(Ok(health))
        }
        Err(reason) => failed(c, h, reason).await,
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn record_health(
    c: &Conn,
    l: &Layout,
    release: &str,
    result: &Result<Health, String>,
) -> Result<(), DeployError> {
    record_health_with(c, l, release, result, None, "").await
}

/// Writes health.json; after a rollback it also says which release failed and why, so the
/// reason survives on the board (operators ask for that log).
async fn record_health_with(
    c: &Conn,
    l: &Layout,
    release: &str,
    result: &Result<Health, String>,
    rolled_back: Option<(&str, &str)>,
    then: &str,
) -> Result<(), DeployError> {
    let mut v = match result {
        Ok(hl) => serde_json::json!({
            "release": release, "checked_at": now_unix(), "ok": true,
            "ready_s": hl.ready_s, "ttft_ms": hl.ttft_ms, "tokens_per_s": hl.tokens_per_s,
            "completion_tokens": hl.completion_tokens, "reply": hl.reply,
        }),
        Err(why) => serde_json::json!({
            "release": release, "checked_at": now_unix(), "ok": false, "reason": why,
        }),
    };
    if let Some((from, why)) = rolled_back {
        v["rolled_back_from"] = serde_json::json!(from);
        v["rollback_reason"] = serde_json::json!(why);
    }
    let json = serde_json::to_string_pretty(&v).expect("json");
    c.sh_in(
        "recording the health check",
        &format!("{}{then}", l.write_file("health.json")),
        json.as_bytes(),
    )
    .await
    .map(|_| ())
}

/// sha256 of the first `len` bytes of a local file.
fn local_prefix_sha(path: &Path, len: u64) -> Result<String, DeployError> {
    use std::io::Read;
    let err = |e: std::io::Error| DeployError::Local {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let f = std::fs::File::open(path).map_err(err)?;
    let mut r = f.take(len);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

enum Plan {
    /// Complete in `.incoming` already.
    Present,
    Resume(u64),
    Reuse(String),
    Send,
}

/// Deploys `b` to one host. Never leaves the board half-switched: every failure before the
/// switch keeps `current`; a failed health check after it switches back.
pub async fn deploy_host(
    h: &HostConfig,
    b: &LocalBundle,
    opts: &Options,
    progress: &dyn HostProgress,
) -> HostReport {
    let started = Instant::now();
    let mut r = HostReport::failed(&h.name, Outcome::Failed, None);
    r.release = Some(b.release_id.clone());
    let timed = Timed {
        host: &h.name,
        inner: progress,
        marks: Default::default(),
    };
    let res = deploy_inner(h, b, opts, &timed, &mut r).await;
    if let Err(e) = res {
        r.ok = false;
        if r.outcome != Outcome::RolledBack {
            r.outcome = Outcome::Failed;
        }
        r.error = Some(e.to_string());
    }
    let end = Instant::now();
    r.seconds = end.duration_since(started).as_secs_f64();
    r.phases = timed.phases(end);
    progress.finish(&r);
    r
}

async fn deploy_inner(
    h: &HostConfig,
    b: &LocalBundle,
    opts: &Options,
    progress: &dyn HostProgress,
    r: &mut HostReport,
) -> Result<(), DeployError> {
    let refuse = |message: String| DeployError::Refused {
        host: h.name.clone(),
        message,
    };
    if let Some(t) = &h.target {
        if *t != b.manifest.target.profile {
            return Err(refuse(format!(
                "the bundle is for target `{}`, the host is `{t}`; refusing to install it",
                b.manifest.target.profile
            )));
        }
    }
    let rt = b.manifest.runtime.as_ref().ok_or_else(|| {
        refuse(format!(
            "{}: the bundle carries no runtime binary, so nothing could serve it on the board\nhint: edgepack bundle ... --runtime <edgepack-runtime built for the board>",
            b.source.display()
        ))
    })?;
    if rt.file != RUNTIME_IN_RELEASE {
        return Err(refuse(format!(
            "the bundle's runtime is at `{}`; deploy starts `{RUNTIME_IN_RELEASE}`",
            rt.file
        )));
    }
    progress.stage("connecting");
    let c = Conn::open(h, opts.accept_new_host_key).await?;
    let res = deploy_connected(&c, h, b, opts, progress, r).await;
    c.close().await;
    res
}

async fn deploy_connected(
    c: &Conn,
    h: &HostConfig,
    b: &LocalBundle,
    opts: &Options,
    progress: &dyn HostProgress,
    r: &mut HostReport,
) -> Result<(), DeployError> {
    let l = Layout::new(&h.install_dir);
    let id = &b.release_id;
    progress.stage("probing");
    let paths: Vec<&str> = b.files.iter().map(|f| f.path.as_str()).collect();
    let survey = parse_survey(
        &c.sh_bytes("surveying the board", &l.survey(id, &paths))
            .await?,
    );
    let p = &survey.probe;
    r.previous = p.current.clone();
    let rt = b.manifest.runtime.as_ref().expect("checked by the caller");
    if h.runner.is_none() && !arch_matches(&rt.triple, &p.arch) {
        return Err(DeployError::Refused {
            host: h.name.clone(),
            message: format!(
                "the bundle's runtime is built for {}, the board is {}; refusing to install a binary it cannot run\nhint: bundle the runtime for the board's target, or set a `runner` for the host",
                rt.triple, p.arch
            ),
        });
    }
    if !p.sha256sum {
        return Err(DeployError::Refused {
            host: h.name.clone(),
            message:
                "the board has no sha256sum, so the upload cannot be verified before the switch"
                    .into(),
        });
    }
    let signed = b.trusted_key_pem.is_some();
    if !p.releases.contains(id) {
        let runner = h.runner.as_deref();
        let hashed = upload(c, &l, b, &survey, opts, runner, progress, r).await?;
        progress.stage("verifying");
        verify_on_board(c, h, &l, b, p, &hashed).await?;
    }
    // The key travels as the script's input, installed before the runtime starts with it.
    let (key_script, key) = match &b.trusted_key_pem {
        Some(pem) => (
            l.write_file("trusted.pub.pem"),
            format!("{}\n", pem.trim_end()).into_bytes(),
        ),
        None => (String::new(), Vec::new()),
    };
    let was_current = p.current.as_deref() == Some(id.as_str());
    if was_current {
        // A release still pending is one an interrupted deploy switched to and never saw
        // healthy: it is checked now, and rolled back like any new release that fails. The
        // deploy may have been cut between the switch and the restart, leaving the previous
        // release's runtime serving, so a pending release's runtime is always restarted.
        let pending = survey.pending.as_deref() == Some(id.as_str());
        // Same release, seen healthy: keep the process that runs; start it only if it is
        // not running.
        let running = survey
            .state
            .first()
            .is_some_and(|s| s.starts_with("running"));
        let mut script = key_script;
        if pending || (!p.systemd && !running) {
            script.push_str(&restart_script(h, &l, p, signed));
        }
        if !script.is_empty() {
            c.sh_in("starting the runtime", &script, &key).await?;
        }
        progress.stage("health check");
        let checked = check_health(c, h, &l, p, opts.health_timeout)
            .await
            .map_err(|e| {
                let left = if pending {
                    left_pending(id, p)
                } else {
                    format!("the board keeps running {id}")
                };
                left_with(e, left)
            })?;
        match checked {
            Ok(hl) => {
                record_health_with(c, &l, id, &Ok(hl.clone()), None, &l.clear_pending()).await?;
                r.health = Some(hl);
                r.outcome = if pending {
                    Outcome::Deployed
                } else {
                    Outcome::Unchanged
                };
                r.ok = true;
                return Ok(());
            }
            Err(reason) if pending => {
                let prev = p.previous.as_ref();
                return Err(
                    roll_back(c, h, &l, p, signed, id, prev, reason, opts, progress, r).await?,
                );
            }
            Err(reason) => {
                record_health(c, &l, id, &Err(reason.clone())).await?;
                return Err(DeployError::Unhealthy {
                    host: h.name.clone(),
                    release: id.clone(),
                    reason,
                    after: "it was already the current release; nothing was switched".into(),
                });
            }
        }
    }
    progress.stage("switching");
    // One round trip: the key, the switch of `current`, and the runtime's restart.
    let script = format!(
        "{key_script}{}{}",
        l.switch(id),
        restart_script(h, &l, p, signed)
    );
    c.sh_in("switching current and starting the runtime", &script, &key)
        .await?;
    progress.stage("health check");
    let checked = check_health(c, h, &l, p, opts.health_timeout)
        .await
        .map_err(|e| left_with(e, left_pending(id, p)))?;
    match checked {
        Ok(hl) => {
            // The record, the end of `pending` and the pruning in one round trip.
            let then = format!("{}{}", l.clear_pending(), l.prune(h.keep, id));
            record_health_with(c, &l, id, &Ok(hl.clone()), None, &then).await?;
            r.health = Some(hl);
            r.outcome = Outcome::Deployed;
            r.ok = true;
            Ok(())
        }
        Err(reason) => {
            let prev = p.current.as_ref();
            Err(roll_back(c, h, &l, p, signed, id, prev, reason, opts, progress, r).await?)
        }
    }
}

/// After `id` failed its health check: back to the previous release (restarted, checked,
/// and the reason recorded on the board), or, with none, the runtime stopped. Returns the
/// error that reports it.
#[allow(clippy::too_many_arguments)]
async fn roll_back(
    c: &Conn,
    h: &HostConfig,
    l: &Layout,
    p: &Probe,
    signed: bool,
    id: &str,
    previous: Option<&String>,
    reason: String,
    opts: &Options,
    progress: &dyn HostProgress,
    r: &mut HostReport,
) -> Result<DeployError, DeployError> {
    record_health(c, l, id, &Err(reason.clone())).await?;
    progress.stage("rolling back");
    let after = match previous {
        Some(prev) => {
            c.sh("rolling back", &l.swap_back()).await?;
            restart(c, h, l, p, signed).await?;
            r.outcome = Outcome::RolledBack;
            r.release = Some(prev.clone());
            let again = check_health(c, h, l, p, opts.health_timeout)
                .await
                .map_err(|e| {
                    left_with(
                        e,
                        format!("{id} failed its check ({reason}); the board was switched back to {prev} and restarted, unchecked"),
                    )
                })?;
            record_health_with(c, l, prev, &again, Some((id, &reason)), "").await?;
            match again {
                Ok(hl) => {
                    r.health = Some(hl);
                    format!("rolled back to {prev}, which is healthy")
                }
                Err(e) => {
                    format!("rolled back to {prev}, which is not healthy either: {e}")
                }
            }
        }
        None => {
            stop(c, h, l, p).await?;
            c.sh(
                "removing the failed release's link",
                &format!(
                    "rm -f {} {}",
                    quote(&l.path("current")),
                    quote(&l.path(".pending"))
                ),
            )
            .await?;
            r.release = None;
            "there was no previous release; the runtime was stopped".into()
        }
    };
    Ok(DeployError::Unhealthy {
        host: h.name.clone(),
        release: id.to_string(),
        reason,
        after,
    })
}

#[allow(clippy::too_many_arguments)]
async fn upload(
    c: &Conn,
    l: &Layout,
    b: &LocalBundle,
    survey: &Survey,
    opts: &Options,
    runner: Option<&str>,
    progress: &dyn HostProgress,
    r: &mut HostReport,
) -> Result<BTreeSet<String>, DeployError> {
    progress.stage("planning");
    let incoming = l.incoming(&b.release_id);
    // What earlier releases hold, by sha256: their manifests were verified on the board.
    let mut held: BTreeMap<&str, String> = BTreeMap::new();
    for (rel, m) in &survey.manifests {
        for f in &m.files {
            held.entry(f.sha256.as_str())
                .or_insert_with(|| format!("{}/{}", l.release(rel), f.path));
        }
    }
    // The local files are read only when something is sent (or a partial upload compared).
    let needs_local = b.files.iter().any(|f| match survey.have.get(&f.path) {
        Some(n) => *n != f.size,
        None => !held.contains_key(f.sha256.as_str()),
    });
    // An archive is streamed as it decompresses, unless a partial upload must be compared
    // with its file's start (then it is unpacked, as a resume is rare).
    let partial = b.files.iter().any(|f| {
        survey
            .have
            .get(&f.path)
            .is_some_and(|n| *n > 0 && *n != f.size)
    });
    let stream_archive = b.folder.is_none() && !partial;
    let dir = if needs_local && !stream_archive {
        if b.folder.is_none() {
            progress.stage("unpacking the bundle");
        }
        tokio::task::block_in_place(|| b.files_dir())?.to_path_buf()
    } else {
        PathBuf::new()
    };
    let mut plans = Vec::new();
    let mut to_send = 0u64;
    for f in &b.files {
        let local = dir.join(&f.path);
        let partial = format!("{incoming}/{}", f.path);
        let plan = match survey.have.get(&f.path).copied() {
            Some(n) if n == f.size => Plan::Present,
            Some(n) if n > 0 && n < f.size => {
                let remote = c
                    .sh("hashing the partial upload", &l.prefix_sha(&partial, n))
                    .await?;
                if remote.trim() == local_prefix_sha(&local, n)? {
                    Plan::Resume(n)
                } else {
                    c.sh("discarding a damaged partial upload", &l.truncate(&partial))
                        .await?;
                    Plan::Resume(0)
                }
            }
            Some(n) if n > f.size => {
                c.sh("discarding a damaged partial upload", &l.truncate(&partial))
                    .await?;
                Plan::Resume(0)
            }
            _ => match held.get(f.sha256.as_str()) {
                Some(src) => Plan::Reuse(src.clone()),
                None => Plan::Send,
            },
        };
        match &plan {
            Plan::Resume(n) => to_send += f.size - n,
            Plan::Send => to_send += f.size,
            _ => {}
        }
        plans.push((f, local, plan));
    }
    // Refused before a byte is sent when the board cannot hold what must be sent.
    if let Some(free) = survey.free {
        let mib = |n: u64| n as f64 / (1 << 20) as f64;
        if to_send > free {
            return Err(DeployError::Refused {
                host: r.host.clone(),
                message: format!(
                    "{} has {:.1} MiB free; this release needs {:.1} MiB more there (files the board does not hold yet); nothing was sent\nhint: free space on the board, or lower `keep` in the inventory so fewer old releases stay",
                    l.install_dir,
                    mib(free),
                    mib(to_send)
                ),
            });
        }
    }
    progress.upload_start(to_send);
    progress.stage("uploading");
    let advance = |n: u64| progress.advance(n);
    // Links to files earlier releases hold go in one script.
    let links: String = plans
        .iter()
        .filter_map(|(f, _, plan)| match plan {
            Plan::Reuse(src) => Some(l.link(src, &format!("{incoming}/{}", f.path))),
            _ => None,
        })
        .collect();
    if !links.is_empty() {
        c.sh("reusing files the board has", &links).await?;
    }
    // Once the board holds the release's runtime with its manifest's hash (sent first and
    // hashed on arrival, or linked from a verified release), that runtime receives the rest.
    let mut intake = Intake {
        runtime: format!("{incoming}/{RUNTIME_IN_RELEASE}"),
        runner,
        by_runtime: false,
    };
    if plans
        .iter()
        .any(|(f, _, plan)| f.path == RUNTIME_IN_RELEASE && matches!(plan, Plan::Reuse(_)))
    {
        intake.runtime_checked(c, l).await?;
    }
    // Files the board hashed as they arrived, whole and matching: no second read needed.
    let mut hashed = BTreeSet::new();
    let mut sends: Vec<(&FileEntry, PathBuf, u64)> = Vec::new();
    for (f, local, plan) in plans {
        match plan {
            Plan::Present => r.files_present += 1,
            Plan::Reuse(_) => r.files_reused += 1,
            Plan::Resume(n) => sends.push((f, local, n)),
            Plan::Send => sends.push((f, local, 0)),
        }
    }
    // The runtime first, so it can receive the rest (an archive lists `bin/` first too: its
    // entries are sorted).
    sends.sort_by_key(|(f, _, _)| f.path != RUNTIME_IN_RELEASE);
    if stream_archive && !sends.is_empty() {
        // Each file goes out as the archive is decompressed, in the archive's order.
        let wanted: BTreeMap<String, &FileEntry> =
            sends.iter().map(|(f, _, _)| (f.path.clone(), *f)).collect();
        let names: BTreeSet<String> = wanted.keys().cloned().collect();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let archive = b.source.clone();
        let reader = tokio::task::spawn_blocking(move || read_archive_files(&archive, &names, tx));
        let mut done = 0;
        while let Some(msg) = rx.recv().await {
            let path = match msg {
                ssh::Chunk::Start(p) => p,
                ssh::Chunk::Failed(message) => {
                    return Err(DeployError::Local {
                        path: b.source.clone(),
                        message,
                    })
                }
                _ => continue,
            };
            let Some(f) = wanted.get(&path).copied() else {
                continue;
            };
            let first = match rx.recv().await {
                Some(ssh::Chunk::Data(d)) => d,
                Some(ssh::Chunk::Failed(message)) => {
                    return Err(DeployError::Local {
                        path: b.source.clone(),
                        message,
                    })
                }
                _ => Vec::new(),
            };
            let zstd = survey.probe.zstd && sample_compresses(&first);
            let remote = format!("{incoming}/{}", f.path);
            let name = b.source.join(&f.path);
            let up = c
                .upload_chunks(
                    &name,
                    &mut rx,
                    first,
                    &intake.script(l, &remote, zstd),
                    zstd,
                    opts.limit_rate,
                    &advance,
                )
                .await?;
            r.files_received_by_runtime += usize::from(intake.by_runtime);
            if check_upload(c, r, f, &remote, &name, 0, up).await? {
                hashed.insert(f.path.clone());
                intake.arrived(c, l, &f.path).await?;
            }
            done += 1;
        }
        if let Ok(Err(message)) = reader.await {
            return Err(DeployError::Local {
                path: b.source.clone(),
                message,
            });
        }
        if done != wanted.len() {
            return Err(DeployError::Local {
                path: b.source.clone(),
                message: format!(
                    "holds {done} of the {} files its manifest lists and the board lacks",
                    wanted.len()
                ),
            });
        }
        return Ok(hashed);
    }
    for (f, local, offset) in sends {
        let remote = format!("{incoming}/{}", f.path);
        let zstd = survey.probe.zstd && compressible(&local)?;
        let up = c
            .upload(
                &local,
                offset,
                &intake.script(l, &remote, zstd),
                zstd,
                opts.limit_rate,
                &advance,
            )
            .await?;
        r.files_received_by_runtime += usize::from(intake.by_runtime);
        if check_upload(c, r, f, &remote, &local, offset, up).await? {
            hashed.insert(f.path.clone());
            intake.arrived(c, l, &f.path).await?;
        }
    }
    Ok(hashed)
}

/// sha256 of no bytes: what a working receiver answers for an empty stream.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The board's end of an upload: the shell pipeline ([`Layout::append`]) until the incoming
/// release's runtime is on the board with its manifest's hash and receives the rest
/// ([`Layout::receive`]).
struct Intake<'a> {
    /// The runtime binary in the incoming release.
    runtime: String,
    runner: Option<&'a str>,
    /// Whether the runtime receives uploads now.
    by_runtime: bool,
}

impl Intake<'_> {
    /// The script that receives `remote`.
    fn script(&self, l: &Layout, remote: &str, zstd: bool) -> String {
        if self.by_runtime {
            l.receive(&self.runtime, self.runner, remote, zstd)
        } else {
            l.append(remote, zstd)
        }
    }

    /// After the file `path` of the release arrived whole and matching its hash: the
    /// runtime's arrival hands it the rest.
    async fn arrived(&mut self, c: &Conn, l: &Layout, path: &str) -> Result<(), DeployError> {
        if path == RUNTIME_IN_RELEASE && !self.by_runtime {
            self.runtime_checked(c, l).await?;
        }
        Ok(())
    }

    /// The runtime is on the board with its manifest's hash: it receives the rest if it runs
    /// there and knows `receive` ([`Layout::receiver_check`]). One that does not (built for
    /// another C library, or a release from before `receive`) leaves the upload to the shell
    /// pipeline; only a broken connection is an error.
    async fn runtime_checked(&mut self, c: &Conn, l: &Layout) -> Result<(), DeployError> {
        let step = "trying the release's runtime as the receiver";
        self.by_runtime = match c
            .sh(step, &l.receiver_check(&self.runtime, self.runner))
            .await
        {
            Ok(out) => {
                let mut lines = out.lines().map(str::trim);
                let ok = lines.next() == Some(EMPTY_SHA256) && lines.next() == Some("0");
                if !ok {
                    tracing::debug!(host = c.host, out, "the release's runtime did not receive");
                }
                ok
            }
            Err(DeployError::Remote { stderr, .. }) => {
                tracing::debug!(
                    host = c.host,
                    stderr,
                    "the release's runtime cannot receive"
                );
                false
            }
            Err(e) => return Err(e),
        };
        Ok(())
    }
}

/// Checks one upload: the bytes read locally against the manifest (a mismatch is the
/// bundle's fault), then what the board wrote (a mismatch is the link's or the board's).
/// Either removes the file on the board and fails. True when the board hashed the whole
/// file as it arrived.
async fn check_upload(
    c: &Conn,
    r: &mut HostReport,
    f: &FileEntry,
    remote: &str,
    local: &Path,
    offset: u64,
    up: ssh::Uploaded,
) -> Result<bool, DeployError> {
    r.bytes_sent += up.file_bytes;
    r.channel_bytes += up.channel_bytes;
    if offset > 0 {
        r.files_resumed += 1;
    } else {
        r.files_sent += 1;
    }
    let mut out = up.stdout.lines();
    let (sha, size) = (out.next().unwrap_or("").trim(), out.next().unwrap_or(""));
    let size: Option<u64> = size.trim().parse().ok();
    // The local file was hashed as it was read: one that does not match the (signed)
    // manifest is the bundle's fault, not the link's.
    if (offset == 0 && up.sha256 != f.sha256) || up.file_bytes != f.size - offset {
        c.sh("removing a bad upload", &format!("rm -f {}", quote(remote)))
            .await?;
        return Err(DeployError::Local {
            path: local.to_path_buf(),
            message: format!(
                "does not match the bundle's manifest (read {} bytes with sha256 {}; the manifest lists {} bytes with {}); the bundle is damaged or changed, nothing was switched",
                up.file_bytes + offset,
                up.sha256,
                f.size,
                f.sha256
            ),
        });
    }
    if size != Some(f.size) || (offset == 0 && sha != f.sha256) {
        c.sh(
            "removing a damaged upload",
            &format!("rm -f {}", quote(remote)),
        )
        .await?;
        return Err(DeployError::Corrupted {
            host: r.host.clone(),
            kept: r.previous.clone().unwrap_or_else(|| "no release".to_string()),
            detail: format!(
                "{}: FAILED (the board wrote {} bytes with sha256 {sha}; the bundle has {} bytes with {})",
                f.path,
                size.map_or_else(|| "an unknown number of".to_string(), |n| n.to_string()),
                f.size,
                f.sha256
            ),
        });
    }
    Ok(offset == 0)
}

/// Bytes of each message when a file is read out of an archive.
const ARCHIVE_CHUNK: usize = 1 << 20;

/// Reads the files `wanted` (paths inside the bundle) out of a bundle archive in its order
/// and sends each as Start, Data..., End; other entries are skipped. Stops when the
/// receiver is gone. Errors come back as the result and as a `Failed` message.
fn read_archive_files(
    archive: &Path,
    wanted: &BTreeSet<String>,
    tx: tokio::sync::mpsc::Sender<ssh::Chunk>,
) -> Result<(), String> {
    use std::io::Read;
    let res = (|| -> Result<(), String> {
        let file = std::fs::File::open(archive).map_err(|e| e.to_string())?;
        let dec = zstd::Decoder::new(file).map_err(|e| e.to_string())?;
        let mut tar = tar::Archive::new(dec);
        for entry in tar
            .entries()
            .map_err(|e| format!("not a tar.zst archive: {e}"))?
        {
            let mut entry = entry.map_err(|e| format!("not a tar.zst archive: {e}"))?;
            let raw = entry
                .path()
                .map_err(|e| format!("entry path: {e}"))?
                .to_string_lossy()
                .into_owned();
            let Some((_, inner)) = raw.split_once('/') else {
                continue;
            };
            if !wanted.contains(inner) || entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            if tx
                .blocking_send(ssh::Chunk::Start(inner.to_string()))
                .is_err()
            {
                return Ok(());
            }
            loop {
                let mut buf = vec![0u8; ARCHIVE_CHUNK];
                let mut n = 0;
                while n < buf.len() {
                    let k = entry
                        .read(&mut buf[n..])
                        .map_err(|e| format!("`{raw}`: {e}"))?;
                    if k == 0 {
                        break;
                    }
                    n += k;
                }
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                if tx.blocking_send(ssh::Chunk::Data(buf)).is_err() {
                    return Ok(());
                }
            }
            if tx.blocking_send(ssh::Chunk::End).is_err() {
                return Ok(());
            }
        }
        Ok(())
    })();
    if let Err(m) = &res {
        let _ = tx.blocking_send(ssh::Chunk::Failed(m.clone()));
    }
    res
}

/// True when zstd shrinks `sample` by more than 3% (see [`compressible`]).
fn sample_compresses(sample: &[u8]) -> bool {
    sample.len() >= 64 * 1024
        && zstd::bulk::compress(sample, 1)
            .map(|p| (p.len() as f64) < 0.97 * sample.len() as f64)
            .unwrap_or(false)
}

/// Bytes sampled to decide whether a file is worth compressing on the wire.
const SAMPLE: usize = 4 << 20;

/// True when zstd shrinks a sample of `path` by more than 3%: executables and tokenizers do
/// (the runtime binary to about a quarter), Q8_0 weights by about 5%. zstd level 1
/// compresses faster than a gigabit link carries, so on a board's link anything it saves is
/// time saved; already-compressed files are sent as they are.
fn compressible(path: &Path) -> Result<bool, DeployError> {
    use std::io::Read;
    let err = |e: std::io::Error| DeployError::Local {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut sample = Vec::with_capacity(SAMPLE);
    std::fs::File::open(path)
        .map_err(err)?
        .take(SAMPLE as u64)
        .read_to_end(&mut sample)
        .map_err(err)?;
    Ok(sample_compresses(&sample))
}

/// `sha256sum -c` on the board of every file of the incoming release that was not hashed as
/// it arrived (resumed, left by an interrupted deploy, or linked from an earlier release),
/// then the count check and the commit; on a mismatch the damaged files are removed (the next
/// deploy sends them again) and nothing is switched.
async fn verify_on_board(
    c: &Conn,
    h: &HostConfig,
    l: &Layout,
    b: &LocalBundle,
    p: &Probe,
    hashed: &BTreeSet<String>,
) -> Result<(), DeployError> {
    let sums: String = b
        .files
        .iter()
        .filter(|f| !hashed.contains(&f.path))
        .map(|f| format!("{}  {}\n", f.sha256, f.path))
        .collect();
    let exec = [RUNTIME_IN_RELEASE];
    match c
        .sh_in(
            "verifying the upload",
            &l.verify_and_commit(&b.release_id, !sums.is_empty(), b.files.len(), &exec),
            sums.as_bytes(),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(DeployError::Remote {
            code: Some(3),
            stderr,
            ..
        }) => {
            let incoming = l.incoming(&b.release_id);
            let bad: Vec<String> = stderr
                .lines()
                .filter_map(|line| line.strip_suffix(": FAILED"))
                .filter(|p| b.files.iter().any(|f| f.path == *p))
                .map(|p| quote(&format!("{incoming}/{p}")))
                .collect();
            if !bad.is_empty() {
                c.sh(
                    "removing damaged files",
                    &format!("rm -f {}", bad.join(" ")),
                )
                .await?;
            }
            Err(DeployError::Corrupted {
                host: h.name.clone(),
                kept: p
                    .current
                    .clone()
                    .unwrap_or_else(|| "no release".to_string()),
                detail: stderr,
            })
        }
        Err(e) => Err(e),
    }
}

impl HostReport {
    /// The report of a host whose deploy never started: refused before connecting, or
    /// skipped by the rollout.
    pub(crate) fn unstarted(host: &str, outcome: Outcome, error: String) -> HostReport {
        HostReport::failed(host, outcome, Some(error))
    }

    /// A report of nothing done yet: not ok, nothing sent.
    fn failed(host: &str, outcome: Outcome, error: Option<String>) -> HostReport {
        HostReport {
            host: host.to_string(),
            ok: false,
            outcome,
            release: None,
            previous: None,
            bytes_sent: 0,
            channel_bytes: 0,
            files_sent: 0,
            files_resumed: 0,
            files_reused: 0,
            files_present: 0,
            files_received_by_runtime: 0,
            health: None,
            error,
            seconds: 0.0,
            phases: Vec::new(),
        }
    }
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime starts")
}

/// What `edgepack status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub host: String,
    pub install_dir: String,
    pub current: Option<String>,
    pub previous: Option<String>,
    pub releases: Vec<String>,
    pub model: Option<String>,
    pub target: Option<String>,
    pub service: String,
    pub running: bool,
    pub pid: Option<u32>,
    pub uptime_s: Option<u64>,
    /// The last health check, as recorded on the board.
    pub last_check: Option<serde_json::Value>,
}

pub fn status(h: &HostConfig, opts: &Options) -> Result<Status, DeployError> {
    runtime().block_on(async {
        let c = Conn::open(h, opts.accept_new_host_key).await?;
        let l = Layout::new(&h.install_dir);
        let p = probe(&c, &l).await?;
        let (mut model, mut target) = (None, None);
        if let Some(cur) = &p.current {
            let text = c
                .sh(
                    "reading the current manifest",
                    &format!("cat {}", quote(&format!("{}/{MANIFEST}", l.release(cur)))),
                )
                .await?;
            if let Ok(m) = Manifest::from_bytes(text.as_bytes(), Path::new(MANIFEST)) {
                model = Some(format!(
                    "{} ({}, {})",
                    m.model.name, m.format, m.quant.preset
                ));
                target = Some(m.target.profile);
            }
        }
        let (running, pid, uptime_s, service) = if p.systemd {
            let out = c
                .sh(
                    "reading the unit's state",
                    &format!(
                        "systemctl show {} -p MainPID -p ActiveState --value; true",
                        quote(&h.service)
                    ),
                )
                .await?;
            let mut it = out.lines();
            let pid: Option<u32> = it
                .next()
                .and_then(|s| s.trim().parse().ok())
                .filter(|p| *p > 0);
            let active = it.next().map(|s| s.trim() == "active").unwrap_or(false);
            (active, pid, None, format!("systemd unit {}", h.service))
        } else {
            let out = c
                .sh("reading the runtime's state", &l.supervised_state())
                .await?;
            let first = out.lines().next().unwrap_or("stopped");
            let parts: Vec<&str> = first.split_whitespace().collect();
            if parts.first() == Some(&"running") {
                (
                    true,
                    parts.get(1).and_then(|s| s.parse().ok()),
                    parts.get(2).and_then(|s| s.parse().ok()),
                    "supervised process (runtime.pid)".to_string(),
                )
            } else {
                (
                    false,
                    None,
                    None,
                    "supervised process (runtime.pid)".to_string(),
                )
            }
        };
        let hj = c
            .sh(
                "reading health.json",
                &format!("cat {} 2>/dev/null || true", quote(&l.path("health.json"))),
            )
            .await?;
        let last_check = serde_json::from_str(&hj).ok();
        c.close().await;
        Ok(Status {
            host: h.name.clone(),
            install_dir: h.install_dir.clone(),
            current: p.current,
            previous: p.previous,
            releases: p.releases,
            model,
            target,
            service,
            running,
            pid,
            uptime_s,
            last_check,
        })
    })
}

/// What `edgepack rollback` did.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackReport {
    pub host: String,
    pub from: Option<String>,
    pub to: String,
    pub health: Option<Health>,
}

/// Switches `current` back to `previous`, restarts, and checks the health of what now runs.
pub fn rollback(h: &HostConfig, opts: &Options) -> Result<RollbackReport, DeployError> {
    runtime().block_on(async {
        let c = Conn::open(h, opts.accept_new_host_key).await?;
        let l = Layout::new(&h.install_dir);
        let p = probe(&c, &l).await?;
        let to = c.sh("rolling back", &l.swap_back()).await?;
        let to = release_of(to.trim()).unwrap_or_else(|| to.trim().to_string());
        let signed = c
            .sh(
                "looking for a trusted key",
                &format!(
                    "[ -f {} ] && echo yes || true",
                    quote(&l.path("trusted.pub.pem"))
                ),
            )
            .await?
            .trim()
            == "yes";
        restart(&c, h, &l, &p, signed).await?;
        let checked = check_health(&c, h, &l, &p, opts.health_timeout).await?;
        record_health(&c, &l, &to, &checked).await?;
        c.close().await;
        match checked {
            Ok(hl) => Ok(RollbackReport {
                host: h.name.clone(),
                from: p.current,
                to,
                health: Some(hl),
            }),
            Err(reason) => Err(DeployError::Unhealthy {
                host: h.name.clone(),
                release: to,
                reason,
                after: "the rollback switched releases, but what runs now is not healthy".into(),
            }),
        }
    })
}

/// Prints the runtime's log (systemd journal or `logs/runtime.log`) on our stdout.
pub fn logs(h: &HostConfig, opts: &Options, lines: u32, follow: bool) -> Result<(), DeployError> {
    runtime().block_on(async {
        let c = Conn::open(h, opts.accept_new_host_key).await?;
        let l = Layout::new(&h.install_dir);
        let p = probe(&c, &l).await?;
        let unit = p.systemd.then_some(h.service.as_str());
        let res = c
            .sh_inherit("reading the log", &l.logs(unit, lines, follow))
            .await;
        c.close().await;
        res
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_survey_frames_manifests_by_length_with_or_without_a_final_newline() {
        let mut out = b"arch aarch64\nzstd yes\nstate running 12 40\nmanifest r1 9\n".to_vec();
        // Not a manifest (skipped), with no final newline: the next line follows at once.
        out.extend_from_slice(b"not json!");
        out.extend_from_slice(b"manifest r2 3\n{}\n");
        out.extend_from_slice(b"size 42 model/m.gguf\nrelease r1\n");
        let sv = parse_survey(&out);
        assert_eq!(sv.probe.arch, "aarch64");
        assert!(sv.probe.zstd);
        assert_eq!(sv.state, ["running 12 40"]);
        assert!(sv.manifests.is_empty(), "neither body is a valid manifest");
        assert_eq!(sv.have.get("model/m.gguf"), Some(&42));
        assert_eq!(sv.probe.releases, ["r1"]);
        // A length past the end stops the parse instead of reading out of bounds.
        let sv = parse_survey(b"manifest r3 999\n{}");
        assert!(sv.manifests.is_empty());
    }

    #[test]
    fn architectures_match_uname_names() {
        assert!(arch_matches("aarch64-unknown-linux-gnu", "aarch64"));
        assert!(arch_matches("x86_64-unknown-linux-gnu", "x86_64"));
        assert!(!arch_matches("aarch64-unknown-linux-gnu", "x86_64"));
    }

    #[test]
    fn the_runtime_command_quotes_paths_and_keeps_the_runner() {
        let mut h = HostConfig::new("root@b");
        h.install_dir = "/tmp/a b".into();
        h.runner = Some("qemu-aarch64 -L /usr/aarch64-linux-gnu".into());
        let cmd = runtime_command(&h, &Layout::new(&h.install_dir), true);
        assert_eq!(
            cmd,
            "qemu-aarch64 -L /usr/aarch64-linux-gnu '/tmp/a b/current/bin/edgepack-runtime' serve --bundle '/tmp/a b/current' --port 8080 --trusted-key '/tmp/a b/trusted.pub.pem'"
        );
    }
}
