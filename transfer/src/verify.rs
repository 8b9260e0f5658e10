//! A blob on its way from one transport to another, verified as it streams: the
//! read that would complete it fails instead when the size or the digest is not
//! the descriptor's, so the destination never receives a whole wrong blob and
//! commits nothing, whatever the destination transport checks itself. (A
//! resumed blob starts past bytes this reader never saw: it checks the size,
//! and the destination that kept those bytes checks the digest.)
//!
//! Why a read failed is recorded for the engine, which sees the destination's
//! error first: a source that broke off is retried and resumed, a source with
//! the wrong content is not.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use sarde_api::Digest;
use sarde_api::oci::Descriptor;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, ReadBuf};

use crate::progress::{Event, Progress};

/// Why the source's stream failed.
#[derive(Debug)]
pub(crate) enum ReadFailure {
    /// Reading broke off after `received` bytes of the blob (offset included).
    Broke { received: u64, error: io::Error },
    /// The content is not the descriptor's.
    Mismatch { what: &'static str, actual: String },
}

impl ReadFailure {
    pub fn slot() -> Arc<Mutex<Option<ReadFailure>>> {
        Arc::default()
    }
}

pub(crate) struct VerifyingReader<R> {
    inner: R,
    blob: Descriptor,
    /// The source's location, for messages.
    source: String,
    hasher: Sha256,
    /// Whether the digest is checked (the stream starts at byte 0 and the
    /// destination does not check it itself).
    whole: bool,
    seen: u64,
    progress: Arc<dyn Progress>,
    /// Bytes read, for the summary.
    moved: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<ReadFailure>>>,
}

impl<R> VerifyingReader<R> {
    /// `hash`: check the digest of a stream that starts at byte 0 (a
    /// destination that checks it itself spares the second hashing).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        inner: R,
        blob: Descriptor,
        offset: u64,
        hash: bool,
        source: String,
        progress: Arc<dyn Progress>,
        moved: Arc<AtomicU64>,
        failure: Arc<Mutex<Option<ReadFailure>>>,
    ) -> Self {
        VerifyingReader {
            inner,
            blob,
            source,
            hasher: Sha256::new(),
            whole: offset == 0 && hash,
            seen: offset,
            progress,
            moved,
            failure,
        }
    }

    fn record(&self, failure: ReadFailure) {
        let mut slot = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(failure);
    }

    fn mismatch(&self, what: &'static str, actual: String) -> io::Error {
        self.record(ReadFailure::Mismatch {
            what,
            actual: actual.clone(),
        });
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: blob {} has {what} {actual}, expected {}; nothing was stored",
                self.source,
                self.blob.digest,
                if what == "size" {
                    self.blob.size.to_string()
                } else {
                    self.blob.digest.to_string()
                }
            ),
        )
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for VerifyingReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => {
                this.record(ReadFailure::Broke {
                    received: this.seen,
                    error: io::Error::new(e.kind(), e.to_string()),
                });
                // Only this reader's own verdict says the data is wrong
                // (InvalidData: the destination keeps nothing of it).
                let kind = match e.kind() {
                    io::ErrorKind::InvalidData => io::ErrorKind::Other,
                    kind => kind,
                };
                return Poll::Ready(Err(io::Error::new(kind, e)));
            }
            Poll::Pending => return Poll::Pending,
        }
        let chunk = &buf.filled()[before..];
        if chunk.is_empty() {
            if this.seen < this.blob.size {
                // A stream that ends early is a connection cut short more often
                // than a wrong blob: retried, and resumed where it stopped.
                let message = format!(
                    "{}: blob {} ended after {} of {} bytes (it ended early)",
                    this.source, this.blob.digest, this.seen, this.blob.size
                );
                this.record(ReadFailure::Broke {
                    received: this.seen,
                    error: io::Error::new(io::ErrorKind::UnexpectedEof, message.clone()),
                });
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, message)));
            }
            if this.blob.size == 0 && this.whole {
                // An empty blob never reaches the check below.
                let actual =
                    Digest::from_sha256(std::mem::take(&mut this.hasher).finalize().into());
                if actual != this.blob.digest {
                    return Poll::Ready(Err(this.mismatch("digest", actual.to_string())));
                }
            }
            return Poll::Ready(Ok(()));
        }
        let n = chunk.len() as u64;
        if this.seen + n > this.blob.size {
            buf.set_filled(before);
            let more = format!("more than {}", this.blob.size);
            return Poll::Ready(Err(this.mismatch("size", more)));
        }
        if this.whole {
            this.hasher.update(chunk);
        }
        this.seen += n;
        this.moved.fetch_add(n, Ordering::Relaxed);
        if this.seen == this.blob.size && this.whole {
            let actual = Digest::from_sha256(std::mem::take(&mut this.hasher).finalize().into());
            if actual != this.blob.digest {
                // The last bytes never reach the destination.
                buf.set_filled(before);
                return Poll::Ready(Err(this.mismatch("digest", actual.to_string())));
            }
        }
        this.progress.event(&Event::Bytes {
            digest: &this.blob.digest,
            n,
        });
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NoProgress;
    use tokio::io::AsyncReadExt;

    async fn read_all(data: &[u8], blob: &Descriptor) -> io::Result<Vec<u8>> {
        let mut reader = VerifyingReader::new(
            std::io::Cursor::new(data.to_vec()),
            blob.clone(),
            0,
            true,
            "src".into(),
            Arc::new(NoProgress),
            Arc::default(),
            ReadFailure::slot(),
        );
        let mut out = Vec::new();
        reader.read_to_end(&mut out).await.map(|_| out)
    }

    #[tokio::test]
    async fn the_right_blob_passes_and_wrong_ones_never_complete() {
        let data = vec![5u8; 300_000];
        let blob = Descriptor::new("x", Digest::sha256_of(&data), data.len() as u64);
        assert_eq!(read_all(&data, &blob).await.unwrap(), data);

        let mut damaged = data.clone();
        damaged[299_999] ^= 1;
        let e = read_all(&damaged, &blob).await.unwrap_err();
        assert!(e.to_string().contains("has digest"), "{e}");

        let e = read_all(&data[..1000], &blob).await.unwrap_err();
        assert!(e.to_string().contains("it ended"), "{e}");

        let empty = Descriptor::new("x", Digest::sha256_of(b""), 0);
        assert!(read_all(b"", &empty).await.unwrap().is_empty());
        let claimed = Descriptor::new("x", Digest::sha256_of(b"something"), 0);
        let e = read_all(b"", &claimed).await.unwrap_err();
        assert!(e.to_string().contains("has digest"), "{e}");

        let mut longer = data.clone();
        longer.push(0);
        let e = read_all(&longer, &blob).await.unwrap_err();
        assert!(e.to_string().contains("more than 300000"), "{e}");
    }
}
