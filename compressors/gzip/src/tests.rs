use super::*;
use sarde_api::codec::{decode_exact, encode_to_vec};
use sarde_api::{Origin, Registry};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use parallel::BLOCK_SIZE;

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

fn options(level: i32, threads: usize) -> EncodeOptions {
    EncodeOptions::default()
        .with_level(level)
        .with_threads(threads)
}

fn named(level: i32, threads: usize) -> EncodeOptions {
    EncodeOptions {
        file_name: Some("disk.img".to_string()),
        mtime: Some(1_700_000_000),
        ..options(level, threads)
    }
}

fn decode_all(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    Gzip.decoder(Box::new(data))
        .map_err(io::Error::other)?
        .read_to_end(&mut out)?;
    Ok(out)
}

/// The fixed header fields and FNAME of a gzip member.
struct Header {
    flags: u8,
    mtime: u32,
    xfl: u8,
    os: u8,
    name: Option<Vec<u8>>,
    len: usize,
}

fn parse_header(data: &[u8]) -> Header {
    assert_eq!(&data[..3], &[0x1f, 0x8b, 8], "not a deflate gzip member");
    let flags = data[3];
    assert_eq!(flags & !FNAME, 0, "unexpected flags {flags:#x}");
    let mtime = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
    let (name, len) = if flags & FNAME != 0 {
        let end = 10 + data[10..].iter().position(|&b| b == 0).unwrap();
        (Some(data[10..end].to_vec()), end + 1)
    } else {
        (None, 10)
    };
    Header {
        flags,
        mtime,
        xfl: data[8],
        os: data[9],
        name,
        len,
    }
}

/// A file in the temporary directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str, contents: &[u8]) -> Self {
        let path =
            std::env::temp_dir().join(format!("sarde-codec-gzip-{}-{tag}.gz", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs a tool, or returns `None` when it is not installed.
fn run(command: &mut Command) -> Option<std::process::Output> {
    match command.output() {
        Ok(output) => Some(output),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            eprintln!("{command:?} is not installed; skipped");
            None
        }
        Err(e) => panic!("running {command:?}: {e}"),
    }
}

#[test]
fn round_trips() {
    let sizes = [
        0,
        1,
        BLOCK_SIZE - 1,
        BLOCK_SIZE,
        BLOCK_SIZE + 1,
        4 * BLOCK_SIZE,
        3 << 20,
    ];
    for len in sizes {
        let data = sample(len);
        for (level, threads) in [(1, 1), (6, 1), (9, 1), (1, 2), (6, 2), (6, 4), (9, 3)] {
            if len > 1 << 20 && level != 6 {
                continue; // slow in debug builds; levels are covered on smaller inputs
            }
            let packed = encode_to_vec(&Gzip, &data, &named(level, threads)).unwrap();
            let mut out = Vec::new();
            decode_exact(&Gzip, Box::new(&packed[..]), &mut out, len as u64).unwrap();
            assert!(out == data, "level {level} threads {threads} len {len}");
        }
    }
}

#[test]
fn parallel_ratio_is_close_to_single_threaded() {
    let data = sample(4 << 20);
    let single = encode_to_vec(&Gzip, &data, &options(6, 1)).unwrap();
    let parallel = encode_to_vec(&Gzip, &data, &options(6, 2)).unwrap();
    assert!(single.len() < data.len() / 2);
    let excess = parallel.len() as f64 / single.len() as f64;
    assert!(
        excess < 1.01,
        "parallel output is {excess:.4}× the single-threaded"
    );
}

#[test]
fn level_out_of_range_is_refused() {
    for threads in [1, 2] {
        for level in [-1, 0, 10, 99] {
            let result = Gzip.encoder(Box::new(io::sink()), &options(level, threads));
            assert!(
                matches!(result, Err(CodecError::LevelOutOfRange { .. })),
                "level {level}"
            );
        }
    }
}

#[test]
fn header_fields_are_written() {
    let data = sample(300_000);
    for threads in [1, 2] {
        for (level, xfl) in [(1, 4), (6, 0), (9, 2)] {
            let packed = encode_to_vec(&Gzip, &data, &named(level, threads)).unwrap();
            let h = parse_header(&packed);
            assert_eq!(h.flags, FNAME);
            assert_eq!(h.name.as_deref(), Some(&b"disk.img"[..]));
            assert_eq!(h.mtime, 1_700_000_000);
            assert_eq!(h.xfl, xfl, "level {level}");
            assert_eq!(h.os, 255);
        }
        let packed = encode_to_vec(&Gzip, &data, &options(6, threads)).unwrap();
        let h = parse_header(&packed);
        assert_eq!((h.flags, h.mtime, h.name, h.len), (0, 0, None, 10));
    }
}

#[test]
fn single_and_multi_threaded_headers_are_identical() {
    let data = sample(200_000);
    for level in [1, 5, 9] {
        let single = encode_to_vec(&Gzip, &data, &named(level, 1)).unwrap();
        let multi = encode_to_vec(&Gzip, &data, &named(level, 2)).unwrap();
        let len = parse_header(&single).len;
        assert_eq!(single[..len], multi[..len], "level {level}");
    }
}

#[test]
fn trailer_holds_crc_and_size() {
    let data = sample(BLOCK_SIZE * 3 + 17);
    for threads in [1, 3] {
        let packed = encode_to_vec(&Gzip, &data, &named(6, threads)).unwrap();
        let n = packed.len();
        let crc = u32::from_le_bytes(packed[n - 8..n - 4].try_into().unwrap());
        let size = u32::from_le_bytes(packed[n - 4..].try_into().unwrap());
        assert_eq!(crc, crc32fast::hash(&data));
        assert_eq!(size as usize, data.len());
    }
}

#[test]
fn file_names_follow_python() {
    let name = |s: &str| header_file_name(s).unwrap();
    assert_eq!(name("disk.img"), Some(b"disk.img".to_vec()));
    assert_eq!(
        name("/var/lib/libvirt/images/disk.qcow2.gz"),
        Some(b"disk.qcow2".to_vec())
    );
    assert_eq!(name("caf\u{e9}.img"), Some(b"caf\xe9.img".to_vec()));
    assert_eq!(name(""), None);
    assert_eq!(name("dir/"), None);
    assert!(header_file_name("bad\0name").is_err());
    assert!(header_file_name("\u{65e5}\u{672c}.img").is_err());
    let result = Gzip.encoder(
        Box::new(io::sink()),
        &EncodeOptions {
            file_name: Some("nul\0".to_string()),
            ..Default::default()
        },
    );
    assert!(matches!(result, Err(CodecError::Setup { .. })));
}

/// Python's gzip module is the format of record: the headers must be identical, and
/// Python must read what we write, with the same MTIME.
#[test]
fn python_writes_the_same_header_and_reads_ours() {
    let script = r#"
import gzip, io, sys
level, mtime = int(sys.argv[1]), int(sys.argv[2])
buf = io.BytesIO()
with gzip.GzipFile(filename="disk.img", mode="wb", fileobj=buf, mtime=mtime, compresslevel=level) as f:
    f.write(b"hello")
sys.stdout.buffer.write(buf.getvalue())
"#;
    for level in [1, 6, 9] {
        let Some(output) = run(Command::new("python3")
            .args(["-c", script])
            .arg(level.to_string())
            .arg("1700000000"))
        else {
            return;
        };
        assert!(output.status.success(), "python3 failed: {output:?}");
        let python = output.stdout;
        let len = parse_header(&python).len;
        for threads in [1, 2] {
            let ours = encode_to_vec(&Gzip, b"hello", &named(level, threads)).unwrap();
            assert_eq!(
                python[..len],
                ours[..len],
                "level {level} threads {threads}"
            );
        }
    }

    let read = r#"
import gzip, hashlib, sys
with gzip.GzipFile(sys.argv[1], "rb") as f:
    data = f.read()
    print(f.mtime, len(data), hashlib.sha256(data).hexdigest())
"#;
    let data = sample(3 * BLOCK_SIZE + 999);
    let expected = format!(
        "1700000000 {} {}\n",
        data.len(),
        sha256_hex_with_python(&data).unwrap_or_default()
    );
    for threads in [1, 2] {
        let packed = encode_to_vec(&Gzip, &data, &named(6, threads)).unwrap();
        let file = TempFile::new(&format!("python-{threads}"), &packed);
        let Some(output) = run(Command::new("python3").args(["-c", read]).arg(file.path())) else {
            return;
        };
        assert!(
            output.status.success(),
            "python3 could not read: {output:?}"
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout), expected);
    }
}

/// sha256 through Python, to avoid a dependency just for tests.
fn sha256_hex_with_python(data: &[u8]) -> Option<String> {
    let file = TempFile::new("sha", data);
    let output = run(Command::new("python3")
        .args([
            "-c",
            "import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())",
        ])
        .arg(file.path()))?;
    assert!(output.status.success());
    Some(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

#[test]
fn gzip_tool_reads_our_output() {
    let data = sample(5 * BLOCK_SIZE + 4321);
    for threads in [1, 2, 4] {
        let packed = encode_to_vec(&Gzip, &data, &named(6, threads)).unwrap();
        let file = TempFile::new(&format!("tool-{threads}"), &packed);
        let Some(test) = run(Command::new("gzip").arg("-t").arg(file.path())) else {
            return;
        };
        assert!(test.status.success(), "gzip -t: {test:?}");
        let Some(out) = run(Command::new("gzip").arg("-dc").arg(file.path())) else {
            return;
        };
        assert!(out.status.success(), "gzip -dc: {:?}", out.stderr);
        assert!(out.stdout == data, "threads {threads}");
        // gzip -l --name shows the stored name: FNAME is where gzip looks.
        let Some(list) = run(Command::new("gzip").args(["-l", "-N"]).arg(file.path())) else {
            return;
        };
        let listing = String::from_utf8_lossy(&list.stdout);
        assert!(listing.contains("disk.img"), "{listing}");
    }
}

#[test]
fn output_is_deterministic() {
    let data = sample(3 << 20);
    for threads in [1, 2] {
        let a = encode_to_vec(&Gzip, &data, &named(6, threads)).unwrap();
        let b = encode_to_vec(&Gzip, &data, &named(6, threads)).unwrap();
        assert!(a == b, "threads {threads}");
    }
    // The parallel output depends only on the block size, not on the thread count.
    let two = encode_to_vec(&Gzip, &data, &named(6, 2)).unwrap();
    let five = encode_to_vec(&Gzip, &data, &named(6, 5)).unwrap();
    assert!(two == five);
}

#[test]
fn truncated_input_is_an_error() {
    let data = sample(1 << 20);
    for threads in [1, 2] {
        let packed = encode_to_vec(&Gzip, &data, &named(6, threads)).unwrap();
        let n = packed.len();
        for cut in [
            0,
            1,
            2,
            9,
            10,
            15,
            19,
            100,
            n / 3,
            n / 2,
            n - 8,
            n - 5,
            n - 1,
        ] {
            let result = decode_all(&packed[..cut]);
            assert!(result.is_err(), "threads {threads}: cut at {cut} of {n}");
        }
    }
    for threads in [1, 2] {
        let empty = encode_to_vec(&Gzip, &[], &named(6, threads)).unwrap();
        for cut in 0..empty.len() {
            assert!(
                decode_all(&empty[..cut]).is_err(),
                "empty member cut at {cut}"
            );
        }
        assert_eq!(decode_all(&empty).unwrap(), b"");
    }
}

#[test]
fn corruption_is_an_error() {
    let data = sample(1 << 20);
    for threads in [1, 2] {
        let packed = encode_to_vec(&Gzip, &data, &named(6, threads)).unwrap();
        let n = packed.len();
        // Header fields other than magic and method have no checksum (no FHCRC, as
        // Python writes), so corrupt the magic, the deflate data and the trailer.
        for pos in [
            0,
            1,
            2,
            30,
            n / 4,
            n / 2,
            n - 20,
            n - 8,
            n - 5,
            n - 4,
            n - 1,
        ] {
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
fn trailing_junk_is_an_error() {
    let data = sample(100_000);
    for threads in [1, 2] {
        let packed = encode_to_vec(&Gzip, &data, &named(6, threads)).unwrap();
        for junk in [
            &b"x"[..],
            b"\0",
            b"\0\0\0\0\0\0\0\0",
            b"\x1f",
            b"\x1f\x8b",
            b"junk",
        ] {
            let mut bad = packed.clone();
            bad.extend_from_slice(junk);
            assert!(decode_all(&bad).is_err(), "junk {junk:?} ignored");
        }
    }
}

#[test]
fn concatenated_members_decode_fully() {
    let a = sample(70_000);
    let b = sample(BLOCK_SIZE * 2 + 5);
    let mut packed = encode_to_vec(&Gzip, &a, &named(6, 1)).unwrap();
    packed.extend(encode_to_vec(&Gzip, &b, &named(6, 2)).unwrap());
    let out = decode_all(&packed).unwrap();
    assert!(out[..a.len()] == a[..] && out[a.len()..] == b[..]);
}

#[test]
fn abandoned_encoder_leaves_an_incomplete_member() {
    let data = sample(3 * BLOCK_SIZE);
    for threads in [1, 2] {
        let mut out = Vec::new();
        {
            let mut encoder = Gzip
                .encoder(Box::new(&mut out), &named(6, threads))
                .unwrap();
            encoder.write_all(&data).unwrap();
            drop(encoder);
        }
        assert!(decode_all(&out).is_err(), "threads {threads}");
    }
}

#[test]
fn describes_itself_and_registers() {
    assert_eq!(Gzip.media_type_suffix(), Some("+gzip"));
    assert_eq!(Gzip.levels(), Some(1..=9));
    assert_eq!(Gzip.default_level(), Some(6));
    assert!(Gzip.multithreaded());
    let mut registry = Registry::new();
    register(&mut registry.registrar(Origin::BuiltIn)).unwrap();
    assert_eq!(
        registry.codec_for_suffix(Some("+gzip")).unwrap().name(),
        "gzip"
    );
}

#[test]
fn a_wrong_crc_is_an_error() {
    assert!(Gzip.checks_decoded());
    let data = sample(1 << 20);
    for threads in [1, 2] {
        let packed = encode_to_vec(&Gzip, &data, &options(6, threads)).unwrap();
        assert_eq!(decode_all(&packed).unwrap(), data);
        // A gzip member ends with CRC-32 and length, 4 bytes each.
        let mut bad = packed.clone();
        let n = bad.len();
        bad[n - 7] ^= 0x01;
        assert!(decode_all(&bad).is_err(), "threads {threads}");
    }
}
