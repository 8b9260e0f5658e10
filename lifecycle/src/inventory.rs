//! One scan of the cache: every layout's images and the blobs each needs, every
//! stored blob with its real size, the garbage (temporary files, partial
//! downloads, records of gone images) and the live leases.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sarde_api::Digest;
use sarde_api::oci::{Descriptor, media_types};
use sarde_transport_oci_dir::{Layout, MAX_IN_MEMORY_BLOB, OciDir};

use crate::lease::Leases;
use crate::space::FileFacts;
use crate::usage::{image_key, modified, usage_dir};
use crate::{Result, layout_key, state_dir, try_lock_existing};

pub use sarde_transport_oci_dir::{ANNOTATION_BLOBS, BLOBS_METADATA_ONLY};

/// Deepest index nesting followed (an index of indexes of manifests).
const MAX_NESTING: usize = 4;

/// The whole cache as one scan saw it.
#[derive(Debug, Clone)]
pub struct CacheInventory {
    pub root: PathBuf,
    pub layouts: Vec<LayoutInventory>,
    pub partials: Vec<PartialDownload>,
    /// Usage records by key: their time and file.
    pub usage: BTreeMap<String, (SystemTime, PathBuf)>,
    pub leases: Leases,
}

/// One repository of the cache.
#[derive(Debug, Clone)]
pub struct LayoutInventory {
    /// `host[:port]/repo`, relative to the cache root.
    pub key: String,
    pub path: PathBuf,
    pub images: Vec<CachedImage>,
    /// Every stored blob file.
    pub blobs: BTreeMap<Digest, BlobFile>,
    /// `.tmp-*` files of writers (blobs being written, index rewrites).
    pub temps: Vec<(PathBuf, FileFacts)>,
}

/// One index entry: a tagged image, or an untagged manifest (pushed or pulled by
/// digest).
#[derive(Debug, Clone)]
pub struct CachedImage {
    pub layout: String,
    pub tag: Option<String>,
    pub manifest: Descriptor,
    /// The config digest of an image manifest: the image id.
    pub config: Option<Digest>,
    /// Every blob the entry uses in its layout, the manifest itself included.
    pub blobs: BTreeSet<Digest>,
    /// Blobs it needs that are missing or of the wrong size: the entry is broken.
    pub missing: Vec<Digest>,
    pub last_used: SystemTime,
    /// A live lease names it.
    pub leased: bool,
    /// One of its manifests could not be read or parsed: what it names is
    /// unknown, so nothing unreferenced in its repository is collected.
    pub opaque: bool,
    /// Entries that belong to this image (its signatures under cosign's
    /// `sha256-<hex>.sig` tag): not images of their own; kept, counted and
    /// removed with it.
    pub attachments: Vec<String>,
    /// An attachment whose image this layout no longer holds (its tag moved
    /// on): garbage once it is older than `prune-min-age`.
    pub orphaned: bool,
}

impl CachedImage {
    /// `host/repo:tag` or `host/repo@sha256:…`.
    pub fn name(&self) -> String {
        match &self.tag {
            Some(tag) => format!("{}:{tag}", self.layout),
            None => format!("{}@{}", self.layout, self.manifest.digest),
        }
    }

    /// Whether the entry is this one: same layout, tag and manifest.
    pub fn same_entry(&self, d: &Descriptor) -> bool {
        d.digest == self.manifest.digest
            && d.annotation(media_types::ANNOTATION_REF_NAME) == self.tag.as_deref()
    }
}

/// One stored blob.
#[derive(Debug, Clone)]
pub struct BlobFile {
    pub path: PathBuf,
    pub facts: FileFacts,
}

/// A download left in `<cache>/.sarde/partial/`.
#[derive(Debug, Clone)]
pub struct PartialDownload {
    pub path: PathBuf,
    pub facts: FileFacts,
    /// A running fetch holds its blob lock.
    pub held: bool,
}

impl CacheInventory {
    /// Scans the cache at `root` (an empty inventory when it does not exist).
    pub fn scan(root: &Path) -> Result<CacheInventory> {
        let leases = Leases::read(root);
        let mut layouts = Vec::new();
        for repo in OciDir::new(root).repositories()? {
            let layout = match Layout::open(&repo.path) {
                Ok(layout) => layout,
                Err(e) => {
                    tracing::warn!("skipping {}: {e}", repo.path.display());
                    continue;
                }
            };
            // A damaged layout is skipped, not a reason to stop: prune and the
            // automatic reclaim still serve the rest of the cache.
            match scan_layout(root, &layout, &leases) {
                Ok(scanned) => layouts.push(scanned),
                Err(e) => tracing::warn!("skipping {}: {e}", repo.path.display()),
            }
        }
        Ok(CacheInventory {
            root: root.to_path_buf(),
            layouts,
            partials: scan_partials(root),
            usage: scan_usage(root),
            leases,
        })
    }

    pub fn images(&self) -> impl Iterator<Item = &CachedImage> {
        self.layouts.iter().flat_map(|l| l.images.iter())
    }

    /// Allocated bytes of everything in the cache that prune can free: blobs,
    /// temporary files and partial downloads, each inode once.
    pub fn allocated(&self) -> u64 {
        let mut seen = HashSet::new();
        let mut total = 0;
        let files = self
            .layouts
            .iter()
            .flat_map(|l| {
                l.blobs
                    .values()
                    .map(|b| &b.facts)
                    .chain(l.temps.iter().map(|(_, f)| f))
            })
            .chain(self.partials.iter().map(|p| &p.facts));
        for facts in files {
            if seen.insert(facts.id) {
                total += facts.allocated;
            }
        }
        total
    }

    /// Allocated bytes of an image's blobs, each inode once.
    pub fn image_allocated(&self, image: &CachedImage) -> u64 {
        let Some(layout) = self.layouts.iter().find(|l| l.key == image.layout) else {
            return 0;
        };
        let mut seen = HashSet::new();
        image
            .blobs
            .iter()
            .filter_map(|d| layout.blobs.get(d))
            .filter(|b| seen.insert(b.facts.id))
            .map(|b| b.facts.allocated)
            .sum()
    }
}

pub(crate) fn scan_layout(
    root: &Path,
    layout: &Layout,
    leases: &Leases,
) -> Result<LayoutInventory> {
    let key = layout_key(root, layout.path());
    // The index before the blobs: writers store blobs before the tags that name
    // them, so a tag read first finds its blobs listed, never looks broken.
    let index = layout.index()?;
    let mut blobs = BTreeMap::new();
    let mut temps = Vec::new();
    collect_temps(layout.path(), &mut temps);
    let blob_root = layout.path().join("blobs");
    for algo_dir in fs::read_dir(&blob_root).into_iter().flatten().flatten() {
        let Ok(algorithm) = algo_dir.file_name().into_string() else {
            continue;
        };
        collect_temps(&algo_dir.path(), &mut temps);
        for entry in fs::read_dir(algo_dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let Ok(digest) = format!("{algorithm}:{name}").parse::<Digest>() else {
                continue;
            };
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_file() {
                blobs.insert(
                    digest,
                    BlobFile {
                        path: entry.path(),
                        facts: FileFacts::from_metadata(&meta),
                    },
                );
            }
        }
    }
    let usage_dir = usage_dir(root);
    let mut images = Vec::new();
    for entry in index.manifests {
        let tag = entry
            .annotation(media_types::ANNOTATION_REF_NAME)
            .map(str::to_string);
        let metadata_only = crate::metadata_only::is_metadata_only(&entry);
        let mut image = CachedImage {
            layout: key.clone(),
            leased: leases.holds_image(&key, tag.as_deref(), &entry.digest),
            last_used: SystemTime::UNIX_EPOCH,
            tag,
            manifest: entry.clone(),
            config: None,
            blobs: BTreeSet::new(),
            missing: Vec::new(),
            opaque: false,
            attachments: Vec::new(),
            orphaned: false,
        };
        walk(layout, &blobs, &entry, 0, metadata_only, &mut image);
        image.last_used = modified(&usage_dir.join(image_key(&key, &entry.digest)))
            .or_else(|| blobs.get(&entry.digest).map(|b| b.facts.modified))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        images.push(image);
    }
    fold_attachments(&mut images);
    Ok(LayoutInventory {
        key,
        path: layout.path().to_path_buf(),
        images,
        blobs,
        temps,
    })
}

/// Folds each attachment entry (a signature's tag) into the images it belongs
/// to, when the layout holds them: its blobs count as theirs, and it is not
/// listed on its own. An attachment whose image is not here stays an entry.
fn fold_attachments(images: &mut Vec<CachedImage>) {
    let mut kept = Vec::with_capacity(images.len());
    let mut attachments = Vec::new();
    for image in images.drain(..) {
        match image
            .tag
            .as_deref()
            .and_then(sarde_api::oci::attachment_subject)
        {
            Some(subject) => attachments.push((subject, image)),
            None => kept.push(image),
        }
    }
    for (subject, attachment) in attachments {
        // A broken or unreadable attachment stays an entry of its own (prune
        // removes it as broken), never making its image look broken.
        if !attachment.missing.is_empty() || attachment.opaque {
            kept.push(attachment);
            continue;
        }
        let mut owners = kept
            .iter_mut()
            .filter(|i| i.manifest.digest == subject)
            .peekable();
        if owners.peek().is_none() {
            kept.push(CachedImage {
                orphaned: true,
                ..attachment
            });
            continue;
        }
        for owner in owners {
            owner.blobs.extend(attachment.blobs.iter().cloned());
            owner.leased |= attachment.leased;
            if let Some(tag) = &attachment.tag {
                owner.attachments.push(tag.clone());
            }
        }
    }
    *images = kept;
}

/// Adds `descriptor` and everything it references to `image`, noting what is
/// missing.
fn walk(
    layout: &Layout,
    stored: &BTreeMap<Digest, BlobFile>,
    descriptor: &Descriptor,
    depth: usize,
    metadata_only: bool,
    image: &mut CachedImage,
) {
    if !image.blobs.insert(descriptor.digest.clone()) {
        return;
    }
    let present = stored
        .get(&descriptor.digest)
        .is_some_and(|b| b.facts.len == descriptor.size);
    if !present {
        image.missing.push(descriptor.digest.clone());
        return;
    }
    if !worth_reading(descriptor, depth) {
        return;
    }
    // A manifest that cannot be read or understood names blobs nobody can tell:
    // its repository's unreferenced blobs are then left alone.
    let Some(named) = layout
        .read_blob(descriptor)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Named>(&bytes).ok())
    else {
        image.opaque = true;
        return;
    };
    if let Some(config) = named.config {
        if depth == 0 {
            image.config = Some(config.digest.clone());
        }
        walk(layout, stored, &config, depth + 1, metadata_only, image);
    }
    for layer in named.layers {
        if metadata_only && crate::metadata_only::is_piece(&layer) {
            // Counted as the image's when present; not needed when gone.
            image.blobs.insert(layer.digest.clone());
            continue;
        }
        walk(layout, stored, &layer, depth + 1, metadata_only, image);
    }
    for child in named.manifests {
        walk(layout, stored, &child, depth + 1, metadata_only, image);
    }
}

/// What a manifest or an index names (other fields are not needed here).
#[derive(serde::Deserialize)]
struct Named {
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// Whether a blob at this depth below an index entry is a manifest to read: an
/// index entry is one whatever its media type says (importers parse it anyway);
/// below it, the media types tell. Nesting and size are bounded.
fn worth_reading(descriptor: &Descriptor, depth: usize) -> bool {
    let essence = descriptor.media_type.split(';').next().unwrap_or_default();
    let is_manifest = depth == 0
        || matches!(
            essence.trim(),
            media_types::IMAGE_MANIFEST
                | media_types::IMAGE_INDEX
                | media_types::DOCKER_MANIFEST
                | media_types::DOCKER_MANIFEST_LIST
        );
    is_manifest && depth <= MAX_NESTING && descriptor.size <= MAX_IN_MEMORY_BLOB
}

/// Every blob an image names — the manifest, its config and layers, child
/// manifests of an index and theirs — as far as they can be read from `layout`.
pub fn image_blobs(layout: &Layout, manifest: &Descriptor) -> BTreeSet<Digest> {
    let mut out = BTreeSet::new();
    let mut pending = vec![(manifest.clone(), 0usize)];
    while let Some((descriptor, depth)) = pending.pop() {
        if !out.insert(descriptor.digest.clone()) {
            continue;
        }
        if !worth_reading(&descriptor, depth) {
            continue;
        }
        let Ok(bytes) = layout.read_blob(&descriptor) else {
            continue;
        };
        let Ok(named) = serde_json::from_slice::<Named>(&bytes) else {
            continue;
        };
        let children = named
            .config
            .into_iter()
            .chain(named.layers)
            .chain(named.manifests);
        pending.extend(children.map(|child| (child, depth + 1)));
    }
    out
}

fn collect_temps(dir: &Path, out: &mut Vec<(PathBuf, FileFacts)>) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let is_temp = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(".tmp-"));
        if !is_temp {
            continue;
        }
        if let Ok(facts) = FileFacts::of(&entry.path()) {
            out.push((entry.path(), facts));
        }
    }
}

fn scan_partials(root: &Path) -> Vec<PartialDownload> {
    let state = state_dir(root);
    let mut out = Vec::new();
    for entry in fs::read_dir(state.join("partial"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(facts) = FileFacts::of(&entry.path()) else {
            continue;
        };
        out.push(PartialDownload {
            held: partial_is_held(root, &entry.path()),
            path: entry.path(),
            facts,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// The blob lock of a partial download (same file name under `locks/`).
pub(crate) fn partial_lock(root: &Path, partial: &Path) -> PathBuf {
    state_dir(root)
        .join("locks")
        .join(partial.file_name().unwrap_or_default())
}

fn partial_is_held(root: &Path, partial: &Path) -> bool {
    let lock = partial_lock(root, partial);
    lock.exists() && try_lock_existing(&lock).is_none()
}

fn scan_usage(root: &Path) -> BTreeMap<String, (SystemTime, PathBuf)> {
    fs::read_dir(usage_dir(root))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let time = e.metadata().ok()?.modified().ok()?;
            Some((name, (time, e.path())))
        })
        .collect()
}
