//! Reads GGUF v2/v3 files through a memory map: metadata is parsed, tensor data stays on disk
//! until a tensor is asked for. Every bound is checked, so a truncated or corrupt file gives an
//! error naming the field instead of a crash (shared/facts/gguf.md §1).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::value::{Array, Metadata, Value, ValueType};
use super::{DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};
use crate::error::{Error, Result};
use crate::quant::GgmlType;

/// One tensor info of a GGUF file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF dims, ne0 (the contiguous one) first.
    pub ne: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute offset of the data in the file.
    pub offset: usize,
    pub size: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.ne.iter().product()
    }

    /// The PyTorch shape (GGUF dims reversed).
    pub fn torch_shape(&self) -> Vec<usize> {
        self.ne.iter().rev().copied().collect()
    }
}

/// An opened GGUF file.
#[derive(Debug, Clone)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    pub alignment: usize,
    pub data_start: usize,
    pub map: Arc<Mmap>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(Error::format(
                self.path,
                field,
                format!(
                    "file is truncated: needs {n} bytes at offset {}, file has {}",
                    self.pos,
                    self.buf.len()
                ),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self, f: &str) -> Result<u8> {
        Ok(self.take(1, f)?[0])
    }
    fn u16(&mut self, f: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, f)?.try_into().unwrap()))
    }
    fn u32(&mut self, f: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, f)?.try_into().unwrap()))
    }
    fn u64(&mut self, f: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, f)?.try_into().unwrap()))
    }

    /// A count that must fit in what is left of the file (each element takes at least
    /// `min_elem` bytes), so a corrupt count cannot make us allocate terabytes.
    fn count(&mut self, f: &str, min_elem: usize) -> Result<usize> {
        let n = self.u64(f)?;
        let left = (self.buf.len() - self.pos) as u64;
        if n > left / min_elem.max(1) as u64 {
            return Err(Error::format(
                self.path,
                f,
                format!(
                    "count {n} is larger than the rest of the file allows (corrupt or truncated)"
                ),
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, f: &str) -> Result<String> {
        let n = self.count(f, 1)?;
        let b = self.take(n, f)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::format(self.path, f, "string is not valid UTF-8"))
    }

    fn value(&mut self, ty: ValueType, f: &str) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.u8(f)?),
            ValueType::I8 => Value::I8(self.u8(f)? as i8),
            ValueType::U16 => Value::U16(self.u16(f)?),
            ValueType::I16 => Value::I16(self.u16(f)? as i16),
            ValueType::U32 => Value::U32(self.u32(f)?),
            ValueType::I32 => Value::I32(self.u32(f)? as i32),
            ValueType::F32 => Value::F32(f32::from_bits(self.u32(f)?)),
            ValueType::Bool => match self.u8(f)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                v => return Err(Error::format(self.path, f, format!("bool has value {v}"))),
            },
            ValueType::String => Value::String(self.string(f)?),
            ValueType::U64 => Value::U64(self.u64(f)?),
            ValueType::I64 => Value::I64(self.u64(f)? as i64),
            ValueType::F64 => Value::F64(f64::from_bits(self.u64(f)?)),
            ValueType::Array => {
                let et = self.u32(f)?;
                let et = ValueType::from_id(et).ok_or_else(|| {
                    Error::format(self.path, f, format!("unknown array element type {et}"))
                })?;
                Value::Array(self.array(et, f)?)
            }
        })
    }

    fn array(&mut self, et: ValueType, f: &str) -> Result<Array> {
        macro_rules! arr {
            ($variant:ident, $size:expr, $read:expr) => {{
                let n = self.count(f, $size)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push($read(&mut *self)?);
                }
                Array::$variant(v)
            }};
        }
        Ok(match et {
            ValueType::U8 => arr!(U8, 1, |c: &mut Self| c.u8(f)),
            ValueType::I8 => arr!(I8, 1, |c: &mut Self| c.u8(f).map(|v| v as i8)),
            ValueType::U16 => arr!(U16, 2, |c: &mut Self| c.u16(f)),
            ValueType::I16 => arr!(I16, 2, |c: &mut Self| c.u16(f).map(|v| v as i16)),
            ValueType::U32 => arr!(U32, 4, |c: &mut Self| c.u32(f)),
            ValueType::I32 => arr!(I32, 4, |c: &mut Self| c.u32(f).map(|v| v as i32)),
            ValueType::F32 => arr!(F32, 4, |c: &mut Self| c.u32(f).map(f32::from_bits)),
            ValueType::Bool => arr!(Bool, 1, |c: &mut Self| c.u8(f).map(|v| v != 0)),
            ValueType::String => arr!(String, 8, |c: &mut Self| c.string(f)),
            ValueType::U64 => arr!(U64, 8, |c: &mut Self| c.u64(f)),
            ValueType::I64 => arr!(I64, 8, |c: &mut Self| c.u64(f).map(|v| v as i64)),
            ValueType::F64 => arr!(F64, 8, |c: &mut Self| c.u64(f).map(f64::from_bits)),
            ValueType::Array => {
                return Err(Error::format(
                    self.path,
                    f,
                    "nested arrays are not allowed (llama.cpp rejects them)",
                ))
            }
        })
    }
}

impl GgufFile {
    /// Opens and validates `path`. Tensor data is not read.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; edgepack never writes to its inputs. A file changed by
        // another process while mapped is outside what any mmap-based reader can defend against.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let map = Arc::new(map);
        let mut c = Cursor {
            buf: &map[..],
            pos: 0,
            path,
        };
        let magic = c.take(4, "magic")?;
        if magic != GGUF_MAGIC {
            return Err(Error::format(
                path,
                "magic",
                format!("not a GGUF file (starts with {magic:02x?}, expected \"GGUF\")"),
            ));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(
                path,
                "version",
                format!("GGUF version {version} is not supported (2 and 3 are)"),
            ));
        }
        // A tensor info holds at least a name length, n_dims, one dimension, a type and an offset.
        let n_tensors = c.count("tensor_count", 8 + 4 + 8 + 4 + 8)?;
        let n_kv = c.count("kv_count", 8 + 4)?;
        let mut metadata = Metadata::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata[{i}].key"))?;
            if key.is_empty() {
                return Err(Error::format(path, format!("metadata[{i}]"), "empty key"));
            }
            if metadata.get(&key).is_some() {
                return Err(Error::format(path, &key, "duplicate key"));
            }
            let ty = c.u32(&key)?;
            let ty = ValueType::from_id(ty)
                .ok_or_else(|| Error::format(path, &key, format!("unknown value type {ty}")))?;
            let v = c.value(ty, &key)?;
            metadata.set(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if *a > 0 && a.is_power_of_two() => *a as usize,
            Some(other) => {
                return Err(Error::format(
                    path,
                    "general.alignment",
                    format!("must be a UINT32 power of two, found {other:?}"),
                ))
            }
        };
        let mut infos = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let field = format!("tensor_info[{i}]");
            let name = c.string(&format!("{field}.name"))?;
            let n_dims = c.u32(&format!("{name}.n_dims"))? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::format(
                    path,
                    &name,
                    format!("has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"),
                ));
            }
            let mut ne = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = c.u64(&format!("{name}.ne"))?;
                ne.push(usize::try_from(d).map_err(|_| {
                    Error::format(path, &name, format!("dimension {d} is too large"))
                })?);
            }
            let tid = c.u32(&format!("{name}.type"))?;
            let ty = GgmlType::from_id(tid).ok_or_else(|| {
                Error::unsupported(path, &name, format!("tensor type id {tid} is unknown"))
            })?;
            let offset = c.u64(&format!("{name}.offset"))? as usize;
            let n: usize = ne
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| Error::format(path, &name, "element count overflows"))?;
            let size = ty
                .bytes_for(n)
                .filter(|_| ne[0] % ty.block_size() == 0)
                .ok_or_else(|| {
                    Error::format(
                        path,
                        &name,
                        format!(
                            "ne0 = {} is not a multiple of {ty}'s block size {}",
                            ne[0],
                            ty.block_size()
                        ),
                    )
                })?;
            if infos.iter().any(|t: &TensorInfo| t.name == name) {
                return Err(Error::format(path, &name, "duplicate tensor name"));
            }
            infos.push(TensorInfo {
                name,
                ne,
                ty,
                offset,
                size,
            });
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;
        for t in &mut infos {
            if t.offset % alignment != 0 {
                return Err(Error::format(
                    path,
                    &t.name,
                    format!("data offset {} is not aligned to {alignment}", t.offset),
                ));
            }
            let start = data_start
                .checked_add(t.offset)
                .ok_or_else(|| Error::format(path, &t.name, "data offset overflows"))?;
            if start + t.size > map.len() {
                return Err(Error::format(
                    path,
                    &t.name,
                    format!(
                        "tensor data ends at byte {} but the file has {} bytes (truncated)",
                        start + t.size,
                        map.len()
                    ),
                ));
            }
            t.offset = start;
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors: infos,
            alignment,
            data_start,
            map,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.offset..t.offset + t.size]
    }

    pub fn architecture(&self) -> Result<&str> {
        self.metadata
            .get_str("general.architecture")
            .ok_or_else(|| Error::format(&self.path, "general.architecture", "missing"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    /// A GGUF v3 header claiming `n_tensors` tensor infos and `n_kv` metadata pairs.
    fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&n_tensors.to_le_bytes());
        b.extend_from_slice(&n_kv.to_le_bytes());
        b
    }

    fn open_err(bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gguf");
        std::fs::write(&path, bytes).unwrap();
        GgufFile::open(&path).unwrap_err().to_string()
    }

    const HUGE: u64 = 1 << 60;

    #[test]
    fn huge_tensor_and_metadata_counts_are_errors_not_allocations() {
        let err = open_err(&header(HUGE, 0));
        assert!(err.contains("x.gguf: tensor_count:"), "{err}");
        let err = open_err(&header(0, HUGE));
        assert!(err.contains("x.gguf: kv_count:"), "{err}");
    }

    #[test]
    fn huge_string_and_array_lengths_are_errors_not_allocations() {
        let mut b = header(0, 1);
        b.extend_from_slice(&HUGE.to_le_bytes());
        b.extend_from_slice(b"key");
        b.extend_from_slice(&[0u8; 64]);
        let err = open_err(&b);
        assert!(err.contains("metadata[0].key"), "{err}");

        let mut b = header(0, 1);
        put_str(&mut b, "general.name");
        b.extend_from_slice(&(ValueType::String as u32).to_le_bytes());
        b.extend_from_slice(&HUGE.to_le_bytes());
        b.extend_from_slice(b"name");
        b.extend_from_slice(&[0u8; 64]);
        let err = open_err(&b);
        assert!(err.contains("x.gguf: general.name:"), "{err}");

        for et in [ValueType::U8, ValueType::U64, ValueType::String] {
            let mut b = header(0, 1);
            put_str(&mut b, "tokenizer.ggml.tokens");
            b.extend_from_slice(&(ValueType::Array as u32).to_le_bytes());
            b.extend_from_slice(&(et as u32).to_le_bytes());
            b.extend_from_slice(&HUGE.to_le_bytes());
            b.extend_from_slice(&[0u8; 64]);
            let err = open_err(&b);
            assert!(
                err.contains("x.gguf: tokenizer.ggml.tokens:"),
                "{et:?}: {err}"
            );
        }
    }

    #[test]
    fn huge_n_dims_and_dimensions_are_errors_naming_the_tensor() {
        let mut b = header(1, 0);
        put_str(&mut b, "token_embd.weight");
        b.extend_from_slice(&(1u32 << 31).to_le_bytes());
        b.extend_from_slice(&[0u8; 64]);
        let err = open_err(&b);
        assert!(err.contains("x.gguf: token_embd.weight:"), "{err}");
        assert!(err.contains("dimensions"), "{err}");

        let mut b = header(1, 0);
        put_str(&mut b, "token_embd.weight");
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&HUGE.to_le_bytes());
        b.extend_from_slice(&GgmlType::F32.id().to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&[0u8; 64]);
        let err = open_err(&b);
        assert!(err.contains("x.gguf: token_embd.weight:"), "{err}");
    }
}
