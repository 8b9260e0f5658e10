//! `sarde list`, `sarde inspect` and `sarde getconfig`: what the local cache holds,
//! what it really takes on disk, when each image was last used, and which VMs were
//! imported from it (found through the import records, whatever their names).

use std::collections::{BTreeMap, HashSet};
use std::time::SystemTime;

use sarde_api::digest::Digest;
use sarde_api::hypervisor::{DomainState, DomainSummary};
use sarde_lifecycle::CacheInventory;
use sarde_lifecycle::space::allocated_tree;
use sarde_lifecycle::usage;
use serde::Serialize;

use crate::import::{Content, load_image};
use crate::lifecycle::{clones_of, disk_users};
use crate::{Engine, EngineError, ImageLocation, Result};

/// The state `list` shows for the domain `name`.
fn state_of(domains: &[DomainSummary], name: &str) -> &'static str {
    match domains.iter().find(|d| d.name == name) {
        None => "missing",
        Some(d) => match d.state {
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::Stopped => "stopped",
            DomainState::Crashed => "crashed",
            DomainState::Other => "other",
        },
    }
}

/// A VM made from an image, and its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmState {
    pub name: String,
    /// `missing` (not defined), `stopped`, `running`, `paused`, `crashed`, `other`,
    /// `unknown` (the hypervisor could not be reached).
    pub state: String,
    /// Allocated bytes of its directory.
    pub size: u64,
    /// Seconds since the epoch of its last use.
    pub last_used: u64,
    /// The image it was imported from, as named then.
    pub image: String,
    /// Its image id.
    pub image_id: Digest,
}

/// One entry of a repository's index: a tagged image, or a manifest kept by digest.
#[derive(Debug, Clone, Serialize)]
pub struct ImageEntry {
    /// `host[:port]/path`.
    pub name: String,
    /// `None` for an image kept by digest.
    pub tag: Option<String>,
    pub manifest: Digest,
    /// The config digest: the image id.
    pub image_id: Option<Digest>,
    /// Allocated bytes of its blobs (each stored file once).
    pub size: u64,
    /// Bytes of its blobs as the manifest gives them (what a transfer moves).
    pub stored: u64,
    /// Seconds since the epoch of its last use (pull, fetch, import, export).
    pub last_used: u64,
    /// A blob it needs is missing (`sarde prune` removes it).
    pub broken: bool,
    pub vms: Vec<VmState>,
}

/// The cache, the VMs imported from it, and what they take.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub images: Vec<ImageEntry>,
    /// Every VM sarde imported.
    pub vms: Vec<VmState>,
    /// Allocated bytes of the cache (blobs shared by several images once,
    /// temporary files and partial downloads included).
    pub cache_bytes: u64,
    /// Allocated bytes of the imported VMs' directories.
    pub vm_bytes: u64,
}

impl Engine {
    /// Every image in the cache with the VMs imported from it, and the totals.
    pub fn list(&self) -> Result<Listing> {
        let inventory = CacheInventory::scan(self.ocidir.root())?;
        let domains = self.domains();
        let vms = self.imported_vm_states(domains.as_deref());
        let mut by_id: BTreeMap<&Digest, Vec<VmState>> = BTreeMap::new();
        for vm in &vms {
            by_id.entry(&vm.image_id).or_default().push(vm.clone());
        }
        // VMs the Python tool imported carry no record; its default name is the
        // image id, so a domain of that name is the image's VM.
        let domains = domains.unwrap_or_default();
        let mut images = Vec::new();
        for image in inventory.images() {
            let layout = inventory.layouts.iter().find(|l| l.key == image.layout);
            let stored = image
                .blobs
                .iter()
                .filter_map(|d| layout.and_then(|l| l.blobs.get(d)))
                .map(|b| b.facts.len)
                .sum();
            images.push(ImageEntry {
                name: image.layout.clone(),
                tag: image.tag.clone(),
                manifest: image.manifest.digest.clone(),
                image_id: image.config.clone(),
                size: inventory.image_allocated(image),
                stored,
                last_used: epoch_seconds(image.last_used),
                broken: !image.missing.is_empty(),
                vms: image
                    .config
                    .as_ref()
                    .and_then(|id| by_id.get(id).cloned())
                    .or_else(|| {
                        let id = image.config.as_ref()?;
                        let name = id.to_string();
                        domains.iter().any(|d| d.name == name).then(|| {
                            vec![VmState {
                                state: state_of(&domains, &name).into(),
                                name,
                                size: 0,
                                last_used: 0,
                                image: image.name(),
                                image_id: id.clone(),
                            }]
                        })
                    })
                    .unwrap_or_default(),
            });
        }
        images.sort_by(|a, b| (&a.name, &a.tag).cmp(&(&b.name, &b.tag)));
        Ok(Listing {
            images,
            cache_bytes: inventory.allocated(),
            vm_bytes: vms.iter().map(|v| v.size).sum(),
            vms,
        })
    }

    /// VMs with an import record in `vmdir`, with their libvirt state (`unknown`
    /// when the hypervisor cannot be reached).
    fn imported_vm_states(&self, domains: Option<&[DomainSummary]>) -> Vec<VmState> {
        self.imported_vm_dirs()
            .into_iter()
            .map(|(dir, marker)| VmState {
                size: allocated_tree(&dir, &mut HashSet::new()),
                last_used: usage::vm_last_use(&dir).map_or(0, epoch_seconds),
                state: domains
                    .map_or("unknown", |d| state_of(d, &marker.vm_name))
                    .into(),
                name: marker.vm_name,
                image: marker.image,
                image_id: marker.config,
            })
            .collect()
    }

    /// The hypervisor's domains; `None` when it cannot be reached.
    fn domains(&self) -> Option<Vec<DomainSummary>> {
        self.registry
            .connect(&self.connect)
            .ok()
            .and_then(|h| h.list_domains().ok())
    }

    /// The access JSON of an image, or `None` when it has none. A missing image or
    /// tag is an error.
    pub fn getconfig(&self, image: &ImageLocation) -> Result<Option<Vec<u8>>> {
        let layout = self.layout(image)?;
        let loaded = load_image(&layout, image)?;
        match loaded.content.vm_config() {
            Some(descriptor) => Ok(Some(layout.read_blob(descriptor)?)),
            None => Ok(None),
        }
    }

    /// `sarde inspect`: one image's files, pieces and metadata, and the VMs and
    /// clones that use it.
    pub fn inspect(&self, image: &ImageLocation) -> Result<Inspection> {
        let layout = self.layout(image)?;
        let loaded = load_image(&layout, image)?;
        let manifest_bytes = layout.read_blob(&loaded.manifest_descriptor)?;
        let manifest: sarde_api::oci::ImageManifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| EngineError::Refused(format!("{}: manifest: {e}", image.name)))?;
        let config: serde_json::Value = layout
            .read_blob(&manifest.config)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null);
        let files = match &loaded.content {
            Content::Native(native) => native
                .files
                .iter()
                .map(|f| {
                    let codecs: std::collections::BTreeSet<String> = f
                        .pieces
                        .iter()
                        .map(|p| p.suffix.clone().unwrap_or_else(|| "raw".into()))
                        .map(|s| s.trim_start_matches('+').to_string())
                        .collect();
                    FileInfo {
                        name: f.spec.name.clone(),
                        role: format!("{:?}", f.spec.role).to_lowercase(),
                        format: f.spec.format.clone(),
                        backing: f.spec.backing.clone(),
                        virtual_size: Some(f.spec.size),
                        data_size: Some(f.pieces.iter().map(|p| p.size).sum()),
                        stored_size: f.pieces.iter().map(|p| p.blob_size).sum(),
                        pieces: f.pieces.len(),
                        codec: codecs.into_iter().collect::<Vec<_>>().join(","),
                    }
                })
                .collect(),
            Content::V1(v1) => v1
                .files
                .iter()
                .enumerate()
                .map(|(i, f)| FileInfo {
                    name: f
                        .pieces
                        .first()
                        .and_then(|p| p.annotation(sarde_api::oci::media_types::ANNOTATION_TITLE))
                        .map_or_else(|| format!("file {}", i + 1), str::to_string),
                    role: "disk".into(),
                    format: "qcow2".into(),
                    backing: None,
                    virtual_size: None,
                    data_size: None,
                    stored_size: f.compressed_size(),
                    pieces: f.pieces.len(),
                    codec: "gzip".into(),
                })
                .collect(),
        };
        let vms: Vec<VmState> = self
            .imported_vm_states(self.domains().as_deref())
            .into_iter()
            .filter(|v| v.image_id == loaded.config_digest)
            .collect();
        let mut clones = Vec::new();
        if let (false, Ok(hv)) = (vms.is_empty(), self.registry.connect(&self.connect)) {
            let domains = hv.list_domains().unwrap_or_default();
            let users = disk_users(hv.as_ref(), &domains);
            for vm in &vms {
                let of_vm = clones_of(&users, &vm.name, &self.vmdir.join(&vm.name));
                clones.extend(of_vm.into_iter().map(|name| CloneInfo {
                    name,
                    source: vm.name.clone(),
                }));
            }
        }
        Ok(Inspection {
            image: image.name.clone(),
            manifest: loaded.manifest_descriptor.digest.clone(),
            image_id: loaded.config_digest.clone(),
            format: match loaded.content {
                Content::Native(_) => "native",
                Content::V1(_) => "v1",
            }
            .into(),
            created: config
                .get("created")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            architecture: config
                .get("architecture")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            os: config
                .get("os")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            annotations: manifest.annotations.clone(),
            files,
            vms,
            clones,
        })
    }
}

/// What `sarde inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub image: String,
    pub manifest: Digest,
    pub image_id: Digest,
    /// `native` or `v1`.
    pub format: String,
    pub created: Option<String>,
    pub architecture: Option<String>,
    pub os: Option<String>,
    pub annotations: BTreeMap<String, String>,
    pub files: Vec<FileInfo>,
    pub vms: Vec<VmState>,
    pub clones: Vec<CloneInfo>,
}

/// One file of an image.
#[derive(Debug, Clone, Serialize)]
pub struct FileInfo {
    pub name: String,
    /// `disk` or `nvram`.
    pub role: String,
    pub format: String,
    /// The file it is an overlay on, by name within the image.
    pub backing: Option<String>,
    /// The size of the file (its virtual size for raw, its length for qcow2);
    /// unknown for v1 images.
    pub virtual_size: Option<u64>,
    /// Bytes of its stored pieces once decompressed (zero pieces are not stored).
    pub data_size: Option<u64>,
    /// Compressed bytes in the image.
    pub stored_size: u64,
    pub pieces: usize,
    pub codec: String,
}

/// A clone whose disks are overlays on a VM of the image.
#[derive(Debug, Clone, Serialize)]
pub struct CloneInfo {
    pub name: String,
    pub source: String,
}

fn epoch_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
