//! What the last export of each disk file stored, so the next export of a VM
//! whose disks changed a little costs what changed: a file whose identity stamp
//! still holds is not even read; in a changed file, each piece is hashed and only
//! pieces whose content changed are compressed.
//!
//! One record per source file, in `<ocidir>/.sarde/exports/<sha256 of its path>.json`.
//! Records are only a shortcut: a missing, stale or unreadable one costs one full
//! export of that file, so `sarde prune` or a user may delete them at any time. The
//! output is the same either way, byte for byte: a blob is reused only for a piece
//! with the same bytes at the same offset, compressed by the same codec, level and
//! piece size, and the same compressor ([`encoding_of`] fingerprints its output).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use sarde_api::digest::Digest;
use sarde_api::oci::Descriptor;
use sarde_api::{Codec, EncodeOptions};
use sarde_format::native::Piece;
use sarde_transport_oci_dir::Layout;
use serde::{Deserialize, Serialize};

use crate::marker::FileStamp;

/// The record of one exported file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ExportRecord {
    /// The source file, as exported (canonical path).
    pub path: PathBuf,
    /// Its identity and times when the export read it.
    pub stamp: FileStamp,
    /// Codec, level and a fingerprint of the compressor's output.
    pub encoding: String,
    pub piece_size: u64,
    /// The layout that holds the blobs.
    pub layout: PathBuf,
    /// The stored pieces (all-zero pieces are not stored and need no record).
    pub pieces: Vec<Piece>,
    /// All-zero pieces left out.
    pub zero_pieces: usize,
}

/// The directory of the records in a cache.
pub(crate) fn records_dir(ocidir: &Path) -> PathBuf {
    ocidir.join(".sarde").join("exports")
}

fn record_path(ocidir: &Path, source: &Path) -> PathBuf {
    let key = Digest::sha256_of(source.as_os_str().as_encoded_bytes());
    records_dir(ocidir).join(format!("{}.json", key.hex()))
}

/// The identity of how pieces are compressed. The fingerprint (the digest of a
/// fixed input compressed with these settings) changes with any change of the
/// compressor's output, such as a new zstd, so blobs are never reused across one.
pub(crate) fn encoding_of(
    codec: &dyn Codec,
    options: &EncodeOptions,
) -> Result<String, sarde_api::CodecError> {
    let probe: Vec<u8> = (0..256u32 * 1024)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 & (i as u8 | 0x0f))
        .collect();
    let encoded = sarde_api::codec::encode_to_vec(codec, &probe, options)?;
    Ok(format!(
        "{}/{}/{}",
        codec.name(),
        options
            .level
            .or(codec.default_level())
            .map_or_else(|| "-".to_string(), |l| l.to_string()),
        Digest::sha256_of(&encoded).hex()
    ))
}

impl ExportRecord {
    /// The record of `source` when it matches these settings; `None` otherwise.
    pub fn load(ocidir: &Path, source: &Path, encoding: &str, piece_size: u64) -> Option<Self> {
        let bytes = std::fs::read(record_path(ocidir, source)).ok()?;
        let record: ExportRecord = match serde_json::from_slice(&bytes) {
            Ok(record) => record,
            Err(e) => {
                tracing::debug!(
                    "ignoring the unreadable export record of {}: {e}",
                    source.display()
                );
                return None;
            }
        };
        (record.path == source && record.encoding == encoding && record.piece_size == piece_size)
            .then_some(record)
    }

    /// Writes the record atomically (a temporary file renamed over the old one).
    pub fn save(&self, ocidir: &Path) -> io::Result<()> {
        let dir = records_dir(ocidir);
        std::fs::create_dir_all(&dir)?;
        let mut temp = tempfile::NamedTempFile::new_in(&dir)?;
        serde_json::to_writer(&mut temp, self).map_err(io::Error::other)?;
        temp.persist(record_path(ocidir, &self.path))
            .map_err(|e| e.error)?;
        Ok(())
    }

    /// Whether the file is as this record found it.
    pub fn unchanged(&self, stamp: &FileStamp) -> bool {
        self.stamp == *stamp
    }

    /// The stored pieces by (offset, size).
    pub fn by_range(&self) -> HashMap<(u64, u64), &Piece> {
        self.pieces
            .iter()
            .map(|p| ((p.offset, p.size), p))
            .collect()
    }
}

/// Makes the blob of `piece` available in `layout`: there already, or linked from
/// the layout the record names. False when neither holds it (collected since).
pub(crate) fn provide_blob(
    layout: &Layout,
    recorded_in: &Path,
    piece: &Piece,
) -> Result<bool, sarde_transport_oci_dir::LayoutError> {
    let blob = Descriptor::new("", piece.blob.clone(), piece.blob_size);
    // Through mount_blob_from even for the same layout: it refreshes the blob's
    // times under the layout's lock, so a collector running now keeps it.
    if layout.mount_blob_from(layout, &blob)? {
        return Ok(true);
    }
    if recorded_in == layout.path() {
        return Ok(false);
    }
    match Layout::open(recorded_in) {
        Ok(source) => layout.mount_blob_from(&source, &blob),
        Err(_) => Ok(false),
    }
}
