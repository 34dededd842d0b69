//! The external data file: every weight of the graph is streamed into it one tensor at a time
//! (a chunk of rows computed, encoded, written, dropped), so peak memory is a few chunks plus
//! one tensor's scales, whatever the model's size.
//!
//! Transposed layouts (ONNX `MatMul` wants `B` as `[in, out]`, PyTorch stores `[out, in]`) are
//! written without holding the tensor: each chunk of output rows is scattered to its columns
//! with positioned writes into space reserved for the whole tensor.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Tensors of at least this many bytes start on a page boundary, so onnxruntime can map them
/// instead of copying (it maps external data whose offset is aligned to the page size).
const PAGE_ALIGN_FROM: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// Smaller tensors are aligned for any element type.
const SMALL_ALIGN: u64 = 64;

/// Where one tensor's bytes landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

pub struct DataFile {
    file: File,
    path: PathBuf,
    len: u64,
}

impl DataFile {
    pub fn create(path: &Path) -> Result<DataFile> {
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        Ok(DataFile {
            file,
            path: path.to_path_buf(),
            len: 0,
        })
    }

    /// Reserves `len` bytes at a suitably aligned offset; the caller fills them.
    pub fn reserve(&mut self, len: u64) -> Result<Extent> {
        let align = if len >= PAGE_ALIGN_FROM {
            PAGE
        } else {
            SMALL_ALIGN
        };
        let offset = self.len.div_ceil(align) * align;
        self.len = offset + len;
        self.file
            .set_len(self.len)
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(Extent { offset, len })
    }

    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all_at(bytes, offset)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Writes a whole small tensor.
    pub fn put(&mut self, bytes: &[u8]) -> Result<Extent> {
        let e = self.reserve(bytes.len() as u64)?;
        self.write_at(e.offset, bytes)?;
        Ok(e)
    }

    /// Writes rows `n0..n0 + rows` of an `[n, k]` row-major matrix (element `esize` bytes,
    /// `chunk` holding `rows · k` elements) into `ext` as its transpose `[k, n]`.
    pub fn scatter_transposed(
        &self,
        ext: Extent,
        chunk: &[u8],
        esize: usize,
        n0: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let rows = chunk.len() / (esize * k);
        let mut col = vec![0u8; rows * esize];
        for kk in 0..k {
            for r in 0..rows {
                let src = (r * k + kk) * esize;
                col[r * esize..(r + 1) * esize].copy_from_slice(&chunk[src..src + esize]);
            }
            let off = ext.offset + ((kk * n + n0) * esize) as u64;
            self.write_at(off, &col)?;
        }
        Ok(())
    }

    /// Flushes to disk.
    pub fn finish(self) -> Result<u64> {
        self.file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        Ok(self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scattered_chunks_form_the_transpose_and_big_tensors_are_page_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = DataFile::create(&dir.path().join("d")).unwrap();
        f.put(&[1, 2, 3]).unwrap();
        // A 3x2 matrix [[0,1],[2,3],[4,5]] written in chunks of 2 rows and 1 row.
        let e = f.reserve(6).unwrap();
        assert_eq!(e.offset, 64);
        f.scatter_transposed(e, &[0, 1, 2, 3], 1, 0, 3, 2).unwrap();
        f.scatter_transposed(e, &[4, 5], 1, 2, 3, 2).unwrap();
        let big = f.reserve(PAGE_ALIGN_FROM).unwrap();
        assert_eq!(big.offset % PAGE, 0);
        f.finish().unwrap();
        let bytes = std::fs::read(dir.path().join("d")).unwrap();
        assert_eq!(&bytes[64..70], &[0, 2, 4, 1, 3, 5]);
    }
}
