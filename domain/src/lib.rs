//! # sarde-domain
//!
//! libvirt domain XML as sardinecake handles it:
//!
//! - [`prepare_export`] strips what ties a VM to the exporting host (uuid, MAC
//!   addresses, backing-store chains, security labels, absolute disk and NVRAM paths,
//!   which become names inside the image) and reads the guest architecture and OS;
//! - [`check_untrusted`] refuses XML from an image that reaches outside the VM
//!   (host devices and paths, QEMU pass-through arguments, foreign kernels…);
//! - [`prepare_import`] names the VM and points its disks at the imported files;
//! - [`check_host_paths`] scans that final XML once more: no host path but the
//!   imported files and packaged firmware, wherever it hides.
//!
//! XML goes through quick-xml events, kept verbatim in a small tree and written back
//! by quick-xml's writer, so elements, attributes and namespaces sarde does not know
//! survive unchanged; nothing is edited with regular expressions. DOCTYPEs (entity
//! expansion) are refused outright, and so is anything libvirt's parser (libxml2)
//! would read differently from ours: see `tree.rs`.
//!
//! Output has no XML declaration unless the input had one ([`prepare_import`] always
//! drops it): libvirt writes none, and the v1 format's `<?xml version="1.0" ?>`
//! prefix is the v1 writer's business. The same input always gives the same bytes.

mod rules;
mod tree;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

use tree::{Document, Element};

pub use rules::{UnsafeXml, Violation, check_host_paths, check_untrusted};

/// The largest domain XML accepted: real ones are a few KiB.
pub const MAX_XML_SIZE: usize = 1 << 20;

/// Why domain XML cannot be used.
#[derive(Debug, Error)]
pub enum DomainError {
    #[error("not usable domain XML: {0}")]
    Parse(String),
    #[error("the XML is {0} bytes; domain XML is at most {MAX_XML_SIZE}")]
    TooLarge(usize),
    #[error("the XML has a DOCTYPE, which domain XML never needs (entity expansion is refused)")]
    Doctype,
    #[error("the root element is <{0}>, not <domain>")]
    NotADomain(String),
    #[error("the XML has no <domain> element with a <name>")]
    NoName,
    #[error("{name:?} cannot be a VM name: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("disk {target} (type {kind:?}): {reason}")]
    NotExportable {
        target: String,
        kind: String,
        reason: String,
    },
    #[error("disk {target} refers to {name:?}, which is not a file of the image")]
    UnknownFile { target: String, name: String },
    /// The VM cannot be cloned as asked.
    #[error("{0}")]
    CannotClone(String),
}

/// A file-backed disk of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSource {
    /// `<target dev>`, e.g. `vda`.
    pub target: String,
    /// `disk`, `cdrom`, `floppy`, `lun`.
    pub device: String,
    /// `<driver type>`, e.g. `qcow2`.
    pub driver_type: Option<String>,
    /// The path the XML names (a host path on export).
    pub source: PathBuf,
    /// The base name the image uses for the top file of this disk.
    pub image_name: String,
}

/// The UEFI variable store of the exported domain: a per-VM file that travels in
/// the image (unlike the firmware code, which is shared and stays on the host).
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
    /// File-backed disks in document order, CD-ROMs with a file included (an ISO is
    /// a file like any other). Two disks on the same file share one entry name.
    pub disks: Vec<DiskSource>,
    pub nvram: Option<NvramSource>,
    /// Firmware code, a host file shared by all VMs: kept in the XML as it is, not
    /// exported.
    pub loader: Option<PathBuf>,
}

impl fmt::Display for ExportedDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.xml)
    }
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
        ("microsoft.com/", "windows"),
        ("freebsd.org/", "freebsd"),
        ("openbsd.org/", "openbsd"),
        ("netbsd.org/", "netbsd"),
        ("apple.com/", "darwin"),
        ("dragonflybsd.org/", "dragonfly"),
        ("omnios.org/", "illumos"),
        ("openindiana.org/", "illumos"),
        ("smartos.org/", "illumos"),
        ("oracle.com/solaris/", "solaris"),
        ("sun.com/", "solaris"),
        ("haiku-os.org/", "haiku"),
    ];
    TABLE
        .iter()
        .find(|(key, _)| osinfo_id.contains(&format!("://{key}")))
        .map_or("linux", |(_, os)| os)
}

/// Parses and checks that the root is `<domain>`.
fn parse_domain(xml: &str) -> Result<Document, DomainError> {
    let doc = Document::parse(xml)?;
    if doc.root().local != "domain" {
        return Err(DomainError::NotADomain(doc.root().qname.clone()));
    }
    Ok(doc)
}

fn name_of(root: &Element) -> Result<String, DomainError> {
    let name = root.child("name").map(|n| n.text()).unwrap_or_default();
    let name = name.trim();
    if name.is_empty() {
        return Err(DomainError::NoName);
    }
    Ok(name.to_string())
}

/// The domain's `<name>`.
pub fn domain_name(xml: &str) -> Result<String, DomainError> {
    name_of(parse_domain(xml)?.root())
}

/// The last component of a path; `None` when there is no usable one.
fn base_name(path: &str) -> Option<&str> {
    let name = path.rsplit('/').next().unwrap_or(path);
    (!name.is_empty() && name != "." && name != "..").then_some(name)
}

/// `<devices><disk>` elements, in document order.
fn disks(root: &Element) -> impl Iterator<Item = &Element> {
    root.elements()
        .filter(|e| e.local == "devices")
        .flat_map(|d| d.elements().filter(|e| e.local == "disk"))
}

fn disk_target(disk: &Element) -> String {
    disk.child("target")
        .and_then(|t| t.attr("dev"))
        .unwrap_or("(no target)")
        .to_string()
}

/// libvirt's default when `type` is missing is a file.
fn disk_kind(disk: &Element) -> &str {
    disk.attr("type").unwrap_or("file")
}

fn describe_disk(disk: &Element, source: &str, image_name: String) -> DiskSource {
    DiskSource {
        target: disk_target(disk),
        device: disk.attr("device").unwrap_or("disk").to_string(),
        driver_type: disk
            .child("driver")
            .and_then(|d| d.attr("type"))
            .map(str::to_string),
        source: PathBuf::from(source),
        image_name,
    }
}

/// The file-backed disks (with a `<source file>`) as the XML names them; each
/// `image_name` is the base name of the source, nothing made unique. On an image's
/// XML these are the names the image must carry.
pub fn file_disk_sources(xml: &str) -> Result<Vec<DiskSource>, DomainError> {
    let doc = parse_domain(xml)?;
    Ok(disks(doc.root())
        .filter(|d| disk_kind(d) == "file")
        .filter_map(|d| {
            let file = d.child("source")?.attr("file")?;
            Some(describe_disk(
                d,
                file,
                base_name(file).unwrap_or(file).to_string(),
            ))
        })
        .collect())
}

/// The files of the file disks' `<backingStore>` chains, outermost first, as
/// libvirt records them in a running domain's XML. For a clone whose overlays
/// were unlinked once QEMU held them open, these are the only way from the domain
/// to the files it still reads.
pub fn backing_store_files(xml: &str) -> Result<Vec<PathBuf>, DomainError> {
    let doc = parse_domain(xml)?;
    let mut out = Vec::new();
    for disk in disks(doc.root()).filter(|d| disk_kind(d) == "file") {
        let mut store = disk.child("backingStore");
        while let Some(s) = store {
            if s.attr("type").unwrap_or("file") == "file" {
                if let Some(file) = s.child("source").and_then(|src| src.attr("file")) {
                    out.push(PathBuf::from(file));
                }
            }
            store = s.child("backingStore");
        }
    }
    Ok(out)
}

/// Hands out the file names inside an image: one per host path, unique, in
/// document order, so the same XML always gives the same names.
#[derive(Default)]
struct Names {
    by_path: BTreeMap<String, String>,
}

impl Names {
    fn name_for(&mut self, path: &str, base: &str) -> String {
        if let Some(name) = self.by_path.get(path) {
            return name.clone();
        }
        let taken = |n: &str| self.by_path.values().any(|v| v == n);
        let name = if taken(base) {
            let (stem, ext) = match base.rfind('.') {
                Some(i) if i > 0 => base.split_at(i),
                _ => (base, ""),
            };
            (1..)
                .map(|n| format!("{stem}-{n}{ext}"))
                .find(|c| !taken(c))
                .unwrap_or_else(|| unreachable!("finitely many names are taken"))
        } else {
            base.to_string()
        };
        self.by_path.insert(path.to_string(), name.clone());
        name
    }
}

/// Elements that tie a VM to the host it runs on, dropped on export. `parent` is
/// the local name of the element's parent.
fn host_only(parent: &str, e: &Element) -> bool {
    match e.local.as_str() {
        "uuid" => parent == "domain",
        "mac" => parent == "interface",
        // Rediscovered from the files' own headers on import.
        "backingStore" => true,
        // libvirt assigns labels; a static one names host users and contexts.
        "seclabel" => true,
        // A block job in progress, pointing at a host file.
        "mirror" => parent == "disk",
        _ => false,
    }
}

/// Prepares a domain's XML for export. See [`ExportedDomain`] for what it reports;
/// disks that are not files (block devices, network or pool volumes) cannot travel
/// in an image and are an error naming the disk.
pub fn prepare_export(xml: &str) -> Result<ExportedDomain, DomainError> {
    let mut doc = parse_domain(xml)?;
    let root = doc.root_mut();
    let name = name_of(root)?;
    root.remove_attr("id");
    root.remove_descendants(&host_only);

    let mut architecture = "amd64".to_string();
    let mut os = "linux".to_string();
    let mut loader = None;
    let mut nvram = None;
    let mut names = Names::default();

    if let Some(metadata) = root.child("metadata") {
        let id = metadata
            .elements()
            .filter(|e| e.local == "libosinfo")
            .flat_map(|l| l.elements().filter(|e| e.local == "os"))
            .find_map(|e| e.attr("id"));
        if let Some(id) = id {
            os = go_os(id).to_string();
        }
    }

    if let Some(os_el) = root.child_mut("os") {
        if let Some(arch) = os_el.child("type").and_then(|t| t.attr("arch")) {
            architecture = go_architecture(arch);
        }
        if let Some(l) = os_el.child("loader") {
            let path = l.text();
            if !path.trim().is_empty() {
                loader = Some(PathBuf::from(path.trim()));
            }
        }
        if let Some(nv) = os_el.child_mut("nvram") {
            nvram = export_nvram(nv, &mut names)?;
        }
    }

    let mut disks_out = Vec::new();
    for devices in root.elements_mut().filter(|e| e.local == "devices") {
        for disk in devices.elements_mut().filter(|e| e.local == "disk") {
            if let Some(d) = export_disk(disk, &mut names)? {
                disks_out.push(d);
            }
        }
    }

    Ok(ExportedDomain {
        xml: doc.write()?,
        name,
        architecture,
        os,
        disks: disks_out,
        nvram,
        loader,
    })
}

/// Renames the disk's file to its image name; `None` for a disk without a file
/// (an empty CD-ROM drive).
fn export_disk(disk: &mut Element, names: &mut Names) -> Result<Option<DiskSource>, DomainError> {
    let kind = disk_kind(disk).to_string();
    let Some(source) = disk.child("source") else {
        return Ok(None);
    };
    let error = |disk: &Element, reason: String| DomainError::NotExportable {
        target: disk_target(disk),
        kind: kind.clone(),
        reason,
    };
    if kind != "file" {
        return Err(error(
            disk,
            "only file-backed disks can travel in an image (copy it into a qcow2 file first)"
                .into(),
        ));
    }
    if source.child("dataStore").is_some() {
        return Err(error(
            disk,
            "its qcow2 keeps the data in a separate file (<dataStore>), which sarde does not export"
                .into(),
        ));
    }
    let Some(file) = source.attr("file").map(str::to_string) else {
        return Ok(None);
    };
    let base = base_name(&file).ok_or_else(|| error(disk, format!("{file:?} names no file")))?;
    let image_name = names.name_for(&file, base);
    let described = describe_disk(disk, &file, image_name.clone());
    if let Some(source) = disk.child_mut("source") {
        source.set_attr("file", &image_name);
    }
    Ok(Some(described))
}

/// Renames the NVRAM file (old `<nvram>PATH</nvram>` or newer
/// `<nvram type='file'><source file='PATH'/></nvram>`) to its image name.
fn export_nvram(nv: &mut Element, names: &mut Names) -> Result<Option<NvramSource>, DomainError> {
    let kind = nv.attr("type").unwrap_or("file").to_string();
    let not_file = |reason: String| DomainError::NotExportable {
        target: "nvram".into(),
        kind: kind.clone(),
        reason,
    };
    if let Some(source) = nv.child_mut("source") {
        if kind != "file" {
            return Err(not_file("only an NVRAM file can travel in an image".into()));
        }
        let Some(file) = source.attr("file").map(str::to_string) else {
            return Ok(None);
        };
        let base = base_name(&file).ok_or_else(|| not_file(format!("{file:?} names no file")))?;
        let image_name = names.name_for(&file, base);
        source.set_attr("file", &image_name);
        return Ok(Some(NvramSource {
            source: PathBuf::from(file),
            image_name,
        }));
    }
    let text = nv.text();
    let path = text.trim();
    if path.is_empty() {
        // libvirt makes a fresh variable store from the template.
        return Ok(None);
    }
    let base = base_name(path).ok_or_else(|| not_file(format!("{path:?} names no file")))?;
    let image_name = names.name_for(path, base);
    let source = PathBuf::from(path);
    nv.set_text(&image_name);
    Ok(Some(NvramSource { source, image_name }))
}

/// How to make an image's domain XML into a VM on this host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImportSpec {
    /// The VM's name.
    pub name: String,
    /// Image file name → absolute path of the imported file.
    pub files: BTreeMap<String, PathBuf>,
    /// Where the imported NVRAM file is, when the image has one. Without one, the
    /// domain's NVRAM path is dropped and libvirt makes a fresh store from the
    /// firmware's template (so a VM never shares another's variables).
    pub nvram: Option<PathBuf>,
    /// Keep the image's `<uuid>` (normally libvirt assigns a new one).
    pub keep_uuid: bool,
}

impl ImportSpec {
    /// The imported files and the NVRAM file as the rewritten XML names them:
    /// the host paths [`check_host_paths`] allows.
    pub fn own_paths(&self) -> Vec<String> {
        self.files
            .values()
            .chain(self.nvram.iter())
            .map(|p| p.to_string_lossy().into_owned())
            .collect()
    }
}

/// Rewrites an image's domain XML for this host (call [`check_untrusted`] first):
/// sets the name, drops the uuid (unless asked), the MAC addresses (libvirt makes
/// new ones, so copies of one image do not clash) and backing-store chains, points
/// each disk at its imported file and the NVRAM at its imported file. A disk file
/// that is not in `spec.files` is an error. The XML declaration is dropped.
pub fn prepare_import(xml: &str, spec: &ImportSpec) -> Result<String, DomainError> {
    let mut doc = with_new_identity(xml, &spec.name, spec.keep_uuid, spec.nvram.as_ref())?;
    let root = doc.root_mut();
    root.remove_descendants(&|_, e| e.local == "backingStore");
    for devices in root.elements_mut().filter(|e| e.local == "devices") {
        for disk in devices.elements_mut().filter(|e| e.local == "disk") {
            let target = disk_target(disk);
            if let Some(source) = disk.child_mut("source")
                && let Some(file) = source.attr("file").map(str::to_string)
            {
                let path = spec
                    .files
                    .get(&file)
                    .ok_or(DomainError::UnknownFile { target, name: file })?;
                source.set_attr("file", &path.to_string_lossy());
            }
        }
    }
    doc.write()
}

/// The domain's NVRAM file (`<os><nvram>PATH</nvram>` or its `<source file>`).
pub fn nvram_file(xml: &str) -> Result<Option<PathBuf>, DomainError> {
    let doc = parse_domain(xml)?;
    let Some(nv) = doc.root().child("os").and_then(|o| o.child("nvram")) else {
        return Ok(None);
    };
    if let Some(source) = nv.child("source") {
        return Ok(source.attr("file").map(PathBuf::from));
    }
    let text = nv.text();
    let path = text.trim();
    Ok((!path.is_empty()).then(|| PathBuf::from(path)))
}

/// The MAC addresses of the domain's network interfaces, in document order.
pub fn interface_macs(xml: &str) -> Result<Vec<String>, DomainError> {
    let doc = parse_domain(xml)?;
    let mut out = Vec::new();
    for devices in doc.root().elements().filter(|e| e.local == "devices") {
        for interface in devices.elements().filter(|e| e.local == "interface") {
            if let Some(mac) = interface.child("mac").and_then(|m| m.attr("address")) {
                out.push(mac.to_ascii_lowercase());
            }
        }
    }
    Ok(out)
}

/// How to make a clone's domain XML from its source VM's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CloneSpec {
    /// The clone's name.
    pub name: String,
    /// Disk target (`vda`) → the clone's qcow2 overlay of that disk.
    pub overlays: BTreeMap<String, PathBuf>,
    /// The clone's own copy of the NVRAM file, when the source has one.
    pub nvram: Option<PathBuf>,
    /// The first interface's MAC; libvirt makes new ones for the others (and for
    /// the first when `None`).
    pub mac: Option<String>,
}

/// Rewrites a VM's domain XML for a copy-on-write clone: a new name, no uuid, new
/// MACs, each writable file disk pointing at its overlay (qcow2, no recorded
/// backing chain: qemu reads it from the overlay's header), read-only disks and
/// CD-ROMs shared with the source, the NVRAM at the clone's copy. A writable file
/// disk without an overlay in `spec` is an error, so a clone never writes into
/// its source's disks.
pub fn prepare_clone(xml: &str, spec: &CloneSpec) -> Result<String, DomainError> {
    let mut doc = with_new_identity(xml, &spec.name, false, spec.nvram.as_ref())?;
    let root = doc.root_mut();
    let mut mac = spec.mac.clone();
    for devices in root.elements_mut().filter(|e| e.local == "devices") {
        for disk in devices.elements_mut().filter(|e| e.local == "disk") {
            let target = disk_target(disk);
            let shared = disk
                .attr("device")
                .is_some_and(|d| d == "cdrom" || d == "floppy")
                || disk.child("readonly").is_some()
                || disk.child("shareable").is_some();
            let is_file = disk.attr("type").unwrap_or("file") == "file"
                && disk
                    .child("source")
                    .is_some_and(|s| s.attr("file").is_some());
            if shared || !is_file {
                if !shared && disk.child("source").is_some() {
                    return Err(DomainError::CannotClone(format!(
                        "disk {target} is writable and not a file: it has no copy-on-write overlay"
                    )));
                }
                continue;
            }
            let overlay = spec
                .overlays
                .get(&target)
                .ok_or_else(|| DomainError::CannotClone(format!("disk {target} has no overlay")))?;
            disk.remove_children(|e| e.local == "backingStore");
            if let Some(source) = disk.child_mut("source") {
                source.set_attr("file", &overlay.to_string_lossy());
            }
            if let Some(driver) = disk.child_mut("driver") {
                driver.set_attr("type", "qcow2");
            }
        }
        if let Some(mac) = mac.take() {
            if let Some(interface) = devices.elements_mut().find(|e| e.local == "interface") {
                interface.push_child_with_attr("mac", "address", &mac);
            } else {
                return Err(DomainError::CannotClone(format!(
                    "a MAC address ({mac}) was given, but the VM has no network interface"
                )));
            }
        }
    }
    doc.write()
}

/// What import and clone do alike: the domain XML, without its declaration, named
/// `name` (one `<name>`), without uuid (unless `keep_uuid`) and MAC addresses
/// (libvirt makes new ones, so copies do not clash), its NVRAM at `nvram`.
fn with_new_identity(
    xml: &str,
    name: &str,
    keep_uuid: bool,
    nvram: Option<&PathBuf>,
) -> Result<Document, DomainError> {
    check_vm_name(name)?;
    let mut doc = parse_domain(xml)?;
    doc.drop_declaration();
    let root = doc.root_mut();
    name_of(root)?;
    root.remove_descendants(&|parent, e| match e.local.as_str() {
        "uuid" => parent == "domain" && !keep_uuid,
        "mac" => parent == "interface",
        _ => false,
    });
    // libvirt reads the first <name>; a second one would only confuse readers.
    let mut first = true;
    root.remove_children(|e| e.local == "name" && !std::mem::take(&mut first));
    if let Some(element) = root.child_mut("name") {
        element.set_text(name);
    }
    if let Some(nv) = root.child_mut("os").and_then(|o| o.child_mut("nvram")) {
        import_nvram(nv, nvram);
    }
    Ok(doc)
}

fn import_nvram(nv: &mut Element, path: Option<&PathBuf>) {
    let has_source = nv.child("source").is_some();
    match path {
        Some(path) if has_source => {
            if let Some(source) = nv.child_mut("source") {
                source.set_attr("file", &path.to_string_lossy());
            }
        }
        Some(path) => nv.set_text(&path.to_string_lossy()),
        None => {
            nv.remove_children(|e| e.local == "source");
            if has_source {
                nv.remove_attr("type");
            }
            nv.set_text("");
        }
    }
}

/// What libvirt itself refuses, caught before any file is written.
fn check_vm_name(name: &str) -> Result<(), DomainError> {
    let reason = if name.trim().is_empty() {
        "it is empty"
    } else if name.contains('/') {
        "it contains '/'"
    } else if name.chars().any(char::is_control) {
        "it contains control characters"
    } else {
        return Ok(());
    };
    Err(DomainError::InvalidName {
        name: name.to_string(),
        reason,
    })
}

#[cfg(test)]
mod tests;
