//! The GitLab Runner side of the executor tests: the executor started as
//! gitlab-runner starts it (environment, a generated script per stage) and what
//! the tests read from its output.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::guest::{self, GuestImage};
use crate::registry::{RegistryOptions, TestRegistry, require_registry_tools};
use crate::{executor_bin, ok, sarde, vm};

/// The stages gitlab-runner runs, in order, for a passing job.
pub const STAGES: &[&str] = &[
    "prepare_script",
    "get_sources",
    "restore_cache",
    "download_artifacts",
    "step_script",
    "after_script",
    "archive_cache",
    "upload_artifacts_on_success",
    "cleanup_file_variables",
];

/// Exit codes the runner hands the executor for a failed build and a system failure.
pub const BUILD_FAILURE: i32 = 77;
pub const SYSTEM_FAILURE: i32 = 78;

/// A job id unique in this test process: `<pid><tag>`. Tests of one binary run
/// at once and the executor names the VM `gitlab-<job id>`, so two tests using
/// one tag would clean up each other's VM; a tag used twice panics instead.
pub fn job_id(tag: &str) -> String {
    static USED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let id = format!("{}{tag}", std::process::id());
    let fresh = USED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.clone());
    assert!(
        fresh,
        "job id tag {tag:?} is used by two tests of this binary"
    );
    id
}

/// The executor for job `job` of `image`, with the INI `config` and `tmpdir` for
/// its temporary files; the stage's arguments follow.
pub fn executor(config: &Path, job: &str, image: &str, tmpdir: &Path) -> Command {
    let mut cmd = Command::new(executor_bin());
    cmd.env("GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES", config)
        .env("CUSTOM_ENV_CI_JOB_IMAGE", image)
        .env("CUSTOM_ENV_CI_JOB_ID", job)
        .env("CUSTOM_ENV_CI_PROJECT_NAME", "sarde-e2e")
        .env("BUILD_FAILURE_EXIT_CODE", BUILD_FAILURE.to_string())
        .env("SYSTEM_FAILURE_EXIT_CODE", SYSTEM_FAILURE.to_string())
        .env("TMPDIR", tmpdir)
        .env_remove("BUILD_EXIT_CODE_FILE")
        .env_remove("SARDE_LOG");
    cmd
}

/// A generated stage script in `dir`, as the runner writes one per stage.
pub fn stage_script(dir: &Path, job: &str, stage: &str, body: &str) -> PathBuf {
    let path = dir.join(format!("script-{job}-{stage}"));
    std::fs::write(
        &path,
        format!("#!/usr/bin/env bash\nset -e\nset +o noclobber\n{body}\n"),
    )
    .unwrap();
    path
}

/// Standard output and error as text.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Panics with both outputs unless the stage succeeded.
pub fn assert_ok(what: &str, out: &Output) {
    let (stdout, stderr) = text(out);
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
}

/// `prepare`'s line with the durations of its steps.
pub fn ready_line(stderr: &str) -> Option<String> {
    stderr
        .lines()
        .find(|l| l.contains("is ready: image"))
        .map(str::to_string)
}

/// Sends `signal` to the whole process group of `child` (spawned with
/// `process_group(0)`), as gitlab-runner does: SIGTERM on cancel and timeout,
/// SIGKILL when that is not enough.
pub fn signal_group(child: &Child, signal: i32) {
    let pgid = child.id() as i32;
    // SAFETY: kill(2) with a negative pid signals a process group we created.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// Sends `signal` to `child` alone (SIGSTOP to hold it still, say).
pub fn signal_process(child: &Child, signal: i32) {
    // SAFETY: kill(2) on a child this test spawned and has not reaped.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
}

/// Sends SIGTERM to the whole process group, as gitlab-runner does.
pub fn terminate_group(child: &Child) {
    signal_group(child, libc::SIGTERM);
}

/// Waits until `child` has a handler for SIGTERM (its `SigCgt` in
/// `/proc/PID/status`), so a signal sent now tests what the handler does rather
/// than the default action before it existed. Panics after `within`, or when the
/// child ends first.
pub fn wait_until_catching_sigterm(child: &mut Child, within: Duration) {
    let status = format!("/proc/{}/status", child.id());
    let started = Instant::now();
    loop {
        let caught = std::fs::read_to_string(&status)
            .ok()
            .and_then(|text| {
                let mask = text.lines().find_map(|l| l.strip_prefix("SigCgt:"))?;
                u64::from_str_radix(mask.trim(), 16).ok()
            })
            .is_some_and(|mask| mask & (1 << (libc::SIGTERM - 1)) != 0);
        if caught {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the process ended before it caught SIGTERM"
        );
        assert!(
            started.elapsed() < within,
            "no SIGTERM handler within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A registry with the test guest's image, and an executor configuration for it.
pub struct Setup {
    pub registry: TestRegistry,
    /// The VM the image was exported from; undefined when the setup goes.
    pub source: guest::GuestVm,
    /// Base VMs the executor imports (named by image id), undefined at the end.
    pub bases: Mutex<Vec<String>>,
    pub work: tempfile::TempDir,
    pub image: String,
    pub config: PathBuf,
    pub state: PathBuf,
    pub clones: PathBuf,
}

/// What the executor's end-to-end tests need: libvirt, the registry tools and
/// the test guest. `None` (or a failure under CI) naming what is missing.
pub fn prerequisites(test: &str) -> Option<GuestImage> {
    if !vm::libvirt_enabled(test) {
        return None;
    }
    if !require_registry_tools(test) {
        return None;
    }
    guest::test_guest()
}

/// [`setup_in`] a fresh [`vm::workdir`].
pub fn setup(test: &str, extra_ini: &str) -> Option<(Setup, GuestImage)> {
    setup_in(test, extra_ini, Path::new("/var/tmp"))
}

/// A registry with the test guest's image (exported with sarde, pushed) and an
/// executor INI for it (`extra_ini` appended to its `[DEFAULT]` section), its
/// directories in a fresh work directory inside `parent`. `None` (or a failure
/// under CI) when libvirt or the registry tools are missing.
pub fn setup_in(test: &str, extra_ini: &str, parent: &Path) -> Option<(Setup, GuestImage)> {
    let guest = prerequisites(test)?;
    let registry = TestRegistry::start(RegistryOptions::default());
    let addr = registry.address();
    let work = vm::workdir_in(parent);
    // The source VM: a copy of the guest's disk, never booted.
    let name = vm::unique("sarde-exec-src");
    // Undefined when the setup goes.
    let source = guest.define(&name, work.path());
    let image = format!("{addr}/ci/guest:1");
    let publisher = vm::workdir();
    let image_id = ok(sarde(publisher.path())
        .args(["export", "--vmconfig"])
        .arg(&guest.access)
        .args([&name, &image]));
    ok(sarde(publisher.path()).args(["push", "--insecure", &image]));

    let state = work.path().join("state");
    let clones = work.path().join("clones");
    let config = work.path().join("executor.ini");
    std::fs::write(
        &config,
        format!(
            "[DEFAULT]\nconnect = {}\nocidir = {}\nvmdir = {}\nclonedir = {}\nstate-dir = {}\n\
             timeout = 90\ninsecure = {addr}\nguest-builds-dir = /root/builds\nguest-cache-dir = /root/cache\n{extra_ini}\n",
            vm::LIBVIRT_URI,
            work.path().join("OCI").display(),
            work.path().join("VMs").display(),
            clones.display(),
            state.display(),
        ),
    )
    .unwrap();
    Some((
        Setup {
            registry,
            source,
            bases: Mutex::new(vec![image_id]),
            work,
            image,
            config,
            state,
            clones,
        },
        guest,
    ))
}

impl Drop for Setup {
    fn drop(&mut self) {
        for base in self.bases.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            vm::undefine(base);
        }
    }
}

impl Setup {
    /// The executor as gitlab-runner starts it for job `job`.
    pub fn executor(&self, job: &str, image: &str) -> Command {
        executor(&self.config, job, image, self.work.path())
    }

    /// A generated stage script, as the runner writes one per stage.
    pub fn script(&self, job: &str, stage: &str, body: &str) -> PathBuf {
        stage_script(self.work.path(), job, stage, body)
    }

    pub fn run_stage(
        &self,
        job: &str,
        stage: &str,
        body: &str,
        exit_file: Option<&Path>,
    ) -> Output {
        let script = self.script(job, stage, body);
        let mut cmd = self.executor(job, &self.image);
        cmd.arg("run").arg(&script).arg(stage);
        if let Some(f) = exit_file {
            cmd.env("BUILD_EXIT_CODE_FILE", f);
        }
        cmd.output().unwrap()
    }

    /// The executor running `stage` (`prepare`, `cleanup`) of `job` in a
    /// process group of its own, as gitlab-runner starts it; stdout discarded.
    pub fn spawn_in_group(&self, job: &str, stage: &str, stderr: Stdio) -> Child {
        self.executor(job, &self.image)
            .arg(stage)
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .unwrap()
    }

    pub fn cleanup(&self, job: &str) -> Output {
        self.executor(job, &self.image)
            .arg("cleanup")
            .output()
            .unwrap()
    }

    /// What job `job` left behind: its domain, overlays, state file, VM slot.
    pub fn leftovers(&self, job: &str) -> Vec<String> {
        let vm_name = format!("gitlab-{job}");
        let mut left = Vec::new();
        if vm::domain_exists(&vm_name) {
            left.push(format!("domain {vm_name}"));
        }
        let names = |dir: &Path| -> Vec<(PathBuf, String)> {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| (e.path(), e.file_name().to_string_lossy().into_owned()))
                .collect()
        };
        for (path, name) in names(&self.clones) {
            if name.starts_with(&format!("{vm_name}-")) {
                left.push(format!("overlay {}", path.display()));
            }
        }
        for (path, name) in names(&self.state) {
            if name == format!("{vm_name}.json") || name == format!("{vm_name}.json.tmp") {
                left.push(format!("state file {}", path.display()));
            }
        }
        for (path, _) in names(&self.state.join("slots")) {
            if std::fs::read_to_string(&path).is_ok_and(|holder| holder.trim() == vm_name) {
                left.push(format!("VM slot {} naming {vm_name}", path.display()));
            }
        }
        left
    }

    /// Nothing of job `job` is left: no domain, no overlay, no state, no slot.
    pub fn assert_gone(&self, job: &str) {
        let left = self.leftovers(job);
        assert!(left.is_empty(), "left behind by job {job}: {left:?}");
    }
}
