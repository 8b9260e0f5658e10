//! Reading files that may be sparse: holes are found with `SEEK_DATA`/`SEEK_HOLE` and
//! produced as zeros without reading them, so a mostly empty 60 GB disk costs little.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

use sarde_api::Digest;
use sha2::{Digest as _, Sha256};

use crate::BLOCK_SIZE;

/// Source of zeros for hashing holes and for writing zeros where holes can't be punched.
pub(crate) static ZEROS: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];

/// Whether `buf` holds only zero bytes; the inner fold vectorises, the outer loop stops
/// at the first non-zero chunk.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(4096);
    chunks.all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
        && chunks.remainder().iter().fold(0u8, |a, &b| a | b) == 0
}

/// Reads until `buf` is full or the input ends; returns the bytes read. Filling whole
/// blocks keeps block boundaries (and so compressed output) independent of how the
/// reader splits its data.
pub(crate) fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The path behind an open file, for error messages about files we were handed open.
pub(crate) fn path_of(file: &File) -> PathBuf {
    let fd = file.as_raw_fd();
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .unwrap_or_else(|_| PathBuf::from(format!("<file descriptor {fd}>")))
}

/// sha256 of runs of zeros, remembered per length: whole-hole pieces all have the same
/// length, and hashing 512 MiB of zeros for each of them would cost more than reading.
#[derive(Default)]
pub(crate) struct ZeroDigests(Mutex<Vec<(u64, Digest)>>);

impl ZeroDigests {
    pub(crate) fn get(&self, length: u64) -> Digest {
        if let Some((_, d)) = self.lock().iter().find(|(l, _)| *l == length) {
            return d.clone();
        }
        // Computed outside the lock; two threads may both compute it, which is harmless.
        let mut hasher = Sha256::new();
        hash_zeros(&mut hasher, length);
        let digest = Digest::from_sha256(hasher.finalize().into());
        self.lock().push((length, digest.clone()));
        digest
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Digest)>> {
        // A panic elsewhere cannot leave the list inconsistent: it only ever grows.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) fn hash_zeros(hasher: &mut Sha256, mut length: u64) {
    while length > 0 {
        let n = length.min(BLOCK_SIZE as u64) as usize;
        hasher.update(&ZEROS[..n]);
        length -= n as u64;
    }
}

/// Alignment of direct I/O offsets, lengths and buffers.
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// One block buffer whose start is aligned for direct I/O.
pub(crate) struct AlignedBlock {
    bytes: Vec<u8>,
    start: usize,
}

impl AlignedBlock {
    pub(crate) fn new() -> Self {
        let bytes = vec![0u8; BLOCK_SIZE + DIRECT_ALIGN];
        let start = bytes.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        AlignedBlock { bytes, start }
    }

    pub(crate) fn as_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + BLOCK_SIZE]
    }
}

/// A reader of one open file that knows where its data extents are. Each thread owns
/// one, on its own file handle, so readahead state and the file offset (which `lseek`
/// moves) are never shared.
pub(crate) struct SparseReader {
    file: File,
    /// The same file opened with `O_DIRECT`, for aligned reads: a 60 GB export
    /// then neither fills nor evicts the page cache (whose fresh pages cost more
    /// than the reads on virtualised hosts).
    direct: Option<File>,
    len: u64,
    /// Whether the file system answers `SEEK_DATA`; if not, everything is data.
    seek: bool,
    /// From the last query: `[from, start)` is a hole, `[start, end)` is data.
    extent: Option<(u64, u64, u64)>,
}

impl SparseReader {
    pub(crate) fn new(file: File, len: u64) -> Self {
        SparseReader {
            file,
            direct: None,
            len,
            seek: true,
            extent: None,
        }
    }

    /// Reads aligned ranges with `O_DIRECT` where the file system allows it, the
    /// rest (and everything elsewhere) through the page cache, read ahead.
    pub(crate) fn read_directly(&mut self, path: &std::path::Path) {
        use std::os::unix::fs::OpenOptionsExt;
        self.direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        self.advise_sequential();
    }

    /// Reads `buf` at `at`: directly when offset, length and buffer are aligned.
    fn read_at(&mut self, buf: &mut [u8], at: u64) -> io::Result<()> {
        let aligned = at % DIRECT_ALIGN as u64 == 0
            && buf.len() % DIRECT_ALIGN == 0
            && buf.as_ptr().align_offset(DIRECT_ALIGN) == 0;
        if let Some(direct) = self.direct.as_ref().filter(|_| aligned) {
            match direct.read_exact_at(buf, at) {
                Ok(()) => return Ok(()),
                // Refused for this file after all: through the page cache from now on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.direct = None,
                Err(e) => return Err(e),
            }
        }
        self.file.read_exact_at(buf, at)
    }

    /// Tells the kernel we read forward, so it reads ahead further.
    pub(crate) fn advise_sequential(&self) {
        // Advice only: failure changes nothing but speed.
        unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
    }

    /// The data extent at or after `pos`: `(start, end)`, with `start == len` when only
    /// holes follow.
    pub(crate) fn data_at(&mut self, pos: u64) -> io::Result<(u64, u64)> {
        if let Some((from, start, end)) = self.extent
            && from <= pos
            && pos < end
        {
            return Ok((start.max(pos), end));
        }
        if !self.seek {
            return Ok((pos, self.len));
        }
        let fd = self.file.as_raw_fd();
        let start = match lseek(fd, pos, libc::SEEK_DATA) {
            Ok(start) => start.min(self.len),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => self.len,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                self.seek = false;
                return Ok((pos, self.len));
            }
            Err(e) => return Err(e),
        };
        let end = if start >= self.len {
            self.len
        } else {
            match lseek(fd, start, libc::SEEK_HOLE) {
                Ok(end) => end.clamp(start, self.len),
                // The file shrank under us: let the read report it.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => self.len,
                Err(e) => return Err(e),
            }
        };
        // An extent that ends where it starts would make no progress; treat as data.
        let (start, end) = if start < self.len && end <= start {
            (start, self.len)
        } else {
            (start, end)
        };
        self.extent = Some((pos, start, end));
        Ok((start, end))
    }

    /// Whether `[offset, offset + length)` lies entirely in a hole (reads as zeros).
    pub(crate) fn is_hole(&mut self, offset: u64, length: u64) -> io::Result<bool> {
        let (start, _) = self.data_at(offset)?;
        Ok(start >= offset + length)
    }

    /// Fills `buf` with the file's content at `pos`, reading data extents and writing
    /// zeros for holes. Returns whether anything was read (false: `buf` is all zeros).
    /// Errors carry the offset that failed.
    pub(crate) fn read_block(
        &mut self,
        pos: u64,
        buf: &mut [u8],
    ) -> Result<bool, (u64, io::Error)> {
        let end = pos + buf.len() as u64;
        let mut at = pos;
        let mut read_any = false;
        while at < end {
            let (start, data_end) = self.data_at(at).map_err(|e| (at, e))?;
            let i = (at - pos) as usize;
            if start > at {
                let stop = start.min(end);
                buf[i..(stop - pos) as usize].fill(0);
                at = stop;
                continue;
            }
            let stop = data_end.min(end);
            self.read_at(&mut buf[i..(stop - pos) as usize], at)
                .map_err(|e| (at, e))?;
            read_any = true;
            at = stop;
        }
        Ok(read_any)
    }
}

fn lseek(fd: i32, pos: u64, whence: i32) -> io::Result<u64> {
    let offset = libc::off_t::try_from(pos).map_err(io::Error::other)?;
    // SAFETY: lseek only inspects the descriptor, which the caller's File keeps open.
    let r = unsafe { libc::lseek(fd, offset, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_finds_a_single_byte_anywhere() {
        let mut buf = vec![0u8; 10_000];
        assert!(is_zero(&buf));
        assert!(is_zero(&[]));
        for pos in [0, 1, 4095, 4096, 8191, 8192, 9999] {
            buf[pos] = 1;
            assert!(!is_zero(&buf), "byte at {pos}");
            buf[pos] = 0;
        }
    }

    #[test]
    fn zero_digests_match_hashing_zeros() {
        let cache = ZeroDigests::default();
        for len in [0u64, 1, 1 << 20, (1 << 20) + 7, 3 << 20] {
            let expected = Digest::sha256_of(&vec![0u8; len as usize]);
            assert_eq!(cache.get(len), expected);
            assert_eq!(cache.get(len), expected, "cached");
        }
    }

    #[test]
    fn sparse_reader_sees_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::create(&path).unwrap();
        let len = 16u64 << 20;
        file.set_len(len).unwrap();
        file.write_all_at(&[7u8; 5000], 5 << 20).unwrap();
        drop(file);
        let mut reader = SparseReader::new(File::open(&path).unwrap(), len);
        assert!(reader.is_hole(0, 4 << 20).unwrap());
        assert!(!reader.is_hole(4 << 20, 2 << 20).unwrap());
        assert!(reader.is_hole(8 << 20, 8 << 20).unwrap());
        let mut buf = vec![0xffu8; 1 << 20];
        assert!(!reader.read_block(0, &mut buf).unwrap());
        assert!(is_zero(&buf));
        buf.fill(0xff);
        assert!(reader.read_block(5 << 20, &mut buf).unwrap());
        assert!(buf[..5000].iter().all(|&b| b == 7) && is_zero(&buf[5000..]));
        // A block straddling hole and data.
        buf.fill(0xff);
        assert!(reader.read_block((5 << 20) - 100, &mut buf).unwrap());
        assert!(is_zero(&buf[..100]) && buf[100..5100].iter().all(|&b| b == 7));
        assert!(is_zero(&buf[5100..]));
    }
}
