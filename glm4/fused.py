"""The fused CPU decode step: a bf16 model's whole decode step in one C++ call (`kernels.decode_step`),
its projections bf16, int8 or int4 (batches of up to 8 bf16 rows, or 32 on AMX tiles; up to 32
int8 or int4 rows).

At batch 1 a decode step streams every weight once. Run as a torch.compile'd graph, the same step
spends about 2 ms of its 13 (bench model, 60 GB/s) outside the matmuls: dynamo's entry, the
wrapper's calls to some 200 kernels, a parallel region for every small fused op. The C++ step
runs the same matmul and attention kernels with nothing between them but a few vectorised loops on
the calling thread, and it needs no compiling: its first token comes as fast as its hundredth.

`fused_step(model, batch_size)` says whether it applies and returns the step, with the weights
gathered once (call it again after changing the model's modules).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from glm4 import kernels


def _projection(linear: torch.nn.Module, empty: torch.Tensor) -> list[torch.Tensor]:
    """A projection's three tensors in decode_step.cpp: the weight (bf16, int8, or int4 two a byte),
    its scales (int8: per row; int4: scales and zeros per group) and its bias, `empty` for those it
    has not."""
    scales = getattr(linear, "scales", getattr(linear, "scales_and_zeros", None))
    bias = linear.bias if linear.bias is not None else empty
    return [linear.weight, scales if scales is not None else empty, bias]


def _layer_projections(layer: torch.nn.Module) -> list[torch.nn.Module]:
    attn, mlp = layer.self_attn, layer.mlp
    return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]


def _layer_weights(layer: torch.nn.Module, empty: torch.Tensor) -> list[torch.Tensor]:
    """The tensors decode_step.cpp reads per layer, in its order: the four norms, then q, k, v, o,
    gate_up and down (three each, see `_projection`)."""
    weights = [
        layer.input_layernorm.weight,
        layer.post_self_attn_layernorm.weight,
        layer.post_attention_layernorm.weight,
        layer.post_mlp_layernorm.weight,
    ]
    for linear in _layer_projections(layer):
        weights += _projection(linear, empty)
    return weights


def _projections(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [model.lm_head, *(p for layer in model.base_model.layers for p in _layer_projections(layer))]


def applies(model: torch.nn.Module, batch_size: int) -> bool:
    """Whether `fused_step` runs this model at this batch size: a bf16 causal LM on the CPU in
    inference, every projection a plain bf16 Linear, an int8 one, or an int4 one in groups the
    kernels take (`kernels.int4_group_fits`), at a batch size all of them take (`linear.kernel_rows`,
    `linear.QUANTIZED_KERNEL_ROWS`), none sharded for tensor parallel, a head dim the attention
    kernel has, rope frequencies that do not change with the length, large enough that the kernel
    build pays (as `kernels.can_bf16_linear`), and the kernels built for this CPU."""
    from glm4 import parallel
    from glm4.linear import KERNEL_ROWS, QUANTIZED_KERNEL_ROWS, Linear, kernel_rows
    from glm4.quantization import Int4Linear, Int8Linear

    if not hasattr(model, "lm_head") or model.training or parallel.is_tensor_parallel():
        return False
    config, projections = model.config, _projections(model)
    packed = any(type(m) is Linear and m.packed is not None for m in projections)
    int4 = [m for m in projections if type(m) is Int4Linear]
    if not all(kernels.int4_group_fits(m.group_size) for m in int4):
        return False

    def rows(m: torch.nn.Module) -> int:
        # As the layers take: a Linear with packed copies leaves 5 rows on to oneDNN (in the
        # compiled step), but for the AMX tiles (bf16 weights only).
        if type(m) is Linear:
            return kernel_rows(m.in_features, packed)
        return QUANTIZED_KERNEL_ROWS if type(m) in (Int8Linear, Int4Linear) else KERNEL_ROWS

    return (
        batch_size >= 1
        and model.device.type == "cpu"
        and config.rope_type != "dynamic"
        and config.head_dim in kernels.HEAD_DIMS
        and all(type(m) in (Linear, Int8Linear, Int4Linear) for m in projections)
        and all(t.is_contiguous() for m in projections for t in _projection(m, m.weight))
        and all(p.dtype == torch.bfloat16 and p.is_contiguous() for p in model.parameters())
        and model.lm_head.in_features * model.lm_head.out_features >= kernels.BF16_LINEAR_MIN_WEIGHT
        and kernels.available("bf16_linear")
        and kernels.available("decode_step")
        and (not int4 or kernels.available("int4_linear"))
        and batch_size <= min(map(rows, projections))
    )


def fused_step(model: torch.nn.Module, batch_size: int) -> Callable[..., torch.Tensor] | None:
    """The fused step for `model` at `batch_size`, called as `model.decode_step` (tokens (B, 1),
    positions (B, 1), mask (B, 1, 1, S), a static or slot cache, cache_position): float logits
    (B, vocab). A last argument `rows` (B,) int64 runs the step for those batch rows of a larger
    cache only (the serving engine's slots in use). None where it does not apply (see `applies`)."""
    if not applies(model, batch_size):
        return None
    base = model.base_model
    empty = torch.empty(0, dtype=torch.bfloat16)
    weights = [base.embed_tokens.weight]
    for layer in base.layers:
        weights += _layer_weights(layer, empty)
    weights += [base.norm.weight, *_projection(model.lm_head, empty)]
    inv_freq = base.rotary_emb.inv_freq.float().contiguous()
    constants = (
        float(base.rotary_emb.attention_scaling),  # cos and sin's factor
        float(model.config.rms_norm_eps),
        float(base.layers[0].self_attn.scaling),  # attention's
    )

    def step(
        tokens: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, cache: Any, slot: Any, rows=None
    ):
        caches = (cache.keys, cache.values)
        return kernels.decode_step(tokens, position, mask, slot, weights, *caches, inv_freq, *constants, rows)

    return step
