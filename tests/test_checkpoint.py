"""Checkpoints: transformers <-> glm4 round trips, sharding, hub ids, dtype, and clear errors."""

import json
import logging

import pytest
import torch
from helpers import hf_twin, random_ids, tiny_config, tiny_lm
from safetensors.torch import save_file

from glm4 import (
    Glm4Config,
    Glm4ForCausalLM,
    Glm4ForSequenceClassification,
    Glm4ForTokenClassification,
    Glm4Model,
)
from glm4.checkpoint import parse_size


@pytest.fixture
def saved(tmp_path):
    """A tiny causal LM saved by glm4 in 3+ shards, and the model itself."""
    model = tiny_lm()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size=60_000)
    return tmp_path / "ckpt", model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_glm4_saves_sharded_and_transformers_loads(saved):
    import transformers

    folder, model = saved
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = random_ids(2, 12)
    assert (logits(hf, ids) - logits(model, ids)).abs().max() <= 1e-5


def test_transformers_saves_sharded_and_glm4_loads(tmp_path):
    model = tiny_lm(seed=3)
    hf = hf_twin(model)
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = Glm4ForCausalLM.from_pretrained(tmp_path)
    ids = random_ids(2, 12)
    assert (logits(ours, ids) - logits(hf, ids)).abs().max() <= 1e-5


def test_round_trip_single_file_is_exact(tmp_path):
    model = tiny_lm()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    again = Glm4ForCausalLM.from_pretrained(tmp_path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_tied_embeddings_round_trip(tmp_path):
    model = tiny_lm(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    again = Glm4ForCausalLM.from_pretrained(tmp_path)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    ids = random_ids(1, 6)
    assert torch.equal(logits(again, ids), logits(model, ids))


def test_dtype_auto_uses_checkpoint_dtype(tmp_path):
    tiny_lm().to(torch.bfloat16).save_pretrained(tmp_path)
    assert Glm4ForCausalLM.from_pretrained(tmp_path).dtype == torch.bfloat16
    assert Glm4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32
    assert Glm4ForCausalLM.from_pretrained(tmp_path, dtype="float32").dtype == torch.float32


def test_loading_builds_nothing_random_and_sets_rope(saved):
    folder, model = saved
    loaded = Glm4ForCausalLM.from_pretrained(folder)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    assert not loaded.training


def test_base_model_and_heads_load_a_causal_lm_checkpoint(saved, caplog):
    folder, model = saved
    base = Glm4Model.from_pretrained(folder)
    ids = random_ids(2, 8)
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, model.model(ids).last_hidden_state)
    for cls in (Glm4ForSequenceClassification, Glm4ForTokenClassification):
        with caplog.at_level(logging.WARNING, logger="glm4"):
            head = cls.from_pretrained(folder)
        assert "score.weight" in caplog.text and "newly initialised" in caplog.text
        assert torch.equal(head.model.embed_tokens.weight, model.model.embed_tokens.weight)
        assert head.score.weight.abs().sum() > 0 and torch.isfinite(head.score.weight).all()
        caplog.clear()


def test_config_round_trip_keeps_unknown_keys(tmp_path):
    config = tiny_config()
    config.extra["my_setting"] = {"a": 1}
    config.save_pretrained(tmp_path)
    again = Glm4Config.from_pretrained(tmp_path)
    assert again == config
    assert json.loads((tmp_path / "config.json").read_text())["my_setting"] == {"a": 1}


def test_hub_id_from_local_cache_offline(tmp_path, saved, monkeypatch):
    folder, model = saved
    repo = tmp_path / "hub" / "models--zai-org--tiny-glm4"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = Glm4ForCausalLM.from_pretrained("zai-org/tiny-glm4")
    ids = random_ids(1, 5)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert Glm4Config.from_pretrained("zai-org/tiny-glm4") == model.config
    with pytest.raises(ValueError, match="not in the local hub cache"):
        Glm4ForCausalLM.from_pretrained("zai-org/not-downloaded")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


# -- bad checkpoints: one clear ValueError that names the problem -------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Glm4ForCausalLM.from_pretrained(tmp_path / "nope")


def test_pickle_only_checkpoint_is_refused(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"pickle weights \(pytorch_model.bin\).*safetensors only"):
        Glm4ForCausalLM.from_pretrained(tmp_path)


def test_no_weights(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no model weights"):
        Glm4ForCausalLM.from_pretrained(tmp_path)


def test_truncated_safetensors_names_the_file(saved):
    folder, _ = saved
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{shard.name} is not a valid safetensors file"):
        Glm4ForCausalLM.from_pretrained(folder)


def test_garbage_safetensors_names_the_file(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="model.safetensors is not a valid safetensors file"):
        Glm4ForCausalLM.from_pretrained(tmp_path)


def test_missing_shard_names_the_file(saved):
    folder, _ = saved
    shard = sorted(folder.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ValueError, match=f"names shard {shard.name}, which is missing"):
        Glm4ForCausalLM.from_pretrained(folder)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    model = tiny_lm()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.pop("model.layers.1.mlp.down_proj.weight")
    model.config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors: model.layers.1.mlp.down_proj.weight"):
        Glm4ForCausalLM.from_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensors this model does not: model.layers.0.mlp.extra.weight"):
        Glm4ForCausalLM.from_pretrained(tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(saved):
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 80
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"model.layers.0.mlp.gate_up_proj.weight has shape \(192, 64\).*\(160, 64\)"
    ):
        Glm4ForCausalLM.from_pretrained(folder)


def test_loaded_weights_are_read_into_memory_not_mapped(tmp_path):
    """Writing over the file after loading changes nothing: the tensors are the process's own."""
    model = tiny_lm()
    model.save_pretrained(tmp_path)
    loaded = Glm4ForCausalLM.from_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as f:  # in place: a private mapping would see these pages change
        f.seek(header)
        f.write(bytes(path.stat().st_size - header))
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_save_over_the_folder_it_was_loaded_from(saved):
    """Saving back over the files a model was loaded from keeps its weights."""
    folder, model = saved
    loaded = Glm4ForCausalLM.from_pretrained(folder)
    loaded.save_pretrained(folder, max_shard_size=60_000)
    ids = random_ids(1, 6)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert torch.equal(logits(Glm4ForCausalLM.from_pretrained(folder), ids), logits(model, ids))


def test_loading_and_generating_do_not_import_the_compiler(tmp_path):
    """Building on the meta device stays clear of torch's reference ops, whose first use imports
    dynamo, inductor and sympy (over a second at every start of the CLI)."""
    import subprocess
    import sys

    tiny_lm().save_pretrained(tmp_path)
    script = (
        "import sys, torch\n"
        "from glm4 import Glm4ForCausalLM\n"
        f"model = Glm4ForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3)\n"
        "print(sorted(m for m in ('torch._dynamo', 'torch._inductor', 'sympy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
