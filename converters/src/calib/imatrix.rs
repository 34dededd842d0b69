//! Importance matrices (imatrix), as llama.cpp's `llama-imatrix` computes them and
//! `llama-quantize` uses them (shared/facts/gguf.md §3.4, §3.8).
//!
//! For every matmul weight of a transformer block (`blk.*`, GGUF names) the input activations
//! seen while running calibration text are squared and summed per input column, in f32, with
//! one count per token row. llama-quantize divides the sums by the count and passes the result
//! to the weighted quantizers as one weight per column (`ne0` of the tensor).
//!
//! Collection follows `tools/imatrix/imatrix.cpp`: the text is tokenized once (with the BOS the
//! tokenizer adds), cut into consecutive chunks of `chunk_size` tokens (a partial tail is
//! dropped), the first token of every chunk is replaced by BOS when the tokenizer adds one, and
//! each chunk runs from an empty KV cache. Only `blk.*` weights are recorded, as llama-imatrix
//! does without `--process-output`; the output projection (or the tied embedding acting as it)
//! gets no entry and is quantized unweighted.
//!
//! Files: the current GGUF format (`general.type = "imatrix"`, `<name>.in_sum2` `{ne0, n_mat}`
//! and `<name>.counts` `{1, n_mat}`, both F32) is read and written; the legacy `.dat` format is
//! read.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::calib::data::chunk_tokens;
use crate::calib::forward::Forward;
use crate::error::{Error, Result};
use crate::gguf::names::hf_to_gguf;
use crate::gguf::reader::GgufFile;
use crate::gguf::value::{Array, Metadata, Value};
use crate::gguf::writer::{GgufWriter, TensorPlan};
use crate::gguf::GGUF_MAGIC;
use crate::model::names::LM_HEAD;
use crate::model::Model;
use crate::progress::Progress;
use crate::quant::GgmlType;

/// The statistics of one weight: `sums` holds `n_mat` rows of `ne0` column sums of squared
/// activations, `counts` the token rows seen per matrix (`n_mat = counts.len()`, 1 when dense).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub sums: Vec<f32>,
    pub counts: Vec<u64>,
}

impl Entry {
    /// Columns per matrix (`ne0` of the weight).
    pub fn ne0(&self) -> usize {
        self.sums.len() / self.counts.len().max(1)
    }

    /// `sums / counts` per matrix in f32, 1.0 for a matrix never seen, as llama-quantize's
    /// `load_imatrix` computes.
    pub fn weights(&self) -> Vec<f32> {
        let ne0 = self.ne0();
        let mut w = Vec::with_capacity(self.sums.len());
        for (m, &c) in self.counts.iter().enumerate() {
            let row = &self.sums[m * ne0..(m + 1) * ne0];
            if c > 0 {
                let c = c as f32;
                w.extend(row.iter().map(|&s| s / c));
            } else {
                w.extend(std::iter::repeat_n(1.0f32, ne0));
            }
        }
        w
    }
}

/// An importance matrix: per GGUF weight name, the sums and counts, plus provenance.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Imatrix {
    pub entries: BTreeMap<String, Entry>,
    /// Where the calibration text came from (`imatrix.datasets`).
    pub datasets: Vec<String>,
    /// Chunks run (`imatrix.chunk_count`).
    pub chunk_count: u32,
    /// Tokens per chunk (`imatrix.chunk_size`; 0 when read from a legacy file).
    pub chunk_size: u32,
}

impl Imatrix {
    /// The `quantize.imatrix.*` keys llama-quantize records in a GGUF quantized with an
    /// imatrix (tools/quantize/quantize.cpp; counts are written as UINT32 by llama-quant.cpp).
    pub fn provenance(&self, file: &Path) -> crate::gguf::value::Metadata {
        use crate::gguf::value::Value;
        let mut m = crate::gguf::value::Metadata::new();
        m.set(
            "quantize.imatrix.file",
            Value::String(file.display().to_string()),
        );
        if let Some(d) = self.datasets.first() {
            m.set("quantize.imatrix.dataset", Value::String(d.clone()));
        }
        m.set(
            "quantize.imatrix.entries_count",
            Value::U32(self.entries.len() as u32),
        );
        m.set(
            "quantize.imatrix.chunks_count",
            Value::U32(self.chunk_count),
        );
        m
    }
}

impl Imatrix {
    /// Adds the squares of `activations` (`[n_rows, in_features]` row-major) to the column
    /// sums of `name`, row by row in f32, and counts the rows, as `collect_imatrix` does for a
    /// dense matmul.
    pub fn accumulate(
        &mut self,
        name: &str,
        activations: &[f32],
        in_features: usize,
    ) -> Result<()> {
        if in_features == 0 || activations.len() % in_features != 0 {
            return Err(Error::Invalid(format!(
                "imatrix: {name}: {} activations are not rows of {in_features}",
                activations.len()
            )));
        }
        let e = self
            .entries
            .entry(name.to_string())
            .or_insert_with(|| Entry {
                sums: vec![0.0; in_features],
                counts: vec![0],
            });
        if e.sums.len() != in_features || e.counts.len() != 1 {
            return Err(Error::Invalid(format!(
                "imatrix: {name}: inconsistent size ({} sums vs {in_features} inputs)",
                e.sums.len()
            )));
        }
        for row in activations.chunks_exact(in_features) {
            for (acc, &x) in e.sums.iter_mut().zip(row) {
                *acc += x * x;
            }
        }
        if e.sums.iter().any(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!(
                "imatrix: non-finite values in the activations of {name}"
            )));
        }
        e.counts[0] += (activations.len() / in_features) as u64;
        Ok(())
    }

    /// Per-column weights by GGUF tensor name: sums / counts (count 0 -> 1.0), as
    /// llama-quantize passes them to the quantizers.
    pub fn weights(&self) -> HashMap<String, Vec<f32>> {
        self.entries
            .iter()
            .map(|(k, e)| (k.clone(), e.weights()))
            .collect()
    }

    /// [`Imatrix::weights`], after checking every entry against `model`'s GGUF tensors: an
    /// entry for a tensor the model does not have, or with another column count, is refused
    /// naming the tensor and both shapes (an imatrix computed for another model). `path` is the
    /// imatrix file, for the message.
    pub fn weights_for(&self, model: &Model, path: &Path) -> Result<HashMap<String, Vec<f32>>> {
        let mut ne0s: HashMap<String, Vec<usize>> = HashMap::new();
        for t in &model.tensors {
            if model.config.tie_word_embeddings && t.name == LM_HEAD {
                continue;
            }
            if let Some(g) = hf_to_gguf(&t.name) {
                ne0s.insert(g, t.shape.iter().rev().copied().collect());
            }
        }
        for (name, e) in &self.entries {
            let Some(ne) = ne0s.get(name) else {
                return Err(Error::mismatch(
                    path,
                    name,
                    format!(
                        "{} has no tensor of this name (is the imatrix from another model?)",
                        model.source.display()
                    ),
                ));
            };
            let want = ne[0] * ne.get(2).copied().unwrap_or(1);
            if e.sums.len() != want {
                return Err(Error::mismatch(
                    path,
                    name,
                    format!(
                        "imatrix shape {{{}, {}}} does not fit the tensor's shape {ne:?} in {} (is the imatrix from another model?)",
                        e.ne0(),
                        e.counts.len(),
                        model.source.display()
                    ),
                ));
            }
        }
        Ok(self.weights())
    }

    /// Writes the current GGUF imatrix format, atomically: keys as llama-imatrix writes them,
    /// tensors sorted by weight name, `<name>.in_sum2` then `<name>.counts`.
    pub fn write_gguf(&self, path: &Path) -> Result<()> {
        let mut md = Metadata::new();
        md.set("general.type", Value::String("imatrix".into()));
        md.set(
            "imatrix.datasets",
            Value::Array(Array::String(self.datasets.clone())),
        );
        md.set("imatrix.chunk_count", Value::U32(self.chunk_count));
        md.set("imatrix.chunk_size", Value::U32(self.chunk_size));
        let mut plans = Vec::with_capacity(self.entries.len() * 2);
        let mut data: Vec<Vec<f32>> = Vec::with_capacity(self.entries.len() * 2);
        for (name, e) in &self.entries {
            let n_mat = e.counts.len();
            plans.push(TensorPlan {
                name: format!("{name}.in_sum2"),
                ne: vec![e.ne0(), n_mat],
                ty: GgmlType::F32,
            });
            data.push(e.sums.clone());
            plans.push(TensorPlan {
                name: format!("{name}.counts"),
                ne: vec![1, n_mat],
                ty: GgmlType::F32,
            });
            data.push(e.counts.iter().map(|&c| c as f32).collect());
        }
        let w = GgufWriter::new(&md, plans, path)?;
        w.write(path, |i, _, sink| {
            let bytes: Vec<u8> = data[i].iter().flat_map(|v| v.to_le_bytes()).collect();
            sink(&bytes)
        })
    }

    /// Reads an imatrix file: the GGUF format, or llama.cpp's legacy `.dat` format.
    pub fn read(path: &Path) -> Result<Imatrix> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        if bytes.starts_with(GGUF_MAGIC) {
            drop(bytes);
            read_gguf(path)
        } else {
            parse_dat(&bytes, path)
        }
    }
}

fn read_gguf(path: &Path) -> Result<Imatrix> {
    let f = GgufFile::open(path)?;
    match f.metadata.get_str("general.type") {
        Some("imatrix") => {}
        other => {
            return Err(Error::format(
                path,
                "general.type",
                format!(
                    "{} (not an imatrix file; expected \"imatrix\")",
                    other.map_or("missing".to_string(), |t| format!("\"{t}\""))
                ),
            ))
        }
    }
    let datasets = match f.metadata.get("imatrix.datasets") {
        Some(Value::Array(Array::String(v))) => v.clone(),
        None => Vec::new(),
        Some(_) => {
            return Err(Error::format(
                path,
                "imatrix.datasets",
                "not an array of strings",
            ))
        }
    };
    let u32_key = |k: &str| -> Result<u32> {
        match f.metadata.get(k) {
            Some(Value::U32(v)) => Ok(*v),
            Some(_) => Err(Error::format(path, k, "not a UINT32")),
            None => Err(Error::format(
                path,
                k,
                "missing (llama-quantize refuses imatrix files without it)",
            )),
        }
    };
    let (chunk_count, chunk_size) = (
        u32_key("imatrix.chunk_count")?,
        u32_key("imatrix.chunk_size")?,
    );
    let mut parts: BTreeMap<String, (Option<&_>, Option<&_>)> = BTreeMap::new();
    for t in &f.tensors {
        if let Some(n) = t.name.strip_suffix(".in_sum2") {
            parts.entry(n.to_string()).or_insert((None, None)).0 = Some(t);
        } else if let Some(n) = t.name.strip_suffix(".counts") {
            parts.entry(n.to_string()).or_insert((None, None)).1 = Some(t);
        }
    }
    if parts.is_empty() {
        return Err(Error::format(path, "tensors", "no imatrix entries"));
    }
    let f32s = |t: &crate::gguf::reader::TensorInfo| -> Result<Vec<f32>> {
        if t.ty != GgmlType::F32 {
            return Err(Error::format(
                path,
                &t.name,
                format!("type {} (imatrix tensors are F32)", t.ty),
            ));
        }
        Ok(f.data(t)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect())
    };
    let mut entries = BTreeMap::new();
    for (name, (s, c)) in parts {
        let (Some(s), Some(c)) = (s, c) else {
            return Err(Error::format(
                path,
                &name,
                "has only one of .in_sum2 and .counts",
            ));
        };
        let sums = f32s(s)?;
        let counts: Vec<u64> = f32s(c)?
            .into_iter()
            .map(|v| {
                if v.is_finite() && v >= 0.0 {
                    Ok(v.round() as u64)
                } else {
                    Err(Error::format(path, &c.name, format!("count {v}")))
                }
            })
            .collect::<Result<_>>()?;
        if counts.is_empty() || sums.len() % counts.len() != 0 || sums.is_empty() {
            return Err(Error::format(
                path,
                &name,
                format!(
                    "{} sums do not divide into {} matrices",
                    sums.len(),
                    counts.len()
                ),
            ));
        }
        entries.insert(name, Entry { sums, counts });
    }
    Ok(Imatrix {
        entries,
        datasets,
        chunk_count,
        chunk_size,
    })
}

/// Parses llama.cpp's legacy `.dat` imatrix: i32 n_entries; per entry i32 name length, name,
/// i32 ncall, i32 nval, nval f32 (mean · ncall); then optionally i32 chunk count, i32 dataset
/// length, dataset. Each entry becomes sums = the stored values and counts = [ncall], so
/// [`Entry::weights`] gives value / ncall as llama-quantize does; an `ncall` of 0 is kept as a
/// count of 1 because llama-quantize then uses the values as they are.
pub fn parse_dat(b: &[u8], path: &Path) -> Result<Imatrix> {
    let mut pos = 0usize;
    let mut take = |n: usize, field: &str| -> Result<&[u8]> {
        if b.len() - pos < n {
            return Err(Error::format(
                path,
                field,
                format!(
                    "truncated: needs {n} bytes at offset {pos}, the file has {} (neither a GGUF nor a legacy .dat imatrix?)",
                    b.len()
                ),
            ));
        }
        let s = &b[pos..pos + n];
        pos += n;
        Ok(s)
    };
    let i32_at = |s: &[u8]| i32::from_le_bytes(s.try_into().expect("4 bytes"));
    let n_entries = i32_at(take(4, "n_entries")?);
    if n_entries < 1 {
        return Err(Error::format(
            path,
            "n_entries",
            format!("{n_entries} (no data, or not an imatrix file)"),
        ));
    }
    let mut entries = BTreeMap::new();
    for i in 0..n_entries {
        let field = format!("entry {i}");
        let len = i32_at(take(4, &field)?);
        let name_bytes = take(usize::try_from(len).unwrap_or(usize::MAX), &field)?;
        let name = String::from_utf8(name_bytes.to_vec())
            .map_err(|_| Error::format(path, &field, "name is not UTF-8"))?;
        let ncall = i32_at(take(4, &name)?);
        let nval = i32_at(take(4, &name)?);
        if nval < 1 {
            return Err(Error::format(path, &name, format!("{nval} values")));
        }
        let nval = nval as usize;
        let sums: Vec<f32> = take(nval.saturating_mul(4), &name)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let count = if ncall > 0 { ncall as u64 } else { 1 };
        entries.insert(
            name,
            Entry {
                sums,
                counts: vec![count],
            },
        );
    }
    let mut chunk_count = 0u32;
    let mut datasets = Vec::new();
    if let Ok(c) = take(4, "chunk count") {
        chunk_count = i32_at(c).max(0) as u32;
        if let Ok(l) = take(4, "dataset") {
            let l = i32_at(l);
            if l > 0 {
                if let Ok(d) = take(l as usize, "dataset") {
                    datasets.push(String::from_utf8_lossy(d).into_owned());
                }
            }
        }
    }
    Ok(Imatrix {
        entries,
        datasets,
        chunk_count,
        chunk_size: 0,
    })
}

/// Computes the imatrix of `model` over `texts`: chunks of `chunk_size` tokens (at most
/// `max_chunks`), each run from an empty KV cache through the reference forward pass.
/// `datasets` is left empty for the caller to fill.
pub fn compute(
    model: &Model,
    texts: &[String],
    chunk_size: usize,
    max_chunks: Option<usize>,
    progress: &dyn Progress,
) -> Result<Imatrix> {
    let chunks = chunk_tokens(model, texts, chunk_size, max_chunks)?;
    let fwd = Forward::new(model)?;
    let mut im = Imatrix {
        chunk_size: chunk_size as u32,
        ..Imatrix::default()
    };
    // HF name -> GGUF name, `None` for what llama-imatrix does not record (not `blk.*`).
    let mut names: HashMap<String, Option<String>> = HashMap::new();
    let n = chunks.chunks.len();
    progress.start("imatrix", n as u64);
    for (i, chunk) in chunks.chunks.iter().enumerate() {
        let mut cache = fwd.cache(chunk.len());
        let mut failed: Option<Error> = None;
        fwd.forward_observed(chunk, &mut cache, &mut |hf, acts, inn| {
            if failed.is_some() {
                return;
            }
            let g = names
                .entry(hf.to_string())
                .or_insert_with(|| hf_to_gguf(hf).filter(|g| g.starts_with("blk.")));
            if let Some(g) = g {
                if let Err(e) = im.accumulate(g, acts, inn) {
                    failed = Some(e);
                }
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        im.chunk_count = (i + 1) as u32;
        progress.advance(1, &format!("chunk {}/{n}", i + 1));
    }
    progress.finish();
    Ok(im)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dat(entries: &[(&str, i32, &[f32])], tail: Option<(i32, &str)>) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend((entries.len() as i32).to_le_bytes());
        for (name, ncall, vals) in entries {
            b.extend((name.len() as i32).to_le_bytes());
            b.extend(name.as_bytes());
            b.extend(ncall.to_le_bytes());
            b.extend((vals.len() as i32).to_le_bytes());
            vals.iter().for_each(|v| b.extend(v.to_le_bytes()));
        }
        if let Some((chunks, ds)) = tail {
            b.extend(chunks.to_le_bytes());
            b.extend((ds.len() as i32).to_le_bytes());
            b.extend(ds.as_bytes());
        }
        b
    }

    #[test]
    fn dat_parser_reads_entries_tail_and_divides_by_ncall() {
        let b = dat(
            &[
                ("blk.0.attn_q.weight", 4, &[8.0, 2.0, 4.0]),
                ("blk.0.ffn_down.weight", 0, &[3.0, 5.0]),
            ],
            Some((7, "wiki.train.raw")),
        );
        let im = parse_dat(&b, Path::new("x.dat")).unwrap();
        assert_eq!(im.chunk_count, 7);
        assert_eq!(im.datasets, ["wiki.train.raw"]);
        let w = im.weights();
        assert_eq!(w["blk.0.attn_q.weight"], [2.0, 0.5, 1.0]);
        // ncall 0: llama-quantize uses the stored values unchanged.
        assert_eq!(w["blk.0.ffn_down.weight"], [3.0, 5.0]);
        // The tail is optional.
        let b = dat(&[("blk.1.attn_k.weight", 2, &[1.0])], None);
        let im = parse_dat(&b, Path::new("x.dat")).unwrap();
        assert_eq!((im.chunk_count, im.datasets.len()), (0, 0));
        assert_eq!(im.weights()["blk.1.attn_k.weight"], [0.5]);
    }

    #[test]
    fn dat_parser_refuses_truncated_and_empty_files_naming_the_field() {
        let b = dat(&[("blk.0.attn_q.weight", 4, &[8.0, 2.0, 4.0])], None);
        let err = parse_dat(&b[..b.len() - 2], Path::new("x.dat"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.dat: blk.0.attn_q.weight: truncated"),
            "{err}"
        );
        let err = parse_dat(&0i32.to_le_bytes(), Path::new("x.dat"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("n_entries"), "{err}");
        let err = parse_dat(b"ab", Path::new("x.dat"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn sums_of_squares_and_counts_accumulate_per_row_and_divide_like_llama_quantize() {
        let mut im = Imatrix::default();
        im.accumulate("w", &[1.0, -2.0, 3.0, 0.5], 2).unwrap();
        im.accumulate("w", &[-1.0, 1.0], 2).unwrap();
        let e = &im.entries["w"];
        assert_eq!(e.sums, [1.0 + 9.0 + 1.0, 4.0 + 0.25 + 1.0]);
        assert_eq!(e.counts, [3]);
        assert_eq!(im.weights()["w"], [11.0 / 3.0f32, 5.25 / 3.0f32]);
        assert!(im.accumulate("w", &[1.0, 2.0, 3.0], 3).is_err());
        assert!(im.accumulate("w", &[1.0, 2.0, 3.0], 2).is_err());
        let err = im
            .accumulate("w", &[f32::INFINITY, 1.0], 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("non-finite") && err.contains('w'), "{err}");
    }

    #[test]
    fn zero_count_matrices_weigh_one_and_others_divide_per_matrix() {
        let e = Entry {
            sums: vec![2.0, 4.0, 9.0, 3.0],
            counts: vec![2, 0],
        };
        assert_eq!(e.ne0(), 2);
        assert_eq!(e.weights(), [1.0, 2.0, 1.0, 1.0]);
        let e = Entry {
            sums: vec![1.0, 3.0],
            counts: vec![3],
        };
        assert_eq!(e.weights(), [1.0f32 / 3.0, 1.0]);
    }

    #[test]
    fn gguf_file_round_trips_and_other_gguf_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("imatrix.gguf");
        let mut im = Imatrix {
            datasets: vec!["data.txt".into()],
            chunk_count: 2,
            chunk_size: 16,
            ..Imatrix::default()
        };
        im.accumulate("blk.0.attn_q.weight", &[1.5; 64], 32)
            .unwrap();
        im.accumulate("blk.0.ffn_down.weight", &[0.25; 48], 16)
            .unwrap();
        im.write_gguf(&path).unwrap();
        let back = Imatrix::read(&path).unwrap();
        assert_eq!(back, im);
        let f = GgufFile::open(&path).unwrap();
        let names: Vec<_> = f
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.ne.clone()))
            .collect();
        assert_eq!(
            names,
            [
                ("blk.0.attn_q.weight.in_sum2", vec![32, 1]),
                ("blk.0.attn_q.weight.counts", vec![1, 1]),
                ("blk.0.ffn_down.weight.in_sum2", vec![16, 1]),
                ("blk.0.ffn_down.weight.counts", vec![1, 1]),
            ]
        );
        let mut md = Metadata::new();
        md.set("general.type", Value::String("model".into()));
        let other = dir.path().join("model.gguf");
        GgufWriter::new(&md, vec![], &other)
            .unwrap()
            .write(&other, |_, _, _| Ok(()))
            .unwrap();
        let err = Imatrix::read(&other).unwrap_err().to_string();
        assert!(
            err.contains("general.type") && err.contains("\"model\""),
            "{err}"
        );
    }
}
