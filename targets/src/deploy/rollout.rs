//! A fleet rollout: which hosts start when, and when no more may start.
//!
//! The first `canary` hosts of the run (in its order) deploy first; if any of them fails,
//! nothing else starts. The rest then go in order, at most `parallel` at a time. Once the
//! failures are more than `max_failures` (a count, or a share of the hosts in the run, as
//! Ansible's `max_fail_percentage`), no further host starts: those already running finish,
//! and those not started are reported [`Outcome::Skipped`] with the reason. Without a
//! threshold every host is tried, as Ansible and Mender do by default. A failed or
//! rolled-back host is a failure; a deployed or unchanged one is not.
//!
//! [`unfinished_hosts`] reads the report a previous run printed (`--json`) and names the hosts
//! it did not finish (failed, rolled back or skipped), so a rerun can take only those.

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::host::{DeployError, HostConfig};
use super::{deploy_host, runtime, HostProgress, HostReport, LocalBundle, Options, Outcome};

/// How many failures a rollout tolerates before it starts no further host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxFailures {
    /// At most this many hosts may fail.
    Count(usize),
    /// At most this share (in percent) of the hosts in the run may fail.
    Percent(f64),
}

impl MaxFailures {
    /// True when `failed` of `hosts` is more than the threshold allows (Ansible's
    /// `max_fail_percentage` compares the same way: 10% of 20 hosts stops at the third).
    pub fn exceeded(&self, failed: usize, hosts: usize) -> bool {
        match *self {
            MaxFailures::Count(n) => failed > n,
            MaxFailures::Percent(p) => failed as f64 * 100.0 > p * hosts as f64,
        }
    }
}

impl FromStr for MaxFailures {
    type Err = String;

    /// `2` (a count) or `10%` (a share of the hosts in the run, 0 to 100).
    fn from_str(s: &str) -> Result<MaxFailures, String> {
        let s = s.trim();
        match s.strip_suffix('%') {
            Some(p) => {
                let v: f64 = p
                    .trim()
                    .parse()
                    .map_err(|_| format!("`{s}` is not a percentage like 10%"))?;
                if !(0.0..=100.0).contains(&v) {
                    return Err(format!("`{s}` is not between 0% and 100%"));
                }
                Ok(MaxFailures::Percent(v))
            }
            None => s.parse().map(MaxFailures::Count).map_err(|_| {
                format!("`{s}` is neither a number of hosts (2) nor a percentage (10%)")
            }),
        }
    }
}

impl fmt::Display for MaxFailures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaxFailures::Count(n) => write!(f, "{n}"),
            MaxFailures::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// How a fleet is rolled out.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Hosts deployed at the same time.
    pub parallel: usize,
    /// Hosts deployed first, on their own; any failure among them stops the rollout.
    pub canary: usize,
    /// Failures tolerated after the canaries; `None` tries every host.
    pub max_failures: Option<MaxFailures>,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            parallel: 4,
            canary: 0,
            max_failures: None,
        }
    }
}

/// Counts of a rollout's outcomes, and whether and why it stopped early.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub hosts: usize,
    pub deployed: usize,
    pub unchanged: usize,
    pub rolled_back: usize,
    pub failed: usize,
    pub skipped: usize,
    /// True when hosts were left unstarted.
    pub stopped: bool,
    pub reason: Option<String>,
}

/// What a rollout did: every host's report in the run's order, and the summary.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutReport {
    /// Every host deployed or unchanged.
    pub ok: bool,
    pub summary: Summary,
    pub hosts: Vec<HostReport>,
}

fn is_failure(o: Outcome) -> bool {
    matches!(o, Outcome::Failed | Outcome::RolledBack)
}

/// Rolls `hosts` out as `plan` says. Each host gets the bundle `pick` chooses for it (or a
/// refusal, which counts as a failure).
pub fn deploy_fleet(
    hosts: &[HostConfig],
    pick: &dyn Fn(&HostConfig) -> Result<Arc<LocalBundle>, String>,
    opts: &Options,
    plan: &Plan,
    progress: &dyn Fn(&HostConfig) -> Arc<dyn HostProgress>,
) -> RolloutReport {
    let n = hosts.len();
    let canary = plan.canary.min(n);
    let run = Run {
        hosts,
        bundles: hosts.iter().map(pick).collect(),
        progress: hosts.iter().map(progress).collect(),
        opts,
        parallel: plan.parallel.max(1),
    };
    let mut out: Vec<Option<HostReport>> = vec![None; n];
    let reason = runtime().block_on(async {
        let mut failed = Vec::new();
        let canaries_failed = |failed: &[usize]| {
            let names: Vec<&str> = failed.iter().map(|&i| hosts[i].name.as_str()).collect();
            Some(format!(
                "the canary wave failed on {}; no further host was started",
                names.join(", ")
            ))
        };
        if let Some(why) = run
            .wave(0..canary, &mut out, &mut failed, &canaries_failed)
            .await
        {
            return Some(why);
        }
        let too_many = |failed: &[usize]| {
            let m = plan.max_failures?;
            m.exceeded(failed.len(), n).then(|| {
                let names: Vec<&str> = failed.iter().map(|&i| hosts[i].name.as_str()).collect();
                format!(
                    "{} of {n} hosts failed ({}), more than the {m} allowed",
                    failed.len(),
                    names.join(", ")
                )
            })
        };
        run.wave(canary..n, &mut out, &mut failed, &too_many).await
    });
    let reports: Vec<HostReport> = out
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|| {
                let why = reason.as_deref().unwrap_or("the rollout stopped");
                let r = HostReport::unstarted(
                    &hosts[i].name,
                    Outcome::Skipped,
                    format!("{}: not started: {why}", hosts[i].name),
                );
                run.progress[i].finish(&r);
                r
            })
        })
        .collect();
    let mut s = Summary {
        hosts: n,
        stopped: reason.is_some(),
        reason,
        ..Summary::default()
    };
    for r in &reports {
        match r.outcome {
            Outcome::Deployed => s.deployed += 1,
            Outcome::Unchanged => s.unchanged += 1,
            Outcome::RolledBack => s.rolled_back += 1,
            Outcome::Failed => s.failed += 1,
            Outcome::Skipped => s.skipped += 1,
        }
    }
    RolloutReport {
        ok: reports.iter().all(|r| r.ok),
        summary: s,
        hosts: reports,
    }
}

/// What every wave of one rollout shares.
struct Run<'a> {
    hosts: &'a [HostConfig],
    bundles: Vec<Result<Arc<LocalBundle>, String>>,
    progress: Vec<Arc<dyn HostProgress>>,
    opts: &'a Options,
    parallel: usize,
}

impl Run<'_> {
    /// Deploys the hosts of `range` in order, at most `parallel` at a time. After each
    /// failure, `stop` sees every failure so far; once it gives a reason, no further host of
    /// the wave starts and the running ones finish. Returns that reason.
    async fn wave(
        &self,
        range: Range<usize>,
        out: &mut [Option<HostReport>],
        failed: &mut Vec<usize>,
        stop: &dyn Fn(&[usize]) -> Option<String>,
    ) -> Option<String> {
        let mut set = tokio::task::JoinSet::new();
        let mut next = range.start;
        let mut reason = None;
        loop {
            while reason.is_none() && next < range.end && set.len() < self.parallel {
                let i = next;
                next += 1;
                let h = self.hosts[i].clone();
                let bundle = self.bundles[i].clone();
                let prog = self.progress[i].clone();
                let opts = self.opts.clone();
                set.spawn(async move {
                    let report = match bundle {
                        Ok(b) => deploy_host(&h, &b, &opts, prog.as_ref()).await,
                        Err(message) => {
                            let r = HostReport::unstarted(
                                &h.name,
                                Outcome::Failed,
                                format!("{}: {message}", h.name),
                            );
                            prog.finish(&r);
                            r
                        }
                    };
                    (i, report)
                });
            }
            let Some(joined) = set.join_next().await else {
                break;
            };
            let (i, report) = joined.expect("a deploy task panicked");
            if is_failure(report.outcome) {
                failed.push(i);
                if reason.is_none() {
                    reason = stop(failed);
                }
            }
            out[i] = Some(report);
        }
        reason
    }
}

/// A host of a previous run's report.
#[derive(Deserialize)]
struct PreviousHost {
    host: String,
    outcome: Outcome,
}

#[derive(Deserialize)]
struct Previous {
    hosts: Vec<PreviousHost>,
}

/// The hosts a previous run did not finish (failed, rolled back or skipped), read from the
/// JSON `edgepack --json deploy` printed, in its order.
pub fn unfinished_hosts(path: &Path) -> Result<Vec<String>, DeployError> {
    let bad = |message: String| DeployError::Local {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let prev: Previous = serde_json::from_str(&text).map_err(|e| {
        bad(format!(
            "not a deploy report: {e}\nhint: pass the JSON that `edgepack --json deploy ...` printed"
        ))
    })?;
    Ok(prev
        .hosts
        .into_iter()
        .filter(|h| h.outcome != Outcome::Deployed && h.outcome != Outcome::Unchanged)
        .map(|h| h.host)
        .collect())
}

/// The hosts of `hosts` that `names` lists, in `hosts`' order. A name that is not among them
/// is an error (`report` is the file the names came from).
pub fn only(
    hosts: Vec<HostConfig>,
    names: &[String],
    report: &Path,
) -> Result<Vec<HostConfig>, DeployError> {
    if let Some(missing) = names.iter().find(|n| !hosts.iter().any(|h| h.name == **n)) {
        return Err(DeployError::Local {
            path: report.to_path_buf(),
            message: format!(
                "host `{missing}` is not among the hosts of this run (check --inventory and --group)"
            ),
        });
    }
    Ok(hosts
        .into_iter()
        .filter(|h| names.contains(&h.name))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_failures_reads_counts_and_shares_and_compares_as_ansible_does() {
        assert_eq!("2".parse(), Ok(MaxFailures::Count(2)));
        assert_eq!("10%".parse(), Ok(MaxFailures::Percent(10.0)));
        assert_eq!(" 12.5 %".parse(), Ok(MaxFailures::Percent(12.5)));
        assert!("ten".parse::<MaxFailures>().unwrap_err().contains("`ten`"));
        assert!("150%".parse::<MaxFailures>().is_err());
        assert!("-1".parse::<MaxFailures>().is_err());
        let zero = MaxFailures::Count(0);
        assert!(!zero.exceeded(0, 8) && zero.exceeded(1, 8));
        let one = MaxFailures::Count(1);
        assert!(!one.exceeded(1, 8) && one.exceeded(2, 8));
        // 10% of 20 hosts is 2 failures: the third stops the rollout.
        let ten = MaxFailures::Percent(10.0);
        assert!(!ten.exceeded(2, 20) && ten.exceeded(3, 20));
        // 20% of 8 hosts is 1.6: one failure continues, two stop.
        let twenty = MaxFailures::Percent(20.0);
        assert!(!twenty.exceeded(1, 8) && twenty.exceeded(2, 8));
        assert_eq!(ten.to_string(), "10%");
    }

    #[test]
    fn a_previous_report_names_the_hosts_it_did_not_finish() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("last.json");
        std::fs::write(
            &p,
            r#"{"ok": false, "hosts": [
                {"host": "a", "outcome": "deployed", "seconds": 3.0},
                {"host": "b", "outcome": "rolled-back"},
                {"host": "c", "outcome": "unchanged"},
                {"host": "d", "outcome": "failed"},
                {"host": "e", "outcome": "skipped"}]}"#,
        )
        .unwrap();
        assert_eq!(unfinished_hosts(&p).unwrap(), ["b", "d", "e"]);
        let names = unfinished_hosts(&p).unwrap();
        let hosts: Vec<HostConfig> = ["e", "a", "d", "b", "c"].map(HostConfig::new).to_vec();
        let kept: Vec<String> = only(hosts.clone(), &names, &p)
            .unwrap()
            .into_iter()
            .map(|h| h.name)
            .collect();
        assert_eq!(kept, ["e", "d", "b"], "the run's order, not the report's");
        let err = only(hosts[..3].to_vec(), &names, &p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("last.json") && err.contains("`b`"), "{err}");

        std::fs::write(&p, "table printed without --json\n").unwrap();
        let err = unfinished_hosts(&p).unwrap_err().to_string();
        assert!(err.contains("last.json: not a deploy report"), "{err}");
        std::fs::write(&p, r#"{"hosts": [{"host": "a", "outcome": "exploded"}]}"#).unwrap();
        assert!(unfinished_hosts(&p).is_err());
    }
}
