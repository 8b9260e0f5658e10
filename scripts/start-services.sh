#!/usr/bin/env bash
# Starts what sardinecake's tests and demo need, on this machine only:
# virtlogd, libvirtd, libvirt's `default` NAT network, and a throw-away OCI
# registry (Debian's docker-registry) on 127.0.0.1. Idempotent: anything already
# running is left as it is.
#
#   SARDE_TEST_REGISTRY_PORT   registry port (default 5000)
#   SARDE_TEST_STATE           state directory (default /var/lib/sardinecake-test)
set -euo pipefail

PORT="${SARDE_TEST_REGISTRY_PORT:-5000}"
STATE="${SARDE_TEST_STATE:-/var/lib/sardinecake-test}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ "$(id -u)" -ne 0 ]; then
    echo "start-services: run as root: libvirtd and qemu:///system need it" >&2
    exit 1
fi
mkdir -p "$STATE/registry" "$STATE/log"

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 10))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "start-services: $what did not come up within ${seconds}s" >&2
    return 1
}

# libvirt probes QEMU as the libvirt-qemu user; when that user cannot open /dev/kvm,
# every define re-probes (~40 s each). udev would set this mode; there is no udev here.
if [ -c /dev/kvm ] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm && chmod 660 /dev/kvm
fi

# libvirt's daemons (no systemd here). virtlogd first: every VM start needs it.
if ! pgrep -x virtlogd >/dev/null; then
    virtlogd -d
fi
if ! pgrep -x libvirtd >/dev/null; then
    libvirtd -d
fi
wait_for 20 "libvirtd" virsh -c qemu:///system version

# The default NAT network (virbr0, dnsmasq). no-ping makes DHCP answer ~3 s sooner.
# (Output is captured before grep: with pipefail, `virsh | grep -q` can fail on SIGPIPE.)
net_active() { [[ "$(virsh -c qemu:///system net-info default 2>/dev/null)" =~ Active:[[:space:]]*yes ]]; }
if ! virsh -c qemu:///system net-info default >/dev/null 2>&1; then
    virsh -c qemu:///system net-define /usr/share/libvirt/networks/default.xml >/dev/null
fi
if [[ "$(virsh -c qemu:///system net-dumpxml --inactive default)" != *no-ping* ]]; then
    if ! net_active; then
        xml=$(virsh -c qemu:///system net-dumpxml --inactive default)
        xml=${xml/<network>/<network xmlns:dnsmasq=\'http://libvirt.org/schemas/network/dnsmasq/1.0\'>}
        xml=${xml/<\/network>/  <dnsmasq:options><dnsmasq:option value=\'no-ping\'/></dnsmasq:options>
</network>}
        printf '%s\n' "$xml" >"$STATE/default-network.xml"
        virsh -c qemu:///system net-define "$STATE/default-network.xml" >/dev/null
    fi
fi
if ! net_active; then
    virsh -c qemu:///system net-start default >/dev/null
fi
virsh -c qemu:///system net-autostart default >/dev/null 2>&1 || true

# A registry on loopback only.
registry_up() { curl -fsS "http://127.0.0.1:$PORT/v2/" >/dev/null 2>&1; }
if ! registry_up; then
    sed -e "s|@ROOT@|$STATE/registry|" -e "s|@PORT@|$PORT|" \
        "$HERE/registry/config.yml.in" >"$STATE/registry.yml"
    nohup docker-registry serve "$STATE/registry.yml" >>"$STATE/log/registry.log" 2>&1 &
    echo $! >"$STATE/registry.pid"
    wait_for 20 "the registry on 127.0.0.1:$PORT" registry_up
fi
echo "start-services: libvirtd, virtlogd, network default and registry 127.0.0.1:$PORT are up" >&2
