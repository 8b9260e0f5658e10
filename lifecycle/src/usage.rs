//! Last use, as sarde records it: a record's modification time is the moment an
//! image or VM was last pulled, fetched, imported, cloned or run by a job. The
//! file system's atime is not used: `noatime`/`relatime` mounts and backups make
//! it meaningless.
//!
//! Images: `<cache>/.sarde/used/<key>`, one per (layout, manifest), holding the
//! image's name for people. VMs: `<vm dir>/.sarde-used`, removed with the VM.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sarde_api::Digest;
use sha2::{Digest as _, Sha256};

use crate::{LifecycleError, Result, state_dir};

/// The record of a VM's last use, inside its directory.
pub const VM_USE_FILE: &str = ".sarde-used";

pub fn usage_dir(cache: &Path) -> PathBuf {
    state_dir(cache).join("used")
}

/// The file name of an image's record: a hash, since layouts nest.
pub fn image_key(layout: &str, manifest: &Digest) -> String {
    let hash = Sha256::digest(format!("{layout}@{manifest}").as_bytes());
    hash.iter().take(20).map(|b| format!("{b:02x}")).collect()
}

/// Records that an image was used now.
pub fn record_image_use(cache: &Path, layout: &str, manifest: &Digest) -> Result<()> {
    let dir = usage_dir(cache);
    fs::create_dir_all(&dir).map_err(LifecycleError::io(&dir, "creating the usage directory"))?;
    touch(
        &dir.join(image_key(layout, manifest)),
        format!("{layout}@{manifest}\n").as_bytes(),
    )
}

/// Records that the VM in `dir` was used now.
pub fn record_vm_use(dir: &Path) -> Result<()> {
    touch(&dir.join(VM_USE_FILE), b"")
}

/// When the VM in `dir` was last used: the latest of its record and its files'
/// changes (a VM booted with `virsh`, or clones' overlays next to its disks, count
/// as use too).
pub fn vm_last_use(dir: &Path) -> Option<SystemTime> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max()
}

pub(crate) fn modified(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Creates the file with `content` when missing, then sets its times to now.
fn touch(path: &Path, content: &[u8]) -> Result<()> {
    if !path.exists() {
        fs::write(path, content).map_err(LifecycleError::io(path, "writing the usage record"))?;
    }
    let file = fs::File::options()
        .write(true)
        .open(path)
        .map_err(LifecycleError::io(path, "opening the usage record"))?;
    file.set_modified(SystemTime::now())
        .map_err(LifecycleError::io(path, "updating the usage record"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_use_moves_the_time_forward() {
        let cache = tempfile::tempdir().unwrap();
        let digest = Digest::sha256_of(b"m");
        record_image_use(cache.path(), "h/r", &digest).unwrap();
        let path = usage_dir(cache.path()).join(image_key("h/r", &digest));
        let old = SystemTime::now() - std::time::Duration::from_secs(3600);
        fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(modified(&path), Some(old));
        record_image_use(cache.path(), "h/r", &digest).unwrap();
        assert!(modified(&path).unwrap() > old + std::time::Duration::from_secs(3000));
        assert_ne!(image_key("h/r", &digest), image_key("h/s", &digest));
    }
}
