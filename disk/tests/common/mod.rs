//! Helpers shared by the integration tests: a blob sink writing files, generated
//! disk-like content, qemu-img/qemu-io runners.

#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use sarde_api::Codec;
use sarde_api::Digest;
use sarde_api::digest::DigestWriter;
use sarde_codec_zstd::Zstd;
use sarde_disk::{PieceInfo, PieceSink, PieceWriter, write_piece};

/// Writes each blob to `<dir>/tmp-<index>`, then renames it to `<dir>/<hex>` on commit,
/// like an OCI layout would.
pub struct DirSink {
    pub dir: PathBuf,
    pub begun: AtomicUsize,
    pub discarded: AtomicUsize,
    /// Fail `begin` for this piece index.
    pub fail_at: Option<usize>,
    pub begun_indexes: Mutex<Vec<usize>>,
}

impl DirSink {
    pub fn new(dir: &Path) -> Self {
        fs::create_dir_all(dir).unwrap();
        DirSink {
            dir: dir.to_path_buf(),
            begun: AtomicUsize::new(0),
            discarded: AtomicUsize::new(0),
            fail_at: None,
            begun_indexes: Mutex::new(Vec::new()),
        }
    }

    pub fn blob(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }
}

pub struct DirWriter<'a> {
    tmp: PathBuf,
    dir: PathBuf,
    inner: DigestWriter<BufWriter<File>>,
    sink: &'a DirSink,
}

impl PieceSink for DirSink {
    fn begin(&self, index: usize) -> io::Result<Box<dyn PieceWriter + '_>> {
        self.begun.fetch_add(1, Ordering::SeqCst);
        self.begun_indexes.lock().unwrap().push(index);
        if self.fail_at == Some(index) {
            return Err(io::Error::other(format!("refusing piece {index}")));
        }
        let tmp = self.dir.join(format!("tmp-{index}"));
        let file = File::create(&tmp)?;
        Ok(Box::new(DirWriter {
            tmp,
            dir: self.dir.clone(),
            inner: DigestWriter::new(BufWriter::new(file)),
            sink: self,
        }))
    }
}

impl Write for DirWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl PieceWriter for DirWriter<'_> {
    fn commit(self: Box<Self>) -> io::Result<(Digest, u64)> {
        let (buffered, digest, size) = self.inner.finish();
        buffered
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()?;
        fs::rename(&self.tmp, self.dir.join(digest.hex()))?;
        Ok((digest, size))
    }

    fn discard(self: Box<Self>) {
        self.sink.discarded.fetch_add(1, Ordering::SeqCst);
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Hashes and drops the blobs: measures the pipeline without the blob store.
pub struct NullSink;

pub struct NullWriter(DigestWriter<io::Sink>);

impl PieceSink for NullSink {
    fn begin(&self, _index: usize) -> io::Result<Box<dyn PieceWriter + '_>> {
        Ok(Box::new(NullWriter(DigestWriter::new(io::sink()))))
    }
}

impl Write for NullWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl PieceWriter for NullWriter {
    fn commit(self: Box<Self>) -> io::Result<(Digest, u64)> {
        let (_, digest, size) = self.0.finish();
        Ok((digest, size))
    }
    fn discard(self: Box<Self>) {}
}

/// Rebuilds a file from exported pieces with `threads` threads, writing concurrently
/// to one `File`.
pub fn import(sink: &DirSink, pieces: &[PieceInfo], target: &Path, len: u64, threads: usize) {
    let file = sarde_disk::create_sparse(target, len).unwrap();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(p) = pieces.get(i) else { break };
                    let Some((blob, size)) = &p.blob else {
                        continue;
                    };
                    let path = sink.blob(blob);
                    assert_eq!(fs::metadata(&path).unwrap().len(), *size);
                    let mut decoder = Zstd.decoder(Box::new(File::open(&path).unwrap())).unwrap();
                    write_piece(
                        &file,
                        p.offset,
                        p.length,
                        Some(&p.uncompressed_digest),
                        &mut decoder,
                    )
                    .unwrap();
                }
            });
        }
    });
}

/// xorshift64: reproducible noise.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Compressible text-like bytes.
pub fn text(rng: &mut Rng, len: usize) -> Vec<u8> {
    let words: [&[u8]; 8] = [
        b"disk ",
        b"image ",
        b"libvirt ",
        b"sardine ",
        b"cake ",
        b"qemu\n",
        b"the ",
        b"of ",
    ];
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        out.extend_from_slice(words[(rng.next() % 8) as usize]);
    }
    out.truncate(len);
    out
}

pub fn random(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    rng.fill(&mut out);
    out
}

/// A sparse file of `len` bytes with `writes` placed at their offsets.
pub fn sparse_file(path: &Path, len: u64, writes: &[(u64, Vec<u8>)]) {
    let file = File::create(path).unwrap();
    file.set_len(len).unwrap();
    for (offset, data) in writes {
        file.write_all_at(data, *offset).unwrap();
    }
    file.sync_all().unwrap();
}

pub fn sha256_file(path: &Path) -> Digest {
    let mut w = DigestWriter::new(io::sink());
    io::copy(&mut File::open(path).unwrap(), &mut w).unwrap();
    w.finish().1
}

/// Whether two files have the same bytes (memcmp: fast even in debug builds, where
/// sha256 of hundreds of MiB takes long).
pub fn same_content(a: &Path, b: &Path) -> bool {
    let (fa, fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let len = fa.metadata().unwrap().len();
    if fb.metadata().unwrap().len() != len {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(1 << 20) as usize;
        fa.read_exact_at(&mut ba[..n], pos).unwrap();
        fb.read_exact_at(&mut bb[..n], pos).unwrap();
        if ba[..n] != bb[..n] {
            return false;
        }
        pos += n as u64;
    }
    true
}

/// All zero bytes, compared with memcmp.
pub fn all_zero(buf: &[u8]) -> bool {
    static ZERO: [u8; 1 << 16] = [0; 1 << 16];
    buf.chunks(1 << 16).all(|c| c == &ZERO[..c.len()])
}

pub fn read_range(path: &Path, offset: u64, length: u64) -> Vec<u8> {
    let mut buf = vec![0u8; length as usize];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

pub fn allocated_bytes(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

/// Runs a command that must succeed; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn status(program: &str, args: &[&str]) -> i32 {
    Command::new(program)
        .args(args)
        .output()
        .unwrap()
        .status
        .code()
        .unwrap_or(-1)
}

pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

pub fn has(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok()
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

pub fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    v
}
