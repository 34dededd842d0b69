//! Output files that appear whole or not at all: written to a temporary name in the target's
//! folder, fsynced, then renamed over the target. Inputs are never written.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// The temporary files and folders this process is writing, so that a signal handler can
/// remove them ([`remove_temporaries`]) before the process ends.
static LIVE: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn track(tmp: &Path) {
    if let Ok(mut live) = LIVE.lock() {
        live.insert(tmp.to_path_buf());
    }
}

fn untrack(tmp: &Path) {
    if let Ok(mut live) = LIVE.lock() {
        live.remove(tmp);
    }
}

/// Removes every temporary output this process has open. For a SIGINT/SIGTERM handler that
/// ends the process next: the outputs never appear, and nothing half-written stays behind.
pub fn remove_temporaries() {
    let live = match LIVE.lock() {
        Ok(mut l) => std::mem::take(&mut *l),
        Err(_) => return,
    };
    for p in live {
        if p.is_dir() {
            let _ = fs::remove_dir_all(&p);
        } else {
            let _ = fs::remove_file(&p);
        }
    }
}

/// The temporary name of an output `name` in `dir` for this process: `.<name>.<pid>.tmp`.
fn temporary(dir: &Path, name: &std::ffi::OsStr) -> PathBuf {
    dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ))
}

/// Removes temporaries of `name` in `dir` that processes no longer running left behind (a
/// run killed with SIGKILL, or a crash): `.<name>.<pid>.tmp` whose pid is gone. Only where
/// `/proc` tells which processes run.
fn sweep(dir: &Path, name: &std::ffi::OsStr) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|f| f.strip_suffix(".tmp"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => {
                let _ = fs::remove_dir_all(&path);
            }
            Ok(t) if t.is_file() => {
                let _ = fs::remove_file(&path);
            }
            _ => {}
        }
    }
}

/// A file being written; it becomes visible at `path` only on [`AtomicFile::commit`]. Dropping
/// it uncommitted removes the temporary file.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
}

/// Buffer size for streamed writes: large enough that each write is one syscall per MiB.
const WRITE_BUFFER: usize = 1 << 20;

impl AtomicFile {
    pub fn create(path: &Path) -> Result<Self> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        let name = path
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
        sweep(&dir, name);
        let tmp = temporary(&dir, name);
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        track(&tmp);
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            out: Some(BufWriter::with_capacity(WRITE_BUFFER, file)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let out = self.out.as_mut().expect("written after commit");
        out.write_all(bytes).map_err(|e| Error::io(&self.tmp, e))
    }

    /// Flushes, fsyncs and renames into place.
    pub fn commit(mut self) -> Result<()> {
        let out = self.out.take().expect("committed twice");
        let file = out
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        drop(file);
        fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        untrack(&self.tmp);
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.as_mut().expect("written after commit").write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.as_mut().expect("written after commit").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
            untrack(&self.tmp);
        }
    }
}

/// Writes a small file atomically.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes)?;
    f.commit()
}

/// A folder output that appears whole or not at all: built in a temporary sibling folder and
/// renamed into place. An existing target folder is replaced only after the new one is complete.
pub struct AtomicDir {
    path: PathBuf,
    tmp: PathBuf,
    done: bool,
}

impl AtomicDir {
    /// Starts a folder output; refuses a target that exists and is not an empty folder.
    pub fn create(path: &Path) -> Result<Self> {
        if path.exists() {
            let empty = fs::read_dir(path)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty {
                return Err(Error::Invalid(format!(
                    "{}: exists and is not an empty folder\nhint: choose a new -o path or remove it first",
                    path.display()
                )));
            }
        }
        let parent = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let name = path
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("{}: not a folder path", path.display())))?;
        sweep(&parent, name);
        let tmp = temporary(&parent, name);
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        track(&tmp);
        Ok(AtomicDir {
            path: path.to_path_buf(),
            tmp,
            done: false,
        })
    }

    /// Where files go while the folder is being built.
    pub fn staging(&self) -> &Path {
        &self.tmp
    }

    /// Renames the finished folder into place. An existing target is replaced only when it is
    /// an empty folder: a user's files are never deleted.
    pub fn commit(mut self) -> Result<()> {
        if self.path.is_dir() {
            fs::remove_dir(&self.path).map_err(|e| Error::io(&self.path, e))?;
        }
        fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        untrack(&self.tmp);
        self.done = true;
        Ok(())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.tmp);
            untrack(&self.tmp);
        }
    }
}

/// Refuses an output that would overwrite or sit inside one of the inputs.
pub fn ensure_not_input(output: &Path, inputs: &[&Path]) -> Result<()> {
    let out = absolute(output);
    for input in inputs {
        let inp = absolute(input);
        // Equal paths would overwrite; an output folder that holds an input would replace it.
        if out == inp || inp.starts_with(&out) {
            return Err(Error::Invalid(format!(
                "{}: the output path is an input; refusing to overwrite it\nhint: choose another -o path",
                output.display()
            )));
        }
    }
    Ok(())
}

fn absolute(p: &Path) -> PathBuf {
    if let Ok(c) = fs::canonicalize(p) {
        return c;
    }
    // A path that does not exist yet: canonicalize the parent.
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => fs::canonicalize(parent)
            .map(|c| c.join(name))
            .unwrap_or_else(|_| p.to_path_buf()),
        _ => std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommitted_file_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        {
            let mut f = AtomicFile::create(&target).unwrap();
            f.write_all(b"half").unwrap();
        }
        assert!(!target.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn committed_file_replaces_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        fs::write(&target, b"old").unwrap();
        write_file(&target, b"new").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn output_equal_to_an_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("model.gguf");
        fs::write(&input, b"x").unwrap();
        let err = ensure_not_input(&input, &[&input]).unwrap_err();
        assert!(err.to_string().contains("output path is an input"));
        assert!(ensure_not_input(&dir.path().join("other.gguf"), &[&input]).is_ok());
    }
}
