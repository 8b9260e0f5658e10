#!/usr/bin/env bash
# Prints the disk-use curve of the runner-host simulation (tests/tests/runner_host.rs):
# 12 versions of an image, each pulled by the GitLab executor's prepare under
# `pull-policy = always` and a space budget of about three versions, while the jobs
# of the current and the previous version run. One line per version: bytes of the
# executor's cache and VM directory after the step, the peak sampled during its
# prepare and cleanup, and the budget; then what the executor removed on its own.
# Needs what the tests need (scripts/test.sh sets it up); root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/start-services.sh >/dev/null
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
export SARDE_TEST_LIBVIRT=1
cargo test --quiet -p sarde-e2e --test runner_host -- --nocapture 2>&1 |
    grep -E '^(one version|disk use|after the last job)|^  (prepare|cleanup) [0-9]+: Removed|test result'
