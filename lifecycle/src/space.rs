//! Real sizes: allocated blocks (holes do not count), each inode once (hard links
//! between repositories of the cache share one copy), and free space.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{LifecycleError, Result};

/// A file's identity: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// What the collector needs to know of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileFacts {
    pub id: FileId,
    /// Bytes as `ls -l` shows them.
    pub len: u64,
    /// Bytes of disk the file takes.
    pub allocated: u64,
    /// Hard links: the space comes back when the last one goes.
    pub nlink: u64,
    pub modified: SystemTime,
    /// Inode change time (content, rename, link, times): ns since the epoch.
    pub changed_ns: i128,
}

impl FileFacts {
    /// Facts of a file, not following a symbolic link.
    pub fn of(path: &Path) -> std::io::Result<FileFacts> {
        let m = fs::symlink_metadata(path)?;
        Ok(FileFacts::from_metadata(&m))
    }

    pub fn from_metadata(m: &fs::Metadata) -> FileFacts {
        FileFacts {
            id: FileId {
                dev: m.dev(),
                ino: m.ino(),
            },
            len: m.len(),
            allocated: m.blocks() * 512,
            nlink: m.nlink(),
            modified: m.modified().unwrap_or(UNIX_EPOCH),
            changed_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }
}

/// Allocated bytes under `path` (a file or a directory tree, symbolic links not
/// followed), each inode once; inodes in `seen` are not counted again.
pub fn allocated_tree(path: &Path, seen: &mut HashSet<FileId>) -> u64 {
    let Ok(m) = fs::symlink_metadata(path) else {
        return 0;
    };
    let facts = FileFacts::from_metadata(&m);
    let own = if seen.insert(facts.id) {
        facts.allocated
    } else {
        0
    };
    if !m.is_dir() {
        return own;
    }
    let children: u64 = fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| allocated_tree(&e.path(), seen))
        .sum();
    own + children
}

/// Bytes an unprivileged writer may still use on the file system of `path` (the
/// nearest existing ancestor when `path` does not exist yet).
pub fn free_space(path: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let c_path = std::ffi::CString::new(existing.as_os_str().as_bytes()).map_err(|_| {
        LifecycleError::io(existing, "reading free space")(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path contains a NUL byte",
        ))
    })?;
    // SAFETY: statvfs fills the struct for a NUL-terminated path we own.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(LifecycleError::io(existing, "reading free space")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// The device of the file system holding `path` (or its nearest existing ancestor).
pub fn device_of(path: &Path) -> Option<u64> {
    path.ancestors()
        .find_map(|p| fs::metadata(p).ok())
        .map(|m| m.dev())
}

/// A size for people: `1.5 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// An age for people: `3d 4h`, `12m`, `5s`.
pub fn human_age(age: Duration) -> String {
    let s = age.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_do_not_count_and_links_count_once() {
        let dir = tempfile::tempdir().unwrap();
        let sparse = dir.path().join("sparse");
        let file = fs::File::create(&sparse).unwrap();
        file.set_len(1 << 30).unwrap();
        fs::write(dir.path().join("data"), vec![1u8; 1 << 20]).unwrap();
        fs::hard_link(dir.path().join("data"), dir.path().join("link")).unwrap();
        let mut seen = HashSet::new();
        let total = allocated_tree(dir.path(), &mut seen);
        // The 1 MiB file once (plus the directory's own block), the hole nothing.
        assert!(total >= 1 << 20, "{total}");
        assert!(total < (1 << 20) + (64 << 10), "{total}");
        assert_eq!(FileFacts::of(&dir.path().join("link")).unwrap().nlink, 2);
    }

    #[test]
    fn sizes_and_ages_for_people() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_age(Duration::from_secs(90_000)), "1d 1h");
        assert_eq!(human_age(Duration::from_secs(59)), "59s");
    }
}
