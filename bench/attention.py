"""Prompt attention on the CPU: glm4's kernel (kernels.prompt_attention) against torch's SDPA, bf16.

Each shape is (query heads / KV heads, head_dim, T queries over S keys): a whole causal prompt where
T == S, against SDPA with is_causal; a chunk of T queries late in a prompt where T < S, against SDPA
with the bool mask glm4 would pass it. The rate counts the multiply-adds of the keys each query
sees (both products), the best of a few calls after one to warm up. The error column is each
one's max |difference| from the float64 result, relative to its largest value.

    python bench/attention.py              # the benchmark model's and GLM-4-9B/32B's head shapes
    python bench/attention.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from glm4 import kernels

SHAPES = [  # (H, H_kv, D, T, S)
    (16, 2, 64, 512, 512),  # the decode benchmark's model, a short prompt
    (16, 2, 64, 512, 4096),  # a chunk late in a 4,096-token prompt
    (16, 2, 64, 512, 8192),
    (16, 2, 64, 2048, 2048),
    (32, 2, 128, 512, 4096),  # GLM-4-9B
    (48, 8, 128, 512, 2048),  # GLM-4-32B
]


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return ((out.double() - exact).abs().max() / exact.abs().max()).item()


def measure(heads: int, kv_heads: int, dim: int, queries: int, keys: int, repeats: int) -> str:
    """One shape's row: SDPA's and the kernel's time and rate, the speed-up, their errors."""
    q = torch.randn(1, heads, queries, dim, dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv_heads, keys, dim, dtype=torch.bfloat16) for _ in range(2))
    scale = dim**-0.5
    seen = (torch.arange(keys)[None, :] <= torch.arange(keys - queries, keys)[:, None])[None, None]
    causal = queries == keys

    def sdpa():
        mask = None if causal else seen
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=True)  # fmt: skip

    def ours():
        return kernels.prompt_attention(q, k, v, None, scale)

    group = heads // kv_heads
    k64, v64 = (t.double().repeat_interleave(group, 1) for t in (k, v))
    exact = (q.double() @ k64.transpose(-1, -2) * scale).masked_fill(~seen, float("-inf")).softmax(-1) @ v64
    macs = 2 * heads * dim * (queries * (keys - queries) + queries * (queries + 1) / 2)
    theirs_s, ours_s = best_of(sdpa, repeats), best_of(ours, repeats)
    shape = f"{heads}/{kv_heads}, {dim}, {queries}, {keys}"
    return (
        f"{shape:28} {theirs_s * 1e3:6.1f} ms {macs / theirs_s / 1e9:4.0f}/s "
        f"{ours_s * 1e3:6.1f} ms {macs / ours_s / 1e9:4.0f}/s {theirs_s / ours_s:8.2f}x   "
        f"{error(sdpa(), exact):.4f} / {error(ours(), exact):.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    probe = torch.zeros(1, 2, 1, 64, dtype=torch.bfloat16)
    if not kernels.can_prompt(probe, probe, probe):
        raise SystemExit("the prompt-attention kernel does not run here (AVX-512BW, BF16, a compiler)")
    print(f"torch {torch.__version__}, {args.threads} threads; rates in GMAC/s of the keys each query sees")
    print(f"{'shape (H/Hkv, D, T, S)':28} {'SDPA':>16} {'glm4':>16} {'speed-up':>9}   max error SDPA / glm4")
    for shape in SHAPES:
        print(measure(*shape, args.repeats), flush=True)


if __name__ == "__main__":
    main()
