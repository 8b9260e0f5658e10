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

/// Bytes per read.
const CHUNK: u64 = 1 << 20;
/// Chunks read ahead of the consumer.
const AHEAD: usize = 4;
/// Offset and length alignment of direct reads.
const BLOCK: u64 = 512;
/// Memory alignment direct reads may ask for.
const MEMORY_ALIGN: usize = 4096;

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

/// Sends `[start, start + len)` in chunks until done, an error, or the reader
/// is dropped.
fn read_ahead(
    buffered: &File,
    mut direct: Option<&File>,
    start: u64,
    len: u64,
    sender: &mpsc::Sender<io::Result<Bytes>>,
) {
    let end = start + len;
    let mut at = start;
    while at < end {
        let chunk = match direct {
            Some(file) => match read_direct(file, at, end) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!("direct reads refused ({e}); reading through the page cache");
                    direct = None;
                    continue;
                }
                other => other,
            },
            None => read_buffered(buffered, at, end),
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
fn read_direct(file: &File, at: u64, end: u64) -> io::Result<Bytes> {
    let from = at - at % BLOCK;
    let span = (end - from).min(CHUNK);
    let want = span.div_ceil(BLOCK) * BLOCK;
    let mut storage = vec![0u8; want as usize + MEMORY_ALIGN];
    let offset = storage.as_ptr().align_offset(MEMORY_ALIGN);
    let got = read_full_at(file, &mut storage[offset..offset + want as usize], from)?;
    let skip = (at - from) as usize;
    let usable = got.min(span as usize);
    if usable <= skip {
        return Err(cut_short(at));
    }
    Ok(Bytes::from(storage).slice(offset + skip..offset + usable))
}

fn read_buffered(file: &File, at: u64, end: u64) -> io::Result<Bytes> {
    let mut buffer = vec![0u8; (end - at).min(CHUNK) as usize];
    let got = read_full_at(file, &mut buffer, at)?;
    if got == 0 {
        return Err(cut_short(at));
    }
    buffer.truncate(got);
    Ok(Bytes::from(buffer))
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
