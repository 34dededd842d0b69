//! The file parsers of `edgepack-converters`, `-targets` and `-recipes`, one function per fuzz
//! target. Each returns `Ok` when its parser accepts the input and the parser's message when
//! it refuses it; it panics only where a property beyond "no panic" fails (an unpacked file
//! outside its destination, a manifest that does not read back).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use edgepack_converters::gguf::reader::GgufFile;
use edgepack_converters::import::gguf::import_gguf;
use edgepack_converters::import::hf::{import_folder, map_safetensors, read_tokenizer_files};
use edgepack_converters::model::stats::CalibStats;
use edgepack_converters::model::ModelConfig;
use edgepack_converters::transform::lora::load_adapter;
use edgepack_recipes::Recipe;
use edgepack_targets::bundle;
use edgepack_targets::Manifest;

thread_local! {
    /// One scratch folder per thread for the files the parsers read, removed at exit; in
    /// memory (/dev/shm) where there is such a folder, since every input is written to it.
    static SCRATCH: tempfile::TempDir = {
        let mut b = tempfile::Builder::new();
        b.prefix("edgepack-fuzz");
        let shm = Path::new("/dev/shm");
        if shm.is_dir() { b.tempdir_in(shm) } else { b.tempdir() }.expect("a scratch folder")
    };
}

/// A fresh, empty folder `name` in the scratch folder.
fn fresh_dir(name: &str) -> PathBuf {
    let dir = SCRATCH.with(|s| s.path().join(name));
    if dir.exists() {
        fs::remove_dir_all(&dir).expect("clear a scratch folder");
    }
    fs::create_dir_all(&dir).expect("create a scratch folder");
    dir
}

/// Writes `bytes` as `file` in a fresh scratch folder `name` and returns its path.
fn scratch_file(name: &str, file: &str, bytes: &[u8]) -> PathBuf {
    let p = fresh_dir(name).join(file);
    fs::write(&p, bytes).expect("write a scratch file");
    p
}

/// A safetensors file of F32 zeros with these tensors.
pub fn zeros_safetensors(tensors: &[(&str, &[usize])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let len = shape.iter().product::<usize>() * 4;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut h = serde_json::to_vec(&header).expect("a JSON header");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.resize(out.len() + offset, 0);
    out
}

/// A GGUF file: the header, metadata and tensor infos (`GgufFile::open`), then every
/// tensor's bytes, then the import into the internal layout (config, vocabulary, tokenizer).
pub fn gguf(data: &[u8]) -> Result<(), String> {
    let p = scratch_file("gguf", "model.gguf", data);
    let g = GgufFile::open(&p).map_err(|e| e.to_string())?;
    for t in &g.tensors {
        assert_eq!(
            g.data(t).len(),
            t.size,
            "{}: data of {}",
            p.display(),
            t.name
        );
    }
    // The import reads further (architecture, sizes, vocabulary); its refusal is not the
    // header's.
    let _ = import_gguf(&p);
    Ok(())
}

/// One safetensors file mapped as lazy tensors (the header and every tensor's extent).
pub fn safetensors(data: &[u8]) -> Result<(), String> {
    let p = scratch_file("safetensors", "model.safetensors", data);
    map_safetensors(&p).map(drop).map_err(|e| e.to_string())
}

/// `config.json`: the model configuration, then the import of a folder holding it and one
/// small weights file (so the tensor checks that follow from the configuration run too).
pub fn hf_config(data: &[u8]) -> Result<(), String> {
    let p = scratch_file("hf_config", "config.json", data);
    let dir = p.parent().expect("a folder");
    let weights = zeros_safetensors(&[("model.embed_tokens.weight", &[4, 8])]);
    fs::write(dir.join("model.safetensors"), weights).expect("write weights");
    let parsed = serde_json::from_slice(data)
        .map_err(|e| e.to_string())
        .and_then(|j| ModelConfig::from_hf_json(&j, &p).map_err(|e| e.to_string()));
    let _ = import_folder(dir);
    parsed.map(drop)
}

/// `tokenizer_config.json` (and the chat template in it) as the HF importer reads it.
pub fn tokenizer_config(data: &[u8]) -> Result<(), String> {
    let p = scratch_file("tokenizer_config", "tokenizer_config.json", data);
    let files = read_tokenizer_files(p.parent().expect("a folder")).map_err(|e| e.to_string())?;
    let _ = files.chat_template();
    Ok(())
}

/// A PEFT adapter folder: `adapter_config.json` from the input beside a small valid
/// `adapter_model.safetensors` (one q_proj pair of rank 2).
pub fn adapter_config(data: &[u8]) -> Result<(), String> {
    let p = scratch_file("adapter_config", "adapter_config.json", data);
    let dir = p.parent().expect("a folder");
    let module = "base_model.model.model.layers.0.self_attn.q_proj";
    let a = format!("{module}.lora_A.weight");
    let b = format!("{module}.lora_B.weight");
    let weights = zeros_safetensors(&[(&a, &[2, 8]), (&b, &[8, 2])]);
    fs::write(dir.join("adapter_model.safetensors"), weights).expect("write weights");
    load_adapter(dir).map(drop).map_err(|e| e.to_string())
}

/// A bundle's `manifest.json`; an accepted manifest must read back from its own bytes.
pub fn manifest(data: &[u8]) -> Result<(), String> {
    let path = Path::new("manifest.json");
    let m = Manifest::from_bytes(data, path).map_err(|e| e.to_string())?;
    let again = Manifest::from_bytes(&m.to_bytes(), path)
        .unwrap_or_else(|e| panic!("an accepted manifest does not read back: {e}"));
    assert_eq!(again, m, "the manifest changed on the way back");
    Ok(())
}

/// The zstd frame magic.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// `bundle::unpack` of an archive: the input is the tar (compressed here, so the fuzzer works
/// on the tar's structure) or, when it starts with zstd's magic, the .tar.zst itself. Nothing
/// may appear outside the destination folder, and nothing inside it may be a link.
pub fn unpack(data: &[u8]) -> Result<(), String> {
    let root = fresh_dir("unpack");
    let input = root.join("in");
    let dest = root.join("out");
    fs::create_dir_all(&input).expect("create the input folder");
    let archive = input.join("bundle.tar.zst");
    if data.starts_with(&ZSTD_MAGIC) {
        fs::write(&archive, data).expect("write the archive");
    } else {
        let compressed = zstd::encode_all(data, 1).expect("compress");
        fs::write(&archive, compressed).expect("write the archive");
    }
    let res = bundle::unpack(&archive, &dest);
    // Everything under root is the input folder with its one file, and the destination.
    for e in fs::read_dir(&root).expect("list the scratch folder") {
        let name = e.expect("an entry").file_name();
        assert!(
            name == "in" || name == "out",
            "unpack wrote {name:?} outside its destination"
        );
    }
    let inputs: Vec<_> = fs::read_dir(&input)
        .expect("list the input folder")
        .map(|e| e.expect("an entry").file_name())
        .collect();
    assert_eq!(
        inputs,
        ["bundle.tar.zst"],
        "unpack wrote beside its archive"
    );
    if dest.exists() {
        check_tree(&dest);
    }
    match res {
        Ok(top) => {
            assert!(
                top.starts_with(&dest),
                "unpack returned {} outside {}",
                top.display(),
                dest.display()
            );
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// No links anywhere below `dir`.
fn check_tree(dir: &Path) {
    for e in fs::read_dir(dir).expect("list an unpacked folder") {
        let e = e.expect("an entry");
        let ty = e.file_type().expect("a file type");
        assert!(
            !ty.is_symlink(),
            "unpack left a link at {}",
            e.path().display()
        );
        if ty.is_dir() {
            check_tree(&e.path());
        }
    }
}

/// The repository's `recipes/` folder, where the shipped recipes' relative paths resolve.
fn recipes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|a| a.join("recipes"))
        .find(|r| r.join("smollm2-assistant.toml").is_file())
        .expect("the repository's recipes folder")
}

/// A recipe TOML file, checked as if it sat beside the shipped ones (it is never written).
pub fn recipe(data: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(data).map_err(|e| e.to_string())?;
    let file = recipes_dir().join("fuzz-input.toml");
    Recipe::parse(text, &file)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A calibration statistics file (`model::stats`).
pub fn stats(data: &[u8]) -> Result<(), String> {
    let p = scratch_file("stats", "stats.safetensors", data);
    CalibStats::read(&p).map(drop).map_err(|e| e.to_string())
}

/// Every file of `dir` (sorted), for running a harness over a corpus folder.
pub fn corpus(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.expect("an entry").path()).collect(),
        Err(_) => return Vec::new(),
    };
    files.sort();
    files
        .into_iter()
        .filter(|p| p.is_file())
        .map(|p| {
            let mut bytes = Vec::new();
            fs::File::open(&p)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, bytes)
        })
        .collect()
}
