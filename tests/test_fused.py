"""The fused CPU decode step (glm4/csrc/decode_step.cpp, glm4/fused.py) against the module's step,
where it applies, and the argmax kernel against torch's."""

import threading

import pytest
import torch
from helpers import random_ids, tiny_lm
from torch.profiler import profile

from glm4 import fused, kernels
from glm4.cache import StaticCache
from glm4.engine import Engine, Finished, SlotCache
from glm4.generation import stream_tokens
from glm4.quantization import quantize
from glm4.sampling import SamplingParams, sample_next

needs_fused = pytest.mark.skipif(
    not kernels.available("decode_step"), reason="no C++ compiler, or no AVX-512BW/VL/BF16 here"
)

# The smallest shapes the fused step takes (an lm_head of 2^18 elements), with tails everywhere:
# intermediate 200 (not a multiple of 16 or 32), and in ODD an odd vocabulary, a hidden size that is
# not a multiple of 32, head dim 128 in groups of 3 without biases, and a rotary dim of 40 under
# YaRN (whose cos and sin carry a factor).
SHAPE = dict(vocab_size=2048, hidden_size=128, intermediate_size=200, head_dim=64, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)  # fmt: skip
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "partial_rotary_factor": 0.3125,
    "original_max_position_embeddings": 64,
}
ODD = dict(SHAPE, vocab_size=2049, hidden_size=144, head_dim=128, num_attention_heads=3,
           num_key_value_heads=1, attention_bias=False, rope_parameters=YARN)  # fmt: skip


INT4 = dict(SHAPE, intermediate_size=256)  # int4 groups of 64 columns


def model_of(shape: dict, seed: int = 0, quantization: str | None = None) -> torch.nn.Module:
    model = tiny_lm(seed=seed, **shape).bfloat16()
    return quantize(model, quantization) if quantization else model


def fused_calls(prof) -> int:
    return sum(e.count for e in prof.key_averages() if e.key == "glm4::decode_step")


def assert_step_logits_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """A step's logits within bf16 rounding of the module's, and the module's greedy pick, or one
    within bf16 rounding of it (a near-tie, which rounding decides)."""
    torch.testing.assert_close(got, expected, rtol=0, atol=0.02 * expected.abs().max().item())
    picks = torch.stack([got.argmax(-1), expected.argmax(-1)], dim=-1)
    gap = expected.gather(-1, picks).diff(dim=-1).abs()
    assert (gap <= 0.01 * expected.abs().max()).all(), gap.max() / expected.abs().max()


CASES = [(SHAPE, 1, None), (SHAPE, 3, None), (SHAPE, 8, None), (ODD, 1, None), (ODD, 3, None),
         (SHAPE, 1, "int8"), (SHAPE, 3, "int8"), (ODD, 3, "int8"), (ODD, 8, "int8"),
         (INT4, 1, "int4")]  # fmt: skip


@needs_fused
@pytest.mark.parametrize("shape,batch,quantization", CASES)
def test_one_step_equals_the_module_step(shape, batch, quantization, kernel_path):
    """Logits within bf16 rounding of the module's step, the same keys and values (within rounding)
    written to the same slot, nothing else in the cache touched; left-padded rows; bf16, int8 and
    int4 weights."""
    model = model_of(shape, quantization=quantization)
    ids = random_ids(batch, 9, vocab=shape["vocab_size"], seed=batch)
    attention_mask = torch.ones_like(ids)
    attention_mask[1:, :3] = 0  # rows after the first are left-padded
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    caches = [StaticCache.for_model(model, batch, 32) for _ in range(2)]
    step = fused.fused_step(model, batch)
    assert step is not None
    key_mask = torch.zeros(batch, 32, dtype=torch.bool)
    key_mask[:, :9] = attention_mask.bool()
    key_mask[:, 9] = True
    token, position = random_ids(batch, 1, vocab=shape["vocab_size"], seed=7), positions[:, -1:] + 1
    args = (token, position, key_mask[:, None, None, :10])
    with torch.inference_mode():
        for cache in caches:
            model(ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache)
        before = [k.clone() for k in caches[1].keys]
        expected = model.decode_step(*args, caches[0], torch.tensor([9]))
        got = step(*args, caches[1], torch.tensor([9]))
    assert got.dtype == torch.float32 and got.shape == (batch, shape["vocab_size"])
    assert_step_logits_close(got, expected)
    for ours, theirs in zip(
        caches[1].keys + caches[1].values, caches[0].keys + caches[0].values, strict=True
    ):
        # The module adds the k and v biases inside the library's matmul, before rounding.
        scale = theirs.abs().max().item()
        torch.testing.assert_close(ours[:, :, 9], theirs[:, :, 9], rtol=0, atol=0.02 * scale)
        assert torch.equal(ours[:, :, :9], theirs[:, :, :9])
        assert not ours[:, :, 10:].any()
    assert not torch.equal(caches[1].keys[0], before[0])  # slot 9 was written


def assert_greedy_continuation(model, ids, attention_mask, tokens) -> None:
    """Each of `tokens` (B, N) is the module's greedy pick after the ones before it, up to bf16
    rounding: fed back through the module's forward (teacher forced), its logit is within 2% of the
    largest. (Paths that round differently part ways at near-ties, common among bf16 logits, so
    their free-running greedy tokens need not be equal.)"""
    full = torch.cat([ids, tokens], dim=1)
    mask = torch.cat([attention_mask, torch.ones_like(tokens)], dim=1)
    with torch.inference_mode():
        logits = model(full, attention_mask=mask).logits[:, ids.shape[1] - 1 : -1].float()
    picked = logits.gather(-1, tokens[..., None])[..., 0]
    top = logits.max(-1).values
    assert (picked >= top - 0.02 * logits.abs().amax()).all(), (top - picked).max()


def assert_apart_only_at_a_near_tie(model, ids, attention_mask, ours, theirs) -> None:
    """Two free-running greedy generations (B, N) agree until, in a row, their picks are a near-tie
    of the module's logits after the tokens they share: within 2% of the largest logit."""
    for row in range(ours.shape[0]):
        differ = (ours[row] != theirs[row]).nonzero()
        if len(differ) == 0:
            continue
        at = int(differ[0])
        assert at > 0  # the first token comes from the prompt, on one path
        shared = torch.cat([ids[row : row + 1], ours[row : row + 1, :at]], dim=1)
        mask = torch.cat([attention_mask[row : row + 1], torch.ones(1, at, dtype=torch.long)], dim=1)
        with torch.inference_mode():
            logits = model(shared, attention_mask=mask).logits[0, -1].float()
        gap = (logits[ours[row, at]] - logits[theirs[row, at]]).abs()
        assert gap <= 0.02 * logits.abs().max(), (row, at, gap)


@needs_fused
@pytest.mark.parametrize("batch,quantization", [(1, None), (2, None), (2, "int8"), (1, "int4")])
def test_generate_takes_the_fused_step_by_default(batch, quantization):
    """generate's default (compile=None) runs every decode step as one fused call, greedy per the
    module's logits at every step, left padding included; compile=False is the module's step."""
    model = model_of(INT4 if quantization == "int4" else SHAPE, seed=1, quantization=quantization)
    ids = random_ids(batch, 6, vocab=2048, seed=3)
    attention_mask = torch.ones_like(ids)
    attention_mask[1:, :2] = 0

    def generated(compile) -> tuple[torch.Tensor, int]:
        with profile() as prof:
            steps = stream_tokens(
                model, ids, attention_mask, max_new_tokens=24, eos_token_id=[], compile=compile
            )
            tokens = torch.stack(list(steps), dim=1)
        return tokens, fused_calls(prof)

    default, calls = generated(None)
    assert calls == 23  # every step after the prompt's
    assert model.packable_bytes() > 0 or quantization  # the plain weights only: no packed copy
    assert_greedy_continuation(model, ids, attention_mask, default)
    module, module_calls = generated(False)
    assert module_calls == 0
    assert_apart_only_at_a_near_tie(model, ids, attention_mask, default, module)


@needs_fused
def test_engine_takes_the_fused_step(monkeypatch):
    """The serving engine's steps (a slot cache, a cache position per row, slots at different
    lengths, joining and leaving) run fused on the slots in use only, greedy per the module's
    logits; its weights are not packed (the fused step reads the plain ones)."""
    calls, decode_step = [], kernels.decode_step  # the rows of each step
    monkeypatch.setattr(kernels, "decode_step", lambda *a: calls.append(len(a[0])) or decode_step(*a))
    model = model_of(SHAPE, seed=2)
    prompts = [random_ids(1, n, vocab=2048, seed=n)[0].tolist() for n in (3, 7, 5, 9)]
    engine = Engine(model, max_batch_size=3)
    assert isinstance(engine.cache, SlotCache) and engine.fused and not engine.compiled
    assert model.packable_bytes() > 0  # nothing packed
    results = [None] * len(prompts)

    def run(i):
        results[i] = list(engine.generate(prompts[i], SamplingParams(), 6 + 2 * i, set()))

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        engine.shutdown()
    assert len(calls) >= 12 and max(calls) == 3 and min(calls) < 3  # the slots in use
    for i, (prompt, out) in enumerate(zip(prompts, results, strict=True)):
        assert isinstance(out[-1], Finished) and len(out) == 7 + 2 * i
        ids = torch.tensor([prompt])
        assert_greedy_continuation(model, ids, torch.ones_like(ids), torch.tensor([out[:-1]]))


@needs_fused
def test_where_it_applies(monkeypatch, kernel_path):
    model = model_of(SHAPE)
    assert all(fused.applies(model, b) for b in (1, 4, 8))
    assert not fused.applies(model, 9)
    assert not fused.applies(model_of(dict(SHAPE, vocab_size=1024)), 1)  # too small to pay the build
    assert not fused.applies(model_of(dict(SHAPE, head_dim=32, num_attention_heads=8)), 1)  # no kernel
    assert not fused.applies(tiny_lm(**SHAPE), 1)  # float32
    dynamic = dict(SHAPE, rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    assert not fused.applies(model_of(dynamic), 1)
    model.train()
    assert not fused.applies(model, 1)
    model.eval()
    model.model.layers[1].mlp.down_proj.weight.data = model.model.layers[1].mlp.down_proj.weight.data.t()
    assert not fused.applies(model, 1)  # a non-contiguous weight
    model.model.layers[1].mlp.down_proj.weight.data = model.model.layers[1].mlp.down_proj.weight.data.t()
    assert fused.applies(model, 1)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        model.pack_weights()  # oneDNN's packed copy: the compiled step takes 5+ rows
        assert fused.applies(model, 4) and not fused.applies(model, 5)
        model.unpack_weights()
    int8 = model_of(SHAPE, quantization="int8")  # the quantized kernels take up to 32 rows
    assert fused.applies(int8, 1) and fused.applies(int8, 32) and not fused.applies(int8, 33)
    int4 = model_of(INT4, quantization="int4")
    assert fused.applies(int4, 1) and fused.applies(int4, 3) and fused.applies(int4, 32)
    assert not fused.applies(int4, 33)
    assert not fused.applies(quantize(model_of(INT4), "int4", group_size=32), 1)  # no kernel for 32
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not fused.applies(model, 1)  # tensor parallel: its all-reduces are in the modules
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(kernels, "available", lambda op="decode_attention": op != "decode_step")
    assert not fused.applies(model, 1)


@needs_fused
def test_on_amx_tiles_it_takes_32_rows(kernel_path):
    """On AMX tiles the step takes up to 32 rows of a bf16 model whose matmul widths are multiples
    of 32 (SHAPE's down_proj is 200 wide: 8 rows, as on the vector kernel)."""
    even, amx = model_of(INT4), kernel_path == "amx"
    assert fused.applies(even, 32) == amx and fused.applies(even, 9) == amx and not fused.applies(even, 33)
    assert fused.applies(even, 8) and not fused.applies(model_of(SHAPE), 9)
    if amx and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        even.pack_weights()  # the tiles are faster than oneDNN on its copy too
        assert fused.applies(even, 32)


@needs_fused
@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_twenty_rows_equal_the_module_step(quantization, kernel_path):
    """Rows for both of the AMX pass's B tiles (16 + 4; int8 and int4: two passes, of 16 and 4
    rows; on the vector path, int8 passes of 8 rows, int4 passes of 4), and enough for the per-row
    loops to spread over the threads: logits within bf16 rounding of the module's step."""
    model = model_of(INT4, quantization=quantization)
    if not fused.applies(model, 20):
        pytest.skip("no AMX tiles here (bf16 takes 20 rows on them)")
    ids = random_ids(20, 5, vocab=2048, seed=1)
    caches = [StaticCache.for_model(model, 20, 16) for _ in range(2)]
    token, position = random_ids(20, 1, vocab=2048, seed=2), torch.full((20, 1), 5)
    mask = torch.zeros(20, 1, 1, 6, dtype=torch.bool) | True
    with torch.inference_mode():
        for cache in caches:
            model(ids, past_key_values=cache)
        expected = model.decode_step(token, position, mask, caches[0], torch.tensor([5]))
        got = fused.fused_step(model, 20)(token, position, mask, caches[1], torch.tensor([5]))
    assert_step_logits_close(got, expected)


@needs_fused
def test_bad_arguments_raise():
    model = model_of(SHAPE)
    step = fused.fused_step(model, 1)
    cache = StaticCache.for_model(model, 1, 16)
    mask = torch.ones(1, 1, 1, 4, dtype=torch.bool)
    token, position = torch.tensor([[5]]), torch.tensor([[3]])
    with torch.inference_mode():
        step(token, position, mask, cache, torch.tensor([3]))
        with pytest.raises(RuntimeError, match="token id 4096 out of range"):
            step(torch.tensor([[4096]]), position, mask, cache, torch.tensor([3]))
        with pytest.raises(RuntimeError, match="cache slot 16 out of range"):
            step(token, position, mask, cache, torch.tensor([16]))
        with pytest.raises(RuntimeError, match="mask"):
            step(token, position, torch.ones(1, 1, 1, 17, dtype=torch.bool), cache, torch.tensor([3]))
        with pytest.raises(RuntimeError, match="cache"):
            step(token.expand(2, 1), position.expand(2, 1), mask.expand(2, 1, 1, 4), cache, torch.tensor([3]))
        args = (token, position, mask, torch.tensor([3]))
        weights = [p for p in model.parameters()][:-1]
        with pytest.raises(RuntimeError, match="weights"):
            kernels.decode_step(*args, weights, cache.keys, cache.values, torch.ones(16), 1.0, 1e-5, 0.125)


@needs_fused
def test_argmax_kernel_equals_torch():
    """The greedy pick: the first of equal values, the first NaN, all -inf; rows of any length; a
    few rows, and enough to spread over the threads."""
    g = torch.Generator().manual_seed(0)
    for vocab, rows in ((16384, 3), (16399, 3), (151552, 3), (16399, 17)):
        for case in range(5):
            x = torch.randn(rows, vocab, generator=g)
            if case == 1:
                x = x.mul(2).round()  # many equal maxima
            elif case == 2:
                x[1, 77] = x[1, vocab - 3] = float("nan")
            elif case == 3:
                x[:] = float("-inf")
                x[2, vocab - 1] = 0.0
            elif case == 4:
                x[0, vocab - 1] = 100.0  # in the tail past the last block of 16
            assert torch.equal(kernels.argmax(x), x.argmax(-1)), (vocab, case)
    assert kernels.can_argmax(torch.zeros(1, 16384)) and not kernels.can_argmax(torch.zeros(1, 100))
    assert not kernels.can_argmax(torch.zeros(1, 16384, dtype=torch.bfloat16))
    logits = torch.randn(2, 20000, generator=g)
    with profile() as prof:
        token = sample_next(logits, SamplingParams())
    assert torch.equal(token, logits.argmax(-1))
    assert any(e.key == "glm4::argmax" for e in prof.key_averages())


@needs_fused
@pytest.mark.parametrize("shape,company", [(ODD, [2]), (INT4, list(range(1, 20)))])
def test_a_rows_numbers_do_not_depend_on_its_company(shape, company, kernel_path):
    """Run for some batch rows of a larger cache (the engine's slots in use), a row's logits and
    cache writes are the same bits alone or with others (19 others: both B tiles of an AMX pass,
    where the CPU has the tiles), over a context long enough for the attention to split its keys
    (2 threads; one KV head in ODD)."""
    model = model_of(dict(shape, max_position_embeddings=1024))
    slots = max(company) + 1
    if not fused.applies(model, len(company) + 1):
        pytest.skip("no AMX tiles here: the vector kernels take 8 rows")
    cache = SlotCache(model, slots, 512)
    g = torch.Generator().manual_seed(0)
    for t in cache.keys + cache.values:
        t.copy_(torch.randn(t.shape, generator=g))
    key_mask = torch.zeros(slots, 512, dtype=torch.bool)
    key_mask[:, :301] = True
    step = fused.fused_step(model, 2)

    def run(rows: list[int]):
        copy = SlotCache(model, slots, 512)
        for ours, theirs in zip(copy.keys + copy.values, cache.keys + cache.values, strict=True):
            ours.copy_(theirs)
        used = torch.tensor(rows)
        tokens, positions, mask = (used * 7 + 5)[:, None], torch.full((len(rows), 1), 300), key_mask[used]
        with torch.inference_mode():
            logits = step(tokens, positions, mask[:, None, None, :301], copy, positions[:, 0], used)
        return logits, copy

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        alone, alone_cache = run([0])
        together, together_cache = run([*company, 0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone[0], together[-1])
    assert torch.equal(alone_cache.keys[0][0], together_cache.keys[0][0])
    assert torch.equal(alone_cache.values[1][0], together_cache.values[1][0])
    assert not torch.equal(together_cache.keys[0][company[0]], cache.keys[0][company[0]])  # written too
