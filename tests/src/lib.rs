//! Helpers for the end-to-end tests: locating the workspace and building plugin
//! libraries the way a third party would (`cargo build` of a `cdylib`).

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
