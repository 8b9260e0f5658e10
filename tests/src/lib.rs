//! Helpers for the end-to-end tests: locating the workspace and building plugin
//! libraries the way a third party would (`cargo build` of a `cdylib`).

pub mod cache;
pub mod guest;
pub mod hostile;
pub mod registry;
pub mod runner;
pub mod token;
pub mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// Builds `package` (a `cdylib`) with `features` and returns the path of its
/// shared library. Uses a target directory of its own: the outer `cargo test` holds
/// the lock on the main one while tests run.
pub fn build_cdylib(package: &str, features: &[&str]) -> PathBuf {
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let root = workspace_root();
    let flavour = if features.is_empty() {
        "default".to_string()
    } else {
        features.join("+")
    };
    let target_dir = root.join("target").join("plugin-builds").join(flavour);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--quiet", "-p", package, "--lib", "--target-dir"])
        .arg(&target_dir);
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    let status = cmd.status().expect("cargo runs");
    assert!(status.success(), "building {package} failed");
    let lib = target_dir
        .join("debug")
        .join(format!("lib{}.so", package.replace('-', "_")));
    assert!(lib.is_file(), "{} was not built", lib.display());
    lib
}

static SARDE_LOCK: Mutex<Option<PathBuf>> = Mutex::new(None);

/// The `sarde` binary of this checkout, built once per test process into a target
/// directory of its own (the outer `cargo test` holds the main one).
pub fn sarde_bin() -> PathBuf {
    let mut built = SARDE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.as_ref() {
        return path.clone();
    }
    let root = workspace_root();
    let target_dir = root.join("target").join("e2e-build");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .args(["build", "--quiet", "-p", "sarde", "--bins", "--target-dir"])
        .arg(&target_dir)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building sarde failed");
    let path = target_dir.join("debug").join("sarde");
    *built = Some(path.clone());
    path
}

/// Makes [`sarde_bin`] (and [`executor_bin`]) the binaries already built in `dir`
/// (a release build, say) instead of building them; for programs, not tests.
pub fn use_binaries_in(dir: &Path) {
    *SARDE_LOCK.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir.join("sarde"));
}

/// The `gitlab-sardinecake-executor` binary of this checkout (built with `sarde`).
pub fn executor_bin() -> PathBuf {
    sarde_bin().with_file_name("gitlab-sardinecake-executor")
}

/// `sarde` with an isolated configuration: cache, VM directory and plugin directory
/// under `home`, the real libvirt.
pub fn sarde(home: &Path) -> Command {
    // registries.conf only from this home (empty unless a test writes it):
    // never the host's mirrors or rewrites. (Drop-ins in the system's
    // registries.conf.d still apply, as for skopeo.)
    let registries_conf = home.join("registries.conf");
    if !registries_conf.exists() {
        std::fs::write(&registries_conf, "").expect("an empty registries.conf");
    }
    let mut cmd = Command::new(sarde_bin());
    cmd.env("HOME", home)
        .env("SARDE_CONF_FILES", "")
        .env("SARDE_PLUGIN_DIR", home.join("plugins"))
        .env("SARDE_OCIDIR", home.join("OCI"))
        .env("SARDE_VMDIR", home.join("VMs"))
        .env("SARDE_CONNECT", vm::LIBVIRT_URI)
        // Credentials only from this home: never the runner's own.
        .env("REGISTRY_AUTH_FILE", home.join("auth.json"))
        .env("DOCKER_CONFIG", home.join(".docker"))
        .env("CONTAINERS_REGISTRIES_CONF", &registries_conf)
        .env_remove("SARDE_REGISTRY_USERNAME")
        .env_remove("SARDE_REGISTRY_PASSWORD")
        .env_remove("SARDE_REGISTRY_HOSTNAME")
        .env_remove("SARDE_LOG");
    cmd
}

/// Runs `cmd`, asserts success, returns trimmed stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs `cmd`, asserts failure, returns stderr.
pub fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        !out.status.success(),
        "{cmd:?} succeeded unexpectedly:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}
