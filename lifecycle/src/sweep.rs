//! Carries out a [`Plan`]. Per layout, under its blob-set lock held exclusively:
//! the leases are read again, the planned index entries leave the index (one
//! atomic rewrite), then each planned blob is deleted only if no entry of the
//! index as it is now uses it and no live lease protects it. A sweep killed at
//! any point therefore leaves every remaining tag complete, and the next prune
//! finds what it did not finish as plain garbage.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use sarde_api::Digest;
use sarde_transport_oci_dir::Layout;
use serde::Serialize;

use crate::inventory::partial_lock;
use crate::lease::{Leases, remove_dead};
use crate::plan::{Plan, PlannedVm, Reason, protected};
use crate::space::FileFacts;
use crate::usage::image_key;
use crate::{Result, try_lock_existing};

/// What a sweep removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Swept {
    /// Image entries removed (`host/repo:tag` or `host/repo@digest`).
    pub images: Vec<String>,
    pub blobs: usize,
    pub temps: usize,
    pub partials: usize,
    pub staging: usize,
    pub vms: Vec<String>,
    pub bytes_freed: u64,
    /// Planned removals found in use when their turn came, with the reason.
    pub spared: Vec<String>,
}

/// Removes what `plan` names that is still garbage. `remove_vm` removes one VM
/// (checking again that nothing uses it) and says whether it did.
pub fn sweep(
    root: &Path,
    plan: &Plan,
    remove_vm: &mut dyn FnMut(&PlannedVm) -> std::result::Result<bool, String>,
) -> Result<Swept> {
    let mut swept = Swept::default();
    let mut layouts: BTreeSet<&str> = BTreeSet::new();
    layouts.extend(plan.images.iter().map(|i| i.layout.as_str()));
    layouts.extend(plan.blobs.iter().map(|b| b.layout.as_str()));
    layouts.extend(plan.temps.iter().filter_map(|t| t.layout.as_deref()));
    let mut kept = BTreeSet::new();
    for key in layouts {
        sweep_layout(root, key, plan, &mut swept, &mut kept)?;
    }
    for partial in &plan.partials {
        let lock = partial_lock(root, &partial.path);
        // Held while deleting, so a fetch cannot start resuming it meanwhile.
        let _held = match try_lock_existing(&lock) {
            Some(file) => Some(file),
            None if !lock.exists() => None,
            None => {
                swept
                    .spared
                    .push(format!("{}: a fetch resumed it", partial.path.display()));
                continue;
            }
        };
        if fs::remove_file(&partial.path).is_ok() {
            swept.partials += 1;
            swept.bytes_freed += partial.freed;
        }
    }
    for vm in &plan.vms {
        match remove_vm(vm) {
            Ok(true) => {
                swept.vms.push(vm.name.clone());
                swept.bytes_freed += vm.freed;
            }
            Ok(false) => {}
            Err(why) => swept.spared.push(format!("VM {}: {why}", vm.name)),
        }
    }
    for path in &plan.usage_records {
        // A spared image keeps its last use.
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| kept.contains(n))
        {
            continue;
        }
        let _ = fs::remove_file(path);
    }
    for path in &plan.dead_leases {
        remove_dead(path);
    }
    Ok(swept)
}

fn sweep_layout(
    root: &Path,
    key: &str,
    plan: &Plan,
    swept: &mut Swept,
    kept: &mut BTreeSet<String>,
) -> Result<()> {
    let path = root.join(key);
    let layout = match Layout::open(&path) {
        Ok(layout) => layout,
        // Removed by another prune meanwhile.
        Err(sarde_transport_oci_dir::LayoutError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let _guard = layout.blobs_exclusive()?;
    let leases = Leases::read(root);
    let planned: Vec<_> = plan.images.iter().filter(|i| i.layout == key).collect();
    if !planned.is_empty() {
        // Seen again under the lock: an entry planned as broken may have been a
        // tag written between the plan's two reads; it is whole now and stays.
        let fresh = crate::inventory::scan_layout(root, &layout, &leases)?;
        let complete = |entry: &sarde_api::oci::Descriptor| {
            fresh
                .images
                .iter()
                .any(|i| i.same_entry(entry) && i.missing.is_empty())
        };
        let mut removed = Vec::new();
        layout.retain_entries(|entry| {
            let tag = entry.annotation(sarde_api::oci::media_types::ANNOTATION_REF_NAME);
            let chosen = planned
                .iter()
                .find(|p| p.manifest == entry.digest && p.tag.as_deref() == tag);
            match chosen {
                Some(p) if leases.holds_image(key, tag, &entry.digest) => {
                    kept.insert(image_key(key, &p.manifest));
                    swept
                        .spared
                        .push(format!("{}: a running command uses it", p.name));
                    true
                }
                Some(p) if p.reason == Reason::Broken && complete(entry) => {
                    kept.insert(image_key(key, &p.manifest));
                    swept.spared.push(format!(
                        "{}: complete after all (written meanwhile)",
                        p.name
                    ));
                    true
                }
                Some(p) => {
                    removed.push(p.name.clone());
                    false
                }
                None => true,
            }
        })?;
        swept.images.extend(removed);
        // An image's attachments (its signatures) go with its last entry.
        let tag_of = |e: &sarde_api::oci::Descriptor| {
            e.annotation(sarde_api::oci::media_types::ANNOTATION_REF_NAME)
                .and_then(sarde_api::oci::attachment_subject)
        };
        let remaining: BTreeSet<Digest> = layout
            .index()?
            .manifests
            .iter()
            .filter(|e| tag_of(e).is_none())
            .map(|e| e.digest.clone())
            .collect();
        let gone: BTreeSet<&Digest> = planned.iter().map(|p| &p.manifest).collect();
        layout.retain_entries(|entry| {
            !tag_of(entry).is_some_and(|s| gone.contains(&s) && !remaining.contains(&s))
        })?;
    }
    // The index as it is now, and what its entries use.
    let now = crate::inventory::scan_layout(root, &layout, &leases)?;
    let used: BTreeSet<&Digest> = now.images.iter().flat_map(|i| i.blobs.iter()).collect();
    let opaque = now.images.iter().any(|i| i.opaque);
    for blob in plan.blobs.iter().filter(|b| b.layout == key) {
        let Some(stored) = now.blobs.get(&blob.digest) else {
            continue;
        };
        if used.contains(&blob.digest) || opaque {
            swept
                .spared
                .push(format!("{key}: {}: an image uses it again", blob.digest));
            continue;
        }
        if protected(&leases, &now, &blob.digest, &stored.facts) {
            swept
                .spared
                .push(format!("{key}: {}: a running command uses it", blob.digest));
            continue;
        }
        if fs::remove_file(&stored.path).is_ok() {
            swept.blobs += 1;
            swept.bytes_freed += blob.freed;
        }
    }
    if !leases.writes_layout(key) {
        let temps: BTreeMap<_, _> = now
            .temps
            .iter()
            .cloned()
            .collect::<BTreeMap<_, FileFacts>>();
        for temp in plan
            .temps
            .iter()
            .filter(|t| t.layout.as_deref() == Some(key))
        {
            if temps.contains_key(&temp.path) && fs::remove_file(&temp.path).is_ok() {
                swept.temps += 1;
                swept.bytes_freed += temp.freed;
            }
        }
    }
    Ok(())
}
