//! What a prune removes, decided from one [`CacheInventory`] (and the engine's
//! list of imported VMs), the same way for `--dry-run` and for the real run.
//!
//! Always: broken tags (a blob they need is gone), blobs no index entry uses,
//! temporary files of writers that hold no lease, partial downloads nobody holds
//! that are older than `min_age`, records of gone images, files of dead leases.
//! Then, least recently used first: images (and VMs with `include_vms`) older
//! than `older_than`; and while the total exceeds `space_budget` or less than
//! `reclaim` bytes were freed, the next one not in use and not used within
//! `min_age`. Nothing a live lease names, nothing kept, no VM in use is planned.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use sarde_api::Digest;
use serde::Serialize;

use crate::inventory::{CacheInventory, CachedImage, LayoutInventory};
use crate::lease::Leases;
use crate::space::{FileFacts, FileId};
use crate::usage::image_key;

/// Blobs changed this long before a writer's lease began still count as its own
/// (file system timestamps are coarser than the clock).
const CLOCK_SLACK_NS: i128 = 2_000_000_000;

/// What to prune.
#[derive(Debug, Clone)]
pub struct Policy {
    pub now: SystemTime,
    /// Images (and with `include_vms`, VMs) not used for this long go.
    pub older_than: Option<Duration>,
    /// Bytes the cache (with `include_vms`, cache plus VMs) may take afterwards.
    pub space_budget: Option<u64>,
    /// Nothing used more recently goes to meet a budget or a reclaim.
    pub min_age: Duration,
    /// Bytes that must be freed (an automatic reclaim's shortfall).
    pub reclaim: u64,
    /// VMs are candidates, and count towards the budget.
    pub include_vms: bool,
    /// Images never removed: `(layout, tag or digest)`, e.g. the one being pulled.
    pub keep_images: Vec<(String, String)>,
    /// VMs never removed.
    pub keep_vms: Vec<String>,
    /// Images removed on request (`sarde rm`): `(layout, tag or digest)`.
    pub remove: Vec<(String, String)>,
}

impl Policy {
    /// Only what is always garbage.
    pub fn garbage_only(now: SystemTime, min_age: Duration) -> Policy {
        Policy {
            now,
            older_than: None,
            space_budget: None,
            min_age,
            reclaim: 0,
            include_vms: false,
            keep_images: Vec::new(),
            keep_vms: Vec::new(),
            remove: Vec::new(),
        }
    }
}

/// An imported VM, as the engine sees it.
#[derive(Debug, Clone, Serialize)]
pub struct VmItem {
    pub name: String,
    pub dir: PathBuf,
    /// The image it was imported from, as named then.
    pub image: String,
    pub last_used: SystemTime,
    /// Allocated bytes of its directory.
    pub allocated: u64,
    /// Why it may not be removed (running, backs clones, busy), if so.
    pub in_use: Option<String>,
}

/// Why something is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// A blob it needs is missing.
    Broken,
    /// No image uses it.
    Unreferenced,
    /// Left by a process that is gone.
    DeadProcess,
    /// A partial download nobody resumed within `prune-min-age`.
    Abandoned,
    /// Not used for `--older-than`.
    OlderThan,
    /// Least recently used, to meet the space budget.
    SpaceBudget,
    /// Least recently used, to make room for what is being pulled.
    Reclaim,
    /// Named by `sarde rm`.
    Requested,
    /// A signature (or other attachment) whose image is gone.
    Orphaned,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedImage {
    pub name: String,
    pub layout: String,
    pub tag: Option<String>,
    pub manifest: Digest,
    pub reason: Reason,
    #[serde(skip)]
    pub last_used: SystemTime,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedBlob {
    pub layout: String,
    pub digest: Digest,
    pub path: PathBuf,
    /// Bytes the disk gets back (0 while another link keeps the file).
    pub freed: u64,
    pub reason: Reason,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedFile {
    pub path: PathBuf,
    pub freed: u64,
    pub reason: Reason,
    /// The layout it belongs to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layout: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedVm {
    pub name: String,
    pub dir: PathBuf,
    pub image: String,
    pub freed: u64,
    pub reason: Reason,
}

/// How the plan meets the space budget.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetOutcome {
    pub budget: u64,
    pub bytes_after: u64,
    /// Still over budget: what stays is in use or used within `prune-min-age`.
    pub over_budget: bool,
    pub kept_in_use: u64,
    pub kept_recent: u64,
}

/// Everything one prune removes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Plan {
    pub images: Vec<PlannedImage>,
    pub blobs: Vec<PlannedBlob>,
    pub temps: Vec<PlannedFile>,
    pub partials: Vec<PlannedFile>,
    /// Staging directories of dead imports (the engine adds them).
    pub staging: Vec<PlannedFile>,
    pub vms: Vec<PlannedVm>,
    pub usage_records: Vec<PathBuf>,
    pub dead_leases: Vec<PathBuf>,
    /// Allocated bytes before: the cache, plus the VMs when they count.
    pub bytes_before: u64,
    pub bytes_freed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetOutcome>,
    /// Bytes a reclaim had to free, when asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reclaim_wanted: Option<u64>,
}

impl Plan {
    /// Nothing to remove.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
            && self.blobs.is_empty()
            && self.temps.is_empty()
            && self.partials.is_empty()
            && self.staging.is_empty()
            && self.vms.is_empty()
            && self.usage_records.is_empty()
            && self.dead_leases.is_empty()
    }
}

/// Frees a file's space when its last link goes.
#[derive(Default)]
struct Links {
    removed: HashMap<FileId, u64>,
}

impl Links {
    fn remove(&mut self, facts: &FileFacts) -> u64 {
        let n = self.removed.entry(facts.id).or_default();
        *n += 1;
        if *n == facts.nlink.max(1) {
            facts.allocated
        } else {
            0
        }
    }
}

/// The state the planner works on while it removes things.
struct Planner<'a> {
    inventory: &'a CacheInventory,
    policy: &'a Policy,
    leases: &'a Leases,
    /// Per layout: blob → index entries still using it.
    refs: Vec<HashMap<&'a Digest, usize>>,
    removed: Vec<Vec<bool>>,
    blob_planned: BTreeSet<(usize, &'a Digest)>,
    young_orphans: BTreeSet<(usize, &'a Digest)>,
    links: Links,
    plan: Plan,
}

/// Plans a prune of the cache and, with `include_vms` or a reclaim, of `vms`.
/// `staging` are the staging directories of dead imports, which the engine finds.
pub fn plan(
    inventory: &CacheInventory,
    vms: &[VmItem],
    staging: &[PlannedFile],
    policy: &Policy,
) -> Plan {
    let leases = &inventory.leases;
    let mut planner = Planner {
        inventory,
        policy,
        leases,
        refs: vec![HashMap::new(); inventory.layouts.len()],
        removed: inventory
            .layouts
            .iter()
            .map(|l| vec![false; l.images.len()])
            .collect(),
        blob_planned: BTreeSet::new(),
        young_orphans: BTreeSet::new(),
        links: Links::default(),
        plan: Plan::default(),
    };
    let vms_count = policy.include_vms || policy.reclaim > 0;
    let vm_bytes: u64 = if vms_count {
        vms.iter().map(|v| v.allocated).sum()
    } else {
        0
    };
    planner.plan.bytes_before = inventory.allocated() + vm_bytes;
    for (li, layout) in inventory.layouts.iter().enumerate() {
        for image in &layout.images {
            for d in &image.blobs {
                *planner.refs[li].entry(d).or_default() += 1;
            }
        }
        // Blobs no entry named before this plan: a writer without a lease (the
        // Python tool, an older sarde) may be about to tag them, so they wait
        // prune-min-age. Blobs this plan frees were an image's: no such wait.
        for (digest, blob) in &layout.blobs {
            if !planner.refs[li].contains_key(digest)
                && !older(policy.now, blob.facts.modified, policy.min_age)
            {
                planner.young_orphans.insert((li, digest));
            }
        }
    }

    // Broken entries, then what is older than asked.
    for (li, layout) in inventory.layouts.iter().enumerate() {
        for (ii, image) in layout.images.iter().enumerate() {
            if !planner.removable(image) {
                continue;
            }
            if matches_any(&policy.remove, image) {
                planner.remove_image(li, ii, Reason::Requested);
            } else if !image.missing.is_empty() {
                planner.remove_image(li, ii, Reason::Broken);
            } else if image.orphaned && older(policy.now, image.last_used, policy.min_age) {
                // Young ones may be a pull's, written just before its image.
                planner.remove_image(li, ii, Reason::Orphaned);
            } else if let Some(age) = policy.older_than {
                if older(policy.now, image.last_used, age) {
                    planner.remove_image(li, ii, Reason::OlderThan);
                }
            }
        }
    }
    let mut vm_removed = vec![false; vms.len()];
    if let (true, Some(age)) = (policy.include_vms, policy.older_than) {
        for (vi, vm) in vms.iter().enumerate() {
            if planner.vm_removable(vm) && older(policy.now, vm.last_used, age) {
                planner.remove_vm(vm, Reason::OlderThan);
                vm_removed[vi] = true;
            }
        }
    }
    planner.collect_garbage();
    planner.collect_files(staging);

    // Least recently used first, to meet the budget or the reclaim.
    let budget = policy.space_budget;
    if budget.is_some() || policy.reclaim > 0 {
        let reason = if policy.reclaim > 0 {
            Reason::Reclaim
        } else {
            Reason::SpaceBudget
        };
        let mut candidates: Vec<(SystemTime, Candidate)> = Vec::new();
        for (li, layout) in inventory.layouts.iter().enumerate() {
            for (ii, image) in layout.images.iter().enumerate() {
                if !planner.removed[li][ii]
                    && planner.removable(image)
                    && older(policy.now, image.last_used, policy.min_age)
                {
                    candidates.push((image.last_used, Candidate::Image(li, ii)));
                }
            }
        }
        if vms_count {
            for (vi, vm) in vms.iter().enumerate() {
                if !vm_removed[vi]
                    && planner.vm_removable(vm)
                    && older(policy.now, vm.last_used, policy.min_age)
                {
                    candidates.push((vm.last_used, Candidate::Vm(vi)));
                }
            }
        }
        candidates.sort_by_key(|(t, c)| (*t, c.clone()));
        for (_, candidate) in candidates {
            let after = planner.plan.bytes_before - planner.plan.bytes_freed;
            let over = budget.is_some_and(|b| after > b);
            let short = planner.plan.bytes_freed < policy.reclaim;
            if !over && !short {
                break;
            }
            match candidate {
                Candidate::Image(li, ii) => {
                    planner.remove_image(li, ii, reason);
                    let image = &inventory.layouts[li].images[ii];
                    planner.collect_blobs(li, image.blobs.iter());
                }
                Candidate::Vm(vi) => {
                    planner.remove_vm(&vms[vi], reason);
                    vm_removed[vi] = true;
                }
            }
        }
    }
    planner.collect_records();
    if policy.reclaim > 0 {
        planner.plan.reclaim_wanted = Some(policy.reclaim);
    }
    if let Some(budget) = budget {
        let bytes_after = planner.plan.bytes_before - planner.plan.bytes_freed;
        let (mut in_use, mut recent) = (0, 0);
        for (li, layout) in inventory.layouts.iter().enumerate() {
            for (ii, image) in layout.images.iter().enumerate() {
                if planner.removed[li][ii] {
                    continue;
                }
                if planner.removable(image) {
                    recent += inventory.image_allocated(image);
                } else {
                    in_use += inventory.image_allocated(image);
                }
            }
        }
        if vms_count {
            for (vi, vm) in vms.iter().enumerate() {
                if vm_removed[vi] {
                    continue;
                }
                if planner.vm_removable(vm) {
                    recent += vm.allocated;
                } else {
                    in_use += vm.allocated;
                }
            }
        }
        planner.plan.budget = Some(BudgetOutcome {
            budget,
            bytes_after,
            over_budget: bytes_after > budget,
            kept_in_use: in_use,
            kept_recent: recent,
        });
    }
    planner.plan
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Candidate {
    Image(usize, usize),
    Vm(usize),
}

/// Whether one of `(layout, tag or digest)` names this entry.
fn matches_any(names: &[(String, String)], image: &CachedImage) -> bool {
    names.iter().any(|(layout, reference)| {
        *layout == image.layout
            && (Some(reference.as_str()) == image.tag.as_deref()
                || *reference == image.manifest.digest.to_string())
    })
}

fn older(now: SystemTime, used: SystemTime, age: Duration) -> bool {
    now.duration_since(used).is_ok_and(|d| d >= age)
}

impl<'a> Planner<'a> {
    /// Not leased and not kept.
    fn removable(&self, image: &CachedImage) -> bool {
        !image.leased && !matches_any(&self.policy.keep_images, image)
    }

    fn vm_removable(&self, vm: &VmItem) -> bool {
        vm.in_use.is_none() && !self.policy.keep_vms.contains(&vm.name)
    }

    fn remove_image(&mut self, li: usize, ii: usize, reason: Reason) {
        let image = &self.inventory.layouts[li].images[ii];
        self.removed[li][ii] = true;
        for d in &image.blobs {
            if let Some(n) = self.refs[li].get_mut(d) {
                *n -= 1;
            }
        }
        self.plan.images.push(PlannedImage {
            name: image.name(),
            layout: image.layout.clone(),
            tag: image.tag.clone(),
            manifest: image.manifest.digest.clone(),
            reason,
            last_used: image.last_used,
        });
    }

    fn remove_vm(&mut self, vm: &VmItem, reason: Reason) {
        self.plan.bytes_freed += vm.allocated;
        self.plan.vms.push(PlannedVm {
            name: vm.name.clone(),
            dir: vm.dir.clone(),
            image: vm.image.clone(),
            freed: vm.allocated,
            reason,
        });
    }

    /// Plans every blob no entry uses any more and no lease protects.
    fn collect_garbage(&mut self) {
        for (li, layout) in self.inventory.layouts.iter().enumerate() {
            self.collect_blobs(li, layout.blobs.keys());
        }
    }

    /// Plans those of `digests` (blobs of layout `li`) no entry uses any more and
    /// no lease protects.
    fn collect_blobs(&mut self, li: usize, digests: impl Iterator<Item = &'a Digest>) {
        let layout = &self.inventory.layouts[li];
        if layout.images.iter().any(|i| i.opaque) {
            return;
        }
        for digest in digests {
            let Some(blob) = layout.blobs.get(digest) else {
                continue;
            };
            if self.refs[li].get(digest).copied().unwrap_or(0) > 0
                || self.blob_planned.contains(&(li, digest))
                || self.young_orphans.contains(&(li, digest))
                || protected(self.leases, layout, digest, &blob.facts)
            {
                continue;
            }
            {
                self.blob_planned.insert((li, digest));
                let freed = self.links.remove(&blob.facts);
                self.plan.bytes_freed += freed;
                self.plan.blobs.push(PlannedBlob {
                    layout: layout.key.clone(),
                    digest: digest.clone(),
                    path: blob.path.clone(),
                    freed,
                    reason: Reason::Unreferenced,
                });
            }
        }
    }

    /// Temporary files, partial downloads, usage records, dead leases.
    /// Temporary files, partial downloads and staging directories: before any
    /// image is chosen for the budget, since freeing them may be enough.
    fn collect_files(&mut self, staging: &[PlannedFile]) {
        for layout in &self.inventory.layouts {
            if self.leases.writes_layout(&layout.key) {
                continue;
            }
            for (path, facts) in &layout.temps {
                // A writer without a lease (the Python tool, an older sarde) gets
                // prune-min-age to finish.
                if !older(self.policy.now, facts.modified, self.policy.min_age) {
                    continue;
                }
                let freed = self.links.remove(facts);
                self.plan.bytes_freed += freed;
                self.plan.temps.push(PlannedFile {
                    path: path.clone(),
                    freed,
                    reason: Reason::DeadProcess,
                    layout: Some(layout.key.clone()),
                });
            }
        }
        for partial in &self.inventory.partials {
            if partial.held || !older(self.policy.now, partial.facts.modified, self.policy.min_age)
            {
                continue;
            }
            let freed = self.links.remove(&partial.facts);
            self.plan.bytes_freed += freed;
            self.plan.partials.push(PlannedFile {
                path: partial.path.clone(),
                freed,
                reason: Reason::Abandoned,
                layout: None,
            });
        }
        for dir in staging {
            self.plan.bytes_before += dir.freed;
            self.plan.bytes_freed += dir.freed;
            self.plan.staging.push(dir.clone());
        }
    }

    /// Records of removed images and files of dead leases.
    fn collect_records(&mut self) {
        let mut remaining: BTreeSet<String> = BTreeSet::new();
        for (li, layout) in self.inventory.layouts.iter().enumerate() {
            for (ii, image) in layout.images.iter().enumerate() {
                if !self.removed[li][ii] {
                    remaining.insert(image_key(&image.layout, &image.manifest.digest));
                }
            }
        }
        for (key, (_, path)) in &self.inventory.usage {
            if !remaining.contains(key) {
                self.plan.usage_records.push(path.clone());
            }
        }
        self.plan.dead_leases = self.inventory.leases.dead.clone();
    }
}

/// Whether a live lease protects this blob: named by digest, or new in a layout a
/// live command writes into.
pub(crate) fn protected(
    leases: &Leases,
    layout: &LayoutInventory,
    digest: &Digest,
    facts: &FileFacts,
) -> bool {
    leases.holds_blob(digest)
        || leases
            .earliest_writer_ns(&layout.key)
            .is_some_and(|started| facts.changed_ns >= started - CLOCK_SLACK_NS)
}
