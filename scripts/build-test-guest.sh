#!/usr/bin/env bash
# Builds a tiny bootable test guest for sardinecake's end-to-end tests, from Debian
# packages only, without loop mounts, mount namespaces or device nodes:
#
#   scripts/build-test-guest.sh OUTDIR
#
# writes
#   OUTDIR/guest.qcow2        256 MiB virtual, ~16 MB: MBR + syslinux, a FAT boot
#                             partition (kernel + busybox initramfs), an ext4 root
#   OUTDIR/id_ed25519(.pub)   a key pair that logs in as root (authorized_keys)
#   OUTDIR/host_keys.pub      the guest's SSH host public keys (OpenSSH format)
#   OUTDIR/domain.xml.in      libvirt domain template; the caller replaces @NAME@,
#                             @DISK@ (path of a copy/overlay of guest.qcow2) and @MAC@
#   OUTDIR/access.json        {"users":[{"username":"root","password":"sarde"}]}
#
# The guest: Debian's linux-image-cloud-amd64 kernel; an initramfs (busybox-static)
# that loads the virtio modules, mounts the root (LABEL=sarde-root, ext4, read-write)
# and switch_roots to busybox init; the root brings up lo and eth0 (udhcpc), sets
# the hostname `sarde-guest` and runs dropbear on port 22 (root: password `sarde`,
# or the key). Type='qemu' (TCG) boots to SSH in about 5-10 s.
#
# Cached and idempotent: nothing is done when OUTDIR/guest.qcow2 exists and is newer
# than this script. The .debs are fetched with `apt-get download` into
# $SARDE_TEST_DEB_CACHE (default /var/cache/sardinecake-test/debs) and reused.
#
# Host tools (scripts/install-deps.sh): apt-get, dpkg-deb, syslinux, syslinux-common,
# mtools, dosfstools, fdisk (sfdisk), e2fsprogs (mke2fs -d, debugfs), cpio, gzip,
# openssl, openssh-client (ssh-keygen), binutils (readelf), qemu-utils (qemu-img).
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT=$1
SELF=$(readlink -f "${BASH_SOURCE[0]}")
DEBS=${SARDE_TEST_DEB_CACHE:-/var/cache/sardinecake-test/debs}

say() { echo "build-test-guest: $*" >&2; }
die() {
    say "$*"
    exit 1
}

OUTPUTS=(guest.qcow2 id_ed25519 id_ed25519.pub host_keys.pub domain.xml.in access.json)
up_to_date() {
    [ "$OUT/guest.qcow2" -nt "$SELF" ] || return 1
    local f
    for f in "${OUTPUTS[@]}"; do [ -s "$OUT/$f" ] || return 1; done
}
if up_to_date; then
    say "$OUT/guest.qcow2 is up to date"
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb syslinux mcopy mkfs.vfat sfdisk mke2fs debugfs \
    cpio gzip openssl ssh-keygen readelf qemu-img; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is missing: run scripts/install-deps.sh"
done
SYSLINUX_MBR=/usr/lib/syslinux/mbr/mbr.bin
[ -f "$SYSLINUX_MBR" ] || die "$SYSLINUX_MBR is missing (package syslinux-common)"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/sarde-guest-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- The packages ------------------------------------------------------------------

# The kernel meta-package names the versioned image package (its modules match it).
KERNEL_PKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
if [ -z "$KERNEL_PKG" ]; then
    # Package lists not there yet (a fresh machine): fetch them once.
    apt-get update -qq
    KERNEL_PKG=$(apt-cache depends linux-image-cloud-amd64 |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
fi
[ -n "$KERNEL_PKG" ] || die "cannot resolve linux-image-cloud-amd64"

# dropbear-bin is linked dynamically: it comes with the libraries it needs (their
# closure is checked below with readelf, so a new dependency fails loudly).
# busybox-static is static. Everything else on the guest is busybox.
GUEST_PKGS=(busybox-static dropbear-bin libc6 libcrypt1 libtomcrypt1 libtommath1 libgmp10 zlib1g)

mkdir -p "$DEBS"
deb_of() { # the newest cached .deb of a package, if any
    local found
    found=$(shopt -s nullglob && printf '%s\n' "$DEBS/${1}_"*_amd64.deb | sort -V | tail -n 1)
    [ -n "$found" ] && echo "$found"
}
fetch=()
for pkg in "$KERNEL_PKG" "${GUEST_PKGS[@]}"; do
    deb_of "$pkg" >/dev/null || fetch+=("$pkg")
done
if [ "${#fetch[@]}" -gt 0 ]; then
    say "downloading ${fetch[*]}"
    # Runs as the calling user (root here): the cache directory needs no _apt access.
    (cd "$DEBS" && apt-get download -q -o APT::Sandbox::User="$(id -un)" "${fetch[@]}" >/dev/null) ||
        (apt-get update -qq && cd "$DEBS" &&
            apt-get download -q -o APT::Sandbox::User="$(id -un)" "${fetch[@]}" >/dev/null)
fi

STAGE=$WORK/stage # every .deb unpacked, from which the guest's files are picked
mkdir -p "$STAGE"
for pkg in "${GUEST_PKGS[@]}"; do
    dpkg-deb -x "$(deb_of "$pkg")" "$STAGE"
done
KSTAGE=$WORK/kernel
dpkg-deb -x "$(deb_of "$KERNEL_PKG")" "$KSTAGE"
KVER=$(ls -1 "$KSTAGE/lib/modules")
VMLINUZ=$KSTAGE/boot/vmlinuz-$KVER
[ -f "$VMLINUZ" ] || die "no $VMLINUZ in $KERNEL_PKG"
BUSYBOX=$STAGE/bin/busybox
[ -x "$BUSYBOX" ] || die "no busybox in busybox-static"

# --- The initramfs -----------------------------------------------------------------
# The cloud kernel has ext4, devtmpfs, the serial console and gzip initrds built in,
# but virtio, virtio_pci, virtio_blk and virtio_net are modules (and button/evdev for
# the ACPI power button): they are loaded here, and stay loaded after switch_root.
MODULES=(virtio_pci virtio_blk virtio_net virtio-rng button evdev)

"$BUSYBOX" depmod -b "$KSTAGE" "$KVER" # the package ships no modules.dep
INITRD_ROOT=$WORK/initrd
MODDIR=lib/modules/$KVER
mkdir -p "$INITRD_ROOT"/{bin,dev,proc,sys,newroot,"$MODDIR"}
declare -A wanted=()
for m in "${MODULES[@]}"; do
    line=$(grep -E "(^|/)${m}\.ko:" "$KSTAGE/$MODDIR/modules.dep") ||
        die "module $m not in $KERNEL_PKG (built in now? then drop it from MODULES)"
    for f in ${line/:/}; do wanted[$f]=1; done
done
for f in "${!wanted[@]}"; do
    mkdir -p "$INITRD_ROOT/$MODDIR/$(dirname "$f")"
    cp "$KSTAGE/$MODDIR/$f" "$INITRD_ROOT/$MODDIR/$f"
done
"$BUSYBOX" depmod -b "$INITRD_ROOT" "$KVER"

cp "$BUSYBOX" "$INITRD_ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$INITRD_ROOT/bin/$applet"
done

cat >"$INITRD_ROOT/init" <<EOF
#!/bin/sh
# Stage 1: load the virtio drivers, mount the root file system, switch to it.
export PATH=/bin
# No /dev/console in the archive (building it would need mknod): the kernel starts us
# without stdio, so devtmpfs first, then the console.
mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys

rescue() {
    echo "initramfs: \$*; here is a shell"
    exec sh
}

for m in ${MODULES[*]}; do
    modprobe "\$m" || echo "initramfs: cannot load \$m"
done

root=LABEL=sarde-root
for arg in \$(cat /proc/cmdline); do
    case "\$arg" in root=*) root=\${arg#root=} ;; esac
done
# The disk shows up asynchronously once virtio_blk probes it.
dev=
for i in \$(seq 100); do
    case "\$root" in
        /dev/*) [ -b "\$root" ] && dev=\$root ;;
        *) dev=\$(findfs "\$root" 2>/dev/null) ;;
    esac
    [ -n "\$dev" ] && break
    sleep 0.1
done
[ -n "\$dev" ] || rescue "no root device \$root"
# After a hard power-off (virsh destroy) the ext4 journal is replayed here.
mount -t ext4 -o rw "\$dev" /newroot || rescue "cannot mount \$dev"

mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
EOF
chmod 755 "$INITRD_ROOT/init"
# -R 0:0: everything root-owned without being root.
(cd "$INITRD_ROOT" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) |
    gzip -9 >"$WORK/initrd.gz"

# --- The root file system ----------------------------------------------------------
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,lib/x86_64-linux-gnu,lib64,etc/dropbear,etc/udhcpc} \
    "$ROOT"/{dev,proc,sys,run,tmp,var/log,root/.ssh,etc/acpi/PWRF}
ln -s ../run "$ROOT/var/run"
chmod 1777 "$ROOT/tmp"
chmod 700 "$ROOT/root" "$ROOT/root/.ssh"

cp "$BUSYBOX" "$ROOT/bin/busybox"
for path in $("$BUSYBOX" --list-full); do # bin/sh, sbin/init, usr/bin/awk, ...
    [ "$path" = bin/busybox ] && continue
    rel=$(realpath -m --relative-to="$(dirname "/$path")" /bin/busybox)
    ln -sf "$rel" "$ROOT/$path"
done
# The executor pipes its scripts into `bash` when there is one, else `sh`. This
# busybox is built without the `bash` applet name, so a symlink bash -> busybox
# would fail with "bash: applet not found" (busybox picks the applet by argv[0]):
# /bin/bash is a two-line wrapper that runs busybox sh (ash), enough for simple
# bash scripts (no arrays, no [[ =~ ]]).
printf '#!/bin/sh\nexec /bin/sh "$@"\n' >"$ROOT/bin/bash"
chmod 755 "$ROOT/bin/bash"

cp "$STAGE/usr/sbin/dropbear" "$ROOT/usr/sbin/dropbear"
cp "$STAGE/usr/bin/dropbearkey" "$ROOT/usr/bin/dropbearkey"

# Shared libraries: the NEEDED closure of the dropbear binaries, from the .debs.
lib_dirs=(lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu)
find_lib() {
    local d
    for d in "${lib_dirs[@]}"; do
        [ -e "$STAGE/$d/$1" ] && { echo "$STAGE/$d/$1"; return 0; }
    done
    return 1
}
needed() { readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }
todo=("$ROOT/usr/sbin/dropbear" "$ROOT/usr/bin/dropbearkey")
declare -A have=()
while [ "${#todo[@]}" -gt 0 ]; do
    elf=${todo[0]}
    todo=("${todo[@]:1}")
    for lib in $(needed "$elf"); do
        [ -n "${have[$lib]:-}" ] && continue
        src=$(find_lib "$lib") || die "$lib (needed by $(basename "$elf")) is in none of ${GUEST_PKGS[*]}"
        cp -L "$src" "$ROOT/lib/x86_64-linux-gnu/$lib"
        have[$lib]=1
        todo+=("$ROOT/lib/x86_64-linux-gnu/$lib")
    done
done
cp -L "$STAGE/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" "$ROOT/lib/x86_64-linux-gnu/"
ln -s ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$ROOT/lib64/ld-linux-x86-64.so.2"

# Users. glibc 2.36 has the files and dns NSS back ends built in: no libnss_*.so.
PASSWORD=sarde
HASH=$(openssl passwd -6 -salt sardinecake "$PASSWORD")
cat >"$ROOT/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
printf 'root:%s:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n' "$HASH" >"$ROOT/etc/shadow"
chmod 600 "$ROOT/etc/shadow"
printf 'root:x:0:\ntty:x:5:\nnogroup:x:65534:\n' >"$ROOT/etc/group"
printf '/bin/sh\n/bin/ash\n/bin/bash\n' >"$ROOT/etc/shells"
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' >"$ROOT/etc/nsswitch.conf"
echo sarde-guest >"$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 sarde-guest\n::1 localhost\n' >"$ROOT/etc/hosts"
cat >"$ROOT/etc/profile" <<'EOF'
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PS1='\h:\w\$ '
EOF

# SSH: a client key pair for the tests, host keys made now (not at first boot: that
# would cost seconds under TCG). dropbearkey runs through the guest's own loader.
ssh-keygen -q -t ed25519 -N '' -C sardinecake-test -f "$WORK/id_ed25519"
install -m 600 "$WORK/id_ed25519.pub" "$ROOT/root/.ssh/authorized_keys"
run_guest_elf() {
    "$ROOT/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \
        --library-path "$ROOT/lib/x86_64-linux-gnu" "$@"
}
: >"$WORK/host_keys.pub"
for type in ed25519 ecdsa rsa; do
    key=$ROOT/etc/dropbear/dropbear_${type}_host_key
    run_guest_elf "$ROOT/usr/bin/dropbearkey" -t "$type" -f "$key" >/dev/null 2>&1 ||
        die "dropbearkey -t $type failed"
    run_guest_elf "$ROOT/usr/bin/dropbearkey" -y -f "$key" |
        awk '/^(ssh-|ecdsa-)/ { print $1, $2 }' >>"$WORK/host_keys.pub"
    chmod 600 "$key"
done

# Boot: busybox init (so that poweroff/reboot work: they signal PID 1).
cat >"$ROOT/etc/inittab" <<'EOF'
::sysinit:/etc/init.d/rcS
ttyS0::respawn:/sbin/getty -L 115200 ttyS0 vt100
::ctrlaltdel:/sbin/reboot
::shutdown:/etc/init.d/rcK
EOF
mkdir -p "$ROOT/etc/init.d"
cat >"$ROOT/etc/init.d/rcS" <<'EOF'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q " /dev devtmpfs " /proc/mounts || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
hostname -F /etc/hostname
syslogd -C64
ip link set lo up
ip link set eth0 up
# SSH first: it listens on every address, so it is up before the lease is.
dropbear -p 22 -P /run/dropbear.pid \
    -r /etc/dropbear/dropbear_ed25519_host_key \
    -r /etc/dropbear/dropbear_ecdsa_host_key \
    -r /etc/dropbear/dropbear_rsa_host_key
# -b: go to the background once leased (or if no lease comes quickly); keeps renewing.
# -R: release the lease on exit (a clean poweroff), so short-lived test guests with
# fresh MACs do not use up the network's 1-hour leases.
udhcpc -i eth0 -s /etc/udhcpc/default.script -b -R -t 10 -T 1 -p /run/udhcpc.eth0.pid \
    -x hostname:"$(hostname)"
# The ACPI power button (virsh shutdown) powers off.
acpid
EOF
cat >"$ROOT/etc/init.d/rcK" <<'EOF'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
[ -f /run/udhcpc.eth0.pid ] && kill "$(cat /run/udhcpc.eth0.pid)" 2>/dev/null
[ -f /run/dropbear.pid ] && kill "$(cat /run/dropbear.pid)" 2>/dev/null
sync
umount -a -r 2>/dev/null
mount -o remount,ro / 2>/dev/null
EOF
printf '#!/bin/sh\nexec /sbin/poweroff\n' >"$ROOT/etc/acpi/PWRF/00000080"
cat >"$ROOT/etc/udhcpc/default.script" <<'EOF'
#!/bin/sh
# udhcpc event handler: configures $interface from the lease.
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound | renew)
        ip -4 addr flush dev "$interface"
        ip -4 addr add "$ip/${mask:-24}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
        if [ -n "$router" ]; then
            ip -4 route del default dev "$interface" 2>/dev/null
            for r in $router; do ip -4 route add default via "$r" dev "$interface" && break; done
        fi
        : >/etc/resolv.conf
        [ -n "$domain" ] && echo "search $domain" >>/etc/resolv.conf
        for s in $dns; do echo "nameserver $s" >>/etc/resolv.conf; done
        ;;
esac
exit 0
EOF
chmod 755 "$ROOT/etc/init.d/rcS" "$ROOT/etc/init.d/rcK" "$ROOT/etc/udhcpc/default.script" \
    "$ROOT/etc/acpi/PWRF/00000080"
: >"$ROOT/etc/resolv.conf"
echo "sardinecake test guest ($KERNEL_PKG, built $(date -u +%Y-%m-%d))" >"$ROOT/etc/issue"

# --- The disk ----------------------------------------------------------------------
# 256 MiB: MBR; partition 1 FAT16 (1 MiB..33 MiB, bootable, syslinux); partition 2
# ext4 (33 MiB..end, LABEL=sarde-root).
DISK_MIB=256
BOOT_START_MIB=1
BOOT_MIB=32
ROOT_START_MIB=$((BOOT_START_MIB + BOOT_MIB))
ROOT_MIB=$((DISK_MIB - ROOT_START_MIB))

cat >"$WORK/syslinux.cfg" <<'EOF'
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
    LINUX /vmlinuz
    INITRD /initrd.gz
    APPEND root=LABEL=sarde-root console=ttyS0,115200 quiet panic=10
EOF
BOOT_IMG=$WORK/boot.img
# -h: hidden sectors = the partition's start, for the boot sector's own arithmetic.
mkfs.vfat -C -F 16 -n SARDEBOOT -i 5a4d0001 -h $((BOOT_START_MIB * 2048)) \
    "$BOOT_IMG" $((BOOT_MIB * 1024)) >/dev/null
# mtools (used by mcopy and by syslinux's installer) work on the image file itself.
export MTOOLS_SKIP_CHECK=1
syslinux --install "$BOOT_IMG"
mcopy -i "$BOOT_IMG" "$VMLINUZ" ::/vmlinuz
mcopy -i "$BOOT_IMG" "$WORK/initrd.gz" ::/initrd.gz
mcopy -i "$BOOT_IMG" "$WORK/syslinux.cfg" ::/syslinux.cfg

ROOT_IMG=$WORK/root.img
# Ownership: mke2fs -d copies the files' owners. Building as root they are root's;
# otherwise they are set to root afterwards with debugfs (dropbear insists on a
# root-owned authorized_keys and host keys).
mke2fs -q -t ext4 -L sarde-root -d "$ROOT" -E root_owner=0:0 "$ROOT_IMG" "${ROOT_MIB}M" >/dev/null
if [ "$(id -u)" -ne 0 ]; then
    (cd "$ROOT" && find . -mindepth 1 | sed 's|^\.||' |
        while read -r p; do printf 'sif "%s" uid 0\nsif "%s" gid 0\n' "$p" "$p"; done) \
        >"$WORK/chown.debugfs"
    debugfs -w -f "$WORK/chown.debugfs" "$ROOT_IMG" >/dev/null 2>&1
fi

RAW=$WORK/disk.raw
truncate -s "${DISK_MIB}M" "$RAW"
sfdisk -q "$RAW" <<EOF
label: dos
label-id: 0x5a4d0001
unit: sectors
start=$((BOOT_START_MIB * 2048)), size=$((BOOT_MIB * 2048)), type=e, bootable
start=$((ROOT_START_MIB * 2048)), type=83
EOF
dd if="$SYSLINUX_MBR" of="$RAW" bs=440 count=1 conv=notrunc status=none
dd if="$BOOT_IMG" of="$RAW" bs=1M seek="$BOOT_START_MIB" conv=notrunc,sparse status=none
dd if="$ROOT_IMG" of="$RAW" bs=1M seek="$ROOT_START_MIB" conv=notrunc,sparse status=none
# -c: compressed clusters (the kernel is compressed already; the rest shrinks by half).
qemu-img convert -q -c -f raw -O qcow2 "$RAW" "$WORK/guest.qcow2"

# --- The domain template and the access file ---------------------------------------
# No host path in it: the disk is @DISK@, no <emulator>, no file serial. type='qemu'
# (TCG) because the test machines cannot run KVM guests.
cat >"$WORK/domain.xml.in" <<'EOF'
<domain type='qemu'>
  <name>@NAME@</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='@DISK@'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='@MAC@'/>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <!-- Entropy from QEMU itself (no host device path). Without it dropbear waits
         for the kernel's random pool, which under TCG fills 3-10 s later. -->
    <rng model='virtio'>
      <backend model='builtin'/>
    </rng>
  </devices>
</domain>
EOF
printf '{"users":[{"username":"root","password":"%s"}]}\n' "$PASSWORD" >"$WORK/access.json"

# Into place; guest.qcow2 last, as it is what marks the build complete.
for f in id_ed25519 id_ed25519.pub host_keys.pub domain.xml.in access.json guest.qcow2; do
    mv -f "$WORK/$f" "$OUT/$f.tmp"
    mv -f "$OUT/$f.tmp" "$OUT/$f"
done
chmod 600 "$OUT/id_ed25519"
chmod 644 "$OUT/guest.qcow2"
say "built $OUT/guest.qcow2 ($(du -k "$OUT/guest.qcow2" | cut -f1) KiB; $KERNEL_PKG)"
