"""The CPU kernels (glm4/csrc): decode attention against float64 and the float path, prompt attention
against float64 and torch's SDPA, the linears, the fused decode step."""

import os
import subprocess
import sys
from functools import partial

import pytest
import torch
from helpers import random_ids, tiny_lm, with_threads

import glm4.attention
import glm4.linear
from glm4 import kernels
from glm4.cache import DynamicCache

needs_kernel = pytest.mark.skipif(
    not kernels.available(), reason="no C++ compiler, or neither AVX-512F nor AVX2 and FMA here"
)
needs_prompt_kernel = pytest.mark.skipif(
    not kernels.available("prompt_attention"), reason="no C++ compiler or no AVX-512BW and BF16 here"
)


def float_path(q, k, v, mask, scale):
    """glm4's decode attention with the kernel switched off: float copies and einsums."""
    can_decode = kernels.can_decode
    kernels.can_decode = lambda *args: False
    try:
        return glm4.attention.decode_attention(q, k, v, mask, scale)
    finally:
        kernels.can_decode = can_decode


def exact(q, k, v, mask, scale):
    """softmax(q k^T scale) v in float64, the query heads that share a KV head repeated; mask a bool
    of the keys each query sees, or None for all."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, 1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def inputs(batch, kv_heads, group, head_dim, length, masked, seed=0):
    """q, and k, v as views of a longer cache (as decoding slices them), and a padding mask."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, 1, head_dim, generator=g).bfloat16()
    cache = torch.randn(2, batch, kv_heads, length + 37, head_dim, generator=g).mul(2).bfloat16()
    k, v = cache[0, :, :, :length], cache[1, :, :, :length]
    mask = None
    if masked:
        mask = torch.rand(batch, 1, 1, length, generator=g) > 0.3
        mask[..., -1] = True  # the token being decoded always sees itself
    return q, k, v, mask


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 300, 1100])
@pytest.mark.parametrize("shape", [(1, 2, 8, 64), (3, 2, 16, 128), (2, 4, 3, 256)])  # (B, H_kv, G, D)
def test_kernel_equals_the_float_path(shape, length, threads):
    """Blocks of 16 keys and their tails, groups of 8 query heads and their tails, and the key
    chunks that several threads split a row into and merge."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for masked in (False, True):
            q, k, v, mask = inputs(*shape, length, masked)
            scale = shape[-1] ** -0.5
            out = kernels.decode_attention(q, k, v, mask, scale)
            reference = exact(q, k, v, mask, scale)
            # Rounded to bf16 once from float32, as the float path does: within half a bf16 step.
            torch.testing.assert_close(out.double(), reference, rtol=2**-8, atol=1e-5)
            same = (out == float_path(q, k, v, mask, scale)).float().mean().item()
            assert same > 0.99  # the rest differ in the last bit, from float32 sums in another order
    finally:
        torch.set_num_threads(previous)


@needs_kernel
def test_kernel_with_a_chunk_of_hidden_keys_only():
    """A chunk where every key is hidden (left padding, split off by a thread) adds nothing."""
    previous = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        q, k, v, _ = inputs(2, 1, 8, 64, 1100, masked=False)  # 2 rows on 4 threads: 2 chunks a row
        mask = torch.zeros(2, 1, 1, 1100, dtype=torch.bool)
        mask[0, ..., 900:] = True
        mask[1, ..., -1] = True  # one key only
        out = kernels.decode_attention(q, k, v, mask, 0.125)
        torch.testing.assert_close(out.double(), exact(q, k, v, mask, 0.125), rtol=2**-8, atol=1e-5)
    finally:
        torch.set_num_threads(previous)


@needs_kernel
def test_kernel_equals_the_float_path_where_scores_span_hundreds():
    """Scores hundreds apart: the softmax's exponentials of the far ones underflow to 0 (AVX2's from
    e^-87, AVX-512's through the subnormals) and the output stays the exact one, with no NaN."""
    q, k, v, mask = inputs(2, 2, 8, 128, 300, masked=True)
    q = q * 40  # scores spread over about +-500
    scores = q.double() @ k.double().repeat_interleave(8, 1).transpose(-1, -2) * 128**-0.5
    assert (scores.amax(-1) - scores.amin(-1)).min() > 200
    out = kernels.decode_attention(q, k, v, mask, 128**-0.5)
    reference = exact(q, k, v, mask, 128**-0.5)
    torch.testing.assert_close(out.double(), reference, rtol=2**-8, atol=1e-5)


@needs_kernel
def test_kernel_rejects_what_it_has_no_kernel_for():
    q, k, v, _ = inputs(1, 2, 4, 64, 10, masked=False)
    with pytest.raises(RuntimeError, match="head dim 48"):
        kernels.decode_attention(q[..., :48], k[..., :48], v[..., :48], None, 0.1)
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernels.decode_attention(q.float(), k.float(), v.float(), None, 0.1)


def test_where_the_kernel_runs():
    q, k, v, _ = inputs(1, 2, 4, 64, 10, masked=False)
    assert kernels.can_decode(q, k, v) == kernels.available()
    assert not kernels.can_decode(q.float(), k.float(), v.float())  # float32 models keep the float path
    assert not kernels.can_decode(q[..., :32], k[..., :32], v[..., :32])  # no kernel for head dim 32
    q.requires_grad_(True)
    assert not kernels.can_decode(q, k, v)  # training needs gradients, which the kernel has not
    with torch.no_grad():
        assert kernels.can_decode(q, k, v) == kernels.available()


@needs_kernel
def test_bf16_decoding_runs_the_kernel_eager_and_compiled():
    """A bf16 model decodes through the kernel, eager and in the compiled step, and its logits stay
    within bf16 noise of the float path's."""
    from torch.profiler import profile

    from glm4.generation import stream_tokens

    model = tiny_lm(head_dim=64, num_attention_heads=8).bfloat16()
    ids = random_ids(2, 7)

    def logits_of() -> torch.Tensor:
        """Decode steps over a fixed continuation (teacher forced), so the paths meet step by step."""
        cache = DynamicCache()
        with torch.no_grad():
            model(ids[:, :3], past_key_values=cache)
            steps = [model(ids[:, t : t + 1], past_key_values=cache).logits[:, -1] for t in range(3, 7)]
        return torch.stack(steps)

    with_kernel = logits_of().float()
    kernels_can_decode = kernels.can_decode
    kernels.can_decode = lambda *args: False
    try:
        without = logits_of().float()
    finally:
        kernels.can_decode = kernels_can_decode
    torch.testing.assert_close(with_kernel, without, rtol=0, atol=0.05 * without.abs().max().item())

    def generated(compile: bool) -> tuple[torch.Tensor, int]:
        with profile() as prof:
            tokens = list(stream_tokens(model, ids, max_new_tokens=6, eos_token_id=[], compile=compile))
        calls = sum(e.count for e in prof.key_averages() if e.key == "glm4::decode_attention")
        return torch.stack(tokens, dim=1), calls

    eager, eager_calls = generated(False)
    generated(True)  # compiles (and runs the op while compiling)
    compiled, compiled_calls = generated(True)
    layers = model.config.num_hidden_layers
    assert eager_calls == compiled_calls == 5 * layers  # every step after the prompt's first token
    assert torch.equal(compiled, eager)


def prompt_inputs(batch, kv_heads, group, head_dim, queries, keys, masked, seed=0):
    """q for the last `queries` of `keys` positions, k and v as views of a longer cache, and a
    mask of the keys each query sees (causal, some padding hidden; each query sees one at least)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, queries, head_dim, generator=g).bfloat16()
    cache = torch.randn(2, batch, kv_heads, keys + 37, head_dim, generator=g).mul(2).bfloat16()
    k, v = cache[0, :, :, :keys], cache[1, :, :, :keys]
    mask = torch.arange(keys)[None] <= (keys - queries + torch.arange(queries))[:, None]
    mask = mask[None, None].expand(batch, 1, queries, keys)
    if masked:
        mask = mask & (torch.rand(batch, 1, 1, keys, generator=g) > 0.3)
        mask = mask | ~mask.any(-1, keepdim=True)
    return q, k, v, mask


@needs_prompt_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("queries", "keys"), [(1, 1), (5, 5), (64, 64), (100, 100), (70, 300), (17, 1000)])
@pytest.mark.parametrize("shape", [(1, 2, 8, 64), (2, 2, 6, 128), (1, 1, 3, 256)])  # (B, H_kv, G, D)
def test_prompt_kernel_is_as_close_to_exact_as_sdpa(shape, queries, keys, threads):
    """Blocks of 64 keys and the last partial one, micro-tiles of 4 rows and their tails (groups
    of 6 and 3 query heads), causal past an offset (a chunk over the cache before it) and under a
    mask, items split over threads: as close to the float64 result as torch's SDPA in bf16, which
    also rounds its softmax weights to bf16."""
    scale = shape[-1] ** -0.5
    for masked in (False, True):
        q, k, v, mask = prompt_inputs(*shape, queries, keys, masked)
        out = with_threads(
            threads, partial(kernels.prompt_attention, q, k, v, mask if masked else None, scale)
        )
        reference = exact(q, k, v, mask, scale)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, scale=scale, enable_gqa=True)
        ours, theirs = (out.double() - reference).abs(), (sdpa.double() - reference).abs()
        assert ours.max() <= 1.5 * theirs.max() + 1e-3
        assert ours.mean() <= 1.25 * theirs.mean() + 1e-5
        if masked:  # a mask of the causal part alone gives the causal result
            causal = prompt_inputs(*shape, queries, keys, False)[3]
            assert torch.equal(
                kernels.prompt_attention(q, k, v, causal, scale),
                kernels.prompt_attention(q, k, v, None, scale),
            )


@needs_prompt_kernel
def test_prompt_kernel_gives_zeros_where_a_query_sees_nothing():
    q, k, v, mask = prompt_inputs(1, 2, 4, 64, 10, 80, masked=False)
    mask = mask.clone()
    mask[..., 3, :] = False
    out = kernels.prompt_attention(q, k, v, mask, 0.125)
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    keep = torch.ones(10, dtype=torch.bool)
    keep[3] = False
    torch.testing.assert_close(
        out[:, :, keep].double(), exact(q, k, v, mask, 0.125)[:, :, keep], rtol=0, atol=0.02
    )


def test_where_the_prompt_kernel_runs():
    q, k, v, _ = prompt_inputs(1, 2, 4, 64, 10, 10, masked=False)
    assert kernels.can_prompt(q, k, v) == kernels.available("prompt_attention")
    assert not kernels.can_prompt(q.float(), k.float(), v.float())
    assert not kernels.can_prompt(q[..., :32], k[..., :32], v[..., :32])
    q.requires_grad_(True)
    assert not kernels.can_prompt(q, k, v)


@needs_prompt_kernel
def test_bf16_prompts_run_the_prompt_kernel_chunked_or_whole():
    """A bf16 model's prompt (whole, or in chunks over the cache before them) goes through the
    kernel, not in training; its logits stay within bf16 noise of SDPA's, and chunks of any size
    agree with the whole prompt."""
    from torch.profiler import profile

    from glm4.generation import prefill

    model = tiny_lm(head_dim=64, num_attention_heads=8, max_position_embeddings=512).bfloat16()
    ids = random_ids(1, 300)

    def last_logits(chunk: int) -> tuple[torch.Tensor, int]:
        with torch.no_grad(), profile() as prof:
            logits = prefill(model, ids, torch.ones_like(ids), torch.arange(300)[None], DynamicCache(), chunk)
        return logits, sum(e.count for e in prof.key_averages() if e.key == "glm4::prompt_attention")

    whole, calls = last_logits(512)
    layers = model.config.num_hidden_layers
    assert calls == layers
    for chunk in (64, 100):
        chunked, calls = last_logits(chunk)
        assert calls == layers * -(-300 // chunk)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=0.02 * whole.abs().max().item())
    can_prompt = kernels.can_prompt
    kernels.can_prompt = lambda *args: False
    try:
        sdpa, calls = last_logits(100)
    finally:
        kernels.can_prompt = can_prompt
    assert calls == 0
    torch.testing.assert_close(whole, sdpa, rtol=0, atol=0.02 * sdpa.abs().max().item())
    model.train()
    with profile() as prof:
        model(ids[:, :20]).logits.sum().backward()  # training: torch's attention, with its gradients
    assert not any(e.key == "glm4::prompt_attention" for e in prof.key_averages())


def test_kernel_cache_builds_once(tmp_path, monkeypatch, caplog):
    """A library is built once per source, command and CPU (and says so: it takes a while), and
    found again after that."""
    import ctypes
    import logging
    import subprocess

    source = tmp_path / "answer.cpp"
    source.write_text('extern "C" int answer() { return 42; }\n')
    other = tmp_path / "other.cpp"  # sources are compiled side by side, then linked together
    other.write_text('extern "C" int other() { return 7; }\n')
    with caplog.at_level(logging.INFO, logger="glm4"):
        first = kernels.build([source, other], tmp_path / "cache")
    assert "building the CPU kernels" in caplog.text
    assert ctypes.CDLL(str(first)).answer() == 42 and ctypes.CDLL(str(first)).other() == 7

    def no_compiler(*args, **kwargs):
        raise AssertionError("built again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert kernels.build([source, other], tmp_path / "cache") == first
    source.write_text('extern "C" int answer() { return 43; }\n')
    with pytest.raises(AssertionError, match="built again"):
        kernels.build([source, other], tmp_path / "cache")
    monkeypatch.undo()
    other.write_text("this is not C++\n")
    with pytest.raises(subprocess.CalledProcessError):
        kernels.build([source, other], tmp_path / "cache")


def test_without_a_compiler_decoding_keeps_the_float_path(tmp_path, monkeypatch):
    monkeypatch.setenv("GLM4_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels, "_supported", None)
    assert not kernels.available()
    model = tiny_lm(head_dim=64, num_attention_heads=8).bfloat16()
    out = model.generate(random_ids(1, 5), max_new_tokens=4, eos_token_id=[], compile=False)
    assert out.shape == (1, 9)
    monkeypatch.setattr(kernels, "_supported", None)
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("GLM4_CPU_KERNELS", "0")
    assert not kernels.available()


def int4_layer(out_features: int, in_features: int, group_size: int, seed: int = 0):
    from glm4.quantization import Int4Linear

    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=True).bfloat16()
    return Int4Linear.from_linear(linear, group_size)


needs_int4_kernel = pytest.mark.skipif(
    not kernels.available("int4_linear"), reason="no C++ compiler, or no AVX-512BW and BF16 here"
)


@needs_int4_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "shape",  # (N, K, group): on AMX, N % 16 != 0 in the last, and groups past 16
    [(48, 64, 64), (304, 256, 128), (1008, 512, 256), (96, 1024, 64), (40, 1152, 64)],
)
def test_int4_kernel_equals_the_dequantized_weight(shape, threads, kernel_path):
    """One row times the stored int4 layout: (q - 8) * scale + zero per group, at least as close to
    the float32 product as torch's int4 kernel."""
    out_features, in_features, group_size = shape
    layer = int4_layer(out_features, in_features, group_size)
    x = torch.randn(1, 1, in_features).bfloat16()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = kernels.int4_linear(x, layer.weight, layer.scales_and_zeros, group_size)
    finally:
        torch.set_num_threads(previous)
    exact = x.double() @ layer.dequantize().double().T
    if layer.packed is not None:
        kernel = torch.ops.aten._weight_int4pack_mm_for_cpu
        theirs = kernel(x[0], layer.packed, group_size, layer.packed_scales)
    else:  # torch's kernel takes N % 16 == 0 only: the float32 product, rounded once
        theirs = torch.nn.functional.linear(x[0].float(), layer.dequantize()).bfloat16()
    assert ours.shape == (1, 1, out_features)
    scale = exact.abs().max().item()
    our_error = (ours.double() - exact).abs().max().item()
    their_error = (theirs.double() - exact[0]).abs().max().item()
    assert our_error <= max(1.5 * their_error, 2**-8 * scale)


@needs_int4_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [3, 9, 20])
@pytest.mark.parametrize("shape", [(301, 576, 64), (300, 512, 128), (48, 1024, 256)])
def test_int4_kernel_rows_are_each_rows_product(shape, rows, threads, kernel_path):
    """Several rows at once (passes of 4 on the vector path, an odd count of weight rows leaving one
    alone, half a block of 128 columns at the end of 576): each row's product with the dequantized
    weight, within bf16 rounding of the float32 sums."""
    out_features, in_features, group_size = shape
    layer = int4_layer(out_features, in_features, group_size, seed=rows)
    x = torch.randn(rows, in_features).bfloat16()
    ours = with_threads(
        threads, lambda: kernels.int4_linear(x, layer.weight, layer.scales_and_zeros, group_size)
    )
    exact = x.double() @ layer.dequantize().double().T
    scale = exact.abs().amax(-1, keepdim=True)
    assert ((ours.double() - exact).abs() <= 2**-8 * scale).all()
    assert (ours.double() - exact).abs().mean() <= 2**-11 * scale.mean()


@needs_int4_kernel
@pytest.mark.parametrize("rows", [17, 20])
@pytest.mark.parametrize("shape", [(304, 256, 128), (301, 576, 64)])
def test_int4_kernel_rows_do_not_depend_on_the_batch(shape, rows, kernel_path):
    """Several rows at once (on AMX tiles, passes of 16 and 1, or 16 and 4; on the vectors, passes
    of 4 rows) give each row the bits it gets alone, or among any others."""
    out_features, in_features, group_size = shape
    layer = int4_layer(out_features, in_features, group_size)
    x = torch.randn(rows, in_features).bfloat16()

    def product(rows: torch.Tensor) -> torch.Tensor:
        return kernels.int4_linear(rows, layer.weight, layer.scales_and_zeros, group_size)

    together = product(x)
    alone = torch.cat([product(x[i : i + 1]) for i in range(rows)])
    assert torch.equal(together, alone)
    threes = torch.cat([product(x[i : i + 3]) for i in range(0, rows - 2, 3)])
    assert torch.equal(threes, together[: rows // 3 * 3])


@needs_int4_kernel
def test_int4_layers_take_the_kernel_by_rows(kernel_path, monkeypatch):
    """Up to 32 rows on either path (2 on the AVX2 one); more rows: torch's int4 kernel or the
    weight dequantized into the library's matmul. A row's outputs are the same bits alone or in the
    batch."""
    from glm4.quantization import int4_kernel_rows

    layer = int4_layer(64, 128, 64)
    limit = int4_kernel_rows()
    assert limit == (2 if kernels.avx2() else 32)
    calls = []
    kernel = kernels.int4_linear
    monkeypatch.setattr(kernels, "int4_linear", lambda *args: calls.append(1) or kernel(*args))

    def run(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        calls.clear()
        with torch.no_grad():
            return layer(x), bool(calls)

    rows = torch.randn(limit + 1, 1, 128).bfloat16()
    assert [run(rows[:n])[1] for n in (1, limit, limit + 1)] == [True, True, False]
    for i in (0, limit - 1):
        ours, alone = run(rows[:limit])[0][i], run(rows[i : i + 1])[0][0]
        assert torch.equal(ours, alone)
    assert not kernels.can_int4(torch.randn(1, 128).bfloat16(), 32)  # groups of 32: torch's kernel
    assert not kernels.can_int4(torch.randn(1, 384).bfloat16(), 192)  # neither 64 nor a multiple of 128
    for group in (192, 0):  # the op itself refuses them too (0 before dividing by it)
        with pytest.raises(RuntimeError, match="no kernel for group size"):
            torch.ops.glm4.int4_linear(
                torch.randn(1, 384).bfloat16(),
                layer.weight.new_zeros(64, 192),
                torch.zeros(64, 2, 2).bfloat16(),
                group,
            )
    assert not kernels.can_int4(torch.randn(1, 128), 64)  # float32


@needs_int4_kernel
@pytest.mark.parametrize("shape", [(48, 64, 64), (304, 256, 128), (17, 512, 256), (40, 96, 32)])
def test_int4_dequantize_kernel_is_the_python_dequantize(shape):
    """The same bf16 weight as `Int4Linear.dequantize().bfloat16()`, bit for bit."""
    out_features, in_features, group_size = shape
    layer = int4_layer(out_features, in_features, group_size, seed=sum(shape))
    ours = kernels.int4_dequantize(layer.weight, layer.scales_and_zeros, group_size)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, layer.dequantize().bfloat16())


@needs_int4_kernel
def test_int4_layers_dequantize_into_the_matmul_for_many_rows(kernel_path, monkeypatch):
    """Prefill-sized inputs (16 rows or more, and more than the int4 kernel takes): the weight
    dequantized by glm4's kernel into the library's bf16 matmul, the same numbers as the Python
    dequantize would give; fewer rows keep the int4 kernels, and toy layers (fewer than
    BF16_LINEAR_MIN_WEIGHT weights) the Python path."""
    from glm4.linear import QUANTIZED_KERNEL_ROWS
    from glm4.quantization import INT4_DEQUANTIZE_ROWS

    layer = int4_layer(512, 1024, 64)
    calls = []
    kernel = kernels.int4_dequantize
    monkeypatch.setattr(kernels, "int4_dequantize", lambda *args: calls.append(1) or kernel(*args))
    with torch.no_grad():
        x = torch.randn(max(INT4_DEQUANTIZE_ROWS, QUANTIZED_KERNEL_ROWS + 1), 1, 1024).bfloat16()
        y = layer(x)
        assert calls == [1]
        assert torch.equal(y, torch.nn.functional.linear(x, layer.dequantize().bfloat16()) + layer.bias)
        layer(x[: INT4_DEQUANTIZE_ROWS - 1])  # glm4's int4 kernel
        assert calls == [1]
    assert not kernels.can_int4_dequantize(x, int4_layer(64, 128, 64).weight)
    assert not kernels.can_int4_dequantize(x.float(), layer.weight)


@needs_int4_kernel
def test_int4_model_decodes_through_the_kernel_compiled():
    from torch.profiler import profile

    from glm4.generation import stream_tokens
    from glm4.quantization import int4_kernel_rows, quantize

    model = quantize(tiny_lm(hidden_size=128, intermediate_size=256).bfloat16(), "int4")
    ids = random_ids(1, 5)
    eager = torch.stack(list(stream_tokens(model, ids, max_new_tokens=6, eos_token_id=[], compile=False)), 1)
    list(stream_tokens(model, ids, max_new_tokens=6, eos_token_id=[], compile=True))  # compiles
    with profile() as prof:
        compiled = torch.stack(
            list(stream_tokens(model, ids, max_new_tokens=6, eos_token_id=[], compile=True)), 1
        )
    calls = sum(e.count for e in prof.key_averages() if e.key == "glm4::int4_linear")
    layers = model.config.num_hidden_layers
    # q, k, v, o, gate_up, down and the head in each of 5 decode steps; the prompt's last-row head
    # and the 5-row prompt's projections (not on the AVX2 kernel: 2 rows at most)
    prompt = 6 * layers if int4_kernel_rows() >= 5 else 0
    assert calls == 5 * (6 * layers + 1) + 1 + prompt
    assert torch.equal(compiled, eager)


@needs_kernel
def test_a_compiled_step_asks_for_the_kernels_before_tracing(monkeypatch):
    """Tracing cannot build the library: the compiled step's first use must, or a fresh process
    would decode on the float path (here "fresh": nothing has asked yet)."""
    from torch.profiler import profile

    from glm4.generation import stream_tokens

    monkeypatch.setattr(kernels, "_supported", None)
    model = tiny_lm(seed=2, head_dim=64, num_attention_heads=8).bfloat16()
    with profile() as prof:
        list(stream_tokens(model, random_ids(1, 5), max_new_tokens=4, eos_token_id=[], compile=True))
    assert any(e.key == "glm4::decode_attention" for e in prof.key_averages())


# -- bf16_linear: a few rows of bf16 x times a bf16 weight ----------------------------------------

needs_bf16_linear = pytest.mark.skipif(
    not kernels.available("bf16_linear"), reason="no C++ compiler, or no AVX-512BW and BF16 here"
)


@needs_bf16_linear
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "shape",  # (rows of x, N, K): one pass and several, odd N (an unpaired middle row), K % 32 != 0;
    # on AMX: one B tile and two, N % 16 != 0, two passes
    [
        (1, 64, 64),
        (2, 33, 40),
        (8, 130, 1000),
        (9, 257, 96),
        (19, 64, 2816),
        (3, 1, 7),
        (17, 31, 128),
        (40, 20, 64),
    ],  # fmt: skip
)
def test_bf16_linear_equals_the_float64_product(shape, threads, kernel_path):
    """At least as close to the exact product as the library's bf16 matmul, rounded to bf16 once."""
    rows, n, k = shape
    g = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, 1, k, generator=g).bfloat16()
    weight = (torch.randn(n, k, generator=g) * k**-0.5).bfloat16()
    ours = with_threads(threads, lambda: kernels.bf16_linear(x, weight))
    exact = x.double() @ weight.double().T
    theirs = torch.nn.functional.linear(x, weight)
    assert ours.shape == (rows, 1, n) and ours.dtype == torch.bfloat16
    scale = exact.abs().max().item()
    our_error = (ours.double() - exact).abs().max().item()
    their_error = (theirs.double() - exact).abs().max().item()
    assert our_error <= max(1.5 * their_error, 2**-8 * scale)


@needs_bf16_linear
@pytest.mark.parametrize("k", [1000, 1024])  # K % 32 != 0 takes the vector path, AMX or not
def test_bf16_linear_rows_do_not_depend_on_the_batch_or_the_threads(k, kernel_path):
    """Each output is one thread's sum in a fixed order: a row gives the same bits alone or among
    others (more than one AMX pass of 32 rows too), on any number of threads (so a sequence decodes
    alike alone or in the server's batch)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, k, generator=g).bfloat16()
    weight = torch.randn(301, k, generator=g).bfloat16()
    together = with_threads(1, lambda: kernels.bf16_linear(x, weight))
    for threads in (2, 4):
        assert torch.equal(with_threads(threads, lambda: kernels.bf16_linear(x, weight)), together)
    for i in range(37):
        assert torch.equal(kernels.bf16_linear(x[i : i + 1], weight), together[i : i + 1])
    for rows in (2, 3, 4):  # on AVX2 2 rows take a pass each, 3 and 4 passes of 2 rows and the rest
        assert torch.equal(kernels.bf16_linear(x[:rows], weight), together[:rows])


def test_amx_runs_where_the_cpu_has_it():
    """The bf16 kernel takes the AMX tiles by default where the CPU has them, and can be switched off."""
    flags = set(kernels._cpu_flags().split())  # the line kernels.build keys its library on
    has_amx = {"amx_tile", "amx_bf16"} <= flags and kernels.available("bf16_linear")
    assert kernels.set_amx() == has_amx
    try:
        assert kernels.set_amx(False) is False
        assert kernels.set_amx(True) == has_amx
    finally:
        kernels.set_amx(True)


def test_glm4_amx_0_starts_a_process_with_the_tiles_off():
    code = "from glm4 import kernels; print(kernels.set_amx())"

    def amx_in_a_process(**env) -> str:
        command = [sys.executable, "-c", code]
        run = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    assert amx_in_a_process(GLM4_AMX="0") == "False"
    assert amx_in_a_process(GLM4_AMX="1") == str(kernels.set_amx())


def test_prefetch_rows_by_vendor_and_setting():
    """The rows from which the vector kernels ask for lines ahead: GLM4_PREFETCH_ROWS where set,
    else 3 on AMD CPUs and 1 elsewhere; a setting that is not a whole number >= 1 is refused."""
    assert kernels.prefetch_rows_default("vendor_id\t: AuthenticAMD\n") == 3
    assert kernels.prefetch_rows_default("vendor_id\t: GenuineIntel\n") == 1
    assert kernels.prefetch_rows_default("") == 1
    assert kernels.prefetch_rows_default("vendor_id\t: AuthenticAMD\n", "1") == 1
    assert kernels.prefetch_rows_default("vendor_id\t: GenuineIntel\n", "8") == 8
    for bad in ("0", "-2", "two"):
        with pytest.raises(ValueError, match="GLM4_PREFETCH_ROWS"):
            kernels.prefetch_rows_default("", bad)


@needs_bf16_linear
def test_prefetching_changes_no_numbers():
    """Asking for lines ahead or not (set_prefetch_rows), the bf16, int8 and int4 products give the
    same bits, at 1 and 5 rows; the setting sticks, is read back, and the default is the vendor's."""
    from glm4.quantization import Int4Linear, Int8Linear

    vendor, setting = kernels._cpuinfo("vendor_id"), os.environ.get("GLM4_PREFETCH_ROWS")
    default = kernels.prefetch_rows_default(vendor, setting)
    assert kernels.set_prefetch_rows() == default
    torch.manual_seed(0)
    linear = torch.nn.Linear(640, 300, bias=False).bfloat16()
    int8, int4 = Int8Linear.from_linear(linear), Int4Linear.from_linear(linear)
    products = [lambda x: kernels.bf16_linear(x, linear.weight)]
    if kernels.available("int8_linear"):
        products.append(lambda x: kernels.int8_linear(x, int8.weight, int8.scales))
    if kernels.available("int4_linear"):
        products.append(lambda x: kernels.int4_linear(x, int4.weight, int4.scales_and_zeros, int4.group_size))
    try:
        for rows in (1, 5):
            x = torch.randn(rows, 640).bfloat16()
            asked = [kernels.set_prefetch_rows(1) == 1 and product(x) for product in products]
            alone = [kernels.set_prefetch_rows(1000) == 1000 and product(x) for product in products]
            for a, b in zip(asked, alone, strict=True):
                assert torch.equal(a, b)
        with pytest.raises(ValueError):
            kernels.set_prefetch_rows(0)
    finally:
        kernels.set_prefetch_rows(default)


@needs_bf16_linear
def test_bf16_linear_rejects_what_it_has_no_kernel_for():
    weight = torch.randn(8, 64).bfloat16()
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernels.bf16_linear(torch.randn(1, 64), weight)
    with pytest.raises(RuntimeError, match="weight"):
        kernels.bf16_linear(torch.randn(1, 32).bfloat16(), weight)


def test_where_bf16_linear_runs():
    x = torch.randn(2, 512).bfloat16()
    weight = torch.randn(512, 512).bfloat16()  # 2**18 elements: just large enough
    built = kernels.available("bf16_linear")
    assert kernels.can_bf16_linear(x, weight) == built
    assert not kernels.can_bf16_linear(x, weight[:-1])  # a toy model's weight: the call costs more
    assert not kernels.can_bf16_linear(x, weight.t())  # not contiguous: it would be copied
    assert not kernels.can_bf16_linear(x.float(), weight.float())
    weight.requires_grad_(True)
    assert not kernels.can_bf16_linear(x, weight)  # training: no gradients here
    with torch.no_grad():
        assert kernels.can_bf16_linear(x, weight) == built


@needs_bf16_linear
@pytest.mark.parametrize("width", [512, 520])
def test_linear_layers_choose_the_kernel_by_rows(width, kernel_path, monkeypatch):
    """Up to 8 rows on the plain weight; with a packed copy, up to 4 rows (oneDNN is faster on its
    copy from 5 rows); more rows: oneDNN. On AMX tiles (a width that is a multiple of 32) up to 32
    rows, packed copy or not; on the AVX2 kernel up to 4 rows either way."""
    layer = glm4.linear.Linear(width, 1024, bias=True).bfloat16()
    amx = kernel_path == "amx" and width % 32 == 0
    calls = []
    kernel, packed = kernels.bf16_linear, glm4.linear.packed_linear
    monkeypatch.setattr(kernels, "bf16_linear", lambda *a: calls.append("kernel") or kernel(*a))
    monkeypatch.setattr(glm4.linear, "packed_linear", lambda *a: calls.append("packed") or packed(*a))

    def run(rows: int) -> str | None:
        calls.clear()
        x = torch.randn(rows, 1, width).bfloat16()
        with torch.no_grad():
            y = layer(x)
        reference = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
        torch.testing.assert_close(y.float(), reference, atol=0.05, rtol=0.02)
        return calls[0] if calls else None

    if amx:
        assert [run(r) for r in (1, 9, 32, 33)] == ["kernel", "kernel", "kernel", None]
    elif kernels.avx2():
        assert [run(r) for r in (1, 2, 4, 5)] == ["kernel", "kernel", "kernel", None]
    else:
        assert [run(r) for r in (1, 2, 8, 9)] == ["kernel", "kernel", "kernel", None]
    if glm4.linear.can_pack(layer.weight):
        layer.pack()
        if amx:
            assert [run(r) for r in (1, 5, 32, 33)] == ["kernel", "kernel", "kernel", "packed"]
        elif kernels.avx2():
            assert [run(r) for r in (1, 4, 5)] == ["kernel", "kernel", "packed"]
        else:
            assert [run(r) for r in (1, 4, 5, 9)] == ["kernel", "kernel", "packed", "packed"]
    x = torch.randn(2, width).bfloat16()
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))  # autograd on


@needs_bf16_linear
@pytest.mark.parametrize("batch", [1, 3])
def test_bf16_model_decodes_through_bf16_linear(batch, monkeypatch):
    """A bf16 model's decode steps run every matmul in the kernel, eager and compiled, within bf16
    noise of the library's, compiled == eager."""
    from torch.profiler import profile

    from glm4.cache import DynamicCache
    from glm4.generation import stream_tokens

    monkeypatch.setattr(kernels, "BF16_LINEAR_MIN_WEIGHT", 0)  # the tiny model's weights too
    model = tiny_lm(seed=3).bfloat16()
    ids = random_ids(batch, 36)  # a prompt of more than 32 rows: the library's GEMM (AMX tiles or not)

    def logits_of() -> torch.Tensor:
        cache = DynamicCache()
        with torch.no_grad():
            model(ids[:, :33], past_key_values=cache)
            steps = [model(ids[:, t : t + 1], past_key_values=cache).logits[:, -1] for t in range(33, 36)]
        return torch.stack(steps).float()

    with_kernel = logits_of()
    can = kernels.can_bf16_linear
    monkeypatch.setattr(kernels, "can_bf16_linear", lambda *args: False)
    without = logits_of()
    monkeypatch.setattr(kernels, "can_bf16_linear", can)
    torch.testing.assert_close(with_kernel, without, rtol=0, atol=0.02 * without.abs().max().item())

    def generated(compile: bool) -> tuple[torch.Tensor, int]:
        with profile() as prof:
            tokens = stream_tokens(model, ids, max_new_tokens=5, eos_token_id=[], compile=compile, pack=False)
            tokens = torch.stack(list(tokens), dim=1)
        return tokens, sum(e.count for e in prof.key_averages() if e.key == "glm4::bf16_linear")

    eager, eager_calls = generated(False)
    generated(True)  # compiles
    compiled, compiled_calls = generated(True)
    per_step = 6 * model.config.num_hidden_layers + 1  # q, k, v, o, gate_up, down; the head
    # 4 decode steps after the prompt's token, whose last positions (1 or 3 rows) go through the head
    assert eager_calls == compiled_calls == 4 * per_step + 1
    assert torch.equal(compiled, eager)


# -- the AVX2 build (csrc/avx2.h, attention.h's 8-lane vectors), on a CPU without AVX-512 ---------

AVX2_RUN = "GLM4_TEST_AVX2"  # set in the run below: the kernels it loads must be the AVX2 ones
AVX2_TESTS = (
    "int4 or int8 or bf16_linear or linear_layers or bf16_model or prefetching or avx2"
    " or kernel_equals_the_float_path or hidden_keys or kernel_rejects or where_the_kernel_runs"
    " or bf16_decoding_runs_the_kernel"
)


@pytest.mark.skipif(not os.environ.get(AVX2_RUN), reason="only in the AVX2 build's run")
def test_the_avx2_run_loads_the_avx2_kernels():
    assert kernels.avx2()
    assert kernels.available("int8_linear") and kernels.available("int4_linear")
    assert kernels.available("decode_attention")
    assert not kernels.available("decode_step")  # the fused step and the prompt kernel stay AVX-512 BF16
    assert not kernels.available("prompt_attention")


@pytest.mark.skipif(
    os.environ.get(AVX2_RUN) or not {"avx2", "fma"} <= set(kernels._cpu_flags().split()) or kernels.avx2(),
    reason="no AVX2 and FMA here, or this run's kernels are already the AVX2 ones",
)
def test_the_kernels_built_for_avx2_pass_their_tests(tmp_path):
    """The linears' and the decode attention's tests again, in a process whose kernels are built
    without AVX-512 (as on a CPU without it: most desktop and laptop CPUs) and whose torch kernels
    and inductor code are held to AVX2 (in a cache of their own: inductor's cached code is not keyed
    on that)."""
    compiler = tmp_path / "g++-avx2"
    compiler.write_text(f'#!/bin/sh\nexec {os.environ.get("CXX", "g++")} "$@" -mno-avx512f\n')
    compiler.chmod(0o755)
    env = dict(os.environ, CXX=str(compiler), GLM4_KERNEL_CACHE=str(tmp_path / "kernels"))
    env.update(ATEN_CPU_CAPABILITY="avx2", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    env[AVX2_RUN] = "1"
    here = os.path.dirname(__file__)
    files = [os.path.join(here, "test_kernels.py"), os.path.join(here, "test_int8_linear.py")]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", "-k", AVX2_TESTS, *files],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "PASSED tests/test_kernels.py::test_the_avx2_run_loads_the_avx2_kernels" in run.stdout
    assert "PASSED tests/test_kernels.py::test_kernel_equals_the_float_path" in run.stdout
