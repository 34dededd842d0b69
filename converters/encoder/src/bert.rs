//! Sentence embeddings: a BERT encoder (the architecture of sentence-transformers'
//! all-MiniLM-L6-v2) with mean pooling and L2 normalization, run on candle. Answer similarity
//! (the cosine of the embeddings of a generated and a reference answer, the figure NXP
//! reports for its on-board LLMs) and the knowledge base's search both use it.
//!
//! It reads a sentence-transformers folder: `config.json` (BERT), `model.safetensors`,
//! `tokenizer.json`, and `sentence_bert_config.json` for the maximum sequence length.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor as CTensor, D};
use serde_json::Value as Json;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{EncoderError as Error, Result};

fn ce(e: candle_core::Error) -> Error {
    Error::Invalid(format!("sentence embedder: {e}"))
}

/// Which encoder made a set of embeddings: a knowledge base is searched only with the
/// encoder that built it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The folder's name (`all-MiniLM-L6-v2`), for messages.
    pub name: String,
    /// SHA-256 of `model.safetensors`.
    pub weights_sha256: String,
    pub dim: usize,
    pub max_seq: usize,
}

/// sentence-transformers' default when `sentence_bert_config.json` names no length.
const DEFAULT_MAX_SEQ: usize = 256;

struct Linear {
    w: CTensor,
    b: CTensor,
}

impl Linear {
    fn apply(&self, x: &CTensor) -> Result<CTensor> {
        x.matmul(&self.w.t().map_err(ce)?)
            .and_then(|y| y.broadcast_add(&self.b))
            .map_err(ce)
    }
}

struct LayerNorm {
    w: CTensor,
    b: CTensor,
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    inter: Linear,
    out: Linear,
    out_norm: LayerNorm,
}

/// A loaded BERT sentence encoder.
pub struct Embedder {
    dir: PathBuf,
    identity: Identity,
    tok: tokenizers::Tokenizer,
    word: CTensor,
    pos: CTensor,
    token_type: CTensor,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    eps: f64,
    max_seq: usize,
}

impl Embedder {
    /// Loads a sentence-transformers BERT folder.
    pub fn open(dir: &Path) -> Result<Embedder> {
        Embedder::load(dir, None)
    }

    /// As [`Embedder::open`] for a folder whose `model.safetensors` is already known to have
    /// SHA-256 `weights_sha256` (a verified bundle's): its identity takes that hash instead of
    /// reading the weights a second time.
    pub fn open_verified(dir: &Path, weights_sha256: &str) -> Result<Embedder> {
        Embedder::load(dir, Some(weights_sha256.to_string()))
    }

    fn load(dir: &Path, weights_sha256: Option<String>) -> Result<Embedder> {
        let read_json = |name: &str| -> Result<Json> {
            let p = dir.join(name);
            let s = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            serde_json::from_str(&s).map_err(|e| Error::format(&p, "json", e.to_string()))
        };
        let cfg = read_json("config.json")?;
        let cfg_path = dir.join("config.json");
        let num = |k: &str| -> Result<usize> {
            cfg.get(k)
                .and_then(Json::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| Error::format(&cfg_path, k, "missing or not a number"))
        };
        let model_type = cfg.get("model_type").and_then(Json::as_str).unwrap_or("");
        if model_type != "bert" {
            return Err(Error::format(
                &cfg_path,
                "model_type",
                format!(
                    "`{model_type}` is not supported (the sentence embedder runs BERT encoders)"
                ),
            ));
        }
        if let Some(act) = cfg.get("hidden_act").and_then(Json::as_str) {
            if act != "gelu" {
                return Err(Error::format(
                    &cfg_path,
                    "hidden_act",
                    format!("`{act}` is not supported (gelu is)"),
                ));
            }
        }
        let heads = num("num_attention_heads")?;
        let n_layers = num("num_hidden_layers")?;
        let eps = cfg
            .get("layer_norm_eps")
            .and_then(Json::as_f64)
            .unwrap_or(1e-12);
        let max_pos = num("max_position_embeddings")?;
        let max_seq = read_json("sentence_bert_config.json")
            .ok()
            .and_then(|c| c.get("max_seq_length").and_then(Json::as_u64))
            .map_or(DEFAULT_MAX_SEQ, |v| v as usize)
            .min(max_pos);
        let st_path = dir.join("model.safetensors");
        let mut w: HashMap<String, CTensor> =
            candle_core::safetensors::load(&st_path, &Device::Cpu)
                .map_err(|e| Error::format(&st_path, "safetensors", e.to_string()))?;
        // Some exports prefix every name with `bert.`.
        if w.keys().all(|k| k.starts_with("bert.")) {
            w = w
                .into_iter()
                .map(|(k, v)| (k["bert.".len()..].to_string(), v))
                .collect();
        }
        let mut ws = Weights {
            map: w,
            path: st_path,
        };
        let mut layers = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let p = |s: &str| format!("encoder.layer.{l}.{s}");
            layers.push(Layer {
                q: ws.linear(&p("attention.self.query"))?,
                k: ws.linear(&p("attention.self.key"))?,
                v: ws.linear(&p("attention.self.value"))?,
                attn_out: ws.linear(&p("attention.output.dense"))?,
                attn_norm: ws.norm(&p("attention.output.LayerNorm"))?,
                inter: ws.linear(&p("intermediate.dense"))?,
                out: ws.linear(&p("output.dense"))?,
                out_norm: ws.norm(&p("output.LayerNorm"))?,
            });
        }
        let tok_path = dir.join("tokenizer.json");
        let mut tok = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::format(&tok_path, "tokenizer.json", e.to_string()))?;
        // One sentence at a time: no padding, truncation at the model's length.
        tok.with_padding(None);
        tok.with_truncation(Some(tokenizers::TruncationParams {
            max_length: max_seq,
            ..Default::default()
        }))
        .map_err(|e| Error::format(&tok_path, "truncation", e.to_string()))?;
        // Streamed: the weights are already loaded once; a second whole copy in memory to
        // hash them would double the encoder's start-up footprint on a board.
        let weights_sha256 = match weights_sha256 {
            Some(known) => known,
            None => {
                let mut f = std::fs::File::open(&ws.path).map_err(|e| Error::io(&ws.path, e))?;
                let mut h = Sha256::new();
                std::io::copy(&mut f, &mut h).map_err(|e| Error::io(&ws.path, e))?;
                format!("{:x}", h.finalize())
            }
        };
        let word = ws.take("embeddings.word_embeddings.weight")?;
        let identity = Identity {
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            weights_sha256,
            dim: word.dim(1).map_err(ce)?,
            max_seq,
        };
        Ok(Embedder {
            dir: dir.to_path_buf(),
            identity,
            tok,
            word,
            pos: ws.take("embeddings.position_embeddings.weight")?,
            token_type: ws.take("embeddings.token_type_embeddings.weight")?,
            emb_norm: ws.norm("embeddings.LayerNorm")?,
            layers,
            heads,
            eps,
            max_seq,
        })
    }

    /// The folder the model was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What identifies this encoder's embeddings.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The encoder's tokenizer (truncating at its maximum length).
    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tok
    }

    /// The L2-normalized mean-pooled embedding of `text`.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>> {
        Ok(self.embed_batch(&[text])?.remove(0))
    }

    /// The embeddings of several texts in one forward pass: padded to the longest, with the
    /// padding masked out of attention and of the mean, so each equals its `embed` alone.
    pub fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let mut rows: Vec<Vec<u32>> = Vec::with_capacity(texts.len());
        for t in texts {
            let enc = self
                .tok
                .encode(*t, true)
                .map_err(|e| Error::Invalid(format!("sentence embedder: cannot encode: {e}")))?;
            let ids = enc.get_ids();
            rows.push(ids[..ids.len().min(self.max_seq)].to_vec());
        }
        let b = rows.len();
        let n = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; b * n];
        let mut keep = vec![0f32; b * n];
        for (r, row) in rows.iter().enumerate() {
            ids[r * n..r * n + row.len()].copy_from_slice(row);
            keep[r * n..r * n + row.len()].fill(1.0);
        }
        let dev = Device::Cpu;
        let idx = CTensor::from_slice(&ids, b * n, &dev).map_err(ce)?;
        let keep = CTensor::from_slice(&keep, (b, n), &dev).map_err(ce)?;
        // Padding gets a large negative attention bias: exp() of it is exactly 0.
        let bias = keep
            .affine(1e9, -1e9)
            .and_then(|m| m.reshape((b, 1, 1, n)))
            .map_err(ce)?;
        let pos = self.pos.narrow(0, 0, n).map_err(ce)?;
        let x = self
            .word
            .index_select(&idx, 0)
            .and_then(|x| x.reshape((b, n, ())))
            .and_then(|x| x.broadcast_add(&pos))
            .and_then(|x| x.broadcast_add(&self.token_type.narrow(0, 0, 1)?))
            .and_then(|x| x.reshape((b * n, ())))
            .map_err(ce)?;
        let mut x = layer_norm(&x, &self.emb_norm, self.eps)?;
        let hidden = x.dim(1).map_err(ce)?;
        let hd = hidden / self.heads;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &self.layers {
            let heads = |t: CTensor| -> Result<CTensor> {
                t.reshape((b, n, self.heads, hd))
                    .and_then(|t| t.transpose(1, 2))
                    .and_then(|t| t.contiguous())
                    .map_err(ce)
            };
            let (q, k, v) = (
                heads(l.q.apply(&x)?)?,
                heads(l.k.apply(&x)?)?,
                heads(l.v.apply(&x)?)?,
            );
            let probs = q
                .matmul(&k.t().map_err(ce)?)
                .and_then(|s| s.affine(scale, 0.0))
                .and_then(|s| s.broadcast_add(&bias))
                .and_then(|s| {
                    candle_core::Tensor::exp(&s.broadcast_sub(&s.max_keepdim(D::Minus1)?)?)
                })
                .and_then(|e| e.broadcast_div(&e.sum_keepdim(D::Minus1)?))
                .map_err(ce)?;
            let ctx = probs
                .matmul(&v)
                .and_then(|o| o.transpose(1, 2))
                .and_then(|o| o.contiguous())
                .and_then(|o| o.reshape((b * n, hidden)))
                .map_err(ce)?;
            let a = (l.attn_out.apply(&ctx)? + &x).map_err(ce)?;
            let a = layer_norm(&a, &l.attn_norm, self.eps)?;
            let h = l.inter.apply(&a)?.gelu_erf().map_err(ce)?;
            let o = (l.out.apply(&h)? + &a).map_err(ce)?;
            x = layer_norm(&o, &l.out_norm, self.eps)?;
        }
        // Mean over each text's own tokens.
        let sums = x
            .reshape((b, n, hidden))
            .and_then(|x| x.broadcast_mul(&keep.unsqueeze(2)?))
            .and_then(|x| x.sum(1))
            .and_then(|s| s.to_vec2::<f32>())
            .map_err(ce)?;
        Ok(sums
            .into_iter()
            .zip(&rows)
            .map(|(sum, row)| {
                let count = row.len().max(1) as f32;
                let mean: Vec<f32> = sum.into_iter().map(|v| v / count).collect();
                let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                mean.into_iter().map(|v| v / norm).collect()
            })
            .collect())
    }

    /// Cosine similarity of the embeddings of two texts.
    pub fn similarity(&self, a: &str, b: &str) -> Result<f32> {
        Ok(cosine(&self.embed(a)?, &self.embed(b)?))
    }
}

/// Cosine of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|v| v * v).sum::<f32>().sqrt();
    let nb = b.iter().map(|v| v * v).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

fn layer_norm(x: &CTensor, n: &LayerNorm, eps: f64) -> Result<CTensor> {
    let mean = x.mean_keepdim(D::Minus1).map_err(ce)?;
    let xc = x.broadcast_sub(&mean).map_err(ce)?;
    let var = xc
        .sqr()
        .and_then(|v| v.mean_keepdim(D::Minus1))
        .map_err(ce)?;
    xc.broadcast_div(&(var + eps).and_then(|v| v.sqrt()).map_err(ce)?)
        .and_then(|y| y.broadcast_mul(&n.w))
        .and_then(|y| y.broadcast_add(&n.b))
        .map_err(ce)
}

/// The tensors of a safetensors file, taken by name with errors naming the file.
struct Weights {
    map: HashMap<String, CTensor>,
    path: PathBuf,
}

impl Weights {
    fn take(&mut self, name: &str) -> Result<CTensor> {
        self.map
            .remove(name)
            .ok_or_else(|| Error::format(&self.path, name, "missing"))?
            .to_dtype(DType::F32)
            .map_err(ce)
    }

    fn linear(&mut self, p: &str) -> Result<Linear> {
        Ok(Linear {
            w: self.take(&format!("{p}.weight"))?,
            b: self.take(&format!("{p}.bias"))?,
        })
    }

    fn norm(&mut self, p: &str) -> Result<LayerNorm> {
        Ok(LayerNorm {
            w: self.take(&format!("{p}.weight"))?,
            b: self.take(&format!("{p}.bias"))?,
        })
    }
}
