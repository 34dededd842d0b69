//! Which operators a board's NPU takes: checked against the ops and tensor types of a model
//! before it is written, so the user learns what will fall back to the CPU.
//!
//! The lists are data (one [`OpSupport`] per board) until board profiles carry them; each
//! entry cites where its facts come from (`/work/shared/facts/tflite_targets.md` §3).

use std::collections::BTreeMap;

use serde::Serialize;

use super::schema::{ModelDef, TensorType};
use crate::error::{Error, Result};

/// What an NPU of one board accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct OpSupport {
    pub board: &'static str,
    pub npu: &'static str,
    /// Operators the NPU compiler/delegate accepts; `None` when only exclusions are known.
    pub allow: Option<&'static [&'static str]>,
    /// Operators known to fall back even when the allow-list has them (or with no list).
    pub deny: &'static [&'static str],
    /// The NPU computes in integers only: any op with a float input or output falls back.
    pub integer_only: bool,
    /// FULLY_CONNECTED with per-channel (per-axis) weight scales is accepted.
    pub per_channel_fc: bool,
    pub source: &'static str,
}

/// Arm Ethos-U65 via Vela (i.MX 93): Vela's supported-operator list for U55/U65.
const ETHOS_U65_OPS: &[&str] = &[
    "ABS",
    "ADD",
    "AVERAGE_POOL_2D",
    "CONCATENATION",
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "EXPAND_DIMS",
    "FULLY_CONNECTED",
    "HARD_SWISH",
    "LEAKY_RELU",
    "LOGISTIC",
    "MAXIMUM",
    "MAX_POOL_2D",
    "MEAN",
    "MINIMUM",
    "MUL",
    "PACK",
    "PAD",
    "PRELU",
    "QUANTIZE",
    "RELU",
    "RELU6",
    "RELU_N1_TO_1",
    "RESHAPE",
    "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR",
    "SHAPE",
    "SLICE",
    "SOFTMAX",
    "SPLIT",
    "SPLIT_V",
    "SQUEEZE",
    "STRIDED_SLICE",
    "SUB",
    "TANH",
    "TRANSPOSE_CONV",
    "UNPACK",
];

pub const BOARDS: &[OpSupport] = &[
    OpSupport {
        board: "imx93",
        npu: "Arm Ethos-U65 (Vela)",
        allow: Some(ETHOS_U65_OPS),
        deny: &[],
        integer_only: true,
        per_channel_fc: false,
        source: "Vela SUPPORTED_OPS.md (U55/U65): int8/int16 tensors, per-axis quantization only for convolutions",
    },
    OpSupport {
        board: "imx8mp",
        npu: "VeriSilicon NPU (VX delegate)",
        allow: None,
        deny: &[
            "BATCH_MATMUL",
            "DYNAMIC_UPDATE_SLICE",
            "GATHER",
            "EMBEDDING_LOOKUP",
            "CUSTOM",
        ],
        integer_only: true,
        per_channel_fc: true,
        source: "8/16-bit integer MACs (NXP AN13854); two-activation BATCH_MATMUL, DYNAMIC_UPDATE_SLICE, runtime-index GATHER and CUSTOM run on the CPU (tflite-vx-delegate#206, TIM-VX#316)",
    },
    OpSupport {
        board: "imx95",
        npu: "NXP eIQ Neutron (Neutron converter)",
        allow: None,
        deny: &["CUSTOM"],
        integer_only: true,
        per_channel_fc: true,
        source: "Neutron converter takes already-quantized models with 8-bit weights and 8/16-bit activations; unsupported parts stay on the Cortex-A55",
    },
];

/// Boards without an NPU: everything runs on the CPU, nothing to report.
pub const CPU_ONLY_BOARDS: &[&str] = &["rpi5"];

impl OpSupport {
    /// The NPU table of `board`; `Ok(None)` for a known board without an NPU.
    pub fn for_board(board: &str) -> Result<Option<OpSupport>> {
        if CPU_ONLY_BOARDS.contains(&board) {
            return Ok(None);
        }
        BOARDS
            .iter()
            .find(|b| b.board == board)
            .cloned()
            .map(Some)
            .ok_or_else(|| {
                let mut known: Vec<&str> = BOARDS.iter().map(|b| b.board).collect();
                known.extend(CPU_ONLY_BOARDS);
                Error::Invalid(format!(
                    "unknown target `{board}` (known: {})",
                    known.join(", ")
                ))
            })
    }

    /// Why `op` with these tensor types runs on the CPU, or `None` if the NPU takes it.
    fn reason(&self, op: &str, float_io: bool, per_channel: bool) -> Option<String> {
        if let Some(allow) = self.allow {
            if !allow.contains(&op) {
                return Some(format!("{op} is not in the {} operator list", self.npu));
            }
        }
        if self.deny.contains(&op) {
            return Some(format!("{op} runs on the CPU with the {}", self.npu));
        }
        if self.integer_only && float_io {
            return Some("float tensors (the NPU computes in 8/16-bit integers)".into());
        }
        if op == "FULLY_CONNECTED" && per_channel && !self.per_channel_fc {
            return Some("per-channel weight scales (only per-tensor is accepted)".into());
        }
        None
    }

    /// Every operator of `model` the NPU will not take, grouped by op and reason.
    pub fn check(&self, model: &ModelDef) -> TargetReport {
        let mut fallbacks: BTreeMap<(String, String), Fallback> = BTreeMap::new();
        let mut total = 0;
        let mut on_npu = 0;
        for sg in &model.subgraphs {
            for op in &sg.operators {
                total += 1;
                let tensors = op.inputs.iter().chain(&op.outputs).filter(|&&i| i >= 0);
                let float_io = tensors.clone().any(|&i| {
                    matches!(
                        sg.tensors[i as usize].dtype,
                        TensorType::Float32 | TensorType::Float16
                    )
                });
                let per_channel = tensors.clone().any(|&i| {
                    sg.tensors[i as usize]
                        .quantization
                        .as_ref()
                        .is_some_and(|q| q.scale.len() > 1)
                });
                match self.reason(op.op.name(), float_io, per_channel) {
                    None => on_npu += 1,
                    Some(reason) => {
                        let first = op
                            .outputs
                            .first()
                            .map(|&o| sg.tensors[o as usize].name.clone())
                            .unwrap_or_default();
                        let e = fallbacks
                            .entry((op.op.name().to_string(), reason.clone()))
                            .or_insert_with(|| Fallback {
                                op: op.op.name().to_string(),
                                reason,
                                count: 0,
                                first_output: format!("{}: {first}", sg.name),
                            });
                        e.count += 1;
                    }
                }
            }
        }
        TargetReport {
            board: self.board.to_string(),
            npu: self.npu.to_string(),
            operators: total,
            on_npu,
            cpu_fallbacks: fallbacks.into_values().collect(),
            source: self.source.to_string(),
        }
    }
}

/// What the target's NPU will not take.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    pub board: String,
    pub npu: String,
    pub operators: usize,
    pub on_npu: usize,
    pub cpu_fallbacks: Vec<Fallback>,
    pub source: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Fallback {
    pub op: String,
    pub reason: String,
    pub count: usize,
    /// The first such operator's output tensor (`signature: tensor`), to find it in a viewer.
    pub first_output: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_boards_are_refused_listing_the_known_ones() {
        let e = OpSupport::for_board("imx7").unwrap_err().to_string();
        assert!(e.contains("imx93") && e.contains("rpi5"), "{e}");
        assert_eq!(OpSupport::for_board("rpi5").unwrap(), None);
    }

    #[test]
    fn ethos_u_rejects_batch_matmul_and_per_channel_fully_connected() {
        let u = OpSupport::for_board("imx93").unwrap().unwrap();
        assert!(u.reason("BATCH_MATMUL", false, false).is_some());
        assert!(u.reason("FULLY_CONNECTED", false, true).is_some());
        assert!(u.reason("FULLY_CONNECTED", false, false).is_none());
        assert!(u.reason("ADD", true, false).is_some());
    }
}
