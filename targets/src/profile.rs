//! Board profiles: what a target is (CPU, ISA features, RAM variants, memory bandwidth, NPU and
//! what it accepts, Rust triple, glibc floor, default format and precision, runtime engine per
//! format). Profiles are TOML data files: the built-in ones live in `targets/profiles/` and are
//! embedded in the binary; a user adds a board with their own file. Code reads profiles and
//! never switches on board names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors reading or checking a profile; each names the profile (file) and the field.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("unknown target `{name}`; built-in targets: {known}\nhint: `edgepack targets list`, or describe your board in a TOML file and pass --profile FILE")]
    Unknown { name: String, known: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: field `{field}`: {message}")]
    Invalid {
        origin: String,
        field: String,
        message: String,
    },
}

/// The CPU of a board.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cpu {
    /// Core model, e.g. `Cortex-A55`.
    pub model: String,
    pub cores: u32,
    /// Maximum clock of the application cores.
    pub clock_ghz: f64,
    /// SDOT/UDOT (Armv8.2 dot product): int8 kernels four times wider per instruction.
    pub dotprod: bool,
    /// SMMLA (Armv8.6 int8 matrix multiply).
    pub i8mm: bool,
    /// Half-precision arithmetic (FEAT_FP16).
    pub fp16: bool,
    /// What `rustc --print cfg -C target-cpu=...` reports, for the record.
    #[serde(default)]
    pub llvm_features: Vec<String>,
}

/// DRAM of a board.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Memory {
    /// RAM of the board variants one can buy, in MiB, smallest first.
    pub ram_variants_mib: Vec<u64>,
    /// Theoretical peak bandwidth in GB/s (10^9 bytes per second).
    pub bandwidth_gbs: f64,
    /// Measured sustained bandwidth in GB/s, where a source gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_sustained_gbs: Option<f64>,
    /// RAM the operating system keeps for itself (kernel, CMA, systemd, services), in MiB.
    pub os_reserved_mib: u64,
}

/// An NPU and what it accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Npu {
    pub name: String,
    /// Vendor-quoted int8 throughput.
    pub tops: f64,
    /// Model formats its delegate or execution provider takes (`tflite`, `onnx`).
    pub formats: Vec<String>,
    /// The offline compiler or delegate that maps a graph onto it.
    pub compiler: String,
    /// Weight quantization granularities it runs: `per-tensor`, `per-channel`.
    pub int8_weights: Vec<String>,
    /// The granularity to emit when both run but one is much faster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_int8_weights: Option<String>,
    /// TFLite builtin operators it executes; anything else falls back to the CPU. Left out
    /// when the vendor publishes no list: then every operator not in `cpu_ops` counts as taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<Vec<String>>,
    /// Operators known to run on the CPU even where `ops` would let them through.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_ops: Vec<String>,
    /// It computes in integers only: an operator with a float input or output runs on the CPU.
    #[serde(default = "integer_only_default")]
    pub integer_only: bool,
    /// The TFLite external delegate that reaches it, as the board image installs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegate: Option<Delegate>,
    /// Arm's Vela settings, for Ethos-U NPUs whose models are compiled ahead of time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vela: Option<VelaConfig>,
}

/// How Vela compiles for the board: its `--accelerator-config`, and the system
/// configuration and memory mode from a Vela configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VelaConfig {
    pub accelerator: String,
    /// `--config`: a file, or one Vela ships (`Arm/vela.ini`).
    pub config: String,
    pub system_config: String,
    pub memory_mode: String,
}

/// A TFLite external delegate (a shared library exporting `tflite_plugin_create_delegate`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delegate {
    /// Short name recorded in manifests and reported by the runtime (`vx`, `ethos-u`).
    pub name: String,
    /// Where board images install the library, searched in order.
    pub paths: Vec<String>,
}

fn integer_only_default() -> bool {
    true
}

impl Npu {
    /// Whether its delegate or compiler takes `format` (`tflite`, `onnx`).
    pub fn takes(&self, format: &str) -> bool {
        self.formats.iter().any(|f| f == format)
    }

    /// Whether it runs int8 weights with one scale per output channel.
    pub fn per_channel(&self) -> bool {
        self.int8_weights.iter().any(|g| g == "per-channel")
    }
}

/// What to produce when the user does not say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Model format: `gguf`, `onnx` or `tflite`.
    pub format: String,
    /// Quantization preset or precision for that format, e.g. `Q4_0`.
    pub precision: String,
    /// Precision per other format, when the board prefers one (`onnx = "int8"`); formats not
    /// listed get [`Profile::precision_for`]'s general default.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_format: BTreeMap<String, String>,
}

/// One board.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The name used on the command line and in bundle names.
    pub name: String,
    pub description: String,
    /// Rust target triple the runtime is built for.
    pub rust_target: String,
    /// `-C target-cpu` for the runtime (`cortex-a53`, `cortex-a55`, `cortex-a76`, `generic`).
    pub target_cpu: String,
    /// Oldest glibc of the board's supported OS images, e.g. "2.35".
    pub glibc_floor: String,
    pub cpu: Cpu,
    pub memory: Memory,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub npu: Option<Npu>,
    pub defaults: Defaults,
    /// Runtime engine per model format, e.g. `gguf = "llama.cpp"`.
    pub runtime: BTreeMap<String, String>,
    /// Where the board image keeps the shared libraries of engines loaded at run time, per
    /// engine (`onnxruntime = ["/usr/lib/libonnxruntime.so", ...]`), searched in order after
    /// the runtime's command line and before the bundle's own `lib/`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub libraries: BTreeMap<String, Vec<String>>,
}

/// The profiles shipped in the binary, in listing order.
const BUILTIN: &[(&str, &str)] = &[
    ("imx8mp", include_str!("../profiles/imx8mp.toml")),
    ("imx93", include_str!("../profiles/imx93.toml")),
    ("imx95", include_str!("../profiles/imx95.toml")),
    ("rpi5", include_str!("../profiles/rpi5.toml")),
    (
        "generic-aarch64",
        include_str!("../profiles/generic-aarch64.toml"),
    ),
    (
        "generic-x86_64",
        include_str!("../profiles/generic-x86_64.toml"),
    ),
];

/// Model formats a profile may name.
pub const FORMATS: &[&str] = &["gguf", "onnx", "tflite"];

impl Profile {
    /// A built-in profile by name.
    pub fn builtin(name: &str) -> Result<Profile, TargetError> {
        let (_, text) =
            BUILTIN
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| TargetError::Unknown {
                    name: name.to_string(),
                    known: Self::builtin_names().join(", "),
                })?;
        Self::parse(text, &format!("built-in profile {name}"))
    }

    /// Names of the built-in profiles.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(n, _)| *n).collect()
    }

    /// Every built-in profile, in listing order.
    pub fn all_builtin() -> Vec<Profile> {
        BUILTIN
            .iter()
            .map(|(n, t)| {
                Self::parse(t, n).unwrap_or_else(|e| panic!("built-in profile {n} is broken: {e}"))
            })
            .collect()
    }

    /// A profile from a user's TOML file.
    pub fn load(path: &Path) -> Result<Profile, TargetError> {
        let text = std::fs::read_to_string(path).map_err(|source| TargetError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks profile text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Profile, TargetError> {
        let p: Profile = toml::from_str(text).map_err(|e| TargetError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        p.check(origin)?;
        Ok(p)
    }

    fn check(&self, origin: &str) -> Result<(), TargetError> {
        let bad = |field: &str, message: String| TargetError::Invalid {
            origin: origin.to_string(),
            field: field.to_string(),
            message,
        };
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad(
                "name",
                format!(
                    "`{}`: use letters, digits, `-` and `_` (it names bundles)",
                    self.name
                ),
            ));
        }
        if self.rust_target.split('-').count() < 3 {
            return Err(bad(
                "rust_target",
                format!("`{}` is not a target triple", self.rust_target),
            ));
        }
        if parse_version(&self.glibc_floor).is_none() {
            return Err(bad(
                "glibc_floor",
                format!("`{}` is not a version like 2.35", self.glibc_floor),
            ));
        }
        if self.cpu.cores == 0 {
            return Err(bad("cpu.cores", "must be at least 1".into()));
        }
        if self.memory.ram_variants_mib.is_empty() || self.memory.ram_variants_mib.contains(&0) {
            return Err(bad(
                "memory.ram_variants_mib",
                "list the RAM of each board variant in MiB".into(),
            ));
        }
        if !self.memory.ram_variants_mib.is_sorted() {
            return Err(bad(
                "memory.ram_variants_mib",
                "list the variants smallest first".into(),
            ));
        }
        if self.memory.bandwidth_gbs.is_nan() || self.memory.bandwidth_gbs <= 0.0 {
            return Err(bad("memory.bandwidth_gbs", "must be positive".into()));
        }
        for f in self.runtime.keys() {
            if !FORMATS.contains(&f.as_str()) {
                return Err(bad(
                    &format!("runtime.{f}"),
                    format!("unknown format; formats: {}", FORMATS.join(", ")),
                ));
            }
        }
        if !self.runtime.contains_key(&self.defaults.format) {
            return Err(bad(
                "defaults.format",
                format!("`{}` has no engine in [runtime]", self.defaults.format),
            ));
        }
        if let Some(npu) = &self.npu {
            for f in &npu.formats {
                if !FORMATS.contains(&f.as_str()) {
                    return Err(bad("npu.formats", format!("unknown format `{f}`")));
                }
            }
            let named = npu.ops.iter().flatten().map(|o| ("npu.ops", o));
            for (field, op) in named.chain(npu.cpu_ops.iter().map(|o| ("npu.cpu_ops", o))) {
                let upper = |c: char| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_';
                if op.is_empty() || !op.chars().all(upper) {
                    return Err(bad(
                        field,
                        format!("`{op}`: use TFLite builtin operator names, e.g. FULLY_CONNECTED"),
                    ));
                }
            }
            for g in npu.int8_weights.iter().chain(&npu.preferred_int8_weights) {
                if g != "per-tensor" && g != "per-channel" {
                    return Err(bad(
                        "npu.int8_weights",
                        format!("`{g}`: use per-tensor or per-channel"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The engine that runs `format` on this board, if any.
    /// The precision to build `format` at when none is asked for: the profile's default for
    /// its default format, its `[defaults.by_format]` entry, else Q4_0 (GGUF), int4 (ONNX),
    /// int8 (TFLite).
    pub fn precision_for(&self, format: &str) -> &str {
        if format == self.defaults.format {
            return &self.defaults.precision;
        }
        if let Some(p) = self.defaults.by_format.get(format) {
            return p;
        }
        match format {
            "onnx" => "int4",
            "tflite" => "int8",
            _ => "Q4_0",
        }
    }

    pub fn engine(&self, format: &str) -> Option<&str> {
        self.runtime.get(format).map(String::as_str)
    }

    /// The CPU architecture part of the triple (`aarch64`, `x86_64`).
    pub fn arch(&self) -> &str {
        self.rust_target.split('-').next().unwrap_or("")
    }
}

/// A dotted version as numbers ("2.35" -> [2, 35]), for comparing glibc versions.
pub fn parse_version(v: &str) -> Option<Vec<u32>> {
    let parts: Option<Vec<u32>> = v.split('.').map(|p| p.parse().ok()).collect();
    parts.filter(|p| !p.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_profile_parses_and_is_named_like_its_file() {
        for (file, _) in BUILTIN {
            let p = Profile::builtin(file).unwrap();
            assert_eq!(&p.name, file);
        }
        assert_eq!(Profile::all_builtin().len(), BUILTIN.len());
    }

    #[test]
    fn unknown_target_lists_the_known_ones() {
        let e = Profile::builtin("imx6").unwrap_err().to_string();
        assert!(e.contains("imx6") && e.contains("imx93"), "{e}");
    }

    #[test]
    fn a_bad_field_is_named() {
        let text = include_str!("../profiles/imx93.toml").replace("\"2.35\"", "\"two\"");
        let e = Profile::parse(&text, "my.toml").unwrap_err().to_string();
        assert!(e.contains("my.toml") && e.contains("glibc_floor"), "{e}");
        let text =
            include_str!("../profiles/imx93.toml").replace("cores = 2", "cores = 2\nbogus = 1");
        let e = Profile::parse(&text, "my.toml").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
    }
}
