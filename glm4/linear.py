"""The projections: nn.Linear with fast CPU paths for decoding (glm4's bf16 kernel, a fused
multiply-reduce under torch.compile, oneDNN's prepacked weight), the same numbers as nn.Linear;
and several projections' weights held as row blocks of one matrix (attention's fused q, k, v)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from glm4 import kernels


@torch.library.custom_op("glm4::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + b with W already in oneDNN's blocked layout (see `Linear.pack`).

    A custom op, so torch.compile calls it as it is: inductor does not lower oneDNN linears on
    weights that are not graph constants.
    """
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], packed.shape[0])


@packed_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN prepacking pays off for bfloat16 weights on a CPU (float32 already runs on MKL)."""
    cpu_bf16 = weight.device.type == "cpu" and weight.dtype == torch.bfloat16
    return cpu_bf16 and torch.backends.mkldnn.is_available()


# Rows of x up to which glm4's bf16 kernel runs a product: measured on the benchmark's weights
# streamed from memory, against oneDNN on the packed copy it is 1.4x faster at 1 row, 1.6x at 2
# and 1.2x at 4, and 0.8x at 8; against the plain weight (no copy) 1.9x at 1 to 4 rows, 1.6x at 8.
# In a compiled batch-1 step it decodes 3-8% faster than inductor's fused multiply-reduce.
KERNEL_ROWS_PACKED, KERNEL_ROWS = 4, 8
# On AMX tiles (kernels.set_amx), for weights of a width that is a multiple of 32: against oneDNN on
# its packed copy, 1.9x at 1 row, 1.8x at 8, 1.7x at 16 and 2.1x at 32 (Intel Xeon, 2 threads).
AMX_KERNEL_ROWS = 32
# The AVX2 kernel (kernels.avx2(): no AVX-512 BF16), against oneDNN on the plain weight (the bench's
# lm_head streamed from memory, AMD EPYC built without AVX-512, torch's kernels held to AVX2): 1.7-3.4x
# at 1 row, 0.9-1.2x at 2, 1.3x at 4, 0.8x at 8.
AVX2_KERNEL_ROWS = 4


def kernel_rows(in_features: int, packed: bool) -> int:
    """The most rows of x for which glm4's bf16 kernel runs a product with a weight of this width."""
    if in_features % 32 == 0 and kernels.set_amx():
        return AMX_KERNEL_ROWS
    if kernels.avx2():
        return AVX2_KERNEL_ROWS
    return KERNEL_ROWS_PACKED if packed else KERNEL_ROWS


# Rows of x up to which glm4's int8 and int4 kernels run a product (more rows: the weight widened
# or dequantized to bf16 once, into the library's bf16 matmul). On AMX tiles, 16 rows to a pass (on
# the benchmark's gate_up weight, Intel Xeon, 2 threads: int4 against torch's int4 kernel 1.2x at 1
# row, 2.2x at 8, 3.2x at 16; int8 against torch's `_weight_int8pack_mm` 2.2x at 1 row, 4.4x at 8,
# 5.6x at 32). On the vector path int8 widens the weight to bf16 in registers, 8 rows to a pass,
# and int4 unpacks it there, 4 rows to a pass, the same operations for a row whatever the batch
# (int8.h, int4.h). At 32 rows int8 is 1.1-1.6x the widened weight's library matmul on the gate_up
# weight and 3x on the lm_head (AMD EPYC, 2 threads); at 64 rows the matmul catches up on weights
# that fit the cache.
QUANTIZED_KERNEL_ROWS = 32


class Linear(nn.Linear):
    """nn.Linear with three CPU inference paths for decoding.

    A few rows of bf16 (batch-1 decoding, batches of up to 8, or 32 on AMX tiles), glm4's kernel
    (`kernels.bf16_linear`) reads the plain weight once for all of them; see KERNEL_ROWS.

    One row at a time under torch.compile otherwise (a float32 model, or no kernel built), the
    product is written as a multiply-reduce that inductor fuses into one pass over the weight,
    which streams at close to memory bandwidth; the library GEMV reaches about half of it.

    More rows (larger batches, prefill), a bf16 GEMM on the plain weight makes oneDNN reorder the
    whole weight on every call. `pack()` keeps a copy in oneDNN's blocked layout instead, which
    that GEMM reads directly (about 1.6x faster at 8 rows). The copy costs the weight's size
    again, so it is made on request (see `Glm4PreTrainedModel.pack_weights`), is used only without
    autograd, and is ignored once the weight changes.
    """

    packed: torch.Tensor | None = None
    _packed_from: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            rows = x.shape[:-1].numel()
            compiling = torch.compiler.is_compiling()
            # The compiled step does not check for staleness: its callers repack first (pack_weights).
            packed = (
                rows > 1
                and self.packed is not None
                and x.dtype == self.weight.dtype
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and (compiling or self.packed_is_current())
            )
            if kernels.can_bf16_linear(x, self.weight) and rows <= kernel_rows(self.in_features, packed):
                y = kernels.bf16_linear(x, self.weight)
                return y + self.bias if self.bias is not None else y
            if compiling and rows == 1:
                y = (self.weight.float() * x.reshape(1, -1).float()).sum(-1).to(x.dtype)
                y = y.view(*x.shape[:-1], self.out_features)
                return y + self.bias if self.bias is not None else y
            if packed:
                return packed_linear(x, self.packed, self.bias)
        return super().forward(x)

    def _weight_key(self) -> tuple:
        w = self.weight
        return (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))

    def packed_is_current(self) -> bool:
        return self.packed is not None and self._packed_from == self._weight_key()

    def pack(self) -> int:
        """Make (or refresh) the blocked copy of the weight; returns the bytes it holds (0: not packable)."""
        if not can_pack(self.weight):
            self.unpack()
            return 0
        if not self.packed_is_current():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 8)
            self._packed_from = self._weight_key()
        return self.weight.nbytes

    def unpack(self) -> None:
        self.packed = self._packed_from = None


# -- projections as row blocks of one matrix ------------------------------------------------------

FusedRows = tuple[torch.Tensor, torch.Tensor | None]  # (weight, bias or None)


def fuse_rows(linears: Sequence[nn.Module]) -> FusedRows | None:
    """Make the projections' weights (and biases) row blocks of one new matrix, and their
    parameters views into it: no memory is added, and in-place changes (an optimizer step,
    `load_state_dict`) reach it. None where one is not a plain `Linear` (quantized, or replaced
    for tensor parallelism). All have a bias or none has."""
    if not all(type(p) is Linear for p in linears):
        return None
    weight = torch.cat([p.weight.detach() for p in linears])
    bias = torch.cat([p.bias.detach() for p in linears]) if linears[0].bias is not None else None
    rows = 0
    for p in linears:
        p.weight.data = weight[rows : rows + p.out_features]
        if bias is not None:
            p.bias.data = bias[rows : rows + p.out_features]
        rows += p.out_features
    if weight.device.type != "cpu":  # a CUDA graph reads it in place, as the parameters
        torch._dynamo.mark_static_address(weight)
        if bias is not None:
            torch._dynamo.mark_static_address(bias)
    return weight, bias


def rows_are_fused(linears: Sequence[nn.Module], fused: FusedRows | None) -> bool:
    """Whether the projections' parameters are still the row blocks of `fused`."""
    if fused is None or not all(type(p) is Linear for p in linears):
        return False
    weight, bias = fused
    if (bias is None) != (linears[0].bias is None):
        return False
    rows = 0
    for p in linears:
        if p.weight.data_ptr() != weight[rows].data_ptr() or p.weight.dtype != weight.dtype:
            return False
        if bias is not None and p.bias.data_ptr() != bias[rows].data_ptr():
            return False
        rows += p.out_features
    return True


def unfuse_rows(linears: Sequence[nn.Module]) -> None:
    """Give each projection parameters of its own again (copies of its row blocks)."""
    for p in linears:
        p.weight.data = p.weight.data.clone()
        if p.bias is not None:
            p.bias.data = p.bias.data.clone()
