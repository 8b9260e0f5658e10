#!/usr/bin/env bash
# Shrinks the fuzz corpora to the inputs that add coverage, keeping every seed.
# Seeds are the files not named by the fuzzer (a 40-hex SHA-1); they stay as they
# are, then libFuzzer's set-cover merge adds a small set of the found inputs
# (from fuzz/corpus/<target>/) that together cover what they cover beyond the
# seeds: a quarter fewer files than the plain -merge=1 keeps. `cargo fuzz cmin`
# would drop seeds that cover nothing new, and seeds are what the replay test
# and the next fuzzer start from.
#
# Runs the binaries scripts/fuzz.sh built (FUZZ_BUILD=0 there); not part of CI.
#
#   scripts/fuzz-minimise.sh [TARGET...]
set -euo pipefail

cd "$(dirname "$0")/../fuzz"

if (($# > 0)); then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
triple=$(rustc +nightly -vV | awk '/^host:/ {print $2}')
bin=target/$triple/release
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0}

printf '%-28s %15s %15s\n' target "files before" "files after"
for target in "${targets[@]}"; do
    if [[ ! -x $bin/$target ]]; then
        echo "$bin/$target is not built: run scripts/fuzz.sh first" >&2
        exit 2
    fi
    corpus=corpus/$target
    before=$(find "$corpus" -type f | wc -l)
    work=$(mktemp -d)
    mkdir "$work/kept" "$work/found"
    find "$corpus" -maxdepth 1 -type f -regextype posix-extended \
        ! -regex '.*/[0-9a-f]{40}' -exec cp -p {} "$work/kept/" \;
    find "$corpus" -maxdepth 1 -type f -regextype posix-extended \
        -regex '.*/[0-9a-f]{40}' -exec mv {} "$work/found/" \;
    if ! "$bin/$target" -set_cover_merge=1 -timeout=30 -rss_limit_mb=2048 \
        "$work/kept" "$work/found" >"$work/log" 2>&1; then
        # Put the found inputs back: nothing is lost when the merge fails.
        mv "$work/found/"* "$corpus/" 2>/dev/null || true
        echo "$target: merge failed, corpus left as it was; log in $work/log" >&2
        exit 1
    fi
    find "$work/kept" -maxdepth 1 -type f -regextype posix-extended \
        -regex '.*/[0-9a-f]{40}' -exec mv {} "$corpus/" \;
    rm -rf "$work"
    printf '%-28s %15s %15s\n' "$target" "$before" "$(find "$corpus" -type f | wc -l)"
done
