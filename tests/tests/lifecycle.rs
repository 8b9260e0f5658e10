//! `sarde rm`, `sarde prune` and the automatic reclaim, against the real libvirtd,
//! a real registry and real processes killed with SIGKILL: nothing in use is ever
//! removed, garbage of dead processes is collected, a killed prune leaves every
//! tag complete, pulls racing a prune loop all succeed, and a pull that cannot fit
//! fails before it downloads anything.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sarde_e2e::registry::{RegistryOptions, TestRegistry, registry_tests_enabled};
use sarde_e2e::runner::signal_process;
use sarde_e2e::vm::{self, TestVm, fill, fill_random, qcow2, same_guest_content};
use sarde_e2e::{fails, ok, sarde};
use serde_json::Value;

/// A VM with one qcow2 disk of `size` holding `data_mib` MiB of random data.
struct DataVm {
    work: tempfile::TempDir,
    vm: TestVm,
    name: String,
    disk: PathBuf,
}

fn data_vm(prefix: &str, size: &str, data_mib: u64, seed: u64) -> DataVm {
    let work = vm::workdir();
    let disk = work.path().join("disk.qcow2");
    qcow2(&disk, size, None);
    if data_mib > 0 {
        fill_random(&disk, 0, data_mib, seed);
    }
    let name = vm::unique(prefix);
    let vm = TestVm::define(&name, &[&disk], None);
    DataVm {
        work,
        vm,
        name,
        disk,
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn list(home: &Path) -> Value {
    json(&ok(sarde(home).args(["list", "--format", "json"])).replace('\n', " "))
}

/// `name:tag` of every image `list` shows, and whether any is broken.
fn listed_images(home: &Path) -> Vec<String> {
    let v = list(home);
    v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            assert_eq!(i["broken"], false, "broken image in {v}");
            format!(
                "{}:{}",
                i["name"].as_str().unwrap(),
                i["tag"].as_str().unwrap()
            )
        })
        .collect()
}

/// Runs `cmd` in the background.
fn spawn(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("command starts")
}

/// Waits until `found` sees something (polling), at most `limit`.
fn wait_for(limit: Duration, mut found: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if found() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Files whose names start with `prefix` anywhere under `dir`.
fn files_named(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(prefix))
            {
                out.push(path.clone());
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
        }
    }
    out
}

fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn rm_refuses_vms_in_use_and_keeps_blobs_another_tag_uses() {
    if !registry_tests_enabled("rm_refuses_vms_in_use_and_keeps_blobs_another_tag_uses") {
        return;
    }
    let mut source = data_vm("sarde-rm", "32M", 4, 5);
    let home = vm::workdir();
    let h = home.path();
    ok(sarde(h).args([
        "export",
        "--chunksize",
        "1MiB",
        &source.name,
        "localhost/rm/a:1",
    ]));
    ok(sarde(h).args([
        "export",
        "--chunksize",
        "1MiB",
        &source.name,
        "localhost/rm/a:2",
    ]));
    fill(&source.disk, 0x33, "8M", "1M");
    ok(sarde(h).args([
        "export",
        "--chunksize",
        "1MiB",
        &source.name,
        "localhost/rm/a:3",
    ]));
    let imported = vm::unique("sarde-rm-imp");
    source.vm.cleanup_also(&imported);
    ok(sarde(h).args(["import", "-n", &imported, "localhost/rm/a:1"]));

    // A VM sarde did not import is never removed.
    let err = fails(sarde(h).args(["rm", "--vm", &source.name]));
    assert!(err.contains("not imported by sarde"), "{err}");
    assert!(vm::domain_exists(&source.name));

    // A clone's overlay backs onto the imported VM: refused, naming the clone.
    let clone = vm::unique("sarde-rm-clone");
    source.vm.cleanup_also(&clone);
    ok(sarde(h).args(["clone", &imported, &clone]));
    let err = fails(sarde(h).args(["rm", "--vm", &imported]));
    assert!(err.contains(&clone) && err.contains("backs"), "{err}");
    vm::undefine(&clone);

    // A running VM: refused.
    vm::run("virsh", &["-q", "-c", vm::LIBVIRT_URI, "start", &imported]);
    let err = fails(sarde(h).args(["rm", "--vm", &imported]));
    assert!(
        err.contains("running") && err.contains("shut it down"),
        "{err}"
    );
    vm::run(
        "virsh",
        &["-q", "-c", vm::LIBVIRT_URI, "destroy", &imported],
    );

    // Stopped and unused: undefined, its directory gone, the cache untouched.
    let removed = json(&ok(
        sarde(h).args(["rm", "--vm", "--format", "json", &imported])
    ));
    assert!(
        removed["bytes_freed"].as_u64().unwrap() > 4 << 20,
        "{removed}"
    );
    assert!(!vm::domain_exists(&imported));
    assert!(!h.join("VMs").join(&imported).exists());

    // Removing a tag keeps the blobs the other tags use.
    let swept = json(&ok(sarde(h).args([
        "rm",
        "--format",
        "json",
        "localhost/rm/a:1",
    ])));
    assert_eq!(swept["images"][0], "localhost/rm/a:1", "{swept}");
    assert_eq!(swept["blobs"], 0, "a:2 holds the same image: {swept}");
    let swept = json(&ok(sarde(h).args([
        "rm",
        "--format",
        "json",
        "localhost/rm/a:2",
    ])));
    assert!(swept["blobs"].as_u64().unwrap() >= 1, "{swept}");
    assert!(
        swept["blobs"].as_u64().unwrap() < 10,
        "most pieces are a:3's too: {swept}"
    );
    assert_eq!(listed_images(h), vec!["localhost/rm/a:3".to_string()]);
    let again = vm::unique("sarde-rm-again");
    source.vm.cleanup_also(&again);
    ok(sarde(h).args(["import", "-n", &again, "localhost/rm/a:3"]));
    assert!(same_guest_content(
        &h.join("VMs").join(&again).join("disk.qcow2"),
        &source.disk
    ));
    let err = fails(sarde(h).args(["rm", "localhost/rm/a:1"]));
    assert!(err.contains("no image localhost/rm/a:1"), "{err}");
}

#[test]
fn prune_collects_what_killed_processes_left_and_does_what_its_dry_run_said() {
    if !registry_tests_enabled(
        "prune_collects_what_killed_processes_left_and_does_what_its_dry_run_said",
    ) {
        return;
    }
    let registry = TestRegistry::start(RegistryOptions::default());
    let addr = registry.address();
    let source = data_vm("sarde-prune", "512M", 160, 7);
    let publisher = vm::workdir();
    let image = format!("{addr}/prune/big:1");
    ok(sarde(publisher.path()).args(["export", "--chunksize", "4MiB", &source.name, &image]));
    ok(sarde(publisher.path()).args(["push", "--insecure", &image]));

    let home = vm::workdir();
    let h = home.path();
    // Killed mid-way: an export (temporary blobs), a fetch (a partial download)
    // and an import (a staging directory).
    let mut export = spawn(sarde(h).args([
        "export",
        "--threads",
        "1",
        "--chunksize",
        "4MiB",
        &source.name,
        "localhost/prune/killed:1",
    ]));
    let layout = h.join("OCI/localhost/prune/killed");
    let blobs = layout.join("blobs/sha256");
    let writing = || {
        files_named(&blobs, ".tmp-")
            .iter()
            .any(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
    };
    // Stopped first, so the kill finds a temporary blob even if the one seen
    // was committed in the meantime: when none is left, go on and look again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            wait_for(deadline.saturating_duration_since(Instant::now()), writing),
            "the export wrote no temporary blob"
        );
        signal_process(&export, libc::SIGSTOP);
        if writing() {
            break;
        }
        signal_process(&export, libc::SIGCONT);
    }
    kill9(&mut export);
    for temp in files_named(&layout, ".tmp-") {
        backdate(&temp);
    }
    let mut fetch = spawn(sarde(h).args(["fetch", "--insecure", "--concurrency", "1", &image]));
    let partial = h.join("OCI/.sarde/partial");
    assert!(
        wait_for(Duration::from_secs(30), || files_named(&partial, "sha256-")
            .iter()
            .any(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))),
        "the fetch left no partial download"
    );
    kill9(&mut fetch);
    ok(sarde(h).args(["fetch", "--insecure", &image]));
    // An orphan blob, left by a writer that held no lease long ago (younger ones
    // wait prune-min-age: such a writer may be about to tag them).
    let orphan_layout = h.join(format!("OCI/{addr}/prune/big/blobs/sha256"));
    let orphan = orphan_layout.join("0".repeat(64));
    std::fs::write(&orphan, b"nobody's blob").unwrap();
    backdate(&orphan);
    let name = vm::unique("sarde-prune-imp");
    let mut import = spawn(sarde(h).args(["import", "--threads", "1", "-n", &name, &image]));
    assert!(
        wait_for(Duration::from_secs(30), || h
            .join("VMs")
            .join(format!(".staging-{name}"))
            .exists()),
        "the import made no staging directory"
    );
    kill9(&mut import);
    std::thread::sleep(Duration::from_millis(100));
    vm::undefine(&name);
    // Leftovers exist now; a second fetch made the partial unnecessary, a new one
    // stays for prune-min-age (a later run resumes it).
    assert!(!files_named(&layout, ".tmp-").is_empty());
    assert!(h.join("VMs").join(format!(".staging-{name}")).exists());
    let young = partial.join(format!("sha256-{}", "e".repeat(64)));
    std::fs::write(&young, b"a download in progress elsewhere").unwrap();
    let old = partial.join(format!("sha256-{}", "f".repeat(64)));
    std::fs::write(&old, b"an abandoned download").unwrap();
    backdate(&old);

    let dry = json(&ok(sarde(h).args([
        "prune",
        "--dry-run",
        "--format",
        "json",
    ])));
    assert_eq!(dry["dry_run"], true);
    let real = json(&ok(sarde(h).args(["prune", "--format", "json"])));
    assert_eq!(real["dry_run"], false);
    assert_eq!(dry["plan"], real["plan"], "the dry run said something else");
    let plan = &real["plan"];
    let paths = |key: &str| -> Vec<String> {
        plan[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["path"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(!paths("temps").is_empty(), "{plan}");
    assert_eq!(
        paths("partials"),
        vec![old.to_string_lossy().to_string()],
        "{plan}"
    );
    assert_eq!(paths("staging").len(), 1, "{plan}");
    assert!(
        plan["blobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["digest"] == format!("sha256:{}", "0".repeat(64))),
        "{plan}"
    );
    assert!(plan["images"].as_array().unwrap().is_empty(), "{plan}");
    let swept = &real["swept"];
    assert_eq!(swept["bytes_freed"], plan["bytes_freed"], "{swept}");
    assert!(files_named(&layout, ".tmp-").is_empty());
    assert!(!h.join("VMs").join(format!(".staging-{name}")).exists());
    assert!(young.exists() && !old.exists());
    // The fetched image is intact and imports.
    assert_eq!(listed_images(h), vec![image.clone()]);
    let imported = vm::unique("sarde-prune-ok");
    let _guard = Undefine(imported.clone());
    ok(sarde(h).args(["import", "-n", &imported, &image]));
    assert!(same_guest_content(
        &h.join("VMs").join(&imported).join("disk.qcow2"),
        &source.disk
    ));
    let _ = &source.work;
}

/// Makes a file look two hours old (older than the default prune-min-age).
fn backdate(path: &Path) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(7200))
        .unwrap();
}

/// Undefines a domain when dropped.
struct Undefine(String);

impl Drop for Undefine {
    fn drop(&mut self) {
        vm::undefine(&self.0);
    }
}

#[test]
fn a_prune_killed_at_any_point_leaves_every_tag_complete() {
    if !registry_tests_enabled("a_prune_killed_at_any_point_leaves_every_tag_complete") {
        return;
    }
    let source = data_vm("sarde-prune-kill", "64M", 0, 0);
    let home = vm::workdir();
    let h = home.path();
    // Many pieces, so a sweep has hundreds of blobs to delete.
    for i in 0..24u64 {
        fill_random(&source.disk, 0, 12, 100 + i);
        let tag = format!("localhost/kill/r{}:{}", i % 4, i);
        ok(sarde(h).args(["export", "--chunksize", "1MiB", &source.name, &tag]));
    }
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for run in 0..8 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = Duration::from_micros(rng % 150_000);
        let mut prune =
            spawn(
                sarde(h)
                    .env("SARDE_PRUNE_MIN_AGE", "0")
                    .args(["prune", "--space-budget", "0"]),
            );
        std::thread::sleep(delay);
        kill9(&mut prune);
        // Whatever it did, every remaining tag is whole.
        let remaining = listed_images(h);
        eprintln!(
            "run {run}: killed after {delay:?}, {} tags left",
            remaining.len()
        );
        if remaining.is_empty() {
            break;
        }
    }
    let remaining = listed_images(h);
    for tag in &remaining {
        let name = vm::unique("sarde-kill-imp");
        let _guard = Undefine(name.clone());
        ok(sarde(h).args(["import", "-n", &name, tag]));
        ok(sarde(h).args(["rm", "--vm", &name]));
    }
    // A later prune finishes the job: nothing but the cache's own state is left.
    ok(sarde(h)
        .env("SARDE_PRUNE_MIN_AGE", "0")
        .args(["prune", "--space-budget", "0"]));
    assert!(listed_images(h).is_empty());
    assert!(files_named(&h.join("OCI"), ".tmp-").is_empty());
    let blobs: usize = std::fs::read_dir(h.join("OCI/localhost/kill"))
        .unwrap()
        .flatten()
        .map(|r| {
            std::fs::read_dir(r.path().join("blobs/sha256"))
                .map(|d| d.count())
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(blobs, 0);
}

#[test]
fn concurrent_pulls_racing_a_prune_loop_all_succeed() {
    if !registry_tests_enabled("concurrent_pulls_racing_a_prune_loop_all_succeed") {
        return;
    }
    let registry = TestRegistry::start(RegistryOptions::default());
    let addr = registry.address();
    let source = data_vm("sarde-race", "64M", 0, 0);
    let publisher = vm::workdir();
    let mut disks = Vec::new();
    for v in 0..4u64 {
        fill_random(&source.disk, v * 2, 6, 40 + v);
        let image = format!("{addr}/race/app:{v}");
        ok(sarde(publisher.path()).args(["export", "--chunksize", "1MiB", &source.name, &image]));
        ok(sarde(publisher.path()).args(["push", "--insecure", &image]));
        let copy = source.work.path().join(format!("v{v}.qcow2"));
        std::fs::copy(&source.disk, &copy).unwrap();
        disks.push((image, copy));
    }
    let home = vm::workdir();
    let h = home.path().to_path_buf();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pruner = {
        let (stop, h) = (stop.clone(), h.clone());
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = sarde(&h)
                    .env("SARDE_PRUNE_MIN_AGE", "0")
                    .args(["prune", "--space-budget", "0"])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                runs += 1;
            }
            runs
        })
    };
    let names: Vec<String> = (0..4).map(|_| vm::unique("sarde-race-vm")).collect();
    let _guards: Vec<Undefine> = names.iter().cloned().map(Undefine).collect();
    let pulls: Vec<Child> = disks
        .iter()
        .zip(&names)
        .map(|((image, _), name)| spawn(sarde(&h).args(["pull", "--insecure", "-n", name, image])))
        .collect();
    for (mut pull, (image, _)) in pulls.into_iter().zip(&disks) {
        let status = pull.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(pull.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(status.success(), "pull of {image} failed: {err}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = pruner.join().unwrap();
    assert!(runs >= 2, "the prune loop ran {runs} times only");
    for ((image, disk), name) in disks.iter().zip(&names) {
        let pulled = h.join("VMs").join(name).join("disk.qcow2");
        assert!(same_guest_content(&pulled, disk), "{image} differs");
    }
}

/// A tmpfs of `mib` MiB at `dir`, unmounted when dropped: a small disk to fill.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, mib: u64) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        vm::run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}M,mode=0755"),
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        );
        SmallDisk(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_pull_that_cannot_fit_fails_first_and_auto_prune_frees_only_the_shortfall() {
    if !registry_tests_enabled(
        "a_pull_that_cannot_fit_fails_first_and_auto_prune_frees_only_the_shortfall",
    ) {
        return;
    }
    let registry = TestRegistry::start(RegistryOptions::default());
    let addr = registry.address();
    let source = data_vm("sarde-fit", "64M", 0, 0);
    let publisher = vm::workdir();
    let mut images = Vec::new();
    // Random data does not compress: each version is ~40 MiB of blobs.
    for v in 1..=4u64 {
        fill_random(&source.disk, 0, 40, 70 + v);
        let image = format!("{addr}/fit/app:{v}");
        ok(sarde(publisher.path()).args(["export", "--chunksize", "4MiB", &source.name, &image]));
        ok(sarde(publisher.path()).args(["push", "--insecure", &image]));
        images.push(image);
    }
    let home = vm::workdir();
    let disk = SmallDisk::mount(&home.path().join("small"), 256);
    let small = |cmd: &mut Command| {
        cmd.env("SARDE_OCIDIR", disk.0.join("OCI"))
            .env("SARDE_VMDIR", disk.0.join("VMs"))
            .env("SARDE_PRUNE_MIN_AGE", "0");
    };
    let h = home.path();
    // Three older versions in the cache: ~120 MiB of 256.
    for image in &images[..3] {
        let mut cmd = sarde(h);
        small(&mut cmd);
        ok(cmd.args(["fetch", "--insecure", image]));
        std::thread::sleep(Duration::from_millis(20));
    }
    // A collector spares blobs written up to 2 s before a live writer of their
    // layout began (clock slack: they may be that writer's); the pull below is
    // such a writer, and the fetches take well under a second each.
    std::thread::sleep(Duration::from_millis(2_100));
    let name = vm::unique("sarde-fit-vm");
    let _guard = Undefine(name.clone());
    let newest = &images[3];
    let manifest_blobs = |image: &str| -> Vec<String> {
        let dir = publisher
            .path()
            .join("OCI")
            .join(image.rsplit_once(':').unwrap().0);
        let index: Value =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
        let tag = image.rsplit_once(':').unwrap().1;
        let entry = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .unwrap();
        let digest = entry["digest"].as_str().unwrap();
        let manifest: Value = serde_json::from_slice(
            &std::fs::read(dir.join("blobs/sha256").join(&digest[7..])).unwrap(),
        )
        .unwrap();
        // The pieces; the domain XML is the same in every version.
        manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["mediaType"].as_str().unwrap().contains("disk.piece"))
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect()
    };
    let layers = manifest_blobs(newest);

    // Without auto-prune: a clear error before a single blob is downloaded.
    let mut cmd = sarde(h);
    small(&mut cmd);
    let err =
        fails(
            cmd.env("SARDE_AUTO_PRUNE", "no")
                .args(["pull", "--insecure", "-n", &name, newest]),
        );
    assert!(
        err.contains("not enough disk space") && err.contains("free"),
        "{err}"
    );
    for layer in &layers {
        assert_eq!(
            registry.blob_gets(layer),
            0,
            "{layer} was downloaded: {err}"
        );
    }
    assert!(!vm::domain_exists(&name));

    // With it: only the shortfall goes, least recently used first.
    let mut cmd = sarde(h);
    small(&mut cmd);
    ok(cmd.args(["pull", "--insecure", "-n", &name, newest]));
    let mut cmd = sarde(h);
    small(&mut cmd);
    let listed = json(&ok(cmd.args(["list", "--format", "json"])).replace('\n', " "));
    let tags: Vec<String> = listed["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["tag"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        tags,
        vec!["2", "3", "4"],
        "only the oldest had to go: {listed}"
    );
    assert!(same_guest_content(
        &disk.0.join("VMs").join(&name).join("disk.qcow2"),
        &source.disk
    ));
}
