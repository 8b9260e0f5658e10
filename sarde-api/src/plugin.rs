//! Run-time plugins: shared libraries that register more codecs, transports or
//! hypervisors.
//!
//! Rust has no stable ABI for trait objects, so a plugin is only safe when it was
//! built by the same compiler against the same plugin ABI as the host. Every plugin
//! exports one static, [`PluginDeclaration`], under the symbol
//! [`ENTRY_SYMBOL`]; its first fields ([`PluginHeader`]) are plain C data whose layout
//! never changes, so the host can read and check them before it touches anything
//! Rust-specific. Only when magic, ABI version and compiler all match does the host
//! call the plugin's `register` function.
//!
//! A plugin crate is a `cdylib` that depends on `sarde-api` and calls
//! [`export_plugin!`](crate::export_plugin).
//!
//! A plugin links its own copy of every crate, tokio included: a transport's
//! async methods run on sarde's runtime, but the plugin's tokio sees none, so
//! its `fs`, `spawn` and `time` functions panic there. Use blocking `std` calls
//! (as `plugins/example-files` does) or a runtime of the plugin's own; tokio's
//! I/O traits (`AsyncRead`) are fine.

use std::ffi::{CStr, c_char};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::registry::{Origin, Registrar, Registry, RegistryError};

/// Bumped whenever a trait or type that crosses the plugin boundary changes.
pub const ABI_VERSION: u32 = 5;

/// Marks a sarde plugin declaration.
pub const MAGIC: [u8; 8] = *b"SARDEPLG";

/// The symbol every plugin exports.
pub const ENTRY_SYMBOL: &str = "sarde_plugin_declaration";

/// The compiler this crate (and so the plugin embedding it) was built with.
pub const RUSTC_VERSION: &str = concat!(env!("SARDE_RUSTC_VERSION"), "\0");

/// The version of `sarde-api` compiled into the plugin (informational).
pub const API_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// The part of a declaration whose layout is frozen for all ABI versions.
#[repr(C)]
pub struct PluginHeader {
    pub magic: [u8; 8],
    pub abi_version: u32,
    /// NUL-terminated `rustc -V` of the plugin's compiler.
    pub rustc_version: *const c_char,
    /// NUL-terminated version of the plugin's `sarde-api`.
    pub api_version: *const c_char,
    /// NUL-terminated plugin name.
    pub name: *const c_char,
}

/// What a plugin exports under [`ENTRY_SYMBOL`].
#[repr(C)]
pub struct PluginDeclaration {
    pub header: PluginHeader,
    /// Called once, after the checks passed, to register the plugin's factories.
    pub register: fn(&mut dyn Registrar) -> Result<(), RegistryError>,
}

// The pointers refer to string literals with 'static lifetime.
unsafe impl Sync for PluginDeclaration {}

/// Declares the plugin entry point of a `cdylib` crate:
///
/// ```ignore
/// fn register(r: &mut dyn sarde_api::Registrar) -> Result<(), sarde_api::RegistryError> {
///     r.register_codec(std::sync::Arc::new(MyCodec))
/// }
/// sarde_api::export_plugin!("my-codec", register);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($name:literal, $register:path) => {
        #[unsafe(no_mangle)]
        pub static sarde_plugin_declaration: $crate::plugin::PluginDeclaration =
            $crate::plugin::PluginDeclaration {
                header: $crate::plugin::PluginHeader {
                    magic: $crate::plugin::MAGIC,
                    abi_version: $crate::plugin::ABI_VERSION,
                    rustc_version: $crate::plugin::RUSTC_VERSION.as_ptr().cast(),
                    api_version: $crate::plugin::API_VERSION.as_ptr().cast(),
                    name: concat!($name, "\0").as_ptr().cast(),
                },
                register: $register,
            };
    };
}

/// Why a plugin was not loaded.
#[derive(Debug, Error)]
pub enum PluginError {
    #[error("plugin {path}: cannot load it as a shared library: {message}")]
    Load { path: PathBuf, message: String },
    #[error(
        "plugin {path}: not a sarde plugin (it exports no `{ENTRY_SYMBOL}` symbol; build it with sarde_api::export_plugin!)"
    )]
    NoEntry { path: PathBuf },
    #[error("plugin {path}: not a sarde plugin (its declaration has the wrong magic bytes)")]
    BadMagic { path: PathBuf },
    #[error(
        "plugin {path} ({name}) is incompatible: it uses plugin ABI {plugin_abi}, this sarde uses ABI {host_abi}; rebuild the plugin against sarde-api {host_api}"
    )]
    AbiVersion {
        path: PathBuf,
        name: String,
        plugin_abi: u32,
        host_abi: u32,
        host_api: String,
    },
    #[error(
        "plugin {path} ({name}) is incompatible: it was built by {plugin_rustc}, this sarde by {host_rustc}; rebuild it with the same compiler"
    )]
    Compiler {
        path: PathBuf,
        name: String,
        plugin_rustc: String,
        host_rustc: String,
    },
    #[error("plugin {path} ({name}) failed to register: {source}")]
    Register {
        path: PathBuf,
        name: String,
        // Boxed: keeps every Result<_, PluginError> small.
        #[source]
        source: Box<RegistryError>,
    },
    #[error("plugin {path} ({name}) panicked while registering")]
    Panicked { path: PathBuf, name: String },
    #[error("plugin directory {path}: {source}")]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedPlugin {
    pub path: PathBuf,
    pub name: String,
    pub api_version: String,
}

fn strip_nul(s: &str) -> &str {
    s.trim_end_matches('\0')
}

/// Reads a NUL-terminated string from a plugin, tolerating null pointers and bad UTF-8.
///
/// # Safety
/// `ptr` must be null or point to a NUL-terminated string that outlives the call.
unsafe fn c_string(ptr: *const c_char) -> String {
    if ptr.is_null() {
        return "<unnamed>".to_string();
    }
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

/// Loads one plugin library and registers its factories into `registry`.
///
/// The library stays loaded for the life of the process: the factories it
/// registered point into its code.
pub fn load(registry: &mut Registry, path: &Path) -> Result<LoadedPlugin, PluginError> {
    let path = path.to_path_buf();
    // SAFETY: loading runs the library's initialisers; that is what loading a plugin
    // means, and the user asked for this library by path or directory.
    let library = unsafe { libloading::Library::new(&path) }.map_err(|e| PluginError::Load {
        path: path.clone(),
        message: e.to_string(),
    })?;
    // SAFETY: the symbol is only read as a PluginHeader (frozen C layout) until the
    // checks below pass.
    let header: *const PluginHeader = unsafe {
        // For a data symbol, the symbol's value is the address of the static.
        *library
            .get::<*const PluginHeader>(ENTRY_SYMBOL.as_bytes())
            .map_err(|_| PluginError::NoEntry { path: path.clone() })?
    };
    // SAFETY: the symbol exists; the header layout is the same in every ABI version.
    let header = unsafe { &*header };
    if header.magic != MAGIC {
        return Err(PluginError::BadMagic { path });
    }
    // SAFETY: magic matched, so these are the declaration's string pointers.
    let (name, plugin_rustc, api_version) = unsafe {
        (
            c_string(header.name),
            c_string(header.rustc_version),
            c_string(header.api_version),
        )
    };
    if header.abi_version != ABI_VERSION {
        return Err(PluginError::AbiVersion {
            path,
            name,
            plugin_abi: header.abi_version,
            host_abi: ABI_VERSION,
            host_api: strip_nul(API_VERSION).to_string(),
        });
    }
    let host_rustc = strip_nul(RUSTC_VERSION);
    if plugin_rustc != host_rustc {
        return Err(PluginError::Compiler {
            path,
            name,
            plugin_rustc,
            host_rustc: host_rustc.to_string(),
        });
    }
    // SAFETY: same ABI version and compiler, so the full declaration has this layout.
    let declaration = unsafe { &*(header as *const PluginHeader as *const PluginDeclaration) };
    let register = declaration.register;
    let mut registrar = registry.registrar(Origin::Plugin(path.clone()));
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| register(&mut registrar)));
    match outcome {
        Err(_) => return Err(PluginError::Panicked { path, name }),
        Ok(Err(source)) => {
            return Err(PluginError::Register {
                path,
                name,
                source: Box::new(source),
            });
        }
        Ok(Ok(())) => {}
    }
    // Keep the code mapped for as long as the process runs.
    std::mem::forget(library);
    tracing::debug!(plugin = %name, path = %path.display(), "plugin loaded");
    Ok(LoadedPlugin {
        path,
        name,
        api_version,
    })
}

/// The shared libraries in a plugin directory (`*.so`, `*.dylib`, `*.dll`), sorted.
/// A directory that does not exist holds no plugins.
pub fn discover(dir: &Path) -> Result<Vec<PathBuf>, PluginError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PluginError::Directory {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| PluginError::Directory {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        let is_library = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "so" | "dylib" | "dll"));
        if is_library && path.is_file() {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}
