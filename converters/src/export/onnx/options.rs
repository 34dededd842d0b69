//! What an ONNX export is asked for: the operator set and the precision. The lowering and the
//! writer both read these; neither owns them.

use serde::Serialize;

/// Which operators the graph may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpSet {
    /// onnxruntime's com.microsoft fused ops, as onnxruntime-genai's model builder uses them.
    Contrib,
    /// Default-domain ONNX ops only.
    Standard,
}

impl std::str::FromStr for OpSet {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "contrib" => Ok(OpSet::Contrib),
            "standard" => Ok(OpSet::Standard),
            _ => Err(format!("--ops {s}: use contrib or standard")),
        }
    }
}

/// Weight (and activation) precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Precision {
    #[serde(rename = "fp32")]
    Fp32,
    #[serde(rename = "fp16")]
    Fp16,
    /// int8 per-channel weights, activations quantized at run time.
    #[serde(rename = "int8")]
    Int8,
    /// int4 weight-only, blockwise.
    #[serde(rename = "int4")]
    Int4,
    /// W8A8 in QDQ form with static activation scales from calibration (SmoothQuant).
    #[serde(rename = "int8-static")]
    Int8Static,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "fp16" => Ok(Precision::Fp16),
            "int8" => Ok(Precision::Int8),
            "int4" => Ok(Precision::Int4),
            "int8-static" => Ok(Precision::Int8Static),
            _ => Err(format!(
                "--precision {s}: use fp32, fp16, int8, int4 or int8-static"
            )),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
            Precision::Int4 => "int4",
            Precision::Int8Static => "int8-static",
        };
        f.write_str(s)
    }
}
