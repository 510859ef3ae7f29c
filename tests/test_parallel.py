"""Tensor parallel with gloo: 2 and 4 processes give the logits and greedy tokens of one."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port, random_ids, tiny_config, tiny_lm

from glm4 import Glm4ForCausalLM
from glm4.parallel import Plan, Shard, quantized_shards


def worker(rank: int, world: int, port: int, folder: str, out: str, load: dict | None = None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = Glm4ForCausalLM.from_pretrained(folder, tp_plan="auto", **(load or {}))
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
            "o_proj": type(attn.o_proj).__name__,
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


def run_ranks(world: int, folder: Path, tmp_path: Path, load: dict | None = None) -> list[dict]:
    out = str(tmp_path / "result")
    mp.spawn(worker, args=(world, free_port(), str(folder), out, load), nprocs=world, join=True)
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]


def quantized_lm():
    # hidden 128, intermediate 256: every rank's columns of o_proj (64) and down_proj (128) fall on
    # int4 groups of 64. float32 activations, so that the only difference sharding makes is the
    # order of a sum (in bf16 its rounding flips near-ties between a tiny model's tokens).
    return tiny_lm(seed=3, hidden_size=128, intermediate_size=256, head_dim=32, initializer_range=0.2)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_checkpoint_sharded_equals_single_process(tmp_path, method):
    """A quantized checkpoint splits into the same quantized numbers: logits and tokens of one process."""
    model = quantized_lm()
    model.save_pretrained(tmp_path / "bf16")
    quantized = Glm4ForCausalLM.from_pretrained(tmp_path / "bf16", quantization=method)
    quantized.save_pretrained(tmp_path / "ckpt")
    ids = random_ids(2, 11)
    with torch.no_grad():
        expected = quantized(ids).logits.float()
    expected_tokens = quantized.generate(ids, max_new_tokens=8, eos_token_id=[])
    for r in run_ranks(2, tmp_path / "ckpt", tmp_path):
        assert r["o_proj"] == f"RowParallel{method.capitalize()}Linear"
        assert (torch.tensor(r["logits"]) - expected).abs().max() <= 1e-4
        assert torch.equal(torch.tensor(r["tokens"]), expected_tokens)
        assert torch.equal(torch.tensor(r["compiled"]), expected_tokens)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantizing_while_loading_sharded(tmp_path, method):
    """Each rank quantizes its own slices. int4 groups lie within one rank's columns, so that gives
    the numbers of quantizing in one process; int8 scales of o_proj and down_proj rows then cover
    only a rank's columns, a finer quantization, so those logits differ by a quantization error."""
    model = quantized_lm()
    model.save_pretrained(tmp_path / "float")
    quantized = Glm4ForCausalLM.from_pretrained(tmp_path / "float", quantization=method)
    ids = random_ids(2, 11)
    with torch.no_grad():
        expected, unquantized = quantized(ids).logits.float(), model(ids).logits.float()
    expected_tokens = quantized.generate(ids, max_new_tokens=8, eos_token_id=[])
    for r in run_ranks(2, tmp_path / "float", tmp_path, {"quantization": method}):
        logits = torch.tensor(r["logits"])
        assert r["o_proj"] == f"RowParallel{method.capitalize()}Linear"
        if method == "int4":
            assert (logits - expected).abs().max() <= 1e-4
            assert torch.equal(torch.tensor(r["tokens"]), expected_tokens)
        else:
            # Other numbers than one process's, with an error of the same size (about 6% of the
            # largest logit on this model with its large weights).
            single = (expected - unquantized).abs().max()
            assert (logits - expected).abs().max() > 1e-3
            assert (logits - unquantized).abs().max() <= 1.5 * single


def test_quantized_shard_arithmetic():
    rows = Shard(0, ((64, 128),))
    assert quantized_shards("q_proj", rows, {"method": "int4", "group_size": 64}) == {
        "q_proj.weight": rows, "q_proj.scales": rows, "q_proj.scales_and_zeros": rows
    }  # fmt: skip
    cols = Shard(1, ((128, 256),))
    assert quantized_shards("o_proj", cols, {"method": "int8"}) == {}  # per-row scales stay whole
    int4 = quantized_shards("o_proj", cols, {"method": "int4", "group_size": 64})
    assert int4 == {"o_proj.weight": Shard(1, ((64, 128),)), "o_proj.scales_and_zeros": Shard(1, ((2, 4),))}
    with pytest.raises(ValueError, match="do not fall on int4 groups of 64.*smaller group_size"):
        quantized_shards("down_proj", Shard(1, ((96, 192),)), {"method": "int4", "group_size": 64})
