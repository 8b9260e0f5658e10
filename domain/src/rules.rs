//! What domain XML from an untrusted image may not do: reach outside the VM.
//!
//! Every element is checked against the rules below and all violations are
//! collected, so the user sees the whole list at once; `--allow-unsafe-xml` imports
//! such XML anyway. Besides the named rules, any attribute that names a file,
//! socket or directory, and any attribute or element text that is an absolute path,
//! is refused unless a rule says where it may point: a host path libvirt may hand
//! to QEMU is how an image would read or write host files.
//! `<metadata>`, `<title>` and `<description>` are free-form and not looked into.

use std::fmt;

use crate::DomainError;
use crate::tree::{Document, Element, Ns};

/// The namespace of QEMU pass-through (`qemu:commandline`, `qemu:capabilities`…),
/// whatever prefix the document gives it.
const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// Emulators an image may name, besides `/usr/bin/qemu-system-*`.
const EMULATORS: &[&str] = &["/usr/libexec/qemu-kvm", "/usr/bin/kvm", "/usr/bin/qemu-kvm"];

/// Character device types that stay between QEMU and libvirt or the console.
/// `unix` is fine only without a path (libvirt then makes its own socket).
const CHARDEV_TYPES: &[&str] = &[
    "pty",
    "spicevmc",
    "spiceport",
    "qemu-vdagent",
    "dbus",
    "null",
    "vc",
    "unix",
];

const CHARDEVS: &[&str] = &["serial", "console", "channel", "parallel"];

/// Attributes that name a host file, socket or directory wherever they appear.
const PATH_ATTRS: &[&str] = &[
    "file",
    "path",
    "dir",
    "socket",
    "evdev",
    "rendernode",
    "logFile",
    "tap",
    "vhost",
    "template",
];

/// Interfaces that attach to something other than a libvirt-managed network.
const HOST_INTERFACES: &[&str] = &[
    "direct",
    "hostdev",
    "vhostuser",
    "ethernet",
    "vdpa",
    "server",
    "client",
    "mcast",
    "udp",
];

/// One thing the XML does that an image may not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The element, as a path from the root: `devices/hostdev`, `q:commandline`.
    pub element: String,
    pub reason: String,
}

/// The violations found in one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsafeXml {
    pub violations: Vec<Violation>,
}

impl fmt::Display for UnsafeXml {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.violations.len();
        write!(
            f,
            "the image's domain XML reaches outside the VM ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for v in &self.violations {
            write!(f, "\n  - {}: {}", v.element, v.reason)?;
        }
        write!(
            f,
            "\nuse --allow-unsafe-xml to import it anyway if you trust the image"
        )
    }
}

impl std::error::Error for UnsafeXml {}

impl From<DomainError> for UnsafeXml {
    fn from(e: DomainError) -> Self {
        UnsafeXml {
            violations: vec![Violation {
                element: "(document)".into(),
                reason: e.to_string(),
            }],
        }
    }
}

/// Checks domain XML from an image. `allowed_files` are the file names the image
/// carries (plain base names; anything else never matches): disks and NVRAM may
/// name only those. XML that cannot be parsed safely (DOCTYPE, over
/// [`MAX_XML_SIZE`](crate::MAX_XML_SIZE), malformed) is one violation.
pub fn check_untrusted(xml: &str, allowed_files: &[&str]) -> Result<(), UnsafeXml> {
    let doc = Document::parse(xml)?;
    let mut checker = Checker {
        allowed: allowed_files
            .iter()
            .copied()
            .filter(|f| is_plain_name(f))
            .collect(),
        violations: Vec::new(),
    };
    let root = doc.root();
    if root.local != "domain" {
        checker.flag(
            &root.qname,
            format!("the root element is <{}>, not <domain>", root.qname),
        );
    }
    checker.element(root, &mut Vec::new(), &mut Vec::new());
    if checker.violations.is_empty() {
        Ok(())
    } else {
        Err(UnsafeXml {
            violations: checker.violations,
        })
    }
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Firmware and templates shipped by distribution packages (OVMF, SeaBIOS…).
fn under_usr_share(path: &str) -> bool {
    path.starts_with("/usr/share/") && !path.split('/').any(|c| c == "..")
}

fn allowed_emulator(path: &str) -> bool {
    EMULATORS.contains(&path)
        || path
            .strip_prefix("/usr/bin/qemu-system-")
            .is_some_and(|arch| {
                !arch.is_empty()
                    && arch
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
            })
}

fn loopback(address: &str) -> bool {
    address.starts_with("127.") || address == "::1" || address == "localhost"
}

/// What a rule decided about an element.
#[derive(Default)]
struct Verdict {
    /// Do not look inside (the element as a whole is refused or free-form).
    skip_children: bool,
    /// Attributes a rule has judged; the generic path rule leaves them alone.
    attrs_judged: Vec<&'static str>,
    /// The text was judged (or may be a path by design).
    text_judged: bool,
}

struct Checker<'a> {
    allowed: Vec<&'a str>,
    violations: Vec<Violation>,
}

impl Checker<'_> {
    fn flag(&mut self, element: &str, reason: String) {
        self.violations.push(Violation {
            element: element.to_string(),
            reason,
        });
    }

    fn allowed_file(&self, name: &str) -> bool {
        is_plain_name(name) && self.allowed.contains(&name)
    }

    /// `parents` are the local names above `e`, `path` the qualified names below
    /// the root (for messages).
    fn element<'e>(&mut self, e: &'e Element, parents: &mut Vec<&'e str>, path: &mut Vec<&'e str>) {
        let here = if path.is_empty() {
            e.qname.clone()
        } else {
            path.join("/")
        };
        let verdict = self.rules(e, parents, &here);
        if !verdict.skip_children {
            self.generic(e, &here, &verdict);
            parents.push(&e.local);
            for child in e.elements() {
                path.push(&child.qname);
                self.element(child, parents, path);
                path.pop();
            }
            parents.pop();
        }
    }

    /// Any path-like attribute, or an absolute path as attribute value or text,
    /// that no rule has judged.
    fn generic(&mut self, e: &Element, here: &str, verdict: &Verdict) {
        for a in e.attrs() {
            if verdict.attrs_judged.contains(&a.local.as_str()) || a.value.is_empty() {
                continue;
            }
            if PATH_ATTRS.contains(&a.local.as_str()) || a.value.starts_with('/') {
                self.flag(here, format!("{}={:?} names a host path", a.key, a.value));
            }
        }
        if !verdict.text_judged {
            let text = e.text();
            let text = text.trim();
            if text.starts_with('/') {
                self.flag(here, format!("{text:?} names a host path"));
            }
        }
    }

    fn rules(&mut self, e: &Element, parents: &[&str], here: &str) -> Verdict {
        let mut v = Verdict::default();
        let parent = parents.last().copied().unwrap_or("");
        let grandparent = parents.len().checked_sub(2).map_or("", |i| parents[i]);
        let kind = e.attr("type").unwrap_or("");
        let refuse = |checker: &mut Self, reason: String| {
            checker.flag(here, reason);
            Verdict {
                skip_children: true,
                ..Verdict::default()
            }
        };
        match &e.ns {
            Ns::Bound(ns) if ns == QEMU_NS => {
                return refuse(
                    self,
                    "QEMU pass-through (qemu namespace) hands arbitrary options to QEMU on the host"
                        .into(),
                );
            }
            Ns::Undeclared(prefix) => {
                return refuse(self, format!("the prefix {prefix:?} is not declared"));
            }
            _ => {}
        }
        match (parent, e.local.as_str()) {
            // Free-form; libvirt reads nothing in there.
            ("domain", "metadata" | "title" | "description") => {
                return Verdict {
                    skip_children: true,
                    ..Verdict::default()
                };
            }
            (_, "seclabel") => {
                return refuse(
                    self,
                    "a security label sets how the host confines QEMU (libvirt assigns one)".into(),
                );
            }
            ("devices", "hostdev") => return refuse(self, "passes a host device through".into()),
            ("devices", "filesystem") => {
                return refuse(self, "shares a host directory with the guest".into());
            }
            ("devices", "redirdev") => return refuse(self, "redirects a host USB device".into()),
            ("devices", "shmem") => return refuse(self, "maps host shared memory".into()),
            ("devices", "smartcard")
                if !(e.attr("mode") == Some("passthrough") && kind == "spicevmc") =>
            {
                return refuse(
                    self,
                    "uses the host's smartcard reader or certificates".into(),
                );
            }
            ("devices", "input") if matches!(kind, "passthrough" | "evdev") => {
                return refuse(self, "passes a host input device through".into());
            }
            ("tpm", "backend") if matches!(kind, "passthrough" | "external") => {
                return refuse(
                    self,
                    format!("a {kind:?} TPM uses the host's TPM or a host socket"),
                );
            }
            ("devices", "interface") if HOST_INTERFACES.contains(&kind) => {
                return refuse(
                    self,
                    format!("a {kind:?} interface reaches host network devices or sockets"),
                );
            }
            ("interface", "script" | "downscript") => {
                return refuse(self, "runs a host script".into());
            }
            ("interface", "portForward") => {
                return refuse(self, "opens host ports into the guest".into());
            }
            ("devices", "disk") if !matches!(kind, "file" | "") => {
                return refuse(
                    self,
                    format!("a {kind:?} disk reaches host storage; images carry only disk files"),
                );
            }
            (_, "backingStore") if parents.contains(&"disk") && e.elements().next().is_some() => {
                return refuse(
                    self,
                    "a backing chain in the XML names host storage (the chain is read from the image's files)"
                        .into(),
                );
            }
            ("disk", "mirror") => {
                return refuse(self, "a block-job mirror names host storage".into());
            }
            (_, "source") if parents.contains(&"disk") => {
                if let Some(file) = e.attr("file") {
                    v.attrs_judged.push("file");
                    if !self.allowed_file(file) {
                        self.flag(
                            here,
                            format!("disk file {file:?} is not a file of the image"),
                        );
                    }
                }
            }
            ("devices", chardev)
                if CHARDEVS.contains(&chardev) && !CHARDEV_TYPES.contains(&kind) =>
            {
                return refuse(
                    self,
                    format!("a {kind:?} character device reaches the host"),
                );
            }
            (chardev, "source") if CHARDEVS.contains(&chardev) => {
                if let Some(path) = e.attr("path") {
                    v.attrs_judged.push("path");
                    self.flag(
                        here,
                        format!("character device path {path:?} is on the host"),
                    );
                }
            }
            (chardev, "log") if CHARDEVS.contains(&chardev) => {
                return refuse(self, "writes a log file on the host".into());
            }
            ("rng", "backend") => {
                let model = e.attr("model").unwrap_or("random");
                if model == "egd" && !CHARDEV_TYPES.contains(&kind) {
                    return refuse(self, format!("a {kind:?} entropy source reaches the host"));
                }
                if model == "random" {
                    v.text_judged = true;
                    let text = e.text();
                    let source = text.trim();
                    if !matches!(source, "" | "/dev/random" | "/dev/urandom" | "/dev/hwrng") {
                        self.flag(
                            here,
                            format!("random source {source:?} is not a host random device"),
                        );
                    }
                }
            }
            ("devices", "audio") if !matches!(kind, "none" | "spice" | "") => {
                return refuse(
                    self,
                    format!("a {kind:?} audio backend reaches the host's sound devices or files"),
                );
            }
            ("memoryBacking", "source") if kind == "file" => {
                return refuse(self, "backs guest memory with a host file".into());
            }
            ("os", "kernel" | "initrd" | "dtb") => {
                v.text_judged = true;
                let text = e.text();
                if !text.trim().is_empty() {
                    self.flag(here, format!("boots the host file {:?}", text.trim()));
                }
            }
            ("domain", "bootloader" | "bootloader_args") => {
                return refuse(self, "runs a host program to boot the guest".into());
            }
            ("acpi", "table") if grandparent == "os" => {
                return refuse(self, "loads a host file as an ACPI table".into());
            }
            ("os", "loader") => {
                v.text_judged = true;
                let text = e.text();
                let path = text.trim();
                if !path.is_empty() && !under_usr_share(path) {
                    self.flag(
                        here,
                        format!("firmware {path:?} is not a packaged firmware under /usr/share/"),
                    );
                }
            }
            ("os", "nvram") => {
                v.text_judged = true;
                if !matches!(kind, "file" | "") {
                    return refuse(self, format!("a {kind:?} NVRAM reaches host storage"));
                }
                if let Some(template) = e.attr("template") {
                    v.attrs_judged.push("template");
                    if !under_usr_share(template) {
                        self.flag(
                            here,
                            format!("NVRAM template {template:?} is not under /usr/share/"),
                        );
                    }
                }
                let text = e.text();
                let path = text.trim();
                if !path.is_empty() && !self.allowed_file(path) {
                    self.flag(here, format!("NVRAM {path:?} is not a file of the image"));
                }
            }
            ("nvram", "source") if grandparent == "os" => {
                if let Some(file) = e.attr("file") {
                    v.attrs_judged.push("file");
                    if !self.allowed_file(file) {
                        self.flag(here, format!("NVRAM {file:?} is not a file of the image"));
                    }
                }
            }
            ("devices", "emulator") => {
                v.text_judged = true;
                let text = e.text();
                let path = text.trim();
                if !allowed_emulator(path) {
                    self.flag(
                        here,
                        format!("emulator {path:?} is not a QEMU system emulator"),
                    );
                }
            }
            ("devices", "graphics") => {
                if let Some(address) = e.attr("listen") {
                    v.attrs_judged.push("listen");
                    if !loopback(address) {
                        self.flag(
                            here,
                            format!("opens the console on {address:?}, beyond this host"),
                        );
                    }
                }
            }
            ("graphics", "listen") => {
                if kind == "network" {
                    self.flag(here, "opens the console on a network's address".into());
                }
                if let Some(address) = e.attr("address")
                    && !loopback(address)
                {
                    self.flag(
                        here,
                        format!("opens the console on {address:?}, beyond this host"),
                    );
                }
            }
            // A cgroup partition, and SMBIOS strings: not files.
            ("resource", "partition") => v.text_judged = true,
            _ if parents.contains(&"sysinfo") && e.attr("file").is_none() => v.text_judged = true,
            _ => {}
        }
        v
    }
}

/// The last line of defence, run on the XML as it will be defined (after
/// [`prepare_import`](crate::prepare_import)): every attribute that names a file,
/// socket or directory and every absolute path (attribute value or element text,
/// CDATA and references included, each element's text taken whole) must be one of
/// `own_files` (the imported files' absolute paths) or sit where a host path is
/// expected: packaged firmware under `/usr/share/` in `<loader>` and the NVRAM
/// `template`, a QEMU binary in `<emulator>`, a random device in the rng backend.
/// Whatever element carries it (a log file, an ACPI table, an nvdimm, a socket), any
/// other host path is refused. `<metadata>`, `<title>` and `<description>` are
/// not read by libvirt and not looked into.
pub fn check_host_paths(xml: &str, own_files: &[&str]) -> Result<(), UnsafeXml> {
    let doc = Document::parse(xml)?;
    let mut violations = Vec::new();
    let root = doc.root();
    host_paths(
        root,
        &mut Vec::new(),
        &mut Vec::new(),
        own_files,
        &mut violations,
    );
    if violations.is_empty() {
        Ok(())
    } else {
        Err(UnsafeXml { violations })
    }
}

fn host_paths<'e>(
    e: &'e Element,
    parents: &mut Vec<&'e str>,
    path: &mut Vec<&'e str>,
    own: &[&str],
    violations: &mut Vec<Violation>,
) {
    let parent = parents.last().copied().unwrap_or("");
    let here = || {
        if path.is_empty() {
            e.qname.clone()
        } else {
            path.join("/")
        }
    };
    if parent == "domain" && matches!(e.local.as_str(), "metadata" | "title" | "description") {
        return;
    }
    let own_file = |value: &str| !value.is_empty() && own.contains(&value);
    for a in e.attrs() {
        let value = a.value.trim();
        let path_like = PATH_ATTRS.contains(&a.local.as_str()) || value.starts_with('/');
        if value.is_empty() || !path_like || own_file(value) {
            continue;
        }
        let expected =
            parent == "os" && e.local == "nvram" && a.local == "template" && under_usr_share(value);
        if !expected {
            violations.push(Violation {
                element: here(),
                reason: format!("{}={value:?} names a host path", a.key),
            });
        }
    }
    let text = e.text();
    let text = text.trim();
    if text.starts_with('/') && !own_file(text) {
        let expected = match (parent, e.local.as_str()) {
            ("os", "loader") => under_usr_share(text),
            ("devices", "emulator") => allowed_emulator(text),
            ("rng", "backend") => matches!(text, "/dev/random" | "/dev/urandom" | "/dev/hwrng"),
            // A cgroup partition and SMBIOS strings: not files.
            ("resource", "partition") => true,
            _ => parents.contains(&"sysinfo"),
        };
        if !expected {
            violations.push(Violation {
                element: here(),
                reason: format!("names the host path {text:?}"),
            });
        }
    }
    parents.push(&e.local);
    for child in e.elements() {
        path.push(&child.qname);
        host_paths(child, parents, path, own, violations);
        path.pop();
    }
    parents.pop();
}
