#!/usr/bin/env bash
# Sets up this machine (packages, daemons, registry) and runs every check CI runs:
# formatting, clippy with -D warnings, and the whole test suite against the real
# libvirtd and registry.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh
bash scripts/start-services.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

# The Python tool, for the v1 compatibility tests.
SARDE_TEST_PYTHON_SARDE="$(bash scripts/install-python-tool.sh)"
export SARDE_TEST_PYTHON_SARDE
export SARDE_TEST_LIBVIRT=1
export SARDE_TEST_REGISTRY="127.0.0.1:${SARDE_TEST_REGISTRY_PORT:-5000}"
# A test whose prerequisite is missing fails here, naming it, instead of
# printing SKIPPED and passing (tests/prerequisite).
export SARDE_TEST_REQUIRE_ALL=1

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
# Every binary runs, so one failure does not hide the others.
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=$?

# libtest counts per binary; sum what the end-to-end binaries (tests/tests/*.rs,
# run after the sarde_e2e library's own unit tests and its src/bin tools) ran,
# so a suite that silently ran nothing shows. A package starts with its library
# or main.rs unit tests; its src/bin/ unit tests stay in the package.
awk '
    /^ *Running unittests src\/(lib|main)\.rs / { in_e2e_package = ($0 ~ /sarde_e2e-/) }
    /^ *Running unittests / { e2e = 0 }
    /^ *Running tests\// { e2e = in_e2e_package }
    /^test result:/ {
        if (e2e) { passed += $4; failed += $6; ignored += $8; binaries++ }
        all += $4
    }
    END {
        printf "end-to-end tests: %d passed, %d failed, %d ignored in %d binaries (%d tests passed in all)\n",
            passed, failed, ignored, binaries, all
    }' "$log"
exit "$status"
