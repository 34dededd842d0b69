//! Ansible inventories, INI (`hosts.ini`) and YAML (`hosts.yml`), read into edgepack's fleet
//! file (see [`super::inventory`]).
//!
//! Groups, `children` and `vars` keep Ansible's meaning: a host is in its groups and in every
//! group above them; `all`'s vars become `[defaults]`, each group's its `[groups.NAME]` table,
//! a host's its own keys, and each host lists its groups parents first (by depth, then name),
//! which is the order in which Ansible lets a child group's vars win over its parent's. Host
//! patterns with ranges (`cam[01:08].example`, `node[a:c]`, `n[0:10:2]`) expand as Ansible
//! expands them, and `name:port` sets the port.
//!
//! Variables edgepack uses: `ansible_host` (the address), `ansible_user`, `ansible_port`
//! (and their older `ansible_ssh_*` spellings), `edgepack_target` or `target`, and
//! `edgepack_install_dir`, `edgepack_runtime_port`, `edgepack_runner`, `edgepack_keep`,
//! `edgepack_service`, `edgepack_ssh_config`. Every other variable is ignored and named in
//! [`Imported::ignored`]; an unknown `edgepack_*` variable is an error (a misspelled setting).
//! Errors name the file, the line and the field.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::host::{DeployError, Settings};
use super::inventory::{self, File, HostEntry};

/// An Ansible inventory turned into a fleet file.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The fleet file's text (TOML).
    pub toml: String,
    pub hosts: usize,
    /// Groups written as `[groups.NAME]`.
    pub groups: usize,
    /// Variables edgepack has no setting for, sorted.
    pub ignored: Vec<String>,
    /// Each host as deploy reads the fleet file: every setting resolved.
    pub resolved: Vec<super::HostConfig>,
}

/// Which syntax an inventory file is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Ini,
    Yaml,
}

impl Format {
    /// `.yml`/`.yaml` is YAML, `.ini` INI; otherwise a first line that opens a YAML document
    /// or a mapping (`---`, `all:`) means YAML, and anything else INI.
    pub fn detect(path: &Path, text: &str) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("yml" | "yaml") => return Format::Yaml,
            Some("ini") => return Format::Ini,
            _ => {}
        }
        let first = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'));
        match first {
            Some(l) if l.starts_with("---") || (l.ends_with(':') && !l.starts_with('[')) => {
                Format::Yaml
            }
            _ => Format::Ini,
        }
    }
}

/// Reads an Ansible inventory file (INI or YAML, see [`Format::detect`]) into a fleet file.
pub fn import(path: &Path) -> Result<Imported, DeployError> {
    let text = std::fs::read_to_string(path).map_err(|e| DeployError::Inventory {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    import_text(&text, path, Format::detect(path, &text))
}

/// Converts an inventory's text; `path` names it in errors.
pub fn import_text(text: &str, path: &Path, format: Format) -> Result<Imported, DeployError> {
    let inv = match format {
        Format::Ini => parse_ini(text, path)?,
        Format::Yaml => parse_yaml(text, path)?,
    };
    inv.convert()
}

/// Writes a fleet file atomically (a temporary file in the same folder, fsynced, then
/// linked or renamed into place). An existing file is replaced only with `force`.
pub fn write_fleet(out: &Path, toml: &str, force: bool) -> Result<(), DeployError> {
    use std::io::Write;
    let err = |path: &Path, e: std::io::Error| DeployError::Local {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let exists = || DeployError::Local {
        path: out.to_path_buf(),
        message: "exists; refusing to overwrite it\nhint: pass --force to replace it".into(),
    };
    if !force && out.exists() {
        return Err(exists());
    }
    let tmp = crate::io::tmp_sibling(out);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(toml.as_bytes())?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(&tmp, e));
    }
    let placed = if force {
        std::fs::rename(&tmp, out)
    } else {
        // A link fails if the file appeared meanwhile: it is never replaced unasked.
        let r = std::fs::hard_link(&tmp, out);
        let _ = std::fs::remove_file(&tmp);
        r
    };
    match placed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(exists()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(err(out, e))
        }
    }
}

/// A variable's value and the line that set it.
#[derive(Debug, Clone)]
struct Var {
    /// None for a YAML mapping or list (no setting takes one).
    value: Option<String>,
    line: usize,
}

#[derive(Debug, Default)]
struct Group {
    vars: BTreeMap<String, Var>,
    /// Child groups and the line naming each.
    children: Vec<(String, usize)>,
    hosts: Vec<String>,
}

#[derive(Debug)]
struct Host {
    name: String,
    vars: BTreeMap<String, Var>,
}

/// An inventory as Ansible sees it, before it becomes a fleet file.
#[derive(Debug)]
struct Inventory {
    path: PathBuf,
    groups: BTreeMap<String, Group>,
    /// In order of first appearance.
    hosts: Vec<Host>,
    /// INI: `[name:children]` and `[name:vars]` naming groups not (yet) declared, with the
    /// line and the section kind.
    pending: BTreeMap<String, (usize, &'static str, String)>,
}

const ALL: &str = "all";
const UNGROUPED: &str = "ungrouped";

impl Inventory {
    fn new(path: &Path) -> Inventory {
        let mut groups = BTreeMap::new();
        groups.insert(ALL.to_string(), Group::default());
        groups.insert(UNGROUPED.to_string(), Group::default());
        Inventory {
            path: path.to_path_buf(),
            groups,
            hosts: Vec::new(),
            pending: BTreeMap::new(),
        }
    }

    fn err(&self, line: usize, message: String) -> DeployError {
        DeployError::InventoryLine {
            path: self.path.clone(),
            line,
            message,
        }
    }

    fn declare(&mut self, group: &str) {
        self.pending.remove(group);
        self.groups.entry(group.to_string()).or_default();
    }

    /// Adds `name` to `group` (once) and its vars to the host's.
    fn add_host(&mut self, group: &str, name: &str, vars: &BTreeMap<String, Var>) {
        let g = self
            .groups
            .get_mut(group)
            .expect("declared before its hosts");
        if !g.hosts.iter().any(|h| h == name) {
            g.hosts.push(name.to_string());
        }
        let i = match self.hosts.iter().position(|h| h.name == name) {
            Some(i) => i,
            None => {
                self.hosts.push(Host {
                    name: name.to_string(),
                    vars: BTreeMap::new(),
                });
                self.hosts.len() - 1
            }
        };
        for (k, v) in vars {
            self.hosts[i].vars.insert(k.clone(), v.clone());
        }
    }

    /// Checks the group graph, then writes the fleet file.
    fn convert(mut self) -> Result<Imported, DeployError> {
        if let Some((group, (line, kind, parent))) = self.pending.iter().next() {
            return Err(self.err(
                *line,
                match *kind {
                    "children" => format!(
                        "[{parent}:children] names group `{group}`, which is not defined (no [{group}] or [{group}:children] section)"
                    ),
                    _ => format!("[{group}:vars] is for a group that is not defined (no [{group}] or [{group}:children] section)"),
                },
            ));
        }
        // `all` holds every group no other group holds, as Ansible makes it.
        let mut is_child = BTreeSet::new();
        for g in self.groups.values() {
            for (c, _) in &g.children {
                is_child.insert(c.clone());
            }
        }
        if is_child.contains(ALL) {
            let (parent, line) = self
                .groups
                .iter()
                .find_map(|(n, g)| {
                    g.children
                        .iter()
                        .find(|(c, _)| c == ALL)
                        .map(|(_, l)| (n.clone(), *l))
                })
                .expect("found above");
            return Err(self.err(
                line,
                format!("group `{parent}` names `all` as a child; `all` holds every group"),
            ));
        }
        let tops: Vec<String> = self
            .groups
            .keys()
            .filter(|n| *n != ALL && !is_child.contains(*n))
            .cloned()
            .collect();
        let all = self.groups.get_mut(ALL).expect("all exists");
        for t in tops {
            if !all.children.iter().any(|(c, _)| *c == t) {
                all.children.push((t, 0));
            }
        }
        self.check_cycles()?;
        let depth = self.depths();
        // Each group's parents.
        let mut parents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (n, g) in &self.groups {
            for (c, _) in &g.children {
                parents.entry(c.as_str()).or_default().push(n.as_str());
            }
        }
        let mut ignored = BTreeSet::new();
        let defaults = self.settings(&self.groups[ALL].vars, &mut ignored)?;
        let keep = |name: &str, g: &Group| name != ALL && !(name == UNGROUPED && g.vars.is_empty());
        let mut groups = BTreeMap::new();
        for (n, g) in &self.groups {
            if keep(n, g) {
                groups.insert(n.clone(), self.settings(&g.vars, &mut ignored)?);
            }
        }
        let mut hosts = Vec::new();
        for h in &self.hosts {
            // Its groups and every group above them.
            let mut member = BTreeSet::new();
            let mut todo: Vec<&str> = self
                .groups
                .iter()
                .filter(|(_, g)| g.hosts.contains(&h.name))
                .map(|(n, _)| n.as_str())
                .collect();
            while let Some(g) = todo.pop() {
                if member.insert(g) {
                    todo.extend(parents.get(g).into_iter().flatten().copied());
                }
            }
            let mut ordered: Vec<&str> = member
                .into_iter()
                .filter(|n| keep(n, &self.groups[*n]))
                .collect();
            ordered.sort_by_key(|n| (depth[*n], *n));
            // Every variable the host sees, the nearest layer winning: `all`, its groups
            // parents first, then its own.
            let mut merged: BTreeMap<&str, &Var> = BTreeMap::new();
            let layers = std::iter::once(&self.groups[ALL].vars)
                .chain(ordered.iter().map(|n| &self.groups[*n].vars))
                .chain(std::iter::once(&h.vars));
            for vars in layers {
                for (k, v) in vars {
                    merged.insert(k, v);
                }
            }
            // Templated settings become the host's own, rendered with its variables.
            let mut own_vars = h.vars.clone();
            for (k, v) in &merged {
                let address = matches!(*k, "ansible_host" | "ansible_ssh_host");
                if is_setting(k) && !address && v.value.as_deref().is_some_and(templated) {
                    let value = self.render(k, v, &merged, &h.name, 0)?;
                    own_vars.insert(
                        k.to_string(),
                        Var {
                            value: Some(value),
                            line: v.line,
                        },
                    );
                }
            }
            // The address: the host's own ansible_host, else the nearest group's, else the
            // inventory name; a bracketed IPv6 address loses its brackets, which ssh does not
            // take.
            let mut address = h.name.clone();
            let layers = std::iter::once(&self.groups[ALL].vars)
                .chain(ordered.iter().map(|n| &self.groups[*n].vars))
                .chain(std::iter::once(&h.vars));
            for vars in layers {
                if let Some(v) = vars
                    .get("ansible_host")
                    .or_else(|| vars.get("ansible_ssh_host"))
                {
                    address = match v.value.as_deref() {
                        Some(t) if templated(t) => {
                            self.render("ansible_host", v, &merged, &h.name, 0)?
                        }
                        _ => self.scalar("ansible_host", v)?.to_string(),
                    };
                }
            }
            if let Some((ip, None)) = bracketed_ipv6(&address) {
                address = ip.to_string();
            }
            let own = self.settings(&own_vars, &mut ignored)?;
            hosts.push(HostEntry::with_settings(
                Some(h.name.clone()),
                address,
                ordered.iter().map(|s| s.to_string()).collect(),
                own,
            ));
        }
        if hosts.is_empty() {
            return Err(DeployError::Inventory {
                path: self.path.clone(),
                message: "the inventory has no hosts".into(),
            });
        }
        let file = File {
            defaults,
            groups,
            hosts,
        };
        let body = toml::to_string(&file).map_err(|e| DeployError::Inventory {
            path: self.path.clone(),
            message: format!("writing the fleet file: {e}"),
        })?;
        let text = format!(
            "# Imported from the Ansible inventory {} by `edgepack fleet import`.\n\n{body}",
            self.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        // What deploy will read: the same loader, so the output is known to load.
        let resolved = inventory::parse(&text, &self.path, None)?;
        Ok(Imported {
            toml: text,
            hosts: file.hosts.len(),
            groups: file.groups.len(),
            ignored: ignored.into_iter().collect(),
            resolved,
        })
    }

    /// A cycle among children is an error at the line that closes it.
    fn check_cycles(&self) -> Result<(), DeployError> {
        // 0 unseen, 1 on the current path, 2 done.
        let mut state: BTreeMap<&str, u8> = BTreeMap::new();
        let mut path: Vec<&str> = Vec::new();
        fn visit<'a>(
            inv: &'a Inventory,
            g: &'a str,
            state: &mut BTreeMap<&'a str, u8>,
            path: &mut Vec<&'a str>,
        ) -> Result<(), DeployError> {
            state.insert(g, 1);
            path.push(g);
            for (c, line) in &inv.groups[g].children {
                match state.get(c.as_str()).copied().unwrap_or(0) {
                    1 => {
                        let from = path.iter().position(|p| *p == c).expect("on the path");
                        let mut cycle: Vec<&str> = path[from..].to_vec();
                        cycle.push(c);
                        return Err(inv.err(
                            *line,
                            format!(
                                "children: group `{c}` is a child of itself ({})",
                                cycle.join(" -> ")
                            ),
                        ));
                    }
                    0 => visit(inv, c, state, path)?,
                    _ => {}
                }
            }
            path.pop();
            state.insert(g, 2);
            Ok(())
        }
        for g in self.groups.keys() {
            if state.get(g.as_str()).copied().unwrap_or(0) == 0 {
                visit(self, g, &mut state, &mut path)?;
            }
        }
        Ok(())
    }

    /// Each group's depth below `all` along its longest path, as Ansible counts it.
    fn depths(&self) -> BTreeMap<&str, usize> {
        let mut depth: BTreeMap<&str, usize> =
            self.groups.keys().map(|n| (n.as_str(), 0)).collect();
        // The graph has no cycle, so the longest paths settle within as many rounds as groups.
        for _ in 0..self.groups.len() {
            let mut changed = false;
            for (n, g) in &self.groups {
                let d = depth[n.as_str()];
                for (c, _) in &g.children {
                    if depth[c.as_str()] < d + 1 {
                        depth.insert(c.as_str(), d + 1);
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        depth
    }

    fn scalar<'a>(&self, field: &str, v: &'a Var) -> Result<&'a str, DeployError> {
        v.value.as_deref().ok_or_else(|| {
            self.err(
                v.line,
                format!("{field}: expected a single value, not a mapping or list"),
            )
        })
    }

    fn number<T: std::str::FromStr>(
        &self,
        field: &str,
        v: &Var,
        what: &str,
    ) -> Result<T, DeployError> {
        let s = self.scalar(field, v)?;
        s.trim()
            .parse()
            .map_err(|_| self.err(v.line, format!("{field}: `{s}` is not {what}")))
    }

    fn port(&self, field: &str, v: &Var) -> Result<u16, DeployError> {
        let p: u16 = self.number(field, v, "a port number (1-65535)")?;
        if p == 0 {
            return Err(self.err(v.line, format!("{field}: 0 is not a port number (1-65535)")));
        }
        Ok(p)
    }

    /// The settings a set of variables gives; variables without a setting go to `ignored`.
    fn settings(
        &self,
        vars: &BTreeMap<String, Var>,
        ignored: &mut BTreeSet<String>,
    ) -> Result<Settings, DeployError> {
        let mut s = Settings::default();
        let text = |k: &str, v: &Var| self.scalar(k, v).map(str::to_string);
        // The newer spelling wins over the older one when both are set.
        let mut ordered: Vec<(&String, &Var)> = vars.iter().collect();
        ordered.sort_by_key(|(k, _)| !k.starts_with("ansible_ssh_"));
        for (k, v) in ordered {
            // A template is rendered for each host that uses it (see `render`), as Ansible
            // renders it in each host's context.
            if is_setting(k) && v.value.as_deref().is_some_and(templated) {
                continue;
            }
            match k.as_str() {
                "ansible_host" | "ansible_ssh_host" => {}
                "ansible_user" | "ansible_ssh_user" => s.user = Some(text(k, v)?),
                "ansible_port" | "ansible_ssh_port" => s.port = Some(self.port(k, v)?),
                "edgepack_target" | "target" => s.target = Some(text(k, v)?),
                "edgepack_install_dir" => s.install_dir = Some(text(k, v)?),
                "edgepack_runtime_port" => s.runtime_port = Some(self.port(k, v)?),
                "edgepack_runner" => s.runner = Some(text(k, v)?),
                "edgepack_keep" => s.keep = Some(self.number(k, v, "a number of releases")?),
                "edgepack_service" => s.service = Some(text(k, v)?),
                "edgepack_ssh_config" => s.ssh_config = Some(PathBuf::from(text(k, v)?)),
                other if other.starts_with("edgepack_") => {
                    return Err(self.err(
                        v.line,
                        format!("{other}: no such setting (edgepack_target, edgepack_install_dir, edgepack_runtime_port, edgepack_runner, edgepack_keep, edgepack_service, edgepack_ssh_config)"),
                    ))
                }
                other => {
                    ignored.insert(other.to_string());
                }
            }
        }
        Ok(s)
    }
}

/// Variables that become fleet settings (and the address); only these are rendered.
fn is_setting(k: &str) -> bool {
    matches!(
        k,
        "ansible_host"
            | "ansible_ssh_host"
            | "ansible_user"
            | "ansible_ssh_user"
            | "ansible_port"
            | "ansible_ssh_port"
            | "target"
    ) || k.starts_with("edgepack_")
}

/// Whether a value holds Jinja, which Ansible renders when it uses the variable.
fn templated(s: &str) -> bool {
    s.contains("{{") || s.contains("{%") || s.contains("{#")
}

/// How deep one variable's template may refer to others.
const MAX_TEMPLATE_DEPTH: usize = 16;

impl Inventory {
    /// Renders `{{ name }}` references in `v` (variable `field`) with the variables host
    /// `host` sees, `inventory_hostname` and `inventory_hostname_short` as Ansible sets them.
    /// Filters, tests, expressions and `{% %}` blocks are refused by line: edgepack does not
    /// evaluate Jinja, and a value taken literally would reach ssh as a host name.
    fn render(
        &self,
        field: &str,
        v: &Var,
        vars: &BTreeMap<&str, &Var>,
        host: &str,
        depth: usize,
    ) -> Result<String, DeployError> {
        let text = self.scalar(field, v)?;
        if depth > MAX_TEMPLATE_DEPTH {
            return Err(self.err(
                v.line,
                format!("{field}: its template refers to itself (through {MAX_TEMPLATE_DEPTH} variables or more)"),
            ));
        }
        if text.contains("{%") || text.contains("{#") {
            return Err(self.err(
                v.line,
                format!("{field}: `{text}`: Jinja blocks and comments are not evaluated; only {{{{ variable }}}} references are\nhint: write the value itself"),
            ));
        }
        let mut out = String::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            out.push_str(&rest[..open]);
            let after = &rest[open + 2..];
            let close = after.find("}}").ok_or_else(|| {
                self.err(
                    v.line,
                    format!("{field}: `{text}`: a {{{{ without its }}}}"),
                )
            })?;
            let name = after[..close].trim();
            let plain = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !plain {
                return Err(self.err(
                    v.line,
                    format!("{field}: `{{{{{}}}}}` is a Jinja expression; only {{{{ variable }}}} references are evaluated\nhint: write the value itself", &after[..close]),
                ));
            }
            let value = match name {
                "inventory_hostname" => host.to_string(),
                "inventory_hostname_short" => host.split('.').next().unwrap_or(host).to_string(),
                _ => {
                    let r = vars.get(name).ok_or_else(|| {
                        self.err(
                            v.line,
                            format!("{field}: `{{{{ {name} }}}}`: host `{host}` has no variable `{name}`"),
                        )
                    })?;
                    if r.value.as_deref().is_some_and(templated) {
                        self.render(name, r, vars, host, depth + 1)?
                    } else {
                        self.scalar(name, r)?.to_string()
                    }
                }
            };
            out.push_str(&value);
            rest = &after[close + 2..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// Expands a host pattern's ranges as Ansible does: `[01:08]` keeps the zero padding,
/// `[a:f]` runs over letters, `[0:10:2]` steps; several ranges multiply.
fn expand(pattern: &str) -> Result<Vec<String>, String> {
    let Some(open) = pattern.find('[') else {
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..]
        .find(']')
        .map(|c| open + c)
        .ok_or_else(|| format!("`{pattern}`: a `[` without its `]`"))?;
    let (head, range, tail) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    let bounds: Vec<&str> = range.split(':').collect();
    if bounds.len() != 2 && bounds.len() != 3 {
        return Err(format!(
            "`{pattern}`: a host range must be [begin:end] or [begin:end:step]"
        ));
    }
    let beg = if bounds[0].is_empty() { "0" } else { bounds[0] };
    let end = bounds[1];
    if end.is_empty() {
        return Err(format!("`{pattern}`: the host range has no end"));
    }
    let step: usize = match bounds.get(2) {
        Some(s) => s
            .parse()
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| format!("`{pattern}`: the step `{s}` is not a positive number"))?,
        None => 1,
    };
    let letters = |s: &str| s.len() == 1 && s.chars().all(|c| c.is_ascii_alphabetic());
    let items: Vec<String> = if letters(beg) && letters(end) {
        const ABC: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let (b, e) = (
            ABC.find(beg).expect("a letter"),
            ABC.find(end).expect("a letter"),
        );
        if b > e {
            return Err(format!("`{pattern}`: the range's begin is after its end"));
        }
        ABC[b..=e].chars().step_by(step).map(String::from).collect()
    } else {
        let num = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| format!("`{pattern}`: `{s}` is neither a number nor a letter"))
        };
        let (b, e) = (num(beg)?, num(end)?);
        if b > e {
            return Err(format!("`{pattern}`: the range's begin is after its end"));
        }
        let width = if beg.len() > 1 && beg.starts_with('0') {
            if beg.len() != end.len() {
                return Err(format!(
                    "`{pattern}`: a zero-padded range needs begin and end of the same length"
                ));
            }
            beg.len()
        } else {
            0
        };
        (b..=e)
            .step_by(step)
            .map(|i| format!("{i:0width$}"))
            .collect()
    };
    let mut out = Vec::new();
    for i in items {
        out.extend(expand(&format!("{head}{i}{tail}"))?);
    }
    Ok(out)
}

/// A host pattern's name pattern and port (`name:port`; an address with several colons
/// outside brackets is IPv6 and has none).
fn split_port(pattern: &str) -> (&str, Option<&str>) {
    let mut depth = 0;
    let mut colons = Vec::new();
    for (i, c) in pattern.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ':' if depth == 0 => colons.push(i),
            _ => {}
        }
    }
    match colons.as_slice() {
        [i] => (&pattern[..*i], Some(&pattern[*i + 1..])),
        _ => (pattern, None),
    }
}

/// A bracketed IPv6 address, `[2001:db8::1]` or `[2001:db8::1]:2222`, as Ansible writes one
/// with a port: the address and the port.
fn bracketed_ipv6(pattern: &str) -> Option<(&str, Option<&str>)> {
    let rest = pattern.strip_prefix('[')?;
    let (addr, tail) = rest.split_once(']')?;
    addr.parse::<std::net::Ipv6Addr>().ok()?;
    match tail {
        "" => Some((addr, None)),
        _ => Some((addr, Some(tail.strip_prefix(':')?))),
    }
}

/// The hosts a pattern names, with the port it sets as a variable.
fn hosts_of(
    inv: &Inventory,
    pattern: &str,
    line: usize,
) -> Result<(Vec<String>, Option<Var>), DeployError> {
    let (names, port) = match bracketed_ipv6(pattern) {
        Some((addr, port)) => (vec![addr.to_string()], port),
        None => {
            let (names, port) = split_port(pattern);
            let names = expand(names).map_err(|m| inv.err(line, format!("host: {m}")))?;
            (names, port)
        }
    };
    let port = match port {
        Some(p) => {
            let v = Var {
                value: Some(p.to_string()),
                line,
            };
            inv.port("ansible_port", &v)?;
            Some(v)
        }
        None => None,
    };
    Ok((names, port))
}

/// Splits a host line as Python's shlex does for Ansible: whitespace separates, quotes group
/// and are removed, and a `#` that starts a word starts a comment.
fn words(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '"' || c == '\'' => {
                quote = Some(c);
                in_word = true;
            }
            None if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            None if c == '#' && !in_word => break,
            None => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if let Some(q) = quote {
        return Err(format!("a {q} quote is not closed"));
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

fn unquote(s: &str) -> &str {
    let s = s.trim();
    for q in ['"', '\''] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            return &s[1..s.len() - 1];
        }
    }
    s
}

fn valid_group(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// Ansible's INI inventory.
fn parse_ini(text: &str, path: &Path) -> Result<Inventory, DeployError> {
    let mut inv = Inventory::new(path);
    let mut group = UNGROUPED.to_string();
    let mut kind = "hosts";
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let head = line.split(['#', ';']).next().unwrap_or(line).trim();
        // A bracketed line is a section header; one that goes on past its `]` is a host, as
        // an IPv6 address with a port (`[2001:db8::1]:2222`) is.
        if line.starts_with('[') && head.ends_with(']') {
            let inner = head
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .ok_or_else(|| inv.err(n, format!("section: `{line}` is not a section header like [name] or [name:children]")))?;
            let (name, k) = match inner.split_once(':') {
                Some((g, k)) => (g.trim(), k.trim()),
                None => (inner.trim(), "hosts"),
            };
            if !valid_group(name) {
                return Err(inv.err(n, format!("section: `{name}` is not a group name")));
            }
            kind = match k {
                "hosts" => "hosts",
                "children" => "children",
                "vars" => "vars",
                other => {
                    return Err(inv.err(
                        n,
                        format!(
                        "section: [{name}:{other}] is of an unknown kind (hosts, children or vars)"
                    ),
                    ))
                }
            };
            group = name.to_string();
            if kind == "vars" {
                if !inv.groups.contains_key(name) && !inv.pending.contains_key(name) {
                    inv.pending
                        .insert(name.to_string(), (n, "vars", name.to_string()));
                }
            } else {
                inv.declare(name);
            }
            continue;
        }
        match kind {
            "hosts" => {
                let w = words(line).map_err(|m| inv.err(n, format!("host: {m}")))?;
                let (pattern, rest) = w.split_first().expect("a non-empty line has a word");
                let mut vars = BTreeMap::new();
                let (names, port) = hosts_of(&inv, pattern, n)?;
                if let Some(p) = port {
                    vars.insert("ansible_port".to_string(), p);
                }
                for kv in rest {
                    let (k, v) = kv.split_once('=').ok_or_else(|| {
                        inv.err(n, format!("{kv}: expected key=value after the host name"))
                    })?;
                    if k.is_empty() {
                        return Err(inv.err(n, format!("`{kv}`: the variable has no name")));
                    }
                    vars.insert(
                        k.to_string(),
                        Var {
                            value: Some(v.to_string()),
                            line: n,
                        },
                    );
                }
                for h in names {
                    inv.add_host(&group, &h, &vars);
                }
            }
            "children" => {
                let w = words(line).map_err(|m| inv.err(n, format!("children: {m}")))?;
                let child = match w.as_slice() {
                    [c] if valid_group(c) => c.clone(),
                    _ => {
                        return Err(inv.err(
                            n,
                            format!("children: `{line}` is not a group name (one per line)"),
                        ))
                    }
                };
                if !inv.groups.contains_key(&child) && !inv.pending.contains_key(&child) {
                    inv.pending
                        .insert(child.clone(), (n, "children", group.clone()));
                }
                let parent = inv
                    .groups
                    .get_mut(&group)
                    .expect("a children section declares its group");
                if !parent.children.iter().any(|(c, _)| *c == child) {
                    parent.children.push((child, n));
                }
            }
            _ => {
                let (k, v) = line
                    .split_once('=')
                    .ok_or_else(|| inv.err(n, format!("vars: `{line}` is not key=value")))?;
                let k = k.trim();
                if k.is_empty() || k.contains(char::is_whitespace) {
                    return Err(inv.err(n, format!("vars: `{k}` is not a variable name")));
                }
                let var = Var {
                    value: Some(unquote(v).to_string()),
                    line: n,
                };
                // Vars of a group not declared yet wait for its section.
                inv.groups
                    .entry(group.clone())
                    .or_default()
                    .vars
                    .insert(k.to_string(), var);
            }
        }
    }
    Ok(inv)
}

/// A YAML node with the line it starts on.
#[derive(Debug, Clone)]
enum Yaml {
    Null,
    Scalar(String),
    Map(Vec<(String, usize, Node)>),
    Seq(Vec<Node>),
}

#[derive(Debug, Clone)]
struct Node {
    line: usize,
    v: Yaml,
}

/// A collection being built: the node, its anchor, and a mapping's key awaiting its value
/// (with the key's line).
struct Open {
    node: Node,
    anchor: usize,
    key: Option<(String, usize)>,
}

/// Builds [`Node`]s from the parser's events, keeping lines (and anchors for aliases).
#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    anchors: BTreeMap<usize, Node>,
    docs: Vec<Node>,
    error: Option<(usize, String)>,
}

impl Builder {
    fn push(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        let Some(Open { node: top, key, .. }) = self.stack.last_mut() else {
            self.docs.push(node);
            return;
        };
        match &mut top.v {
            Yaml::Seq(items) => items.push(node),
            Yaml::Map(entries) => match key.take() {
                Some((k, line)) => entries.push((k, line, node)),
                None => match node.v {
                    Yaml::Scalar(s) => *key = Some((s, node.line)),
                    Yaml::Null => *key = Some((String::new(), node.line)),
                    _ => {
                        if self.error.is_none() {
                            self.error =
                                Some((node.line, "a mapping key must be a plain value".into()));
                        }
                        *key = Some((String::new(), node.line));
                    }
                },
            },
            _ => unreachable!("only collections are open"),
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::Scalar(s, style, anchor, _) => {
                let null = style == TScalarStyle::Plain
                    && matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL");
                let v = if null { Yaml::Null } else { Yaml::Scalar(s) };
                self.push(Node { line, v }, anchor);
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                let v = if matches!(ev, Event::SequenceStart(..)) {
                    Yaml::Seq(Vec::new())
                } else {
                    Yaml::Map(Vec::new())
                };
                self.stack.push(Open {
                    node: Node { line, v },
                    anchor,
                    key: None,
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(open) = self.stack.pop() {
                    self.push(open.node, open.anchor);
                }
            }
            Event::Alias(id) => {
                let node = self.anchors.get(&id).cloned().unwrap_or(Node {
                    line,
                    v: Yaml::Null,
                });
                self.push(node, 0);
            }
            _ => {}
        }
    }
}

/// Ansible's YAML inventory: top-level groups (usually just `all`), each with `hosts`,
/// `children` and `vars`.
fn parse_yaml(text: &str, path: &Path) -> Result<Inventory, DeployError> {
    let mut inv = Inventory::new(path);
    let mut b = Builder::default();
    Parser::new_from_str(text)
        .load(&mut b, false)
        .map_err(|e| inv.err(e.marker().line(), format!("YAML: {}", e.info())))?;
    if let Some((line, m)) = b.error {
        return Err(inv.err(line, m));
    }
    let Some(doc) = b.docs.into_iter().next() else {
        return Err(DeployError::Inventory {
            path: path.to_path_buf(),
            message: "the inventory is empty".into(),
        });
    };
    match doc.v {
        Yaml::Map(groups) => {
            for (name, line, body) in groups {
                yaml_group(&mut inv, &name, line, &body)?;
            }
        }
        Yaml::Null => {}
        _ => {
            return Err(inv.err(
                doc.line,
                "the inventory must be a mapping of groups (all: ...)".into(),
            ))
        }
    }
    Ok(inv)
}

fn yaml_vars(
    inv: &Inventory,
    what: &str,
    node: &Node,
) -> Result<BTreeMap<String, Var>, DeployError> {
    let mut vars = BTreeMap::new();
    match &node.v {
        Yaml::Null => {}
        Yaml::Map(entries) => {
            for (k, line, v) in entries {
                let value = match &v.v {
                    Yaml::Scalar(s) => Some(s.clone()),
                    Yaml::Null => Some(String::new()),
                    _ => None,
                };
                vars.insert(k.clone(), Var { value, line: *line });
            }
        }
        _ => {
            return Err(inv.err(
                node.line,
                format!("{what}: expected a mapping of variables"),
            ))
        }
    }
    Ok(vars)
}

fn yaml_group(
    inv: &mut Inventory,
    name: &str,
    line: usize,
    body: &Node,
) -> Result<(), DeployError> {
    if !valid_group(name) {
        return Err(inv.err(line, format!("`{name}` is not a group name")));
    }
    inv.declare(name);
    let entries = match &body.v {
        Yaml::Null => return Ok(()),
        Yaml::Map(e) => e,
        _ => {
            return Err(inv.err(
                body.line,
                format!("group `{name}`: expected a mapping with hosts, children or vars"),
            ))
        }
    };
    for (key, kline, node) in entries {
        match key.as_str() {
            "vars" => {
                let vars = yaml_vars(inv, &format!("{name}: vars"), node)?;
                inv.groups
                    .get_mut(name)
                    .expect("declared")
                    .vars
                    .extend(vars);
            }
            "hosts" => match &node.v {
                Yaml::Null => {}
                Yaml::Map(hosts) => {
                    for (pattern, hline, hvars) in hosts {
                        let mut vars = yaml_vars(inv, &format!("host `{pattern}`"), hvars)?;
                        let (names, port) = hosts_of(inv, pattern, *hline)?;
                        if let Some(p) = port {
                            vars.entry("ansible_port".to_string()).or_insert(p);
                        }
                        for h in names {
                            inv.add_host(name, &h, &vars);
                        }
                    }
                }
                _ => {
                    return Err(inv.err(
                        node.line,
                        format!(
                            "{name}: hosts: expected a mapping of host names (a list is not one)"
                        ),
                    ))
                }
            },
            "children" => match &node.v {
                Yaml::Null => {}
                Yaml::Map(children) => {
                    for (child, cline, cbody) in children {
                        let g = inv.groups.get_mut(name).expect("declared");
                        if !g.children.iter().any(|(c, _)| c == child) {
                            g.children.push((child.clone(), *cline));
                        }
                        yaml_group(inv, child, *cline, cbody)?;
                    }
                }
                _ => {
                    return Err(inv.err(
                        node.line,
                        format!("{name}: children: expected a mapping of groups"),
                    ))
                }
            },
            other => {
                return Err(inv.err(
                    *kline,
                    format!("{name}: `{other}` is not hosts, children or vars"),
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ini(text: &str) -> Result<Imported, DeployError> {
        import_text(text, Path::new("hosts.ini"), Format::Ini)
    }

    fn yaml(text: &str) -> Result<Imported, DeployError> {
        import_text(text, Path::new("hosts.yml"), Format::Yaml)
    }

    fn fleet(i: &Imported) -> Vec<super::super::HostConfig> {
        inventory::parse(&i.toml, Path::new("fleet.toml"), None).unwrap()
    }

    #[test]
    fn ranges_expand_as_ansible_expands_them() {
        assert_eq!(
            expand("cam[01:03].example").unwrap(),
            ["cam01.example", "cam02.example", "cam03.example"]
        );
        assert_eq!(expand("n[8:10]").unwrap(), ["n8", "n9", "n10"]);
        assert_eq!(expand("n[0:6:3]").unwrap(), ["n0", "n3", "n6"]);
        assert_eq!(expand("n[:1]").unwrap(), ["n0", "n1"]);
        assert_eq!(expand("r[a:c]").unwrap(), ["ra", "rb", "rc"]);
        assert_eq!(
            expand("r[1:2]-[a:b]").unwrap(),
            ["r1-a", "r1-b", "r2-a", "r2-b"]
        );
        assert!(expand("n[01:100]").unwrap_err().contains("same length"));
        assert!(expand("n[3:1]").unwrap_err().contains("after its end"));
        assert!(expand("n[1:]").unwrap_err().contains("no end"));
        assert!(expand("n[1:2:0]").unwrap_err().contains("step"));
        assert!(expand("n[1]").unwrap_err().contains("[begin:end]"));
        assert_eq!(split_port("cam[01:02]:2222"), ("cam[01:02]", Some("2222")));
        assert_eq!(split_port("fe80::1"), ("fe80::1", None));
    }

    const INI: &str = "\
# the line
gateway ansible_host=10.0.0.1

[cams]
cam[01:03].example ansible_user=pi
cam04.example:2222 ansible_host=10.0.0.14 ansible_become=true

[cams:vars]
edgepack_target = imx95
ansible_port=22
ansible_python_interpreter=/usr/bin/python3

[sensors]
sensor-1 ansible_host=10.0.1.1 target=rpi5 'edgepack_install_dir=/data/edge pack'

[line_a:children]
cams
sensors

[line_a:vars]
edgepack_runtime_port=9090
edgepack_target=generic-x86_64

[all:vars]
ansible_user=root
ntp_server=pool.example
";

    #[test]
    fn ini_groups_children_and_vars_inherit_as_in_ansible() {
        let i = ini(INI).unwrap();
        assert_eq!(i.hosts, 6);
        assert_eq!(
            i.ignored,
            ["ansible_become", "ansible_python_interpreter", "ntp_server"]
        );
        let hs = fleet(&i);
        let names: Vec<&str> = hs.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "gateway",
                "cam01.example",
                "cam02.example",
                "cam03.example",
                "cam04.example",
                "sensor-1"
            ]
        );
        let g = &hs[0];
        assert_eq!(g.address, "10.0.0.1");
        assert_eq!(g.user.as_deref(), Some("root"));
        assert_eq!(g.target, None);
        // cam01: all (user root) < line_a (port 9090, generic) < cams (imx95, 22) < host (pi).
        let c1 = &hs[1];
        assert_eq!(c1.address, "cam01.example");
        assert_eq!(c1.user.as_deref(), Some("pi"));
        assert_eq!(c1.target.as_deref(), Some("imx95"), "the child group wins");
        assert_eq!(c1.port, Some(22));
        assert_eq!(c1.runtime_port, 9090, "inherited from the parent group");
        let c4 = &hs[4];
        assert_eq!(c4.address, "10.0.0.14");
        assert_eq!(c4.port, Some(2222), "name:port is the host's own");
        assert_eq!(c4.user.as_deref(), Some("root"));
        let s = &hs[5];
        assert_eq!(s.target.as_deref(), Some("rpi5"), "a host's `target` wins");
        assert_eq!(s.install_dir, "/data/edge pack");
        assert_eq!(s.runtime_port, 9090);
        // Groups list parents first, and --group selects through children.
        assert!(
            i.toml.contains("groups = [\"line_a\", \"cams\"]"),
            "{}",
            i.toml
        );
        let line_a = inventory::parse(&i.toml, Path::new("f.toml"), Some("line_a")).unwrap();
        assert_eq!(line_a.len(), 5);
    }

    fn line_of(e: DeployError) -> (usize, String) {
        match e {
            DeployError::InventoryLine { line, ref path, .. } => {
                assert_eq!(path.file_name().unwrap(), "hosts.ini", "{e}");
                (line, e.to_string())
            }
            other => panic!("no line: {other}"),
        }
    }

    #[test]
    fn ini_errors_name_the_line_and_the_field() {
        let (l, m) = line_of(ini("[a]\nh1\nh2 ansible_port=abc\n").unwrap_err());
        assert_eq!(l, 3);
        assert!(
            m.starts_with("hosts.ini:3: ansible_port: `abc` is not a port number"),
            "{m}"
        );
        let (l, m) = line_of(ini("[a]\nh1:x22\n").unwrap_err());
        assert_eq!(l, 2);
        assert!(m.contains("ansible_port: `x22`"), "{m}");
        let (l, m) = line_of(ini("[a]\nh1 become\n").unwrap_err());
        assert_eq!(l, 2);
        assert!(m.contains("become: expected key=value"), "{m}");
        let (l, m) = line_of(ini("[a]\nh1\n[p:children]\na\nghost\n").unwrap_err());
        assert_eq!(l, 5);
        assert!(
            m.contains("[p:children] names group `ghost`, which is not defined"),
            "{m}"
        );
        let (l, m) = line_of(ini("[a:vars]\nx=1\n").unwrap_err());
        assert_eq!(l, 1);
        assert!(
            m.contains("[a:vars] is for a group that is not defined"),
            "{m}"
        );
        let (l, m) = line_of(ini("[a]\nh1\n[a:children]\nb\n[b:children]\na\n").unwrap_err());
        assert_eq!(l, 6);
        assert!(m.contains("`a` is a child of itself (a -> b -> a)"), "{m}");
        let (l, m) = line_of(ini("[a]\nh1\n[a:vars]\nno equals sign\n").unwrap_err());
        assert_eq!(l, 4);
        assert!(m.contains("vars: `no equals sign` is not key=value"), "{m}");
        let (l, m) = line_of(ini("[a]\nh1 edgepack_instal_dir=/x\n").unwrap_err());
        assert_eq!(l, 2);
        assert!(m.contains("edgepack_instal_dir: no such setting"), "{m}");
        let (l, m) = line_of(ini("[a:bogus]\nh1\n").unwrap_err());
        assert_eq!(l, 1);
        assert!(m.contains("unknown kind"), "{m}");
        let (l, m) = line_of(ini("[a]\nh[1:3\n").unwrap_err());
        assert_eq!(l, 2);
        assert!(m.contains("without its `]`"), "{m}");
        let (l, _) = line_of(ini("[a]\nh1 ansible_host=\"10.0.0.1\n").unwrap_err());
        assert_eq!(l, 2);
        // A child declared after the children section that names it is fine.
        assert!(ini("[p:children]\na\n[a]\nh1\n[a:vars]\nansible_user=x\n").is_ok());
    }

    const YAML: &str = "\
all:
  vars:
    ansible_user: root
    ansible_ssh_common_args: -o ProxyJump=bastion
  hosts:
    gateway:
      ansible_host: 10.0.0.1
  children:
    line_a:
      vars:
        edgepack_target: generic-x86_64
        edgepack_runtime_port: 9090
      children:
        cams:
          hosts:
            cam[01:02].example:
              ansible_user: pi
            cam03.example:2222:
          vars:
            edgepack_target: imx95
        sensors:
          hosts:
            sensor-1:
              ansible_host: 10.0.1.1
              ansible_port: 2200
";

    #[test]
    fn yaml_inventories_read_like_ini_ones() {
        let i = yaml(YAML).unwrap();
        assert_eq!(i.ignored, ["ansible_ssh_common_args"]);
        let hs = fleet(&i);
        let names: Vec<&str> = hs.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "gateway",
                "cam01.example",
                "cam02.example",
                "cam03.example",
                "sensor-1"
            ]
        );
        assert_eq!(hs[0].address, "10.0.0.1");
        assert_eq!(hs[1].user.as_deref(), Some("pi"));
        assert_eq!(hs[1].target.as_deref(), Some("imx95"));
        assert_eq!(hs[1].runtime_port, 9090);
        assert_eq!(hs[3].port, Some(2222));
        assert_eq!(hs[3].user.as_deref(), Some("root"));
        assert_eq!(hs[4].address, "10.0.1.1");
        assert_eq!(hs[4].port, Some(2200));
        assert_eq!(hs[4].target.as_deref(), Some("generic-x86_64"));
    }

    #[test]
    fn ipv6_hosts_with_and_without_a_port_keep_their_address() {
        let i = ini("[boards]\n[2001:db8::12]:2222\n2001:db8::13\nb14 ansible_host=[2001:db8::14]\n[::1] ansible_port=2200\n").unwrap();
        let hs = fleet(&i);
        let got: Vec<(&str, &str, Option<u16>)> = hs
            .iter()
            .map(|h| (h.name.as_str(), h.address.as_str(), h.port))
            .collect();
        assert_eq!(
            got,
            [
                ("2001:db8::12", "2001:db8::12", Some(2222)),
                ("2001:db8::13", "2001:db8::13", None),
                ("b14", "2001:db8::14", None),
                ("::1", "::1", Some(2200)),
            ]
        );
        let y = yaml("all:\n  hosts:\n    '[fe80::7]:2022':\n").unwrap();
        let hs = fleet(&y);
        assert_eq!(
            (hs[0].address.as_str(), hs[0].port),
            ("fe80::7", Some(2022))
        );
        // A bracket that holds no IPv6 address is still a range, and a bad one says so.
        let (line, m) = line_of(ini("[b]\n[2001:db8::zz]:22\n").unwrap_err());
        assert_eq!(line, 2, "{m}");
        assert!(m.contains("host range"), "{m}");
        let (line, m) = line_of(ini("[b]\n[::1]:ssh\n").unwrap_err());
        assert_eq!(line, 2, "{m}");
        assert!(m.contains("`ssh` is not a port number"), "{m}");
    }

    #[test]
    fn jinja_variable_references_render_per_host_and_expressions_are_refused() {
        let text = "\
[cams]
cam01 site=north ansible_host='{{ inventory_hostname }}.{{ site }}.example'
cam02.lab site=south

[cams:vars]
edgepack_install_dir=/opt/{{ site }}/edgepack
base_port=9000
edgepack_runtime_port={{ base_port }}
ansible_host={{ inventory_hostname_short }}.{{ site }}.example
";
        let hs = fleet(&ini(text).unwrap());
        assert_eq!(hs[0].address, "cam01.north.example");
        assert_eq!(hs[0].install_dir, "/opt/north/edgepack");
        assert_eq!(hs[0].runtime_port, 9000);
        assert_eq!(hs[1].address, "cam02.south.example");
        assert_eq!(hs[1].install_dir, "/opt/south/edgepack");
        // The same in YAML, through a chain of references.
        let y = "all:\n  vars:\n    root: /srv\n    dir: '{{ root }}/edge'\n    edgepack_install_dir: '{{ dir }}'\n  hosts:\n    b1:\n";
        assert_eq!(fleet(&yaml(y).unwrap())[0].install_dir, "/srv/edge");

        for (text, line, want) in [
            (
                "[b]\nb1 edgepack_install_dir='{{ dir | default(\"/opt\") }}'\n",
                2,
                "is a Jinja expression",
            ),
            (
                "[b]\nb1 ansible_host='{{ addr }}'\n",
                2,
                "host `b1` has no variable `addr`",
            ),
            (
                "[b]\nb1\n[b:vars]\nedgepack_keep={% if x %}3{% endif %}\n",
                4,
                "Jinja blocks",
            ),
            ("[b]\nb1 'edgepack_runner={{ runner'\n", 2, "without its"),
            (
                "[b]\nb1 'a={{ b }}' 'edgepack_service={{ a }}'\n[b:vars]\nb={{ a }}\n",
                2,
                "refers to itself",
            ),
            (
                "[b]\nb1 p=ssh 'ansible_port={{ p }}'\n",
                2,
                "`ssh` is not a port number",
            ),
        ] {
            let (l, m) = line_of(ini(text).unwrap_err());
            assert_eq!(l, line, "{text}: {m}");
            assert!(m.contains(want), "{text}: {m}");
        }
    }

    #[test]
    fn yaml_errors_name_the_line_and_the_field() {
        let e = yaml("all:\n  hosts:\n    h1:\n      ansible_port: twenty-two\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("hosts.yml:4: ansible_port: `twenty-two` is not a port number"),
            "{e}"
        );
        let e = yaml("all:\n  children:\n    a:\n      children:\n        b:\n          children:\n            a:\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("hosts.yml:7: children: group `a` is a child of itself"),
            "{e}"
        );
        let e = yaml("all:\n  hosts:\n    - h1\n").unwrap_err().to_string();
        assert!(
            e.starts_with("hosts.yml:3: all: hosts: expected a mapping"),
            "{e}"
        );
        let e = yaml("all:\n  host:\n    h1:\n").unwrap_err().to_string();
        assert!(
            e.starts_with("hosts.yml:2: all: `host` is not hosts, children or vars"),
            "{e}"
        );
        let e = yaml("all:\n  hosts:\n    h1: {ansible_host: [1, 2]}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("hosts.yml:3: ansible_host: expected a single value"),
            "{e}"
        );
        let e = yaml("all:\n  hosts:\n   h1:\n  - x\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("hosts.yml:4: YAML:"), "{e}");
    }

    #[test]
    fn the_format_is_told_by_the_extension_or_the_first_line() {
        assert_eq!(Format::detect(Path::new("h.yml"), "[a]"), Format::Yaml);
        assert_eq!(
            Format::detect(Path::new("hosts"), "# c\nall:\n"),
            Format::Yaml
        );
        assert_eq!(Format::detect(Path::new("hosts"), "---\n"), Format::Yaml);
        assert_eq!(Format::detect(Path::new("hosts"), "[a]\nh1\n"), Format::Ini);
        assert_eq!(
            Format::detect(Path::new("hosts"), "h1 ansible_port=22\n"),
            Format::Ini
        );
    }

    #[test]
    fn the_fleet_file_is_written_atomically_and_never_replaced_unasked() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("fleet.toml");
        write_fleet(&out, "a = 1\n", false).unwrap();
        let e = write_fleet(&out, "a = 2\n", false).unwrap_err().to_string();
        assert!(
            e.contains("fleet.toml: exists") && e.contains("--force"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "a = 1\n");
        write_fleet(&out, "a = 2\n", true).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "a = 2\n");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file is left");
    }
}
