//! Import: a file rebuilt from pieces, each written at its offset (so pieces can
//! arrive in any order, from several threads) and checked against its digest.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use sarde_api::Digest;
use sarde_api::digest::Algorithm;
use sha2::{Digest as _, Sha256};

use crate::BLOCK_SIZE;
use crate::error::DiskError;
use crate::export::PieceInfo;
use crate::holes::{DIRECT_ALIGN, SparseReader, ZEROS, ZeroDigests, is_zero, path_of, read_full};

/// Creates `path` (which must not exist) with `size` bytes, all a hole: pieces are
/// then written at their offsets and all-zero pieces cost nothing. Opened for reading
/// and writing.
pub fn create_sparse(path: &Path, size: u64) -> Result<File, DiskError> {
    let io_error = |action, source| DiskError::Io {
        file: path.to_path_buf(),
        action,
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io_error("creating", e))?;
    file.set_len(size)
        .map_err(|e| io_error("setting the length", e))?;
    Ok(file)
}

/// Opens `path` for direct writes (`O_DIRECT`: no copy into the page cache, no
/// pages to write back later, no cache evicted on a runner host by a 60 GB
/// import). `None` where the file system does not support it (tmpfs): the
/// buffered file is used then.
pub fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

thread_local! {
    /// One block buffer per thread, reused across pieces (a piece may be as small as
    /// one block, and allocating 1 MiB each time costs page faults). One alignment
    /// unit larger, so an aligned block fits for direct writes.
    static BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    /// Direct writes failed here (a file system that accepts `O_DIRECT` at open
    /// but not for these writes): buffered from then on.
    static DIRECT_BROKEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Writes one piece's decoded bytes at `offset` of `file` and checks them.
///
/// Reads `decoded` in 1 MiB blocks; all-zero blocks are not written, so the range
/// must read as zeros beforehand (a file from [`create_sparse`], or a range cleared
/// with [`zero_range`] when retrying). More than `length` bytes is refused as soon as
/// the first extra byte appears, before anything is written past the piece; fewer is
/// an error; then the sha256 must equal `expected` when one is given (`None` when
/// something else already vouches for the bytes: a codec that verifies its own
/// checksum of them). On error the range holds partial
/// data: clear it with [`zero_range`] before writing the piece again.
///
/// Safe to call from several threads on the same `File` (positioned writes only).
pub fn write_piece(
    file: &File,
    offset: u64,
    length: u64,
    expected: Option<&Digest>,
    decoded: &mut dyn Read,
) -> Result<(), DiskError> {
    write_piece_direct(file, None, offset, length, expected, decoded)
}

/// [`write_piece`], writing aligned blocks through `direct` (from [`open_direct`]
/// on the same file) when given; unaligned ends go through `file`.
pub fn write_piece_direct(
    file: &File,
    direct: Option<&File>,
    offset: u64,
    length: u64,
    expected: Option<&Digest>,
    decoded: &mut dyn Read,
) -> Result<(), DiskError> {
    if let Some(expected) = expected.filter(|e| e.algorithm() != Algorithm::Sha256) {
        return Err(DiskError::UnsupportedDigest {
            file: path_of(file),
            offset,
            digest: expected.clone(),
        });
    }
    let file_len = file
        .metadata()
        .map_err(|source| DiskError::Io {
            file: path_of(file),
            action: "reading metadata",
            source,
        })?
        .len();
    if offset.checked_add(length).is_none_or(|end| end > file_len) {
        return Err(DiskError::PieceOutOfRange {
            file: path_of(file),
            offset,
            length,
            file_len,
        });
    }
    let mut buf = BUFFER.take();
    buf.resize(BLOCK_SIZE + DIRECT_ALIGN, 0);
    let start = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    let result = write_piece_with(
        file,
        direct,
        offset,
        length,
        expected,
        decoded,
        &mut buf[start..start + BLOCK_SIZE],
    );
    BUFFER.set(buf);
    result
}

/// Serialises the page-cache writes of [`write_piece`] in this process.
static WRITE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn write_piece_with(
    file: &File,
    direct: Option<&File>,
    offset: u64,
    length: u64,
    expected: Option<&Digest>,
    decoded: &mut dyn Read,
    buf: &mut [u8],
) -> Result<(), DiskError> {
    // Hashing is a third of an import's CPU: only when asked.
    let mut hasher = expected.map(|_| Sha256::new());
    let mut pos = 0u64;
    while pos < length {
        let want = (length - pos).min(BLOCK_SIZE as u64) as usize;
        let got = read_full(decoded, &mut buf[..want]).map_err(|source| DiskError::Decode {
            file: path_of(file),
            offset: offset + pos,
            source,
        })?;
        let block = &buf[..got];
        if let Some(hasher) = hasher.as_mut() {
            hasher.update(block);
        }
        if !is_zero(block) {
            let at = offset + pos;
            let aligned = at % DIRECT_ALIGN as u64 == 0 && block.len() % DIRECT_ALIGN == 0;
            let written_directly = match direct {
                Some(d) if aligned && !DIRECT_BROKEN.get() => match d.write_all_at(block, at) {
                    Ok(()) => true,
                    Err(_) => {
                        DIRECT_BROKEN.set(true);
                        false
                    }
                },
                _ => false,
            };
            if !written_directly {
                // One writer at a time: concurrent writes to one file contend for
                // its inode lock in the kernel, which spins and burns the CPU that
                // decompression and hashing need (12% of a pull's CPU, measured).
                let _one_writer = WRITE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
                file.write_all_at(block, at)
                    .map_err(|source| DiskError::Write {
                        file: path_of(file),
                        offset: at,
                        source,
                    })?;
            }
        }
        pos += got as u64;
        if got < want {
            return Err(DiskError::PieceTruncated {
                file: path_of(file),
                offset,
                length,
                got: pos,
            });
        }
    }
    // One more byte: a longer stream is refused here. Reading to the end also makes
    // decoders check their trailing checksums.
    let mut extra = [0u8; 1];
    let got = read_full(decoded, &mut extra).map_err(|source| DiskError::Decode {
        file: path_of(file),
        offset: offset + length,
        source,
    })?;
    if got > 0 {
        return Err(DiskError::PieceTooLong {
            file: path_of(file),
            offset,
            length,
        });
    }
    sarde_api::writeback::start_writeback(file, offset, length);
    if let (Some(expected), Some(hasher)) = (expected, hasher) {
        let actual = Digest::from_sha256(hasher.finalize().into());
        if actual != *expected {
            return Err(DiskError::PieceDigestMismatch {
                file: path_of(file),
                offset,
                expected: expected.clone(),
                actual,
            });
        }
    }
    Ok(())
}

/// Makes `[offset, offset + length)` read as zeros by punching a hole (freeing the
/// space), or by writing zeros where the file system cannot punch holes. Used before
/// rewriting a piece that failed, since [`write_piece`] skips zero blocks.
pub fn zero_range(file: &File, offset: u64, length: u64) -> Result<(), DiskError> {
    if length == 0 {
        return Ok(());
    }
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(length)) else {
        return Err(DiskError::Write {
            file: path_of(file),
            offset,
            source: io::Error::from(io::ErrorKind::InvalidInput),
        });
    };
    // SAFETY: fallocate only works on the descriptor, which `file` keeps open.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) {
        return Err(DiskError::Write {
            file: path_of(file),
            offset,
            source: e,
        });
    }
    let mut pos = 0u64;
    while pos < length {
        let n = (length - pos).min(BLOCK_SIZE as u64) as usize;
        file.write_all_at(&ZEROS[..n], offset + pos)
            .map_err(|source| DiskError::Write {
                file: path_of(file),
                offset: offset + pos,
                source,
            })?;
        pos += n as u64;
    }
    Ok(())
}

/// A piece as an importer knows it: where it is and what it must hash to. Implemented
/// by [`PieceInfo`] and [`PieceSpan`]; implement it for manifest entries to verify
/// without copying.
pub trait PieceRange {
    fn offset(&self) -> u64;
    fn length(&self) -> u64;
    /// The sha256 of the uncompressed bytes.
    fn digest(&self) -> &Digest;
}

/// A piece's place and digest, without its blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceSpan {
    pub offset: u64,
    pub length: u64,
    pub digest: Digest,
}

impl From<&PieceInfo> for PieceSpan {
    fn from(p: &PieceInfo) -> Self {
        PieceSpan {
            offset: p.offset,
            length: p.length,
            digest: p.uncompressed_digest.clone(),
        }
    }
}

impl PieceRange for PieceSpan {
    fn offset(&self) -> u64 {
        self.offset
    }
    fn length(&self) -> u64 {
        self.length
    }
    fn digest(&self) -> &Digest {
        &self.digest
    }
}

impl PieceRange for PieceInfo {
    fn offset(&self) -> u64 {
        self.offset
    }
    fn length(&self) -> u64 {
        self.length
    }
    fn digest(&self) -> &Digest {
        &self.uncompressed_digest
    }
}

/// Re-hashes each piece of `path` with `threads` threads (holes read as zeros without
/// reading them) and says, per piece, whether it matches its digest; a piece past the
/// end of the file does not. This is how an interrupted import resumes: only pieces
/// that don't match are fetched again (after [`zero_range`]).
pub fn verify_pieces<P: PieceRange + Sync>(
    path: &Path,
    pieces: &[P],
    threads: usize,
) -> Result<Vec<bool>, DiskError> {
    verify(path, pieces, threads, false)
}

/// Whether every piece of `path` matches its digest: an existing import is intact.
/// Stops at the first mismatch.
pub fn verify_file<P: PieceRange + Sync>(
    path: &Path,
    pieces: &[P],
    threads: usize,
) -> Result<bool, DiskError> {
    Ok(verify(path, pieces, threads, true)?.iter().all(|&ok| ok))
}

fn verify<P: PieceRange + Sync>(
    path: &Path,
    pieces: &[P],
    threads: usize,
    stop_on_mismatch: bool,
) -> Result<Vec<bool>, DiskError> {
    let open = || {
        File::open(path).map_err(|source| DiskError::Io {
            file: path.to_path_buf(),
            action: "opening for verification",
            source,
        })
    };
    let len = open()?
        .metadata()
        .map_err(|source| DiskError::Io {
            file: path.to_path_buf(),
            action: "reading metadata",
            source,
        })?
        .len();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let error: Mutex<Option<DiskError>> = Mutex::new(None);
    let zeros = ZeroDigests::default();
    let threads = threads.clamp(1, pieces.len().max(1));
    let results: Vec<(usize, bool)> = std::thread::scope(|s| {
        let worker = || -> Vec<(usize, bool)> {
            let mut done = Vec::new();
            let run = |done: &mut Vec<(usize, bool)>| -> Result<(), DiskError> {
                let mut reader = SparseReader::new(open()?, len);
                reader.advise_sequential();
                let mut buf = vec![0u8; BLOCK_SIZE];
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(piece) = pieces.get(i) else {
                        break;
                    };
                    let ok = verify_one(&mut reader, &mut buf, &zeros, len, piece, &stop).map_err(
                        |(offset, source)| DiskError::Read {
                            file: path.to_path_buf(),
                            offset,
                            source,
                        },
                    )?;
                    if !ok && stop_on_mismatch {
                        stop.store(true, Ordering::SeqCst);
                    }
                    done.push((i, ok));
                }
                Ok(())
            };
            if let Err(e) = run(&mut done) {
                stop.store(true, Ordering::SeqCst);
                error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(e);
            }
            done
        };
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(worker)).collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    if let Some(e) = error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    // Pieces not reached (stopped at a mismatch) count as not verified.
    let mut ok = vec![false; pieces.len()];
    for (i, good) in results {
        ok[i] = good;
    }
    Ok(ok)
}

fn verify_one<P: PieceRange>(
    reader: &mut SparseReader,
    buf: &mut [u8],
    zeros: &ZeroDigests,
    file_len: u64,
    piece: &P,
    stop: &AtomicBool,
) -> Result<bool, (u64, io::Error)> {
    let (offset, length) = (piece.offset(), piece.length());
    if piece.digest().algorithm() != Algorithm::Sha256
        || offset.checked_add(length).is_none_or(|end| end > file_len)
    {
        return Ok(false);
    }
    if reader.is_hole(offset, length).map_err(|e| (offset, e))? {
        return Ok(zeros.get(length) == *piece.digest());
    }
    let mut hasher = Sha256::new();
    let mut pos = 0u64;
    while pos < length {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let n = (length - pos).min(BLOCK_SIZE as u64) as usize;
        reader.read_block(offset + pos, &mut buf[..n])?;
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(Digest::from_sha256(hasher.finalize().into()) == *piece.digest())
}
