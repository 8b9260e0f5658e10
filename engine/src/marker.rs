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
}

/// What one imported file must contain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub name: String,
    pub size: u64,
    /// Regions covering the whole file (for native images: every piece, zero
    /// pieces included; for v1: one region, the whole file).
    pub regions: Vec<Region>,
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
