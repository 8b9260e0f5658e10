//! An example plugin: the LZ4 frame format as a sarde codec.
//!
//! A third-party plugin is exactly this: a `cdylib` crate that depends on
//! `sarde-api`, implements one of its traits and declares itself with
//! `sarde_api::export_plugin!`. Build it with the same compiler as sarde, drop the
//! `.so` into a plugin directory (or pass `--plugin PATH`), and `--codec lz4` works.

use std::io::{self, Read, Write};
use std::ops::RangeInclusive;
use std::sync::Arc;

use lz4_flex::frame::{BlockMode, FrameDecoder, FrameEncoder, FrameInfo};
use sarde_api::codec::{Input, Output};
use sarde_api::{Codec, CodecError, EncodeOptions, Encoder, Registrar, RegistryError};

/// LZ4 frames with content checksums, so corruption is detected on decode.
pub struct Lz4;

struct Lz4Encoder<'w>(FrameEncoder<Output<'w>>);

impl Write for Lz4Encoder<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Encoder for Lz4Encoder<'_> {
    fn finish(self: Box<Self>) -> io::Result<()> {
        let mut inner = self.0.finish().map_err(io::Error::other)?;
        inner.flush()
    }
}

/// Remembers how much input passed and its last 8 bytes.
struct Tail<'r> {
    inner: Input<'r>,
    total: u64,
    last: [u8; 8],
}

impl Read for Tail<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        for &b in &buf[..n] {
            self.last.rotate_left(1);
            self.last[7] = b;
        }
        self.total += n as u64;
        Ok(n)
    }
}

/// lz4_flex reports a clean end of input when a frame stops early (after its magic
/// number, say). Every frame this codec writes ends with an end mark (four zero
/// bytes) and the content checksum, so a stream that does not end that way, or is
/// empty, was cut off.
struct StrictDecoder<'r> {
    decoder: FrameDecoder<Tail<'r>>,
}

impl Read for StrictDecoder<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.decoder.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let tail = self.decoder.get_ref();
            if tail.total < 15 || tail.last[..4] != [0, 0, 0, 0] {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "lz4 stream is truncated: the frame has no end mark",
                ));
            }
        }
        Ok(n)
    }
}

impl Codec for Lz4 {
    fn name(&self) -> &str {
        "lz4"
    }

    fn media_type_suffix(&self) -> Option<&str> {
        Some("+lz4")
    }

    fn levels(&self) -> Option<RangeInclusive<i32>> {
        None
    }

    fn default_level(&self) -> Option<i32> {
        None
    }

    fn encoder<'w>(
        &self,
        output: Output<'w>,
        _options: &EncodeOptions,
    ) -> Result<Box<dyn Encoder + 'w>, CodecError> {
        let info = FrameInfo::new()
            .block_mode(BlockMode::Independent)
            .content_checksum(true);
        Ok(Box::new(Lz4Encoder(FrameEncoder::with_frame_info(
            info, output,
        ))))
    }

    fn decoder<'r>(&self, input: Input<'r>) -> Result<Input<'r>, CodecError> {
        Ok(Box::new(StrictDecoder {
            decoder: FrameDecoder::new(Tail {
                inner: input,
                total: 0,
                last: [0xff; 8],
            }),
        }))
    }
}

fn register(registrar: &mut dyn Registrar) -> Result<(), RegistryError> {
    registrar.register_codec(Arc::new(Lz4))
}

sarde_api::export_plugin!("example-lz4", register);

#[cfg(test)]
mod tests {
    use super::*;
    use sarde_api::codec::{decode_exact, encode_to_vec};

    fn sample() -> Vec<u8> {
        (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn round_trip() {
        let data = sample();
        let packed = encode_to_vec(&Lz4, &data, &EncodeOptions::default()).unwrap();
        assert!(packed.len() < data.len());
        let mut out = Vec::new();
        decode_exact(&Lz4, Box::new(&packed[..]), &mut out, data.len() as u64).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn truncated_input_is_an_error() {
        let data = sample();
        let packed = encode_to_vec(&Lz4, &data, &EncodeOptions::default()).unwrap();
        for cut in [
            packed.len() - 1,
            packed.len() - 4,
            packed.len() / 2,
            7,
            4,
            0,
        ] {
            let mut out = Vec::new();
            let result = Lz4
                .decoder(Box::new(&packed[..cut]))
                .unwrap()
                .read_to_end(&mut out);
            assert!(result.is_err(), "cut at {cut} decoded {} bytes", out.len());
        }
    }
}
