"""Weight-only int8 (per output channel) and int4 (group-wise) quantization of the Linear layers.

Decoding one token reads every weight once, so halving or quartering the bytes of the weights is
what speeds it up. On the CPU a few rows of bf16 run glm4's own kernels on the stored layouts
(kernels.int8_linear: up to 8 rows, 32 on AMX tiles; kernels.int4_linear: one row, 32 on AMX
tiles). More rows run the library's bf16 matmul on the weight widened to bf16 (int8;
`_weight_int8pack_mm` for a few rows where glm4's kernel is not built) or dequantized by glm4's
kernel (int4, from 16 rows; PyTorch's packed int4 kernel, `_weight_int4pack_mm_for_cpu`, below
that). Elsewhere the weight is dequantized into the matmul, which torch.compile fuses.
Activations stay in the model's dtype.

On CUDA, int4 layers run torch's tinygemm kernel (`_weight_int4pack_mm`) where their shapes allow it.

Checkpoints keep a portable layout (int8 rows; int4 two per byte, low nibble first) and
`quantization_config` in config.json; the int4 kernels' own packing is made at load time, for the
device the layer is on, and again when it moves to another kind of device.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from glm4 import hugepages, kernels
from glm4.linear import KERNEL_ROWS, QUANTIZED_KERNEL_ROWS

logger = logging.getLogger("glm4")

METHODS = ("int8", "int4")
DEFAULT_GROUP_SIZE = 64


def _compiled_single_row(x: torch.Tensor) -> bool:
    """Batch-1 decoding compiled on the CPU: there a fused dequantize-multiply-reduce streams the
    quantized weight faster than the library kernels (see linear.Linear)."""
    return torch.compiler.is_compiling() and x.device.type == "cpu" and x.shape[:-1].numel() == 1


# Whether inductor's code for an int8 multiply-reduce streams the weight: with AVX-512 vectors it
# does (the bench's model decodes 1.8x faster than on torch's int8 kernel); with AVX2 ones it reads
# it at 1-2 GB/s (it loads 8 of a vector's 32 bytes through a copy), 7x slower than torch's kernel.
# Set by `check_inductor` before a compile, as tracing cannot ask.
int8_reduce_compiles_well = True


def check_inductor() -> None:
    """Find out (once) how wide the vectors of inductor's CPU code are."""
    global int8_reduce_compiles_well, _checked_inductor
    if not _checked_inductor:
        _checked_inductor = True
        try:
            from torch._inductor import cpu_vec_isa

            int8_reduce_compiles_well = cpu_vec_isa.pick_vec_isa().nelements() >= 16
        except Exception:  # a private API: where it moved, keep the reduce
            int8_reduce_compiles_well = True


_checked_inductor = False


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T, q int8 per row, one scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
        module.weight = hugepages.adopt(torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8))
        module.scales = scales.to(linear.weight.dtype)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        # (can_int8 first: a toy model's layer never builds the kernels)
        if kernels.can_int8(x, self.weight) and rows <= QUANTIZED_KERNEL_ROWS:
            y = kernels.int8_linear(x, self.weight, self.scales.to(x.dtype))
        elif _compiled_single_row(x) and int8_reduce_compiles_well:
            y = (self.weight.float() * x.reshape(1, -1).float()).sum(-1) * self.scales.float()
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        elif x.device.type == "cpu" and rows <= KERNEL_ROWS and self.in_features % 16 == 0:
            # torch's kernel (it crashes on other widths), for a few rows where glm4's is not built.
            # From 9 rows on, the library's bf16 matmul on the weight widened to bf16 is faster: on
            # the benchmark's gate_up weight 1.7x at 33 rows, 3.1x at 128 and 7.5x at 512 (prefill).
            y = torch.ops.aten._weight_int8pack_mm(
                x.reshape(-1, self.in_features).contiguous(), self.weight, self.scales.to(x.dtype)
            ).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def _ampere(t: torch.Tensor) -> bool:
    """Whether t is on an Ampere GPU or newer (tinygemm's mma instructions), where on a GPU."""
    return t.device.type != "cuda" or torch.cuda.get_device_capability(t.device) >= (8, 0)


class Int4Kernel(NamedTuple):
    """One of torch's packed int4 matmuls: which layers it takes, the weight's layout it packs
    from, the packing (with its number of inner k tiles) and the product. Both kernels dequantize
    as w = (q - 8) * scale + zero, with scales and zeros as (in / group, out, 2)."""

    takes: Callable[[Int4Linear], bool]
    layout: Callable[[Int4Linear], torch.Tensor]
    pack: Callable[[torch.Tensor, int], torch.Tensor]
    inner_k_tiles: int
    matmul: Callable[..., torch.Tensor]


INT4_KERNELS = {
    # The CPU kernel packs the values 0..15 as int32.
    "cpu": Int4Kernel(
        lambda layer: True,
        lambda layer: layer.unpacked(),
        torch.ops.aten._convert_weight_to_int4pack_for_cpu,
        1,
        torch.ops.aten._weight_int4pack_mm_for_cpu,
    ),
    # tinygemm packs bytes whose high nibble holds the even column (the stored layout swapped), the
    # input columns in tiles of 128 (8 inner tiles of 16), the outputs in 8s; Ampere GPUs and newer.
    "cuda": Int4Kernel(
        lambda layer: layer.in_features % 128 == 0 and layer.out_features % 8 == 0 and _ampere(layer.weight),
        lambda layer: (layer.weight << 4) | (layer.weight >> 4),
        torch.ops.aten._convert_weight_to_int4pack,
        8,
        torch.ops.aten._weight_int4pack_mm,
    ),
}


# Rows of x from which an int4 layer on the CPU, past what glm4's kernel takes (linear.QUANTIZED_KERNEL_ROWS),
# dequantizes its weight into the library's bf16 matmul (kernels.int4_dequantize) instead of running
# torch's packed int4 kernel: on the benchmark's gate_up weight (Intel Xeon, 2 threads) the two tie
# at 16 rows, and the matmul is 2x faster at 32, 3.4x at 64 and 10x at 512 (prefill).
INT4_DEQUANTIZE_ROWS = 16
# Rows of x up to which the AVX2 int4 kernel (kernels.avx2()) runs a product; more run torch's int4
# kernel: on the bench's lm_head (AMD EPYC built without AVX-512) 1.6x torch's at 1 row, 1.2x at 2,
# 0.7x at 4.
AVX2_INT4_KERNEL_ROWS = 2


def int4_kernel_rows() -> int:
    """The most rows of x for which glm4's int4 kernel runs a product."""
    return AVX2_INT4_KERNEL_ROWS if kernels.avx2() else QUANTIZED_KERNEL_ROWS


class Int4Linear(nn.Module):
    """Group-wise asymmetric int4: w = (q - 8) * scale + zero for each group of input columns."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype = torch.bfloat16,
        group_size: int = DEFAULT_GROUP_SIZE,
    ):
        super().__init__()
        if in_features % group_size:
            raise ValueError(
                f"in_features {in_features} is not a multiple of the int4 group size {group_size}"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.zeros(out_features, groups, 2, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        # A packed kernel's own layout (INT4_KERNELS) and the kind of device it was made for, by
        # pack(); not saved.
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("packed_scales", None, persistent=False)
        self.packed_for: str | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Linear:
        out_f, in_f = linear.weight.shape
        module = cls(in_f, out_f, linear.bias is not None, linear.weight.dtype, group_size)
        w = linear.weight.detach().float().reshape(out_f, -1, group_size)
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scales = ((high - low) / 15).clamp(min=1e-6)
        zeros = low + 8 * scales
        q = torch.round((w - low) / scales).clamp(0, 15).to(torch.uint8).reshape(out_f, in_f)
        module.weight = q[:, 0::2] | (q[:, 1::2] << 4)
        module.scales_and_zeros = torch.cat([scales, zeros], dim=-1).to(linear.weight.dtype)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        module.pack()
        return module

    def pack(self) -> None:
        """Make the packed kernel's layout for the device the layer is on (not saved: it is
        specific to the kernel), or drop it where no kernel takes the layer."""
        device = self.weight.device.type
        kernel = INT4_KERNELS.get(device)
        packed = scales = None
        if kernel is not None and kernel.takes(self):
            try:
                packed = kernel.pack(kernel.layout(self).contiguous(), kernel.inner_k_tiles)
            except (RuntimeError, NotImplementedError) as e:  # a torch build without the kernel
                _warn_once(
                    f"int4 layers on {device} dequantize into the matmul: torch's packed kernel failed ({e})"
                )
            else:
                packed = hugepages.adopt(packed) if device == "cpu" else packed
                scales = self.scales_and_zeros.transpose(0, 1).contiguous()  # (in / group, out, 2)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("packed_scales", scales, persistent=False)
        self.packed_for = device if packed is not None else None

    def _apply(self, fn, recurse=True):
        """Moved to another kind of device: another kernel, another layout."""
        super()._apply(fn, recurse)
        if self.packed_for is not None and self.packed_for != self.weight.device.type:
            self.pack()
        return self

    def unpacked(self) -> torch.Tensor:
        """The int4 values (out, in) as int32, 0..15."""
        q = torch.stack([self.weight & 0xF, self.weight >> 4], dim=-1)
        return q.reshape(self.out_features, self.in_features).to(torch.int32)

    def dequantize(self) -> torch.Tensor:
        q = self.unpacked().float().reshape(self.out_features, -1, self.group_size)
        scales, zeros = self.scales_and_zeros.float().unbind(-1)
        return ((q - 8) * scales[..., None] + zeros[..., None]).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (A compiled multiply-reduce measured slower than torch's kernel for int4; int8 is the reverse.)
        fast_dequantize = kernels.can_int4_dequantize(x, self.weight)
        rows = x.shape[:-1].numel()
        if kernels.can_int4(x, self.group_size) and rows <= int4_kernel_rows():  # on the stored layout
            y = kernels.int4_linear(x, self.weight, self.scales_and_zeros.to(x.dtype), self.group_size)
        elif (
            self.packed_for == x.device.type
            and (x.device.type == "cpu" or x.dtype == torch.bfloat16)
            and not (fast_dequantize and rows >= INT4_DEQUANTIZE_ROWS)
        ):
            y = (
                INT4_KERNELS[self.packed_for]
                .matmul(
                    # The kernel needs contiguous rows: the last position of a batch is a strided slice.
                    x.reshape(-1, self.in_features).contiguous(),
                    self.packed,
                    self.group_size,
                    self.packed_scales.to(x.dtype),
                )
                .view(*x.shape[:-1], self.out_features)
            )
        elif fast_dequantize:
            y = F.linear(x, kernels.int4_dequantize(self.weight, self.scales_and_zeros, self.group_size))
        else:
            y = F.linear(x, self.dequantize().to(x.dtype))
        return y + self.bias if self.bias is not None else y


def quantized_linear(
    method: str, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, group_size: int
):
    if method == "int8":
        return Int8Linear(in_features, out_features, bias, dtype)
    return Int4Linear(in_features, out_features, bias, dtype, group_size)


def _targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Every Linear of the decoder layers and the lm_head (not the classification heads)."""
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and (".layers." in f".{full}" or full == "lm_head"):
                found.append((module, child_name, child))
    return found


def check_method(method: str, group_size: int) -> None:
    if method not in METHODS:
        raise ValueError(f"quantization {method!r} is not one of {', '.join(METHODS)}")
    if method == "int4" and group_size not in (32, 64, 128, 256):
        raise ValueError(f"int4 group_size must be 32, 64, 128 or 256, got {group_size}")


def quantize(model: nn.Module, method: str, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Replace the Linear layers in place with quantized ones; records it in the model's config."""
    check_method(method, group_size)
    if getattr(model.config, "quantization", None):
        raise ValueError(f"the model is already quantized ({model.config.quantization['method']})")
    if getattr(model.config, "tie_word_embeddings", False):
        raise ValueError("quantizing a model with tied embeddings is not supported")
    for parent, name, linear in _targets(model):
        if method == "int8":
            setattr(parent, name, Int8Linear.from_linear(linear))
        else:
            setattr(parent, name, Int4Linear.from_linear(linear, group_size))
    model.config.quantization = {"method": method, "group_size": group_size}
    return model


def prepare_quantized_model(model: nn.Module, quantization: dict) -> None:
    """On a model built on the meta device: swap in empty quantized layers for a checkpoint to fill."""
    method, group_size = quantization["method"], quantization.get("group_size", DEFAULT_GROUP_SIZE)
    check_method(method, group_size)
    for parent, name, linear in _targets(model):
        module = quantized_linear(
            method,
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            linear.weight.dtype,
            group_size,
        )
        setattr(parent, name, module)


def pack_quantized(model: nn.Module) -> None:
    """After loading a quantized checkpoint: build the kernels' layouts."""
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.pack()
