//! Finding the job VM's address: libvirt's DHCP lease, the guest agent, the ARP
//! table, and the host's neighbour table for the domain's MAC (libvirt's own ARP
//! source fails on some kernels). A restarted domain can show a stale lease, so
//! callers wait for SSH, not just for an address.

use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use sarde_api::Hypervisor;
use sarde_api::hypervisor::{AddressSource, DomainState};

/// Waits until the domain has an IPv4 address, up to `deadline` (`timeout` is
/// what the message quotes). `Err` names what was tried, or that the domain
/// stopped running, which ends the wait at once.
pub fn wait_for_address(
    hv: &dyn Hypervisor,
    name: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<IpAddr, String> {
    let macs = hv
        .domain_xml(name, false)
        .ok()
        .and_then(|xml| sarde_domain::interface_macs(&xml).ok())
        .unwrap_or_default();
    loop {
        match hv.state(name) {
            Ok(DomainState::Running) => {}
            Ok(state) => {
                return Err(format!(
                    "VM {name} stopped while booting (state {state:?}): the guest powered off or crashed, or something else destroyed it; the hypervisor's log of the domain says which"
                ));
            }
            Err(e) => return Err(format!("VM {name}: {e}")),
        }
        for source in [
            AddressSource::Lease,
            AddressSource::Agent,
            AddressSource::Arp,
        ] {
            if let Ok(addresses) = hv.interface_addresses(name, source) {
                if let Some(a) = addresses.iter().find(|a| a.address.is_ipv4()) {
                    tracing::debug!("{name}: {} from {source:?}", a.address);
                    return Ok(a.address);
                }
            }
        }
        if let Some(ip) = neighbour(&macs) {
            tracing::debug!("{name}: {ip} from the neighbour table");
            return Ok(ip);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "VM {name} got no IPv4 address (DHCP lease, guest agent, ARP and neighbour table for MAC {}): does the guest start its network with DHCP? (gave up after {}s)",
                if macs.is_empty() {
                    "(none)".to_string()
                } else {
                    macs.join(", ")
                },
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `ip -4 neigh` entries for one of `macs`.
fn neighbour(macs: &[String]) -> Option<IpAddr> {
    if macs.is_empty() {
        return None;
    }
    let out = Command::new("ip").args(["-4", "neigh"]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        // 192.168.122.34 dev virbr0 lladdr 52:54:00:12:34:56 REACHABLE
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = words.iter().position(|w| *w == "lladdr") else {
            continue;
        };
        let failed = words.iter().any(|w| *w == "FAILED" || *w == "INCOMPLETE");
        if !failed
            && words
                .get(i + 1)
                .is_some_and(|m| macs.iter().any(|x| x.eq_ignore_ascii_case(m)))
        {
            if let Ok(ip) = words[0].parse() {
                return Some(ip);
            }
        }
    }
    None
}
