//! The floor plan holds: no crate's files or top-level modules use each other in a cycle, no
//! module uses one that the layer tables of `docs/architecture.md` put above it, and the
//! crates depend on each other only as its crate table allows (read from `cargo metadata`).
//! The checker itself is tested on small fixture trees: a cycle and an upward use are found
//! and named, a clean tree passes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use edgepack_tests::root;
use edgepack_tests::tidy::{check_crate, read_crate_table, read_layer_tables, CrateGraph};

fn architecture() -> String {
    let p = root().join("docs/architecture.md");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `cargo metadata` of the workspace's own packages (no dependency resolution, so it needs no
/// network and no download of other platforms' crates).
fn metadata() -> serde_json::Value {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("metadata JSON")
}

/// The workspace members, as (folder, package name).
fn members() -> Vec<(String, String)> {
    metadata()["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            let manifest = Path::new(p["manifest_path"].as_str().expect("manifest_path"));
            let dir = manifest.parent().expect("package folder");
            let rel = dir.strip_prefix(root()).unwrap_or(dir);
            (
                rel.display().to_string(),
                p["name"].as_str().expect("name").to_string(),
            )
        })
        .collect()
}

#[test]
fn no_crate_has_an_import_cycle_or_an_upward_use() {
    let tables = read_layer_tables(&architecture()).expect("layer tables");
    let mut findings = Vec::new();
    for (folder, _) in members() {
        let src = root().join(&folder).join("src");
        if !src.is_dir() {
            continue;
        }
        findings.extend(check_crate(&src, tables.get(&folder)));
    }
    let text: Vec<String> = findings.iter().map(|f| f.to_string()).collect();
    assert!(
        text.is_empty(),
        "the floor plan is broken:\n{}",
        text.join("\n")
    );
}

#[test]
fn crates_depend_on_each_other_only_as_the_crate_table_allows() {
    let allowed = read_crate_table(&architecture());
    let meta = metadata();
    let packages = meta["packages"].as_array().expect("packages");
    let names: BTreeSet<&str> = packages
        .iter()
        .map(|p| p["name"].as_str().expect("name"))
        .collect();
    let mut wrong = Vec::new();
    for p in packages {
        let name = p["name"].as_str().expect("name");
        let Some(ok) = allowed.get(name) else {
            wrong.push(format!(
                "package `{name}` is not in the crate table of docs/architecture.md"
            ));
            continue;
        };
        for d in p["dependencies"].as_array().expect("dependencies") {
            let dep = d["name"].as_str().expect("dependency name");
            if names.contains(dep) && !ok.contains(dep) {
                wrong.push(format!(
                    "`{name}` depends on `{dep}` ({} dependency), which the crate table does not allow",
                    d["kind"].as_str().unwrap_or("normal")
                ));
            }
        }
    }
    // The rules the table must keep, whatever else it says.
    for (pkg, never) in [
        ("edgepack-runtime", "edgepack-converters"),
        ("edgepack-targets", "edgepack-converters"),
    ] {
        if allowed.get(pkg).is_some_and(|a| a.contains(never)) {
            wrong.push(format!("the crate table lets `{pkg}` depend on `{never}`"));
        }
    }
    for (pkg, deps) in &allowed {
        if deps.contains("edgepack") {
            wrong.push(format!(
                "the crate table lets `{pkg}` depend on the CLI `edgepack`"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

// The checker on fixture trees.

fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (path, text) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    dir
}

fn layers(rows: &[(&str, u32)]) -> BTreeMap<String, u32> {
    rows.iter().map(|(m, l)| (m.to_string(), *l)).collect()
}

#[test]
fn tidy_passes_a_clean_tree_with_facades_and_test_modules() {
    let t = tree(&[
        ("lib.rs", "pub mod base;\npub mod model;\npub mod top;\n"),
        ("base.rs", "pub struct Error;\n"),
        (
            "model/mod.rs",
            "mod tensor;\npub use tensor::{Tensor, Source};\npub use self::tensor::*;\npub struct Model(pub Vec<Tensor>);\n",
        ),
        (
            "model/tensor.rs",
            "use crate::base::Error;\npub struct Tensor;\npub enum Source { A }\npub fn f() -> Result<(), Error> { Ok(()) }\n#[cfg(test)]\nmod tests { use crate::top::Export; }\n",
        ),
        (
            "top.rs",
            "use crate::model::{Model, Source};\npub struct Export;\npub fn g(m: &Model) { let _ = crate::model::Tensor; let _ = Source::A; }\n",
        ),
    ]);
    let l = layers(&[("top", 3), ("model", 2), ("base", 1)]);
    let found = check_crate(t.path(), Some(&l));
    assert!(found.is_empty(), "{found:?}");
    // The facade is seen through: top.rs uses tensor.rs, not model/mod.rs.
    let g = CrateGraph::read(t.path());
    let edges: Vec<String> = g
        .edges()
        .iter()
        .map(|e| e.to.display().to_string())
        .collect();
    assert!(edges.contains(&"model/tensor.rs".to_string()), "{edges:?}");
}

#[test]
fn tidy_finds_a_cycle_of_files_and_names_both_files() {
    let t = tree(&[
        ("lib.rs", "pub mod calib;\n"),
        (
            "calib/mod.rs",
            "pub mod stats;\npub mod imatrix;\npub mod forward;\n",
        ),
        (
            "calib/stats.rs",
            "use crate::calib::imatrix::chunk_tokens;\npub struct Stats;\n",
        ),
        (
            "calib/imatrix.rs",
            "use super::forward::Forward;\npub fn chunk_tokens() {}\n",
        ),
        (
            "calib/forward.rs",
            "pub struct Forward;\npub fn stats() -> super::stats::Stats { super::stats::Stats }\n",
        ),
    ]);
    let found = check_crate(t.path(), Some(&layers(&[("calib", 1)])));
    let text: Vec<String> = found.iter().map(|f| f.to_string()).collect();
    assert_eq!(text.len(), 1, "{text:#?}");
    for needle in [
        "files use each other in a cycle",
        "calib/stats.rs",
        "calib/imatrix.rs",
        "calib/forward.rs",
        "calib/stats.rs:1 uses `crate::calib::imatrix::chunk_tokens`",
        "super::stats::Stats",
    ] {
        assert!(
            text[0].contains(needle),
            "{needle:?} missing in\n{}",
            text[0]
        );
    }
}

#[test]
fn tidy_finds_two_top_level_modules_that_use_each_other() {
    let t = tree(&[
        ("lib.rs", "pub mod model;\npub mod transform;\n"),
        (
            "model.rs",
            "pub enum Source { Masked(crate::transform::Mask) }\n",
        ),
        (
            "transform.rs",
            "use crate::model::Source;\npub struct Mask;\npub fn f(_: Source) {}\n",
        ),
    ]);
    let found = check_crate(t.path(), Some(&layers(&[("transform", 2), ("model", 1)])));
    let text = found
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(text.contains("files use each other in a cycle"), "{text}");
    assert!(
        text.contains("top-level modules use each other in a cycle: model, transform"),
        "{text}"
    );
    // And the upward half of the cycle is named as such.
    assert!(
        text.contains("upward use: `model` (layer 1) uses `transform` (layer 2): model.rs:1 uses `crate::transform::Mask` from transform.rs"),
        "{text}"
    );
}

#[test]
fn tidy_finds_an_upward_use_without_a_cycle() {
    let t = tree(&[
        (
            "main.rs",
            "mod args;\nmod commands;\nfn main() { commands::run(); }\n",
        ),
        ("args.rs", "pub fn load() { crate::commands::helper(); }\n"),
        ("commands.rs", "pub fn run() {}\npub fn helper() {}\n"),
    ]);
    let found = check_crate(t.path(), Some(&layers(&[("commands", 2), ("args", 1)])));
    let text: Vec<String> = found.iter().map(|f| f.to_string()).collect();
    assert_eq!(text.len(), 1, "{text:#?}");
    assert!(
        text[0].contains("upward use: `args` (layer 1) uses `commands` (layer 2): args.rs:1 uses `crate::commands::helper` from commands.rs"),
        "{}",
        text[0]
    );
}

#[test]
fn tidy_refuses_a_module_missing_from_the_layer_table_and_a_use_of_the_root() {
    let t = tree(&[
        (
            "main.rs",
            "mod a;\nmod b;\npub fn run() {}\nfn main() { a::f(); }\n",
        ),
        ("a.rs", "pub fn f() { crate::run(); }\n"),
        ("b.rs", "pub fn g() {}\n"),
    ]);
    let text = check_crate(t.path(), Some(&layers(&[("a", 1)])))
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(text.contains("module `b` (b.rs) is in no layer"), "{text}");
    assert!(
        text.contains("upward use of the crate root: a.rs:1 uses `crate::run` from main.rs"),
        "{text}"
    );
}

#[test]
fn layer_tables_are_read_per_crate() {
    let md = "# x\n### Layers of `converters`\n| layer | modules | notes |\n|---|---|---|\n| 2 | `export`, `calib::forward` | x |\n| 1 | `model` | |\n### Layers of `cli`\n| layer | modules |\n|---|---|\n| 1 | `args` |\n";
    let t = read_layer_tables(md).unwrap();
    assert_eq!(t["converters"]["calib::forward"], 2);
    assert_eq!(t["converters"]["model"], 1);
    assert_eq!(t["cli"]["args"], 1);
    let dup = "### Layers of `cli`\n| 1 | `a` |\n| 2 | `a` |\n";
    assert!(read_layer_tables(dup)
        .unwrap_err()
        .contains("appears twice"));
}
