//! The subset of the TFLite flatbuffer schema edgepack writes, as plain Rust values, and its
//! serialization on `flatbuffers::FlatBufferBuilder`.
//!
//! Field slots, enum values and union indices follow the published TFLite schema (schema
//! version 3, LiteRT's "3d" revision; the field tables are in `docs/tflite.md`). Every
//! weight buffer is stored in the "buffer offset" form: the flatbuffer holds only each buffer's
//! absolute file offset and size, and the payloads follow the flatbuffer, so a model of any size
//! streams to disk one tensor at a time and the flatbuffer itself stays far below the 2 GiB
//! limit of 32-bit flatbuffer offsets.

use flatbuffers::{FlatBufferBuilder, WIPOffset};

/// `Model.version`: the schema major version every TFLite reader accepts.
pub const SCHEMA_VERSION: u32 = 3;
/// File identifier at bytes 4..8.
pub const FILE_IDENTIFIER: &str = "TFL3";
/// Alignment of every appended payload. The schema forces 16 for inline data; 64 also suits
/// the widest SIMD loads of CPU kernels that read weights in place from a memory map.
pub const PAYLOAD_ALIGN: u64 = 64;
/// The byte field `OperatorCode.deprecated_builtin_code` holds codes up to 126; larger codes
/// write this placeholder there and the full code in `builtin_code` (schema_utils rule).
pub const PLACEHOLDER_FOR_GREATER_OP_CODES: i32 = 127;
/// Name of the metadata entry that tells tools the buffers live after the flatbuffer.
pub const BUFFER_LOCATION_KEY: &str = "buffer_location";
pub const BUFFER_LOCATION_VALUE: &str = "outside flatbuffers";

/// `TensorType` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i8)]
pub enum TensorType {
    Float32 = 0,
    Float16 = 1,
    Int32 = 2,
    Int64 = 4,
    Bool = 6,
    Int16 = 7,
    Int8 = 9,
}

impl TensorType {
    /// Bytes of one element.
    pub fn size(self) -> usize {
        match self {
            TensorType::Float32 | TensorType::Int32 => 4,
            TensorType::Float16 | TensorType::Int16 => 2,
            TensorType::Int64 => 8,
            TensorType::Bool | TensorType::Int8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TensorType::Float32 => "float32",
            TensorType::Float16 => "float16",
            TensorType::Int32 => "int32",
            TensorType::Int64 => "int64",
            TensorType::Bool => "bool",
            TensorType::Int16 => "int16",
            TensorType::Int8 => "int8",
        }
    }
}

/// The builtin operators edgepack emits, with their `BuiltinOperator` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BuiltinOp {
    Add,
    Concatenation,
    Dequantize,
    FullyConnected,
    Logistic,
    Mul,
    Reshape,
    Softmax,
    Gather,
    EmbeddingLookup,
    Transpose,
    Mean,
    Sub,
    Split,
    Cast,
    Greater,
    Slice,
    Rsqrt,
    Quantize,
    BatchMatmul,
    DynamicUpdateSlice,
    SelectV2,
}

impl BuiltinOp {
    /// `BuiltinOperator` value.
    pub fn code(self) -> i32 {
        match self {
            BuiltinOp::Add => 0,
            BuiltinOp::Concatenation => 2,
            BuiltinOp::Dequantize => 6,
            BuiltinOp::FullyConnected => 9,
            BuiltinOp::Logistic => 14,
            BuiltinOp::Mul => 18,
            BuiltinOp::Reshape => 22,
            BuiltinOp::Softmax => 25,
            BuiltinOp::Gather => 36,
            BuiltinOp::EmbeddingLookup => 7,
            BuiltinOp::Transpose => 39,
            BuiltinOp::Mean => 40,
            BuiltinOp::Sub => 41,
            BuiltinOp::Split => 49,
            BuiltinOp::Cast => 53,
            BuiltinOp::Greater => 61,
            BuiltinOp::Slice => 65,
            BuiltinOp::Rsqrt => 76,
            BuiltinOp::Quantize => 114,
            BuiltinOp::BatchMatmul => 126,
            BuiltinOp::DynamicUpdateSlice => 151,
            BuiltinOp::SelectV2 => 123,
        }
    }

    /// The schema's upper-case name, as op-support lists spell it.
    pub fn name(self) -> &'static str {
        match self {
            BuiltinOp::Add => "ADD",
            BuiltinOp::Concatenation => "CONCATENATION",
            BuiltinOp::Dequantize => "DEQUANTIZE",
            BuiltinOp::FullyConnected => "FULLY_CONNECTED",
            BuiltinOp::Logistic => "LOGISTIC",
            BuiltinOp::Mul => "MUL",
            BuiltinOp::Reshape => "RESHAPE",
            BuiltinOp::Softmax => "SOFTMAX",
            BuiltinOp::Gather => "GATHER",
            BuiltinOp::EmbeddingLookup => "EMBEDDING_LOOKUP",
            BuiltinOp::Transpose => "TRANSPOSE",
            BuiltinOp::Mean => "MEAN",
            BuiltinOp::Sub => "SUB",
            BuiltinOp::Split => "SPLIT",
            BuiltinOp::Cast => "CAST",
            BuiltinOp::Greater => "GREATER",
            BuiltinOp::Slice => "SLICE",
            BuiltinOp::Rsqrt => "RSQRT",
            BuiltinOp::Quantize => "QUANTIZE",
            BuiltinOp::BatchMatmul => "BATCH_MATMUL",
            BuiltinOp::DynamicUpdateSlice => "DYNAMIC_UPDATE_SLICE",
            BuiltinOp::SelectV2 => "SELECT_V2",
        }
    }

    /// `OperatorCode.deprecated_builtin_code` for this op.
    pub fn deprecated_code(self) -> i8 {
        self.code().min(PLACEHOLDER_FOR_GREATER_OP_CODES) as i8
    }
}

/// `ActivationFunctionType` values used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(i8)]
pub enum Activation {
    #[default]
    None = 0,
}

/// An operator's builtin options (the `BuiltinOptions` union members edgepack fills).
#[derive(Debug, Clone, PartialEq)]
pub enum Options {
    None,
    FullyConnected {
        keep_num_dims: bool,
        asymmetric_quantize_inputs: bool,
    },
    Softmax {
        beta: f32,
    },
    Concatenation {
        axis: i32,
    },
    Add,
    Mul,
    Sub,
    Reshape,
    Gather {
        axis: i32,
    },
    Transpose,
    Reducer {
        keep_dims: bool,
    },
    Split {
        num_splits: i32,
    },
    Cast {
        from: TensorType,
        to: TensorType,
    },
    Dequantize,
    Quantize,
    Greater,
    Slice,
    BatchMatmul {
        adj_x: bool,
        adj_y: bool,
        asymmetric_quantize_inputs: bool,
    },
    DynamicUpdateSlice,
}

impl Options {
    /// Index of the member in the `BuiltinOptions` union (0 = NONE).
    fn union_type(&self) -> u8 {
        match self {
            Options::None => 0,
            Options::FullyConnected { .. } => 8,
            Options::Softmax { .. } => 9,
            Options::Concatenation { .. } => 10,
            Options::Add => 11,
            Options::Reshape => 17,
            Options::Mul => 21,
            Options::Gather { .. } => 23,
            Options::Transpose => 26,
            Options::Reducer { .. } => 27,
            Options::Sub => 28,
            Options::Split { .. } => 35,
            Options::Cast { .. } => 37,
            Options::Dequantize => 38,
            Options::Greater => 44,
            Options::Slice => 48,
            Options::Quantize => 89,
            Options::BatchMatmul { .. } => 101,
            Options::DynamicUpdateSlice => 117,
        }
    }
}

/// Affine quantization: `real = scale * (q - zero_point)`, one pair per tensor or one per
/// slice along `quantized_dimension`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Quantization {
    pub scale: Vec<f32>,
    pub zero_point: Vec<i64>,
    pub quantized_dimension: i32,
}

impl Quantization {
    pub fn per_tensor(scale: f32, zero_point: i64) -> Quantization {
        Quantization {
            scale: vec![scale],
            zero_point: vec![zero_point],
            quantized_dimension: 0,
        }
    }

    /// Symmetric (zero point 0) scales along `dim`.
    pub fn per_channel(scale: Vec<f32>, dim: i32) -> Quantization {
        Quantization {
            zero_point: vec![0; scale.len()],
            scale,
            quantized_dimension: dim,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorDef {
    pub name: String,
    pub shape: Vec<i32>,
    pub dtype: TensorType,
    /// Index into [`ModelDef::buffers`]; 0 (the empty sentinel) for activations.
    pub buffer: u32,
    pub quantization: Option<Quantization>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OperatorDef {
    pub op: BuiltinOp,
    /// `OperatorCode.version`: the lowest kernel version that has every feature used.
    pub version: i32,
    pub inputs: Vec<i32>,
    pub outputs: Vec<i32>,
    pub options: Options,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SubGraphDef {
    pub name: String,
    pub tensors: Vec<TensorDef>,
    pub inputs: Vec<i32>,
    pub outputs: Vec<i32>,
    pub operators: Vec<OperatorDef>,
}

/// A public name for a tensor of a signature's subgraph.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorMap {
    pub name: String,
    pub tensor_index: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SignatureDef {
    pub key: String,
    pub subgraph_index: u32,
    pub inputs: Vec<TensorMap>,
    pub outputs: Vec<TensorMap>,
}

/// A model buffer: either bytes kept inside the flatbuffer (small metadata) or `size` bytes
/// appended after it, produced later by the caller in buffer order.
#[derive(Debug, Clone, PartialEq)]
pub enum BufferDef {
    /// The sentinel buffer 0 and any buffer without data.
    Empty,
    Inline(Vec<u8>),
    Appended {
        size: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelDef {
    pub description: String,
    pub subgraphs: Vec<SubGraphDef>,
    pub buffers: Vec<BufferDef>,
    /// `(name, buffer index)`.
    pub metadata: Vec<(String, u32)>,
    pub signatures: Vec<SignatureDef>,
}

/// Where each appended buffer lands in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// The flatbuffer, to be written at offset 0.
    pub flatbuffer: Vec<u8>,
    /// `(buffer index, absolute offset, size)` of every appended buffer, in file order.
    pub payloads: Vec<(u32, u64, u64)>,
    /// Total file size.
    pub file_size: u64,
}

/// The operator codes of a model: one per distinct `(op, version)`, in first-use order.
fn operator_codes(model: &ModelDef) -> Vec<(BuiltinOp, i32)> {
    let mut codes: Vec<(BuiltinOp, i32)> = Vec::new();
    for sg in &model.subgraphs {
        for op in &sg.operators {
            if !codes.contains(&(op.op, op.version)) {
                codes.push((op.op, op.version));
            }
        }
    }
    codes
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Serializes `model` and lays out its appended buffers after the flatbuffer.
pub fn layout(model: &ModelDef) -> Layout {
    // The flatbuffer's size does not depend on the offsets it records (each is an always-present
    // u64), so one pass with provisional offsets measures it and a second writes the real ones.
    let provisional: Vec<u64> = vec![u64::MAX; model.buffers.len()];
    let probe = serialize(model, &provisional);
    let mut offsets = vec![0u64; model.buffers.len()];
    let mut payloads = Vec::new();
    let mut at = align_up(probe.len() as u64, PAYLOAD_ALIGN);
    for (i, b) in model.buffers.iter().enumerate() {
        if let BufferDef::Appended { size } = b {
            offsets[i] = at;
            payloads.push((i as u32, at, *size));
            at = align_up(at + size, PAYLOAD_ALIGN);
        }
    }
    let flatbuffer = serialize(model, &offsets);
    debug_assert_eq!(flatbuffer.len(), probe.len());
    let file_size = payloads
        .last()
        .map(|&(_, o, s)| o + s)
        .unwrap_or(flatbuffer.len() as u64);
    Layout {
        flatbuffer,
        payloads,
        file_size,
    }
}

/// vtable slot of field `i` of a table.
const fn slot(i: u16) -> u16 {
    4 + 2 * i
}

fn serialize(model: &ModelDef, offsets: &[u64]) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::with_capacity(1 << 16);
    let codes = operator_codes(model);

    let code_offsets: Vec<_> = codes
        .iter()
        .map(|&(op, version)| {
            let t = fbb.start_table();
            fbb.push_slot::<i8>(slot(0), op.deprecated_code(), 0);
            fbb.push_slot::<i32>(slot(2), version, 1);
            fbb.push_slot::<i32>(slot(3), op.code(), 0);
            fbb.end_table(t)
        })
        .collect();
    let code_vec = fbb.create_vector(&code_offsets);

    let subgraphs: Vec<_> = model
        .subgraphs
        .iter()
        .map(|sg| write_subgraph(&mut fbb, sg, &codes))
        .collect();
    let subgraph_vec = fbb.create_vector(&subgraphs);
    let description = fbb.create_string(&model.description);

    let buffers: Vec<_> = model
        .buffers
        .iter()
        .enumerate()
        .map(|(i, b)| match b {
            BufferDef::Empty => {
                let t = fbb.start_table();
                fbb.end_table(t)
            }
            BufferDef::Inline(bytes) => {
                let data = fbb.create_vector(bytes);
                let t = fbb.start_table();
                fbb.push_slot_always(slot(0), data);
                fbb.end_table(t)
            }
            BufferDef::Appended { size } => {
                let t = fbb.start_table();
                fbb.push_slot_always::<u64>(slot(1), offsets[i]);
                fbb.push_slot_always::<u64>(slot(2), *size);
                fbb.end_table(t)
            }
        })
        .collect();
    let buffer_vec = fbb.create_vector(&buffers);

    let metadata: Vec<_> = model
        .metadata
        .iter()
        .map(|(name, buffer)| {
            let n = fbb.create_string(name);
            let t = fbb.start_table();
            fbb.push_slot_always(slot(0), n);
            fbb.push_slot::<u32>(slot(1), *buffer, 0);
            fbb.end_table(t)
        })
        .collect();
    let metadata_vec = fbb.create_vector(&metadata);

    let signatures: Vec<_> = model
        .signatures
        .iter()
        .map(|s| {
            let inputs = tensor_maps(&mut fbb, &s.inputs);
            let outputs = tensor_maps(&mut fbb, &s.outputs);
            let key = fbb.create_string(&s.key);
            let t = fbb.start_table();
            fbb.push_slot_always(slot(0), inputs);
            fbb.push_slot_always(slot(1), outputs);
            fbb.push_slot_always(slot(2), key);
            // Slot 3 is the deprecated signature tag.
            fbb.push_slot::<u32>(slot(4), s.subgraph_index, 0);
            fbb.end_table(t)
        })
        .collect();
    let signature_vec = fbb.create_vector(&signatures);

    let root = fbb.start_table();
    fbb.push_slot::<u32>(slot(0), SCHEMA_VERSION, 0);
    fbb.push_slot_always(slot(1), code_vec);
    fbb.push_slot_always(slot(2), subgraph_vec);
    fbb.push_slot_always(slot(3), description);
    fbb.push_slot_always(slot(4), buffer_vec);
    fbb.push_slot_always(slot(6), metadata_vec);
    fbb.push_slot_always(slot(7), signature_vec);
    let root = fbb.end_table(root);
    fbb.finish(root, Some(FILE_IDENTIFIER));
    fbb.finished_data().to_vec()
}

fn tensor_maps<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    ms: &[TensorMap],
) -> WIPOffset<
    flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<flatbuffers::TableFinishedWIPOffset>>,
> {
    let v: Vec<_> = ms
        .iter()
        .map(|m| {
            let n = fbb.create_string(&m.name);
            let t = fbb.start_table();
            fbb.push_slot_always(slot(0), n);
            fbb.push_slot::<u32>(slot(1), m.tensor_index, 0);
            fbb.end_table(t)
        })
        .collect();
    fbb.create_vector(&v)
}

fn write_subgraph<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    sg: &SubGraphDef,
    codes: &[(BuiltinOp, i32)],
) -> WIPOffset<flatbuffers::TableFinishedWIPOffset> {
    let tensors: Vec<_> = sg.tensors.iter().map(|t| write_tensor(fbb, t)).collect();
    let tensor_vec = fbb.create_vector(&tensors);
    let inputs = fbb.create_vector(&sg.inputs);
    let outputs = fbb.create_vector(&sg.outputs);
    let ops: Vec<_> = sg
        .operators
        .iter()
        .map(|op| {
            let index = codes
                .iter()
                .position(|&c| c == (op.op, op.version))
                .expect("every operator's code is collected") as u32;
            let ins = fbb.create_vector(&op.inputs);
            let outs = fbb.create_vector(&op.outputs);
            let options = write_options(fbb, &op.options);
            let t = fbb.start_table();
            fbb.push_slot::<u32>(slot(0), index, 0);
            fbb.push_slot_always(slot(1), ins);
            fbb.push_slot_always(slot(2), outs);
            if let Some(o) = options {
                fbb.push_slot::<u8>(slot(3), op.options.union_type(), 0);
                fbb.push_slot_always(slot(4), o);
            }
            fbb.end_table(t)
        })
        .collect();
    let op_vec = fbb.create_vector(&ops);
    let name = fbb.create_string(&sg.name);
    let t = fbb.start_table();
    fbb.push_slot_always(slot(0), tensor_vec);
    fbb.push_slot_always(slot(1), inputs);
    fbb.push_slot_always(slot(2), outputs);
    fbb.push_slot_always(slot(3), op_vec);
    fbb.push_slot_always(slot(4), name);
    fbb.end_table(t)
}

fn write_tensor<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    t: &TensorDef,
) -> WIPOffset<flatbuffers::TableFinishedWIPOffset> {
    let shape = fbb.create_vector(&t.shape);
    // Static shapes only: the signature equals the shape (NPU delegates need static shapes).
    let signature = fbb.create_vector(&t.shape);
    let name = fbb.create_string(&t.name);
    let quant = t.quantization.as_ref().map(|q| {
        let scale = fbb.create_vector(&q.scale);
        let zp = fbb.create_vector(&q.zero_point);
        let qt = fbb.start_table();
        fbb.push_slot_always(slot(2), scale);
        fbb.push_slot_always(slot(3), zp);
        fbb.push_slot::<i32>(slot(6), q.quantized_dimension, 0);
        fbb.end_table(qt)
    });
    let tt = fbb.start_table();
    fbb.push_slot_always(slot(0), shape);
    fbb.push_slot::<i8>(slot(1), t.dtype as i8, 0);
    fbb.push_slot::<u32>(slot(2), t.buffer, 0);
    fbb.push_slot_always(slot(3), name);
    if let Some(q) = quant {
        fbb.push_slot_always(slot(4), q);
    }
    fbb.push_slot_always(slot(7), signature);
    fbb.push_slot::<bool>(slot(8), true, false);
    fbb.end_table(tt)
}

/// Writes an options table; `None` for ops without one.
fn write_options<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    o: &Options,
) -> Option<WIPOffset<flatbuffers::TableFinishedWIPOffset>> {
    if *o == Options::None {
        return None;
    }
    let t = fbb.start_table();
    match *o {
        Options::None => {}
        Options::FullyConnected {
            keep_num_dims,
            asymmetric_quantize_inputs,
        } => {
            fbb.push_slot::<i8>(slot(0), Activation::None as i8, 0);
            fbb.push_slot::<bool>(slot(2), keep_num_dims, false);
            fbb.push_slot::<bool>(slot(3), asymmetric_quantize_inputs, false);
        }
        Options::Softmax { beta } => fbb.push_slot_always::<f32>(slot(0), beta),
        Options::Concatenation { axis } => fbb.push_slot_always::<i32>(slot(0), axis),
        Options::Gather { axis } => fbb.push_slot_always::<i32>(slot(0), axis),
        Options::Reducer { keep_dims } => fbb.push_slot::<bool>(slot(0), keep_dims, false),
        Options::Split { num_splits } => fbb.push_slot_always::<i32>(slot(0), num_splits),
        Options::Cast { from, to } => {
            fbb.push_slot_always::<i8>(slot(0), from as i8);
            fbb.push_slot_always::<i8>(slot(1), to as i8);
        }
        Options::BatchMatmul {
            adj_x,
            adj_y,
            asymmetric_quantize_inputs,
        } => {
            fbb.push_slot::<bool>(slot(0), adj_x, false);
            fbb.push_slot::<bool>(slot(1), adj_y, false);
            fbb.push_slot::<bool>(slot(2), asymmetric_quantize_inputs, false);
        }
        // pot_scale_int16 defaults to true, which makes int16 ADD demand power-of-two scales.
        Options::Add => fbb.push_slot_always::<bool>(slot(1), false),
        Options::Mul
        | Options::Sub
        | Options::Reshape
        | Options::Transpose
        | Options::Dequantize
        | Options::Quantize
        | Options::Greater
        | Options::Slice
        | Options::DynamicUpdateSlice => {}
    }
    Some(fbb.end_table(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_above_126_write_the_placeholder_in_the_byte_field() {
        assert_eq!(BuiltinOp::BatchMatmul.deprecated_code(), 126);
        assert_eq!(BuiltinOp::DynamicUpdateSlice.deprecated_code(), 127);
        assert_eq!(BuiltinOp::DynamicUpdateSlice.code(), 151);
    }

    #[test]
    fn file_starts_with_root_offset_and_identifier_and_payloads_are_aligned() {
        let model = ModelDef {
            buffers: vec![
                BufferDef::Empty,
                BufferDef::Appended { size: 10 },
                BufferDef::Appended { size: 3 },
            ],
            ..Default::default()
        };
        let l = layout(&model);
        assert_eq!(&l.flatbuffer[4..8], b"TFL3");
        assert_eq!(l.payloads.len(), 2);
        for &(_, off, _) in &l.payloads {
            assert_eq!(off % PAYLOAD_ALIGN, 0);
            assert!(off >= l.flatbuffer.len() as u64);
        }
        assert_eq!(l.file_size, l.payloads[1].1 + 3);
    }
}
