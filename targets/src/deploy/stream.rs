//! One upload stream for every file a deploy sends whole: the files go out as one tar
//! stream through one SSH channel into `tar -x` on the board, instead of one remote command
//! per file. Each file travels in its own zstd frame, compressed when a sample of it
//! compresses and stored raw (zstd raw blocks, no compression work) when it does not, so a
//! board's `zstd -dc` reads the whole stream and the workstation spends no time compressing
//! weights that do not shrink.
//!
//! The tar stream is built here, from the manifest's paths and sizes only: regular files, no
//! links, no owners, paths the manifest already checked. Whatever a bundle archive holds
//! beyond its files is never sent. Each file is hashed as it is read and checked against the
//! manifest; the whole tar stream is hashed too, and the board hashes what it receives, so a
//! matching pair proves every byte arrived.

use std::io::Write as _;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc::{Receiver, Sender};

use super::ssh::Chunk;

/// Largest raw block a zstd frame holds (and the window this writer declares).
const RAW_BLOCK: usize = 128 * 1024;
/// zstd level of compressed frames: level 1 compresses faster than a gigabit link carries.
const LEVEL: i32 = 1;
/// A tar block.
const BLOCK: usize = 512;

/// A file the stream carries, as the manifest lists it.
#[derive(Debug, Clone)]
pub struct StreamFile {
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// Unix mode in the tar header.
    pub mode: u32,
}

/// What the stream builder hands the channel writer.
pub enum Piece {
    /// Bytes for the channel, and how many file bytes they carry.
    Wire(Vec<u8>, u64),
    /// Every file was sent: the sha256 of the whole tar stream (before compression).
    Done { tar_sha256: String },
    /// A file's bytes did not match the manifest, or reading failed: the file's path in the
    /// bundle (when one is to blame) and why. Nothing after it was sent.
    Failed {
        path: Option<String>,
        message: String,
    },
}

/// A zstd frame whose blocks are stored raw: the format's own way of carrying bytes that do
/// not compress, at no cost to make.
struct RawFrame {
    pending: Vec<u8>,
}

impl RawFrame {
    fn start(out: &mut Vec<u8>) -> RawFrame {
        // Magic; frame header descriptor 0 (no content size, no checksum, no dictionary, not
        // single-segment); window descriptor 0x38: 2^(10+7) = 128 KiB, one raw block.
        out.extend_from_slice(&0xFD2F_B528u32.to_le_bytes());
        out.extend_from_slice(&[0x00, 0x38]);
        RawFrame {
            pending: Vec::with_capacity(RAW_BLOCK),
        }
    }

    fn block(out: &mut Vec<u8>, data: &[u8], last: bool) {
        // Block header: bit 0 last, bits 1-2 type (0 = raw), bits 3.. size.
        let h = (data.len() as u32) << 3 | u32::from(last);
        out.extend_from_slice(&h.to_le_bytes()[..3]);
        out.extend_from_slice(data);
    }

    fn write(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        while !data.is_empty() {
            let take = (RAW_BLOCK - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == RAW_BLOCK {
                Self::block(out, &self.pending, false);
                self.pending.clear();
            }
        }
    }

    fn finish(self, out: &mut Vec<u8>) {
        Self::block(out, &self.pending, true);
    }
}

/// How one file's frame is written.
enum Frame {
    /// No zstd on the board: plain tar bytes.
    Plain,
    Raw(RawFrame),
    Zstd(Box<zstd::stream::write::Encoder<'static, Vec<u8>>>),
}

impl Frame {
    fn write(&mut self, data: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        match self {
            Frame::Plain => out.extend_from_slice(data),
            Frame::Raw(r) => r.write(data, out),
            Frame::Zstd(e) => {
                e.write_all(data)?;
                out.append(e.get_mut());
            }
        }
        Ok(())
    }

    fn finish(self, out: &mut Vec<u8>) -> std::io::Result<()> {
        match self {
            Frame::Plain => {}
            Frame::Raw(r) => r.finish(out),
            Frame::Zstd(e) => out.extend_from_slice(&e.finish()?),
        }
        Ok(())
    }
}

/// The ustar header of one regular file.
fn header(f: &StreamFile, mtime: u64) -> Result<[u8; BLOCK], String> {
    let mut h = tar::Header::new_ustar();
    h.set_path(&f.path)
        .map_err(|e| format!("`{}` cannot be named in a tar header: {e}", f.path))?;
    h.set_size(f.size);
    h.set_mode(f.mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut b = [0u8; BLOCK];
    b.copy_from_slice(h.as_bytes());
    Ok(b)
}

/// True when a path can be named in a ustar header (the stream's only limit on paths).
pub fn nameable(path: &str) -> bool {
    tar::Header::new_ustar().set_path(path).is_ok()
}

/// Reads the chunks of `files` (Start, Data..., End per file, in any order, from a bundle
/// folder or an archive) and sends the tar stream as [`Piece`]s. `zstd` says whether the
/// board decompresses; `compresses` decides per file from its first chunk. Runs on a
/// blocking thread; stops quietly when the writer is gone.
pub fn build(
    files: &[StreamFile],
    mut chunks: Receiver<Chunk>,
    zstd: bool,
    compresses: fn(&[u8]) -> bool,
    tx: Sender<Piece>,
) {
    let fail = |path: Option<String>, message: String| {
        let _ = tx.blocking_send(Piece::Failed { path, message });
    };
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut tar_hash = Sha256::new();
    let mut sent = 0usize;
    loop {
        let path = match chunks.blocking_recv() {
            None => break,
            Some(Chunk::Start(p)) => p,
            Some(Chunk::Failed(m)) => return fail(None, m),
            Some(_) => return fail(None, "the bundle reader lost its place".into()),
        };
        let Some(f) = files.iter().find(|f| f.path == path) else {
            // Not wanted: skip its chunks.
            loop {
                match chunks.blocking_recv() {
                    Some(Chunk::End) | None => break,
                    Some(Chunk::Failed(m)) => return fail(None, m),
                    _ => {}
                }
            }
            continue;
        };
        let head = match header(f, mtime) {
            Ok(h) => h,
            Err(m) => return fail(Some(f.path.clone()), m),
        };
        let mut first = Vec::new();
        let mut ended = false;
        match chunks.blocking_recv() {
            Some(Chunk::Data(d)) => first = d,
            Some(Chunk::End) => ended = true,
            Some(Chunk::Failed(m)) => return fail(Some(f.path.clone()), m),
            _ => return fail(Some(f.path.clone()), "the bundle reader stopped".into()),
        }
        let mut out = Vec::with_capacity(first.len() + 2 * BLOCK);
        let mut frame = if !zstd {
            Frame::Plain
        } else if compresses(&first) {
            match zstd::stream::write::Encoder::new(Vec::new(), LEVEL) {
                Ok(e) => Frame::Zstd(Box::new(e)),
                Err(e) => return fail(None, format!("zstd: {e}")),
            }
        } else {
            Frame::Raw(RawFrame::start(&mut out))
        };
        let io = |e: std::io::Error| format!("zstd: {e}");
        tar_hash.update(head);
        if let Err(e) = frame.write(&head, &mut out) {
            return fail(None, io(e));
        }
        let mut file_hash = Sha256::new();
        let mut n = 0u64;
        let mut data = first;
        loop {
            if !data.is_empty() {
                n += data.len() as u64;
                if n > f.size {
                    return fail(
                        Some(f.path.clone()),
                        format!(
                            "holds more than the {} bytes the bundle's manifest lists",
                            f.size
                        ),
                    );
                }
                file_hash.update(&data);
                tar_hash.update(&data);
                if let Err(e) = frame.write(&data, &mut out) {
                    return fail(None, io(e));
                }
                let carried = data.len() as u64;
                if tx
                    .blocking_send(Piece::Wire(std::mem::take(&mut out), carried))
                    .is_err()
                {
                    return;
                }
            }
            if ended {
                break;
            }
            data = match chunks.blocking_recv() {
                Some(Chunk::Data(d)) => d,
                Some(Chunk::End) => {
                    ended = true;
                    Vec::new()
                }
                Some(Chunk::Failed(m)) => return fail(Some(f.path.clone()), m),
                _ => return fail(Some(f.path.clone()), "the bundle reader stopped".into()),
            };
        }
        let sha = hex::encode(file_hash.finalize());
        if n != f.size || sha != f.sha256 {
            // The board has the bytes up to here; the caller removes the file there.
            return fail(
                Some(f.path.clone()),
                format!(
                    "does not match the bundle's manifest (read {n} bytes with sha256 {sha}; the manifest lists {} bytes with {}); the bundle is damaged or changed, nothing was switched",
                    f.size, f.sha256
                ),
            );
        }
        let pad = vec![0u8; (BLOCK - (f.size as usize % BLOCK)) % BLOCK];
        tar_hash.update(&pad);
        if let Err(e) = frame
            .write(&pad, &mut out)
            .and_then(|_| frame.finish(&mut out))
        {
            return fail(None, io(e));
        }
        if tx.blocking_send(Piece::Wire(out, 0)).is_err() {
            return;
        }
        sent += 1;
    }
    if sent != files.len() {
        return fail(
            None,
            format!(
                "holds {sent} of the {} files its manifest lists and the board lacks",
                files.len()
            ),
        );
    }
    // The end of the archive: two zero blocks.
    let end = [0u8; 2 * BLOCK];
    tar_hash.update(end);
    let mut out = Vec::new();
    let mut frame = if zstd {
        Frame::Raw(RawFrame::start(&mut out))
    } else {
        Frame::Plain
    };
    if let Err(e) = frame
        .write(&end, &mut out)
        .and_then(|_| frame.finish(&mut out))
    {
        return fail(None, format!("zstd: {e}"));
    }
    if tx.blocking_send(Piece::Wire(out, 0)).is_err() {
        return;
    }
    let _ = tx.blocking_send(Piece::Done {
        tar_sha256: hex::encode(tar_hash.finalize()),
    });
}

/// Bytes of each chunk read from a bundle folder.
const READ_CHUNK: usize = 1 << 20;

/// Reads `paths` out of a bundle folder as Start, Data..., End each; stops quietly when the
/// receiver is gone.
pub fn read_dir_files(dir: &std::path::Path, paths: &[String], tx: Sender<Chunk>) {
    use std::io::Read;
    for p in paths {
        let local = dir.join(p);
        let mut file = match std::fs::File::open(&local) {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.blocking_send(Chunk::Failed(format!("{}: {e}", local.display())));
                return;
            }
        };
        if tx.blocking_send(Chunk::Start(p.clone())).is_err() {
            return;
        }
        loop {
            let mut buf = vec![0u8; READ_CHUNK];
            let mut n = 0;
            while n < buf.len() {
                match file.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) => {
                        let _ =
                            tx.blocking_send(Chunk::Failed(format!("{}: {e}", local.display())));
                        return;
                    }
                }
            }
            if n == 0 {
                break;
            }
            buf.truncate(n);
            if tx.blocking_send(Chunk::Data(buf)).is_err() {
                return;
            }
        }
        if tx.blocking_send(Chunk::End).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the builder over in-memory files; returns the wire bytes and the last piece.
    fn stream(files: &[(&str, Vec<u8>)], zstd: bool, compress: fn(&[u8]) -> bool) -> Vec<u8> {
        let entries: Vec<StreamFile> = files
            .iter()
            .map(|(p, d)| StreamFile {
                path: p.to_string(),
                size: d.len() as u64,
                sha256: hex::encode(Sha256::digest(d)),
                mode: 0o644,
            })
            .collect();
        let (ctx, crx) = tokio::sync::mpsc::channel(4);
        let (ptx, mut prx) = tokio::sync::mpsc::channel(4);
        let owned: Vec<(String, Vec<u8>)> = files
            .iter()
            .map(|(p, d)| (p.to_string(), d.clone()))
            .collect();
        let feeder = std::thread::spawn(move || {
            for (p, d) in owned {
                ctx.blocking_send(Chunk::Start(p)).unwrap();
                for c in d.chunks(300_000) {
                    ctx.blocking_send(Chunk::Data(c.to_vec())).unwrap();
                }
                ctx.blocking_send(Chunk::End).unwrap();
            }
        });
        let builder = std::thread::spawn(move || build(&entries, crx, zstd, compress, ptx));
        let mut wire = Vec::new();
        let mut done = None;
        while let Some(p) = prx.blocking_recv() {
            match p {
                Piece::Wire(b, _) => wire.extend_from_slice(&b),
                Piece::Done { tar_sha256 } => done = Some(tar_sha256),
                Piece::Failed { path, message } => panic!("{path:?}: {message}"),
            }
        }
        feeder.join().unwrap();
        builder.join().unwrap();
        let tar = if zstd {
            zstd::stream::decode_all(&wire[..]).unwrap()
        } else {
            wire.clone()
        };
        assert_eq!(done.unwrap(), hex::encode(Sha256::digest(&tar)));
        tar
    }

    fn files() -> Vec<(&'static str, Vec<u8>)> {
        // Incompressible bytes across several raw blocks, and text that compresses.
        let mut x = 0x1234_5678u32;
        let noise: Vec<u8> = (0..400_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        vec![
            ("bin/edgepack-runtime", b"runtime ".repeat(50_000)),
            ("model/m.gguf", noise),
            ("manifest.json", b"{}".to_vec()),
            ("empty.txt", Vec::new()),
        ]
    }

    fn unpack(tar: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut a = tar::Archive::new(tar);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let p = e.path().unwrap().to_string_lossy().into_owned();
                let mut d = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut d).unwrap();
                (p, d)
            })
            .collect()
    }

    #[test]
    fn raw_and_compressed_frames_decode_to_the_same_tar_stream_as_plain() {
        let fs = files();
        let plain = stream(&fs, false, |_| false);
        let raw = stream(&fs, true, |_| false);
        let mixed = stream(&fs, true, |s| s.starts_with(b"runtime"));
        assert_eq!(raw, plain);
        assert_eq!(mixed, plain);
        let got = unpack(&plain);
        assert_eq!(got.len(), fs.len());
        for ((p, d), (gp, gd)) in fs.iter().zip(&got) {
            assert_eq!(p, gp);
            assert_eq!(d, gd, "{p}");
        }
    }

    #[test]
    fn the_zstd_tool_reads_raw_and_compressed_frames() {
        let fs = files();
        let plain = stream(&fs, false, |_| false);
        let (wire, _) = wire(&fs);
        let Ok(mut child) = std::process::Command::new("zstd")
            .args(["-dcq"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            panic!("the zstd tool runs (apt-get install zstd)");
        };
        let mut stdin = child.stdin.take().unwrap();
        let w = std::thread::spawn(move || stdin.write_all(&wire).unwrap());
        let out = child.wait_with_output().unwrap();
        w.join().unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, plain);
    }

    /// The wire bytes and tar sha256 of `files` (zstd frames, compressing the runtime).
    fn wire(files: &[(&str, Vec<u8>)]) -> (Vec<u8>, String) {
        let entries: Vec<StreamFile> = files
            .iter()
            .map(|(p, d)| StreamFile {
                path: p.to_string(),
                size: d.len() as u64,
                sha256: hex::encode(Sha256::digest(d)),
                mode: 0o644,
            })
            .collect();
        let (ctx, crx) = tokio::sync::mpsc::channel(4);
        let (ptx, mut prx) = tokio::sync::mpsc::channel(64);
        let feed: Vec<(String, Vec<u8>)> = files
            .iter()
            .map(|(p, d)| (p.to_string(), d.clone()))
            .collect();
        let t = std::thread::spawn(move || {
            for (p, d) in feed {
                ctx.blocking_send(Chunk::Start(p)).unwrap();
                ctx.blocking_send(Chunk::Data(d)).unwrap();
                ctx.blocking_send(Chunk::End).unwrap();
            }
        });
        let b = std::thread::spawn(move || {
            build(&entries, crx, true, |s| s.starts_with(b"runtime"), ptx)
        });
        let (mut w, mut sha) = (Vec::new(), String::new());
        while let Some(p) = prx.blocking_recv() {
            match p {
                Piece::Wire(x, _) => w.extend_from_slice(&x),
                Piece::Done { tar_sha256 } => sha = tar_sha256,
                Piece::Failed { path, message } => panic!("{path:?}: {message}"),
            }
        }
        t.join().unwrap();
        b.join().unwrap();
        (w, sha)
    }

    /// Runs the board's unpack script with `shell` (argv) on the stream; returns its stdout.
    fn unpack_on_board(shell: &[&str], install: &std::path::Path, wire: &[u8]) -> String {
        let l = crate::deploy::board::Layout::new(&install.to_string_lossy());
        let script = l.unpack_stream(&l.incoming("r1"), true);
        let mut child = std::process::Command::new(shell[0])
            .args(&shell[1..])
            .arg("-c")
            .arg(&script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let w = wire.to_vec();
        let t = std::thread::spawn(move || stdin.write_all(&w).unwrap());
        let out = child.wait_with_output().unwrap();
        t.join().unwrap();
        assert!(
            out.status.success(),
            "{shell:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    #[test]
    fn the_board_unpacks_the_stream_and_hashes_it_under_sh_and_busybox_alone() {
        let fs = files();
        let (w, sha) = wire(&fs);
        let busybox = std::process::Command::new("sh")
            .args(["-c", "command -v busybox"])
            .output()
            .unwrap();
        let busybox = String::from_utf8(busybox.stdout).unwrap();
        let busybox = busybox.trim();
        assert!(
            !busybox.is_empty(),
            "busybox is installed (apt-get install busybox)"
        );
        let t = tempfile::tempdir().unwrap();
        // busybox's applets alone on PATH, as on a minimal board image.
        let bin = t.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let list = std::process::Command::new(busybox)
            .arg("--list")
            .output()
            .unwrap();
        for applet in String::from_utf8(list.stdout).unwrap().lines() {
            std::os::unix::fs::symlink(busybox, bin.join(applet)).unwrap();
        }
        std::fs::create_dir_all(t.path().join("bin-zstd")).unwrap();
        // Debian's busybox has no zstd applet: the zstd tool is the one beside it.
        let zstd = std::process::Command::new("sh")
            .args(["-c", "command -v zstd"])
            .output()
            .unwrap();
        let zstd = String::from_utf8(zstd.stdout).unwrap();
        std::os::unix::fs::symlink(zstd.trim(), t.path().join("bin-zstd/zstd")).unwrap();
        let path = format!(
            "PATH={}:{}",
            bin.display(),
            t.path().join("bin-zstd").display()
        );
        for (name, shell) in [
            ("sh", vec!["sh"]),
            ("busybox", vec!["env", "-i", path.as_str(), busybox, "sh"]),
        ] {
            let install = t.path().join(name);
            let printed = unpack_on_board(&shell, &install, &w);
            assert_eq!(printed, sha, "{name}: the board's hash of the stream");
            let dir = install.join(".incoming/r1");
            for (p, d) in &fs {
                assert_eq!(&std::fs::read(dir.join(p)).unwrap(), d, "{name}: {p}");
            }
            // Nothing else is left: no FIFO, no hash file.
            let left: Vec<_> = std::fs::read_dir(install.join(".incoming"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(left, vec![std::ffi::OsString::from("r1")], "{name}");
        }
    }

    #[test]
    fn a_file_that_does_not_match_the_manifest_stops_the_stream_and_is_named() {
        let entries = vec![StreamFile {
            path: "model/m.gguf".into(),
            size: 4,
            sha256: hex::encode(Sha256::digest(b"good")),
            mode: 0o644,
        }];
        let (ctx, crx) = tokio::sync::mpsc::channel(4);
        let (ptx, mut prx) = tokio::sync::mpsc::channel(16);
        ctx.try_send(Chunk::Start("model/m.gguf".into())).unwrap();
        ctx.try_send(Chunk::Data(b"gooD".to_vec())).unwrap();
        ctx.try_send(Chunk::End).unwrap();
        drop(ctx);
        std::thread::spawn(move || build(&entries, crx, true, |_| false, ptx))
            .join()
            .unwrap();
        let mut last = None;
        while let Ok(p) = prx.try_recv() {
            last = Some(p);
        }
        match last {
            Some(Piece::Failed { path, message }) => {
                assert_eq!(path.as_deref(), Some("model/m.gguf"));
                assert!(message.contains("does not match"), "{message}");
            }
            _ => panic!("the stream did not fail"),
        }
    }
}
