//! `edgepack mender` against the real Mender tools: `mender-artifact` reads and validates the
//! artifacts (unsigned, RSA- and ECDSA-signed, tampered), and the real Mender client (3.4, in
//! standalone mode) installs, commits and rolls them back through our update module into a
//! throw-away board folder, with the module under the system's sh and under busybox alone.
//!
//! The client looks for update modules only in /usr/share/mender/modules/v3 and reads
//! /etc/mender/artifact_info: neither is configurable (its `--data` folder holds the rest), so
//! each client run is in a private mount namespace (`unshare -m`) where a temporary folder is
//! bound over each of the two. The machine's own folders are never written.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use edgepack_targets::deploy::board::Layout;
use edgepack_tests::sshd::free_port;
use edgepack_tests::{
    edgepack, fixtures, health, run_err, run_ok, runtime_bin, shared_work_dir, tiny, wait_healthy,
};
use serde_json::Value;

const BUNDLE: &str = "tiny-imx93";
const MINUTE: std::time::Duration = std::time::Duration::from_secs(60);
const MODULES_DIR: &str = "/usr/share/mender/modules/v3";
const MENDER_ETC: &str = "/etc/mender";

/// A tiny llama at toy width: SmolLM2's vocabulary, one layer, a 64-wide hidden state.
fn toy() -> fixtures::Tiny {
    fixtures::Tiny {
        hidden: 64,
        layers: 1,
        heads: 2,
        kv_heads: 1,
        ff: 128,
        ..fixtures::Tiny::llama()
    }
}

/// A GGUF bundle of the toy for imx93 at `quant` (folder and .tar.zst), built once per run.
fn bundle(quant: &str) -> PathBuf {
    let model = tiny("mender-toy", toy());
    let dir = shared_work_dir().join(format!("mender-bundle-{quant}"));
    fixtures::build_once(&dir, |tmp| {
        run_ok(
            edgepack()
                .arg("bundle")
                .arg(&model)
                .args(["--target", "imx93", "--format", "gguf", "--quant", quant])
                .args(["--name", "tiny", "-o"])
                .arg(tmp),
        );
    })
    .join(BUNDLE)
}

/// Release A and release B: two bundles of the same name, different weights.
fn bundle_a() -> PathBuf {
    bundle("Q8_0")
}

fn bundle_b() -> PathBuf {
    bundle("Q4_0")
}

/// `edgepack --json mender <bundle> <args> -o <out>`; returns the JSON it printed.
fn write_artifact(bundle: &Path, args: &[&str], out: &Path) -> Value {
    let o = run_ok(
        edgepack()
            .args(["--json", "mender"])
            .arg(bundle)
            .args(args)
            .arg("-o")
            .arg(out),
    );
    serde_json::from_slice(&o.stdout).expect("mender --json prints JSON")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn mender_artifact(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new("mender-artifact");
    for a in args {
        c.arg(a);
    }
    c.output()
        .expect("run mender-artifact\nhint: apt-get install mender-artifact")
}

fn openssl(args: &[&dyn AsRef<std::ffi::OsStr>]) {
    let mut c = Command::new("openssl");
    for a in args {
        c.arg(a);
    }
    run_ok(&mut c);
}

fn sh(script: &str) -> Output {
    run_ok(Command::new("sh").args(["-c", script]))
}

fn q(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// Rewrites the artifact `art` as `out` with `edit` applied to a copy of its payload tar (the
/// one file in data/0000.tar.gz); the other members keep their bytes, so `manifest` and
/// `manifest.sig` still describe the original payload.
fn tamper_payload(art: &Path, out: &Path, edit: impl FnOnce(&Path)) {
    let work = tempfile::tempdir().unwrap();
    let (x, d) = (work.path().join("x"), work.path().join("d"));
    fs::create_dir_all(&x).unwrap();
    fs::create_dir_all(&d).unwrap();
    sh(&format!(
        "tar -xf {} -C {} && tar -xzf {}/data/0000.tar.gz -C {}",
        q(art),
        q(&x),
        q(&x),
        q(&d)
    ));
    let payload = fs::read_dir(&d).unwrap().next().unwrap().unwrap().path();
    edit(&payload);
    let name = payload.file_name().unwrap().to_str().unwrap().to_string();
    let members = ["version", "manifest", "manifest.sig", "header.tar.gz"]
        .iter()
        .filter(|m| x.join(m).exists())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    sh(&format!(
        "tar -czf {x}/data/0000.tar.gz -C {d} '{name}' && tar -cf {out} -C {x} {members} data/0000.tar.gz",
        x = q(&x),
        d = q(&d),
        out = q(out),
    ));
}

/// Flips one byte of `file` at `at` bytes from its start.
fn flip_byte(file: &Path, at: u64) {
    let mut b = fs::read(file).unwrap();
    b[at as usize] ^= 0x01;
    fs::write(file, b).unwrap();
}

/// The byte offset, inside a tar, of the middle of the member `name`'s data.
fn middle_of_member(tar: &Path, name: &str) -> u64 {
    // GNU tar's block numbers: `block N: -rw-r--r-- ... name`, the header at block N.
    let o = sh(&format!("tar -tvRf {}", q(tar)));
    let listing = String::from_utf8_lossy(&o.stdout).into_owned();
    let line = listing
        .lines()
        .find(|l| l.ends_with(&format!(" {name}")))
        .unwrap_or_else(|| panic!("{name} not in the payload:\n{listing}"));
    let block: u64 = line
        .trim_start_matches("block ")
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let size: u64 = line.split_whitespace().nth(4).unwrap().parse().unwrap();
    (block + 1) * 512 + size / 2
}

/// The shell the update module runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shell {
    System,
    Busybox,
}

/// A throw-away board: the Mender client's data folder, its config, the module folder and
/// /etc/mender stand-ins, and the install folder the module writes.
struct Board {
    dir: tempfile::TempDir,
}

impl Board {
    fn new(device_type: &str) -> Board {
        Board::with_shell(device_type, Shell::System)
    }

    /// A board whose update module runs under `shell`: the system's /bin/sh with its tools,
    /// or busybox's sh with nothing but busybox's applets on PATH, as on a minimal image.
    fn with_shell(device_type: &str, shell: Shell) -> Board {
        let dir = tempfile::tempdir().unwrap();
        let b = Board { dir };
        for d in ["data", "modules", "etc", "opt", "module"] {
            fs::create_dir_all(b.path(d)).unwrap();
        }
        fs::write(
            b.path("data/device_type"),
            format!("device_type={device_type}\n"),
        )
        .unwrap();
        fs::write(b.path("etc/artifact_info"), "artifact_name=factory\n").unwrap();
        fs::write(b.path("mender.conf"), "{}\n").unwrap();
        let written = match shell {
            Shell::System => b.path("modules"),
            Shell::Busybox => b.path("module"),
        };
        run_ok(edgepack().args(["mender", "--write-module"]).arg(&written));
        if shell == Shell::Busybox {
            let bin = b.path("busybox-bin");
            fs::create_dir_all(&bin).unwrap();
            let busybox = String::from_utf8(
                run_ok(Command::new("sh").args(["-c", "command -v busybox"])).stdout,
            )
            .expect("busybox's path\nhint: apt-get install busybox");
            let busybox = busybox.trim();
            let list = run_ok(Command::new(busybox).arg("--list")).stdout;
            for applet in String::from_utf8(list).unwrap().lines() {
                std::os::unix::fs::symlink(busybox, bin.join(applet)).unwrap();
            }
            let wrapper = b.path("modules/edgepack-bundle");
            fs::write(
                &wrapper,
                format!(
                    "#!/bin/sh\nexec env -i PATH={bin} EDGEPACK_INSTALL_DIR=\"$EDGEPACK_INSTALL_DIR\" EDGEPACK_MENDER_CONF=\"$EDGEPACK_MENDER_CONF\" {busybox} sh {module} \"$@\"\n",
                    bin = q(&bin),
                    module = q(&written.join("edgepack-bundle")),
                ),
            )
            .unwrap();
            run_ok(Command::new("chmod").arg("0755").arg(&wrapper));
        }
        b
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn install_dir(&self) -> PathBuf {
        self.path("opt/edgepack")
    }

    /// Runs `mender <args>` in standalone mode with this board's folders.
    fn mender(&self, args: &[&str]) -> Output {
        let mut cmd = format!(
            "mount --bind {} {MODULES_DIR} && mount --bind {} {MENDER_ETC} && exec mender --no-syslog --config {} --fallback-config {} --data {}",
            q(&self.path("modules")),
            q(&self.path("etc")),
            q(&self.path("mender.conf")),
            q(&self.path("no-fallback.conf")),
            q(&self.path("data")),
        );
        for a in args {
            cmd.push(' ');
            cmd.push_str(&q(Path::new(a)));
        }
        Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &cmd])
            .env("EDGEPACK_INSTALL_DIR", self.install_dir())
            .env("EDGEPACK_MENDER_CONF", self.path("edgepack-mender.conf"))
            .output()
            .expect("run mender under unshare\nhint: apt-get install mender-client util-linux")
    }

    fn mender_ok(&self, args: &[&str]) -> String {
        let o = self.mender(args);
        assert!(o.status.success(), "mender {args:?} failed:\n{}", text(&o));
        text(&o)
    }

    fn link(&self, name: &str) -> Option<String> {
        fs::read_link(self.install_dir().join(name))
            .ok()
            .map(|p| p.display().to_string())
    }

    fn releases(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.install_dir().join("releases"))
            .map(|r| {
                r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn incoming_is_empty(&self) -> bool {
        fs::read_dir(self.install_dir().join(".incoming"))
            .map(|mut r| r.next().is_none())
            .unwrap_or(true)
    }
}

fn artifact_of(bundle: &Path, args: &[&str], dir: &Path, name: &str) -> (PathBuf, Value) {
    let out = dir.join(name);
    let v = write_artifact(bundle, args, &out);
    (out, v)
}

#[test]
fn mender_artifact_reads_and_validates_the_artifact_and_it_is_reproducible() {
    let a = bundle_a();
    let work = tempfile::tempdir().unwrap();
    // From the archive, as deploy takes it.
    let archive = a.with_file_name(format!("{BUNDLE}.tar.zst"));
    let (art, v) = artifact_of(&archive, &[], work.path(), "a.mender");
    let release = v["release"].as_str().unwrap().to_string();
    assert!(release.starts_with("tiny-imx93-"), "{v}");
    assert_eq!(v["artifact_name"], release.as_str(), "{v}");
    assert_eq!(v["device_types"], serde_json::json!(["imx93"]), "{v}");
    assert_eq!(v["payload_type"], "edgepack-bundle");
    assert_eq!(v["signed"], Value::Null);
    assert_eq!(v["size"], fs::metadata(&art).unwrap().len());
    let sha = sh(&format!("sha256sum {}", q(&art)));
    assert!(String::from_utf8_lossy(&sha.stdout).starts_with(v["sha256"].as_str().unwrap()));

    // The members in the order the client reads them.
    let list = sh(&format!("tar -tf {}", q(&art)));
    assert_eq!(
        String::from_utf8_lossy(&list.stdout),
        "version\nmanifest\nheader.tar.gz\ndata/0000.tar.gz\n"
    );

    let read = mender_artifact(&[&"read", &art]);
    let out = text(&read);
    assert!(read.status.success(), "{out}");
    for want in [
        format!("Name: {release}"),
        "Format: mender".into(),
        "Version: 3".into(),
        "Compatible devices: '[imx93]'".into(),
        "Type:   edgepack-bundle".into(),
        format!("rootfs-image.edgepack-bundle.version: {release}"),
        format!("name:     {release}.tar"),
        "Signature: no signature".into(),
    ] {
        assert!(
            out.contains(&want),
            "mender-artifact read lacks {want:?}:\n{out}"
        );
    }
    let val = mender_artifact(&[&"validate", &art]);
    assert!(val.status.success(), "{}", text(&val));

    // The folder gives the same release and, written again, the same bytes.
    let (again, w) = artifact_of(&a, &[], work.path(), "again.mender");
    assert_eq!(w["release"], release.as_str());
    assert_eq!(w["sha256"], v["sha256"]);
    assert_eq!(fs::read(&again).unwrap(), fs::read(&art).unwrap());

    // Several device types, all in the artifact's depends.
    let (multi, _) = artifact_of(
        &a,
        &["-t", "imx93", "-t", "imx93-evk"],
        work.path(),
        "m.mender",
    );
    let out = text(&mender_artifact(&[&"read", &multi]));
    assert!(
        out.contains("Compatible devices: '[imx93 imx93-evk]'"),
        "{out}"
    );
}

#[test]
fn signed_with_rsa_or_ecdsa_the_artifact_validates_with_that_key_only_and_not_when_tampered() {
    let a = bundle_a();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (rsa, rsa_pub) = (w.join("rsa.pem"), w.join("rsa.pub.pem"));
    let (ec, ec_pub) = (w.join("ec.pem"), w.join("ec.pub.pem"));
    openssl(&[&"genrsa", &"-out", &rsa, &"3072"]);
    openssl(&[&"pkey", &"-in", &rsa, &"-pubout", &"-out", &rsa_pub]);
    openssl(&[
        &"ecparam",
        &"-genkey",
        &"-name",
        &"prime256v1",
        &"-noout",
        &"-out",
        &ec,
    ]);
    openssl(&[&"pkey", &"-in", &ec, &"-pubout", &"-out", &ec_pub]);

    for (key, public, other, kind) in [
        (&rsa, &rsa_pub, &ec_pub, "rsa"),
        (&ec, &ec_pub, &rsa_pub, "ecdsa-p256"),
    ] {
        let key_arg = key.to_str().unwrap();
        let (art, v) = artifact_of(&a, &["--sign", key_arg], w, &format!("{kind}.mender"));
        assert_eq!(v["signed"], kind, "{v}");
        let list = sh(&format!("tar -tf {}", q(&art)));
        assert_eq!(
            String::from_utf8_lossy(&list.stdout),
            "version\nmanifest\nmanifest.sig\nheader.tar.gz\ndata/0000.tar.gz\n"
        );
        let ok = mender_artifact(&[&"validate", &"-k", public, &art]);
        assert!(ok.status.success(), "{kind}: {}", text(&ok));
        let read = text(&mender_artifact(&[&"read", &"-k", public, &art]));
        assert!(
            read.contains("Signature: signed and verified correctly"),
            "{read}"
        );

        let wrong = mender_artifact(&[&"validate", &"-k", other, &art]);
        assert!(
            !wrong.status.success(),
            "{kind} validated with another key: {}",
            text(&wrong)
        );

        // One byte of the payload changed: the manifest's checksum no longer holds.
        let bad = w.join(format!("{kind}-tampered.mender"));
        tamper_payload(&art, &bad, |p| flip_byte(p, 700));
        let refused = mender_artifact(&[&"validate", &"-k", public, &bad]);
        let out = text(&refused);
        assert!(
            !refused.status.success(),
            "{kind}: tampered artifact validated: {out}"
        );
        assert!(out.to_lowercase().contains("checksum"), "{kind}: {out}");
    }
}

#[test]
fn the_cli_refuses_a_bad_bundle_an_unknown_key_and_an_unwritable_output_leaving_nothing() {
    let a = bundle_a();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let listing = |d: &Path| {
        let mut v: Vec<_> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };

    // A bundle whose model changed after it was made.
    let copy = w.join("copy").join(BUNDLE);
    sh(&format!(
        "mkdir -p {} && cp -a {}/. {}",
        q(&copy),
        q(&a),
        q(&copy)
    ));
    let model = copy.join("model/tiny.gguf");
    let len = fs::metadata(&model).unwrap().len();
    flip_byte(&model, len / 2);
    let out = w.join("out");
    fs::create_dir_all(&out).unwrap();
    let err = run_err(
        edgepack()
            .arg("mender")
            .arg(&copy)
            .arg("-o")
            .arg(out.join("x.mender")),
    );
    assert!(err.contains("tiny.gguf") && err.contains("sha256"), "{err}");
    assert!(listing(&out).is_empty(), "{:?}", listing(&out));

    // An ed25519 key (edgepack's own bundle keys): not a kind Mender verifies.
    run_ok(edgepack().args(["keygen", "-o"]).arg(w.join("ed")));
    let err = run_err(
        edgepack()
            .arg("mender")
            .arg(&a)
            .arg("--sign")
            .arg(w.join("ed.pem"))
            .arg("-o")
            .arg(out.join("x.mender")),
    );
    assert!(err.contains("ed.pem") && err.contains("Ed25519"), "{err}");
    assert!(listing(&out).is_empty(), "{:?}", listing(&out));

    // An output whose folder does not exist, and one that is a folder.
    let err = run_err(
        edgepack()
            .arg("mender")
            .arg(&a)
            .arg("-o")
            .arg(w.join("missing/x.mender")),
    );
    assert!(err.contains("missing"), "{err}");
    fs::create_dir_all(out.join("taken.mender")).unwrap();
    let err = run_err(
        edgepack()
            .arg("mender")
            .arg(&a)
            .arg("-o")
            .arg(out.join("taken.mender")),
    );
    assert!(err.contains("taken.mender"), "{err}");
    assert_eq!(
        listing(&out),
        vec![std::ffi::OsString::from("taken.mender")]
    );

    // The input is never written over, nor written into.
    let archive = w.join("copy.tar.zst");
    fs::copy(a.with_file_name(format!("{BUNDLE}.tar.zst")), &archive).unwrap();
    let before = fs::read(&archive).unwrap();
    let err = run_err(
        edgepack()
            .arg("mender")
            .arg(&archive)
            .arg("-o")
            .arg(&archive),
    );
    assert!(err.contains("overwrite or land inside the bundle"), "{err}");
    assert_eq!(fs::read(&archive).unwrap(), before);
    let err = run_err(
        edgepack()
            .arg("mender")
            .arg(&copy)
            .arg("-o")
            .arg(copy.join("x.mender")),
    );
    assert!(err.contains("overwrite or land inside the bundle"), "{err}");
    assert!(!copy.join("x.mender").exists());
}

#[test]
fn the_mender_client_installs_commits_and_rolls_back_through_the_module() {
    install_commit_and_roll_back(Shell::System);
}

#[test]
fn the_module_installs_commits_and_rolls_back_with_busybox_alone() {
    install_commit_and_roll_back(Shell::Busybox);
}

fn install_commit_and_roll_back(shell: Shell) {
    let (a, b) = (bundle_a(), bundle_b());
    let work = tempfile::tempdir().unwrap();
    let (art_a, va) = artifact_of(&a, &[], work.path(), "a.mender");
    let (art_b, vb) = artifact_of(&b, &[], work.path(), "b.mender");
    let (ra, rb) = (
        va["release"].as_str().unwrap().to_string(),
        vb["release"].as_str().unwrap().to_string(),
    );
    assert_ne!(ra, rb);
    let board = Board::with_shell("imx93", shell);

    board.mender_ok(&["install", art_a.to_str().unwrap()]);
    assert_eq!(board.link("current"), Some(format!("releases/{ra}")));
    assert_eq!(board.link("previous"), None);
    // The release holds exactly the bundle, byte for byte.
    let release = board.install_dir().join("releases").join(&ra);
    let diff = Command::new("diff")
        .arg("-r")
        .arg(&a)
        .arg(&release)
        .output()
        .unwrap();
    assert!(diff.status.success(), "{}", text(&diff));
    board.mender_ok(&["commit"]);
    let shown = board.mender_ok(&["show-artifact"]);
    assert!(shown.contains(&ra), "{shown}");
    let provides = board.mender_ok(&["show-provides"]);
    assert!(
        provides.contains(&format!("rootfs-image.edgepack-bundle.version={ra}")),
        "{provides}"
    );

    // B replaces A; A is kept as previous. Rolling back returns to A and removes B.
    board.mender_ok(&["install", art_b.to_str().unwrap()]);
    assert_eq!(board.link("current"), Some(format!("releases/{rb}")));
    assert_eq!(board.link("previous"), Some(format!("releases/{ra}")));
    board.mender_ok(&["rollback"]);
    assert_eq!(board.link("current"), Some(format!("releases/{ra}")));
    assert_eq!(board.releases(), vec![ra.clone()]);
    let shown = board.mender_ok(&["show-artifact"]);
    assert!(shown.contains(&ra), "{shown}");

    // B again, committed: A stays as previous.
    board.mender_ok(&["install", art_b.to_str().unwrap()]);
    board.mender_ok(&["commit"]);
    assert_eq!(board.link("current"), Some(format!("releases/{rb}")));
    assert_eq!(board.link("previous"), Some(format!("releases/{ra}")));
    assert!(board.incoming_is_empty());
}

#[test]
fn the_client_refuses_an_artifact_for_another_device_type() {
    let a = bundle_a();
    let work = tempfile::tempdir().unwrap();
    let (art, _) = artifact_of(&a, &["--device-type", "imx95"], work.path(), "imx95.mender");
    let board = Board::new("imx93");
    let o = board.mender(&["install", art.to_str().unwrap()]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("not compatible with device imx93"), "{out}");
    assert_eq!(board.link("current"), None);
    assert!(board.releases().is_empty());
}

/// A change made to a payload tar; returns the changed payload's path.
type Edit = Box<dyn Fn(&Path) -> PathBuf>;

#[test]
fn the_module_refuses_a_tampered_padded_or_misnamed_bundle_and_current_stays() {
    refuses_tampered_bundles(Shell::System);
}

#[test]
fn the_module_refuses_a_tampered_padded_or_misnamed_bundle_with_busybox_alone() {
    refuses_tampered_bundles(Shell::Busybox);
}

fn refuses_tampered_bundles(shell: Shell) {
    let (a, b) = (bundle_a(), bundle_b());
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (art_a, va) = artifact_of(&a, &[], w, "a.mender");
    let (art_b, vb) = artifact_of(&b, &[], w, "b.mender");
    let (ra, rb) = (
        va["release"].as_str().unwrap().to_string(),
        vb["release"].as_str().unwrap().to_string(),
    );
    let board = Board::with_shell("imx93", shell);
    board.mender_ok(&["install", art_a.to_str().unwrap()]);
    board.mender_ok(&["commit"]);

    // B's payload with one byte of its model changed, packed by mender-artifact itself, so
    // the artifact's own checksums hold and only the bundle's manifest.json can tell.
    let payload_dir = w.join("payload");
    fs::create_dir_all(&payload_dir).unwrap();
    sh(&format!(
        "tar -xOf {} data/0000.tar.gz | tar -xzf - -C {}",
        q(&art_b),
        q(&payload_dir)
    ));
    let payload = payload_dir.join(format!("{rb}.tar"));
    let at = middle_of_member(&payload, "model/tiny.gguf");
    let cases: [(&str, Edit, &str); 3] = [
        (
            "flipped",
            Box::new(move |p: &Path| {
                flip_byte(p, at);
                p.to_path_buf()
            }),
            "do not match manifest.json",
        ),
        (
            "padded",
            Box::new(|p: &Path| {
                let extra = p.with_file_name("extra");
                fs::create_dir_all(&extra).unwrap();
                fs::write(extra.join("notes.txt"), "not in the manifest\n").unwrap();
                sh(&format!("tar -rf {} -C {} notes.txt", q(p), q(&extra)));
                p.to_path_buf()
            }),
            "not exactly those manifest.json lists",
        ),
        (
            // An intact bundle under a release id that is not its manifest's.
            "renamed",
            Box::new(|p: &Path| {
                let to = p.with_file_name("tiny-imx93-000000000000.tar");
                fs::rename(p, &to).unwrap();
                to
            }),
            "does not end with manifest.json's sha256 prefix",
        ),
    ];
    for (what, edit, message) in cases {
        let case_dir = w.join(what);
        fs::create_dir_all(&case_dir).unwrap();
        let file = case_dir.join(format!("{rb}.tar"));
        fs::copy(&payload, &file).unwrap();
        let file = edit(&file);
        let art = case_dir.join("bad.mender");
        let made = mender_artifact(&[
            &"write",
            &"module-image",
            &"-T",
            &"edgepack-bundle",
            &"-t",
            &"imx93",
            &"-n",
            &format!("{rb}-{what}"),
            &"-f",
            &file,
            &"-o",
            &art,
        ]);
        assert!(made.status.success(), "{}", text(&made));
        let o = board.mender(&["install", art.to_str().unwrap()]);
        let out = text(&o);
        assert!(!o.status.success(), "{what}: installed:\n{out}");
        assert!(out.contains(message), "{what}: {out}");
        assert_eq!(
            board.link("current"),
            Some(format!("releases/{ra}")),
            "{what}"
        );
        assert_eq!(board.link("previous"), None, "{what}");
        assert_eq!(board.releases(), vec![ra.clone()], "{what}");
        assert!(board.incoming_is_empty(), "{what}");
        let shown = board.mender_ok(&["show-artifact"]);
        assert!(shown.contains(&ra), "{what}: {shown}");
    }
}

/// Stops the supervised stand-in runtime however the test ends.
struct Supervised(Layout);

impl Drop for Supervised {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .args(["-c", &self.0.stop_supervised()])
            .output();
    }
}

/// A toy bundle for imx93 at `quant`, signed with `key`, in `dir`.
fn signed_bundle(quant: &str, key: &Path, dir: &Path) -> PathBuf {
    let out = dir.join(quant);
    run_ok(
        edgepack()
            .arg("bundle")
            .arg(tiny("mender-toy", toy()))
            .args(["--target", "imx93", "--format", "gguf", "--quant", quant])
            .args(["--name", "tiny", "--sign"])
            .arg(key)
            .arg("-o")
            .arg(&out),
    );
    out.join(BUNDLE)
}

#[test]
fn a_switch_restarts_the_runtime_checks_its_health_rolls_back_a_sick_release_and_commit_prunes() {
    health_check_and_prune(Shell::System);
}

/// The same with busybox alone: its `wget` makes the check's requests.
#[test]
fn the_health_check_and_prune_work_with_busybox_alone() {
    health_check_and_prune(Shell::Busybox);
}

fn health_check_and_prune(shell: Shell) {
    let work = tempfile::tempdir().unwrap();
    let keys = work.path().join("keys");
    fs::create_dir_all(&keys).unwrap();
    for name in ["ours", "stranger"] {
        run_ok(edgepack().args(["keygen", "-o"]).arg(keys.join(name)));
    }
    let ours = keys.join("ours.pem");
    let ours_pub = keys.join("ours.pub.pem");
    let mut releases = Vec::new();
    for quant in ["Q8_0", "Q4_0", "Q5_0"] {
        let b = signed_bundle(quant, &ours, work.path());
        let key = ["--key", ours_pub.to_str().unwrap()];
        let (art, v) = artifact_of(&b, &key, work.path(), &format!("{quant}.mender"));
        releases.push((art, v["release"].as_str().unwrap().to_string()));
    }
    // Signed with a key the board does not trust: the runtime refuses to start on it.
    let sick = signed_bundle("Q4_1", &keys.join("stranger.pem"), work.path());
    let stranger_pub = keys.join("stranger.pub.pem");
    let key = ["--key", stranger_pub.to_str().unwrap()];
    let (sick_art, sick_v) = artifact_of(&sick, &key, work.path(), "sick.mender");
    let sick_id = sick_v["release"].as_str().unwrap();

    let board = Board::with_shell("imx93", shell);
    let port = free_port();
    fs::write(
        board.path("edgepack-mender.conf"),
        format!("runtime_port={port}\nhealth_timeout=15\nkeep=1\n"),
    )
    .unwrap();
    let current = || board.link("current");
    let at = |i: usize| Some(format!("releases/{}", releases[i].1));

    // The first release lands before any runtime runs: nothing to restart or check.
    board.mender_ok(&["install", releases[0].0.to_str().unwrap()]);
    board.mender_ok(&["commit"]);
    assert_eq!(current(), at(0));

    // The supervisor `edgepack deploy` starts where no systemd runs, over the real runtime
    // serving `current` and trusting our key only.
    let layout = Layout::new(board.install_dir().to_str().unwrap());
    let command = format!(
        "{} serve --bundle current --port {port} --threads 1 --ctx-size 256 --trusted-key {}",
        q(runtime_bin()),
        q(&ours_pub)
    );
    run_ok(Command::new("sh").args(["-c", &layout.start_supervised(&command)]));
    let _stop = Supervised(layout);
    wait_healthy(port, MINUTE, "the runtime never answered");
    let log = board.install_dir().join("logs/runtime.log");
    let restarts = || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("runtime exited with")
            .count()
    };

    // Each install restarts the runtime on the new release and waits for it to answer a
    // prompt; with keep=1, commit removes every release but current and previous.
    for i in [1, 2] {
        let before = restarts();
        board.mender_ok(&["install", releases[i].0.to_str().unwrap()]);
        assert_eq!(current(), at(i));
        assert!(restarts() > before, "the runtime was not restarted");
        assert_eq!(
            health(port),
            Some(200),
            "checked healthy before install returned"
        );
        board.mender_ok(&["commit"]);
    }
    let mut kept = vec![releases[1].1.clone(), releases[2].1.clone()];
    kept.sort();
    assert_eq!(board.releases(), kept, "release 0 is pruned at commit");
    assert_eq!(board.link("previous"), at(1));

    // A release its runtime refuses fails the check: the client rolls it back, and the old
    // release serves again.
    let o = board.mender(&["install", sick_art.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("did not answer /health"),
        "the client shows why: {}",
        text(&o)
    );
    assert_eq!(current(), at(2), "{}", text(&o));
    assert_eq!(board.link("previous"), at(1));
    assert!(!board.releases().contains(&sick_id.to_string()));
    let log_text = fs::read_to_string(&log).unwrap_or_default();
    assert!(log_text.contains("signature"), "{log_text}");
    wait_healthy(port, MINUTE, "the old release does not serve again");
    let shown = board.mender_ok(&["show-artifact"]);
    assert!(shown.contains(&releases[2].1), "{shown}");
}
