//! `sarde list` and `sarde getconfig`: what the local cache holds, and which VMs were
//! imported from it (found through the import records, whatever their names).

use std::collections::BTreeMap;

use sarde_api::digest::Digest;
use sarde_api::hypervisor::{DomainState, DomainSummary};
use sarde_transport_oci_dir::Layout;
use serde::Serialize;

use crate::import::load_image;
use crate::marker::Marker;
use crate::{Engine, ImageLocation, Result};

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
    /// `missing` (not defined), `stopped`, `running`, `paused`, `crashed`, `other`.
    pub state: String,
}

/// One tagged image of the cache.
#[derive(Debug, Clone, Serialize)]
pub struct ImageEntry {
    /// `host[:port]/path`.
    pub name: String,
    pub tag: String,
    pub manifest: Digest,
    /// The config digest: the image id.
    pub image_id: Option<Digest>,
    /// Bytes of all blobs (compressed).
    pub size: u64,
    pub vms: Vec<VmState>,
}

impl Engine {
    /// Every tagged image in the cache with the VMs imported from it.
    pub fn list(&self) -> Result<Vec<ImageEntry>> {
        let (vms_by_image, domains) = self.imported_vms()?;
        let mut entries = Vec::new();
        for repo in self.ocidir.repositories()? {
            let layout = match Layout::open(&repo.path) {
                Ok(layout) => layout,
                Err(e) => {
                    tracing::warn!("skipping {}: {e}", repo.path.display());
                    continue;
                }
            };
            let name = format!("{}/{}", repo.location, repo.repository);
            for (tag, descriptor) in layout.tags()? {
                let manifest = layout
                    .read_blob(&descriptor)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<sarde_api::oci::ImageManifest>(&b).ok());
                let image_id = manifest.as_ref().map(|m| m.config.digest.clone());
                let size = manifest
                    .as_ref()
                    .map(|m| m.config.size + m.layers.iter().map(|l| l.size).sum::<u64>())
                    .unwrap_or(0)
                    + descriptor.size;
                let mut vms = image_id
                    .as_ref()
                    .and_then(|id| vms_by_image.get(id).cloned())
                    .unwrap_or_default();
                if vms.is_empty() {
                    if let Some(id) = &image_id {
                        // The default name of an import is the image id.
                        // The default name of an import is the image id; a VM of that
                        // name may exist without a record (the Python tool made it).
                        let name = id.to_string();
                        let state = domains.as_ref().map_or("unknown", |d| state_of(d, &name));
                        vms.push(VmState {
                            name,
                            state: state.into(),
                        });
                    }
                }
                entries.push(ImageEntry {
                    name: name.clone(),
                    tag,
                    manifest: descriptor.digest.clone(),
                    image_id,
                    size,
                    vms,
                });
            }
        }
        entries.sort_by(|a, b| (&a.name, &a.tag).cmp(&(&b.name, &b.tag)));
        Ok(entries)
    }

    /// VMs with an import record in `vmdir`, by image id, with their libvirt state.
    /// Also returns the hypervisor's domains (`None` when it cannot be reached).
    #[allow(clippy::type_complexity)]
    fn imported_vms(&self) -> Result<(BTreeMap<Digest, Vec<VmState>>, Option<Vec<DomainSummary>>)> {
        let mut map: BTreeMap<Digest, Vec<VmState>> = BTreeMap::new();
        let domains = self
            .registry
            .connect(&self.connect)
            .ok()
            .and_then(|h| h.list_domains().ok());
        let Ok(entries) = std::fs::read_dir(&self.vmdir) else {
            return Ok((map, domains));
        };
        for entry in entries.flatten() {
            let Some(marker) = Marker::read(&entry.path()) else {
                continue;
            };
            let state = domains
                .as_ref()
                .map_or("unknown", |d| state_of(d, &marker.vm_name));
            map.entry(marker.config.clone()).or_default().push(VmState {
                name: marker.vm_name.clone(),
                state: state.into(),
            });
        }
        for vms in map.values_mut() {
            vms.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Ok((map, domains))
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
}
