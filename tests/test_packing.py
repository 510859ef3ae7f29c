"""Packed (oneDNN-blocked) weights for batched CPU inference: same numbers, used only when current."""

import pytest
import torch
import torch.nn.functional as F
from helpers import random_ids, tiny_lm

from glm4 import steps
from glm4.engine import Engine
from glm4.linear import Linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


@pytest.fixture
def model():
    return tiny_lm(seed=1, initializer_range=0.2).to(torch.bfloat16)


def linears(model):
    return [m for m in model.modules() if isinstance(m, Linear)]


def left_padded():
    ids = random_ids(4, 9, seed=5)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


def poison(linear: Linear) -> None:
    """Swap the packed copy for one of zeros, still marked current: outputs show which copy ran."""
    linear.pack()
    linear.packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(linear.weight), 8)


def test_pack_weights_covers_every_bf16_linear_and_skips_float32(model):
    size = sum(m.weight.numel() * 2 for m in linears(model))
    assert model.packable_bytes() == size
    assert model.pack_weights() == size
    assert all(m.packed_is_current() for m in linears(model)) and model.packable_bytes() == 0
    model.unpack_weights()
    assert all(m.packed is None for m in linears(model))
    assert tiny_lm().pack_weights() == 0  # float32 runs on MKL already


def test_batched_forward_reads_the_packed_copy_and_single_rows_the_plain_weight(model):
    lin = model.model.layers[0].mlp.gate_up_proj
    x = torch.randn(3, lin.in_features, dtype=torch.bfloat16)
    plain = F.linear(x, lin.weight)
    poison(lin)
    with torch.no_grad():
        assert torch.equal(lin(x), torch.zeros_like(plain))  # several rows: the packed copy
        assert torch.equal(lin(x[:1]), plain[:1])  # one row: the plain weight
    lin.pack()  # still "current": packing again keeps the copy
    compiled = torch.compile(lin, fullgraph=True, dynamic=False)
    with torch.no_grad():
        assert torch.equal(lin(x), torch.zeros_like(plain))
        assert torch.equal(compiled(x), torch.zeros_like(plain))  # torch.compile calls it too


def test_packed_logits_equal_plain_logits(model):
    ids, mask = left_padded()
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        model.pack_weights()
        packed = model(ids, attention_mask=mask).logits
    assert (packed.float() - plain.float()).abs().max() <= 1e-2 * plain.abs().max()


@pytest.mark.parametrize("compile", [False, True])
def test_packed_generation_gives_the_same_tokens(model, compile):
    ids, mask = left_padded()
    kwargs = dict(attention_mask=mask, max_new_tokens=20, eos_token_id=[], compile=compile)
    plain = model.generate(ids, pack=False, **kwargs)
    assert all(m.packed is None for m in linears(model))
    packed = model.generate(ids, pack=True, **kwargs)
    assert all(m.packed_is_current() for m in linears(model))
    assert torch.equal(packed, plain)


def test_a_changed_weight_is_not_read_from_a_stale_copy(model):
    lin = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, lin.in_features, dtype=torch.bfloat16)
    model.pack_weights()
    poison(lin)
    with torch.no_grad():
        lin.weight.mul_(2)  # an in-place update (an optimizer step, load_state_dict) bumps the version
        assert not lin.packed_is_current()
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    assert model.packable_bytes() == lin.weight.numel() * 2
    model.pack_weights()  # refreshes just that one
    assert lin.packed_is_current()


def test_autograd_uses_the_plain_weight(model):
    ids = random_ids(2, 6)
    model.pack_weights()
    for lin in linears(model):
        poison(lin)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    model.unpack_weights()
    assert torch.allclose(loss, model(ids, labels=ids).loss)
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_generate_packs_for_batches_only_when_the_copy_fits(model, monkeypatch):
    ids, mask = left_padded()
    kwargs = dict(attention_mask=mask, max_new_tokens=2, eos_token_id=[], compile=False)
    free = {"bytes": 1 << 40}
    monkeypatch.setattr(steps, "available_memory", lambda: free["bytes"])
    model.generate(ids[:1], **kwargs | {"attention_mask": mask[:1]})
    assert all(m.packed is None for m in linears(model))  # batch 1 reads the plain weights
    free["bytes"] = model.packable_bytes() + (1 << 30)  # under the 2 GiB kept free
    model.generate(ids, **kwargs)
    assert all(m.packed is None for m in linears(model))
    free["bytes"] = None  # unknown: do not guess
    model.generate(ids, **kwargs)
    assert all(m.packed is None for m in linears(model))
    free["bytes"] = 1 << 40
    model.generate(ids, **kwargs)
    assert all(m.packed_is_current() for m in linears(model))


def test_engine_packs_for_several_slots(model, monkeypatch):
    monkeypatch.setattr(steps, "available_memory", lambda: 1 << 40)
    engine = Engine(model, max_batch_size=1, compile=False, start=False)
    assert all(m.packed is None for m in linears(model))
    engine = Engine(model, max_batch_size=4, compile=False, start=False)
    assert all(m.packed_is_current() for m in linears(model))
    del engine
