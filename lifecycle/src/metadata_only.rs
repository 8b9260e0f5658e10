//! Images kept without their disk pieces (`keep-blobs = false`): the VM imported
//! from the image holds the data, so the cache keeps only what names and
//! describes the image (manifest, config, domain XML, access JSON). The index
//! entry says so ([`ANNOTATION_BLOBS`]), so prune counts the image as complete
//! and push or copy can say why its pieces are missing.

use std::collections::BTreeSet;
use std::path::Path;

use sarde_api::Digest;
use sarde_api::oci::{Descriptor, media_types};
use sarde_transport_oci_dir::Layout;

use crate::inventory::{ANNOTATION_BLOBS, BLOBS_METADATA_ONLY, image_blobs};
use crate::lease::{Lease, Leases};
use crate::{LifecycleError, Result};

/// Whether a layer is a piece of a disk or NVRAM file (either format).
pub fn is_piece(layer: &Descriptor) -> bool {
    sarde_format::native::piece_kind(&layer.media_type).is_some()
        || layer.media_type.starts_with(media_types::V1_DISK_GZIP)
}

/// Whether an index entry is an image kept without its pieces.
pub fn is_metadata_only(entry: &Descriptor) -> bool {
    entry.annotation(ANNOTATION_BLOBS) == Some(BLOBS_METADATA_ONLY)
}

/// Tags `manifest` (whose bytes are `bytes`) as `reference` (a tag, or its digest
/// for an untagged entry) in `layout` as an image kept without its pieces, then
/// deletes the piece blobs nothing else needs: no other image of the layout that
/// keeps its pieces, and no running command (`lease`, the caller's own, lets go
/// of them first). Returns the bytes deleted.
pub fn keep_metadata_only(
    cache: &Path,
    layout: &Layout,
    bytes: &[u8],
    manifest: &Descriptor,
    reference: &str,
    lease: &Lease,
) -> Result<u64> {
    // A re-pull of an image kept so: nothing to do.
    if layout
        .resolve(reference)
        .is_ok_and(|entry| entry.digest == manifest.digest && is_metadata_only(&entry))
    {
        return Ok(0);
    }
    let stored = layout.put_manifest(bytes, &manifest.media_type)?;
    let mut entry = stored.clone();
    entry.annotations.insert(
        ANNOTATION_BLOBS.to_string(),
        BLOBS_METADATA_ONLY.to_string(),
    );
    if reference.parse::<Digest>().is_ok() {
        layout.add_untagged(&entry)?;
    } else {
        layout.set_tag(reference, &entry)?;
    }
    let parsed: sarde_api::oci::ImageManifest = serde_json::from_slice(bytes).map_err(|e| {
        LifecycleError::io(layout.path(), "reading the manifest")(std::io::Error::other(e))
    })?;
    let pieces: BTreeSet<Digest> = parsed
        .layers
        .iter()
        .filter(|l| is_piece(l))
        .map(|l| l.digest.clone())
        .collect();
    lease.release_blobs(layout, &pieces)?;
    // As a collector: nobody adds or claims a blob of this layout meanwhile.
    let _exclusive = layout.blobs_exclusive()?;
    let leases = Leases::read(cache);
    let mut needed = BTreeSet::new();
    for other in layout.index()?.manifests {
        // Another tag of the same manifest that keeps its pieces needs them.
        if is_metadata_only(&other) {
            continue;
        }
        needed.extend(image_blobs(layout, &other));
    }
    let mut freed = 0;
    for digest in pieces {
        if needed.contains(&digest) || leases.holds_blob(&digest) {
            continue;
        }
        let path = layout.blob_path(&digest);
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            match std::fs::remove_file(&path) {
                Ok(()) => freed += meta.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(LifecycleError::io(&path, "removing a piece blob")(e)),
            }
        }
    }
    Ok(freed)
}
