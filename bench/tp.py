"""Tensor-parallel decode speed: TP=N against TP=1, on the same random checkpoint.

CPU (gloo): on a 2-core machine no speedup is expected (the ranks share the cores); the figure is
for the record. With --gpu it runs the GLM-4-9B shape, one GPU per rank (NCCL).

    python bench/tp.py [--world 2] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glm4 import Glm4Config, Glm4ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import GLM4_9B, SMALL  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode_rate(model, device: str, new_tokens: int) -> float:
    prompt = torch.randint(0, 1000, (1, 32), device=device)
    model.generate(prompt, max_new_tokens=8, eos_token_id=[], compile=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, eos_token_id=[], compile=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - start)


def worker(rank: int, world: int, port: int, folder: str, gpu: bool, new_tokens: int, out: str) -> None:
    backend = "nccl" if gpu else "gloo"
    if gpu:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    device = f"cuda:{rank}" if gpu else "cpu"
    model = Glm4ForCausalLM.from_pretrained(folder, tp_plan="auto", device=device)
    rate = decode_rate(model, device, new_tokens)
    if rank == 0:
        Path(out).write_text(json.dumps({"rate": rate, "params": model.num_parameters()}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    shape = GLM4_9B if args.gpu else SMALL
    config = Glm4Config(**shape, vocab_size=151552, rms_norm_eps=1e-5, max_position_embeddings=32768,
                        pad_token_id=0, eos_token_id=[1])  # fmt: skip
    device = "cuda" if args.gpu else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        with torch.device(device):
            Glm4ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)
        single = Glm4ForCausalLM.from_pretrained(tmp, device=device)
        one = decode_rate(single, device, args.new_tokens)
        total = single.num_parameters()
        del single
        out = str(Path(tmp) / "tp.json")
        mp.spawn(
            worker, args=(args.world, free_port(), tmp, args.gpu, args.new_tokens, out), nprocs=args.world
        )
        result = json.loads(Path(out).read_text())
    print(f"TP=1: {one:6.1f} tok/s decode, {total / 1e6:,.0f}M parameters")
    rank0 = result["params"] / 1e6
    print(f"TP={args.world}: {result['rate']:6.1f} tok/s decode, {rank0:,.0f}M parameters on rank 0")
    print(f"TP={args.world} / TP=1: {result['rate'] / one:.2f}x")


if __name__ == "__main__":
    main()
