//! The stage cache: every finished stage's output under a content address.
//!
//! ```text
//! <cache>/stages/<kind>-<key>/     a finished stage: out/ (its files) and stage.json
//! <cache>/tmp/<kind>-<key>.<pid>/  a stage being built; renamed into stages/ when complete
//! <cache>/resume/<kind>-<key>/     what a long stage (training) saved to continue after an
//!                                  interruption; removed when the stage is committed
//! <cache>/hashes.json              SHA-256 of input files, keyed by path, size, mtime, inode
//! ```
//!
//! The key of a stage is the SHA-256 of its kind, its parameters, the edgepack version, the
//! keys of the stages it reads and the contents of the files it reads (as cargo fingerprints a
//! unit), so a finished entry is never wrong for the work it names. A stage is written in
//! `tmp/` and becomes visible by one rename: a build that is interrupted (Ctrl-C, kill -9)
//! leaves at most a temporary folder, which the next build removes, and never a half entry.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{RecipeError, Result};

/// What a finished entry records about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryInfo {
    pub kind: String,
    pub key: String,
    pub id: String,
    pub seconds: f64,
    /// The stage's own summary (sizes, metrics, reports).
    pub result: serde_json::Value,
}

/// A cache folder.
pub struct Cache {
    root: PathBuf,
    hashes: Mutex<BTreeMap<String, String>>,
}

/// Whether a process with this id runs (the owner of a temporary folder).
pub(crate) fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

impl Cache {
    /// Opens (creating) the cache at `root` and removes temporary folders that no running
    /// build owns.
    pub fn open(root: &Path) -> Result<Cache> {
        for d in ["stages", "tmp", "resume"] {
            fs::create_dir_all(root.join(d)).map_err(|e| RecipeError::io(&root.join(d), e))?;
        }
        let tmp = root.join("tmp");
        if let Ok(rd) = fs::read_dir(&tmp) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let owner = name.rsplit('.').next().and_then(|p| p.parse::<u32>().ok());
                if owner.is_none_or(|p| p != std::process::id() && !pid_alive(p)) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let hashes = fs::read(root.join("hashes.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Ok(Cache {
            root: root.to_path_buf(),
            hashes: Mutex::new(hashes),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn entry_name(kind: &str, key: &str) -> String {
        format!("{kind}-{}", &key[..16.min(key.len())])
    }

    /// The folder of a finished entry.
    pub fn entry_dir(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join("stages").join(Self::entry_name(kind, key))
    }

    /// A finished entry's record, if it exists and is for exactly this key.
    pub fn lookup(&self, kind: &str, key: &str) -> Option<EntryInfo> {
        let dir = self.entry_dir(kind, key);
        let info: EntryInfo =
            serde_json::from_slice(&fs::read(dir.join("stage.json")).ok()?).ok()?;
        (info.key == key && dir.join("out").is_dir()).then_some(info)
    }

    /// A fresh temporary folder for building the entry; its `out/` is where the stage writes.
    pub fn begin(&self, kind: &str, key: &str) -> Result<PathBuf> {
        let tmp = self.root.join("tmp").join(format!(
            "{}.{}",
            Self::entry_name(kind, key),
            std::process::id()
        ));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| RecipeError::io(&tmp, e))?;
        }
        fs::create_dir_all(tmp.join("out")).map_err(|e| RecipeError::io(&tmp, e))?;
        Ok(tmp)
    }

    /// Makes the entry built in `tmp` visible: records `info`, syncs, renames.
    pub fn commit(&self, tmp: &Path, info: &EntryInfo) -> Result<PathBuf> {
        let bytes =
            serde_json::to_vec_pretty(info).map_err(|e| RecipeError::Cache(e.to_string()))?;
        let meta = tmp.join("stage.json");
        fs::write(&meta, bytes).map_err(|e| RecipeError::io(&meta, e))?;
        sync_tree(tmp)?;
        let dst = self.entry_dir(&info.kind, &info.key);
        if dst.exists() {
            // Another build finished the same work first; its entry is equally good.
            let _ = fs::remove_dir_all(tmp);
            return Ok(dst);
        }
        fs::rename(tmp, &dst).map_err(|e| RecipeError::io(&dst, e))?;
        if let Some(parent) = dst.parent() {
            if let Ok(d) = fs::File::open(parent) {
                let _ = d.sync_all();
            }
        }
        Ok(dst)
    }

    /// Where a stage keeps what lets a later build continue it (training checkpoints): it
    /// survives an interrupted build, unlike `tmp/`, and goes when the entry is committed.
    pub fn resume_dir(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join("resume").join(Self::entry_name(kind, key))
    }

    /// Drops a finished stage's resume folder.
    pub fn finish(&self, kind: &str, key: &str) {
        let _ = fs::remove_dir_all(self.resume_dir(kind, key));
    }

    /// Drops a failed stage's temporary folder.
    pub fn abandon(&self, tmp: &Path) {
        let _ = fs::remove_dir_all(tmp);
    }

    /// SHA-256 (hex) of a file's bytes, or of a folder's files (relative names and contents,
    /// sorted), remembered by path, size, mtime and inode so an unchanged input is not read
    /// again.
    pub fn hash_path(&self, path: &Path) -> Result<String> {
        let meta = fs::metadata(path).map_err(|e| RecipeError::io(path, e))?;
        if meta.is_dir() {
            let mut files = Vec::new();
            walk(path, path, &mut files)?;
            files.sort();
            let mut h = Sha256::new();
            for (rel, abs) in files {
                h.update(rel.as_bytes());
                h.update([0]);
                h.update(self.hash_path(&abs)?.as_bytes());
                h.update([0]);
            }
            return Ok(hex(&h.finalize()));
        }
        let stamp = stamp(path, &meta);
        if let Some(h) = self.hashes.lock().expect("hash memo").get(&stamp) {
            return Ok(h.clone());
        }
        let digest = sha256_file(path)?;
        self.hashes
            .lock()
            .expect("hash memo")
            .insert(stamp, digest.clone());
        Ok(digest)
    }

    /// Writes the hash memo (atomically; a lost update only costs a re-hash).
    pub fn save_hashes(&self) -> Result<()> {
        let map = self.hashes.lock().expect("hash memo").clone();
        let path = self.root.join("hashes.json");
        let tmp = self
            .root
            .join(format!(".hashes.json.{}.tmp", std::process::id()));
        let bytes = serde_json::to_vec(&map).map_err(|e| RecipeError::Cache(e.to_string()))?;
        fs::write(&tmp, bytes).map_err(|e| RecipeError::io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| RecipeError::io(&path, e))
    }

    /// Removes every entry not in `keep` (entry folder names); returns the bytes freed.
    pub fn gc(&self, keep: &std::collections::BTreeSet<PathBuf>) -> Result<u64> {
        let mut freed = 0;
        let stages = self.root.join("stages");
        for e in fs::read_dir(&stages).map_err(|e| RecipeError::io(&stages, e))? {
            let e = e.map_err(|e| RecipeError::io(&stages, e))?;
            if !keep.contains(&e.path()) {
                freed += tree_size(&e.path());
                fs::remove_dir_all(e.path()).map_err(|x| RecipeError::io(&e.path(), x))?;
            }
        }
        // Saved progress of a stage no kept recipe has any more.
        let resume = self.root.join("resume");
        for e in fs::read_dir(&resume).map_err(|e| RecipeError::io(&resume, e))? {
            let e = e.map_err(|e| RecipeError::io(&resume, e))?;
            if !keep.contains(&stages.join(e.file_name())) {
                freed += tree_size(&e.path());
                fs::remove_dir_all(e.path()).map_err(|x| RecipeError::io(&e.path(), x))?;
            }
        }
        Ok(freed)
    }

    /// Bytes held by finished entries and saved progress.
    pub fn size(&self) -> u64 {
        tree_size(&self.root.join("stages")) + tree_size(&self.root.join("resume"))
    }
}

fn stamp(path: &Path, meta: &fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let abs = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    format!(
        "{}\u{0}{}\u{0}{mtime}\u{0}{}\u{0}{}",
        abs.display(),
        meta.len(),
        meta.ino(),
        meta.ctime_nsec() as i128 + meta.ctime() as i128 * 1_000_000_000
    )
}

fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    for e in fs::read_dir(dir).map_err(|e| RecipeError::io(dir, e))? {
        let e = e.map_err(|e| RecipeError::io(dir, e))?;
        let p = e.path();
        let ty = e.file_type().map_err(|x| RecipeError::io(&p, x))?;
        if ty.is_dir() {
            walk(base, &p, out)?;
        } else if ty.is_file() {
            let rel = p
                .strip_prefix(base)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned();
            out.push((rel, p));
        }
    }
    Ok(())
}

pub(crate) fn tree_size(p: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(p) else {
        return 0;
    };
    if meta.is_dir() {
        fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| tree_size(&e.path())).sum())
            .unwrap_or(0)
    } else {
        meta.len()
    }
}

fn sync_tree(p: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(p).map_err(|e| RecipeError::io(p, e))?;
    if meta.is_dir() {
        for e in fs::read_dir(p)
            .map_err(|e| RecipeError::io(p, e))?
            .flatten()
        {
            sync_tree(&e.path())?;
        }
    } else if meta.is_file() {
        let f = fs::File::open(p).map_err(|e| RecipeError::io(p, e))?;
        f.sync_all().map_err(|e| RecipeError::io(p, e))?;
    }
    Ok(())
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256 (hex) of a file's bytes, read a MiB at a time.
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).map_err(|e| RecipeError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| RecipeError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// SHA-256 (hex) of a string.
pub(crate) fn sha256_str(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_visible_only_after_commit_and_stale_temporaries_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path()).unwrap();
        let key = "ab".repeat(32);
        assert!(c.lookup("export", &key).is_none());
        let tmp = c.begin("export", &key).unwrap();
        fs::write(tmp.join("out/model.gguf"), b"x").unwrap();
        assert!(c.lookup("export", &key).is_none(), "not before commit");
        let info = EntryInfo {
            kind: "export".into(),
            key: key.clone(),
            id: "export:x".into(),
            seconds: 0.0,
            result: serde_json::json!({}),
        };
        let dir = c.commit(&tmp, &info).unwrap();
        assert!(dir.join("out/model.gguf").is_file());
        assert_eq!(c.lookup("export", &key).unwrap().id, "export:x");
        // A temporary folder of a dead build is swept at the next open.
        let stale = d.path().join("tmp/calibrate-0000000000000000.999999999");
        fs::create_dir_all(&stale).unwrap();
        let _ = Cache::open(d.path()).unwrap();
        assert!(!stale.exists());
    }

    #[test]
    fn a_file_hash_follows_its_bytes() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(&d.path().join("c")).unwrap();
        let f = d.path().join("a.txt");
        fs::write(&f, b"one").unwrap();
        let h1 = c.hash_path(&f).unwrap();
        assert_eq!(h1, hex(&Sha256::digest(b"one")));
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::write(&f, b"two").unwrap();
        assert_ne!(c.hash_path(&f).unwrap(), h1);
        let dir_hash = c.hash_path(d.path().join("c").parent().unwrap()).unwrap();
        assert_eq!(dir_hash.len(), 64);
    }
}
