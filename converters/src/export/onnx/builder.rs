//! Assembles an ONNX graph: nodes with unique names, deduplicated constants (inline Constant
//! nodes, which load-time shape inference can read), graph inputs/outputs, and initializers
//! whose bytes are produced later by streaming jobs.

use std::collections::{HashMap, HashSet};

use half::f16;

use super::proto::*;
use crate::export::graph::WeightId;

/// How a graph weight is encoded into initializers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Encoding {
    /// f32 or f16 values, as `[out, in]` (`transpose: false`) or `[in, out]`.
    Float { f16: bool, transpose: bool },
    /// MatMulNBits: `B` uint8 `[N, k_blocks, blob]`, scales f32 `[N, k_blocks]`, zero points
    /// uint8 `[N, ceil(k_blocks·bits/8)]` when asymmetric.
    NBits {
        bits: u32,
        block: usize,
        symmetric: bool,
    },
    /// int8 per output channel, symmetric: `W` int8 `[in, out]`, scales f32 `[out]`.
    Int8Transposed,
    /// Blocked int4 for DequantizeLinear (opset 21), blocks along `in`: `W` `[in, out]` (int4
    /// when symmetric, else uint4), scales f32 `[in/block, out]`, uint4 zero points likewise
    /// when asymmetric.
    Int4Transposed { block: usize, symmetric: bool },
}

/// The bytes of one or more initializers.
#[derive(Debug, Clone)]
pub enum Payload {
    Bytes(Vec<u8>),
    Weight { id: WeightId, enc: Encoding },
}

/// Name, element type and shape of an initializer.
#[derive(Debug, Clone)]
pub struct InitSpec {
    pub name: String,
    pub dtype: i32,
    pub dims: Vec<i64>,
}

/// Initializers filled from one payload, in the order the payload produces them.
#[derive(Debug, Clone)]
pub struct Job {
    pub payload: Payload,
    pub outputs: Vec<InitSpec>,
}

/// A symbolic or fixed dimension of a graph input/output.
pub enum Dim<'a> {
    Fixed(usize),
    Sym(&'a str),
}

#[derive(Default)]
pub struct Builder {
    pub nodes: Vec<NodeProto>,
    pub inputs: Vec<ValueInfoProto>,
    pub outputs: Vec<ValueInfoProto>,
    pub jobs: Vec<Job>,
    node_names: HashSet<String>,
    consts: HashMap<(i32, Vec<i64>, Vec<u8>), String>,
}

pub fn value_info(name: &str, dtype: i32, dims: &[Dim<'_>]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: dtype,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(match d {
                                Dim::Fixed(n) => DimValue::DimValue(*n as i64),
                                Dim::Sym(s) => DimValue::DimParam(s.to_string()),
                            }),
                        })
                        .collect(),
                }),
            }),
        }),
    }
}

pub fn attr_i(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::INT,
        i,
        ..Default::default()
    }
}

pub fn attr_f(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::FLOAT,
        f,
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::INTS,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

impl Builder {
    /// Adds a node named `name` with outputs `outputs`.
    pub fn node_to(
        &mut self,
        op: &str,
        domain: &str,
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<AttributeProto>,
    ) {
        assert!(
            self.node_names.insert(name.to_string()),
            "node name {name} used twice"
        );
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name: name.to_string(),
            op_type: op.to_string(),
            domain: domain.to_string(),
            attribute: attrs,
        });
    }

    /// Adds a default-domain node with one output named `{name}/output_0`; returns it.
    pub fn op(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
    ) -> String {
        let out = format!("{name}/output_0");
        self.node_to(op, "", name, inputs, &[&out], attrs);
        out
    }

    /// A constant tensor as an inline Constant node, shared by every user of the same value.
    pub fn constant(&mut self, dtype: i32, dims: &[i64], raw: Vec<u8>) -> String {
        let key = (dtype, dims.to_vec(), raw);
        if let Some(n) = self.consts.get(&key) {
            return n.clone();
        }
        let id = self.consts.len();
        let tname = match dtype {
            dtype::INT64 => "INT64",
            dtype::FLOAT => "FLOAT",
            dtype::FLOAT16 => "FLOAT16",
            dtype::INT8 => "INT8",
            _ => "T",
        };
        let node = format!("/model/constant_nodes/{tname}/{id}");
        let out = format!("/model/constants/{tname}/{id}");
        let t = TensorProto {
            dims: key.1.clone(),
            data_type: dtype,
            raw_data: key.2.clone(),
            ..Default::default()
        };
        let attr = AttributeProto {
            name: "value".into(),
            r#type: attr_type::TENSOR,
            t: Some(t),
            ..Default::default()
        };
        self.node_to("Constant", "", &node, &[], &[&out], vec![attr]);
        self.consts.insert(key, out.clone());
        out
    }

    pub fn i64s(&mut self, v: &[i64]) -> String {
        self.constant(
            dtype::INT64,
            &[v.len() as i64],
            bytemuck::cast_slice(v).to_vec(),
        )
    }

    pub fn i64_scalar(&mut self, v: i64) -> String {
        self.constant(dtype::INT64, &[], v.to_le_bytes().to_vec())
    }

    /// A scalar of the float type `dtype` (f32 or f16).
    pub fn float_scalar(&mut self, dtype: i32, v: f32) -> String {
        let raw = if dtype == dtype::FLOAT16 {
            f16::from_f32(v).to_le_bytes().to_vec()
        } else {
            v.to_le_bytes().to_vec()
        };
        self.constant(dtype, &[], raw)
    }

    pub fn job(&mut self, payload: Payload, outputs: Vec<InitSpec>) {
        self.jobs.push(Job { payload, outputs });
    }
}
