//! Which operators a board's NPU takes: checked against the ops and tensor types of a model
//! before it is written, so the user learns what will fall back to the CPU.
//!
//! The facts come from the board's target profile (its `[npu]` table); the caller turns the
//! profile into an [`OpSupport`], so a user's own profile is checked the same way.

use std::collections::BTreeMap;

use serde::Serialize;

use super::schema::{ModelDef, TensorType};

/// What an NPU of one board accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct OpSupport {
    pub board: String,
    pub npu: String,
    /// Operators the NPU compiler/delegate accepts; `None` when only exclusions are known.
    pub allow: Option<Vec<String>>,
    /// Operators known to fall back even when the allow-list has them (or with no list).
    pub deny: Vec<String>,
    /// The NPU computes in integers only: any op with a float input or output falls back.
    pub integer_only: bool,
    /// FULLY_CONNECTED with per-channel (per-axis) weight scales is accepted.
    pub per_channel_fc: bool,
    /// Where the facts come from, e.g. the profile's name or file.
    pub source: String,
}

impl OpSupport {
    /// Why `op` with these tensor types runs on the CPU, or `None` if the NPU takes it.
    fn reason(&self, op: &str, float_io: bool, per_channel: bool) -> Option<String> {
        if let Some(allow) = &self.allow {
            if !allow.iter().any(|a| a == op) {
                return Some(format!("{op} is not in the {} operator list", self.npu));
            }
        }
        if self.deny.iter().any(|d| d == op) {
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
            board: self.board.clone(),
            npu: self.npu.clone(),
            operators: total,
            on_npu,
            cpu_fallbacks: fallbacks.into_values().collect(),
            source: self.source.clone(),
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

    fn ethos_u() -> OpSupport {
        OpSupport {
            board: "imx93".into(),
            npu: "Arm Ethos-U65".into(),
            allow: Some(["ADD", "FULLY_CONNECTED", "MUL"].map(String::from).to_vec()),
            deny: vec![],
            integer_only: true,
            per_channel_fc: false,
            source: "test".into(),
        }
    }

    #[test]
    fn an_allow_list_refuses_unlisted_ops_float_tensors_and_per_channel_fully_connected() {
        let u = ethos_u();
        assert!(u.reason("BATCH_MATMUL", false, false).is_some());
        assert!(u.reason("FULLY_CONNECTED", false, true).is_some());
        assert!(u.reason("FULLY_CONNECTED", false, false).is_none());
        assert!(u.reason("ADD", true, false).is_some());
    }

    #[test]
    fn without_an_allow_list_only_denied_ops_and_float_tensors_fall_back() {
        let vx = OpSupport {
            allow: None,
            deny: vec!["BATCH_MATMUL".into()],
            per_channel_fc: true,
            ..ethos_u()
        };
        assert!(vx.reason("BATCH_MATMUL", false, false).is_some());
        assert!(vx.reason("RSQRT", false, false).is_none());
        assert!(vx.reason("FULLY_CONNECTED", false, true).is_none());
        assert!(vx.reason("RSQRT", true, false).is_some());
    }
}
