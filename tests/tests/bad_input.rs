//! Bad input gets a clear error naming the file and the field, a non-zero exit, and nothing
//! lost: no output or temporary file is left, and inputs are untouched.

use std::path::Path;

use edgepack_tests::fixtures::{write_tiny, Tiny};
use edgepack_tests::*;

/// A private copy of a tiny model that a test may damage.
fn damaged_copy(work: &Path, name: &str) -> std::path::PathBuf {
    let dir = work.join(name);
    write_tiny(&dir, &Tiny::llama(), &smollm2_hf(), 11);
    dir
}

/// `edgepack export gguf INPUT --quant Q8_0 -o OUT`, which must fail: its stderr.
fn export_q8_err(input: &Path, out: &Path) -> String {
    run_err(
        edgepack()
            .args(["export", "gguf"])
            .arg(input)
            .args(["--quant", "Q8_0", "-o"])
            .arg(out),
    )
}

fn assert_nothing_written(dir: &Path, out_name: &str) {
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(out_name) || n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

/// A tiny llama exported to a Q8_0 GGUF at `work/name`, returned with its bytes.
fn tiny_gguf(work: &Path, name: &str) -> (std::path::PathBuf, Vec<u8>) {
    let g = work.join(name);
    export_gguf(&tiny("llama-tied-f32", Tiny::llama()), "Q8_0", &g);
    let bytes = std::fs::read(&g).unwrap();
    (g, bytes)
}

/// Where GGUF string `s` is stored (its u64 length, then its bytes) in `gguf`: the offset just
/// past it.
fn after_gguf_string(gguf: &[u8], s: &str) -> usize {
    let mut pat = (s.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(s.as_bytes());
    let at = gguf
        .windows(pat.len())
        .position(|w| w == pat)
        .unwrap_or_else(|| panic!("{s} is not in the file"));
    at + pat.len()
}

/// Overwrites the UINT32 value of metadata key `key` in place.
fn set_kv_u32(gguf: &mut [u8], key: &str, value: u32) {
    let at = after_gguf_string(gguf, key);
    assert_eq!(
        gguf[at..at + 4],
        4u32.to_le_bytes(),
        "{key} is not a UINT32"
    );
    gguf[at + 4..at + 8].copy_from_slice(&value.to_le_bytes());
}

/// Overwrites the ggml type id in tensor `name`'s info in place.
fn set_tensor_type(gguf: &mut [u8], name: &str, type_id: u32) {
    let at = after_gguf_string(gguf, name);
    let n_dims = u32::from_le_bytes(gguf[at..at + 4].try_into().unwrap()) as usize;
    let ty = at + 4 + 8 * n_dims;
    gguf[ty..ty + 4].copy_from_slice(&type_id.to_le_bytes());
}

#[test]
fn gguf_with_a_tensor_type_changed_is_refused_by_inspect_and_export() {
    let work = tempfile::tempdir().unwrap();
    let (_, mut bytes) = tiny_gguf(work.path(), "m.gguf");
    // Q8_0 (8) -> Q4_0 (2): the header stays well formed, the data layout no longer adds up.
    set_tensor_type(&mut bytes, "blk.0.attn_q.weight", 2);
    let bad = work.path().join("type.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    let err = run_err(edgepack().arg("inspect").arg(&bad));
    assert!(err.contains("type.gguf: "), "{err}");
    assert!(err.contains(".offset: data offset"), "{err}");
    assert!(err.contains("blk.0.attn_q.weight before it (Q4_0"), "{err}");
    let out = work.path().join("out.gguf");
    let err = export_q8_err(&bad, &out);
    assert!(err.contains("blk.0.attn_q.weight before it (Q4_0"), "{err}");
    assert_nothing_written(work.path(), "out.gguf");
    set_tensor_type(&mut bytes, "blk.0.attn_q.weight", 200);
    std::fs::write(&bad, &bytes).unwrap();
    let err = run_err(edgepack().arg("inspect").arg(&bad));
    assert!(
        err.contains("type.gguf: blk.0.attn_q.weight.type: type id 200 is not a ggml type"),
        "{err}"
    );
}

#[test]
fn gguf_with_zero_kv_heads_is_refused_naming_the_file_and_key() {
    let work = tempfile::tempdir().unwrap();
    let (_, mut bytes) = tiny_gguf(work.path(), "m.gguf");
    set_kv_u32(&mut bytes, "llama.attention.head_count_kv", 0);
    let bad = work.path().join("kv0.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    let err = run_err(edgepack().arg("inspect").arg(&bad));
    assert!(
        err.contains("kv0.gguf: llama.attention.head_count_kv: is 0"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn gguf_claiming_more_layers_than_it_holds_is_refused_before_allocating() {
    let work = tempfile::tempdir().unwrap();
    let (_, mut bytes) = tiny_gguf(work.path(), "m.gguf");
    set_kv_u32(&mut bytes, "llama.block_count", i32::MAX as u32);
    let bad = work.path().join("layers.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    let err = run_err(edgepack().arg("inspect").arg(&bad));
    assert!(err.contains("layers.gguf: llama.block_count:"), "{err}");
    assert!(err.contains("2147483647 layers need"), "{err}");
}

#[test]
fn config_claiming_more_layers_than_the_safetensors_hold_is_refused_before_allocating() {
    let work = tempfile::tempdir().unwrap();
    let m = damaged_copy(work.path(), "m");
    let cfg = m.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "\"num_hidden_layers\": 2",
        "\"num_hidden_layers\": 1000000000",
    );
    std::fs::write(&cfg, text).unwrap();
    let err = run_err(edgepack().arg("inspect").arg(&m));
    assert!(err.contains("config.json: num_hidden_layers:"), "{err}");
    assert!(err.contains("1000000000 layers need"), "{err}");
}

#[test]
fn config_fields_of_the_wrong_json_type_are_refused_not_defaulted() {
    let work = tempfile::tempdir().unwrap();
    let m = damaged_copy(work.path(), "m");
    let cfg = m.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"rope_theta\": 10000.0", "\"rope_theta\": \"100000\"")
        .replace(
            "\"max_position_embeddings\": 2048",
            "\"max_position_embeddings\": \"8192\"",
        );
    assert!(text.contains("\"100000\"") && text.contains("\"8192\""));
    std::fs::write(&cfg, text).unwrap();
    let out = work.path().join("out.gguf");
    let err = export_q8_err(&m, &out);
    assert!(err.contains("config.json: "), "{err}");
    assert!(
        err.contains("rope_theta: must be a number, found \"100000\"")
            || err.contains("max_position_embeddings: must be a non-negative integer"),
        "{err}"
    );
    assert_nothing_written(work.path(), "out.gguf");
}

#[test]
fn safetensors_index_pointing_outside_the_model_folder_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let m = damaged_copy(work.path(), "m");
    std::fs::write(work.path().join("x.safetensors"), b"not read").unwrap();
    for shard in ["/etc/passwd", "../x.safetensors", "sub/../../x.safetensors"] {
        let index = serde_json::json!({
            "metadata": {},
            "weight_map": {"model.embed_tokens.weight": shard},
        });
        std::fs::write(
            m.join("model.safetensors.index.json"),
            serde_json::to_string(&index).unwrap(),
        )
        .unwrap();
        let err = run_err(edgepack().arg("inspect").arg(&m));
        assert!(
            err.contains("model.safetensors.index.json: weight_map.model.embed_tokens.weight:"),
            "{shard}: {err}"
        );
        assert!(
            err.contains(&format!("shard `{shard}` is not a plain file name")),
            "{shard}: {err}"
        );
    }
}

#[test]
fn truncated_safetensors_is_refused_naming_the_file_and_nothing_is_written() {
    let work = tempfile::tempdir().unwrap();
    let m = damaged_copy(work.path(), "m");
    let st = m.join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&st).unwrap();
    f.set_len(len - 1000).unwrap();
    let out = work.path().join("out.gguf");
    let err = export_q8_err(&m, &out);
    assert!(err.contains("model.safetensors"), "{err}");
    assert_nothing_written(work.path(), "out.gguf");
}

#[test]
fn truncated_and_corrupt_gguf_are_refused_naming_the_field() {
    let work = tempfile::tempdir().unwrap();
    let m = tiny("llama-tied-f32", Tiny::llama());
    let g = work.path().join("m.gguf");
    export_gguf(&m, "Q8_0", &g);
    let full = std::fs::read(&g).unwrap();
    let cut = work.path().join("cut.gguf");
    std::fs::write(&cut, &full[..full.len() - 4096]).unwrap();
    let err = run_err(edgepack().arg("inspect").arg(&cut));
    assert!(
        err.contains("cut.gguf") && err.contains("truncated"),
        "{err}"
    );
    let head = work.path().join("head.gguf");
    std::fs::write(&head, &full[..100]).unwrap();
    let err = run_err(edgepack().arg("inspect").arg(&head));
    assert!(
        err.contains("head.gguf") && err.contains("truncated"),
        "{err}"
    );
    let mut bad = full.clone();
    bad[0] = b'X';
    let badp = work.path().join("bad.gguf");
    std::fs::write(&badp, &bad).unwrap();
    let err = run_err(
        edgepack()
            .args(["export", "hf"])
            .arg(&badp)
            .arg("-o")
            .arg(work.path().join("o")),
    );
    assert!(err.contains("bad.gguf") && err.contains("magic"), "{err}");
    assert!(!work.path().join("o").exists());
}

#[test]
fn unknown_architecture_is_refused_naming_config_json() {
    let work = tempfile::tempdir().unwrap();
    let m = damaged_copy(work.path(), "m");
    let cfg = m.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("LlamaForCausalLM", "GPTNeoXForCausalLM");
    std::fs::write(&cfg, text).unwrap();
    let err = run_err(edgepack().arg("inspect").arg(&m));
    assert!(
        err.contains("config.json") && err.contains("architectures"),
        "{err}"
    );
    assert!(err.contains("GPTNeoXForCausalLM"), "{err}");
}

#[test]
fn missing_tokenizer_is_refused_before_anything_is_written() {
    let work = tempfile::tempdir().unwrap();
    let m = damaged_copy(work.path(), "m");
    std::fs::remove_file(m.join("tokenizer.json")).unwrap();
    let out = work.path().join("out.gguf");
    let err = run_err(
        edgepack()
            .args(["export", "gguf"])
            .arg(&m)
            .arg("-o")
            .arg(&out),
    );
    assert!(
        err.contains("tokenizer.json") && err.contains("missing"),
        "{err}"
    );
    assert_nothing_written(work.path(), "out.gguf");
}

#[test]
fn tensor_with_the_wrong_shape_is_refused_naming_the_tensor() {
    let work = tempfile::tempdir().unwrap();
    let m = damaged_copy(work.path(), "m");
    let cfg = m.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"intermediate_size\": 512", "\"intermediate_size\": 640");
    std::fs::write(&cfg, text).unwrap();
    let err = run_err(edgepack().arg("inspect").arg(&m));
    assert!(err.contains("mlp.") && err.contains("shape"), "{err}");
}

#[test]
fn output_equal_to_an_input_is_refused_and_the_input_is_untouched() {
    let work = tempfile::tempdir().unwrap();
    let m = tiny("llama-tied-f32", Tiny::llama());
    let g = work.path().join("m.gguf");
    export_gguf(&m, "Q8_0", &g);
    let before = std::fs::read(&g).unwrap();
    let err = run_err(
        edgepack()
            .args(["export", "gguf"])
            .arg(&g)
            .args(["--quant", "Q4_0", "-o"])
            .arg(&g),
    );
    assert!(err.contains("output path is an input"), "{err}");
    assert_eq!(std::fs::read(&g).unwrap(), before);
    let err = run_err(edgepack().args(["export", "hf"]).arg(&m).arg("-o").arg(&m));
    assert!(err.contains("output path is an input"), "{err}");
    assert!(m.join("model.safetensors").is_file());
}

#[test]
fn existing_non_empty_output_folder_is_never_replaced() {
    let work = tempfile::tempdir().unwrap();
    let m = tiny("llama-tied-f32", Tiny::llama());
    let out = work.path().join("mine");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), b"keep me").unwrap();
    let err = run_err(
        edgepack()
            .args(["export", "hf"])
            .arg(&m)
            .arg("-o")
            .arg(&out),
    );
    assert!(err.contains("not an empty folder"), "{err}");
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"keep me");
}

/// A pid no process has: the kernel's pid_max is above it only when nothing runs there.
fn dead_pid() -> u32 {
    (3_000_000..4_000_000)
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .unwrap()
}

#[test]
fn an_export_stopped_by_sigterm_leaves_no_temporary_and_the_next_run_sweeps_dead_ones() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out.gguf");
    // SmolLM2 to F32: about 540 MB to write, time enough to be stopped halfway.
    let mut child = edgepack()
        .args(["export", "gguf"])
        .arg(smollm2_gguf())
        .args(["--quant", "F32", "-o"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let tmp = work.path().join(format!(".out.gguf.{}.tmp", child.id()));
    let t0 = Instant::now();
    while std::fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0) < (1 << 20) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no temporary appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the export ended first"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    send_signal(child.id(), "TERM");
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "{status:?} {:?}",
        status.signal()
    );
    assert_nothing_written(work.path(), "out.gguf");

    // What a SIGKILL leaves (no handler runs) is swept by the next run for that output.
    let stale = work.path().join(format!(".out.gguf.{}.tmp", dead_pid()));
    std::fs::write(&stale, b"half a model").unwrap();
    let live = work
        .path()
        .join(format!(".out.gguf.{}.tmp", std::process::id()));
    std::fs::write(&live, b"a running export's").unwrap();
    export_gguf(&tiny("llama-tied-f32", Tiny::llama()), "Q8_0", &out);
    assert!(!stale.exists(), "the dead process's temporary was removed");
    assert!(live.exists(), "a live process's temporary is left alone");
    assert!(out.is_file());
}

/// `kill -SIG pid` through the system's kill, so the test needs no libc binding.
fn send_signal(pid: u32, sig: &str) {
    run_ok(
        std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string()),
    );
}
