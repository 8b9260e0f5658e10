//! The cache directory: one OCI image layout per repository, where the Python
//! tool puts it: `<root>/<host[:port]>/<repository path>/`, a Docker Hub image
//! at its familiar path (`<root>/sardines/debian/`), and the port kept in the
//! host directory (`127.0.0.1:5000`), never taken for a tag as the Python tool
//! did (whose `<root>/127.0.0.1/` layouts are still read).

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

    /// The layout directory an image is written to (see
    /// [`ImageReference::cache_path_components`]). References are validated
    /// when parsed; the assertion guards that promise, since a broken one would
    /// write outside the cache.
    pub fn layout_for(&self, reference: &ImageReference) -> PathBuf {
        self.join(reference, reference.cache_path_components())
    }

    fn join(&self, reference: &ImageReference, components: Vec<String>) -> PathBuf {
        let mut path = self.root.clone();
        for component in components {
            assert!(
                is_safe_component(&component),
                "image reference {reference} yields the unsafe cache path component {component:?}"
            );
            path.push(component);
        }
        path
    }

    /// Where the cache holds `reference`: the layout and the tag or digest in
    /// it. Besides [`OciDir::layout_for`], a cache the Python tool or an
    /// earlier sarde wrote may hold it at `<host>/<path>` (a Docker Hub image
    /// named with `docker.io/`), or, for a `host:port` name, in the Python
    /// tool's layout `<host>/` under the tag `<port>/<path>:<tag>` (read, never
    /// written). Where none holds it: the layout it would be written to.
    pub fn locate(&self, reference: &ImageReference) -> (PathBuf, String) {
        let wanted = reference.reference_for_registry();
        let primary = self.layout_for(reference);
        if holds(&primary, &wanted) {
            return (primary, wanted);
        }
        let qualified = self.join(reference, reference.qualified_cache_path_components());
        if qualified != primary && holds(&qualified, &wanted) {
            return (qualified, wanted);
        }
        if let (Some(port), Some(tag), None) = (
            reference.port(),
            reference.tag_or_default(),
            reference.digest(),
        ) {
            let host = reference.registry();
            if is_safe_component(host) {
                let python = self.root.join(host);
                let python_tag = format!("{port}/{}:{tag}", reference.repository());
                if holds(&python, &python_tag) {
                    return (python, python_tag);
                }
            }
        }
        (primary, wanted)
    }

    /// The layout directory of a repository as the cache transport names it
    /// (`host[:port]/path`, or a Docker Hub image's familiar path such as
    /// `debian`); refuses empty, `.` and `..` components.
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
                // One component: a Docker Hub image the Python tool named
                // without a host (`debian`), or its `host:port` layout.
                if file_type.is_file() && name == "oci-layout" && !components.is_empty() {
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

/// Whether the layout at `dir` holds `reference` (a tag, or a manifest
/// digest it lists or stores), as [`Layout::resolve`] finds it.
fn holds(dir: &Path, reference: &str) -> bool {
    crate::Layout::open(dir).is_ok_and(|layout| layout.resolve(reference).is_ok())
}
