//! The cache directory: one OCI image layout per repository at
//! `<root>/<host[:port]>/<repository path>/`, the layout the Python tool used
//! (with the port kept in the host directory, `127.0.0.1:5000`, never a tag).

use std::fs;
use std::path::{Path, PathBuf};

use sarde_api::ImageReference;

use crate::error::LayoutError;

/// Deepest layout looked for below the root: the host plus up to 128 path
/// components, the most a 255-character name can hold.
const MAX_DEPTH: usize = 129;

/// A cache root holding layouts per repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciDir {
    root: PathBuf,
}

/// One repository found in the cache.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RepositoryEntry {
    /// `host[:port]`, the registry the image came from or goes to.
    pub location: String,
    /// The repository path, e.g. `sardines/debian`.
    pub repository: String,
    /// The layout's directory.
    pub path: PathBuf,
}

/// Whether `component` can be joined to a path without leaving its parent.
pub(crate) fn is_safe_component(component: &str) -> bool {
    !component.is_empty()
        && component != "."
        && component != ".."
        && !component.contains('/')
        && !component.contains('\0')
}

impl OciDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        OciDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The layout directory of an image: `root/<registry_location>/<repository>`.
    /// References are validated when parsed; the assertion guards that promise,
    /// since a broken one would write outside the cache.
    pub fn layout_for(&self, reference: &ImageReference) -> PathBuf {
        let mut path = self.root.clone();
        for component in reference.cache_path_components() {
            assert!(
                is_safe_component(&component),
                "image reference {reference} yields the unsafe cache path component {component:?}"
            );
            path.push(component);
        }
        path
    }

    /// The layout directory of `host[:port]/path` as transports name repositories;
    /// refuses empty, `.` and `..` components and names without a path.
    pub fn layout_for_repository(&self, repository: &str) -> Result<PathBuf, LayoutError> {
        let unsafe_path = |component: &str| LayoutError::UnsafePath {
            root: self.root.clone(),
            input: repository.to_string(),
            component: component.to_string(),
        };
        let components: Vec<&str> = repository.split('/').collect();
        if let Some(bad) = components.iter().find(|c| !is_safe_component(c)) {
            return Err(unsafe_path(bad));
        }
        if components.len() < 2 {
            // Only a host: the layout would sit where repositories' parents do.
            return Err(LayoutError::MissingPath {
                root: self.root.clone(),
                input: repository.to_string(),
            });
        }
        let mut path = self.root.clone();
        path.extend(components);
        Ok(path)
    }

    /// Every layout in the cache (directories holding `oci-layout`), sorted. Does
    /// not follow symbolic links; unreadable directories are skipped with a warning.
    pub fn repositories(&self) -> Result<Vec<RepositoryEntry>, LayoutError> {
        let mut out = Vec::new();
        if !self.root.is_dir() {
            return Ok(out);
        }
        let mut stack: Vec<(PathBuf, Vec<String>)> = vec![(self.root.clone(), Vec::new())];
        while let Some((dir, components)) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) => {
                    tracing::warn!("skipping {} in the image cache: {e}", dir.display());
                    continue;
                }
            };
            for entry in entries {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(e) => {
                        tracing::warn!("skipping an entry of {}: {e}", dir.display());
                        continue;
                    }
                };
                // DirEntry::file_type does not follow symbolic links.
                let Ok(file_type) = entry.file_type() else {
                    continue;
                };
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                if file_type.is_file() && name == "oci-layout" && components.len() >= 2 {
                    out.push(RepositoryEntry {
                        location: components[0].clone(),
                        repository: components[1..].join("/"),
                        path: dir.clone(),
                    });
                } else if file_type.is_dir()
                    && !name.starts_with('.')
                    && components.len() < MAX_DEPTH
                {
                    let mut next = components.clone();
                    next.push(name);
                    stack.push((entry.path(), next));
                }
            }
        }
        out.sort();
        Ok(out)
    }
}
