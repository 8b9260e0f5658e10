//! The xz codec: the smallest layers for slow links, at a high CPU cost.
//!
//! Streams carry a CRC64 check like the `xz` tool writes by default. With more than
//! one thread the encoder uses liblzma's multi-threaded encoder, which splits the
//! stream into independent blocks (3 × the dictionary size each) that the
//! multi-threaded decoder can decompress in parallel. Concatenated streams (what
//! `cat a.xz b.xz` gives, with optional stream padding) decode as one.

use std::io::{self, BufRead, BufReader, Read};
use std::ops::RangeInclusive;
use std::sync::Arc;

use liblzma::stream::{Action, Check, MtStreamBuilder, Status, Stream};
use sarde_api::codec::{GuardedEncoder, GuardedOutput, Input, Output};
use sarde_api::{Codec, CodecError, EncodeOptions, Encoder, Registrar, RegistryError};

/// Lowest preset.
pub const MIN_LEVEL: i32 = 0;
/// Highest preset (without the "extreme" flag).
pub const MAX_LEVEL: i32 = 9;
/// The xz command line's default preset.
pub const DEFAULT_LEVEL: i32 = 6;
/// liblzma refuses more threads than this (LZMA_THREADS_MAX).
const MAX_THREADS: usize = 16384;
/// The decoder reads compressed input in chunks of this size.
const READ_BUFFER: usize = 1 << 20;
/// Above this much memory the multi-threaded decoder uses fewer threads, so a
/// many-core host does not buffer gigabytes of blocks.
const DECODER_THREADING_MEMLIMIT: u64 = 1 << 30;
/// The most memory one stream may take to decode, even single-threaded: the
/// dictionary a stream's headers announce is allocated up front, so without a
/// limit a piece of a few bytes could ask for 4 GiB. `xz -9` needs 65 MiB.
const DECODER_MEMLIMIT: u64 = DECODER_THREADING_MEMLIMIT;

/// xz streams, suffix `+xz`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Xz;

/// Where [`XzDecoder`] is between streams.
enum State {
    /// Decoding a stream.
    Stream(Stream),
    /// After a stream: skipping stream padding (zero bytes, a multiple of four).
    Between { padding: u64 },
    /// The input ended cleanly.
    Done,
}

/// Decodes concatenated xz streams, each with a fresh (possibly multi-threaded)
/// liblzma decoder, and fails when the input stops inside a stream. liblzma's
/// multi-threaded decoder cannot be given `LZMA_CONCATENATED` through the crate,
/// which is why the concatenation is handled here.
struct XzDecoder<'r> {
    input: BufReader<Input<'r>>,
    state: State,
    threads: u32,
}

fn new_stream_decoder(threads: u32) -> Result<Stream, liblzma::stream::Error> {
    if threads > 1 {
        MtStreamBuilder::new()
            .threads(threads)
            .timeout_ms(0)
            .memlimit_threading(DECODER_THREADING_MEMLIMIT)
            .memlimit_stop(DECODER_MEMLIMIT)
            .decoder()
    } else {
        Stream::new_stream_decoder(DECODER_MEMLIMIT, 0)
    }
}

impl Read for XzDecoder<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match &mut self.state {
                State::Done => return Ok(0),
                State::Between { padding } => {
                    let input = self.input.fill_buf()?;
                    let zeros = input.iter().take_while(|&&b| b == 0).count();
                    if zeros > 0 {
                        *padding += zeros as u64;
                        self.input.consume(zeros);
                        continue;
                    }
                    if *padding % 4 != 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "xz stream padding is not a multiple of four bytes",
                        ));
                    }
                    if input.is_empty() {
                        self.state = State::Done;
                        return Ok(0);
                    }
                    self.state = State::Stream(new_stream_decoder(self.threads)?);
                }
                State::Stream(stream) => {
                    let input = self.input.fill_buf()?;
                    let eof = input.is_empty();
                    let action = if eof { Action::Finish } else { Action::Run };
                    let (before_in, before_out) = (stream.total_in(), stream.total_out());
                    let status = stream.process(input, buf, action);
                    let consumed = (stream.total_in() - before_in) as usize;
                    let produced = (stream.total_out() - before_out) as usize;
                    self.input.consume(consumed);
                    let status = status?;
                    if status == Status::StreamEnd {
                        self.state = State::Between { padding: 0 };
                    } else if produced == 0 {
                        if eof {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "xz stream is truncated",
                            ));
                        }
                        if consumed == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "xz decoder made no progress: corrupt stream",
                            ));
                        }
                    }
                    if produced > 0 {
                        return Ok(produced);
                    }
                }
            }
        }
    }
}

impl Xz {
    fn setup_error(&self, error: liblzma::stream::Error) -> CodecError {
        CodecError::Setup {
            codec: self.name().to_string(),
            message: error.to_string(),
        }
    }
}

impl Codec for Xz {
    fn name(&self) -> &str {
        "xz"
    }

    fn media_type_suffix(&self) -> Option<&str> {
        Some("+xz")
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

    /// Every block carries a CRC64 of its data, which liblzma verifies.
    fn checks_decoded(&self) -> bool {
        true
    }

    fn encoder<'w>(
        &self,
        output: Output<'w>,
        options: &EncodeOptions,
    ) -> Result<Box<dyn Encoder + 'w>, CodecError> {
        let level = self.check_level(options)?.unwrap_or(DEFAULT_LEVEL);
        // In range 0..=9, so the cast is exact.
        let preset = level as u32;
        let stream = if options.threads > 1 {
            MtStreamBuilder::new()
                .threads(options.threads.min(MAX_THREADS) as u32)
                .preset(preset)
                .check(Check::Crc64)
                .timeout_ms(0)
                .encoder()
        } else {
            Stream::new_easy_encoder(preset, Check::Crc64)
        }
        .map_err(|e| self.setup_error(e))?;
        let output = GuardedOutput::new(output);
        Ok(Box::new(GuardedEncoder::new(
            liblzma::write::XzEncoder::new_stream(output, stream),
            liblzma::write::XzEncoder::finish,
            liblzma::write::XzEncoder::get_mut,
        )))
    }

    fn decoder<'r>(&self, input: Input<'r>) -> Result<Input<'r>, CodecError> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_THREADS) as u32;
        let stream = new_stream_decoder(threads).map_err(|e| self.setup_error(e))?;
        Ok(Box::new(XzDecoder {
            input: BufReader::with_capacity(READ_BUFFER, input),
            state: State::Stream(stream),
            threads,
        }))
    }
}

/// Registers [`Xz`] as `xz`.
pub fn register(r: &mut dyn Registrar) -> Result<(), RegistryError> {
    r.register_codec(Arc::new(Xz))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sarde_api::codec::{decode_exact, encode_to_vec};
    use sarde_api::{Origin, Registry};

    /// Zeros, xorshift noise and text in 64 KiB pieces, like a disk.
    fn sample(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let words = ["disk ", "image ", "libvirt ", "sardine ", "cake ", "qemu\n"];
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let block = (out.len() / 65536) % 4;
            let take = (65536 - out.len() % 65536).min(len - out.len());
            for i in 0..take {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                match block {
                    0 => out.push(0),
                    1 => out.push(x as u8),
                    _ => out.push(words[(x % 6) as usize].as_bytes()[i % 5]),
                }
            }
        }
        out
    }

    fn decode_all(data: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        Xz.decoder(Box::new(data))
            .map_err(io::Error::other)?
            .read_to_end(&mut out)?;
        Ok(out)
    }

    fn options(level: i32, threads: usize) -> EncodeOptions {
        EncodeOptions::default()
            .with_level(level)
            .with_threads(threads)
    }

    #[test]
    fn round_trips() {
        for len in [0, 1, 3 << 20] {
            let data = sample(len);
            for (level, threads) in [(0, 1), (1, 2), (6, 1), (6, 2), (9, 1)] {
                if level == 9 && len > 1 << 20 {
                    continue; // slow; covered on small inputs
                }
                let packed = encode_to_vec(&Xz, &data, &options(level, threads)).unwrap();
                let mut out = Vec::new();
                decode_exact(&Xz, Box::new(&packed[..]), &mut out, len as u64).unwrap();
                assert!(out == data, "level {level} threads {threads} len {len}");
            }
        }
    }

    #[test]
    fn multi_threaded_encoder_writes_several_blocks() {
        // Level 0 has a 256 KiB dictionary, so 1 MiB blocks: 5 MiB gives 5 blocks,
        // which the multi-threaded decoder decodes in parallel.
        let data = sample(5 << 20);
        let packed = encode_to_vec(&Xz, &data, &options(0, 2)).unwrap();
        let single = encode_to_vec(&Xz, &data, &options(0, 1)).unwrap();
        assert!(packed != single, "threads > 1 made no difference");
        assert!(decode_all(&packed).unwrap() == data);
    }

    #[test]
    fn level_out_of_range_is_refused() {
        for level in [-1, 10, 99] {
            let result = Xz.encoder(Box::new(io::sink()), &options(level, 1));
            assert!(
                matches!(result, Err(CodecError::LevelOutOfRange { .. })),
                "level {level}"
            );
        }
    }

    #[test]
    fn output_is_deterministic() {
        let data = sample(3 << 20);
        for threads in [1, 2] {
            let a = encode_to_vec(&Xz, &data, &options(1, threads)).unwrap();
            let b = encode_to_vec(&Xz, &data, &options(1, threads)).unwrap();
            assert!(a == b, "threads {threads}");
        }
    }

    #[test]
    fn truncated_input_is_an_error() {
        let data = sample(2 << 20);
        for threads in [1, 2] {
            let packed = encode_to_vec(&Xz, &data, &options(0, threads)).unwrap();
            let n = packed.len();
            for cut in [0, 1, 6, 12, 13, 100, n / 3, n / 2, n - 13, n - 12, n - 1] {
                let result = decode_all(&packed[..cut]);
                assert!(result.is_err(), "threads {threads}: cut at {cut} of {n}");
            }
        }
        let empty = encode_to_vec(&Xz, &[], &options(6, 1)).unwrap();
        for cut in 0..empty.len() {
            assert!(
                decode_all(&empty[..cut]).is_err(),
                "empty stream cut at {cut}"
            );
        }
    }

    #[test]
    fn corruption_is_an_error() {
        let data = sample(1 << 20);
        for threads in [1, 2] {
            let packed = encode_to_vec(&Xz, &data, &options(1, threads)).unwrap();
            let n = packed.len();
            for pos in [0, 5, 8, 20, n / 4, n / 2, n - 30, n - 9, n - 2] {
                let mut bad = packed.clone();
                bad[pos] ^= 0x55;
                let result = decode_all(&bad);
                assert!(
                    result.is_err(),
                    "threads {threads}: corruption at {pos} of {n}"
                );
            }
        }
    }

    #[test]
    fn a_wrong_block_check_is_an_error() {
        assert!(Xz.checks_decoded());
        let data = sample(1 << 20);
        let packed = encode_to_vec(&Xz, &data, &options(1, 1)).unwrap();
        assert_eq!(packed[7], 0x04, "stream flags announce CRC64");
        // One block: its CRC64 sits right before the index, whose size the
        // 12-byte stream footer gives ((backward size + 1) * 4).
        let n = packed.len();
        let backward = u32::from_le_bytes(packed[n - 8..n - 4].try_into().unwrap());
        let index_start = n - 12 - (backward as usize + 1) * 4;
        let mut bad = packed.clone();
        bad[index_start - 3] ^= 0x01;
        assert!(decode_all(&bad).is_err());
    }

    /// CRC-32 (IEEE), as xz headers carry it.
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
            }
        }
        !crc
    }

    #[test]
    fn a_dictionary_beyond_the_memory_limit_is_refused() {
        // A small stream whose block header announces a 4 GiB dictionary, which
        // liblzma allocated (the codec_xz fuzz target's malloc limit caught the
        // input kept in fuzz/regressions/codec_xz/).
        let data = sample(10_000);
        for threads in [0, 1, 2] {
            let mut stream = encode_to_vec(&Xz, &data, &options(0, 0)).unwrap();
            // The block header after the 12-byte stream header: its size, flags,
            // the LZMA2 filter (id 0x21, one property byte: the dictionary size).
            let size = (usize::from(stream[12]) + 1) * 4;
            let header = &mut stream[12..12 + size];
            let at = header.windows(2).position(|w| w == [0x21, 0x01]).unwrap() + 2;
            header[at] = 40;
            let crc = crc32(&header[..size - 4]);
            header[size - 4..].copy_from_slice(&crc.to_le_bytes());
            let mut decoder = XzDecoder {
                input: BufReader::new(Box::new(&stream[..]) as Input<'_>),
                state: State::Stream(new_stream_decoder(threads).unwrap()),
                threads,
            };
            let err = io::copy(&mut decoder, &mut io::sink()).unwrap_err();
            assert!(
                err.to_string().contains("memory"),
                "{threads} threads: {err}"
            );
        }
    }

    #[test]
    fn trailing_garbage_is_an_error() {
        let data = sample(100_000);
        let packed = encode_to_vec(&Xz, &data, &options(6, 1)).unwrap();
        for junk in [
            &b"x"[..],
            b"\0",
            b"\0\0\0",
            b"\0\0\0\0x",
            b"not an xz stream",
        ] {
            let mut bad = packed.clone();
            bad.extend_from_slice(junk);
            assert!(decode_all(&bad).is_err(), "junk {junk:?} ignored");
        }
    }

    #[test]
    fn concatenated_streams_decode_fully() {
        let a = sample(300_000);
        let b = sample(2 << 20);
        let c = sample(10);
        let mut packed = encode_to_vec(&Xz, &a, &options(6, 1)).unwrap();
        packed.extend([0u8; 8]); // stream padding is allowed between streams
        packed.extend(encode_to_vec(&Xz, &b, &options(0, 2)).unwrap());
        packed.extend(encode_to_vec(&Xz, &c, &options(3, 1)).unwrap());
        packed.extend([0u8; 4]);
        let out = decode_all(&packed).unwrap();
        let expected: Vec<u8> = [a, b, c].concat();
        assert!(out == expected);
    }

    #[test]
    fn abandoned_encoder_leaves_an_incomplete_stream() {
        let data = sample(200_000);
        let mut out = Vec::new();
        {
            let mut encoder = Xz.encoder(Box::new(&mut out), &options(1, 1)).unwrap();
            encoder.write_all(&data).unwrap();
            drop(encoder);
        }
        assert!(decode_all(&out).is_err());
    }

    #[test]
    fn matches_the_xz_command_line_tool() {
        let data = sample(1 << 20);
        let packed = encode_to_vec(&Xz, &data, &options(6, 2)).unwrap();
        let path = std::env::temp_dir().join(format!("sarde-codec-xz-{}.xz", std::process::id()));
        std::fs::write(&path, &packed).unwrap();
        let result = std::process::Command::new("xz")
            .arg("-dc")
            .arg(&path)
            .output();
        let _ = std::fs::remove_file(&path);
        match result {
            Ok(output) => {
                assert!(output.status.success(), "xz -dc failed");
                assert!(output.stdout == data);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => eprintln!("no xz; skipped"),
            Err(e) => panic!("running xz: {e}"),
        }
    }

    #[test]
    fn describes_itself_and_registers() {
        assert_eq!(Xz.media_type_suffix(), Some("+xz"));
        assert_eq!(Xz.levels(), Some(0..=9));
        assert_eq!(Xz.default_level(), Some(6));
        assert!(Xz.multithreaded());
        let mut registry = Registry::new();
        register(&mut registry.registrar(Origin::BuiltIn)).unwrap();
        assert_eq!(registry.codec_for_suffix(Some("+xz")).unwrap().name(), "xz");
    }
}
