//! `executor-soak`: jobs through the GitLab Runner custom executor as
//! gitlab-runner runs them (config, prepare, the run stages, cleanup), 2–4 at a
//! time, each with a random fate: it passes, its script fails, it is cancelled
//! (SIGTERM to the process group) during prepare, a run stage or cleanup, or
//! its prepare or a run stage is killed (SIGKILL); cleanup always follows, as
//! gitlab-runner calls it after a cancel or a kill. Every stage's exit must be
//! what its fate gives, and afterwards nothing of any job may be left (domain,
//! overlay, VM slot, state file) and free space must be back where it was
//! after a warm-up job (which caches the image and imports the base VM).
//!
//! ```text
//! executor-soak [--jobs N] [--parallel P] [--seed S] [--workdir DIR]
//!               [--max-vms M] [--tolerance-mib T]
//! ```
//!
//! `scripts/executor-soak.sh` builds it in release mode and runs it on a file
//! system of its own; it needs root, libvirt and the registry tools
//! (`scripts/start-services.sh`) and `SARDE_TEST_LIBVIRT=1`. Exits 1 on an
//! unexpected exit, a leftover or lost space, 2 when it cannot run.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sarde_e2e::runner::{self, BUILD_FAILURE, STAGES, SYSTEM_FAILURE, Setup};
use sarde_e2e::vm;

/// The run stages of a job whose script fails: gitlab-runner's for a passing
/// job, without archive_cache and uploading the failure's artifacts.
fn failing_stages() -> impl Iterator<Item = &'static str> {
    STAGES
        .iter()
        .filter(|s| **s != "archive_cache")
        .map(|s| match *s {
            "upload_artifacts_on_success" => "upload_artifacts_on_failure",
            other => other,
        })
}

/// The job's script writes this much into the guest (so its overlay grows and a
/// leaked one shows in the free space), then lists it.
const GUEST_WRITE: &str =
    "head -c 8388608 /dev/urandom > /root/soak-data && sync && ls -l /root/soak-data";

/// A SIGTERM'd stage should stop within this (gitlab-runner waits longer, then
/// kills: a stage slower than this is reported).
const PROMPT_STOP: Duration = Duration::from_secs(10);
/// After this, a stage that ignored its SIGTERM is killed, as gitlab-runner would.
const KILL_AFTER_TERM: Duration = Duration::from_secs(60);
/// A stage running longer than this hangs: it is killed and reported.
const STAGE_LIMIT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fate {
    Pass,
    ScriptFails,
    TermPrepare,
    TermRun,
    TermCleanup,
    KillPrepare,
    KillRun,
}

const FATES: [Fate; 7] = [
    Fate::Pass,
    Fate::ScriptFails,
    Fate::TermPrepare,
    Fate::TermRun,
    Fate::TermCleanup,
    Fate::KillPrepare,
    Fate::KillRun,
];

impl Fate {
    fn name(self) -> &'static str {
        match self {
            Fate::Pass => "pass",
            Fate::ScriptFails => "script-fails",
            Fate::TermPrepare => "sigterm-prepare",
            Fate::TermRun => "sigterm-run",
            Fate::TermCleanup => "sigterm-cleanup",
            Fate::KillPrepare => "sigkill-prepare",
            Fate::KillRun => "sigkill-run",
        }
    }

    /// The signal and the stage it is sent to.
    fn strike(self) -> Option<(i32, &'static str)> {
        match self {
            Fate::Pass | Fate::ScriptFails => None,
            Fate::TermPrepare => Some((libc::SIGTERM, "prepare")),
            Fate::TermRun => Some((libc::SIGTERM, "step_script")),
            Fate::TermCleanup => Some((libc::SIGTERM, "cleanup")),
            Fate::KillPrepare => Some((libc::SIGKILL, "prepare")),
            Fate::KillRun => Some((libc::SIGKILL, "step_script")),
        }
    }
}

/// xorshift64* seeded through splitmix64: small, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in `[lo, hi)`.
    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Options {
    jobs: usize,
    /// Jobs in flight; random in 2..=4 (drawn again whenever one ends) when `None`.
    parallel: Option<usize>,
    seed: u64,
    /// Where the work directory goes (a file system of its own, ideally).
    workdir: PathBuf,
    max_vms: usize,
    /// How much less free space per file system still counts as "back where it
    /// was" (default 64 MiB). Leaks the soak looks for are caught by name
    /// (domains, overlays, slots, state files, any new file under the
    /// executor's directories); free space adds what names cannot show: an
    /// unlinked overlay a QEMU still holds open, blobs or temporary files
    /// rewritten in place. On the soak's own tmpfs the figure is exact to the
    /// page; the tolerance leaves room for bookkeeping the cache may rewrite
    /// larger (index, usage records) and for a work directory on a shared file
    /// system (`--workdir`); a leak in every job (each guest writes 8 MiB into
    /// its overlay) would be far past it after 40 jobs.
    tolerance_mib: u64,
}

const USAGE: &str = "usage: executor-soak [--jobs N] [--parallel P] [--seed S] [--workdir DIR] [--max-vms M] [--tolerance-mib T]";

fn options() -> Result<Options, String> {
    let mut o = Options {
        jobs: 40,
        parallel: None,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ u64::from(std::process::id()),
        workdir: PathBuf::from("/var/tmp"),
        max_vms: 3,
        tolerance_mib: 64,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Err(USAGE.into());
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{arg} wants a value\n{USAGE}"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|e| format!("{arg} {value}: {e}\n{USAGE}"))
        };
        match arg.as_str() {
            "--jobs" => o.jobs = number()? as usize,
            "--parallel" => o.parallel = Some(number()?.max(1) as usize),
            "--seed" => o.seed = number()?,
            "--workdir" => o.workdir = PathBuf::from(&value),
            "--max-vms" => o.max_vms = number()? as usize,
            "--tolerance-mib" => o.tolerance_mib = number()?,
            _ => return Err(format!("unknown option {arg}\n{USAGE}")),
        }
    }
    Ok(o)
}

/// How a stage ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Exit(i32),
    Killed(i32),
}

impl Outcome {
    fn of(status: ExitStatus) -> Outcome {
        match (status.code(), status.signal()) {
            (Some(code), _) => Outcome::Exit(code),
            (None, Some(signal)) => Outcome::Killed(signal),
            (None, None) => Outcome::Killed(0),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Exit(code) => write!(f, "{code}"),
            Outcome::Killed(libc::SIGKILL) => f.write_str("SIGKILL"),
            Outcome::Killed(libc::SIGTERM) => f.write_str("SIGTERM"),
            Outcome::Killed(signal) => write!(f, "signal {signal}"),
        }
    }
}

/// One job of the soak, decided before it starts.
#[derive(Debug, Clone)]
struct Plan {
    index: usize,
    id: String,
    fate: Fate,
    /// Seconds into the struck stage the signal is due.
    delay: f64,
}

/// What one stage did.
struct StageRun {
    stage: String,
    outcome: Outcome,
    secs: f64,
    /// Seconds from the signal to the exit, when one was sent.
    stopped_after: Option<f64>,
    problems: Vec<String>,
    stderr: PathBuf,
    /// The executor's process id (names its cache leases).
    pid: u32,
}

/// What one job did.
struct Report {
    plan: Plan,
    stages: Vec<StageRun>,
    problems: Vec<String>,
    notes: Vec<String>,
    prepare_secs: Option<f64>,
    cleanup_secs: f64,
    passed: bool,
    leftovers: Vec<String>,
}

impl Report {
    /// Records a problem unless the stage ended as one of `expected`.
    fn expect(&mut self, mut run: StageRun, expected: &[Outcome]) -> Outcome {
        self.problems.append(&mut run.problems);
        let outcome = run.outcome;
        if !expected.contains(&outcome) {
            let wanted: Vec<String> = expected.iter().map(Outcome::to_string).collect();
            let tail = tail(&run.stderr, 6);
            self.problems.push(format!(
                "{} ended {outcome}, expected {}{}",
                run.stage,
                wanted.join(" or "),
                if tail.is_empty() {
                    String::new()
                } else {
                    format!("; its stderr ends:\n{tail}")
                }
            ));
        }
        self.stages.push(run);
        outcome
    }

    fn stage(&self, name: &str) -> Option<&StageRun> {
        self.stages.iter().find(|s| s.stage == name)
    }
}

/// The last `n` lines of a file, indented.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("      | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

struct Soak<'a> {
    setup: &'a Setup,
    logs: PathBuf,
}

impl Soak<'_> {
    /// Runs one stage of `plan`'s job in a process group of its own (as
    /// gitlab-runner does), sending `strike` (signal, seconds) to the group.
    fn stage(
        &self,
        plan: &Plan,
        stage: &str,
        args: &[&Path],
        strike: Option<(i32, f64)>,
        env: &[(&str, &Path)],
    ) -> StageRun {
        let base = self.logs.join(format!("{}-{stage}", plan.id));
        let stdout = base.with_extension("out");
        let stderr = base.with_extension("err");
        let mut cmd = self.setup.executor(&plan.id, &self.setup.image);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("a log file"))
            .stderr(std::fs::File::create(&stderr).expect("a log file"))
            .process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut problems = Vec::new();
        let started = Instant::now();
        let mut child = cmd.spawn().expect("the executor starts");
        let pid = child.id();
        let mut signalled: Option<Instant> = None;
        let mut killed = false;
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting for the executor") {
                break status;
            }
            let now = Instant::now();
            if let Some((signal, delay)) = strike {
                if signalled.is_none() && now - started >= Duration::from_secs_f64(delay) {
                    runner::signal_group(&child, signal);
                    signalled = Some(now);
                }
            }
            let ignored_term = signalled.is_some_and(|t| now - t > KILL_AFTER_TERM);
            if !killed && (ignored_term || now - started > STAGE_LIMIT) {
                problems.push(format!(
                    "{stage} still ran after {:.0}s{}: killed",
                    (now - started).as_secs_f64(),
                    if ignored_term { " and a SIGTERM" } else { "" }
                ));
                runner::signal_group(&child, libc::SIGKILL);
                killed = true;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let ended = Instant::now();
        let stopped_after = signalled.map(|t| (ended - t).as_secs_f64());
        if let (Some(after), Some((libc::SIGTERM, _))) = (stopped_after, strike) {
            if after > PROMPT_STOP.as_secs_f64() {
                problems.push(format!("{stage} took {after:.1}s to stop after SIGTERM"));
            }
        }
        StageRun {
            stage: stage.to_string(),
            outcome: Outcome::of(status),
            secs: (ended - started).as_secs_f64(),
            stopped_after,
            problems,
            stderr,
            pid,
        }
    }

    /// A run stage: `body` as the stage's generated script.
    fn run_stage(
        &self,
        plan: &Plan,
        stage: &str,
        body: &str,
        strike: Option<(i32, f64)>,
        exit_file: Option<&Path>,
    ) -> StageRun {
        let script = self.setup.script(&plan.id, stage, body);
        let run = Path::new("run");
        let name = PathBuf::from(stage);
        let env: Vec<(&str, &Path)> = exit_file
            .map(|f| ("BUILD_EXIT_CODE_FILE", f))
            .into_iter()
            .collect();
        self.stage(plan, stage, &[run, &script, &name], strike, &env)
    }

    /// `config`, `prepare` or `cleanup` of `plan`'s job, struck as its fate says.
    fn step(&self, plan: &Plan, name: &str) -> StageRun {
        let strike = plan
            .fate
            .strike()
            .filter(|(_, stage)| *stage == name)
            .map(|(signal, _)| (signal, plan.delay));
        self.stage(plan, name, &[Path::new(name)], strike, &[])
    }

    /// The whole job, as gitlab-runner drives it, and what it left behind.
    fn job(&self, plan: &Plan) -> Report {
        let mut report = Report {
            plan: plan.clone(),
            stages: Vec::new(),
            problems: Vec::new(),
            notes: Vec::new(),
            prepare_secs: None,
            cleanup_secs: 0.0,
            passed: false,
            leftovers: Vec::new(),
        };
        let ok = [Outcome::Exit(0)];

        let run = self.step(plan, "config");
        report.expect(run, &ok);

        let run = self.step(plan, "prepare");
        let expected = match (plan.fate, run.stopped_after.is_some()) {
            (Fate::TermPrepare, true) => vec![Outcome::Exit(SYSTEM_FAILURE)],
            (Fate::KillPrepare, true) => vec![Outcome::Killed(libc::SIGKILL)],
            (Fate::TermPrepare | Fate::KillPrepare, false) => {
                report.notes.push(format!(
                    "prepare was done in {:.1}s, before the signal: cancelled between stages",
                    run.secs
                ));
                ok.to_vec()
            }
            _ => ok.to_vec(),
        };
        let secs = run.secs;
        let prepared = report.expect(run, &expected) == Outcome::Exit(0);
        if prepared {
            report.prepare_secs = Some(secs);
        }
        let cancelled_in_prepare = matches!(plan.fate, Fate::TermPrepare | Fate::KillPrepare);
        if prepared && !cancelled_in_prepare {
            self.run_stages(plan, &mut report);
        }

        // gitlab-runner always calls cleanup, after a cancel or a kill too.
        let run = self.step(plan, "cleanup");
        report.cleanup_secs = run.secs;
        if plan.fate == Fate::TermCleanup && run.stopped_after.is_none() {
            report.notes.push(format!(
                "cleanup was done in {:.2}s, before the signal",
                run.secs
            ));
        }
        report.expect(run, &ok);

        report.leftovers = self.setup.leftovers(&plan.id);
        report.passed = report.problems.is_empty()
            && report.leftovers.is_empty()
            && report.stages.iter().all(|s| s.outcome == Outcome::Exit(0));
        report
    }

    fn run_stages(&self, plan: &Plan, report: &mut Report) {
        let ok = [Outcome::Exit(0)];
        match plan.fate {
            Fate::ScriptFails => {
                let exit_file = self.logs.join(format!("{}-exit-code", plan.id));
                for stage in failing_stages() {
                    if stage == "step_script" {
                        let body = format!("{GUEST_WRITE}\necho failing\nexit 3");
                        let run = self.run_stage(plan, stage, &body, None, Some(&exit_file));
                        report.expect(run, &[Outcome::Exit(BUILD_FAILURE)]);
                        let code = std::fs::read_to_string(&exit_file).unwrap_or_default();
                        if code.trim() != "3" {
                            report
                                .problems
                                .push(format!("BUILD_EXIT_CODE_FILE holds {code:?}, not 3"));
                        }
                    } else if report.expect(self.plain(plan, stage), &ok) != Outcome::Exit(0) {
                        return;
                    }
                }
            }
            Fate::TermRun | Fate::KillRun => {
                for stage in ["prepare_script", "get_sources"] {
                    if report.expect(self.plain(plan, stage), &ok) != Outcome::Exit(0) {
                        return;
                    }
                }
                let body = format!("{GUEST_WRITE}\necho started\nsleep 120\necho never");
                let (signal, expected) = if plan.fate == Fate::TermRun {
                    (libc::SIGTERM, Outcome::Exit(SYSTEM_FAILURE))
                } else {
                    (libc::SIGKILL, Outcome::Killed(libc::SIGKILL))
                };
                let run =
                    self.run_stage(plan, "step_script", &body, Some((signal, plan.delay)), None);
                report.expect(run, &[expected]);
            }
            _ => {
                for stage in STAGES {
                    let run = if *stage == "step_script" {
                        let body =
                            format!("echo soak job {} on $(hostname)\n{GUEST_WRITE}", plan.id);
                        self.run_stage(plan, stage, &body, None, None)
                    } else {
                        self.plain(plan, stage)
                    };
                    if report.expect(run, &ok) != Outcome::Exit(0) {
                        return;
                    }
                }
            }
        }
    }

    /// A stage that only says its name.
    fn plain(&self, plan: &Plan, stage: &str) -> StageRun {
        self.run_stage(plan, stage, &format!("echo stage {stage}"), None, None)
    }
}

/// What the host holds: free space per file system, domains, files.
struct Snapshot {
    /// Per file system (device): the directories on it and its free bytes
    /// (plus what the soak's own scripts and logs take there).
    free: BTreeMap<u64, (Vec<String>, u64)>,
    domains: BTreeSet<String>,
    /// Every file under the executor's directories, with its size.
    files: BTreeMap<PathBuf, u64>,
}

fn free_bytes(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("a path");
    // SAFETY: statvfs(3) fills the struct we pass; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return 0;
        }
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

fn walk(dir: &Path, files: &mut BTreeMap<PathBuf, u64>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match entry.metadata() {
            Ok(m) if m.is_dir() => walk(&path, files),
            Ok(m) => {
                files.insert(path, m.len());
            }
            Err(_) => {}
        }
    }
}

fn domains() -> BTreeSet<String> {
    vm::run("virsh", &["-c", vm::LIBVIRT_URI, "list", "--all", "--name"])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// The directories the executor writes: ocidir, vmdir, clonedir, state dir.
fn executor_dirs(setup: &Setup) -> Vec<(&'static str, PathBuf)> {
    let work = setup.work.path();
    vec![
        ("ocidir", work.join("OCI")),
        ("vmdir", work.join("VMs")),
        ("clonedir", setup.clones.clone()),
        ("state", setup.state.clone()),
    ]
}

fn snapshot(setup: &Setup) -> Snapshot {
    let mut free: BTreeMap<u64, (Vec<String>, u64)> = BTreeMap::new();
    let mut files = BTreeMap::new();
    for (name, dir) in executor_dirs(setup) {
        std::fs::create_dir_all(&dir).ok();
        let dev = std::fs::metadata(&dir).map(|m| m.dev()).unwrap_or(0);
        let entry = free
            .entry(dev)
            .or_insert_with(|| (Vec::new(), free_bytes(&dir)));
        entry.0.push(name.to_string());
        walk(&dir, &mut files);
    }
    // The soak's own stage scripts and logs share the work directory's file
    // system: counted as free, so only what the executor keeps shows.
    let work = setup.work.path();
    let mut own = BTreeMap::new();
    walk(&work.join("logs"), &mut own);
    for entry in std::fs::read_dir(work).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with("script-") {
            own.insert(entry.path(), 0);
        }
    }
    let own: u64 = own
        .keys()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.blocks() * 512)
        .sum();
    let dev = std::fs::metadata(work).map(|m| m.dev()).unwrap_or(0);
    if let Some((_, free)) = free.get_mut(&dev) {
        *free += own;
    }
    Snapshot {
        free,
        domains: domains(),
        files,
    }
}

fn mib(bytes: i64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// min / median / max of `values`.
fn spread(values: &mut [f64]) -> String {
    if values.is_empty() {
        return "-".into();
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    format!(
        "min {:.2}s, median {:.2}s, max {:.2}s (n={n})",
        values[0],
        median,
        values[n - 1]
    )
}

fn one_line(report: &Report) -> String {
    let exits: Vec<String> = report
        .stages
        .iter()
        .filter(|s| {
            matches!(
                s.stage.as_str(),
                "config" | "prepare" | "step_script" | "cleanup"
            ) || s.outcome != Outcome::Exit(0)
        })
        .map(|s| match s.stopped_after {
            Some(after) => format!(
                "{} {} (stopped {after:.2}s after the signal)",
                s.stage, s.outcome
            ),
            None => format!("{} {}", s.stage, s.outcome),
        })
        .collect();
    let plan = &report.plan;
    let delay = match plan.fate.strike() {
        Some((_, stage)) => format!(" @{stage}+{:.2}s", plan.delay),
        None => String::new(),
    };
    let verdict = if report.problems.is_empty() && report.leftovers.is_empty() {
        "ok"
    } else {
        "UNEXPECTED"
    };
    format!(
        "job {:>2} {} {}{delay}: {}; prepare {}, cleanup {:.2}s: {verdict}",
        plan.index,
        plan.id,
        plan.fate.name(),
        exits.join(", "),
        report
            .prepare_secs
            .map(|s| format!("{s:.1}s"))
            .unwrap_or_else(|| "-".into()),
        report.cleanup_secs,
    )
}

fn print_report(report: &Report) {
    println!("{}", one_line(report));
    for note in &report.notes {
        println!("    note: {note}");
    }
    for problem in &report.problems {
        println!("    PROBLEM: {problem}");
    }
    for left in &report.leftovers {
        println!("    LEFT BEHIND: {left}");
    }
}

fn main() {
    let options = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    std::process::exit(match soak(&options) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("executor-soak: {e}");
            2
        }
    });
}

fn soak(o: &Options) -> Result<bool, String> {
    let parallel = match o.parallel {
        Some(p) => p.to_string(),
        None => "2-4 (random)".into(),
    };
    println!(
        "executor-soak: {} jobs, {parallel} in flight, max-vms {}, seed {} (repeat with --seed {})",
        o.jobs, o.max_vms, o.seed, o.seed
    );
    // The binaries next to this one (a release build), else a debug build.
    let here = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = here.parent().unwrap_or(Path::new("."));
    if dir.join("sarde").is_file() && dir.join("gitlab-sardinecake-executor").is_file() {
        sarde_e2e::use_binaries_in(dir);
    }
    println!("executor: {}", sarde_e2e::executor_bin().display());

    let Some((setup, _guest)) = runner::setup_in(
        "executor-soak",
        &format!("max-vms = {}\n", o.max_vms),
        &o.workdir,
    ) else {
        return Err("libvirt or the registry tools are missing: run as root after scripts/start-services.sh, with SARDE_TEST_LIBVIRT=1".into());
    };
    // Several TCG guests boot at once on a small host: more time than the tests'.
    let ini = std::fs::read_to_string(&setup.config).map_err(|e| e.to_string())?;
    std::fs::write(
        &setup.config,
        ini.replacen("timeout = 90\n", "timeout = 300\n", 1),
    )
    .map_err(|e| e.to_string())?;
    let logs = setup.work.path().join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| e.to_string())?;
    println!(
        "work directory {} (image {}, base VM {}, source VM {})",
        setup.work.path().display(),
        setup.image,
        setup.bases.lock().unwrap()[0],
        setup.source.name
    );
    let soak = Soak {
        setup: &setup,
        logs,
    };
    let prefix = format!("s{}", std::process::id());

    // Warm-up: caches the image and imports the base VM.
    let warm = Plan {
        index: 0,
        id: format!("{prefix}-w"),
        fate: Fate::Pass,
        delay: 0.0,
    };
    let report = soak.job(&warm);
    print_report(&report);
    if !report.passed {
        return Err("the warm-up job failed".into());
    }
    let startup = report.stage("config").map_or(0.1, |s| s.secs);
    let warm_prepare = report.prepare_secs.unwrap_or(10.0);
    let warm_cleanup = report.cleanup_secs;
    let before = snapshot(&setup);

    // The plans: every fate as often as the others (shuffled), random delays.
    let mut rng = Rng::new(o.seed);
    let mut fates: Vec<Fate> = (0..o.jobs).map(|i| FATES[i % FATES.len()]).collect();
    for i in (1..fates.len()).rev() {
        fates.swap(i, rng.below(i + 1));
    }
    let plans: Vec<Plan> = fates
        .into_iter()
        .enumerate()
        .map(|(i, fate)| {
            let delay = match fate {
                // After the executor's start-up, up to a whole prepare.
                Fate::TermPrepare | Fate::KillPrepare => {
                    rng.between((3.0 * startup).max(0.2), warm_prepare.max(3.0))
                }
                // Into the running script (or its SSH session's start).
                Fate::TermRun | Fate::KillRun => rng.between(0.3, 4.0),
                // Anywhere in a cleanup, its start-up included.
                Fate::TermCleanup => rng.between(0.0, warm_cleanup.max(0.3)),
                Fate::Pass | Fate::ScriptFails => 0.0,
            };
            Plan {
                index: i + 1,
                id: format!("{prefix}-{}", i + 1),
                fate,
                delay,
            }
        })
        .collect();

    let started = Instant::now();
    let mut reports: Vec<Report> = Vec::new();
    let mut most_in_flight = 0;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<Report>();
        let mut next = plans.iter();
        let mut in_flight = 0usize;
        let mut target = o.parallel.unwrap_or_else(|| 2 + rng.below(3));
        loop {
            while in_flight < target {
                let Some(plan) = next.next() else { break };
                let tx = tx.clone();
                let soak = &soak;
                scope.spawn(move || {
                    let _ = tx.send(soak.job(plan));
                });
                in_flight += 1;
                most_in_flight = most_in_flight.max(in_flight);
            }
            if in_flight == 0 {
                break;
            }
            let report = rx.recv().expect("a job thread reports");
            in_flight -= 1;
            print!("[{:>2}/{}] ", reports.len() + 1, plans.len());
            print_report(&report);
            reports.push(report);
            target = o.parallel.unwrap_or_else(|| 2 + rng.below(3));
        }
    });
    let took = started.elapsed();

    // Settled: a QEMU that is going may hold unlinked overlays a moment longer.
    let tolerance = (o.tolerance_mib << 20) as i64;
    let mut after = snapshot(&setup);
    let settle = Instant::now() + Duration::from_secs(10);
    while lost_space(&before, &after, tolerance) && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(500));
        after = snapshot(&setup);
    }
    let ok = summary(
        o,
        &setup,
        &prefix,
        &reports,
        &before,
        &after,
        tolerance,
        took,
        most_in_flight,
    );
    // `setup` goes now: the registry stops, the base and source VMs are
    // undefined, the work directory removed.
    Ok(ok)
}

fn lost_space(before: &Snapshot, after: &Snapshot, tolerance: i64) -> bool {
    before.free.iter().any(|(dev, (_, free))| {
        let now = after.free.get(dev).map_or(0, |(_, f)| *f);
        (*free as i64) - (now as i64) > tolerance
    })
}

#[allow(clippy::too_many_arguments)]
fn summary(
    o: &Options,
    setup: &Setup,
    prefix: &str,
    reports: &[Report],
    before: &Snapshot,
    after: &Snapshot,
    tolerance: i64,
    took: Duration,
    most_in_flight: usize,
) -> bool {
    println!();
    println!(
        "== summary: {} jobs in {:.0}s, at most {most_in_flight} in flight, max-vms {}, seed {} ==",
        reports.len(),
        took.as_secs_f64(),
        o.max_vms,
        o.seed
    );
    println!(
        "{:<17} {:>4} {:>11} {:>13}  exits of the struck stage",
        "fate", "jobs", "as expected", "signal late"
    );
    for fate in FATES {
        let of: Vec<&Report> = reports.iter().filter(|r| r.plan.fate == fate).collect();
        if of.is_empty() {
            continue;
        }
        let expected = of
            .iter()
            .filter(|r| r.problems.is_empty() && r.leftovers.is_empty())
            .count();
        let late = of.iter().filter(|r| !r.notes.is_empty()).count();
        let mut exits: BTreeMap<String, usize> = BTreeMap::new();
        let struck = fate.strike().map_or("step_script", |(_, s)| s);
        for r in &of {
            let e = r
                .stage(struck)
                .map_or("not run".to_string(), |s| s.outcome.to_string());
            *exits.entry(e).or_default() += 1;
        }
        let exits: Vec<String> = exits
            .iter()
            .map(|(e, n)| format!("{struck} {e} ×{n}"))
            .collect();
        println!(
            "{:<17} {:>4} {:>11} {:>13}  {}",
            fate.name(),
            of.len(),
            expected,
            late,
            exits.join(", ")
        );
    }
    let unexpected: Vec<&Report> = reports
        .iter()
        .filter(|r| !r.problems.is_empty() || !r.leftovers.is_empty())
        .collect();
    println!(
        "{:<17} {:>4} {:>11}",
        "all",
        reports.len(),
        reports.len() - unexpected.len()
    );
    println!(
        "passes (every stage exited 0): {}",
        reports.iter().filter(|r| r.passed).count()
    );
    let mut prepares: Vec<f64> = reports.iter().filter_map(|r| r.prepare_secs).collect();
    println!(
        "prepare time (completed prepares): {}",
        spread(&mut prepares)
    );
    let mut cleanups: Vec<f64> = reports
        .iter()
        .filter(|r| r.plan.fate != Fate::TermCleanup)
        .map(|r| r.cleanup_secs)
        .collect();
    println!("cleanup time (not signalled): {}", spread(&mut cleanups));
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGKILL, "SIGKILL")] {
        let mut stops: Vec<f64> = reports
            .iter()
            .filter(|r| r.plan.fate.strike().is_some_and(|(s, _)| s == signal))
            .flat_map(|r| r.stages.iter().filter_map(|s| s.stopped_after))
            .collect();
        println!("exit after {name}: {}", spread(&mut stops));
    }

    // Leftovers: each job's names, domains of the soak, files under the
    // executor's directories that were not there after the warm-up.
    let mut leftovers: Vec<String> = reports
        .iter()
        .flat_map(|r| setup.leftovers(&r.plan.id))
        .collect();
    let vm_prefix = format!("gitlab-{prefix}-");
    let ours = |d: &&String| {
        d.starts_with(&vm_prefix)
            || setup.bases.lock().unwrap().contains(d)
            || **d == setup.source.name
    };
    let had: BTreeSet<&String> = before.domains.iter().filter(ours).collect();
    let has: BTreeSet<&String> = after.domains.iter().filter(ours).collect();
    for d in has.difference(&had) {
        leftovers.push(format!("domain {d}"));
    }
    for d in had.difference(&has) {
        leftovers.push(format!("domain {d} (there after the warm-up) is gone"));
    }
    let mut dead_leases = Vec::new();
    // Slot files stay (empty: free); one that names a VM holds a slot.
    let slots = setup.state.join("slots");
    for (path, size) in &after.files {
        let holder = std::fs::read_to_string(path).unwrap_or_default();
        if path.starts_with(&slots) && !holder.trim().is_empty() {
            leftovers.push(format!(
                "VM slot {} naming {}",
                path.display(),
                holder.trim()
            ));
        }
        let named = leftovers
            .iter()
            .any(|l| l.contains(&path.display().to_string()));
        if before.files.contains_key(path) || path.starts_with(&slots) || named {
            continue;
        }
        // A cache lease (`<pid>-…`) outlives a process killed while it held it;
        // the cache's next prune collects it (lifecycle/src/lease.rs).
        let lease_of = path
            .parent()
            .filter(|d| d.ends_with(".sarde/leases"))
            .and_then(|_| {
                path.file_name()?
                    .to_str()?
                    .split('-')
                    .next()?
                    .parse::<u32>()
                    .ok()
            })
            .and_then(|pid| {
                reports
                    .iter()
                    .find_map(|r| r.stages.iter().find(|s| s.pid == pid).map(|s| (r, s)))
            });
        match lease_of {
            Some((r, stage)) if stage.outcome == Outcome::Killed(libc::SIGKILL) => {
                dead_leases.push(format!(
                    "{} ({size} bytes): job {} {}, its {} SIGKILLed",
                    path.display(),
                    r.plan.index,
                    r.plan.fate.name(),
                    stage.stage
                ));
            }
            Some((r, stage)) => leftovers.push(format!(
                "new file {} ({size} bytes): a lease of job {} {}, its {} (ended {})",
                path.display(),
                r.plan.index,
                r.plan.fate.name(),
                stage.stage,
                stage.outcome
            )),
            None => leftovers.push(format!("new file {} ({size} bytes)", path.display())),
        }
    }
    for path in before.files.keys() {
        if !after.files.contains_key(path) {
            leftovers.push(format!(
                "file {} (there after the warm-up) is gone",
                path.display()
            ));
        }
    }
    leftovers.sort();
    leftovers.dedup();
    let names: Vec<&str> = had.iter().map(|d| d.as_str()).collect();
    println!(
        "domains of the soak: after the warm-up {names:?}, at the end {}",
        if had == has { "the same" } else { "DIFFERENT" }
    );
    let others = after
        .domains
        .symmetric_difference(&before.domains)
        .filter(|d| !ours(d))
        .count();
    if others > 0 {
        println!(
            "  (other domains on this libvirtd came or went meanwhile: {others}, not the soak's)"
        );
    }
    println!(
        "files under ocidir, vmdir, clonedir, state: {} after the warm-up, {} at the end",
        before.files.len(),
        after.files.len()
    );
    if !dead_leases.is_empty() {
        println!(
            "dead cache leases of SIGKILLed executors (not leftovers of the executor: kept by design until the cache's next prune): {}",
            dead_leases.len()
        );
        for l in &dead_leases {
            println!("  {l}");
        }
    }
    if leftovers.is_empty() {
        println!("leftovers: none");
    } else {
        println!("leftovers: {}", leftovers.len());
        for l in &leftovers {
            println!("  LEFT BEHIND: {l}");
        }
    }

    let mut space_ok = true;
    for (dev, (dirs, free)) in &before.free {
        let now = after.free.get(dev).map_or(0, |(_, f)| *f);
        let lost = *free as i64 - now as i64;
        let verdict = if lost > tolerance {
            space_ok = false;
            "LOST"
        } else {
            "ok"
        };
        println!(
            "free space on the file system of {} (the soak's own scripts and logs not counted): {} after the warm-up, {} at the end, {} {} bytes (tolerance {}): {verdict}",
            dirs.join(", "),
            mib(*free as i64),
            mib(now as i64),
            if lost >= 0 { "lost" } else { "gained" },
            lost.abs(),
            mib(tolerance),
        );
    }
    let ok = unexpected.is_empty() && leftovers.is_empty() && space_ok;
    if !unexpected.is_empty() {
        println!("unexpected jobs:");
        for r in &unexpected {
            print_report(r);
        }
    }
    println!("result: {}", if ok { "PASS" } else { "FAIL" });
    ok
}
