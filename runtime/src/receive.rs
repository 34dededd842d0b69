//! `edgepack-runtime receive`: the board's end of a deploy's upload. `edgepack deploy` sends
//! the incoming release's runtime first (received by a shell pipeline of `zstd`, `tee` and
//! coreutils' `sha256sum`, and checked against the signed manifest), then runs that runtime
//! to receive the rest: one process that decompresses, hashes with the CPU's SHA-256
//! instructions where it has them, and writes, in place of three processes and two pipes.
//! Coreutils' `sha256sum` has no such instructions and is what limits a board's intake.
//!
//! The file is written as it arrives (appended, so a cut upload resumes where it stopped),
//! and the kernel is asked to start writing each finished stretch back to disk while the next
//! one arrives, so the flush before the release's switch finds little left to write.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Bytes read from the stream per step.
const BUF: usize = 1 << 20;
/// Bytes written before their write-back to disk is started.
const WRITEBACK: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("{}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("the stream for {}: {source}", path.display())]
    Stream { path: PathBuf, source: io::Error },
}

/// What one receive wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// sha256 of the bytes appended (after decompression), lowercase hex.
    pub sha256: String,
    /// Bytes appended.
    pub appended: u64,
    /// The file's size afterwards.
    pub size: u64,
}

/// Appends `input` (a zstd stream when `zstd`) to `path`, creating its folder and the file,
/// and returns the sha256 of what was appended and the file's size. A failed write or a
/// corrupt stream leaves the bytes written so far in place (a resumed upload compares them
/// before it goes on) and names the file.
pub fn receive(input: impl Read, path: &Path, zstd: bool) -> Result<Received, ReceiveError> {
    let write_err = |source| ReceiveError::Write {
        path: path.to_path_buf(),
        source,
    };
    let stream_err = |source| ReceiveError::Stream {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(write_err)?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(write_err)?;
    let start = file.metadata().map_err(write_err)?.len();
    let mut input: Box<dyn Read> = if zstd {
        Box::new(zstd::stream::read::Decoder::new(input).map_err(stream_err)?)
    } else {
        Box::new(input)
    };
    // Write-back is started from a thread of its own: the request can wait for the disk's
    // queue, and a receive loop that waited would stall the stream (measured: a 100 Mbit/s
    // upload took 8% longer).
    let (kick, kicks) = std::sync::mpsc::channel::<(u64, u64)>();
    let wb_file = file.try_clone().map_err(write_err)?;
    let flusher = std::thread::spawn(move || {
        for (offset, len) in kicks {
            start_writeback(&wb_file, offset, len);
        }
    });
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; BUF];
    let mut appended = 0u64;
    let mut flushed = 0u64;
    let res = loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(stream_err(e)),
        };
        if let Err(e) = file.write_all(&buf[..n]) {
            break Err(write_err(e));
        }
        hash.update(&buf[..n]);
        appended += n as u64;
        if appended - flushed >= WRITEBACK {
            let _ = kick.send((start + flushed, appended - flushed));
            flushed = appended;
        }
    };
    if appended > flushed {
        let _ = kick.send((start + flushed, appended - flushed));
    }
    drop(kick);
    let _ = flusher.join();
    res?;
    Ok(Received {
        sha256: hex::encode(hash.finalize()),
        appended,
        size: start + appended,
    })
}

/// Asks the kernel to start writing `len` bytes at `offset` back to disk without waiting for
/// it (Linux's `sync_file_range` with `SYNC_FILE_RANGE_WRITE`). Only a head start for the
/// flush the release gets before its switch, so a file system or kernel that refuses it
/// changes nothing.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: the descriptor is open for the call's duration; the call reads no memory.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_: &File, _: u64, _: u64) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    #[test]
    fn appends_plain_and_zstd_streams_and_reports_the_appended_bytes_hash_and_the_size() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("model/sub/weights.bin");
        let first: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let r = receive(&first[..], &path, false).unwrap();
        assert_eq!(r.sha256, sha(&first));
        assert_eq!((r.appended, r.size), (3_000_000, 3_000_000));
        let second: Vec<u8> = (0..20_000_000u32).map(|i| (i / 7 % 256) as u8).collect();
        let packed = zstd::bulk::compress(&second, 1).unwrap();
        let r = receive(&packed[..], &path, true).unwrap();
        assert_eq!(r.sha256, sha(&second), "the hash is of what was appended");
        assert_eq!((r.appended, r.size), (20_000_000, 23_000_000));
        let all = std::fs::read(&path).unwrap();
        assert_eq!(&all[..3_000_000], &first[..]);
        assert_eq!(&all[3_000_000..], &second[..]);
    }

    #[test]
    fn a_corrupt_stream_names_the_file_and_keeps_what_was_written() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("f");
        std::fs::write(&path, b"kept").unwrap();
        let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 13) as u8).collect();
        let mut packed = zstd::bulk::compress(&data, 1).unwrap();
        let n = packed.len();
        packed.truncate(n / 2);
        let e = receive(&packed[..], &path, true).unwrap_err();
        assert!(matches!(e, ReceiveError::Stream { .. }), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert!(std::fs::read(&path).unwrap().starts_with(b"kept"));
    }

    #[test]
    fn an_unwritable_target_is_a_write_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let blocker = d.path().join("file");
        std::fs::write(&blocker, b"x").unwrap();
        let path = blocker.join("inside");
        let e = receive(&b"abc"[..], &path, false).unwrap_err();
        assert!(matches!(e, ReceiveError::Write { .. }), "{e}");
        assert!(e.to_string().contains("inside"), "{e}");
    }

    #[test]
    fn an_empty_stream_into_dev_null_answers_the_empty_hash() {
        // What the deploy asks before it hands the upload to the release's runtime.
        let r = receive(&b""[..], Path::new("/dev/null"), false).unwrap();
        assert_eq!(r.sha256, sha(b""));
        assert_eq!((r.appended, r.size), (0, 0));
    }
}
