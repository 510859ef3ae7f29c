"""Cached incremental decoding equals the full forward."""

import pytest
import torch
from helpers import random_ids, tiny_config, tiny_lm

from glm4 import DynamicCache, Glm4ForCausalLM
from glm4 import cache as cache_module
from glm4.cache import StaticCache
from glm4.generation import stream_tokens


@pytest.mark.parametrize("prefill", [1, 5, 9])
def test_step_by_step_equals_full_forward(prefill):
    model = tiny_lm()
    ids = random_ids(2, 16)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :prefill], use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == prefill
        steps = [out.logits]
        for t in range(prefill, 16):
            out = model(ids[:, t : t + 1], past_key_values=cache)
            assert out.past_key_values is cache
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_multi_token_chunks_with_cache_equal_full_forward():
    model = tiny_lm()
    ids = random_ids(1, 20)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache()
        chunks = [model(ids[:, a:b], past_key_values=cache).logits for a, b in [(0, 7), (7, 13), (13, 20)]]
    assert (torch.cat(chunks, 1) - full).abs().max() <= 1e-5


def test_left_padded_batch_decodes_like_its_rows_alone():
    """Padding mask over past + new tokens, positions from the mask, as generation will use."""
    model = tiny_lm()
    ids = random_ids(2, 10)
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(ids[:, :6], attention_mask=mask[:, :6], position_ids=positions[:, :6])
        cache, logits = out.past_key_values, [out.logits]
        for t in range(6, 10):
            out = model(
                ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                position_ids=positions[:, t : t + 1],
                past_key_values=cache,
            )
            logits.append(out.logits)
        batched = torch.cat(logits, 1)
        alone = model(ids[:1, 4:]).logits[0]
    assert (batched[0, 4:] - alone).abs().max() <= 1e-5
    assert (batched[1] - model(ids[1:]).logits[0]).abs().max() <= 1e-5


def test_logits_to_keep():
    model = tiny_lm()
    ids = random_ids(1, 8)
    with torch.no_grad():
        full = model(ids).logits
        assert torch.allclose(model(ids, logits_to_keep=1).logits, full[:, -1:], atol=1e-6)
        kept = model(ids, logits_to_keep=torch.tensor([0, 3])).logits
        assert torch.allclose(kept, full[:, [0, 3]], atol=1e-6)


def test_crop_forgets_the_tail():
    model = tiny_lm()
    ids = random_ids(1, 10)
    with torch.no_grad():
        cache = model(ids).past_key_values
        cache.crop(6)
        assert cache.get_seq_length() == 6
        tail = model(ids[:, 6:], past_key_values=cache).logits
        assert (tail - model(ids).logits[:, 6:]).abs().max() <= 1e-5


def test_static_cache_off_the_cpu_is_marked_static_and_reused():
    """On an accelerator a generation borrows the cache an earlier one gave back (CUDA graphs are
    recorded for its addresses), and its buffers are marked as static addresses for them."""
    with torch.device("meta"):
        model = Glm4ForCausalLM(tiny_config())
    first = StaticCache.borrow(model, 2, 16)
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in (*first.keys, *first.values))
    second = StaticCache.borrow(model, 2, 16)  # the first is still in use
    assert second is not first
    first.length = 5
    first.give_back(model)
    assert StaticCache.borrow(model, 2, 16) is first and first.length == 0
    assert StaticCache.borrow(model, 1, 16) is not first  # another shape


def test_static_cache_on_the_cpu_is_fresh_each_time():
    model = tiny_lm()
    cache = StaticCache.borrow(model, 1, 16)
    cache.give_back(model)
    again = StaticCache.borrow(model, 1, 16)
    assert again is not cache
    assert not hasattr(again.keys[0], "_dynamo_static_input_type")


def test_generation_on_a_reused_cache_equals_a_fresh_one(monkeypatch):
    """A borrowed cache holds the last generation's keys: they are cleared, never attended to."""
    model = tiny_lm()
    prompts = [random_ids(2, 9, seed=1), random_ids(2, 5, seed=2)]

    def run(prompt):
        steps = stream_tokens(model, prompt, max_new_tokens=8, eos_token_id=[], compile=False)
        return torch.stack(list(steps), dim=1)

    fresh = [run(p) for p in prompts]
    monkeypatch.setattr(cache_module, "reuses_buffers", lambda device: True)
    run(prompts[0])
    (held,) = model._free_static_caches[(2, 512)]
    assert held.keys[0].abs().sum() > 0  # the last generation's keys are still there
    for prompt, expected in zip(prompts, fresh, strict=True):
        assert torch.equal(run(prompt), expected)
    assert model._free_static_caches[(2, 512)] == [held]  # one cache served every generation
