//! Export: a file cut into fixed-size pieces of uncompressed bytes, each hashed and
//! compressed on its own by several threads.
//!
//! Compressing each piece alone is what makes the output deterministic whatever the
//! thread count, and what lets an importer decompress pieces in parallel and out of
//! order (one compressed stream cut in blobs forces serial decompression).

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use sarde_api::{Codec, Digest, EncodeOptions};
use sha2::{Digest as _, Sha256};

use crate::BLOCK_SIZE;
use crate::error::DiskError;
use crate::holes::{AlignedBlock, SparseReader, ZEROS, ZeroDigests, hash_zeros, is_zero};

/// One piece of an exported file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceInfo {
    pub index: usize,
    /// Where the piece starts in the file.
    pub offset: u64,
    /// Uncompressed length: the piece size, except for a shorter last piece.
    pub length: u64,
    /// sha256 of the uncompressed bytes; what an importer checks and resumes by.
    pub uncompressed_digest: Digest,
    /// The compressed blob's digest and size; `None` for an all-zero piece, which is
    /// not stored and comes back as a hole.
    pub blob: Option<(Digest, u64)>,
    /// The blob came from an earlier export ([`PieceSink::reuse`]): not compressed.
    pub reused: bool,
}

/// Where compressed pieces go (in sarde: blob files of an OCI layout). Called from
/// several threads at once.
pub trait PieceSink: Sync {
    /// Starts the blob of piece `index`. Only called for pieces that hold data.
    fn begin(&self, index: usize) -> io::Result<Box<dyn PieceWriter + '_>>;

    /// Whether an earlier export stored a blob for the piece at `offset` of
    /// `length` bytes. Such a piece is hashed first and compressed only when
    /// [`PieceSink::reuse`] has no blob for its content (it changed).
    fn has_previous(&self, _offset: u64, _length: u64) -> bool {
        false
    }

    /// The blob (digest, size) an earlier export made of exactly this content
    /// (`digest`: sha256 of the uncompressed bytes), made available in the sink;
    /// `None` to compress the piece.
    fn reuse(
        &self,
        _offset: u64,
        _length: u64,
        _digest: &Digest,
    ) -> io::Result<Option<(Digest, u64)>> {
        Ok(None)
    }
}

/// The blob of one piece being written; it hashes what it is given.
pub trait PieceWriter: Write + Send {
    /// Makes the blob permanent; returns its digest and size.
    fn commit(self: Box<Self>) -> io::Result<(Digest, u64)>;
    /// Throws the partial blob away (after an error, or when another thread failed).
    fn discard(self: Box<Self>);
}

/// Exports the raw bytes of `path` as pieces of `piece_size` uncompressed bytes (the
/// last one shorter), compressed with `codec` by `threads` threads into `sink`.
/// Returns the pieces ordered by index; an empty file has none.
///
/// Each thread holds one 1 MiB buffer plus the codec's state, whatever the piece size.
/// Holes of sparse files are not read. `options.threads` multiplies with `threads`:
/// since parallelism comes from pieces, 1 is usually right. The file must not change
/// during the export (shut the VM down or export a snapshot); what was read is what
/// the digests describe. The first error stops all threads and is returned; blobs of
/// pieces already committed stay in the sink.
pub fn export_file(
    path: &Path,
    piece_size: u64,
    threads: usize,
    codec: &dyn Codec,
    options: &EncodeOptions,
    sink: &dyn PieceSink,
) -> Result<Vec<PieceInfo>, DiskError> {
    if piece_size == 0 {
        return Err(DiskError::InvalidPieceSize);
    }
    let len = File::open(path)
        .and_then(|f| f.metadata())
        .map_err(|source| DiskError::Io {
            file: path.to_path_buf(),
            action: "opening for export",
            source,
        })?
        .len();
    let count = len.div_ceil(piece_size) as usize;
    let job = Job {
        path,
        len,
        piece_size,
        codec,
        options,
        sink,
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        error: Mutex::new(None),
        zeros: ZeroDigests::default(),
    };
    let threads = threads.clamp(1, count.max(1));
    let mut pieces: Vec<PieceInfo> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads).map(|_| s.spawn(|| job.work())).collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    if let Some(e) = job.error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    pieces.sort_by_key(|p| p.index);
    debug_assert_eq!(pieces.len(), count);
    Ok(pieces)
}

/// What the export threads share.
struct Job<'a> {
    path: &'a Path,
    len: u64,
    piece_size: u64,
    codec: &'a dyn Codec,
    options: &'a EncodeOptions,
    sink: &'a dyn PieceSink,
    /// The next piece index to take.
    next: AtomicUsize,
    /// Set by the first failure; the others stop at their next block.
    stop: AtomicBool,
    error: Mutex<Option<DiskError>>,
    zeros: ZeroDigests,
}

/// Why a piece was not finished.
enum Abort {
    Failed(DiskError),
    /// Another thread failed.
    Stopped,
}

impl From<DiskError> for Abort {
    fn from(e: DiskError) -> Self {
        Abort::Failed(e)
    }
}

impl Job<'_> {
    fn work(&self) -> Vec<PieceInfo> {
        let mut done = Vec::new();
        if let Err(e) = self.work_inner(&mut done) {
            self.fail(e);
        }
        done
    }

    fn fail(&self, e: DiskError) {
        self.stop.store(true, Ordering::SeqCst);
        let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(e);
    }

    fn work_inner(&self, done: &mut Vec<PieceInfo>) -> Result<(), DiskError> {
        // A handle per thread: its own readahead state and lseek offset.
        let file = File::open(self.path).map_err(|source| DiskError::Io {
            file: self.path.to_path_buf(),
            action: "opening for export",
            source,
        })?;
        let mut reader = SparseReader::new(file, self.len);
        reader.read_directly(self.path);
        let mut block = AlignedBlock::new();
        let buf = block.as_mut();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            let offset = index as u64 * self.piece_size;
            if offset >= self.len {
                return Ok(());
            }
            let length = self.piece_size.min(self.len - offset);
            match self.piece(&mut reader, buf, index, offset, length) {
                Ok(info) => done.push(info),
                Err(Abort::Stopped) => return Ok(()),
                Err(Abort::Failed(e)) => return Err(e),
            }
        }
    }

    fn file(&self) -> PathBuf {
        self.path.to_path_buf()
    }

    fn read_error(&self, (offset, source): (u64, io::Error)) -> DiskError {
        DiskError::Read {
            file: self.file(),
            offset,
            source,
        }
    }

    /// Hashes one piece and, once a non-zero block shows up, compresses it into the sink.
    fn piece(
        &self,
        reader: &mut SparseReader,
        buf: &mut [u8],
        index: usize,
        offset: u64,
        length: u64,
    ) -> Result<PieceInfo, Abort> {
        let info = |uncompressed_digest, blob| PieceInfo {
            index,
            offset,
            length,
            uncompressed_digest,
            blob,
            reused: false,
        };
        let in_hole = reader
            .is_hole(offset, length)
            .map_err(|e| self.read_error((offset, e)))?;
        if in_hole {
            return Ok(info(self.zeros.get(length), None));
        }
        let mut hasher = Sha256::new();
        // Leading all-zero blocks: no blob is started until data appears, so all-zero
        // pieces never touch the sink.
        let mut pos = 0u64;
        while pos < length {
            if self.stop.load(Ordering::Relaxed) {
                return Err(Abort::Stopped);
            }
            let n = (length - pos).min(BLOCK_SIZE as u64) as usize;
            let block = &mut buf[..n];
            let read = reader
                .read_block(offset + pos, block)
                .map_err(|e| self.read_error(e))?;
            if read && !is_zero(block) {
                break;
            }
            hasher.update(&ZEROS[..n]);
            pos += n as u64;
        }
        if pos == length {
            let digest = Digest::from_sha256(hasher.finalize().into());
            return Ok(info(digest, None));
        }
        // `buf` holds the first non-zero block, at `pos`.
        let sink_error = |source| DiskError::Sink {
            file: self.file(),
            index,
            offset,
            source,
        };
        // A piece an earlier export stored: hashed first, compressed only if changed.
        let mut known = None;
        if self.sink.has_previous(offset, length) {
            let digest = self.hash_rest(reader, buf, hasher, offset, pos, length)?;
            if let Some(blob) = self
                .sink
                .reuse(offset, length, &digest)
                .map_err(sink_error)?
            {
                return Ok(PieceInfo {
                    reused: true,
                    ..info(digest, Some(blob))
                });
            }
            // Changed: read its first data block again and compress it.
            let n = (length - pos).min(BLOCK_SIZE as u64) as usize;
            reader
                .read_block(offset + pos, &mut buf[..n])
                .map_err(|e| self.read_error(e))?;
            known = Some(digest);
            hasher = Sha256::new();
            hash_zeros(&mut hasher, pos);
        }
        let mut writer = self.sink.begin(index).map_err(sink_error)?;
        let written = match self.compress(
            reader,
            buf,
            Some(&mut hasher),
            &mut *writer,
            index,
            offset,
            pos,
            length,
        ) {
            Ok(written) => written,
            Err(e) => {
                writer.discard();
                return Err(e);
            }
        };
        let (blob, reported) = writer.commit().map_err(sink_error)?;
        if reported != written {
            return Err(Abort::Failed(DiskError::SinkSizeMismatch {
                file: self.file(),
                index,
                offset,
                written,
                reported,
            }));
        }
        let digest = Digest::from_sha256(hasher.finalize().into());
        // The compressed bytes were read a second time: they must be the ones
        // hashed first, or the file changed during the export.
        if known.as_ref().is_some_and(|k| *k != digest) {
            return Err(Abort::Failed(DiskError::Changed {
                file: self.file(),
                offset,
            }));
        }
        Ok(info(digest, Some((blob, written))))
    }

    /// Hashes the piece from `first` (whose block is in `buf`) to its end, after
    /// the zeros `hasher` has seen, and returns the piece's digest.
    fn hash_rest(
        &self,
        reader: &mut SparseReader,
        buf: &mut [u8],
        mut hasher: Sha256,
        offset: u64,
        first: u64,
        length: u64,
    ) -> Result<Digest, Abort> {
        self.each_block(reader, buf, offset, first, length, |block| {
            hasher.update(block);
            Ok(())
        })?;
        Ok(Digest::from_sha256(hasher.finalize().into()))
    }

    /// Calls `f` with each block of the piece from `first` (whose block is already
    /// in `buf`) to its end, reading the others into `buf`.
    fn each_block(
        &self,
        reader: &mut SparseReader,
        buf: &mut [u8],
        offset: u64,
        first: u64,
        length: u64,
        mut f: impl FnMut(&[u8]) -> Result<(), Abort>,
    ) -> Result<(), Abort> {
        let mut pos = first;
        while pos < length {
            let n = (length - pos).min(BLOCK_SIZE as u64) as usize;
            let block = &mut buf[..n];
            if pos != first {
                if self.stop.load(Ordering::Relaxed) {
                    return Err(Abort::Stopped);
                }
                reader
                    .read_block(offset + pos, block)
                    .map_err(|e| self.read_error(e))?;
            }
            f(block)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Compresses the piece from `first` (whose block is already in `buf`) to its end,
    /// after the zeros before it, hashing what it reads into `hasher` when given.
    /// Returns the compressed size.
    #[allow(clippy::too_many_arguments)]
    fn compress(
        &self,
        reader: &mut SparseReader,
        buf: &mut [u8],
        mut hasher: Option<&mut Sha256>,
        writer: &mut dyn PieceWriter,
        index: usize,
        offset: u64,
        first: u64,
        length: u64,
    ) -> Result<u64, Abort> {
        let compress_error = |source| DiskError::Compress {
            file: self.file(),
            index,
            offset,
            source,
        };
        let mut counted = Counter {
            inner: writer,
            count: 0,
        };
        {
            let mut encoder = self
                .codec
                .encoder(Box::new(&mut counted), self.options)
                .map_err(|source| DiskError::Codec {
                    file: self.file(),
                    index,
                    offset,
                    source,
                })?;
            // The skipped zeros go in as the same 1 MiB blocks a plain read gives, so
            // the encoder always sees the same sequence of writes for the same content.
            let mut pos = 0u64;
            while pos < first {
                let n = (first - pos).min(BLOCK_SIZE as u64) as usize;
                encoder.write_all(&ZEROS[..n]).map_err(compress_error)?;
                pos += n as u64;
            }
            self.each_block(reader, buf, offset, first, length, |block| {
                if let Some(hasher) = hasher.as_mut() {
                    hasher.update(block);
                }
                encoder.write_all(block).map_err(compress_error)?;
                Ok(())
            })?;
            encoder.finish().map_err(compress_error)?;
        }
        Ok(counted.count)
    }
}

/// Counts the compressed bytes, to check the sink's own count.
struct Counter<'a> {
    inner: &'a mut dyn PieceWriter,
    count: u64,
}

impl Write for Counter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
