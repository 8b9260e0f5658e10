//! `registry-bench`: sarde push, fetch and pull against the Python sardinecake tool
//! (which drives `skopeo copy`), side by side on the same VM in the same run,
//! against a private registry on loopback, with peak memory and bytes moved; then
//! an update of ~1% of the disk, to see that a fetch moves only the changed pieces.
//!
//! Needs root, libvirtd (scripts/start-services.sh), Debian's `docker-registry`,
//! `skopeo`, `qemu-io` and the Python tool (scripts/install-python-tool.sh):
//!
//! ```text
//! cargo build --release -p sarde --bin sarde
//! cargo run --release -p sarde-bench --bin registry-bench -- --sarde target/release/sarde
//! ```
//!
//! The registry is its own `docker-registry serve` on a free 127.0.0.1 port with its
//! storage in the work directory, so the shared test registry (:5000) never sees
//! the benchmark. The Python tool reaches it over plain HTTP through a
//! `registries.conf` marking it `insecure` in a private `$HOME` (skopeo 1.9 reads
//! `$HOME/.config/containers/registries.conf` and ignores `CONTAINERS_REGISTRIES_CONF`,
//! which is set as well for other versions). Its images use local names without a port
//! (`bench/python:latest`) and `--source`/`--target` for the registry reference:
//! `skopeo copy … oci:DIR/127.0.0.1:PORT/…` would split the path at the port's
//! colon. Everything (VMs, registry, work directory) goes at the end, also on
//! errors and on Ctrl-C.
//!
//! "push alone" is the push half of "export + push" (a second push of the same
//! image would only find every blob present). The update compares the fetch's
//! `bytes_received` (from `--format json`) with the blobs that are new in the
//! manifest, and also says how many of those hold unchanged bytes (same
//! `org.sardinecake.piece.digest`), i.e. were merely compressed differently.
//!
//! The air-gapped path is measured in the same run against the registry's:
//! the exported image pushed into an `oci-archive:` file instead of the
//! registry, and pulled from that file into an empty cache and VM directory
//! instead of from the registry (archive vs registry, same machine, same image).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use sarde_bench::vm::{
    TimedRun, define_vm, drop_caches, fill_random, run_timed, succeeded, undefine, write_raw,
};
use serde_json::Value;

#[derive(Parser)]
#[command(
    about = "sarde push/fetch/pull against the Python tool, side by side, on a loopback registry"
)]
struct Args {
    /// The sarde binary to measure (build it with --release)
    #[arg(long, default_value = "target/release/sarde")]
    sarde: PathBuf,
    /// The Python tool's sarde
    #[arg(
        long,
        default_value = "/var/lib/sardinecake-test/python-sardinecake/bin/sarde"
    )]
    python: PathBuf,
    /// Work directory (needs about 12 GB); removed at the end unless --keep
    #[arg(long, default_value = "/var/tmp/sarde-registry-bench")]
    dir: PathBuf,
    /// Virtual disk size in GiB
    #[arg(long, default_value_t = 2)]
    virtual_gib: u64,
    /// Bytes of data written into the disk, in MiB
    #[arg(long, default_value_t = 1536)]
    data_mib: u64,
    /// Share of the disk's 64 MiB data regions the update overwrites, in percent
    /// (at least one region)
    #[arg(long, default_value_t = 1.0)]
    changed_percent: f64,
    /// libvirt URI
    #[arg(long, default_value = "qemu:///system")]
    connect: String,
    /// The registry program (CNCF distribution)
    #[arg(long, default_value = "docker-registry")]
    registry: PathBuf,
    /// Keep the work directory (logs, caches, registry storage) afterwards
    #[arg(long)]
    keep: bool,
    /// Measure only the Python tool (to check the setup while sarde lacks a command)
    #[arg(long)]
    baseline_only: bool,
    /// Whole runs (a new disk, registry and caches each); the verdicts use the
    /// median of the runs' speed-ups, as this shared machine's load comes and goes
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// What one run measured, for the summary over runs.
#[derive(Default)]
struct Outcome {
    /// Operation, sarde seconds, baseline seconds (table order).
    rows: Vec<(String, f64, f64)>,
    /// Operation, seconds through an archive, seconds through the registry.
    archive_rows: Vec<(String, f64, f64)>,
    repull_cold: Option<f64>,
    update_ratio: Option<f64>,
}

impl Outcome {
    fn speed_up(&self, op: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|(o, _, _)| o == op)
            .map(|(_, ours, theirs)| theirs / ours)
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

const EXPORT_PUSH: &str = "export + push";
const ARCHIVE_PUSH: &str = "push (to the archive / the registry)";
const ARCHIVE_PULL: &str = "pull, empty cache and VM dir (from the archive / the registry)";
const PULL: &str = "pull (empty cache and VM dir)";

/// 64 MiB: sarde's default piece size and the update's unit.
const REGION: u64 = 64 << 20;
/// The repositories of the two tools in the registry.
const SARDE_REPO: &str = "bench/vm";
const PYTHON_REPO: &str = "bench/python";
const TAG: &str = "latest";

/// Set by SIGINT/SIGTERM: the children die of the signal themselves, the next step
/// fails and the cleanup runs.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn catch_signals() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Wall time, peak memory and standard output of one child process.
#[derive(Clone)]
struct Run {
    seconds: f64,
    peak_rss_mib: f64,
    stdout: String,
}

impl Run {
    /// Two runs one after the other: times add up, the peak is the larger one.
    fn then(&self, next: &Run) -> Run {
        Run {
            seconds: self.seconds + next.seconds,
            peak_rss_mib: self.peak_rss_mib.max(next.peak_rss_mib),
            stdout: next.stdout.clone(),
        }
    }

    /// The JSON summary on the last non-empty line of standard output.
    fn summary(&self) -> Option<Value> {
        let line = self.stdout.lines().rev().find(|l| !l.trim().is_empty())?;
        serde_json::from_str(line.trim()).ok()
    }

    /// The first of `keys` found anywhere in the JSON summary.
    fn summary_u64(&self, keys: &[&str]) -> Option<u64> {
        let summary = self.summary()?;
        keys.iter().find_map(|k| find_u64(&summary, k))
    }
}

fn find_u64(value: &Value, key: &str) -> Option<u64> {
    match value {
        Value::Object(map) => map
            .get(key)
            .and_then(Value::as_u64)
            .or_else(|| map.values().find_map(|v| find_u64(v, key))),
        Value::Array(items) => items.iter().find_map(|v| find_u64(v, key)),
        _ => None,
    }
}

/// Runs measured commands, each with its stdout and stderr in a log file.
struct Runner {
    logs: PathBuf,
    count: std::cell::Cell<u32>,
}

impl Runner {
    /// Runs a command, waits with wait4 for its resource usage; fails on non-zero
    /// exit. `cold` empties the page cache first.
    fn measure(&self, label: &str, cmd: &mut Command, cold: bool) -> Result<Run> {
        check_interrupted()?;
        let n = self.count.get() + 1;
        self.count.set(n);
        let stem: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let out_path = self.logs.join(format!("{n:02}-{stem}.out"));
        let err_path = self.logs.join(format!("{n:02}-{stem}.err"));
        eprintln!("{label}…");
        if cold {
            drop_caches();
        } else {
            // SAFETY: sync has no preconditions.
            unsafe { libc::sync() };
        }
        let TimedRun {
            seconds,
            status,
            peak_rss_mib,
        } = run_timed(cmd, &out_path, &err_path)?;
        let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
        if !succeeded(status) {
            let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
            let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{label}: {cmd:?} failed with wait status {status:#x}:\n{}\n(logs: {})",
                tail.join("\n"),
                err_path.display()
            );
        }
        eprintln!("    {seconds:.2} s, peak RSS {peak_rss_mib:.0} MiB");
        Ok(Run {
            seconds,
            peak_rss_mib,
            stdout,
        })
    }
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    check_interrupted()?;
    sarde_bench::vm::run(program, args)
}

/// `bytes` of pseudo-random data (a different stream from the disk's).
fn write_random(path: &Path, bytes: u64, seed: u64) -> Result<()> {
    let mut out = BufWriter::new(File::create(path)?);
    let mut state = seed | 1;
    let mut block = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        fill_random(&mut block, &mut state);
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}

/// What goes at the end whatever happened: VMs, the registry, the work directory.
struct Cleanup {
    connect: String,
    vms: Vec<String>,
    registry: Option<Child>,
    dir: PathBuf,
    keep: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        eprintln!("cleaning up…");
        for vm in &self.vms {
            undefine(&self.connect, vm);
        }
        if let Some(mut registry) = self.registry.take() {
            let _ = registry.kill();
            let _ = registry.wait();
        }
        if self.keep {
            eprintln!("kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Starts `docker-registry serve` on a free loopback port with its storage under
/// `dir`; returns the child and the port once `/v2/` answers.
fn start_registry(program: &Path, dir: &Path) -> Result<(Child, u16)> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let storage = dir.join("registry-storage");
    std::fs::create_dir_all(&storage)?;
    // The same settings as scripts/registry/config.yml.in.
    let config = format!(
        "version: 0.1\n\
         log:\n  level: info\n  accesslog:\n    disabled: false\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  cache:\n    blobdescriptor: inmemory\n\
         http:\n  addr: 127.0.0.1:{port}\n  headers:\n    X-Content-Type-Options: [nosniff]\n",
        storage.display()
    );
    let config_path = dir.join("registry.yml");
    std::fs::write(&config_path, config)?;
    let log = File::create(dir.join("registry.log"))?;
    let mut child = Command::new(program)
        .arg("serve")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if registry_answers(port) {
            return Ok((child, port));
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the registry exited ({status}); see {}",
                dir.join("registry.log").display()
            );
        }
        if Instant::now() > deadline || INTERRUPTED.load(Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the registry on 127.0.0.1:{port} did not answer within 15 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn registry_answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < head.len() {
        match stream.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    head[..got].starts_with(b"HTTP/1.1 200") || head[..got].starts_with(b"HTTP/1.0 200")
}

/// One blob of a manifest.
struct Blob {
    digest: String,
    size: u64,
    media_type: String,
    /// Where a sarde piece starts in its file.
    offset: Option<u64>,
    /// The sha256 of a sarde piece's uncompressed bytes.
    piece_digest: Option<String>,
}

/// The image manifest a tag points to in an OCI layout.
struct Manifest {
    size: u64,
    config: Blob,
    layers: Vec<Blob>,
}

impl Manifest {
    /// Reads the manifest `tag` names in the layout at `layout` (the only one when
    /// no entry carries the tag).
    fn read(layout: &Path, tag: &str) -> Result<Manifest> {
        let index_path = layout.join("index.json");
        let index: Value = serde_json::from_slice(
            &std::fs::read(&index_path)
                .with_context(|| format!("reading {}", index_path.display()))?,
        )?;
        let entries = index["manifests"]
            .as_array()
            .with_context(|| format!("{}: no manifests", index_path.display()))?;
        let ref_name = |e: &&Value| {
            e["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .is_some_and(|r| r == tag || r.ends_with(&format!(":{tag}")))
        };
        // The last entry with the tag: the Python tool appends, never replaces.
        let entry = entries
            .iter()
            .rev()
            .find(ref_name)
            .or(if entries.len() == 1 {
                entries.first()
            } else {
                None
            })
            .with_context(|| format!("{}: no manifest tagged {tag}", index_path.display()))?;
        let digest = entry["digest"]
            .as_str()
            .context("manifest without digest")?;
        let (algorithm, hex) = digest.split_once(':').context("malformed digest")?;
        let bytes = std::fs::read(layout.join("blobs").join(algorithm).join(hex))
            .with_context(|| format!("reading manifest {digest} in {}", layout.display()))?;
        let manifest: Value = serde_json::from_slice(&bytes)?;
        let blob = |v: &Value| -> Result<Blob> {
            Ok(Blob {
                digest: v["digest"]
                    .as_str()
                    .context("blob without digest")?
                    .to_string(),
                size: v["size"].as_u64().context("blob without size")?,
                media_type: v["mediaType"].as_str().unwrap_or_default().to_string(),
                offset: v["annotations"]["org.sardinecake.piece.offset"]
                    .as_str()
                    .and_then(|o| o.parse().ok()),
                piece_digest: v["annotations"]["org.sardinecake.piece.digest"]
                    .as_str()
                    .map(str::to_string),
            })
        };
        Ok(Manifest {
            size: bytes.len() as u64,
            config: blob(&manifest["config"])?,
            layers: manifest["layers"]
                .as_array()
                .context("manifest without layers")?
                .iter()
                .map(blob)
                .collect::<Result<_>>()?,
        })
    }

    /// Every byte a full transfer moves: manifest, config and layers.
    fn total(&self) -> u64 {
        self.size + self.config.size + self.layers.iter().map(|l| l.size).sum::<u64>()
    }

    /// The layers of `self` that `old` does not have.
    fn new_layers<'a>(&'a self, old: &Manifest) -> Vec<&'a Blob> {
        let known: std::collections::HashSet<&str> =
            old.layers.iter().map(|l| l.digest.as_str()).collect();
        self.layers
            .iter()
            .filter(|l| !known.contains(l.digest.as_str()))
            .collect()
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn main() -> Result<()> {
    // Data is generated in a child process: on Linux a child's peak RSS (wait4)
    // starts from its parent's, so the measuring parent must stay small.
    let argv: Vec<String> = std::env::args().collect();
    match argv.get(1).map(String::as_str) {
        Some("__generate") => return write_raw(Path::new(&argv[2]), argv[3].parse()?),
        Some("__random") => {
            return write_random(Path::new(&argv[2]), argv[3].parse()?, argv[4].parse()?);
        }
        _ => {}
    }
    let args = Args::parse();
    let sarde = std::fs::canonicalize(&args.sarde)
        .context("the sarde binary (build it with cargo build --release -p sarde)")?;
    if !args.python.exists() {
        bail!(
            "the Python tool is not at {} (scripts/install-python-tool.sh)",
            args.python.display()
        );
    }
    catch_signals();
    let mut outcomes = Vec::new();
    for run in 1..=args.runs.max(1) {
        eprintln!("=== run {run} of {}", args.runs.max(1));
        println!("## run {run} of {}", args.runs.max(1));
        outcomes.push(one_run(&args, &sarde, run)?);
    }
    summarize(&outcomes);
    if !args.keep {
        let _ = std::fs::remove_dir_all(&args.dir);
    }
    Ok(())
}

/// The median over runs of every row's times and speed-up, and the verdicts.
fn summarize(outcomes: &[Outcome]) {
    let Some(first) = outcomes.first() else {
        return;
    };
    let n = outcomes.len();
    println!();
    println!("## median of {n} runs");
    println!();
    println!("| operation | sarde s | baseline s | speed-up | speed-ups of the runs |");
    println!("| --- | ---: | ---: | ---: | --- |");
    for (op, _, _) in &first.rows {
        let pick = |f: &dyn Fn(&(String, f64, f64)) -> f64| -> Vec<f64> {
            outcomes
                .iter()
                .filter_map(|o| o.rows.iter().find(|r| &r.0 == op).map(f))
                .collect()
        };
        let ratios = pick(&|r| r.2 / r.1);
        let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}x")).collect();
        println!(
            "| {op} | {:.2} | {:.2} | {:.2}x | {} |",
            median(pick(&|r| r.1)).unwrap_or(f64::NAN),
            median(pick(&|r| r.2)).unwrap_or(f64::NAN),
            median(ratios).unwrap_or(f64::NAN),
            each.join(", ")
        );
    }
    println!();
    let verdict = |what: String, ok: Option<bool>| {
        let v = match ok {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "n/a ",
        };
        println!("{v} (median of {n}) {what}");
    };
    let med = |f: &dyn Fn(&Outcome) -> Option<f64>| median(outcomes.iter().filter_map(f).collect());
    let pull = med(&|o| o.speed_up(PULL));
    verdict(
        format!(
            "pull at least 3x faster than the Python tool's fetch + import ({})",
            pull.map_or("-".into(), |r| format!("{r:.2}x"))
        ),
        pull.map(|r| r >= 3.0),
    );
    let export_push = med(&|o| o.speed_up(EXPORT_PUSH));
    verdict(
        format!(
            "export + push at least 8x faster than the Python tool's ({})",
            export_push.map_or("-".into(), |r| format!("{r:.2}x"))
        ),
        export_push.map(|r| r >= 8.0),
    );
    let repull = med(&|o| o.repull_cold);
    verdict(
        format!(
            "re-pull of an unchanged tag under 0.2 s, cold page cache ({})",
            repull.map_or("-".into(), |r| format!("{r:.3} s"))
        ),
        repull.map(|r| r < 0.2),
    );
    for op in [ARCHIVE_PUSH, ARCHIVE_PULL] {
        let rows: Vec<&(String, f64, f64)> = outcomes
            .iter()
            .filter_map(|o| o.archive_rows.iter().find(|r| r.0 == op))
            .collect();
        let ratio = median(rows.iter().map(|r| r.2 / r.1).collect());
        verdict(
            format!(
                "{op}: the archive no slower than the registry, within 5% ({}; archive {} s, registry {} s)",
                ratio.map_or("-".into(), |r| format!("{r:.2}x")),
                median(rows.iter().map(|r| r.1).collect())
                    .map_or("-".into(), |v| format!("{v:.2}")),
                median(rows.iter().map(|r| r.2).collect())
                    .map_or("-".into(), |v| format!("{v:.2}")),
            ),
            ratio.map(|r| r >= 0.95),
        );
    }
    let update = med(&|o| o.update_ratio);
    verdict(
        format!(
            "update fetch receives at most 1.2x the changed pieces' compressed size ({})",
            update.map_or("-".into(), |r| format!("{r:.3}x"))
        ),
        update.map(|r| r <= 1.2),
    );
}

/// One whole run: a new disk, VM, registry and caches under `<dir>/run-N`.
fn one_run(args: &Args, sarde: &Path, number: usize) -> Result<Outcome> {
    let dir = &args.dir.join(format!("run-{number}"));
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("logs"))?;
    let vm = format!("sarde-rbench-{}-{number}", std::process::id());
    let mut cleanup = Cleanup {
        connect: args.connect.clone(),
        vms: vec![
            vm.clone(),
            format!("{vm}-sarde"),
            format!("{vm}-python"),
            format!("{vm}-archive"),
        ],
        registry: None,
        dir: dir.clone(),
        keep: args.keep,
    };

    // The VM: one qcow2 disk with `data_mib` of mixed data, all allocated.
    let disk = define_vm(dir, &vm, args.virtual_gib, args.data_mib, &args.connect)?;

    eprintln!("starting a private registry…");
    let (registry, port) = start_registry(&args.registry, dir)?;
    cleanup.registry = Some(registry);
    eprintln!("registry on 127.0.0.1:{port}");

    let result = bench(args, sarde, dir, &vm, &disk, port);
    drop(cleanup);
    result
}

fn bench(
    args: &Args,
    sarde: &Path,
    dir: &Path,
    vm: &str,
    disk: &Path,
    port: u16,
) -> Result<Outcome> {
    let mut outcome = Outcome::default();
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let runner = Runner {
        logs: dir.join("logs"),
        count: Default::default(),
    };
    // A private HOME: no credentials, no configuration, and skopeo's
    // registries.conf that lets it talk plain HTTP to our registry.
    let home = dir.join("home");
    let containers = home.join(".config/containers");
    std::fs::create_dir_all(&containers)?;
    let registries_conf = containers.join("registries.conf");
    std::fs::write(
        &registries_conf,
        format!("[[registry]]\nlocation = \"127.0.0.1:{port}\"\ninsecure = true\n"),
    )?;
    let sarde_cmd = |sub: &str, rest: &[&str]| {
        let mut c = Command::new(sarde);
        c.env("HOME", &home)
            .env("SARDE_CONF_FILES", "")
            .env("SARDE_CONNECT", &args.connect)
            .env_remove("SARDE_OCIDIR")
            .env_remove("SARDE_VMDIR")
            .arg(sub)
            .args(rest);
        c
    };
    let python_cmd = |sub: &[&str]| {
        let mut c = Command::new(&args.python);
        c.env("HOME", &home)
            .env("SARDE_CONF_FILES", "")
            .env("CONTAINERS_REGISTRIES_CONF", &registries_conf)
            .args(["--connect", &args.connect])
            .args(sub);
        c
    };
    let sarde_on = !args.baseline_only;
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let image = format!("127.0.0.1:{port}/{SARDE_REPO}:{TAG}");
    let py_local = format!("{PYTHON_REPO}:{TAG}");
    let py_remote = format!("127.0.0.1:{port}/{PYTHON_REPO}:{TAG}");
    let host = format!("127.0.0.1:{port}");
    // Caches: export/push, fetch (later updated), pull; each side its own.
    let sarde_push_oci = s(&dir.join("sarde-oci-push"));
    let sarde_fetch_oci = s(&dir.join("sarde-oci-fetch"));
    let sarde_pull_oci = s(&dir.join("sarde-oci-pull"));
    let sarde_vms = s(&dir.join("sarde-vms"));
    let py_push_oci = s(&dir.join("python-oci-push"));
    let py_update_oci = s(&dir.join("python-oci-update"));
    let py_fetch_oci = s(&dir.join("python-oci-fetch"));
    let py_pull_oci = s(&dir.join("python-oci-pull"));
    let py_vms = format!("{}/", dir.join("python-vms").display());
    std::fs::create_dir_all(&sarde_vms)?;
    std::fs::create_dir_all(&py_vms)?;
    let sarde_layout = |oci: &str| Path::new(oci).join(&host).join(SARDE_REPO);
    let py_layout = |oci: &str| Path::new(oci).join(PYTHON_REPO);
    let sarde_vm = format!("{vm}-sarde");
    let python_vm = format!("{vm}-python");
    // Commands run twice: for the first image and for the update.
    let sarde_export_cmd = || sarde_cmd("export", &["--ocidir", &sarde_push_oci, vm, &image]);
    let sarde_push_cmd = || {
        let args = [
            "--ocidir",
            &sarde_push_oci,
            "--insecure",
            "--format",
            "json",
            &image,
        ];
        sarde_cmd("push", &args)
    };
    let sarde_fetch_cmd = || {
        let args = [
            "--ocidir",
            &sarde_fetch_oci,
            "--insecure",
            "--format",
            "json",
            &image,
        ];
        sarde_cmd("fetch", &args)
    };
    let py_export_cmd = |ocidir: &str| python_cmd(&["export", "--ocidir", ocidir, vm, &py_local]);
    let py_push_cmd = |ocidir: &str| {
        python_cmd(&[
            "push", "--ocidir", ocidir, "--target", &py_remote, &py_local,
        ])
    };
    let py_fetch_cmd = || {
        python_cmd(&[
            "fetch",
            "--ocidir",
            &py_fetch_oci,
            "--source",
            &py_remote,
            &py_local,
        ])
    };

    // 1 and 2: export, then push (push alone is the push of this pair).
    let mut sarde_export = None;
    let mut sarde_push = None;
    if sarde_on {
        sarde_export = Some(runner.measure("sarde export", &mut sarde_export_cmd(), true)?);
        sarde_push = Some(runner.measure("sarde push", &mut sarde_push_cmd(), true)?);
    }
    let py_export = runner.measure("Python export", &mut py_export_cmd(&py_push_oci), true)?;
    let py_push = runner.measure("Python push", &mut py_push_cmd(&py_push_oci), true)?;
    let py_image = Manifest::read(&py_layout(&py_push_oci), TAG)?;
    let sarde_image = if sarde_on {
        Some(Manifest::read(&sarde_layout(&sarde_push_oci), TAG)?)
    } else {
        None
    };

    // 3: fetch into an empty cache.
    let sarde_fetch = if sarde_on {
        Some(runner.measure("sarde fetch (empty cache)", &mut sarde_fetch_cmd(), true)?)
    } else {
        None
    };
    let py_fetch = runner.measure("Python fetch (empty cache)", &mut py_fetch_cmd(), true)?;

    // 4: pull into an empty cache and an empty VM directory.
    let sarde_pull_args = [
        "-n",
        &sarde_vm,
        "--ocidir",
        &sarde_pull_oci,
        "--vmdir",
        &sarde_vms,
        "--connect",
        &args.connect,
        "--insecure",
        "--format",
        "json",
        &image,
    ];
    let sarde_pull = if sarde_on {
        Some(runner.measure(
            "sarde pull (empty cache)",
            &mut sarde_cmd("pull", &sarde_pull_args),
            true,
        )?)
    } else {
        None
    };
    let py_pull_args = [
        "pull",
        "--ocidir",
        &py_pull_oci,
        "--vmdir",
        &py_vms,
        "-n",
        &python_vm,
        "--source",
        &py_remote,
        &py_local,
    ];
    let py_pull = runner.measure(
        "Python pull (empty cache)",
        &mut python_cmd(&py_pull_args),
        true,
    )?;
    for (on, name) in [(sarde_on, &sarde_vm), (true, &python_vm)] {
        if on {
            run("virsh", &["-q", "-c", &args.connect, "dominfo", name])
                .with_context(|| format!("the pulled VM {name} is not defined"))?;
        }
    }

    // 5: pull again, same tag, same cache, VM present: cold page cache, then warm;
    // best of 3 each (these runs are short, so other load on the machine shows).
    let best_of_3 = |label: &str, make: &dyn Fn() -> Command, cold: bool| -> Result<Run> {
        let mut best: Option<Run> = None;
        for _ in 0..3 {
            let r = runner.measure(label, &mut make(), cold)?;
            if best.as_ref().is_none_or(|b| r.seconds < b.seconds) {
                best = Some(r);
            }
        }
        best.context("no run")
    };
    let mut sarde_repull = None;
    let mut sarde_repull_warm = None;
    if sarde_on {
        let make = || sarde_cmd("pull", &sarde_pull_args);
        sarde_repull = Some(best_of_3("sarde re-pull (cold page cache)", &make, true)?);
        sarde_repull_warm = Some(best_of_3("sarde re-pull (warm)", &make, false)?);
    }
    let make = || python_cmd(&py_pull_args);
    let py_repull = best_of_3("Python re-pull (cold page cache)", &make, true)?;
    let py_repull_warm = best_of_3("Python re-pull (warm)", &make, false)?;

    // 5b: the air-gapped path: push into an archive, pull from it, cold.
    let mut archive_push = None;
    let mut archive_pull = None;
    if sarde_on {
        let archive = format!("oci-archive:{}:{TAG}", dir.join("image.tar").display());
        let push_args = [
            "--ocidir",
            &sarde_push_oci,
            "--format",
            "json",
            "-t",
            &archive,
            &image,
        ];
        archive_push = Some(runner.measure(
            "sarde push to an archive",
            &mut sarde_cmd("push", &push_args),
            true,
        )?);
        let archive_vms = s(&dir.join("sarde-archive-vms"));
        std::fs::create_dir_all(&archive_vms)?;
        let archive_oci = s(&dir.join("sarde-oci-archive-pull"));
        let archive_vm = format!("{vm}-archive");
        let pull_args = [
            "-n",
            &archive_vm,
            "--ocidir",
            &archive_oci,
            "--vmdir",
            &archive_vms,
            "--connect",
            &args.connect,
            "--format",
            "json",
            "--source",
            &archive,
            "bench/archive:latest",
        ];
        archive_pull = Some(runner.measure(
            "sarde pull from the archive (empty cache and VM dir)",
            &mut sarde_cmd("pull", &pull_args),
            true,
        )?);
    }

    // 6: the update: random data over ~1% of the 64 MiB data regions.
    let regions = (args.data_mib << 20).div_ceil(REGION).max(1);
    let changed =
        ((regions as f64 * args.changed_percent / 100.0).round() as u64).clamp(1, regions);
    let stride = regions / changed;
    let random = dir.join("random.bin");
    run(
        &std::env::current_exe()?.to_string_lossy(),
        &["__random", &s(&random), &REGION.to_string(), "12345"],
    )?;
    eprintln!("update: random data over {changed} of {regions} 64 MiB regions of the guest disk");
    let mut qemu_io = Command::new("qemu-io");
    qemu_io.args(["-f", "qcow2"]);
    for i in 0..changed {
        // In the middle of each stride, clear of the disk's first piece.
        let offset = (i * stride + stride / 2) * REGION;
        let len = REGION.min((args.data_mib << 20) - offset);
        qemu_io
            .arg("-c")
            .arg(format!("write -q -s {} {offset} {len}", random.display()));
    }
    let out = qemu_io.arg(disk).output().context("starting qemu-io")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.trim().is_empty() {
        bail!("qemu-io: {said}");
    }
    std::fs::remove_file(&random)?;

    let mut sarde_update_push = None;
    let mut sarde_update_fetch = None;
    let mut sarde_update = None;
    if sarde_on {
        let old = Manifest::read(&sarde_layout(&sarde_fetch_oci), TAG)?;
        let export = runner.measure("sarde export (update)", &mut sarde_export_cmd(), true)?;
        let push = runner.measure("sarde push (update)", &mut sarde_push_cmd(), true)?;
        sarde_update_push = Some(export.then(&push));
        let fetch = runner.measure(
            "sarde fetch (update, into the old cache)",
            &mut sarde_fetch_cmd(),
            true,
        )?;
        let new = Manifest::read(&sarde_layout(&sarde_fetch_oci), TAG)?;
        sarde_update_fetch = Some(fetch);
        sarde_update = Some((old, new));
    }
    let py_old = Manifest::read(&py_layout(&py_fetch_oci), TAG)?;
    let py_update_export = runner.measure(
        "Python export (update)",
        &mut py_export_cmd(&py_update_oci),
        true,
    )?;
    let py_update_push = runner.measure(
        "Python push (update)",
        &mut py_push_cmd(&py_update_oci),
        true,
    )?;
    let py_update_fetch = runner.measure(
        "Python fetch (update, into the old cache)",
        &mut py_fetch_cmd(),
        true,
    )?;
    let py_new = Manifest::read(&py_layout(&py_fetch_oci), TAG)?;
    let py_update_bytes = py_new.size
        + py_new.config.size
        + py_new
            .new_layers(&py_old)
            .iter()
            .map(|l| l.size)
            .sum::<u64>();

    // The report.
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let disk_bytes = std::fs::metadata(disk)?.len();
    println!();
    println!(
        "disk: {} qcow2 file, {} GiB virtual, {} MiB of data; registry 127.0.0.1:{port} (plain HTTP, loopback)",
        mb(disk_bytes),
        args.virtual_gib,
        args.data_mib
    );
    if let Some(image) = &sarde_image {
        println!(
            "sarde image: {} layers, {} in all",
            image.layers.len(),
            mb(image.total())
        );
    }
    println!(
        "load average (1, 5, 15 min) at the start: {}; at the end: {}",
        load_before
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        load_after
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "Python image: {} layers, {} in all",
        py_image.layers.len(),
        mb(py_image.total())
    );
    println!();
    println!(
        "| operation | sarde s | baseline | baseline s | speed-up | sarde peak RSS | bytes moved (sarde / baseline) |"
    );
    println!("| --- | ---: | --- | ---: | ---: | ---: | ---: |");
    let sent = |r: &Run| r.summary_u64(&["bytes_sent", "bytes_uploaded", "bytes_pushed"]);
    let received = |r: &Run| r.summary_u64(&["bytes_received", "bytes_downloaded"]);
    let mut row = |op: &str,
                   ours: Option<&Run>,
                   name: &str,
                   theirs: &Run,
                   our_bytes: Option<u64>,
                   their_bytes: Option<u64>| {
        let opt = |b: Option<u64>| b.map_or_else(|| "-".to_string(), mb);
        match ours {
            Some(ours) => {
                outcome
                    .rows
                    .push((op.to_string(), ours.seconds, theirs.seconds));
                println!(
                    "| {op} | {:.2} | {name} | {:.2} | {:.2}x | {:.0} MiB | {} / {} |",
                    ours.seconds,
                    theirs.seconds,
                    theirs.seconds / ours.seconds,
                    ours.peak_rss_mib,
                    our_bytes.map_or_else(|| "? (no JSON summary)".to_string(), mb),
                    opt(their_bytes)
                )
            }
            None => println!(
                "| {op} | - | {name} | {:.2} | - | - | - / {} |",
                theirs.seconds,
                opt(their_bytes)
            ),
        }
    };
    let py_export_push = py_export.then(&py_push);
    let sarde_export_push = match (&sarde_export, &sarde_push) {
        (Some(e), Some(p)) => Some(e.then(p)),
        _ => None,
    };
    let sarde_sent = sarde_push.as_ref().and_then(sent);
    row(
        EXPORT_PUSH,
        sarde_export_push.as_ref(),
        "Python export + push",
        &py_export_push,
        sarde_sent,
        Some(py_image.total()),
    );
    row(
        "push alone",
        sarde_push.as_ref(),
        "Python push",
        &py_push,
        sarde_sent,
        Some(py_image.total()),
    );
    row(
        "fetch (empty cache)",
        sarde_fetch.as_ref(),
        "Python fetch",
        &py_fetch,
        sarde_fetch.as_ref().and_then(received),
        Some(py_image.total()),
    );
    row(
        PULL,
        sarde_pull.as_ref(),
        "Python pull (fetch + import)",
        &py_pull,
        sarde_pull.as_ref().and_then(received),
        Some(py_image.total()),
    );
    row(
        "re-pull, unchanged tag (cold page cache, best of 3)",
        sarde_repull.as_ref(),
        "Python pull",
        &py_repull,
        sarde_repull.as_ref().and_then(received),
        None,
    );
    row(
        "re-pull, unchanged tag (warm, best of 3)",
        sarde_repull_warm.as_ref(),
        "Python pull",
        &py_repull_warm,
        sarde_repull_warm.as_ref().and_then(received),
        None,
    );
    row(
        "update: export + push",
        sarde_update_push.as_ref(),
        "Python export + push",
        &py_update_export.then(&py_update_push),
        sarde_update_push.as_ref().and_then(sent),
        Some(py_update_bytes),
    );
    row(
        "update: fetch into the old cache",
        sarde_update_fetch.as_ref(),
        "Python fetch",
        &py_update_fetch,
        sarde_update_fetch.as_ref().and_then(received),
        Some(py_update_bytes),
    );
    println!();
    println!(
        "update: {changed} of {regions} 64 MiB data regions overwritten; Python: {} of {} layers new ({})",
        py_new.new_layers(&py_old).len(),
        py_new.layers.len(),
        mb(py_update_bytes)
    );
    let mut update_ratio = None;
    if let (Some((old, new)), Some(fetch)) = (&sarde_update, &sarde_update_fetch) {
        let pieces = new.new_layers(old);
        let piece_bytes: u64 = pieces.iter().map(|l| l.size).sum();
        let kinds: std::collections::BTreeSet<&str> =
            pieces.iter().map(|l| l.media_type.as_str()).collect();
        println!(
            "sarde: {} of {} layers changed ({} compressed; {}), new config {} B, manifest {} B",
            pieces.len(),
            new.layers.len(),
            mb(piece_bytes),
            kinds.into_iter().collect::<Vec<_>>().join(", "),
            new.config.size,
            new.size
        );
        let offsets: Vec<String> = pieces
            .iter()
            .map(|l| l.offset.map_or("?".into(), |o| format!("{} MiB", o >> 20)))
            .collect();
        println!("changed pieces start at: {}", offsets.join(", "));
        // Pieces with a new blob digest but the same uncompressed bytes as before:
        // compressed differently from the same input.
        let old_content: std::collections::HashSet<&str> = old
            .layers
            .iter()
            .filter_map(|l| l.piece_digest.as_deref())
            .collect();
        let recompressed: Vec<&&Blob> = pieces
            .iter()
            .filter(|l| {
                l.piece_digest
                    .as_deref()
                    .is_some_and(|d| old_content.contains(d))
            })
            .collect();
        if !recompressed.is_empty() {
            let bytes: u64 = recompressed.iter().map(|l| l.size).sum();
            println!(
                "of these, {} ({}) hold the same uncompressed bytes as before (same piece.digest, \
                 new blob digest: the export's compression is not deterministic); \
                 received / pieces whose content changed: {:.3}x",
                recompressed.len(),
                mb(bytes),
                received(fetch).unwrap_or(0) as f64 / (piece_bytes - bytes).max(1) as f64
            );
        }
        match fetch.summary() {
            Some(summary) => println!("sarde fetch summary: {summary}"),
            None => println!(
                "sarde fetch printed no JSON summary: {:?}",
                fetch.stdout.trim()
            ),
        }
        if let Some(bytes) = received(fetch) {
            if piece_bytes > 0 {
                update_ratio = Some(bytes as f64 / piece_bytes as f64);
            }
        }
    }
    // The verdicts come from the median over runs (see `summarize`).
    outcome.repull_cold = sarde_repull.as_ref().map(|r| r.seconds);
    if let (Some(ap), Some(rp), Some(al), Some(rl)) =
        (&archive_push, &sarde_push, &archive_pull, &sarde_pull)
    {
        println!();
        println!(
            "the air-gapped path, same image: through an archive file vs through the registry"
        );
        println!();
        println!(
            "| operation | archive s | registry s | archive speed-up | peak RSS archive / registry |"
        );
        println!("| --- | ---: | ---: | ---: | ---: |");
        for (op, a, r) in [(ARCHIVE_PUSH, ap, rp), (ARCHIVE_PULL, al, rl)] {
            println!(
                "| {op} | {:.2} | {:.2} | {:.2}x | {:.0} / {:.0} MiB |",
                a.seconds,
                r.seconds,
                r.seconds / a.seconds,
                a.peak_rss_mib,
                r.peak_rss_mib
            );
            outcome
                .archive_rows
                .push((op.to_string(), a.seconds, r.seconds));
        }
    }
    outcome.update_ratio = update_ratio;
    Ok(outcome)
}
