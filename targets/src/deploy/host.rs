//! One board as a deploy sees it: its settings (from the command line or the inventory),
//! the defaults they fall back to, and what can go wrong on it.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::BundleError;

/// Where a profile-less host installs (the profile's path: DESIGN "the board is the user's").
pub const DEFAULT_INSTALL_DIR: &str = "/opt/edgepack";
/// The runtime's port on the board's loopback (edgepack-runtime's own default).
pub const DEFAULT_RUNTIME_PORT: u16 = 8080;
/// Releases kept on the board besides `current` and `previous`.
pub const DEFAULT_KEEP: usize = 3;
pub const DEFAULT_SERVICE: &str = "edgepack";
/// How long a restarted runtime may take to load its model and answer the smoke prompt.
/// Generous because an emulated or slow board loads a model in tens of seconds.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(300);
/// What can go wrong, per host. Each names the host and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{host}: the host key of {address} is not in known_hosts; refusing to trust it unseen\nhint: check the key's fingerprint with the board's owner, then pass --accept-new-host-key once")]
    HostKeyUnknown { host: String, address: String },
    #[error("{host}: the host key of {address} HAS CHANGED since it was recorded in known_hosts; refusing to connect (this may be an attack, or the board was reinstalled)\nhint: if the board was reinstalled, remove its old line with `ssh-keygen -R {address}`")]
    HostKeyChanged { host: String, address: String },
    #[error("{host}: SSH authentication failed: {detail}\nhint: check the user, that your key is in the board's authorized_keys, and that ssh-agent holds it (`ssh-add -l`)")]
    AuthFailed { host: String, detail: String },
    #[error("{host}: cannot connect: {detail}")]
    Connect { host: String, detail: String },
    #[error("{host}: {step}: {detail}")]
    Ssh {
        host: String,
        step: String,
        detail: String,
    },
    #[error("{host}: {step} failed on the board (exit {code:?}): {stderr}")]
    Remote {
        host: String,
        step: String,
        code: Option<i32>,
        stderr: String,
    },
    #[error("{host}: {message}")]
    Refused { host: String, message: String },
    #[error("{host}: the upload is corrupted, refused before switching (the board stays on {kept}):\n{detail}\nhint: the damaged files were removed; deploy again to send them anew")]
    Corrupted {
        host: String,
        kept: String,
        detail: String,
    },
    #[error("{host}: health check of {release} failed: {reason}; {after}")]
    Unhealthy {
        host: String,
        release: String,
        reason: String,
        after: String,
    },
    #[error("{}: {message}", path.display())]
    Inventory { path: PathBuf, message: String },
    /// A line of an inventory file (an Ansible inventory being imported); the message names
    /// the field.
    #[error("{}:{line}: {message}", path.display())]
    InventoryLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: {message}", path.display())]
    Local { path: PathBuf, message: String },
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

/// Everything about one board that a deploy needs.
#[derive(Debug, Clone, Serialize)]
pub struct HostConfig {
    /// The label in reports.
    pub name: String,
    /// What ssh connects to: `user@host`, `host`, or an alias of ~/.ssh/config.
    pub address: String,
    pub user: Option<String>,
    pub port: Option<u16>,
    /// The target profile the board is; a bundle for another target is refused.
    pub target: Option<String>,
    pub install_dir: String,
    pub runtime_port: u16,
    /// A command prefix for the runtime, e.g. `qemu-aarch64 -L /usr/aarch64-linux-gnu`.
    pub runner: Option<String>,
    pub keep: usize,
    /// The systemd unit's name where systemd runs.
    pub service: String,
    pub ssh_config: Option<PathBuf>,
    pub runtime_args: Vec<String>,
    /// A file on this machine holding the bearer token the runtime serves with
    /// (`--api-key-file` in `runtime_args`): the health check's prompt sends it.
    pub api_key_file: Option<PathBuf>,
}

impl HostConfig {
    /// A host given on the command line: `user@host` and defaults.
    pub fn new(address: &str) -> HostConfig {
        HostConfig::from_settings(
            address.to_string(),
            address.to_string(),
            Settings::default(),
        )
    }

    pub(crate) fn from_settings(name: String, address: String, s: Settings) -> HostConfig {
        HostConfig {
            name,
            address,
            user: s.user,
            port: s.port,
            target: s.target,
            install_dir: s
                .install_dir
                .unwrap_or_else(|| DEFAULT_INSTALL_DIR.to_string()),
            runtime_port: s.runtime_port.unwrap_or(DEFAULT_RUNTIME_PORT),
            runner: s.runner,
            keep: s.keep.unwrap_or(DEFAULT_KEEP),
            service: s.service.unwrap_or_else(|| DEFAULT_SERVICE.to_string()),
            ssh_config: s.ssh_config,
            runtime_args: s.runtime_args.unwrap_or_default(),
            api_key_file: s.api_key_file,
        }
    }
}

/// Settings a host may take from `[defaults]`, a group or its own table.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub install_dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// An ssh_config file passed to ssh with `-F` (replaces ~/.ssh/config for this host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh_config: Option<PathBuf>,
    /// Extra arguments for `edgepack-runtime serve` (for example `--threads 2`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_args: Option<Vec<String>>,
    /// A file on the workstation with the runtime's bearer token, for the health check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
}

impl Settings {
    pub(crate) fn overlay(&mut self, o: &Settings) {
        macro_rules! take {
            ($($f:ident),*) => { $( if o.$f.is_some() { self.$f = o.$f.clone(); } )* };
        }
        take!(
            user,
            port,
            target,
            install_dir,
            runtime_port,
            runner,
            keep,
            service,
            ssh_config,
            runtime_args,
            api_key_file
        );
    }
}
