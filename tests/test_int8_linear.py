"""glm4's int8 kernel (glm4/csrc/int8.h, int8_linear.cpp): x @ (q * scale).T for a few rows of bf16 x,
against the exact product, on its vector and AMX-INT8 paths."""

import pytest
import torch
from helpers import with_threads

from glm4 import kernels
from glm4.linear import QUANTIZED_KERNEL_ROWS
from glm4.quantization import Int8Linear

needs_int8_kernel = pytest.mark.skipif(
    not kernels.available("int8_linear"), reason="no C++ compiler, or no AVX-512BW, VL and BF16 here"
)


def operands(rows: int, n: int, k: int, seed: int = 0):
    """bf16 x with a few large values (as activations have), an int8 weight and bf16 scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x = torch.where(torch.rand(rows, k, generator=g) < 0.01, x * 40, x).bfloat16()
    weight = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    scales = (torch.rand(n, generator=g) * 0.01 + 1e-4).bfloat16()
    return x, weight, scales


@needs_int8_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "shape",
    [
        (1, 512, 1024),
        (3, 301, 1024),  # the last block of 16 weight rows has 13
        (8, 64, 2816),  # the vector path: one pass
        (9, 64, 2816),  # the vector path: passes of 8 rows and 1
        (16, 300, 1024),  # AMX: one pass, the rows' 48 digits in three tiles
        (17, 300, 1024),  # AMX: passes of 16 rows and 1
        (33, 40, 512),  # AMX: three passes
        (5, 300, 1000),  # a width the tiles do not take: the vector path on any CPU
    ],  # fmt: skip
)
def test_int8_linear_is_the_exact_product_rounded_once(shape, threads, kernel_path):
    """Products exact (the tiles: x split exactly into 8-bit digits; the vectors: q widened to bf16),
    sums in int32 or float32: the exact product rounded to bf16, but for a rare output at a rounding
    tie."""
    x, weight, scales = operands(*shape, seed=sum(shape))
    ours = with_threads(threads, lambda: kernels.int8_linear(x, weight, scales))
    exact = x.double() @ (weight.double() * scales.double()[:, None]).T
    assert ours.shape == exact.shape and ours.dtype == torch.bfloat16
    assert (ours == exact.bfloat16()).float().mean() >= 0.999
    assert ((ours.double() - exact).abs() <= 2**-7 * exact.abs() + 1e-6 * exact.abs().max()).all()


@needs_int8_kernel
def test_int8_linear_rows_do_not_depend_on_the_batch_or_the_threads(kernel_path):
    """A row's outputs are the same alone or among others (several AMX passes, or passes of 8 rows
    on the vector path), on any number of threads, so a sequence decodes alike alone or in the
    server's batch."""
    x, weight, scales = operands(32, 301, 1024)
    together = with_threads(1, lambda: kernels.int8_linear(x, weight, scales))
    assert torch.equal(with_threads(2, lambda: kernels.int8_linear(x, weight, scales)), together)
    for i in (0, 7, 8, 14, 15, 31):
        assert torch.equal(kernels.int8_linear(x[i : i + 1], weight, scales), together[i : i + 1])


@needs_int8_kernel
def test_int8_linear_keeps_nan_and_zero_rows_to_themselves(kernel_path):
    """A row with a NaN gives NaN outputs, one with an infinity no finite ones (the tiles: NaN), a
    row of zeros zeros; the other rows are as without them."""
    x, weight, scales = operands(4, 64, 1024)
    clean = kernels.int8_linear(x, weight, scales)
    x[1, 7], x[2, 9], x[3] = float("nan"), float("inf"), 0
    y = kernels.int8_linear(x, weight, scales)
    assert y[1].isnan().all() and not y[2].isfinite().any() and torch.equal(y[3], torch.zeros_like(y[3]))
    assert torch.equal(y[0], clean[0])


def test_where_int8_linear_runs():
    x = torch.randn(2, 512).bfloat16()
    weight = torch.zeros(512, 512, dtype=torch.int8)  # 2**18 elements: just large enough
    built = kernels.available("int8_linear")
    assert kernels.can_int8(x, weight) == built
    assert not kernels.can_int8(x, weight[:-1])  # a toy model's weight: the call costs more
    assert not kernels.can_int8(x, weight.t())  # not contiguous: it would be copied
    assert not kernels.can_int8(x.float(), weight)
    assert not kernels.can_int8(x.requires_grad_(True), weight)  # training: no gradients here


@needs_int8_kernel
@pytest.mark.parametrize("width", [512, 544])
def test_int8_layers_take_the_kernel_by_rows(width, kernel_path, monkeypatch):
    """Up to 32 rows on either path (the AMX tiles take widths that are a multiple of 64); more
    rows: the library's matmul on the weight widened to bf16. The same numbers within bf16 rounding
    either way."""
    layer = Int8Linear.from_linear(torch.nn.Linear(width, 1024, bias=True).bfloat16())
    calls = []
    kernel = kernels.int8_linear
    monkeypatch.setattr(kernels, "int8_linear", lambda *a: calls.append(1) or kernel(*a))

    def run(rows: int) -> bool:
        calls.clear()
        x = torch.randn(rows, 1, width).bfloat16()
        with torch.no_grad():
            y = layer(x)
        reference = torch.nn.functional.linear(x.double(), layer.dequantize().double(), layer.bias.double())
        torch.testing.assert_close(y.double(), reference, atol=0.02, rtol=0.02)
        return bool(calls)

    limit = QUANTIZED_KERNEL_ROWS
    assert [run(r) for r in (1, 5, limit, limit + 1)] == [True, True, True, False]


def test_toy_int8_layers_never_ask_for_the_kernels(monkeypatch):
    """A layer of fewer than BF16_LINEAR_MIN_WEIGHT weights (the demo model's) runs torch's kernel
    or the widened matmul without asking for the kernel library, so it never waits for a build."""
    monkeypatch.setattr(kernels, "_supported", None)
    monkeypatch.setattr(kernels, "_amx", None)
    monkeypatch.setattr(kernels, "_load", lambda: pytest.fail("asked for the kernels"))
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 128).bfloat16())
    with torch.no_grad():
        for rows in (1, 3, 40):
            assert layer(torch.randn(rows, 64).bfloat16()).shape == (rows, 128)
