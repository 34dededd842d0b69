//! `deploy`, `status`, `rollback`, `logs`, `fleet import`: the board side of edgepack.
//! Argument handling, bundle selection per host, progress bars and the result table; the work
//! (rollout waves, Ansible import) is in `edgepack_targets::deploy`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use edgepack_targets::bundle;
use edgepack_targets::deploy::rollout::{self, MaxFailures, RolloutReport};
use edgepack_targets::deploy::{
    self, ansible, inventory, HostConfig, HostProgress, HostReport, LocalBundle, Options, Outcome,
    Quiet,
};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

const AFTER_DEPLOY: &str = "Examples:
  edgepack deploy out/smollm2-imx95.tar.zst --host root@10.0.0.12
  edgepack deploy out/smollm2-imx95/ --host cam-01 --key key.pub.pem --accept-new-host-key
  edgepack deploy out/ --inventory fleet.toml --parallel 8 --json
  edgepack --json deploy out/ --inventory fleet.toml --parallel 16 --canary 1 --max-failures 10% > last.json
  edgepack deploy out/ --inventory fleet.toml --only-failed last.json

ssh is your own: ~/.ssh/config (Host aliases, User, Port, IdentityFile, ProxyJump), ssh-agent
and known_hosts apply. An unknown host key is refused unless --accept-new-host-key; a changed
key is always refused.

On the board (default /opt/edgepack): releases/<id>/, a `current` link switched by one
rename, `previous`, and the last --keep releases. Files an earlier release already holds are
linked on the board, not sent; an interrupted upload resumes. The upload is checked with
sha256sum on the board before the switch. The runtime is restarted (systemd unit where
systemd runs, else a supervised process with runtime.pid) and checked: /health, then a smoke
prompt whose TTFT and tokens/s are recorded in health.json. A failed check switches back.

Inventory (TOML):
  [defaults]
  user = \"root\"
  [groups.line-a]
  target = \"imx95\"
  [[hosts]]
  name = \"cam-01\"
  address = \"10.0.0.12\"
  groups = [\"line-a\"]
  # port, install_dir, runtime_port, runner, keep, service, ssh_config, runtime_args,
  # api_key_file (this machine's copy of the token the runtime serves with --api-key-file)
An Ansible inventory becomes one with `edgepack fleet import hosts.ini -o fleet.toml`.

Rollout of a fleet: hosts start in inventory order, --parallel at a time. With --canary N the
first N deploy first, alone; if any of them fails (failed or rolled back) nothing else starts.
With --max-failures (a count like 2, or a share of the hosts in the run like 10%), no further
host starts once the failures are MORE than that (Ansible's max_fail_percentage): 0 stops at
the first failure, 1 tolerates one. Running hosts finish; the rest are reported `skipped` with
the reason. Without --max-failures every host is tried (as Ansible and Mender do by default).
The table (or --json: per host, and a summary with the counts and why the rollout stopped)
shows each host's release before -> after. --only-failed LAST.json deploys again only to the
hosts that a previous `--json` run reports failed, rolled-back or skipped.

The exit status is non-zero when any host failed or was skipped.";

#[derive(Subcommand, Debug)]
pub enum DeployCommand {
    /// Install a bundle on boards over SSH: upload, verify, switch, restart, health check.
    #[command(after_help = AFTER_DEPLOY)]
    Deploy {
        /// A bundle folder, a .tar.zst, or a folder of bundles (each host gets its target's).
        bundle: PathBuf,
        #[command(flatten)]
        hosts: HostArgs,
        /// The signer's public key (PEM): the bundle must be signed with it, and the runtime
        /// checks the signature on the board each time it starts.
        #[arg(long, value_name = "KEY.pub.pem")]
        key: Option<PathBuf>,
        /// Boards deployed at the same time.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        /// Deploy the first N hosts (in inventory order) first; if any fails, stop there.
        #[arg(long, value_name = "N", default_value_t = 0)]
        canary: usize,
        /// Start no further host once more than this many fail: a count (2) or a share of
        /// the hosts in the run (10%). Default: every host is tried.
        #[arg(long, value_name = "N|P%")]
        max_failures: Option<MaxFailures>,
        /// Deploy only to the hosts a previous run's JSON (`edgepack --json deploy ...`)
        /// reports failed, rolled-back or skipped.
        #[arg(long, value_name = "LAST.json")]
        only_failed: Option<PathBuf>,
        /// Seconds the restarted runtime has to load its model and answer the smoke prompt.
        #[arg(long, default_value_t = deploy::DEFAULT_HEALTH_TIMEOUT.as_secs())]
        health_timeout: u64,
        /// Cap the upload rate per host, in bytes per second (e.g. 2000000).
        #[arg(long, value_name = "BYTES")]
        limit_rate: Option<u64>,
    },
    /// Show what runs on boards: release, model, service state, uptime, the last health check.
    #[command(
        after_help = "Example:\n  edgepack status --host root@10.0.0.12\n  edgepack status --inventory fleet.toml --json"
    )]
    Status {
        #[command(flatten)]
        hosts: HostArgs,
    },
    /// Switch a board back to its previous release, restart, and check its health.
    #[command(
        after_help = "Example:\n  edgepack rollback --host root@10.0.0.12\n  edgepack rollback --inventory fleet.toml --host cam-01"
    )]
    Rollback {
        #[command(flatten)]
        hosts: HostArgs,
        #[arg(long, default_value_t = deploy::DEFAULT_HEALTH_TIMEOUT.as_secs())]
        health_timeout: u64,
    },
    /// Fleet files: import an Ansible inventory.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Print the runtime's log from a board (journal or <install_dir>/logs/runtime.log).
    #[command(
        after_help = "Example:\n  edgepack logs --host root@10.0.0.12 --follow\n  edgepack logs --host cam-01 --lines 200"
    )]
    Logs {
        #[command(flatten)]
        hosts: HostArgs,
        /// Keep printing as the log grows (Ctrl-C ends).
        #[arg(short, long)]
        follow: bool,
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: u32,
    },
}

const AFTER_IMPORT: &str = "Examples:
  edgepack fleet import hosts.ini -o fleet.toml
  edgepack fleet import inventory/hosts.yml -o fleet.toml --force
  edgepack deploy out/ --inventory fleet.toml --group cams

Reads Ansible's INI (`[group]`, `[group:children]`, `[group:vars]`, `name key=value ...`,
ranges like cam[01:08].example, name:port, IPv6 as [2001:db8::1]:2222) and YAML (`all: hosts:
/ children: / vars:`) inventories. all's vars become [defaults], each group a [groups.NAME] table, each host a
[[hosts]] entry listing its groups and their parents (parents first, so a child group's vars
win, as in Ansible). Variables: ansible_host (address), ansible_user, ansible_port,
edgepack_target or target, edgepack_install_dir, edgepack_runtime_port, edgepack_runner,
edgepack_keep, edgepack_service, edgepack_ssh_config. Other variables are ignored and listed
in a warning; an unknown edgepack_* variable is an error. A setting's {{ variable }}
references are rendered per host with the variables it sees (and inventory_hostname); other
Jinja (filters, expressions, blocks) is refused. Errors name the file and line. The output is
written atomically and an existing file is kept unless --force. With --json, each host's
resolved settings are listed.";

#[derive(Subcommand, Debug)]
pub enum FleetCommand {
    /// Convert an Ansible inventory (INI or YAML) into an edgepack fleet file (TOML).
    #[command(after_help = AFTER_IMPORT)]
    Import {
        /// The Ansible inventory: INI (hosts.ini, hosts) or YAML (hosts.yml).
        inventory: PathBuf,
        /// The fleet file to write.
        #[arg(short, long, value_name = "fleet.toml")]
        output: PathBuf,
        /// Replace the output if it exists.
        #[arg(long)]
        force: bool,
    },
}

/// Which boards, and how to reach them.
#[derive(Args, Debug, Clone)]
pub struct HostArgs {
    /// A board: user@host, host, or a Host alias of your ssh config. With --inventory, the
    /// name of one of its hosts.
    #[arg(long)]
    host: Option<String>,
    /// A fleet file (TOML: [defaults], [groups.NAME], [[hosts]]).
    #[arg(long, value_name = "FILE")]
    inventory: Option<PathBuf>,
    /// Only the hosts of this inventory group.
    #[arg(long, requires = "inventory")]
    group: Option<String>,
    /// SSH port (default: ssh's own, from your config or 22).
    #[arg(long)]
    port: Option<u16>,
    /// SSH user (default: ssh's own).
    #[arg(long)]
    user: Option<String>,
    /// An ssh_config to use instead of ~/.ssh/config (ssh -F).
    #[arg(long, value_name = "FILE")]
    ssh_config: Option<PathBuf>,
    /// Install folder on the board (default: /opt/edgepack).
    #[arg(long)]
    install_dir: Option<String>,
    /// The runtime's port on the board's loopback.
    #[arg(long)]
    runtime_port: Option<u16>,
    /// The target profile the board is (a bundle for another target is refused).
    #[arg(long)]
    target: Option<String>,
    /// Command prefix for the runtime on the board, e.g. "qemu-aarch64 -L /usr/aarch64-linux-gnu".
    #[arg(long)]
    runner: Option<String>,
    /// Releases kept on the board besides current and previous.
    #[arg(long)]
    keep: Option<usize>,
    /// An argument for `edgepack-runtime serve` on the board, repeated for each (replaces
    /// the inventory's runtime_args), e.g. --runtime-arg=--threads --runtime-arg=2.
    #[arg(long = "runtime-arg", value_name = "ARG", allow_hyphen_values = true)]
    runtime_args: Vec<String>,
    /// Trust and record the key of a host not yet in known_hosts (a changed key is still refused).
    #[arg(long)]
    accept_new_host_key: bool,
}

impl HostArgs {
    fn resolve(&self) -> Result<Vec<HostConfig>> {
        let mut hosts = match (&self.inventory, &self.host) {
            (Some(inv), host) => {
                let all = inventory::load(inv, self.group.as_deref())?;
                match host {
                    Some(name) => {
                        let h = all
                            .into_iter()
                            .find(|h| h.name == *name || h.address == *name)
                            .with_context(|| {
                                format!("{}: no host named `{name}`", inv.display())
                            })?;
                        vec![h]
                    }
                    None => all,
                }
            }
            (None, Some(h)) => vec![HostConfig::new(h)],
            (None, None) => {
                bail!("name a board with --host user@host, or a fleet with --inventory fleet.toml")
            }
        };
        // Command-line settings win over the inventory's.
        for h in &mut hosts {
            if let Some(p) = self.port {
                h.port = Some(p);
            }
            if let Some(u) = &self.user {
                h.user = Some(u.clone());
            }
            if let Some(c) = &self.ssh_config {
                h.ssh_config = Some(c.clone());
            }
            if let Some(d) = &self.install_dir {
                h.install_dir = d.clone();
            }
            if let Some(p) = self.runtime_port {
                h.runtime_port = p;
            }
            if let Some(t) = &self.target {
                h.target = Some(t.clone());
            }
            if let Some(r) = &self.runner {
                h.runner = Some(r.clone());
            }
            if let Some(k) = self.keep {
                h.keep = k;
            }
            if !self.runtime_args.is_empty() {
                h.runtime_args = self.runtime_args.clone();
            }
        }
        Ok(hosts)
    }

    fn one(&self) -> Result<HostConfig> {
        let mut hs = self.resolve()?;
        if hs.len() != 1 {
            bail!(
                "this command works on one board; name it with --host (the inventory has {})",
                hs.len()
            );
        }
        Ok(hs.remove(0))
    }
}

/// The bundles a deploy may send: folders, and archives (unpacked only when a board needs
/// their files).
struct Bundles {
    list: Vec<Arc<LocalBundle>>,
}

fn load_bundles(path: &Path, key: Option<&Path>) -> Result<Bundles> {
    let open_dir = |d: &Path| {
        deploy::open_bundle(d, key)
            .map(Arc::new)
            .with_context(|| format!("refusing bundle {}", d.display()))
    };
    let open_archive = |a: &Path| {
        deploy::open_archive(a, key)
            .map(Arc::new)
            .with_context(|| format!("refusing bundle {}", a.display()))
    };
    let mut list = Vec::new();
    if path.is_file() {
        list.push(open_archive(path)?);
    } else if path.join(bundle::MANIFEST).is_file() {
        list.push(open_dir(path)?);
    } else if path.is_dir() {
        let mut names: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        names.sort();
        for p in &names {
            if p.join(bundle::MANIFEST).is_file() {
                list.push(open_dir(p)?);
            }
        }
        for p in &names {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if let Some(stem) = n.strip_suffix(".tar.zst") {
                // `edgepack bundle` writes both a folder and its archive: one is enough.
                if !path.join(stem).join(bundle::MANIFEST).is_file() {
                    list.push(open_archive(p)?);
                }
            }
        }
        if list.is_empty() {
            bail!(
                "{}: no bundle here (a folder with manifest.json, or a .tar.zst)",
                path.display()
            );
        }
    } else {
        bail!("{}: no such bundle", path.display());
    }
    Ok(Bundles { list })
}

fn pick(bundles: &[Arc<LocalBundle>], h: &HostConfig) -> Result<Arc<LocalBundle>, String> {
    match &h.target {
        Some(t) => {
            let matching: Vec<_> = bundles
                .iter()
                .filter(|b| b.manifest.target.profile == *t)
                .collect();
            match matching.as_slice() {
                [b] => Ok((*b).clone()),
                [] if bundles.len() == 1 => Err(format!(
                    "the bundle is for target `{}`, the host is `{t}`; refusing to install it",
                    bundles[0].manifest.target.profile
                )),
                [] => Err(format!(
                    "no bundle for target `{t}` among {}",
                    bundles.len()
                )),
                _ => Err(format!(
                    "{} bundles are for target `{t}`; give one",
                    matching.len()
                )),
            }
        }
        None if bundles.len() == 1 => Ok(bundles[0].clone()),
        None => Err(format!(
            "{} bundles and the host names no target; set `target` for it in the inventory",
            bundles.len()
        )),
    }
}

/// One bar per host on a terminal; nothing in CI or with --json.
struct Bar {
    bar: ProgressBar,
}

impl HostProgress for Bar {
    fn stage(&self, stage: &str) {
        self.bar.set_message(stage.to_string());
    }
    fn upload_start(&self, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(0);
    }
    fn advance(&self, n: u64) {
        self.bar.inc(n);
    }
    fn finish(&self, r: &HostReport) {
        self.bar.finish_with_message(outcome_name(r.outcome));
    }
}

fn show_bars(json: bool) -> bool {
    !json && std::io::stderr().is_terminal() && std::env::var_os("CI").is_none()
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

fn outcome_name(o: Outcome) -> String {
    serde_json::to_value(o)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The release a host runs now: the new one when it deployed (or already ran it), the one
/// from before otherwise.
fn release_change(r: &HostReport) -> String {
    let before = r.previous.as_deref().unwrap_or("(none)");
    match r.outcome {
        Outcome::Deployed => format!("{before} -> {}", r.release.as_deref().unwrap_or("?")),
        Outcome::Unchanged => format!("{} (current)", r.release.as_deref().unwrap_or("?")),
        Outcome::RolledBack => format!("{before} (rolled back)"),
        Outcome::Failed if r.previous.is_some() => format!("{before} (kept)"),
        Outcome::Failed | Outcome::Skipped => "-".into(),
    }
}

fn print_table(report: &RolloutReport) {
    let mut rows = vec![[
        "HOST", "RESULT", "RELEASE", "SENT", "TTFT", "TOK/S", "TIME", "ERROR",
    ]
    .map(String::from)];
    for r in &report.hosts {
        let (ttft, tps) = match &r.health {
            Some(h) => (
                format!("{:.0} ms", h.ttft_ms),
                h.tokens_per_s.map_or("-".into(), |t| format!("{t:.1}")),
            ),
            None => ("-".into(), "-".into()),
        };
        // The first line of the error, without the host name it starts with.
        let error = r.error.as_deref().map_or(String::from("-"), |e| {
            let e = e.lines().next().unwrap_or_default();
            let e = e.strip_prefix(&format!("{}: ", r.host)).unwrap_or(e);
            if e.chars().count() > 90 {
                format!("{}...", e.chars().take(87).collect::<String>())
            } else {
                e.to_string()
            }
        });
        rows.push([
            r.host.clone(),
            outcome_name(r.outcome),
            release_change(r),
            mib(r.bytes_sent),
            ttft,
            tps,
            format!("{:.1}s", r.seconds),
            error,
        ]);
    }
    let mut width = [0usize; 8];
    for row in &rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            // Numbers right-aligned, text left-aligned, the last column unpadded.
            match i {
                3..=6 => line.push_str(&format!("{cell:>w$}  ", w = width[i])),
                7 => line.push_str(cell),
                _ => line.push_str(&format!("{cell:<w$}  ", w = width[i])),
            }
        }
        println!("{}", line.trim_end());
    }
    let s = &report.summary;
    println!(
        "\n{} host(s): {} deployed, {} unchanged, {} rolled back, {} failed, {} skipped",
        s.hosts, s.deployed, s.unchanged, s.rolled_back, s.failed, s.skipped
    );
    if let Some(why) = &s.reason {
        println!("the rollout stopped: {why}");
    }
}

/// The full errors of the hosts that failed (skipped hosts share the summary's reason).
fn print_errors(reports: &[HostReport]) {
    for r in reports {
        if r.outcome == Outcome::Skipped {
            continue;
        }
        if let Some(e) = &r.error {
            eprintln!("error: {e}");
        }
    }
}

pub fn run(cmd: DeployCommand, json: bool) -> Result<()> {
    match cmd {
        DeployCommand::Deploy {
            bundle,
            hosts,
            key,
            parallel,
            canary,
            max_failures,
            only_failed,
            health_timeout,
            limit_rate,
        } => {
            let mut hs = hosts.resolve()?;
            if let Some(last) = &only_failed {
                let names = rollout::unfinished_hosts(last)?;
                if names.is_empty() {
                    if json {
                        let v = serde_json::json!({"ok": true, "summary": rollout::Summary::default(), "hosts": []});
                        println!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        println!(
                            "nothing to deploy: every host in {} was deployed or unchanged",
                            last.display()
                        );
                    }
                    return Ok(());
                }
                hs = rollout::only(hs, &names, last)?;
            }
            let bundles = load_bundles(&bundle, key.as_deref())?;
            let opts = Options {
                accept_new_host_key: hosts.accept_new_host_key,
                trusted_key: key,
                health_timeout: Duration::from_secs(health_timeout),
                limit_rate,
            };
            let plan = rollout::Plan {
                parallel,
                canary,
                max_failures,
            };
            let multi = show_bars(json)
                .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
            let style = ProgressStyle::with_template(
                "{prefix:>16} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {wide_msg}",
            )
            .expect("valid template")
            .progress_chars("=> ");
            let progress = |h: &HostConfig| -> Arc<dyn HostProgress> {
                match &multi {
                    Some(m) => {
                        let bar = m.add(ProgressBar::new(0));
                        bar.set_style(style.clone());
                        bar.set_prefix(h.name.clone());
                        Arc::new(Bar { bar })
                    }
                    None => Arc::new(Quiet),
                }
            };
            let list = bundles.list.clone();
            let report = rollout::deploy_fleet(&hs, &|h| pick(&list, h), &opts, &plan, &progress);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_table(&report);
            }
            print_errors(&report.hosts);
            let s = &report.summary;
            let failed = s.failed + s.rolled_back;
            if !report.ok {
                let mut msg = format!("{failed} of {} host(s) failed", s.hosts);
                if s.skipped > 0 {
                    msg.push_str(&format!(", {} skipped", s.skipped));
                }
                if let Some(why) = &s.reason {
                    msg.push_str(&format!(" (the rollout stopped: {why})"));
                }
                bail!(msg);
            }
            Ok(())
        }
        DeployCommand::Fleet(FleetCommand::Import {
            inventory,
            output,
            force,
        }) => {
            let imported = ansible::import(&inventory)?;
            ansible::write_fleet(&output, &imported.toml, force)?;
            if !imported.ignored.is_empty() {
                eprintln!(
                    "warning: {} variable(s) ignored, edgepack has no setting for them: {}",
                    imported.ignored.len(),
                    imported.ignored.join(", ")
                );
            }
            if json {
                let resolved: Vec<_> = imported
                    .resolved
                    .iter()
                    .map(|h| {
                        serde_json::json!({
                            "name": h.name,
                            "address": h.address,
                            "user": h.user,
                            "port": h.port,
                            "target": h.target,
                            "install_dir": h.install_dir,
                            "runtime_port": h.runtime_port,
                        })
                    })
                    .collect();
                let v = serde_json::json!({
                    "output": output,
                    "hosts": imported.hosts,
                    "groups": imported.groups,
                    "ignored": imported.ignored,
                    "resolved": resolved,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{}: {} host(s), {} group(s) from {}",
                    output.display(),
                    imported.hosts,
                    imported.groups,
                    inventory.display()
                );
            }
            Ok(())
        }
        DeployCommand::Status { hosts } => {
            let opts = Options {
                accept_new_host_key: hosts.accept_new_host_key,
                ..Options::default()
            };
            let mut out = Vec::new();
            let mut errors = BTreeMap::new();
            for h in hosts.resolve()? {
                match deploy::status(&h, &opts) {
                    Ok(s) => out.push(s),
                    Err(e) => {
                        errors.insert(h.name.clone(), e.to_string());
                    }
                }
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"hosts": out, "errors": errors})
                    )?
                );
            } else {
                for s in &out {
                    println!("{}", s.host);
                    println!("  current   {}", s.current.as_deref().unwrap_or("(none)"));
                    println!("  previous  {}", s.previous.as_deref().unwrap_or("(none)"));
                    println!("  model     {}", s.model.as_deref().unwrap_or("-"));
                    println!("  target    {}", s.target.as_deref().unwrap_or("-"));
                    println!(
                        "  runtime   {} ({}){}",
                        if s.running { "running" } else { "stopped" },
                        s.service,
                        s.uptime_s.map_or(String::new(), |u| format!(", up {u} s"))
                    );
                    println!("  releases  {}", s.releases.join(", "));
                    match &s.last_check {
                        Some(c) if c["ok"] == true => println!(
                            "  last check ok: {} ttft {:.0} ms, {:.1} tok/s",
                            c["release"].as_str().unwrap_or("?"),
                            c["ttft_ms"].as_f64().unwrap_or(f64::NAN),
                            c["tokens_per_s"].as_f64().unwrap_or(f64::NAN)
                        ),
                        Some(c) => println!(
                            "  last check FAILED: {} {}",
                            c["release"].as_str().unwrap_or("?"),
                            c["reason"].as_str().unwrap_or("")
                        ),
                        None => println!("  last check (none)"),
                    }
                }
                for e in errors.values() {
                    eprintln!("error: {e}");
                }
            }
            if !errors.is_empty() {
                bail!("{} host(s) could not be read", errors.len());
            }
            Ok(())
        }
        DeployCommand::Rollback {
            hosts,
            health_timeout,
        } => {
            let h = hosts.one()?;
            let opts = Options {
                accept_new_host_key: hosts.accept_new_host_key,
                health_timeout: Duration::from_secs(health_timeout),
                ..Options::default()
            };
            let r = deploy::rollback(&h, &opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{}: {} -> {} (healthy{})",
                    r.host,
                    r.from.as_deref().unwrap_or("(none)"),
                    r.to,
                    r.health
                        .as_ref()
                        .map_or(String::new(), |h| format!(", ttft {:.0} ms", h.ttft_ms))
                );
            }
            Ok(())
        }
        DeployCommand::Logs {
            hosts,
            follow,
            lines,
        } => {
            let h = hosts.one()?;
            let opts = Options {
                accept_new_host_key: hosts.accept_new_host_key,
                ..Options::default()
            };
            deploy::logs(&h, &opts, lines, follow)?;
            Ok(())
        }
    }
}
