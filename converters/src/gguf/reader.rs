//! Reads GGUF v2/v3 files through a memory map: metadata is parsed, tensor data stays on disk
//! until a tensor is asked for. Every bound is checked, so a truncated or corrupt file gives an
//! error naming the field instead of a crash (shared/facts/gguf.md §1).

use std::collections::HashSet;
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
        let mut names = HashSet::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let field = format!("tensor_info[{i}]");
            let name = c.string(&format!("{field}.name"))?;
            let n_dims = c.u32(&format!("{name}.n_dims"))? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::format(
                    path,
                    format!("{name}.n_dims"),
                    format!("has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"),
                ));
            }
            let mut ne = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = c.u64(&format!("{name}.ne"))?;
                // ggml's dimensions are int64_t; llama.cpp rejects negative ones.
                ne.push(
                    usize::try_from(d)
                        .ok()
                        .filter(|_| d <= i64::MAX as u64)
                        .ok_or_else(|| {
                            Error::format(
                                path,
                                format!("{name}.ne"),
                                format!("dimension {d} is too large"),
                            )
                        })?,
                );
            }
            let tid = c.u32(&format!("{name}.type"))?;
            let ty = GgmlType::from_id(tid).ok_or_else(|| match GgmlType::ggml_name(tid) {
                Some(known) => Error::unsupported(
                    path,
                    format!("{name}.type"),
                    format!("ggml type {known} (id {tid}) is not supported by edgepack"),
                ),
                None => Error::format(
                    path,
                    format!("{name}.type"),
                    format!("type id {tid} is not a ggml type (corrupt file?)"),
                ),
            })?;
            let offset = c.u64(&format!("{name}.offset"))?;
            // llama.cpp keeps element counts within int64_t.
            let n: usize = ne
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .filter(|n| *n <= i64::MAX as usize)
                .ok_or_else(|| {
                    Error::format(
                        path,
                        format!("{name}.ne"),
                        format!("the element count of dimensions {ne:?} overflows"),
                    )
                })?;
            if ne[0] % ty.block_size() != 0 {
                return Err(Error::format(
                    path,
                    format!("{name}.ne"),
                    format!(
                        "ne0 = {} is not a multiple of {ty}'s block size {}",
                        ne[0],
                        ty.block_size()
                    ),
                ));
            }
            let size = ty.bytes_for(n).ok_or_else(|| {
                Error::format(
                    path,
                    format!("{name}.ne"),
                    format!("{n} elements of {ty} overflow a byte count"),
                )
            })?;
            if !names.insert(name.clone()) {
                return Err(Error::format(path, &name, "duplicate tensor name"));
            }
            let offset = usize::try_from(offset).map_err(|_| {
                Error::format(
                    path,
                    format!("{name}.offset"),
                    format!("data offset {offset} is too large"),
                )
            })?;
            infos.push(TensorInfo {
                name,
                ne,
                ty,
                offset,
                size,
            });
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;
        // As llama.cpp's gguf_init: tensor data is laid out in header order, each tensor's
        // offset is the sum of the aligned sizes before it (so offsets are aligned and tensors
        // never overlap), and each tensor lies inside the file. A corrupt type or shape shows
        // up here as an offset that does not follow from the sizes before it.
        let mut expected = 0usize;
        for i in 0..infos.len() {
            let t = &infos[i];
            if t.offset % alignment != 0 {
                return Err(Error::format(
                    path,
                    format!("{}.offset", t.name),
                    format!("data offset {} is not aligned to {alignment}", t.offset),
                ));
            }
            if t.offset != expected {
                let why = match i.checked_sub(1).map(|p| &infos[p]) {
                    Some(p) => format!(
                        "{} before it ({} {:?}, {} bytes) ends at {expected} once padded to \
                         {alignment}",
                        p.name, p.ty, p.ne, p.size
                    ),
                    None => "the first tensor's data starts at 0".into(),
                };
                return Err(Error::format(
                    path,
                    format!("{}.offset", t.name),
                    format!(
                        "data offset {}, but {why}; llama.cpp requires each tensor's data right \
                         after the previous one's, so a tensor's type or shape is corrupt",
                        t.offset
                    ),
                ));
            }
            let start = data_start
                .checked_add(t.offset)
                .filter(|s| s.checked_add(t.size).is_some_and(|end| end <= map.len()));
            let Some(start) = start else {
                return Err(Error::format(
                    path,
                    &t.name,
                    format!(
                        "{} data of {} bytes at byte {} ends past the end of the file, which has \
                         {} bytes (truncated, or a corrupt type or shape)",
                        t.ty,
                        t.size,
                        data_start as u128 + t.offset as u128,
                        map.len()
                    ),
                ));
            };
            expected = t
                .size
                .checked_next_multiple_of(alignment)
                .and_then(|padded| expected.checked_add(padded))
                .ok_or_else(|| {
                    Error::format(
                        path,
                        &t.name,
                        format!("data offset {expected} plus {} bytes overflows", t.size),
                    )
                })?;
            infos[i].offset = start;
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

    /// A GGUF with no metadata and these tensor infos (name, dims, type id, offset), followed
    /// by `data` zero bytes of tensor data.
    fn raw_file(tensors: &[(&str, &[u64], u32, u64)], data: usize) -> Vec<u8> {
        let mut b = header(tensors.len() as u64, 0);
        for (name, ne, ty, offset) in tensors {
            put_str(&mut b, name);
            b.extend_from_slice(&(ne.len() as u32).to_le_bytes());
            for d in *ne {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
        }
        b.resize(b.len().next_multiple_of(32) + data, 0);
        b
    }

    const F32: u32 = 0;
    const Q4_0: u32 = 2;
    const Q8_0: u32 = 8;

    #[test]
    fn contiguous_aligned_tensors_open_at_their_absolute_offsets() {
        let b = raw_file(
            &[
                ("a", &[3], F32, 0),
                ("b", &[32, 2], Q8_0, 32),
                ("c", &[8], F32, 128),
            ],
            160,
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gguf");
        std::fs::write(&path, &b).unwrap();
        let f = GgufFile::open(&path).unwrap();
        let offsets: Vec<_> = f.tensors.iter().map(|t| t.offset - f.data_start).collect();
        assert_eq!(offsets, [0, 32, 128]);
        assert_eq!(f.tensors[1].size, 68);
    }

    #[test]
    fn changed_type_id_is_refused_naming_the_tensors_and_the_offset() {
        // b was Q8_0 (68 bytes, ending at 128 once padded): as Q4_0 it is 36 bytes and ends
        // at 96, so c's offset no longer follows it.
        let b = raw_file(
            &[
                ("a", &[3], F32, 0),
                ("b", &[32, 2], Q4_0, 32),
                ("c", &[8], F32, 128),
            ],
            160,
        );
        let err = open_err(&b);
        assert!(err.contains("x.gguf: c.offset: data offset 128"), "{err}");
        assert!(
            err.contains("b before it (Q4_0 [32, 2], 36 bytes) ends at 96"),
            "{err}"
        );
    }

    #[test]
    fn misaligned_overlapping_or_gapped_offsets_are_refused_naming_the_offset() {
        for (offset, want) in [
            (36, "b.offset: data offset 36 is not aligned to 32"),
            (0, "b.offset: data offset 0, but a before it"),
            (64, "b.offset: data offset 64, but a before it"),
        ] {
            let b = raw_file(&[("a", &[3], F32, 0), ("b", &[8], F32, offset)], 128);
            let err = open_err(&b);
            assert!(err.contains(want), "offset {offset}: {err}");
        }
        let b = raw_file(&[("a", &[3], F32, 32)], 64);
        let err = open_err(&b);
        assert!(
            err.contains("a.offset: data offset 32, but the first"),
            "{err}"
        );
    }

    #[test]
    fn data_past_the_end_of_the_file_is_refused_naming_the_tensor() {
        let b = raw_file(&[("a", &[3], F32, 0), ("b", &[32, 2], Q8_0, 32)], 99);
        let err = open_err(&b);
        assert!(err.contains("x.gguf: b: Q8_0 data of 68 bytes"), "{err}");
        assert!(err.contains("past the end of the file"), "{err}");
    }

    #[test]
    fn type_ids_ggml_does_not_know_are_refused_and_known_ones_named() {
        let err = open_err(&raw_file(&[("a", &[32], 200, 0)], 128));
        assert!(
            err.contains("x.gguf: a.type: type id 200 is not a ggml type"),
            "{err}"
        );
        let err = open_err(&raw_file(&[("a", &[32], 4, 0)], 128));
        assert!(
            err.contains("a.type: type id 4 is not a ggml type"),
            "{err}"
        );
        let err = open_err(&raw_file(&[("a", &[256], 16, 0)], 128));
        assert!(
            err.contains("a.type: unsupported: ggml type IQ2_XXS (id 16)"),
            "{err}"
        );
    }

    #[test]
    fn dimensions_whose_product_or_byte_size_overflows_are_refused() {
        for ne in [&[1u64 << 32, 1 << 32][..], &[1 << 63], &[1 << 40, 1 << 30]] {
            let err = open_err(&raw_file(&[("a", ne, F32, 0)], 128));
            assert!(err.contains("x.gguf: a.ne:"), "{ne:?}: {err}");
        }
        // 2^62 elements fit int64_t; 2^64 bytes of F32 do not fit a byte count.
        let err = open_err(&raw_file(&[("a", &[1 << 62], F32, 0)], 128));
        assert!(
            err.contains("x.gguf: a.ne:") && err.contains("overflow"),
            "{err}"
        );
    }

    #[test]
    fn headers_with_100k_keys_and_100k_tensors_parse_and_duplicates_are_found() {
        const N: usize = 100_000;
        let mut b = header(0, N as u64);
        for i in 0..N {
            put_str(&mut b, &format!("x.key.{i:06}"));
            b.extend_from_slice(&(ValueType::U32 as u32).to_le_bytes());
            b.extend_from_slice(&(i as u32).to_le_bytes());
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gguf");
        std::fs::write(&path, &b).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.metadata.len(), N);
        assert_eq!(f.metadata.get("x.key.099999"), Some(&Value::U32(99_999)));
        // The last key repeats the first.
        let at = b.len() - (8 + 12 + 4 + 4);
        b[at + 8..at + 20].copy_from_slice(b"x.key.000000");
        let err = open_err(&b);
        assert!(err.contains("x.gguf: x.key.000000: duplicate key"), "{err}");

        let names: Vec<String> = (0..N).map(|i| format!("t.{i:06}")).collect();
        let infos: Vec<(&str, &[u64], u32, u64)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), &[8u64][..], F32, 32 * i as u64))
            .collect();
        let b = raw_file(&infos, 32 * N);
        std::fs::write(&path, &b).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.tensors.len(), N);
        assert_eq!(f.tensors[N - 1].name, "t.099999");
        assert_eq!(f.tensors[N - 1].offset, f.data_start + 32 * (N - 1));
        let mut infos = infos;
        infos[N - 1].0 = "t.000000";
        let err = open_err(&raw_file(&infos, 32 * N));
        assert!(
            err.contains("x.gguf: t.000000: duplicate tensor name"),
            "{err}"
        );
    }

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
        assert!(err.contains("x.gguf: token_embd.weight.n_dims:"), "{err}");
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
