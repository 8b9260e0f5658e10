//! The gzip codec: what the old Python tool wrote, and what every registry and
//! tool understands.
//!
//! The header matches Python's `gzip` module byte for byte: FNAME (the base name,
//! Latin-1, without a `.gz` suffix), MTIME, XFL (2 for level 9, 4 for level 1,
//! else 0) and OS 255. A file is one gzip member. With `threads > 1` the member
//! is compressed pigz-style on several cores (see [`parallel`]); the result is
//! still one standard member, with the same header, that `gzip -d` and Python
//! read.

use std::io::BufReader;
use std::ops::RangeInclusive;
use std::sync::Arc;

use flate2::{Compression, GzBuilder};
use sarde_api::codec::{GuardedEncoder, GuardedOutput, Input, Output};
use sarde_api::{Codec, CodecError, EncodeOptions, Encoder, Registrar, RegistryError};

pub mod parallel;

/// Lowest level (Python and gzip accept 0, "stored", which is never useful here).
pub const MIN_LEVEL: i32 = 1;
/// Highest level.
pub const MAX_LEVEL: i32 = 9;
/// gzip's and Python's default.
pub const DEFAULT_LEVEL: i32 = 6;
/// More workers than this only cost memory.
const MAX_WORKERS: usize = 256;
/// The decoder reads compressed input in chunks of this size.
const READ_BUFFER: usize = 1 << 20;
/// Header flag: a file name follows the fixed header.
const FNAME: u8 = 0x08;
/// Header OS byte: unknown, as Python and flate2 write it.
const OS_UNKNOWN: u8 = 255;

/// gzip members, suffix `+gzip`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gzip;

/// The FNAME bytes Python would write for `name`: the base name, without `.gz`,
/// in Latin-1; `None` when that is empty. Names Python cannot write (characters
/// beyond U+00FF, or NUL, which would end the field) are refused.
pub fn header_file_name(name: &str) -> Result<Option<Vec<u8>>, String> {
    let base = name.rsplit('/').next().unwrap_or(name);
    let base = base.strip_suffix(".gz").unwrap_or(base);
    let mut bytes = Vec::with_capacity(base.len());
    for c in base.chars() {
        match u8::try_from(u32::from(c)) {
            Ok(0) => return Err(format!("file name {name:?} contains NUL")),
            Ok(b) => bytes.push(b),
            Err(_) => {
                return Err(format!(
                    "file name {name:?} has characters outside Latin-1, which gzip headers cannot hold"
                ));
            }
        }
    }
    Ok((!bytes.is_empty()).then_some(bytes))
}

/// The complete gzip header, as Python's `gzip` module and flate2's `GzBuilder`
/// write it.
pub fn header(file_name: Option<&[u8]>, mtime: u32, level: u32) -> Vec<u8> {
    let xfl = match level {
        9 => 2,
        1 => 4,
        _ => 0,
    };
    let flags = if file_name.is_some() { FNAME } else { 0 };
    let mut out = vec![0x1f, 0x8b, 8, flags];
    out.extend(mtime.to_le_bytes());
    out.extend([xfl, OS_UNKNOWN]);
    if let Some(name) = file_name {
        out.extend_from_slice(name);
        out.push(0);
    }
    out
}

impl Gzip {
    fn setup_error(&self, message: String) -> CodecError {
        CodecError::Setup {
            codec: self.name().to_string(),
            message,
        }
    }
}

impl Codec for Gzip {
    fn name(&self) -> &str {
        "gzip"
    }

    fn media_type_suffix(&self) -> Option<&str> {
        Some("+gzip")
    }

    fn levels(&self) -> Option<RangeInclusive<i32>> {
        Some(MIN_LEVEL..=MAX_LEVEL)
    }

    fn default_level(&self) -> Option<i32> {
        Some(DEFAULT_LEVEL)
    }

    fn multithreaded(&self) -> bool {
        true
    }

    /// Every gzip member ends with the CRC-32 and length of its data, which
    /// flate2's decoder verifies.
    fn checks_decoded(&self) -> bool {
        true
    }

    fn encoder<'w>(
        &self,
        output: Output<'w>,
        options: &EncodeOptions,
    ) -> Result<Box<dyn Encoder + 'w>, CodecError> {
        let level = self.check_level(options)?.unwrap_or(DEFAULT_LEVEL);
        // In range 1..=9, so the cast is exact.
        let compression = Compression::new(level as u32);
        let file_name = match &options.file_name {
            Some(name) => header_file_name(name).map_err(|m| self.setup_error(m))?,
            None => None,
        };
        let mtime = options.mtime.unwrap_or(0);
        if options.threads > 1 {
            let header = header(file_name.as_deref(), mtime, compression.level());
            let workers = options.threads.min(MAX_WORKERS);
            let encoder = parallel::ParallelGzEncoder::new(output, header, compression, workers)
                .map_err(|e| self.setup_error(format!("starting worker threads: {e}")))?;
            return Ok(Box::new(encoder));
        }
        let mut builder = GzBuilder::new().mtime(mtime).operating_system(OS_UNKNOWN);
        if let Some(name) = file_name {
            // `header_file_name` refused NUL, so this cannot panic.
            builder = builder.filename(name);
        }
        let output = GuardedOutput::new(output);
        Ok(Box::new(GuardedEncoder::new(
            builder.write(output, compression),
            flate2::write::GzEncoder::finish,
            flate2::write::GzEncoder::get_mut,
        )))
    }

    fn decoder<'r>(&self, input: Input<'r>) -> Result<Input<'r>, CodecError> {
        // flate2's multi-member reader already fails on empty input, on input cut
        // anywhere (header, deflate data, trailer) and on junk after a member (read
        // as a broken next header); the tests pin each of these down.
        let reader = BufReader::with_capacity(READ_BUFFER, input);
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(reader)))
    }
}

/// Registers [`Gzip`] as `gzip`.
pub fn register(r: &mut dyn Registrar) -> Result<(), RegistryError> {
    r.register_codec(Arc::new(Gzip))
}

#[cfg(test)]
mod tests;
