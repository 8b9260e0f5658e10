//! The registry of factories: every codec, transport and hypervisor the program
//! knows, each under its name or URL scheme, with where it came from.
//!
//! Built-in crates and plugins register the same way, through [`Registrar`]; the
//! rest of sarde asks the registry by name and never matches on names itself.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use crate::codec::Codec;
use crate::hypervisor::{Hypervisor, HypervisorError, HypervisorFactory};
use crate::transport::TransportFactory;

/// Where a factory came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    BuiltIn,
    Plugin(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::BuiltIn => f.write_str("built in"),
            Origin::Plugin(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The kinds of extension points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Codec,
    Transport,
    Hypervisor,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Codec => "codec",
            Kind::Transport => "transport",
            Kind::Hypervisor => "hypervisor",
        })
    }
}

/// Lookup and registration failures.
#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("{kind} {name:?} from {new} is already registered by {existing}")]
    Duplicate {
        kind: Kind,
        name: String,
        existing: Origin,
        new: Origin,
    },
    #[error("unknown {kind} {name:?}; known: {known}")]
    Unknown {
        kind: Kind,
        name: String,
        known: String,
    },
    #[error("{kind} name {name:?} is invalid: use lower-case letters, digits, '-' and '_'")]
    InvalidName { kind: Kind, name: String },
}

/// What plugins and built-in crates see: the way to add factories.
pub trait Registrar {
    fn register_codec(&mut self, codec: Arc<dyn Codec>) -> Result<(), RegistryError>;
    fn register_transport(
        &mut self,
        factory: Arc<dyn TransportFactory>,
    ) -> Result<(), RegistryError>;
    fn register_hypervisor(
        &mut self,
        factory: Arc<dyn HypervisorFactory>,
    ) -> Result<(), RegistryError>;
}

struct Entry<T: ?Sized> {
    factory: Arc<T>,
    origin: Origin,
}

/// One row of [`Registry::entries`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EntryInfo {
    pub kind: Kind,
    pub name: String,
    pub description: String,
    #[serde(serialize_with = "serialize_origin")]
    pub origin: Origin,
}

fn serialize_origin<S: serde::Serializer>(origin: &Origin, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(origin)
}

/// All known factories.
#[derive(Default)]
pub struct Registry {
    codecs: BTreeMap<String, Entry<dyn Codec>>,
    transports: BTreeMap<String, Entry<dyn TransportFactory>>,
    hypervisors: BTreeMap<String, Entry<dyn HypervisorFactory>>,
}

fn check_name(kind: Kind, name: &str) -> Result<(), RegistryError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidName {
            kind,
            name: name.to_string(),
        })
    }
}

fn insert<T: ?Sized>(
    map: &mut BTreeMap<String, Entry<T>>,
    kind: Kind,
    name: &str,
    factory: Arc<T>,
    origin: &Origin,
) -> Result<(), RegistryError> {
    check_name(kind, name)?;
    if let Some(existing) = map.get(name) {
        return Err(RegistryError::Duplicate {
            kind,
            name: name.to_string(),
            existing: existing.origin.clone(),
            new: origin.clone(),
        });
    }
    map.insert(
        name.to_string(),
        Entry {
            factory,
            origin: origin.clone(),
        },
    );
    Ok(())
}

fn unknown<T: ?Sized>(map: &BTreeMap<String, Entry<T>>, kind: Kind, name: &str) -> RegistryError {
    RegistryError::Unknown {
        kind,
        name: name.to_string(),
        known: map.keys().cloned().collect::<Vec<_>>().join(", "),
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// A registrar that records `origin` for everything registered through it.
    pub fn registrar(&mut self, origin: Origin) -> ScopedRegistrar<'_> {
        ScopedRegistrar {
            registry: self,
            origin,
        }
    }

    pub fn codec(&self, name: &str) -> Result<Arc<dyn Codec>, RegistryError> {
        self.codecs
            .get(name)
            .map(|e| e.factory.clone())
            .ok_or_else(|| unknown(&self.codecs, Kind::Codec, name))
    }

    /// The codec whose media-type suffix is `suffix` (`None` for uncompressed).
    pub fn codec_for_suffix(&self, suffix: Option<&str>) -> Option<Arc<dyn Codec>> {
        self.codecs
            .values()
            .find(|e| e.factory.media_type_suffix() == suffix)
            .map(|e| e.factory.clone())
    }

    pub fn transport(&self, scheme: &str) -> Result<Arc<dyn TransportFactory>, RegistryError> {
        self.transports
            .get(scheme)
            .map(|e| e.factory.clone())
            .ok_or_else(|| unknown(&self.transports, Kind::Transport, scheme))
    }

    /// The hypervisor factory for a libvirt-style URI (`qemu:///system`,
    /// `qemu+ssh://host/system`, `test:///default`).
    pub fn hypervisor_for_uri(
        &self,
        uri: &str,
    ) -> Result<Arc<dyn HypervisorFactory>, RegistryError> {
        let scheme = uri.split(':').next().unwrap_or_default();
        let driver = scheme.split('+').next().unwrap_or_default();
        self.hypervisors
            .get(driver)
            .map(|e| e.factory.clone())
            .ok_or_else(|| unknown(&self.hypervisors, Kind::Hypervisor, driver))
    }

    /// Looks up the factory for `uri` and connects.
    pub fn connect(&self, uri: &str) -> Result<Box<dyn Hypervisor>, HypervisorError> {
        let factory = self
            .hypervisor_for_uri(uri)
            .map_err(|e| HypervisorError::Connect {
                uri: uri.to_string(),
                message: e.to_string(),
            })?;
        factory.connect(uri)
    }

    /// Every registered factory, sorted by kind and name.
    pub fn entries(&self) -> Vec<EntryInfo> {
        let mut out = Vec::new();
        for (name, e) in &self.codecs {
            let codec = &e.factory;
            let suffix = codec.media_type_suffix().unwrap_or("no suffix");
            let levels = codec
                .levels()
                .map(|r| {
                    format!(
                        ", levels {}..={} (default {})",
                        r.start(),
                        r.end(),
                        codec.default_level().unwrap_or(*r.start())
                    )
                })
                .unwrap_or_default();
            let threads = if codec.multithreaded() {
                ", multi-threaded"
            } else {
                ""
            };
            out.push(EntryInfo {
                kind: Kind::Codec,
                name: name.clone(),
                description: format!("media type suffix {suffix}{levels}{threads}"),
                origin: e.origin.clone(),
            });
        }
        for (name, e) in &self.transports {
            out.push(EntryInfo {
                kind: Kind::Transport,
                name: name.clone(),
                description: e.factory.description().to_string(),
                origin: e.origin.clone(),
            });
        }
        for (name, e) in &self.hypervisors {
            out.push(EntryInfo {
                kind: Kind::Hypervisor,
                name: name.clone(),
                description: e.factory.description().to_string(),
                origin: e.origin.clone(),
            });
        }
        out
    }
}

/// Registers into a [`Registry`] under one origin.
pub struct ScopedRegistrar<'a> {
    registry: &'a mut Registry,
    origin: Origin,
}

impl Registrar for ScopedRegistrar<'_> {
    fn register_codec(&mut self, codec: Arc<dyn Codec>) -> Result<(), RegistryError> {
        let name = codec.name().to_string();
        insert(
            &mut self.registry.codecs,
            Kind::Codec,
            &name,
            codec,
            &self.origin,
        )
    }

    fn register_transport(
        &mut self,
        factory: Arc<dyn TransportFactory>,
    ) -> Result<(), RegistryError> {
        let name = factory.scheme().to_string();
        insert(
            &mut self.registry.transports,
            Kind::Transport,
            &name,
            factory,
            &self.origin,
        )
    }

    fn register_hypervisor(
        &mut self,
        factory: Arc<dyn HypervisorFactory>,
    ) -> Result<(), RegistryError> {
        // Check every scheme before inserting any, so a clash leaves nothing behind.
        let schemes = factory.schemes();
        for scheme in &schemes {
            check_name(Kind::Hypervisor, scheme)?;
            if let Some(existing) = self.registry.hypervisors.get(scheme) {
                return Err(RegistryError::Duplicate {
                    kind: Kind::Hypervisor,
                    name: scheme.clone(),
                    existing: existing.origin.clone(),
                    new: self.origin.clone(),
                });
            }
        }
        for scheme in schemes {
            insert(
                &mut self.registry.hypervisors,
                Kind::Hypervisor,
                &scheme,
                factory.clone(),
                &self.origin,
            )?;
        }
        Ok(())
    }
}
