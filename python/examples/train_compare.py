"""Train the same small model twice, once with torch.nn.MultiheadAttention
and once with mha.torch.MultiheadAttention (one import swapped), from the
same initial weights on the same batches, and compare the loss curves and
the time per step.

    python python/examples/train_compare.py [--steps 300] [--threads 2]

The model: token and position embeddings, two causal self-attention
layers with residual connections, an unembedding; the task: repeated random
spans (the head lab's), where the next token inside the repeat can be
copied from its earlier occurrence.
"""

import argparse
import copy
import time

import torch

import mha.torch as mt


class Model(torch.nn.Module):
    def __init__(self, attention, vocab=64, context=32, width=64, heads=4, layers=2):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, width)
        self.pos = torch.nn.Embedding(context, width)
        self.attn = torch.nn.ModuleList(attention(width, heads, batch_first=True) for _ in range(layers))
        self.unembed = torch.nn.Linear(width, vocab)
        mask = torch.triu(torch.ones(context, context, dtype=torch.bool), 1)
        self.register_buffer("mask", mask)

    def forward(self, tokens):
        T = tokens.shape[1]
        x = self.tok(tokens) + self.pos(torch.arange(T))
        for layer in self.attn:
            x = x + layer(x, x, x, attn_mask=self.mask[:T, :T], need_weights=False)[0]
        return self.unembed(x)


def batches(steps, batch, context, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (batch, context), generator=g)
        span = int(torch.randint(context // 4, context // 2 + 1, (1,), generator=g))
        start = int(torch.randint(0, context - 2 * span + 1, (1,), generator=g))
        tokens[:, start + span:start + 2 * span] = tokens[:, start:start + span]
        yield tokens


def train(model, steps, seed):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses, times = [], []
    for tokens in batches(steps, 32, 32, 64, seed):
        t0 = time.perf_counter()
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return losses, times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    reference = Model(torch.nn.MultiheadAttention)
    ours = copy.deepcopy(reference)
    for i, layer in enumerate(reference.attn):  # the same weights, in libmha's module
        ours.attn[i] = mt.MultiheadAttention.from_torch(layer)
    curves = {}
    for name, model in (("torch.nn.MultiheadAttention", reference), ("mha.torch.MultiheadAttention", ours)):
        curves[name] = train(model, args.steps, args.seed)
    (a, ta), (b, tb) = curves.values()
    worst = max(range(len(a)), key=lambda i: abs(a[i] - b[i]))
    print(f"{args.steps} steps, batch 32 x 31 tokens, 2 layers x 4 heads, width 64, {args.threads} threads")
    for name, (losses, times) in curves.items():
        median = sorted(times)[len(times) // 2] * 1e3
        print(f"  {name:30s} loss {losses[0]:.4f} -> {losses[-1]:.4f}, median {median:.2f} ms/step")
    print(f"  largest loss difference {abs(a[worst] - b[worst]):.2e} at step {worst + 1} "
          f"(relative {abs(a[worst] - b[worst]) / a[worst]:.1e}); at the last step {abs(a[-1] - b[-1]):.2e}")
    for step in sorted({1, 10, 50, 100, args.steps // 2, args.steps}):
        if step <= args.steps:
            print(f"  step {step:4d}: {a[step - 1]:.6f} vs {b[step - 1]:.6f}")


if __name__ == "__main__":
    main()
