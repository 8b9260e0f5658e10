//! Export and import of real files with the zstd codec.

mod common;

use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::time::Instant;

use common::*;
use sarde_api::{Codec, Digest, EncodeOptions};
use sarde_codec_zstd::Zstd;
use sarde_disk::{
    DiskError, PieceInfo, PieceSpan, create_sparse, export_file, verify_file, verify_pieces,
    write_piece, zero_range,
};

const MIB: u64 = 1 << 20;

fn zstd3() -> EncodeOptions {
    EncodeOptions::default().with_level(3).with_threads(1)
}

/// Data in a few places of a 256 MiB sparse file, straddling piece boundaries.
fn sparse_256(path: &Path) -> u64 {
    let len = 256 * MIB;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    sparse_file(
        path,
        len,
        &[
            (0, random(&mut rng, 100_000)),
            (37 * MIB - 5000, text(&mut rng, 3 * MIB as usize)),
            (200 * MIB, random(&mut rng, MIB as usize)),
            (len - 10, vec![0xab; 10]),
        ],
    );
    len
}

/// Checks every piece against the file itself: length, offset, digest, and that exactly
/// the all-zero pieces have no blob.
fn check_pieces(path: &Path, pieces: &[PieceInfo], piece_size: u64) {
    let len = fs::metadata(path).unwrap().len();
    assert_eq!(pieces.len() as u64, len.div_ceil(piece_size));
    let mut end = 0;
    let mut zero_digests: Vec<(u64, Digest)> = Vec::new();
    for (i, p) in pieces.iter().enumerate() {
        assert_eq!(p.index, i);
        assert_eq!(p.offset, end);
        assert_eq!(p.length, piece_size.min(len - p.offset));
        end += p.length;
        let data = read_range(path, p.offset, p.length);
        let zero = all_zero(&data);
        assert_eq!(p.blob.is_none(), zero, "piece {i}: zero={zero}");
        // sha256 is slow in debug builds: zero pieces share one digest per length.
        let expected = if zero {
            match zero_digests.iter().find(|(l, _)| *l == p.length) {
                Some((_, d)) => d.clone(),
                None => {
                    let d = Digest::sha256_of(&data);
                    zero_digests.push((p.length, d.clone()));
                    d
                }
            }
        } else {
            Digest::sha256_of(&data)
        };
        assert_eq!(p.uncompressed_digest, expected, "piece {i}");
    }
    assert_eq!(end, len);
}

#[test]
fn sparse_256_mib_round_trips_and_stays_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk.img");
    let len = sparse_256(&src);
    for piece_size in [MIB, 4 * MIB] {
        let sink = DirSink::new(&dir.path().join(format!("blobs-{piece_size}")));
        let pieces = export_file(&src, piece_size, 4, &Zstd, &zstd3(), &sink).unwrap();
        check_pieces(&src, &pieces, piece_size);
        let stored = pieces.iter().filter(|p| p.blob.is_some()).count();
        // Data in 4 places spanning few pieces: most of the file is not stored.
        assert!(stored <= 8, "{stored} pieces stored");
        assert_eq!(sink.begun.load(std::sync::atomic::Ordering::SeqCst), stored);
        assert_eq!(sink.discarded.load(std::sync::atomic::Ordering::SeqCst), 0);

        let out = dir.path().join(format!("imported-{piece_size}"));
        import(&sink, &pieces, &out, len, 4);
        assert_eq!(fs::metadata(&out).unwrap().len(), len);
        assert!(same_content(&out, &src));
        let allocated = allocated_bytes(&out);
        assert!(
            allocated < 16 * MIB,
            "import allocates {allocated} bytes of {len}"
        );
        assert!(verify_file(&out, &pieces, 2).unwrap());
    }
}

#[test]
fn non_multiple_lengths_and_piece_sizes_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(42);
    let src = dir.path().join("odd.img");
    let len = 10 * MIB + 12_345;
    sparse_file(
        &src,
        len,
        &[
            (0, text(&mut rng, 2 * MIB as usize + 3)),
            (6 * MIB + 1, random(&mut rng, 500_000)),
            (len - 12_345, random(&mut rng, 12_345)),
        ],
    );
    // Piece sizes that are not block multiples, and one larger than the file.
    for piece_size in [4 * MIB, 3 * MIB + 17, 777_777, 64 * MIB] {
        let sink = DirSink::new(&dir.path().join(format!("blobs-{piece_size}")));
        let pieces = export_file(&src, piece_size, 3, &Zstd, &zstd3(), &sink).unwrap();
        check_pieces(&src, &pieces, piece_size);
        let out = dir.path().join(format!("out-{piece_size}"));
        import(&sink, &pieces, &out, len, 3);
        assert!(same_content(&out, &src), "piece size {piece_size}");
    }
}

#[test]
fn thread_counts_give_identical_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(7);
    let src = dir.path().join("mixed.img");
    let mut writes = Vec::new();
    for i in 0..12u64 {
        let data = match i % 3 {
            0 => random(&mut rng, MIB as usize / 2),
            1 => text(&mut rng, MIB as usize),
            _ => vec![0; MIB as usize], // written zeros: allocated, yet all zero
        };
        writes.push((i * 3 * MIB + i * 1000, data));
    }
    sparse_file(&src, 40 * MIB, &writes);
    let runs: Vec<Vec<PieceInfo>> = [1, 4, 1, 2]
        .iter()
        .enumerate()
        .map(|(run, &threads)| {
            let sink = DirSink::new(&dir.path().join(format!("blobs-{run}")));
            export_file(&src, 2 * MIB, threads, &Zstd, &zstd3(), &sink).unwrap()
        })
        .collect();
    check_pieces(&src, &runs[0], 2 * MIB);
    for run in &runs[1..] {
        assert_eq!(run, &runs[0]);
    }
}

#[test]
fn allocated_zeros_are_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("zeros.img");
    sparse_file(&src, 5 * MIB, &[(0, vec![0; 5 * MIB as usize])]);
    assert!(
        allocated_bytes(&src) >= 5 * MIB,
        "the zeros should be allocated"
    );
    let sink = DirSink::new(&dir.path().join("blobs"));
    let pieces = export_file(&src, 2 * MIB, 2, &Zstd, &zstd3(), &sink).unwrap();
    assert_eq!(pieces.len(), 3);
    assert!(pieces.iter().all(|p| p.blob.is_none()));
    assert_eq!(pieces[2].length, MIB);
    assert_eq!(
        pieces[0].uncompressed_digest,
        Digest::sha256_of(&vec![0; 2 * MIB as usize])
    );
    assert_eq!(sink.begun.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn empty_file_and_zero_piece_size() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("empty");
    File::create(&src).unwrap();
    let sink = DirSink::new(&dir.path().join("blobs"));
    assert!(
        export_file(&src, MIB, 2, &Zstd, &zstd3(), &sink)
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        export_file(&src, 0, 2, &Zstd, &zstd3(), &sink),
        Err(DiskError::InvalidPieceSize)
    ));
    let missing = dir.path().join("missing");
    let err = export_file(&missing, MIB, 2, &Zstd, &zstd3(), &sink).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn a_failing_sink_stops_all_threads() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("data.img");
    let mut rng = Rng(99);
    sparse_file(&src, 64 * MIB, &[(0, random(&mut rng, 64 * MIB as usize))]);
    let mut sink = DirSink::new(&dir.path().join("blobs"));
    sink.fail_at = Some(3);
    let err = export_file(&src, MIB, 4, &Zstd, &zstd3(), &sink).unwrap_err();
    match &err {
        DiskError::Sink { index, offset, .. } => {
            assert_eq!((*index, *offset), (3, 3 * MIB));
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(err.to_string().contains("data.img"), "{err}");
    let begun = sink.begun.load(std::sync::atomic::Ordering::SeqCst);
    assert!(begun < 32, "{begun} of 64 pieces started after the failure");
    // No temporary blob is left behind by the stopped threads.
    let leftovers: Vec<_> = fs::read_dir(&sink.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// One piece of text compressed with zstd, for the write_piece tests.
fn one_piece(len: usize) -> (Vec<u8>, Vec<u8>, Digest) {
    let data = text(&mut Rng(5), len);
    let packed = sarde_api::codec::encode_to_vec(&Zstd, &data, &zstd3()).unwrap();
    let digest = Digest::sha256_of(&data);
    (data, packed, digest)
}

#[test]
fn wrong_digest_is_a_mismatch_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("t.img");
    let file = create_sparse(&target, 8 * MIB).unwrap();
    let (data, packed, _) = one_piece(3 * MIB as usize);
    let wrong = Digest::sha256_of(b"something else");
    let mut decoder = Zstd.decoder(Box::new(&packed[..])).unwrap();
    let err = write_piece(
        &file,
        2 * MIB,
        data.len() as u64,
        Some(&wrong),
        &mut decoder,
    )
    .unwrap_err();
    match &err {
        DiskError::PieceDigestMismatch {
            file,
            offset,
            expected,
            actual,
        } => {
            assert_eq!(file.file_name().unwrap(), "t.img");
            assert_eq!(*offset, 2 * MIB);
            assert_eq!(expected, &wrong);
            assert_eq!(actual, &Digest::sha256_of(&data));
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(err.to_string().contains("t.img"), "{err}");
}

#[test]
fn longer_stream_is_refused_without_writing_beyond_the_piece() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("t.img");
    let file = create_sparse(&target, 8 * MIB).unwrap();
    let (data, _, digest) = one_piece(2 * MIB as usize);
    let length = data.len() as u64;
    // The right bytes followed by more.
    let mut longer = data.clone();
    longer.extend_from_slice(&[0x41; 5000]);
    let err = write_piece(&file, MIB, length, Some(&digest), &mut &longer[..]).unwrap_err();
    assert!(
        matches!(err, DiskError::PieceTooLong { offset, length: l, .. } if offset == MIB && l == length),
        "{err}"
    );
    // A bomb: an endless stream is stopped after one byte too many.
    let mut endless = io::repeat(0x41);
    let err = write_piece(&file, 4 * MIB, MIB, Some(&digest), &mut endless).unwrap_err();
    assert!(matches!(err, DiskError::PieceTooLong { .. }), "{err}");
    // Nothing was written past either piece.
    assert_eq!(fs::metadata(&target).unwrap().len(), 8 * MIB);
    let after_first = read_range(&target, MIB + length, MIB);
    assert!(after_first.iter().all(|&b| b == 0));
    let after_second = read_range(&target, 5 * MIB, 3 * MIB);
    assert!(after_second.iter().all(|&b| b == 0));
    // A piece that would end beyond the file is refused before reading anything.
    let err = write_piece(&file, 7 * MIB, 2 * MIB, Some(&digest), &mut endless).unwrap_err();
    assert!(matches!(err, DiskError::PieceOutOfRange { .. }), "{err}");
}

#[test]
fn truncated_stream_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("t.img");
    let file = create_sparse(&target, 8 * MIB).unwrap();
    let (data, packed, digest) = one_piece(3 * MIB as usize);
    let length = data.len() as u64;
    // Plain bytes that stop early.
    let short = &data[..data.len() - 1];
    let err = write_piece(&file, 0, length, Some(&digest), &mut &short[..]).unwrap_err();
    assert!(
        matches!(err, DiskError::PieceTruncated { got, .. } if got == length - 1),
        "{err}"
    );
    // A truncated compressed blob: the decoder reports it.
    let mut decoder = Zstd.decoder(Box::new(&packed[..packed.len() / 2])).unwrap();
    let err = write_piece(&file, 0, length, Some(&digest), &mut decoder).unwrap_err();
    assert!(
        matches!(
            err,
            DiskError::Decode { .. } | DiskError::PieceTruncated { .. }
        ),
        "{err}"
    );
    // The whole blob is fine once the range is cleared.
    zero_range(&file, 0, length).unwrap();
    let mut decoder = Zstd.decoder(Box::new(&packed[..])).unwrap();
    write_piece(&file, 0, length, Some(&digest), &mut decoder).unwrap();
    assert!(read_range(&target, 0, length) == data);
}

#[test]
fn verify_finds_damaged_pieces_and_resume_repairs_them() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let mut rng = Rng(11);
    let len = 24 * MIB + 100;
    sparse_file(
        &src,
        len,
        &[
            (MIB, random(&mut rng, 3 * MIB as usize)),
            (13 * MIB, text(&mut rng, MIB as usize)),
        ],
    );
    let sink = DirSink::new(&dir.path().join("blobs"));
    let pieces = export_file(&src, 4 * MIB, 2, &Zstd, &zstd3(), &sink).unwrap();
    let out = dir.path().join("out.img");
    import(&sink, &pieces, &out, len, 2);
    assert_eq!(verify_pieces(&out, &pieces, 3).unwrap(), vec![true; 7]);

    // Damage a data piece and a hole piece.
    let file = fs::OpenOptions::new().write(true).open(&out).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"x", 2 * MIB).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"y", 21 * MIB).unwrap();
    let spans: Vec<PieceSpan> = pieces.iter().map(PieceSpan::from).collect();
    let ok = verify_pieces(&out, &spans, 3).unwrap();
    assert_eq!(ok, vec![false, true, true, true, true, false, true]);
    assert!(!verify_file(&out, &spans, 2).unwrap());

    // Resume: clear and rewrite only the damaged pieces.
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&out)
        .unwrap();
    for (p, good) in pieces.iter().zip(&ok) {
        if *good {
            continue;
        }
        zero_range(&file, p.offset, p.length).unwrap();
        if let Some((blob, _)) = &p.blob {
            let mut decoder = Zstd
                .decoder(Box::new(File::open(sink.blob(blob)).unwrap()))
                .unwrap();
            write_piece(
                &file,
                p.offset,
                p.length,
                Some(&p.uncompressed_digest),
                &mut decoder,
            )
            .unwrap();
        }
    }
    assert!(verify_file(&out, &pieces, 2).unwrap());
    assert!(same_content(&out, &src));

    // A truncated file does not verify (and is not an error).
    file.set_len(len - 1).unwrap();
    let ok = verify_pieces(&out, &pieces, 2).unwrap();
    assert!(!ok[6] && ok[..6].iter().all(|&g| g));
}

#[test]
fn qcow2_written_by_qemu_io_round_trips() {
    if !has("qemu-io") {
        eprintln!("qemu-io is not installed; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("vm.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&src), "256M"]);
    for cmd in [
        "write -P 0x5a 0 4M",
        "write -P 0x11 100M 3M",
        "write -z 101M 64k",
        "write -P 0x77 255M 1M",
    ] {
        run("qemu-io", &["-f", "qcow2", "-c", cmd, p(&src)]);
    }
    let len = fs::metadata(&src).unwrap().len();
    let sink = DirSink::new(&dir.path().join("blobs"));
    let pieces = export_file(&src, MIB, 2, &Zstd, &zstd3(), &sink).unwrap();
    check_pieces(&src, &pieces, MIB);
    // The compressed pieces are much smaller than the file (patterns compress).
    let stored: u64 = pieces
        .iter()
        .filter_map(|p| p.blob.as_ref())
        .map(|b| b.1)
        .sum();
    assert!(stored < len / 20, "{stored} of {len}");
    let out = dir.path().join("imported.qcow2");
    import(&sink, &pieces, &out, len, 2);
    assert!(read_all(File::open(&out).unwrap()) == read_all(File::open(&src).unwrap()));
    let compare = qemu_img(&["compare", "-f", "qcow2", "-F", "qcow2", p(&src), p(&out)]);
    assert!(compare.contains("identical"), "{compare}");
    qemu_img(&["check", "-f", "qcow2", p(&out)]);
}

/// Throughput of export and import on 1 GiB of mixed content (a third each random,
/// text and zeros, in 4 MiB runs). Run with
/// `cargo test --release -p sarde-disk --test roundtrip -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_throughput() {
    let dir = tempfile::tempdir_in(std::env::var("SARDE_BENCH_DIR").unwrap_or("/var/tmp".into()))
        .unwrap();
    let src = dir.path().join("mixed.img");
    let len = 1024 * MIB;
    {
        let file = File::create(&src).unwrap();
        file.set_len(len).unwrap();
        let mut rng = Rng(3);
        let run = 4 * MIB;
        for i in 0..len / run {
            let data = match i % 3 {
                0 => random(&mut rng, run as usize),
                1 => text(&mut rng, run as usize),
                _ => vec![0; run as usize], // written zeros, like a used-then-freed disk
            };
            std::os::unix::fs::FileExt::write_all_at(&file, &data, i * run).unwrap();
        }
        file.sync_all().unwrap();
    }
    let mbs = |secs: f64| len as f64 / 1e6 / secs;
    // What one core does on each kind of content, for comparison with the pipeline.
    let mut rng = Rng(4);
    for (kind, data) in [
        ("random", random(&mut rng, 64 * MIB as usize)),
        ("text", text(&mut rng, 64 * MIB as usize)),
        ("zeros", vec![0; 64 * MIB as usize]),
    ] {
        let start = Instant::now();
        let packed = sarde_api::codec::encode_to_vec(&Zstd, &data, &zstd3()).unwrap();
        let zstd = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let _ = Digest::sha256_of(&data);
        let sha = start.elapsed().as_secs_f64();
        println!(
            "one core, {kind}: zstd-3 {:.0} MB/s (ratio {:.2}), sha256 {:.0} MB/s",
            data.len() as f64 / 1e6 / zstd,
            packed.len() as f64 / data.len() as f64,
            data.len() as f64 / 1e6 / sha
        );
    }
    for piece_size in [64 * MIB, 512 * MIB] {
        let start = Instant::now();
        export_file(&src, piece_size, 2, &Zstd, &zstd3(), &NullSink).unwrap();
        let pipeline = start.elapsed().as_secs_f64();
        let sink = DirSink::new(&dir.path().join(format!("blobs-{piece_size}")));
        let start = Instant::now();
        let pieces = export_file(&src, piece_size, 2, &Zstd, &zstd3(), &sink).unwrap();
        let export = start.elapsed().as_secs_f64();
        let stored: u64 = pieces
            .iter()
            .filter_map(|p| p.blob.as_ref())
            .map(|b| b.1)
            .sum();
        let out = dir.path().join(format!("out-{piece_size}"));
        let start = Instant::now();
        import(&sink, &pieces, &out, len, 2);
        File::open(&out).unwrap().sync_all().unwrap();
        let import_secs = start.elapsed().as_secs_f64();
        let start = Instant::now();
        assert!(verify_file(&out, &pieces, 2).unwrap());
        let verify = start.elapsed().as_secs_f64();
        println!(
            "piece {} MiB: export {:.0} MB/s without blob store, {:.0} MB/s ({export:.2} s) \
             into blob files with fsync, {:.1}% of size stored, \
             import {:.0} MB/s ({import_secs:.2} s incl. fsync), verify {:.0} MB/s",
            piece_size / MIB,
            mbs(pipeline),
            mbs(export),
            stored as f64 * 100.0 / len as f64,
            mbs(import_secs),
            mbs(verify),
        );
        fs::remove_dir_all(&sink.dir).unwrap();
        fs::remove_file(&out).unwrap();
    }
}

#[test]
fn direct_writes_match_buffered_ones_with_unaligned_ends() {
    // On a real disk file system (tmpfs refuses O_DIRECT; then None and buffered).
    let dir = tempfile::Builder::new().tempdir_in("/var/tmp").unwrap();
    let len = 5 * MIB + 1234;
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8 + 1).collect();
    let target = dir.path().join("direct.img");
    let file = create_sparse(&target, len).unwrap();
    let direct = sarde_disk::open_direct(&target);
    // Two pieces: an aligned one, and one whose end is not aligned.
    for (offset, length) in [(0, 3 * MIB), (3 * MIB, len - 3 * MIB)] {
        let piece = &data[offset as usize..(offset + length) as usize];
        let digest = Digest::sha256_of(piece);
        sarde_disk::write_piece_direct(
            &file,
            direct.as_ref(),
            offset,
            length,
            Some(&digest),
            &mut &piece[..],
        )
        .unwrap();
    }
    file.sync_all().unwrap();
    assert!(fs::read(&target).unwrap() == data);
}

#[test]
fn without_a_digest_the_piece_is_written_and_only_its_length_checked() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("t.img");
    let file = create_sparse(&target, 8 * MIB).unwrap();
    let (data, packed, _) = one_piece(3 * MIB as usize);
    let mut decoder = Zstd.decoder(Box::new(&packed[..])).unwrap();
    write_piece(&file, MIB, data.len() as u64, None, &mut decoder).unwrap();
    let written = fs::read(&target).unwrap();
    assert_eq!(&written[MIB as usize..MIB as usize + data.len()], &data[..]);
    assert!(written[..MIB as usize].iter().all(|&b| b == 0));
    // The length is still enforced.
    let mut decoder = Zstd.decoder(Box::new(&packed[..])).unwrap();
    let err = write_piece(&file, MIB, data.len() as u64 - 1, None, &mut decoder).unwrap_err();
    assert!(matches!(err, DiskError::PieceTooLong { .. }), "{err}");
}
