//! Against libvirt's built-in `test:///default` driver: no daemon needed. The driver's
//! state is shared by all connections of this process, so every test uses its own
//! domain names, and only `predefined_domain_lifecycle` changes the predefined
//! domain "test".

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use sarde_api::hypervisor::{AddressSource, DomainState, Hypervisor, HypervisorError};
use sarde_api::registry::{Origin, Registrar, Registry};
use sarde_backend_libvirt::{LibvirtFactory, LibvirtHypervisor, domain_name_from_xml, register};

const URI: &str = "test:///default";

fn connect() -> LibvirtHypervisor {
    LibvirtHypervisor::connect(URI).expect("test:///default needs no daemon")
}

/// A domain name unique in this process.
fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "sarde-{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn domain_xml(name: &str) -> String {
    format!(
        "<domain type='test'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='default'/>
    </interface>
  </devices>
</domain>"
    )
}

#[test]
fn version_names_the_test_driver_and_libvirt() {
    let h = connect();
    let v = h.version().unwrap();
    assert!(v.starts_with("TEST "), "{v}");
    assert!(v.contains("(libvirt "), "{v}");
    assert_eq!(h.uri(), URI);
}

#[test]
fn lists_the_predefined_domain() {
    let h = connect();
    let domains = h.list_domains().unwrap();
    let test = domains
        .iter()
        .find(|d| d.name == "test")
        .expect("the predefined domain");
    assert!(test.persistent);
    assert_eq!(test.uuid.len(), 36, "{}", test.uuid);
    assert!(h.exists("test").unwrap());
    assert!(!h.exists(&unique("absent")).unwrap());
}

#[test]
fn xml_of_the_predefined_domain() {
    let h = connect();
    let xml = h.domain_xml("test", true).unwrap();
    assert!(xml.contains("<name>test</name>"), "{xml}");
    assert_eq!(domain_name_from_xml(&xml).as_deref(), Some("test"));
    let live = h.domain_xml("test", false).unwrap();
    assert!(live.contains("<domain"), "{live}");
}

#[test]
fn predefined_domain_lifecycle() {
    let h = connect();
    if h.state("test").unwrap() != DomainState::Running {
        h.start("test").unwrap();
    }
    assert_eq!(h.state("test").unwrap(), DomainState::Running);
    // The test driver answers every source with made-up addresses.
    for source in [
        AddressSource::Lease,
        AddressSource::Agent,
        AddressSource::Arp,
    ] {
        let addrs = h.interface_addresses("test", source).unwrap();
        assert!(!addrs.is_empty(), "{source:?}");
        for a in &addrs {
            assert!(!a.interface.is_empty(), "{a:?}");
            assert!(a.mac.is_some(), "{a:?}");
            assert!(a.prefix <= 32 || a.address.is_ipv6(), "{a:?}");
        }
    }
    h.destroy("test").unwrap();
    assert_eq!(h.state("test").unwrap(), DomainState::Stopped);
    // Destroying a stopped domain is an error that names the operation.
    let err = h.destroy("test").unwrap_err();
    assert!(
        matches!(&err, HypervisorError::Operation { operation, .. } if operation.contains("destroy")),
        "{err:?}"
    );
    h.start("test").unwrap();
    assert_eq!(h.state("test").unwrap(), DomainState::Running);
}

#[test]
fn define_start_destroy_undefine() {
    let h = connect();
    let name = unique("define");
    assert_eq!(h.define(&domain_xml(&name)).unwrap(), name);
    assert!(h.exists(&name).unwrap());
    assert_eq!(h.state(&name).unwrap(), DomainState::Stopped);
    let summary = h
        .list_domains()
        .unwrap()
        .into_iter()
        .find(|d| d.name == name)
        .unwrap();
    assert!(summary.persistent);
    assert_eq!(summary.state, DomainState::Stopped);

    let xml = h.domain_xml(&name, true).unwrap();
    assert!(xml.contains(&format!("<name>{name}</name>")), "{xml}");
    assert!(xml.contains("52:54:00:12:34:56"), "{xml}");

    h.start(&name).unwrap();
    assert_eq!(h.state(&name).unwrap(), DomainState::Running);
    // Starting twice fails.
    assert!(h.start(&name).is_err());
    let addrs = h.interface_addresses(&name, AddressSource::Lease).unwrap();
    assert!(!addrs.is_empty());
    for a in &addrs {
        assert_eq!(a.mac.as_deref(), Some("52:54:00:12:34:56"));
    }
    h.destroy(&name).unwrap();
    assert_eq!(h.state(&name).unwrap(), DomainState::Stopped);

    h.undefine(&name).unwrap();
    assert!(!h.exists(&name).unwrap());
    assert!(matches!(
        h.undefine(&name),
        Err(HypervisorError::NoSuchDomain { .. })
    ));
}

#[test]
fn undefining_a_running_domain_leaves_it_transient() {
    let h = connect();
    let name = unique("running");
    h.define(&domain_xml(&name)).unwrap();
    h.start(&name).unwrap();
    h.undefine(&name).unwrap();
    let summary = h
        .list_domains()
        .unwrap()
        .into_iter()
        .find(|d| d.name == name)
        .expect("still running");
    assert!(!summary.persistent);
    assert_eq!(summary.state, DomainState::Running);
    h.destroy(&name).unwrap();
    assert!(!h.exists(&name).unwrap());
}

#[test]
fn transient_domains_vanish_when_destroyed() {
    let h = connect();
    let name = unique("transient");
    assert_eq!(h.create_transient(&domain_xml(&name)).unwrap(), name);
    assert_eq!(h.state(&name).unwrap(), DomainState::Running);
    let summary = h
        .list_domains()
        .unwrap()
        .into_iter()
        .find(|d| d.name == name)
        .unwrap();
    assert!(!summary.persistent);
    // A transient domain has no definition to remove.
    let err = h.undefine(&name).unwrap_err();
    assert!(
        matches!(&err, HypervisorError::Operation { message, .. } if message.contains("transient")),
        "{err:?}"
    );
    assert_eq!(h.state(&name).unwrap(), DomainState::Running);
    h.destroy(&name).unwrap();
    assert!(!h.exists(&name).unwrap());
}

#[test]
fn duplicate_define_is_refused() {
    let h = connect();
    let name = unique("dup");
    h.define(&domain_xml(&name)).unwrap();
    // Same name (libvirt would redefine it silently): refused.
    let err = h.define(&domain_xml(&name)).unwrap_err();
    assert!(
        matches!(&err, HypervisorError::DomainExists { name: n, uri } if *n == name && uri == URI),
        "{err:?}"
    );
    assert!(err.to_string().contains("already exists"), "{err}");
    // Same for a transient domain of that name.
    let err = h.create_transient(&domain_xml(&name)).unwrap_err();
    assert!(
        matches!(err, HypervisorError::DomainExists { .. }),
        "{err:?}"
    );
    // And for the predefined domain.
    let err = h.define(&domain_xml("test")).unwrap_err();
    assert!(
        matches!(err, HypervisorError::DomainExists { .. }),
        "{err:?}"
    );
    // The existing definition is untouched.
    assert_eq!(h.state(&name).unwrap(), DomainState::Stopped);
    h.undefine(&name).unwrap();
}

#[test]
fn uuid_clash_under_another_name_is_refused() {
    let h = connect();
    let a = unique("uuid-a");
    let b = unique("uuid-b");
    let uuid = "6a1c2a34-0b8b-4e0c-9a57-5f3b8a6f0d11";
    let with_uuid = |name: &str| {
        domain_xml(name).replace("<memory", &format!("<uuid>{uuid}</uuid>\n  <memory"))
    };
    h.define(&with_uuid(&a)).unwrap();
    // Not DomainExists: the clash is with another name, which libvirt's message gives.
    let err = h.define(&with_uuid(&b)).unwrap_err();
    assert!(
        matches!(&err, HypervisorError::Operation { message, .. } if message.contains(&a)),
        "{err:?}"
    );
    assert!(!h.exists(&b).unwrap());
    h.undefine(&a).unwrap();
}

#[test]
fn unknown_domains_are_reported_as_such() {
    let h = connect();
    let name = unique("missing");
    let checks: Vec<(&str, Result<(), HypervisorError>)> = vec![
        ("state", h.state(&name).map(drop)),
        ("xml", h.domain_xml(&name, true).map(drop)),
        ("start", h.start(&name)),
        ("destroy", h.destroy(&name)),
        ("undefine", h.undefine(&name)),
        (
            "addresses",
            h.interface_addresses(&name, AddressSource::Agent).map(drop),
        ),
    ];
    for (what, result) in checks {
        match result {
            Err(HypervisorError::NoSuchDomain { uri, name: n }) => {
                assert_eq!(uri, URI, "{what}");
                assert_eq!(n, name, "{what}");
            }
            other => panic!("{what}: expected NoSuchDomain, got {other:?}"),
        }
    }
    let err = h.state(&name).unwrap_err().to_string();
    assert_eq!(err, format!("{URI}: no domain named {name:?}"));
}

#[test]
fn invalid_xml_is_an_operation_error() {
    let h = connect();
    let err = h.define("<domain type='test'><name>x").unwrap_err();
    match &err {
        HypervisorError::Operation {
            uri,
            operation,
            message,
        } => {
            assert_eq!(uri, URI);
            assert!(operation.contains("define"), "{operation}");
            assert!(!message.is_empty());
        }
        other => panic!("expected Operation, got {other:?}"),
    }
}

#[test]
fn connect_errors_name_the_uri() {
    let err = LibvirtHypervisor::connect("test:///nonexistent/sarde.xml").unwrap_err();
    assert!(
        matches!(&err, HypervisorError::Connect { uri, .. } if uri == "test:///nonexistent/sarde.xml"),
        "{err:?}"
    );
}

#[test]
fn registry_connects_by_scheme() {
    let mut registry = Registry::new();
    register(&mut registry.registrar(Origin::BuiltIn)).unwrap();
    for uri in [
        "qemu:///system",
        "qemu+ssh://host/system",
        "xen:///",
        "lxc:///",
        URI,
    ] {
        registry.hypervisor_for_uri(uri).unwrap();
    }
    assert!(registry.hypervisor_for_uri("vbox:///session").is_err());
    let h = registry.connect(URI).unwrap();
    assert!(h.exists("test").unwrap());
    // Registering twice clashes.
    assert!(register(&mut registry.registrar(Origin::BuiltIn)).is_err());
    let mut other = Registry::new();
    other
        .registrar(Origin::BuiltIn)
        .register_hypervisor(Arc::new(LibvirtFactory))
        .unwrap();
    assert_eq!(other.entries().len(), 4);
}

/// The handle can be shared between threads.
#[test]
fn shared_between_threads() {
    let h: Arc<dyn Hypervisor> = Arc::new(connect());
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let h = h.clone();
            std::thread::spawn(move || {
                let name = unique("thread");
                h.define(&domain_xml(&name)).unwrap();
                h.start(&name).unwrap();
                assert_eq!(h.state(&name).unwrap(), DomainState::Running);
                h.destroy(&name).unwrap();
                h.undefine(&name).unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
