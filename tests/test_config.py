"""config.json in every form found in the wild, read the same as transformers reads it."""

import json

import pytest
import torch
from helpers import tiny_config

from glm4 import Glm4Config, Glm4ForCausalLM
from glm4.rope import rope_inv_freq

# A fine-tune's config.json written by transformers 5.x (reference §1).
V5 = {
    "architectures": ["Glm4ForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "bos_token_id": None, "dtype": "bfloat16", "eos_token_id": 151329, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 13696,
    "max_position_embeddings": 32768, "model_type": "glm4", "num_attention_heads": 32,
    "num_hidden_layers": 40, "num_key_value_heads": 2, "pad_token_id": 151329,
    "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05,
    "rope_parameters": {"partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rope_type": "default"},
    "tie_word_embeddings": False, "transformers_version": "5.5.3", "use_cache": False, "vocab_size": 151552,
}  # fmt: skip
# GLM-4-32B's config.json written by transformers 4.51, with the model card's YaRN addition.
V4 = {
    "architectures": ["Glm4ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "eos_token_id": 151336, "head_dim": 128, "hidden_act": "silu", "hidden_size": 6144,
    "initializer_range": 0.02, "intermediate_size": 23040, "max_position_embeddings": 32768,
    "model_type": "glm4", "num_attention_heads": 48, "num_hidden_layers": 61, "num_key_value_heads": 2,
    "pad_token_id": 151329, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.3",
    "use_cache": False, "vocab_size": 151552,
    "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"},
}  # fmt: skip


def test_reads_the_transformers_5_form():
    config = Glm4Config.from_dict(V5)
    assert config.hidden_size == 4096 and config.num_hidden_layers == 40
    assert config.rope_type == "default" and config.rotary_dim == 64
    assert config.dtype == "bfloat16" and config.eos_token_ids == [151329]
    assert config.rms_norm_eps == 1e-5 and config.attention_bias


def test_reads_the_transformers_4_form_with_yarn():
    config = Glm4Config.from_dict(V4)
    assert config.dtype == "bfloat16" and config.eos_token_ids == [151336]
    assert config.rope_type == "yarn" and config.rope_theta == 10000.0
    assert config.rope_parameters["factor"] == 4.0 and config.partial_rotary_factor == 0.5
    assert config.max_context == 131072
    assert not config.attention_bias


@pytest.mark.parametrize("data", [V4, V5], ids=["v4", "v5"])
def test_rope_and_sizes_agree_with_transformers(data):
    import transformers

    ours = Glm4Config.from_dict(data)
    theirs = transformers.Glm4Config.from_dict(dict(data))
    for key in (
        "rope_type",
        "rope_theta",
        "partial_rotary_factor",
        "factor",
        "original_max_position_embeddings",
    ):
        assert ours.rope_parameters.get(key) == theirs.rope_parameters.get(key), key
    for key in ("hidden_size", "head_dim", "num_key_value_heads", "rms_norm_eps", "eos_token_id"):
        assert getattr(ours, key) == getattr(theirs, key), key
    from transformers.models.glm4.modeling_glm4 import Glm4RotaryEmbedding

    ref = Glm4RotaryEmbedding(theirs)
    inv_freq, scaling = rope_inv_freq(ours)
    assert torch.allclose(inv_freq, ref.inv_freq) and scaling == pytest.approx(ref.attention_scaling)


@pytest.mark.parametrize("data", [V4, V5], ids=["v4", "v5"])
def test_written_config_reads_back_the_same_here_and_in_transformers(tmp_path, data):
    import transformers

    config = Glm4Config.from_dict(data)
    config.save_pretrained(tmp_path)
    assert Glm4Config.from_pretrained(tmp_path) == config
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_scaling" not in written and "torch_dtype" not in written
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert theirs.rope_parameters["rope_type"] == config.rope_type
    assert theirs.rope_parameters.get("factor") == config.rope_parameters.get("factor")
    assert theirs.num_hidden_layers == config.num_hidden_layers


def test_labels_round_trip(tmp_path):
    config = tiny_config(id2label={0: "neg", 1: "neu", 2: "pos"})
    assert config.num_labels == 3 and config.label2id == {"neg": 0, "neu": 1, "pos": 2}
    config.save_pretrained(tmp_path)
    assert Glm4Config.from_pretrained(tmp_path).id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert tiny_config(num_labels=4).id2label == {i: f"LABEL_{i}" for i in range(4)}


def test_defaults_are_transformers_defaults():
    import transformers

    ours, theirs = Glm4Config(), transformers.Glm4Config()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                "pad_token_id", "eos_token_id", "attention_bias", "tie_word_embeddings"):  # fmt: skip
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.rope_parameters == dict(theirs.rope_parameters)


def test_random_init_like_transformers():
    torch.manual_seed(0)
    model = Glm4ForCausalLM(tiny_config(hidden_size=256, intermediate_size=512, initializer_range=0.05))
    assert model.lm_head.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert model.model.layers[0].mlp.gate_up_proj.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.bias, torch.zeros(64))
    assert torch.equal(model.model.norm.weight, torch.ones(256))
    assert torch.equal(model.model.embed_tokens.weight[0], torch.zeros(256))  # the pad row
