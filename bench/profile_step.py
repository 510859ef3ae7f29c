"""Where a decode step's time goes: glm4's default decode path under torch.profiler, its kernels by
total time, and the time they fill of each step against the step's wall time.

On a GPU the gap between the two is time the device waits for the host (the generation loop, CUDA
graph bookkeeping); the kernels' own share shows whether the weights' matmuls or the many small
kernels around them fall short of the bandwidth. The ideal step reads every weight once at the
measured streaming bandwidth.

    python bench/profile_step.py          # CPU, bench/decode.py's small GLM-4 shape
    python bench/profile_step.py --gpu    # CUDA, the GLM-4-9B shape
    python bench/profile_step.py --gpu --attention sdpa --fuse-qkv --overlap    # with CUDA candidates
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from decode import GLM4_9B, SMALL, Meter, sync, weight_bytes_per_token
from torch.profiler import ProfilerActivity, profile

from glm4 import Glm4Config, Glm4ForCausalLM
from glm4.attention import DECODE_ATTENTION
from glm4.generation import stream_tokens
from glm4.quantization import quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="CUDA and the GLM-4-9B shape")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="profile a quantized model")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32, help="decode steps profiled")
    parser.add_argument("--top", type=int, default=20, help="kernels (or CPU ops) listed")
    parser.add_argument("--attention", choices=DECODE_ATTENTION, default="einsum",
                        help="how the step attends off the CPU kernel (set_decode_attention)")  # fmt: skip
    parser.add_argument("--overlap", action="store_true", help="queue each step before reading its token")
    parser.add_argument("--fuse-qkv", action="store_true", help="q, k and v as one matrix (fuse_qkv)")
    args = parser.parse_args()
    device = "cuda" if args.gpu else "cpu"
    shape = GLM4_9B if args.gpu else SMALL
    config = Glm4Config(**shape, vocab_size=151552, max_position_embeddings=32768, rms_norm_eps=1e-5,
                        pad_token_id=0, eos_token_id=[1])  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = Glm4ForCausalLM(config).to(torch.bfloat16).eval()
    if args.quantize:
        model = quantize(model, args.quantize)
    model.set_decode_attention(args.attention)
    if args.fuse_qkv and not model.fuse_qkv():
        parser.error("--fuse-qkv: quantized projections cannot be fused")
    prompt = torch.randint(0, 151552, (args.batch, 32), device=device)

    def generate():
        return stream_tokens(
            model, prompt, max_new_tokens=args.steps + 1, eos_token_id=[], overlap=args.overlap
        )

    for _ in generate():  # warm up (and compile) the default path
        pass

    steps = generate()
    next(steps)  # prefill and the first token, not profiled
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.gpu else [])
    with profile(activities=activities) as prof:
        sync(device)
        start = time.perf_counter()
        for _ in steps:
            pass
        sync(device)
        wall = (time.perf_counter() - start) / args.steps

    # Device kernels on a GPU; on the CPU, the ops that did the work (self time).
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in prof.events():
        us = event.self_device_time_total if args.gpu else event.self_cpu_time_total
        if args.gpu and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        totals[event.name] += us
        counts[event.name] += 1
    busy = sum(totals.values()) / args.steps / 1e6
    bandwidth = Meter(device).read()
    ideal = weight_bytes_per_token(model) / bandwidth
    print(f"device: {device}, batch {args.batch}, {args.quantize or 'bf16'}, attention {args.attention}, "
          f"overlap {'on' if args.overlap else 'off'}, q/k/v {'fused' if args.fuse_qkv else 'apart'}, "
          f"{args.steps} steps profiled")  # fmt: skip
    print(f"wall time per step:        {wall * 1e3:8.3f} ms")
    what = "kernel time per step" if args.gpu else "op self time per step"
    print(f"{what + ':':<27}{busy * 1e3:8.3f} ms ({busy / wall:.0%} of the wall time)")
    ideal_line = f"weights at {bandwidth / 1e9:.0f} GB/s:"
    print(f"{ideal_line:<27}{ideal * 1e3:8.3f} ms ({ideal / wall:.0%} of the wall time)")
    print(f"\n{'ms/step':>8} {'calls/step':>10}  name")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{us / args.steps / 1e3:8.3f} {counts[name] / args.steps:10.1f}  {name[:100]}")


if __name__ == "__main__":
    main()
