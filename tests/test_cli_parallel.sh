#!/usr/bin/env bash
# The file commands' --parallel end to end (the numbers themselves are
# test_golden_mpi's): without mpirun, and with -np 1, the same bytes as
# without --parallel; decoding over the ranks agrees with one full
# forward; and failures -- a layer with fewer kv heads than ranks, a
# missing input, a bad mode, bf16 -- exit non-zero on every rank with a
# message naming the cause and leave no output behind.
#   test_cli_parallel.sh <mha> <mpiexec>
set -uo pipefail
mha=$1 mpiexec=$2
here="$(cd "$(dirname "$0")/.." && pwd)"
golden="$here/tests/data/golden"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader MHA_NUM_THREADS=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0 failed=0

ok() { passed=$((passed + 1)); }
bad() { echo "FAILED: $*"; failed=$((failed + 1)); }

# Same bytes with --parallel outside mpirun and under -np 1.
same_as_one_process() { # name, then the command's arguments (without --out)
    local name=$1 mode=$2
    shift 2
    "$mha" "$@" --out "$tmp/one.st" || { bad "$name: one process"; return; }
    "$mha" "$@" --out "$tmp/alone.st" --parallel "$mode" || { bad "$name: --parallel without mpirun"; return; }
    "$mpiexec" -np 1 "$mha" "$@" --out "$tmp/np1.st" --parallel "$mode" || { bad "$name: -np 1"; return; }
    if cmp -s "$tmp/one.st" "$tmp/alone.st" && cmp -s "$tmp/one.st" "$tmp/np1.st"; then ok; else bad "$name: bytes differ"; fi
}
s=$golden/bwd_sdpa_alibi_causal.safetensors
same_as_one_process "sdpa-backward ring" ring sdpa-backward --inputs "$s" --is-causal
same_as_one_process "sdpa ulysses" ulysses sdpa --inputs "$golden/sdpa_basic.safetensors"
f=$golden/bwd_fwd_masks.safetensors
same_as_one_process "backward heads" heads backward --inputs "$f" --weights "$f" --num-heads 4

# Fails everywhere, names the cause, writes nothing; `expect` is in stderr.
fails() { # name, expected status (any non-zero when empty), expected text, then the command
    local name=$1 status=$2 expect=$3
    shift 3
    rm -f "$tmp/out.st"
    "$@" --out "$tmp/out.st" >"$tmp/stdout" 2>"$tmp/stderr"
    local rc=$?
    if [ "$rc" -eq 0 ] || { [ -n "$status" ] && [ "$rc" -ne "$status" ]; }; then bad "$name: exit $rc"; return; fi
    grep -q -- "$expect" "$tmp/stderr" || { bad "$name: no \"$expect\" in: $(cat "$tmp/stderr")"; return; }
    [ ! -e "$tmp/out.st" ] || { bad "$name: wrote an output"; return; }
    ok
}
par="$mpiexec -np 3 --oversubscribe"
w=$golden/blk_llama_gqa.safetensors
fails "too few kv heads" "" "2 kv heads cannot be split over 3 ranks" $par "$mha" forward --inputs "$w" --weights "$w" \
    --num-heads 4 --batch-first --names llama --rope half --prefix model.layers.0.self_attn. --parallel heads
fails "ulysses, too few kv heads" "" "1 kv heads cannot be split over 3 ranks" \
    $par "$mha" sdpa --inputs "$golden/sdpa_mqa.safetensors" --enable-gqa --parallel ulysses
# Every rank prints its own line before the ranks agree to fail, but
# mpirun may drop the lines of ranks it kills once one exits non-zero (in
# CI, 2 runs of 20 kept only rank 1's), so any rank's line will do.
fails "missing input" "" "rank [0-2] of 3: --inputs file: cannot open $tmp/none.st" \
    $par "$mha" sdpa --inputs "$tmp/none.st" --parallel ring
fails "bad mode" 2 "--parallel must be ring or ulysses for mha sdpa" "$mha" sdpa --inputs "$s" --parallel heads
fails "bf16" 2 "--parallel computes in f32" "$mha" sdpa --inputs "$s" --parallel ring --dtype bf16

# Decoding over the ranks, the cache split by sequence or by heads.
for mode in ring heads; do
    if $par "$mha" decode --weights "$w" --prefix model.layers.0.self_attn. --names llama --num-heads 4 --rope half \
        --prompt-len 9 --steps 12 --batch 2 --parallel $mode 2>&1 | grep -q "agree"; then
        [ $mode = heads ] && bad "decode heads on 3 ranks of a 2-kv-head layer ran" || ok
    else
        [ $mode = heads ] && ok || bad "decode --parallel $mode"
    fi
done
if "$mpiexec" -np 2 --oversubscribe "$mha" decode --weights "$w" --prefix model.layers.0.self_attn. --names llama \
    --num-heads 4 --rope half --prompt-len 9 --steps 12 --parallel heads | grep -q "over 2 ranks"; then ok; else
    bad "decode --parallel heads on 2 ranks"
fi

echo "test_cli_parallel: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
