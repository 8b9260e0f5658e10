//! Reading a blob out of the archive: a blocking thread reads ahead, with
//! `O_DIRECT` where the file system takes it, and hands whole chunks to the
//! async reader through a bounded channel. Nothing in this run reads the
//! archive twice, so its pages need not pass through the page cache (on a VM
//! host, fresh page-cache pages are what a read costs most: see `writer.rs`);
//! the thread keeps the disk busy while the copy engine hashes and writes.
//!
//! Tar entries start on 512-byte blocks; a read that starts inside a block
//! (a resumed blob) reads from the block's start and skips the difference.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::Bytes;
use sarde_api::transport::BlobReader;
use tokio::sync::mpsc;

use crate::writer::{BLOCK, DIRECT_ALIGN};

/// Bytes per read.
const CHUNK: u64 = 1 << 20;
/// Chunks read ahead of the consumer.
const AHEAD: usize = 2;

/// The `len` bytes of `file` from `start` on, read ahead on a blocking thread.
pub(crate) fn blob_reader(file: &Path, start: u64, len: u64) -> io::Result<BlobReader> {
    let buffered = File::open(file)?;
    let direct = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(file)
            .ok()
    };
    let (sender, receiver) = mpsc::channel::<io::Result<Bytes>>(AHEAD);
    tokio::task::spawn_blocking(move || {
        read_ahead(&buffered, direct.as_ref(), start, len, &sender)
    });
    let chunks = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|chunk| (chunk, receiver))
    });
    Ok(Box::pin(tokio_util::io::StreamReader::new(chunks)))
}

/// Chunk buffers that come back when the reader is done with them: the same
/// few pages are filled again and again (fresh memory for every chunk would
/// cost what the page cache does).
struct Pool {
    home: std::sync::mpsc::Sender<Vec<u8>>,
    returned: std::sync::mpsc::Receiver<Vec<u8>>,
}

impl Pool {
    fn new() -> Pool {
        let (home, returned) = std::sync::mpsc::channel();
        Pool { home, returned }
    }

    /// A buffer with room for `CHUNK` bytes at a `DIRECT_ALIGN`ed offset.
    fn take(&self) -> Vec<u8> {
        self.returned
            .try_recv()
            .unwrap_or_else(|_| vec![0u8; CHUNK as usize + DIRECT_ALIGN])
    }

    /// `range` of `storage` as bytes that return `storage` here when dropped.
    fn share(&self, storage: Vec<u8>, range: std::ops::Range<usize>) -> Bytes {
        Bytes::from_owner(Pooled {
            storage,
            range,
            home: self.home.clone(),
        })
    }
}

struct Pooled {
    storage: Vec<u8>,
    range: std::ops::Range<usize>,
    home: std::sync::mpsc::Sender<Vec<u8>>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.storage[self.range.clone()]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // The reading thread may be gone: then the buffer is simply freed.
        let _ = self.home.send(std::mem::take(&mut self.storage));
    }
}

/// Sends `[start, start + len)` in chunks until done, an error, or the reader
/// is dropped.
fn read_ahead(
    buffered: &File,
    mut direct: Option<&File>,
    start: u64,
    len: u64,
    sender: &mpsc::Sender<io::Result<Bytes>>,
) {
    let pool = Pool::new();
    let end = start + len;
    let mut at = start;
    while at < end {
        let chunk = match direct {
            Some(file) => match read_direct(&pool, file, at, end) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!("direct reads refused ({e}); reading through the page cache");
                    direct = None;
                    continue;
                }
                other => other,
            },
            None => read_buffered(&pool, buffered, at, end),
        };
        let failed = chunk.is_err();
        if let Ok(bytes) = &chunk {
            at += bytes.len() as u64;
        }
        if sender.blocking_send(chunk).is_err() || failed {
            return;
        }
    }
}

/// Up to a chunk from `at`, read directly from the block it lies in.
fn read_direct(pool: &Pool, file: &File, at: u64, end: u64) -> io::Result<Bytes> {
    let from = at - at % BLOCK;
    let span = (end - from).min(CHUNK);
    let want = (span.div_ceil(BLOCK) * BLOCK) as usize;
    let mut storage = pool.take();
    let offset = storage.as_ptr().align_offset(DIRECT_ALIGN);
    let got = read_full_at(file, &mut storage[offset..offset + want], from)?;
    let skip = (at - from) as usize;
    let usable = got.min(span as usize);
    if usable <= skip {
        return Err(cut_short(at));
    }
    Ok(pool.share(storage, offset + skip..offset + usable))
}

fn read_buffered(pool: &Pool, file: &File, at: u64, end: u64) -> io::Result<Bytes> {
    let mut storage = pool.take();
    let want = (end - at).min(CHUNK) as usize;
    let got = read_full_at(file, &mut storage[..want], at)?;
    if got == 0 {
        return Err(cut_short(at));
    }
    Ok(pool.share(storage, 0..got))
}

/// Fills `buffer` from `offset` on, or as much as the file has.
fn read_full_at(file: &File, buffer: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buffer.len() {
        match file.read_at(&mut buffer[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The archive ends before the entry does (it was truncated after it was listed).
fn cut_short(at: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the archive ends at byte {at}, inside the blob"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn read_all(path: &Path, start: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        blob_reader(path, start, len)?.read_to_end(&mut out).await?;
        Ok(out)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn any_range_reads_back_exactly_and_a_short_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        let data: Vec<u8> = (0..3 * CHUNK as usize + 777)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        for (start, len) in [
            (0, data.len() as u64),
            (512, 5000),
            (513, CHUNK + 1),
            (1, 1),
            (CHUNK - 3, 2 * CHUNK),
            (data.len() as u64 - 10, 10),
        ] {
            let got = read_all(&path, start, len).await.unwrap();
            assert_eq!(
                got,
                &data[start as usize..(start + len) as usize],
                "{start}+{len}"
            );
        }
        let err = read_all(&path, data.len() as u64 - 10, 20)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }
}
