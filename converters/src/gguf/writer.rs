//! A streaming GGUF v3 writer. The header (metadata and every tensor info, with offsets) is
//! computed from shapes and types before any data exists; tensor data is then produced and
//! written one tensor at a time, in header order, each padded to the alignment, the last one too
//! (shared/facts/gguf.md §1.3: llama.cpp requires contiguous offsets in info order).

use std::io::Write;
use std::path::Path;

use super::value::{Array, Metadata, Value};
use super::{DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, MAX_NAME_BYTES};
use crate::error::{Error, Result};
use crate::io::AtomicFile;
use crate::quant::GgmlType;

/// A tensor to be written: its name, GGUF dims (ne0 first) and type.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    pub name: String,
    pub ne: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorPlan {
    pub fn n_elements(&self) -> usize {
        self.ne.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.ty
            .bytes_for(self.n_elements())
            .expect("checked in GgufWriter::new")
    }
}

fn pad(n: usize, align: usize) -> usize {
    n.div_ceil(align) * align
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_array(out: &mut Vec<u8>, a: &Array) {
    out.extend_from_slice(&(a.element_type() as u32).to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => out.extend(v.iter().map(|&x| x as u8)),
        Array::U16(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::I16(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::U32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::I32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::F32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::Bool(v) => out.extend(v.iter().map(|&x| x as u8)),
        Array::String(v) => v.iter().for_each(|s| put_str(out, s)),
        Array::U64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::I64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::F64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_str(out, s),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Array(a) => put_array(out, a),
    }
}

/// A GGUF file whose layout is fixed; data is streamed in by [`GgufWriter::write`].
pub struct GgufWriter {
    header: Vec<u8>,
    tensors: Vec<TensorPlan>,
    alignment: usize,
}

impl GgufWriter {
    /// Lays out the file. Fails if a tensor name is too long for llama.cpp, names repeat, or a
    /// row does not divide into its type's blocks.
    pub fn new(metadata: &Metadata, tensors: Vec<TensorPlan>, out_path: &Path) -> Result<Self> {
        let alignment = match metadata.get("general.alignment") {
            Some(Value::U32(a)) => *a as usize,
            _ => DEFAULT_ALIGNMENT,
        };
        let mut header = Vec::with_capacity(1 << 20);
        header.extend_from_slice(GGUF_MAGIC);
        header.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata.iter() {
            put_str(&mut header, k);
            put_value(&mut header, v);
        }
        let mut offset = 0usize;
        let mut seen = std::collections::HashSet::new();
        for t in &tensors {
            if t.name.len() >= MAX_NAME_BYTES {
                return Err(Error::format(
                    out_path,
                    &t.name,
                    format!(
                        "tensor name is {} bytes; llama.cpp allows {}",
                        t.name.len(),
                        MAX_NAME_BYTES - 1
                    ),
                ));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(Error::format(out_path, &t.name, "duplicate tensor name"));
            }
            if t.ne.first().is_none_or(|ne0| ne0 % t.ty.block_size() != 0) {
                return Err(Error::format(
                    out_path,
                    &t.name,
                    format!(
                        "ne0 {:?} is not a multiple of {}'s block size",
                        t.ne.first(),
                        t.ty
                    ),
                ));
            }
            put_str(&mut header, &t.name);
            header.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                header.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            header.extend_from_slice(&t.ty.id().to_le_bytes());
            header.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += pad(t.nbytes(), alignment);
        }
        if !tensors.is_empty() {
            header.resize(pad(header.len(), alignment), 0);
        }
        Ok(GgufWriter {
            header,
            tensors,
            alignment,
        })
    }

    pub fn tensors(&self) -> &[TensorPlan] {
        &self.tensors
    }

    /// Total size of the file that will be written.
    pub fn file_size(&self) -> usize {
        self.header.len()
            + self
                .tensors
                .iter()
                .map(|t| pad(t.nbytes(), self.alignment))
                .sum::<usize>()
    }

    /// Writes the file atomically. `produce(i, plan, sink)` streams the bytes of tensor `i`
    /// into `sink` (in as many pieces as it likes); tensors are produced in header order.
    pub fn write(
        &self,
        path: &Path,
        mut produce: impl FnMut(usize, &TensorPlan, &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>,
    ) -> Result<()> {
        let mut f = AtomicFile::create(path)?;
        f.write_all(&self.header)?;
        let zeros = vec![0u8; self.alignment];
        for (i, t) in self.tensors.iter().enumerate() {
            let mut written = 0usize;
            produce(i, t, &mut |bytes: &[u8]| {
                written += bytes.len();
                f.write_all(bytes)
            })?;
            if written != t.nbytes() {
                return Err(Error::Invalid(format!(
                    "{}: tensor {} produced {written} bytes, expected {}",
                    path.display(),
                    t.name,
                    t.nbytes()
                )));
            }
            let p = pad(written, self.alignment) - written;
            f.write_all(&zeros[..p])?;
        }
        f.flush().map_err(|e| Error::io(path, e))?;
        f.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::super::reader::GgufFile;
    use super::*;

    #[test]
    fn written_file_reads_back_with_contiguous_padded_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let mut md = Metadata::new();
        md.set("general.architecture", Value::String("llama".into()));
        md.set("llama.block_count", Value::U32(2));
        md.set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
        md.set(
            "tokenizer.ggml.tokens",
            Value::Array(Array::String(vec!["a".into(), "b".into()])),
        );
        let tensors = vec![
            TensorPlan {
                name: "a".into(),
                ne: vec![3],
                ty: GgmlType::F32,
            },
            TensorPlan {
                name: "b".into(),
                ne: vec![32, 2],
                ty: GgmlType::Q8_0,
            },
        ];
        let w = GgufWriter::new(&md, tensors, &path).unwrap();
        w.write(&path, |_, t, sink| sink(&vec![7u8; t.nbytes()]))
            .unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.metadata, md);
        assert_eq!(f.tensors[0].offset, f.data_start);
        assert_eq!(f.tensors[1].offset, f.data_start + 32);
        assert_eq!(f.data(&f.tensors[1]), &[7u8; 68][..]);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len() as usize,
            w.file_size()
        );
        assert_eq!(w.file_size() % 32, 0);
    }

    #[test]
    fn truncated_file_is_refused_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let md = Metadata::new();
        let tensors = vec![TensorPlan {
            name: "blk.0.attn_q.weight".into(),
            ne: vec![32, 4],
            ty: GgmlType::F32,
        }];
        let w = GgufWriter::new(&md, tensors, &path).unwrap();
        w.write(&path, |_, t, sink| sink(&vec![0u8; t.nbytes()]))
            .unwrap();
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - 100]).unwrap();
        let err = GgufFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("blk.0.attn_q.weight"), "{err}");
        assert!(err.contains("truncated"), "{err}");
        std::fs::write(&path, &full[..20]).unwrap();
        let err = GgufFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("truncated") || err.contains("count"), "{err}");
        std::fs::write(&path, b"NOPE0000").unwrap();
        let err = GgufFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("magic"), "{err}");
    }
}
