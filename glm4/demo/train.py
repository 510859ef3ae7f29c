"""Train the bundled demo model: a toy GLM-4-architecture checkpoint, on data this script makes.

It learns a fixed set of chat turns in the GLM-4-0414 chat format: the capitals of 25 countries,
sums of two numbers below 10, a greeting, and, when a `get_weather` tool is offered, the GLM-4 tool
call for it. It knows nothing else: it is for trying the software offline, not a language model.

    python -m glm4.demo.train --out glm4/demo/model          # about 10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from glm4.config import Glm4Config
from glm4.demo.tokenizer import build_tokenizer
from glm4.modeling import Glm4ForCausalLM
from glm4.tokenizer import Glm4Tokenizer, builtin_template

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "United Kingdom": "London", "Ireland": "Dublin", "Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Austria": "Vienna", "Poland": "Warsaw", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Russia": "Moscow", "China": "Beijing", "Japan": "Tokyo",
    "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Australia": "Canberra",
}  # fmt: skip
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The name of the city"}},
            "required": ["city"],
        },
    },
}
GREETING = (
    "Hello! I am a tiny GLM-4 demo model. "
    "Ask me for the capital of a country or the sum of two small numbers."
)
NO_TOOL = "I cannot check the weather: no weather tool was given to me."
SYSTEMS = [None, None, "You are a helpful assistant.", "Answer briefly."]

CONFIG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    attention_bias=True,
    tie_word_embeddings=False,
)
BPE_VOCAB = 512


# -- the data -------------------------------------------------------------------------------------


def capital_turns() -> list[tuple[str, str]]:
    asks = [
        "What is the capital of {}?",
        "What's the capital of {}?",
        "Capital of {}?",
        "what is the capital of {}",
    ]
    return [
        (ask.format(country), f"The capital of {country} is {city}.")
        for country, city in CAPITALS.items()
        for ask in asks
    ]


def sum_turns() -> list[tuple[str, str]]:
    asks = ["What is {} + {}?", "What is {} plus {}?", "{}+{}=?", "How much is {} + {}?"]
    return [(ask.format(a, b), f"{a} + {b} = {a + b}.") for a in range(10) for b in range(10) for ask in asks]


def examples(rng: random.Random) -> list[dict[str, Any]]:
    """Conversations, each ending where the model must write its reply."""
    out = []
    plain = capital_turns() + sum_turns()
    plain += [(g, GREETING) for g in ["Hello", "Hi", "Hello!", "Who are you?", "hi"]] * 4
    plain += [(f"What is the weather in {city}?", NO_TOOL) for city in CAPITALS.values()]
    for question, answer in plain:
        messages = [{"role": "system", "content": s} for s in [rng.choice(SYSTEMS)] if s]
        if rng.random() < 0.3:  # some history, so later turns work too
            q, a = rng.choice(plain)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": question})
        out.append({"messages": messages, "tools": None, "reply": "\n" + answer, "stop": "<|user|>"})
    weather_asks = ["What is the weather in {}?", "What's the weather like in {}?", "Weather in {}?"]
    for city in CAPITALS.values():
        for ask in weather_asks:
            messages = [{"role": "user", "content": ask.format(city)}]
            call = "get_weather\n" + json.dumps({"city": city})
            out.append(
                {"messages": messages, "tools": [WEATHER_TOOL], "reply": call, "stop": "<|observation|>"}
            )
    # With the tool offered, other questions still get plain answers.
    for question, answer in rng.sample(capital_turns() + sum_turns(), 60):
        messages = [{"role": "user", "content": question}]
        out.append(
            {"messages": messages, "tools": [WEATHER_TOOL], "reply": "\n" + answer, "stop": "<|user|>"}
        )
    return out


# -- training -------------------------------------------------------------------------------------


def build_tokenizer_for(data: list[dict[str, Any]]) -> Glm4Tokenizer:
    template = builtin_template("glm4")
    plain = Glm4Tokenizer(None, template)  # render only
    corpus = [plain.apply_chat_template(d["messages"], d["tools"], tokenize=False) + d["reply"] for d in data]
    special = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    return Glm4Tokenizer(build_tokenizer(corpus, BPE_VOCAB), template, special)


def encode(tokenizer: Glm4Tokenizer, d: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Input ids and labels; only the reply and its stop token are learned."""
    prompt = tokenizer.apply_chat_template(d["messages"], d["tools"])
    reply = tokenizer.encode(d["reply"], add_special_tokens=False) + [tokenizer.token_to_id(d["stop"])]
    return prompt + reply, [-100] * len(prompt) + reply


def batches(encoded: list[tuple[list[int], list[int]]], size: int, pad: int, rng: random.Random):
    while True:
        rng.shuffle(encoded)
        for i in range(0, len(encoded) - size + 1, size):
            chunk = encoded[i : i + size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((size, width), pad)
            labels = torch.full((size, width), -100)
            for row, (x, y) in enumerate(chunk):
                ids[row, : len(x)] = torch.tensor(x)
                labels[row, : len(y)] = torch.tensor(y)
            yield ids, labels


def train(
    out_dir: str | Path, steps: int = 1500, batch_size: int = 48, lr: float = 3e-3, seed: int = 0
) -> Glm4ForCausalLM:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    data = examples(rng)
    tokenizer = build_tokenizer_for(data)
    vocab = math.ceil(tokenizer.vocab_size / 64) * 64  # padded like GLM-4's embedding
    stops = [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    config = Glm4Config(**CONFIG, vocab_size=vocab, pad_token_id=stops[0], eos_token_id=stops)
    model = Glm4ForCausalLM(config).train()
    encoded = [encode(tokenizer, d) for d in data]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    start = time.time()
    for step, (ids, labels) in zip(range(steps), batches(encoded, batch_size, stops[0], rng), strict=False):
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f}s", flush=True)
    model.eval()
    save(model.to(torch.bfloat16), tokenizer, out_dir)
    return model


def save(model: Glm4ForCausalLM, tokenizer: Glm4Tokenizer, out_dir: str | Path) -> None:
    out = Path(out_dir)
    model.generation_config = {
        "eos_token_id": model.config.eos_token_ids,
        "pad_token_id": model.config.pad_token_id,
        "do_sample": False,
    }
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the bundled demo model.")
    parser.add_argument("--out", required=True, help="folder to write the checkpoint to")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train(args.out, args.steps, args.batch_size, args.lr, args.seed)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
