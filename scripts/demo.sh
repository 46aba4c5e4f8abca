#!/usr/bin/env bash
# The main job, for now a short demo: what libmha says about the seed
# paper's configuration, and one nn.MultiheadAttention forward pass on a
# shipped example, next to PyTorch's own result for the same weights.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc 2>/dev/null || echo 2)" --target mha >/dev/null
mha=build/mha

echo "== The Transformer base model (Vaswani et al. 2017): d_model 512, 8 heads"
$mha info --embed-dim 512 --num-heads 8 --seq 1024
echo
echo "== One forward pass: nn.MultiheadAttention(64, 8), 6 tokens, causal mask"
echo "   examples/demo.safetensors holds the weights, the query and PyTorch's outputs."
out=$(mktemp -d)/demo_out.safetensors
$mha forward --weights examples/demo.safetensors --inputs examples/demo.safetensors \
    --out "$out" --num-heads 8 --is-causal --need-weights
echo "-- attention weights, averaged over the 8 heads (row = query, column = key):"
$mha show "$out" --tensor attn_output_weights
echo "-- PyTorch's weights for the same call:"
$mha show examples/demo.safetensors --tensor pytorch.attn_output_weights
echo "-- attn_output, first 6 of 64 features (libmha, then PyTorch):"
$mha show "$out" --tensor attn_output --max 6
$mha show examples/demo.safetensors --tensor pytorch.attn_output --max 6
rm -rf "$(dirname "$out")"
