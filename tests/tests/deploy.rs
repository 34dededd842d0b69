//! `edgepack deploy | status | rollback | logs` against a real OpenSSH server (Debian sshd on
//! loopback, started per test), with boards emulated by folders and the real runtime serving
//! the real SmolLM2 model on them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use edgepack_tests::sshd::{free_port, Board, Fault, Sshd};
use edgepack_tests::{
    edgepack, fixtures, health, onnxruntime_lib, output_within, python, root, run_err, run_ok,
    run_ok_within, runtime_bin, shared_work_dir, smollm2_gguf, wait_healthy, wait_output_within,
};
use serde_json::Value;

const BUNDLE: &str = "smollm2-generic-x86_64";

/// `edgepack bundle` of SmolLM2 for this machine at `quant`, with `runtime` in bin/.
fn bundle(tag: &str, quant: &str, runtime: &Path) -> PathBuf {
    let out = shared_work_dir().join(format!("deploy-bundle-{tag}"));
    let out = fixtures::build_once(&out, |tmp| {
        run_ok(
            edgepack()
                .arg("bundle")
                .arg(smollm2_gguf())
                .args(["--target", "generic-x86_64", "--quant", quant])
                .args(["--name", "smollm2", "--runtime"])
                .arg(runtime)
                .arg("-o")
                .arg(tmp),
        );
    });
    out.join(BUNDLE)
}

/// Release A: Q8_0 with the real runtime.
fn bundle_a() -> PathBuf {
    bundle("a-q8", "Q8_0", runtime_bin())
}

/// Release B: another model file (Q4_0), the same runtime binary.
fn bundle_b() -> PathBuf {
    bundle("b-q4", "Q4_0", runtime_bin())
}

/// The release id deploy gives a bundle: model name and the manifest's sha256 prefix.
fn release_id(bundle: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(bundle.join("manifest.json")));
    let sha = String::from_utf8_lossy(&out.stdout);
    format!("{BUNDLE}-{}", &sha[..12])
}

/// How long one deploy to a loopback board may take before the test stops it: they take
/// seconds to a minute, several times that on a loaded two-core machine.
const DEPLOY_LIMIT: Duration = Duration::from_secs(420);

/// `edgepack --json deploy` to the emulated board, logging its stages and board commands
/// (`EDGEPACK_LOG`) so a failure or a stall shows where it was.
fn deploy(sshd: &Sshd, board: &Board, bundle: &Path, runtime_port: u16) -> Command {
    let mut c = edgepack();
    c.env("EDGEPACK_LOG", "edgepack_targets=debug");
    c.arg("--json")
        .arg("deploy")
        .arg(bundle)
        .args(["--host", &sshd.alias, "--ssh-config"])
        .arg(sshd.config())
        .arg("--install-dir")
        .arg(board.install_dir())
        .args(["--runtime-port", &runtime_port.to_string()]);
    c
}

fn host_report(out: &Output) -> Value {
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "deploy --json printed no JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    v["hosts"][0].clone()
}

/// Waits until `reached` holds while the deploy `child` (stdout and stderr piped) runs, and
/// gives the child back; fails with its output if it ends first, and after 120 s.
fn running_until(mut child: Child, what: &str, reached: impl Fn() -> bool) -> Child {
    let t = Instant::now();
    while !reached() {
        let ended = child.try_wait().unwrap().is_some();
        if ended || t.elapsed() > Duration::from_secs(120) {
            let why = if ended {
                "the deploy ended"
            } else {
                let _ = child.kill();
                "120 s passed and the deploy was killed"
            };
            let out = wait_output_within(child, Duration::from_secs(10), "the deploy");
            panic!(
                "{why} ({}) before {what}\nstdout:\n{}\nstderr:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Runs a deploy that must succeed, within [`DEPLOY_LIMIT`].
fn deploy_ok(cmd: &mut Command) -> Output {
    run_ok_within(cmd, DEPLOY_LIMIT)
}

/// Runs a command that must fail (within [`DEPLOY_LIMIT`]) and returns its stdout JSON and
/// stderr.
fn run_fail(cmd: &mut Command) -> (Output, String) {
    let out = output_within(cmd, DEPLOY_LIMIT);
    assert!(
        !out.status.success(),
        "expected failure:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, err)
}

/// GET /health on the board's runtime (the test machine is the board, so its loopback port).
fn size_of(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn clean_deploy_redeploy_sends_nothing_new_release_reuses_runtime_and_rollback_returns() {
    let (a, b) = (bundle_a(), bundle_b());
    let sshd = Sshd::start("board1");
    let board = Board::new();
    let port = free_port();

    // First deploy: every file is sent, checked on the board and switched to.
    let first = host_report(&deploy_ok(&mut deploy(&sshd, &board, &a, port)));
    eprintln!("first deploy: {first}");
    assert_eq!(first["outcome"], "deployed", "{first}");
    let total: u64 = ["bin/edgepack-runtime", "model/smollm2.gguf"]
        .iter()
        .map(|f| size_of(&a.join(f)))
        .sum();
    assert!(first["bytes_sent"].as_u64().unwrap() >= total, "{first}");
    // The board has zstd: the runtime binary (which compresses) crossed the wire compressed.
    assert!(
        first["channel_bytes"].as_u64().unwrap() < first["bytes_sent"].as_u64().unwrap(),
        "{first}"
    );
    // The board hashed the runtime as it arrived; that runtime then received the rest.
    let sent = first["files_sent"].as_u64().unwrap();
    assert!(sent >= 2, "{first}");
    assert_eq!(
        first["files_received_by_runtime"].as_u64(),
        Some(sent - 1),
        "{first}"
    );
    let id_a = release_id(&a);
    assert_eq!(board.current().as_deref(), Some(id_a.as_str()));
    // The release on the board is a bundle the independent checker accepts.
    assert_release_verifies(&board, &a);
    let h = &first["health"];
    assert!(h["ttft_ms"].as_f64().unwrap() > 0.0, "{first}");
    assert!(h["completion_tokens"].as_u64().unwrap() >= 1, "{first}");
    assert_eq!(health(port), Some(200), "the runtime serves on the board");
    assert_eq!(board.serving_release().as_deref(), Some(id_a.as_str()));
    let recorded: Value =
        serde_json::from_slice(&std::fs::read(board.install_dir().join("health.json")).unwrap())
            .unwrap();
    assert_eq!(recorded["ok"], true);
    assert_eq!(recorded["release"], id_a.as_str());
    let pid = board
        .runtime_pid()
        .expect("a supervised runtime with a pid file");

    // Redeploy of the same bundle, from its archive: the same release, so nothing is sent,
    // nothing restarted, and the archive is never unpacked (only its manifest is read).
    let archive = a.with_file_name(format!(
        "{}.tar.zst",
        a.file_name().unwrap().to_string_lossy()
    ));
    let again = host_report(&deploy_ok(&mut deploy(&sshd, &board, &archive, port)));
    assert_eq!(again["outcome"], "unchanged", "{again}");
    assert_eq!(again["release"], id_a.as_str(), "{again}");
    assert_eq!(again["bytes_sent"], 0, "{again}");
    let stages: Vec<&str> = again["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["stage"].as_str().unwrap())
        .collect();
    assert!(!stages.contains(&"reading the bundle"), "{again}");
    assert_eq!(
        board.runtime_pid(),
        Some(pid),
        "the running runtime was kept"
    );

    // A new model, from its archive: the model is sent, the unchanged runtime binary is
    // linked on the board.
    let b_archive = b.with_file_name(format!(
        "{}.tar.zst",
        b.file_name().unwrap().to_string_lossy()
    ));
    let second = host_report(&deploy_ok(&mut deploy(&sshd, &board, &b_archive, port)));
    assert_eq!(second["outcome"], "deployed", "{second}");
    assert!(second["files_reused"].as_u64().unwrap() >= 1, "{second}");
    // The runtime linked from the verified release received every file sent.
    assert_eq!(
        second["files_received_by_runtime"], second["files_sent"],
        "{second}"
    );
    // The archive was streamed as it decompressed, not unpacked on the workstation first.
    assert!(
        !second["phases"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["stage"] == "unpacking the bundle"),
        "{second}"
    );
    let sent = second["bytes_sent"].as_u64().unwrap();
    assert!(
        sent < size_of(&b.join("model/smollm2.gguf")) + (4 << 20),
        "{second}"
    );
    let id_b = release_id(&b);
    assert_eq!(board.current().as_deref(), Some(id_b.as_str()));
    assert_eq!(second["previous"], id_a.as_str());
    assert_ne!(board.runtime_pid(), Some(pid), "the runtime was restarted");
    assert_eq!(board.serving_release().as_deref(), Some(id_b.as_str()));
    assert_eq!(health(port), Some(200));

    // status shows the release, the model and the last check.
    let st: Value = serde_json::from_slice(
        &deploy_ok(
            edgepack()
                .args(["--json", "status", "--host", &sshd.alias, "--ssh-config"])
                .arg(sshd.config())
                .arg("--install-dir")
                .arg(board.install_dir()),
        )
        .stdout,
    )
    .unwrap();
    let s = &st["hosts"][0];
    assert_eq!(s["current"], id_b.as_str(), "{st}");
    assert_eq!(s["previous"], id_a.as_str(), "{st}");
    assert_eq!(s["running"], true, "{st}");
    assert!(s["model"].as_str().unwrap().contains("Q4_0"), "{st}");
    assert!(s["last_check"]["ttft_ms"].as_f64().unwrap() > 0.0, "{st}");

    // rollback returns to A, restarted and healthy.
    let rb: Value = serde_json::from_slice(
        &deploy_ok(
            edgepack()
                .args(["--json", "rollback", "--host", &sshd.alias, "--ssh-config"])
                .arg(sshd.config())
                .arg("--install-dir")
                .arg(board.install_dir())
                .args(["--runtime-port", &port.to_string()]),
        )
        .stdout,
    )
    .unwrap();
    assert_eq!(rb["to"], id_a.as_str(), "{rb}");
    assert_eq!(board.current().as_deref(), Some(id_a.as_str()));
    assert_eq!(board.serving_release().as_deref(), Some(id_a.as_str()));
    assert_eq!(health(port), Some(200));

    // logs prints the runtime's log from the board.
    let logs = deploy_ok(
        edgepack()
            .args([
                "logs",
                "--lines",
                "100000",
                "--host",
                &sshd.alias,
                "--ssh-config",
            ])
            .arg(sshd.config())
            .arg("--install-dir")
            .arg(board.install_dir()),
    );
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(text.contains("edgepack: starting releases/"), "{text}");
}

/// `sha256sum -c` (coreutils, not edgepack) of `bundle`'s manifest over its release on the
/// board passes.
fn assert_release_verifies(board: &Board, bundle: &Path) {
    let rel = board
        .install_dir()
        .join("releases")
        .join(release_id(bundle));
    run_ok(
        Command::new("sha256sum")
            .current_dir(&rel)
            .arg("-c")
            .arg("--quiet")
            .stdin(Stdio::from(
                std::fs::File::open(sums_file(bundle, board.root.path())).unwrap(),
            )),
    );
}

/// `sha256sum -c` input for a bundle's files, written outside the board.
fn sums_file(bundle: &Path, dir: &Path) -> PathBuf {
    let m: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("manifest.json")).unwrap()).unwrap();
    let mut s = String::new();
    for f in m["files"].as_array().unwrap() {
        s.push_str(&format!(
            "{}  {}\n",
            f["sha256"].as_str().unwrap(),
            f["path"].as_str().unwrap()
        ));
    }
    let p = dir.join("sums.txt");
    std::fs::write(&p, s).unwrap();
    p
}

#[test]
fn a_connection_cut_mid_upload_keeps_the_old_release_running_and_the_next_deploy_resumes() {
    let (a, b) = (bundle_a(), bundle_b());
    let mut sshd = Sshd::start("board2");
    let board = Board::new();
    let port = free_port();
    deploy_ok(&mut deploy(&sshd, &board, &a, port));
    let id_a = release_id(&a);
    let pid = board.runtime_pid().unwrap();

    // B's model goes up at 20 MB/s; the server dies once part of it is on the board.
    let partial = board
        .install_dir()
        .join(".incoming")
        .join(release_id(&b))
        .join("model/smollm2.gguf");
    let full = size_of(&b.join("model/smollm2.gguf"));
    let child = deploy(&sshd, &board, &b, port)
        .args(["--limit-rate", "20000000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let child = running_until(child, "16 MiB of B's model on the board", || {
        size_of(&partial) >= 16 << 20
    });
    sshd.cut();
    let out = wait_output_within(child, DEPLOY_LIMIT, "the cut deploy");
    assert!(!out.status.success(), "a cut deploy must fail");
    let cut_at = size_of(&partial);
    assert!(cut_at > 0 && cut_at < full, "{cut_at} of {full}");
    let r = host_report(&out);
    assert_eq!(r["outcome"], "failed", "{r}");

    // The board never switched; the old runtime was never touched.
    assert_eq!(board.current().as_deref(), Some(id_a.as_str()));
    assert_eq!(board.runtime_pid(), Some(pid));
    assert_eq!(board.serving_release().as_deref(), Some(id_a.as_str()));
    assert_eq!(health(port), Some(200));

    // Next deploy resumes the model from where it stopped.
    sshd.restart();
    let r = host_report(&deploy_ok(&mut deploy(&sshd, &board, &b, port)));
    assert_eq!(r["outcome"], "deployed", "{r}");
    assert_eq!(r["files_resumed"], 1, "{r}");
    let sent = r["bytes_sent"].as_u64().unwrap();
    assert!(
        sent <= full - cut_at + (4 << 20),
        "sent {sent}, cut at {cut_at} of {full}"
    );
    assert_eq!(board.current().as_deref(), Some(release_id(&b).as_str()));
    assert_eq!(
        board.serving_release().as_deref(),
        Some(release_id(&b).as_str())
    );
}

#[test]
fn a_connection_cut_during_the_health_check_fails_at_once_and_leaves_the_new_release_pending() {
    let (a, b) = (bundle_a(), bundle_b());
    let mut sshd = Sshd::start("board-hc");
    let board = Board::new();
    let port = free_port();
    deploy_ok(&mut deploy(&sshd, &board, &a, port));
    let pid_a = board.runtime_pid().unwrap();
    let id_b = release_id(&b);

    // B is switched to and its supervisor started; the runner's pause holds the runtime's
    // start for 8 s, so the health check's requests (over the SSH port forward) are being
    // refused and retried when the connection goes.
    let child = deploy(&sshd, &board, &b, port)
        .args(["--health-timeout", "600", "--runner", "sleep 8;"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let child = running_until(child, "B's runtime started", || {
        board.runtime_pid().is_some_and(|p| p != pid_a)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(pending(&board), Some(id_b.clone()));
    assert_eq!(
        health(port),
        None,
        "the runtime is still held by its runner"
    );
    sshd.cut();
    let cut = Instant::now();
    let out = wait_output_within(child, DEPLOY_LIMIT, "the cut deploy");
    // Not the 600 s health timeout: the lost connection is noticed at the next request.
    assert!(
        cut.elapsed() < Duration::from_secs(60),
        "the deploy took {:?} after the cut",
        cut.elapsed()
    );
    assert!(!out.status.success(), "a cut deploy must fail");
    let r = host_report(&out);
    assert_eq!(r["outcome"], "failed", "{r}");
    let err = String::from_utf8_lossy(&out.stderr);
    for part in [
        "health check",
        "the connection to the board was lost",
        &format!("the board keeps {id_b}, marked pending"),
    ] {
        assert!(err.contains(part), "missing {part:?} in: {err}");
    }
    // Nothing could be switched back over a dead link: B starts, never seen healthy.
    assert_eq!(board.current().as_deref(), Some(id_b.as_str()));
    assert_eq!(pending(&board), Some(id_b.clone()));
    wait_healthy(
        port,
        Duration::from_secs(60),
        "B's runtime after its runner's pause",
    );
    assert_eq!(board.serving_release().as_deref(), Some(id_b.as_str()));

    // The next deploy of B checks it and clears the mark.
    sshd.restart();
    let r = host_report(&deploy_ok(&mut deploy(&sshd, &board, &b, port)));
    assert_eq!(r["outcome"], "deployed", "{r}");
    assert_eq!(pending(&board), None);
    assert_eq!(board.serving_release().as_deref(), Some(id_b.as_str()));
    assert_eq!(health(port), Some(200));
}

/// What a faulted deploy left the board running.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Left {
    /// The release it ran before, untouched (same process), nothing pending.
    Before,
    /// The new release, switched to and started, but marked pending: never seen healthy.
    NewPending,
}

/// The board's pending mark: the release switched to and not yet seen healthy.
fn pending(board: &Board) -> Option<String> {
    std::fs::read_to_string(board.install_dir().join(".pending"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Deploys `b` over `a` with `fault` armed for the first board command holding `marker`:
/// a cut fault fails the deploy; a held one is ended by SIGKILL to `edgepack` once the board
/// has run the step. Checks what the board runs then, and that the next deploy of `b`
/// finishes the job.
#[allow(clippy::too_many_arguments)]
fn fault_case(
    sshd: &Sshd,
    board: &Board,
    port: u16,
    (a, b): (&Path, &Path),
    step: &str,
    marker: &str,
    fault: Fault,
    left: Left,
) {
    let (id_a, id_b) = (release_id(a), release_id(b));
    let r = host_report(&deploy_ok(&mut deploy(sshd, board, a, port)));
    assert!(
        r["ok"] == true && board.current() == Some(id_a.clone()),
        "{r}"
    );
    let pid = board.runtime_pid();
    sshd.arm(marker, fault);
    if fault == Fault::HoldAfter {
        let mut child = deploy(sshd, board, b, port)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        sshd.wait_struck(Duration::from_secs(120));
        child.kill().unwrap();
        child.wait().unwrap();
    } else {
        let (out, err) = run_fail(&mut deploy(sshd, board, b, port));
        assert!(sshd.struck(), "{step}: the fault never struck: {err}");
        assert_eq!(
            host_report(&out)["outcome"],
            "failed",
            "{step} {fault:?}: {err}"
        );
    }
    let case = format!("{fault:?} at {step}");
    match left {
        Left::Before => {
            assert_eq!(board.current(), Some(id_a.clone()), "{case}");
            assert_eq!(
                board.runtime_pid(),
                pid,
                "{case}: the old runtime was touched"
            );
            assert_eq!(board.serving_release(), Some(id_a.clone()), "{case}");
            assert_eq!(pending(board), None, "{case}");
        }
        Left::NewPending => {
            assert_eq!(board.current(), Some(id_b.clone()), "{case}");
            assert_eq!(pending(board), Some(id_b.clone()), "{case}");
            assert!(
                board.install_dir().join("previous").exists(),
                "{case}: no previous release to roll back to"
            );
        }
    }
    // `current` always names a complete release.
    let cur = board.install_dir().join("current");
    assert!(cur.join("manifest.json").is_file(), "{case}");
    assert!(cur.join("bin/edgepack-runtime").is_file(), "{case}");
    // A runtime restarted by the step comes up on its own.
    wait_healthy(
        port,
        Duration::from_secs(120),
        &format!("{case}: nothing serves"),
    );

    let r = host_report(&deploy_ok(&mut deploy(sshd, board, b, port)));
    assert_eq!(r["outcome"], "deployed", "{case}, then again: {r}");
    assert_eq!(board.current(), Some(id_b.clone()), "{case}");
    assert_eq!(board.serving_release(), Some(id_b), "{case}");
    assert_eq!(pending(board), None, "{case}");
}

#[test]
fn the_fault_matrix_leaves_a_complete_release_serving_and_the_next_deploy_finishes() {
    // Cuts and kills at each step of a deploy of B over A; the rows of docs/reliability.md.
    let (a, b) = (bundle_a(), bundle_b());
    let sshd = Sshd::start("matrix");
    let port = free_port();
    let ab = (a.as_path(), b.as_path());
    // Steps that need B not on the board yet, each on a fresh board. The upload of B's
    // model is the only command that names its incoming file (received by B's runtime,
    // linked from A).
    let upload = format!("{}/model/smollm2.gguf", release_id(&b));
    for (step, marker, fault) in [
        ("upload", upload.as_str(), Fault::HoldAfter),
        ("verification", r#"mv "$I" "$R""#, Fault::CutAfter),
    ] {
        let board = Board::new();
        fault_case(&sshd, &board, port, ab, step, marker, fault, Left::Before);
    }
    // The switch (with the runtime's restart, one script) and the record after the health
    // check, on one board that holds both releases.
    let board = Board::new();
    for (step, marker, fault, left) in [
        ("switch", ".pending.tmp", Fault::CutBefore, Left::Before),
        ("switch", ".pending.tmp", Fault::CutAfter, Left::NewPending),
        ("switch", ".pending.tmp", Fault::HoldAfter, Left::NewPending),
        (
            "health record",
            "health.json",
            Fault::CutBefore,
            Left::NewPending,
        ),
    ] {
        fault_case(&sshd, &board, port, ab, step, marker, fault, left);
    }
}

/// A power cut: every process of the board's supervised runtime dies at once.
fn power_cut(board: &Board, port: u16) {
    let pgid = board.runtime_pid().expect("a supervised runtime");
    run_ok(Command::new("kill").args(["-s", "KILL", "--", &format!("-{pgid}")]));
    // Dead, or a zombie nobody reaps (a container's pid 1 may never).
    let gone = || {
        std::fs::read_to_string(format!("/proc/{pgid}/stat"))
            .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
            .unwrap_or(true)
    };
    let t = Instant::now();
    while !gone() || health(port).is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the runtime survived"
        );
    }
}

/// The board's init running `boot.sh`, then waiting for the runtime it starts.
fn boot(board: &Board, port: u16) {
    let script = board.install_dir().join("boot.sh");
    let out = run_ok(&mut Command::new(&script));
    assert!(out.stderr.is_empty(), "{out:?}");
    wait_healthy(port, Duration::from_secs(60), "nothing serves after boot");
}

#[test]
fn after_a_power_cut_boot_sh_serves_the_last_release_seen_healthy() {
    let (a, b) = (bundle_a(), bundle_b());
    let (id_a, id_b) = (release_id(&a), release_id(&b));
    let sshd = Sshd::start("power");
    let board = Board::new();
    let port = free_port();
    deploy_ok(&mut deploy(&sshd, &board, &a, port));
    let log = || std::fs::read_to_string(board.install_dir().join("logs/runtime.log")).unwrap();

    // Power lost after the switch to B and before its health check: B was never seen
    // healthy, so the board comes back on A.
    sshd.arm(".pending.tmp", Fault::CutAfter);
    run_fail(&mut deploy(&sshd, &board, &b, port));
    assert!(sshd.struck());
    assert_eq!(pending(&board), Some(id_b.clone()));
    power_cut(&board, port);
    assert_eq!(health(port), None);
    boot(&board, port);
    assert_eq!(board.current(), Some(id_a.clone()));
    assert_eq!(board.serving_release(), Some(id_a.clone()));
    assert_eq!(pending(&board), None);
    assert!(
        log().contains(&format!(
            "boot: {id_b} was never seen healthy; rolled back to {id_a}"
        )),
        "{}",
        log()
    );
    // The next deploy switches to B again and checks it.
    let r = host_report(&deploy_ok(&mut deploy(&sshd, &board, &b, port)));
    assert_eq!(r["outcome"], "deployed", "{r}");

    // Power lost on a release seen healthy: it is the one that starts.
    power_cut(&board, port);
    boot(&board, port);
    assert_eq!(board.current(), Some(id_b.clone()));
    assert_eq!(board.serving_release(), Some(id_b));
    // Booted twice without a power cut between: one supervisor, as deploy leaves it.
    let pid = board.runtime_pid();
    boot(&board, port);
    assert_ne!(board.runtime_pid(), pid, "the old supervisor was replaced");
    let supervisors = String::from_utf8(
        run_ok(Command::new("sh").args([
            "-c",
            &format!(
                "ps -eo pid,args | grep -F 'while :' | grep -F '{}' | grep -vc grep || true",
                board.install_dir().display()
            ),
        ]))
        .stdout,
    )
    .unwrap();
    assert_eq!(supervisors.trim(), "1");
}

#[test]
fn a_disk_that_fills_during_the_upload_keeps_the_old_release_and_the_next_deploy_resumes() {
    let (a, b) = (bundle_a(), bundle_b());
    let board = Board::new();
    // The install folder is a file system of its own, seen only by the board's processes:
    // room for A, then B, when the upload starts; full once it has begun.
    let dir = board.install_dir();
    let sshd = Sshd::start_with(
        "board-filling",
        &format!(
            "mkdir -p '{d}' && mount -t tmpfs -o size=640m tmpfs '{d}'",
            d = dir.display()
        ),
    );
    let port = free_port();
    let id_a = release_id(&a);
    deploy_ok(&mut deploy(&sshd, &board, &a, port));
    let on_board = |what: &str| sshd.board_sh(&format!("cd '{}' && {what}", dir.display()));
    assert_eq!(
        on_board("readlink current").trim(),
        format!("releases/{id_a}")
    );

    // The upload of B's model, whichever end receives it (the release's runtime here, as
    // A's runtime binary is linked into B): only the upload names the incoming file.
    sshd.arm(
        &format!("{}/model/smollm2.gguf", release_id(&b)),
        Fault::FillDisk,
    );
    let (out, err) = run_fail(&mut deploy(&sshd, &board, &b, port));
    assert!(sshd.struck());
    let r = host_report(&out);
    assert_eq!(r["outcome"], "failed", "{r}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(
        on_board("readlink current").trim(),
        format!("releases/{id_a}")
    );
    assert_eq!(on_board("cat .pending 2>/dev/null || true").trim(), "");
    assert_eq!(health(port), Some(200));

    // Room again: the next deploy finishes, keeping what arrived.
    on_board("rm .filler");
    let r = host_report(&deploy_ok(&mut deploy(&sshd, &board, &b, port)));
    assert_eq!(r["outcome"], "deployed", "{r}");
    assert_eq!(
        on_board("readlink current").trim(),
        format!("releases/{}", release_id(&b))
    );
    assert_eq!(health(port), Some(200));
}

#[test]
fn a_corrupted_upload_is_refused_before_switching_and_resent_next_time() {
    let (a, b) = (bundle_a(), bundle_b());
    let sshd = Sshd::start("board3");
    let board = Board::new();
    let port = free_port();
    deploy_ok(&mut deploy(&sshd, &board, &a, port));
    let id_a = release_id(&a);
    let pid = board.runtime_pid().unwrap();

    // A bundle damaged on the workstation after it was made (one byte of its model): the
    // deploy hashes each file as it sends it and names the local file, not the link.
    let copy = tempfile::tempdir().unwrap();
    let damaged = copy.path().join(BUNDLE);
    run_ok(Command::new("cp").arg("-r").arg(&b).arg(&damaged));
    let model = damaged.join("model/smollm2.gguf");
    let mut bytes = std::fs::read(&model).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x01;
    std::fs::write(&model, &bytes).unwrap();
    let (out, err) = run_fail(&mut deploy(&sshd, &board, &damaged, port));
    assert!(
        err.contains("does not match the bundle's manifest"),
        "{err}"
    );
    assert!(err.contains(&model.display().to_string()), "{err}");
    assert_eq!(host_report(&out)["outcome"], "failed");
    assert_eq!(board.current().as_deref(), Some(id_a.as_str()));
    assert_eq!(board.runtime_pid(), Some(pid));
    drop(copy);

    // What a failing disk leaves behind: B's model complete in size, wrong in content.
    let model = b.join("model/smollm2.gguf");
    let bad = board
        .install_dir()
        .join(".incoming")
        .join(release_id(&b))
        .join("model/smollm2.gguf");
    std::fs::create_dir_all(bad.parent().unwrap()).unwrap();
    let mut bytes = std::fs::read(&model).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&bad, &bytes).unwrap();

    let (out, err) = run_fail(&mut deploy(&sshd, &board, &b, port));
    assert!(err.contains("corrupted"), "{err}");
    assert!(err.contains("model/smollm2.gguf"), "{err}");
    assert_eq!(host_report(&out)["outcome"], "failed");
    assert_eq!(board.current().as_deref(), Some(id_a.as_str()));
    assert_eq!(board.runtime_pid(), Some(pid));
    assert!(!board
        .install_dir()
        .join("releases")
        .join(release_id(&b))
        .exists());
    assert!(!bad.exists(), "the damaged file was removed");

    let r = host_report(&deploy_ok(&mut deploy(&sshd, &board, &b, port)));
    assert_eq!(r["outcome"], "deployed", "{r}");
}

#[test]
fn an_onnx_bundle_carrying_onnx_runtime_deploys_switches_and_passes_the_health_check() {
    let out = fixtures::build_once(&shared_work_dir().join("deploy-bundle-onnx"), |tmp| {
        run_ok(
            edgepack()
                .arg("bundle")
                .arg(smollm2_gguf())
                .args(["--target", "generic-x86_64", "--format", "onnx"])
                .args(["--precision", "int4", "--name", "smollm2", "--runtime"])
                .arg(runtime_bin())
                .arg("--engine-lib")
                .arg(onnxruntime_lib())
                .arg("-o")
                .arg(tmp),
        );
    });
    let bundle = out.join(BUNDLE);
    let sshd = Sshd::start("onnx-board");
    let board = Board::new();
    let port = free_port();
    let r = host_report(&deploy_ok(&mut deploy(&sshd, &board, &bundle, port)));
    eprintln!("onnx deploy: {r}");
    assert_eq!(r["outcome"], "deployed", "{r}");
    assert!(
        r["health"]["reply"].as_str().unwrap().contains("Paris"),
        "{r}"
    );
    assert_eq!(
        board.current().as_deref(),
        Some(release_id(&bundle).as_str())
    );
    assert_eq!(health(port), Some(200));
    // The board has no ONNX Runtime of its own: the runtime loaded the one the bundle carries.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /v1/models HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.contains("\"engine\":\"onnxruntime\""), "{reply}");
    let current = board.install_dir().join("current");
    assert!(
        reply.contains(&format!("{}/lib/libonnxruntime.so.", current.display())),
        "{reply}"
    );
}

#[test]
fn a_board_without_room_for_the_release_is_refused_before_anything_is_sent() {
    let a = bundle_a();
    let board = Board::new();
    // The board's install folder is a 16 MiB file system, seen only by the board's processes.
    let dir = board.install_dir();
    let sshd = Sshd::start_with(
        "board-full",
        &format!(
            "mkdir -p '{d}' && mount -t tmpfs -o size=16m tmpfs '{d}'",
            d = dir.display()
        ),
    );
    let (out, err) = run_fail(&mut deploy(&sshd, &board, &a, free_port()));
    let r = host_report(&out);
    assert_eq!(r["outcome"], "failed", "{r}");
    assert_eq!(r["bytes_sent"], 0, "{r}");
    assert!(err.contains("MiB free"), "{err}");
    assert!(err.contains("needs"), "{err}");
    assert!(err.contains(&dir.display().to_string()), "{err}");
}

#[test]
fn a_failing_health_check_rolls_back_to_the_previous_release() {
    let a = bundle_a();
    // A bundle whose model is fine but whose runtime cannot serve: its binary exits at once
    // (the balena fault of a broken engine binary).
    let broken = bundle("broken-runtime", "Q8_0", Path::new("/bin/false"));
    let sshd = Sshd::start("board4");
    let board = Board::new();
    let port = free_port();
    deploy_ok(&mut deploy(&sshd, &board, &a, port));
    let id_a = release_id(&a);

    let (out, err) = run_fail(&mut deploy(&sshd, &board, &broken, port));
    let r = host_report(&out);
    assert_eq!(r["outcome"], "rolled-back", "{r}");
    assert!(err.contains("health check"), "{err}");
    assert!(err.contains("runtime exited with status 1"), "{err}");
    assert!(err.contains(&format!("rolled back to {id_a}")), "{err}");
    // The unchanged model was linked on the board, not sent again.
    assert!(r["files_reused"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(board.current().as_deref(), Some(id_a.as_str()));
    assert_eq!(board.serving_release().as_deref(), Some(id_a.as_str()));
    assert_eq!(health(port), Some(200));
    let recorded: Value =
        serde_json::from_slice(&std::fs::read(board.install_dir().join("health.json")).unwrap())
            .unwrap();
    assert_eq!(recorded["release"], id_a.as_str(), "{recorded}");
    assert_eq!(recorded["ok"], true, "{recorded}");
    assert_eq!(
        recorded["rolled_back_from"],
        release_id(&broken),
        "{recorded}"
    );
    assert!(
        recorded["rollback_reason"]
            .as_str()
            .unwrap()
            .contains("exited with status 1"),
        "{recorded}"
    );
    assert!(!board.install_dir().join(".pending").exists());

    // On a board without releases every file is sent. /bin/false cannot receive uploads,
    // so the board's shell pipeline takes every file, and the release is still complete
    // and verified (it fails only its health check).
    let fresh = Board::new();
    let (out, _) = run_fail(&mut deploy(&sshd, &fresh, &broken, free_port()));
    let r = host_report(&out);
    assert!(r["files_sent"].as_u64().unwrap() >= 2, "{r}");
    assert_eq!(r["files_received_by_runtime"], 0, "{r}");
    assert_release_verifies(&fresh, &broken);

    // edgepack killed (SIGKILL) once it has switched to the broken release, before its
    // health check ends: the board is left on an unchecked release, marked pending. The
    // next deploy checks it and rolls it back as the killed one would have.
    let id_broken = release_id(&broken);
    let mut child = deploy(&sshd, &board, &broken, port)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while board.current().as_deref() != Some(id_broken.as_str()) {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(120),
            "never switched"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the deploy ended first"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        std::fs::read_to_string(board.install_dir().join(".pending"))
            .unwrap()
            .trim(),
        id_broken
    );
    let (out, err) = run_fail(&mut deploy(&sshd, &board, &broken, port));
    let r = host_report(&out);
    assert_eq!(r["outcome"], "rolled-back", "{r}");
    assert!(err.contains(&format!("rolled back to {id_a}")), "{err}");
    assert_eq!(board.current().as_deref(), Some(id_a.as_str()));
    assert!(err.contains("which is healthy"), "{err}");
    assert_eq!(health(port), Some(200), "{err}");
    assert!(!board.install_dir().join(".pending").exists());
}

fn status(sshd: &Sshd, board: &Board) -> Command {
    let mut c = edgepack();
    c.args(["status", "--host", &sshd.alias, "--ssh-config"])
        .arg(sshd.config())
        .arg("--install-dir")
        .arg(board.install_dir());
    c
}

#[test]
fn an_unknown_host_key_is_refused_without_the_flag_and_a_changed_key_always() {
    let sshd = Sshd::start("board5");
    let board = Board::new();
    std::fs::write(sshd.path("known_hosts"), "").unwrap();
    let err = run_err(&mut status(&sshd, &board));
    assert!(err.contains("not in known_hosts"), "{err}");
    assert!(err.contains("--accept-new-host-key"), "{err}");

    run_ok(status(&sshd, &board).arg("--accept-new-host-key"));
    let known = std::fs::read_to_string(sshd.path("known_hosts")).unwrap();
    let host_key = std::fs::read_to_string(sshd.path("host_ed25519.pub")).unwrap();
    let key_b64 = host_key.split_whitespace().nth(1).unwrap();
    assert!(
        known.contains(key_b64),
        "the accepted key was recorded: {known}"
    );
    run_ok(&mut status(&sshd, &board));

    // Another key recorded for the same address: a changed key, refused even with the flag.
    let other = std::fs::read_to_string(sshd.path("stranger_ed25519.pub")).unwrap();
    let other: Vec<&str> = other.split_whitespace().take(2).collect();
    std::fs::write(
        sshd.path("known_hosts"),
        format!("[127.0.0.1]:{} {}\n", sshd.port, other.join(" ")),
    )
    .unwrap();
    let err = run_err(status(&sshd, &board).arg("--accept-new-host-key"));
    assert!(err.contains("HAS CHANGED"), "{err}");
}

#[test]
fn a_key_the_board_does_not_accept_gives_a_clear_error() {
    let sshd = Sshd::start("board6");
    let board = Board::new();
    sshd.write_client_config("stranger_ed25519");
    let err = run_err(&mut status(&sshd, &board));
    assert!(err.contains("SSH authentication failed"), "{err}");
    assert!(err.contains("authorized_keys"), "{err}");
}

#[test]
fn a_fleet_deploys_in_parallel_refuses_a_wrong_target_and_fails_the_run() {
    let a = bundle_a();
    let (s1, s2) = (Sshd::start("fleet1"), Sshd::start("fleet2"));
    let (b1, b2, b3) = (Board::new(), Board::new(), Board::new());
    // Both servers' client configs in one file, as ~/.ssh/config would hold them.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("ssh_config");
    let both = format!(
        "{}{}",
        std::fs::read_to_string(s1.config()).unwrap(),
        std::fs::read_to_string(s2.config()).unwrap()
    );
    std::fs::write(&cfg, both).unwrap();
    let inv = dir.path().join("fleet.toml");
    let host = |name: &str, alias: &str, board: &Board, target: &str| {
        format!(
            "[[hosts]]\nname = \"{name}\"\naddress = \"{alias}\"\ngroups = [\"line\"]\ntarget = \"{target}\"\ninstall_dir = \"{}\"\nruntime_port = {}\n",
            board.install_dir().display(),
            free_port()
        )
    };
    std::fs::write(
        &inv,
        format!(
            "[defaults]\nssh_config = \"ssh_config\"\nkeep = 2\n[groups.line]\n{}{}{}",
            host("cam-1", "fleet1", &b1, "generic-x86_64"),
            host("cam-2", "fleet2", &b2, "generic-x86_64"),
            host("cam-3", "fleet1", &b3, "imx95"),
        ),
    )
    .unwrap();
    let out = edgepack()
        .args(["--json", "deploy"])
        .arg(a.parent().unwrap())
        .arg("--inventory")
        .arg(&inv)
        .args(["--parallel", "3"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "one host failed, so the run fails");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let hosts = v["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 3, "{v}");
    assert_eq!(hosts[0]["host"], "cam-1");
    assert_eq!(hosts[0]["outcome"], "deployed", "{v}");
    assert_eq!(hosts[1]["outcome"], "deployed", "{v}");
    assert_eq!(hosts[2]["outcome"], "failed", "{v}");
    assert!(hosts[2]["error"].as_str().unwrap().contains("imx95"), "{v}");
    assert_eq!(v["ok"], false);
    assert!(b1.current().is_some() && b2.current().is_some());
    assert!(
        b3.current().is_none(),
        "nothing was installed on the refused host"
    );

    // The text table names every host.
    let out = edgepack()
        .arg("deploy")
        .arg(a.parent().unwrap())
        .arg("--inventory")
        .arg(&inv)
        .args(["--group", "line"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    for name in ["cam-1", "cam-2", "cam-3"] {
        assert!(table.contains(name), "{table}");
    }
    assert!(table.contains("unchanged"), "{table}");
}

#[test]
fn deploy_help_has_examples() {
    for cmd in [
        &["deploy"][..],
        &["status"],
        &["rollback"],
        &["logs"],
        &["fleet", "import"],
    ] {
        let out = run_ok(edgepack().args(cmd).arg("--help"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Example"), "{cmd:?}: {text}");
    }
}

/// `cargo xtask dist --target imx95 --json`: the cross-compiled aarch64 runtime.
fn aarch64_runtime() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = run_ok(
        Command::new(cargo)
            .current_dir(root())
            .args(["xtask", "dist", "--target", "imx95", "--json"]),
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("dist --json prints JSON");
    PathBuf::from(v["binary"].as_str().expect("dist binary"))
}

#[test]
fn a_signed_aarch64_bundle_deploys_and_serves_under_qemu_on_an_imx95_board() {
    let runtime = aarch64_runtime();
    let keys = fixtures::build_once(&shared_work_dir().join("deploy-key"), |tmp| {
        std::fs::create_dir_all(tmp).unwrap();
        run_ok(edgepack().args(["keygen", "-o"]).arg(tmp.join("key")));
    });
    let out = fixtures::build_once(&shared_work_dir().join("deploy-bundle-imx95"), |tmp| {
        run_ok(
            edgepack()
                .arg("bundle")
                .arg(smollm2_gguf())
                .args(["--target", "imx95", "--quant", "Q8_0", "--name", "smollm2"])
                .arg("--runtime")
                .arg(&runtime)
                .arg("--sign")
                .arg(keys.join("key.pem"))
                .arg("-o")
                .arg(tmp),
        );
    });
    let bundle = out.join("smollm2-imx95");
    let sshd = Sshd::start("imx95");
    let board = Board::new();
    let port = free_port();
    let deploy_imx95 = || {
        let mut c = edgepack();
        c.args(["--json", "deploy"])
            .arg(&bundle)
            .args(["--host", &sshd.alias, "--ssh-config"])
            .arg(sshd.config())
            .arg("--install-dir")
            .arg(board.install_dir())
            .args(["--runtime-port", &port.to_string(), "--target", "imx95"])
            // One emulated thread: ggml's spinning pool crawls when the test machine's
            // cores are shared.
            .args(["--runtime-arg=--threads", "--runtime-arg=1"])
            .args(["--health-timeout", "900"]);
        c
    };

    // A signed bundle without the key is refused before anything is sent.
    let err = run_err(&mut deploy_imx95());
    assert!(err.contains("signature"), "{err}");
    // The board is x86-64: without a runner the aarch64 runtime is refused.
    let (_, err) = run_fail(deploy_imx95().arg("--key").arg(keys.join("key.pub.pem")));
    assert!(err.contains("built for aarch64"), "{err}");
    assert!(board.current().is_none());

    let r = host_report(&run_ok(
        deploy_imx95()
            .arg("--key")
            .arg(keys.join("key.pub.pem"))
            .args(["--runner", "qemu-aarch64 -L /usr/aarch64-linux-gnu"]),
    ));
    assert_eq!(r["outcome"], "deployed", "{r}");
    assert!(
        r["health"]["reply"].as_str().unwrap().contains("Paris"),
        "{r}"
    );
    // The aarch64 runtime received the files after its own, through the runner.
    let sent = r["files_sent"].as_u64().unwrap();
    assert_eq!(
        r["files_received_by_runtime"].as_u64(),
        Some(sent - 1),
        "{r}"
    );
    // The runtime on the board checks the signature itself at every start.
    assert!(board.install_dir().join("trusted.pub.pem").is_file());
    assert_eq!(
        board.current().as_deref(),
        Some(format!("smollm2-imx95-{}", &release_id(&bundle)[BUNDLE.len() + 1..]).as_str())
    );
    assert_eq!(health(port), Some(200));
}

/// Eight boards behind one sshd, as a fleet file: each with its own install folder and
/// runtime port, `bad` with a runtime argument that makes the runtime exit at once, so its
/// health check fails. Hosts are written in `order`.
struct Fleet {
    sshd: Sshd,
    boards: Vec<Board>,
    ports: Vec<u16>,
    dir: tempfile::TempDir,
}

impl Fleet {
    fn new(n: usize) -> Fleet {
        Fleet {
            sshd: Sshd::start("fleet"),
            boards: (0..n).map(|_| Board::new()).collect(),
            ports: (0..n).map(|_| free_port()).collect(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn name(i: usize) -> String {
        format!("board-{}", i + 1)
    }

    /// Writes the fleet file with the hosts in `order`; `bad` fails its health check.
    fn inventory(&self, order: &[usize], bad: Option<usize>) -> PathBuf {
        let mut t = format!(
            "[defaults]\nssh_config = \"{}\"\n",
            self.sshd.config().display()
        );
        for &i in order {
            t.push_str(&format!(
                "[[hosts]]\nname = \"{}\"\naddress = \"{}\"\ninstall_dir = \"{}\"\nruntime_port = {}\n",
                Fleet::name(i),
                self.sshd.alias,
                self.boards[i].install_dir().display(),
                self.ports[i]
            ));
            if bad == Some(i) {
                t.push_str("runtime_args = [\"--no-such-flag\"]\n");
            }
        }
        let p = self.dir.path().join("fleet.toml");
        std::fs::write(&p, t).unwrap();
        p
    }

    /// When the board last recorded a health check (None before its first).
    fn checked_at(&self, i: usize) -> Option<std::time::SystemTime> {
        std::fs::metadata(self.boards[i].install_dir().join("health.json"))
            .and_then(|m| m.modified())
            .ok()
    }
}

/// `edgepack --json deploy BUNDLE --inventory FILE ARGS...`: its output and its JSON.
fn deploy_fleet(bundle: &Path, inventory: &Path, args: &[&str]) -> (Output, Value) {
    let out = edgepack()
        .args(["--json", "deploy"])
        .arg(bundle)
        .arg("--inventory")
        .arg(inventory)
        .args(args)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "deploy --json printed no JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!("deploy {args:?}: {}", v["summary"]);
    (out, v)
}

fn outcomes(v: &Value) -> Vec<(String, String)> {
    v["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["host"].as_str().unwrap().to_string(),
                h["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_fleet_rollout_stops_at_a_failed_canary_or_past_max_failures_and_reruns_only_the_failed() {
    let a = bundle_a();
    let f = Fleet::new(8);
    let bad = 2;
    let named = |list: &[(usize, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(i, o)| (Fleet::name(*i), o.to_string()))
            .collect()
    };

    // (a) The failing board is the canary: nothing else is touched.
    let order: Vec<usize> = std::iter::once(bad)
        .chain((0..8).filter(|&i| i != bad))
        .collect();
    let inv = f.inventory(&order, Some(bad));
    let (out, v) = deploy_fleet(&a, &inv, &["--canary", "1", "--parallel", "4"]);
    assert!(!out.status.success(), "{v}");
    let mut want = vec![(bad, "failed")];
    want.extend(order[1..].iter().map(|&i| (i, "skipped")));
    assert_eq!(outcomes(&v), named(&want), "{v}");
    assert_eq!(v["summary"]["skipped"], 7, "{v}");
    assert_eq!(v["summary"]["stopped"], true, "{v}");
    let reason = v["summary"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("canary") && reason.contains("board-3"),
        "{v}"
    );
    let skipped = &v["hosts"][1];
    assert!(
        skipped["error"].as_str().unwrap().contains("not started"),
        "{v}"
    );
    assert_eq!(skipped["bytes_sent"], 0, "{v}");
    for &i in &order[1..] {
        assert!(
            !f.boards[i].install_dir().exists(),
            "{} was never contacted",
            Fleet::name(i)
        );
    }
    assert!(v["hosts"][0]["error"]
        .as_str()
        .unwrap()
        .contains("health check"));

    // (b) The failing board third: 20% of 8 tolerates one failure, so every other board
    // deploys; the run still fails.
    let order: Vec<usize> = (0..8).collect();
    let inv = f.inventory(&order, Some(bad));
    let (out, v) = deploy_fleet(&a, &inv, &["--max-failures", "20%", "--parallel", "4"]);
    assert!(!out.status.success(), "{v}");
    let want: Vec<(usize, &str)> = order
        .iter()
        .map(|&i| (i, if i == bad { "failed" } else { "deployed" }))
        .collect();
    assert_eq!(outcomes(&v), named(&want), "{v}");
    assert_eq!(v["summary"]["deployed"], 7, "{v}");
    assert_eq!(v["summary"]["stopped"], false, "{v}");
    let id = release_id(&a);
    for i in (0..8).filter(|&i| i != bad) {
        assert_eq!(f.boards[i].current().as_deref(), Some(id.as_str()));
        assert_eq!(health(f.ports[i]), Some(200));
        let h = &v["hosts"][i];
        assert_eq!(h["previous"], Value::Null, "{h}");
        assert!(h["health"]["ttft_ms"].as_f64().unwrap() > 0.0, "{h}");
    }
    assert_eq!(f.boards[bad].current(), None);

    // With no failure allowed and one board at a time, the first failure stops the rollout:
    // the boards before it are checked, the ones after it are not contacted.
    let before: Vec<_> = (0..8).map(|i| f.checked_at(i)).collect();
    let (out, v) = deploy_fleet(&a, &inv, &["--max-failures", "0", "--parallel", "1"]);
    assert!(!out.status.success(), "{v}");
    let want: Vec<(usize, &str)> = order
        .iter()
        .map(|&i| {
            (
                i,
                match i.cmp(&bad) {
                    std::cmp::Ordering::Less => "unchanged",
                    std::cmp::Ordering::Equal => "failed",
                    std::cmp::Ordering::Greater => "skipped",
                },
            )
        })
        .collect();
    assert_eq!(outcomes(&v), named(&want), "{v}");
    let reason = v["summary"]["reason"].as_str().unwrap();
    assert!(reason.contains("1 of 8 hosts failed (board-3)"), "{reason}");
    assert!(reason.contains("more than the 0 allowed"), "{reason}");
    for (i, at) in before.iter().enumerate().skip(bad + 1) {
        assert_eq!(f.checked_at(i), *at, "{} was contacted", Fleet::name(i));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1 of 8 host(s) failed, 5 skipped"),
        "{stderr}"
    );
    let last = f.dir.path().join("last.json");
    std::fs::write(&last, &out.stdout).unwrap();

    // (c) The board is fixed; --only-failed deploys to it and to the skipped boards only.
    let inv = f.inventory(&order, None);
    let before: Vec<_> = (0..8).map(|i| f.checked_at(i)).collect();
    let only = last.to_str().unwrap();
    let (out, v) = deploy_fleet(&a, &inv, &["--only-failed", only, "--parallel", "4"]);
    assert!(out.status.success(), "{v}");
    let want: Vec<(usize, &str)> = (bad..8)
        .map(|i| (i, if i == bad { "deployed" } else { "unchanged" }))
        .collect();
    assert_eq!(outcomes(&v), named(&want), "{v}");
    assert_eq!(v["ok"], true);
    for (i, at) in before.iter().enumerate().take(bad) {
        assert_eq!(f.checked_at(i), *at, "{} was contacted", Fleet::name(i));
    }
    assert_eq!(f.boards[bad].current().as_deref(), Some(id.as_str()));
    assert_eq!(health(f.ports[bad]), Some(200));

    // A file that is not a deploy report is refused, naming it.
    let (_, err) = run_fail(
        edgepack()
            .arg("deploy")
            .arg(&a)
            .arg("--inventory")
            .arg(&inv)
            .arg("--only-failed")
            .arg(&inv),
    );
    assert!(
        err.contains(&format!("{}: not a deploy report", inv.display())),
        "{err}"
    );

    // The text table: before -> after per board, and the summary.
    let out = edgepack()
        .arg("deploy")
        .arg(&a)
        .arg("--inventory")
        .arg(&inv)
        .args(["--host", "board-1"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(table.contains(&format!("{id} (current)")), "{table}");
    assert!(
        table.contains("1 host(s): 0 deployed, 1 unchanged"),
        "{table}"
    );

    // An Ansible inventory of the same boards, imported, is what deploy reads.
    let mut yml = format!(
        "all:\n  vars:\n    ansible_host: {}\n    edgepack_ssh_config: {}\n    ansible_python_interpreter: /usr/bin/python3\n  children:\n    line:\n      hosts:\n",
        f.sshd.alias,
        f.sshd.config().display()
    );
    for i in [0, 1] {
        yml.push_str(&format!(
            "        board-{}:\n          edgepack_install_dir: {}\n          edgepack_runtime_port: {}\n",
            i + 1,
            f.boards[i].install_dir().display(),
            f.ports[i]
        ));
    }
    let hosts_yml = f.dir.path().join("hosts.yml");
    std::fs::write(&hosts_yml, yml).unwrap();
    let imported = f.dir.path().join("imported.toml");
    let out = run_ok(
        edgepack()
            .args(["fleet", "import"])
            .arg(&hosts_yml)
            .arg("-o")
            .arg(&imported),
    );
    let warn = String::from_utf8_lossy(&out.stderr);
    assert!(warn.contains("ansible_python_interpreter"), "{warn}");
    let (out, v) = deploy_fleet(&a, &imported, &["--group", "line"]);
    assert!(out.status.success(), "{v}");
    assert_eq!(outcomes(&v), named(&[(0, "unchanged"), (1, "unchanged")]));
}

/// Each host's settings as Ansible itself renders them (`ansible all -m debug`, which runs
/// on this machine without connecting), by inventory name.
fn ansible_view(inventory: &Path, work: &Path) -> std::collections::BTreeMap<String, Value> {
    let msg = "{{ {'address': ansible_host | default(inventory_hostname), \
               'port': ansible_port | default(none), 'user': ansible_user | default(none), \
               'target': edgepack_target | default(target | default(none)), \
               'install_dir': edgepack_install_dir, \
               'runtime_port': edgepack_runtime_port | int} | to_json }}";
    let ansible = python().with_file_name("ansible");
    let out = run_ok(
        Command::new(&ansible)
            .arg("all")
            .arg("-i")
            .arg(inventory)
            .args(["-m", "debug", "-a"])
            .arg(format!("msg=\"{msg}\""))
            .arg("-o")
            .env("ANSIBLE_HOME", work.join("ansible-home"))
            .env("ANSIBLE_LOCAL_TEMP", work.join("ansible-tmp"))
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_INVENTORY_ENABLED", "ini,yaml"),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut hosts = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| l.contains(" | SUCCESS => ")) {
        let (name, rest) = line.split_once(" | SUCCESS => ").unwrap();
        let v: Value = serde_json::from_str(rest).unwrap_or_else(|e| panic!("{line}: {e}"));
        let msg: Value = serde_json::from_str(v["msg"].as_str().unwrap()).unwrap();
        hosts.insert(name.trim().to_string(), msg);
    }
    hosts
}

#[test]
fn fleet_import_resolves_each_host_as_ansible_renders_it() {
    let dir = tempfile::tempdir().unwrap();
    let ini = dir.path().join("hosts.ini");
    std::fs::write(
        &ini,
        "\
gateway ansible_host=10.0.0.1 site=hq target=rpi5

[cams]
cam[01:03].north site=north ansible_user=pi
cam04.south:2222 site=south ansible_host='{{ inventory_hostname_short }}.{{ site }}.lan'
[2001:db8::12]:2200 site=v6

[cams:vars]
edgepack_target=imx95
edgepack_install_dir=/opt/{{ site }}/edgepack
ansible_port=22

[sensors]
sensor-[a:b] edgepack_target=rpi5 site=field edgepack_runtime_port='{{ sensor_port }}'

[sensors:vars]
sensor_port=9191

[line_a:children]
cams
sensors

[line_a:vars]
edgepack_target=generic-x86_64
edgepack_runtime_port=9090

[all:vars]
ansible_user=root
edgepack_install_dir=/srv/{{ site }}
edgepack_runtime_port=8080
",
    )
    .unwrap();
    let yml = dir.path().join("hosts.yml");
    std::fs::write(
        &yml,
        "\
all:
  vars:
    ansible_user: root
    root: /data
    edgepack_install_dir: '{{ root }}/{{ inventory_hostname_short }}'
    edgepack_runtime_port: 8080
  children:
    boards:
      vars:
        edgepack_target: imx93
      hosts:
        b[1:2].lab:
          ansible_port: 2022
        '[fe80::7]:2023':
        b3.lab:
          ansible_host: '{{ inventory_hostname }}.example'
          edgepack_target: imx95
",
    )
    .unwrap();
    for inventory in [&ini, &yml] {
        let fleet = dir.path().join("fleet.toml");
        let _ = std::fs::remove_file(&fleet);
        let out = run_ok(
            edgepack()
                .args(["--json", "fleet", "import"])
                .arg(inventory)
                .arg("-o")
                .arg(&fleet),
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ours = v["resolved"].as_array().unwrap();
        let theirs = ansible_view(inventory, dir.path());
        assert_eq!(ours.len(), theirs.len(), "{v}\n{theirs:?}");
        for h in ours {
            let name = h["name"].as_str().unwrap();
            let want = &theirs
                .get(name)
                .unwrap_or_else(|| panic!("{name} not in Ansible's view {theirs:?}"));
            for key in [
                "address",
                "port",
                "user",
                "target",
                "install_dir",
                "runtime_port",
            ] {
                // Ansible keeps an INI value as text, and a YAML number as a number.
                let norm = |x: &Value| match x {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                assert_eq!(
                    norm(&h[key]),
                    norm(&want[key]),
                    "{}: host {name}: {key}",
                    inventory.display()
                );
            }
        }
    }
}

#[test]
fn an_imported_ansible_inventory_reaches_the_board_and_is_never_overwritten_unasked() {
    let sshd = Sshd::start("ansible-board");
    let board = Board::new();
    let dir = tempfile::tempdir().unwrap();
    let ini = dir.path().join("hosts.ini");
    std::fs::write(
        &ini,
        format!(
            "[boards]\ncam[01:02] ansible_host={alias} ansible_become=true\n\n[boards:vars]\nedgepack_install_dir={dir}\nedgepack_target=generic-x86_64\n\n[site:children]\nboards\n\n[all:vars]\nedgepack_ssh_config={cfg}\n",
            alias = sshd.alias,
            dir = board.install_dir().display(),
            cfg = sshd.config().display(),
        ),
    )
    .unwrap();
    let fleet = dir.path().join("fleet.toml");
    let import = || {
        let mut c = edgepack();
        c.args(["fleet", "import"]).arg(&ini).arg("-o").arg(&fleet);
        c
    };
    let out = run_ok(&mut import());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("ignored, edgepack has no setting for them: ansible_become"),
        "{out:?}"
    );
    let st: Value = serde_json::from_slice(
        &run_ok(
            edgepack()
                .args(["--json", "status", "--inventory"])
                .arg(&fleet)
                .args(["--group", "site"]),
        )
        .stdout,
    )
    .unwrap();
    let hosts = st["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 2, "{st}");
    assert_eq!(hosts[0]["host"], "cam01");
    assert_eq!(hosts[1]["host"], "cam02");
    assert_eq!(
        hosts[0]["install_dir"],
        board.install_dir().display().to_string()
    );
    assert_eq!(hosts[0]["current"], Value::Null, "{st}");

    // An existing output is kept unless --force.
    let before = std::fs::read(&fleet).unwrap();
    let err = run_err(&mut import());
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    std::fs::write(&ini, "[boards]\ncam01 ansible_port=ssh\n").unwrap();
    let err = run_err(import().arg("--force"));
    assert!(
        err.contains(&format!(
            "{}:2: ansible_port: `ssh` is not a port number",
            ini.display()
        )),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&fleet).unwrap(),
        before,
        "a bad inventory writes nothing"
    );
}

#[test]
fn a_runtime_serving_with_an_api_key_passes_the_health_check_with_the_inventorys_key() {
    use std::os::unix::fs::PermissionsExt;
    let a = bundle_a();
    let sshd = Sshd::start("board-key");
    let board = Board::new();
    let dir = tempfile::tempdir().unwrap();
    // The board and this machine are one here: the runtime's key file serves both sides.
    let key = dir.path().join("api.key");
    std::fs::write(&key, "s3cret-token\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let inv = dir.path().join("fleet.toml");
    let write_inventory = |with_key: bool| {
        std::fs::write(
            &inv,
            format!(
                "[[hosts]]\nname = \"guarded\"\naddress = \"board-key\"\nssh_config = \"{}\"\ninstall_dir = \"{}\"\nruntime_port = {}\nruntime_args = [\"--api-key-file\", \"{k}\"]\n{}",
                sshd.config().display(),
                board.install_dir().display(),
                free_port(),
                if with_key { format!("api_key_file = \"{}\"\n", key.display()) } else { String::new() },
                k = key.display(),
            ),
        )
        .unwrap();
    };
    let deploy_inv = || {
        let mut c = edgepack();
        c.args(["--json", "deploy"])
            .arg(&a)
            .arg("--inventory")
            .arg(&inv);
        c
    };
    // Without the key the smoke prompt is refused (401) and the first release is not kept.
    write_inventory(false);
    let (_, err) = run_fail(&mut deploy_inv());
    assert!(err.contains("401"), "{err}");
    // With it, the same release passes.
    write_inventory(true);
    let v: Value = serde_json::from_slice(&run_ok(&mut deploy_inv()).stdout).unwrap();
    let r = &v["hosts"][0];
    assert_eq!(r["outcome"], "deployed", "{r}");
    assert!(
        r["health"]["completion_tokens"].as_u64().unwrap() >= 1,
        "{r}"
    );
}
