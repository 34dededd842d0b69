//! The fleet file: hosts, groups and the settings each host deploys with.
//!
//! ```toml
//! [defaults]                 # every host starts from these
//! user = "root"
//! install_dir = "/opt/edgepack"
//! runtime_port = 8080
//! keep = 3
//!
//! [groups.line-a]            # a group overrides the defaults for its members
//! target = "imx95"
//!
//! [[hosts]]
//! name = "cam-01"            # the label in reports (default: address)
//! address = "10.0.0.12"      # or an alias from ~/.ssh/config
//! groups = ["line-a"]
//! runner = "qemu-aarch64 -L /usr/aarch64-linux-gnu"   # optional command prefix
//! ```
//!
//! A host's settings are the defaults, then each of its groups in order, then its own keys.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::host::{DeployError, HostConfig, Settings};

/// A `[[hosts]]` entry. Its settings are spelled out (not flattened) so that serde can refuse
/// a misspelled key, which `flatten` would silently drop.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HostEntry {
    pub(crate) name: Option<String>,
    pub(crate) address: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) groups: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) install_dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) runtime_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) runner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) keep: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ssh_config: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) runtime_args: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) api_key_file: Option<PathBuf>,
}

impl HostEntry {
    /// An entry with `s` as its own settings.
    pub(crate) fn with_settings(
        name: Option<String>,
        address: String,
        groups: Vec<String>,
        s: Settings,
    ) -> HostEntry {
        HostEntry {
            name,
            address,
            groups,
            user: s.user,
            port: s.port,
            target: s.target,
            install_dir: s.install_dir,
            runtime_port: s.runtime_port,
            runner: s.runner,
            keep: s.keep,
            service: s.service,
            ssh_config: s.ssh_config,
            runtime_args: s.runtime_args,
            api_key_file: s.api_key_file,
        }
    }

    fn settings(&self) -> Settings {
        Settings {
            user: self.user.clone(),
            port: self.port,
            target: self.target.clone(),
            install_dir: self.install_dir.clone(),
            runtime_port: self.runtime_port,
            runner: self.runner.clone(),
            keep: self.keep,
            service: self.service.clone(),
            ssh_config: self.ssh_config.clone(),
            runtime_args: self.runtime_args.clone(),
            api_key_file: self.api_key_file.clone(),
        }
    }
}

/// The fleet file; the Ansible import builds one and serializes it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct File {
    #[serde(default)]
    pub(crate) defaults: Settings,
    #[serde(default)]
    pub(crate) groups: BTreeMap<String, Settings>,
    #[serde(default)]
    pub(crate) hosts: Vec<HostEntry>,
}

/// Reads an inventory and resolves each host's settings. With `group`, only its members.
pub fn load(path: &Path, group: Option<&str>) -> Result<Vec<HostConfig>, DeployError> {
    let text = std::fs::read_to_string(path).map_err(|e| DeployError::Inventory {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    parse(&text, path, group)
}

pub fn parse(text: &str, path: &Path, group: Option<&str>) -> Result<Vec<HostConfig>, DeployError> {
    let bad = |message: String| DeployError::Inventory {
        path: path.to_path_buf(),
        message,
    };
    let f: File = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
    if let Some(g) = group {
        if !f.groups.contains_key(g) && !f.hosts.iter().any(|h| h.groups.iter().any(|x| x == g)) {
            return Err(bad(format!("no group `{g}`")));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for (i, h) in f.hosts.iter().enumerate() {
        let name = h.name.clone().unwrap_or_else(|| h.address.clone());
        if !seen.insert(name.clone()) {
            return Err(bad(format!("hosts[{i}]: name `{name}` is used twice")));
        }
        if group.is_some_and(|g| !h.groups.iter().any(|x| x == g)) {
            continue;
        }
        let mut s = f.defaults.clone();
        for g in &h.groups {
            let gs = f.groups.get(g).ok_or_else(|| {
                bad(format!(
                    "hosts[{i}] ({name}): group `{g}` has no [groups.{g}] table"
                ))
            })?;
            s.overlay(gs);
        }
        s.overlay(&h.settings());
        // A relative ssh_config is relative to the inventory, not to where edgepack runs.
        if let Some(c) = &s.ssh_config {
            if c.is_relative() {
                s.ssh_config = Some(path.parent().unwrap_or(Path::new(".")).join(c));
            }
        }
        out.push(HostConfig::from_settings(name, h.address.clone(), s));
    }
    if out.is_empty() {
        return Err(bad("no hosts to deploy to".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_override_defaults_and_hosts_override_groups() {
        let t = r#"
[defaults]
user = "root"
install_dir = "/opt/edgepack"
[groups.a]
install_dir = "/data/ep"
target = "imx95"
[[hosts]]
address = "h1"
groups = ["a"]
[[hosts]]
name = "two"
address = "h2"
groups = ["a"]
target = "rpi5"
port = 2222
[[hosts]]
address = "h3"
"#;
        let hs = parse(t, Path::new("f.toml"), None).unwrap();
        assert_eq!(hs[0].install_dir, "/data/ep");
        assert_eq!(hs[0].target.as_deref(), Some("imx95"));
        assert_eq!(hs[1].name, "two");
        assert_eq!(hs[1].target.as_deref(), Some("rpi5"));
        assert_eq!(hs[1].port, Some(2222));
        assert_eq!(hs[2].install_dir, "/opt/edgepack");
        let only = parse(t, Path::new("f.toml"), Some("a")).unwrap();
        assert_eq!(only.len(), 2);
        let e = parse(
            "[[hosts]]\naddress = 'x'\ncolour = 1\n",
            Path::new("f.toml"),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("f.toml"), "{e}");
    }
}
