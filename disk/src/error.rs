//! Errors of disk handling; every message names the file, and the offset where one
//! matters, because a 60 GB export that fails must say where.

use std::io;
use std::path::PathBuf;

use sarde_api::{CodecError, Digest};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("{file}: cannot run qemu-img (is qemu-utils installed?): {source}")]
    QemuImgSpawn {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{file}: `{command}` failed ({status}): {stderr}")]
    QemuImg {
        file: PathBuf,
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{file}: cannot understand the output of `{command}`: {message}")]
    QemuImgOutput {
        file: PathBuf,
        command: String,
        message: String,
    },
    #[error("{file}: its backing file {backing} is already part of the chain (a loop)")]
    BackingLoop { file: PathBuf, backing: PathBuf },
    #[error(
        "{file}: its backing file {reference:?} (resolved to {resolved}) cannot be opened: {source}"
    )]
    BackingMissing {
        file: PathBuf,
        reference: String,
        resolved: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{file}: {reason}")]
    UnsupportedImage { file: PathBuf, reason: String },
    #[error("{file}: a backing format (-F) is required to set backing file {backing:?}")]
    BackingFormatRequired { file: PathBuf, backing: String },
    #[error("{file}: {action}: {source}")]
    Io {
        file: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{file}: reading at offset {offset}: {source}")]
    Read {
        file: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("{file}: writing at offset {offset}: {source}")]
    Write {
        file: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("piece size must be at least 1 byte")]
    InvalidPieceSize,
    #[error("{file}: piece {index} at offset {offset}: setting up the codec: {source}")]
    Codec {
        file: PathBuf,
        index: usize,
        offset: u64,
        #[source]
        source: CodecError,
    },
    #[error("{file}: piece {index} at offset {offset}: compressing into its blob: {source}")]
    Compress {
        file: PathBuf,
        index: usize,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("{file}: piece {index} at offset {offset}: storing its blob: {source}")]
    Sink {
        file: PathBuf,
        index: usize,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "{file}: the piece at offset {offset} changed while it was exported (read twice, different bytes): shut the VM down, or export a snapshot, and export again"
    )]
    Changed { file: PathBuf, offset: u64 },
    #[error(
        "{file}: piece {index} at offset {offset}: the blob store counted {reported} bytes, {written} were written"
    )]
    SinkSizeMismatch {
        file: PathBuf,
        index: usize,
        offset: u64,
        written: u64,
        reported: u64,
    },
    #[error("{file}: decoding the piece at offset {offset}: {source}")]
    Decode {
        file: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("{file}: the piece at offset {offset} decodes to more than its {length} bytes")]
    PieceTooLong {
        file: PathBuf,
        offset: u64,
        length: u64,
    },
    #[error("{file}: the piece at offset {offset} decodes to {got} bytes, {length} were expected")]
    PieceTruncated {
        file: PathBuf,
        offset: u64,
        length: u64,
        got: u64,
    },
    #[error(
        "{file}: the piece at offset {offset}..{end} ends beyond the file's {file_len} bytes",
        end = offset.saturating_add(*length)
    )]
    PieceOutOfRange {
        file: PathBuf,
        offset: u64,
        length: u64,
        file_len: u64,
    },
    #[error("{file}: the piece at offset {offset} has digest {actual}, {expected} was expected")]
    PieceDigestMismatch {
        file: PathBuf,
        offset: u64,
        expected: Digest,
        actual: Digest,
    },
    #[error(
        "{file}: the piece at offset {offset} is identified by {digest}; only sha256 is supported"
    )]
    UnsupportedDigest {
        file: PathBuf,
        offset: u64,
        digest: Digest,
    },
}
