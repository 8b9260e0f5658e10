#!/usr/bin/env bash
# Installs every Debian package sardinecake needs to build, test and run its demo,
# and checks for a Rust toolchain. Idempotent: does nothing when all is in place.
#
# Debian 12 machines may come with qemu-utils 10 from backports, which conflicts
# with Debian 12's qemu-system-x86 7.2; we install both from bookworm, downgrading.
set -euo pipefail

PACKAGES=(
    # libvirt: daemon, QEMU driver, headers for the `virt` crate
    libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-dev pkg-config
    # QEMU (TCG guests in tests) and qemu-img, matching versions
    qemu-system-x86 qemu-utils qemu-block-extra
    # the default NAT network
    dnsmasq-base iptables
    # a real OCI registry (CNCF distribution 2.8), skopeo, htpasswd, openssl for TLS
    docker-registry skopeo apache2-utils openssl ca-certificates curl
    # command-line codecs the benchmarks compare against
    zstd pigz xz-utils gzip
    # UEFI firmware, for VMs with NVRAM in the tests
    ovmf
    # C toolchain for -sys crates
    gcc libc6-dev make
    # scripts/build-test-guest.sh (the tiny bootable test guest) and ssh into it
    syslinux syslinux-common mtools dosfstools fdisk e2fsprogs cpio binutils openssh-client
)

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: run as root (or with sudo) to install Debian packages" >&2
        exit 1
    fi
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
# qemu-utils must be bookworm's (7.2), not the backports one.
qemu_version=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
case "$qemu_version" in
    1:7.2*) ;;
    *) missing+=(qemu-utils) ;;
esac

if [ "${#missing[@]}" -gt 0 ]; then
    need_root
    echo "install-deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Pin the QEMU packages to bookworm so backports' qemu-utils is replaced.
    args=()
    for pkg in "${PACKAGES[@]}"; do
        case "$pkg" in
            qemu-utils | qemu-block-extra) args+=("$pkg/bookworm") ;;
            *) args+=("$pkg") ;;
        esac
    done
    apt-get install -y -qq --allow-downgrades --no-install-recommends "${args[@]}" >/dev/null
fi

# Rust: use the machine's toolchain; on a machine without one, install rustup.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: no cargo found; installing the stable Rust toolchain with rustup" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
    export PATH="$HOME/.cargo/bin:$PATH"
fi
for component in clippy rustfmt; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            rustup component add "$component"
        else
            echo "install-deps: cargo $component is missing and rustup is not available" >&2
            exit 1
        fi
    fi
done
echo "install-deps: all packages present ($(cargo --version))" >&2
