//! `sarde rm`, `sarde prune` and the automatic reclaim before a pull: the cache
//! through `sarde-lifecycle`, the VMs sarde imported through the hypervisor.
//!
//! A VM is removed only when sarde imported it (an import record in its
//! directory), it does not run, no other domain's disks have one of its files in
//! their backing chain (a clone), and nobody holds its name lock (an import or a
//! clone of it is under way).

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sarde_api::Hypervisor;
use sarde_api::hypervisor::DomainState;
use sarde_lifecycle::plan::{PlannedFile, PlannedVm, Reason};
use sarde_lifecycle::space::{allocated_tree, device_of, free_space, human_bytes};
use sarde_lifecycle::{CacheInventory, Lease, Plan, Policy, Swept, VmItem, layout_key, usage};
use sarde_transport_oci_dir::Layout;
use serde::Serialize;

use crate::import::{ImportRequest, NameLock};
use crate::marker::Marker;
use crate::{Engine, EngineError, ImageLocation, Result};
use sarde_api::oci::ImageManifest;

/// Room kept free beyond what an image needs (file system metadata, logs).
const HEADROOM: u64 = 64 << 20;

/// How sarde keeps the host from filling up.
#[derive(Debug, Clone)]
pub struct LifecycleSettings {
    /// Bytes the cache and the imported VMs may take together.
    pub space_budget: Option<u64>,
    /// Reclaim space before fetch, pull and import when they need it.
    pub auto_prune: bool,
    /// Nothing used more recently is removed automatically or to meet a budget,
    /// and partial downloads are kept this long for a later run to resume.
    pub prune_min_age: Duration,
    /// A pull keeps the image's disk pieces in the cache (to push, copy or
    /// import it again). Without them the cache holds only the image's
    /// metadata: the imported VM holds the data.
    pub keep_blobs: bool,
}

impl Default for LifecycleSettings {
    fn default() -> Self {
        LifecycleSettings {
            space_budget: None,
            auto_prune: true,
            prune_min_age: Duration::from_secs(3600),
            keep_blobs: true,
        }
    }
}

/// What `sarde prune` should remove besides garbage.
#[derive(Debug, Clone, Default)]
pub struct PruneRequest {
    pub older_than: Option<Duration>,
    pub space_budget: Option<u64>,
    pub include_vms: bool,
    pub dry_run: bool,
}

/// What a prune planned and, unless it was a dry run, did.
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub plan: Plan,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swept: Option<Swept>,
}

/// Bytes an operation is about to write.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpaceNeed {
    /// Into the cache (blobs not there yet).
    pub cache: u64,
    /// Into the VM directory (the disks' data).
    pub vms: u64,
}

impl Engine {
    /// Takes a lease on an image of the cache: it is not collected while the
    /// returned lease lives. `None` for layouts outside the cache (`--raw`), which
    /// prune never touches. `writes`: the command adds blobs to the layout.
    pub fn lease_image(
        &self,
        command: &str,
        image: &ImageLocation,
        writes: bool,
    ) -> Result<Option<Lease>> {
        if !image.layout.starts_with(self.ocidir.root()) {
            return Ok(None);
        }
        let taken = (|| {
            let layout = if writes {
                Layout::create(&image.layout)?
            } else {
                match Layout::open(&image.layout) {
                    Ok(layout) => layout,
                    // Nothing there to protect; the command reports the missing image.
                    Err(_) => return Ok(None),
                }
            };
            let lease = Lease::take(self.ocidir.root(), command)?;
            if writes {
                lease.protect_layout(&layout)?;
            }
            lease.protect_image(&layout, &image.reference)?;
            // The blobs of the manifest the tag names now, by digest: they stay
            // even if the tag moves on while the command still reads them.
            if let Ok(manifest) = layout.resolve(&image.reference) {
                let blobs = sarde_lifecycle::inventory::image_blobs(&layout, &manifest);
                lease.protect_blobs(&layout, &blobs)?;
            }
            Ok::<_, sarde_lifecycle::LifecycleError>(Some(lease))
        })();
        match taken {
            Ok(lease) => Ok(lease),
            // A cache this user may only read: it cannot prune it from here either,
            // and reading without a lease is the best that can be done.
            Err(e) if !writes && is_permission_error(&e) => {
                tracing::warn!(
                    "{}: no lease on the cache ({e}); a prune by another user could remove the image meanwhile",
                    image.name
                );
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Records that an image of the cache was used now (best effort).
    pub fn record_image_use(&self, image: &ImageLocation, manifest: &sarde_api::Digest) {
        if !image.layout.starts_with(self.ocidir.root()) {
            return;
        }
        let key = layout_key(self.ocidir.root(), &image.layout);
        if let Err(e) = usage::record_image_use(self.ocidir.root(), &key, manifest) {
            tracing::warn!("recording the use of {}: {e}", image.name);
        }
    }

    /// Records that the imported VM `name` was used now (best effort; nothing for
    /// VMs sarde did not import).
    pub fn record_vm_use(&self, name: &str) {
        let dir = self.vmdir.join(name);
        if Marker::read(&dir).is_some() {
            if let Err(e) = usage::record_vm_use(&dir) {
                tracing::warn!("recording the use of VM {name}: {e}");
            }
        }
    }

    /// The directories of the VMs sarde imported (defined, named after their VM)
    /// with their import records, in name order.
    pub(crate) fn imported_vm_dirs(&self) -> Vec<(PathBuf, Marker)> {
        let Ok(entries) = fs::read_dir(&self.vmdir) else {
            return Vec::new();
        };
        let mut out: Vec<(PathBuf, Marker)> = entries
            .flatten()
            .filter_map(|e| Some((e.path(), Marker::read(&e.path())?)))
            .filter(|(dir, marker)| {
                marker.defined && dir.file_name().and_then(|n| n.to_str()) == Some(&marker.vm_name)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The VMs sarde imported, with their size, last use and whatever keeps them.
    pub fn vm_items(&self, hv: &dyn Hypervisor) -> Result<Vec<VmItem>> {
        let domains = hv.list_domains()?;
        let mut users: Option<Vec<(String, Vec<PathBuf>)>> = None;
        let mut out = Vec::new();
        for (dir, marker) in self.imported_vm_dirs() {
            let name = marker.vm_name.clone();
            let state = domains.iter().find(|d| d.name == name).map(|d| d.state);
            let mut in_use = match state {
                Some(DomainState::Stopped) | None => None,
                Some(DomainState::Running) => Some("it is running".to_string()),
                Some(other) => Some(format!("it is {other:?}").to_lowercase()),
            };
            if in_use.is_none() {
                let users = users.get_or_insert_with(|| disk_users(hv, &domains));
                let clones = clones_of(users, &name, &dir);
                if !clones.is_empty() {
                    in_use = Some(format!("clones use its disks: {}", clones.join(", ")));
                }
            }
            if in_use.is_none() && name_lock_held(&self.vmdir, &name) {
                in_use = Some("an import or clone of it is under way".into());
            }
            out.push(VmItem {
                allocated: allocated_tree(&dir, &mut HashSet::new()),
                last_used: usage::vm_last_use(&dir).unwrap_or(SystemTime::UNIX_EPOCH),
                image: marker.image.clone(),
                name,
                dir,
                in_use,
            });
        }
        Ok(out)
    }

    /// `sarde prune`.
    pub fn prune(&self, request: &PruneRequest) -> Result<PruneReport> {
        let hv = self.registry.connect(&self.connect)?;
        let inventory = CacheInventory::scan(self.ocidir.root())?;
        let vms = if request.include_vms {
            self.vm_items(hv.as_ref())?
        } else {
            Vec::new()
        };
        let policy = Policy {
            now: SystemTime::now(),
            older_than: request.older_than,
            space_budget: request.space_budget,
            min_age: self.lifecycle.prune_min_age,
            reclaim: 0,
            include_vms: request.include_vms,
            keep_images: Vec::new(),
            keep_vms: Vec::new(),
            remove: Vec::new(),
        };
        let plan = sarde_lifecycle::plan::plan(&inventory, &vms, &self.dead_staging(), &policy);
        if request.dry_run {
            return Ok(PruneReport {
                dry_run: true,
                plan,
                swept: None,
            });
        }
        let swept = self.sweep(&plan, hv.as_ref())?;
        Ok(PruneReport {
            dry_run: false,
            plan,
            swept: Some(swept),
        })
    }

    /// Staging directories of imports whose process is gone (nobody holds the
    /// name lock), and directories of VM removals that were cut short.
    fn dead_staging(&self) -> Vec<PlannedFile> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(&self.vmdir) else {
            return out;
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            if let Some(name) = file_name.strip_prefix(".staging-") {
                if name_lock_held(&self.vmdir, name) {
                    continue;
                }
            } else if !file_name.starts_with(TRASH_PREFIX) {
                continue;
            }
            out.push(PlannedFile {
                freed: allocated_tree(&entry.path(), &mut HashSet::new()),
                path: entry.path(),
                reason: Reason::DeadProcess,
                layout: None,
            });
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }

    fn sweep(&self, plan: &Plan, hv: &dyn Hypervisor) -> Result<Swept> {
        let mut remove = |vm: &PlannedVm| {
            self.remove_imported_vm(hv, &vm.name)
                .map(|_| true)
                .map_err(|e| e.to_string())
        };
        let mut swept = sarde_lifecycle::sweep::sweep(self.ocidir.root(), plan, &mut remove)?;
        for staging in &plan.staging {
            let Some(file_name) = staging.path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let name = file_name.strip_prefix(".staging-").unwrap_or(file_name);
            // Held while deleting, so an import cannot start resuming it meanwhile.
            let Some(_lock) = NameLock::try_exclusive(&self.vmdir, name) else {
                swept
                    .spared
                    .push(format!("{}: an import resumed it", staging.path.display()));
                continue;
            };
            if fs::remove_dir_all(&staging.path).is_ok() {
                swept.staging += 1;
                swept.bytes_freed += staging.freed;
            }
        }
        Ok(swept)
    }

    /// `sarde rm IMAGE...`: removes the tags (or untagged digests) and the blobs no
    /// remaining entry of their layouts uses. Refused for an image a running
    /// command uses.
    pub fn remove_images(&self, images: &[ImageLocation]) -> Result<Swept> {
        let inventory = CacheInventory::scan(self.ocidir.root())?;
        let mut wanted = Vec::new();
        for image in images {
            let key = layout_key(self.ocidir.root(), &image.layout);
            let found = inventory.images().find(|i| {
                i.layout == key
                    && (i.tag.as_deref() == Some(image.reference.as_str())
                        || (i.manifest.digest.to_string() == image.reference))
            });
            let Some(found) = found else {
                return Err(EngineError::Refused(format!(
                    "no image {} in the cache ({}): `sarde list` shows what is there",
                    image.name,
                    self.ocidir.root().display()
                )));
            };
            if found.leased {
                let users: Vec<String> = inventory
                    .leases
                    .live
                    .iter()
                    .filter(|l| {
                        l.holds_image(&found.layout, found.tag.as_deref(), &found.manifest.digest)
                    })
                    .map(|l| format!("sarde {} (pid {})", l.command, l.pid))
                    .collect();
                return Err(EngineError::Refused(format!(
                    "image {} is in use by {}; try again when that has finished",
                    image.name,
                    users.join(", ")
                )));
            }
            wanted.push((key, image.reference.clone()));
        }
        let mut policy = Policy::garbage_only(SystemTime::now(), self.lifecycle.prune_min_age);
        policy.remove = wanted.clone();
        let mut plan = sarde_lifecycle::plan::plan(&inventory, &[], &[], &policy);
        // Only what the removal itself frees: other garbage (broken tags too) is
        // prune's.
        plan.images.retain(|i| i.reason == Reason::Requested);
        let touched: HashSet<&str> = wanted.iter().map(|(k, _)| k.as_str()).collect();
        plan.blobs.retain(|b| touched.contains(b.layout.as_str()));
        plan.temps.clear();
        plan.partials.clear();
        plan.dead_leases.clear();
        let removed: HashSet<String> = plan
            .images
            .iter()
            .map(|i| usage::image_key(&i.layout, &i.manifest))
            .collect();
        plan.usage_records.retain(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| removed.contains(n))
        });
        plan.staging.clear();
        let mut no_vms = |_: &PlannedVm| Ok(false);
        let swept = sarde_lifecycle::sweep::sweep(self.ocidir.root(), &plan, &mut no_vms)?;
        if swept.images.len() < plan.images.len() {
            return Err(EngineError::Refused(format!(
                "not removed, in use by now: {}; try again when that has finished",
                swept.spared.join("; ")
            )));
        }
        Ok(swept)
    }

    /// `sarde rm --vm NAME`: undefines a VM sarde imported and deletes its
    /// directory; refused while it runs, while clones use its disks, or while an
    /// import or clone of it is under way. Returns the bytes freed.
    pub fn rm_vm(&self, name: &str) -> Result<u64> {
        let hv = self.registry.connect(&self.connect)?;
        self.remove_imported_vm(hv.as_ref(), name)
    }

    fn remove_imported_vm(&self, hv: &dyn Hypervisor, name: &str) -> Result<u64> {
        let dir = self.vmdir.join(name);
        let marker = match Marker::read(&dir) {
            Some(m) if m.vm_name == name => m,
            _ => {
                return Err(EngineError::Refused(format!(
                    "VM {name:?} was not imported by sarde (no import record in {}): sarde removes only VMs it imported",
                    dir.display()
                )));
            }
        };
        let Some(_lock) = NameLock::try_exclusive(&self.vmdir, name) else {
            return Err(EngineError::Refused(format!(
                "VM {name:?} is being imported or cloned right now; try again when that has finished"
            )));
        };
        if hv.exists(name)? {
            let state = hv.state(name)?;
            if state != DomainState::Stopped {
                return Err(EngineError::Refused(format!(
                    "VM {name:?} is {}: shut it down first",
                    format!("{state:?}").to_lowercase()
                )));
            }
        }
        let domains = hv.list_domains()?;
        let users = disk_users(hv, &domains);
        let clones = clones_of(&users, name, &dir);
        if !clones.is_empty() {
            return Err(EngineError::Refused(format!(
                "VM {name:?} backs the disks of {}: remove {} first",
                clones.join(", "),
                if clones.len() == 1 {
                    "that clone"
                } else {
                    "those clones"
                }
            )));
        }
        let freed = allocated_tree(&dir, &mut HashSet::new());
        if hv.exists(name)? {
            hv.undefine(name)?;
        }
        // Out of the way in one step, then deleted: a removal killed half way
        // leaves a `.trash-` directory that the next prune deletes, never a VM
        // directory without its import record.
        let trash = self
            .vmdir
            .join(format!("{TRASH_PREFIX}{name}-{}", std::process::id()));
        fs::rename(&dir, &trash).map_err(EngineError::io(&dir, "moving the VM's files away"))?;
        fs::remove_dir_all(&trash).map_err(EngineError::io(&trash, "removing the VM's files"))?;
        tracing::info!(
            "removed VM {name} (from {}), {}",
            marker.image,
            human_bytes(freed)
        );
        Ok(freed)
    }

    /// Bytes of disk an import of this manifest writes (the stored pieces'
    /// decompressed sizes); 0 when the VM it would create is there already.
    pub(crate) fn disk_bytes_to_write(&self, manifest: &[u8], import: &ImportRequest) -> u64 {
        let (Ok(parsed), Some(name)) = (
            serde_json::from_slice::<ImageManifest>(manifest),
            self.import_name(manifest, import),
        ) else {
            return 0;
        };
        let manifest = parsed;
        if Marker::read(&self.vmdir.join(&name))
            .is_some_and(|m| m.defined && m.config == manifest.config.digest)
        {
            return 0;
        }
        match sarde_format::native::parse(&manifest) {
            Ok(native) => native
                .files
                .iter()
                .flat_map(|f| &f.pieces)
                .map(|p| p.size)
                .sum(),
            // v1 records no sizes: its compressed layers are the best lower bound.
            Err(_) => manifest.layers.iter().map(|l| l.size).sum(),
        }
    }

    /// The name an import of this manifest gives its VM: the one asked for, else
    /// the image id.
    pub(crate) fn import_name(&self, manifest: &[u8], import: &ImportRequest) -> Option<String> {
        match &import.name {
            Some(name) => Some(name.clone()),
            None => serde_json::from_slice::<ImageManifest>(manifest)
                .ok()
                .map(|m| m.config.digest.to_string()),
        }
    }

    /// Makes room for an operation about to write `need` bytes: compares with the
    /// free space of the cache's and the VM directory's file systems and with
    /// `space-budget`, and reclaims only the shortfall, least recently used first,
    /// never `keep` (the image being pulled), never `keep_vm` (the VM it will
    /// reuse) and nothing in use. Fails before anything is written or removed when
    /// the space cannot be found.
    pub fn make_room(
        &self,
        need: SpaceNeed,
        keep: &ImageLocation,
        keep_vm: Option<&str>,
    ) -> Result<Option<Swept>> {
        let free = FreeSpace::measure(self)?;
        let missing = free.shortfall(need);
        let budget = self.lifecycle.space_budget;
        if missing == 0 && budget.is_none() {
            return Ok(None);
        }
        if !self.lifecycle.auto_prune {
            if missing > 0 {
                return Err(free.no_room(need, "auto-prune is off"));
            }
            tracing::warn!(
                "auto-prune is off: the space budget of {} is not enforced; run `sarde prune --vms --space-budget …`",
                human_bytes(budget.unwrap_or(0))
            );
            return Ok(None);
        }
        match self.reclaim(need, free, keep, keep_vm) {
            Ok(swept) => {
                let after = FreeSpace::measure(self)?;
                if after.shortfall(need) > 0 {
                    return Err(after.no_room(
                        need,
                        "everything else is in use or used within prune-min-age",
                    ));
                }
                Ok(swept)
            }
            Err(e) if missing > 0 => Err(e),
            // Only over budget: the operation itself fits, so a reclaim that
            // failed (libvirt down, a damaged layout) must not stop it.
            Err(e) => {
                tracing::warn!("keeping to the space budget failed: {e}");
                Ok(None)
            }
        }
    }

    /// The reclaim of [`Engine::make_room`]: plans, and sweeps only when the plan
    /// frees at least the shortfall `free` leaves.
    fn reclaim(
        &self,
        need: SpaceNeed,
        free: FreeSpace,
        keep: &ImageLocation,
        keep_vm: Option<&str>,
    ) -> Result<Option<Swept>> {
        let missing = free.shortfall(need);
        let root = self.ocidir.root();
        let budget = self.lifecycle.space_budget;
        let hv = self.registry.connect(&self.connect)?;
        let inventory = CacheInventory::scan(root)?;
        let vms = self.vm_items(hv.as_ref())?;
        let used = inventory.allocated() + vms.iter().map(|v| v.allocated).sum::<u64>();
        let budget_left = budget.map(|b| b.saturating_sub(need.cache + need.vms));
        if missing == 0 && budget_left.is_none_or(|b| used <= b) {
            return Ok(None);
        }
        let policy = Policy {
            now: SystemTime::now(),
            older_than: None,
            space_budget: budget_left,
            min_age: self.lifecycle.prune_min_age,
            reclaim: missing,
            include_vms: true,
            keep_images: vec![(layout_key(root, &keep.layout), keep.reference.clone())],
            keep_vms: keep_vm.map(str::to_string).into_iter().collect(),
            remove: Vec::new(),
        };
        let plan = sarde_lifecycle::plan::plan(&inventory, &vms, &self.dead_staging(), &policy);
        if plan.bytes_freed < missing {
            return Err(free.no_room(
                need,
                &format!(
                    "only {} could be reclaimed: everything else is in use or used within prune-min-age",
                    human_bytes(plan.bytes_freed)
                ),
            ));
        }
        if plan.is_empty() {
            return Ok(Some(Swept::default()));
        }
        let swept = self.sweep(&plan, hv.as_ref())?;
        tracing::info!(
            "made room for {}: removed {} image(s), {} VM(s), {} blob(s), {} freed",
            keep.name,
            swept.images.len(),
            swept.vms.len(),
            swept.blobs,
            human_bytes(swept.bytes_freed)
        );
        if let Some(outcome) = plan.budget.as_ref().filter(|b| b.over_budget) {
            tracing::warn!(
                "after this {} the cache and VMs will take about {}, over the space budget of {}: what remains is in use ({}) or used within prune-min-age ({})",
                keep.name,
                human_bytes(outcome.bytes_after + need.cache + need.vms),
                human_bytes(budget.unwrap_or(0)),
                human_bytes(outcome.kept_in_use),
                human_bytes(outcome.kept_recent)
            );
        }
        Ok(Some(swept))
    }

    /// The image id (config digest) of an image of the cache.
    pub fn image_id(&self, image: &ImageLocation) -> Result<sarde_api::Digest> {
        let layout = self.layout(image)?;
        Ok(crate::import::load_image(&layout, image)?.config_digest)
    }

    /// Removes base VMs of older versions of `image` that `owner` imported, once no
    /// clone uses them (the executor's cleanup of its own base VMs). Returns the
    /// names removed; VMs still in use stay for a later call.
    pub fn remove_superseded_vms(
        &self,
        image: &str,
        current: &sarde_api::Digest,
        owner: &str,
    ) -> Result<Vec<String>> {
        let hv = self.registry.connect(&self.connect)?;
        let mut removed = Vec::new();
        for (_, marker) in self.imported_vm_dirs() {
            let superseded = marker.image == image
                && marker.config != *current
                && marker.imported_by.as_deref() == Some(owner);
            if !superseded {
                continue;
            }
            match self.remove_imported_vm(hv.as_ref(), &marker.vm_name) {
                Ok(freed) => {
                    tracing::info!(
                        "removed {} (an older version of {image}), {}",
                        marker.vm_name,
                        human_bytes(freed)
                    );
                    removed.push(marker.vm_name);
                }
                Err(e) => tracing::debug!("keeping {} for now: {e}", marker.vm_name),
            }
        }
        Ok(removed)
    }
}

impl From<sarde_lifecycle::LifecycleError> for EngineError {
    fn from(e: sarde_lifecycle::LifecycleError) -> Self {
        match e {
            sarde_lifecycle::LifecycleError::Layout(e) => EngineError::Layout(e),
            sarde_lifecycle::LifecycleError::Io {
                path,
                context,
                source,
            } => EngineError::Io {
                path,
                context: context.to_string(),
                source,
            },
        }
    }
}

/// Free bytes of the cache's and the VM directory's file systems, measured once.
#[derive(Debug, Clone, Copy)]
struct FreeSpace {
    cache: u64,
    vms: u64,
    same_fs: bool,
}

impl FreeSpace {
    fn measure(engine: &Engine) -> Result<FreeSpace> {
        let root = engine.ocidir.root();
        Ok(FreeSpace {
            cache: free_space(root)?,
            vms: free_space(&engine.vmdir)?,
            same_fs: device_of(root) == device_of(&engine.vmdir),
        })
    }

    /// Bytes missing for `need` plus headroom on the fuller side.
    fn shortfall(&self, need: SpaceNeed) -> u64 {
        if self.same_fs {
            (need.cache + need.vms + HEADROOM).saturating_sub(self.cache)
        } else {
            (need.cache + HEADROOM)
                .saturating_sub(self.cache)
                .max((need.vms + HEADROOM).saturating_sub(self.vms))
        }
    }

    fn no_room(&self, need: SpaceNeed, why: &str) -> EngineError {
        let free = if self.same_fs {
            format!("{} free", human_bytes(self.cache))
        } else {
            format!(
                "{} free for the cache, {} for VMs",
                human_bytes(self.cache),
                human_bytes(self.vms)
            )
        };
        EngineError::Refused(format!(
            "not enough disk space: this needs {} ({} bytes of blobs, {} bytes of disks) plus {} headroom, {free}, and nothing more can be reclaimed ({why}); free space, or remove images and VMs with `sarde rm`",
            human_bytes(need.cache + need.vms),
            need.cache,
            need.vms,
            human_bytes(HEADROOM),
        ))
    }
}

/// Every other domain's disk files with their backing chains.
pub(crate) fn disk_users(
    hv: &dyn Hypervisor,
    domains: &[sarde_api::hypervisor::DomainSummary],
) -> Vec<(String, Vec<PathBuf>)> {
    let mut out = Vec::new();
    for domain in domains {
        let Ok(xml) = hv.domain_xml(&domain.name, false) else {
            continue;
        };
        let mut files = Vec::new();
        for disk in sarde_domain::file_disk_sources(&xml).unwrap_or_default() {
            match sarde_disk::backing_chain(&disk.source) {
                Ok(chain) => files.extend(chain.into_iter().map(|f| f.path)),
                Err(e) => {
                    tracing::debug!(
                        "{}: backing chain of {}: {e}",
                        domain.name,
                        disk.source.display()
                    );
                    files.push(disk.source);
                }
            }
        }
        // libvirt's record of a running domain's chains: all there is when the
        // top files were unlinked (the executor's ephemeral clones) and the chain
        // above cannot be read from them.
        files.extend(sarde_domain::backing_store_files(&xml).unwrap_or_default());
        out.push((domain.name.clone(), files));
    }
    out
}

/// Domains other than `name` whose disks use a file in `dir`.
pub(crate) fn clones_of(users: &[(String, Vec<PathBuf>)], name: &str, dir: &Path) -> Vec<String> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut clones: Vec<String> = users
        .iter()
        .filter(|(domain, _)| domain != name)
        .filter(|(_, files)| {
            files.iter().any(|f| {
                let f = fs::canonicalize(f).unwrap_or_else(|_| f.clone());
                f.starts_with(&dir)
            })
        })
        .map(|(domain, _)| domain.clone())
        .collect();
    clones.sort();
    clones.dedup();
    clones
}

impl Engine {
    /// Holds the name lock of an imported VM shared (clones of it), waiting for an
    /// import of it to finish; `None` for VMs sarde did not import.
    pub(crate) fn share_vm_lock(&self, name: &str) -> Result<Option<NameLock>> {
        if name.contains('/')
            || name.starts_with('.')
            || Marker::read(&self.vmdir.join(name)).is_none()
        {
            return Ok(None);
        }
        NameLock::shared(&self.vmdir, name).map(Some)
    }
}

/// Prefix of VM directories being removed.
const TRASH_PREFIX: &str = ".trash-";

fn is_permission_error(e: &sarde_lifecycle::LifecycleError) -> bool {
    let io = match e {
        sarde_lifecycle::LifecycleError::Io { source, .. } => Some(source),
        sarde_lifecycle::LifecycleError::Layout(sarde_transport_oci_dir::LayoutError::Io {
            source,
            ..
        }) => Some(source),
        _ => None,
    };
    io.is_some_and(|e| {
        matches!(
            e.kind(),
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
        )
    })
}

/// Whether an import, clone or removal of the VM `name` holds its name lock.
fn name_lock_held(vmdir: &Path, name: &str) -> bool {
    NameLock::try_exclusive(vmdir, name).is_none()
}
