//! ed25519 keys for bundles: generate a key pair, read and write it as PEM (PKCS#8 private key,
//! SubjectPublicKeyInfo public key, the formats OpenSSL reads), and sign or check the exact
//! bytes of a manifest. A signature is the raw 64 bytes of RFC 8032 Ed25519.

use std::path::Path;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, KeypairBytes,
};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::error::BundleError;
use crate::io::write_atomic;

/// File mode of a private key: readable by its owner only.
const SECRET_MODE: u32 = 0o600;
const PUBLIC_MODE: u32 = 0o644;

fn key_error(path: &Path, message: impl Into<String>) -> BundleError {
    BundleError::Key {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Creates a new key pair from the operating system's random source and writes it as
/// `private_pem` (PKCS#8, mode 0600) and `public_pem`. Existing files are never overwritten.
pub fn generate(private_pem: &Path, public_pem: &Path) -> Result<VerifyingKey, BundleError> {
    for p in [private_pem, public_pem] {
        if p.exists() {
            return Err(key_error(
                p,
                "exists; refusing to overwrite a key\nhint: choose another -o path",
            ));
        }
    }
    let mut seed = [0u8; ed25519_dalek::SECRET_KEY_LENGTH];
    getrandom::fill(&mut seed)
        .map_err(|e| key_error(private_pem, format!("no random source: {e}")))?;
    let key = SigningKey::from_bytes(&seed);
    seed.fill(0);
    // PKCS#8 v1 (no embedded public key): the form `openssl genpkey` writes and OpenSSL 3.0
    // reads; it rejects ed25519-dalek's default v2 encoding.
    let pair = KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: None,
    };
    let secret = pair
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| key_error(private_pem, e.to_string()))?;
    let public = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| key_error(public_pem, e.to_string()))?;
    write_atomic(private_pem, secret.as_bytes(), SECRET_MODE)?;
    write_atomic(public_pem, public.as_bytes(), PUBLIC_MODE)?;
    Ok(key.verifying_key())
}

/// Reads a PKCS#8 PEM private key (`edgepack keygen`, or `openssl genpkey -algorithm ed25519`).
pub fn read_secret_key(path: &Path) -> Result<SigningKey, BundleError> {
    let text = std::fs::read_to_string(path).map_err(|e| BundleError::io(path, e))?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| {
        key_error(
            path,
            format!("not an ed25519 PKCS#8 PEM private key ({e})\nhint: make one with `edgepack keygen -o key`"),
        )
    })
}

/// Reads a PEM public key (SubjectPublicKeyInfo, `-----BEGIN PUBLIC KEY-----`).
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, BundleError> {
    let text = std::fs::read_to_string(path).map_err(|e| BundleError::io(path, e))?;
    VerifyingKey::from_public_key_pem(&text).map_err(|e| {
        let hint = if text.contains("PRIVATE KEY") {
            "\nhint: this is a private key; pass the .pub.pem file `edgepack keygen` wrote beside it"
        } else {
            ""
        };
        key_error(
            path,
            format!("not an ed25519 PEM public key ({e}){hint}"),
        )
    })
}

/// Signs `bytes`; the result is what `manifest.sig` holds.
pub fn sign(key: &SigningKey, bytes: &[u8]) -> [u8; ed25519_dalek::SIGNATURE_LENGTH] {
    key.sign(bytes).to_bytes()
}

/// Whether `sig` is `key`'s signature of `bytes` (strict RFC 8032 verification).
pub fn verify(key: &VerifyingKey, bytes: &[u8], sig: &[u8]) -> bool {
    match Signature::from_slice(sig) {
        Ok(s) => key.verify_strict(bytes, &s).is_ok(),
        Err(_) => false,
    }
}

/// A short fingerprint of a public key to show users: the first 16 hex digits of the SHA-256
/// of its 32 bytes.
pub fn fingerprint(key: &VerifyingKey) -> String {
    let d = Sha256::digest(key.as_bytes());
    hex::encode(&d[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_read_back_and_sign() {
        let dir = tempfile::tempdir().unwrap();
        let (sk, pk) = (dir.path().join("k.pem"), dir.path().join("k.pub.pem"));
        let vk = generate(&sk, &pk).unwrap();
        let secret = read_secret_key(&sk).unwrap();
        assert_eq!(secret.verifying_key(), vk);
        assert_eq!(read_public_key(&pk).unwrap(), vk);
        let sig = sign(&secret, b"manifest");
        assert!(verify(&vk, b"manifest", &sig));
        assert!(!verify(&vk, b"manifesT", &sig));
        let e = generate(&sk, &dir.path().join("other.pub.pem")).unwrap_err();
        assert!(e.to_string().contains("k.pem"), "{e}");
        let e = read_public_key(&sk).unwrap_err().to_string();
        assert!(e.contains("private key"), "{e}");
    }
}
