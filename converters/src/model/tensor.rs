//! Lazy tensors: a handle (name, shape, source) whose values are computed only when an exporter
//! asks, one tensor at a time. Sources are memory-mapped file slices or computations over other
//! sources (a row permutation, a LoRA delta, a replacement).

use std::path::PathBuf;
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::quant::{self, GgmlType};

/// Where a tensor's values come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A slice of a memory-mapped file in a ggml storage type (F32/F16/BF16 for safetensors,
    /// any supported type for GGUF). Rows run along the last PyTorch dimension.
    Mapped {
        file: Arc<PathBuf>,
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
        dtype: GgmlType,
    },
    /// Rows of `inner` reordered: output row `i` is input row `perm[i]`; rows have `row_len`
    /// elements. Format modules use this for layout quirks (llama.cpp's rotary permutation).
    RowPermute {
        inner: Box<Source>,
        perm: Arc<Vec<usize>>,
        row_len: usize,
    },
    /// Base weights plus scaled updates, merged in f32; with `magnitude`, each output row is
    /// then rescaled to that norm (DoRA).
    Merged {
        base: Box<Source>,
        deltas: Vec<Delta>,
        magnitude: Option<Box<Tensor>>,
    },
    /// Values computed in memory (small tensors such as generated rope factors).
    Owned(Arc<Vec<f32>>),
}

/// One update added to a base tensor.
#[derive(Debug, Clone)]
pub enum Delta {
    /// `scale · (B @ A)`, transposed for embeddings (whose update PEFT stores transposed).
    LowRank {
        /// `lora_A`: [r, in] (embeddings: [r, vocab]).
        a: Tensor,
        /// `lora_B`: [out, r] (embeddings: [dim, r]).
        b: Tensor,
        scale: f32,
        transpose: bool,
    },
    /// `scale · t` for a tensor of the base's shape (a LoRA bias).
    Dense { t: Tensor, scale: f32 },
}

/// A named tensor with a PyTorch-order shape.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub source: Source,
}

impl Tensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Length of one row (the last dimension), the unit of quantization.
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// The type the values are stored in at the source (a merged tensor keeps its base's type).
    pub fn dtype(&self) -> GgmlType {
        self.source.dtype()
    }

    /// Bytes at the source.
    pub fn source_bytes(&self) -> usize {
        self.dtype()
            .bytes_for(self.numel())
            .unwrap_or(self.numel() * 4)
    }

    /// Computes the values in f32, row-major in the PyTorch shape.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.source.to_f32(&self.name, self.row_len(), self.numel())
    }

    /// The raw stored bytes when the source is a plain mapped slice.
    pub fn mapped_bytes(&self) -> Option<&[u8]> {
        match &self.source {
            Source::Mapped {
                map, offset, len, ..
            } => Some(&map[*offset..*offset + *len]),
            _ => None,
        }
    }
}

impl Source {
    pub fn dtype(&self) -> GgmlType {
        match self {
            Source::Mapped { dtype, .. } => *dtype,
            Source::RowPermute { inner, .. } => inner.dtype(),
            Source::Merged { base, .. } => base.dtype(),
            Source::Owned(_) => GgmlType::F32,
        }
    }

    fn to_f32(&self, name: &str, row_len: usize, numel: usize) -> Result<Vec<f32>> {
        match self {
            Source::Mapped {
                file,
                map,
                offset,
                len,
                dtype,
            } => {
                let bytes = &map[*offset..*offset + *len];
                if dtype.bytes_for(numel) != Some(*len) {
                    return Err(Error::format(
                        file.as_path(),
                        name,
                        format!("{len} bytes do not hold {numel} {dtype} values"),
                    ));
                }
                quant::dequantize(*dtype, bytes, row_len)
                    .map_err(|e| Error::format(file.as_path(), name, e.to_string()))
            }
            Source::RowPermute {
                inner,
                perm,
                row_len: rl,
            } => {
                let src = inner.to_f32(name, row_len, numel)?;
                let mut out = vec![0f32; src.len()];
                for (i, &p) in perm.iter().enumerate() {
                    out[i * rl..(i + 1) * rl].copy_from_slice(&src[p * rl..(p + 1) * rl]);
                }
                Ok(out)
            }
            Source::Merged {
                base,
                deltas,
                magnitude,
            } => {
                let mut w = base.to_f32(name, row_len, numel)?;
                for d in deltas {
                    d.add_to(&mut w, name, numel)?;
                }
                if let Some(m) = magnitude {
                    rescale_rows(&mut w, row_len, &m.to_f32()?, name)?;
                }
                Ok(w)
            }
            Source::Owned(v) => Ok(v.as_ref().clone()),
        }
    }
}

/// DoRA: each output row of `w` is scaled to have L2 norm `m[row]` (PEFT computes the norm of
/// W + ΔW over in_features and multiplies by m / norm).
fn rescale_rows(w: &mut [f32], row_len: usize, m: &[f32], name: &str) -> Result<()> {
    if m.len() * row_len != w.len() {
        return Err(Error::Invalid(format!(
            "{name}: DoRA magnitude has {} entries for {} rows",
            m.len(),
            w.len() / row_len.max(1)
        )));
    }
    for (row, &mag) in w.chunks_exact_mut(row_len).zip(m) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        let k = mag / norm;
        row.iter_mut().for_each(|v| *v *= k);
    }
    Ok(())
}

impl Delta {
    fn add_to(&self, w: &mut [f32], name: &str, numel: usize) -> Result<()> {
        match self {
            Delta::LowRank {
                a,
                b,
                scale,
                transpose,
            } => add_low_rank(w, a, b, *scale, *transpose, name, numel),
            Delta::Dense { t, scale } => {
                let v = t.to_f32()?;
                if v.len() != w.len() {
                    return Err(Error::Invalid(format!(
                        "{name}: update {} has {} values, the tensor {}",
                        t.name,
                        v.len(),
                        w.len()
                    )));
                }
                w.iter_mut().zip(v).for_each(|(x, d)| *x += scale * d);
                Ok(())
            }
        }
    }
}

/// `w += scale · (B @ A)` (transposed when asked), with candle's gemm in f32.
fn add_low_rank(
    w: &mut [f32],
    a: &Tensor,
    b: &Tensor,
    scale: f32,
    transpose: bool,
    name: &str,
    numel: usize,
) -> Result<()> {
    {
        use candle_core::{Device, Tensor as CTensor};
        let (out, r) = (b.shape[0], b.shape[1]);
        let (r2, inn) = (a.shape[0], a.shape[1]);
        if r != r2 || out * inn != numel {
            return Err(Error::Invalid(format!(
                "{name}: LoRA update {}x{} @ {}x{} does not fit a tensor of {numel} values",
                out, r, r2, inn
            )));
        }
        let a = a.to_f32()?;
        let b = b.to_f32()?;
        let dev = Device::Cpu;
        let err = |e: candle_core::Error| Error::Invalid(format!("{name}: LoRA merge: {e}"));
        let a = CTensor::from_vec(a, (r, inn), &dev).map_err(err)?;
        let b = CTensor::from_vec(b, (out, r), &dev).map_err(err)?;
        let mut delta = b.matmul(&a).map_err(err)?;
        if transpose {
            delta = delta.t().map_err(err)?.contiguous().map_err(err)?;
        }
        let delta = delta
            .flatten_all()
            .map_err(err)?
            .to_vec1::<f32>()
            .map_err(err)?;
        for (x, d) in w.iter_mut().zip(delta) {
            *x += scale * d;
        }
        Ok(())
    }
}
