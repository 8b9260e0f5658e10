#!/usr/bin/env bash
# Runs every cargo fuzz target of fuzz/ for SECONDS_PER_TARGET (default 60),
# one after another, each on its committed corpus (fuzz/corpus/<target>/, where
# new interesting inputs are added; shrink it with `cargo fuzz cmin` before
# committing). Prints per target the runs executed, the corpus size and whether
# it crashed; exits non-zero when any target crashed. Crash inputs are left in
# fuzz/artifacts/<target>/: fix the product, copy the input to
# fuzz/regressions/<target>/ so `cargo test -p sarde-fuzz-targets` replays it.
#
# Needs the nightly toolchain (`rustup toolchain list`); installs cargo-fuzz
# when it is missing. Not part of CI.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Environment: FUZZ_NICE (niceness, default 19), FUZZ_RSS_LIMIT_MB (default 2048),
# FUZZ_BUILD=0 to run the binaries already built.
set -uo pipefail

cd "$(dirname "$0")/../fuzz"

seconds=${1:-60}
shift || true
if ! [[ $seconds =~ ^[0-9]+$ ]] || ((seconds == 0)); then
    echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2
    exit 2
fi
nice=${FUZZ_NICE:-19}
rss=${FUZZ_RSS_LIMIT_MB:-2048}

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    nice -n "$nice" cargo install cargo-fuzz --locked || exit 2
fi

if (($# > 0)); then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

if [[ ${FUZZ_BUILD:-1} != 0 ]]; then
    echo "building ${#targets[@]} targets" >&2
    nice -n "$nice" cargo +nightly fuzz build || exit 2
fi
# The binaries as built now: `cargo fuzz run` would build again before each
# target, picking up whatever the working tree holds by then.
triple=$(rustc +nightly -vV | awk '/^host:/ {print $2}')
bin=target/$triple/release
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0}

crashed=()
printf '%-28s %8s %12s %7s %10s  %s\n' target seconds runs files bytes result
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    log=$(mktemp)
    before=$(find "artifacts/$target" -type f | wc -l)
    nice -n "$nice" "$bin/$target" "corpus/$target" -artifact_prefix="artifacts/$target/" \
        -max_total_time="$seconds" -rss_limit_mb="$rss" -timeout=30 \
        -print_final_stats=1 >"$log" 2>&1
    status=$?
    after=$(find "artifacts/$target" -type f | wc -l)
    runs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log" | tail -n 1)
    files=$(find "corpus/$target" -type f | wc -l)
    bytes=$(find "corpus/$target" -type f -printf '%s\n' | awk '{sum += $1} END {print sum + 0}')
    if ((status != 0 || after > before)); then
        result="CRASHED (exit $status, see fuzz/artifacts/$target/, log $log)"
        crashed+=("$target")
    else
        result=ok
        rm -f "$log"
    fi
    printf '%-28s %8s %12s %7s %10s  %s\n' "$target" "$seconds" "${runs:-?}" "$files" "$bytes" "$result"
done

if ((${#crashed[@]} > 0)); then
    echo "crashed: ${crashed[*]}" >&2
    exit 1
fi
