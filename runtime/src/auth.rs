//! The optional API key: a bearer token read from a file the operator protects, compared in
//! constant time with what a request's `Authorization` header carries.

use std::path::Path;

/// The token every request but `/health` must carry as `Authorization: Bearer <token>`.
pub struct ApiKey(Vec<u8>);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

impl ApiKey {
    /// Reads the token from `path`: the file's text without surrounding whitespace. An empty
    /// token, a token with whitespace or control characters inside (it could not travel in a
    /// header as one word), and a file that every user may read or write are refused.
    pub fn from_file(path: &Path) -> Result<ApiKey, String> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mode = meta.permissions().mode();
        if mode & 0o006 != 0 {
            return Err(format!(
                "{}: every user may read or write it (mode {:o}); chmod o-rw it",
                path.display(),
                mode & 0o777
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        ApiKey::new(text.trim()).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A token as given.
    pub fn new(token: &str) -> Result<ApiKey, String> {
        if token.is_empty() {
            return Err("the API key is empty".into());
        }
        if token
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b >= 0x80)
        {
            return Err(
                "the API key holds whitespace, control or non-ASCII characters; use one word of printable ASCII"
                    .into(),
            );
        }
        Ok(ApiKey(token.as_bytes().to_vec()))
    }

    /// Whether an `Authorization` header value carries this token (`Bearer` in any case, as
    /// RFC 9110 makes auth schemes case-insensitive).
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let scheme = b"bearer ";
        if value.len() < scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return false;
        }
        let given = value[scheme.len()..].trim_ascii();
        constant_time_eq(given, &self.0)
    }
}

/// Whether `a` equals `b`, in time that depends only on their lengths: every byte is
/// compared whatever the first difference, so a client cannot find the token byte by byte
/// from how long a refusal takes.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_accepted() {
        let key = ApiKey::new("s3cret-token").unwrap();
        assert!(key.accepts(Some(b"Bearer s3cret-token")));
        assert!(key.accepts(Some(b"bearer s3cret-token")));
        for bad in [
            &b"Bearer s3cret-toke"[..],
            b"Bearer s3cret-token2",
            b"Bearer S3cret-token",
            b"Basic s3cret-token",
            b"s3cret-token",
            b"Bearer ",
            b"",
        ] {
            assert!(!key.accepts(Some(bad)), "{}", String::from_utf8_lossy(bad));
        }
        assert!(!key.accepts(None));
    }

    #[test]
    fn constant_time_eq_compares_whole_slices() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn empty_spaced_and_world_readable_key_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        let write = |text: &str, mode: u32| {
            std::fs::write(&file, text).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("tok3n\n", 0o600);
        assert!(ApiKey::from_file(&file)
            .unwrap()
            .accepts(Some(b"Bearer tok3n")));
        write(" \n", 0o600);
        assert!(ApiKey::from_file(&file).unwrap_err().contains("empty"));
        write("two words\n", 0o600);
        assert!(ApiKey::from_file(&file).unwrap_err().contains("whitespace"));
        write("tok3n\n", 0o644);
        assert!(ApiKey::from_file(&file).unwrap_err().contains("chmod o-rw"));
        assert!(ApiKey::from_file(&dir.path().join("none")).is_err());
    }
}
