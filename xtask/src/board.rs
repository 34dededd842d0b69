//! A board on this machine: a folder behind a real OpenSSH server on loopback, with its own
//! host and client keys, reached through an ssh_config alias `board`. `bench deploy` and the
//! demo deploy to it exactly as to a board on the network.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::run;

const SSHD: &str = "/usr/sbin/sshd";

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A counting relay in front of a board's sshd, optionally shaped like a slower link.
#[derive(Clone)]
pub struct Wire {
    /// Every byte either way is added here.
    pub count: Arc<AtomicU64>,
    /// The link's rate in bytes/s in each direction (full duplex, like Ethernet); `None` is
    /// loopback's own speed.
    pub rate: Option<u64>,
}

/// Relays connections from a local port to `to`, counting every byte either way, and holding
/// each direction to `wire.rate` when set.
fn relay(to: u16, wire: Wire) -> Result<u16> {
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
                let wire = wire.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 16 * 1024];
                    // When the link is next free: each chunk holds it for len/rate seconds.
                    let mut free_at = Instant::now();
                    while let Ok(n) = a.read(&mut buf) {
                        if let Some(rate) = wire.rate.filter(|r| *r > 0) {
                            let now = Instant::now();
                            free_at =
                                free_at.max(now) + Duration::from_secs_f64(n as f64 / rate as f64);
                            std::thread::sleep(free_at - now);
                        }
                        if n == 0 || b.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        wire.count.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    let _ = b.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    Ok(port)
}

fn keygen(path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("pub"));
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path))
}

/// A running local board. Dropping it stops sshd and the runtime a deploy started there.
pub struct LocalBoard {
    server: Child,
    /// The ssh_config that makes `board` this board.
    pub ssh_config: PathBuf,
    /// The board's root folder; deploys install under `install_dir`.
    pub root: PathBuf,
    pub install_dir: PathBuf,
    /// A free port for the runtime on the board's loopback.
    pub runtime_port: u16,
}

impl LocalBoard {
    /// Starts sshd for a board in `work` (emptied first). With `wire`, every byte between ssh
    /// and sshd goes through a counting (and maybe rate-holding) relay.
    pub fn start(work: &Path, wire: Option<Wire>) -> Result<LocalBoard> {
        if !Path::new(SSHD).is_file() {
            bail!("{SSHD} is missing\nhint: apt-get install openssh-server openssh-client");
        }
        std::fs::create_dir_all(work)?;
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
        // sshd run as root needs /run/sshd: a private mount namespace gives it one. In it the
        // shell startup files are empty: sshd runs each command through the user's shell,
        // Debian's bash reads them even for `bash -c`, and a workstation's (a version
        // manager's init) would add its own cost to every command measured.
        std::fs::write(work.join("empty-rc"), "")?;
        let server = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount -t tmpfs tmpfs /run && mkdir /run/sshd && \
                 for rc in \"$HOME/.bashrc\" /etc/bash.bashrc; do \
                 if [ -f \"$rc\" ]; then mount --bind {w}/empty-rc \"$rc\" || exit 1; fi; done && \
                 exec {SSHD} -D -e -f {w}/sshd_config"
            ))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting sshd")?;
        let mut board = LocalBoard {
            server,
            ssh_config: work.join("ssh_config"),
            root: work.join("board"),
            install_dir: work.join("board/opt/edgepack"),
            runtime_port: free_port()?,
        };
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", sshd_port)).is_err() {
            if t.elapsed() > Duration::from_secs(20) {
                bail!("sshd did not start on port {sshd_port}");
            }
            if let Some(st) = board.server.try_wait()? {
                bail!("sshd exited at start ({st})");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let port = match wire {
            Some(w) => relay(sshd_port, w)?,
            None => sshd_port,
        };
        let host_key = std::fs::read_to_string(work.join("host.pub"))?;
        let host_key: Vec<&str> = host_key.split_whitespace().take(2).collect();
        std::fs::write(
            work.join("known_hosts"),
            format!("[127.0.0.1]:{port} {}\n", host_key.join(" ")),
        )?;
        std::fs::write(
            &board.ssh_config,
            format!("Host board\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {w}/client\n  IdentitiesOnly yes\n  IdentityAgent none\n  UserKnownHostsFile {w}/known_hosts\n  GlobalKnownHostsFile /dev/null\n  BatchMode yes\n"),
        )?;
        std::fs::create_dir_all(&board.root)?;
        Ok(board)
    }

    /// Stops the runtime a deploy started (its supervisor leads a process group).
    pub fn stop_runtime(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.install_dir.join("runtime.pid")) {
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{}", pid.trim())])
                .status();
        }
    }
}

impl Drop for LocalBoard {
    fn drop(&mut self) {
        self.stop_runtime();
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}
