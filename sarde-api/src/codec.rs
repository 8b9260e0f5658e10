//! The `Codec` extension point: a compression format that streams in both directions.
//!
//! A codec is stateless; it hands out an encoder or a decoder per stream. Encoders
//! and decoders stream with bounded memory whatever the input size, so a 60 GB disk
//! never sits in memory. Decoders must fail on truncated or corrupt input rather
//! than return short output: callers rely on an error, not on counting bytes.

use std::io::{self, Read, Write};
use std::ops::RangeInclusive;

use thiserror::Error;

/// Errors a codec reports when it is set up (stream errors are `io::Error`s).
#[derive(Debug, Error)]
pub enum CodecError {
    #[error("codec {codec}: level {level} is out of range {min}..={max}")]
    LevelOutOfRange {
        codec: String,
        level: i32,
        min: i32,
        max: i32,
    },
    #[error("codec {codec}: {message}")]
    Setup { codec: String, message: String },
    #[error("codec {codec}: {source}")]
    Io {
        codec: String,
        #[source]
        source: io::Error,
    },
}

/// How to encode one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Compression level; `None` picks the codec's default.
    pub level: Option<i32>,
    /// Worker threads for one stream. 1 asks for one, which a codec may run beside
    /// the caller's thread so I/O overlaps compression (zstd does); 0 asks for none:
    /// everything in the caller's thread, the cheapest when the caller already runs
    /// several streams at once (piece export). A codec may produce different bytes
    /// for 0 than for 1 or more.
    pub threads: usize,
    /// The original file name, for formats that record it (gzip's FNAME).
    pub file_name: Option<String>,
    /// Modification time in seconds since the epoch, for formats that record it
    /// (gzip's MTIME). `None` writes 0, which keeps output deterministic.
    pub mtime: Option<u32>,
}

impl EncodeOptions {
    pub fn with_level(mut self, level: i32) -> Self {
        self.level = Some(level);
        self
    }

    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }
}

/// A streaming encoder. Dropping it without `finish` leaves the output incomplete,
/// which decoders reject.
pub trait Encoder: Write + Send {
    /// Writes the trailer and flushes everything to the underlying writer.
    fn finish(self: Box<Self>) -> io::Result<()>;
}

/// Something that can be written to and then finished: a boxed writer for output.
pub type Output<'w> = Box<dyn Write + Send + 'w>;
/// A boxed reader for input.
pub type Input<'r> = Box<dyn Read + Send + 'r>;

/// A compression format.
pub trait Codec: Send + Sync {
    /// The name users pass to `--codec` and config files (`zstd`, `xz`, `gzip`, `raw`).
    fn name(&self) -> &str;

    /// The media-type suffix this codec produces (`+zstd`, `+xz`, `+gzip`), or `None`
    /// for uncompressed data.
    fn media_type_suffix(&self) -> Option<&str>;

    /// The accepted range of compression levels, or `None` when levels mean nothing.
    fn levels(&self) -> Option<RangeInclusive<i32>>;

    /// The level used when none is given.
    fn default_level(&self) -> Option<i32>;

    /// Whether `EncodeOptions::threads` > 1 speeds up a single stream.
    fn multithreaded(&self) -> bool {
        false
    }

    /// Whether the encoder always stores a checksum of the original bytes that the
    /// decoder verifies (zstd's content checksum, gzip's CRC-32, xz's check), so a
    /// decoder that produced other bytes fails instead of returning them. Importers
    /// then skip their own sha256 of the decoded bytes: the blob's digest, which is
    /// verified too, fixes what the stream holds, and the codec's checksum vouches
    /// for the decoding. (A stream from elsewhere may lack the checksum; its bytes
    /// are still exactly what the verified blob decodes to.)
    fn checks_decoded(&self) -> bool {
        false
    }

    /// Starts compressing into `output`.
    fn encoder<'w>(
        &self,
        output: Output<'w>,
        options: &EncodeOptions,
    ) -> Result<Box<dyn Encoder + 'w>, CodecError>;

    /// Starts decompressing `input`; the reader yields the original bytes and an
    /// `io::Error` on truncated or corrupt input. Formats made of independent
    /// frames (gzip members, zstd without workers) may read a stream cut exactly
    /// between two frames as a shorter one: check the length where it is known
    /// ([`decode_exact`]; the importer checks every piece's).
    fn decoder<'r>(&self, input: Input<'r>) -> Result<Input<'r>, CodecError>;

    /// Checks a level against `levels()`; codecs call this from `encoder`.
    fn check_level(&self, options: &EncodeOptions) -> Result<Option<i32>, CodecError> {
        let level = options.level.or_else(|| self.default_level());
        match (level, self.levels()) {
            (Some(level), Some(range)) if !range.contains(&level) => {
                Err(CodecError::LevelOutOfRange {
                    codec: self.name().to_string(),
                    level,
                    min: *range.start(),
                    max: *range.end(),
                })
            }
            _ => Ok(level),
        }
    }
}

/// Compresses a byte slice in one call (pieces of a chunked disk are small enough).
pub fn encode_to_vec(
    codec: &dyn Codec,
    data: &[u8],
    options: &EncodeOptions,
) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    let io_err = |source| CodecError::Io {
        codec: codec.name().to_string(),
        source,
    };
    let mut encoder = codec.encoder(Box::new(&mut out), options)?;
    encoder.write_all(data).map_err(io_err)?;
    encoder.finish().map_err(io_err)?;
    Ok(out)
}

/// Decompresses `input` into `output`, insisting on exactly `expected` bytes: more is
/// refused as soon as it appears (a decompression bomb never gets further than one
/// buffer past the limit), fewer is an error too.
pub fn decode_exact(
    codec: &dyn Codec,
    input: Input<'_>,
    output: &mut dyn Write,
    expected: u64,
) -> Result<(), CodecError> {
    let io_err = |source| CodecError::Io {
        codec: codec.name().to_string(),
        source,
    };
    let decoder = codec.decoder(input)?;
    // Take one byte more than allowed so an oversized stream is detected.
    let mut limited = decoder.take(expected + 1);
    let copied = io::copy(&mut limited, output).map_err(io_err)?;
    if copied != expected {
        let message = if copied > expected {
            format!("decompressed data is larger than the announced {expected} bytes")
        } else {
            format!("decompressed data has {copied} bytes, {expected} were announced")
        };
        return Err(io_err(io::Error::new(io::ErrorKind::InvalidData, message)));
    }
    Ok(())
}

/// The output of a [`GuardedEncoder`]: refuses writes once its encoder was dropped
/// unfinished.
pub struct GuardedOutput<'w> {
    inner: Output<'w>,
    abandoned: bool,
}

impl<'w> GuardedOutput<'w> {
    pub fn new(inner: Output<'w>) -> Self {
        GuardedOutput {
            inner,
            abandoned: false,
        }
    }
}

impl Write for GuardedOutput<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.abandoned {
            return Err(io::Error::other("encoder dropped without finish"));
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.abandoned {
            return Err(io::Error::other("encoder dropped without finish"));
        }
        self.inner.flush()
    }
}

/// Wraps a library encoder that finishes its stream when dropped (flate2's gzip and
/// liblzma's xz writers do), which would turn an abandoned layer — one whose export
/// failed half-way — into a valid but shorter stream. Dropped without
/// [`Encoder::finish`], it cuts the output off first, so decoders see a broken stream.
pub struct GuardedEncoder<'w, E> {
    inner: Option<E>,
    finish: fn(E) -> io::Result<GuardedOutput<'w>>,
    output: fn(&mut E) -> &mut GuardedOutput<'w>,
}

impl<'w, E> GuardedEncoder<'w, E> {
    /// `finish` ends the library's stream and returns its output; `output` reaches the
    /// output inside it (e.g. `get_mut`).
    pub fn new(
        inner: E,
        finish: fn(E) -> io::Result<GuardedOutput<'w>>,
        output: fn(&mut E) -> &mut GuardedOutput<'w>,
    ) -> Self {
        GuardedEncoder {
            inner: Some(inner),
            finish,
            output,
        }
    }
}

impl<E: Write> Write for GuardedEncoder<'_, E> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.inner {
            Some(encoder) => encoder.write(buf),
            None => Err(io::Error::other("encoder already finished")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Some(encoder) => encoder.flush(),
            None => Ok(()),
        }
    }
}

impl<E: Write + Send> Encoder for GuardedEncoder<'_, E> {
    fn finish(mut self: Box<Self>) -> io::Result<()> {
        match self.inner.take() {
            Some(encoder) => (self.finish)(encoder)?.flush(),
            None => Ok(()),
        }
    }
}

impl<E> Drop for GuardedEncoder<'_, E> {
    fn drop(&mut self) {
        if let Some(encoder) = &mut self.inner {
            (self.output)(encoder).abandoned = true;
        }
    }
}
