//! The GitLab Runner side of the executor tests: the executor started as
//! gitlab-runner starts it (environment, a generated script per stage) and what
//! the tests read from its output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::executor_bin;

/// Exit codes the runner hands the executor for a failed build and a system failure.
pub const BUILD_FAILURE: i32 = 77;
pub const SYSTEM_FAILURE: i32 = 78;

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
