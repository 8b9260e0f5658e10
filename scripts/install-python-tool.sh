#!/usr/bin/env bash
# Installs the Python sardinecake 0.4.2 (the tool that defined the v1 format) into a
# virtualenv, for the compatibility tests and benchmarks. Idempotent.
# Prints the path of its `sarde` executable.
#
#   SARDE_TEST_STATE   state directory (default /var/lib/sardinecake-test)
set -euo pipefail

STATE="${SARDE_TEST_STATE:-/var/lib/sardinecake-test}"
VENV="$STATE/python-sardinecake"
PACKAGES=(python3-libvirt python3-venv python3-magic python3-paramiko python3-jsonschema skopeo)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-python-tool: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/sarde" ]; then
    mkdir -p "$STATE"
    # Debian's python3 (3.11) with its libvirt bindings; --no-deps keeps those.
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
    "$VENV/bin/pip" install -q --no-deps sardinecake==0.4.2 >&2
fi
echo "$VENV/bin/sarde"
