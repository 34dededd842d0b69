//! Quantization: the ggml block formats, bit-faithful ports of llama.cpp's quantizers, and the
//! per-tensor type plans of llama-quantize's presets; and onnxruntime's blockwise integer
//! weights (`blockwise`) and 8-bit weights and dynamic activations (`int8`).
//!
//! Every quantizer works on one row (ne0 elements) at a time, as `ggml_quantize_chunk` does;
//! [`quantize`] spreads the rows of a tensor over all cores.

pub mod blockwise;
#[cfg(test)]
mod golden;
pub mod int8;
pub mod kquants;
pub mod legacy;
pub mod preset;
pub mod scalar;
pub mod types;
pub mod weighted;

use rayon::prelude::*;

pub use types::GgmlType;

/// Rows handed to one rayon task: large enough to amortize scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 16;

/// Why a tensor cannot be stored in a type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    #[error("row length {row_len} is not a multiple of {ty}'s block size {block}")]
    RowLength {
        ty: GgmlType,
        row_len: usize,
        block: usize,
    },
    #[error("edgepack cannot write {0} tensors")]
    Unsupported(GgmlType),
    #[error("importance weights have {got} entries, the row has {want}")]
    ImatrixLength { got: usize, want: usize },
}

/// Quantizes one row; `imatrix` (one weight per column) switches to llama.cpp's weighted path.
pub fn quantize_row(ty: GgmlType, x: &[f32], out: &mut [u8], imatrix: Option<&[f32]>) {
    use GgmlType::*;
    match (ty, imatrix) {
        (F32, _) => scalar::write_f32(x, out),
        (F16, _) => scalar::write_f16(x, out),
        (BF16, _) => scalar::write_bf16(x, out),
        // Q8_0 has no weighted variant in llama.cpp.
        (Q8_0, _) => legacy::quantize_row_q8_0(x, out),
        (Q4_0, None) => legacy::quantize_row_q4_0(x, out),
        (Q4_1, None) => legacy::quantize_row_q4_1(x, out),
        (Q5_0, None) => legacy::quantize_row_q5_0(x, out),
        (Q5_1, None) => legacy::quantize_row_q5_1(x, out),
        (Q4_0, Some(w)) => weighted::quantize_row_q4_0_weighted(x, out, w),
        (Q4_1, Some(w)) => weighted::quantize_row_q4_1_weighted(x, out, w),
        (Q5_0, Some(w)) => weighted::quantize_row_q5_0_weighted(x, out, w),
        (Q5_1, Some(w)) => weighted::quantize_row_q5_1_weighted(x, out, w),
        (Q2_K, w) => kquants::quantize_row_q2_k(x, out, w),
        (Q3_K, w) => kquants::quantize_row_q3_k(x, out, w),
        (Q4_K, w) => kquants::quantize_row_q4_k(x, out, w),
        (Q5_K, w) => kquants::quantize_row_q5_k(x, out, w),
        (Q6_K, w) => kquants::quantize_row_q6_k(x, out, w),
        (other, _) => unreachable!("checked by can_quantize: {other}"),
    }
}

/// Dequantizes one row of `ty` into f32.
pub fn dequantize_row(ty: GgmlType, b: &[u8], out: &mut [f32]) {
    use GgmlType::*;
    match ty {
        F32 => scalar::read_f32(b, out),
        F16 => scalar::read_f16(b, out),
        BF16 => scalar::read_bf16(b, out),
        Q8_0 => legacy::dequantize_row_q8_0(b, out),
        Q4_0 => legacy::dequantize_row_q4_0(b, out),
        Q4_1 => legacy::dequantize_row_q4_1(b, out),
        Q5_0 => legacy::dequantize_row_q5_0(b, out),
        Q5_1 => legacy::dequantize_row_q5_1(b, out),
        Q2_K => kquants::dequantize_row_q2_k(b, out),
        Q3_K => kquants::dequantize_row_q3_k(b, out),
        Q4_K => kquants::dequantize_row_q4_k(b, out),
        Q5_K => kquants::dequantize_row_q5_k(b, out),
        Q6_K => kquants::dequantize_row_q6_k(b, out),
        other => unreachable!("checked by can_dequantize: {other}"),
    }
}

fn check(ty: GgmlType, row_len: usize) -> Result<usize, QuantError> {
    if !ty.can_quantize() {
        return Err(QuantError::Unsupported(ty));
    }
    ty.bytes_for(row_len).ok_or(QuantError::RowLength {
        ty,
        row_len,
        block: ty.block_size(),
    })
}

/// Quantizes a row-major tensor of rows of `row_len` elements, rows in parallel.
pub fn quantize(
    ty: GgmlType,
    data: &[f32],
    row_len: usize,
    imatrix: Option<&[f32]>,
) -> Result<Vec<u8>, QuantError> {
    let row_bytes = check(ty, row_len)?;
    if let Some(w) = imatrix {
        if w.len() != row_len {
            return Err(QuantError::ImatrixLength {
                got: w.len(),
                want: row_len,
            });
        }
    }
    let rows = data.len() / row_len.max(1);
    let mut out = vec![0u8; rows * row_bytes];
    out.par_chunks_mut(row_bytes * ROWS_PER_TASK)
        .zip(data.par_chunks(row_len * ROWS_PER_TASK))
        .for_each(|(o, x)| {
            for (orow, xrow) in o.chunks_exact_mut(row_bytes).zip(x.chunks_exact(row_len)) {
                quantize_row(ty, xrow, orow, imatrix);
            }
        });
    Ok(out)
}

/// Dequantizes a tensor of `ty` with rows of `row_len` elements, rows in parallel.
pub fn dequantize(ty: GgmlType, bytes: &[u8], row_len: usize) -> Result<Vec<f32>, QuantError> {
    let row_bytes = check(ty, row_len)?;
    let rows = bytes.len() / row_bytes.max(1);
    let mut out = vec![0f32; rows * row_len];
    out.par_chunks_mut(row_len * ROWS_PER_TASK)
        .zip(bytes.par_chunks(row_bytes * ROWS_PER_TASK))
        .for_each(|(o, b)| {
            for (orow, brow) in o.chunks_exact_mut(row_len).zip(b.chunks_exact(row_bytes)) {
                dequantize_row(ty, brow, orow);
            }
        });
    Ok(out)
}
