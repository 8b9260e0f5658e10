//! `lifecycle-bench`: `sarde list` and `sarde prune --dry-run` on a synthetic cache
//! of many small images (by default 200 images in 20 repositories, about 20 000
//! blobs), against the target of under 0.5 s each.
//!
//! The cache is written with `sarde-transport-oci-dir`'s `Layout`, so its layouts
//! are exactly what sarde writes: per image a config blob and `--blobs-per-image`
//! layers of a few hundred bytes (the first two shared by the tags of their
//! repository, as base layers are), a manifest, a tag and a usage record; plus 1%
//! orphan blobs that no index entry reaches, for prune to plan. The blobs are small
//! on purpose: both commands only stat and parse metadata, so the number of files
//! is what costs, not their size.
//!
//! sarde runs with `SARDE_CONNECT=test:///default`, libvirt's in-process test
//! driver: no daemon, so the times are the cache work, not a hypervisor's. The
//! page cache is warm (the cache has just been written). Needs no root.
//!
//! ```text
//! cargo build --release -p sarde -p sarde-bench
//! target/release/lifecycle-bench --sarde target/release/sarde [--images 200]
//!     [--blobs-per-image 100] [--runs 5] [--keep]
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use sarde_api::Digest;
use sarde_api::oci::{Descriptor, ImageManifest, media_types};
use sarde_bench::vm::{TimedRun, fill_random, run_timed, succeeded, xorshift};
use sarde_transport_oci_dir::Layout;
use serde_json::Value;

#[derive(Parser)]
#[command(about = "sarde list and sarde prune --dry-run on a synthetic cache of many images")]
struct Args {
    /// The sarde binary to measure (build it with --release)
    #[arg(long, default_value = "target/release/sarde")]
    sarde: PathBuf,
    /// Images (tags) in the cache, 10 per repository
    #[arg(long, default_value_t = 200)]
    images: usize,
    /// Layers each image references (the first two shared within its repository)
    #[arg(long, default_value_t = 100)]
    blobs_per_image: usize,
    /// Timed runs of each command; the table gives their median and best
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Keep the temporary directory (cache, outputs) afterwards
    #[arg(long)]
    keep: bool,
}

/// Each command must take less than this (median of the runs).
const TARGET_SECONDS: f64 = 0.5;
/// Tags per repository: a runner host keeps a few versions of each image.
const TAGS_PER_REPO: usize = 10;
/// Layers shared by every tag of a repository (a common base).
const SHARED_LAYERS: usize = 2;
/// Orphan blobs per this many layer references (1%).
const ORPHAN_EVERY: usize = 100;
/// The registry the synthetic images came from (a directory level of the cache).
const HOST: &str = "registry.bench:5000";
/// What sarde's native format calls a zstd-compressed disk piece.
const PIECE_TYPE: &str = "application/vnd.sardinecake.disk.piece.v1+zstd";
/// Writers at once while building: fsync latency, not CPU, bounds the build.
const BUILDERS: usize = 8;

/// One repository of the synthetic cache, as built.
#[derive(Default)]
struct Built {
    images: usize,
    layers: usize,
    configs: usize,
    manifests: usize,
    /// Digest and file of each orphan blob.
    orphans: Vec<(String, PathBuf)>,
}

impl Built {
    fn add(&mut self, other: Built) {
        self.images += other.images;
        self.layers += other.layers;
        self.configs += other.configs;
        self.manifests += other.manifests;
        self.orphans.extend(other.orphans);
    }

    fn blobs(&self) -> usize {
        self.layers + self.configs + self.manifests + self.orphans.len()
    }
}

/// Wall times of one command's runs.
struct Timing {
    operation: &'static str,
    seconds: Vec<f64>,
}

impl Timing {
    fn median(&self) -> f64 {
        let mut s = self.seconds.clone();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        }
    }

    fn best(&self) -> f64 {
        self.seconds.iter().copied().fold(f64::INFINITY, f64::min)
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.images > 0, "--images must be at least 1");
    ensure!(
        args.blobs_per_image >= SHARED_LAYERS,
        "--blobs-per-image must be at least {SHARED_LAYERS}"
    );
    let sarde = std::fs::canonicalize(&args.sarde)
        .context("the sarde binary (build it with cargo build --release -p sarde)")?;
    let tmp = tempfile::Builder::new()
        .prefix("sarde-lifecycle-bench-")
        .tempdir()
        .context("creating the temporary directory")?;
    let result = bench(&args, &sarde, tmp.path());
    if args.keep {
        eprintln!("kept {}", tmp.keep().display());
    }
    result
}

fn bench(args: &Args, sarde: &Path, dir: &Path) -> Result<()> {
    let oci = dir.join("OCI");
    std::fs::create_dir_all(dir.join("VMs"))?;
    std::fs::create_dir_all(dir.join("out"))?;
    eprintln!(
        "building {} images with {} layers each under {}…",
        args.images,
        args.blobs_per_image,
        oci.display()
    );
    let start = Instant::now();
    let built = build_cache(&oci, args.images, args.blobs_per_image)?;
    eprintln!(
        "    {} blobs in {:.1} s",
        built.blobs(),
        start.elapsed().as_secs_f64()
    );
    let (bytes, allocated) = disk_usage(&oci)?;

    let sarde_cmd = |sub: &[&str]| {
        let mut c = Command::new(sarde);
        // Only what is set here: a SARDE_* of the caller's would change the result.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SARDE_") {
                c.env_remove(key);
            }
        }
        c.env("SARDE_CONF_FILES", "")
            .env("HOME", dir)
            .env("SARDE_OCIDIR", &oci)
            .env("SARDE_VMDIR", dir.join("VMs"))
            .env("SARDE_CONNECT", "test:///default")
            // The orphans were just written: without this, prune would give them
            // prune-min-age (a writer holding no lease may be about to tag them).
            .env("SARDE_PRUNE_MIN_AGE", "0")
            .args(sub);
        c
    };
    let orphans: BTreeSet<&str> = built.orphans.iter().map(|(d, _)| d.as_str()).collect();
    let mut list = Timing {
        operation: "sarde list",
        seconds: Vec::new(),
    };
    let mut prune = Timing {
        operation: "sarde prune --dry-run",
        seconds: Vec::new(),
    };
    // Interleaved, so a change in the machine's load hits both commands alike.
    for run in 1..=args.runs.max(1) {
        let (seconds, out) = measure(
            dir,
            list.operation,
            &mut sarde_cmd(&["list", "--format", "json"]),
        )?;
        check_list(&out, built.images).with_context(|| format!("sarde list, run {run}"))?;
        list.seconds.push(seconds);
        let (seconds, out) = measure(
            dir,
            prune.operation,
            &mut sarde_cmd(&["prune", "--dry-run", "--format", "json"]),
        )?;
        check_prune(&out, &orphans).with_context(|| format!("sarde prune --dry-run, run {run}"))?;
        prune.seconds.push(seconds);
    }
    // A dry run must not have removed anything.
    for (digest, path) in &built.orphans {
        ensure!(
            path.exists(),
            "the orphan blob {digest} is gone after a dry run"
        );
    }

    println!();
    println!(
        "measured: {} images in {} repositories, {} blobs ({} layers, {} configs, {} manifests, {} orphans), \
         {:.1} MB in files, {:.1} MB allocated on disk; page cache warm; {} run(s) each",
        built.images,
        built.images.div_ceil(TAGS_PER_REPO),
        built.blobs(),
        built.layers,
        built.configs,
        built.manifests,
        built.orphans.len(),
        bytes as f64 / 1e6,
        allocated as f64 / 1e6,
        args.runs.max(1)
    );
    println!(
        "libvirt: test:///default (in-process test driver, no daemon): the times are the cache work alone"
    );
    println!();
    println!("| operation | median s | best s | target | median / target | verdict |");
    println!("| --- | ---: | ---: | --- | ---: | --- |");
    for t in [&list, &prune] {
        let median = t.median();
        println!(
            "| {} | {median:.3} | {:.3} | under {TARGET_SECONDS} s | {:.2} | {} |",
            t.operation,
            t.best(),
            median / TARGET_SECONDS,
            if median < TARGET_SECONDS {
                "PASS"
            } else {
                "FAIL"
            }
        );
    }
    Ok(())
}

/// Writes the cache: `images` tags spread over repositories of [`TAGS_PER_REPO`],
/// several repositories at a time.
fn build_cache(oci: &Path, images: usize, layers: usize) -> Result<Built> {
    let repos = images.div_ceil(TAGS_PER_REPO);
    let next = AtomicUsize::new(0);
    let results: Vec<Result<Built>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..BUILDERS.min(repos))
            .map(|_| {
                scope.spawn(|| {
                    let mut built = Built::default();
                    loop {
                        let r = next.fetch_add(1, Ordering::Relaxed);
                        if r >= repos {
                            return Ok(built);
                        }
                        let tags = TAGS_PER_REPO.min(images - r * TAGS_PER_REPO);
                        built.add(build_repo(oci, r, tags, layers)?);
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| bail!("a builder panicked")))
            .collect()
    });
    let mut built = Built::default();
    for result in results {
        built.add(result?);
    }
    Ok(built)
}

/// One repository: `tags` images of `layers` layers each (the first
/// [`SHARED_LAYERS`] common to all of them), their usage records, and the orphans.
fn build_repo(oci: &Path, repo: usize, tags: usize, layers: usize) -> Result<Built> {
    let key = format!("{HOST}/sardines/vm-{repo:03}");
    let layout = Layout::create(oci.join(&key))?;
    let mut built = Built::default();
    let put = |seed: u64, media_type: &str| -> Result<Descriptor> {
        let (digest, size) = layout.write_blob(&blob_content(seed))?;
        Ok(Descriptor::new(media_type, digest, size))
    };
    let seed = |kind: u64, tag: usize, index: usize| {
        (kind << 60) | ((repo as u64) << 40) | ((tag as u64) << 24) | index as u64
    };
    let shared: Vec<Descriptor> = (0..SHARED_LAYERS)
        .map(|i| put(seed(1, 0, i), PIECE_TYPE))
        .collect::<Result<_>>()?;
    built.layers += shared.len();
    for tag in 0..tags {
        let mut pieces = shared.clone();
        for i in SHARED_LAYERS..layers {
            pieces.push(put(seed(2, tag, i), PIECE_TYPE)?);
        }
        built.layers += layers - SHARED_LAYERS;
        // sarde's piece annotations, so manifests are as long as real ones.
        for (i, piece) in pieces.iter_mut().enumerate() {
            let offset = (i as u64) << 26;
            piece.annotations.extend([
                ("org.sardinecake.piece.offset".into(), offset.to_string()),
                (
                    "org.sardinecake.piece.size".into(),
                    (1u64 << 26).to_string(),
                ),
                (
                    "org.sardinecake.piece.digest".into(),
                    Digest::sha256_of(&offset.to_le_bytes()).to_string(),
                ),
            ]);
        }
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "created": "2025-01-01T00:00:00Z",
            "comment": format!("{key}:v{tag}"),
        });
        let config = serde_json::to_vec(&config)?;
        let (digest, size) = layout.write_blob(&config)?;
        built.configs += 1;
        let config = Descriptor::new(media_types::IMAGE_CONFIG, digest, size);
        let manifest = ImageManifest::new(config, pieces).to_bytes();
        let manifest = layout.put_manifest(&manifest, media_types::IMAGE_MANIFEST)?;
        built.manifests += 1;
        layout.set_tag(&format!("v{tag}"), &manifest)?;
        // As a pull records it; `list` reads it for LAST USED.
        sarde_lifecycle::usage::record_image_use(oci, &key, &manifest.digest)?;
        built.images += 1;
    }
    // Left by an interrupted pull or an untag: reachable from no index entry.
    let orphans = (tags * layers).div_ceil(ORPHAN_EVERY);
    for i in 0..orphans {
        let digest = put(seed(3, 0, i), PIECE_TYPE)?.digest;
        built
            .orphans
            .push((digest.to_string(), layout.blob_path(&digest)));
    }
    Ok(built)
}

/// 200 to 599 pseudo-random bytes, different for every seed.
fn blob_content(seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let len = 200 + (xorshift(&mut state) % 400) as usize;
    let mut data = seed.to_le_bytes().to_vec();
    data.resize(len, 0);
    fill_random(&mut data[8..], &mut state);
    data
}

/// Runs one sarde command with its output in files under `<dir>/out` (so reading a
/// pipe is not part of its time); returns its wall time and standard output, and
/// fails with its standard error.
fn measure(dir: &Path, label: &str, cmd: &mut Command) -> Result<(f64, String)> {
    let out_path = dir.join("out/stdout");
    let err_path = dir.join("out/stderr");
    let TimedRun {
        seconds,
        status,
        peak_rss_mib,
    } = run_timed(cmd, &out_path, &err_path)?;
    if !succeeded(status) {
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        bail!("{cmd:?} failed with wait status {status:#x}:\n{stderr}");
    }
    eprintln!("    {label:<22} {seconds:.3} s, peak RSS {peak_rss_mib:.0} MiB");
    Ok((seconds, std::fs::read_to_string(&out_path)?))
}

/// `list` must show every image, none of them broken.
fn check_list(out: &str, images: usize) -> Result<()> {
    let listing: Value = serde_json::from_str(out).context("list printed no JSON")?;
    let entries = listing["images"]
        .as_array()
        .context("list's JSON has no `images` array")?;
    ensure!(
        entries.len() == images,
        "list shows {} images, the cache holds {images}",
        entries.len()
    );
    let broken = entries.iter().filter(|e| e["broken"] == true).count();
    ensure!(broken == 0, "list calls {broken} of the images broken");
    Ok(())
}

/// A dry-run prune must plan exactly the orphans, and no image.
fn check_prune(out: &str, orphans: &BTreeSet<&str>) -> Result<()> {
    let report: Value = serde_json::from_str(out).context("prune printed no JSON")?;
    ensure!(report["dry_run"] == true, "prune's report is not a dry run");
    let planned: BTreeSet<&str> = report["plan"]["blobs"]
        .as_array()
        .context("prune's JSON has no `plan.blobs` array")?
        .iter()
        .filter_map(|b| b["digest"].as_str())
        .collect();
    ensure!(
        planned == *orphans,
        "prune plans {} blobs, {} of them orphans; there are {} orphans",
        planned.len(),
        planned.intersection(orphans).count(),
        orphans.len()
    );
    let images = report["plan"]["images"].as_array().map_or(0, Vec::len);
    ensure!(images == 0, "prune plans to remove {images} images");
    Ok(())
}

/// Bytes of the files under `path` and the bytes they take on disk (allocated
/// blocks), each counted once per directory entry.
fn disk_usage(path: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0);
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            let (bytes, allocated) = disk_usage(&entry.path())?;
            total = (total.0 + bytes, total.1 + allocated);
        } else {
            total = (total.0 + meta.len(), total.1 + meta.blocks() * 512);
        }
    }
    Ok(total)
}
