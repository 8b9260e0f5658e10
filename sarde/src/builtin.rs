//! The registry as the binaries use it: the built-in crates, then the plugins from
//! the configured directories and `--plugin` flags.

use std::path::PathBuf;

use anyhow::{Context, Result};
use sarde_api::plugin::{self, LoadedPlugin};
use sarde_api::{Origin, Registry};

/// Registers every factory compiled into sarde.
pub fn register_builtins(registry: &mut Registry) -> Result<()> {
    let mut r = registry.registrar(Origin::BuiltIn);
    sarde_codec_zstd::register(&mut r)?;
    sarde_codec_xz::register(&mut r)?;
    sarde_codec_gzip::register(&mut r)?;
    sarde_codec_raw::register(&mut r)?;
    sarde_backend_libvirt::register(&mut r)?;
    sarde_transport_oci_dir::register(&mut r)?;
    sarde_transport_oci_layout::register(&mut r)?;
    sarde_transport_oci_archive::register(&mut r)?;
    sarde_transport_registry::register(&mut r)?;
    Ok(())
}

/// A plugin found in a plugin directory that could not be loaded: reported, not fatal,
/// so one stale library does not stop every command.
#[derive(Debug)]
pub struct SkippedPlugin {
    pub path: PathBuf,
    pub reason: String,
}

/// The registry with built-ins and plugins.
pub struct Loaded {
    pub registry: Registry,
    pub plugins: Vec<LoadedPlugin>,
    pub skipped: Vec<SkippedPlugin>,
}

/// Builds the registry. Libraries in `plugin_dirs` that fail to load are skipped
/// with a warning; an explicitly named plugin that fails is an error.
pub fn load_registry(plugin_dirs: &[PathBuf], explicit: &[PathBuf]) -> Result<Loaded> {
    let mut registry = Registry::new();
    register_builtins(&mut registry).context("registering built-in factories")?;
    let mut plugins = Vec::new();
    let mut skipped = Vec::new();
    for dir in plugin_dirs {
        let found = match plugin::discover(dir) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!("{e}");
                continue;
            }
        };
        for path in found {
            if explicit.contains(&path) {
                continue;
            }
            match plugin::load(&mut registry, &path) {
                Ok(p) => plugins.push(p),
                Err(e) => {
                    tracing::warn!("skipping plugin: {e}");
                    skipped.push(SkippedPlugin {
                        path,
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
    for path in explicit {
        plugins.push(plugin::load(&mut registry, path)?);
    }
    Ok(Loaded {
        registry,
        plugins,
        skipped,
    })
}
