//! Retrieval on the board: the bundle's knowledge base and the sentence encoder that built
//! it. Each chat question is embedded and searched; a question whose best passage scores
//! below the guard's threshold is refused before the model runs, any other is sent to the
//! model inside the bundle's template with the `top_k` passages.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgepack_encoder::kb::{Hit, Kb};
use edgepack_encoder::{ground, Embedder, EncoderError};
use edgepack_targets::bundle::{Manifest, RetrievalInfo};
use serde::Serialize;

/// A verified bundle's retrieval section, and the SHA-256 its manifest lists for the
/// encoder's weights (checked by the verification, so the encoder need not hash them again).
#[derive(Debug, Clone)]
pub struct Spec {
    pub info: RetrievalInfo,
    pub encoder_weights_sha256: Option<String>,
}

impl Spec {
    /// The retrieval a verified manifest describes, if any.
    pub fn of(manifest: &Manifest) -> Option<Spec> {
        let info = manifest.retrieval.clone()?;
        let encoder_weights_sha256 = manifest
            .file(&format!("{}/model.safetensors", info.encoder))
            .map(|f| f.sha256.clone());
        Some(Spec {
            info,
            encoder_weights_sha256,
        })
    }
}

/// Why the bundle's retrieval could not be loaded or a question not searched.
#[derive(Debug, thiserror::Error)]
pub enum RagError {
    #[error(transparent)]
    Encoder(#[from] EncoderError),
    #[error("{}: the knowledge base does not belong to the bundle's encoder: {message}", kb.display())]
    Mismatch { kb: PathBuf, message: String },
}

/// A passage the answer was given, as the response's `sources` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Source {
    /// The passage's number in the prompt (`[1]`, `[2]`, ...).
    pub index: usize,
    /// The document it comes from, as the knowledge base recorded it.
    pub source: String,
    /// Its byte range in that document.
    pub start: u64,
    pub end: u64,
    /// Cosine of the question and the passage.
    pub score: f32,
    pub text: String,
}

/// What to do with a question.
#[derive(Debug)]
pub enum Decision {
    /// Out of domain: answer with the refusal, do not run the model.
    Refuse { best: f32 },
    /// Answer `prompt` (the template filled with the passages and the question).
    Answer {
        prompt: String,
        sources: Vec<Source>,
    },
}

/// A decision and how long embedding and search took.
#[derive(Debug)]
pub struct Decided {
    pub decision: Decision,
    pub latency: Duration,
}

/// The loaded knowledge base, encoder and settings.
pub struct Retrieval {
    encoder: Embedder,
    kb: Kb,
    pub top_k: usize,
    pub threshold: Option<f32>,
    pub refusal: String,
    template: String,
}

impl std::fmt::Debug for Retrieval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retrieval")
            .field("encoder", &self.encoder.identity())
            .field("chunks", &self.kb.len())
            .field("top_k", &self.top_k)
            .field("threshold", &self.threshold)
            .finish()
    }
}

impl Retrieval {
    /// Loads the knowledge base and encoder a verified bundle at `dir` names, and checks
    /// that the encoder is the one that built the knowledge base.
    pub fn open(dir: &Path, spec: &Spec) -> Result<Retrieval, RagError> {
        let info = &spec.info;
        let kb_path = dir.join(&info.kb);
        let encoder_dir = dir.join(&info.encoder);
        let encoder = match &spec.encoder_weights_sha256 {
            Some(sha) => Embedder::open_verified(&encoder_dir, sha)?,
            None => Embedder::open(&encoder_dir)?,
        };
        let kb = Kb::read(&kb_path)?;
        kb.check_embedder(encoder.identity())
            .map_err(|e| RagError::Mismatch {
                kb: kb_path.clone(),
                message: e.to_string(),
            })?;
        if kb.is_empty() {
            return Err(EncoderError::format(&kb_path, "chunks", "holds no passages").into());
        }
        Ok(Retrieval {
            encoder,
            kb,
            top_k: info.top_k as usize,
            threshold: info.threshold,
            refusal: info.refusal.clone(),
            template: info.template.clone(),
        })
    }

    /// What `/v1/models` shows about retrieval.
    pub fn describe(&self) -> serde_json::Value {
        let id = self.encoder.identity();
        serde_json::json!({
            "encoder": id.name,
            "encoder_weights_sha256": id.weights_sha256,
            "documents": self.kb.meta.documents.len(),
            "chunks": self.kb.len(),
            "top_k": self.top_k,
            "threshold": self.threshold,
        })
    }

    /// Embeds `question`, searches, and applies the guard.
    pub fn decide(&self, question: &str) -> Result<Decided, RagError> {
        let t0 = Instant::now();
        let q = self.encoder.embed(question)?;
        let hits = self.kb.search(&q, self.top_k)?;
        let latency = t0.elapsed();
        let best = hits.first().map_or(f32::NEG_INFINITY, |h| h.score);
        let decision = match self.threshold {
            Some(t) if best < t => Decision::Refuse { best },
            _ => Decision::Answer {
                prompt: ground::prompt(&self.template, &hits, question),
                sources: sources(hits),
            },
        };
        Ok(Decided { decision, latency })
    }
}

fn sources(hits: Vec<Hit>) -> Vec<Source> {
    hits.into_iter()
        .enumerate()
        .map(|(i, h)| Source {
            index: i + 1,
            source: h.source,
            start: h.start,
            end: h.end,
            score: h.score,
            text: h.text,
        })
        .collect()
}
