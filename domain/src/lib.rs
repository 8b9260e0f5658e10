//! # sarde-domain
//!
//! libvirt domain XML as sardinecake handles it:
//!
//! - [`prepare_export`] strips what ties a VM to the exporting host (uuid, MAC
//!   addresses, backing-store chains, security labels, absolute disk and NVRAM paths,
//!   which become names inside the image) and reads the guest architecture and OS;
//! - [`check_untrusted`] refuses XML from an image that reaches outside the VM
//!   (host devices and paths, QEMU pass-through arguments, foreign kernels…);
//! - [`prepare_import`] names the VM and points its disks at the imported files.
//!
//! XML is streamed event by event (quick-xml) from reader to writer, so elements and
//! namespaces sarde does not know survive unchanged; nothing is edited with regular
//! expressions, and DOCTYPEs (entity expansion) are refused outright.

mod events;
mod rules;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use quick_xml::events::{BytesStart, BytesText, Event};
use thiserror::Error;

use events::{Rewriter, attr, local};

pub use rules::{UnsafeXml, Violation, check_host_paths, check_untrusted};

/// The largest domain XML accepted: real ones are a few KiB.
pub const MAX_XML_SIZE: usize = 1 << 20;

/// Why domain XML cannot be used.
#[derive(Debug, Error)]
pub enum DomainError {
    #[error("not well-formed XML: {0}")]
    Parse(String),
    #[error("the XML is {0} bytes; domain XML is at most {MAX_XML_SIZE}")]
    TooLarge(usize),
    #[error("the XML has a DOCTYPE, which domain XML never needs (entity expansion is refused)")]
    Doctype,
    #[error("the XML has no <domain> element with a <name>")]
    NoName,
    #[error("disk {target}: {reason}")]
    NotExportable { target: String, reason: String },
    #[error("disk {target} refers to {name:?}, which is not a file of the image")]
    UnknownFile { target: String, name: String },
    #[error("the domain has an <nvram> but the image has no NVRAM file")]
    NoNvram,
}

/// Refuses what is never domain XML before any parsing.
fn precheck(xml: &str) -> Result<(), DomainError> {
    if xml.len() > MAX_XML_SIZE {
        return Err(DomainError::TooLarge(xml.len()));
    }
    Ok(())
}

/// A file-backed disk of the exported domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSource {
    /// `<target dev>`, e.g. `vda`.
    pub target: String,
    /// `disk`, `cdrom`, `floppy`, `lun`.
    pub device: String,
    /// `<driver type>`, e.g. `qcow2`.
    pub driver_type: Option<String>,
    /// The host path the XML named.
    pub source: PathBuf,
    /// The base name the image uses for the top file of this disk.
    pub image_name: String,
}

/// The UEFI variable store of the exported domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvramSource {
    pub source: PathBuf,
    pub image_name: String,
}

/// A domain prepared for export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedDomain {
    /// The XML to store in the image.
    pub xml: String,
    pub name: String,
    /// Go architecture name (`amd64`, `arm64`…).
    pub architecture: String,
    /// Go OS name (`linux`, `windows`, `freebsd`…).
    pub os: String,
    pub disks: Vec<DiskSource>,
    pub nvram: Option<NvramSource>,
    /// Firmware (a host file shared by all VMs, kept as it is).
    pub loader: Option<PathBuf>,
}

/// libvirt architecture → Go's `GOARCH`, as OCI configs want it.
pub fn go_architecture(libvirt_arch: &str) -> String {
    match libvirt_arch {
        "x86_64" => "amd64",
        "i686" | "i386" => "386",
        "aarch64" => "arm64",
        "armv7l" | "armv6l" => "arm",
        "mipsel" => "mipsle",
        "mips64el" => "mips64le",
        other => other,
    }
    .to_string()
}

/// libosinfo OS id → Go's `GOOS` (the Python tool's table; anything else is linux).
pub fn go_os(osinfo_id: &str) -> &'static str {
    const TABLE: &[(&str, &str)] = &[
        ("android-x86.org", "android"),
        ("apple.com/", "darwin"),
        ("dragonflybsd.org/", "dragonfly"),
        ("freebsd.org/", "freebsd"),
        ("haiku-os.org/", "haiku"),
        ("microsoft.com/", "windows"),
        ("netbsd.org/", "netbsd"),
        ("omnios.org/", "illumos"),
        ("openbsd.org/", "openbsd"),
        ("openindiana.org/", "illumos"),
        ("oracle.com/solaris/", "solaris"),
        ("smartos.org/", "illumos"),
        ("sun.com/", "solaris"),
    ];
    TABLE
        .iter()
        .find(|(key, _)| osinfo_id.contains(&format!("://{key}")))
        .map_or("linux", |(_, os)| os)
}

fn base_name(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_string()
}

/// `disk.qcow2` → `disk-1.qcow2` while taken.
fn unique(name: String, used: &mut Vec<String>) -> String {
    if !used.contains(&name) {
        used.push(name.clone());
        return name;
    }
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (name[..i].to_string(), name[i..].to_string()),
        _ => (name.clone(), String::new()),
    };
    let candidate = (1..)
        .map(|n| format!("{stem}-{n}{ext}"))
        .find(|c| !used.contains(c))
        .expect("a free suffix exists");
    used.push(candidate.clone());
    candidate
}

/// Elements export removes, by local name and the parent they must be in (`None`:
/// anywhere).
fn dropped_on_export(path: &[String], name: &str) -> bool {
    let parent = path.last().map(String::as_str);
    match name {
        "uuid" => parent == Some("domain"),
        "mac" => parent == Some("interface"),
        "backingStore" => true,
        "seclabel" => true,
        _ => false,
    }
}

/// What export has read of a `<disk>` so far.
#[derive(Default)]
struct DiskInProgress {
    kind: String,
    device: String,
    driver_type: Option<String>,
    source: Option<String>,
    image_name: Option<String>,
    target: String,
}

/// Prepares a domain's XML for export.
pub fn prepare_export(xml: &str) -> Result<ExportedDomain, DomainError> {
    precheck(xml)?;
    let mut rw = Rewriter::new(xml);
    let mut out = ExportedDomain {
        xml: String::new(),
        name: String::new(),
        architecture: "amd64".into(),
        os: "linux".into(),
        disks: Vec::new(),
        nvram: None,
        loader: None,
    };
    let mut used = Vec::new();
    // Host path → image name, for files named already.
    let mut named: Vec<(String, String)> = Vec::new();
    // The disk being read.
    let mut disk: Option<DiskInProgress> = None;
    while let Some(event) = rw.next()? {
        let path = rw.path().to_vec();
        match &event {
            Event::Start(e) | Event::Empty(e) => {
                let name = local(e);
                if dropped_on_export(&path, &name) {
                    rw.skip(&event)?;
                    continue;
                }
                let mut e = e.clone().into_owned();
                match name.as_str() {
                    "domain" if path.is_empty() => {
                        e = events::without_attr(&e, "id");
                    }
                    "disk" if path.last().map(String::as_str) == Some("devices") => {
                        disk = Some(DiskInProgress {
                            kind: attr(&e, "type").unwrap_or_else(|| "file".into()),
                            device: attr(&e, "device").unwrap_or_else(|| "disk".into()),
                            ..DiskInProgress::default()
                        });
                    }
                    "driver" if path.last().map(String::as_str) == Some("disk") => {
                        if let Some(d) = disk.as_mut() {
                            d.driver_type = attr(&e, "type");
                        }
                    }
                    "target" if path.last().map(String::as_str) == Some("disk") => {
                        if let Some(d) = disk.as_mut() {
                            d.target = attr(&e, "dev").unwrap_or_default();
                        }
                    }
                    "source" if path.last().map(String::as_str) == Some("disk") => {
                        if let Some(d) = disk.as_mut() {
                            if d.kind != "file" {
                                let target = d.target.clone();
                                return Err(DomainError::NotExportable {
                                    target: if target.is_empty() {
                                        "(no target yet)".into()
                                    } else {
                                        target
                                    },
                                    reason: format!(
                                        "its source is of type {:?}; only file-backed disks can travel in an image (copy it into a qcow2 file first)",
                                        d.kind
                                    ),
                                });
                            }
                            if let Some(file) = attr(&e, "file") {
                                // The same file used by two disks keeps one name.
                                let image_name = match named.iter().find(|(f, _)| *f == file) {
                                    Some((_, n)) => n.clone(),
                                    None => {
                                        let n = unique(base_name(&file), &mut used);
                                        named.push((file.clone(), n.clone()));
                                        n
                                    }
                                };
                                e = events::with_attr(&e, "file", &image_name);
                                d.source = Some(file);
                                d.image_name = Some(image_name);
                            }
                        }
                    }
                    "type" if path.last().map(String::as_str) == Some("os") => {
                        if let Some(arch) = attr(&e, "arch") {
                            out.architecture = go_architecture(&arch);
                        }
                    }
                    "os" if path.iter().any(|p| p == "metadata") => {
                        if let Some(id) = attr(&e, "id") {
                            out.os = go_os(&id).to_string();
                        }
                    }
                    _ => {}
                }
                if matches!(event, Event::Start(_)) {
                    rw.write_start(e, &name)?;
                } else {
                    rw.write(Event::Empty(e))?;
                }
            }
            Event::End(_) => {
                let name = rw.current().unwrap_or_default();
                if name == "disk" && path.len() >= 2 && path[path.len() - 2] == "devices" {
                    if let Some(DiskInProgress {
                        device,
                        driver_type,
                        source: Some(source),
                        image_name: Some(image_name),
                        target,
                        ..
                    }) = disk.take()
                    {
                        out.disks.push(DiskSource {
                            target,
                            device,
                            driver_type,
                            source: PathBuf::from(source),
                            image_name,
                        });
                    }
                }
                rw.write_end(event.clone())?;
            }
            Event::Text(t) => {
                let parent = path.last().map(String::as_str).unwrap_or_default();
                let in_os = path.len() >= 2 && path[path.len() - 2] == "os";
                let text = events::text(t)?;
                match parent {
                    "name" if path.len() == 2 => {
                        out.name = text.trim().to_string();
                        rw.write(event.clone())?;
                    }
                    "nvram" if in_os && !text.trim().is_empty() => {
                        let source = text.trim().to_string();
                        let image_name = unique(base_name(&source), &mut used);
                        rw.write(Event::Text(BytesText::new(&image_name).into_owned()))?;
                        out.nvram = Some(NvramSource {
                            source: PathBuf::from(source),
                            image_name,
                        });
                    }
                    "loader" if in_os && !text.trim().is_empty() => {
                        out.loader = Some(PathBuf::from(text.trim()));
                        rw.write(event.clone())?;
                    }
                    _ => rw.write(event.clone())?,
                }
            }
            _ => rw.write(event.clone())?,
        }
    }
    if out.name.is_empty() {
        return Err(DomainError::NoName);
    }
    out.xml = rw.finish();
    Ok(out)
}

/// How to make an image's domain XML into a VM on this host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImportSpec {
    /// The VM's name.
    pub name: String,
    /// Image file name → absolute path of the imported file.
    pub files: BTreeMap<String, PathBuf>,
    /// Where the imported NVRAM file is, when the image has one.
    pub nvram: Option<PathBuf>,
    /// Keep the image's `<uuid>` (normally libvirt assigns a new one).
    pub keep_uuid: bool,
}

/// Rewrites an image's domain XML for this host (call [`check_untrusted`] first).
pub fn prepare_import(xml: &str, spec: &ImportSpec) -> Result<String, DomainError> {
    precheck(xml)?;
    let mut rw = Rewriter::new(xml);
    let mut target = String::new();
    // A disk source that names no file of the image; reported with the disk's target.
    let mut unknown: Option<String> = None;
    let mut seen_name = false;
    while let Some(event) = rw.next()? {
        let path = rw.path().to_vec();
        match &event {
            Event::Start(e) | Event::Empty(e) => {
                let name = local(e);
                let parent = path.last().map(String::as_str);
                let drop = match name.as_str() {
                    "uuid" => parent == Some("domain") && !spec.keep_uuid,
                    "mac" => parent == Some("interface"),
                    "backingStore" => true,
                    _ => false,
                };
                if drop {
                    rw.skip(&event)?;
                    continue;
                }
                let mut e: BytesStart<'static> = e.clone().into_owned();
                if name == "disk" {
                    target.clear();
                }
                if name == "target" && parent == Some("disk") {
                    target = attr(&e, "dev").unwrap_or_default();
                }
                if name == "source" && parent == Some("disk") {
                    if let Some(file) = attr(&e, "file") {
                        match spec.files.get(&file) {
                            Some(path) => {
                                e = events::with_attr(&e, "file", &path.to_string_lossy())
                            }
                            None => unknown = Some(file),
                        }
                    }
                }
                if matches!(event, Event::Start(_)) {
                    rw.write_start(e, &name)?;
                } else {
                    rw.write(Event::Empty(e))?;
                }
            }
            Event::End(_) => {
                if rw.current().as_deref() == Some("disk") {
                    if let Some(name) = unknown.take() {
                        return Err(DomainError::UnknownFile {
                            target: if target.is_empty() {
                                "(no target)".into()
                            } else {
                                target
                            },
                            name,
                        });
                    }
                }
                rw.write_end(event.clone())?
            }
            Event::Text(t) => {
                let parent = path.last().map(String::as_str).unwrap_or_default();
                let in_os = path.len() >= 2 && path[path.len() - 2] == "os";
                if parent == "name" && path.len() == 2 {
                    seen_name = true;
                    rw.write(Event::Text(BytesText::new(&spec.name).into_owned()))?;
                } else if parent == "nvram" && in_os && !events::text(t)?.trim().is_empty() {
                    let nvram = spec.nvram.as_ref().ok_or(DomainError::NoNvram)?;
                    rw.write(Event::Text(
                        BytesText::new(&nvram.to_string_lossy()).into_owned(),
                    ))?;
                } else {
                    rw.write(event.clone())?;
                }
            }
            _ => rw.write(event.clone())?,
        }
    }
    if !seen_name {
        return Err(DomainError::NoName);
    }
    Ok(rw.finish())
}

impl fmt::Display for ExportedDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.xml)
    }
}

#[cfg(test)]
mod tests;
