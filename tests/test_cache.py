"""Cached incremental decoding equals the full forward."""

import pytest
import torch
from helpers import random_ids, tiny_lm

from glm4 import DynamicCache


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
