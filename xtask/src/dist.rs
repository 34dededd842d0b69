//! `cargo xtask dist`: builds `edgepack-runtime` for a board profile's triple and CPU, then
//! checks that the binary fits the board (architecture, glibc floor).
//!
//! Builders, in order: `cross` when a Docker/Podman engine answers (its images carry an old
//! glibc); else cargo with the Debian cross toolchain (`aarch64-linux-gnu-gcc`/`g++`), whose
//! glibc is 2.36, so a profile with an older floor fails the check with a pointer to
//! cargo-zigbuild.
//!
//! llama.cpp's kernels follow the board's instruction set: llama-cpp-sys-2 pins ggml to
//! `-march=armv8-a` for every non-native aarch64 Linux build, which leaves out the dot-product
//! (SDOT/UDOT) and fp16 kernels the Cortex-A55 and A76 have. With the Debian toolchain the C
//! and C++ compilers are small wrapper scripts that put the board's `-march` last on every
//! command line, where GCC takes it over the earlier one.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use edgepack_targets::profile::{parse_version, Profile};
use serde::Serialize;

use crate::util::{root, run};

/// What `dist` produced.
#[derive(Debug, Serialize)]
pub struct DistOutput {
    pub board: String,
    pub rust_target: String,
    pub target_cpu: String,
    pub builder: String,
    pub binary: PathBuf,
    pub size_bytes: u64,
    pub glibc_floor: String,
    /// The newest GLIBC_x.y symbol version the binary needs.
    pub glibc_required: Option<String>,
    /// The newest GLIBCXX_x.y.z the binary needs from the board's libstdc++ (llama.cpp is C++).
    pub glibcxx_required: Option<String>,
    /// The `-march` llama.cpp and the other C/C++ code were compiled for; `None` when
    /// llama-cpp-sys-2's own choice stands (`armv8-a` on aarch64, ggml's default set on x86-64).
    pub c_march: Option<String>,
    /// Engine libraries for the board (`--engine-libs`), taken from the pinned wheels.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub engine_libs: Vec<EngineLib>,
}

/// An engine's shared library for the board, from its Python package's wheel.
#[derive(Debug, Serialize)]
pub struct EngineLib {
    pub engine: String,
    pub version: String,
    pub path: PathBuf,
    pub glibc_required: Option<String>,
}

/// The engines loaded at run time, with the wheel that carries each one's C library:
/// (engine, package, version, library inside the wheel, its name in `lib/`). The name carries
/// the version, which the runtime reports (LiteRT's C API has no version call).
const ENGINE_WHEELS: &[(&str, &str, &str, &str, &str)] = &[
    (
        "onnxruntime",
        "onnxruntime",
        "1.31.1",
        "onnxruntime/capi/libonnxruntime.so.1.31.1",
        "libonnxruntime.so.1.31.1",
    ),
    (
        "litert",
        "ai-edge-litert",
        "2.3.0",
        "ai_edge_litert/libLiteRt.so",
        "libLiteRt.so.2.3.0",
    ),
];

/// Fetches (pip, cached) the wheel of each engine the profile runs for the board's CPU,
/// extracts the library into `out_dir/lib/`, and checks its ELF machine and glibc needs.
fn engine_libs(profile: &Profile, out_dir: &Path) -> Result<Vec<EngineLib>> {
    let py = crate::util::cache_dir().join("venv/bin/python");
    if !py.is_file() {
        bail!(
            "--engine-libs needs the peer venv at {}\nhint: cargo xtask setup",
            py.display()
        );
    }
    let arch = profile.arch();
    let wheels = crate::util::cache_dir().join("wheels").join(arch);
    let lib_dir = out_dir.join("lib");
    std::fs::create_dir_all(&lib_dir)?;
    let mut out = Vec::new();
    for &(engine, package, version, member, file) in ENGINE_WHEELS {
        if !profile.runtime.values().any(|e| e == engine) {
            continue;
        }
        // The tags these wheels are published for (onnxruntime 2_28, ai-edge-litert 2_27);
        // what glibc the library really needs is checked below.
        run(Command::new(&py)
            .args([
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args([
                "--only-binary=:all:",
                "--no-deps",
                "--python-version",
                "3.11",
            ])
            .args(["--platform", &format!("manylinux_2_28_{arch}")])
            .args(["--platform", &format!("manylinux_2_27_{arch}")])
            .arg(format!("{package}=={version}"))
            .arg("-d")
            .arg(&wheels))?;
        let dst = lib_dir.join(file);
        // Written aside and renamed: concurrent test runs read the library while another
        // run refreshes it.
        let code = "import os, sys, zipfile, glob\n\
                    w = sorted(glob.glob(sys.argv[1]))[-1]\n\
                    tmp = '%s.%d.tmp' % (sys.argv[3], os.getpid())\n\
                    open(tmp, 'wb').write(zipfile.ZipFile(w).read(sys.argv[2]))\n\
                    os.replace(tmp, sys.argv[3])";
        run(Command::new(&py)
            .args(["-c", code])
            .arg(wheels.join(format!(
                "{}-{version}-*{arch}.whl",
                package.replace('-', "_")
            )))
            .arg(member)
            .arg(&dst))?;
        check_machine(&dst, arch)?;
        let (glibc, _) = version_needs(&dst)?;
        let need = glibc.last().cloned();
        if let (Some(n), Some(floor)) = (
            need.as_deref()
                .and_then(|n| parse_version(n.trim_start_matches("GLIBC_"))),
            parse_version(&profile.glibc_floor),
        ) {
            if n > floor {
                bail!(
                    "{} (from {package} {version}) needs {}, but board {} guarantees only glibc {}",
                    dst.display(),
                    need.as_deref().unwrap_or_default(),
                    profile.name,
                    profile.glibc_floor
                );
            }
        }
        out.push(EngineLib {
            engine: engine.to_string(),
            version: version.to_string(),
            path: dst,
            glibc_required: need,
        });
    }
    Ok(out)
}

/// GCC's `-march` for the board's C and C++ code, from the profile's ISA features; `None`
/// when the board has none beyond Armv8.0-A (or is not aarch64).
pub fn c_march(profile: &Profile) -> Option<String> {
    let cpu = &profile.cpu;
    if profile.arch() != "aarch64" || !(cpu.dotprod || cpu.fp16 || cpu.i8mm) {
        return None;
    }
    // GCC takes each of these extensions on Armv8.2-A.
    let mut march = "armv8.2-a".to_string();
    for (on, ext) in [
        (cpu.dotprod, "+dotprod"),
        (cpu.fp16, "+fp16"),
        (cpu.i8mm, "+i8mm"),
    ] {
        if on {
            march.push_str(ext);
        }
    }
    Some(march)
}

/// A wrapper around `compiler` that appends `-march=<march>` to every call (the last `-march`
/// on a GCC command line wins), written under target/ and returned.
fn march_wrapper(compiler: &str, march: &str) -> Result<PathBuf> {
    let dir = root().join("target/xtask-cc").join(march);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(compiler);
    let script = format!(
        "#!/bin/sh\n# Written by `cargo xtask dist`: the board's instruction set after any -march.\n\
         exec {compiler} \"$@\" -march={march}\n"
    );
    if std::fs::read_to_string(&path).ok().as_deref() != Some(script.as_str()) {
        let tmp = dir.join(format!(".{compiler}.tmp"));
        std::fs::write(&tmp, &script).with_context(|| format!("writing {}", tmp.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(path)
}

/// The board's profile: a built-in name or a TOML file.
pub fn profile(board: &str) -> Result<Profile> {
    let path = Path::new(board);
    if path.extension().is_some_and(|e| e == "toml") {
        return Profile::load(path).with_context(|| format!("reading profile {board}"));
    }
    Profile::builtin(board).with_context(|| format!("--target {board}"))
}

fn host_triple() -> Result<String> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("rustc -vV printed no host line")
}

/// Whether a container engine actually answers (a docker client alone is not enough).
fn container_engine() -> Option<&'static str> {
    ["docker", "podman"].into_iter().find(|engine| {
        Command::new(engine)
            .arg("info")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
}

fn on_path(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The Debian cross toolchain prefix for a Rust triple (`aarch64-unknown-linux-gnu` ->
/// `aarch64-linux-gnu`).
fn gnu_prefix(triple: &str) -> String {
    triple.replacen("-unknown-", "-", 1)
}

pub fn dist(board: &str, with_engine_libs: bool) -> Result<DistOutput> {
    let profile = profile(board)?;
    let triple = profile.rust_target.clone();
    let host = host_triple()?;
    let cross_build = triple != host;

    let mut cmd;
    let builder;
    let mut march = c_march(&profile);
    let engine = if cross_build {
        container_engine()
    } else {
        None
    };
    if let (Some(engine), true) = (engine, on_path("cross")) {
        builder = format!("cross ({engine})");
        cmd = Command::new("cross");
        cmd.env("CROSS_CONTAINER_ENGINE", engine);
        cmd.args(["rustc", "--release"]);
        // The container's compilers are its own; llama-cpp-sys-2's baseline stands there.
        march = None;
    } else {
        cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["rustc", "--release"]);
        if cross_build {
            let prefix = gnu_prefix(&triple);
            let gcc = format!("{prefix}-gcc");
            if !on_path(&gcc) {
                bail!(
                    "no cross compiler for {triple}: `{gcc}` is not on PATH and no Docker/Podman engine runs\n\
                     hint: apt-get install gcc-{prefix} g++-{prefix} (Debian), and rustup target add {triple}"
                );
            }
            let var = triple.replace('-', "_");
            let upper = var.to_uppercase();
            let gxx = format!("{prefix}-g++");
            let (cc, cxx) = match &march {
                Some(m) => (march_wrapper(&gcc, m)?, march_wrapper(&gxx, m)?),
                None => (PathBuf::from(&gcc), PathBuf::from(&gxx)),
            };
            cmd.env(format!("CARGO_TARGET_{upper}_LINKER"), &gcc)
                .env(format!("CC_{var}"), &cc)
                .env(format!("CXX_{var}"), &cxx)
                .env(format!("AR_{var}"), format!("{prefix}-ar"))
                // llama.cpp's CMake must not probe the build machine's CPU.
                .env("CMAKE_SYSTEM_NAME", "Linux")
                .env("CMAKE_SYSTEM_PROCESSOR", profile.arch())
                // Libraries and headers come from the target's tree only: the build machine's
                // OpenSSL (which llama.cpp's optional HTTPS download code looks for) would
                // otherwise be linked into an aarch64 binary.
                .env("CMAKE_FIND_ROOT_PATH", format!("/usr/{prefix}"))
                .env("CMAKE_FIND_ROOT_PATH_MODE_PROGRAM", "NEVER")
                .env("CMAKE_FIND_ROOT_PATH_MODE_LIBRARY", "ONLY")
                .env("CMAKE_FIND_ROOT_PATH_MODE_INCLUDE", "ONLY")
                .env("CMAKE_FIND_ROOT_PATH_MODE_PACKAGE", "ONLY")
                // bindgen parses llama.h for the target, with the target's C headers.
                .env(
                    format!("BINDGEN_EXTRA_CLANG_ARGS_{var}"),
                    format!("--sysroot=/usr/{prefix}"),
                );
            builder = format!("cargo + {gcc}");
        } else {
            builder = "cargo".to_string();
            // A native build: llama-cpp-sys-2 already follows the host's target features.
            march = None;
        }
    }
    let var = triple.replace('-', "_");
    // The C/C++ side is tuned for the board's core; its instruction set comes from the
    // wrappers above (CFLAGS cannot carry it: the build script's `-march` comes after them).
    let tune = format!("-mtune={}", profile.target_cpu);
    cmd.env(format!("CFLAGS_{var}"), &tune)
        .env(format!("CXXFLAGS_{var}"), &tune)
        .env("GGML_NATIVE", "OFF")
        // What ships is stripped of debug info (below), so none is compiled: the workspace's
        // release line tables would cost every dependency's build time for nothing.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false");
    cmd.current_dir(root())
        .args([
            "-p",
            "edgepack-runtime",
            "--bin",
            "edgepack-runtime",
            "--target",
        ])
        .arg(&triple)
        // Only the final crate: a global target-cpu would reach llama-cpp-sys-2's build
        // script, which turns it into `-march=<cpu>`, a flag GCC rejects for Arm core names.
        .args(["--", "-C"])
        .arg(format!("target-cpu={}", profile.target_cpu))
        // Boards have small disks and the bundle hashes every byte: no debug info (llama.cpp's
        // included) in what ships.
        .args(["-C", "strip=debuginfo"]);
    run(&mut cmd).with_context(|| format!("building edgepack-runtime for {triple}"))?;

    let built = root()
        .join("target")
        .join(&triple)
        .join("release/edgepack-runtime");
    check_machine(&built, profile.arch())?;
    let (glibc, glibcxx) = version_needs(&built)?;
    let glibc_required = glibc.last().cloned();
    if let Some(need) = &glibc_required {
        let (n, floor) = (
            parse_version(need.trim_start_matches("GLIBC_")),
            parse_version(&profile.glibc_floor),
        );
        if let (Some(n), Some(floor)) = (n, floor) {
            if n > floor {
                bail!(
                    "{} needs {need}, but board {} guarantees only glibc {}: it would fail to start there\n\
                     hint: build against an older glibc with cargo-zigbuild (`cargo zigbuild --target {triple}.{}`), \
                     or raise glibc_floor if the board's image is newer (`ldd --version` on the board)",
                    built.display(),
                    profile.name,
                    profile.glibc_floor,
                    profile.glibc_floor
                );
            }
        }
    }

    let out_dir = root().join("target/dist").join(&profile.name);
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let binary = out_dir.join("edgepack-runtime");
    let tmp = out_dir.join(".edgepack-runtime.tmp");
    std::fs::copy(&built, &tmp)
        .with_context(|| format!("copying {} to {}", built.display(), tmp.display()))?;
    std::fs::rename(&tmp, &binary).with_context(|| format!("writing {}", binary.display()))?;
    let size_bytes = std::fs::metadata(&binary)?.len();
    let engine_libs = if with_engine_libs {
        engine_libs(&profile, &out_dir)?
    } else {
        Vec::new()
    };
    Ok(DistOutput {
        board: profile.name.clone(),
        rust_target: triple,
        target_cpu: profile.target_cpu.clone(),
        builder,
        binary,
        size_bytes,
        glibc_floor: profile.glibc_floor.clone(),
        glibc_required,
        glibcxx_required: glibcxx.last().cloned(),
        c_march: march,
        engine_libs,
    })
}

/// Prints what [`dist`] produced: one line, or JSON with `json`.
pub fn print(out: &DistOutput, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(out)?);
    } else {
        println!(
            "{} ({} for {}{}, {}; needs {} / {}, floor glibc {})",
            out.binary.display(),
            out.rust_target,
            out.target_cpu,
            out.c_march
                .as_deref()
                .map(|m| format!(", C/C++ -march={m}"))
                .unwrap_or_default(),
            out.builder,
            out.glibc_required.as_deref().unwrap_or("no glibc versions"),
            out.glibcxx_required
                .as_deref()
                .unwrap_or("no libstdc++ versions"),
            out.glibc_floor
        );
    }
    Ok(())
}

/// Fails unless the ELF file is built for the profile's architecture.
fn check_machine(path: &Path, arch: &str) -> Result<()> {
    Ok(edgepack_targets::elf::expect_machine(path, arch)?)
}

/// The GLIBC_* and GLIBCXX_* symbol versions the binary needs, each sorted oldest first.
pub fn version_needs(path: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let out = Command::new("readelf")
        .args(["-V", "--wide"])
        .arg(path)
        .output()
        .context("running readelf (binutils)")?;
    if !out.status.success() {
        bail!(
            "readelf -V {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // Only the needs (.gnu.version_r), not the versions the binary itself defines.
    let needs = text
        .split("Version needs section")
        .nth(1)
        .unwrap_or_default();
    let mut glibc = Vec::new();
    let mut glibcxx = Vec::new();
    for word in needs.split_whitespace() {
        for (prefix, list) in [("GLIBCXX_", &mut glibcxx), ("GLIBC_", &mut glibc)] {
            if let Some(v) = word.strip_prefix(prefix) {
                if parse_version(v).is_some() && !list.contains(&word.to_string()) {
                    list.push(word.to_string());
                }
                break;
            }
        }
    }
    let key = |s: &String| parse_version(s.rsplit('_').next().unwrap_or("")).unwrap_or_default();
    glibc.sort_by_key(key);
    glibcxx.sort_by_key(key);
    Ok((glibc, glibcxx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_march_follows_the_profiles_isa_features() {
        let march = |b: &str| c_march(&Profile::builtin(b).unwrap());
        assert_eq!(march("imx8mp"), None, "Cortex-A53 is Armv8.0-A");
        assert_eq!(march("imx93").as_deref(), Some("armv8.2-a+dotprod+fp16"));
        assert_eq!(march("imx95").as_deref(), Some("armv8.2-a+dotprod+fp16"));
        assert_eq!(march("rpi5").as_deref(), Some("armv8.2-a+dotprod+fp16"));
        assert_eq!(march("generic-aarch64"), None);
        assert_eq!(march("generic-x86_64"), None);
    }
}
