//! A runner host over a dozen releases of one image: a publisher exports and
//! pushes twelve successive versions of `ci/guest:latest` (the test guest plus a
//! data disk of which a few MiB change each time), and the GitLab custom
//! executor, driven exactly as gitlab-runner drives it, runs one job per version
//! with a space budget of about three versions. Two jobs overlap: job `i` starts
//! while job `i-1` still runs, job `i-2` ends after job `i` ran.
//!
//! After every step: the cache and the VM directory stay under the budget, every
//! job ran, no running clone lost a file of its backing chain, and no blob of the
//! newest version was downloaded twice. At the end only the newest base VMs are
//! left: the executor removed the older ones itself as jobs finished.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sarde_e2e::guest::{self, GuestImage};
use sarde_e2e::registry::{RegistryOptions, TestRegistry};
use sarde_e2e::runner::{self, assert_ok, text};
use sarde_e2e::vm;
use sarde_e2e::{ok, sarde};
use serde_json::Value;

/// Versions published, one job each.
const VERSIONS: usize = 12;
/// Random data written into the data disk by the first version (MiB, from 0)...
const DATA_MIB: u64 = 8;
/// ...and rewritten by each later one, at a rotating offset inside it.
const CHANGE_MIB: u64 = 2;
/// Pieces small enough that a change of [`CHANGE_MIB`] touches few of them (the
/// 64 MiB default would make every version one new blob per disk).
const CHUNKSIZE: &str = "1MiB";
/// The budget, in bytes of one imported version (cache plus VM directory): about
/// three versions, tight enough that the automatic reclaim must run before the
/// twelfth (the cache grows by each version's own blobs until then).
const BUDGET_VERSIONS: f64 = 2.6;

/// The publisher's source VM, the registry and the executor's directories.
struct Host {
    registry: TestRegistry,
    guest: GuestImage,
    _source: guest::GuestVm,
    source: String,
    /// The source VM's data disk, rewritten in part for each version.
    data: PathBuf,
    publisher: tempfile::TempDir,
    work: tempfile::TempDir,
    image: String,
    config: PathBuf,
    /// The INI without `space-budget` (set once version 1 was measured).
    ini: String,
    /// Jobs prepared and not cleaned up yet, by job id: their version.
    running: RefCell<BTreeMap<String, usize>>,
    /// Image ids of the versions published: the executor's base VMs' names.
    bases: RefCell<Vec<String>>,
}

fn setup(test: &str) -> Option<Host> {
    let guest = runner::prerequisites(test)?;
    let registry = TestRegistry::start(RegistryOptions::default());
    let addr = registry.address();
    let work = vm::workdir();
    // The source VM: a copy of the guest's disk plus a data disk; never booted.
    let source = vm::unique("sarde-host-src");
    let disk = work.path().join(format!("{source}.qcow2"));
    std::fs::copy(&guest.disk, &disk).unwrap();
    let data = work.path().join(format!("{source}-data.qcow2"));
    vm::qcow2(&data, "64M", None);
    // All of the data allocated now: later versions rewrite clusters in place,
    // so the file keeps its layout and only the pieces they touch change.
    vm::fill_random(&data, 0, DATA_MIB, 1000);
    let source_vm = guest.define_disks(&source, &disk, &[&data]);

    let state = work.path().join("state");
    let clones = work.path().join("clones");
    let config = work.path().join("executor.ini");
    // prune-min-age 0: the test does not wait an hour for anything to be removable.
    let ini = format!(
        "[DEFAULT]\nconnect = {}\nocidir = {}\nvmdir = {}\nclonedir = {}\nstate-dir = {}\n\
         timeout = 90\ninsecure = {addr}\nguest-builds-dir = /root/builds\nguest-cache-dir = /root/cache\n\
         pull-policy = always\nauto-prune = yes\nprune-min-age = 0\n",
        vm::LIBVIRT_URI,
        work.path().join("OCI").display(),
        work.path().join("VMs").display(),
        clones.display(),
        state.display(),
    );
    std::fs::write(&config, &ini).unwrap();
    Some(Host {
        image: format!("{addr}/ci/guest:latest"),
        registry,
        guest,
        _source: source_vm,
        source,
        data,
        publisher: vm::workdir(),
        work,
        config,
        ini,
        running: RefCell::new(BTreeMap::new()),
        bases: RefCell::new(Vec::new()),
    })
}

impl Drop for Host {
    fn drop(&mut self) {
        // After a failure too: no clone keeps running, no base VM stays defined.
        let jobs: Vec<String> = self.running.borrow().keys().cloned().collect();
        for job in jobs {
            let _ = self.executor(&job).arg("cleanup").output();
            vm::undefine(&format!("gitlab-{job}"));
        }
        for base in self.bases.borrow().iter() {
            vm::undefine(base);
        }
    }
}

/// Bytes on disk of the executor's cache and VM directory.
#[derive(Debug, Clone, Copy)]
struct DiskUse {
    cache: u64,
    vms: u64,
}

impl DiskUse {
    fn total(&self) -> u64 {
        self.cache + self.vms
    }
}

/// What `du` sees in `work`'s `OCI` (the cache) and `VMs`: every allocated block,
/// hard links once (one `du` over both), directories and sarde's own state
/// included. `None` when `du` failed (a file vanished under it, say).
fn disk_use(work: &Path) -> Option<DiskUse> {
    let (cache, vms) = (work.join("OCI"), work.join("VMs"));
    let out = Command::new("du")
        .args(["-s", "--block-size=1"])
        .arg(&cache)
        .arg(&vms)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let mut sizes = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let (bytes, path) = line.split_once('\t')?;
        sizes.insert(PathBuf::from(path), bytes.trim().parse::<u64>().ok()?);
    }
    Some(DiskUse {
        cache: sizes.get(&cache).copied().unwrap_or(0),
        vms: sizes.get(&vms).copied().unwrap_or(0),
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

impl Host {
    /// Version `version` of the image: the data disk changed (after the first),
    /// exported by the publisher and pushed. Returns the image id.
    fn publish(&self, version: usize) -> String {
        if version > 1 {
            // New random data over CHANGE_MIB of the first DATA_MIB, at an offset
            // that moves each version: most pieces stay, a few change.
            let slots = DATA_MIB / CHANGE_MIB;
            let offset = (version as u64 - 2) % slots * CHANGE_MIB;
            vm::fill_random(&self.data, offset, CHANGE_MIB, 1000 + version as u64);
        }
        let image_id = ok(sarde(self.publisher.path())
            .args(["export", "--chunksize", CHUNKSIZE, "--vmconfig"])
            .arg(&self.guest.access)
            .args([&self.source, &self.image]));
        self.bases.borrow_mut().push(image_id.clone());
        ok(sarde(self.publisher.path()).args(["push", "--insecure", &self.image]));
        image_id
    }

    /// The blobs (config and layers) of the tag's manifest as the registry has it.
    fn published_blobs(&self) -> Vec<String> {
        let url = format!("{}/v2/ci/guest/manifests/latest", self.registry.url());
        let manifest = vm::run(
            "curl",
            &[
                "-sf",
                "-H",
                "Accept: application/vnd.oci.image.manifest.v1+json",
                "-H",
                "Accept: application/vnd.docker.distribution.manifest.v2+json",
                &url,
            ],
        );
        let manifest: Value = serde_json::from_str(&manifest).expect("the manifest is JSON");
        let mut blobs = vec![
            manifest["config"]["digest"]
                .as_str()
                .expect("a config")
                .to_string(),
        ];
        for layer in manifest["layers"].as_array().expect("layers") {
            blobs.push(layer["digest"].as_str().expect("a digest").to_string());
        }
        blobs
    }

    /// The executor as gitlab-runner starts it for job `job`.
    fn executor(&self, job: &str) -> Command {
        runner::executor(&self.config, job, &self.image, self.work.path())
    }

    fn prepare(&self, job: &str, version: usize) -> Output {
        // Registered first: a prepare that fails half-way still gets its cleanup.
        self.running.borrow_mut().insert(job.to_string(), version);
        self.executor(job).arg("prepare").output().unwrap()
    }

    /// The job's script as the runner hands it to one stage.
    fn run_stage(&self, job: &str, stage: &str, body: &str) -> Output {
        let script = runner::stage_script(self.work.path(), job, stage, body);
        self.executor(job)
            .arg("run")
            .arg(&script)
            .arg(stage)
            .output()
            .unwrap()
    }

    fn cleanup(&self, job: &str) -> Output {
        let out = self.executor(job).arg("cleanup").output().unwrap();
        self.running.borrow_mut().remove(job);
        out
    }

    /// Sets the space budget (bytes) for the next prepares.
    fn set_budget(&self, budget: u64) {
        std::fs::write(
            &self.config,
            format!("{}space-budget = {budget}\n", self.ini),
        )
        .unwrap();
    }

    /// `sarde` on the executor's cache and VM directory.
    fn sarde_here(&self) -> Command {
        let mut cmd = sarde(self.work.path());
        cmd.env("SARDE_OCIDIR", self.work.path().join("OCI"))
            .env("SARDE_VMDIR", self.work.path().join("VMs"));
        cmd
    }

    /// `sarde list --format json` of the executor's directories.
    fn listing(&self) -> Value {
        let out = ok(self.sarde_here().args(["list", "--format", "json"]));
        serde_json::from_str(&out).expect("sarde list prints JSON")
    }

    /// What `du` sees now.
    fn disk_use(&self) -> DiskUse {
        disk_use(self.work.path()).expect("du measures the cache and VM directory")
    }

    /// Runs `f` while another thread measures the disk use every 100 ms; returns
    /// what `f` returned and the highest total seen (a pull's peak: the new
    /// version's blobs and disks next to everything older that is still there).
    fn peak<T>(&self, f: impl FnOnce() -> T) -> (T, DiskUse) {
        let done = AtomicBool::new(false);
        let work = self.work.path();
        std::thread::scope(|scope| {
            let sampler = scope.spawn(|| {
                let mut peak = DiskUse { cache: 0, vms: 0 };
                while !done.load(Ordering::Relaxed) {
                    if let Some(now) = disk_use(work) {
                        if now.total() > peak.total() {
                            peak = now;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                peak
            });
            let value = f();
            done.store(true, Ordering::Relaxed);
            let peak = sampler.join().unwrap();
            (value, peak)
        })
    }

    /// The base VMs (imported, by name) the executor's VM directory holds.
    fn base_vms(&self) -> Vec<String> {
        let mut names: Vec<String> = self.listing()["vms"]
            .as_array()
            .expect("vms")
            .iter()
            .map(|v| v["name"].as_str().expect("a name").to_string())
            .collect();
        names.sort();
        names
    }

    /// Every job still running has its domain running and every file of every
    /// disk's backing chain in place (`qemu-img` opens the whole chain).
    fn assert_chains_intact(&self, step: usize) {
        let vms = self.work.path().join("VMs");
        for (job, &version) in self.running.borrow().iter() {
            let name = format!("gitlab-{job}");
            let state = vm::run("virsh", &["-q", "-c", vm::LIBVIRT_URI, "domstate", &name]);
            assert_eq!(state.trim(), "running", "step {step}: {name} is {state}");
            let disks = vm::run(
                "virsh",
                &[
                    "-q",
                    "-c",
                    vm::LIBVIRT_URI,
                    "domblklist",
                    "--details",
                    &name,
                ],
            );
            let mut checked = 0;
            for line in disks.lines() {
                // TYPE DEVICE TARGET SOURCE
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() < 4 || fields[0] != "file" || fields[1] != "disk" {
                    continue;
                }
                let source = fields[3..].join(" ");
                let top = open_file(&name, &source);
                let out = Command::new("qemu-img")
                    .args(["info", "--backing-chain", "-U", "--output=json"])
                    .arg(&top)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "step {step}: {name} {}: the backing chain of {source} is broken: {}",
                    fields[2],
                    String::from_utf8_lossy(&out.stderr)
                );
                let chain: Value = serde_json::from_slice(&out.stdout).unwrap();
                let chain = chain.as_array().expect("a chain");
                assert!(
                    chain.len() >= 2,
                    "step {step}: {name}: {source} is not an overlay"
                );
                for layer in &chain[1..] {
                    let file = layer["filename"].as_str().expect("a file name");
                    assert!(
                        Path::new(file).is_file(),
                        "step {step}: {name}: {file} (backing {source}) is gone"
                    );
                }
                // A clone of its own version's base VM, not of an older one.
                let base = chain.last().unwrap()["filename"].as_str().unwrap();
                assert!(
                    Path::new(base).starts_with(vms.join(&self.bases.borrow()[version - 1])),
                    "step {step}: {name} (version {version}) runs on {base}"
                );
                checked += 1;
            }
            assert_eq!(checked, 2, "step {step}: {name}: disks {disks}");
        }
    }

    /// No blob of the tag's current manifest was served more than once.
    fn assert_downloaded_once(&self, step: usize, blobs: &[String]) {
        for blob in blobs {
            let gets = self.registry.blob_gets(blob);
            assert!(
                gets <= 1,
                "step {step}: {blob} of the newest version was downloaded {gets} times"
            );
        }
    }
}

/// A path that opens the disk file `source` of the running domain `name`: the
/// file itself, or, when it was unlinked (the executor's clones are ephemeral:
/// their overlays are unlinked once QEMU holds them open), QEMU's descriptor of it
/// in `/proc`. Its backing chain is then found by the references inside.
fn open_file(name: &str, source: &str) -> PathBuf {
    if Path::new(source).exists() {
        return PathBuf::from(source);
    }
    let pid_file = format!("/run/libvirt/qemu/{name}.pid");
    let pid =
        std::fs::read_to_string(&pid_file).unwrap_or_else(|e| panic!("{name}: {pid_file}: {e}"));
    let fds = Path::new("/proc").join(pid.trim()).join("fd");
    let deleted = format!("{source} (deleted)");
    std::fs::read_dir(&fds)
        .unwrap_or_else(|e| panic!("{name}: {}: {e}", fds.display()))
        .flatten()
        .map(|e| e.path())
        .find(|fd| {
            std::fs::read_link(fd).is_ok_and(|target| target.as_os_str() == deleted.as_str())
        })
        .unwrap_or_else(|| panic!("{name}: QEMU does not hold {source} open"))
}

/// `prepare`'s timing line.
fn timings(stderr: &str) -> String {
    runner::ready_line(stderr).unwrap_or_default()
}

#[test]
fn a_runner_host_follows_twelve_versions_within_its_space_budget() {
    let Some(host) = setup("a_runner_host_follows_twelve_versions_within_its_space_budget") else {
        return;
    };
    let started = Instant::now();
    let job = |version: usize| format!("{}-{version}", std::process::id());
    let mut budget = None;
    let mut published: Vec<Vec<String>> = Vec::new();
    // Whether the cache ever shrank: the automatic reclaim ran.
    let (mut cache_before, mut reclaimed) = (0, false);
    println!("disk use per step (du of the executor's cache and VM directory):");
    for version in 1..=VERSIONS {
        let t = Instant::now();
        host.publish(version);
        let blobs = host.published_blobs();
        let publish_seconds = t.elapsed().as_secs_f64();
        let new_blobs = match published.last() {
            Some(before) => blobs.iter().filter(|b| !before.contains(b)).count(),
            None => blobs.len(),
        };
        assert!(
            version == 1 || (new_blobs > 0 && new_blobs * 4 < blobs.len()),
            "version {version}: {new_blobs} of {} blobs are new: most should be shared",
            blobs.len()
        );
        published.push(blobs.clone());

        // The job of this version starts while the previous one still runs.
        let t = Instant::now();
        let (out, peak_prepare) = host.peak(|| host.prepare(&job(version), version));
        assert_ok(&format!("prepare of version {version}"), &out);
        let prepare_seconds = t.elapsed().as_secs_f64();
        let prepare_log = text(&out).1;
        for line in prepare_log.lines().filter(|l| l.starts_with("Removed ")) {
            println!("  prepare {version}: {line}");
        }
        host.assert_chains_intact(version);
        let out = host.run_stage(
            &job(version),
            "step_script",
            &format!("echo job of version {version} on $(hostname)"),
        );
        assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
        assert!(
            text(&out)
                .0
                .contains(&format!("job of version {version} on sarde-guest")),
            "{:?}",
            text(&out)
        );

        if version == 1 {
            // One version as the executor stores it; the budget holds a few.
            let listing = host.listing();
            let (cache, vms) = (
                listing["cache_bytes"].as_u64().unwrap(),
                listing["vm_bytes"].as_u64().unwrap(),
            );
            let bytes = ((cache + vms) as f64 * BUDGET_VERSIONS) as u64;
            println!(
                "one version: {} (cache {}, VM {}); space budget {BUDGET_VERSIONS} x = {bytes} B ({})",
                mib(cache + vms),
                mib(cache),
                mib(vms),
                mib(bytes)
            );
            host.set_budget(bytes);
            budget = Some(bytes);
        }
        let budget = budget.expect("set at version 1");

        // The job two versions back ends now, so two jobs run between steps.
        let mut cleanup_log = String::new();
        let mut peak_cleanup = DiskUse { cache: 0, vms: 0 };
        if version > 2 {
            let (out, peak) = host.peak(|| host.cleanup(&job(version - 2)));
            assert_ok(&format!("cleanup of job {}", version - 2), &out);
            peak_cleanup = peak;
            cleanup_log = text(&out).1;
            for line in cleanup_log.lines().filter(|l| l.starts_with("Removed ")) {
                println!("  cleanup {}: {line}", version - 2);
            }
        }

        let used = host.disk_use();
        reclaimed |= used.cache < cache_before;
        cache_before = used.cache;
        let listing = host.listing();
        let peak = [peak_prepare, peak_cleanup, used]
            .into_iter()
            .max_by_key(DiskUse::total)
            .unwrap();
        // The disk-use curve: one line per step, then the details.
        println!(
            "disk use {version:2}: cache {:>9} B  VMs {:>9} B  total {:>9} B  peak {:>9} B  budget {budget} B",
            used.cache,
            used.vms,
            used.total(),
            peak.total(),
        );
        println!(
            "  {} + {} = {}, peak {} of {}; sarde list: cache {}, VMs {}; {} base VMs; \
             {new_blobs} of {} blobs new; publish {publish_seconds:.1}s, prepare {prepare_seconds:.1}s",
            mib(used.cache),
            mib(used.vms),
            mib(used.total()),
            mib(peak.total()),
            mib(budget),
            mib(listing["cache_bytes"].as_u64().unwrap()),
            mib(listing["vm_bytes"].as_u64().unwrap()),
            listing["vms"].as_array().unwrap().len(),
            blobs.len(),
        );
        println!("  {}", timings(&prepare_log));
        // (Version 1 was measured to set the budget, after its pull.)
        let checked = if version == 1 { used } else { peak };
        assert!(
            checked.total() <= budget,
            "step {version}: the cache and VMs took {} bytes (cache {}, VMs {}), over the budget of {budget}\n\
             prepare: {prepare_log}\ncleanup: {cleanup_log}\nlisting now: {listing:#}",
            checked.total(),
            checked.cache,
            checked.vms,
        );
        host.assert_chains_intact(version);
        host.assert_downloaded_once(version, &blobs);
    }

    assert!(
        reclaimed,
        "the cache never shrank: the budget never made the executor reclaim space"
    );

    // Only the base VMs of the two running jobs are left: the executor removed
    // every older one itself, as soon as no job used it.
    let bases = host.bases.borrow().clone();
    let mut newest: Vec<String> = bases[VERSIONS - 2..].to_vec();
    newest.sort();
    assert_eq!(host.base_vms(), newest, "base VMs left");
    for (i, base) in bases[..VERSIONS - 2].iter().enumerate() {
        assert!(
            !vm::domain_exists(base),
            "the base VM of version {} ({base}) is still defined",
            i + 1
        );
        assert!(
            !host.work.path().join("VMs").join(base).exists(),
            "the files of version {}'s base VM are still there",
            i + 1
        );
    }

    // The last jobs end: the second-newest base goes with its job, the newest stays
    // for the next job.
    for version in VERSIONS - 1..=VERSIONS {
        assert_ok("cleanup", &host.cleanup(&job(version)));
        assert!(!vm::domain_exists(&format!("gitlab-{}", job(version))));
    }
    assert_eq!(
        host.base_vms(),
        vec![bases[VERSIONS - 1].clone()],
        "base VMs left after the last job"
    );
    // No blob of any version was ever fetched twice.
    for (i, blobs) in published.iter().enumerate() {
        host.assert_downloaded_once(i + 1, blobs);
    }
    let used = host.disk_use();
    println!(
        "after the last job: cache {} B, VMs {} B ({} + {}); {} versions in {:.0}s",
        used.cache,
        used.vms,
        mib(used.cache),
        mib(used.vms),
        VERSIONS,
        started.elapsed().as_secs_f64()
    );
}
