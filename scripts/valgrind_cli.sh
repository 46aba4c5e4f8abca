#!/usr/bin/env bash
# Runs a few `mha` commands under valgrind's memcheck: any invalid read or
# write, use of uninitialised memory or leak fails.  valgrind emulates a
# CPU without AVX-512, so the library picks its AVX2 kernels here.
set -euo pipefail
cd "$(dirname "$0")/.."
mha=${1:-build/mha}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
g=tests/data/golden
check() {
    valgrind --quiet --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect \
        --show-leak-kinds=definite,indirect "$mha" "$@" >/dev/null
    echo "  ok: mha $*"
}
check forward --weights $g/fwd_bias_kv_zero_attn.safetensors --inputs $g/fwd_bias_kv_zero_attn.safetensors \
    --out "$out/a.safetensors" --num-heads 3 --batch-first --need-weights --no-average-attn-weights --add-zero-attn --threads 2
check backward --weights $g/bwd_fwd_masks.safetensors --inputs $g/bwd_fwd_masks.safetensors \
    --out "$out/b.safetensors" --num-heads 4 --threads 2
check sdpa-backward --inputs $g/bwd_sdpa_gqa.safetensors --out "$out/c.safetensors" --causal-bottom-right --enable-gqa
check sdpa --inputs $g/sdpa_alibi_causal_softcap.safetensors --out "$out/d.safetensors" --is-causal --softcap 5 --dtype bf16
check decode --weights $g/blk_llama_gqa.safetensors --prefix model.layers.0.self_attn. --num-heads 4 --rope half \
    --prompt-len 20 --steps 5 --cache-dtype bf16 --threads 2
check show $g/blk_gpt2.safetensors
# A failing command must not leak either.
if valgrind --quiet --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect \
        "$mha" forward --weights $g/fwd_basic.safetensors --inputs $g/fwd_basic.safetensors --out "$out/e.safetensors" \
        --num-heads 3 2>/dev/null; [ $? -eq 99 ]; then
    echo "valgrind found errors in a failing command" >&2
    exit 1
fi
echo "  ok: a failing command leaks nothing"
