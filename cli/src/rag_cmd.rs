//! `edgepack rag`: a knowledge base of the product's documents for retrieval on the board —
//! build, add, remove, query, and calibrate the out-of-domain guard.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use edgepack_converters::progress::Progress;
use edgepack_encoder::kb::{self, Added, Hit, Kb, Precision};
use edgepack_encoder::Embedder;
use serde::Serialize;
use serde_json::json;

use crate::progress::Bars;

#[derive(Subcommand, Debug)]
pub enum RagCommand {
    /// Chunk documents by the encoder's tokens, embed them and write a knowledge base.
    #[command(
        after_help = "Example:\n  edgepack rag build docs/*.md docs/*.txt --embedder ./all-MiniLM-L6-v2 -o kb/\n  edgepack rag build manual.txt --embedder ./all-MiniLM-L6-v2 --chunk-tokens 96 --overlap 24 --precision f16 -o kb/\n\nThe folder gets kb.safetensors: every chunk's vector (int8 with a scale per vector, f16 or f32), its text, its document and byte range, and the encoder's identity; and encoder.path, the encoder folder's path, which add, query, calibrate and bundle --kb use when --embedder is not given. Binary and empty documents are skipped and named."
    )]
    Build(BuildArgs),
    /// Add documents to a knowledge base (only the new ones are embedded).
    #[command(
        after_help = "Example:\n  edgepack rag add kb/ --embedder ./all-MiniLM-L6-v2 docs/faq.md"
    )]
    Add {
        kb: PathBuf,
        /// The encoder folder that built the kb (default: the one `rag build` recorded in
        /// KB/encoder.path).
        #[arg(long)]
        embedder: Option<PathBuf>,
        #[arg(required = true)]
        docs: Vec<PathBuf>,
        #[command(flatten)]
        reading: Reading,
    },
    /// Remove documents (named as they were added) from a knowledge base.
    #[command(after_help = "Example:\n  edgepack rag remove kb/ docs/old.md")]
    Remove {
        kb: PathBuf,
        #[arg(required = true)]
        docs: Vec<String>,
    },
    /// The passages closest to a question, with their scores and sources.
    #[command(
        after_help = "Example:\n  edgepack rag query kb/ \"How do I reset the device?\"\n  edgepack rag query kb/ --embedder ./all-MiniLM-L6-v2 -k 3 --json \"What does E1 mean?\"\n  edgepack rag query kb/ --embedder ./all-MiniLM-L6-v2 --questions q.txt --json"
    )]
    Query {
        kb: PathBuf,
        /// The question (or give --questions).
        #[arg(required_unless_present = "questions", conflicts_with = "questions")]
        question: Option<String>,
        /// Many questions: one per line, or JSONL with a `question` field.
        #[arg(long)]
        questions: Option<PathBuf>,
        /// The encoder folder that built the kb (default: the one `rag build` recorded in
        /// KB/encoder.path).
        #[arg(long)]
        embedder: Option<PathBuf>,
        /// Passages to return.
        #[arg(short, default_value_t = 5)]
        k: usize,
    },
    /// Pick the out-of-domain guard's threshold from question sets and store it in the kb.
    #[command(
        after_help = "Example:\n  edgepack rag calibrate kb/ --in-domain q_in.txt --out-of-domain q_out.txt\n\nQuestion files hold one question per line, or JSONL with a `question` field. The threshold is the highest best-passage score that refuses at most --false-reject of the in-domain questions; the report gives the ROC AUC and both rates at it."
    )]
    Calibrate {
        kb: PathBuf,
        /// The encoder folder that built the kb (default: the one `rag build` recorded in
        /// KB/encoder.path).
        #[arg(long)]
        embedder: Option<PathBuf>,
        #[arg(long)]
        in_domain: PathBuf,
        #[arg(long)]
        out_of_domain: PathBuf,
        /// Share of in-domain questions the guard may refuse.
        #[arg(long, default_value_t = kb::DEFAULT_FALSE_REJECT)]
        false_reject: f64,
    },
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// UTF-8 text or Markdown documents.
    #[arg(required = true)]
    docs: Vec<PathBuf>,
    /// A sentence-transformers BERT folder (all-MiniLM-L6-v2).
    #[arg(long)]
    embedder: PathBuf,
    /// Tokens per chunk (the encoder's tokens; at most its maximum length).
    #[arg(long, default_value_t = kb::DEFAULT_CHUNK_TOKENS)]
    chunk_tokens: usize,
    /// Tokens each chunk shares with the next.
    #[arg(long, default_value_t = kb::DEFAULT_OVERLAP)]
    overlap: usize,
    /// How vectors are stored: int8 (a scale per vector), f16 or f32.
    #[arg(long, default_value = "int8")]
    precision: String,
    /// The knowledge-base folder (its kb.safetensors is replaced whole).
    #[arg(short, long)]
    output: PathBuf,
    #[command(flatten)]
    reading: Reading,
}

#[derive(Args, Debug)]
pub struct Reading {
    /// Bytes of a document read, chunked and embedded at a time: memory holds the knowledge
    /// base and about this much of a document, whatever its size. Blocks end at a line
    /// break (else at whitespace), so the chunks do not depend on it.
    #[arg(long, default_value_t = kb::READ_BYTES, value_name = "BYTES")]
    read_block: usize,
}

/// Adds `docs` to `kb`, with a progress bar over their bytes on a terminal.
fn add_docs(
    kb: &mut Kb,
    enc: &Embedder,
    docs: &[PathBuf],
    r: &Reading,
    json_out: bool,
) -> Result<Added> {
    let total: u64 = docs
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    let bars = Bars::new(json_out);
    bars.start("embedding", total);
    let added = kb.add_documents(enc, docs, r.read_block, &|n| bars.advance(n, ""));
    bars.finish();
    Ok(added?)
}

/// The encoder for the kb in `kb`: `--embedder`, else the one `rag build` recorded.
fn kb_embedder(kb: &Path, given: Option<&Path>) -> Result<Embedder> {
    open_embedder(&kb::encoder_dir(kb, given)?)
}

fn open_embedder(dir: &Path) -> Result<Embedder> {
    Embedder::open(dir).with_context(|| format!("loading the encoder {}", dir.display()))
}

fn read_kb(dir: &Path) -> Result<Kb> {
    Kb::read(dir).with_context(|| format!("reading the knowledge base {}", dir.display()))
}

/// Seconds spent loading the encoder, reading and embedding the documents, and writing.
#[derive(Serialize)]
struct Timing {
    loading: f64,
    embedding: f64,
    writing: f64,
}

fn report_added(kb: &Kb, dir: &Path, a: &Added, t: &Timing, json_out: bool) -> Result<()> {
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "kb": dir.display().to_string(),
                "documents": kb.meta.documents.len(),
                "chunks": kb.len(),
                "added": a,
                "seconds": t,
                "chunks_per_second_embedding": a.chunks as f64 / t.embedding.max(1e-9),
            }))?
        );
    } else {
        for (doc, why) in &a.skipped {
            println!("skipped {doc}: {why}");
        }
        println!(
            "added {} documents ({} chunks, embedded in {:.1} s); {} now holds {} documents, {} chunks",
            a.documents,
            a.chunks,
            t.embedding,
            dir.display(),
            kb.meta.documents.len(),
            kb.len()
        );
    }
    Ok(())
}

/// Questions: one per line, or JSONL objects with a `question` field.
fn read_questions(path: &Path) -> Result<Vec<String>> {
    Ok(kb::read_questions(path)?)
}

fn print_hits(hits: &[Hit]) {
    for (i, h) in hits.iter().enumerate() {
        let one_line: String = h.text.split_whitespace().collect::<Vec<_>>().join(" ");
        let shown: String = one_line.chars().take(160).collect();
        println!(
            "{}. {:.3}  {} [{}..{}]\n   {}",
            i + 1,
            h.score,
            h.source,
            h.start,
            h.end,
            shown
        );
    }
}

pub fn run(c: RagCommand, json_out: bool) -> Result<()> {
    match c {
        RagCommand::Build(a) => {
            let precision: Precision = a
                .precision
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--precision {e}"))?;
            let t = Instant::now();
            let enc = open_embedder(&a.embedder)?;
            let loading = t.elapsed().as_secs_f64();
            let max = enc.identity().max_seq.saturating_sub(2);
            anyhow::ensure!(
                a.chunk_tokens >= 1 && a.chunk_tokens <= max,
                "--chunk-tokens {}: give 1 to {max} ({} reads at most {} tokens with its own two)",
                a.chunk_tokens,
                a.embedder.display(),
                enc.identity().max_seq
            );
            anyhow::ensure!(
                a.overlap < a.chunk_tokens,
                "--overlap {} must be smaller than --chunk-tokens {}",
                a.overlap,
                a.chunk_tokens
            );
            let mut kb = Kb::new(enc.identity(), a.chunk_tokens, a.overlap, precision);
            let t = Instant::now();
            let added = add_docs(&mut kb, &enc, &a.docs, &a.reading, json_out)?;
            let embedding = t.elapsed().as_secs_f64();
            anyhow::ensure!(
                !kb.is_empty(),
                "no document could be used: {}",
                added
                    .skipped
                    .iter()
                    .map(|(d, w)| format!("{d} ({w})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let t = Instant::now();
            kb.write(&a.output)
                .with_context(|| format!("writing {}", a.output.display()))?;
            kb::remember_encoder(&a.output, &a.embedder)?;
            let timing = Timing {
                loading,
                embedding,
                writing: t.elapsed().as_secs_f64(),
            };
            report_added(&kb, &a.output, &added, &timing, json_out)
        }
        RagCommand::Add {
            kb,
            embedder,
            docs,
            reading,
        } => {
            let mut k = read_kb(&kb)?;
            let t = Instant::now();
            let enc = kb_embedder(&kb, embedder.as_deref())?;
            let loading = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let added = add_docs(&mut k, &enc, &docs, &reading, json_out)?;
            let embedding = t.elapsed().as_secs_f64();
            let t = Instant::now();
            k.write(&kb)
                .with_context(|| format!("writing {}", kb.display()))?;
            let timing = Timing {
                loading,
                embedding,
                writing: t.elapsed().as_secs_f64(),
            };
            report_added(&k, &kb, &added, &timing, json_out)
        }
        RagCommand::Remove { kb, docs } => {
            let mut k = read_kb(&kb)?;
            let removed = k.remove_documents(&docs)?;
            k.write(&kb)
                .with_context(|| format!("writing {}", kb.display()))?;
            if json_out {
                println!(
                    "{}",
                    json!({"kb": kb.display().to_string(), "removed_chunks": removed, "chunks": k.len()})
                );
            } else {
                println!("removed {removed} chunks; {} chunks remain", k.len());
            }
            Ok(())
        }
        RagCommand::Query {
            kb,
            question,
            questions,
            embedder,
            k,
        } => {
            let base = read_kb(&kb)?;
            let enc = kb_embedder(&kb, embedder.as_deref())?;
            let asked = match (&question, &questions) {
                (Some(q), _) => vec![q.clone()],
                (None, Some(f)) => read_questions(f)?,
                (None, None) => anyhow::bail!("give a question or --questions FILE"),
            };
            let guard = base.meta.guard.as_ref();
            base.check_embedder(enc.identity())?;
            let mut results = Vec::with_capacity(asked.len());
            for q in &asked {
                let t0 = std::time::Instant::now();
                let v = enc.embed(q)?;
                let t1 = std::time::Instant::now();
                let hits = base.search(&v, k)?;
                let (embed_ms, search_ms) = (
                    (t1 - t0).as_secs_f64() * 1e3,
                    t1.elapsed().as_secs_f64() * 1e3,
                );
                let refused = guard.map(|g| hits.first().is_none_or(|h| h.score < g.threshold));
                if !json_out {
                    if asked.len() > 1 {
                        println!("Q: {q}");
                    }
                    print_hits(&hits);
                    if let (Some(g), Some(r)) = (guard, refused) {
                        println!(
                            "guard: best score {:.3} {} threshold {:.3}: {}",
                            hits.first().map_or(0.0, |h| h.score),
                            if r { "<" } else { ">=" },
                            g.threshold,
                            if r { "out of domain" } else { "in domain" }
                        );
                    }
                }
                results.push(json!({
                    "question": q,
                    "hits": hits,
                    "out_of_domain": refused,
                    "embed_ms": embed_ms,
                    "search_ms": search_ms,
                }));
            }
            if json_out {
                let threshold = guard.map(|g| g.threshold);
                let v = match question {
                    Some(_) => {
                        let mut one = results.remove(0);
                        one["guard_threshold"] = json!(threshold);
                        one
                    }
                    None => json!({"guard_threshold": threshold, "results": results}),
                };
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            Ok(())
        }
        RagCommand::Calibrate {
            kb,
            embedder,
            in_domain,
            out_of_domain,
            false_reject,
        } => {
            let mut k = read_kb(&kb)?;
            let enc = kb_embedder(&kb, embedder.as_deref())?;
            let ins = read_questions(&in_domain)?;
            let outs = read_questions(&out_of_domain)?;
            let g = k.calibrate(&enc, &ins, &outs, false_reject)?;
            k.write(&kb)
                .with_context(|| format!("writing {}", kb.display()))?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&json!({"guard": g}))?);
            } else {
                println!(
                    "ROC AUC {:.3}; threshold {:.3} passes {:.1}% of {} in-domain and refuses {:.1}% of {} out-of-domain questions (stored in {})",
                    g.auc,
                    g.threshold,
                    100.0 * g.in_domain_passed,
                    g.in_domain,
                    100.0 * g.out_of_domain_refused,
                    g.out_of_domain,
                    kb.display()
                );
            }
            Ok(())
        }
    }
}
