//! The floor plan, checked: reads a crate's `src/` with `syn`, finds which file uses which
//! (`use crate::...`, `use super::...`, `crate::path` and `super::path` in code, and 2018-style
//! paths through a child module), and reports
//!
//! - files of a crate that use each other, directly or through a cycle;
//! - top-level modules (a folder or a file under `src/`) that do the same;
//! - a file that uses a module which the crate's layer table in `docs/architecture.md` puts
//!   above its own.
//!
//! A path is resolved to the file that *defines* the name, following `pub use` re-exports, so a
//! folder's `mod.rs` that re-exports its children's items is their public face, not a knot:
//! a parent's `pub use` of its own descendants is not an edge. Test-only code (`#[cfg(test)]`
//! items and modules) is left out; it may reach across layers to check them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use syn::visit::Visit;

type ModPath = Vec<String>;

/// One use of another module: where it is written and what it names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Edge {
    pub from: PathBuf,
    pub line: usize,
    pub to: PathBuf,
    /// The path as written, e.g. `crate::transform::sparsify::Mask`.
    pub name: String,
}

impl fmt::Display for Edge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} uses `{}` from {}",
            self.from.display(),
            self.line,
            self.name,
            self.to.display()
        )
    }
}

/// A module of the crate: the file it lives in and what that module scope declares.
#[derive(Default, Debug)]
struct Module {
    file: PathBuf,
    /// Names defined in this module (types, functions, constants, macros, inline modules).
    defined: BTreeSet<String>,
    /// `pub use` re-exports: name under which it is visible -> absolute target path.
    reexports: Vec<(String, ModPath)>,
    /// `pub use path::*`: absolute target module paths.
    globs: Vec<ModPath>,
    /// Child modules declared here (file or inline).
    children: BTreeSet<String>,
}

/// A raw reference found in a file, before resolution.
#[derive(Debug)]
struct Ref {
    file: PathBuf,
    line: usize,
    path: ModPath,
    written: String,
    /// A `pub use` of a descendant of the module it is written in (a facade).
    facade: bool,
}

/// The parsed crate: every module and every reference.
pub struct CrateGraph {
    pub src: PathBuf,
    modules: BTreeMap<ModPath, Module>,
    refs: Vec<Ref>,
    pub errors: Vec<String>,
}

/// A problem the tidy check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding(pub String);

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg") && {
            let s = a.meta.to_token_stream_string();
            // `cfg(test)` and `cfg(all(test, ...))`, never `cfg(not(test))`.
            s.contains("test") && !s.contains("not")
        }
    })
}

trait MetaString {
    fn to_token_stream_string(&self) -> String;
}

impl MetaString for syn::Meta {
    fn to_token_stream_string(&self) -> String {
        use quote::ToTokens;
        self.to_token_stream().to_string()
    }
}

fn line_of(span: proc_macro2::Span) -> usize {
    span.start().line
}

impl CrateGraph {
    /// Reads the crate whose sources are in `src` (its root is `lib.rs`, else `main.rs`).
    pub fn read(src: &Path) -> CrateGraph {
        let mut g = CrateGraph {
            src: src.to_path_buf(),
            modules: BTreeMap::new(),
            refs: Vec::new(),
            errors: Vec::new(),
        };
        let root = ["lib.rs", "main.rs"]
            .iter()
            .map(|f| src.join(f))
            .find(|p| p.is_file());
        match root {
            Some(root) => g.read_file(&root, Vec::new(), src.to_path_buf()),
            None => g
                .errors
                .push(format!("{}: neither lib.rs nor main.rs", src.display())),
        }
        g
    }

    fn rel(&self, p: &Path) -> PathBuf {
        p.strip_prefix(&self.src).unwrap_or(p).to_path_buf()
    }

    /// Parses `file` as module `module`; `dir` is where its `mod x;` children live.
    fn read_file(&mut self, file: &Path, module: ModPath, dir: PathBuf) {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                self.errors.push(format!("{}: {e}", file.display()));
                return;
            }
        };
        let ast = match syn::parse_file(&text) {
            Ok(a) => a,
            Err(e) => {
                self.errors.push(format!(
                    "{}:{}: does not parse: {e}",
                    file.display(),
                    line_of(e.span())
                ));
                return;
            }
        };
        let rel = self.rel(file);
        self.read_items(&ast.items, &rel, module, &dir);
    }

    fn read_items(&mut self, items: &[syn::Item], file: &Path, module: ModPath, dir: &Path) {
        let mut m = Module {
            file: file.to_path_buf(),
            ..Default::default()
        };
        // First the declarations, so relative paths can see the children.
        for item in items {
            if let Some(name) = defined_name(item) {
                m.defined.insert(name);
            }
            if let syn::Item::Mod(im) = item {
                if !is_cfg_test(&im.attrs) {
                    m.children.insert(im.ident.to_string());
                }
            }
        }
        let children = m.children.clone();
        self.modules.insert(module.clone(), m);
        for item in items {
            match item {
                syn::Item::Mod(im) if is_cfg_test(&im.attrs) => {}
                syn::Item::Mod(im) => {
                    let name = im.ident.to_string();
                    let mut child = module.clone();
                    child.push(name.clone());
                    match &im.content {
                        Some((_, inner)) => {
                            self.read_items(inner, file, child, &dir.join(&name));
                        }
                        None => {
                            let flat = dir.join(format!("{name}.rs"));
                            let nested = dir.join(&name).join("mod.rs");
                            if flat.is_file() {
                                self.read_file(&flat, child, dir.join(&name));
                            } else if nested.is_file() {
                                self.read_file(&nested, child, dir.join(&name));
                            } else {
                                self.errors
                                    .push(format!("{}: `mod {name};` has no file", file.display()));
                            }
                        }
                    }
                }
                syn::Item::Use(u) if !is_cfg_test(&u.attrs) => {
                    let public = !matches!(u.vis, syn::Visibility::Inherited);
                    let mut flat = Vec::new();
                    flatten_use(&u.tree, Vec::new(), &mut flat);
                    for (path, alias) in flat {
                        let Some(abs) = absolute(&module, &children, &path) else {
                            continue;
                        };
                        let glob = path.last().map(|s| s == "*").unwrap_or(false);
                        let abs_target: ModPath = if glob {
                            abs[..abs.len() - 1].to_vec()
                        } else {
                            abs.clone()
                        };
                        let facade = public
                            && abs_target.len() > module.len()
                            && abs_target.starts_with(&module);
                        if public {
                            let m = self.modules.get_mut(&module).expect("inserted");
                            if glob {
                                m.globs.push(abs_target.clone());
                            } else if let Some(name) = alias.or_else(|| abs.last().cloned()) {
                                if name != "self" {
                                    m.reexports.push((name, abs.clone()));
                                }
                            }
                        }
                        self.refs.push(Ref {
                            file: file.to_path_buf(),
                            line: line_of(u.use_token.span),
                            written: path.join("::"),
                            path: abs_target,
                            facade,
                        });
                    }
                }
                syn::Item::Use(_) => {}
                other => {
                    if item_is_test(other) {
                        continue;
                    }
                    let mut v = PathVisitor {
                        found: Vec::new(),
                        children: &children,
                        module: &module,
                    };
                    v.visit_item(other);
                    for (line, written, abs) in v.found {
                        self.refs.push(Ref {
                            file: file.to_path_buf(),
                            line,
                            written,
                            path: abs,
                            facade: false,
                        });
                    }
                }
            }
        }
    }

    /// The file that defines what `path` names, following re-exports.
    fn resolve(&self, path: &[String], depth: usize) -> Option<PathBuf> {
        // The longest prefix that is a module.
        let mut k = path.len();
        while k > 0 && !self.modules.contains_key(&path[..k]) {
            k -= 1;
        }
        let m = self.modules.get(&path[..k])?;
        let Some(name) = path.get(k) else {
            return Some(m.file.clone());
        };
        if m.defined.contains(name) || depth > 16 {
            return Some(m.file.clone());
        }
        for (alias, target) in &m.reexports {
            if alias == name {
                let mut t = target.clone();
                t.extend(path[k + 1..].iter().cloned());
                return self.resolve(&t, depth + 1).or_else(|| Some(m.file.clone()));
            }
        }
        for g in &m.globs {
            let mut t = g.clone();
            t.extend(path[k..].iter().cloned());
            if let Some(target) = self.modules.get(g) {
                let defines = target.defined.contains(name)
                    || target.reexports.iter().any(|(a, _)| a == name)
                    || self.modules.contains_key(&t[..g.len() + 1]);
                if defines {
                    return self.resolve(&t, depth + 1);
                }
            }
        }
        Some(m.file.clone())
    }

    /// Every use of another file of the crate (facade re-exports left out).
    pub fn edges(&self) -> Vec<Edge> {
        let mut out = BTreeSet::new();
        for r in &self.refs {
            if r.facade {
                continue;
            }
            let Some(to) = self.resolve(&r.path, 0) else {
                continue;
            };
            if to != r.file {
                out.insert(Edge {
                    from: r.file.clone(),
                    line: r.line,
                    to,
                    name: r.written.clone(),
                });
            }
        }
        out.into_iter().collect()
    }

    /// The top-level module a file belongs to: `model` for `model/tensor.rs`, `io` for
    /// `io.rs`, and the root's file name for `lib.rs`/`main.rs`.
    pub fn top_module(file: &Path) -> String {
        let first = file
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().to_string())
            .unwrap_or_default();
        first.strip_suffix(".rs").unwrap_or(&first).to_string()
    }

    /// The module path (`calib::stats`) a file holds; the root file is the empty string.
    pub fn module_of(&self, file: &Path) -> String {
        self.modules
            .iter()
            .filter(|(_, m)| m.file == file)
            .map(|(p, _)| p.join("::"))
            .min_by_key(|p| p.len())
            .unwrap_or_default()
    }

    /// Files, and top-level modules, that use each other directly or through a cycle.
    pub fn cycles(&self) -> Vec<Finding> {
        let edges = self.edges();
        let mut out = Vec::new();
        let file_edges: Vec<(String, String, &Edge)> = edges
            .iter()
            .map(|e| (show(&e.from), show(&e.to), e))
            .collect();
        for scc in strongly_connected(&file_edges) {
            out.push(Finding(format!(
                "{}: files use each other in a cycle: {}\n{}",
                self.src.display(),
                scc.iter().cloned().collect::<Vec<_>>().join(" -> "),
                cycle_edges(&file_edges, &scc)
            )));
        }
        let module_edges: Vec<(String, String, &Edge)> = edges
            .iter()
            .map(|e| (Self::top_module(&e.from), Self::top_module(&e.to), e))
            .filter(|(a, b, _)| a != b)
            .collect();
        for scc in strongly_connected(&module_edges) {
            out.push(Finding(format!(
                "{}: top-level modules use each other in a cycle: {}\n{}",
                self.src.display(),
                scc.iter().cloned().collect::<Vec<_>>().join(", "),
                cycle_edges(&module_edges, &scc)
            )));
        }
        out
    }

    /// Uses that go up the layer table: `layers` maps a module path (`calib` or
    /// `calib::forward`) to its layer number, higher above. The crate root is above all.
    pub fn upward(&self, layers: &BTreeMap<String, u32>) -> Vec<Finding> {
        let mut out = Vec::new();
        let layer_of = |file: &Path| -> Result<Option<(String, u32)>, String> {
            let m = self.module_of(file);
            if m.is_empty() {
                return Ok(None);
            }
            let parts: Vec<&str> = m.split("::").collect();
            for k in (1..=parts.len()).rev() {
                let key = parts[..k].join("::");
                if let Some(l) = layers.get(&key) {
                    return Ok(Some((key, *l)));
                }
            }
            Err(m)
        };
        let mut missing = BTreeSet::new();
        for m in self.modules.values() {
            if let Err(name) = layer_of(&m.file) {
                missing.insert((name, show(&m.file)));
            }
        }
        for (name, file) in missing {
            out.push(Finding(format!(
                "{}: module `{name}` ({file}) is in no layer of the table in docs/architecture.md",
                self.src.display()
            )));
        }
        for e in self.edges() {
            let (Ok(from), Ok(to)) = (layer_of(&e.from), layer_of(&e.to)) else {
                continue;
            };
            let from_layer = from.as_ref().map(|f| f.1).unwrap_or(u32::MAX);
            match to {
                None => out.push(Finding(format!(
                    "{}: upward use of the crate root: {e}",
                    self.src.display()
                ))),
                Some((to_name, to_layer)) if to_layer > from_layer => {
                    let from_name = from.map(|f| f.0).unwrap_or_default();
                    out.push(Finding(format!(
                        "{}: upward use: `{from_name}` (layer {from_layer}) uses `{to_name}` \
                         (layer {to_layer}): {e}",
                        self.src.display()
                    )))
                }
                _ => {}
            }
        }
        out
    }
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

fn cycle_edges(edges: &[(String, String, &Edge)], scc: &BTreeSet<String>) -> String {
    let mut lines: Vec<String> = edges
        .iter()
        .filter(|(a, b, _)| scc.contains(a) && scc.contains(b) && a != b)
        .map(|(_, _, e)| format!("  {e}"))
        .collect();
    lines.dedup();
    lines.join("\n")
}

/// Tarjan's strongly connected components with more than one member.
fn strongly_connected(edges: &[(String, String, &Edge)]) -> Vec<BTreeSet<String>> {
    let mut adj: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (a, b, _) in edges {
        adj.entry(a).or_default().insert(b);
        adj.entry(b).or_default();
    }
    let nodes: Vec<&str> = adj.keys().copied().collect();
    let index_of: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let succ: Vec<Vec<usize>> = nodes
        .iter()
        .map(|n| adj[n].iter().map(|m| index_of[m]).collect())
        .collect();
    let n = nodes.len();
    let mut index = vec![usize::MAX; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut stack = Vec::new();
    let mut next = 0;
    let mut out = Vec::new();
    // Iterative Tarjan: (node, next successor position).
    for start in 0..n {
        if index[start] != usize::MAX {
            continue;
        }
        let mut work = vec![(start, 0usize)];
        index[start] = next;
        low[start] = next;
        next += 1;
        stack.push(start);
        on_stack[start] = true;
        while let Some(&mut (v, ref mut pos)) = work.last_mut() {
            if *pos < succ[v].len() {
                let w = succ[v][*pos];
                *pos += 1;
                if index[w] == usize::MAX {
                    index[w] = next;
                    low[w] = next;
                    next += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    work.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
            } else {
                work.pop();
                if let Some(&(u, _)) = work.last() {
                    low[u] = low[u].min(low[v]);
                }
                if low[v] == index[v] {
                    let mut comp = BTreeSet::new();
                    while let Some(w) = stack.pop() {
                        on_stack[w] = false;
                        comp.insert(nodes[w].to_string());
                        if w == v {
                            break;
                        }
                    }
                    if comp.len() > 1 {
                        out.push(comp);
                    }
                }
            }
        }
    }
    out
}

fn item_is_test(item: &syn::Item) -> bool {
    let attrs = match item {
        syn::Item::Fn(i) => &i.attrs,
        syn::Item::Impl(i) => &i.attrs,
        syn::Item::Struct(i) => &i.attrs,
        syn::Item::Enum(i) => &i.attrs,
        syn::Item::Const(i) => &i.attrs,
        syn::Item::Static(i) => &i.attrs,
        syn::Item::Trait(i) => &i.attrs,
        syn::Item::Type(i) => &i.attrs,
        syn::Item::Macro(i) => &i.attrs,
        _ => return false,
    };
    is_cfg_test(attrs)
}

fn defined_name(item: &syn::Item) -> Option<String> {
    Some(match item {
        syn::Item::Fn(i) => i.sig.ident.to_string(),
        syn::Item::Struct(i) => i.ident.to_string(),
        syn::Item::Enum(i) => i.ident.to_string(),
        syn::Item::Const(i) => i.ident.to_string(),
        syn::Item::Static(i) => i.ident.to_string(),
        syn::Item::Trait(i) => i.ident.to_string(),
        syn::Item::Type(i) => i.ident.to_string(),
        syn::Item::Union(i) => i.ident.to_string(),
        syn::Item::Mod(i) => i.ident.to_string(),
        syn::Item::Macro(i) => i.ident.as_ref()?.to_string(),
        _ => return None,
    })
}

/// Flattens a use tree into paths (with `*` for globs) and their `as` names.
fn flatten_use(tree: &syn::UseTree, prefix: ModPath, out: &mut Vec<(ModPath, Option<String>)>) {
    match tree {
        syn::UseTree::Path(p) => {
            let mut pre = prefix;
            pre.push(p.ident.to_string());
            flatten_use(&p.tree, pre, out);
        }
        syn::UseTree::Name(n) => {
            let mut pre = prefix;
            let id = n.ident.to_string();
            if id != "self" {
                pre.push(id);
            }
            out.push((pre, None));
        }
        syn::UseTree::Rename(r) => {
            let mut pre = prefix;
            let id = r.ident.to_string();
            if id != "self" {
                pre.push(id);
            }
            out.push((pre, Some(r.rename.to_string())));
        }
        syn::UseTree::Glob(_) => {
            let mut pre = prefix;
            pre.push("*".into());
            out.push((pre, None));
        }
        syn::UseTree::Group(g) => {
            for t in &g.items {
                flatten_use(t, prefix.clone(), out);
            }
        }
    }
}

/// An in-crate path made absolute from module `module`; `None` for other crates.
fn absolute(module: &ModPath, children: &BTreeSet<String>, path: &[String]) -> Option<ModPath> {
    let first = path.first()?;
    let mut base: ModPath = match first.as_str() {
        "crate" => Vec::new(),
        "self" => module.clone(),
        "super" => {
            let mut b = module.clone();
            let mut rest = path;
            while rest.first().map(|s| s == "super").unwrap_or(false) {
                b.pop()?;
                rest = &rest[1..];
            }
            b.extend(rest.iter().cloned());
            return Some(b);
        }
        s if children.contains(s) => {
            let mut b = module.clone();
            b.extend(path.iter().cloned());
            return Some(b);
        }
        _ => return None,
    };
    base.extend(path[1..].iter().cloned());
    Some(base)
}

struct PathVisitor<'a> {
    found: Vec<(usize, String, ModPath)>,
    children: &'a BTreeSet<String>,
    module: &'a ModPath,
}

impl<'ast> Visit<'ast> for PathVisitor<'_> {
    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        // A single segment is a local name, not a module path.
        if segs.len() > 1 {
            if let Some(abs) = absolute(self.module, self.children, &segs) {
                let line = p
                    .segments
                    .first()
                    .map(|s| line_of(s.ident.span()))
                    .unwrap_or(0);
                self.found.push((line, segs.join("::"), abs));
            }
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_item_mod(&mut self, _: &'ast syn::ItemMod) {}

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if !is_cfg_test(&f.attrs) {
            syn::visit::visit_impl_item_fn(self, f);
        }
    }
}

/// Reads the layer tables of `docs/architecture.md`: under a heading that contains
/// "Layers of `CRATE`", a Markdown table whose first column is the layer number and whose
/// second lists the modules of that layer in backticks. Returns crate folder -> module ->
/// layer.
pub fn read_layer_tables(
    markdown: &str,
) -> Result<BTreeMap<String, BTreeMap<String, u32>>, String> {
    let mut out: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for (n, line) in markdown.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('#') {
            current = t
                .split_once("Layers of `")
                .and_then(|(_, rest)| rest.split_once('`'))
                .map(|(name, _)| name.to_string());
            continue;
        }
        let Some(krate) = &current else { continue };
        if !t.starts_with('|') {
            continue;
        }
        let cells: Vec<&str> = t.trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() < 2 {
            continue;
        }
        let Ok(layer) = cells[0].parse::<u32>() else {
            continue; // the header and the separator row
        };
        let table = out.entry(krate.clone()).or_default();
        let names: Vec<&str> = cells[1]
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, s)| s)
            .collect();
        if names.is_empty() {
            return Err(format!(
                "docs/architecture.md:{}: layer {layer} of `{krate}` names no module",
                n + 1
            ));
        }
        for name in names {
            if table.insert(name.to_string(), layer).is_some() {
                return Err(format!(
                    "docs/architecture.md:{}: `{name}` appears twice in the layers of `{krate}`",
                    n + 1
                ));
            }
        }
    }
    Ok(out)
}

/// Reads the crate table of `docs/architecture.md`: under a heading containing
/// "Crate dependencies", rows `| `crate` | `dep`, `dep` |` (a dash for none). Returns
/// package -> the workspace packages it may depend on.
pub fn read_crate_table(markdown: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    let mut inside = false;
    for line in markdown.lines() {
        let t = line.trim();
        if t.starts_with('#') {
            inside = t.contains("Crate dependencies");
            continue;
        }
        if !inside || !t.starts_with('|') {
            continue;
        }
        let cells: Vec<&str> = t.trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() < 2 || !cells[0].starts_with('`') {
            continue;
        }
        let ticked = |s: &str| -> Vec<String> {
            s.split('`')
                .enumerate()
                .filter(|(i, _)| i % 2 == 1)
                .map(|(_, s)| s.to_string())
                .collect()
        };
        if let Some(name) = ticked(cells[0]).into_iter().next() {
            out.insert(name, ticked(cells[1]).into_iter().collect());
        }
    }
    out
}

/// Everything the tidy check finds in one crate's `src/`, given its layer table.
pub fn check_crate(src: &Path, layers: Option<&BTreeMap<String, u32>>) -> Vec<Finding> {
    let g = CrateGraph::read(src);
    let mut out: Vec<Finding> = g.errors.iter().cloned().map(Finding).collect();
    out.extend(g.cycles());
    match layers {
        Some(l) => out.extend(g.upward(l)),
        None => out.push(Finding(format!(
            "{}: the crate has no layer table (\"Layers of `...`\") in docs/architecture.md",
            src.display()
        ))),
    }
    out
}
