//! What prepare leaves for run and cleanup: one JSON file per job in the state
//! directory (0700), and the VM slots that bound how many VMs run at once.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::ssh::Login;

/// A prepared job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobState {
    pub vm: String,
    /// The VM the clone was made from (its disks are the clone's backing files).
    pub source_vm: String,
    /// The image as the job names it.
    pub image: String,
    /// Its name in the cache (older state files have none).
    #[serde(default)]
    pub cached_as: Option<String>,
    pub login: Login,
    /// Directories holding the clone's overlays.
    pub overlay_dirs: Vec<PathBuf>,
}

fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

pub fn state_path(state_dir: &Path, vm: &str) -> PathBuf {
    state_dir.join(format!("{vm}.json"))
}

impl JobState {
    /// Written 0600: it may hold the guest's password.
    pub fn write(&self, state_dir: &Path) -> std::io::Result<()> {
        ensure_dir(state_dir)?;
        let path = state_path(state_dir, &self.vm);
        let tmp = path.with_extension("json.tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).expect("state serialises"))?;
        f.sync_all()?;
        fs::rename(tmp, path)
    }

    pub fn read(state_dir: &Path, vm: &str) -> std::io::Result<JobState> {
        let bytes = fs::read(state_path(state_dir, vm))?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }

    pub fn remove(state_dir: &Path, vm: &str) {
        let _ = fs::remove_file(state_path(state_dir, vm));
    }
}

/// A claimed VM slot: `slots/<n>` holds the job's VM name. While prepare runs it
/// also holds an flock on it; afterwards the VM's existence keeps the slot.
pub struct Slot {
    path: PathBuf,
    _lock: File,
}

impl Slot {
    /// Claims one of `max` slots for `vm`, waiting while all are taken by other
    /// jobs' VMs. A slot whose VM is gone and which nobody holds is free again (a
    /// job that died without cleanup). `exists` tells whether a VM exists. The
    /// wait is asynchronous, so a SIGTERM (a cancelled job) stops it at once.
    pub async fn claim(
        state_dir: &Path,
        max: usize,
        vm: &str,
        deadline: Instant,
        exists: &dyn Fn(&str) -> bool,
    ) -> std::io::Result<Option<Slot>> {
        let dir = state_dir.join("slots");
        ensure_dir(state_dir)?;
        ensure_dir(&dir)?;
        let mut announced = false;
        loop {
            for n in 0..max {
                let path = dir.join(n.to_string());
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(&path)?;
                // SAFETY: flock on a descriptor we own.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                    continue;
                }
                let holder = fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                if holder.is_empty() || holder == vm || !exists(holder) {
                    fs::write(&path, vm)?;
                    return Ok(Some(Slot { path, _lock: file }));
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            if !announced {
                tracing::warn!("all {max} VM slots of this host are in use; waiting for one");
                announced = true;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Frees the slot that names `vm` (at cleanup).
pub fn release_slot(state_dir: &Path, vm: &str) {
    let dir = state_dir.join("slots");
    let Ok(entries) = fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        if fs::read_to_string(entry.path()).is_ok_and(|h| h.trim() == vm) {
            let _ = fs::write(entry.path(), "");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_bound_running_vms_and_free_up_when_a_vm_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let alive = std::cell::RefCell::new(vec!["gitlab-1".to_string()]);
        let exists = |n: &str| alive.borrow().iter().any(|a| a == n);
        let soon = || Instant::now() + Duration::from_millis(50);
        // Prepare of job 1 holds the slot, then ends (its VM keeps the slot).
        let slot = Slot::claim(dir.path(), 1, "gitlab-1", soon(), &exists)
            .await
            .unwrap();
        assert!(slot.is_some());
        drop(slot);
        // Job 2 waits while job 1's VM exists…
        assert!(
            Slot::claim(dir.path(), 1, "gitlab-2", soon(), &exists)
                .await
                .unwrap()
                .is_none()
        );
        // …and gets the slot once it is gone (cleanup, or a job that died).
        alive.borrow_mut().clear();
        assert!(
            Slot::claim(dir.path(), 1, "gitlab-2", soon(), &exists)
                .await
                .unwrap()
                .is_some()
        );
        // Cleanup releases it by name.
        alive.borrow_mut().push("gitlab-2".into());
        release_slot(dir.path(), "gitlab-2");
        assert!(
            Slot::claim(dir.path(), 1, "gitlab-3", soon(), &exists)
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn a_slot_held_by_a_running_prepare_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let exists = |_: &str| false;
        let soon = || Instant::now() + Duration::from_millis(50);
        let held = Slot::claim(dir.path(), 1, "gitlab-1", soon(), &exists)
            .await
            .unwrap();
        assert!(held.is_some());
        // The VM does not exist yet, but the flock says prepare is still at work.
        assert!(
            Slot::claim(dir.path(), 1, "gitlab-2", soon(), &exists)
                .await
                .unwrap()
                .is_none()
        );
    }
}
