//! The zstd codec: the default for disk layers, because it compresses several
//! hundred MB/s per core and decompresses faster than a disk writes.
//!
//! Frames carry a content checksum so corruption is an error, not a silently
//! different disk. With `threads` ≥ 1, compression runs in libzstd's own workers
//! (`zstdmt`, one per thread), which still produce a single standard frame that
//! any zstd decodes; one worker, like `zstd -T1`, lets the caller's reads and
//! writes overlap with compression (about 10% faster on file-to-file streams), and
//! the output bytes are the same for every thread count ≥ 1, so a stream's digest
//! does not depend on the machine that made it. `threads` = 0 compresses in the
//! caller's thread, as independent frames of 1 MiB of input each (see
//! [`FramedEncoder`]): no copy of the input into job buffers, no worker to wake,
//! no thread pool per stream, no ring buffer. Piece export runs a stream per core
//! and uses 0: 20% less CPU than one worker per stream, a third of the memory, and
//! imports decode most frames straight into their buffer.

use std::io::{self, BufReader, Write};
use std::ops::RangeInclusive;
use std::sync::Arc;

use sarde_api::codec::{Input, Output};
use sarde_api::{Codec, CodecError, EncodeOptions, Encoder, Registrar, RegistryError};

/// Lowest accepted level (negative "fast" levels are not offered).
pub const MIN_LEVEL: i32 = 1;
/// Highest accepted level: 20..=22 need `--ultra` windows that cost too much memory
/// per worker for 60 GB disks.
pub const MAX_LEVEL: i32 = 19;
/// The zstd command line's default.
pub const DEFAULT_LEVEL: i32 = 3;
/// libzstd refuses more workers than this (ZSTDMT_NBWORKERS_MAX is 200 on 32-bit builds).
const MAX_WORKERS: usize = 200;
/// Compressed input is read in large chunks: fewer calls into libzstd per byte.
const READ_BUFFER: usize = 1 << 20;

/// Zstandard frames, suffix `+zstd`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Zstd;

/// Bytes of compressed output handed to the caller's writer at a time.
const WRITE_BUFFER: usize = 1 << 20;

/// A zstd stream encoder whose bytes never depend on timing.
///
/// With worker threads, libzstd cuts the input into jobs of a fixed size and starts
/// a job when its section is full and a worker is free. If the input ends exactly
/// at a section boundary, whether that last section was started before the end of
/// the input was announced depends on the workers' progress: started early, it is
/// not marked last and the frame gets an extra empty last block; started at the
/// end, it is. Pieces are multiples of the section size, so the same piece could
/// compress to two different blobs and an update moved unchanged pieces again.
/// Holding back the stream's last byte until `finish` makes every section started
/// during the stream a non-last one and the final one always started with the end:
/// the output is a function of the input alone.
struct ZstdEncoder<'w> {
    cctx: zstd::zstd_safe::CCtx<'static>,
    output: Output<'w>,
    held: Option<u8>,
    buffer: Vec<u8>,
}

/// Input bytes per frame of a [`FramedEncoder`].
const FRAME_INPUT: usize = 1 << 20;

/// The encoder without workers: the stream is cut into frames of 1 MiB of input,
/// each compressed in one call from one contiguous buffer. Streaming compression
/// in the caller's thread would copy the input into a ring buffer whose wrap-around
/// forces zstd's slower external-dictionary match finder on most blocks; a
/// one-shot frame is searched in place, and it records its size, so a decoder
/// with room for it writes it straight into the caller's buffer. Frames are
/// independent: matches do not reach across a 1 MiB boundary.
struct FramedEncoder<'w> {
    cctx: zstd::zstd_safe::CCtx<'static>,
    output: Output<'w>,
    input: Vec<u8>,
    compressed: Vec<u8>,
    frames: u64,
}

impl FramedEncoder<'_> {
    fn frame(&mut self) -> io::Result<()> {
        self.compressed.clear();
        let compressed = self.cctx.compress2(&mut self.compressed, &self.input);
        // The input is gone either way: a failed frame is never written twice.
        self.input.clear();
        compressed.map_err(zstd_error)?;
        self.output.write_all(&self.compressed)?;
        self.frames += 1;
        Ok(())
    }
}

impl Write for FramedEncoder<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            let take = (FRAME_INPUT - self.input.len()).min(rest.len());
            self.input.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.input.len() == FRAME_INPUT {
                self.frame()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.output.flush()
    }
}

impl Encoder for FramedEncoder<'_> {
    fn finish(mut self: Box<Self>) -> io::Result<()> {
        // An empty stream is still one (empty) frame.
        if !self.input.is_empty() || self.frames == 0 {
            self.frame()?;
        }
        self.output.flush()
    }
}

fn zstd_error(code: usize) -> io::Error {
    io::Error::other(format!("zstd: {}", zstd::zstd_safe::get_error_name(code)))
}

impl ZstdEncoder<'_> {
    /// Compresses `input` with `directive`; with `End`, until the frame is complete.
    fn feed(
        &mut self,
        input: &[u8],
        directive: zstd::zstd_safe::zstd_sys::ZSTD_EndDirective,
    ) -> io::Result<()> {
        use zstd::zstd_safe::zstd_sys::ZSTD_EndDirective;
        let mut inb = zstd::zstd_safe::InBuffer::around(input);
        loop {
            let mut outb = zstd::zstd_safe::OutBuffer::around(&mut self.buffer);
            let remaining = self
                .cctx
                .compress_stream2(&mut outb, &mut inb, directive)
                .map_err(zstd_error)?;
            let produced = outb.pos();
            self.output.write_all(&self.buffer[..produced])?;
            let done = match directive {
                ZSTD_EndDirective::ZSTD_e_end => remaining == 0,
                _ => inb.pos() == input.len(),
            };
            if done {
                return Ok(());
            }
        }
    }
}

impl Write for ZstdEncoder<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use zstd::zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_continue;
        let Some((&last, rest)) = buf.split_last() else {
            return Ok(0);
        };
        if let Some(held) = self.held.take() {
            self.feed(&[held], ZSTD_e_continue)?;
        }
        self.feed(rest, ZSTD_e_continue)?;
        self.held = Some(last);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Output is passed on as produced; a zstd flush would change the frame.
        self.output.flush()
    }
}

impl Encoder for ZstdEncoder<'_> {
    fn finish(mut self: Box<Self>) -> io::Result<()> {
        use zstd::zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_end;
        let last: Vec<u8> = self.held.take().into_iter().collect();
        self.feed(&last, ZSTD_e_end)?;
        self.output.flush()
    }
}

impl Zstd {
    fn setup_error(&self, source: io::Error) -> CodecError {
        CodecError::Setup {
            codec: self.name().to_string(),
            message: source.to_string(),
        }
    }
}

impl Codec for Zstd {
    fn name(&self) -> &str {
        "zstd"
    }

    fn media_type_suffix(&self) -> Option<&str> {
        Some("+zstd")
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

    /// Every frame carries a content checksum (XXH64) that libzstd verifies.
    fn checks_decoded(&self) -> bool {
        true
    }

    fn encoder<'w>(
        &self,
        output: Output<'w>,
        options: &EncodeOptions,
    ) -> Result<Box<dyn Encoder + 'w>, CodecError> {
        use zstd::zstd_safe::CParameter;
        let level = self.check_level(options)?.unwrap_or(DEFAULT_LEVEL);
        let workers = options.threads.min(MAX_WORKERS) as u32;
        let mut cctx = zstd::zstd_safe::CCtx::try_create()
            .ok_or_else(|| self.setup_error(io::Error::other("cannot allocate a context")))?;
        for parameter in [
            CParameter::CompressionLevel(level),
            CParameter::ChecksumFlag(true),
            CParameter::NbWorkers(workers),
        ] {
            cctx.set_parameter(parameter)
                .map_err(|code| self.setup_error(zstd_error(code)))?;
        }
        if workers == 0 {
            return Ok(Box::new(FramedEncoder {
                cctx,
                output,
                input: Vec::with_capacity(FRAME_INPUT),
                compressed: Vec::with_capacity(zstd::zstd_safe::compress_bound(FRAME_INPUT)),
                frames: 0,
            }));
        }
        Ok(Box::new(ZstdEncoder {
            cctx,
            output,
            held: None,
            buffer: vec![0; WRITE_BUFFER],
        }))
    }

    /// A stream of independent frames (written without workers) cut exactly
    /// between two frames reads as a shorter stream; callers know the length
    /// (the importer checks every piece's).
    fn decoder<'r>(&self, input: Input<'r>) -> Result<Input<'r>, CodecError> {
        // zstd's reader reports "incomplete frame" when input ends inside a frame
        // (including empty input), and the frame checksum catches corruption;
        // trailing bytes are read as the start of another frame and rejected.
        let reader = BufReader::with_capacity(READ_BUFFER, input);
        let decoder =
            zstd::stream::read::Decoder::with_buffer(reader).map_err(|e| self.setup_error(e))?;
        Ok(Box::new(decoder))
    }
}

/// Registers [`Zstd`] as `zstd`.
pub fn register(r: &mut dyn Registrar) -> Result<(), RegistryError> {
    r.register_codec(Arc::new(Zstd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sarde_api::codec::{decode_exact, encode_to_vec};
    use sarde_api::{Origin, Registry};
    use std::io::Read;

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
        Zstd.decoder(Box::new(data))
            .map_err(io::Error::other)?
            .read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn without_workers_the_stream_is_frames_of_one_mib() {
        let data = sample((3 << 20) + (1 << 19));
        let packed = encode_to_vec(&Zstd, &data, &options(3, 0)).unwrap();
        let mut rest = &packed[..];
        let mut sizes = Vec::new();
        while !rest.is_empty() {
            let n = zstd::zstd_safe::find_frame_compressed_size(rest).unwrap();
            let content = zstd::zstd_safe::get_frame_content_size(&rest[..n]).unwrap();
            sizes.push(content.unwrap());
            rest = &rest[n..];
        }
        assert_eq!(sizes, [1 << 20, 1 << 20, 1 << 20, 1 << 19]);
        assert!(decode_all(&packed).unwrap() == data);
        // No input is still a stream: one empty frame.
        let empty = encode_to_vec(&Zstd, &[], &options(3, 0)).unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&empty).unwrap(),
            Some(0)
        );
        assert!(decode_all(&empty).unwrap().is_empty());
    }

    #[test]
    fn a_wrong_content_checksum_is_an_error() {
        assert!(Zstd.checks_decoded());
        let data = sample(1 << 20);
        for threads in [0, 1, 2] {
            let packed = encode_to_vec(&Zstd, &data, &options(3, threads)).unwrap();
            assert_eq!(decode_all(&packed).unwrap(), data);
            // The frame ends with the low 32 bits of the XXH64 of the content.
            let mut bad = packed.clone();
            let n = bad.len();
            bad[n - 2] ^= 0x01;
            assert!(decode_all(&bad).is_err(), "threads {threads}");
        }
    }

    fn options(level: i32, threads: usize) -> EncodeOptions {
        EncodeOptions::default()
            .with_level(level)
            .with_threads(threads)
    }

    #[test]
    fn round_trips() {
        for len in [0, 1, 5 << 20] {
            let data = sample(len);
            for (level, threads) in [(1, 1), (3, 0), (3, 1), (3, 2), (9, 4), (19, 1)] {
                if level == 19 && len > 1 << 20 {
                    continue; // slow, and level 19 is covered on small inputs
                }
                let packed = encode_to_vec(&Zstd, &data, &options(level, threads)).unwrap();
                let mut out = Vec::new();
                decode_exact(&Zstd, Box::new(&packed[..]), &mut out, len as u64).unwrap();
                assert!(out == data, "level {level} threads {threads} len {len}");
            }
        }
    }

    #[test]
    fn compresses_and_is_plain_zstd() {
        let data = sample(2 << 20);
        let packed = encode_to_vec(&Zstd, &data, &options(3, 2)).unwrap();
        assert!(packed.len() < data.len() / 2, "{} bytes", packed.len());
        assert_eq!(&packed[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
        let plain = zstd::stream::decode_all(&packed[..]).unwrap();
        assert!(plain == data);
    }

    #[test]
    fn default_level_is_used() {
        let data = sample(1 << 20);
        let default = encode_to_vec(&Zstd, &data, &EncodeOptions::default()).unwrap();
        let three = encode_to_vec(&Zstd, &data, &options(3, 0)).unwrap();
        assert_eq!(default, three);
    }

    #[test]
    fn level_out_of_range_is_refused() {
        for level in [0, -1, 20, 22, 100] {
            let result = Zstd.encoder(Box::new(io::sink()), &options(level, 1));
            assert!(
                matches!(result, Err(CodecError::LevelOutOfRange { .. })),
                "level {level}"
            );
        }
    }

    #[test]
    fn output_is_deterministic() {
        let data = sample(3 << 20);
        for threads in [0, 1, 2] {
            let a = encode_to_vec(&Zstd, &data, &options(3, threads)).unwrap();
            let b = encode_to_vec(&Zstd, &data, &options(3, threads)).unwrap();
            assert!(a == b, "threads {threads}");
        }
    }

    #[test]
    fn output_does_not_depend_on_the_worker_count() {
        // Large enough for several zstdmt jobs at level 1 (jobs of 4 × the window).
        let data = sample(24 << 20);
        let reference = encode_to_vec(&Zstd, &data, &options(1, 1)).unwrap();
        for threads in [2, 3, 8] {
            let other = encode_to_vec(&Zstd, &data, &options(1, threads)).unwrap();
            assert!(other == reference, "threads {threads} changed the bytes");
        }
    }

    #[test]
    fn truncated_input_is_an_error() {
        let data = sample(1 << 20);
        for threads in [0, 2] {
            let packed = encode_to_vec(&Zstd, &data, &options(3, threads)).unwrap();
            let n = packed.len();
            for cut in [0, 1, 3, 4, 8, 100, n / 3, n / 2, n - 5, n - 4, n - 1] {
                let result = decode_all(&packed[..cut]);
                assert!(
                    result.is_err(),
                    "threads {threads}: cut at {cut} of {n} decoded silently"
                );
            }
        }
        let empty = encode_to_vec(&Zstd, &[], &options(3, 1)).unwrap();
        for cut in 0..empty.len() {
            assert!(
                decode_all(&empty[..cut]).is_err(),
                "empty frame cut at {cut}"
            );
        }
    }

    #[test]
    fn corruption_is_an_error() {
        let data = sample(1 << 20);
        let packed = encode_to_vec(&Zstd, &data, &options(3, 1)).unwrap();
        let n = packed.len();
        for pos in [0, 2, 20, n / 4, n / 2, n - 9, n - 4, n - 1] {
            let mut bad = packed.clone();
            bad[pos] ^= 0x55;
            let result = decode_all(&bad);
            assert!(result.is_err(), "corruption at {pos} of {n} went unnoticed");
        }
    }

    #[test]
    fn trailing_garbage_is_an_error() {
        let data = sample(100_000);
        let packed = encode_to_vec(&Zstd, &data, &options(3, 1)).unwrap();
        for junk in [&b"x"[..], b"\0\0\0\0", b"garbage after the frame"] {
            let mut bad = packed.clone();
            bad.extend_from_slice(junk);
            assert!(decode_all(&bad).is_err(), "junk {junk:?} ignored");
        }
    }

    #[test]
    fn concatenated_frames_decode_fully() {
        let a = sample(70_000);
        let b = sample(30_000);
        let mut packed = encode_to_vec(&Zstd, &a, &options(3, 1)).unwrap();
        packed.extend(encode_to_vec(&Zstd, &b, &options(5, 2)).unwrap());
        let out = decode_all(&packed).unwrap();
        assert!(out[..a.len()] == a[..] && out[a.len()..] == b[..]);
    }

    #[test]
    fn abandoned_encoder_leaves_an_incomplete_frame() {
        let data = sample(300_000);
        for threads in [1, 2] {
            let mut out = Vec::new();
            {
                let mut encoder = Zstd
                    .encoder(Box::new(&mut out), &options(3, threads))
                    .unwrap();
                encoder.write_all(&data).unwrap();
                drop(encoder);
            }
            assert!(decode_all(&out).is_err(), "threads {threads}");
        }
    }

    #[test]
    fn matches_the_zstd_command_line_tool() {
        let Ok(dir) = std::env::temp_dir().canonicalize() else {
            return;
        };
        let data = sample(1 << 20);
        let packed = encode_to_vec(&Zstd, &data, &options(3, 2)).unwrap();
        let path = dir.join(format!("sarde-codec-zstd-test-{}.zst", std::process::id()));
        std::fs::write(&path, &packed).unwrap();
        let result = std::process::Command::new("zstd")
            .arg("-dc")
            .arg(&path)
            .output();
        let _ = std::fs::remove_file(&path);
        match result {
            Ok(output) => {
                assert!(output.status.success(), "zstd -dc failed");
                assert!(output.stdout == data);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                eprintln!("zstd is not installed; skipped");
            }
            Err(e) => panic!("running zstd: {e}"),
        }
    }

    #[test]
    fn output_does_not_depend_on_chunking_or_worker_timing() {
        // 8 MiB is a whole number of zstdmt sections: the case where a section
        // started before the end used to add an empty last block, depending on
        // how far the workers had got.
        for len in [8 << 20, (8 << 20) + 12_345] {
            let data = sample(len);
            // 0: in the caller's thread, the mode piece export uses.
            for workers in [0u32, 1, 2] {
                let mut expected: Option<Vec<u8>> = None;
                for chunk in [len, 1 << 20, 64 << 10] {
                    for pause in [false, true] {
                        let mut out = Vec::new();
                        let mut encoder = Zstd
                            .encoder(Box::new(&mut out), &options(1, workers as usize))
                            .unwrap();
                        for piece in data.chunks(chunk) {
                            encoder.write_all(piece).unwrap();
                        }
                        if pause {
                            // Let the workers finish every section they have.
                            std::thread::sleep(std::time::Duration::from_millis(200));
                        }
                        encoder.finish().unwrap();
                        // No empty last block (header 01 00 00) before the checksum.
                        assert_ne!(&out[out.len() - 7..out.len() - 4], &[1, 0, 0]);
                        let first = expected.get_or_insert_with(|| out.clone());
                        assert!(
                            out == *first,
                            "len {len}, {workers} workers, chunks of {chunk}, pause {pause}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn describes_itself_and_registers() {
        assert_eq!(Zstd.media_type_suffix(), Some("+zstd"));
        assert_eq!(Zstd.levels(), Some(1..=19));
        assert_eq!(Zstd.default_level(), Some(3));
        assert!(Zstd.multithreaded());
        let mut registry = Registry::new();
        register(&mut registry.registrar(Origin::BuiltIn)).unwrap();
        assert_eq!(
            registry.codec_for_suffix(Some("+zstd")).unwrap().name(),
            "zstd"
        );
    }
}
