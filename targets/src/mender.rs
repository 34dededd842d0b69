//! Mender artifacts (format version 3) that carry a bundle, and the update module that installs
//! them on a board with the same release layout as SSH deploy ([`crate::deploy::board`]).
//!
//! ```text
//! version                 {"format":"mender","version":3}
//! manifest                `<sha256>  <name>` per line, sorted: data/0000/<release>.tar,
//!                         header.tar.gz, version
//! manifest.sig            optional: base64 of an RSA (PKCS#1 v1.5, SHA-256) or ECDSA P-256
//!                         (raw r||s over SHA-256) signature of `manifest`'s exact bytes
//! header.tar.gz           header-info, headers/0000/type-info
//! data/0000.tar.gz        <release>.tar: the bundle as a plain tar, its entries at the top
//! ```
//!
//! The payload type is [`PAYLOAD_TYPE`], so the Mender client hands the payload to the update
//! module of that name ([`MODULE`], a POSIX sh script). The artifact is reproducible: every
//! tar entry has mtime 0 and uid/gid 0, gzip headers carry no time, and both signature schemes
//! are deterministic (PKCS#1 v1.5; ECDSA with RFC 6979 nonces).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use base64ct::{Base64, Encoding};
use flate2::write::GzEncoder;
use flate2::{Compression, GzBuilder};
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::bundle::{self, header};
use crate::deploy::{self, DeployError};
use crate::error::BundleError;
use crate::io::{set_mode, tmp_sibling};

/// The payload type, and the name of the update module that installs it.
pub const PAYLOAD_TYPE: &str = "edgepack-bundle";
/// The update module, installed on a board as `/usr/share/mender/modules/v3/edgepack-bundle`.
pub const MODULE: &str = include_str!("../mender/edgepack-bundle");
/// The artifact format version written.
pub const FORMAT_VERSION: u32 = 3;
/// The provide key that records which release a board runs, as Mender's module images name
/// theirs (`rootfs-image.<type>.version`).
pub const VERSION_PROVIDE: &str = "rootfs-image.edgepack-bundle.version";
/// gzip's own default level; fixed so artifacts are reproducible.
const GZIP_LEVEL: u32 = 6;
const FILE_MODE: u32 = 0o644;
const EXEC_MODE: u32 = 0o755;

/// Errors of writing an artifact or the update module. Each names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum MenderError {
    #[error(transparent)]
    Bundle(#[from] DeployError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Key { path: PathBuf, message: String },
    #[error("device type {value:?}: {message}")]
    DeviceType { value: String, message: String },
}

impl From<BundleError> for MenderError {
    fn from(e: BundleError) -> Self {
        MenderError::Bundle(DeployError::from(e))
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> MenderError + '_ {
    move |source| MenderError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The signature scheme of a signing key, decided by the key itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyKind {
    Rsa,
    EcdsaP256,
}

/// A private key that signs an artifact's manifest the way Mender verifies it.
pub enum SigningKey {
    Rsa(Box<rsa::RsaPrivateKey>),
    EcdsaP256(p256::ecdsa::SigningKey),
}

impl SigningKey {
    /// Reads a PEM private key: RSA (PKCS#1 `RSA PRIVATE KEY` or PKCS#8 `PRIVATE KEY`) or
    /// ECDSA on P-256 (SEC1 `EC PRIVATE KEY` or PKCS#8). Anything else is refused with what
    /// it is, as Mender's clients verify only those two schemes.
    pub fn read(path: &Path) -> Result<SigningKey, MenderError> {
        use p256::pkcs8::DecodePrivateKey;
        use rsa::pkcs1::DecodeRsaPrivateKey;
        let bad = |message: String| MenderError::Key {
            path: path.to_path_buf(),
            message,
        };
        let text = fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let label = text
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("-----BEGIN ")
                    .and_then(|r| r.strip_suffix("-----"))
            })
            .ok_or_else(|| bad("not a PEM file (no -----BEGIN line)".into()))?;
        match label {
            "RSA PRIVATE KEY" => rsa::RsaPrivateKey::from_pkcs1_pem(&text)
                .map(|k| SigningKey::Rsa(Box::new(k)))
                .map_err(|e| bad(format!("not a valid RSA private key: {e}"))),
            "EC PRIVATE KEY" => p256::SecretKey::from_sec1_pem(&text)
                .map(|k| SigningKey::EcdsaP256(k.into()))
                .map_err(|e| {
                    bad(format!(
                        "not an EC private key on P-256 ({e}); Mender verifies ECDSA on P-256 only"
                    ))
                }),
            "PRIVATE KEY" => {
                if let Ok(k) = rsa::RsaPrivateKey::from_pkcs8_pem(&text) {
                    return Ok(SigningKey::Rsa(Box::new(k)));
                }
                if let Ok(k) = p256::ecdsa::SigningKey::from_pkcs8_pem(&text) {
                    return Ok(SigningKey::EcdsaP256(k));
                }
                Err(bad(format!(
                    "a PKCS#8 key of type {}; Mender artifacts are signed with RSA or ECDSA P-256 keys",
                    pkcs8_algorithm(&text)
                )))
            }
            "ENCRYPTED PRIVATE KEY" => Err(bad(
                "an encrypted private key; decrypt it first (openssl pkey -in KEY -out plain.pem)"
                    .into(),
            )),
            "PUBLIC KEY" | "RSA PUBLIC KEY" => Err(bad(
                "a public key; signing needs the private key (verifying uses the public one)"
                    .into(),
            )),
            other => Err(bad(format!(
                "unknown key type `{other}`; give an RSA or ECDSA P-256 private key in PEM"
            ))),
        }
    }

    pub fn kind(&self) -> KeyKind {
        match self {
            SigningKey::Rsa(_) => KeyKind::Rsa,
            SigningKey::EcdsaP256(_) => KeyKind::EcdsaP256,
        }
    }

    /// The signature of `message` as `manifest.sig` holds it: base64 of PKCS#1 v1.5 over
    /// SHA-256 (RSA), or of the 64 bytes r||s over SHA-256 (ECDSA P-256).
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        let raw: Vec<u8> = match self {
            SigningKey::Rsa(k) => {
                use rsa::signature::{RandomizedSigner, SignatureEncoding};
                // Blinded with fresh randomness; PKCS#1 v1.5 output does not depend on it.
                let s = rsa::pkcs1v15::SigningKey::<Sha256>::new((**k).clone());
                s.sign_with_rng(&mut rand_core::OsRng, message).to_vec()
            }
            SigningKey::EcdsaP256(k) => {
                use p256::ecdsa::signature::Signer;
                let s: p256::ecdsa::Signature = k.sign(message);
                s.to_bytes().to_vec()
            }
        };
        Base64::encode_string(&raw).into_bytes()
    }
}

/// The algorithm a PKCS#8 key names, for messages.
fn pkcs8_algorithm(pem: &str) -> String {
    use p256::pkcs8::der::Decode;
    let Ok((_, doc)) = p256::pkcs8::SecretDocument::from_pem(pem) else {
        return "unknown (it does not parse)".into();
    };
    match p256::pkcs8::PrivateKeyInfo::from_der(doc.as_bytes()) {
        Ok(info) => match info.algorithm.oid.to_string().as_str() {
            "1.3.101.112" => "Ed25519".into(),
            "1.3.101.113" => "Ed448".into(),
            "1.2.840.10045.2.1" => "EC on a curve other than P-256".into(),
            oid => format!("OID {oid}"),
        },
        Err(_) => "unknown (it does not parse)".into(),
    }
}

/// What goes into an artifact besides the bundle.
#[derive(Debug, Default, Clone)]
pub struct Options {
    /// Device types the artifact installs on; empty: the bundle's target profile name.
    pub device_types: Vec<String>,
    /// A private key (PEM) to sign the artifact's manifest with.
    pub signing_key: Option<PathBuf>,
    /// The bundle signer's public key: the bundle must be signed by it (as for deploy).
    pub trusted_key: Option<PathBuf>,
}

/// A written artifact.
#[derive(Debug, Clone, Serialize)]
pub struct Artifact {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub artifact_name: String,
    /// The release id the board gets: `releases/<release>/`, as SSH deploy names it.
    pub release: String,
    pub payload_type: String,
    pub device_types: Vec<String>,
    pub provides: BTreeMap<String, String>,
    /// The signature scheme, when signed.
    pub signed: Option<KeyKind>,
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    size: u64,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing {
            inner,
            hash: Sha256::new(),
            size: 0,
        }
    }

    fn finish(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.hash.finalize()), self.size)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Temporary files beside the output, removed however the writing ends.
struct Scratch(Vec<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

fn gzip<W: Write>(w: W) -> GzEncoder<W> {
    // No name, no mtime: the header is the same bytes every time.
    GzBuilder::new()
        .mtime(0)
        .write(w, Compression::new(GZIP_LEVEL))
}

fn append_bytes<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    bytes: &[u8],
    out: &Path,
) -> Result<(), MenderError> {
    let mut h = header(tar::EntryType::Regular, bytes.len() as u64, FILE_MODE);
    tar.append_data(&mut h, name, bytes).map_err(io_err(out))
}

fn check_device_type(t: &str) -> Result<(), MenderError> {
    let bad = |message: &str| MenderError::DeviceType {
        value: t.to_string(),
        message: message.to_string(),
    };
    if t.is_empty() {
        return Err(bad("empty"));
    }
    if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad(
            "has white space or control characters, which a device_type file cannot hold",
        ));
    }
    Ok(())
}

/// The bundle payload's name inside `data/0000.tar.gz`: the release id and `.tar`.
pub fn payload_name(release: &str) -> String {
    format!("{release}.tar")
}

/// Writes a Mender artifact at `out` whose one payload is the verified bundle folder
/// `bundle_dir`. The output appears by one rename when complete; on any error nothing is left.
///
/// The payload is the bundle as an uncompressed tar ([`bundle::write_tar`], entries at the
/// top): the update module unpacks it with the board's own `tar`, which busybox and GNU both
/// have, while zstd is missing from many board images; the Mender client already stores the
/// payload out of `data/0000.tar.gz`, so compressing it once more would save nothing on the
/// wire.
pub fn write_artifact(
    bundle_dir: &Path,
    opts: &Options,
    out: &Path,
) -> Result<Artifact, MenderError> {
    let key = opts
        .signing_key
        .as_deref()
        .map(SigningKey::read)
        .transpose()?;
    let b = deploy::open_bundle(bundle_dir, opts.trusted_key.as_deref())?;
    let device_types = if opts.device_types.is_empty() {
        vec![b.manifest.target.profile.clone()]
    } else {
        opts.device_types.clone()
    };
    for t in &device_types {
        check_device_type(t)?;
    }
    let release = b.release_id.clone();
    let name = payload_name(&release);

    let final_tmp = tmp_sibling(out);
    let payload_tmp = final_tmp.with_extension("payload");
    let data_tmp = final_tmp.with_extension("data");
    let _scratch = Scratch(vec![
        final_tmp.clone(),
        payload_tmp.clone(),
        data_tmp.clone(),
    ]);

    // The payload: the bundle as a plain tar, hashed as it is written.
    let file = File::create(&payload_tmp).map_err(io_err(&payload_tmp))?;
    // Every file verified against the manifest before it goes into the artifact.
    let dir = b.local_dir()?;
    let w = bundle::write_tar(dir, None, Hashing::new(BufWriter::new(file)), &payload_tmp)?;
    let (w, payload_sha, payload_size) = w.finish();
    w.into_inner()
        .map_err(|e| MenderError::Io {
            path: payload_tmp.clone(),
            source: e.into_error(),
        })?
        .sync_all()
        .map_err(io_err(&payload_tmp))?;

    // data/0000.tar.gz: one entry, the payload.
    let file = File::create(&data_tmp).map_err(io_err(&data_tmp))?;
    let mut tar = tar::Builder::new(gzip(BufWriter::new(file)));
    let mut h = header(tar::EntryType::Regular, payload_size, FILE_MODE);
    let payload = File::open(&payload_tmp).map_err(io_err(&payload_tmp))?;
    tar.append_data(&mut h, &name, BufReader::new(payload))
        .map_err(io_err(&data_tmp))?;
    let gz = tar.into_inner().map_err(io_err(&data_tmp))?;
    gz.finish()
        .map_err(io_err(&data_tmp))?
        .into_inner()
        .map_err(|e| MenderError::Io {
            path: data_tmp.clone(),
            source: e.into_error(),
        })?
        .sync_all()
        .map_err(io_err(&data_tmp))?;
    fs::remove_file(&payload_tmp).map_err(io_err(&payload_tmp))?;
    let data_size = fs::metadata(&data_tmp).map_err(io_err(&data_tmp))?.len();

    // header.tar.gz: header-info, then the payload's type-info.
    let mut provides = BTreeMap::new();
    provides.insert(VERSION_PROVIDE.to_string(), release.clone());
    let header_info = json!({
        "payloads": [{"type": PAYLOAD_TYPE}],
        "artifact_provides": {"artifact_name": release},
        "artifact_depends": {"device_type": device_types},
    });
    let type_info = json!({
        "type": PAYLOAD_TYPE,
        "artifact_provides": provides,
        "clears_artifact_provides": [format!("rootfs-image.{PAYLOAD_TYPE}.*")],
    });
    let mut htar = tar::Builder::new(gzip(Vec::new()));
    append_bytes(
        &mut htar,
        "header-info",
        &serde_json::to_vec(&header_info).expect("JSON"),
        out,
    )?;
    append_bytes(
        &mut htar,
        "headers/0000/type-info",
        &serde_json::to_vec(&type_info).expect("JSON"),
        out,
    )?;
    let header_gz = htar
        .into_inner()
        .and_then(GzEncoder::finish)
        .map_err(io_err(out))?;

    let version =
        serde_json::to_vec(&json!({"format": "mender", "version": FORMAT_VERSION})).expect("JSON");
    let sha = |b: &[u8]| hex::encode(Sha256::digest(b));
    let mut lines = [
        (format!("data/0000/{name}"), payload_sha),
        ("header.tar.gz".to_string(), sha(&header_gz)),
        ("version".to_string(), sha(&version)),
    ];
    lines.sort();
    let manifest: String = lines.iter().map(|(n, s)| format!("{s}  {n}\n")).collect();

    // The artifact: version, manifest, manifest.sig, header.tar.gz, data/0000.tar.gz, in the
    // order the client reads them.
    let file = File::create(&final_tmp).map_err(io_err(&final_tmp))?;
    let mut tar = tar::Builder::new(Hashing::new(BufWriter::new(file)));
    append_bytes(&mut tar, "version", &version, &final_tmp)?;
    append_bytes(&mut tar, "manifest", manifest.as_bytes(), &final_tmp)?;
    if let Some(k) = &key {
        append_bytes(
            &mut tar,
            "manifest.sig",
            &k.sign(manifest.as_bytes()),
            &final_tmp,
        )?;
    }
    append_bytes(&mut tar, "header.tar.gz", &header_gz, &final_tmp)?;
    let mut h = header(tar::EntryType::Regular, data_size, FILE_MODE);
    let data = File::open(&data_tmp).map_err(io_err(&data_tmp))?;
    tar.append_data(&mut h, "data/0000.tar.gz", BufReader::new(data))
        .map_err(io_err(&final_tmp))?;
    let (w, artifact_sha, artifact_size) = tar.into_inner().map_err(io_err(&final_tmp))?.finish();
    let file = w.into_inner().map_err(|e| MenderError::Io {
        path: final_tmp.clone(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io_err(&final_tmp))?;
    set_mode(&final_tmp, FILE_MODE).map_err(io_err(&final_tmp))?;
    fs::rename(&final_tmp, out).map_err(io_err(out))?;

    Ok(Artifact {
        path: out.to_path_buf(),
        sha256: artifact_sha,
        size: artifact_size,
        artifact_name: release.clone(),
        release,
        payload_type: PAYLOAD_TYPE.to_string(),
        device_types,
        provides,
        signed: key.as_ref().map(SigningKey::kind),
    })
}

/// Writes the update module into `dir` as `edgepack-bundle` (mode 0755), through a temporary
/// name. Returns its path.
pub fn write_module(dir: &Path) -> Result<PathBuf, MenderError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = dir.join(PAYLOAD_TYPE);
    let tmp = tmp_sibling(&path);
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(MODULE.as_bytes())?;
        f.sync_all()?;
        set_mode(&tmp, EXEC_MODE)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(MenderError::Io {
            path: tmp,
            source: e,
        });
    }
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsa_and_p256_signatures_verify_with_their_public_keys() {
        use p256::ecdsa::signature::Verifier;
        let msg = b"abc  version\n";
        let ec = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
        let sig = SigningKey::EcdsaP256(ec.clone()).sign(msg);
        let raw = Base64::decode_vec(std::str::from_utf8(&sig).unwrap()).unwrap();
        assert_eq!(raw.len(), 64, "raw r||s");
        let s = p256::ecdsa::Signature::from_slice(&raw).unwrap();
        ec.verifying_key().verify(msg, &s).unwrap();
        // Deterministic: the same key and manifest give the same bytes.
        assert_eq!(sig, SigningKey::EcdsaP256(ec).sign(msg));

        let rk = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 1024).unwrap();
        let pk = rsa::RsaPublicKey::from(&rk);
        let sig = SigningKey::Rsa(Box::new(rk.clone())).sign(msg);
        let raw = Base64::decode_vec(std::str::from_utf8(&sig).unwrap()).unwrap();
        let digest = Sha256::digest(msg);
        pk.verify(rsa::Pkcs1v15Sign::new::<Sha256>(), &digest, &raw)
            .unwrap();
        assert_eq!(sig, SigningKey::Rsa(Box::new(rk)).sign(msg));
    }

    #[test]
    fn key_files_of_other_kinds_are_refused_by_what_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let ed = dir.path().join("ed.pem");
        crate::sign::generate(&ed, &dir.path().join("ed.pub.pem")).unwrap();
        let e = SigningKey::read(&ed).err().unwrap().to_string();
        assert!(e.contains("Ed25519") && e.contains("ed.pem"), "{e}");
        let other = dir.path().join("cert.pem");
        fs::write(
            &other,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = SigningKey::read(&other).err().unwrap().to_string();
        assert!(e.contains("unknown key type `CERTIFICATE`"), "{e}");
    }
}
