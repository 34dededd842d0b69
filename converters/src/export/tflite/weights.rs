//! Weight encodings of the TFLite exporter: how a model tensor's f32 rows become the bytes of a
//! TFLite buffer (f32, f16, or int8 with one symmetric scale per output row), streamed a chunk
//! of rows at a time.

use std::sync::Arc;

use half::f16;
use rayon::prelude::*;

use crate::error::Result;
use crate::export::graph::Weight;
use crate::quant::int8;

/// How one weight tensor is stored.
#[derive(Debug, Clone)]
pub enum Encoding {
    F32,
    F16,
    /// int8, `scales[r]` for output row `r` (per-channel along dimension 0).
    Int8 {
        scales: Arc<Vec<f32>>,
    },
    /// int32 with one scale per element (a bias of an int8 linear: input scale × weight row
    /// scale).
    Int32 {
        scales: Arc<Vec<f32>>,
    },
    /// int64 likewise (the bias of a 16x8 linear).
    Int64 {
        scales: Arc<Vec<f32>>,
    },
    /// int16 with one symmetric scale for the whole tensor (an integer graph's lookup table).
    Int16 {
        scale: f32,
    },
}

impl Encoding {
    pub fn bytes_per_value(&self) -> usize {
        match self {
            Encoding::F32 => 4,
            Encoding::F16 => 2,
            Encoding::Int8 { .. } => 1,
            Encoding::Int32 { .. } => 4,
            Encoding::Int64 { .. } => 8,
            Encoding::Int16 { .. } => 2,
        }
    }
}

/// A graph weight to be written as one buffer: optionally each column multiplied by
/// `col_scale` first (SmoothQuant folds its per-channel factors into the weights this way).
#[derive(Debug, Clone)]
pub struct WeightSource {
    pub weight: Weight,
    pub col_scale: Option<Arc<Vec<f32>>>,
    /// Only these rows, in this order (a matrix's row subset).
    pub row_select: Option<Arc<Vec<usize>>>,
    /// Only these columns, in this order (applied before `col_scale`).
    pub col_select: Option<Arc<Vec<usize>>>,
}

impl WeightSource {
    pub fn plain(weight: Weight) -> WeightSource {
        WeightSource {
            weight,
            col_scale: None,
            row_select: None,
            col_select: None,
        }
    }

    /// Rows written (after any row selection).
    pub fn n_rows(&self) -> usize {
        self.row_select
            .as_ref()
            .map_or(self.weight.n_rows(), |r| r.len())
    }

    /// Values per row written (after any column selection).
    pub fn row_len(&self) -> usize {
        self.col_select
            .as_ref()
            .map_or(self.weight.row_len(), |c| c.len())
    }

    /// The `[rows, row_len]` shape written, for matrices.
    pub fn shape(&self) -> Vec<usize> {
        if self.weight.shape.len() == 1 {
            vec![self.row_len()]
        } else {
            vec![self.n_rows(), self.row_len()]
        }
    }

    fn rows(&self, rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let mut v = self.selected_rows(rows)?;
        if let Some(cols) = &self.col_select {
            let n = self.weight.row_len();
            v = v
                .chunks(n)
                .flat_map(|r| cols.iter().map(move |&j| r[j]))
                .collect();
        }
        if let Some(s) = &self.col_scale {
            let n = s.len();
            v.par_chunks_mut(n).for_each(|row| {
                row.iter_mut().zip(s.iter()).for_each(|(x, k)| *x *= k);
            });
        }
        Ok(v)
    }

    fn selected_rows(&self, rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let Some(sel) = &self.row_select else {
            return self.plain_rows(rows);
        };
        // Read runs of consecutive source rows at once.
        let mut out = Vec::with_capacity(rows.len() * self.weight.row_len());
        let idx = &sel[rows];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i + 1;
            while j < idx.len() && idx[j] == idx[j - 1] + 1 {
                j += 1;
            }
            out.extend(self.plain_rows(idx[i]..idx[j - 1] + 1)?);
            i = j;
        }
        Ok(out)
    }

    fn plain_rows(&self, rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
        // A vector made of several parts (a packed q/k/v bias) is one row spanning every part;
        // read the parts whole rather than by row index.
        let v = if self.weight.shape.len() == 1 {
            let mut all = Vec::with_capacity(self.weight.numel());
            for p in &self.weight.parts {
                all.extend(p.to_f32()?);
            }
            all
        } else {
            self.weight.rows_f32(rows)?
        };
        Ok(v)
    }

    /// Streams the rows through `f` a chunk at a time.
    pub fn for_each_chunk(
        &self,
        mut f: impl FnMut(std::ops::Range<usize>, Vec<f32>) -> Result<()>,
    ) -> Result<()> {
        let n_rows = self.n_rows();
        let step = (crate::model::tensor::CHUNK_VALUES / self.weight.row_len().max(1)).max(1);
        let mut row = 0;
        while row < n_rows {
            let end = (row + step).min(n_rows);
            f(row..end, self.rows(row..end)?)?;
            row = end;
        }
        Ok(())
    }

    /// The symmetric int8 scale of every row ([`int8::row_scale_nonzero`]). TFLite's int8
    /// weights span [-127, 127] with zero point 0, so -128 is never produced.
    pub fn int8_row_scales(&self) -> Result<Vec<f32>> {
        let row_len = self.row_len();
        let mut scales = Vec::with_capacity(self.n_rows());
        self.for_each_chunk(|_, v| {
            scales.par_extend(v.par_chunks(row_len).map(int8::row_scale_nonzero));
            Ok(())
        })?;
        Ok(scales)
    }

    /// The largest |value| (after any column scale).
    pub fn abs_max(&self) -> Result<f32> {
        let mut m = 0f32;
        self.for_each_chunk(|_, v| {
            m = v.par_iter().map(|x| x.abs()).reduce(|| m, f32::max);
            Ok(())
        })?;
        Ok(m)
    }

    /// Streams the encoded bytes to `sink`.
    pub fn write(&self, enc: &Encoding, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let row_len = self.row_len();
        self.for_each_chunk(|rows, v| {
            let bytes = encode(&v, row_len, rows.start, enc);
            sink(&bytes)
        })
    }
}

/// Encodes rows `first_row..` of a tensor, given as f32 values.
pub fn encode(values: &[f32], row_len: usize, first_row: usize, enc: &Encoding) -> Vec<u8> {
    match enc {
        Encoding::F32 => bytemuck::cast_slice(values).to_vec(),
        Encoding::F16 => {
            let h: Vec<f16> = values.par_iter().map(|&x| f16::from_f32(x)).collect();
            bytemuck::cast_slice(&h).to_vec()
        }
        Encoding::Int8 { scales } => {
            let mut out = vec![0u8; values.len()];
            out.par_chunks_mut(row_len)
                .zip(values.par_chunks(row_len))
                .enumerate()
                .for_each(|(i, (o, r))| {
                    let s = scales[first_row + i];
                    for (b, &x) in o.iter_mut().zip(r) {
                        *b = int8::code_half_away(x, s) as u8;
                    }
                });
            out
        }
        Encoding::Int32 { scales } => {
            let q: Vec<i32> = values
                .iter()
                .zip(&scales[first_row * row_len..])
                .map(|(&x, &s)| (x as f64 / s as f64).round() as i32)
                .collect();
            bytemuck::cast_slice(&q).to_vec()
        }
        Encoding::Int16 { scale } => {
            let q: Vec<i16> = values
                .par_iter()
                .map(|&x| (x / scale).round().clamp(-32767.0, 32767.0) as i16)
                .collect();
            bytemuck::cast_slice(&q).to_vec()
        }
        Encoding::Int64 { scales } => {
            let q: Vec<i64> = values
                .iter()
                .zip(&scales[first_row * row_len..])
                .map(|(&x, &s)| (x as f64 / s as f64).round() as i64)
                .collect();
            bytemuck::cast_slice(&q).to_vec()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_rows_use_their_own_scale_and_hit_plus_minus_127() {
        let scales = Arc::new(vec![1.0 / 127.0, 2.0 / 127.0]);
        let v = [1.0, -0.5, 0.0, -2.0, 1.0, 0.0];
        let b = encode(&v, 3, 0, &Encoding::Int8 { scales });
        let q: Vec<i8> = b.iter().map(|&x| x as i8).collect();
        assert_eq!(q, [127, -64, 0, -127, 64, 0]);
    }

    #[test]
    fn row_and_column_selections_pick_those_rows_and_columns_in_order() {
        use crate::export::graph::{Weight, WeightKind};
        use crate::model::tensor::Source;
        use crate::model::Tensor;
        // A 4x3 matrix with value 10·row + col.
        let vals: Vec<f32> = (0..4)
            .flat_map(|r| (0..3).map(move |c| (10 * r + c) as f32))
            .collect();
        let t = Tensor {
            name: "w".into(),
            shape: vec![4, 3],
            source: Source::Owned(Arc::new(vals)),
        };
        let w = Weight {
            name: "w".into(),
            kind: WeightKind::Embedding,
            layer: None,
            shape: vec![4, 3],
            parts: vec![t],
            stats_key: None,
            tied: false,
        };
        let src = WeightSource {
            row_select: Some(Arc::new(vec![0, 2, 3])),
            col_select: Some(Arc::new(vec![2, 0])),
            ..WeightSource::plain(w)
        };
        assert_eq!(src.shape(), [3, 2]);
        let mut got = Vec::new();
        src.for_each_chunk(|_, v| {
            got.extend(v);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, [2.0, 0.0, 22.0, 20.0, 32.0, 30.0]);
    }

    #[test]
    fn f16_encoding_is_little_endian_halves() {
        let b = encode(&[1.0, -2.0], 2, 0, &Encoding::F16);
        assert_eq!(b, [0x00, 0x3c, 0x00, 0xc0]);
    }
}
