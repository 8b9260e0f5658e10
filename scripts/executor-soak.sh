#!/usr/bin/env bash
# Executor soak (issue 15): N jobs through gitlab-sardinecake-executor as
# gitlab-runner runs them (config, prepare, run stages, cleanup), 2-4 at a time,
# with random fates: pass, failing script, SIGTERM to the process group during
# prepare, a run stage or cleanup, SIGKILL of prepare or a run stage (cleanup
# follows every one, as gitlab-runner calls it). Afterwards no domain, overlay,
# VM slot or state file of any job may be left, and free space must be back
# where it was after a warm-up job. Prints a seed: --seed S repeats the plan.
#
#   scripts/executor-soak.sh [--jobs N] [--parallel P] [--seed S]
#                            [--max-vms M] [--tolerance-mib T] [--workdir DIR]
#
# Builds sarde, the executor and the soak (tests/src/bin/executor-soak.rs) in
# release mode, then runs on a tmpfs of its own (SARDE_SOAK_FS_SIZE, default
# 2g) unless --workdir is given: / is shared with builds and other tests, whose
# writes would drown the free space the soak measures. Needs root, libvirtd and
# the registry tools (scripts/start-services.sh, scripts/install-deps.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "$(id -u)" -ne 0 ]; then
    echo "executor-soak: run as root: qemu:///system and mount need it" >&2
    exit 2
fi
cd "$ROOT"
echo "executor-soak: building (release)…" >&2
nice -n 10 cargo build --release --quiet -p sarde -p sarde-e2e --bins

own_workdir=
for arg in "$@"; do
    if [ "$arg" = --workdir ]; then own_workdir=yes; fi
done
args=("$@")
mnt=
finish() {
    if [ -n "$mnt" ]; then
        umount "$mnt" 2>/dev/null || true
        rmdir "$mnt" 2>/dev/null || true
    fi
}
trap finish EXIT
if [ -z "$own_workdir" ]; then
    mnt="$(mktemp -d /var/tmp/sarde-soak-fs.XXXXXX)"
    chmod 755 "$mnt"
    if mount -t tmpfs -o "size=${SARDE_SOAK_FS_SIZE:-2g},mode=755" sarde-soak "$mnt"; then
        echo "executor-soak: work directory on a tmpfs of its own at $mnt" >&2
    else
        echo "executor-soak: cannot mount a tmpfs; the work directory shares $(df --output=target "$mnt" | tail -1) with everything else" >&2
    fi
    args+=(--workdir "$mnt")
fi
SARDE_TEST_LIBVIRT=1 nice -n 5 "$ROOT/target/release/executor-soak" "${args[@]}"
