//! The `Hypervisor` extension point: where VMs are defined and run.
//!
//! Modelled on libvirt's driver table: the connection URI's scheme (`qemu`, `xen`,
//! `lxc`, `test`) picks a factory, which connects and returns one handle with the
//! same entry points for every driver. Calls block (libvirt's API does); async
//! callers run them on a blocking thread.

use std::net::IpAddr;

use thiserror::Error;

/// What went wrong talking to the hypervisor.
#[derive(Debug, Error)]
pub enum HypervisorError {
    #[error("cannot connect to {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("{uri}: no domain named {name:?}")]
    NoSuchDomain { uri: String, name: String },
    #[error("{uri}: domain {name:?} already exists")]
    DomainExists { uri: String, name: String },
    #[error("{uri}: {operation} failed: {message}")]
    Operation {
        uri: String,
        operation: String,
        message: String,
    },
}

/// The run state of a domain, reduced to what sarde acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainState {
    Running,
    Paused,
    Stopped,
    Crashed,
    Other,
}

/// A domain as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSummary {
    pub name: String,
    pub uuid: String,
    pub state: DomainState,
    pub persistent: bool,
}

/// Where to learn a guest's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressSource {
    /// The DHCP lease of the hypervisor's network.
    Lease,
    /// The guest agent inside the VM.
    Agent,
    /// The host's neighbour (ARP) table.
    Arp,
}

/// One address of one guest interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub interface: String,
    pub mac: Option<String>,
    pub address: IpAddr,
    pub prefix: u8,
}

/// How a domain is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// Start a defined (persistent) domain.
    Persistent,
    /// Create and start a transient domain from XML; it disappears when stopped.
    Transient,
}

/// A connection to one hypervisor.
pub trait Hypervisor: Send + Sync {
    /// The connection URI as given.
    fn uri(&self) -> &str;

    /// The driver's name and version, e.g. `QEMU 7.2.0 (libvirt 9.0.0)`.
    fn version(&self) -> Result<String, HypervisorError>;

    /// All domains, persistent and transient.
    fn list_domains(&self) -> Result<Vec<DomainSummary>, HypervisorError>;

    /// Whether a domain of that name exists.
    fn exists(&self, name: &str) -> Result<bool, HypervisorError>;

    /// The domain's XML as the hypervisor describes it (inactive config when
    /// `inactive`, which is what export wants). Secrets such as VNC passwords are
    /// left out.
    fn domain_xml(&self, name: &str, inactive: bool) -> Result<String, HypervisorError>;

    /// Defines a persistent domain; returns its name. Fails with
    /// [`HypervisorError::DomainExists`] when a domain of that name exists: it never
    /// redefines (libvirt's define would silently replace the configuration).
    fn define(&self, xml: &str) -> Result<String, HypervisorError>;

    /// Removes a domain's definition (and its NVRAM and managed-save image), leaving
    /// disks alone. A running persistent domain keeps running as a transient one; a
    /// transient domain has no definition and is an error (destroy it instead).
    fn undefine(&self, name: &str) -> Result<(), HypervisorError>;

    fn state(&self, name: &str) -> Result<DomainState, HypervisorError>;

    /// Starts a defined domain.
    fn start(&self, name: &str) -> Result<(), HypervisorError>;

    /// Creates and starts a transient domain; returns its name. Fails with
    /// [`HypervisorError::DomainExists`] when a domain of that name exists.
    fn create_transient(&self, xml: &str) -> Result<String, HypervisorError>;

    /// Stops a domain at once (power off). A domain that is not running is an
    /// error; a transient domain disappears.
    fn destroy(&self, name: &str) -> Result<(), HypervisorError>;

    /// The guest's addresses from the given source.
    fn interface_addresses(
        &self,
        name: &str,
        source: AddressSource,
    ) -> Result<Vec<InterfaceAddress>, HypervisorError>;
}

/// Connects to hypervisors whose URI starts with one of `schemes()`.
pub trait HypervisorFactory: Send + Sync {
    /// URI schemes this factory serves (`qemu`, `xen`, `lxc`, `test`). A scheme with a
    /// transport suffix (`qemu+ssh`) matches by the part before `+`.
    fn schemes(&self) -> Vec<String>;

    /// One line for `sarde plugins`.
    fn description(&self) -> &str;

    fn connect(&self, uri: &str) -> Result<Box<dyn Hypervisor>, HypervisorError>;
}
