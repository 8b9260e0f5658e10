//! What domain XML from an untrusted image may not do: reach outside the VM.
//!
//! Every element is checked against the rules below; all violations are collected so
//! the user sees the whole list at once. `--allow-unsafe-xml` imports such XML anyway.

use std::fmt;

use quick_xml::NsReader;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::{Namespace, ResolveResult};

use crate::events::{attr, local};
use crate::{DomainError, MAX_XML_SIZE};

/// The namespace of QEMU pass-through (`qemu:commandline`, `qemu:capabilities`…).
const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// Emulators an image may name.
const EMULATORS: &[&str] = &["/usr/libexec/qemu-kvm", "/usr/bin/kvm"];

/// One thing the XML does that an image may not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Where, as `domain/devices/hostdev`.
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
        write!(
            f,
            "the image's domain XML reaches outside the VM ({} problem{}):",
            self.violations.len(),
            if self.violations.len() == 1 { "" } else { "s" }
        )?;
        for v in &self.violations {
            write!(f, "\n  - <{}>: {}", v.element, v.reason)?;
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
/// carries; disks and NVRAM may only name those.
pub fn check_untrusted(xml: &str, allowed_files: &[&str]) -> Result<(), UnsafeXml> {
    if xml.len() > MAX_XML_SIZE {
        return Err(DomainError::TooLarge(xml.len()).into());
    }
    let mut reader = NsReader::from_str(xml);
    reader.config_mut().check_end_names = true;
    let mut path: Vec<String> = Vec::new();
    let mut text_owner: Option<String> = None;
    let mut violations = Vec::new();
    loop {
        let position = reader.buffer_position();
        let (ns, event) = match reader.read_resolved_event() {
            Ok((ns, event)) => (
                matches!(ns, ResolveResult::Bound(Namespace(n)) if n == QEMU_NS),
                event,
            ),
            Err(e) => return Err(DomainError::Parse(format!("{e} (at byte {position})")).into()),
        };
        match event {
            Event::Eof => break,
            Event::DocType(_) => return Err(DomainError::Doctype.into()),
            Event::Start(ref e) | Event::Empty(ref e) => {
                let name = local(e);
                let here = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{}/{name}", path.join("/"))
                };
                let mut flag = |reason: String| {
                    violations.push(Violation {
                        element: here.clone(),
                        reason,
                    })
                };
                if ns {
                    flag("QEMU pass-through runs arbitrary QEMU options on the host".into());
                }
                check_element(&path, &name, e, allowed_files, &mut flag);
                if matches!(event, Event::Start(_)) {
                    path.push(name.clone());
                    text_owner = Some(name);
                }
            }
            Event::End(_) => {
                path.pop();
                text_owner = None;
            }
            Event::Text(ref t) => {
                let text = t.xml10_content();
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                let in_os = path.len() >= 2 && path[path.len() - 2] == "os";
                let here = path.join("/");
                let mut flag = |reason: String| {
                    violations.push(Violation {
                        element: here.clone(),
                        reason,
                    })
                };
                match text_owner.as_deref() {
                    Some("loader") if in_os && !text.starts_with("/usr/share/") => {
                        flag(format!("firmware {text:?} is not under /usr/share/"))
                    }
                    Some("nvram") if in_os && !allowed_files.contains(&text) => {
                        flag(format!("NVRAM {text:?} is not a file of the image"))
                    }
                    Some("kernel" | "initrd" | "dtb") if in_os => {
                        flag(format!("boots the host file {text:?}"))
                    }
                    Some("emulator") if !allowed_emulator(text) => {
                        flag(format!("emulator {text:?} is not a QEMU system emulator"))
                    }
                    // A random-number device may read the host's random sources only.
                    Some("backend")
                        if path.len() >= 2
                            && path[path.len() - 2] == "rng"
                            && !matches!(text, "/dev/random" | "/dev/urandom" | "/dev/hwrng") =>
                    {
                        flag(format!(
                            "random source {text:?} is not a host random device"
                        ))
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(UnsafeXml { violations })
    }
}

fn allowed_emulator(path: &str) -> bool {
    EMULATORS.contains(&path)
        || path
            .strip_prefix("/usr/bin/qemu-system-")
            .is_some_and(|arch| {
                !arch.is_empty() && arch.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            })
}

fn check_element(
    path: &[String],
    name: &str,
    e: &BytesStart<'_>,
    allowed_files: &[&str],
    flag: &mut dyn FnMut(String),
) {
    let parent = path.last().map(String::as_str);
    let kind = attr(e, "type").unwrap_or_default();
    match (parent, name) {
        (Some("devices"), "hostdev") => flag("passes a host device through".into()),
        (Some("devices"), "filesystem") => flag("shares a host directory with the guest".into()),
        (Some("devices"), "redirdev") => flag("redirects a host USB device".into()),
        (Some("devices"), "shmem") => flag("maps host shared memory".into()),
        (Some("devices"), "smartcard")
            if attr(e, "mode").as_deref() != Some("passthrough") || kind != "spicevmc" =>
        {
            flag("uses the host's smartcard reader or certificates".into())
        }
        (Some("devices"), "input") if kind == "passthrough" || kind == "evdev" => {
            flag("passes a host input device through".into())
        }
        (Some("tpm"), "backend") if kind == "passthrough" => {
            flag("passes the host TPM through".into())
        }
        (_, "seclabel") => {
            flag("sets its own security label (sarde strips these on export)".into())
        }
        (Some("devices"), "interface")
            if matches!(
                kind.as_str(),
                "direct" | "hostdev" | "vhostuser" | "ethernet" | "vdpa"
            ) =>
        {
            flag(format!("a {kind:?} interface reaches host network devices"))
        }
        (Some("devices"), "disk") if !matches!(kind.as_str(), "file" | "") => {
            flag(format!("a {kind:?} disk reaches host storage"))
        }
        (Some("disk"), "source") => {
            for key in ["dev", "dir", "pool", "volume", "protocol", "name"] {
                if attr(e, key).is_some() {
                    flag(format!("disk source {key}= reaches host storage"));
                }
            }
            if let Some(file) = attr(e, "file") {
                if !allowed_files.contains(&file.as_str()) {
                    flag(format!("disk file {file:?} is not a file of the image"));
                }
            }
        }
        (Some("devices"), "serial" | "console" | "channel" | "parallel")
            if !matches!(
                kind.as_str(),
                "pty" | "spicevmc" | "spiceport" | "qemu-vdagent" | "null" | "vc" | "unix" | ""
            ) =>
        {
            flag(format!("a {kind:?} character device reaches the host"))
        }
        (Some("serial" | "console" | "channel" | "parallel"), "source") => {
            if let Some(p) = attr(e, "path") {
                flag(format!("character device path {p:?} is on the host"));
            }
        }
        (Some("memoryBacking"), "source") if kind == "file" => {
            flag("backs guest memory with a host file".into())
        }
        (Some("os"), "nvram") => {
            if let Some(template) = attr(e, "template") {
                if !template.starts_with("/usr/share/") {
                    flag(format!(
                        "NVRAM template {template:?} is not under /usr/share/"
                    ));
                }
            }
        }
        _ => {}
    }
}

/// Host paths an imported domain may name besides its own files.
fn allowed_host_path(path: &str) -> bool {
    // `..` or `.` components would escape any prefix rule.
    if path.split('/').any(|c| c == ".." || c == ".") {
        return false;
    }
    path.starts_with("/usr/share/")
        || allowed_emulator(path)
        || matches!(path, "/dev/random" | "/dev/urandom" | "/dev/hwrng")
}

/// The last line of defence, run on the XML as it will be defined: every attribute
/// value and every piece of text (CDATA and character references included, each
/// element's text taken whole) that is an absolute path must be one of `own_files`
/// or an allowed host path (firmware and templates under /usr/share, the QEMU
/// emulator, random devices). Whatever element or attribute carries it — a log
/// file, an ACPI table, an nvdimm, a socket — a host path is refused.
pub fn check_host_paths(xml: &str, own_files: &[&str]) -> Result<(), UnsafeXml> {
    if xml.len() > MAX_XML_SIZE {
        return Err(DomainError::TooLarge(xml.len()).into());
    }
    let mut reader = quick_xml::Reader::from_str(xml);
    reader.config_mut().check_end_names = true;
    let mut path: Vec<String> = Vec::new();
    // Text of each open element, gathered across children, CDATA and references.
    let mut texts: Vec<String> = Vec::new();
    let mut violations = Vec::new();
    let check = |element: String, value: &str, violations: &mut Vec<Violation>| {
        let value = value.trim();
        if value.starts_with('/') && !own_files.contains(&value) && !allowed_host_path(value) {
            violations.push(Violation {
                element,
                reason: format!("names the host path {value:?}"),
            });
        }
    };
    loop {
        let position = reader.buffer_position();
        let event = reader
            .read_event()
            .map_err(|e| DomainError::Parse(format!("{e} (at byte {position})")))?;
        match event {
            Event::Eof => break,
            Event::DocType(_) => return Err(DomainError::Doctype.into()),
            Event::Start(ref e) | Event::Empty(ref e) => {
                let name = local(e);
                let here = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{}/{name}", path.join("/"))
                };
                for a in e.attributes() {
                    let a = a.map_err(|e| DomainError::Parse(e.to_string()))?;
                    let value = a
                        .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                        .map_err(|e| DomainError::Parse(e.to_string()))?;
                    check(
                        format!("{here} {}=", a.key.as_ref()),
                        &value,
                        &mut violations,
                    );
                }
                if matches!(event, Event::Start(_)) {
                    path.push(name);
                    texts.push(String::new());
                }
            }
            Event::End(_) => {
                let here = path.join("/");
                path.pop();
                if let Some(text) = texts.pop() {
                    check(here, &text, &mut violations);
                }
            }
            Event::Text(ref t) => {
                if let Some(text) = texts.last_mut() {
                    text.push_str(&t.xml10_content());
                }
            }
            Event::CData(ref t) => {
                if let Some(text) = texts.last_mut() {
                    text.push_str(&t.clone().into_inner());
                }
            }
            Event::GeneralRef(ref r) => {
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    _ => quick_xml::escape::resolve_predefined_entity(r.as_ref())
                        .unwrap_or("?")
                        .to_string(),
                };
                if let Some(text) = texts.last_mut() {
                    text.push_str(&resolved);
                }
            }
            _ => {}
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(UnsafeXml { violations })
    }
}
