//! Finding an engine's shared library on the board: the runtime's `--engine-lib` first, then
//! the paths the board's profile lists (`[libraries]`, where the board image installs it),
//! then the bundle's own `lib/`. Every candidate is checked to be an ELF file for this CPU
//! before anything loads it, and a miss names every place searched.

use std::path::{Path, PathBuf};

use edgepack_targets::{elf, Profile};

/// Why no usable engine library was found.
#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    #[error("no {engine} library for this {format} bundle; searched:\n{searched}\nhint: install {engine} on the board image, pass --engine-lib PATH, or put the library in the bundle's lib/ (`edgepack bundle --engine-lib`)")]
    NotFound {
        engine: String,
        format: String,
        searched: String,
    },
    #[error(transparent)]
    Elf(#[from] edgepack_targets::BundleError),
}

/// File-name prefix of each engine's library (`libonnxruntime.so`, `libonnxruntime.so.1.17.1`).
pub fn file_prefix(engine: &str) -> Option<&'static str> {
    match engine {
        "onnxruntime" => Some("libonnxruntime.so"),
        "litert" => Some("libLiteRt.so"),
        _ => None,
    }
}

/// Where to look, and what was found.
pub struct Search<'a> {
    pub engine: &'a str,
    pub format: &'a str,
    /// `--engine-lib`, when given.
    pub explicit: Option<&'a Path>,
    /// The profile named in the manifest (`None` for a profile that is not built in).
    pub profile: Option<&'a Profile>,
    pub profile_name: &'a str,
    pub bundle_dir: &'a Path,
}

/// The library to load, checked for this CPU's architecture.
pub fn find(s: &Search<'_>) -> Result<PathBuf, LibraryError> {
    let arch = std::env::consts::ARCH;
    let mut searched = Vec::new();
    if let Some(p) = s.explicit {
        // Asked for by name: a wrong file is an error, not a reason to look elsewhere.
        elf::expect_machine(p, arch)?;
        return Ok(p.to_path_buf());
    }
    searched.push("  --engine-lib: not given".to_string());
    match s.profile {
        Some(profile) => {
            let listed = profile
                .libraries
                .get(s.engine)
                .map(Vec::as_slice)
                .unwrap_or_default();
            for p in listed {
                let p = Path::new(p);
                if p.is_file() {
                    elf::expect_machine(p, arch)?;
                    return Ok(p.to_path_buf());
                }
            }
            searched.push(format!(
                "  [libraries].{} of profile {}: {}",
                s.engine,
                s.profile_name,
                if listed.is_empty() {
                    "lists none".to_string()
                } else {
                    format!("{} (none present)", listed.join(", "))
                }
            ));
        }
        None => searched.push(format!(
            "  profile {}: not built into this runtime, so no [libraries] paths",
            s.profile_name
        )),
    }
    let lib = s.bundle_dir.join("lib");
    if let Some(prefix) = file_prefix(s.engine) {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&lib)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix))
            })
            .collect();
        found.sort();
        if let Some(p) = found.into_iter().next() {
            elf::expect_machine(&p, arch)?;
            return Ok(p);
        }
        searched.push(format!("  {}: no {prefix}*", lib.display()));
    }
    Err(LibraryError::NotFound {
        engine: s.engine.to_string(),
        format: s.format.to_string(),
        searched: searched.join("\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_miss_names_every_place_searched() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::builtin("imx95").unwrap();
        let e = find(&Search {
            engine: "onnxruntime",
            format: "onnx",
            explicit: None,
            profile: Some(&profile),
            profile_name: "imx95",
            bundle_dir: dir.path(),
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("--engine-lib"), "{e}");
        assert!(
            e.contains("[libraries].onnxruntime of profile imx95")
                && e.contains("/usr/lib/libonnxruntime.so"),
            "{e}"
        );
        assert!(e.contains("lib: no libonnxruntime.so*"), "{e}");
    }

    #[test]
    fn a_library_for_another_cpu_is_refused_with_its_machine() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("lib")).unwrap();
        let mut head = vec![0u8; 64];
        head[..4].copy_from_slice(b"\x7fELF");
        let other: u16 = if std::env::consts::ARCH == "aarch64" {
            0x3E
        } else {
            0xB7
        };
        head[18..20].copy_from_slice(&other.to_le_bytes());
        std::fs::write(dir.path().join("lib/libonnxruntime.so.1.31.1"), &head).unwrap();
        let e = find(&Search {
            engine: "onnxruntime",
            format: "onnx",
            explicit: None,
            profile: None,
            profile_name: "custom",
            bundle_dir: dir.path(),
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("libonnxruntime.so.1.31.1") && e.contains("built for"),
            "{e}"
        );
    }
}
