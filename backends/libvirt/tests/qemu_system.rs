//! Against the real `qemu:///system`: runs only with `SARDE_TEST_LIBVIRT=1` (CI sets
//! it after starting `libvirtd` and `virtlogd`). Defines a tiny diskless TCG guest
//! (`type='qemu'`: nested KVM cannot run guests on the CI hosts), starts, inspects,
//! destroys and undefines it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sarde_api::hypervisor::{AddressSource, DomainState, Hypervisor, HypervisorError};
use sarde_backend_libvirt::LibvirtHypervisor;

const URI: &str = "qemu:///system";

fn enabled() -> bool {
    sarde_test_prerequisite::require(
        "qemu_system",
        std::env::var("SARDE_TEST_LIBVIRT").as_deref() == Ok("1"),
        &format!(
            "SARDE_TEST_LIBVIRT=1 for the {URI} tests (needs root, libvirtd and virtlogd \
             running, and qemu-system-x86)"
        ),
    )
}

/// Unique per test run, so parallel or leftover runs do not collide.
fn unique_name(what: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("sarde-test-{what}-{}-{nanos}", std::process::id())
}

/// No disks, no network, no display: firmware finds nothing to boot and waits,
/// which keeps the domain running.
fn tiny_domain(name: &str) -> String {
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='pty'/>
    <memballoon model='none'/>
  </devices>
</domain>"
    )
}

/// Removes the domain however far the test got.
struct Cleanup<'a> {
    h: &'a LibvirtHypervisor,
    name: String,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if matches!(
            self.h.state(&self.name),
            Ok(DomainState::Running | DomainState::Paused)
        ) {
            let _ = self.h.destroy(&self.name);
        }
        if self.h.exists(&self.name).unwrap_or(false) {
            let _ = self.h.undefine(&self.name);
        }
    }
}

fn wait_for_state(h: &LibvirtHypervisor, name: &str, want: DomainState) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = h.state(name).unwrap();
        if state == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: still {state:?}, expected {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn persistent_domain_lifecycle() {
    if !enabled() {
        return;
    }
    let h = LibvirtHypervisor::connect(URI).unwrap();
    let version = h.version().unwrap();
    assert!(version.starts_with("QEMU "), "{version}");
    assert!(version.contains("(libvirt "), "{version}");
    eprintln!("{URI}: {version}");

    let name = unique_name("persistent");
    let _cleanup = Cleanup {
        h: &h,
        name: name.clone(),
    };
    assert!(!h.exists(&name).unwrap());
    assert_eq!(h.define(&tiny_domain(&name)).unwrap(), name);
    assert!(matches!(
        h.define(&tiny_domain(&name)),
        Err(HypervisorError::DomainExists { .. })
    ));
    assert_eq!(h.state(&name).unwrap(), DomainState::Stopped);
    let listed = h
        .list_domains()
        .unwrap()
        .into_iter()
        .find(|d| d.name == name)
        .expect("listed");
    assert!(listed.persistent);
    assert_eq!(listed.state, DomainState::Stopped);

    let xml = h.domain_xml(&name, true).unwrap();
    assert!(
        xml.contains("type='qemu'") || xml.contains("type=\"qemu\""),
        "{xml}"
    );

    h.start(&name).unwrap();
    wait_for_state(&h, &name, DomainState::Running);
    let live = h.domain_xml(&name, false).unwrap();
    assert!(live.contains("<domain"), "{live}");
    // No interfaces, so no leases.
    assert_eq!(
        h.interface_addresses(&name, AddressSource::Lease).unwrap(),
        []
    );

    h.destroy(&name).unwrap();
    assert_eq!(h.state(&name).unwrap(), DomainState::Stopped);
    h.undefine(&name).unwrap();
    assert!(!h.exists(&name).unwrap());
    assert!(matches!(
        h.state(&name),
        Err(HypervisorError::NoSuchDomain { .. })
    ));
}

#[test]
fn transient_domain_lifecycle() {
    if !enabled() {
        return;
    }
    let h = LibvirtHypervisor::connect(URI).unwrap();
    let name = unique_name("transient");
    let _cleanup = Cleanup {
        h: &h,
        name: name.clone(),
    };
    assert_eq!(h.create_transient(&tiny_domain(&name)).unwrap(), name);
    wait_for_state(&h, &name, DomainState::Running);
    let err = h.undefine(&name).unwrap_err();
    assert!(matches!(err, HypervisorError::Operation { .. }), "{err:?}");
    h.destroy(&name).unwrap();
    assert!(!h.exists(&name).unwrap());
}
