//! The layout of an install on the board and the POSIX `sh` scripts that change it.
//!
//! ```text
//! <install_dir>/releases/<release-id>/   one verified bundle per release, never written again
//! <install_dir>/current  -> releases/<id> the release that runs; replaced by one rename
//! <install_dir>/previous -> releases/<id> the release `current` replaced; what rollback returns to
//! <install_dir>/.incoming/<release-id>/  an upload in progress; resumed by the next deploy
//! <install_dir>/logs/runtime.log         the runtime's output when no systemd runs
//! <install_dir>/runtime.pid              the supervisor's pid (its process group holds the runtime)
//! <install_dir>/runtime.exit             written by the supervisor each time the runtime exits
//! <install_dir>/health.json              the last health check: ok, why, TTFT, tokens/s
//! ```
//!
//! Scripts use only POSIX sh, coreutils/busybox tools (`sha256sum`, `ln`, `mv -T`, `readlink`),
//! so a minimal board image runs them. Every path is quoted with [`quote`].

use std::fmt::Write as _;

/// Flushes the paths in `$@` to disk, or the whole system where `sync` takes no paths: the
/// body of the `flush` shell function every script starts with (see [`Layout::prelude`]).
const FLUSH_ARGS: &str = r#"sync -- "$@" 2>/dev/null || sync"#;

/// Seconds the supervisor waits before starting a runtime that exited, so a runtime that
/// cannot start does not spin a core.
const RESTART_DELAY_S: u32 = 2;
/// How long a stopped runtime gets to exit on SIGTERM before SIGKILL, in 0.2 s steps (10 s).
const STOP_STEPS: u32 = 50;
/// The script in the install folder that starts the supervised runtime at boot.
pub const BOOT_SCRIPT: &str = "boot.sh";

/// Quotes `s` for a POSIX shell: single quotes, with each `'` written as `'\''`.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// How the board starts the runtime binary at `runtime`: behind the host's `runner` (the
/// operator's own command prefix from the inventory, not a path, and possibly commands of
/// its own such as `sleep 1;`) when one is set, with the path quoted.
pub fn runtime_invocation(runner: Option<&str>, runtime: &str) -> String {
    match runner {
        Some(r) => format!("{r} {}", quote(runtime)),
        None => quote(runtime),
    }
}

/// Paths of one install on one board.
#[derive(Debug, Clone)]
pub struct Layout {
    pub install_dir: String,
}

impl Layout {
    pub fn new(install_dir: &str) -> Layout {
        let d = install_dir.trim_end_matches('/');
        Layout {
            install_dir: if d.is_empty() { "/".into() } else { d.into() },
        }
    }

    pub fn path(&self, rel: &str) -> String {
        format!("{}/{rel}", self.install_dir)
    }

    pub fn release(&self, id: &str) -> String {
        self.path(&format!("releases/{id}"))
    }

    pub fn incoming(&self, id: &str) -> String {
        self.path(&format!(".incoming/{id}"))
    }

    /// `cd` into the install folder, creating its skeleton; the start of every script. It
    /// defines `flush PATH...`, which makes the named files and folders durable (fsync, by
    /// coreutils' or busybox's `sync PATH`) and falls back to a whole-system `sync` where
    /// `sync` takes no paths. A whole-system sync waits for every writer on the board (a
    /// build, a logger on an SD card) and can stall a deploy for minutes; a release needs
    /// only its own files flushed.
    fn prelude(&self) -> String {
        format!(
            "set -e\nD={}\nmkdir -p \"$D/releases\" \"$D/.incoming\" \"$D/logs\"\ncd \"$D\"\nflush() {{ {FLUSH_ARGS}; }}\n",
            quote(&self.install_dir)
        )
    }

    /// Prints facts about the board and the install, one `key value` per line:
    /// `arch`, `systemd` (yes/no), `current`, `previous`, `release <id>` per release whose
    /// manifest is present, `sha256sum` (yes/no).
    pub fn probe(&self) -> String {
        let mut s = self.prelude();
        s.push_str(
            r#"echo "arch $(uname -m)"
if command -v systemctl >/dev/null 2>&1 && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then echo "systemd yes"; else echo "systemd no"; fi
if command -v sha256sum >/dev/null 2>&1; then echo "sha256sum yes"; else echo "sha256sum no"; fi
if command -v zstd >/dev/null 2>&1; then echo "zstd yes"; else echo "zstd no"; fi
echo "current $(readlink current 2>/dev/null || true)"
echo "previous $(readlink previous 2>/dev/null || true)"
for r in releases/*; do [ -f "$r/manifest.json" ] && echo "release ${r#releases/}"; done
true
"#,
        );
        s
    }

    /// Everything a deploy needs to plan, in one round trip: the [`probe`](Self::probe)
    /// lines, the supervised runtime's [`state`](Self::supervised_state) as `state ...` lines,
    /// `free <KiB>` available in the install folder's file system, `pending <id>` (a release
    /// switched to and not yet seen healthy; see [`switch`](Self::switch)),
    /// `size <bytes> <path>` for each of `files` already in `.incoming/<id>`, and each
    /// release's manifest as a `manifest <release> <bytes>` line followed by exactly that many
    /// bytes.
    pub fn survey(&self, id: &str, files: &[&str]) -> String {
        let mut s = self.probe();
        let _ = writeln!(s, "( {} ) | sed 's/^/state /'", self.supervised_state());
        let _ = writeln!(s, "if cd {} 2>/dev/null; then", quote(&self.incoming(id)));
        for f in files {
            let q = quote(f);
            let _ = writeln!(s, "  [ -f {q} ] && echo \"size $(wc -c < {q}) \"{q}");
        }
        s.push_str("fi\ncd \"$D\"\n");
        s.push_str("echo \"pending $(cat .pending 2>/dev/null || true)\"\n");
        // Free space where releases go, in KiB (POSIX df; busybox's takes -P -k too).
        s.push_str("echo \"free $(df -Pk . 2>/dev/null | awk 'NR==2 {print $4}')\"\n");
        s.push_str(
            r#"for m in releases/*/manifest.json; do
  [ -f "$m" ] || continue
  r=${m#releases/}; r=${r%/manifest.json}
  echo "manifest $r $(wc -c < "$m")"
  cat "$m"
done
true
"#,
        );
        s
    }

    /// Prints the sha256 of the first `len` bytes of `file`.
    pub fn prefix_sha(&self, file: &str, len: u64) -> String {
        format!(
            "set -e\nhead -c {len} {} | sha256sum | cut -d' ' -f1\n",
            quote(file)
        )
    }

    /// Appends stdin (zstd-compressed when `zstd`) to `file`, creating its folder, and prints
    /// the sha256 of the bytes appended and then the file's size: the board hashes what it
    /// receives as it writes it, so a file sent whole needs no second read to be verified.
    /// A write that fails (a full disk) fails the script with tee's own message: `tee` still
    /// passes what it could not write on to `sha256sum`, so only its exit status tells.
    pub fn append(&self, file: &str, zstd: bool) -> String {
        let dir = file.rsplit_once('/').map_or(".", |(d, _)| d);
        let q = quote(file);
        let source = if zstd { "zstd -dcq | " } else { "" };
        // POSIX sh has no pipefail: tee's status leaves the pipeline on fd 3, the hash on 4.
        format!(
            "set -e\nmkdir -p {}\nexec 4>&1\nst=$( {{ {{ {source}tee -a {q}; echo $? >&3; }} | sha256sum | cut -d' ' -f1 >&4; }} 3>&1 )\n[ \"$st\" = 0 ] || exit 5\nwc -c < {q}\n",
            quote(dir)
        )
    }

    /// Appends stdin to `file` as [`append`](Self::append) does and prints the same two
    /// lines, through the incoming release's own runtime (`edgepack-runtime receive`): one
    /// process that decompresses, hashes with the CPU's SHA-256 instructions and writes,
    /// where coreutils' `sha256sum` alone limits a board's intake. Only for a runtime the
    /// board has checked (see [`receiver_check`](Self::receiver_check)). `runner` is the
    /// host's command prefix for the runtime, if any.
    pub fn receive(&self, runtime: &str, runner: Option<&str>, file: &str, zstd: bool) -> String {
        // No `exec`: a runner may hold commands of its own.
        format!(
            "{} receive{} -- {}\n",
            runtime_invocation(runner, runtime),
            if zstd { " --zstd" } else { "" },
            quote(file)
        )
    }

    /// Makes the incoming release's runtime executable and has it receive nothing into
    /// `/dev/null`: it prints the empty input's sha256 and `0` when it runs on this board and
    /// knows `receive`. A runtime that cannot run here (another C library, an older release)
    /// fails this, and the upload goes on through the shell pipeline.
    pub fn receiver_check(&self, runtime: &str, runner: Option<&str>) -> String {
        format!(
            "set -e\nchmod u+x {}\n{} receive -- /dev/null < /dev/null\n",
            quote(runtime),
            runtime_invocation(runner, runtime),
        )
    }

    /// Empties `file` (a partial upload whose bytes do not match the bundle).
    pub fn truncate(&self, file: &str) -> String {
        format!("set -e\n: > {}\n", quote(file))
    }

    /// Hard-links (or, across file systems, copies) `from` to `to` on the board: a file an
    /// earlier release already holds with the same sha256 is not sent again.
    pub fn link(&self, from: &str, to: &str) -> String {
        let dir = to.rsplit_once('/').map_or(".", |(d, _)| d);
        format!(
            "set -e\nmkdir -p {d}\nrm -f {t}\nln {f} {t} 2>/dev/null || cp -p {f} {t}\n",
            d = quote(dir),
            f = quote(from),
            t = quote(to)
        )
    }

    /// Checks the files of the incoming release that were not hashed on arrival against the
    /// `<sha256>  <path>` lines on stdin (the format `sha256sum -c` reads; none when
    /// `check_stdin` is false), refuses files nobody listed, sets the runtime's execute bit,
    /// syncs, and moves the folder to `releases/<id>` in one rename. Paths travel on stdin,
    /// never in the script's text.
    pub fn verify_and_commit(
        &self,
        id: &str,
        check_stdin: bool,
        n_files: usize,
        exec: &[&str],
    ) -> String {
        let mut s = self.prelude();
        let _ = writeln!(s, "I={}", quote(&self.incoming(id)));
        let _ = writeln!(s, "R={}", quote(&self.release(id)));
        s.push_str("cd \"$I\"\n");
        if check_stdin {
            s.push_str(
                "if ! out=$(sha256sum -c - 2>&1); then\n  echo \"$out\" | grep -v ': OK$' >&2\n  exit 3\nfi\n",
            );
        }
        let _ = writeln!(
            s,
            "n=$(find . -type f | wc -l)\nif [ \"$n\" -ne {n_files} ]; then echo \"the upload holds $n files, the bundle {n_files}\" >&2; find . -type f >&2; exit 3; fi"
        );
        for e in exec {
            let _ = writeln!(s, "chmod 0755 {}", quote(e));
        }
        // Every file and folder of the release is durable before the rename that commits it,
        // and the rename is durable before the deploy goes on.
        let _ = writeln!(s, "find . -exec sh -c '{FLUSH_ARGS}' flush {{}} +");
        s.push_str("cd \"$D\"\nrm -rf \"$R\"\nmv \"$I\" \"$R\"\nflush releases .incoming\n");
        s
    }

    /// Points `current` at `releases/<id>` with one rename of a new link, and `previous` at
    /// what `current` was (unless that is the same release). `.pending` names the release
    /// until a health check clears it ([`clear_pending`](Self::clear_pending)): a deploy
    /// interrupted before its check leaves it, and the next deploy checks that release and
    /// rolls it back if it fails.
    pub fn switch(&self, id: &str) -> String {
        let mut s = self.prelude();
        let _ = writeln!(s, "new={}", quote(&format!("releases/{id}")));
        s.push_str(
            r#"printf '%s\n' "${new#releases/}" > .pending.tmp && mv .pending.tmp .pending
old=$(readlink current 2>/dev/null || true)
if [ -n "$old" ] && [ "$old" != "$new" ]; then
  ln -sfn "$old" .previous.tmp && mv -T .previous.tmp previous
fi
ln -sfn "$new" .current.tmp
mv -T .current.tmp current
flush .
"#,
        );
        s
    }

    /// Swaps `current` and `previous` (each by one rename); fails when there is no previous.
    pub fn swap_back(&self) -> String {
        let mut s = self.prelude();
        s.push_str(
            r#"cur=$(readlink current 2>/dev/null || true)
prev=$(readlink previous 2>/dev/null || true)
if [ -z "$prev" ] || [ ! -d "$prev" ]; then echo "no previous release to roll back to" >&2; exit 4; fi
ln -sfn "$prev" .current.tmp && mv -T .current.tmp current
if [ -n "$cur" ]; then ln -sfn "$cur" .previous.tmp && mv -T .previous.tmp previous; fi
rm -f .pending
flush .
echo "$prev"
"#,
        );
        s
    }

    /// Marks `current` as seen healthy: no longer pending.
    pub fn clear_pending(&self) -> String {
        let mut s = self.prelude();
        s.push_str("rm -f .pending\n");
        s
    }

    /// Removes releases beyond the newest `keep` (by the time they were committed), never the
    /// `current` or `previous` one, and stale uploads of other releases.
    pub fn prune(&self, keep: usize, incoming_keep: &str) -> String {
        let mut s = self.prelude();
        let _ = writeln!(s, "keep={keep}\nin_keep={}", quote(incoming_keep));
        s.push_str(
            r#"cur=$(readlink current 2>/dev/null || true)
prev=$(readlink previous 2>/dev/null || true)
i=0
for r in $(ls -1td releases/*/ 2>/dev/null); do
  r=${r%/}
  i=$((i+1))
  if [ "$r" = "$cur" ] || [ "$r" = "$prev" ]; then continue; fi
  if [ "$i" -gt "$keep" ]; then
    # Out of releases/ by one rename first: power lost during the removal leaves no
    # half-deleted release that a later deploy would take files from.
    mkdir -p .trash
    t=".trash/${r#releases/}.$$"
    mv "$r" "$t" && echo "removed ${r#releases/}"
  fi
done
for u in .incoming/*; do
  [ -e "$u" ] || continue
  [ "${u#.incoming/}" = "$in_keep" ] || { mkdir -p .trash; mv "$u" ".trash/incoming.${u#.incoming/}.$$"; }
done
rm -rf .trash
true
"#,
        );
        s
    }

    /// The shell functions the service scripts share: `alive PID` is false for a zombie too (a
    /// container's pid 1 may never reap it); `ours PID` is also false unless the process works
    /// in the install folder, as the supervisor does, so a stale pid file whose number the
    /// kernel gave to another process never gets that process signalled.
    fn alive_fn() -> &'static str {
        concat!(
            "alive() { kill -0 \"$1\" 2>/dev/null && [ \"$(sed 's/.*) //' /proc/$1/stat 2>/dev/null | cut -c1)\" != Z ]; }\n",
            "ours() { alive \"$1\" && [ \"$(readlink /proc/$1/cwd 2>/dev/null)\" = \"$(pwd -P)\" ]; }\n",
            "group_alive() { for s in /proc/[0-9]*/stat; do set -- \"$1\" $(sed 's/.*) //' \"$s\" 2>/dev/null); ",
            "[ \"$2\" != Z ] && [ \"$4\" = \"$1\" ] && return 0; done; return 1; }\n",
        )
    }

    /// Stops the supervised runtime: SIGTERM to its process group, SIGKILL after a grace time.
    /// (`kill -SIG -PGID`, without `--`: dash's builtin kill refuses `--`.) The wait is for
    /// the whole group, so the port is free when the next runtime starts.
    ///
    /// The script holds `.supervisor.lock` (flock, where the board has it) until it ends: a
    /// deploy killed mid-restart leaves its script running on the board, and a deploy started
    /// right after must not stop and start the supervisor beside it (two would then fight
    /// for the port).
    pub fn stop_supervised(&self) -> String {
        let mut s = self.prelude();
        s.push_str(
            "exec 9>> .supervisor.lock\nif command -v flock >/dev/null 2>&1; then flock 9; fi\n",
        );
        s.push_str(Self::alive_fn());
        let _ = write!(
            s,
            r#"if [ -f runtime.pid ]; then
  pid=$(cat runtime.pid)
  # Only a real supervisor pid: `kill -SIG -1` would signal every process.
  case "$pid" in ''|*[!0-9]*|0|1) pid= ;; esac
  if [ -n "$pid" ] && ours "$pid"; then
    kill -TERM "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    i=0
    while group_alive "$pid" && [ $i -lt {STOP_STEPS} ]; do sleep 0.2; i=$((i+1)); done
    kill -KILL "-$pid" 2>/dev/null || true
  fi
  rm -f runtime.pid
fi
"#
        );
        s
    }

    /// Starts the runtime of `current` under a restarting shell loop in its own session, with
    /// its output appended to `logs/runtime.log`. `command` is the runtime's command line.
    pub fn start_supervised(&self, command: &str) -> String {
        let mut s = self.stop_supervised();
        let inner = format!(
            "cd \"$D\"; while :; do {command} >> logs/runtime.log 2>&1; echo $? > runtime.exit; echo \"edgepack: runtime exited with $(cat runtime.exit); restarting in {RESTART_DELAY_S} s\" >> logs/runtime.log; sleep {RESTART_DELAY_S}; done"
        );
        let _ = write!(
            s,
            "rm -f runtime.exit\necho \"edgepack: starting $(readlink current) at $(date -u +%Y-%m-%dT%H:%M:%SZ)\" >> logs/runtime.log\nD=\"$D\" setsid sh -c {} < /dev/null > /dev/null 2>&1 9>&- &\necho $! > runtime.pid\n",
            quote(&format!("D=\"$D\"; {inner}"))
        );
        s
    }

    /// What `boot.sh` holds: the start of the supervised runtime at boot, for boards
    /// without systemd (the operator hooks it into the board's init). A release still
    /// `.pending` was switched to and never seen healthy before the board went down, so it is
    /// rolled back first, as an update engine rolls back an update not committed before a
    /// reboot; then the runtime of `current` starts under the supervisor, as deploy starts
    /// it.
    pub fn boot_script(&self, command: &str) -> String {
        let mut s = format!(
            "#!/bin/sh\n# Written by `edgepack deploy` at every start of the runtime: starts it at boot.\n# Run it from the board's init, e.g. `@reboot {}` in root's crontab.\n",
            self.path(BOOT_SCRIPT)
        );
        s.push_str(&self.prelude());
        s.push_str(
            r#"if [ -f .pending ]; then
  p=$(cat .pending)
  prev=$(readlink previous 2>/dev/null || true)
  cur=$(readlink current 2>/dev/null || true)
  if [ -n "$prev" ] && [ -d "$prev" ] && [ "$cur" = "releases/$p" ]; then
    ln -sfn "$prev" .current.tmp && mv -T .current.tmp current
    ln -sfn "$cur" .previous.tmp && mv -T .previous.tmp previous
    rm -f .pending
    flush .
    echo "edgepack: boot: $p was never seen healthy; rolled back to ${prev#releases/}" >> logs/runtime.log
  fi
fi
"#,
        );
        s.push_str(&self.start_supervised(command));
        s
    }

    /// Writes `boot.sh` ([`boot_script`](Self::boot_script)) by one rename. The text travels
    /// as one quoted word, so nothing in the command line can end it early.
    pub fn write_boot_script(&self, command: &str) -> String {
        let mut s = self.prelude();
        let _ = write!(
            s,
            "printf '%s' {} > {BOOT_SCRIPT}.tmp\nchmod 0755 {BOOT_SCRIPT}.tmp\nmv {BOOT_SCRIPT}.tmp {BOOT_SCRIPT}\n",
            quote(&self.boot_script(command))
        );
        s
    }

    /// Installs (or updates) the systemd unit `name` for `command`, and restarts it.
    pub fn start_systemd(&self, name: &str, command: &str) -> String {
        let mut s = self.prelude();
        let unit = format!(
            "[Unit]\nDescription=edgepack runtime ({dir})\nAfter=network.target\n\n[Service]\nExecStart={command}\nWorkingDirectory={dir}\nRestart=on-failure\nRestartSec={RESTART_DELAY_S}\n\n[Install]\nWantedBy=multi-user.target\n",
            dir = self.install_dir
        );
        let path = format!("/etc/systemd/system/{name}.service");
        let _ = write!(
            s,
            "cat > {tmp} <<'EDGEPACK_UNIT'\n{unit}EDGEPACK_UNIT\nmv {tmp} {path}\nsystemctl daemon-reload\nsystemctl enable {name} >/dev/null 2>&1 || true\nsystemctl restart {name}\n",
            tmp = quote(&format!("{path}.tmp")),
            path = quote(&path),
            name = quote(name),
        );
        s
    }

    /// Prints `running <pid> <seconds>` or `stopped` (supervised) for `status`.
    pub fn supervised_state(&self) -> String {
        let mut s = self.prelude();
        s.push_str(Self::alive_fn());
        s.push_str(
            r#"if [ -f runtime.pid ] && pid=$(cat runtime.pid) && ours "$pid"; then
  up=$(ps -o etimes= -p "$pid" 2>/dev/null | tr -d ' ')
  echo "running $pid ${up:-?}"
else echo stopped; fi
if [ -f runtime.exit ]; then echo "exited $(cat runtime.exit)"; fi
"#,
        );
        s
    }

    /// Writes stdin to `rel` under the install folder through a temporary name (the contents
    /// travel as data, so no text in them can end a here-document).
    pub fn write_file(&self, rel: &str) -> String {
        let mut s = self.prelude();
        let tmp = format!(".{}.tmp", rel.replace('/', "_"));
        let _ = writeln!(s, "cat > {t}\nmv {t} {r}", t = quote(&tmp), r = quote(rel));
        s
    }

    /// The last `lines` lines of the runtime's log (or the unit's journal), optionally followed.
    pub fn logs(&self, systemd_unit: Option<&str>, lines: u32, follow: bool) -> String {
        let f = if follow { " -f" } else { "" };
        match systemd_unit {
            Some(u) => format!("journalctl -u {} -n {lines} --no-pager{f}\n", quote(u)),
            None => format!(
                "tail -n {lines}{f} {}\n",
                quote(&self.path("logs/runtime.log"))
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes_and_spaces() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
    }

    use std::path::Path;
    use std::process::Command;

    #[test]
    fn the_boot_script_is_written_whole_whatever_the_command_line_holds() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(&d.path().display().to_string());
        // A runtime argument with a newline, a quote and a line that ends a here-document.
        let cmd = format!("run --arg {}", quote("a\nEDGEPACK_BOOT\nit's"));
        let out = Command::new("sh")
            .args(["-c", &l.write_boot_script(&cmd)])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let written = std::fs::read_to_string(d.path().join(BOOT_SCRIPT)).unwrap();
        assert_eq!(written, l.boot_script(&cmd));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join(BOOT_SCRIPT))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(Command::new("sh")
            .args(["-n", &d.path().join(BOOT_SCRIPT).display().to_string()])
            .status()
            .unwrap()
            .success());
    }

    /// The line counts at which `script` ends on a complete statement: where the board's
    /// power can fail between two steps (each later step never runs).
    fn cut_points(script: &str) -> Vec<usize> {
        let lines: Vec<&str> = script.lines().collect();
        (0..=lines.len())
            .filter(|&k| {
                Command::new("sh")
                    .args(["-n", "-c", &prefix(script, k)])
                    .stderr(std::process::Stdio::null())
                    .status()
                    .unwrap()
                    .success()
            })
            .collect()
    }

    fn prefix(script: &str, k: usize) -> String {
        let lines: Vec<&str> = script.lines().collect();
        format!("{}\n", lines[..k].join("\n"))
    }

    fn sh(script: &str, stdin: &str) -> bool {
        use std::io::Write;
        let mut c = Command::new("sh")
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // A script cut before it reads its input closes the pipe early.
        let _ = c.stdin.take().unwrap().write_all(stdin.as_bytes());
        c.wait().unwrap().success()
    }

    /// A release folder as a commit leaves it: two files and a manifest naming them.
    fn release(dir: &Path, tag: &str) -> String {
        std::fs::create_dir_all(dir.join("model")).unwrap();
        std::fs::write(dir.join("model/m.gguf"), format!("weights {tag}")).unwrap();
        std::fs::write(dir.join("manifest.json"), format!("{{\"r\":\"{tag}\"}}")).unwrap();
        ["model/m.gguf", "manifest.json"]
            .iter()
            .map(|f| {
                let out = Command::new("sha256sum").arg(dir.join(f)).output().unwrap();
                let sum = String::from_utf8_lossy(&out.stdout);
                format!("{}  {f}\n", &sum[..64])
            })
            .collect()
    }

    /// The release a link points at, which must be a complete release folder.
    fn complete_target(d: &Path, link: &str) -> Option<String> {
        let to = std::fs::read_link(d.join(link)).ok()?;
        let to = to.to_string_lossy().into_owned();
        let rel = d.join(&to);
        assert!(
            rel.join("manifest.json").is_file() && rel.join("model/m.gguf").is_file(),
            "{link} -> {to}, which is not a complete release"
        );
        Some(to)
    }

    #[test]
    fn power_lost_between_any_two_steps_of_commit_and_switch_leaves_current_complete() {
        let t = tempfile::tempdir().unwrap();
        let steps = |l: &Layout| {
            format!(
                "{}{}",
                l.verify_and_commit("B", true, 2, &[]),
                l.switch("B")
            )
        };
        let cuts = cut_points(&steps(&Layout::new("/board")));
        let mut committed_then_cut = 0;
        for k in cuts {
            // A board running A, with B fully uploaded to .incoming.
            let d = t.path().join(format!("cut{k}"));
            release(&d.join("releases/A"), "A");
            let sums = release(&d.join(".incoming/B"), "B");
            std::os::unix::fs::symlink("releases/A", d.join("current")).unwrap();
            let l = Layout::new(&d.to_string_lossy());
            // The board's power fails after k lines: whatever ran, `current` is complete.
            let _ = sh(&prefix(&steps(&l), k), &sums);
            let cur = complete_target(&d, "current").expect("current exists");
            assert!(cur == "releases/A" || cur == "releases/B", "{cur}");
            if let Some(prev) = complete_target(&d, "previous") {
                assert_eq!(prev, "releases/A");
            }
            // A release folder exists only whole; an upload only while it is not one.
            if d.join("releases/B").exists() {
                assert!(d.join("releases/B/model/m.gguf").is_file());
                assert!(d.join("releases/B/manifest.json").is_file());
                assert!(!d.join(".incoming/B").exists());
                committed_then_cut += 1;
            }
            // The next deploy runs the steps again (commit when B is still incoming).
            let mut again = String::new();
            if d.join(".incoming/B").exists() {
                again.push_str(&l.verify_and_commit("B", true, 2, &[]));
            }
            again.push_str(&l.switch("B"));
            assert!(sh(&again, &sums), "the rerun after cut {k} fails");
            assert_eq!(
                complete_target(&d, "current").as_deref(),
                Some("releases/B")
            );
            assert_eq!(
                complete_target(&d, "previous").as_deref(),
                Some("releases/A")
            );
        }
        assert!(committed_then_cut > 3, "cuts after the commit were tried");
    }

    /// A `sync` on PATH that logs its arguments, one call per line, and fails on arguments
    /// when `takes_paths` is false (as an old busybox would).
    fn logging_sync(dir: &Path, takes_paths: bool) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let log = dir.join("sync.log");
        let refuse = if takes_paths {
            ""
        } else {
            "[ $# -eq 0 ] || exit 1\n"
        };
        let script = format!(
            "#!/bin/sh\nprintf '%s\\n' \"[$*]\" >> '{}'\n{refuse}exit 0\n",
            log.display()
        );
        std::fs::write(bin.join("sync"), script).unwrap();
        std::fs::set_permissions(bin.join("sync"), std::fs::Permissions::from_mode(0o755)).unwrap();
        bin
    }

    #[test]
    fn commit_and_switch_flush_the_release_files_and_never_the_whole_system() {
        for takes_paths in [true, false] {
            let t = tempfile::tempdir().unwrap();
            let d = t.path().join("board");
            release(&d.join("releases/A"), "A");
            let sums = release(&d.join(".incoming/B"), "B");
            std::os::unix::fs::symlink("releases/A", d.join("current")).unwrap();
            let bin = logging_sync(t.path(), takes_paths);
            let l = Layout::new(&d.to_string_lossy());
            let script = format!(
                "PATH='{}':\"$PATH\"\n{}{}",
                bin.display(),
                l.verify_and_commit("B", true, 2, &[]),
                l.switch("B")
            );
            assert!(sh(&script, &sums), "commit and switch ran");
            assert_eq!(
                complete_target(&d, "current").as_deref(),
                Some("releases/B")
            );
            let log = std::fs::read_to_string(t.path().join("sync.log")).unwrap();
            let bare = log.lines().filter(|l| *l == "[]").count();
            if takes_paths {
                assert_eq!(bare, 0, "a whole-system sync ran:\n{log}");
                let flushed: std::collections::BTreeSet<&str> = log
                    .lines()
                    .flat_map(|l| l.trim_matches(['[', ']']).split(' '))
                    .collect();
                for f in [
                    "./model/m.gguf",
                    "./manifest.json",
                    "./model",
                    "releases",
                    ".",
                ] {
                    assert!(flushed.contains(f), "{f} was not flushed:\n{log}");
                }
            } else {
                assert!(bare >= 2, "no fallback to a whole-system sync:\n{log}");
            }
        }
    }

    #[test]
    fn the_receiver_scripts_hand_quoted_paths_and_the_runner_to_the_runtime() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("in coming's");
        std::fs::create_dir_all(&dir).unwrap();
        // A stand-in runtime that prints each argument on its own line, then its input.
        let rt = dir.join("edgepack-runtime");
        std::fs::write(
            &rt,
            "#!/bin/sh\nfor a in \"$@\"; do echo \"[$a]\"; done\ncat\n",
        )
        .unwrap();
        std::fs::set_permissions(&rt, std::fs::Permissions::from_mode(0o644)).unwrap();
        let l = Layout::new("/board");
        let (rt, file) = (rt.to_string_lossy(), "/board/.incoming/r 1/model/it's.gguf");
        let run = |script: &str, input: &str| {
            let mut c = Command::new("sh")
                .args(["-c", script])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            std::io::Write::write_all(&mut c.stdin.take().unwrap(), input.as_bytes()).unwrap();
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        // The check makes the runtime executable, then asks it to receive nothing.
        let out = run(&l.receiver_check(&rt, None), "ignored");
        assert_eq!(out, "[receive]\n[--]\n[/dev/null]\n");
        // The upload hands it the stream on stdin, through the host's runner when set.
        let out = run(&l.receive(&rt, Some("env X=1"), file, true), "payload");
        assert_eq!(out, format!("[receive]\n[--zstd]\n[--]\n[{file}]\npayload"));
        let out = run(&l.receive(&rt, None, file, false), "");
        assert_eq!(out, format!("[receive]\n[--]\n[{file}]\n"));
    }

    #[test]
    fn pruning_takes_a_release_out_of_releases_before_deleting_it() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        for r in ["A", "B", "C"] {
            release(&d.join(format!("releases/{r}")), r);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::os::unix::fs::symlink("releases/C", d.join("current")).unwrap();
        std::os::unix::fs::symlink("releases/B", d.join("previous")).unwrap();
        std::fs::create_dir_all(d.join(".incoming/old")).unwrap();
        let script = Layout::new(&d.to_string_lossy()).prune(2, "C");
        assert!(script.contains("mv \"$r\" \"$t\""), "{script}");
        assert!(sh(&script, ""));
        assert!(!d.join("releases/A").exists());
        assert!(!d.join(".trash").exists());
        assert!(!d.join(".incoming/old").exists());
        for r in ["B", "C"] {
            assert!(d.join(format!("releases/{r}/model/m.gguf")).is_file());
        }
    }

    #[test]
    fn a_switch_renames_a_new_link_over_current() {
        let s = Layout::new("/opt/edgepack/").switch("m-1");
        assert!(s.contains("D='/opt/edgepack'"), "{s}");
        assert!(s.contains("mv -T .current.tmp current"), "{s}");
        assert!(s.contains("new='releases/m-1'"), "{s}");
    }
}
