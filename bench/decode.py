"""Decode and prefill speed of glm4 against transformers, on the same random weights, in one run.

Builds a GLM-4-shaped random model (hidden 1024, 12 layers, 16 heads, 2 KV heads, head_dim 64,
intermediate 2816, vocab 151552; or the GLM-4-9B shape with --gpu) in bf16, saves it once, and
loads it into both. Decode speed is also given as a fraction of the memory-bandwidth roofline:
(bytes of weights read per token / seconds per token) / the streaming read bandwidth, measured just
before and just after that decode run (the higher reading: the bandwidth here drifts with load).

    python bench/decode.py            # CPU, the small GLM-4 shape
    python bench/decode.py --gpu      # CUDA, the GLM-4-9B shape
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from glm4 import Glm4Config, Glm4ForCausalLM
from glm4.generation import stream_tokens

SMALL = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=2,
             head_dim=64, intermediate_size=2816)  # fmt: skip
GLM4_9B = dict(hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2,
               head_dim=128, intermediate_size=13696)  # fmt: skip


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bandwidth(device: str) -> float:
    """Streaming read bandwidth in bytes/s: the best of several sums over a buffer far above cache."""
    n = (4 << 30 if device.startswith("cuda") else 1 << 30) // 4
    buf = torch.ones(n, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(10):
        sync(device)
        t = time.perf_counter()
        buf.sum()
        sync(device)
        best = min(best, time.perf_counter() - t)
    del buf
    return n * 4 / best


def around(measure, device: str) -> tuple[float, float]:
    """(the decode rate measure() returns, the read bandwidth just before and after it, whichever is
    higher).

    This machine's bandwidth drifts with its neighbours' load from one minute to the next, so a
    roofline fraction is only fair against the bandwidth of the moment; the higher reading is the
    stricter one.
    """
    before = bandwidth(device)
    _, rate = measure()
    return rate, max(before, bandwidth(device))


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes a decode step reads from weights: everything but the embedding table (one row of it)."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, t in own:
            # The int4 CPU kernel reads its own packing of the weight, not the saved layout.
            if name == "inv_freq" or (
                getattr(module, "packed", None) is not None and name in ("weight", "scales_and_zeros")
            ):
                continue
            total += t.numel() * t.element_size()
    return total


def peak_rss_mib() -> float:
    try:
        text = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024
    except (OSError, AttributeError):
        return float("nan")


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def glm4_decode(model, prompt: torch.Tensor, new_tokens: int, device: str) -> tuple[float, float]:
    """(time to first token, decode tokens/s summed over the batch) on glm4's default path."""
    stamps = []
    sync(device)
    start = time.perf_counter()
    for _ in stream_tokens(model, prompt, max_new_tokens=new_tokens, eos_token_id=[]):
        sync(device)
        stamps.append(time.perf_counter())
    ttft = stamps[0] - start
    return ttft, prompt.shape[0] * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def hf_decode(model, prompt: torch.Tensor, new_tokens: int, device: str) -> tuple[float, float]:
    """The same for transformers' generate: decode rate from t(N tokens) - t(1 token)."""
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(n):
        return timed(lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs), device)

    one = min(run(1) for _ in range(2))
    full = run(new_tokens)
    return one, prompt.shape[0] * (new_tokens - 1) / (full - one)


def prefill_rate(model, length: int, device: str, vocab: int) -> float:
    ids = torch.randint(0, vocab, (1, length), device=device)
    with torch.inference_mode():
        model(ids, logits_to_keep=1)
        best = min(timed(lambda: model(ids, logits_to_keep=1), device) for _ in range(3))
    return length / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="CUDA and the GLM-4-9B shape")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--batches", default="8,32", help="batch sizes for the throughput rows")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-quantized", action="store_true")
    args = parser.parse_args()
    device = "cuda" if args.gpu else "cpu"
    shape = GLM4_9B if args.gpu else SMALL
    config = Glm4Config(**shape, vocab_size=151552, max_position_embeddings=32768, rms_norm_eps=1e-5,
                        pad_token_id=0, eos_token_id=[1])  # fmt: skip
    bw = bandwidth(device)
    print(f"device: {device} ({torch.cuda.get_device_name() if args.gpu else 'CPU'}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip
    print(f"streaming read bandwidth at the start: {bw / 1e9:.1f} GB/s")
    rows: list[tuple[str, str]] = []

    def row(name: str, value: str) -> None:
        rows.append((name, value))
        print(f"  {name:<44} {value}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        with torch.device(device):
            Glm4ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)
        prompt = torch.randint(0, 151552, (1, args.prompt), device=device)
        results = {}
        probe = torch.randint(0, 151552, (1, 64), device=device)
        reference = None
        variants = [("glm4 bf16", None)] + (
            [] if args.skip_quantized else [("glm4 int8", "int8"), ("glm4 int4", "int4")]
        )
        for name, quant in variants:
            model = Glm4ForCausalLM.from_pretrained(tmp, device=device, quantization=quant)
            per_token = weight_bytes_per_token(model)
            with torch.inference_mode():
                logits = model(probe).logits.float()
            if reference is None:
                reference = logits
            else:
                err = ((logits - reference).abs().max() / reference.abs().max()).item()
                top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
                row(
                    f"{name}: logits vs bf16 (64 positions)",
                    f"max |diff| {err:.1%} of max |logit|, top-1 agrees {top1:.0%}",
                )
            glm4_decode(model, prompt, args.new_tokens, device)  # warm up (and compile) the same path
            rate, bw_then = around(partial(glm4_decode, model, prompt, args.new_tokens, device), device)
            results[name] = rate
            row(
                f"{name}: decode batch 1",
                f"{rate:7.1f} tok/s  ({rate * per_token / bw_then:.0%} of roofline at "
                f"{bw_then / 1e9:.1f} GB/s, {per_token / 2**20:.0f} MiB/token)",
            )
            if quant is None:
                results["prefill glm4"] = prefill_rate(model, 512, device, 151552)
                row(f"{name}: prefill 512", f"{results['prefill glm4']:7.0f} tok/s")
                long_prompt = torch.randint(0, 151552, (1, 512), device=device)
                row(
                    f"{name}: time to first token (512 prompt)",
                    f"{glm4_decode(model, long_prompt, 2, device)[0] * 1000:7.0f} ms",
                )
                for b in [int(x) for x in args.batches.split(",") if x]:
                    batch = prompt.expand(b, -1).contiguous()
                    glm4_decode(model, batch, 64, device)  # warm up this shape
                    _, r = glm4_decode(model, batch, 64, device)
                    results[f"batch {b} glm4"] = r
                    row(f"{name}: decode batch {b}", f"{r:7.1f} tok/s")
            del model
        if not args.skip_transformers:
            import transformers

            hf = (
                transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).to(device).eval()
            )
            with torch.inference_mode():
                rate, bw_then = around(partial(hf_decode, hf, prompt, args.new_tokens, device), device)
                results["hf"] = rate
                row(
                    "transformers bf16: decode batch 1",
                    f"{rate:7.1f} tok/s  ({rate * weight_bytes_per_token(hf) / bw_then:.0%} of roofline at "
                    f"{bw_then / 1e9:.1f} GB/s)",
                )
                results["prefill hf"] = prefill_rate(hf, 512, device, 151552)
                row("transformers bf16: prefill 512", f"{results['prefill hf']:7.0f} tok/s")
                for b in [int(x) for x in args.batches.split(",") if x]:
                    _, r = hf_decode(hf, prompt.expand(b, -1).contiguous(), 64, device)
                    results[f"batch {b} hf"] = r
                    row(f"transformers bf16: decode batch {b}", f"{r:7.1f} tok/s")
            print("\nratios against transformers (same weights, same run):")
            for name in [n for n in results if n.startswith("glm4 ")]:
                print(f"  {name} decode batch 1 / transformers bf16: {results[name] / results['hf']:.2f}x")
            prefill = results["prefill glm4"] / results["prefill hf"]
            print(f"  glm4 bf16 prefill 512 / transformers: {prefill:.2f}x")
            for b in [int(x) for x in args.batches.split(",") if x]:
                ratio = results[f"batch {b} glm4"] / results[f"batch {b} hf"]
                print(f"  glm4 bf16 decode batch {b} / transformers: {ratio:.2f}x")
    print(f"peak resident memory of this process: {peak_rss_mib():,.0f} MiB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
