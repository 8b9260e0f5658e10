//! The planner and the sweeper on real layouts in a temporary directory: what is
//! garbage, what a budget removes and in which order, what leases protect, and
//! that a sweep never breaks a remaining tag.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use sarde_api::Digest;
use sarde_api::oci::{Descriptor, ImageManifest, media_types};
use sarde_lifecycle::inventory::CacheInventory;
use sarde_lifecycle::plan::{self, Policy, Reason, VmItem};
use sarde_lifecycle::sweep::sweep;
use sarde_lifecycle::{Lease, layout_key, usage};
use sarde_transport_oci_dir::Layout;

const HOUR: Duration = Duration::from_secs(3600);

/// Stores an image whose layers hold `layers` (each a distinct blob) and tags it.
fn image(layout: &Layout, tag: &str, layers: &[&[u8]]) -> Descriptor {
    let (config, config_size) = layout
        .write_blob(format!("{{\"tag\":\"{tag}\"}}").as_bytes())
        .unwrap();
    let layers: Vec<Descriptor> = layers
        .iter()
        .map(|data| {
            let (digest, size) = layout.write_blob(data).unwrap();
            Descriptor::new("application/octet-stream", digest, size)
        })
        .collect();
    let manifest = ImageManifest::new(
        Descriptor::new(media_types::IMAGE_CONFIG, config, config_size),
        layers,
    );
    let descriptor = layout
        .put_manifest(&manifest.to_bytes(), media_types::IMAGE_MANIFEST)
        .unwrap();
    layout.set_tag(tag, &descriptor).unwrap();
    descriptor
}

/// Sets when an image was last used.
fn used_at(cache: &Path, layout: &Layout, manifest: &Digest, when: SystemTime) {
    let key = layout_key(cache, layout.path());
    usage::record_image_use(cache, &key, manifest).unwrap();
    let path = usage::usage_dir(cache).join(usage::image_key(&key, manifest));
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(when)
        .unwrap();
}

fn set_mtime(path: &Path, when: SystemTime) {
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(when)
        .unwrap();
}

fn data(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn policy(now: SystemTime) -> Policy {
    Policy::garbage_only(now, HOUR)
}

/// Every tag of every layout resolves and has all its blobs.
fn assert_every_tag_complete(cache: &Path) {
    let inventory = CacheInventory::scan(cache).unwrap();
    for image in inventory.images() {
        assert!(
            image.missing.is_empty(),
            "{} lost {:?}",
            image.name(),
            image.missing
        );
    }
}

#[test]
fn garbage_is_collected_and_nothing_a_tag_uses() {
    let cache = tempfile::tempdir().unwrap();
    let root = cache.path();
    let layout = Layout::create(root.join("r.example/team/app")).unwrap();
    let shared = data(1, 5000);
    let kept = image(&layout, "1", &[&shared, &data(2, 3000)]);
    // An orphan: a blob no manifest names (an export killed before its manifest).
    let (orphan, _) = layout.write_blob(&data(3, 4000)).unwrap();
    // A tag whose layer is gone.
    let broken = image(&layout, "broken", &[&shared, &data(4, 2000)]);
    let missing = Digest::sha256_of(&data(4, 2000));
    fs::remove_file(layout.blob_path(&missing)).unwrap();
    // A temporary blob of a killed writer, an abandoned and a fresh partial download.
    let temp = layout.path().join("blobs/sha256/.tmp-killed");
    fs::write(&temp, data(5, 100)).unwrap();
    // Both from a process killed long ago: a writer holding no lease gets
    // prune-min-age, and a young orphan is spared (checked below).
    let two_hours_ago = SystemTime::now() - 2 * HOUR;
    set_mtime(&temp, two_hours_ago);
    set_mtime(&layout.blob_path(&orphan), two_hours_ago);
    let (young, _) = layout.write_blob(&data(8, 4000)).unwrap();
    let partials = root.join(".sarde/partial");
    fs::create_dir_all(&partials).unwrap();
    let old_partial = partials.join(format!("sha256-{}", "a".repeat(64)));
    let new_partial = partials.join(format!("sha256-{}", "b".repeat(64)));
    fs::write(&old_partial, data(6, 100)).unwrap();
    fs::write(&new_partial, data(7, 100)).unwrap();
    set_mtime(&old_partial, SystemTime::now() - 2 * HOUR);
    // The usage record of an image that is gone.
    usage::record_image_use(root, "r.example/team/gone", &orphan).unwrap();

    let inventory = CacheInventory::scan(root).unwrap();
    let planned = plan::plan(&inventory, &[], &[], &policy(SystemTime::now()));
    let names: Vec<_> = planned
        .images
        .iter()
        .map(|i| (i.name.clone(), i.reason))
        .collect();
    assert_eq!(
        names,
        vec![("r.example/team/app:broken".to_string(), Reason::Broken)]
    );
    let blobs: Vec<_> = planned.blobs.iter().map(|b| b.digest.clone()).collect();
    // The orphan and the broken tag's own manifest and config; never the shared layer.
    assert!(blobs.contains(&orphan), "{blobs:?}");
    assert!(blobs.contains(&broken.digest), "{blobs:?}");
    assert!(!blobs.contains(&Digest::sha256_of(&shared)), "{blobs:?}");
    assert!(!blobs.contains(&kept.digest));
    assert!(
        !blobs.contains(&young),
        "a young orphan may be a lease-less writer's"
    );
    assert_eq!(planned.temps.len(), 1);
    assert_eq!(planned.partials.len(), 1, "only the abandoned partial");
    assert_eq!(planned.partials[0].path, old_partial);
    assert_eq!(planned.usage_records.len(), 1, "the gone image's record");

    let swept = sweep(root, &planned, &mut |_| Ok(false)).unwrap();
    assert_eq!(swept.images, vec!["r.example/team/app:broken".to_string()]);
    assert_eq!(swept.blobs, planned.blobs.len());
    assert_eq!(swept.bytes_freed, planned.bytes_freed);
    assert!(!temp.exists() && !old_partial.exists() && new_partial.exists());
    assert_every_tag_complete(root);
    assert_eq!(layout.resolve("1").unwrap().digest, kept.digest);
    // Nothing is left to do but the young orphan, once it is old.
    set_mtime(&layout.blob_path(&young), two_hours_ago);
    let again = plan::plan(
        &CacheInventory::scan(root).unwrap(),
        &[],
        &[],
        &policy(SystemTime::now()),
    );
    assert_eq!(again.blobs.len(), 1, "{again:?}");
    sweep(root, &again, &mut |_| Ok(false)).unwrap();
    let again = plan::plan(
        &CacheInventory::scan(root).unwrap(),
        &[],
        &[],
        &policy(SystemTime::now()),
    );
    assert!(
        again.images.is_empty() && again.blobs.is_empty() && again.temps.is_empty(),
        "{again:?}"
    );
}

#[test]
fn a_budget_removes_least_recently_used_first_and_counts_shared_blobs_once() {
    let cache = tempfile::tempdir().unwrap();
    let root = cache.path();
    let now = SystemTime::now();
    let a = Layout::create(root.join("h/a")).unwrap();
    let b = Layout::create(root.join("h/b")).unwrap();
    let base = data(9, 64 << 10);
    let a1 = image(&a, "1", &[&base, &data(10, 64 << 10)]);
    let a2 = image(&a, "2", &[&base, &data(11, 64 << 10)]);
    // The same layer in another repository: a hard link, as a fetch makes it.
    let shared = Descriptor::new("", Digest::sha256_of(&base), base.len() as u64);
    assert!(b.mount_blob_from(&a, &shared).unwrap());
    let b1 = image(&b, "1", &[&base, &data(12, 64 << 10)]);
    used_at(root, &a, &a1.digest, now - 5 * HOUR);
    used_at(root, &b, &b1.digest, now - 4 * HOUR);
    used_at(root, &a, &a2.digest, now - 3 * HOUR);

    let inventory = CacheInventory::scan(root).unwrap();
    let total = inventory.allocated();
    // One 64 KiB layer counted once although two tags and two layouts use it.
    let layer_files: u64 = inventory
        .layouts
        .iter()
        .flat_map(|l| l.blobs.values())
        .map(|blob| blob.facts.allocated)
        .sum();
    assert!(
        total < layer_files,
        "hard links counted twice: {total} vs {layer_files}"
    );

    // A budget that holds two of the three images: the oldest goes, and only its
    // own layer is freed (the base stays, a2 uses it).
    let mut p = policy(now);
    p.space_budget = Some(total - 40_000);
    let planned = plan::plan(&inventory, &[], &[], &p);
    let names: Vec<_> = planned.images.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, vec!["h/a:1"]);
    assert!(
        !planned
            .blobs
            .iter()
            .any(|blob| blob.digest == shared.digest)
    );
    let budget = planned.budget.as_ref().unwrap();
    assert!(!budget.over_budget, "{budget:?}");

    // A budget of nothing removes everything not used within prune-min-age, and
    // says it stays over budget because of what is recent.
    used_at(root, &a, &a2.digest, now - Duration::from_secs(60));
    let inventory = CacheInventory::scan(root).unwrap();
    let mut p = policy(now);
    p.space_budget = Some(0);
    let planned = plan::plan(&inventory, &[], &[], &p);
    let names: Vec<_> = planned.images.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["h/a:1", "h/b:1"],
        "oldest first, never the recent one"
    );
    let budget = planned.budget.as_ref().unwrap();
    assert!(budget.over_budget && budget.kept_recent > 0, "{budget:?}");
    // The shared layer's space comes back only when its last link goes: a2 keeps it.
    assert!(
        planned
            .blobs
            .iter()
            .filter(|blob| blob.digest == shared.digest)
            .all(|blob| blob.freed == 0)
    );
    sweep(root, &planned, &mut |_| Ok(false)).unwrap();
    assert_every_tag_complete(root);
    assert!(a.resolve("2").is_ok() && a.resolve("1").is_err() && b.resolve("1").is_err());
}

#[test]
fn older_than_and_vms_and_reclaim() {
    let cache = tempfile::tempdir().unwrap();
    let root = cache.path();
    let now = SystemTime::now();
    let layout = Layout::create(root.join("h/x")).unwrap();
    let old = image(&layout, "old", &[&data(20, 10_000)]);
    let new = image(&layout, "new", &[&data(21, 10_000)]);
    used_at(root, &layout, &old.digest, now - 48 * HOUR);
    used_at(root, &layout, &new.digest, now - 2 * HOUR);
    let vm = |name: &str, age: Duration, in_use: Option<&str>| VmItem {
        name: name.into(),
        dir: root.join(name),
        image: "h/x:old".into(),
        last_used: now - age,
        allocated: 1 << 20,
        in_use: in_use.map(str::to_string),
    };
    let vms = [
        vm("idle", 72 * HOUR, None),
        vm("backs-a-clone", 96 * HOUR, Some("clones use its disks: c")),
        vm("recent", HOUR / 2, None),
    ];
    let inventory = CacheInventory::scan(root).unwrap();

    let mut p = policy(now);
    p.older_than = Some(24 * HOUR);
    let planned = plan::plan(&inventory, &vms, &[], &p);
    assert_eq!(planned.images.len(), 1);
    assert_eq!(planned.images[0].name, "h/x:old");
    assert!(planned.vms.is_empty(), "VMs only with include_vms");
    p.include_vms = true;
    let planned = plan::plan(&inventory, &vms, &[], &p);
    let vm_names: Vec<_> = planned.vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(vm_names, vec!["idle"], "never a VM in use");

    // A reclaim frees only the shortfall, least recently used first, and never the
    // image it makes room for.
    let mut p = policy(now);
    p.reclaim = 1000;
    p.keep_images = vec![("h/x".into(), "old".into())];
    let planned = plan::plan(&inventory, &vms, &[], &p);
    let removed: Vec<_> = planned
        .images
        .iter()
        .map(|i| i.name.clone())
        .chain(planned.vms.iter().map(|v| v.name.clone()))
        .collect();
    assert_eq!(
        removed,
        vec!["idle".to_string()],
        "the oldest candidate alone covers 1000 bytes"
    );
}

#[test]
fn leases_protect_images_new_blobs_and_claimed_blobs() {
    let cache = tempfile::tempdir().unwrap();
    let root = cache.path();
    let now = SystemTime::now();
    let layout = Layout::create(root.join("h/l")).unwrap();
    let pulled = image(&layout, "1", &[&data(30, 1000)]);
    used_at(root, &layout, &pulled.digest, now - 48 * HOUR);
    // An orphan written before any lease, and one a running export writes now.
    let (stale, _) = layout.write_blob(&data(31, 1000)).unwrap();
    let old = SystemTime::now() - 2 * HOUR;
    set_mtime(&layout.blob_path(&stale), old);
    std::thread::sleep(Duration::from_millis(2100));
    let export = Lease::take(root, "export").unwrap();
    export.protect_layout(&layout).unwrap();
    let (fresh, _) = layout.write_blob(&data(32, 1000)).unwrap();
    // A fetch that counts on the stale orphan (it is one of its image's blobs).
    let fetch = Lease::take(root, "fetch").unwrap();
    let (claimed, _) = layout.write_blob(&data(33, 1000)).unwrap();
    fetch.protect_blobs(&layout, [&claimed]).unwrap();
    fetch.protect_image(&layout, "1").unwrap();
    fs::write(layout.path().join("blobs/sha256/.tmp-live"), b"x").unwrap();

    let mut p = policy(now);
    p.older_than = Some(HOUR);
    let planned = plan::plan(&CacheInventory::scan(root).unwrap(), &[], &[], &p);
    assert!(
        planned.images.is_empty(),
        "a leased image stays: {:?}",
        planned.images
    );
    let blobs: Vec<_> = planned.blobs.iter().map(|b| &b.digest).collect();
    assert!(blobs.contains(&&stale), "{blobs:?}");
    assert!(
        !blobs.contains(&&fresh) && !blobs.contains(&&claimed),
        "{blobs:?}"
    );
    assert!(
        planned.temps.is_empty(),
        "a live writer's temporary file stays"
    );

    // A lease taken after the plan was made still wins at sweep time.
    let late = Lease::take(root, "pull").unwrap();
    late.protect_blobs(&layout, [&stale]).unwrap();
    let swept = sweep(root, &planned, &mut |_| Ok(false)).unwrap();
    assert_eq!(swept.blobs, 0);
    assert_eq!(swept.spared.len(), 1, "{:?}", swept.spared);
    assert!(layout.blob_path(&stale).exists());

    // Once the commands have ended (long ago), the same prune takes what is garbage.
    drop((export, fetch, late));
    for entry in fs::read_dir(layout.path().join("blobs/sha256")).unwrap() {
        set_mtime(&entry.unwrap().path(), old);
    }
    let planned = plan::plan(&CacheInventory::scan(root).unwrap(), &[], &[], &p);
    let names: Vec<_> = planned.images.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, vec!["h/l:1"]);
    assert_eq!(planned.temps.len(), 1);
    let swept = sweep(root, &planned, &mut |_| Ok(false)).unwrap();
    assert_eq!(swept.blobs, planned.blobs.len());
    assert!(
        CacheInventory::scan(root).unwrap().layouts[0]
            .blobs
            .is_empty()
    );
}

#[test]
fn a_dry_run_plans_exactly_what_the_sweep_then_removes() {
    let cache = tempfile::tempdir().unwrap();
    let root = cache.path();
    let now = SystemTime::now();
    for repo in ["p/a", "p/b", "p/c"] {
        let layout = Layout::create(root.join(repo)).unwrap();
        for (i, tag) in ["1", "2", "3"].iter().enumerate() {
            let seed = (repo.len() * 10 + i) as u8 ^ repo.as_bytes()[2];
            let d = image(
                &layout,
                tag,
                &[&data(seed, 20_000), &data(seed ^ 0x80, 20_000)],
            );
            used_at(root, &layout, &d.digest, now - HOUR * (2 + i as u32));
        }
        layout.write_blob(&data(repo.as_bytes()[2], 5000)).unwrap();
    }
    let mut p = policy(now);
    p.space_budget = Some(200_000);
    let dry = plan::plan(&CacheInventory::scan(root).unwrap(), &[], &[], &p);
    let real = plan::plan(&CacheInventory::scan(root).unwrap(), &[], &[], &p);
    let key = |plan: &plan::Plan| {
        (
            plan.images
                .iter()
                .map(|i| i.name.clone())
                .collect::<Vec<_>>(),
            plan.blobs
                .iter()
                .map(|b| b.path.clone())
                .collect::<Vec<_>>(),
            plan.bytes_freed,
        )
    };
    assert_eq!(key(&dry), key(&real));
    let swept = sweep(root, &real, &mut |_| Ok(false)).unwrap();
    let removed: Vec<_> = real.images.iter().map(|i| i.name.clone()).collect();
    assert_eq!(swept.images.len(), removed.len());
    for name in &removed {
        assert!(
            swept.images.contains(name),
            "{name} planned but not removed"
        );
    }
    assert_eq!(swept.blobs, real.blobs.len());
    assert_every_tag_complete(root);
    let after = CacheInventory::scan(root).unwrap().allocated();
    assert!(
        after <= 200_000 || real.budget.as_ref().unwrap().over_budget,
        "{after}"
    );
}

#[test]
fn a_tag_planned_as_broken_that_is_whole_by_the_sweep_stays() {
    // A writer stores blobs, then tags; a plan that read the index before the
    // blob listing caught up must not untag what is whole by the time it sweeps.
    let cache = tempfile::tempdir().unwrap();
    let root = cache.path();
    let layout = Layout::create(root.join("h/w")).unwrap();
    let layer = data(40, 3000);
    let tagged = image(&layout, "1", &[&layer]);
    let layer_digest = Digest::sha256_of(&layer);
    fs::remove_file(layout.blob_path(&layer_digest)).unwrap();
    let planned = plan::plan(
        &CacheInventory::scan(root).unwrap(),
        &[],
        &[],
        &policy(SystemTime::now()),
    );
    assert_eq!(planned.images.len(), 1);
    assert_eq!(planned.images[0].reason, Reason::Broken);
    layout.write_blob(&layer).unwrap();
    let swept = sweep(root, &planned, &mut |_| Ok(false)).unwrap();
    assert!(swept.images.is_empty(), "{swept:?}");
    assert!(swept.spared[0].contains("complete"), "{swept:?}");
    assert_eq!(layout.resolve("1").unwrap().digest, tagged.digest);
    assert_every_tag_complete(root);
}

#[test]
fn a_manifest_that_cannot_be_understood_keeps_its_repository_s_blobs() {
    let cache = tempfile::tempdir().unwrap();
    let root = cache.path();
    let layout = Layout::create(root.join("h/o")).unwrap();
    let (layer, _) = layout.write_blob(&data(50, 2000)).unwrap();
    // Stored and tagged, but not JSON: which blobs it needs is unknown.
    let odd = layout
        .put_manifest(b"not a manifest", media_types::IMAGE_MANIFEST)
        .unwrap();
    layout.set_tag("odd", &odd).unwrap();
    set_mtime(&layout.blob_path(&layer), SystemTime::now() - 2 * HOUR);
    let planned = plan::plan(
        &CacheInventory::scan(root).unwrap(),
        &[],
        &[],
        &policy(SystemTime::now()),
    );
    assert!(planned.blobs.is_empty(), "{planned:?}");
    assert!(planned.images.is_empty(), "{planned:?}");
}

/// An image's signature (cosign's `sha256-<hex>.sig` tag) is part of it: not
/// an image of its own, kept with it, removed with it; one whose image is gone
/// (its tag moved on) is garbage once older than prune-min-age.
#[test]
fn signatures_go_with_their_image() {
    let cache = tempfile::tempdir().unwrap();
    let root = cache.path();
    let layout = Layout::create(root.join("r.example/team/app")).unwrap();
    let signed = image(&layout, "1", &[&data(1, 3000)]);
    let sig_tag = |d: &Digest| format!("sha256-{}.sig", d.hex());
    let signature = image(&layout, &sig_tag(&signed.digest), &[&data(2, 200)]);
    let inventory = CacheInventory::scan(root).unwrap();
    let images: Vec<_> = inventory.images().collect();
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(images[0].attachments, [sig_tag(&signed.digest)]);
    assert!(images[0].blobs.contains(&signature.digest));

    // The tag moves to another image: the old signature is an orphan, kept
    // while young, garbage once old.
    let other = image(&layout, "1", &[&data(3, 3000)]);
    assert_ne!(other.digest, signed.digest);
    let now = SystemTime::now();
    let inventory = CacheInventory::scan(root).unwrap();
    let orphan = inventory
        .images()
        .find(|i| i.tag.as_deref() == Some(sig_tag(&signed.digest).as_str()))
        .expect("listed on its own");
    assert!(orphan.orphaned);
    let young = plan::plan(&inventory, &[], &[], &policy(now));
    assert!(young.images.iter().all(|i| i.reason != Reason::Orphaned));
    let later = plan::plan(&inventory, &[], &[], &policy(now + 2 * HOUR));
    assert!(
        later
            .images
            .iter()
            .any(|i| i.reason == Reason::Orphaned && i.manifest == signature.digest),
        "{:?}",
        later.images
    );

    // Removing an image removes its signature too.
    let again = image(&layout, &sig_tag(&other.digest), &[&data(4, 200)]);
    let inventory = CacheInventory::scan(root).unwrap();
    let mut policy = policy(now);
    policy.remove = vec![(layout_key(root, layout.path()), "1".to_string())];
    let planned = plan::plan(&inventory, &[], &[], &policy);
    sweep(root, &planned, &mut |_| Ok(false)).unwrap();
    let index = layout.index().unwrap();
    assert!(
        index.manifests.iter().all(|m| m.digest != again.digest),
        "the signature stayed: {index:?}"
    );
}
