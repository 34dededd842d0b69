//! Building TFLite subgraphs: tensors, constants and operators, with weight buffers shared by
//! every subgraph (the prefill and decode signatures point at the same bytes).

use std::collections::HashMap;

use super::schema::{
    BufferDef, BuiltinOp, OperatorDef, Options, Quantization, SubGraphDef, TensorDef, TensorType,
};
use super::weights::{Encoding, WeightSource};

/// What fills an appended buffer when the file is written.
#[derive(Debug, Clone)]
pub enum Payload {
    Bytes(Vec<u8>),
    Weight {
        source: WeightSource,
        encoding: Encoding,
    },
}

impl Payload {
    pub fn size(&self) -> u64 {
        match self {
            Payload::Bytes(b) => b.len() as u64,
            Payload::Weight { source, encoding } => {
                (source.shape().iter().product::<usize>() * encoding.bytes_per_value()) as u64
            }
        }
    }
}

/// A weight already placed in a buffer: what a subgraph needs to declare a tensor over it.
#[derive(Debug, Clone)]
pub struct Placed {
    pub buffer: u32,
    pub shape: Vec<i32>,
    pub dtype: TensorType,
    pub quantization: Option<Quantization>,
}

/// The buffers of a model under construction.
#[derive(Debug, Default)]
pub struct Buffers {
    /// Buffer 0 is the empty sentinel; `payloads[i]` fills buffer `i` (None for inline ones).
    pub defs: Vec<BufferDef>,
    pub payloads: Vec<Option<Payload>>,
    /// Weights placed so far, by a key chosen by the caller (usually the model tensor name).
    placed: HashMap<String, Placed>,
}

impl Buffers {
    pub fn new() -> Buffers {
        Buffers {
            defs: vec![BufferDef::Empty],
            payloads: vec![None],
            placed: HashMap::new(),
        }
    }

    pub fn push(&mut self, p: Payload) -> u32 {
        self.defs.push(BufferDef::Appended { size: p.size() });
        self.payloads.push(Some(p));
        (self.defs.len() - 1) as u32
    }

    pub fn push_inline(&mut self, bytes: Vec<u8>) -> u32 {
        self.defs.push(BufferDef::Inline(bytes));
        self.payloads.push(None);
        (self.defs.len() - 1) as u32
    }

    pub fn placed(&self, key: &str) -> Option<&Placed> {
        self.placed.get(key)
    }

    pub fn place(&mut self, key: &str, p: Placed) {
        self.placed.insert(key.to_string(), p);
    }
}

/// Index of a tensor inside the subgraph being built.
pub type T = i32;

/// One subgraph under construction.
pub struct Graph<'b> {
    pub buffers: &'b mut Buffers,
    pub sg: SubGraphDef,
    /// Small constants already made in this subgraph, so each appears once.
    consts: HashMap<(String, Vec<i32>, Vec<u8>), T>,
    /// Weight tensors already declared in this subgraph, by placement key.
    weights: HashMap<String, T>,
    /// Counter for unique activation names.
    n: usize,
}

impl<'b> Graph<'b> {
    pub fn new(buffers: &'b mut Buffers, name: &str) -> Graph<'b> {
        Graph {
            buffers,
            sg: SubGraphDef {
                name: name.to_string(),
                ..Default::default()
            },
            consts: HashMap::new(),
            weights: HashMap::new(),
            n: 0,
        }
    }

    fn add_tensor(&mut self, t: TensorDef) -> T {
        self.sg.tensors.push(t);
        (self.sg.tensors.len() - 1) as T
    }

    pub fn shape(&self, t: T) -> &[i32] {
        &self.sg.tensors[t as usize].shape
    }

    pub fn dtype(&self, t: T) -> TensorType {
        self.sg.tensors[t as usize].dtype
    }

    /// A graph input (also recorded in the subgraph's input list).
    pub fn input(&mut self, name: &str, shape: &[i32], dtype: TensorType) -> T {
        let t = self.activation(name, shape, dtype, None);
        self.sg.inputs.push(t);
        t
    }

    pub fn output(&mut self, t: T) {
        self.sg.outputs.push(t);
    }

    /// A tensor without data (computed by an operator).
    pub fn activation(
        &mut self,
        name: &str,
        shape: &[i32],
        dtype: TensorType,
        quantization: Option<Quantization>,
    ) -> T {
        self.n += 1;
        self.add_tensor(TensorDef {
            name: format!("{name};{}", self.n),
            shape: shape.to_vec(),
            dtype,
            buffer: 0,
            quantization,
        })
    }

    /// Renames a tensor (signature-visible tensors keep their public names).
    pub fn rename(&mut self, t: T, name: &str) {
        self.sg.tensors[t as usize].name = name.to_string();
    }

    /// A constant from raw little-endian bytes.
    pub fn constant_bytes(
        &mut self,
        name: &str,
        shape: &[i32],
        dtype: TensorType,
        b: Vec<u8>,
    ) -> T {
        self.constant(name, shape, dtype, b, None)
    }

    /// A quantized constant (int8 / int16 codes with their quantization).
    pub fn const_q(
        &mut self,
        name: &str,
        shape: &[i32],
        dtype: TensorType,
        b: Vec<u8>,
        q: Quantization,
    ) -> T {
        self.constant(name, shape, dtype, b, Some(q))
    }

    /// A constant, made once per subgraph for each (type, shape, bytes, quantization).
    fn constant(
        &mut self,
        name: &str,
        shape: &[i32],
        dtype: TensorType,
        b: Vec<u8>,
        quantization: Option<Quantization>,
    ) -> T {
        let mut key_bytes = b.clone();
        for s in quantization.iter().flat_map(|q| &q.scale) {
            key_bytes.extend(s.to_le_bytes());
        }
        let kind = match &quantization {
            Some(_) => format!("{}q", dtype.name()),
            None => dtype.name().to_string(),
        };
        let key = (kind, shape.to_vec(), key_bytes);
        if let Some(&t) = self.consts.get(&key) {
            return t;
        }
        let buffer = self.buffers.push(Payload::Bytes(b));
        let t = self.add_tensor(TensorDef {
            name: name.to_string(),
            shape: shape.to_vec(),
            dtype,
            buffer,
            quantization,
        });
        self.consts.insert(key, t);
        t
    }

    pub fn const_i32(&mut self, name: &str, shape: &[i32], v: &[i32]) -> T {
        self.constant_bytes(
            name,
            shape,
            TensorType::Int32,
            bytemuck::cast_slice(v).to_vec(),
        )
    }

    pub fn const_f32(&mut self, name: &str, shape: &[i32], v: &[f32]) -> T {
        self.constant_bytes(
            name,
            shape,
            TensorType::Float32,
            bytemuck::cast_slice(v).to_vec(),
        )
    }

    /// Declares (once per subgraph) a tensor over a placed weight.
    pub fn weight(&mut self, key: &str) -> T {
        if let Some(&t) = self.weights.get(key) {
            return t;
        }
        let p = self
            .buffers
            .placed(key)
            .cloned()
            .unwrap_or_else(|| panic!("weight {key} is placed before use"));
        let t = self.add_tensor(TensorDef {
            name: key.to_string(),
            shape: p.shape,
            dtype: p.dtype,
            buffer: p.buffer,
            quantization: p.quantization,
        });
        self.weights.insert(key.to_string(), t);
        t
    }

    /// Appends an operator with one new output tensor.
    pub fn op(
        &mut self,
        op: BuiltinOp,
        version: i32,
        inputs: &[T],
        options: Options,
        out: (&str, &[i32], TensorType),
    ) -> T {
        self.op_q(op, version, inputs, options, out, None)
    }

    /// As [`Graph::op`], with the output's quantization.
    pub fn op_q(
        &mut self,
        op: BuiltinOp,
        version: i32,
        inputs: &[T],
        options: Options,
        out: (&str, &[i32], TensorType),
        quantization: Option<Quantization>,
    ) -> T {
        let o = self.activation(out.0, out.1, out.2, quantization);
        self.sg.operators.push(OperatorDef {
            op,
            version,
            inputs: inputs.to_vec(),
            outputs: vec![o],
            options,
        });
        o
    }

    /// An operator with several outputs already declared.
    pub fn op_multi(
        &mut self,
        op: BuiltinOp,
        version: i32,
        inputs: &[T],
        outputs: &[T],
        options: Options,
    ) {
        self.sg.operators.push(OperatorDef {
            op,
            version,
            inputs: inputs.to_vec(),
            outputs: outputs.to_vec(),
            options,
        });
    }
}
