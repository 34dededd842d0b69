//! Bundles through the real binary, checked by peers: GNU tar (`tar --zstd`) extracts the
//! archive, Python's hashlib recomputes every listed SHA-256, gguf-py reads the model inside,
//! and OpenSSL checks the ed25519 signature and reads the PEM keys. The same inputs give a
//! byte-identical archive; `edgepack verify` refuses a flipped byte, a missing file, an extra
//! file, a wrong key and a tampered manifest, naming the file, and hostile archives and
//! manifests (an unlisted entry, a FIFO, a link to /dev/zero, a huge manifest, a path with a
//! newline) without writing or reading more than a bundle's own bytes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use edgepack_tests::*;
use serde_json::Value;

const BUNDLE: &str = "smollm2-imx95";

/// A signed Q8_0 SmolLM2 bundle for imx95 and its key pair, built once per test run:
/// `<dir>/key.pem`, `<dir>/key.pub.pem`, `<dir>/out/smollm2-imx95{,.tar.zst}`.
fn signed_bundle() -> PathBuf {
    let dir = shared_work_dir().join("bundle-smollm2-imx95");
    fixtures::build_once(&dir, |tmp| {
        fs::create_dir_all(tmp).unwrap();
        run_ok(edgepack().args(["keygen", "-o"]).arg(tmp.join("key")));
        make_bundle(&tmp.join("key.pem"), &tmp.join("out"));
    })
}

fn make_bundle(key: &Path, out: &Path) {
    run_ok(
        edgepack()
            .arg("bundle")
            .arg(smollm2_gguf())
            .args(["--target", "imx95", "--format", "gguf", "--quant", "Q8_0"])
            .args(["--name", "smollm2", "--sign"])
            .arg(key)
            .arg("-o")
            .arg(out),
    );
}

/// A private copy of the bundle folder to tamper with.
fn copy_of_bundle() -> (tempfile::TempDir, PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let src = signed_bundle().join("out").join(BUNDLE);
    let dst = work.path().join(BUNDLE);
    copy_dir(&src, &dst);
    (work, dst)
}

fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            fs::copy(e.path(), &to).unwrap();
        }
    }
}

fn public_key() -> PathBuf {
    signed_bundle().join("key.pub.pem")
}

fn verify_json(path: &Path, key: Option<&Path>) -> Value {
    let mut cmd = edgepack();
    cmd.arg("verify").arg(path).arg("--json");
    if let Some(k) = key {
        cmd.arg("--key").arg(k);
    }
    serde_json::from_slice(&run_ok(&mut cmd).stdout).unwrap()
}

fn verify_err(path: &Path, key: Option<&Path>) -> String {
    let mut cmd = edgepack();
    cmd.arg("verify").arg(path);
    if let Some(k) = key {
        cmd.arg("--key").arg(k);
    }
    run_err(&mut cmd)
}

fn run_tool(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} could not start ({e}); install it (see .ci/run)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn manifest(dir: &Path) -> Value {
    serde_json::from_slice(&fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn bundling_the_same_inputs_twice_gives_a_byte_identical_archive() {
    let first = signed_bundle();
    let work = tempfile::tempdir().unwrap();
    make_bundle(&first.join("key.pem"), work.path());
    let a = fs::read(first.join("out").join(format!("{BUNDLE}.tar.zst"))).unwrap();
    let b = fs::read(work.path().join(format!("{BUNDLE}.tar.zst"))).unwrap();
    assert!(a.len() > 100 << 20, "archive of {} bytes", a.len());
    assert!(a == b, "two bundles of the same inputs differ");
    let m = fs::read(first.join("out").join(BUNDLE).join("manifest.json")).unwrap();
    let m2 = fs::read(work.path().join(BUNDLE).join("manifest.json")).unwrap();
    assert_eq!(m, m2);
    let text = String::from_utf8(m).unwrap();
    assert!(!text.contains("created_at"), "no timestamp unless asked");
}

#[test]
fn gnu_tar_extracts_the_archive_and_gguf_py_reads_the_model_inside() {
    let b = signed_bundle();
    let work = tempfile::tempdir().unwrap();
    run_tool(
        Command::new("tar")
            .arg("--zstd")
            .arg("-xf")
            .arg(b.join("out").join(format!("{BUNDLE}.tar.zst")))
            .arg("-C")
            .arg(work.path()),
    );
    let listing = run_tool(
        Command::new("tar")
            .args(["--zstd", "--numeric-owner", "-tvf"])
            .arg(b.join("out").join(format!("{BUNDLE}.tar.zst"))),
    );
    let listing = String::from_utf8(listing.stdout).unwrap();
    for line in listing.lines() {
        assert!(line.contains(" 0/0 "), "owner not 0/0: {line}");
        assert!(line.contains("1970-01-01"), "mtime not 0: {line}");
    }
    let names: Vec<&str> = listing
        .lines()
        .map(|l| l.split_whitespace().last().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "entries are sorted");

    let dir = work.path().join(BUNDLE);
    let m = manifest(&dir);
    let r = oracle("bundle_read.py", &[&dir]);
    // Every listed file hashes (hashlib) to what the manifest says; nothing else is present.
    let listed = r["listed"].as_object().unwrap();
    assert_eq!(listed.len(), m["files"].as_array().unwrap().len());
    for (path, e) in listed {
        assert_eq!(e["matches"], true, "{path}: {e}");
    }
    let mut expect: Vec<String> = listed.keys().cloned().collect();
    expect.extend(["manifest.json".into(), "manifest.sig".into()]);
    expect.sort();
    let present: Vec<String> = serde_json::from_value(r["present"].clone()).unwrap();
    assert_eq!(present, expect);
    assert!(listed.contains_key("model/smollm2.gguf"));
    assert!(listed.contains_key("model/tokenizer.json"));
    assert!(listed.contains_key("model/tokenizer_config.json"));
    // gguf-py reads the model; the manifest's quant plan and identity match it.
    let g = &r["gguf"];
    assert_eq!(g["architecture"], "llama");
    assert_eq!(g["file_type"], llama_ftype("Q8_0"));
    assert_eq!(m["model"]["arch"], "llama");
    assert_eq!(m["model"]["file"], "model/smollm2.gguf");
    assert_eq!(m["model"]["n_params"], g["n_params"]);
    assert_eq!(m["quant"]["preset"], "Q8_0");
    assert_eq!(m["quant"]["tensor_types"], g["types"]);
    assert_eq!(m["target"]["profile"], "imx95");
    assert_eq!(m["target"]["rust_target"], "aarch64-unknown-linux-gnu");
    assert_eq!(m["format"], "gguf");
    assert_eq!(m["schema"], 1);
    assert_eq!(m["tokenizer"]["chat_template"], true);
    let src = &m["model"]["sources"][0];
    assert_eq!(src["path"], "SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(src["size"], fs::metadata(smollm2_gguf()).unwrap().len());
}

#[test]
fn verify_accepts_the_good_bundle_folder_and_archive_with_its_key() {
    let b = signed_bundle();
    let dir = b.join("out").join(BUNDLE);
    let archive = b.join("out").join(format!("{BUNDLE}.tar.zst"));
    for p in [&dir, &archive] {
        let v = verify_json(p, Some(&public_key()));
        assert_eq!(v["ok"], true);
        assert_eq!(v["signature"], "verified");
        assert_eq!(v["target"]["profile"], "imx95");
        assert_eq!(v["files"], 3);
    }
    // Without the key the checksums pass, but the signature is reported as unchecked.
    let v = verify_json(&dir, None);
    assert_eq!(v["signature"], "unverified");
    run_ok(
        edgepack()
            .arg("verify")
            .arg(&archive)
            .args(["--target", "imx95"]),
    );
    let err = run_err(
        edgepack()
            .arg("verify")
            .arg(&archive)
            .args(["--target", "imx93"]),
    );
    assert!(err.contains("imx95") && err.contains("imx93"), "{err}");
}

#[test]
fn openssl_checks_the_signature_and_reads_the_keys() {
    let b = signed_bundle();
    let dir = b.join("out").join(BUNDLE);
    let out = run_tool(
        Command::new("openssl")
            .args(["pkeyutl", "-verify", "-pubin", "-rawin", "-inkey"])
            .arg(public_key())
            .arg("-in")
            .arg(dir.join("manifest.json"))
            .arg("-sigfile")
            .arg(dir.join("manifest.sig")),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Verified Successfully"));
    // The private key's public half, as OpenSSL derives it, is the .pub.pem keygen wrote.
    let derived = run_tool(
        Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(b.join("key.pem")),
    );
    assert_eq!(
        String::from_utf8(derived.stdout).unwrap(),
        fs::read_to_string(public_key()).unwrap()
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(b.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "private key readable by its owner only"
        );
    }
}

#[test]
fn keygen_refuses_to_overwrite_and_a_key_from_openssl_signs_a_bundle() {
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("k");
    run_ok(edgepack().args(["keygen", "-o"]).arg(&key));
    let err = run_err(edgepack().args(["keygen", "-o"]).arg(&key));
    assert!(err.contains("k.pem") && err.contains("overwrite"), "{err}");

    // A key OpenSSL made signs a (tiny) bundle that verifies with OpenSSL's public key.
    let sk = work.path().join("ossl.pem");
    let pk = work.path().join("ossl.pub.pem");
    run_tool(
        Command::new("openssl")
            .args(["genpkey", "-algorithm", "ed25519", "-out"])
            .arg(&sk),
    );
    run_tool(
        Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&sk)
            .arg("-out")
            .arg(&pk),
    );
    let tiny = tiny("llama-tied-f32", fixtures::Tiny::llama());
    let out = work.path().join("out");
    run_ok(
        edgepack()
            .arg("bundle")
            .arg(&tiny)
            .args([
                "--target", "rpi5", "--quant", "Q8_0", "--name", "tiny", "--sign",
            ])
            .arg(&sk)
            .arg("-o")
            .arg(&out),
    );
    let v = verify_json(&out.join("tiny-rpi5.tar.zst"), Some(&pk));
    assert_eq!(v["signature"], "verified");
    // Another key is refused, naming the signature file.
    let err = verify_err(&out.join("tiny-rpi5"), Some(&key.with_extension("pub.pem")));
    assert!(err.contains("manifest.sig"), "{err}");
}

#[test]
fn verify_refuses_one_flipped_byte_in_the_model_naming_it() {
    let (_w, dir) = copy_of_bundle();
    let model = dir.join("model/smollm2.gguf");
    let mut bytes = fs::read(&model).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    fs::write(&model, bytes).unwrap();
    let err = verify_err(&dir, Some(&public_key()));
    assert!(
        err.contains("model/smollm2.gguf") && err.contains("sha256"),
        "{err}"
    );
}

#[test]
fn verify_refuses_a_flipped_byte_inside_the_archive_naming_the_file() {
    let b = signed_bundle();
    let work = tempfile::tempdir().unwrap();
    // Re-pack with GNU tar after flipping a byte, so the archive itself is well formed.
    run_tool(
        Command::new("tar")
            .arg("--zstd")
            .arg("-xf")
            .arg(b.join("out").join(format!("{BUNDLE}.tar.zst")))
            .arg("-C")
            .arg(work.path()),
    );
    let tok = work.path().join(BUNDLE).join("model/tokenizer.json");
    let mut bytes = fs::read(&tok).unwrap();
    bytes[10] ^= 0x20;
    fs::write(&tok, bytes).unwrap();
    let archive = work.path().join("bad.tar.zst");
    run_tool(
        Command::new("tar")
            .arg("--zstd")
            .arg("-cf")
            .arg(&archive)
            .arg("-C")
            .arg(work.path())
            .arg(BUNDLE),
    );
    let err = verify_err(&archive, Some(&public_key()));
    assert!(err.contains("model/tokenizer.json"), "{err}");
}

#[test]
fn verify_refuses_a_missing_file_naming_it() {
    let (_w, dir) = copy_of_bundle();
    fs::remove_file(dir.join("model/tokenizer_config.json")).unwrap();
    let err = verify_err(&dir, Some(&public_key()));
    assert!(
        err.contains("model/tokenizer_config.json") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn verify_refuses_an_extra_file_naming_it() {
    let (_w, dir) = copy_of_bundle();
    fs::write(dir.join("model/extra.bin"), b"not in the manifest").unwrap();
    let err = verify_err(&dir, Some(&public_key()));
    assert!(
        err.contains("model/extra.bin") && err.contains("not listed"),
        "{err}"
    );
}

#[test]
fn verify_refuses_a_wrong_signature_key_naming_the_signature() {
    let (w, dir) = copy_of_bundle();
    run_ok(
        edgepack()
            .args(["keygen", "-o"])
            .arg(w.path().join("other")),
    );
    let err = verify_err(&dir, Some(&w.path().join("other.pub.pem")));
    assert!(
        err.contains("manifest.sig") && err.contains("signature"),
        "{err}"
    );
}

#[test]
fn verify_refuses_a_tampered_manifest() {
    // Signed: any change to manifest.json breaks the signature.
    let (_w, dir) = copy_of_bundle();
    let path = dir.join("manifest.json");
    let text = fs::read_to_string(&path).unwrap();
    fs::write(
        &path,
        text.replace("\"profile\": \"imx95\"", "\"profile\": \"imx93\""),
    )
    .unwrap();
    let err = verify_err(&dir, Some(&public_key()));
    assert!(
        err.contains("manifest.sig") && err.contains("manifest.json"),
        "{err}"
    );

    // Unsigned: a changed size or hash no longer matches the file it names.
    let (_w, dir) = copy_of_bundle();
    fs::remove_file(dir.join("manifest.sig")).unwrap();
    let path = dir.join("manifest.json");
    let mut m = manifest(&dir);
    let sha = m["files"][1]["sha256"].as_str().unwrap().to_string();
    let forged = format!(
        "{}{}",
        &sha[..63],
        if sha.ends_with('0') { "1" } else { "0" }
    );
    m["files"][1]["sha256"] = Value::String(forged);
    fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let err = verify_err(&dir, None);
    assert!(
        err.contains("model/tokenizer.json") && err.contains("sha256"),
        "{err}"
    );
    // And a key makes the (now missing) signature required.
    let err = verify_err(&dir, Some(&public_key()));
    assert!(
        err.contains("manifest.sig") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn an_archive_entry_that_leaves_the_bundle_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let tar_path = work.path().join("evil.tar");
    // GNU tar keeps `..` in member names with -P; the archive holds b/../../evil.
    fs::create_dir_all(work.path().join("b")).unwrap();
    fs::write(work.path().join("evil"), b"x").unwrap();
    run_tool(
        Command::new("tar")
            .arg("-cPf")
            .arg(&tar_path)
            .arg("-C")
            .arg(work.path().join("b"))
            .arg("../evil"),
    );
    run_tool(Command::new("zstd").arg("-q").arg(&tar_path));
    let err = verify_err(&work.path().join("evil.tar.zst"), None);
    assert!(err.contains("../evil") && err.contains("safe"), "{err}");
}

#[test]
fn an_unlisted_archive_entry_is_refused_at_its_header_before_a_byte_is_written() {
    let (w, dir) = copy_of_bundle();
    // 64 MiB the manifest does not list, right after the manifest as edgepack orders
    // entries; the archive is then cut 1 MiB into that entry's data. Refusing it by its
    // header says "not listed"; writing it first would end at the cut instead.
    let zeros = dir.join("model/zeros.bin");
    fs::File::create(&zeros).unwrap().set_len(64 << 20).unwrap();
    let tar_path = w.path().join("big.tar");
    run_tool(
        Command::new("tar")
            .arg("-cf")
            .arg(&tar_path)
            .arg("-C")
            .arg(w.path())
            .args([
                "smollm2-imx95/manifest.json",
                "smollm2-imx95/manifest.sig",
                "smollm2-imx95/model/zeros.bin",
            ]),
    );
    let bytes = fs::read(&tar_path).unwrap();
    let name = b"smollm2-imx95/model/zeros.bin";
    let at = bytes
        .windows(name.len())
        .position(|x| x == name)
        .expect("the entry's header");
    let header = at / 512 * 512;
    fs::write(&tar_path, &bytes[..header + 512 + (1 << 20)]).unwrap();
    run_tool(Command::new("zstd").arg("-q").arg(&tar_path));
    let tmp = w.path().join("tmp");
    fs::create_dir(&tmp).unwrap();
    let err = run_err(
        edgepack()
            .arg("verify")
            .arg(w.path().join("big.tar.zst"))
            .env("TMPDIR", &tmp),
    );
    assert!(
        err.contains("model/zeros.bin") && err.contains("not listed in manifest.json"),
        "{err}"
    );
    assert!(
        fs::read_dir(&tmp).unwrap().next().is_none(),
        "left in TMPDIR"
    );
}

#[test]
fn a_manifest_that_is_a_fifo_a_link_to_dev_zero_or_huge_is_refused_without_reading_it() {
    let (_w, dir) = copy_of_bundle();
    let manifest = dir.join("manifest.json");
    // Each case must fail at once: a FIFO with no writer would block a plain read forever.
    let verify = |what: &str| -> String {
        let out = Command::new("timeout")
            .arg("60")
            .arg(edgepack_bin())
            .arg("verify")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{what}: accepted");
        assert_ne!(out.status.code(), Some(124), "{what}: verify hung");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    fs::remove_file(&manifest).unwrap();
    run_tool(Command::new("mkfifo").arg(&manifest));
    let err = verify("fifo");
    assert!(
        err.contains("manifest.json") && err.contains("not a regular file"),
        "{err}"
    );
    fs::remove_file(&manifest).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &manifest).unwrap();
    let err = verify("link");
    assert!(
        err.contains("manifest.json") && err.contains("not a regular file"),
        "{err}"
    );
    fs::remove_file(&manifest).unwrap();
    fs::write(&manifest, vec![b' '; 17 << 20]).unwrap();
    let err = verify("17 MiB");
    assert!(
        err.contains("manifest.json") && err.contains("more than the 16777216"),
        "{err}"
    );
}

#[test]
fn a_path_with_a_newline_or_a_leading_dash_is_refused_by_name() {
    let (_w, dir) = copy_of_bundle();
    let text = fs::read_to_string(dir.join("manifest.json")).unwrap();
    let m: Value = serde_json::from_str(&text).unwrap();
    for name in ["model/a\nEDGEPACK_SUMS\necho INJECTED >&2\n: ", "model/-rf"] {
        let mut bad = m.clone();
        bad["files"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "path": name, "size": 1, "sha256": "0".repeat(64)
            }));
        fs::write(dir.join("manifest.json"), serde_json::to_vec(&bad).unwrap()).unwrap();
        let err = verify_err(&dir, None);
        let shown = format!("{name:?}");
        assert!(
            err.contains(&shown) && err.contains("not a safe relative path"),
            "{name:?}: {err}"
        );
        assert!(!err.contains("echo INJECTED >&2\n"), "{err}");
    }
}

#[test]
fn a_runtime_for_another_architecture_is_refused_and_a_matching_one_is_shipped_executable() {
    let work = tempfile::tempdir().unwrap();
    let tiny = tiny("llama-tied-f32", fixtures::Tiny::llama());
    // The edgepack binary itself stands in for a runtime built for the host.
    let host_bin = edgepack_bin();
    let (same, other) = match std::env::consts::ARCH {
        "aarch64" => ("generic-aarch64", "generic-x86_64"),
        "x86_64" => ("generic-x86_64", "imx95"),
        arch => panic!("no built-in profile for a {arch} host"),
    };
    let err = run_err(
        edgepack()
            .arg("bundle")
            .arg(&tiny)
            .args(["--target", other, "--name", "tiny", "--runtime"])
            .arg(host_bin)
            .arg("-o")
            .arg(work.path()),
    );
    assert!(
        err.contains("--runtime") && err.contains("built for"),
        "{err}"
    );
    assert!(!work.path().join(format!("tiny-{other}")).exists());
    run_ok(
        edgepack()
            .arg("bundle")
            .arg(&tiny)
            .args(["--target", same, "--quant", "Q8_0", "--name", "tiny"])
            .args(["--runtime-version", "9.9.9", "--runtime"])
            .arg(host_bin)
            .arg("-o")
            .arg(work.path()),
    );
    let dir = work.path().join(format!("tiny-{same}"));
    let m = manifest(&dir);
    assert_eq!(m["runtime"]["file"], "bin/edgepack-runtime");
    assert_eq!(m["runtime"]["version"], "9.9.9");
    assert!(m["runtime"]["triple"]
        .as_str()
        .unwrap()
        .starts_with(std::env::consts::ARCH));
    let listing = run_tool(
        Command::new("tar")
            .args(["--zstd", "-tvf"])
            .arg(work.path().join(format!("tiny-{same}.tar.zst"))),
    );
    let listing = String::from_utf8(listing.stdout).unwrap();
    let line = listing
        .lines()
        .find(|l| l.ends_with("bin/edgepack-runtime"))
        .unwrap();
    assert!(line.starts_with("-rwxr-xr-x"), "{line}");
    assert_eq!(
        fs::read(dir.join("bin/edgepack-runtime")).unwrap(),
        fs::read(host_bin).unwrap()
    );
    verify_json(&dir, None);
}

#[test]
fn a_bundle_with_a_lora_holds_the_exporters_merged_gguf_and_the_adapter_hashes() {
    let work = tempfile::tempdir().unwrap();
    let base = tiny("llama-tied-f32", fixtures::Tiny::llama());
    let adapter = work.path().join("adapter");
    let merged = work.path().join("peft-merged");
    oracle("peft_make.py", &[&base, &adapter, &merged, &"plain", &"5"]);
    let lora = format!("{}:0.5", adapter.display());
    run_ok(
        edgepack()
            .arg("bundle")
            .arg(&base)
            .args(["--lora", &lora])
            .args(["--target", "imx93", "--quant", "Q8_0", "--name", "tiny"])
            .arg("-o")
            .arg(work.path().join("out")),
    );
    let exported = work.path().join("direct.gguf");
    run_ok(
        edgepack()
            .args(["export", "gguf"])
            .arg(&base)
            .args(["--lora", &lora, "--quant", "Q8_0", "-o"])
            .arg(&exported),
    );
    let dir = work.path().join("out/tiny-imx93");
    assert_eq!(
        fs::read(dir.join("model/tiny.gguf")).unwrap(),
        fs::read(&exported).unwrap(),
        "the bundle's model is what `edgepack export gguf` writes"
    );
    let m = manifest(&dir);
    let ad = &m["model"]["adapters"][0];
    assert_eq!(ad["weight"], 0.5);
    let names: Vec<&str> = ad["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"adapter_config.json"), "{names:?}");
    assert!(names.contains(&"adapter_model.safetensors"), "{names:?}");
    let sources: Vec<&str> = m["model"]["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(sources.contains(&"config.json"), "{sources:?}");
    let r = oracle("bundle_read.py", &[&dir]);
    for (path, e) in r["listed"].as_object().unwrap() {
        assert_eq!(e["matches"], true, "{path}: {e}");
    }
    assert!(r["present"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p != "manifest.sig"));
    assert_eq!(verify_json(&dir, None)["signature"], "unsigned");
}

/// Archives an attacker could hand over, each built entry by entry with Python's tarfile
/// (which writes any entry type and mode): each must be refused by `verify` naming the
/// entry, and nothing may appear outside the folder it unpacks into.
#[test]
fn hostile_archive_entries_are_refused_by_name_and_nothing_lands_outside() {
    let (w, dir) = copy_of_bundle();
    let outside = w.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let victim = outside.join("victim.txt");
    fs::write(&victim, b"untouched").unwrap();
    // (case, entry the error must name, what the error must say)
    let cases = [
        ("symlink_in", "model/link", "Symlink"),
        ("symlink_out", "model/link", "Symlink"),
        ("hardlink", "model/hard", "Link"),
        ("fifo", "model/fifo", "Fifo"),
        ("chardev", "model/dev", "Char"),
        ("setuid", "model/smollm2.gguf", "setuid"),
        ("sticky_dir", "model", "setuid"),
        ("duplicate", "model/smollm2.gguf", "twice"),
        ("absolute", "(the victim's path)", "safe"),
    ];
    let script = r#"
import io, sys, tarfile, os
case, src, out, victim = sys.argv[1:5]
top = os.path.basename(src)
t = tarfile.open(out, "w", format=tarfile.GNU_FORMAT)
def add_file(rel, mode=0o644):
    data = open(os.path.join(src, rel), "rb").read()
    i = tarfile.TarInfo(f"{top}/{rel}"); i.size = len(data); i.mode = mode
    t.addfile(i, io.BytesIO(data))
def add(name, kind, **kw):
    i = tarfile.TarInfo(f"{top}/{name}"); i.type = kind
    for k, v in kw.items(): setattr(i, k, v)
    t.addfile(i)
add_file("manifest.json")
add_file("manifest.sig")
d = tarfile.TarInfo(f"{top}/model"); d.type = tarfile.DIRTYPE
d.mode = 0o1755 if case == "sticky_dir" else 0o755
t.addfile(d)
if case == "symlink_in": add("model/link", tarfile.SYMTYPE, linkname="../manifest.json")
if case == "symlink_out": add("model/link", tarfile.SYMTYPE, linkname=victim)
if case == "hardlink": add("model/hard", tarfile.LNKTYPE, linkname=victim)
if case == "fifo": add("model/fifo", tarfile.FIFOTYPE)
if case == "chardev": add("model/dev", tarfile.CHRTYPE, devmajor=1, devminor=3)
if case == "absolute":
    i = tarfile.TarInfo(victim); i.size = 4; t.addfile(i, io.BytesIO(b"evil"))
add_file("model/smollm2.gguf", 0o4755 if case == "setuid" else 0o644)
if case == "duplicate": add_file("model/smollm2.gguf")
t.close()
"#;
    for (case, entry, says) in cases {
        let tar_path = w.path().join(format!("{case}.tar"));
        run_tool(
            Command::new("python3")
                .arg("-c")
                .arg(script)
                .arg(case)
                .arg(&dir)
                .arg(&tar_path)
                .arg(&victim),
        );
        run_tool(Command::new("zstd").args(["-q", "-f"]).arg(&tar_path));
        let tmp = w.path().join(format!("tmp-{case}"));
        fs::create_dir(&tmp).unwrap();
        let err = run_err(
            edgepack()
                .arg("verify")
                .arg(w.path().join(format!("{case}.tar.zst")))
                .env("TMPDIR", &tmp),
        );
        let entry = match case {
            "absolute" => victim.display().to_string(),
            _ => entry.to_string(),
        };
        assert!(err.contains(&entry), "{case}: {err}");
        assert!(err.contains(says), "{case}: {err}");
        assert!(
            fs::read_dir(&tmp).unwrap().next().is_none(),
            "{case}: left in TMPDIR"
        );
        assert_eq!(fs::read(&victim).unwrap(), b"untouched", "{case}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1, "{case}");
    }
}
