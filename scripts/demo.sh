#!/usr/bin/env bash
# The sardinecake demo, end to end, on this machine (run as root on Debian 12):
#
#   1. installs the packages and Rust (scripts/install-deps.sh) and starts
#      virtlogd, libvirtd and the default network (scripts/start-services.sh);
#   2. builds sarde (cargo build --release -p sarde);
#   3. starts a throw-away OCI registry (Debian's docker-registry) on a free
#      127.0.0.1 port, storing into a temp dir;
#   4. builds a small VM: a 2 GiB qcow2 base holding ~110 MiB of random data,
#      text and binaries, a qcow2 overlay on it with ~24 MiB of changes, defined
#      in qemu:///system as <domain type='qemu'> (it is never started);
#   5. runs and shows: sarde export, sarde key generate, a signed sarde push,
#      sarde pull into an empty cache under a policy that wants the signature
#      (an unsigned tag of the same image is refused), sarde list, a second pull
#      of the unchanged tag, and qemu-img compare of the original disk with the
#      pulled one; with the time of every step.
#
# Everything sarde touches is isolated: no config files (SARDE_CONF_FILES=),
# caches and VM disks under a temp dir, explicit --connect qemu:///system.
# The demo VMs, the registry and the temp dir are removed at the end, also when
# a step fails; a failure exits non-zero and names the step.
#
#   SARDE_DEMO_TMPDIR   where the temp dir goes (default /var/tmp)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
CONNECT=qemu:///system

STEP="start"        # the step running now, for the failure message
TIMINGS=()          # "seconds<TAB>step" for the summary
WORK=""             # the temp dir
REGISTRY_PID=""     # the throw-away registry
DEFINED_VMS=()      # libvirt domains to undefine at the end
DEMO_START=$EPOCHREALTIME

say() { printf '%s\n' "$*"; }
bold() { if [ -t 1 ]; then printf '\033[1m%s\033[0m\n' "$*"; else printf '%s\n' "$*"; fi; }
elapsed() { # elapsed START -> seconds since START, 2 decimals
    awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [ "$rc" -ne 0 ]; then
        say "" >&2
        say "demo: FAILED in step \"$STEP\" (exit code $rc)" >&2
    fi
    say ""
    say "== cleaning up"
    local vm
    for vm in "${DEFINED_VMS[@]}"; do
        if virsh -c "$CONNECT" dominfo "$vm" >/dev/null 2>&1; then
            virsh -c "$CONNECT" destroy "$vm" >/dev/null 2>&1
            virsh -c "$CONNECT" undefine --nvram "$vm" >/dev/null 2>&1 ||
                virsh -c "$CONNECT" undefine "$vm" >/dev/null 2>&1
            say "   undefined VM $vm"
        fi
    done
    if [ -n "$REGISTRY_PID" ] && kill -0 "$REGISTRY_PID" 2>/dev/null; then
        kill "$REGISTRY_PID" 2>/dev/null
        wait "$REGISTRY_PID" 2>/dev/null
        say "   stopped the registry (pid $REGISTRY_PID)"
    fi
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        rm -rf -- "$WORK"
        say "   removed $WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# step TITLE COMMAND... : shows the command, runs it, times it; a failure ends the demo.
step() {
    local title=$1 start took
    shift
    STEP=$title
    say ""
    bold "== $title"
    [ "$(type -t "$1")" = function ] || say "\$ $(printf '%q ' "$@" | sed -e "s|${SARDE:-/nonexistent}|sarde|g" -e "s|${WORK:-/nonexistent}|\$WORK|g" -e 's/ $//')"
    start=$EPOCHREALTIME
    # Not `"$@" || ...`: that would switch set -e off inside the step's functions.
    # A failure exits here and the EXIT trap names the step.
    "$@"
    took=$(elapsed "$start")
    say "-- ${took}s"
    TIMINGS+=("$took	$title")
}

# --- setup -----------------------------------------------------------------

if [ "$(id -u)" -ne 0 ]; then
    say "demo: run as root (libvirtd and qemu:///system need it)" >&2
    exit 1
fi

setup_machine() {
    say "\$ bash scripts/install-deps.sh"
    bash "$HERE/install-deps.sh"
    say "\$ bash scripts/start-services.sh"
    bash "$HERE/start-services.sh"
}
step "install packages, start libvirtd" setup_machine
if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

build_sarde() {
    say "\$ cargo build --release -p sarde"
    (cd "$ROOT" && cargo build --release -p sarde)
}
step "build sarde" build_sarde
SARDE="$ROOT/target/release/sarde"

# Isolated settings: no config files, no SARDE_* from the caller's environment
# (SARDE_LOG, the log filter, is kept).
while IFS= read -r var; do
    case "$var" in
        SARDE_LOG) ;;
        SARDE_*) unset "$var" ;;
    esac
done < <(compgen -e)
export SARDE_CONF_FILES=

WORK="$(mktemp -d "${SARDE_DEMO_TMPDIR:-/var/tmp}/sarde-demo.XXXXXX")"
chmod 755 "$WORK"
SUFFIX="${WORK##*.}"
SOURCE_VM="sarde-demo-$SUFFIX"
PULLED_VM="sarde-demo-pulled-$SUFFIX"
CACHE_A="$WORK/cache-exporter"   # the exporting machine's cache
CACHE_B="$WORK/cache-runner"     # the pulling machine's cache, empty at first
VMS_B="$WORK/vms-runner"         # where the pulled VM's disks go
mkdir -p "$WORK/registry" "$WORK/vm" "$CACHE_A" "$CACHE_B" "$VMS_B"
say ""
say "demo: working in $WORK"

# A registry of our own on a free loopback port.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
start_registry() {
    local try port log="$WORK/registry.log"
    for try in $(seq 20); do
        port=$((20000 + RANDOM % 20000))
        port_free "$port" || continue
        sed -e "s|@ROOT@|$WORK/registry|" -e "s|@PORT@|$port|" \
            "$HERE/registry/config.yml.in" >"$WORK/registry.yml"
        : >"$log"
        docker-registry serve "$WORK/registry.yml" >"$log" 2>&1 &
        REGISTRY_PID=$!
        for _ in $(seq 100); do
            if ! kill -0 "$REGISTRY_PID" 2>/dev/null; then
                break # did not start (port taken meanwhile?): try another port
            fi
            if grep -q "listening on 127.0.0.1:$port" "$log" &&
                curl -fsS "http://127.0.0.1:$port/v2/" >/dev/null 2>&1; then
                REGISTRY_PORT=$port
                say "registry: docker-registry pid $REGISTRY_PID on 127.0.0.1:$port, storage $WORK/registry (try $try)"
                return 0
            fi
            sleep 0.1
        done
        kill "$REGISTRY_PID" 2>/dev/null || true
        wait "$REGISTRY_PID" 2>/dev/null || true
        REGISTRY_PID=""
    done
    say "could not start docker-registry on a free port; its last log:" >&2
    tail -n 20 "$log" >&2
    return 1
}
step "start a throw-away registry" start_registry
IMAGE="127.0.0.1:$REGISTRY_PORT/demo/vm:1"

# The VM: base.qcow2 (2 GiB virtual) <- disk.qcow2 (overlay), never started.
build_vm() {
    local d="$WORK/vm"
    # (Producers cut short by head die of SIGPIPE: `|| true` keeps pipefail quiet.)
    head -c 32M /dev/urandom >"$d/random.bin"
    { seq 1 100000000 || true; } | head -c 48M >"$d/text.bin"
    { find /usr/bin /usr/lib -type f -size +100k -print0 | sort -z | xargs -0 cat 2>/dev/null || true; } |
        head -c 32M >"$d/binaries.bin"
    qemu-img create -q -f qcow2 "$d/base.qcow2" 2G
    qemu-io -f qcow2 \
        -c "write -q -s $d/random.bin 0 32M" \
        -c "write -q -s $d/text.bin 512M 48M" \
        -c "write -q -s $d/binaries.bin 1G 32M" \
        "$d/base.qcow2"
    head -c 16M /dev/urandom >"$d/random2.bin"
    { seq 100000000 -1 1 || true; } | head -c 8M >"$d/text2.bin"
    qemu-img create -q -f qcow2 -b "$d/base.qcow2" -F qcow2 "$d/disk.qcow2"
    qemu-io -f qcow2 \
        -c "write -q -s $d/random2.bin 16M 16M" \
        -c "write -q -s $d/text2.bin 1536M 8M" \
        "$d/disk.qcow2"
    rm -f "$d"/*.bin
    cat >"$d/domain.xml" <<EOF
<domain type='qemu'>
  <name>$SOURCE_VM</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$d/disk.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'/>
  </devices>
</domain>
EOF
    DEFINED_VMS+=("$SOURCE_VM")
    virsh -c "$CONNECT" define "$d/domain.xml"
    qemu-img info --backing-chain "$d/disk.qcow2" | grep -E '^(image|virtual size|disk size|backing file):'
}
step "build the demo VM $SOURCE_VM" build_vm

# --- the demo ----------------------------------------------------------------

step "sarde export" "$SARDE" -v export --connect "$CONNECT" -d "$CACHE_A" "$SOURCE_VM" "$IMAGE"
echo "demo passphrase" >"$WORK/key.pass"
step "sarde key generate" "$SARDE" key generate --output-prefix "$WORK/signer" --passphrase-file "$WORK/key.pass"
step "sarde push, signed" "$SARDE" -v push -d "$CACHE_A" --insecure \
    --sign-by-sigstore-private-key "$WORK/signer.private" --sign-passphrase-file "$WORK/key.pass" "$IMAGE"
UNSIGNED="127.0.0.1:$REGISTRY_PORT/demo/vm:unsigned"
step "sarde push, unsigned, as another tag" "$SARDE" push -d "$CACHE_A" --insecure -t "$UNSIGNED" "$IMAGE"

# The runner trusts the demo registry's images only when signed by that key.
cat >"$WORK/policy.json" <<POLICY
{
  "default": [{"type": "reject"}],
  "transports": {
    "docker": {
      "127.0.0.1:$REGISTRY_PORT/demo": [{"type": "sigstoreSigned", "keyPath": "$WORK/signer.pub"}]
    }
  }
}
POLICY
refused_unsigned() {
    local out
    if out=$("$SARDE" pull --connect "$CONNECT" -d "$CACHE_B" -o "$VMS_B" --insecure \
        --policy "$WORK/policy.json" -n "$PULLED_VM" "$UNSIGNED" 2>&1); then
        say "the unsigned image was pulled: $out" >&2
        return 1
    fi
    say "$out" | sed -e "s|$WORK|\$WORK|g"
    grep -q "refused by the policy" <<<"$out"
}
step "sarde pull of the unsigned tag: refused" refused_unsigned

DEFINED_VMS+=("$PULLED_VM")
step "sarde pull into an empty cache, signature checked" \
    "$SARDE" -v pull --connect "$CONNECT" -d "$CACHE_B" -o "$VMS_B" --insecure \
    --policy "$WORK/policy.json" -n "$PULLED_VM" "$IMAGE"
step "sarde list" "$SARDE" list --connect "$CONNECT" -d "$CACHE_B" -o "$VMS_B"
step "sarde pull again (tag unchanged)" \
    "$SARDE" -v pull --connect "$CONNECT" -d "$CACHE_B" -o "$VMS_B" --insecure \
    --policy "$WORK/policy.json" -n "$PULLED_VM" "$IMAGE"

compare_disks() {
    local pulled
    pulled=$(virsh -c "$CONNECT" domblklist --details "$PULLED_VM" | awk '$2 == "disk" { print $4; exit }')
    if [ -z "$pulled" ]; then
        say "no disk found in the pulled VM $PULLED_VM" >&2
        return 1
    fi
    qemu-img info --backing-chain "$pulled" | grep -E '^(image|virtual size|disk size|backing file):' |
        sed -e "s|$WORK|\$WORK|g"
    say "\$ qemu-img compare $WORK/vm/disk.qcow2 $pulled" | sed -e "s|$WORK|\$WORK|g"
    qemu-img compare "$WORK/vm/disk.qcow2" "$pulled"
}
step "compare the original disk with the pulled one" compare_disks

STEP="summary"
say ""
bold "== timings"
for t in "${TIMINGS[@]}"; do
    printf '%8ss  %s\n' "${t%%	*}" "${t#*	}"
done
printf '%8ss  %s\n' "$(elapsed "$DEMO_START")" "total"
say ""
say "demo: OK"
