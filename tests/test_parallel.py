"""Tensor parallel with gloo: 2 and 4 processes give the logits and greedy tokens of one."""

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import random_ids, tiny_config, tiny_lm

from glm4 import Glm4ForCausalLM
from glm4.parallel import Plan


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = Glm4ForCausalLM.from_pretrained(folder, tp_plan="auto")
        ids = random_ids(2, 11)
        with torch.no_grad():
            logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=8, eos_token_id=[], compile=False)
        compiled = model.generate(ids, max_new_tokens=8, eos_token_id=[], compile=True)
        attn = model.model.layers[0].self_attn
        result = {
            "logits": logits.tolist(),
            "tokens": tokens.tolist(),
            "compiled": compiled.tolist(),
            "params": model.num_parameters(),
            "local_kv": attn.k_proj.out_features // attn.head_dim,
            "local_q": attn.q_proj.out_features // attn.head_dim,
        }
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


CASES = {
    "2 ranks, bias": (2, dict(attention_bias=True)),
    "4 ranks, fewer KV heads than ranks": (4, dict(num_attention_heads=8, num_key_value_heads=2)),
    "2 ranks, no bias, 4 KV heads": (
        2,
        dict(attention_bias=False, num_attention_heads=8, num_key_value_heads=4),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_sharded_equals_single_process(tmp_path, name):
    world, overrides = CASES[name]
    model = tiny_lm(seed=2, initializer_range=0.2, **overrides)
    model.save_pretrained(tmp_path / "ckpt")
    ids = random_ids(2, 11)
    with torch.no_grad():
        expected = model(ids).logits
    expected_tokens = model.generate(ids, max_new_tokens=8, eos_token_id=[])
    out = str(tmp_path / "result")
    mp.spawn(worker, args=(world, free_port(), str(tmp_path / "ckpt"), out), nprocs=world, join=True)
    results = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
    for r in results:
        assert (torch.tensor(r["logits"]) - expected).abs().max() <= 1e-4
        assert torch.equal(torch.tensor(r["tokens"]), expected_tokens)
        assert torch.equal(
            torch.tensor(r["compiled"]), expected_tokens
        )  # the compiled step, all-reduce inside
        config = model.config
        assert r["local_q"] == config.num_attention_heads // world
        assert r["local_kv"] == max(1, config.num_key_value_heads // world)
    # Each rank holds 1/world of the sharded projections, plus the replicated rest.
    total = model.num_parameters()
    replicated = sum(p.numel() for n, p in model.named_parameters() if "proj" not in n)
    sharded = total - replicated
    kv = sum(p.numel() for n, p in model.named_parameters() if ("k_proj" in n or "v_proj" in n))
    kv_extra = (
        kv * max(0, world // config.num_key_value_heads - 1) // world
        if world > config.num_key_value_heads
        else 0
    )
    assert results[0]["params"] == replicated + sharded // world + kv_extra


def test_plan_arithmetic():
    config = tiny_config(num_attention_heads=8, num_key_value_heads=2, head_dim=16, intermediate_size=96)
    plans = [Plan(config, r, 4) for r in range(4)]
    assert [p.q_heads for p in plans] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [p.kv_heads for p in plans] == [(0, 1), (0, 1), (1, 2), (1, 2)]  # replicated: 2 KV heads, 4 ranks
    gate_up = plans[1].shard("model.layers.0.mlp.gate_up_proj.weight")
    assert gate_up.dim == 0 and gate_up.parts == ((24, 48), (120, 144))  # my gate rows, my up rows
    assert plans[1].shard("model.layers.0.mlp.down_proj.weight").parts == ((24, 48),)
    assert plans[3].shard("model.layers.0.self_attn.o_proj.weight").parts == ((96, 128),)
    assert plans[2].shard("model.layers.0.self_attn.k_proj.bias").parts == ((16, 32),)
    assert plans[0].shard("model.norm.weight").dim is None
    two = Plan(tiny_config(num_attention_heads=4, num_key_value_heads=4), 1, 2)
    assert two.kv_heads == (2, 4)


def test_impossible_splits_are_clear_errors():
    with pytest.raises(ValueError, match="4 attention heads cannot be split over 3 ranks"):
        Plan(tiny_config(), 0, 3)
    with pytest.raises(ValueError, match="6 KV heads can neither be split over 4 ranks nor replicated"):
        Plan(tiny_config(num_attention_heads=12, num_key_value_heads=6, head_dim=16), 0, 4)
    with pytest.raises(ValueError, match="intermediate_size 90 cannot be split over 4 ranks"):
        Plan(tiny_config(num_attention_heads=8, intermediate_size=90), 0, 4)


def test_tp_without_a_process_group_says_how(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    tiny_lm().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node"):
        Glm4ForCausalLM.from_pretrained(tmp_path, tp_plan="auto")
