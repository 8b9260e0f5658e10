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
//! cargo run --release -p sarde-bench --bin registry-bench -- --data-mib 10240 --virtual-gib 24
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
//!
//! After the update, both tools pull it into the host that holds the previous
//! version (the first pull's cache, VM directory and VM name; sarde with
//! `--replace`), and sarde's VM must still be defined. "update: re-export" and
//! "update: pull (previous version imported)" compare them.
//!
//! Speed at the sizes users have (issue 14): each run also measures what this
//! machine can do at best on the same disk, with plain tools, cold, each output
//! synced and removed right after (a "limits" table, with the disk's sizes):
//!
//! - `read`: `dd iflag=direct bs=4M` of the qcow2 file (O_DIRECT, no page cache);
//! - `write`: `dd oflag=direct conv=fsync` of as many bytes (in 4 MiB blocks) into
//!   the work directory;
//! - `zstd -3 -T0` of the qcow2 file into a file, and `zstd -d -T0` of that into a
//!   file, each followed by `sync` within the time;
//! - after the update: the O_DIRECT read of the changed qcow2 file, and
//!   `cp --reflink=auto` of the sarde-pulled VM's files (not its dotfiles) into a
//!   scratch directory, synced, before the update pull replaces them.
//!
//! sarde's times over these ("ratio to limit", target at most 1.3x): export
//! against the larger of the read and `zstd -3`; the pull of a fresh image against
//! `zstd -d`; the re-export after the update against the read of the changed
//! file; the update pull against the copy plus sarde's update fetch of the changed
//! blobs. The summary gives the median ratios over the runs. The figures at
//! 1.5 GB are the default; at 10 GB: `--data-mib 10240 --virtual-gib 24`.
//!
//! A failing Python-tool step does not end the run: its row says `failed`, its
//! exit status and the tail of its log follow the table, the steps that need it
//! are not run (and say so), and the medians leave it out. A failing sarde step
//! ends the run: that is a bug.

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
    /// Work directory (needs about 8 times --data-mib: 12 GB at the default size);
    /// removed at the end unless --keep
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
    /// Measure only sarde, not the Python tool (its rows say "not run"): for
    /// the large sizes, where its runs take most of an hour and its caches and
    /// images would not fit beside sarde's
    #[arg(long, conflicts_with = "baseline_only")]
    no_baseline: bool,
    /// Leave out the air-gapped path (push into an archive, pull from it)
    #[arg(long)]
    no_archive: bool,
    /// Whole runs (a new disk, registry and caches each); the verdicts use the
    /// median of the runs' speed-ups, as this shared machine's load comes and goes
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// What one run measured, for the summary over runs.
#[derive(Default)]
struct Outcome {
    /// Operation, sarde seconds, baseline seconds (none: the baseline failed), in
    /// table order.
    rows: Vec<(String, f64, Option<f64>)>,
    /// Operation, seconds through an archive, seconds through the registry.
    archive_rows: Vec<(String, f64, f64)>,
    /// sarde against the machine's limit for the same work.
    limit_rows: Vec<LimitRow>,
    repull_cold: Option<f64>,
    update_ratio: Option<f64>,
}

impl Outcome {
    /// The baseline's time over sarde's; none when the baseline failed.
    fn speed_up(&self, op: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|(o, _, _)| o == op)
            .and_then(|(_, ours, theirs)| theirs.map(|t| t / ours))
    }
}

/// One sarde operation held against what the machine's plain tools take for the
/// same work.
struct LimitRow {
    op: &'static str,
    /// What the limit is made of.
    limit: &'static str,
    sarde: f64,
    limit_seconds: f64,
}

impl LimitRow {
    fn ratio(&self) -> f64 {
        self.sarde / self.limit_seconds
    }
}

/// sarde may take at most this many times the machine's limit.
const LIMIT_TARGET: f64 = 1.3;

fn limit_verdict(ratio: f64) -> &'static str {
    if ratio <= LIMIT_TARGET {
        "PASS"
    } else {
        "FAIL"
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
const LIMIT_EXPORT: &str = "export";
const LIMIT_PULL: &str = "pull of a fresh image";
const LIMIT_REEXPORT: &str = "re-export after the update";
const LIMIT_UPDATE_PULL: &str = "update pull";

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

/// Why a baseline step has no time: it failed, or a step it needs did not succeed.
#[derive(Clone, Debug)]
struct Failed {
    step: String,
    /// The exit status and the tail of its log, or the step it needed.
    reason: String,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.reason)
    }
}

impl std::error::Error for Failed {}

/// A Python-tool step: its failure is the baseline's and does not end the run.
type Baseline = std::result::Result<Run, Failed>;

/// Two baseline steps one after the other (see [`Run::then`]); failed if either
/// failed.
fn baseline_then(first: &Baseline, next: &Baseline) -> Baseline {
    Ok(first
        .as_ref()
        .map_err(Clone::clone)?
        .then(next.as_ref().map_err(Clone::clone)?))
}

/// The fastest of three runs of `once`; the first failure is the result (these
/// runs are short, so other load on the machine shows).
fn best_of_3(mut once: impl FnMut() -> Result<Baseline>) -> Result<Baseline> {
    let mut best = once()?;
    for _ in 1..3 {
        let Ok(fastest) = &best else { break };
        let fastest = fastest.seconds;
        match once()? {
            Ok(r) if r.seconds < fastest => best = Ok(r),
            Ok(_) => {}
            Err(failed) => return Ok(Err(failed)),
        }
    }
    Ok(best)
}

fn describe_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("wait status {status:#x}")
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
    /// `--no-baseline`: baseline steps are not run.
    skip_baseline: bool,
}

impl Runner {
    /// Runs a command, waits with wait4 for its resource usage; fails on non-zero
    /// exit. `cold` empties the page cache first.
    fn measure(&self, label: &str, cmd: &mut Command, cold: bool) -> Result<Run> {
        match self.attempt(label, cmd, cold)? {
            Ok(run) => Ok(run),
            Err(failed) => bail!("{label}: {cmd:?} failed with {}", failed.reason),
        }
    }

    /// A baseline step: not run when a step in `needs` did not succeed; its own
    /// failure is kept as the result, not raised (only Ctrl-C ends the run).
    fn baseline(
        &self,
        label: &str,
        needs: &[&Baseline],
        cmd: impl FnOnce() -> Command,
        cold: bool,
    ) -> Result<Baseline> {
        if self.skip_baseline {
            return Ok(Err(Failed {
                step: label.to_string(),
                reason: "not run (--no-baseline)".into(),
            }));
        }
        if let Some(needed) = needs.iter().find_map(|n| n.as_ref().err()) {
            eprintln!("{label}: not run, {} did not succeed", needed.step);
            return Ok(Err(Failed {
                step: label.to_string(),
                reason: format!("not run, as {} did not succeed", needed.step),
            }));
        }
        match self.attempt(label, &mut cmd(), cold) {
            Err(e) if !INTERRUPTED.load(Ordering::SeqCst) => Ok(Err(Failed {
                step: label.to_string(),
                reason: format!("{e:#}"),
            })),
            other => other,
        }
    }

    /// Runs a command like [`Runner::measure`]; a non-zero exit is an `Ok(Err)`
    /// with the exit status and the tail of its log, an `Err` is something else
    /// (Ctrl-C, a command that does not start).
    fn attempt(&self, label: &str, cmd: &mut Command, cold: bool) -> Result<Baseline> {
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
            // A child that died of Ctrl-C is not a failure of its own.
            check_interrupted()?;
            let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
            // The Python tool may say why on either stream.
            let (log, path) = if stderr.trim().is_empty() {
                (&stdout, &out_path)
            } else {
                (&stderr, &err_path)
            };
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!("    failed: {}", describe_status(status));
            return Ok(Err(Failed {
                step: label.to_string(),
                reason: format!(
                    "{}:\n{}\n(logs: {})",
                    describe_status(status),
                    tail.join("\n"),
                    path.display()
                ),
            }));
        }
        eprintln!("    {seconds:.2} s, peak RSS {peak_rss_mib:.0} MiB");
        Ok(Ok(Run {
            seconds,
            peak_rss_mib,
            stdout,
        }))
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

/// What this machine does at best on the run's disk, with plain tools: the work
/// sarde's commands do, without sarde. Each run is cold and its output synced.
struct Limits {
    /// The qcow2 file's size when the limits were measured (before the update).
    disk_bytes: u64,
    /// O_DIRECT read of the qcow2 file.
    read: Run,
    /// O_DIRECT write of `write_bytes` (`disk_bytes` in whole 4 MiB blocks).
    write: Run,
    write_bytes: u64,
    /// `zstd -3 -T0` of the qcow2 file into `packed_bytes`.
    zstd: Run,
    packed_bytes: u64,
    /// `zstd -d -T0` of that back into a file.
    unzstd: Run,
    /// After the update: O_DIRECT read of the changed qcow2 file, and its size.
    changed_read: Option<(Run, u64)>,
    /// `cp --reflink=auto` of the sarde-pulled VM's files before the update pull,
    /// and their size (sarde only).
    copy: Option<(Run, u64)>,
}

/// `dd` of the block size used for the O_DIRECT limits.
const DD_BLOCK: u64 = 4 << 20;

/// `KEY=PATH` for dd, without going through a lossy string.
fn dd_operand(key: &str, path: &Path) -> std::ffi::OsString {
    let mut operand = std::ffi::OsString::from(format!("{key}="));
    operand.push(path);
    operand
}

/// A sequential O_DIRECT read of `path` in 4 MiB blocks: the disk, not the page
/// cache.
fn direct_read(path: &Path) -> Command {
    let mut c = Command::new("dd");
    c.arg(dd_operand("if", path))
        .args(["of=/dev/null", "bs=4M", "iflag=direct"]);
    c
}

/// A sequential O_DIRECT write of `blocks` 4 MiB blocks of zeros into `path`,
/// synced (ext4 stores zeros as written: no compression, no holes).
fn direct_write(path: &Path, blocks: u64) -> Command {
    let mut c = Command::new("dd");
    c.arg("if=/dev/zero").arg(dd_operand("of", path)).args([
        "bs=4M",
        &format!("count={blocks}"),
        "oflag=direct",
        "conv=fsync",
    ]);
    c
}

/// `sh -c SCRIPT sh PATHS…`: the paths reach the script as `$1`, `$2`, … so none
/// needs quoting; a `sync` in the script counts in the time.
fn shell(script: &str, paths: &[&Path]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(script).arg("sh").args(paths);
    c
}

/// Removes a limit's scratch output; one that is not there (its command failed
/// early) is fine.
fn remove_scratch(path: &Path) -> Result<()> {
    let removed = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match removed {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Measures `cmd` (cold), then removes `scratch` whether it succeeded or not, so
/// the work directory holds at most one limit's output.
fn measure_scratch(runner: &Runner, label: &str, mut cmd: Command, scratch: &Path) -> Result<Run> {
    let run = runner.measure(label, &mut cmd, true);
    let removed = remove_scratch(scratch);
    let run = run?;
    removed?;
    Ok(run)
}

fn file_size(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("reading the size of {}", path.display()))?
        .len())
}

/// The limits on `disk` before anything else runs: read, write, compress,
/// decompress, each output in `dir` removed right after.
fn measure_limits(runner: &Runner, dir: &Path, disk: &Path) -> Result<Limits> {
    let disk_bytes = file_size(disk)?;
    let read = runner.measure(
        "limit: O_DIRECT read of the disk file",
        &mut direct_read(disk),
        true,
    )?;
    let blocks = disk_bytes.div_ceil(DD_BLOCK);
    let written = dir.join("limit-write.bin");
    let write = measure_scratch(
        runner,
        "limit: O_DIRECT write of as many bytes, synced",
        direct_write(&written, blocks),
        &written,
    )?;
    let packed = dir.join("limit-disk.zst");
    let codec = measure_zstd(runner, disk, &packed, &dir.join("limit-disk.raw"));
    remove_scratch(&packed)?;
    let (zstd, packed_bytes, unzstd) = codec?;
    Ok(Limits {
        disk_bytes,
        read,
        write,
        write_bytes: blocks * DD_BLOCK,
        zstd,
        packed_bytes,
        unzstd,
        changed_read: None,
        copy: None,
    })
}

/// `zstd -3 -T0` of `disk` into `packed`, then `zstd -d -T0` of that into `raw`
/// (removed), each synced: the compression run, the compressed size and the
/// decompression run. The caller removes `packed`.
fn measure_zstd(
    runner: &Runner,
    disk: &Path,
    packed: &Path,
    raw: &Path,
) -> Result<(Run, u64, Run)> {
    let zstd = runner.measure(
        "limit: zstd -3 -T0 of the disk file, synced",
        &mut shell(r#"zstd -q -3 -T0 -f "$1" -o "$2" && sync"#, &[disk, packed]),
        true,
    )?;
    let packed_bytes = file_size(packed)?;
    let unzstd = measure_scratch(
        runner,
        "limit: zstd -d -T0 of that into a file, synced",
        shell(r#"zstd -q -d -T0 -f "$1" -o "$2" && sync"#, &[packed, raw]),
        raw,
    )?;
    Ok((zstd, packed_bytes, unzstd))
}

/// Copies the files of the VM in `vm_dir` (not its dotfiles) into `scratch` with
/// `cp --reflink=auto`, synced, cold; removes the copy. Returns the run and the
/// bytes copied.
fn measure_copy(runner: &Runner, vm_dir: &Path, scratch: &Path) -> Result<(Run, u64)> {
    let mut files = Vec::new();
    let mut bytes = 0;
    for entry in
        std::fs::read_dir(vm_dir).with_context(|| format!("listing {}", vm_dir.display()))?
    {
        let entry = entry.with_context(|| format!("listing {}", vm_dir.display()))?;
        let meta = entry
            .metadata()
            .with_context(|| format!("reading {}", entry.path().display()))?;
        if meta.is_file() && !entry.file_name().to_string_lossy().starts_with('.') {
            bytes += meta.len();
            files.push(entry.path());
        }
    }
    if files.is_empty() {
        bail!("{}: no files of the pulled VM to copy", vm_dir.display());
    }
    files.sort();
    std::fs::create_dir_all(scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let mut paths: Vec<&Path> = vec![scratch];
    paths.extend(files.iter().map(PathBuf::as_path));
    let run = measure_scratch(
        runner,
        "limit: cp --reflink=auto of the pulled VM's files, synced",
        shell(
            r#"dest=$1; shift; cp --reflink=auto -- "$@" "$dest" && sync"#,
            &paths,
        ),
        scratch,
    )?;
    Ok((run, bytes))
}

/// The Python tool's manifest in `layout` once `step` wrote it; none (said, not
/// raised) when the step failed or left nothing readable.
fn python_manifest(step: &Baseline, layout: &Path) -> Option<Manifest> {
    step.as_ref().ok()?;
    match Manifest::read(layout, TAG) {
        Ok(manifest) => Some(manifest),
        Err(e) => {
            eprintln!("    no Python manifest: {e:#}");
            None
        }
    }
}

/// Whether the VM `name` is defined.
fn defined(connect: &str, name: &str) -> Result<()> {
    run("virsh", &["-q", "-c", connect, "dominfo", name])
        .with_context(|| format!("the pulled VM {name} is not defined"))
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

/// The failed baseline steps with their reasons, below the table whose rows say
/// `failed`.
fn print_failures(steps: &[&Baseline]) {
    let failed: Vec<&Failed> = steps.iter().filter_map(|s| s.as_ref().err()).collect();
    if failed.is_empty() {
        return;
    }
    println!();
    println!("baseline steps that failed (their rows say `failed`, the medians leave them out):");
    for f in failed {
        let mut lines = f.reason.lines();
        println!("- {}: {}", f.step, lines.next().unwrap_or_default());
        for line in lines {
            println!("    {line}");
        }
    }
}

/// The "limits" table: what plain tools take on this run's disk.
fn print_limits(limits: &Limits, args: &Args, update_fetch: Option<&Run>) {
    println!();
    println!(
        "limits of this machine, same run, same disk: qcow2 file {} B ({}), {} MiB of data, \
         {} GiB virtual; zstd -3 makes {} of it",
        limits.disk_bytes,
        mb(limits.disk_bytes),
        args.data_mib,
        args.virtual_gib,
        mb(limits.packed_bytes)
    );
    println!();
    println!("| limit | s | bytes | MB/s |");
    println!("| --- | ---: | ---: | ---: |");
    let line = |what: &str, run: &Run, bytes: u64| {
        println!(
            "| {what} | {:.2} | {} | {:.0} |",
            run.seconds,
            mb(bytes),
            bytes as f64 / 1e6 / run.seconds
        );
    };
    line(
        "read: O_DIRECT, dd bs=4M, the qcow2 file",
        &limits.read,
        limits.disk_bytes,
    );
    line(
        "write: O_DIRECT, dd bs=4M conv=fsync, as many bytes",
        &limits.write,
        limits.write_bytes,
    );
    line(
        "zstd -3 -T0 of the qcow2 file into a file, synced",
        &limits.zstd,
        limits.disk_bytes,
    );
    line(
        "zstd -d -T0 of that into a file, synced (MB/s of the qcow2 file)",
        &limits.unzstd,
        limits.disk_bytes,
    );
    if let Some((run, bytes)) = &limits.changed_read {
        line(
            "read: O_DIRECT of the changed qcow2 file (after the update)",
            run,
            *bytes,
        );
    }
    if let Some((run, bytes)) = &limits.copy {
        line(
            "cp --reflink=auto of the pulled VM's files, synced",
            run,
            *bytes,
        );
    }
    if let Some(fetch) = update_fetch {
        let received = fetch
            .summary_u64(&["bytes_received", "bytes_downloaded"])
            .unwrap_or(0);
        line("sarde fetch (update, into the old cache)", fetch, received);
    }
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
    let secs = |v: Option<f64>| v.map_or_else(|| "failed".to_string(), |v| format!("{v:.2}"));
    for (op, _, _) in &first.rows {
        let rows: Vec<&(String, f64, Option<f64>)> = outcomes
            .iter()
            .filter_map(|o| o.rows.iter().find(|r| &r.0 == op))
            .collect();
        // A failed baseline has no time: it shows in the runs, not in the medians.
        let ratios: Vec<Option<f64>> = rows.iter().map(|r| r.2.map(|t| t / r.1)).collect();
        let each: Vec<String> = ratios
            .iter()
            .map(|r| r.map_or_else(|| "failed".to_string(), |r| format!("{r:.2}x")))
            .collect();
        println!(
            "| {op} | {:.2} | {} | {} | {} |",
            median(rows.iter().map(|r| r.1).collect()).unwrap_or(f64::NAN),
            secs(median(rows.iter().filter_map(|r| r.2).collect())),
            median(ratios.iter().flatten().copied().collect())
                .map_or_else(|| "failed".to_string(), |r| format!("{r:.2}x")),
            each.join(", ")
        );
    }
    if !first.limit_rows.is_empty() {
        println!();
        println!("| operation | limit | sarde s | limit s | ratio to limit | ratios of the runs |");
        println!("| --- | --- | ---: | ---: | ---: | --- |");
        for row in &first.limit_rows {
            let rows: Vec<&LimitRow> = outcomes
                .iter()
                .filter_map(|o| o.limit_rows.iter().find(|r| r.op == row.op))
                .collect();
            let each: Vec<String> = rows.iter().map(|r| format!("{:.2}x", r.ratio())).collect();
            println!(
                "| {} | {} | {:.2} | {:.2} | {:.2}x | {} |",
                row.op,
                row.limit,
                median(rows.iter().map(|r| r.sarde).collect()).unwrap_or(f64::NAN),
                median(rows.iter().map(|r| r.limit_seconds).collect()).unwrap_or(f64::NAN),
                median(rows.iter().map(|r| r.ratio()).collect()).unwrap_or(f64::NAN),
                each.join(", ")
            );
        }
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
    for op in [LIMIT_EXPORT, LIMIT_PULL, LIMIT_REEXPORT, LIMIT_UPDATE_PULL] {
        let rows: Vec<&LimitRow> = outcomes
            .iter()
            .filter_map(|o| o.limit_rows.iter().find(|r| r.op == op))
            .collect();
        let limit = rows.first().map_or("its limit", |r| r.limit);
        let ratio = median(rows.iter().map(|r| r.ratio()).collect());
        verdict(
            format!(
                "{op} at most {LIMIT_TARGET}x the machine's limit, {limit} ({})",
                ratio.map_or("-".into(), |r| format!("{r:.2}x"))
            ),
            ratio.map(|r| r <= LIMIT_TARGET),
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
        skip_baseline: args.no_baseline,
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

    // 0: the machine's limits on this disk, before anything else fills the page
    // cache or the work directory.
    let mut limits = measure_limits(&runner, dir, disk)?;

    // 1 and 2: export, then push (push alone is the push of this pair).
    let mut sarde_export = None;
    let mut sarde_push = None;
    if sarde_on {
        sarde_export = Some(runner.measure("sarde export", &mut sarde_export_cmd(), true)?);
        sarde_push = Some(runner.measure("sarde push", &mut sarde_push_cmd(), true)?);
    }
    let py_export = runner.baseline("Python export", &[], || py_export_cmd(&py_push_oci), true)?;
    let py_push = runner.baseline(
        "Python push",
        &[&py_export],
        || py_push_cmd(&py_push_oci),
        true,
    )?;
    let py_image = python_manifest(&py_export, &py_layout(&py_push_oci));
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
    let py_fetch = runner.baseline(
        "Python fetch (empty cache)",
        &[&py_push],
        py_fetch_cmd,
        true,
    )?;

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
        let pull = runner.measure(
            "sarde pull (empty cache)",
            &mut sarde_cmd("pull", &sarde_pull_args),
            true,
        )?;
        defined(&args.connect, &sarde_vm)?;
        Some(pull)
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
    let py_pull_cmd = || python_cmd(&py_pull_args);
    let py_pull = runner
        .baseline("Python pull (empty cache)", &[&py_push], py_pull_cmd, true)?
        .and_then(|pull| match defined(&args.connect, &python_vm) {
            Ok(()) => Ok(pull),
            Err(e) => Err(Failed {
                step: "Python pull (empty cache)".into(),
                reason: format!("{e:#}"),
            }),
        });

    // 5: pull again, same tag, same cache, VM present: cold page cache, then warm;
    // best of 3 each.
    let mut sarde_repull = None;
    let mut sarde_repull_warm = None;
    if sarde_on {
        // sarde's failures end the run: its steps never give an Ok(Err).
        let once = |label: &str, cold: bool| {
            runner
                .measure(label, &mut sarde_cmd("pull", &sarde_pull_args), cold)
                .map(Ok)
        };
        sarde_repull = Some(best_of_3(|| {
            once("sarde re-pull (cold page cache)", true)
        })??);
        sarde_repull_warm = Some(best_of_3(|| once("sarde re-pull (warm)", false))??);
    }
    let py_repull = best_of_3(|| {
        runner.baseline(
            "Python re-pull (cold page cache)",
            &[&py_pull],
            py_pull_cmd,
            true,
        )
    })?;
    let py_repull_warm =
        best_of_3(|| runner.baseline("Python re-pull (warm)", &[&py_pull], py_pull_cmd, false))?;
    // 5b: the air-gapped path: push into an archive, pull from it, cold.
    let mut archive_push = None;
    let mut archive_pull = None;
    if sarde_on && !args.no_archive {
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
        // Nothing later needs them: room for the large sizes.
        undefine(&args.connect, &archive_vm);
        for path in [&archive_vms, &archive_oci] {
            std::fs::remove_dir_all(path).with_context(|| format!("removing {path}"))?;
        }
        std::fs::remove_file(dir.join("image.tar")).context("removing the archive")?;
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

    // The re-export's limit: reading the changed file once.
    let changed_bytes = file_size(disk)?;
    let changed_read = runner.measure(
        "limit: O_DIRECT read of the changed disk file",
        &mut direct_read(disk),
        true,
    )?;
    limits.changed_read = Some((changed_read, changed_bytes));

    let mut sarde_update_export = None;
    let mut sarde_update_push = None;
    let mut sarde_update_fetch = None;
    let mut sarde_update_pull = None;
    let mut sarde_update = None;
    if sarde_on {
        let old = Manifest::read(&sarde_layout(&sarde_fetch_oci), TAG)?;
        let export = runner.measure("sarde export (update)", &mut sarde_export_cmd(), true)?;
        let push = runner.measure("sarde push (update)", &mut sarde_push_cmd(), true)?;
        sarde_update_push = Some(export.then(&push));
        sarde_update_export = Some(export);
        // Nothing later needs the export cache either: room for the large sizes.
        std::fs::remove_dir_all(&sarde_push_oci)
            .with_context(|| format!("removing {sarde_push_oci}"))?;
        let fetch = runner.measure(
            "sarde fetch (update, into the old cache)",
            &mut sarde_fetch_cmd(),
            true,
        )?;
        let new = Manifest::read(&sarde_layout(&sarde_fetch_oci), TAG)?;
        // Nothing later needs the fetch cache: room for the large sizes.
        std::fs::remove_dir_all(&sarde_fetch_oci)
            .with_context(|| format!("removing {sarde_fetch_oci}"))?;
        sarde_update_fetch = Some(fetch);
        sarde_update = Some((old, new));
        // The update pull's limit, with the update fetch: copying the previous
        // version's files once. Measured before the pull replaces them.
        limits.copy = Some(measure_copy(
            &runner,
            &Path::new(&sarde_vms).join(&sarde_vm),
            &dir.join("limit-copy"),
        )?);
        // The first pull's cache, VM directory and name: the previous version is
        // imported there.
        let mut update_pull_args = vec!["--replace"];
        update_pull_args.extend(sarde_pull_args);
        let pull = runner.measure(
            "sarde pull (update) into the host that holds the previous version",
            &mut sarde_cmd("pull", &update_pull_args),
            true,
        )?;
        defined(&args.connect, &sarde_vm)?;
        sarde_update_pull = Some(pull);
    }
    let py_old = python_manifest(&py_fetch, &py_layout(&py_fetch_oci));
    let py_update_export = runner.baseline(
        "Python export (update)",
        &[],
        || py_export_cmd(&py_update_oci),
        true,
    )?;
    let py_update_push = runner.baseline(
        "Python push (update)",
        &[&py_update_export],
        || py_push_cmd(&py_update_oci),
        true,
    )?;
    // Into the old cache: without the first fetch, this would be another one into
    // an empty cache.
    let py_update_fetch = runner.baseline(
        "Python fetch (update, into the old cache)",
        &[&py_update_push, &py_fetch],
        py_fetch_cmd,
        true,
    )?;
    let py_new = python_manifest(&py_update_fetch, &py_layout(&py_fetch_oci));
    let py_update_pull = runner.baseline(
        "Python pull (update) into the host that holds the previous version",
        &[&py_update_push, &py_pull],
        py_pull_cmd,
        true,
    )?;
    let py_update_bytes = match (&py_old, &py_new) {
        (Some(old), Some(new)) => Some(
            new.size + new.config.size + new.new_layers(old).iter().map(|l| l.size).sum::<u64>(),
        ),
        _ => None,
    };

    // The report.
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let disk_bytes = file_size(disk)?;
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
    match &py_image {
        Some(image) => println!(
            "Python image: {} layers, {} in all",
            image.layers.len(),
            mb(image.total())
        ),
        None => println!("Python image: none (its export failed or left no readable manifest)"),
    }
    println!();
    println!(
        "| operation | sarde s | baseline | baseline s | speed-up | sarde peak RSS | bytes moved (sarde / baseline) |"
    );
    println!("| --- | ---: | --- | ---: | ---: | ---: | ---: |");
    let sent = |r: &Run| r.summary_u64(&["bytes_sent", "bytes_uploaded", "bytes_pushed"]);
    let received = |r: &Run| r.summary_u64(&["bytes_received", "bytes_downloaded"]);
    // sarde's bytes come from its JSON summary; an export prints none.
    let summarized = |b: Option<u64>| b.map_or_else(|| "? (no JSON summary)".to_string(), mb);
    let mut row = |op: &str,
                   ours: Option<&Run>,
                   name: &str,
                   theirs: &Baseline,
                   our_bytes: String,
                   their_bytes: Option<u64>| {
        let their_secs = theirs.as_ref().ok().map(|r| r.seconds);
        let their_bytes = match theirs {
            Ok(_) => their_bytes.map_or_else(|| "-".to_string(), mb),
            Err(_) => "failed".to_string(),
        };
        let secs = their_secs.map_or_else(|| "failed".to_string(), |s| format!("{s:.2}"));
        match ours {
            Some(ours) => {
                outcome
                    .rows
                    .push((op.to_string(), ours.seconds, their_secs));
                println!(
                    "| {op} | {:.2} | {name} | {secs} | {} | {:.0} MiB | {our_bytes} / {their_bytes} |",
                    ours.seconds,
                    their_secs.map_or_else(
                        || "failed".to_string(),
                        |t| format!("{:.2}x", t / ours.seconds)
                    ),
                    ours.peak_rss_mib,
                )
            }
            None => println!("| {op} | - | {name} | {secs} | - | - | - / {their_bytes} |"),
        }
    };
    let py_total = py_image.as_ref().map(Manifest::total);
    let sarde_export_push = match (&sarde_export, &sarde_push) {
        (Some(e), Some(p)) => Some(e.then(p)),
        _ => None,
    };
    let sarde_sent = summarized(sarde_push.as_ref().and_then(sent));
    row(
        EXPORT_PUSH,
        sarde_export_push.as_ref(),
        "Python export + push",
        &baseline_then(&py_export, &py_push),
        sarde_sent.clone(),
        py_total,
    );
    row(
        "push alone",
        sarde_push.as_ref(),
        "Python push",
        &py_push,
        sarde_sent,
        py_total,
    );
    row(
        "fetch (empty cache)",
        sarde_fetch.as_ref(),
        "Python fetch",
        &py_fetch,
        summarized(sarde_fetch.as_ref().and_then(received)),
        py_total,
    );
    row(
        PULL,
        sarde_pull.as_ref(),
        "Python pull (fetch + import)",
        &py_pull,
        summarized(sarde_pull.as_ref().and_then(received)),
        py_total,
    );
    row(
        "re-pull, unchanged tag (cold page cache, best of 3)",
        sarde_repull.as_ref(),
        "Python pull",
        &py_repull,
        summarized(sarde_repull.as_ref().and_then(received)),
        None,
    );
    row(
        "re-pull, unchanged tag (warm, best of 3)",
        sarde_repull_warm.as_ref(),
        "Python pull",
        &py_repull_warm,
        summarized(sarde_repull_warm.as_ref().and_then(received)),
        None,
    );
    row(
        "update: re-export",
        sarde_update_export.as_ref(),
        "Python export",
        &py_update_export,
        "-".to_string(),
        None,
    );
    row(
        "update: export + push",
        sarde_update_push.as_ref(),
        "Python export + push",
        &baseline_then(&py_update_export, &py_update_push),
        summarized(sarde_update_push.as_ref().and_then(sent)),
        py_update_bytes,
    );
    row(
        "update: fetch into the old cache",
        sarde_update_fetch.as_ref(),
        "Python fetch",
        &py_update_fetch,
        summarized(sarde_update_fetch.as_ref().and_then(received)),
        py_update_bytes,
    );
    row(
        "update: pull (previous version imported)",
        sarde_update_pull.as_ref(),
        "Python pull",
        &py_update_pull,
        summarized(sarde_update_pull.as_ref().and_then(received)),
        py_update_bytes,
    );
    print_failures(&[
        &py_export,
        &py_push,
        &py_fetch,
        &py_pull,
        &py_repull,
        &py_repull_warm,
        &py_update_export,
        &py_update_push,
        &py_update_fetch,
        &py_update_pull,
    ]);
    println!();
    match (&py_old, &py_new, py_update_bytes) {
        (Some(old), Some(new), Some(bytes)) => println!(
            "update: {changed} of {regions} 64 MiB data regions overwritten; Python: {} of {} layers new ({})",
            new.new_layers(old).len(),
            new.layers.len(),
            mb(bytes)
        ),
        _ => println!(
            "update: {changed} of {regions} 64 MiB data regions overwritten; Python: no fetched manifests to compare"
        ),
    }
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
    print_limits(&limits, args, sarde_update_fetch.as_ref());
    let update_limit = match (&limits.copy, &sarde_update_fetch) {
        (Some((copy, _)), Some(fetch)) => Some(copy.seconds + fetch.seconds),
        _ => None,
    };
    let limit_rows = [
        (
            LIMIT_EXPORT,
            "max(O_DIRECT read, zstd -3 -T0)",
            sarde_export.as_ref(),
            Some(limits.read.seconds.max(limits.zstd.seconds)),
        ),
        (
            LIMIT_PULL,
            "zstd -d -T0 into a file, synced",
            sarde_pull.as_ref(),
            Some(limits.unzstd.seconds),
        ),
        (
            LIMIT_REEXPORT,
            "O_DIRECT read of the changed file",
            sarde_update_export.as_ref(),
            limits.changed_read.as_ref().map(|(r, _)| r.seconds),
        ),
        (
            LIMIT_UPDATE_PULL,
            "cp --reflink=auto + update fetch",
            sarde_update_pull.as_ref(),
            update_limit,
        ),
    ];
    if sarde_on {
        println!();
        println!("| operation | sarde s | limit | limit s | ratio to limit | target |");
        println!("| --- | ---: | --- | ---: | ---: | --- |");
    }
    for (op, limit, ours, limit_seconds) in limit_rows {
        let (Some(ours), Some(limit_seconds)) = (ours, limit_seconds) else {
            continue;
        };
        let row = LimitRow {
            op,
            limit,
            sarde: ours.seconds,
            limit_seconds,
        };
        println!(
            "| {op} | {:.2} | {limit} | {limit_seconds:.2} | {:.2}x | ≤ {LIMIT_TARGET}x: {} |",
            row.sarde,
            row.ratio(),
            limit_verdict(row.ratio())
        );
        outcome.limit_rows.push(row);
    }
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
