//! The knowledge base: documents cut into chunks ([`crate::chunk`]), each chunk's embedding
//! and text, in one versioned safetensors file tied to the encoder that made it.
//!
//! ```text
//! kb.safetensors
//!   vectors       [n, dim]  F32, F16, or I8 with `scales` [n] F32 (one scale per vector)
//!   text          [bytes]   U8, every chunk's UTF-8 text one after another
//!   text_offsets  [n + 1]   I64, where each chunk's text starts (and the last ends)
//!   __metadata__  "edgepack_kb": JSON of [`Meta`] (schema, encoder identity, chunking,
//!                 documents, each chunk's document and byte range, the guard)
//! ```
//!
//! Search is exact: the inner product of the question's embedding with every vector (all
//! embeddings are unit length, so it is their cosine), over all cores. The guard is the
//! best score below which a question is out of domain; `calibrate` picks it from question
//! sets.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::f16;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bert::{Embedder, Identity};
use crate::chunk::{piece_end, Chunker};
use crate::error::{EncoderError, Result};

/// The file in a knowledge-base folder.
pub const KB_FILE: &str = "kb.safetensors";
/// Chunking and calibration defaults, shared by `edgepack rag` and the recipe's `[rag]`.
pub const DEFAULT_CHUNK_TOKENS: usize = 128;
pub const DEFAULT_OVERLAP: usize = 32;
pub const DEFAULT_FALSE_REJECT: f64 = 0.05;
/// Chunks embedded in one forward pass.
const EMBED_BATCH: usize = 16;
pub const SCHEMA: u32 = 1;
/// The metadata key holding [`Meta`].
const META_KEY: &str = "edgepack_kb";
/// Bytes of a document read, chunked and embedded at a time.
pub const READ_BYTES: usize = 4 << 20;
/// The smallest block a document is read in.
pub const MIN_READ_BYTES: usize = 1024;

/// What reading one document gave.
enum Read {
    /// Its chunks were pushed; its path is left for the caller to fill in.
    Added(Document),
    Skipped(&'static str),
}

/// How vectors are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F16,
    /// One byte per value and one f32 scale per vector (the largest magnitude maps to 127).
    Int8,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Precision, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "f16" => Ok(Precision::F16),
            "int8" => Ok(Precision::Int8),
            _ => Err(format!("`{s}`: use f32, f16 or int8")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    /// As given when it was added (the key `remove` takes).
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChunkInfo {
    /// Index into `documents`.
    pub doc: u32,
    /// Byte range in the document.
    pub start: u64,
    pub end: u64,
}

/// The out-of-domain guard: questions whose best score is below `threshold` are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Guard {
    pub threshold: f32,
    /// Area under the ROC curve of the best score separating in-domain from out-of-domain
    /// questions (1: perfectly).
    pub auc: f64,
    /// The share of in-domain questions the threshold was chosen to refuse at most.
    pub false_reject_target: f64,
    pub in_domain: usize,
    pub out_of_domain: usize,
    /// At the threshold: in-domain questions passed, out-of-domain ones refused.
    pub in_domain_passed: f64,
    pub out_of_domain_refused: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub schema: u32,
    pub embedder: Identity,
    pub chunk_tokens: usize,
    pub overlap: usize,
    pub precision: Precision,
    pub documents: Vec<Document>,
    pub chunks: Vec<ChunkInfo>,
    pub guard: Option<Guard>,
}

#[derive(Debug, Clone)]
enum Vectors {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Int8 { q: Vec<i8>, scales: Vec<f32> },
}

/// A knowledge base in memory.
#[derive(Debug, Clone)]
pub struct Kb {
    pub meta: Meta,
    vectors: Vectors,
    texts: Vec<String>,
}

/// One search result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    pub chunk: usize,
    pub score: f32,
    pub source: String,
    pub start: u64,
    pub end: u64,
    pub text: String,
}

/// What adding documents did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Added {
    pub documents: usize,
    pub chunks: usize,
    /// Documents left out, each with the reason (binary, empty, already in the kb, ...).
    pub skipped: Vec<(String, String)>,
}

fn quantize(v: &[f32]) -> (Vec<i8>, f32) {
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    if max == 0.0 {
        return (vec![0; v.len()], 0.0);
    }
    let scale = max / 127.0;
    (
        v.iter()
            .map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8)
            .collect(),
        scale,
    )
}

impl Kb {
    /// An empty knowledge base for `embedder`'s vectors.
    pub fn new(embedder: &Identity, chunk_tokens: usize, overlap: usize, p: Precision) -> Kb {
        Kb {
            meta: Meta {
                schema: SCHEMA,
                embedder: embedder.clone(),
                chunk_tokens,
                overlap,
                precision: p,
                documents: Vec::new(),
                chunks: Vec::new(),
                guard: None,
            },
            vectors: match p {
                Precision::F32 => Vectors::F32(Vec::new()),
                Precision::F16 => Vectors::F16(Vec::new()),
                Precision::Int8 => Vectors::Int8 {
                    q: Vec::new(),
                    scales: Vec::new(),
                },
            },
            texts: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.meta.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.meta.chunks.is_empty()
    }

    fn push_vector(&mut self, v: &[f32]) {
        match &mut self.vectors {
            Vectors::F32(d) => d.extend_from_slice(v),
            Vectors::F16(d) => d.extend(v.iter().map(|x| f16::from_f32(*x))),
            Vectors::Int8 { q, scales } => {
                let (qv, s) = quantize(v);
                q.extend(qv);
                scales.push(s);
            }
        }
    }

    /// Refuses `enc` unless it is the encoder that built this kb: the same weights, width
    /// and sequence length (the folder's name, kept for messages, may differ: a bundle
    /// carries the encoder under its own name).
    pub fn check_embedder(&self, enc: &Identity) -> Result<()> {
        let built = &self.meta.embedder;
        if enc.weights_sha256 != built.weights_sha256
            || enc.dim != built.dim
            || enc.max_seq != built.max_seq
        {
            return Err(EncoderError::Invalid(format!(
                "the knowledge base was built with the encoder {} (weights sha256 {}, dim {}), not {} (weights sha256 {}, dim {})",
                self.meta.embedder.name,
                self.meta.embedder.weights_sha256,
                self.meta.embedder.dim,
                enc.name,
                enc.weights_sha256,
                enc.dim
            )));
        }
        Ok(())
    }

    /// Chunks, embeds and adds the documents at `paths` (in order), each named by its path
    /// as given, read as [`Kb::add_named_reporting`] reads them. Binary, empty and
    /// already-present documents are skipped and named; an unreadable one is an error.
    pub fn add_documents(
        &mut self,
        enc: &Embedder,
        paths: &[PathBuf],
        block: usize,
        read: &dyn Fn(u64),
    ) -> Result<Added> {
        let named: Vec<(PathBuf, String)> = paths
            .iter()
            .map(|p| (p.clone(), p.display().to_string()))
            .collect();
        self.add_named_reporting(enc, &named, block, read)
    }

    /// [`Kb::add_documents`] with each document's name (what sources show) given beside
    /// the path it is read from.
    pub fn add_named(&mut self, enc: &Embedder, docs: &[(PathBuf, String)]) -> Result<Added> {
        self.add_named_reporting(enc, docs, READ_BYTES, &|_| {})
    }

    /// [`Kb::add_named`], reading each document `block` bytes at a time and calling `read`
    /// with the number of bytes of each block read (for progress). A block's chunks are
    /// embedded before the next block is read, so memory holds the knowledge base and about
    /// one block, whatever a document's size. Blocks end at a line break where there is one
    /// (else at whitespace), so the chunks are those of the whole text read at once.
    pub fn add_named_reporting(
        &mut self,
        enc: &Embedder,
        docs: &[(PathBuf, String)],
        block: usize,
        read: &dyn Fn(u64),
    ) -> Result<Added> {
        self.check_embedder(enc.identity())?;
        if block < MIN_READ_BYTES {
            return Err(EncoderError::Invalid(format!(
                "documents are read in blocks of at least {MIN_READ_BYTES} bytes, not {block}"
            )));
        }
        let mut added = Added::default();
        for (path, name) in docs {
            let skip =
                |added: &mut Added, why: &str| added.skipped.push((name.clone(), why.into()));
            if self.meta.documents.iter().any(|d| &d.path == name) {
                skip(&mut added, "already in the knowledge base");
                continue;
            }
            let meta = std::fs::metadata(path).map_err(|e| EncoderError::io(path, e))?;
            if !meta.is_file() {
                skip(&mut added, "not a file");
                continue;
            }
            let before = self.len();
            let outcome = self.read_document(enc, path, block, read);
            if !matches!(outcome, Ok(Read::Added(_))) {
                self.truncate(before);
            }
            match outcome? {
                Read::Added(doc) => {
                    added.documents += 1;
                    added.chunks += self.len() - before;
                    self.meta.documents.push(Document {
                        path: name.clone(),
                        ..doc
                    });
                }
                Read::Skipped(why) => skip(&mut added, why),
            }
        }
        // A guard calibrated on other contents no longer holds.
        if added.chunks > 0 {
            self.meta.guard = None;
        }
        Ok(added)
    }

    /// Reads, chunks and embeds one document, block by block, pushing its chunks as the
    /// next document's. Binary, non-UTF-8 and empty documents are found as they are read;
    /// the caller drops the chunks pushed so far.
    fn read_document(
        &mut self,
        enc: &Embedder,
        path: &Path,
        block_bytes: usize,
        read: &dyn Fn(u64),
    ) -> Result<Read> {
        let doc = self.meta.documents.len() as u32;
        let mut file = std::fs::File::open(path).map_err(|e| EncoderError::io(path, e))?;
        let mut chunker = Chunker::new(enc.tokenizer(), self.meta.chunk_tokens, self.meta.overlap)?;
        let mut hash = Sha256::new();
        let mut bytes = 0u64;
        // Read, not yet fed to the chunker (from document byte `raw_at` on).
        let mut raw: Vec<u8> = Vec::new();
        let mut raw_at = 0usize;
        // Fed, kept while a window to come may need it (from document byte `text_at` on).
        let mut text = String::new();
        let mut text_at = 0usize;
        let mut block = vec![0u8; block_bytes];
        loop {
            let mut eof = false;
            while raw.len() < block_bytes {
                let n = match std::io::Read::read(&mut file, &mut block) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(EncoderError::io(path, e)),
                };
                if n == 0 {
                    eof = true;
                    break;
                }
                let b = &block[..n];
                if b.contains(&0) {
                    return Ok(Read::Skipped("binary (holds NUL bytes)"));
                }
                hash.update(b);
                bytes += n as u64;
                raw.extend_from_slice(b);
                read(n as u64);
            }
            let valid = match std::str::from_utf8(&raw) {
                Ok(s) => s.len(),
                // A character cut by the block's end completes with the next block.
                Err(e) if e.error_len().is_none() && !eof => e.valid_up_to(),
                Err(_) => return Ok(Read::Skipped("not UTF-8 text")),
            };
            let s = std::str::from_utf8(&raw[..valid]).expect("checked above");
            let cut = if eof { valid } else { piece_end(s) };
            let piece = &s[..cut];
            let mut spans = chunker.feed(piece, raw_at)?;
            text.push_str(piece);
            if eof {
                spans.extend(chunker.finish());
            }
            raw.drain(..cut);
            raw_at += cut;
            // This block's windows over all cores, in batches of mostly one length.
            let vectors: Vec<Vec<Vec<f32>>> = spans
                .par_chunks(EMBED_BATCH)
                .map(|c| {
                    let texts: Vec<&str> = c
                        .iter()
                        .map(|s| &text[s.start - text_at..s.end - text_at])
                        .collect();
                    enc.embed_batch(&texts)
                })
                .collect::<Result<_>>()?;
            for (s, v) in spans.iter().zip(vectors.iter().flatten()) {
                self.push_vector(v);
                self.texts
                    .push(text[s.start - text_at..s.end - text_at].to_string());
                self.meta.chunks.push(ChunkInfo {
                    doc,
                    start: s.start as u64,
                    end: s.end as u64,
                });
            }
            let keep = chunker.needed_from().unwrap_or(raw_at);
            text.drain(..keep - text_at);
            text_at = keep;
            if eof {
                break;
            }
        }
        if self.meta.chunks.last().is_none_or(|c| c.doc != doc) {
            return Ok(Read::Skipped("empty"));
        }
        Ok(Read::Added(Document {
            path: String::new(),
            sha256: format!("{:x}", hash.finalize()),
            bytes,
        }))
    }

    /// Drops every chunk from the `n`th on.
    fn truncate(&mut self, n: usize) {
        let dim = self.meta.embedder.dim;
        match &mut self.vectors {
            Vectors::F32(d) => d.truncate(n * dim),
            Vectors::F16(d) => d.truncate(n * dim),
            Vectors::Int8 { q, scales } => {
                q.truncate(n * dim);
                scales.truncate(n);
            }
        }
        self.texts.truncate(n);
        self.meta.chunks.truncate(n);
    }

    /// Removes the documents named as they were added; returns the chunks removed. A name
    /// that is not in the kb is an error listing what is.
    pub fn remove_documents(&mut self, names: &[String]) -> Result<usize> {
        for n in names {
            if !self.meta.documents.iter().any(|d| &d.path == n) {
                let have: Vec<&str> = self
                    .meta
                    .documents
                    .iter()
                    .map(|d| d.path.as_str())
                    .collect();
                return Err(EncoderError::Invalid(format!(
                    "`{n}` is not in the knowledge base (it holds: {})",
                    have.join(", ")
                )));
            }
        }
        let dim = self.meta.embedder.dim;
        let drop_doc: Vec<bool> = self
            .meta
            .documents
            .iter()
            .map(|d| names.contains(&d.path))
            .collect();
        let mut new_index = Vec::with_capacity(drop_doc.len());
        let mut n = 0u32;
        for &d in &drop_doc {
            new_index.push(n);
            if !d {
                n += 1;
            }
        }
        let keep: Vec<bool> = self
            .meta
            .chunks
            .iter()
            .map(|c| !drop_doc[c.doc as usize])
            .collect();
        let removed = keep.iter().filter(|k| !**k).count();
        let mut i = 0;
        self.texts.retain(|_| {
            i += 1;
            keep[i - 1]
        });
        self.vectors = match &self.vectors {
            Vectors::F32(d) => Vectors::F32(keep_rows(d, dim, &keep)),
            Vectors::F16(d) => Vectors::F16(keep_rows(d, dim, &keep)),
            Vectors::Int8 { q, scales } => Vectors::Int8 {
                q: keep_rows(q, dim, &keep),
                scales: keep_rows(scales, 1, &keep),
            },
        };
        self.meta.chunks = self
            .meta
            .chunks
            .iter()
            .filter(|c| !drop_doc[c.doc as usize])
            .map(|c| ChunkInfo {
                doc: new_index[c.doc as usize],
                ..*c
            })
            .collect();
        let mut d = 0;
        self.meta.documents.retain(|_| {
            d += 1;
            !drop_doc[d - 1]
        });
        if removed > 0 {
            self.meta.guard = None;
        }
        Ok(removed)
    }

    /// The inner product of `q` with every vector.
    pub fn scores(&self, q: &[f32]) -> Vec<f32> {
        let dim = self.meta.embedder.dim;
        let n = self.len();
        let mut out = vec![0f32; n];
        out.par_chunks_mut(1024).enumerate().for_each(|(b, dst)| {
            for (j, o) in dst.iter_mut().enumerate() {
                let r = b * 1024 + j;
                *o = match &self.vectors {
                    Vectors::F32(d) => dot(q, &d[r * dim..(r + 1) * dim]),
                    Vectors::F16(d) => dot_with(q, &d[r * dim..(r + 1) * dim], f16::to_f32),
                    Vectors::Int8 { q: v, scales } => {
                        dot_with(q, &v[r * dim..(r + 1) * dim], |x: i8| x as f32) * scales[r]
                    }
                };
            }
        });
        out
    }

    /// The `k` chunks closest to the embedding `q`, best first (ties: the earlier chunk).
    pub fn search(&self, q: &[f32], k: usize) -> Result<Vec<Hit>> {
        if q.len() != self.meta.embedder.dim {
            return Err(EncoderError::Invalid(format!(
                "a query of {} values against vectors of {}",
                q.len(),
                self.meta.embedder.dim
            )));
        }
        if self.is_empty() {
            return Err(EncoderError::Invalid(
                "the knowledge base holds no document yet".into(),
            ));
        }
        let scores = self.scores(q);
        let mut idx: Vec<usize> = (0..scores.len()).collect();
        let k = k.min(idx.len());
        let order = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
        if k < idx.len() {
            idx.select_nth_unstable_by(k, order);
            idx.truncate(k);
        }
        idx.sort_by(order);
        Ok(idx.into_iter().map(|i| self.hit(i, scores[i])).collect())
    }

    fn hit(&self, i: usize, score: f32) -> Hit {
        let c = self.meta.chunks[i];
        Hit {
            chunk: i,
            score,
            source: self.meta.documents[c.doc as usize].path.clone(),
            start: c.start,
            end: c.end,
            text: self.texts[i].clone(),
        }
    }

    /// Embeds `text` with `enc` (which must be the kb's encoder) and searches.
    pub fn query(&self, enc: &Embedder, text: &str, k: usize) -> Result<Vec<Hit>> {
        self.check_embedder(enc.identity())?;
        self.search(&enc.embed(text)?, k)
    }

    /// The best score of each question.
    pub fn best_scores(&self, enc: &Embedder, questions: &[String]) -> Result<Vec<f32>> {
        self.check_embedder(enc.identity())?;
        questions
            .par_iter()
            .map(|q| Ok(self.search(&enc.embed(q)?, 1)?[0].score))
            .collect()
    }

    /// Picks the guard's threshold from in-domain and out-of-domain questions: the highest
    /// threshold that refuses at most `false_reject` of the in-domain ones; stores it.
    pub fn calibrate(
        &mut self,
        enc: &Embedder,
        in_domain: &[String],
        out_of_domain: &[String],
        false_reject: f64,
    ) -> Result<Guard> {
        if in_domain.is_empty() || out_of_domain.is_empty() {
            return Err(EncoderError::Invalid(
                "calibration needs in-domain and out-of-domain questions".into(),
            ));
        }
        if !(0.0..1.0).contains(&false_reject) {
            return Err(EncoderError::Invalid(format!(
                "false-reject rate {false_reject}: give a share in [0, 1)"
            )));
        }
        let ins = self.best_scores(enc, in_domain)?;
        let outs = self.best_scores(enc, out_of_domain)?;
        let g = guard(&ins, &outs, false_reject);
        self.meta.guard = Some(g.clone());
        Ok(g)
    }

    /// Writes `dir/kb.safetensors` whole, by a rename.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| EncoderError::io(dir, e))?;
        let n = self.len();
        let dim = self.meta.embedder.dim;
        let mut text = Vec::new();
        let mut offsets: Vec<i64> = Vec::with_capacity(n + 1);
        for t in &self.texts {
            offsets.push(text.len() as i64);
            text.extend_from_slice(t.as_bytes());
        }
        offsets.push(text.len() as i64);
        let off_bytes: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        let bad = |e: safetensors::SafeTensorError| EncoderError::Invalid(format!("kb: {e}"));
        let (vec_bytes, vec_dtype, scale_bytes): (Vec<u8>, Dtype, Option<Vec<u8>>) =
            match &self.vectors {
                Vectors::F32(d) => (
                    d.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    Dtype::F32,
                    None,
                ),
                Vectors::F16(d) => (
                    d.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    Dtype::F16,
                    None,
                ),
                Vectors::Int8 { q, scales } => (
                    q.iter().map(|x| *x as u8).collect(),
                    Dtype::I8,
                    Some(scales.iter().flat_map(|x| x.to_le_bytes()).collect()),
                ),
            };
        let mut views: Vec<(String, TensorView<'_>)> = vec![
            (
                "vectors".into(),
                TensorView::new(vec_dtype, vec![n, dim], &vec_bytes).map_err(bad)?,
            ),
            (
                "text".into(),
                TensorView::new(Dtype::U8, vec![text.len()], &text).map_err(bad)?,
            ),
            (
                "text_offsets".into(),
                TensorView::new(Dtype::I64, vec![n + 1], &off_bytes).map_err(bad)?,
            ),
        ];
        if let Some(s) = &scale_bytes {
            views.push((
                "scales".into(),
                TensorView::new(Dtype::F32, vec![n], s).map_err(bad)?,
            ));
        }
        let meta = HashMap::from([(
            META_KEY.to_string(),
            serde_json::to_string(&self.meta).expect("metadata serializes"),
        )]);
        let path = dir.join(KB_FILE);
        let tmp = dir.join(format!(".{KB_FILE}.{}.tmp", std::process::id()));
        // Written tensor by tensor, not assembled in memory first.
        safetensors::serialize_to_file(views, Some(meta), &tmp).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            match e {
                safetensors::SafeTensorError::IoError(e) => EncoderError::io(&tmp, e),
                e => bad(e),
            }
        })?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            EncoderError::io(&path, e)
        })?;
        Ok(path)
    }

    /// Reads and checks `dir/kb.safetensors` (or the file itself): every shape, offset and
    /// index against the metadata; a corrupt or foreign file is refused naming the field.
    pub fn read(path: &Path) -> Result<Kb> {
        let file = if path.is_dir() {
            path.join(KB_FILE)
        } else {
            path.to_path_buf()
        };
        let bytes = std::fs::read(&file).map_err(|e| EncoderError::io(&file, e))?;
        let fmt = |field: &str, m: String| EncoderError::format(&file, field, m);
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| fmt("header", e.to_string()))?;
        let meta_json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| fmt(META_KEY, "missing: not an edgepack knowledge base".into()))?;
        let meta: Meta =
            serde_json::from_str(meta_json).map_err(|e| fmt(META_KEY, e.to_string()))?;
        if meta.schema != SCHEMA {
            return Err(fmt(
                "schema",
                format!("{} (this edgepack reads {SCHEMA})", meta.schema),
            ));
        }
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| fmt("tensors", e.to_string()))?;
        let n = meta.chunks.len();
        let dim = meta.embedder.dim;
        let tensor = |name: &str, dtype: Dtype, shape: &[usize]| -> Result<Vec<u8>> {
            let t = st.tensor(name).map_err(|_| fmt(name, "missing".into()))?;
            if t.dtype() != dtype || t.shape() != shape {
                return Err(fmt(
                    name,
                    format!(
                        "{:?} {:?}, expected {dtype:?} {shape:?}",
                        t.dtype(),
                        t.shape()
                    ),
                ));
            }
            Ok(t.data().to_vec())
        };
        let vectors = match meta.precision {
            Precision::F32 => Vectors::F32(
                tensor("vectors", Dtype::F32, &[n, dim])?
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect(),
            ),
            Precision::F16 => Vectors::F16(
                tensor("vectors", Dtype::F16, &[n, dim])?
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes(b.try_into().expect("2 bytes")))
                    .collect(),
            ),
            Precision::Int8 => Vectors::Int8 {
                q: tensor("vectors", Dtype::I8, &[n, dim])?
                    .into_iter()
                    .map(|b| b as i8)
                    .collect(),
                scales: tensor("scales", Dtype::F32, &[n])?
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect(),
            },
        };
        let text_len = st
            .tensor("text")
            .map_err(|_| fmt("text", "missing".into()))?;
        let text = tensor(
            "text",
            Dtype::U8,
            &[text_len.shape().first().copied().unwrap_or(0)],
        )?;
        let offsets: Vec<i64> = tensor("text_offsets", Dtype::I64, &[n + 1])?
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        let mut texts = Vec::with_capacity(n);
        for (i, w) in offsets.windows(2).enumerate() {
            let (a, b) = (w[0], w[1]);
            if a < 0 || b < a || b as usize > text.len() {
                return Err(fmt(
                    "text_offsets",
                    format!("chunk {i}: {a}..{b} outside the {} text bytes", text.len()),
                ));
            }
            let t = std::str::from_utf8(&text[a as usize..b as usize])
                .map_err(|e| fmt("text", format!("chunk {i}: {e}")))?;
            texts.push(t.to_string());
        }
        if offsets.first() != Some(&0) || offsets.last() != Some(&(text.len() as i64)) {
            return Err(fmt(
                "text_offsets",
                "do not cover the text bytes from first to last".into(),
            ));
        }
        for (i, c) in meta.chunks.iter().enumerate() {
            let Some(d) = meta.documents.get(c.doc as usize) else {
                return Err(fmt(
                    "chunks",
                    format!(
                        "chunk {i} names document {} of {}",
                        c.doc,
                        meta.documents.len()
                    ),
                ));
            };
            if c.start > c.end || c.end > d.bytes {
                return Err(fmt(
                    "chunks",
                    format!(
                        "chunk {i}: bytes {}..{} of a {}-byte document",
                        c.start, c.end, d.bytes
                    ),
                ));
            }
        }
        Ok(Kb {
            meta,
            vectors,
            texts,
        })
    }
}

/// The rows of `d` (`width` values each) whose `keep` is set.
fn keep_rows<T: Copy>(d: &[T], width: usize, keep: &[bool]) -> Vec<T> {
    d.chunks_exact(width)
        .zip(keep)
        .filter(|(_, k)| **k)
        .flat_map(|(row, _)| row.iter().copied())
        .collect()
}

/// Lanes of the inner products: independent partial sums the compiler keeps in SIMD
/// registers (a single running sum would force one addition after another).
const LANES: usize = 16;

/// The inner product of `q` with a row whose values `v` turns into floats.
#[inline]
fn dot_with<T: Copy>(q: &[f32], row: &[T], v: impl Fn(T) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut qc = q.chunks_exact(LANES);
    let mut rc = row.chunks_exact(LANES);
    for (a, b) in (&mut qc).zip(&mut rc) {
        for l in 0..LANES {
            acc[l] += a[l] * v(b[l]);
        }
    }
    let tail: f32 = qc
        .remainder()
        .iter()
        .zip(rc.remainder())
        .map(|(a, b)| a * v(*b))
        .sum();
    acc.iter().sum::<f32>() + tail
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_with(a, b, |x| x)
}

/// Beside `kb.safetensors`: the encoder folder `rag build` used (its absolute path, one
/// line), so later commands find it without `--embedder`. Bundles never carry it: it names
/// a workstation's path.
pub const ENCODER_FILE: &str = "encoder.path";

/// Records `encoder` (made absolute) as the encoder of the kb in `kb_dir`, by a rename. A
/// path that is not UTF-8 or holds a line break is not recorded (commands then need
/// `--embedder`).
pub fn remember_encoder(kb_dir: &Path, encoder: &Path) -> Result<()> {
    let abs = std::path::absolute(encoder).map_err(|e| EncoderError::io(encoder, e))?;
    let path = kb_dir.join(ENCODER_FILE);
    let Some(text) = abs.to_str().filter(|t| !t.contains(['\n', '\r'])) else {
        let _ = std::fs::remove_file(&path);
        return Ok(());
    };
    let tmp = kb_dir.join(format!(".{ENCODER_FILE}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, format!("{text}\n")).map_err(|e| EncoderError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        EncoderError::io(&path, e)
    })
}

/// The encoder folder for the kb in `kb_dir`: `given` when there is one, else the one
/// [`remember_encoder`] recorded. Either way the kb checks the encoder's weights against
/// its own record when it is used.
pub fn encoder_dir(kb_dir: &Path, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(g) = given {
        return Ok(g.to_path_buf());
    }
    let path = kb_dir.join(ENCODER_FILE);
    let mut text = String::new();
    match std::fs::File::open(&path) {
        Ok(f) => {
            // A path, not a document: 64 KiB is plenty.
            std::io::Read::read_to_string(&mut std::io::Read::take(f, 1 << 16), &mut text)
                .map_err(|e| EncoderError::io(&path, e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(EncoderError::Invalid(format!(
                "give --embedder: {} does not name the encoder that built the knowledge base (no {ENCODER_FILE})",
                kb_dir.display()
            )))
        }
        Err(e) => return Err(EncoderError::io(&path, e)),
    }
    let dir = PathBuf::from(text.trim_end_matches(['\n', '\r']));
    if dir.as_os_str().is_empty() || !dir.is_absolute() {
        return Err(EncoderError::format(&path, "path", "not an absolute path"));
    }
    if !dir.is_dir() {
        return Err(EncoderError::format(
            &path,
            "path",
            format!(
                "the encoder folder {} is gone; give --embedder",
                dir.display()
            ),
        ));
    }
    Ok(dir)
}

/// Reads a question file: one question per line, or JSONL with a string `question` field
/// per line (blank lines skipped). An empty file is an error.
pub fn read_questions(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| EncoderError::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('{') {
            let at = format!("line {}", i + 1);
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| EncoderError::format(path, &at, format!("not JSON: {e}")))?;
            let q = v["question"]
                .as_str()
                .ok_or_else(|| EncoderError::format(path, &at, "no string `question`"))?;
            out.push(q.to_string());
        } else {
            out.push(line.to_string());
        }
    }
    if out.is_empty() {
        return Err(EncoderError::format(path, "questions", "holds no question"));
    }
    Ok(out)
}

/// The guard from the best scores of in-domain and out-of-domain questions.
pub fn guard(ins: &[f32], outs: &[f32], false_reject: f64) -> Guard {
    // AUC: the chance that an in-domain question outscores an out-of-domain one.
    let mut wins = 0f64;
    for a in ins {
        for b in outs {
            wins += if a > b {
                1.0
            } else if a == b {
                0.5
            } else {
                0.0
            };
        }
    }
    let auc = wins / (ins.len() * outs.len()) as f64;
    let mut sorted = ins.to_vec();
    sorted.sort_by(f32::total_cmp);
    // Refused: score < threshold. The highest threshold refusing at most the target share.
    let allowed = (false_reject * ins.len() as f64).floor() as usize;
    let threshold = sorted[allowed.min(sorted.len() - 1)];
    let passed = ins.iter().filter(|s| **s >= threshold).count() as f64 / ins.len() as f64;
    let refused = outs.iter().filter(|s| **s < threshold).count() as f64 / outs.len() as f64;
    Guard {
        threshold,
        auc,
        false_reject_target: false_reject,
        in_domain: ins.len(),
        out_of_domain: outs.len(),
        in_domain_passed: passed,
        out_of_domain_refused: refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_keeps_a_vectors_direction() {
        let v = [0.5f32, -0.25, 0.125, 0.0];
        let (q, s) = quantize(&v);
        assert_eq!(q[0], 127);
        let back: Vec<f32> = q.iter().map(|x| *x as f32 * s).collect();
        for (a, b) in v.iter().zip(&back) {
            assert!((a - b).abs() <= s / 2.0 + 1e-7, "{v:?} -> {back:?}");
        }
    }

    #[test]
    fn guard_threshold_refuses_at_most_the_target_share_of_in_domain_questions() {
        let ins = [0.9f32, 0.8, 0.7, 0.6, 0.5, 0.45, 0.65, 0.75, 0.85, 0.95];
        let outs = [0.1f32, 0.2, 0.3, 0.55];
        let g = guard(&ins, &outs, 0.1);
        assert_eq!(g.threshold, 0.5);
        assert_eq!(g.in_domain_passed, 0.9);
        assert_eq!(g.out_of_domain_refused, 0.75);
        // 0.55 outscores 0.5 and 0.45 only: 2 of 40 pairs lost.
        assert!((g.auc - 38.0 / 40.0).abs() < 1e-12, "{}", g.auc);
        let g0 = guard(&ins, &outs, 0.0);
        assert_eq!((g0.threshold, g0.in_domain_passed), (0.45, 1.0));
    }

    #[test]
    fn search_ranks_by_inner_product_and_removal_keeps_the_rest() {
        let id = Identity {
            name: "t".into(),
            weights_sha256: "x".into(),
            dim: 2,
            max_seq: 8,
        };
        for p in [Precision::F32, Precision::F16, Precision::Int8] {
            let mut kb = Kb::new(&id, 4, 1, p);
            for (d, vs) in [
                (0u32, [[1.0f32, 0.0], [0.6, 0.8]]),
                (1, [[0.0, 1.0], [-1.0, 0.0]]),
            ] {
                kb.meta.documents.push(Document {
                    path: format!("d{d}"),
                    sha256: String::new(),
                    bytes: 10,
                });
                for (i, v) in vs.iter().enumerate() {
                    kb.push_vector(v);
                    kb.texts.push(format!("d{d}c{i}"));
                    kb.meta.chunks.push(ChunkInfo {
                        doc: d,
                        start: 0,
                        end: 1,
                    });
                }
            }
            let hits = kb.search(&[0.0, 1.0], 3).unwrap();
            let names: Vec<&str> = hits.iter().map(|h| h.text.as_str()).collect();
            assert_eq!(names, ["d1c0", "d0c1", "d0c0"], "{p:?}");
            let dir = tempfile::tempdir().unwrap();
            kb.write(dir.path()).unwrap();
            let back = Kb::read(dir.path()).unwrap();
            assert_eq!(back.search(&[0.0, 1.0], 3).unwrap(), hits, "{p:?}");
            assert_eq!(kb.remove_documents(&["d0".into()]).unwrap(), 2);
            let hits = kb.search(&[0.0, 1.0], 5).unwrap();
            let names: Vec<&str> = hits.iter().map(|h| h.text.as_str()).collect();
            assert_eq!(names, ["d1c0", "d1c1"], "{p:?}");
            assert_eq!(hits[0].source, "d1");
        }
    }
}
