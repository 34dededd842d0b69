//! Arm's Vela compiler (`ethos-u-vela`) for Ethos-U boards: compiles a full-integer `.tflite`
//! for the board's NPU configuration and reads back what it placed where.
//!
//! Vela replaces each run of operators it can map with one `ethos-u` custom operator that the
//! board's Ethos-U delegate executes; the rest stay TFLite operators for the CPU. Its summary
//! CSV gives memory use and the performance estimate; its console output gives the operator
//! counts and, for each operator left on the CPU, the reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use edgepack_targets::profile::VelaConfig;
use serde::Serialize;

/// Why Vela could not be run or its report read.
#[derive(Debug, thiserror::Error)]
pub enum VelaError {
    #[error("cannot run Vela ({program}): {reason}\nhint: pip install ethos-u-vela==5.2.0 (or pass --vela PATH), or --no-vela to bundle the CPU model only")]
    NotFound { program: String, reason: String },
    #[error("Vela failed on {} ({status}):\n{output}", model.display())]
    Failed {
        model: PathBuf,
        status: String,
        output: String,
    },
    #[error("{}: {message}", file.display())]
    Report { file: PathBuf, message: String },
}

/// One kind of operator Vela left on the CPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CpuFallback {
    pub op: String,
    /// Vela's first reason line for it.
    pub reason: String,
    pub count: usize,
}

/// What Vela did with the graph.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VelaReport {
    pub version: String,
    pub accelerator: String,
    pub system_config: String,
    pub memory_mode: String,
    pub npu_operators: usize,
    pub cpu_operators: usize,
    /// Operators left on the CPU, most frequent first.
    pub cpu_fallbacks: Vec<CpuFallback>,
    pub sram_used_kib: f64,
    pub dram_used_kib: f64,
    /// Weights before and after Vela's encoding, in bytes.
    pub original_weight_bytes: u64,
    pub encoded_weight_bytes: u64,
    pub macs: u64,
    /// Vela's estimate for one call of every signature in the file (prefill and decode),
    /// NPU work and memory traffic only: CPU operators are not counted.
    pub cycles_total: u64,
    pub cycles_npu: u64,
    pub inference_time_s: f64,
    pub core_clock_hz: f64,
    /// Plain words on whether the graph fits the NPU, and why not.
    pub verdict: String,
    /// The compiled model (`<stem>_vela.tflite`).
    #[serde(skip)]
    pub compiled: PathBuf,
}

/// The Vela version `program` reports.
pub fn version(program: &Path) -> Result<String, VelaError> {
    let out = Command::new(program)
        .arg("--version")
        .output()
        .map_err(|e| VelaError::NotFound {
            program: program.display().to_string(),
            reason: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(VelaError::NotFound {
            program: program.display().to_string(),
            reason: format!("`--version` exited with {}", out.status),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Compiles `model` with `program` for `cfg` into `out_dir` and reads the report.
pub fn compile(
    program: &Path,
    model: &Path,
    cfg: &VelaConfig,
    out_dir: &Path,
) -> Result<VelaReport, VelaError> {
    let version = version(program)?;
    let out = Command::new(program)
        .arg(model)
        .args(["--accelerator-config", &cfg.accelerator])
        .args(["--config", &cfg.config])
        .args(["--system-config", &cfg.system_config])
        .args(["--memory-mode", &cfg.memory_mode])
        .arg("--output-dir")
        .arg(out_dir)
        .output()
        .map_err(|e| VelaError::NotFound {
            program: program.display().to_string(),
            reason: e.to_string(),
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        return Err(VelaError::Failed {
            model: model.to_path_buf(),
            status: out.status.to_string(),
            output: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let compiled = out_dir.join(format!("{stem}_vela.tflite"));
    if !compiled.is_file() {
        return Err(VelaError::Report {
            file: compiled,
            message: "Vela exited 0 but wrote no compiled model".into(),
        });
    }
    let csv_path = out_dir.join(format!("{stem}_summary_{}.csv", cfg.system_config));
    let csv = std::fs::read_to_string(&csv_path).map_err(|e| VelaError::Report {
        file: csv_path.clone(),
        message: e.to_string(),
    })?;
    parse(&text, &csv, &csv_path, version, compiled)
}

/// Reads Vela's console output and summary CSV.
pub fn parse(
    console: &str,
    csv: &str,
    csv_path: &Path,
    version: String,
    compiled: PathBuf,
) -> Result<VelaReport, VelaError> {
    let bad = |message: String| VelaError::Report {
        file: csv_path.to_path_buf(),
        message,
    };
    let mut lines = csv.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| bad("empty summary".into()))?
        .split(',')
        .collect();
    let row: Vec<&str> = lines
        .next()
        .ok_or_else(|| bad("no data row".into()))?
        .split(',')
        .collect();
    if header.len() != row.len() {
        return Err(bad(format!(
            "{} columns in the header, {} in the row",
            header.len(),
            row.len()
        )));
    }
    let field = |name: &str| -> Result<&str, VelaError> {
        header
            .iter()
            .position(|h| h.trim() == name)
            .map(|i| row[i].trim())
            .ok_or_else(|| bad(format!("field {name}: missing")))
    };
    let number = |name: &str| -> Result<f64, VelaError> {
        let v = field(name)?;
        v.parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| bad(format!("field {name}: `{v}` is not a non-negative number")))
    };
    let count = |name: &str| -> Result<u64, VelaError> {
        let v = field(name)?;
        v.parse::<u64>()
            .map_err(|_| bad(format!("field {name}: `{v}` is not a whole number")))
    };

    let console_bad = |message: String| VelaError::Report {
        file: PathBuf::from("<vela output>"),
        message,
    };
    let ops = |prefix: &str| -> Result<usize, VelaError> {
        console
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| {
                rest.trim()
                    .trim_start_matches('=')
                    .split_whitespace()
                    .next()
            })
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| console_bad(format!("no `{prefix} = N` line")))
    };
    let npu_operators = ops("NPU operators")?;
    let cpu_operators = ops("CPU operators")?;

    // "Warning (supported operators) operator: OP, ofm: 'name'" then "Reason: ...".
    let mut fallbacks: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut it = console.lines().peekable();
    while let Some(l) = it.next() {
        let Some(rest) = l
            .trim()
            .strip_prefix("Warning (supported operators) operator:")
        else {
            continue;
        };
        let op = match rest.split(',').next().unwrap_or("").trim() {
            // Vela names operators from its own table; newer TFLite ones print as None.
            "None" => "(unknown to Vela)".to_string(),
            o => o.to_string(),
        };
        let reason = it
            .peek()
            .and_then(|n| n.trim().strip_prefix("Reason:"))
            .map(|r| r.trim().to_string())
            .unwrap_or_default();
        *fallbacks.entry((op, reason)).or_insert(0) += 1;
    }
    let mut cpu_fallbacks: Vec<CpuFallback> = fallbacks
        .into_iter()
        .map(|((op, reason), count)| CpuFallback { op, reason, count })
        .collect();
    cpu_fallbacks.sort_by(|a, b| b.count.cmp(&a.count).then(a.op.cmp(&b.op)));

    let mut r = VelaReport {
        version,
        accelerator: field("accelerator_configuration")?.to_string(),
        system_config: field("system_config")?.to_string(),
        memory_mode: field("memory_mode")?.to_string(),
        npu_operators,
        cpu_operators,
        cpu_fallbacks,
        sram_used_kib: number("sram_memory_used")?,
        dram_used_kib: number("dram_memory_used")?,
        original_weight_bytes: count("total_original_weights")?,
        encoded_weight_bytes: count("total_npu_encoded_weights")?,
        macs: count("nn_macs")?,
        cycles_total: count("cycles_total")?,
        cycles_npu: count("cycles_npu")?,
        inference_time_s: number("inference_time")?,
        core_clock_hz: number("core_clock")?,
        verdict: String::new(),
        compiled,
    };
    r.verdict = verdict(&r);
    Ok(r)
}

fn verdict(r: &VelaReport) -> String {
    let total = r.npu_operators + r.cpu_operators;
    if r.npu_operators == 0 {
        return format!(
            "nothing runs on the {}: Vela mapped none of the {total} operators",
            r.accelerator
        );
    }
    let weights = format!(
        "its {:.0} MiB of encoded weights stream from DRAM each call",
        r.encoded_weight_bytes as f64 / (1u64 << 20) as f64
    );
    if r.cpu_operators == 0 {
        return format!("the whole graph runs on the {}; {weights}", r.accelerator);
    }
    let reasons: Vec<String> = r
        .cpu_fallbacks
        .iter()
        .take(3)
        .map(|f| format!("{} x{} ({})", f.op, f.count, f.reason))
        .collect();
    format!(
        "the graph does not fit the {} whole: {} of {total} operators stay on the CPU ({}), so every layer hands tensors between NPU and CPU through DRAM; {weights}",
        r.accelerator,
        r.cpu_operators,
        reasons.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "experiment,network,accelerator_configuration,system_config,memory_mode,core_clock,sram_memory_used,dram_memory_used,total_original_weights,total_npu_encoded_weights,nn_macs,cycles_npu,cycles_total,inference_time\n\
default,m,Ethos_U65_256,Ethos_U65_High_End,Dedicated_Sram,1000000000.0,324.0,243847.1875,269456384,242234528,4504825017,109122225,167777448,0.167777448\n";

    const CONSOLE: &str =
        "Warning (supported operators) operator: BATCH_MATMUL, ofm: 'attn;4005'\n\
Reason: Matmul with unsupported IFM type\n\
IF Matmul or (FC with dynamic weights): IFM precision must be Int8\n\n\
Warning (supported operators) operator: SELECT_V2, ofm: 'masked;4002'\n\
Reason: Unsupported opType\n\n\
Warning (supported operators) operator: BATCH_MATMUL, ofm: 'scores;4000'\n\
Reason: Matmul with unsupported IFM type\n\n\
CPU operators = 918 (10.4%)\n\
NPU operators = 7878 (89.6%)\n";

    #[test]
    fn the_summary_and_console_give_counts_reasons_memory_and_the_estimate() {
        let r = parse(
            CONSOLE,
            CSV,
            Path::new("s.csv"),
            "5.2.0".into(),
            PathBuf::from("m_vela.tflite"),
        )
        .unwrap();
        assert_eq!((r.npu_operators, r.cpu_operators), (7878, 918));
        assert_eq!(r.cpu_fallbacks[0].op, "BATCH_MATMUL");
        assert_eq!(r.cpu_fallbacks[0].count, 2);
        assert_eq!(
            r.cpu_fallbacks[0].reason,
            "Matmul with unsupported IFM type"
        );
        assert_eq!(r.cpu_fallbacks[1].op, "SELECT_V2");
        assert_eq!(r.sram_used_kib, 324.0);
        assert_eq!(r.cycles_total, 167777448);
        assert!((r.inference_time_s - 0.167777448).abs() < 1e-12);
        assert_eq!(r.accelerator, "Ethos_U65_256");
        assert!(
            r.verdict.contains("918 of 8796 operators stay on the CPU"),
            "{}",
            r.verdict
        );
    }

    #[test]
    fn a_damaged_summary_names_the_file_and_field() {
        let csv = CSV.replace("167777448,0.167", "lots,0.167");
        let e = parse(
            CONSOLE,
            &csv,
            Path::new("s.csv"),
            String::new(),
            PathBuf::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("s.csv") && e.contains("cycles_total"), "{e}");
        let e = parse(
            CONSOLE,
            "a,b\n1\n",
            Path::new("s.csv"),
            String::new(),
            PathBuf::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("columns"), "{e}");
        let e = parse("", CSV, Path::new("s.csv"), String::new(), PathBuf::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("NPU operators"), "{e}");
    }
}
