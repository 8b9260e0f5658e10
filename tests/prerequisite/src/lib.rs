//! What a test does when something it needs (a daemon, a tool, an environment
//! variable) is missing.
//!
//! By hand, the test prints `SKIPPED <test>: <what is missing>` and passes, so
//! `cargo test` works on a laptop without libvirtd. Under CI (`CI=true`) or
//! `scripts/test.sh` (`SARDE_TEST_REQUIRE_ALL=1`), it fails instead, naming the
//! missing thing: libtest shows a skip as a pass, so a CI machine without a tool
//! would otherwise stay green.

/// Set to `1` by `scripts/test.sh` (and so by `.ci/run`).
pub const REQUIRE_ALL: &str = "SARDE_TEST_REQUIRE_ALL";

/// Whether a missing prerequisite fails the test.
pub fn required() -> bool {
    std::env::var(REQUIRE_ALL).as_deref() == Ok("1") || std::env::var("CI").as_deref() == Ok("true")
}

/// Records that `test` cannot run because `missing` is missing: panics when
/// prerequisites are required, else prints SKIPPED. Always returns `false`, so
/// callers write `return prerequisite::missing(test, "…")` in a `-> bool` check.
#[track_caller]
pub fn missing(test: &str, missing: &str) -> bool {
    if required() {
        panic!(
            "{test}: prerequisite missing: {missing} (under CI or scripts/test.sh a test never \
             skips; {REQUIRE_ALL}=1 or CI=true is set)"
        );
    }
    eprintln!("SKIPPED {test}: {missing}");
    false
}

/// `true` when `available`, else [`missing`].
#[track_caller]
pub fn require(test: &str, available: bool, what: &str) -> bool {
    available || missing(test, what)
}

/// The value of the environment variable `name`, when set; else [`missing`]
/// with `how` telling what to set it to.
#[track_caller]
pub fn env(test: &str, name: &str, how: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => Some(value),
        _ => {
            missing(test, &format!("{name} is not set ({how})"));
            None
        }
    }
}

/// Whether `program` is an executable file on `PATH`.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .any(|dir| std::fs::metadata(dir.join(program)).is_ok_and(|m| m.is_file()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_prerequisites_pass() {
        assert!(require("t", true, "nothing"));
        assert!(on_path("sh"));
        assert!(!on_path("sarde-no-such-program"));
    }

    #[test]
    fn a_missing_prerequisite_fails_when_required() {
        // Run a child of this test binary with the variable set, so the
        // environment of the other tests is left alone.
        if std::env::var("SARDE_PREREQUISITE_CHILD").is_ok() {
            missing("child", "the thing");
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let run = |require_all: &str| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "tests::a_missing_prerequisite_fails_when_required",
                    "--nocapture",
                ])
                .env("SARDE_PREREQUISITE_CHILD", "1")
                .env(REQUIRE_ALL, require_all)
                .env_remove("CI")
                .output()
                .unwrap()
        };
        let strict = run("1");
        assert!(!strict.status.success());
        let text = String::from_utf8_lossy(&strict.stdout).into_owned()
            + &String::from_utf8_lossy(&strict.stderr);
        assert!(text.contains("prerequisite missing: the thing"), "{text}");
        let lax = run("0");
        assert!(lax.status.success());
        assert!(String::from_utf8_lossy(&lax.stderr).contains("SKIPPED child: the thing"));
    }
}
