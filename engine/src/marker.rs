//! The record an import leaves in the VM's directory (`.sarde-image.json`): which
//! image the VM came from and what its files must contain. It lets a second import of
//! the same image succeed without work, `--replace` remove only what sarde made, and
//! `list` find VMs imported under any name.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use sarde_api::digest::Digest;
use serde::{Deserialize, Serialize};

/// File name of the record inside `<vmdir>/<name>/`.
pub const MARKER_NAME: &str = ".sarde-image.json";

/// One expected region of an imported file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub offset: u64,
    pub size: u64,
    pub digest: Digest,
    /// The import hashed these bytes (decoded with a codec that does not check
    /// them itself, copied from an earlier version, or rewritten by a rebase);
    /// otherwise `digest` is the image's word, which a later update import
    /// checks before it copies the bytes into another image's VM.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub verified: bool,
}

/// What one imported file must contain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub name: String,
    pub size: u64,
    /// Regions covering the whole file (for native images: every piece, zero
    /// pieces included; for v1: one region, the whole file).
    pub regions: Vec<Region>,
    /// The file's identity and times right after the import: while they are
    /// unchanged, the content is too, and a re-import need not hash the disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<FileStamp>,
}

/// Device, inode, size, mtime and ctime of a file. ctime moves on every change,
/// including one that sets mtime back, so equal stamps mean an untouched file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileStamp {
    pub fn of(path: &Path) -> std::io::Result<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path)?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Ok(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }
}

/// The import record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// The image as the user named it.
    pub image: String,
    pub manifest: Digest,
    /// The config digest: the image id.
    pub config: Digest,
    pub vm_name: String,
    pub files: Vec<FileRecord>,
    /// Set once the domain was defined: before that, the directory is the leftover
    /// of an interrupted import and may be removed.
    #[serde(default)]
    pub defined: bool,
    /// The program that imported it for its own use (the executor's base VMs), so
    /// it can remove what it made and nothing else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported_by: Option<String>,
}

impl Marker {
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join(MARKER_NAME)
    }

    /// Reads the record of a VM directory; `None` when there is none or it is unreadable
    /// (a directory sarde did not make).
    pub fn read(dir: &Path) -> Option<Marker> {
        let bytes = fs::read(Self::path_in(dir)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Writes the record durably.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let path = Self::path_in(dir);
        let mut file = fs::File::create(&path)?;
        file.write_all(&serde_json::to_vec_pretty(self).expect("marker serialises"))?;
        file.sync_all()
    }
}
