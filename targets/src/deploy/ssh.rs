//! The SSH transport: one multiplexed connection per board through the user's own `ssh`
//! (the `openssh` crate), so ~/.ssh/config, ssh-agent, ProxyJump and known_hosts behave as
//! they do on the command line. Commands run as `sh -c <script>`; files travel as a byte
//! stream into `cat >> file`, which works on boards without an SFTP server.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use openssh::{ForwardType, KnownHosts, Session, SessionBuilder, Socket, Stdio};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::host::{DeployError, HostConfig};

/// How long ssh may take to reach a board before the host counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Keep-alive probes: a board that vanishes mid-upload is noticed within about 3 intervals
/// (ssh's default ServerAliveCountMax is 3).
const ALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Bytes per write into the remote `cat`.
const CHUNK: usize = 256 * 1024;

/// How long a failed upload waits for the board's end to say why it stopped reading.
const BROKEN_UPLOAD_WAIT: Duration = Duration::from_secs(10);
/// zstd level of compressed uploads: level 1 compresses faster than a gigabit link carries.
const ZSTD_LEVEL: i32 = 1;

/// One message of an archive read for upload: a file's start (its path in the bundle), its
/// bytes, its end, or why reading failed.
pub enum Chunk {
    Start(String),
    Data(Vec<u8>),
    End,
    Failed(String),
}

/// Where an upload's bytes come from.
enum Source<'a> {
    File(tokio::fs::File, Vec<u8>),
    Chunks {
        rx: &'a mut tokio::sync::mpsc::Receiver<Chunk>,
        pending: Option<Vec<u8>>,
        current: Vec<u8>,
    },
}

/// What one upload sent and what the board's script printed.
pub struct Uploaded {
    /// Bytes of the file sent (from the offset on).
    pub file_bytes: u64,
    /// Bytes written into the channel (after compression).
    pub channel_bytes: u64,
    /// sha256 of the file bytes read and sent (from the offset on).
    pub sha256: String,
    pub stdout: String,
}

/// An open connection to one board.
pub struct Conn {
    session: Session,
    pub host: String,
    fwd_dir: tempfile::TempDir,
    forwarded: tokio::sync::Mutex<std::collections::BTreeSet<u16>>,
}

/// Joins an error and its sources: `openssh` keeps ssh's own message (the one that says why)
/// in the source chain, under a generic top line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut s = e.source();
    while let Some(x) = s {
        parts.push(x.to_string());
        s = x.source();
    }
    parts.join(": ")
}

fn classify(host: &str, address: &str, e: openssh::Error) -> DeployError {
    let text = chain(&e);
    let detail = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('@'))
        .collect::<Vec<_>>()
        .join(" | ");
    if text.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || text.contains("Host key for") && text.contains("has changed")
    {
        DeployError::HostKeyChanged {
            host: host.into(),
            address: address.into(),
        }
    } else if text.contains("Host key verification failed") {
        DeployError::HostKeyUnknown {
            host: host.into(),
            address: address.into(),
        }
    } else if text.contains("Permission denied") {
        DeployError::AuthFailed {
            host: host.into(),
            detail,
        }
    } else {
        DeployError::Connect {
            host: host.into(),
            detail,
        }
    }
}

impl Conn {
    /// Connects with strict host key checking, or `accept-new` when asked: a new host's key is
    /// then recorded, but a changed key is still refused (ssh's own rule).
    pub async fn open(h: &HostConfig, accept_new_host_key: bool) -> Result<Conn, DeployError> {
        let mut b = SessionBuilder::default();
        b.known_hosts_check(if accept_new_host_key {
            KnownHosts::Add
        } else {
            KnownHosts::Strict
        });
        if let Some(u) = &h.user {
            b.user(u.clone());
        }
        if let Some(p) = h.port {
            b.port(p);
        }
        if let Some(c) = &h.ssh_config {
            b.config_file(c);
        }
        b.connect_timeout(CONNECT_TIMEOUT);
        b.server_alive_interval(ALIVE_INTERVAL);
        // Unix socket paths are limited to about 108 bytes: keep the control folder short.
        let fwd_dir = tempfile::Builder::new()
            .prefix("ep")
            .tempdir_in(std::env::temp_dir())
            .map_err(|e| DeployError::Local {
                path: std::env::temp_dir(),
                message: e.to_string(),
            })?;
        b.control_directory(fwd_dir.path());
        let session = b
            .connect_mux(&h.address)
            .await
            .map_err(|e| classify(&h.name, &h.address, e))?;
        Ok(Conn {
            session,
            host: h.name.clone(),
            fwd_dir,
            forwarded: Default::default(),
        })
    }

    fn ssh_error(&self, step: &str, e: openssh::Error) -> DeployError {
        DeployError::Ssh {
            host: self.host.clone(),
            step: step.into(),
            detail: chain(&e),
        }
    }

    /// Runs `script` with `sh -c` and returns its stdout; a non-zero exit is an error carrying
    /// the script's stderr.
    pub async fn sh(&self, step: &str, script: &str) -> Result<String, DeployError> {
        let out = self.sh_bytes(step, script).await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// [`sh`](Self::sh), with stdout as bytes.
    pub async fn sh_bytes(&self, step: &str, script: &str) -> Result<Vec<u8>, DeployError> {
        tracing::debug!(host = self.host, step, "board command");
        let out = self
            .session
            .command("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| self.ssh_error(step, e))?;
        self.succeeded(step, out)
    }

    /// A finished remote command's stdout; a non-zero exit is an error carrying its stderr.
    fn succeeded(&self, step: &str, out: std::process::Output) -> Result<Vec<u8>, DeployError> {
        tracing::debug!(host = self.host, step, status = %out.status, "board command ended");
        if !out.status.success() {
            return Err(DeployError::Remote {
                host: self.host.clone(),
                step: step.into(),
                code: out.status.code(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(out.stdout)
    }

    /// Starts `sh -c script` with stdin, stdout and stderr piped.
    async fn spawn_piped(
        &self,
        step: &str,
        script: &str,
    ) -> Result<openssh::Child<&Session>, DeployError> {
        tracing::debug!(host = self.host, step, "board command");
        self.session
            .command("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .await
            .map_err(|e| self.ssh_error(step, e))
    }

    /// Runs `script` with `input` on its stdin: file contents and sha256 lists travel as data,
    /// never spliced into shell text.
    pub async fn sh_in(
        &self,
        step: &str,
        script: &str,
        input: &[u8],
    ) -> Result<String, DeployError> {
        let mut child = self.spawn_piped(step, script).await?;
        let mut stdin = child.stdin().take().expect("stdin was piped");
        let write_err = |e: std::io::Error| DeployError::Ssh {
            host: self.host.clone(),
            step: step.into(),
            detail: format!("the connection broke while sending the script's input: {e}"),
        };
        stdin.write_all(input).await.map_err(write_err)?;
        stdin.shutdown().await.map_err(write_err)?;
        drop(stdin);
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| self.ssh_error(step, e))?;
        let stdout = self.succeeded(step, out)?;
        Ok(String::from_utf8_lossy(&stdout).into_owned())
    }

    /// Runs `script` with its output passed through to ours (for `logs --follow`).
    pub async fn sh_inherit(&self, step: &str, script: &str) -> Result<(), DeployError> {
        let status = self
            .session
            .command("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status()
            .await
            .map_err(|e| self.ssh_error(step, e))?;
        if !status.success() {
            return Err(DeployError::Remote {
                host: self.host.clone(),
                step: step.into(),
                code: status.code(),
                stderr: String::new(),
            });
        }
        Ok(())
    }

    /// Streams `local` from byte `offset` into `script` (which appends stdin to the remote
    /// file), zstd-compressed when `compress` (the script then decompresses). `advance` sees
    /// each chunk's file bytes; `limit` caps the rate of channel bytes per second.
    pub async fn upload(
        &self,
        local: &Path,
        offset: u64,
        script: &str,
        compress: bool,
        limit: Option<u64>,
        advance: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<Uploaded, DeployError> {
        let local_err = |e: std::io::Error| DeployError::Local {
            path: local.to_path_buf(),
            message: e.to_string(),
        };
        let mut f = tokio::fs::File::open(local).await.map_err(local_err)?;
        f.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(local_err)?;
        let source = Source::File(f, vec![0u8; CHUNK]);
        self.send(local, source, script, compress, limit, advance)
            .await
    }

    /// Streams one file's chunks from `rx` (until [`Chunk::End`]) into `script`, as
    /// [`upload`](Self::upload) does from a file: a file read out of an archive as it is
    /// decompressed, never written to the workstation's disk.
    #[allow(clippy::too_many_arguments)]
    pub async fn upload_chunks(
        &self,
        name: &Path,
        rx: &mut tokio::sync::mpsc::Receiver<Chunk>,
        first: Vec<u8>,
        script: &str,
        compress: bool,
        limit: Option<u64>,
        advance: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<Uploaded, DeployError> {
        let source = Source::Chunks {
            rx,
            pending: Some(first),
            current: Vec::new(),
        };
        self.send(name, source, script, compress, limit, advance)
            .await
    }

    async fn send(
        &self,
        local: &Path,
        mut source: Source<'_>,
        script: &str,
        compress: bool,
        limit: Option<u64>,
        advance: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<Uploaded, DeployError> {
        let local_err = |e: std::io::Error| DeployError::Local {
            path: local.to_path_buf(),
            message: e.to_string(),
        };
        let mut child = self.spawn_piped("upload", script).await?;
        let mut stdin = child.stdin().take().expect("stdin was piped");
        let started = Instant::now();
        let mut sent = 0u64;
        let mut channel = 0u64;
        let mut hash = <sha2::Sha256 as sha2::Digest>::new();
        let mut encoder = if compress {
            Some(
                zstd::stream::write::Encoder::new(Vec::with_capacity(CHUNK), ZSTD_LEVEL)
                    .map_err(local_err)?,
            )
        } else {
            None
        };
        // A write that fails ends the sending; what the board's end said decides the error.
        let mut broke: Option<std::io::Error> = None;
        loop {
            let buf: &[u8] = match &mut source {
                Source::File(f, buf) => {
                    let n = f.read(buf).await.map_err(local_err)?;
                    &buf[..n]
                }
                Source::Chunks {
                    rx,
                    pending,
                    current,
                } => {
                    *current = match pending.take() {
                        Some(b) => b,
                        None => match rx.recv().await {
                            Some(Chunk::Data(b)) => b,
                            Some(Chunk::End) => Vec::new(),
                            Some(Chunk::Failed(message)) => {
                                return Err(DeployError::Local {
                                    path: local.to_path_buf(),
                                    message,
                                })
                            }
                            Some(Chunk::Start(p)) => {
                                return Err(DeployError::Local {
                                    path: local.to_path_buf(),
                                    message: format!("the archive went on to {p} mid-file"),
                                })
                            }
                            None => {
                                return Err(DeployError::Local {
                                    path: local.to_path_buf(),
                                    message: "the archive reader stopped".into(),
                                })
                            }
                        },
                    };
                    current
                }
            };
            let n = buf.len();
            if n == 0 {
                break;
            }
            sha2::Digest::update(&mut hash, &buf[..n]);
            match encoder.as_mut() {
                Some(enc) => {
                    std::io::Write::write_all(enc, &buf[..n]).map_err(local_err)?;
                    let out = std::mem::take(enc.get_mut());
                    if let Err(e) = stdin.write_all(&out).await {
                        broke = Some(e);
                        break;
                    }
                    channel += out.len() as u64;
                    *enc.get_mut() = out;
                    enc.get_mut().clear();
                }
                None => {
                    if let Err(e) = stdin.write_all(&buf[..n]).await {
                        broke = Some(e);
                        break;
                    }
                    channel += n as u64;
                }
            }
            sent += n as u64;
            advance(n as u64);
            if let Some(limit) = limit.filter(|l| *l > 0) {
                let due = Duration::from_secs_f64(channel as f64 / limit as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        if broke.is_none() {
            let tail = match encoder.take() {
                Some(enc) => enc.finish().map_err(local_err)?,
                None => Vec::new(),
            };
            let finished = async {
                stdin.write_all(&tail).await?;
                stdin.flush().await?;
                stdin.shutdown().await
            };
            match finished.await {
                Ok(()) => channel += tail.len() as u64,
                Err(e) => broke = Some(e),
            }
        }
        drop(stdin);
        if let Some(e) = broke {
            return Err(self.upload_broke(child, local, e).await);
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| self.ssh_error("upload", e))?;
        let stdout = self.succeeded(&format!("upload of {}", local.display()), out)?;
        Ok(Uploaded {
            file_bytes: sent,
            channel_bytes: channel,
            sha256: hex::encode(sha2::Digest::finalize(hash)),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
        })
    }

    /// The error of an upload whose channel stopped taking bytes: the board's own failure
    /// when its end exited with a status and a message (the receiver's "No space left on
    /// device"), else a broken connection. The answer is awaited for at most
    /// [`BROKEN_UPLOAD_WAIT`].
    async fn upload_broke(
        &self,
        child: openssh::Child<&Session>,
        local: &Path,
        e: std::io::Error,
    ) -> DeployError {
        if let Ok(Ok(out)) =
            tokio::time::timeout(BROKEN_UPLOAD_WAIT, child.wait_with_output()).await
        {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if let Some(code) = out.status.code().filter(|c| *c != 0 && *c != 255) {
                if !stderr.is_empty() {
                    return DeployError::Remote {
                        host: self.host.clone(),
                        step: format!("upload of {}", local.display()),
                        code: Some(code),
                        stderr,
                    };
                }
            }
        }
        DeployError::Ssh {
            host: self.host.clone(),
            step: "upload".into(),
            detail: format!(
                "the connection broke while sending {}: {e}",
                local.display()
            ),
        }
    }

    /// Forwards a local unix socket to `127.0.0.1:port` on the board and returns its path.
    /// A port is forwarded once per connection: ssh keeps the listener, and asking again for
    /// the same socket would leave the old listener behind a removed path.
    pub async fn forward(&self, port: u16) -> Result<PathBuf, DeployError> {
        let sock = self.fwd_dir.path().join(format!("rt{port}.sock"));
        let mut done = self.forwarded.lock().await;
        if done.contains(&port) {
            return Ok(sock);
        }
        let _ = std::fs::remove_file(&sock);
        self.session
            .request_port_forward(
                ForwardType::Local,
                Socket::UnixSocket {
                    path: sock.clone().into(),
                },
                Socket::new("127.0.0.1", port),
            )
            .await
            .map_err(|e| self.ssh_error("forwarding the runtime's port", e))?;
        done.insert(port);
        Ok(sock)
    }

    /// Whether the connection (and with it every port forward) is still up.
    pub async fn alive(&self) -> bool {
        self.session.check().await.is_ok()
    }

    pub async fn close(self) {
        let _ = self.session.close().await;
    }
}
