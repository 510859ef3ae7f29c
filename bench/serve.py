"""Aggregate throughput and latency of the server under N concurrent streaming clients.

Starts the server in this process twice on the same model, once batching up to N sequences and
once one request at a time, and sends the same N streaming chat requests to each.

    python bench/serve.py [--clients 16] [--model PATH | --glm4-shape] [--max-tokens 64]
                           [--quantize int8|int4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_server import start  # noqa: E402  (the same in-process uvicorn helper the tests use)

from glm4.demo.train import CAPITALS  # noqa: E402
from glm4.pipeline import Glm4Pipeline, default_model_path  # noqa: E402


async def one(
    client: httpx.AsyncClient, url: str, question: str, max_tokens: int
) -> tuple[float, float, int]:
    """(time to first token, total time, tokens) of one streamed request."""
    messages = [{"role": "user", "content": question}]
    body = {"model": "glm4-demo", "messages": messages, "stream": True, "max_tokens": max_tokens,
            "temperature": 0, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if first is None and '"content"' in line and '"content": ""' not in line:
                first = time.perf_counter() - start
            if '"usage"' in line and '"choices": []' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return first or 0.0, time.perf_counter() - start, tokens


async def load(url: str, clients: int, max_tokens: int) -> tuple[float, list[float], list[float]]:
    questions = [f"What is the capital of {c}?" for c in CAPITALS][:clients]
    questions += [f"What is {i % 10} + {(i * 3) % 10}?" for i in range(clients - len(questions))]
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, url, q, max_tokens) for q in questions))
        wall = time.perf_counter() - start
    return sum(r[2] for r in results) / wall, [r[0] for r in results], [r[1] for r in results]


def glm4_shaped() -> Glm4Pipeline:
    """The decode benchmark's layer shapes, random bf16 weights, the demo's tokenizer and vocabulary."""
    import torch

    from glm4 import Glm4Config, Glm4ForCausalLM
    from glm4.tokenizer import Glm4Tokenizer

    tokenizer = Glm4Tokenizer.from_pretrained(default_model_path())
    demo = Glm4Config.from_pretrained(default_model_path())
    config = Glm4Config(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=2,
                        head_dim=64, intermediate_size=2816, vocab_size=demo.vocab_size, rms_norm_eps=1e-5,
                        max_position_embeddings=2048, pad_token_id=demo.pad_token_id,
                        eos_token_id=demo.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    return Glm4Pipeline(Glm4ForCausalLM(config).to(torch.bfloat16).eval(), tokenizer)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--model", default=None, help="checkpoint (default: the demo model)")
    parser.add_argument(
        "--glm4-shape",
        action="store_true",
        help="random weights of the GLM-4 bench shape (hidden 1024, 12 layers) with the demo tokenizer",
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization of the model")
    args = parser.parse_args()
    if args.glm4_shape:
        pipeline = glm4_shaped()
        if args.quantize:
            from glm4.quantization import quantize

            quantize(pipeline.model, args.quantize)
    else:
        pipeline = Glm4Pipeline.from_pretrained(args.model, device="cpu", quantization=args.quantize)
    rates = {}
    for label, batch in (("batched", args.clients), ("one at a time", 1)):
        # compile=None: what `glm4 serve` does (the test helper turns compiling off).
        server, engine = start(pipeline, max_batch_size=batch, queue_timeout=600, compile=None)
        try:
            asyncio.run(load(server.url, 2, 4))  # warm up
            rate, ttft, total = asyncio.run(load(server.url, args.clients, args.max_tokens))
        finally:
            server.stop()
            engine.shutdown()
        rates[label] = rate
        print(f"{label:>14} (max batch {batch:>2}): {rate:7.1f} tok/s aggregate | time to first token "
              f"p50 {pct(ttft, 50) * 1000:6.0f} ms p90 {pct(ttft, 90) * 1000:6.0f} ms | request latency "
              f"p50 {pct(total, 50) * 1000:6.0f} ms p90 {pct(total, 90) * 1000:6.0f} ms")  # fmt: skip
    print(
        f"{args.clients} clients: batched / one at a time = {rates['batched'] / rates['one at a time']:.2f}x"
    )


if __name__ == "__main__":
    main()
