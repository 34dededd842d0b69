//! Sparsity masks: rules that zero weights of a tensor row by row as its values stream
//! ([`super::Source::Masked`]). A mask is plain data about the layout; which weights a model
//! should lose is decided by `transform::sparsify`.

use std::sync::Arc;

use rayon::prelude::*;

/// A rule that zeroes weights of a tensor, row by row.
#[derive(Debug, Clone)]
pub enum Mask {
    /// Zero every |w| ≤ threshold (a per-tensor rule; ties at the threshold are zeroed too,
    /// and the report counts what was actually zeroed).
    Threshold(f32),
    /// In each row, zero the `k` lowest `|w| · col_scale` (ties: the lower column first).
    RowLowest {
        k: usize,
        col_scale: Option<Arc<Vec<f32>>>,
    },
    /// In each group of `m` consecutive weights of a row, zero the `m − n` lowest scores.
    NM {
        n: usize,
        m: usize,
        col_scale: Option<Arc<Vec<f32>>>,
    },
}

fn score(v: f32, j: usize, col_scale: &Option<Arc<Vec<f32>>>) -> f32 {
    match col_scale {
        Some(s) => v.abs() * s[j],
        None => v.abs(),
    }
}

/// Zeroes the `k` lowest-scored entries of `row` (whose first column is `col0`).
fn zero_lowest(row: &mut [f32], col0: usize, k: usize, col_scale: &Option<Arc<Vec<f32>>>) {
    if k == 0 {
        return;
    }
    let mut idx: Vec<usize> = (0..row.len()).collect();
    let key = |i: usize| score(row[i], col0 + i, col_scale);
    if k < row.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| key(a).total_cmp(&key(b)).then(a.cmp(&b)));
    }
    for &i in &idx[..k.min(row.len())] {
        row[i] = 0.0;
    }
}

impl Mask {
    /// Applies the rule to whole rows of `row_len` values.
    pub fn apply(&self, w: &mut [f32], row_len: usize) {
        match self {
            Mask::Threshold(t) => w.iter_mut().for_each(|v| {
                if v.abs() <= *t {
                    *v = 0.0
                }
            }),
            Mask::RowLowest { k, col_scale } => w
                .par_chunks_mut(row_len)
                .for_each(|row| zero_lowest(row, 0, *k, col_scale)),
            Mask::NM { n, m, col_scale } => w.par_chunks_mut(row_len).for_each(|row| {
                for (g, group) in row.chunks_mut(*m).enumerate() {
                    zero_lowest(group, g * m, m - n, col_scale);
                }
            }),
        }
    }
}
