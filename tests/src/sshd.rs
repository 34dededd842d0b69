//! A real OpenSSH server on loopback for deploy tests, and a board emulated by a folder.
//!
//! Each [`Sshd`] runs Debian's `/usr/sbin/sshd -D` on a free port with its own host key and
//! authorized_keys, inside a private mount namespace whose `/run` is a tmpfs (sshd as root
//! needs `/run/sshd`; the host's `/run` is left alone). The client side is an ssh_config in
//! the same temp folder (alias, port, key, a private known_hosts), passed with `-F`, so the
//! user's own ~/.ssh is never read or written. Within the namespace the shell startup files
//! are empty: the board's shell is a clean one, not the workstation user's.
//!
//! Every command the server runs passes through a small board-side script (sshd's
//! `ForceCommand`) that runs it unchanged unless a [`Fault`] is armed for it: a command whose
//! text holds the armed marker then has its connection cut before or after it runs, or is
//! held so the test can kill the client at that step, or meets a full disk.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";
const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";
const READY: Duration = Duration::from_secs(20);

fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "edgepack-test", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen runs (apt-get install openssh-client)");
    assert!(out.status.success(), "ssh-keygen: {out:?}");
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port")
}

pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The alias the client config defines for this server.
    pub alias: String,
    child: Option<Child>,
    /// Shell run inside the server's mount namespace before sshd starts (mounts of the board).
    setup: String,
}

impl Sshd {
    /// Starts sshd and writes a client config whose known_hosts already holds its host key.
    pub fn start(alias: &str) -> Sshd {
        Sshd::start_with(alias, "")
    }

    /// [`start`](Self::start), running `setup` (shell) inside the server's own mount namespace
    /// first: what the board's processes see, such as a small file system mounted over the
    /// install folder, without touching the machine's.
    pub fn start_with(alias: &str, setup: &str) -> Sshd {
        assert!(
            Path::new(SSHD).is_file(),
            "{SSHD} is missing\nhint: apt-get install openssh-server openssh-client"
        );
        let dir = tempfile::Builder::new().prefix("sshd").tempdir().unwrap();
        let d = dir.path();
        keygen(&d.join("host_ed25519"));
        keygen(&d.join("client_ed25519"));
        keygen(&d.join("stranger_ed25519"));
        std::fs::copy(d.join("client_ed25519.pub"), d.join("authorized_keys")).unwrap();
        let mut s = Sshd {
            port: free_port(),
            alias: alias.to_string(),
            dir,
            child: None,
            setup: setup.to_string(),
        };
        s.pin_host_key();
        s.write_client_config("client_ed25519");
        s.spawn();
        s
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Arms `fault` for the next command whose text contains `marker` (once).
    pub fn arm(&self, marker: &str, fault: Fault) {
        let _ = std::fs::remove_file(self.path("fault.hit"));
        std::fs::write(self.path("fault.action"), fault.word()).unwrap();
        std::fs::write(self.path("fault.marker"), marker).unwrap();
    }

    /// Waits until the armed fault has struck; the exit status of the command it ran, if it
    /// ran one.
    pub fn wait_struck(&self, within: Duration) -> Option<i32> {
        let t = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(self.path("fault.hit")) {
                if text.ends_with('\n') {
                    return text.trim().parse().ok();
                }
            }
            assert!(
                t.elapsed() < within,
                "the armed fault ({}) never struck within {within:?}",
                std::fs::read_to_string(self.path("fault.marker")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the armed fault has struck.
    pub fn struck(&self) -> bool {
        self.path("fault.hit").exists()
    }

    /// Runs `script` on the board as root (through the same server), for a test's own look
    /// at what the board's processes see; its stdout.
    pub fn board_sh(&self, script: &str) -> String {
        let out = Command::new("ssh")
            .arg("-F")
            .arg(self.config())
            .arg(&self.alias)
            .arg(script)
            .stdin(Stdio::null())
            .output()
            .expect("run ssh");
        assert!(out.status.success(), "{script} on the board: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The client's ssh_config (for `--ssh-config`).
    pub fn config(&self) -> PathBuf {
        self.path("ssh_config")
    }

    /// known_hosts with this server's real host key.
    pub fn pin_host_key(&self) {
        let key = std::fs::read_to_string(self.path("host_ed25519.pub")).unwrap();
        let key: Vec<&str> = key.split_whitespace().take(2).collect();
        std::fs::write(
            self.path("known_hosts"),
            format!("[127.0.0.1]:{} {}\n", self.port, key.join(" ")),
        )
        .unwrap();
    }

    /// Client config: the alias, the port, `identity` as the only key, no agent.
    pub fn write_client_config(&self, identity: &str) {
        let d = self.dir.path().display();
        let cfg = format!(
            "Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {d}/{identity}\n  IdentitiesOnly yes\n  IdentityAgent none\n  UserKnownHostsFile {d}/known_hosts\n  GlobalKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n",
            alias = self.alias,
            port = self.port,
        );
        std::fs::write(self.config(), cfg).unwrap();
    }

    fn spawn(&mut self) {
        let d = self.dir.path().display();
        let cfg = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_ed25519\nAuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nMaxSessions 64\nSubsystem sftp {SFTP_SERVER}\nForceCommand /bin/sh {d}/board-command\n",
            port = self.port
        );
        std::fs::write(self.path("board-command"), board_command(self.dir.path())).unwrap();
        std::fs::write(self.path("sshd_config"), cfg).unwrap();
        let log = std::fs::File::create(self.path("sshd.log")).unwrap();
        // sshd runs every command through the user's shell, and Debian's bash then reads
        // the shell startup files even for `bash -c`. A workstation's are no board's: a
        // version manager's init there (pyenv takes a lock file at each start, which a test
        // that cuts a connection can leave behind, and every later command then waits a
        // minute for it) would make each board command slow. The board's shell reads empty
        // ones, inside the namespace only.
        std::fs::write(self.path("empty-rc"), "").unwrap();
        let script = format!(
            "mount -t tmpfs tmpfs /run && mkdir /run/sshd && \
             for rc in \"$HOME/.bashrc\" /etc/bash.bashrc; do \
             if [ -f \"$rc\" ]; then mount --bind {d}/empty-rc \"$rc\" || exit 1; fi; done && \
             {{ {setup}\n}} && exec {SSHD} -D -e -f {d}/sshd_config",
            setup = if self.setup.is_empty() {
                ":"
            } else {
                &self.setup
            }
        );
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sshd under unshare");
        self.child = Some(child);
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t.elapsed() < READY,
                "sshd did not listen on {} within {READY:?}: {}",
                self.port,
                std::fs::read_to_string(self.path("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Cuts every connection and stops the server: SIGKILL to sshd and each process it
    /// forked for a connection (found by parent pid), as a pulled cable or a crashed
    /// server would.
    pub fn cut(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id();
            for p in descendants(pid) {
                unsafe_kill(p);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the same server again (same port, host key and keys).
    pub fn restart(&mut self) {
        self.cut();
        self.spawn();
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.cut();
    }
}

/// What an armed fault does to the command it strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The connection is cut (its sshd process killed) before the command runs.
    CutBefore,
    /// The command runs to its end, then the connection is cut before its answer is sent:
    /// the client cannot know whether the step happened.
    CutAfter,
    /// The command runs to its end, then its answer is held back (for the test to kill the
    /// client at that step).
    HoldAfter,
    /// The board's file system is filled (a file of all its free space beside the install
    /// folder's `.incoming`) before the command runs.
    FillDisk,
}

impl Fault {
    fn word(self) -> &'static str {
        match self {
            Fault::CutBefore => "cut-before",
            Fault::CutAfter => "cut-after",
            Fault::HoldAfter => "hold-after",
            Fault::FillDisk => "fill-disk",
        }
    }
}

/// The board-side script every command passes through (sshd's ForceCommand): the command
/// runs as sshd would have run it, unless the armed marker is in its text. `fault.hit` gets
/// a line when a fault strikes (the command's exit status when it ran one).
fn board_command(dir: &Path) -> String {
    format!(
        r#"d='{d}'
cmd=$SSH_ORIGINAL_COMMAND
marker=$(cat "$d/fault.marker" 2>/dev/null || true)
if [ -z "$marker" ]; then exec /bin/sh -c "$cmd"; fi
case $cmd in *"$marker"*) ;; *) exec /bin/sh -c "$cmd" ;; esac
action=$(cat "$d/fault.action")
rm -f "$d/fault.marker" "$d/fault.action"
# This connection's sshd process: the first sshd up the parent chain.
conn=$PPID
while [ "$conn" -gt 1 ]; do
  case $(cat /proc/$conn/comm) in sshd|sshd-session) break ;; esac
  conn=$(sed 's/.*) //' /proc/$conn/stat | cut -d' ' -f2)
done
case $action in
  cut-before) echo > "$d/fault.hit"; kill -9 "$conn"; exit 255 ;;
  cut-after) /bin/sh -c "$cmd" >/dev/null 2>&1; echo $? > "$d/fault.hit"; kill -9 "$conn"; exit 255 ;;
  hold-after) /bin/sh -c "$cmd" >/dev/null 2>&1; echo $? > "$d/fault.hit"; exec sleep 600 ;;
  fill-disk)
    target=$(printf '%s' "$cmd" | grep -o "/[^' ]*/\.incoming" | head -n 1)
    dd if=/dev/zero of="${{target%/.incoming}}/.filler" bs=1M 2>/dev/null
    echo > "$d/fault.hit"
    exec /bin/sh -c "$cmd" ;;
esac
exec /bin/sh -c "$cmd"
"#,
        d = dir.display()
    )
}

/// Field `n` (0-based) after the parenthesised command name of /proc/<pid>/stat (which may
/// hold spaces): 0 is the state, 1 the parent, 2 the process group.
fn stat_field(pid: u32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(n)
        .map(str::to_owned)
}

fn parent_of(pid: u32) -> Option<u32> {
    stat_field(pid, 1)?.parse().ok()
}

/// Every process id in /proc now.
fn pids() -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect()
}

/// Processes whose parent chain leads to `root`.
fn descendants(root: u32) -> Vec<u32> {
    let leads_to_root = |pid: u32| {
        let mut p = pid;
        for _ in 0..16 {
            match parent_of(p) {
                Some(pp) if pp == root => return true,
                Some(pp) if pp > 1 => p = pp,
                _ => return false,
            }
        }
        false
    };
    pids()
        .into_iter()
        .filter(|&pid| leads_to_root(pid))
        .collect()
}

fn unsafe_kill(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

/// A board: a folder that stands for the root of its file system. Stops the runtime that a
/// deploy started there when dropped.
pub struct Board {
    pub root: tempfile::TempDir,
}

impl Board {
    pub fn new() -> Board {
        Board {
            root: tempfile::Builder::new().prefix("board").tempdir().unwrap(),
        }
    }

    pub fn install_dir(&self) -> PathBuf {
        self.root.path().join("opt/edgepack")
    }

    /// The release `current` points at.
    pub fn current(&self) -> Option<String> {
        std::fs::read_link(self.install_dir().join("current"))
            .ok()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
    }

    /// The supervisor's pid, if it runs.
    pub fn runtime_pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.install_dir().join("runtime.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        (pid > 1 && Path::new(&format!("/proc/{pid}")).exists()).then_some(pid)
    }

    /// The release whose model file the running runtime has mapped (read from
    /// /proc/<pid>/maps of the processes in the supervisor's group): what actually serves,
    /// whatever the links say.
    pub fn serving_release(&self) -> Option<String> {
        let pgid = self.runtime_pid()?;
        let releases = format!("{}/releases/", self.install_dir().display());
        for pid in pids() {
            let group = stat_field(pid, 2).and_then(|g| g.parse::<u32>().ok());
            if group != Some(pgid) {
                continue;
            }
            let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
            for line in maps.lines() {
                if let Some(i) = line.find(&releases) {
                    let rest = &line[i + releases.len()..];
                    if rest.contains("/model/") {
                        return rest.split('/').next().map(str::to_owned);
                    }
                }
            }
        }
        None
    }
}

impl Default for Board {
    fn default() -> Self {
        Board::new()
    }
}

impl Drop for Board {
    fn drop(&mut self) {
        // Every process still running from this board's folder: the supervisor (it works in
        // the install folder) and the runtimes it started (their command lines name the
        // bundle). Found by what they are, not by a pid file whose number may have been
        // reused. Twice, in case the supervisor restarted a runtime in between.
        let root = self.root.path().to_path_buf();
        for _ in 0..2 {
            for pid in pids() {
                if pid == std::process::id() {
                    continue;
                }
                let in_board = std::fs::read_link(format!("/proc/{pid}/cwd"))
                    .is_ok_and(|cwd| cwd.starts_with(&root))
                    || std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                        String::from_utf8_lossy(&c).contains(&*root.to_string_lossy())
                    });
                if in_board {
                    unsafe_kill(pid);
                }
            }
        }
    }
}
