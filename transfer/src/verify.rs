//! A blob on its way from one transport to another, verified as it streams: the
//! read that would complete it fails instead when the size or the digest is not
//! the descriptor's, so the destination never receives a whole wrong blob and
//! commits nothing, whatever the destination transport checks itself.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sarde_api::Digest;
use sarde_api::oci::Descriptor;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, ReadBuf};

use crate::progress::{Event, Progress};

pub(crate) struct VerifyingReader<R> {
    inner: R,
    blob: Descriptor,
    /// The source's location, for messages.
    source: String,
    hasher: Sha256,
    seen: u64,
    progress: Arc<dyn Progress>,
}

impl<R> VerifyingReader<R> {
    pub fn new(inner: R, blob: Descriptor, source: String, progress: Arc<dyn Progress>) -> Self {
        VerifyingReader {
            inner,
            blob,
            source,
            hasher: Sha256::new(),
            seen: 0,
            progress,
        }
    }

    fn mismatch(&self, what: &str, actual: String) -> io::Error {
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
            other => return other,
        }
        let chunk = &buf.filled()[before..];
        if chunk.is_empty() {
            if this.seen < this.blob.size {
                return Poll::Ready(Err(
                    this.mismatch("size", format!("{} (it ended)", this.seen))
                ));
            }
            if this.blob.size == 0 {
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
        this.hasher.update(chunk);
        this.seen += n;
        if this.seen == this.blob.size {
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
            "src".into(),
            Arc::new(NoProgress),
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
