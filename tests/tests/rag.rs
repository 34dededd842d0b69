//! `edgepack rag`: a knowledge base of the Tern T3 documents whose chunk embeddings equal
//! transformers' (sentence-transformers' pooling) and whose search equals numpy's exact search
//! over them; a guard calibrated on the held-out Tern questions against general ones; and
//! bad documents, foreign encoders (in queries and bundles) and corrupt files refused by
//! name.

use std::path::{Path, PathBuf};

use edgepack_tests::*;
use serde_json::Value;

fn tern(file: &str) -> PathBuf {
    root().join("recipes/data/tern-t3").join(file)
}

/// Runs a command that must fail; returns its stderr.
fn refused(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("spawn edgepack");
    assert!(!out.status.success(), "{cmd:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `rag query KB --embedder ENC "What does E1 mean?"`.
fn query_e1(kb: &Path, encoder: &Path) -> std::process::Command {
    let mut c = edgepack();
    c.args(["rag", "query"])
        .arg(kb)
        .arg("--embedder")
        .arg(encoder)
        .arg("What does E1 mean?");
    c
}

fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).expect("--json output")
}

/// The held-out Tern questions (other wordings of the manual's facts).
fn heldout_questions() -> Vec<String> {
    std::fs::read_to_string(tern("heldout.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["question"].as_str().unwrap().to_string()
        })
        .collect()
}

/// The Tern manual and support conversations in chunks of `tokens` (a quarter overlapping).
fn build(kb: &Path, precision: &str, tokens: usize) -> Value {
    json_of(&run_ok(
        edgepack()
            .args(["rag", "build"])
            .arg(tern("manual.txt"))
            .arg(tern("conversations.txt"))
            .arg("--embedder")
            .arg(minilm_dir())
            .args(["--chunk-tokens", &tokens.to_string()])
            .args([
                "--overlap",
                &(tokens / 4).to_string(),
                "--precision",
                precision,
            ])
            .arg("-o")
            .arg(kb)
            .arg("--json"),
    ))
}

/// Per question, the chunk indices `rag query --questions` returns, best first.
fn our_top(kb: &Path, questions: &Path, k: usize) -> Vec<Vec<u64>> {
    let v = json_of(&run_ok(
        edgepack()
            .args(["rag", "query"])
            .arg(kb)
            .arg("--embedder")
            .arg(minilm_dir())
            .arg("--questions")
            .arg(questions)
            .args(["-k", &k.to_string(), "--json"]),
    ));
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r["hits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h["chunk"].as_u64().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn kb_embeddings_equal_transformers_and_search_equals_numpy_exact_search() {
    let work = tempfile::tempdir().unwrap();
    let questions = heldout_questions();
    let qfile = work.path().join("questions.txt");
    std::fs::write(&qfile, questions.join("\n") + "\n").unwrap();
    let qjson = work.path().join("questions.json");
    std::fs::write(&qjson, serde_json::to_string(&questions).unwrap()).unwrap();
    let k = 5;

    let f32_kb = work.path().join("kb-f32");
    // Small chunks make many close competitors for each question.
    let built = build(&f32_kb, "f32", 16);
    let n = built["chunks"].as_u64().unwrap();
    assert!(n > 120, "{built}");
    let r = oracle(
        "kb_ref.py",
        &[
            &minilm_dir(),
            &f32_kb.join("kb.safetensors"),
            &qjson,
            &k.to_string(),
        ],
    );
    assert_eq!(r["chunks"].as_u64(), Some(n));
    let min_cos = r["min_cosine"].as_f64().unwrap();
    eprintln!("smallest cosine to transformers over {n} chunks: {min_cos:.6}");
    assert!(
        min_cos >= 0.999,
        "smallest cosine to transformers: {min_cos}"
    );

    // numpy's best K + 1 per question; a chunk may trade places with the next only when
    // their reference scores tie within float noise.
    let reference: Vec<(Vec<u64>, Vec<f64>)> = r["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let idx = serde_json::from_value(t["indices"].clone()).unwrap();
            let s = serde_json::from_value(t["scores"].clone()).unwrap();
            (idx, s)
        })
        .collect();
    let agree = |ours: &[Vec<u64>]| -> (usize, usize, Vec<String>) {
        let (mut found, mut total, mut misses) = (0, 0, Vec::new());
        for (qi, (ours, (idx, s))) in ours.iter().zip(&reference).enumerate() {
            for (pos, want) in idx[..k].iter().enumerate() {
                total += 1;
                let tie_at_edge = pos == k - 1 && (s[k - 1] - s[k]).abs() < 1e-4;
                if ours.contains(want) || (tie_at_edge && ours.contains(&idx[k])) {
                    found += 1;
                } else {
                    misses.push(format!("q{qi} pos {pos}: {want} ({:.4})", s[pos]));
                }
            }
        }
        (found, total, misses)
    };
    let (found, total, misses) = agree(&our_top(&f32_kb, &qfile, k));
    assert_eq!(found, total, "f32 index misses numpy's top-{k}: {misses:?}");

    // int8 vectors (one scale each): recall@5 against the same reference.
    let i8_kb = work.path().join("kb-int8");
    build(&i8_kb, "int8", 16);
    let (found, total, misses) = agree(&our_top(&i8_kb, &qfile, k));
    let recall = found as f64 / total as f64;
    eprintln!(
        "int8 recall@{k}: {recall:.4} over {} questions, {n} chunks",
        questions.len()
    );
    assert!(recall >= 0.98, "int8 recall@{k} {recall}: {misses:?}");
}

#[test]
fn guard_calibrated_on_tern_questions_refuses_general_ones() {
    let work = tempfile::tempdir().unwrap();
    let kb = work.path().join("kb");
    build(&kb, "int8", 128);
    let ins = work.path().join("in.txt");
    std::fs::write(&ins, heldout_questions().join("\n") + "\n").unwrap();
    let v = json_of(&run_ok(
        edgepack()
            .args(["rag", "calibrate"])
            .arg(&kb)
            .arg("--embedder")
            .arg(minilm_dir())
            .arg("--in-domain")
            .arg(&ins)
            .arg("--out-of-domain")
            .arg(tern("out_of_domain.txt"))
            .args(["--false-reject", "0.05", "--json"]),
    ));
    let g = &v["guard"];
    eprintln!("guard: {g}");
    // Measured: AUC 1.000, 95.3% of the Tern questions pass, 100% of the general ones refused.
    assert!(g["auc"].as_f64().unwrap() > 0.97, "{g}");
    assert!(g["in_domain_passed"].as_f64().unwrap() >= 0.95, "{g}");
    assert!(g["out_of_domain_refused"].as_f64().unwrap() >= 0.9, "{g}");
    // The threshold is stored: a query says which side a question falls on.
    let ask = |q: &str| -> Value {
        json_of(&run_ok(
            edgepack()
                .args(["rag", "query"])
                .arg(&kb)
                .arg("--embedder")
                .arg(minilm_dir())
                .arg(q)
                .arg("--json"),
        ))
    };
    let general = ask("Who painted the Mona Lisa?");
    assert_eq!(general["out_of_domain"], true, "{general}");
    let tern_q = ask("What does error code E1 mean on the Tern T3 thermostat?");
    assert_eq!(tern_q["out_of_domain"], false, "{tern_q}");
    let best = &tern_q["hits"][0];
    assert!(
        best["text"].as_str().unwrap().contains("E1"),
        "best passage: {best}"
    );
    assert!(best["source"].as_str().unwrap().ends_with("manual.txt"));
}

#[test]
fn documents_are_added_and_removed_without_re_embedding_the_rest() {
    let work = tempfile::tempdir().unwrap();
    let kb = work.path().join("kb");
    json_of(&run_ok(
        edgepack()
            .args(["rag", "build"])
            .arg(tern("manual.txt"))
            .arg("--embedder")
            .arg(minilm_dir())
            .arg("-o")
            .arg(&kb)
            .arg("--json"),
    ));
    let before = std::fs::read(kb.join("kb.safetensors")).unwrap();
    // `rag build` recorded its encoder: add and query find it without --embedder.
    let recorded = std::fs::read_to_string(kb.join("encoder.path")).unwrap();
    assert_eq!(
        Path::new(recorded.trim_end()),
        std::path::absolute(minilm_dir()).unwrap()
    );
    let add = json_of(&run_ok(
        edgepack()
            .args(["rag", "add"])
            .arg(&kb)
            .arg(tern("conversations.txt"))
            .arg(tern("manual.txt"))
            .arg("--json"),
    ));
    assert_eq!(add["added"]["documents"], 1, "{add}");
    assert_eq!(
        add["added"]["skipped"][0][1],
        "already in the knowledge base"
    );
    let manual = tern("manual.txt").display().to_string();
    let rm = json_of(&run_ok(
        edgepack()
            .args(["rag", "remove"])
            .arg(&kb)
            .arg(tern("conversations.txt"))
            .arg("--json"),
    ));
    assert!(rm["removed_chunks"].as_u64().unwrap() > 0, "{rm}");
    // Back to the manual alone: the same vectors and texts as the first build.
    let after = Value::from(std::fs::read(kb.join("kb.safetensors")).unwrap().len());
    assert_eq!(after, Value::from(before.len()));
    assert!(std::fs::read(kb.join("kb.safetensors")).unwrap() == before);
    let msg = refused(
        edgepack()
            .args(["rag", "remove"])
            .arg(&kb)
            .arg("nothing.md"),
    );
    assert!(
        msg.contains("`nothing.md` is not in the knowledge base") && msg.contains(&manual),
        "{msg}"
    );
    let q = json_of(&run_ok(
        edgepack()
            .args(["rag", "query"])
            .arg(&kb)
            .args(["What does E1 mean?", "--json"]),
    ));
    assert_eq!(q["hits"][0]["source"], Value::from(manual.clone()), "{q}");
    // Without the record, --embedder is asked for.
    std::fs::remove_file(kb.join("encoder.path")).unwrap();
    let msg = refused(
        edgepack()
            .args(["rag", "query"])
            .arg(&kb)
            .arg("What does E1 mean?"),
    );
    assert!(
        msg.contains("give --embedder") && msg.contains("encoder.path"),
        "{msg}"
    );
}

#[test]
fn documents_read_in_small_blocks_give_the_kb_of_one_read_and_late_bad_bytes_drop_the_whole_document(
) {
    let work = tempfile::tempdir().unwrap();
    let build = |kb: &Path, docs: &[&Path], block: Option<usize>| {
        let mut c = edgepack();
        c.args(["rag", "build"])
            .args(docs)
            .arg("--embedder")
            .arg(minilm_dir());
        if let Some(b) = block {
            c.args(["--read-block", &b.to_string()]);
        }
        json_of(&run_ok(c.arg("-o").arg(kb).arg("--json")))
    };
    // The manual is 5,978 bytes: 1 KiB blocks cut it at six line breaks.
    let manual = tern("manual.txt");
    let (whole, blocks) = (work.path().join("whole"), work.path().join("blocks"));
    let a = build(&whole, &[&manual], None);
    let b = build(&blocks, &[&manual], Some(1024));
    assert_eq!(a["chunks"], b["chunks"]);
    assert!(
        std::fs::read(whole.join("kb.safetensors")).unwrap()
            == std::fs::read(blocks.join("kb.safetensors")).unwrap(),
        "the same knowledge base, byte for byte"
    );

    // A NUL or a byte that is not UTF-8 in a later block: the documents' earlier blocks were
    // embedded already, and none of their chunks stay.
    let text = std::fs::read(&manual).unwrap();
    let mut nul = text.clone();
    nul.extend_from_slice(b"\n\0 the end\n");
    let mut latin1 = text.clone();
    latin1.extend_from_slice(b"\ncaf\xe9\n");
    let (nul_doc, latin1_doc) = (
        work.path().join("late-nul.txt"),
        work.path().join("late-latin1.txt"),
    );
    std::fs::write(&nul_doc, nul).unwrap();
    std::fs::write(&latin1_doc, latin1).unwrap();
    let mixed = work.path().join("mixed");
    let v = build(&mixed, &[&nul_doc, &manual, &latin1_doc], Some(1024));
    assert_eq!(v["documents"], 1, "{v}");
    assert!(
        std::fs::read(mixed.join("kb.safetensors")).unwrap()
            == std::fs::read(whole.join("kb.safetensors")).unwrap(),
        "the manual alone, as if the bad documents had not been given"
    );
    let skipped = v["added"]["skipped"].to_string();
    assert!(
        skipped.contains("late-nul.txt\",\"binary")
            && skipped.contains("late-latin1.txt\",\"not UTF-8"),
        "{skipped}"
    );
    let msg = refused(
        edgepack()
            .args(["rag", "build"])
            .arg(&manual)
            .arg("--embedder")
            .arg(minilm_dir())
            .args(["--read-block", "100", "-o"])
            .arg(work.path().join("small")),
    );
    assert!(msg.contains("at least 1024 bytes, not 100"), "{msg}");
}

#[test]
fn bad_documents_foreign_encoders_and_corrupt_kbs_are_refused_by_name() {
    let work = tempfile::tempdir().unwrap();
    let bin = work.path().join("blob.bin");
    std::fs::write(&bin, b"\x7fELF\0\0\x01binary").unwrap();
    let empty = work.path().join("empty.md");
    std::fs::write(&empty, " \n\n").unwrap();
    // Only bad documents: nothing is written, each is named.
    let kb = work.path().join("kb");
    let msg = refused(
        edgepack()
            .args(["rag", "build"])
            .arg(&bin)
            .arg(&empty)
            .arg("--embedder")
            .arg(minilm_dir())
            .arg("-o")
            .arg(&kb),
    );
    assert!(
        msg.contains("blob.bin (binary") && msg.contains("empty.md (empty)"),
        "{msg}"
    );
    assert!(!kb.join("kb.safetensors").exists());

    // With a good one they are skipped and counted.
    let v = json_of(&run_ok(
        edgepack()
            .args(["rag", "build"])
            .arg(&bin)
            .arg(tern("manual.txt"))
            .arg("--embedder")
            .arg(minilm_dir())
            .arg("-o")
            .arg(&kb)
            .arg("--json"),
    ));
    assert_eq!(v["documents"], 1);
    assert_eq!(v["added"]["skipped"].as_array().unwrap().len(), 1);

    // Another encoder's weights: refused with both identities.
    let other = work.path().join("other-encoder");
    std::fs::create_dir(&other).unwrap();
    for e in std::fs::read_dir(minilm_dir()).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), other.join(e.file_name())).unwrap();
        }
    }
    let st = other.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&st, bytes).unwrap();
    let msg = refused(&mut query_e1(&kb, &other));
    assert!(
        msg.contains("built with the encoder") && msg.contains("not other-encoder"),
        "{msg}"
    );
    // And `bundle --kb` refuses the pair before it exports anything, given by --embedder
    // or recorded beside the kb.
    std::fs::write(
        kb.join("encoder.path"),
        format!("{}\n", std::path::absolute(&other).unwrap().display()),
    )
    .unwrap();
    let msg = refused(
        edgepack()
            .arg("bundle")
            .arg(smollm2_gguf())
            .args(["--target", "imx95", "--quant", "Q8_0", "--kb"])
            .arg(&kb)
            .arg("-o")
            .arg(work.path().join("bundles")),
    );
    assert!(
        msg.contains("built with the encoder") && msg.contains("not other-encoder"),
        "{msg}"
    );
    let out = work.path().join("bundles");
    let msg = refused(
        edgepack()
            .arg("bundle")
            .arg(smollm2_gguf())
            .args(["--target", "imx95", "--quant", "Q8_0", "--kb"])
            .arg(&kb)
            .arg("--embedder")
            .arg(&other)
            .arg("-o")
            .arg(&out),
    );
    assert!(
        msg.contains("--kb")
            && msg.contains("built with the encoder")
            && msg.contains("not other-encoder"),
        "{msg}"
    );
    assert!(!out.exists(), "nothing is written for a refused kb");

    // A cut file, and a file that is not a knowledge base.
    let file = kb.join("kb.safetensors");
    let whole = std::fs::read(&file).unwrap();
    std::fs::write(&file, &whole[..whole.len() / 2]).unwrap();
    let msg = refused(&mut query_e1(&kb, &minilm_dir()));
    assert!(msg.contains("kb.safetensors"), "{msg}");
    let msg = refused(&mut query_e1(
        &minilm_dir().join("model.safetensors"),
        &minilm_dir(),
    ));
    assert!(
        msg.contains("edgepack_kb: missing: not an edgepack knowledge base"),
        "{msg}"
    );
}
