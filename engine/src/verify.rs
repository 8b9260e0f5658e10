//! A reader that checks a blob's size and digest as it streams, so nothing unverified
//! is used: the error comes at the end of the stream, before the caller commits.

use std::io::{self, Read};

use sarde_api::digest::Digest;
use sha2::{Digest as _, Sha256};

/// Wraps a blob reader; at end of input it fails unless size and sha256 match.
pub struct VerifyingReader<R> {
    inner: R,
    /// `None`: the size only (the digest was checked moments ago, see `size_only`).
    hasher: Option<Sha256>,
    read: u64,
    expected_digest: Digest,
    expected_size: u64,
    what: String,
}

impl<R: Read> VerifyingReader<R> {
    pub fn new(inner: R, expected_digest: Digest, expected_size: u64, what: String) -> Self {
        VerifyingReader {
            inner,
            hasher: Some(Sha256::new()),
            read: 0,
            expected_digest,
            expected_size,
            what,
        }
    }

    /// Checks the size only: for a blob this process verified by size and digest
    /// as it downloaded it, a moment before (a pull), so it is not hashed twice.
    pub fn size_only(inner: R, expected_digest: Digest, expected_size: u64, what: String) -> Self {
        VerifyingReader {
            hasher: None,
            ..Self::new(inner, expected_digest, expected_size, what)
        }
    }

    /// Reads whatever the consumer left unread and checks the blob: call after the
    /// consumer is done, so trailing bytes it ignored are still verified.
    pub fn finish(mut self) -> io::Result<()> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(())
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = self.hasher.as_mut() {
            h.update(&buf[..n]);
        }
        self.read += n as u64;
        if self.read > self.expected_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: blob {} is larger than its announced {} bytes",
                    self.what, self.expected_digest, self.expected_size
                ),
            ));
        }
        if n == 0 && !buf.is_empty() {
            if self.read != self.expected_size {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{}: blob {} has {} bytes, {} were announced (truncated)",
                        self.what, self.expected_digest, self.read, self.expected_size
                    ),
                ));
            }
            let Some(hasher) = self.hasher.clone() else {
                return Ok(n);
            };
            let actual = Digest::from_sha256(hasher.finalize().into());
            if actual != self.expected_digest {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: blob {} is corrupt: its content hashes to {actual}",
                        self.what, self.expected_digest
                    ),
                ));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(data: &[u8], digest: Digest, size: u64) -> io::Result<()> {
        VerifyingReader::new(data, digest, size, "test".into()).finish()
    }

    #[test]
    fn accepts_only_the_announced_blob() {
        let d = Digest::sha256_of(b"hello");
        check(b"hello", d.clone(), 5).unwrap();
        assert!(
            check(b"hell", d.clone(), 5)
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
        assert!(
            check(b"hello!", d.clone(), 5)
                .unwrap_err()
                .to_string()
                .contains("larger")
        );
        assert!(
            check(b"jello", d, 5)
                .unwrap_err()
                .to_string()
                .contains("corrupt")
        );
    }
}
