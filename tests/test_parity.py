"""Logits parity with transformers on the same random weights, over a grid of configs."""

import pytest
import torch
from helpers import hf_twin, random_ids, tiny_config, tiny_lm

from glm4.rope import Glm4RotaryEmbedding, apply_rotary

GRID = {
    "gqa1": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa2": dict(num_attention_heads=4, num_key_value_heads=2),
    "gqa4": dict(num_attention_heads=8, num_key_value_heads=2),
    "head_dim_not_hidden_over_heads": dict(hidden_size=64, num_attention_heads=4, head_dim=32),
    "full_rotary": dict(rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 1.0}),
    "no_bias": dict(attention_bias=False),
    "tied": dict(tie_word_embeddings=True),
    "linear_rope": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    "dynamic_rope": dict(max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
    "yarn_rope": dict(
        max_position_embeddings=16,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    ),
}


@pytest.mark.parametrize("name", GRID)
def test_logits_match_transformers_fp32(name):
    model = tiny_lm(**GRID[name])
    hf = hf_twin(model)
    # 40 tokens: beyond the trained 16 positions for the dynamic and yarn configs.
    ids = random_ids(2, 40)
    with torch.no_grad():
        ours = model(ids).logits
        ref = hf(ids).logits
    assert ours.shape == ref.shape == (2, 40, 128)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_rotary_rotates_adjacent_pairs_of_the_rotary_part_only():
    """Pair (2i, 2i+1) turns by position * inv_freq[i]; dims past rotary_dim pass through."""
    config = tiny_config()  # head_dim 16, rotary_dim 8
    rope = Glm4RotaryEmbedding(config)
    x = torch.randn(1, 1, 1, 16)
    cos, sin = rope(torch.tensor([[3]]), torch.float32)
    out = apply_rotary(x, cos, sin)
    for i in range(4):
        angle = torch.tensor(3 * rope.inv_freq[i].item())
        assert torch.allclose(cos[0, 0, 2 * i], angle.cos()) and torch.allclose(
            sin[0, 0, 2 * i + 1], angle.sin()
        )
        a, b = x[..., 2 * i], x[..., 2 * i + 1]
        assert torch.allclose(out[..., 2 * i], a * angle.cos() - b * angle.sin(), atol=1e-6)
        assert torch.allclose(out[..., 2 * i + 1], b * angle.cos() + a * angle.sin(), atol=1e-6)
    assert torch.equal(out[..., 8:], x[..., 8:])


def test_logits_match_transformers_bf16():
    """bf16: the same ops in the same order and roundings, so the logits agree to within one bf16
    ulp at their scale (2^-8 relative; on the CPU they are bitwise equal). A wrong rope, norm or
    cast changes them by far more than that.
    """
    model = tiny_lm().to(torch.bfloat16)
    hf = hf_twin(model)
    ids = random_ids(2, 24)
    with torch.no_grad():
        ours = model(ids).logits.float()
        ref = hf(ids).logits.float()
    assert (ours - ref).abs().max().item() <= ref.abs().max().item() * 2**-8


def test_hidden_states_match_transformers():
    model = tiny_lm()
    hf = hf_twin(model)
    ids = random_ids(1, 10)
    with torch.no_grad():
        ours = model(ids, output_hidden_states=True).hidden_states
        ref = hf(ids, output_hidden_states=True).hidden_states
    assert len(ours) == len(ref) == 3
    for a, b in zip(ours, ref, strict=True):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers_and_unpadded(side):
    model = tiny_lm()
    hf = hf_twin(model)
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    pad = 5
    if side == "left":
        ids[1, :pad], mask[1, :pad] = 0, 0
    else:
        ids[1, -pad:], mask[1, -pad:] = 0, 0
    keep = mask[1].bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        ref = hf(ids, attention_mask=mask).logits
        assert torch.isfinite(ours).all()
        assert (ours[:, :][mask.bool()] - ref[mask.bool()]).abs().max() <= 1e-4
        # The padded row equals the same tokens run alone, at the same positions.
        positions = torch.nonzero(keep).T
        alone = model(ids[1:, keep], position_ids=positions).logits
        assert (ours[1, keep] - alone[0]).abs().max() <= 1e-4
        assert (ours[0] - model(ids[:1]).logits[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("length", [300, 512])
def test_long_prompt_blocked_attention_matches_transformers(length):
    """Prompts of 257-512 tokens attend in blocks of queries on the CPU (causal_prompt_attention)."""
    model = tiny_lm(max_position_embeddings=1024)
    hf = hf_twin(model)
    ids = random_ids(1, length)
    with torch.no_grad():
        ours = model(ids).logits
        ref = hf(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("length", [257, 300, 512])
def test_blocked_causal_attention_equals_one_call(length):
    from glm4.attention import causal_prompt_attention

    g = torch.Generator().manual_seed(length)
    q = torch.randn(2, 8, length, 16, generator=g)
    k, v = (torch.randn(2, 2, length, 16, generator=g) for _ in range(2))
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (causal_prompt_attention(q, k, v, 16**-0.5) - whole).abs().max() <= 1e-5


def test_rope_frequencies_stay_float32_when_the_model_is_cast(tmp_path):
    """`model.to(torch.bfloat16)` gives the numbers of loading in bf16: the frequencies stay float32."""
    from glm4 import Glm4ForCausalLM

    model = tiny_lm()
    model.save_pretrained(tmp_path)
    cast = model.to(torch.bfloat16)
    assert cast.model.rotary_emb.inv_freq.dtype == torch.float32
    loaded = Glm4ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = random_ids(1, 60)
    with torch.no_grad():
        assert torch.equal(cast(ids).logits, loaded(ids).logits)
