//! The identity codec: layers stored as they are.
//!
//! Useful when the disk is already compressed (qcow2 with compression, encrypted
//! images) or when the link is faster than any compressor. There is nothing to
//! check on decode: the layer digest and the announced size are what catch
//! truncation for uncompressed layers (see `sarde_api::codec::decode_exact`).

use std::io::{self, Write};
use std::ops::RangeInclusive;
use std::sync::Arc;

use sarde_api::codec::{Input, Output};
use sarde_api::{Codec, CodecError, EncodeOptions, Encoder, Registrar, RegistryError};

/// Uncompressed data; no media-type suffix.
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

/// Passes writes straight through; `finish` only flushes.
struct RawEncoder<'w>(Output<'w>);

impl Write for RawEncoder<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Encoder for RawEncoder<'_> {
    fn finish(mut self: Box<Self>) -> io::Result<()> {
        self.0.flush()
    }
}

impl Codec for Raw {
    fn name(&self) -> &str {
        "raw"
    }

    fn media_type_suffix(&self) -> Option<&str> {
        None
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
        options: &EncodeOptions,
    ) -> Result<Box<dyn Encoder + 'w>, CodecError> {
        // A level means nothing here; accept and ignore it like `levels()` says.
        self.check_level(options)?;
        Ok(Box::new(RawEncoder(output)))
    }

    fn decoder<'r>(&self, input: Input<'r>) -> Result<Input<'r>, CodecError> {
        Ok(input)
    }
}

/// Registers [`Raw`] as `raw`.
pub fn register(r: &mut dyn Registrar) -> Result<(), RegistryError> {
    r.register_codec(Arc::new(Raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sarde_api::codec::{decode_exact, encode_to_vec};
    use sarde_api::{Origin, Registry};
    use std::io::Read;

    fn sample(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..len)
            .map(|i| {
                if (i / 4096) % 2 == 0 {
                    0
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            })
            .collect()
    }

    #[test]
    fn round_trip_is_identity() {
        for len in [0, 1, 3 << 20] {
            let data = sample(len);
            let packed = encode_to_vec(&Raw, &data, &EncodeOptions::default()).unwrap();
            assert_eq!(packed, data);
            let packed_mt =
                encode_to_vec(&Raw, &data, &EncodeOptions::default().with_threads(4)).unwrap();
            assert_eq!(packed_mt, data);
            let mut out = Vec::new();
            decode_exact(&Raw, Box::new(&packed[..]), &mut out, len as u64).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn decoder_passes_bytes_through() {
        let data = sample(100_000);
        let mut out = Vec::new();
        Raw.decoder(Box::new(&data[..]))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn short_input_is_caught_by_decode_exact() {
        let data = sample(10_000);
        let mut out = Vec::new();
        let err = decode_exact(&Raw, Box::new(&data[..9_999]), &mut out, 10_000);
        assert!(err.is_err());
    }

    #[test]
    fn describes_itself() {
        assert_eq!(Raw.name(), "raw");
        assert_eq!(Raw.media_type_suffix(), None);
        assert_eq!(Raw.levels(), None);
        assert_eq!(Raw.default_level(), None);
        assert!(!Raw.multithreaded());
    }

    #[test]
    fn registers_once() {
        let mut registry = Registry::new();
        register(&mut registry.registrar(Origin::BuiltIn)).unwrap();
        assert_eq!(registry.codec("raw").unwrap().name(), "raw");
        assert!(registry.codec_for_suffix(None).is_some());
        assert!(register(&mut registry.registrar(Origin::BuiltIn)).is_err());
    }
}
