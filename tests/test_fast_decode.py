"""The fast paths give the same tokens: static == dynamic cache, compiled == eager, chunked prefill."""

import pytest
import torch
from helpers import attention_widths, random_ids, tiny_lm

from glm4.cache import DynamicCache, StaticCache


def batch():
    ids = random_ids(2, 9, seed=3)
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0
    return ids, mask


@pytest.fixture(scope="module")
def model():
    return tiny_lm(seed=1, initializer_range=0.2)


def test_static_cache_equals_dynamic(model):
    ids, mask = batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=20, eos_token_id=[], compile=False)
    static = model.generate(ids, cache="static", **kwargs)
    dynamic = model.generate(ids, cache="dynamic", **kwargs)
    assert torch.equal(static, dynamic) and static.shape == (2, 29)


def test_static_cache_forward_equals_full_forward(model):
    ids = random_ids(1, 12)
    cache = StaticCache.for_model(model, 1, 32)
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :5], past_key_values=cache).logits
        rest = [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(5, 12)]
    assert cache.get_seq_length() == 12 and cache.kv_length(1) == 32
    assert (torch.cat([first, *rest], 1) - full).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="static cache holds 32 positions"):
        model(random_ids(1, 30), past_key_values=cache)


@pytest.mark.parametrize("chunk", [1, 3, 4, 64])
def test_chunked_prefill_equals_one_shot(model, chunk):
    ids, mask = batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=8, eos_token_id=[], compile=False)
    assert torch.equal(model.generate(ids, prefill_chunk=chunk, **kwargs), model.generate(ids, **kwargs))


def test_a_process_compiles_more_decode_steps_than_dynamos_default_allows():
    """One graph per model, batch size and cache size, all of one code object: past dynamo's limit
    (8 by default, 2 here) a fullgraph step would fail instead of compiling."""
    torch._dynamo.reset()
    config = torch._dynamo.config
    previous, config.recompile_limit = config.recompile_limit, 2
    try:
        model = tiny_lm(seed=4)
        for batch in (1, 2, 3):
            ids = random_ids(batch, 4)
            kwargs = dict(max_new_tokens=3, eos_token_id=[])
            assert torch.equal(model.generate(ids, compile=True, **kwargs), model.generate(ids, **kwargs))
    finally:  # as glm4 leaves it (monkeypatch cannot restore this config's attributes)
        config.recompile_limit = max(previous, config.recompile_limit)


def test_compiled_equals_eager_and_compiles_once(model):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    ids, mask = batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    eager = model.generate(ids, compile=False, **kwargs)
    before = counters["stats"]["unique_graphs"]
    compiled = model.generate(ids, compile=True, **kwargs)
    after_first = counters["stats"]["unique_graphs"]
    assert torch.equal(compiled, eager)
    assert after_first - before == 1  # one graph for all 19 decode steps
    # A second generation of another length reuses it: the cache size is bucketed.
    model.generate(ids[:, 2:], attention_mask=mask[:, 2:], max_new_tokens=20, eos_token_id=[], compile=True)
    assert counters["stats"]["unique_graphs"] == after_first


def test_decoding_attends_over_the_filled_cache_only(model, monkeypatch):
    widths = attention_widths(monkeypatch)
    model.generate(random_ids(1, 5), max_new_tokens=6, eos_token_id=[], compile=False)  # 512 slots
    layers = model.config.num_hidden_layers
    assert widths == [w for w in range(6, 11) for _ in range(layers)]  # slots 0..5, then one more a step


def test_compiled_step_over_a_large_cache_equals_eager():
    """The compiled step takes the attended width as a dynamic size: one graph for every step of
    a generation whose cache (8192 slots, sized for its 5,000-token limit) is mostly empty."""
    from torch._dynamo.utils import counters

    from glm4.generation import stream_tokens

    torch._dynamo.reset()
    model = tiny_lm(seed=1, initializer_range=0.2, max_position_embeddings=8192)
    ids, mask = batch()

    def first(compile: bool, n: int = 24) -> torch.Tensor:
        tokens = stream_tokens(model, ids, attention_mask=mask, max_new_tokens=5000, eos_token_id=[],
                               compile=compile)  # fmt: skip
        return torch.stack([next(tokens) for _ in range(n)], dim=1)

    eager = first(compile=False)
    before = counters["stats"]["unique_graphs"]
    assert torch.equal(first(compile=True), eager)
    assert counters["stats"]["unique_graphs"] - before == 1


def test_compile_is_chosen_only_where_it_pays(model):
    from glm4.steps import should_compile

    assert not should_compile(model, 512)  # a tiny model on the CPU: compiling costs more than it saves
    assert not should_compile(tiny_lm(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), 512)


def test_dynamic_cache_type_is_what_the_model_returns(model):
    assert isinstance(model(random_ids(1, 3)).past_key_values, DynamicCache)


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_cuda_step_compiles_for_cuda_graphs(monkeypatch, quantization):
    """On CUDA the decode step compiles for CUDA graphs, and a quantized model's also with
    coordinate descent tuning (inductor's one-row matmuls as reductions, with the dequantization
    fused in; a bf16 model measured no faster with it). Checked on the arguments torch.compile gets."""
    from glm4 import steps
    from glm4.modeling import Glm4PreTrainedModel
    from glm4.quantization import quantize

    model = tiny_lm()
    if quantization:
        quantize(model, quantization)
    monkeypatch.setattr(Glm4PreTrainedModel, "device", property(lambda self: torch.device("cuda")))
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.update(kwargs) or fn)
    steps.compiled_step(model)
    assert seen["fullgraph"] and seen["dynamic"] is False
    assert seen["options"] == {"triton.cudagraphs": True, "coordinate_descent_tuning": bool(quantization)}


@pytest.mark.parametrize("how", ["einsum", "sdpa", "reduce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_ways_agree_with_float64(how, dtype, monkeypatch):
    """Each way `decode_attention` can attend off the CPU kernel (CUDA candidates) against the same
    in float64: groups of 1 and 4 query heads a KV head, keys as views of a longer cache, masks
    with hidden slots (left padding, unfilled tail)."""
    from glm4 import kernels
    from glm4.attention import decode_attention

    monkeypatch.setattr(kernels, "can_decode", lambda *args: False)
    g = torch.Generator().manual_seed(0)
    for group in (1, 4):
        q = torch.randn(3, 2 * group, 1, 64, generator=g).to(dtype)
        cache = torch.randn(2, 3, 2, 50, 64, generator=g).mul(2).to(dtype)
        k, v = cache[0, :, :, :40], cache[1, :, :, :40]
        mask = torch.ones(3, 1, 1, 40, dtype=torch.bool)
        mask[0, ..., :7] = False  # left padding
        mask[1, ..., 30:] = False  # slots not yet written
        qg = q.double().view(3, 2, group, 64)
        scores = (qg @ k.double().transpose(-1, -2) * 0.125).masked_fill(~mask, float("-inf"))
        exact = (scores.softmax(-1) @ v.double()).reshape(3, 2 * group, 1, 64)
        out = decode_attention(q, k, v, mask, 0.125, how)
        assert out.dtype == dtype and out.shape == exact.shape
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        assert (out.double() - exact).abs().max() <= tolerance * exact.abs().max()


@pytest.mark.parametrize("how", ["sdpa", "reduce"])
def test_compiled_step_with_each_decode_attention_equals_eager(how):
    """The candidates compile into the decode step (fullgraph, one graph) and give the eager
    module's greedy tokens; `set_decode_attention` reaches every layer and rejects unknown ways."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = tiny_lm(seed=1, initializer_range=0.2)  # float32: the CPU kernel does not run
    model.set_decode_attention(how)
    assert {layer.self_attn.decode_with for layer in model.model.layers} == {how}
    ids, mask = batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    eager = model.generate(ids, compile=False, **kwargs)
    before = counters["stats"]["unique_graphs"]
    assert torch.equal(model.generate(ids, compile=True, **kwargs), eager)
    assert counters["stats"]["unique_graphs"] - before == 1
    model.set_decode_attention("einsum")
    assert torch.equal(model.generate(ids, compile=False, **kwargs), eager)
    with pytest.raises(ValueError, match="must be one of einsum, sdpa, reduce"):
        model.set_decode_attention("flash")


def test_fused_qkv_gives_the_same_numbers_and_adds_no_memory(tmp_path):
    """`fuse_qkv`: q, k and v (with their biases) as one matrix whose row blocks the parameters
    view. Same logits and greedy tokens (eager and compiled) as unfused; no memory added; in-place
    changes reach it; `.to()` keeps it (without a copy where nothing changes); autograd takes the
    three parameters; checkpoints keep the three names; `fuse_qkv(False)` parts them again."""
    from glm4 import Glm4ForCausalLM

    model, plain = tiny_lm(seed=1, initializer_range=0.2), tiny_lm(seed=1, initializer_range=0.2)
    assert model.config.attention_bias
    ids, mask = batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    with torch.no_grad():
        expected = plain(ids, attention_mask=mask).logits
    assert model.fuse_qkv() == model.config.num_hidden_layers
    attn = model.model.layers[0].self_attn
    weight, bias = attn.qkv
    assert attn.q_proj.weight.data_ptr() == weight.data_ptr()
    assert attn.v_proj.bias.data_ptr() == bias[-attn.v_proj.out_features :].data_ptr()
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == len(list(model.parameters())) - 2 * 2 * model.config.num_hidden_layers
    calls = []
    hook = attn.k_proj.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        assert torch.allclose(model(ids, attention_mask=mask).logits, expected, atol=1e-5)
    assert not calls  # one product of the matrix, not the three layers
    hook.remove()
    torch._dynamo.reset()
    assert torch.equal(
        model.generate(ids, compile=False, **kwargs), plain.generate(ids, compile=False, **kwargs)
    )
    assert torch.equal(
        model.generate(ids, compile=True, **kwargs), plain.generate(ids, compile=False, **kwargs)
    )

    other = tiny_lm(seed=2, initializer_range=0.2)
    model.load_state_dict(other.state_dict())  # in place: reaches the fused matrix
    assert attn.qkv_is_current() and attn.qkv[0] is weight
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, other(ids).logits, atol=1e-5)

    model.to(torch.float32)  # changes nothing: the same matrix
    assert attn.qkv[0] is weight
    model.to(torch.bfloat16)
    assert attn.qkv_is_current() and attn.qkv[0].dtype == torch.bfloat16
    model.to(torch.float32)

    model.train()
    hook = attn.k_proj.register_forward_hook(lambda *args: calls.append(1))
    model(ids, labels=ids).loss.backward()  # with autograd: the three parameters, not the matrix
    assert calls and attn.q_proj.weight.grad is not None and attn.v_proj.bias.grad is not None
    hook.remove()
    model.eval()

    model.save_pretrained(tmp_path)
    loaded = Glm4ForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[0].self_attn.qkv is None
    assert torch.equal(loaded.model.layers[0].self_attn.k_proj.weight, attn.k_proj.weight)

    with torch.no_grad():
        fused = model(ids).logits
        model.fuse_qkv(False)
        assert attn.qkv is None and attn.k_proj.weight.untyped_storage().nbytes() == attn.k_proj.weight.nbytes
        assert torch.allclose(model(ids).logits, fused, atol=1e-5)


def test_fused_qkv_is_dropped_once_the_layers_are_quantized():
    """Quantizing replaces the projections: the forward stops reading the matrix at once, and the
    next generation drops it (and a fresh fuse_qkv does not apply to quantized layers)."""
    from glm4.quantization import quantize

    model, plain = tiny_lm(seed=1), tiny_lm(seed=1)
    model.fuse_qkv()
    quantize(model, "int8")
    quantize(plain, "int8")
    ids = random_ids(1, 6)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    kwargs = dict(max_new_tokens=5, eos_token_id=[])
    assert torch.equal(model.generate(ids, **kwargs), plain.generate(ids, **kwargs))
    assert all(layer.self_attn.qkv is None for layer in model.model.layers)
    assert model.fuse_qkv() == 0


def test_fused_qkv_off_the_cpu_is_marked_static():
    """A CUDA graph copies an input whose address it cannot trust into its own buffer on every
    replay; the fused matrix is read in place, as the parameters are (checked on the meta device)."""
    with torch.device("meta"):
        model = tiny_lm()
    model.fuse_qkv()
    weight, bias = model.model.layers[0].self_attn.qkv
    assert (
        weight.device.type == "meta" and weight._dynamo_static_input_type and bias._dynamo_static_input_type
    )
    cpu = tiny_lm()
    cpu.fuse_qkv()
    assert not hasattr(cpu.model.layers[0].self_attn.qkv[0], "_dynamo_static_input_type")
