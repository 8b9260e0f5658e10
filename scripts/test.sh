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

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
