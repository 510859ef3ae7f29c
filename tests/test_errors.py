"""Bad input gets a clear ValueError, never a stack trace from deep inside torch."""

import json

import pytest
import torch
from helpers import random_ids, tiny_config, tiny_lm

from glm4 import Glm4Config, Glm4ForCausalLM


@pytest.fixture(scope="module")
def model():
    return tiny_lm()


def test_token_ids_outside_vocabulary(model):
    with pytest.raises(ValueError, match=r"token id 128 is outside the vocabulary \[0, 128\)"):
        model(torch.tensor([[5, 128]]))
    with pytest.raises(ValueError, match="token id -1 is outside"):
        model(torch.tensor([[-1, 5]]))


def test_both_or_neither_inputs(model):
    ids = random_ids(1, 4)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids, inputs_embeds=torch.zeros(1, 4, 64))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


def test_inputs_embeds_shape_and_equivalence(model):
    ids = random_ids(1, 4)
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids)
        assert torch.equal(model(inputs_embeds=embeds).logits, model(ids).logits)
    with pytest.raises(ValueError, match=r"inputs_embeds must be \(batch, seq, 64\)"):
        model(inputs_embeds=torch.zeros(1, 4, 32))


def test_bad_input_ids_shape(model):
    with pytest.raises(ValueError, match="integer \\(batch, seq\\) tensor"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_sequence_longer_than_context(model):
    with pytest.raises(ValueError, match=r"needs 65 positions but the model's context is 64.*YaRN"):
        model(random_ids(1, 65))
    cache = model(random_ids(1, 60)).past_key_values
    with pytest.raises(ValueError, match="needs 65 positions"):
        model(random_ids(1, 5), past_key_values=cache)


def test_yarn_extends_the_context():
    yarn = tiny_lm(
        rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}
    )
    assert yarn.config.max_context == 128
    with torch.no_grad():
        assert torch.isfinite(yarn(random_ids(1, 100)).logits).all()


def test_attention_mask_of_wrong_shape(model):
    ids = random_ids(2, 6)
    with pytest.raises(ValueError, match=r"attention_mask must be .* = \(2, 6\), got \(2, 5\)"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(ids, attention_mask=torch.ones(6))


def test_labels_of_wrong_shape(model):
    with pytest.raises(ValueError, match="labels must have shape"):
        model(random_ids(1, 6), labels=random_ids(1, 5))


# -- config ---------------------------------------------------------------------------------------


def test_config_heads_must_divide():
    with pytest.raises(
        ValueError, match=r"num_attention_heads \(6\) must be a multiple of num_key_value_heads \(4\)"
    ):
        tiny_config(num_attention_heads=6, num_key_value_heads=4)


def test_config_odd_rotary_dim():
    with pytest.raises(ValueError, match="rotary dim .* = 5; it must be even"):
        tiny_config(head_dim=10, rope_parameters={"partial_rotary_factor": 0.5})


def test_config_other_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm"}))
    with pytest.raises(ValueError, match="model_type 'chatglm'"):
        Glm4Config.from_pretrained(tmp_path)


def test_config_unknown_rope_type():
    with pytest.raises(ValueError, match="rope type 'longrope' is not supported"):
        tiny_config(rope_parameters={"rope_type": "longrope", "factor": 2.0})


def test_config_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ValueError, match="is not valid JSON"):
        Glm4Config.from_pretrained(tmp_path)


# -- fp16: GLM-4 activations overflow its range ----------------------------------------------------


def overflowing_model() -> Glm4ForCausalLM:
    """Weights scaled so that the residual stream passes float16's 65504, as GLM-4-32B's does."""
    model = tiny_lm()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_mlp_layernorm.weight.mul_(2e4)
            layer.post_self_attn_layernorm.weight.mul_(2e4)
    return model


def test_fp16_is_refused_where_it_would_overflow(tmp_path):
    model = overflowing_model()
    ids = random_ids(1, 16)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        assert out.hidden_states[-2].abs().max() > 65504  # the residual stream overflows fp16
        assert torch.isfinite(out.logits).all()
        assert torch.isfinite(model.to(torch.bfloat16)(ids).logits).all()
        with pytest.raises(ValueError, match="float16 is not supported.*bfloat16"):
            model.to(torch.float16)(ids)
    model.to(torch.float32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="float16 is not supported.*bfloat16"):
        Glm4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float16)


def test_fp16_checkpoint_loads_as_bf16(tmp_path):
    model = overflowing_model()
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    model.config.dtype = "float16"
    model.config.save_pretrained(tmp_path)
    from safetensors.torch import save_file

    save_file(state, tmp_path / "model.safetensors")
    loaded = Glm4ForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(loaded(random_ids(1, 16)).logits).all()
