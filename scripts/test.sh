#!/usr/bin/env bash
# Build libmha with warnings as errors and run the whole test suite twice:
# a normal optimised build, then under AddressSanitizer (with leak
# checking) and UndefinedBehaviorSanitizer; then ThreadSanitizer over the
# suites that run threads, valgrind's memcheck over the CLI, and
# allocation-failure injection over every entry point, and libFuzzer.
# Ends with one line per stage and a closing count; exits non-zero on any
# failure, naming the stage.  docs/TESTING.md lists every check.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

jobs=$(nproc 2>/dev/null || echo 2)
start=$SECONDS
passed=()
current="setup"
log=$(mktemp)
trap 'rc=$?; rm -f "$log"; [ $rc -eq 0 ] || echo "test.sh: FAILED in stage \"$current\" (exit $rc) after ${#passed[@]} stage(s) passed" >&2' EXIT

stage() { current=$1; echo "== $1"; }
passed() { passed+=("$current: $1"); }
# ctest's own count, from its last line: "100% tests passed, 0 tests failed out of N".
ctest_count() { grep -o 'out of [0-9]*' "$log" | tail -1 | sed 's/out of \(.*\)/\1 of \1 ctest tests passed/'; }

stage "formatting, layering and function length"
scripts/check_format.sh
python3 scripts/check_layers.py
python3 scripts/check_functions.py
passed "3 checks passed"

stage "release build (-Werror) and ctest"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMHA_WERROR=ON >/dev/null
cmake --build build -j"$jobs" >/dev/null
(cd build && ctest --output-on-failure) | tee "$log"
passed "$(ctest_count)"

stage "AddressSanitizer + UndefinedBehaviorSanitizer build and ctest"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DMHA_WERROR=ON -DMHA_SANITIZE=address,undefined >/dev/null
cmake --build build-asan -j"$jobs" >/dev/null
# Side by side: the longest stage, and its build has no MPI suites, which
# would contend for the cores (27 min in all on a contended machine, this
# stage 17 of them, with its tests one at a time).
(cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest -j"$jobs" --output-on-failure) |
    tee "$log"
passed "$(ctest_count)"

stage "ThreadSanitizer over the threaded suites"
cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMHA_WERROR=ON -DMHA_SANITIZE=thread >/dev/null
cmake --build build-tsan -j"$jobs" >/dev/null
(cd build-tsan && TSAN_OPTIONS=halt_on_error=1 ctest --output-on-failure -R '^test_(reference|decode|train|golden|robust)$') |
    tee "$log"
passed "$(ctest_count)"

stage "valgrind memcheck over the CLI"
scripts/valgrind_cli.sh build/mha | tee "$log"
passed "$(grep -c '  ok: ' "$log") commands clean"

stage "allocation failures at every allocation of every entry point (ASan + LeakSanitizer)"
cmake -S . -B build-faults -DCMAKE_BUILD_TYPE=Debug -DMHA_WERROR=ON -DMHA_SANITIZE=address,undefined \
    -DMHA_FAULT_INJECTION=ON >/dev/null
cmake --build build-faults -j"$jobs" --target test_faults >/dev/null
(cd build-faults && ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure -R '^test_faults$') | tee "$log"
passed "$(ctest_count)"

stage "fuzzing: libFuzzer over the safetensors reader, the CLI's inputs and the lab's tokenizer (45 s each, ASan + UBSan)"
CC=clang CXX=clang++ cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMHA_FUZZ=ON \
    -DMHA_SANITIZE=address,undefined >/dev/null
cmake --build build-fuzz -j"$jobs" --target fuzz_safetensors fuzz_cli_inputs fuzz_tokenizer >/dev/null
for target in safetensors cli_inputs tokenizer; do
    corpus=$(mktemp -d)
    seeds=tests/fuzz/corpus_st
    [ "$target" = cli_inputs ] && seeds=tests/fuzz/corpus_cli
    [ "$target" = tokenizer ] && seeds=tests/fuzz/corpus_tok
    cp "$seeds"/* "$corpus"/
    if ! build-fuzz/tests/fuzz_$target -max_total_time=45 -timeout=10 -rss_limit_mb=2048 "$corpus" >"$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz_$target found a fault; the input is in the log above" >&2
        exit 1
    fi
    echo "  fuzz_$target: $(grep -E '^Done' "$log")"
    rm -rf "$corpus"
done
passed "3 targets, no fault"

stage "Python package: pip install . into a new venv, then pytest (numpy API, golden files, PyTorch 1.13)"
venv=$(mktemp -d)
/usr/bin/python3 -m venv --system-site-packages "$venv" # Debian's numpy and python3-torch
"$venv/bin/pip" install -q "pytest==8.3.4"
"$venv/bin/pip" install -q --config-settings=cmake.define.MHA_WERROR=ON .
(cd python/tests && "$venv/bin/python" -m pytest -q -p no:cacheprovider) | tee "$log"
rm -rf "$venv"
passed "pytest: $(grep -o '[0-9]* passed' "$log" | tail -1)"

echo "== summary"
for line in "${passed[@]}"; do echo "  passed: $line"; done
echo "test.sh: ${#passed[@]} of ${#passed[@]} stages passed, 0 failed, in $(((SECONDS - start) / 60)) min $(((SECONDS - start) % 60)) s"
