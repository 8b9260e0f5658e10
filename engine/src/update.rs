//! Update import: a new version of an image whose previous version is imported on
//! this host takes every unchanged piece from the previous VM's files (shared
//! blocks on XFS and btrfs, a direct copy elsewhere: [`sarde_disk::copy_range`])
//! instead of decompressing and writing it, so a 1% update costs about a copy of
//! the files plus the changed pieces.
//!
//! A piece is taken only where the previous import record says the file holds
//! the same bytes at the same offset, and only while that still holds: the record
//! is trusted where the file's identity stamp is the one recorded after its import
//! (an untouched file) and the import hashed those bytes itself; otherwise the
//! bytes are hashed as they are copied (a record's digest may be only what an
//! image claimed, and another image's VM must not inherit bytes on that word).
//! A file that changes while it is copied from has its unhashed copies hashed
//! afterwards. A piece that does not match is written from its blob.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use sarde_api::digest::Digest;
use sarde_format::native::{NativeFile, Piece};

use crate::import::NameLock;
use crate::marker::{FileStamp, Marker};
use crate::{Engine, Result};

/// A file of an earlier import that pieces may be copied from.
pub(crate) struct PreviousFile {
    pub path: PathBuf,
    pub file: File,
    /// The ranges that hold these bytes: (offset, size) → digest, and whether
    /// that is known (not to be hashed again).
    ranges: HashMap<(u64, u64), (Digest, bool)>,
    /// The file's stamp when the ranges were checked.
    stamp: Option<FileStamp>,
}

impl PreviousFile {
    /// Whether `piece` can be copied from this file.
    pub fn holds(&self, piece: &Piece) -> bool {
        self.ranges
            .get(&(piece.offset, piece.size))
            .is_some_and(|(digest, _)| *digest == piece.digest)
    }

    /// Whether the bytes must be hashed as they are copied.
    pub fn needs_hash(&self, piece: &Piece) -> bool {
        self.ranges
            .get(&(piece.offset, piece.size))
            .is_none_or(|(_, known)| !known)
    }

    /// Whether the file is still as it was checked; when not, copies made from it
    /// must be hashed.
    pub fn unchanged_since_check(&self) -> bool {
        self.stamp.is_some() && FileStamp::of(&self.path).ok() == self.stamp
    }
}

/// The earlier imports pieces are copied from, with the locks that keep them
/// from being removed meanwhile.
#[derive(Default)]
pub(crate) struct PreviousVersions {
    /// Per file of the new image (same order), where its pieces may come from.
    pub files: Vec<Option<PreviousFile>>,
    /// The VMs used.
    pub vms: Vec<String>,
    _locks: Vec<NameLock>,
}

/// `registry/repo:tag` or `…@digest` → `registry/repo`.
fn repository_of(image: &str) -> &str {
    let name = image.split_once('@').map_or(image, |(name, _)| name);
    match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => &name[..i],
        _ => name,
    }
}

impl Engine {
    /// The earlier imports of `image`'s repository on this host (the VM named
    /// `name` first: the one an update replaces), matched file by file with the
    /// new image's `files`. The caller holds the name lock of `name`.
    pub(crate) fn previous_versions(
        &self,
        image: &str,
        name: &str,
        files: &[NativeFile],
    ) -> Result<PreviousVersions> {
        let repository = repository_of(image);
        let mut candidates: Vec<(PathBuf, Marker)> = self
            .imported_vm_dirs()
            .into_iter()
            .filter(|(_, m)| m.vm_name == name || repository_of(&m.image) == repository)
            .collect();
        candidates.sort_by_key(|(_, m)| m.vm_name != name);
        let mut previous = PreviousVersions::default();
        previous.files.resize_with(files.len(), || None);
        for (dir, marker) in &candidates {
            if previous.files.iter().all(Option::is_some) {
                break;
            }
            // Shared, as a clone takes it: the VM is not removed meanwhile. The VM
            // an update replaces is under the caller's exclusive lock already.
            let lock = if marker.vm_name == name {
                None
            } else {
                match NameLock::try_shared(&self.vmdir, &marker.vm_name) {
                    Some(lock) => Some(lock),
                    None => continue,
                }
            };
            let mut used = false;
            for (index, file) in files.iter().enumerate() {
                if previous.files[index].is_some() {
                    continue;
                }
                let Some(record) = marker.files.iter().find(|r| r.name == file.spec.name) else {
                    continue;
                };
                if let Some(found) = self.previous_file(dir, record, file)? {
                    used = true;
                    previous.files[index] = Some(found);
                }
            }
            if used {
                previous.vms.push(marker.vm_name.clone());
                previous._locks.extend(lock);
            }
        }
        Ok(previous)
    }

    /// The piece blobs of `manifest` an import under `name` would copy from
    /// earlier imports of `image`'s repository: what a pull that keeps no
    /// blobs need not fetch.
    pub(crate) fn pieces_held_on_host(
        &self,
        image: &str,
        name: &str,
        manifest: &[u8],
    ) -> Result<std::collections::BTreeSet<Digest>> {
        let Ok(parsed) = serde_json::from_slice::<sarde_api::oci::ImageManifest>(manifest) else {
            return Ok(Default::default());
        };
        let Ok(native) = sarde_format::native::parse(&parsed) else {
            return Ok(Default::default());
        };
        let previous = self.previous_versions(image, name, &native.files)?;
        // A blob is withheld only when every piece made of it is held.
        let mut held = std::collections::BTreeSet::new();
        let mut needed = std::collections::BTreeSet::new();
        for (file, from) in native.files.iter().zip(&previous.files) {
            for piece in &file.pieces {
                if from.as_ref().is_some_and(|f| f.holds(piece)) {
                    held.insert(piece.blob.clone());
                } else {
                    needed.insert(piece.blob.clone());
                }
            }
        }
        Ok(held.difference(&needed).cloned().collect())
    }

    /// The ranges of an earlier import's file that hold pieces of `file`,
    /// trusted or hashed; `None` when there are none.
    fn previous_file(
        &self,
        dir: &Path,
        record: &crate::marker::FileRecord,
        file: &NativeFile,
    ) -> Result<Option<PreviousFile>> {
        let path = dir.join(&record.name);
        let Ok(handle) = File::open(&path) else {
            return Ok(None);
        };
        let stamp = FileStamp::of(&path).ok();
        let recorded: HashMap<(u64, u64), &crate::marker::Region> = record
            .regions
            .iter()
            .map(|r| ((r.offset, r.size), r))
            .collect();
        let untouched = stamp.is_some() && record.stamp == stamp;
        let size = stamp.as_ref().map_or(0, |s| s.size);
        let ranges: HashMap<(u64, u64), (Digest, bool)> = file
            .pieces
            .iter()
            .filter(|p| p.offset + p.size <= size)
            .filter_map(|p| {
                let region = recorded.get(&(p.offset, p.size))?;
                (region.digest == p.digest).then(|| {
                    (
                        (p.offset, p.size),
                        (p.digest.clone(), untouched && region.verified),
                    )
                })
            })
            .collect();
        if ranges.is_empty() {
            return Ok(None);
        }
        if !untouched {
            tracing::info!(
                "{}: changed since its import; the pieces it may share with the update are hashed as they are copied",
                path.display()
            );
        }
        Ok(Some(PreviousFile {
            path,
            file: handle,
            ranges,
            stamp,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::repository_of;

    #[test]
    fn repositories_of_image_names() {
        assert_eq!(
            repository_of("127.0.0.1:5000/bench/vm:latest"),
            "127.0.0.1:5000/bench/vm"
        );
        assert_eq!(
            repository_of("127.0.0.1:5000/bench/vm"),
            "127.0.0.1:5000/bench/vm"
        );
        assert_eq!(repository_of("debian:12"), "debian");
        assert_eq!(
            repository_of("registry.example/x/y@sha256:0123"),
            "registry.example/x/y"
        );
        assert_eq!(
            repository_of("localhost:5000/x:v1@sha256:0123"),
            "localhost:5000/x"
        );
    }
}
