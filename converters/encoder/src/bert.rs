//! Sentence embeddings: a BERT encoder (the architecture of sentence-transformers'
//! all-MiniLM-L6-v2) with mean pooling and L2 normalization, run on candle. Answer similarity
//! (the cosine of the embeddings of a generated and a reference answer, the figure NXP
//! reports for its on-board LLMs) and the knowledge base's search both use it.
//!
//! It reads a sentence-transformers folder: `config.json` (BERT), `model.safetensors`,
//! `tokenizer.json`, and `sentence_bert_config.json` for the maximum sequence length.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor as CTensor};
use serde_json::Value as Json;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{EncoderError as Error, Result};
use crate::ops;

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

/// `x Wᵀ`; the bias is added by the fused op that follows.
struct Linear {
    w: CTensor,
    b: Vec<f32>,
}

impl Linear {
    fn product(&self, x: &CTensor) -> Result<CTensor> {
        x.matmul(&self.w.t().map_err(ce)?).map_err(ce)
    }
}

struct LayerNorm {
    w: Vec<f32>,
    b: Vec<f32>,
}

impl LayerNorm {
    fn op(&self, eps: f64) -> ops::Norm<'_> {
        ops::Norm {
            w: &self.w,
            b: &self.b,
            eps: eps as f32,
        }
    }
}

struct Layer {
    /// Q, K and V as one product: rows [Q; K; V].
    qkv: Linear,
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
        // An absent field takes BERT's default; a present one of the wrong type is an error.
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
        if let Some(act) = cfg.get("hidden_act") {
            if act != "gelu" {
                return Err(Error::format(
                    &cfg_path,
                    "hidden_act",
                    format!("{act} is not supported (gelu is)"),
                ));
            }
        }
        let heads = num("num_attention_heads")?;
        let n_layers = num("num_hidden_layers")?;
        let eps = match cfg.get("layer_norm_eps") {
            None => 1e-12,
            Some(v) => v.as_f64().ok_or_else(|| {
                Error::format(&cfg_path, "layer_norm_eps", format!("{v} is not a number"))
            })?,
        };
        let max_pos = num("max_position_embeddings")?;
        // sentence-transformers' own file; without it, its default length.
        let sb_path = dir.join("sentence_bert_config.json");
        let max_seq = if sb_path.exists() {
            let sb = read_json("sentence_bert_config.json")?;
            match sb.get("max_seq_length") {
                None => DEFAULT_MAX_SEQ,
                Some(v) => v.as_u64().map(|v| v as usize).ok_or_else(|| {
                    Error::format(&sb_path, "max_seq_length", format!("{v} is not a count"))
                })?,
            }
        } else {
            DEFAULT_MAX_SEQ
        }
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
            let (q, k, v) = (
                ws.linear(&p("attention.self.query"))?,
                ws.linear(&p("attention.self.key"))?,
                ws.linear(&p("attention.self.value"))?,
            );
            layers.push(Layer {
                qkv: Linear {
                    w: CTensor::cat(&[&q.w, &k.w, &v.w], 0).map_err(ce)?,
                    b: [q.b, k.b, v.b].concat(),
                },
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
        let dim = word.dim(1).map_err(ce)?;
        if heads == 0 || dim % heads != 0 {
            return Err(Error::format(
                &cfg_path,
                "num_attention_heads",
                format!("{heads} heads do not divide the width {dim}"),
            ));
        }
        let identity = Identity {
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            weights_sha256,
            dim,
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
        let pos = self.pos.narrow(0, 0, n).map_err(ce)?;
        let mut x = self
            .word
            .index_select(&idx, 0)
            .and_then(|x| x.reshape((b, n, ())))
            .and_then(|x| x.broadcast_add(&pos))
            .and_then(|x| x.broadcast_add(&self.token_type.narrow(0, 0, 1)?))
            .and_then(|x| x.reshape((b * n, ())))
            .and_then(|x| x.apply_op1_no_bwd(&self.emb_norm.op(self.eps)))
            .map_err(ce)?;
        let hidden = x.dim(1).map_err(ce)?;
        let hd = hidden / self.heads;
        let softmax = ops::MaskedSoftmax {
            keep: &keep,
            heads: self.heads,
            n,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        for l in &self.layers {
            let qkv = l
                .qkv
                .product(&x)?
                .apply_op1_no_bwd(&ops::SplitHeads {
                    bias: &l.qkv.b,
                    b,
                    n,
                    heads: self.heads,
                })
                .map_err(ce)?;
            let part = |i: usize| qkv.get(i).map_err(ce);
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            let ctx = q
                .matmul(&k.t().map_err(ce)?)
                .and_then(|s| s.apply_op1_no_bwd(&softmax))
                .and_then(|p| p.matmul(&v))
                .and_then(|o| o.transpose(1, 2))
                .and_then(|o| o.contiguous())
                .and_then(|o| o.reshape((b * n, hidden)))
                .map_err(ce)?;
            let a = l
                .attn_out
                .product(&ctx)?
                .apply_op2_no_bwd(
                    &x,
                    &ops::AddNorm {
                        bias: &l.attn_out.b,
                        norm: l.attn_norm.op(self.eps),
                    },
                )
                .map_err(ce)?;
            let h = l
                .inter
                .product(&a)?
                .apply_op1_no_bwd(&ops::BiasGelu(&l.inter.b))
                .map_err(ce)?;
            x = l
                .out
                .product(&h)?
                .apply_op2_no_bwd(
                    &a,
                    &ops::AddNorm {
                        bias: &l.out.b,
                        norm: l.out_norm.op(self.eps),
                    },
                )
                .map_err(ce)?;
        }
        let keep = CTensor::from_slice(&keep, (b, n), &dev).map_err(ce)?;
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

    /// A 1-D parameter as values.
    fn vector(&mut self, name: &str) -> Result<Vec<f32>> {
        let t = self.take(name)?;
        t.to_vec1::<f32>()
            .map_err(|e| Error::format(&self.path, name, format!("not a vector: {e}")))
    }

    fn linear(&mut self, p: &str) -> Result<Linear> {
        let w = self.take(&format!("{p}.weight"))?;
        let b = self.vector(&format!("{p}.bias"))?;
        let rows = w.dims().first().copied().unwrap_or(0);
        if w.rank() != 2 || b.len() != rows {
            return Err(Error::format(
                &self.path,
                format!("{p}.bias"),
                format!("{} values for a weight of shape {:?}", b.len(), w.dims()),
            ));
        }
        Ok(Linear { w, b })
    }

    fn norm(&mut self, p: &str) -> Result<LayerNorm> {
        Ok(LayerNorm {
            w: self.vector(&format!("{p}.weight"))?,
            b: self.vector(&format!("{p}.bias"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error `Embedder::open` gives for a folder holding `config` (and, if given,
    /// `sentence_bert_config`) and no weights.
    fn refusal(config: Json, sentence_bert: Option<Json>) -> String {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        if let Some(sb) = sentence_bert {
            std::fs::write(dir.path().join("sentence_bert_config.json"), sb.to_string()).unwrap();
        }
        match Embedder::open(dir.path()) {
            Ok(_) => panic!("opened without weights"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_config_field_of_the_wrong_type_is_refused_by_name_not_defaulted() {
        let cfg = serde_json::json!({
            "model_type": "bert", "hidden_act": "gelu", "num_attention_heads": 12,
            "num_hidden_layers": 6, "max_position_embeddings": 512, "layer_norm_eps": 1e-12,
        });
        // A well-typed config gets as far as the missing weights.
        assert!(refusal(cfg.clone(), None).contains("model.safetensors"));
        let with = |k: &str, v: Json| {
            let mut c = cfg.clone();
            c[k] = v;
            c
        };
        let e = refusal(with("layer_norm_eps", "1e-12".into()), None);
        assert!(
            e.contains("layer_norm_eps") && e.contains("not a number"),
            "{e}"
        );
        let e = refusal(with("hidden_act", 1.into()), None);
        assert!(
            e.contains("hidden_act") && e.contains("not supported"),
            "{e}"
        );
        let e = refusal(with("num_hidden_layers", "6".into()), None);
        assert!(e.contains("num_hidden_layers"), "{e}");
        let e = refusal(
            cfg.clone(),
            Some(serde_json::json!({"max_seq_length": "256"})),
        );
        assert!(
            e.contains("sentence_bert_config.json") && e.contains("max_seq_length"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        std::fs::write(dir.path().join("sentence_bert_config.json"), "{").unwrap();
        let e = Embedder::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("sentence_bert_config.json"), "{e}");
    }
}
