//! Lazy tensors: a handle (name, shape, source) whose values are computed only when an exporter
//! asks, one tensor at a time. Sources are memory-mapped file slices or computations over other
//! sources (a row permutation, a LoRA delta, a replacement).

use std::ops::Range;
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
    /// `inner` with some weights set to zero by a sparsity rule, applied row by row as the
    /// values stream (the transform that picks the rule decides what to mask).
    Masked {
        inner: Box<Source>,
        mask: Arc<super::mask::Mask>,
    },
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

    /// Number of rows (every dimension but the last).
    pub fn n_rows(&self) -> usize {
        self.numel() / self.row_len().max(1)
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

    /// Computes all values in f32, row-major in the PyTorch shape.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.rows_f32(0..self.n_rows())
    }

    /// Computes the values of a range of rows in f32. Exporters stream a tensor through this in
    /// chunks, so memory stays bounded whatever the tensor's size.
    pub fn rows_f32(&self, rows: Range<usize>) -> Result<Vec<f32>> {
        let n_rows = self.n_rows();
        if rows.end > n_rows || rows.start > rows.end {
            return Err(Error::Invalid(format!(
                "{}: rows {rows:?} out of {n_rows}",
                self.name
            )));
        }
        let ctx = Ctx {
            name: &self.name,
            row_len: self.row_len(),
            n_rows,
        };
        self.source.rows_f32(&ctx, rows)
    }

    /// Rows per chunk so that one chunk holds about `CHUNK_VALUES` f32 values.
    pub fn rows_per_chunk(&self) -> usize {
        (CHUNK_VALUES / self.row_len().max(1)).max(1)
    }
}

/// Values computed at once when a tensor is streamed: 16 MiB of f32, enough for every core to
/// have many rows while a model's largest tensor (an embedding) never sits whole in memory.
pub const CHUNK_VALUES: usize = 4 << 20;

/// What a source needs to know about the tensor it feeds.
struct Ctx<'a> {
    name: &'a str,
    row_len: usize,
    n_rows: usize,
}

impl Source {
    pub fn dtype(&self) -> GgmlType {
        match self {
            Source::Mapped { dtype, .. } => *dtype,
            Source::RowPermute { inner, .. } => inner.dtype(),
            Source::Merged { base, .. } => base.dtype(),
            Source::Owned(_) => GgmlType::F32,
            Source::Masked { inner, .. } => inner.dtype(),
        }
    }

    fn rows_f32(&self, c: &Ctx<'_>, rows: Range<usize>) -> Result<Vec<f32>> {
        match self {
            Source::Mapped {
                file,
                map,
                offset,
                len,
                dtype,
            } => {
                if dtype.bytes_for(c.n_rows * c.row_len) != Some(*len) {
                    return Err(Error::format(
                        file.as_path(),
                        c.name,
                        format!(
                            "{len} bytes do not hold {} {dtype} values",
                            c.n_rows * c.row_len
                        ),
                    ));
                }
                let row_bytes = dtype.bytes_for(c.row_len).ok_or_else(|| {
                    Error::format(
                        file.as_path(),
                        c.name,
                        format!("rows of {} do not divide into {dtype} blocks", c.row_len),
                    )
                })?;
                let start = offset + rows.start * row_bytes;
                let n = rows.len() * row_bytes;
                let values = quant::dequantize(*dtype, &map[start..start + n], c.row_len)
                    .map_err(|e| Error::format(file.as_path(), c.name, e.to_string()));
                release_pages(map, start, n);
                values
            }
            Source::RowPermute {
                inner,
                perm,
                row_len,
            } => {
                let mut out = Vec::with_capacity(rows.len() * row_len);
                for &p in &perm[rows] {
                    out.extend(inner.rows_f32(c, p..p + 1)?);
                }
                Ok(out)
            }
            Source::Merged {
                base,
                deltas,
                magnitude,
            } => {
                let mut w = base.rows_f32(c, rows.clone())?;
                for d in deltas {
                    d.add_rows(&mut w, c, rows.clone())?;
                }
                if let Some(m) = magnitude {
                    let m = m.to_f32()?;
                    if m.len() != c.n_rows {
                        return Err(Error::Invalid(format!(
                            "{}: DoRA magnitude has {} entries for {} rows",
                            c.name,
                            m.len(),
                            c.n_rows
                        )));
                    }
                    rescale_rows(&mut w, c.row_len, &m[rows]);
                }
                Ok(w)
            }
            Source::Owned(v) => Ok(v[rows.start * c.row_len..rows.end * c.row_len].to_vec()),
            Source::Masked { inner, mask } => {
                let mut w = inner.rows_f32(c, rows)?;
                mask.apply(&mut w, c.row_len);
                Ok(w)
            }
        }
    }
}

/// Tells the kernel the mapped pages of a tensor that was just read are not needed any more, so
/// a streamed export keeps only a few chunks resident instead of the whole input file. The
/// mapping is a read-only file mapping: dropped pages are simply read again if used again.
fn release_pages(map: &Mmap, offset: usize, len: usize) {
    const PAGE: usize = 4096;
    let start = offset.div_ceil(PAGE) * PAGE;
    let end = (offset + len) / PAGE * PAGE;
    if end > start {
        // SAFETY: DontNeed on a read-only, file-backed mapping discards clean page-cache
        // references only; later reads fault the same file contents back in.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
    }
}

/// DoRA: each output row of `w` is scaled to have L2 norm `m[row]` (PEFT computes the norm of
/// W + ΔW over in_features and multiplies by m / norm).
fn rescale_rows(w: &mut [f32], row_len: usize, m: &[f32]) {
    for (row, &mag) in w.chunks_exact_mut(row_len).zip(m) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        let k = mag / norm;
        row.iter_mut().for_each(|v| *v *= k);
    }
}

impl Delta {
    /// Adds this update's values for `rows` to `w`.
    fn add_rows(&self, w: &mut [f32], c: &Ctx<'_>, rows: Range<usize>) -> Result<()> {
        let delta = match self {
            Delta::LowRank {
                a,
                b,
                scale,
                transpose,
            } => low_rank_rows(a, b, *transpose, c, rows)?
                .into_iter()
                .map(|d| d * scale)
                .collect::<Vec<_>>(),
            Delta::Dense { t, scale } => {
                if t.numel() != c.n_rows * c.row_len {
                    return Err(Error::Invalid(format!(
                        "{}: update {} has {} values, the tensor {}",
                        c.name,
                        t.name,
                        t.numel(),
                        c.n_rows * c.row_len
                    )));
                }
                let v = Tensor {
                    shape: vec![c.n_rows, c.row_len],
                    ..t.clone()
                }
                .rows_f32(rows)?;
                v.into_iter().map(|d| d * scale).collect()
            }
        };
        w.iter_mut().zip(delta).for_each(|(x, d)| *x += d);
        Ok(())
    }
}

/// Rows of `B @ A` (or of `(B @ A)ᵀ` for embeddings), with candle's gemm in f32.
fn low_rank_rows(
    a: &Tensor,
    b: &Tensor,
    transpose: bool,
    c: &Ctx<'_>,
    rows: Range<usize>,
) -> Result<Vec<f32>> {
    use candle_core::{Device, Tensor as CTensor};
    let (out, r) = (b.shape[0], b.shape[1]);
    let (r2, inn) = (a.shape[0], a.shape[1]);
    let (full_rows, full_cols) = if transpose { (inn, out) } else { (out, inn) };
    if r != r2 || full_rows != c.n_rows || full_cols != c.row_len {
        return Err(Error::Invalid(format!(
            "{}: LoRA update {out}x{r} @ {r2}x{inn} does not fit a tensor of {} x {}",
            c.name, c.n_rows, c.row_len
        )));
    }
    let dev = Device::Cpu;
    let err = |e: candle_core::Error| Error::Invalid(format!("{}: LoRA merge: {e}", c.name));
    let n = rows.len();
    let product = if transpose {
        // (B @ A)ᵀ[rows] = A[:, rows]ᵀ @ Bᵀ
        let a_full = CTensor::from_vec(a.to_f32()?, (r, inn), &dev).map_err(err)?;
        let a_cols = a_full.narrow(1, rows.start, n).map_err(err)?;
        let b_full = CTensor::from_vec(b.to_f32()?, (out, r), &dev).map_err(err)?;
        a_cols
            .t()
            .map_err(err)?
            .matmul(&b_full.t().map_err(err)?)
            .map_err(err)?
    } else {
        let b_rows = CTensor::from_vec(b.rows_f32(rows)?, (n, r), &dev).map_err(err)?;
        let a_full = CTensor::from_vec(a.to_f32()?, (r, inn), &dev).map_err(err)?;
        b_rows.matmul(&a_full).map_err(err)?
    };
    product
        .contiguous()
        .map_err(err)?
        .flatten_all()
        .map_err(err)?
        .to_vec1::<f32>()
        .map_err(err)
}
