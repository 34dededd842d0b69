//! Activation statistics for SmoothQuant and static int8 activation scales.
//!
//! For the input of every linear layer (keyed by the HF weight name; Q, K and V share one input
//! and each is recorded) the reference forward pass is run over calibration text and, per input
//! channel, the maximum of |x| and the sum of squares are kept, with the number of token rows;
//! per tensor, the minimum and maximum of x and a histogram of |x| from which high percentiles
//! are read.
//!
//! The histogram has [`HIST_BINS`] fixed log-linear bins: a bin is the f32 exponent of |x|
//! plus the top 5 mantissa bits (32 bins per octave, so a bin is at most 1/32 = 3.1% wide
//! relative to its lower edge), covering |x| from 2^-32 to 2^32 (smaller values count in the
//! first bin, larger in the last). A percentile is the upper edge of the bin holding it, capped
//! at the exact max |x|: never below the true percentile, at most one bin above it.
//!
//! The statistics are collected by `calib::stats::compute`; this module is the file format and
//! its accumulator, which the transforms (SmoothQuant, Wanda), the W8A8 scales and the
//! exporters read. Tokens left out of a calibration run are reported in
//! [`CalibStats::tokens_total`] / [`CalibStats::tokens_used`].
//!
//! File format (version [`VERSION`]): safetensors with, per weight `W`, `W.absmax` F32 `[in]`,
//! `W.sum_sq` F64 `[in]`, `W.hist` U64 `[HIST_BINS]`; `__metadata__` holds `format`
//! (`"edgepack-calib"`), `version`, `identity` (JSON: architecture, hidden_size,
//! num_hidden_layers, vocab_size, tensors_sha256), `samples`, `seq_len`, `tokens_total`,
//! `tokens_used`, `dataset`, and `tensors` (JSON: per weight `count`, `min`, `max`,
//! `p99_99` of |x|).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::io::write_file;
use crate::model::Model;

/// The file format version this code writes and reads.
pub const VERSION: u32 = 1;
/// `__metadata__.format` of a stats file.
pub const FORMAT: &str = "edgepack-calib";
/// The tensor holding the token ids of the samples.
pub const SAMPLE_TOKENS: &str = "__samples__.tokens";
/// Bins of the |x| histogram.
pub const HIST_BINS: usize = 2048;
/// Bins per octave (top mantissa bits kept).
const MANT_BITS: u32 = 5;
/// f32 biased exponent of the first bin (2^-32).
const FIRST_EXP: u32 = 127 - 32;

/// The histogram bin of |x| (`a` is already non-negative).
fn bin_of(a: f32) -> usize {
    let key = a.to_bits() >> (23 - MANT_BITS);
    let first = FIRST_EXP << MANT_BITS;
    (key.saturating_sub(first) as usize).min(HIST_BINS - 1)
}

/// The upper edge of bin `b`.
fn bin_upper(b: usize) -> f32 {
    let key = (FIRST_EXP << MANT_BITS) + b as u32 + 1;
    f32::from_bits(key << (23 - MANT_BITS))
}

/// What identifies the model a stats file belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    pub architecture: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub vocab_size: usize,
    /// sha256 (hex) over `name:dim,dim,...\n` of every tensor, sorted by name.
    pub tensors_sha256: String,
}

impl ModelIdentity {
    pub fn of(model: &Model) -> ModelIdentity {
        let mut names: Vec<(&str, &[usize])> = model
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        names.sort();
        let mut h = Sha256::new();
        for (n, s) in names {
            let dims: Vec<String> = s.iter().map(usize::to_string).collect();
            h.update(format!("{n}:{}\n", dims.join(",")).as_bytes());
        }
        let c = &model.config;
        ModelIdentity {
            architecture: c.arch.gguf_name().to_string(),
            hidden_size: c.hidden_size,
            num_hidden_layers: c.num_hidden_layers,
            vocab_size: c.vocab_size,
            tensors_sha256: format!("{:x}", h.finalize()),
        }
    }
}

/// Statistics of the input of one linear layer.
#[derive(Debug, Clone, PartialEq)]
pub struct InputStats {
    /// Per input channel, max |x|.
    pub absmax: Vec<f32>,
    /// Per input channel, sum of x² (f64).
    pub sum_sq: Vec<f64>,
    /// Token rows seen.
    pub count: u64,
    /// Smallest and largest x over the whole tensor.
    pub min: f32,
    pub max: f32,
    /// Histogram of |x| over the whole tensor ([`HIST_BINS`] bins).
    pub hist: Vec<u64>,
}

impl InputStats {
    fn new(in_features: usize) -> InputStats {
        InputStats {
            absmax: vec![0.0; in_features],
            sum_sq: vec![0.0; in_features],
            count: 0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            hist: vec![0; HIST_BINS],
        }
    }

    /// Max |x| over the whole tensor.
    pub fn abs_max(&self) -> f32 {
        self.min.abs().max(self.max.abs())
    }

    /// The `p`-th percentile (0..=100) of |x| over the whole tensor: the upper edge of the
    /// histogram bin that holds it, capped at max |x| (0 when nothing was seen).
    pub fn percentile(&self, p: f64) -> f32 {
        let total: u64 = self.hist.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut acc = 0u64;
        for (b, &n) in self.hist.iter().enumerate() {
            acc += n;
            if acc >= rank {
                return bin_upper(b).min(self.abs_max());
            }
        }
        self.abs_max()
    }

    /// Per-channel root mean square of x.
    pub fn rms(&self) -> Vec<f32> {
        let c = self.count.max(1) as f64;
        self.sum_sq.iter().map(|s| (s / c).sqrt() as f32).collect()
    }
}

/// Calibration statistics of a model: per linear weight (HF name), its input's statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibStats {
    pub identity: ModelIdentity,
    pub entries: BTreeMap<String, InputStats>,
    /// Samples run, tokens each.
    pub samples: usize,
    pub seq_len: usize,
    /// Tokens the text gave, and tokens that were run (the rest was truncated).
    pub tokens_total: usize,
    pub tokens_used: usize,
    /// Where the text came from (set by the caller).
    pub dataset: String,
    /// The token ids of every sample run, so that a later step can run the same text again
    /// (the full-integer TFLite export calibrates every activation of its graph on them).
    /// Empty in files written before they were kept.
    pub sample_tokens: Vec<Vec<u32>>,
}

impl CalibStats {
    pub fn new(identity: ModelIdentity) -> CalibStats {
        CalibStats {
            identity,
            entries: BTreeMap::new(),
            samples: 0,
            seq_len: 0,
            tokens_total: 0,
            tokens_used: 0,
            dataset: String::new(),
            sample_tokens: Vec::new(),
        }
    }

    /// Tokens of the text that were not run.
    pub fn tokens_truncated(&self) -> usize {
        self.tokens_total.saturating_sub(self.tokens_used)
    }

    /// Adds `activations` (`[n_rows, in_features]` row-major) to the statistics of `name`.
    pub fn accumulate(
        &mut self,
        name: &str,
        activations: &[f32],
        in_features: usize,
    ) -> Result<()> {
        if in_features == 0 || activations.len() % in_features != 0 {
            return Err(Error::Invalid(format!(
                "calibration: {name}: {} activations are not rows of {in_features}",
                activations.len()
            )));
        }
        let e = self
            .entries
            .entry(name.to_string())
            .or_insert_with(|| InputStats::new(in_features));
        if e.absmax.len() != in_features {
            return Err(Error::Invalid(format!(
                "calibration: {name}: inconsistent size ({} channels vs {in_features} inputs)",
                e.absmax.len()
            )));
        }
        for row in activations.chunks_exact(in_features) {
            for ((m, s), &x) in e.absmax.iter_mut().zip(e.sum_sq.iter_mut()).zip(row) {
                if !x.is_finite() {
                    return Err(Error::Invalid(format!(
                        "calibration: non-finite values in the activations of {name}"
                    )));
                }
                let a = x.abs();
                *m = m.max(a);
                *s += (x as f64) * (x as f64);
                e.min = e.min.min(x);
                e.max = e.max.max(x);
                e.hist[bin_of(a)] += 1;
            }
        }
        e.count += (activations.len() / in_features) as u64;
        Ok(())
    }

    /// Refuses statistics computed for another model, naming the field or tensor that differs.
    /// `path` is the stats file, for the message.
    pub fn check_model(&self, model: &Model, path: &Path) -> Result<()> {
        let want = ModelIdentity::of(model);
        let have = &self.identity;
        let src = model.source.display();
        let fields: [(&str, String, String); 4] = [
            (
                "architecture",
                have.architecture.clone(),
                want.architecture.clone(),
            ),
            (
                "hidden_size",
                have.hidden_size.to_string(),
                want.hidden_size.to_string(),
            ),
            (
                "num_hidden_layers",
                have.num_hidden_layers.to_string(),
                want.num_hidden_layers.to_string(),
            ),
            (
                "vocab_size",
                have.vocab_size.to_string(),
                want.vocab_size.to_string(),
            ),
        ];
        for (field, h, w) in fields {
            if h != w {
                return Err(Error::mismatch(
                    path,
                    format!("identity.{field}"),
                    format!(
                        "the statistics are for {h}, {src} has {w} (are they from another model?)"
                    ),
                ));
            }
        }
        for (name, e) in &self.entries {
            let Some(t) = model.tensor(name) else {
                return Err(Error::mismatch(
                    path,
                    name,
                    format!(
                        "{src} has no tensor of this name (are the statistics from another model?)"
                    ),
                ));
            };
            if t.shape.len() != 2 || t.shape[1] != e.absmax.len() {
                return Err(Error::mismatch(
                    path,
                    name,
                    format!(
                        "{} input channels recorded, the tensor in {src} has shape {:?}",
                        e.absmax.len(),
                        t.shape
                    ),
                ));
            }
        }
        if have.tensors_sha256 != want.tensors_sha256 {
            return Err(Error::mismatch(
                path,
                "identity.tensors_sha256",
                format!(
                    "the tensor names and shapes of {src} hash to {}, the statistics were computed on {} (another model?)",
                    want.tensors_sha256, have.tensors_sha256
                ),
            ));
        }
        Ok(())
    }

    /// Writes the stats file atomically (format in the module docs).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut per = serde_json::Map::new();
        for (name, e) in &self.entries {
            let n = e.absmax.len();
            bufs.push((
                format!("{name}.absmax"),
                Dtype::F32,
                vec![n],
                e.absmax.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ));
            bufs.push((
                format!("{name}.sum_sq"),
                Dtype::F64,
                vec![n],
                e.sum_sq.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ));
            bufs.push((
                format!("{name}.hist"),
                Dtype::U64,
                vec![HIST_BINS],
                e.hist.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ));
            per.insert(
                name.clone(),
                json!({"count": e.count, "min": e.min, "max": e.max, "p99_99": e.percentile(99.99)}),
            );
        }
        if let Some(first) = self.sample_tokens.first() {
            let len = first.len();
            if self.sample_tokens.iter().any(|t| t.len() != len) {
                return Err(Error::Invalid(format!(
                    "{}: {SAMPLE_TOKENS}: samples of unequal length",
                    path.display()
                )));
            }
            bufs.push((
                SAMPLE_TOKENS.to_string(),
                Dtype::U32,
                vec![self.sample_tokens.len(), len],
                self.sample_tokens
                    .iter()
                    .flatten()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ));
        }
        let mut views = Vec::with_capacity(bufs.len());
        for (n, d, s, b) in &bufs {
            let v = TensorView::new(*d, s.clone(), b)
                .map_err(|e| Error::Invalid(format!("{}: {n}: {e}", path.display())))?;
            views.push((n.clone(), v));
        }
        let identity = serde_json::to_string(&self.identity)
            .map_err(|e| Error::Invalid(format!("{}: identity: {e}", path.display())))?;
        let meta: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("version", VERSION.to_string()),
            ("identity", identity),
            ("samples", self.samples.to_string()),
            ("seq_len", self.seq_len.to_string()),
            ("tokens_total", self.tokens_total.to_string()),
            ("tokens_used", self.tokens_used.to_string()),
            ("dataset", self.dataset.clone()),
            ("tensors", serde_json::Value::Object(per).to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let bytes = safetensors::serialize(views, Some(meta))
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        write_file(path, &bytes)
    }

    /// Reads a stats file, validating format, version, identity and every tensor's dtype and
    /// shape; errors name the file and the field or tensor.
    pub fn read(path: &Path) -> Result<CalibStats> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| {
            Error::format(
                path,
                "header",
                format!(
                    "not a safetensors file ({e}); expected statistics from `edgepack calibrate`"
                ),
            )
        })?;
        let (_, md) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::format(path, "header", e.to_string()))?;
        let meta = md.metadata().clone().unwrap_or_default();
        let get = |k: &str| -> Result<&String> {
            meta.get(k)
                .ok_or_else(|| Error::format(path, format!("__metadata__.{k}"), "missing"))
        };
        let format = get("format")?;
        if format != FORMAT {
            return Err(Error::format(
                path,
                "__metadata__.format",
                format!("{format:?}, expected {FORMAT:?} (not an edgepack calibration file)"),
            ));
        }
        let version = get("version")?;
        if version != &VERSION.to_string() {
            return Err(Error::unsupported(
                path,
                "__metadata__.version",
                format!("version {version} (this edgepack reads version {VERSION})"),
            ));
        }
        let num = |k: &str| -> Result<usize> {
            get(k)?.parse::<usize>().map_err(|e| {
                Error::format(
                    path,
                    format!("__metadata__.{k}"),
                    format!("not a count: {e}"),
                )
            })
        };
        let identity: ModelIdentity = serde_json::from_str(get("identity")?)
            .map_err(|e| Error::format(path, "__metadata__.identity", e.to_string()))?;
        let per: serde_json::Map<String, serde_json::Value> = serde_json::from_str(get("tensors")?)
            .map_err(|e| Error::format(path, "__metadata__.tensors", e.to_string()))?;
        let mut entries = BTreeMap::new();
        for (name, info) in &per {
            let field = |f: &str| format!("__metadata__.tensors.{name}.{f}");
            let count = info["count"]
                .as_u64()
                .ok_or_else(|| Error::format(path, field("count"), "missing or not a count"))?;
            let fnum = |f: &str| -> Result<f32> {
                info[f]
                    .as_f64()
                    .map(|v| v as f32)
                    .ok_or_else(|| Error::format(path, field(f), "missing or not a number"))
            };
            let (min, max) = (fnum("min")?, fnum("max")?);
            let tensor = |suffix: &str, dtype: Dtype, len: Option<usize>| -> Result<Vec<u8>> {
                let tn = format!("{name}.{suffix}");
                let v = st
                    .tensor(&tn)
                    .map_err(|_| Error::format(path, &tn, "missing"))?;
                if v.dtype() != dtype
                    || v.shape().len() != 1
                    || len.is_some_and(|l| v.shape()[0] != l)
                {
                    return Err(Error::format(
                        path,
                        &tn,
                        format!(
                            "{:?} {:?}, expected {dtype:?} [{}]",
                            v.dtype(),
                            v.shape(),
                            len.map_or("in_features".to_string(), |l| l.to_string())
                        ),
                    ));
                }
                Ok(v.data().to_vec())
            };
            let absmax: Vec<f32> = tensor("absmax", Dtype::F32, None)?
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            let sum_sq: Vec<f64> = tensor("sum_sq", Dtype::F64, Some(absmax.len()))?
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect();
            let hist: Vec<u64> = tensor("hist", Dtype::U64, Some(HIST_BINS))?
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect();
            entries.insert(
                name.clone(),
                InputStats {
                    absmax,
                    sum_sq,
                    count,
                    min,
                    max,
                    hist,
                },
            );
        }
        if entries.is_empty() {
            return Err(Error::format(path, "__metadata__.tensors", "no entries"));
        }
        let mut sample_tokens = Vec::new();
        if let Ok(v) = st.tensor(SAMPLE_TOKENS) {
            let shape = v.shape().to_vec();
            if v.dtype() != Dtype::U32 || shape.len() != 2 || shape[1] == 0 {
                return Err(Error::format(
                    path,
                    SAMPLE_TOKENS,
                    format!("{:?} {shape:?}, expected U32 [samples, seq_len]", v.dtype()),
                ));
            }
            let ids: Vec<u32> = v
                .data()
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            sample_tokens = ids.chunks(shape[1]).map(<[u32]>::to_vec).collect();
        }
        let expected = 3 * entries.len() + usize::from(!sample_tokens.is_empty());
        if st.len() != expected {
            let stray = st
                .names()
                .into_iter()
                .find(|n| {
                    *n != SAMPLE_TOKENS
                        && !n
                            .rsplit_once('.')
                            .is_some_and(|(w, _)| entries.contains_key(w))
                })
                .unwrap_or("?")
                .to_string();
            return Err(Error::format(
                path,
                stray,
                "a tensor with no entry in __metadata__.tensors",
            ));
        }
        Ok(CalibStats {
            identity,
            entries,
            samples: num("samples")?,
            seq_len: num("seq_len")?,
            tokens_total: num("tokens_total")?,
            tokens_used: num("tokens_used")?,
            dataset: get("dataset")?.clone(),
            sample_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bins_are_32_per_octave_and_percentiles_bound_the_truth() {
        assert_eq!(bin_of(1.0) + 32, bin_of(2.0));
        assert_eq!(bin_of(0.0), 0);
        assert_eq!(bin_of(f32::MAX), HIST_BINS - 1);
        assert_eq!(bin_upper(bin_of(1.0)), 1.0 + 1.0 / 32.0);
        let mut s = CalibStats::new(ModelIdentity {
            architecture: "llama".into(),
            hidden_size: 4,
            num_hidden_layers: 1,
            vocab_size: 8,
            tensors_sha256: String::new(),
        });
        // 10000 values 0.0001..=1.0 in one channel and one outlier of -50 in another.
        let mut acts = Vec::new();
        for i in 1..=10000 {
            acts.extend([i as f32 / 10000.0, 0.0]);
        }
        acts.extend([0.0, -50.0]);
        s.accumulate("w", &acts, 2).unwrap();
        let e = &s.entries["w"];
        assert_eq!(e.count, 10001);
        assert_eq!(e.absmax, [1.0, 50.0]);
        assert_eq!((e.min, e.max), (-50.0, 1.0));
        // 20002 values, 10001 of them zeros: the 99th percentile is the 19802nd smallest
        // |x|, the 9801st value above zero, 0.9801; the estimate is at most one bin above.
        let p99 = e.percentile(99.0);
        let truth = 0.9801f32;
        assert!(p99 >= truth && p99 <= truth * 1.04, "{p99}");
        assert_eq!(e.percentile(100.0), 50.0);
        assert!(e.percentile(99.99) <= 1.0 + 1.0 / 32.0);
        assert!((e.rms()[1] - (2500.0f32 / 10001.0).sqrt()).abs() < 1e-6);
        assert!(s.accumulate("w", &[1.0, 2.0, 3.0], 3).is_err());
        let err = s.accumulate("w", &[f32::NAN, 1.0], 2).unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
    }

    #[test]
    fn files_round_trip_and_bad_versions_and_shapes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.calib");
        let mut s = CalibStats::new(ModelIdentity {
            architecture: "llama".into(),
            hidden_size: 2,
            num_hidden_layers: 1,
            vocab_size: 8,
            tensors_sha256: "ab".into(),
        });
        s.accumulate(
            "model.layers.0.mlp.down_proj.weight",
            &[1.5, -2.0, 0.25, 3.0],
            2,
        )
        .unwrap();
        s.samples = 2;
        s.dataset = "x.txt".into();
        // Without kept samples (files of older builds) and with them.
        s.write(&p).unwrap();
        assert_eq!(CalibStats::read(&p).unwrap(), s);
        s.sample_tokens = vec![vec![1, 2, 3], vec![7, 8, 9]];
        s.write(&p).unwrap();
        assert_eq!(CalibStats::read(&p).unwrap(), s);
        s.sample_tokens.push(vec![4]);
        let err = s.write(&dir.path().join("ragged.calib")).unwrap_err();
        assert!(err.to_string().contains("unequal length"), "{err}");
        s.sample_tokens.pop();

        let bytes = std::fs::read(&p).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, md) = SafeTensors::read_metadata(&bytes).unwrap();
        let rewrite = |meta: HashMap<String, String>, drop_hist: bool, out: &Path| {
            let views: Vec<(String, TensorView)> = st
                .tensors()
                .into_iter()
                .filter(|(n, _)| !(drop_hist && n.ends_with(".hist")))
                .collect();
            std::fs::write(out, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
        };
        let mut meta = md.metadata().clone().unwrap();
        meta.insert("version".into(), "9".into());
        let q = dir.path().join("v9.calib");
        rewrite(meta, false, &q);
        let err = CalibStats::read(&q).unwrap_err().to_string();
        assert!(
            err.contains("v9.calib: __metadata__.version") && err.contains('9'),
            "{err}"
        );
        let q = dir.path().join("nohist.calib");
        rewrite(md.metadata().clone().unwrap(), true, &q);
        let err = CalibStats::read(&q).unwrap_err().to_string();
        assert!(
            err.contains("nohist.calib: model.layers.0.mlp.down_proj.weight.hist: missing"),
            "{err}"
        );
        std::fs::write(&q, b"not safetensors").unwrap();
        let err = CalibStats::read(&q).unwrap_err().to_string();
        assert!(err.contains("nohist.calib: header"), "{err}");
    }
}
