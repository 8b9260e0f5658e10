//! A blob's bytes on the wire: the checked upload body and the exact download.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sarde_api::digest::Algorithm;
use sarde_api::limits::TimeBounds;
use sarde_api::oci::Descriptor;
use sarde_api::transport::BlobReader;
use sarde_api::{Digest, TransportError};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::error::Object;
use crate::http::UploadWatch;

/// Bytes read from the caller per upload chunk: small, so memory stays bounded.
const UPLOAD_CHUNK: usize = 256 * 1024;

/// The upload body: reads the caller's data in small chunks, counts and hashes
/// it, and fails instead of sending the last chunk when the digest is wrong, or
/// as soon as the data runs longer or shorter than announced — so the request
/// aborts and the registry never commits anything else. The reason goes to
/// `failure` because reqwest reports only "body error".
pub(crate) fn checked_stream(
    data: BlobReader,
    blob: Descriptor,
    location: String,
    object: Object,
    failure: Arc<Mutex<Option<TransportError>>>,
    watch: UploadWatch,
) -> impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static {
    struct State {
        data: BlobReader,
        hasher: Option<Sha256>,
        total: u64,
        done: bool,
    }
    let hasher = (blob.digest.algorithm() == Algorithm::Sha256).then(Sha256::new);
    let state = State {
        data,
        hasher,
        total: 0,
        done: false,
    };
    futures_util::stream::unfold(state, move |mut st| {
        let (blob, location, object, failure) = (
            blob.clone(),
            location.clone(),
            object.clone(),
            failure.clone(),
        );
        // The registry took the previous chunk.
        watch.touch();
        let watch = watch.clone();
        async move {
            if st.done {
                return None;
            }
            let fail = |e: TransportError| {
                let message = e.to_string();
                if let Ok(mut f) = failure.lock() {
                    *f = Some(e);
                }
                io::Error::other(message)
            };
            let mismatch =
                |what: &'static str, expected: String, actual: String| TransportError::Mismatch {
                    location: location.clone(),
                    object: format!("{object} (nothing stored)"),
                    what,
                    expected,
                    actual,
                };
            let read_error = |source: io::Error| TransportError::Io {
                location: location.clone(),
                context: format!("reading the data of {object}"),
                source,
            };
            let mut buf = vec![0u8; UPLOAD_CHUNK];
            let n = match st.data.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    st.done = true;
                    return Some((Err(fail(read_error(e))), st));
                }
            };
            st.total += n as u64;
            if n == 0 && st.total < blob.size {
                st.done = true;
                let e = mismatch(
                    "size of the data",
                    blob.size.to_string(),
                    st.total.to_string(),
                );
                return Some((Err(fail(e)), st));
            }
            if st.total > blob.size {
                st.done = true;
                let e = mismatch(
                    "size of the data",
                    blob.size.to_string(),
                    format!("more than {}", blob.size),
                );
                return Some((Err(fail(e)), st));
            }
            buf.truncate(n);
            if let Some(h) = st.hasher.as_mut() {
                h.update(&buf);
            }
            if st.total == blob.size {
                // The last chunk: check everything before it leaves.
                st.done = true;
                watch.finish();
                if let Some(h) = st.hasher.take() {
                    let actual = Digest::from_sha256(h.finalize().into());
                    if actual != blob.digest {
                        let e = mismatch(
                            "digest of the data",
                            blob.digest.to_string(),
                            actual.to_string(),
                        );
                        return Some((Err(fail(e)), st));
                    }
                }
                let mut probe = [0u8; 1];
                match st.data.read(&mut probe).await {
                    Ok(0) => {}
                    Ok(_) => {
                        let e = mismatch(
                            "size of the data",
                            blob.size.to_string(),
                            format!("more than {}", blob.size),
                        );
                        return Some((Err(fail(e)), st));
                    }
                    Err(e) => return Some((Err(fail(read_error(e))), st)),
                }
                if buf.is_empty() {
                    return None;
                }
            }
            Some((Ok(Bytes::from(buf)), st))
        }
    })
    .boxed()
}

/// The first byte of a `Content-Range: bytes START-END/TOTAL` answer.
pub(crate) fn content_range_start(value: &str) -> Option<u64> {
    let range = value.trim().strip_prefix("bytes")?.trim_start();
    range.split('-').next()?.trim().parse().ok()
}

/// A blob download that yields exactly `remaining` bytes after skipping `skip`
/// (never more, whatever the registry sends), fails if the answer ends early, and
/// fails as timed out when it averages less than `min_rate` bytes per second
/// over a `window` (a drip the idle timeout can't catch).
pub(crate) struct Exact {
    inner: Pin<Box<dyn AsyncRead + Send>>,
    skip: u64,
    remaining: u64,
    what: String,
    min_rate: u64,
    window: Duration,
    window_start: Instant,
    window_bytes: u64,
}

impl Exact {
    pub fn new(
        inner: Pin<Box<dyn AsyncRead + Send>>,
        skip: u64,
        remaining: u64,
        what: String,
        bounds: TimeBounds,
    ) -> Exact {
        Exact {
            inner,
            skip,
            remaining,
            what,
            min_rate: bounds.min_rate,
            window: bounds.idle,
            window_start: Instant::now(),
            window_bytes: 0,
        }
    }

    /// Counts `n` bytes; an error when the window just ended below the rate.
    fn pace(&mut self, n: u64) -> io::Result<()> {
        self.window_bytes += n;
        let elapsed = self.window_start.elapsed();
        if self.min_rate == 0 || elapsed < self.window {
            return Ok(());
        }
        let rate = self.window_bytes as f64 / elapsed.as_secs_f64();
        if rate < self.min_rate as f64 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} came at {rate:.0} bytes/s over {:.0} s, below min-rate {} bytes/s",
                    self.what,
                    elapsed.as_secs_f64(),
                    self.min_rate
                ),
            ));
        }
        self.window_start = Instant::now();
        self.window_bytes = 0;
        Ok(())
    }
}

impl AsyncRead for Exact {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.skip > 0 {
            let mut scratch = [0u8; 8192];
            let want = scratch
                .len()
                .min(usize::try_from(this.skip).unwrap_or(usize::MAX));
            let mut rb = ReadBuf::new(&mut scratch[..want]);
            match this.inner.as_mut().poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} ended before the resume offset", this.what),
                    )));
                }
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len() as u64;
                    this.skip -= n;
                    if let Err(e) = this.pace(n) {
                        return Poll::Ready(Err(e));
                    }
                }
                other => return other,
            }
        }
        if this.remaining == 0 || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match this.inner.as_mut().poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let mut n = (buf.filled().len() - before) as u64;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} ended {} bytes early", this.what, this.remaining),
                    )));
                }
                if n > this.remaining {
                    // Never more than the descriptor says.
                    n = this.remaining;
                    buf.set_filled(before + n as usize);
                }
                this.remaining -= n;
                if let Err(e) = this.pace(n) {
                    // Nothing of a failed read counts; a resume asks for it again.
                    buf.set_filled(before);
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_start_is_read() {
        assert_eq!(content_range_start("bytes 1024-2047/4096"), Some(1024));
        assert_eq!(content_range_start("bytes 0-9/*"), Some(0));
        assert_eq!(content_range_start(" bytes  77-99/100 "), Some(77));
        assert_eq!(content_range_start("items 1-2/3"), None);
        assert_eq!(content_range_start("bytes */4096"), None);
    }
}

#[cfg(test)]
mod pace_tests {
    use super::*;

    #[tokio::test]
    async fn a_drip_below_the_minimum_rate_fails_and_a_fast_stream_does_not() {
        let bounds = TimeBounds {
            idle: Duration::from_millis(200),
            min_rate: 1000,
            ..TimeBounds::default()
        };
        // 10 bytes in about 300 ms: 33 bytes/s.
        let (mut tx, rx) = tokio::io::duplex(64);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for _ in 0..10 {
                if tx.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        });
        let mut slow = Exact::new(Box::pin(rx), 0, 10, "blob d".into(), bounds);
        let mut out = Vec::new();
        let e = slow.read_to_end(&mut out).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("below min-rate 1000"), "{e}");

        let data = vec![7u8; 100_000];
        let mut fast = Exact::new(
            Box::pin(std::io::Cursor::new(data)),
            0,
            100_000,
            "blob d".into(),
            bounds,
        );
        let mut out = Vec::new();
        fast.read_to_end(&mut out).await.unwrap();
        assert_eq!(out.len(), 100_000);
    }

    #[tokio::test]
    async fn never_more_than_the_descriptor_says() {
        let data = vec![1u8; 50];
        let mut exact = Exact::new(
            Box::pin(std::io::Cursor::new(data)),
            0,
            40,
            "blob d".into(),
            TimeBounds::default(),
        );
        let mut out = [0u8; 100];
        let mut total = 0;
        loop {
            let n = exact.read(&mut out[total..]).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total, 40);
    }
}
