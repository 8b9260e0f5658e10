//! # sarde-backend-libvirt
//!
//! The [`Hypervisor`] backend for libvirt, through the `virt` crate. One factory serves
//! the `qemu`, `xen`, `lxc` and `test` URI schemes (and their transport variants such
//! as `qemu+ssh`): libvirt itself picks the driver from the connection URI, so the
//! backend only connects and maps libvirt's answers and errors to sarde's types.
//!
//! Calls block, as libvirt's do. A [`virt::connect::Connect`] is thread-safe (libvirt
//! connections may be shared between threads and `virt` marks them `Send + Sync`), so
//! the handle needs no lock; the connection is closed when the handle is dropped.

use std::net::IpAddr;
use std::sync::{Arc, Once};

use sarde_api::hypervisor::{
    AddressSource, DomainState, DomainSummary, Hypervisor, HypervisorError, HypervisorFactory,
    InterfaceAddress,
};
use sarde_api::registry::{Registrar, RegistryError};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::enumutil::Enum;
use virt::error::{Error as VirtError, ErrorNumber};
use virt::sys;

/// The URI schemes (libvirt drivers) this backend serves.
pub const SCHEMES: [&str; 4] = ["qemu", "xen", "lxc", "test"];

/// Registers the libvirt hypervisor factory for [`SCHEMES`].
pub fn register(r: &mut dyn Registrar) -> Result<(), RegistryError> {
    r.register_hypervisor(Arc::new(LibvirtFactory))
}

/// Connects to libvirt for `qemu:`, `xen:`, `lxc:` and `test:` URIs.
#[derive(Debug, Default, Clone, Copy)]
pub struct LibvirtFactory;

impl HypervisorFactory for LibvirtFactory {
    fn schemes(&self) -> Vec<String> {
        SCHEMES.iter().map(|s| s.to_string()).collect()
    }

    fn description(&self) -> &str {
        "libvirt: QEMU/KVM, Xen, LXC and the test driver, chosen by the connection URI"
    }

    fn connect(&self, uri: &str) -> Result<Box<dyn Hypervisor>, HypervisorError> {
        Ok(Box::new(LibvirtHypervisor::connect(uri)?))
    }
}

/// An open libvirt connection.
#[derive(Debug)]
pub struct LibvirtHypervisor {
    uri: String,
    conn: Connect,
}

/// libvirt prints every error to stderr unless an error handler is set; sarde reports
/// errors itself, so install a silent one (once per process).
fn silence_libvirt_stderr() {
    static ONCE: Once = Once::new();
    ONCE.call_once(virt::error::clear_error_callback);
}

impl LibvirtHypervisor {
    /// Opens a connection to `uri` (`qemu:///system`, `qemu+ssh://host/system`,
    /// `test:///default`, ...).
    pub fn connect(uri: &str) -> Result<Self, HypervisorError> {
        silence_libvirt_stderr();
        let conn = Connect::open(Some(uri)).map_err(|e| {
            let mut message = e.message().to_string();
            if message.contains("Failed to connect socket") {
                message.push_str(
                    " (is the libvirt daemon running? start libvirtd, or virtqemud for qemu)",
                );
            }
            HypervisorError::Connect {
                uri: uri.to_string(),
                message,
            }
        })?;
        tracing::debug!(uri, "connected to libvirt");
        Ok(LibvirtHypervisor {
            uri: uri.to_string(),
            conn,
        })
    }

    /// The underlying `virt` connection, for what the trait does not cover.
    pub fn connection(&self) -> &Connect {
        &self.conn
    }

    /// Maps a libvirt error of `operation` (on domain `name`, if any).
    fn error(&self, operation: &str, name: Option<&str>, e: VirtError) -> HypervisorError {
        map_error(&self.uri, operation, name, &e)
    }

    fn lookup(&self, name: &str) -> Result<Domain, HypervisorError> {
        self.conn
            .lookup_domain_by_name(name)
            .map_err(|e| self.error("look up domain", Some(name), e))
    }

    /// Fails with `DomainExists` when the XML names a domain that exists already:
    /// libvirt would silently redefine (or, for a transient create, start) it.
    fn refuse_existing(&self, xml: &str) -> Result<(), HypervisorError> {
        match domain_name_from_xml(xml) {
            Some(name) if self.exists(&name)? => Err(HypervisorError::DomainExists {
                uri: self.uri.clone(),
                name,
            }),
            _ => Ok(()),
        }
    }
}

fn map_error(uri: &str, operation: &str, name: Option<&str>, e: &VirtError) -> HypervisorError {
    let code = e.code();
    let is = |n: ErrorNumber| code == Enum::Known(n);
    match name {
        Some(name) if is(ErrorNumber::NoDomain) => HypervisorError::NoSuchDomain {
            uri: uri.to_string(),
            name: name.to_string(),
        },
        // libvirt reports a name or UUID clash as VIR_ERR_DOM_EXIST or, from define
        // and create, as VIR_ERR_OPERATION_FAILED "domain '...' already exists ...".
        Some(name)
            if is(ErrorNumber::DomExist)
                || (is(ErrorNumber::OperationFailed) && e.message().contains("already exists")) =>
        {
            HypervisorError::DomainExists {
                uri: uri.to_string(),
                name: name.to_string(),
            }
        }
        _ => HypervisorError::Operation {
            uri: uri.to_string(),
            operation: match name {
                Some(name) => format!("{operation} {name:?}"),
                None => operation.to_string(),
            },
            message: e.message().to_string(),
        },
    }
}

/// `major * 1_000_000 + minor * 1_000 + release` as `major.minor.release`.
fn format_version(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1_000) % 1_000, v % 1_000)
}

fn map_state(state: virt::domain::DomainStateEnum) -> DomainState {
    use virt::domain::DomainState as S;
    match state {
        Enum::Known(S::Running | S::Blocked) => DomainState::Running,
        Enum::Known(S::Paused | S::PMSuspended) => DomainState::Paused,
        Enum::Known(S::Shutoff) => DomainState::Stopped,
        Enum::Known(S::Crashed) => DomainState::Crashed,
        // Shutdown is "being shut down", still running but on its way out.
        Enum::Known(S::Shutdown | S::NoState) | Enum::Unknown(_) => DomainState::Other,
    }
}

impl LibvirtHypervisor {
    fn domain_state(&self, dom: &Domain, name: &str) -> Result<DomainState, HypervisorError> {
        let (state, _reason) = dom
            .state()
            .map_err(|e| self.error("get state of", Some(name), e))?;
        // virt 0.5 ignores a failing virDomainGetState and hands back the untouched -1.
        if state == Enum::Unknown(u32::MAX) {
            return Err(self.error("get state of", Some(name), VirtError::last_error()));
        }
        Ok(map_state(state))
    }
}

impl Hypervisor for LibvirtHypervisor {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn version(&self) -> Result<String, HypervisorError> {
        let driver = self
            .conn
            .driver_type()
            .map_err(|e| self.error("get driver type", None, e))?;
        let hv = self
            .conn
            .hyp_version()
            .map_err(|e| self.error("get hypervisor version", None, e))?;
        let lib = self
            .conn
            .lib_version()
            .map_err(|e| self.error("get libvirt version", None, e))?;
        Ok(format!(
            "{driver} {} (libvirt {})",
            format_version(hv),
            format_version(lib)
        ))
    }

    fn list_domains(&self) -> Result<Vec<DomainSummary>, HypervisorError> {
        let domains = self
            .conn
            .list_all_domains(0)
            .map_err(|e| self.error("list domains", None, e))?;
        let mut out = Vec::with_capacity(domains.len());
        for dom in domains {
            let name = dom
                .name()
                .map_err(|e| self.error("get domain name", None, e))?;
            let summary = (|| -> Result<DomainSummary, VirtError> {
                Ok(DomainSummary {
                    uuid: dom.uuid_string()?,
                    persistent: dom.is_persistent()?,
                    state: DomainState::Other,
                    name: name.clone(),
                })
            })();
            let mut summary = match summary {
                Ok(s) => s,
                // Gone between listing and asking: skip it.
                Err(e) if e.code() == Enum::Known(ErrorNumber::NoDomain) => continue,
                Err(e) => return Err(self.error("describe domain", Some(&name), e)),
            };
            summary.state = match self.domain_state(&dom, &name) {
                Ok(state) => state,
                Err(HypervisorError::NoSuchDomain { .. }) => continue,
                Err(e) => return Err(e),
            };
            out.push(summary);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn exists(&self, name: &str) -> Result<bool, HypervisorError> {
        match self.lookup(name) {
            Ok(_) => Ok(true),
            Err(HypervisorError::NoSuchDomain { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn domain_xml(&self, name: &str, inactive: bool) -> Result<String, HypervisorError> {
        let dom = self.lookup(name)?;
        // Not VIR_DOMAIN_XML_SECURE: passwords (VNC, SPICE) stay out of exports.
        let flags = if inactive {
            sys::VIR_DOMAIN_XML_INACTIVE
        } else {
            0
        };
        dom.xml_desc(flags)
            .map_err(|e| self.error("get XML of domain", Some(name), e))
    }

    fn define(&self, xml: &str) -> Result<String, HypervisorError> {
        self.refuse_existing(xml)?;
        let hint = domain_name_from_xml(xml);
        let dom = self
            .conn
            .define_domain_xml(xml)
            .map_err(|e| self.error("define domain", hint.as_deref(), e))?;
        let name = dom
            .name()
            .map_err(|e| self.error("get name of defined domain", hint.as_deref(), e))?;
        tracing::debug!(uri = %self.uri, name, "defined domain");
        Ok(name)
    }

    fn undefine(&self, name: &str) -> Result<(), HypervisorError> {
        let dom = self.lookup(name)?;
        // Drivers differ here (qemu refuses, test quietly succeeds): refuse uniformly.
        let persistent = dom
            .is_persistent()
            .map_err(|e| self.error("undefine domain", Some(name), e))?;
        if !persistent {
            return Err(HypervisorError::Operation {
                uri: self.uri.clone(),
                operation: format!("undefine domain {name:?}"),
                message: "the domain is transient and has no definition to remove; \
                          destroy it to make it go away"
                    .to_string(),
            });
        }
        // Remove NVRAM (UEFI variables) and a managed-save image with the definition;
        // disks stay. Drivers without NVRAM support (test, lxc) refuse the flag.
        let with_nvram = sys::VIR_DOMAIN_UNDEFINE_NVRAM | sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE;
        match dom.undefine_flags(with_nvram) {
            Ok(()) => Ok(()),
            Err(e)
                if e.code() == Enum::Known(ErrorNumber::InvalidArg)
                    || e.code() == Enum::Known(ErrorNumber::NoSupport)
                    || e.code() == Enum::Known(ErrorNumber::OperationUnsupported) =>
            {
                tracing::debug!(uri = %self.uri, name, error = %e, "undefine without NVRAM flag");
                dom.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
                    .or_else(|_| dom.undefine())
                    .map_err(|e| self.error("undefine domain", Some(name), e))
            }
            Err(e) => Err(self.error("undefine domain", Some(name), e)),
        }
    }

    fn state(&self, name: &str) -> Result<DomainState, HypervisorError> {
        let dom = self.lookup(name)?;
        self.domain_state(&dom, name)
    }

    fn start(&self, name: &str) -> Result<(), HypervisorError> {
        let dom = self.lookup(name)?;
        dom.create()
            .map_err(|e| self.error("start domain", Some(name), e))
    }

    fn create_transient(&self, xml: &str) -> Result<String, HypervisorError> {
        self.refuse_existing(xml)?;
        let hint = domain_name_from_xml(xml);
        let dom = self
            .conn
            .create_domain_xml(xml, 0)
            .map_err(|e| self.error("create transient domain", hint.as_deref(), e))?;
        dom.name()
            .map_err(|e| self.error("get name of created domain", hint.as_deref(), e))
    }

    fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        let dom = self.lookup(name)?;
        dom.destroy()
            .map_err(|e| self.error("destroy domain", Some(name), e))
    }

    fn interface_addresses(
        &self,
        name: &str,
        source: AddressSource,
    ) -> Result<Vec<InterfaceAddress>, HypervisorError> {
        let dom = self.lookup(name)?;
        let (src, what) = match source {
            AddressSource::Lease => (sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, "lease"),
            AddressSource::Agent => (sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, "agent"),
            AddressSource::Arp => (sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP, "arp"),
        };
        let interfaces = dom.interface_addresses(src, 0).map_err(|e| {
            self.error(
                &format!("get interface addresses ({what}) of"),
                Some(name),
                e,
            )
        })?;
        let mut out = Vec::new();
        for iface in interfaces {
            for addr in iface.addrs {
                let Ok(address) = addr.addr.parse::<IpAddr>() else {
                    tracing::warn!(name, address = addr.addr, "ignoring unparsable address");
                    continue;
                };
                out.push(InterfaceAddress {
                    interface: iface.name.clone(),
                    mac: iface.hwaddr.clone().filter(|m| !m.is_empty()),
                    address,
                    prefix: u8::try_from(addr.prefix).unwrap_or(u8::MAX),
                });
            }
        }
        Ok(out)
    }
}

/// The text of the `<name>` element directly under the root `<domain>` of a domain XML,
/// or `None` when there is none or the XML cannot be scanned (libvirt then reports
/// the problem). A small scanner: comments, processing instructions, CDATA and quoted
/// attribute values are skipped correctly; entities in the name are decoded.
pub fn domain_name_from_xml(xml: &str) -> Option<String> {
    let mut depth = 0usize;
    let mut rest = xml;
    loop {
        rest = &rest[rest.find('<')?..];
        let skip_to = |end: &str| rest.find(end).map(|i| i + end.len());
        if rest.starts_with("<!--") {
            rest = &rest[skip_to("-->")?..];
            continue;
        }
        if rest.starts_with("<![CDATA[") {
            rest = &rest[skip_to("]]>")?..];
            continue;
        }
        if rest.starts_with("<?") {
            rest = &rest[skip_to("?>")?..];
            continue;
        }
        if rest.starts_with("<!") {
            rest = &rest[skip_to(">")?..];
            continue;
        }
        // An element tag: find its '>' outside quoted attribute values.
        let mut quote = None;
        let end = rest.char_indices().skip(1).find_map(|(i, c)| {
            match (quote, c) {
                (None, '"' | '\'') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (None, '>') => return Some(i),
                _ => {}
            }
            None
        })?;
        let tag = &rest[1..end];
        rest = &rest[end + 1..];
        if tag.starts_with('/') {
            depth = depth.checked_sub(1)?;
            continue;
        }
        let self_closing = tag.ends_with('/');
        let tag_name = tag
            .split(|c: char| c.is_whitespace() || c == '/')
            .next()
            .unwrap_or_default();
        if depth == 1 && tag_name == "name" {
            if self_closing {
                return Some(String::new());
            }
            let text = &rest[..rest.find('<')?];
            return Some(decode_entities(text));
        }
        if !self_closing {
            depth += 1;
        }
    }
}

fn decode_entities(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let Some(semi) = rest.find(';') else { break };
        let entity = &rest[1..semi];
        let decoded = match entity {
            "lt" => Some('<'),
            "gt" => Some('>'),
            "amp" => Some('&'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .map(|hex| u32::from_str_radix(hex, 16))
                .or_else(|| entity.strip_prefix('#').map(str::parse))
                .and_then(Result::ok)
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_numbers_are_formatted() {
        assert_eq!(format_version(7_002_000), "7.2.0");
        assert_eq!(format_version(9_000_000), "9.0.0");
        assert_eq!(format_version(10_010_003), "10.10.3");
        assert_eq!(format_version(2), "0.0.2");
    }

    #[test]
    fn name_is_found_only_directly_under_the_root() {
        let xml = r#"<?xml version="1.0"?>
<!-- <name>comment</name> -->
<domain type='qemu' xmlns:x="urn:x">
  <metadata><x:app><name>inner</name></x:app></metadata>
  <title a="<name>">t</title>
  <empty/>
  <name>vm&amp;1</name>
  <devices><name>late</name></devices>
</domain>"#;
        assert_eq!(domain_name_from_xml(xml).as_deref(), Some("vm&1"));
        assert_eq!(
            domain_name_from_xml("<domain><uuid>x</uuid><name>a&#x41;&#66;</name></domain>")
                .as_deref(),
            Some("aAB")
        );
        assert_eq!(
            domain_name_from_xml("<domain><memory>1</memory></domain>"),
            None
        );
        assert_eq!(domain_name_from_xml("not xml"), None);
        assert_eq!(domain_name_from_xml("<domain><name>unterminated"), None);
    }

    #[test]
    fn entities_are_decoded_and_bad_ones_kept() {
        assert_eq!(decode_entities("a&lt;b&gt;&quot;&apos;"), "a<b>\"'");
        assert_eq!(decode_entities("&bogus; & &#xZZ;"), "&bogus; & &#xZZ;");
    }

    #[test]
    fn states_are_reduced() {
        use virt::domain::DomainState as S;
        assert_eq!(map_state(Enum::Known(S::Running)), DomainState::Running);
        assert_eq!(map_state(Enum::Known(S::Blocked)), DomainState::Running);
        assert_eq!(map_state(Enum::Known(S::Paused)), DomainState::Paused);
        assert_eq!(map_state(Enum::Known(S::PMSuspended)), DomainState::Paused);
        assert_eq!(map_state(Enum::Known(S::Shutoff)), DomainState::Stopped);
        assert_eq!(map_state(Enum::Known(S::Crashed)), DomainState::Crashed);
        assert_eq!(map_state(Enum::Known(S::Shutdown)), DomainState::Other);
        assert_eq!(map_state(Enum::Unknown(99)), DomainState::Other);
    }

    #[test]
    fn factory_serves_the_libvirt_schemes() {
        let f = LibvirtFactory;
        assert_eq!(f.schemes(), ["qemu", "xen", "lxc", "test"]);
        assert!(!f.description().is_empty());
    }

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn handle_is_send_and_sync() {
        assert_send_sync::<LibvirtHypervisor>();
        assert_send_sync::<LibvirtFactory>();
    }
}
