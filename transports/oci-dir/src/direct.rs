//! Appending to a file past the page cache (`O_DIRECT`), for blobs written
//! once and not read back through the cache soon: an export's pieces, a
//! download's partial blob. On virtualised hosts a fresh page-cache page costs
//! more than the write itself (measured: `copy_folio_from_iter_atomic` was 75%
//! of a pull's CPU, and 11 s of system time went to a 1.5 GB export), and a
//! 60 GB pull should not evict what the host's running VMs use.
//!
//! Bytes are gathered into an aligned buffer and written in whole chunks at
//! aligned offsets; the last, partial block is padded and the file cut back to
//! its length. Where the file system refuses direct I/O, the same writes go
//! through the page cache.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Alignment of direct I/O offsets, lengths and buffers.
const ALIGN: usize = 4096;
/// Bytes gathered before one direct write.
const CHUNK: usize = 1 << 20;

/// A chunk-sized buffer whose start is aligned for direct I/O.
struct Chunk {
    storage: Vec<u8>,
    start: usize,
}

impl Chunk {
    fn new() -> Chunk {
        let storage = vec![0u8; CHUNK + ALIGN];
        let start = storage.as_ptr().align_offset(ALIGN).min(ALIGN);
        Chunk { storage, start }
    }

    fn get(&self) -> &[u8] {
        &self.storage[self.start..self.start + CHUNK]
    }

    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + CHUNK]
    }
}

/// The same open file again, with `O_DIRECT` (not a path that may have been
/// replaced meanwhile); `None` where refused.
fn reopen_direct(file: &File, write: bool) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()
}

pub(crate) struct DirectAppender {
    /// The file opened again with `O_DIRECT`; `None` where refused.
    direct: Option<File>,
    buf: Chunk,
    filled: usize,
    /// Where the buffer's first byte goes in the file (aligned).
    offset: u64,
}

impl DirectAppender {
    /// Appends to `file` from `at` (its length): the unaligned tail before `at`
    /// is read back into the buffer, so every direct write is aligned.
    pub(crate) fn new(file: &File, at: u64) -> io::Result<DirectAppender> {
        let offset = at / ALIGN as u64 * ALIGN as u64;
        let mut appender = DirectAppender {
            direct: reopen_direct(file, true),
            buf: Chunk::new(),
            filled: (at - offset) as usize,
            offset,
        };
        let tail = appender.filled;
        file.read_exact_at(&mut appender.buf.get_mut()[..tail], offset)?;
        Ok(appender)
    }

    /// Bytes the file will hold once finished.
    pub(crate) fn len(&self) -> u64 {
        self.offset + self.filled as u64
    }

    /// Appends `data`, writing each full chunk.
    pub(crate) fn push(&mut self, file: &File, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = data.len().min(CHUNK - self.filled);
            let at = self.filled;
            self.buf.get_mut()[at..at + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == CHUNK {
                self.write_out(file, CHUNK)?;
                self.offset += CHUNK as u64;
                self.filled = 0;
            }
        }
        Ok(())
    }

    /// Writes what is buffered and sets the file's length.
    pub(crate) fn finish(&mut self, file: &File) -> io::Result<()> {
        if self.filled > 0 {
            let padded = self.filled.div_ceil(ALIGN) * ALIGN;
            let at = self.filled;
            self.buf.get_mut()[at..padded].fill(0);
            self.write_out(file, padded)?;
        }
        file.set_len(self.len())
    }

    /// Writes what is buffered through the page cache, keeping the buffer (for
    /// a writer that stops half way: the bytes stay for a resume).
    pub(crate) fn save(&self, file: &File) -> io::Result<()> {
        let data = &self.buf.get()[..self.filled];
        file.write_all_at(data, self.offset)
    }

    /// Forgets everything: appending starts at byte 0 again.
    pub(crate) fn reset(&mut self) {
        self.offset = 0;
        self.filled = 0;
    }

    fn write_out(&mut self, file: &File, len: usize) -> io::Result<()> {
        let data = &self.buf.get()[..len];
        if let Some(direct) = &self.direct {
            match direct.write_all_at(data, self.offset) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!("direct writes refused ({e}); writing through the page cache");
                    self.direct = None;
                }
                Err(e) => return Err(e),
            }
        }
        file.write_all_at(data, self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_exactly_what_was_pushed_also_after_an_unaligned_start() {
        let dir = tempfile::tempdir().unwrap();
        for (head, size) in [
            (0usize, 0usize),
            (0, 1),
            (5000, 4095),
            (4096, 4096),
            (77, CHUNK + 3),
            (0, 3 * CHUNK + 77),
        ] {
            let path = dir.path().join(format!("f-{head}-{size}"));
            let data: Vec<u8> = (0..head + size).map(|i| (i * 31 % 251) as u8).collect();
            std::fs::write(&path, &data[..head]).unwrap();
            let file = File::options().read(true).write(true).open(&path).unwrap();
            let mut appender = DirectAppender::new(&file, head as u64).unwrap();
            for part in data[head..].chunks(7001) {
                appender.push(&file, part).unwrap();
            }
            appender.finish(&file).unwrap();
            let back = std::fs::read(&path).unwrap();
            assert_eq!(back.len(), data.len());
            assert!(back == data, "content differs ({head} + {size})");
        }
    }
}

/// Reads a whole file from its start past the page cache, in aligned chunks,
/// for a blob read once right after it was written (a pull's import): filling
/// the cache would cost more than the reads. Falls back to the file as opened
/// where the file system refuses direct I/O.
pub struct DirectReader {
    file: File,
    direct: Option<File>,
    buf: Chunk,
    /// Valid bytes in the buffer, and how many of them were handed out.
    len: usize,
    pos: usize,
    /// File offset of the next chunk.
    offset: u64,
}

impl DirectReader {
    pub fn new(file: File) -> DirectReader {
        DirectReader {
            direct: reopen_direct(&file, false),
            file,
            buf: Chunk::new(),
            len: 0,
            pos: 0,
            offset: 0,
        }
    }

    /// Reads the next chunk into the buffer; 0 at the end of the file.
    fn fill(&mut self) -> io::Result<usize> {
        let buf = self.buf.get_mut();
        let n = loop {
            let result = match &self.direct {
                Some(direct) => direct.read_at(buf, self.offset),
                None => self.file.read_at(buf, self.offset),
            };
            match result {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && self.direct.is_some() => {
                    self.direct = None;
                }
                Err(e) => return Err(e),
            }
        };
        self.offset += n as u64;
        self.len = n;
        self.pos = 0;
        // A short direct read ends the file; an unaligned offset after it
        // would be refused, so the rest (none, normally) is read buffered.
        if n % ALIGN != 0 {
            self.direct = None;
        }
        Ok(n)
    }
}

impl io::Read for DirectReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.len && self.fill()? == 0 {
            return Ok(0);
        }
        let n = out.len().min(self.len - self.pos);
        out[..n].copy_from_slice(&self.buf.get()[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod reader_tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn reads_the_whole_file_in_any_read_sizes() {
        let dir = tempfile::tempdir().unwrap();
        for size in [0usize, 1, 4096, CHUNK, CHUNK + 4097, 2 * CHUNK] {
            let path = dir.path().join(format!("r-{size}"));
            let data: Vec<u8> = (0..size).map(|i| (i * 7 % 253) as u8).collect();
            std::fs::write(&path, &data).unwrap();
            let mut reader = DirectReader::new(File::open(&path).unwrap());
            let mut back = Vec::new();
            let mut buf = vec![0u8; 3001];
            loop {
                let n = reader.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                back.extend_from_slice(&buf[..n]);
            }
            assert!(back == data, "size {size}");
        }
    }
}
