"""Attention as functions of q, k and v: the padding-aware causal mask, one query per row (decode),
and a whole prompt in blocks. The module that calls them, with the checkpoint's names, is
`modeling.Glm4Attention`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm4 import kernels


def causal_mask(
    attention_mask: torch.Tensor | None, batch: int, new_tokens: int, past: int, kv_len: int, device
) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask: True where a query may attend; None when plain causal suffices.

    Key slot j is visible from the query at cache index past + i when j <= past + i and the padding
    mask keeps j.
    """
    if attention_mask is None and kv_len == past + new_tokens and (past == 0 or new_tokens == 1):
        return None
    keys = torch.arange(kv_len, device=device)
    queries = past + torch.arange(new_tokens, device=device)
    mask = (keys[None, :] <= queries[:, None])[None, None].expand(batch, 1, new_tokens, kv_len)
    if attention_mask is not None:
        keep = attention_mask.to(device=device, dtype=torch.bool)
        keep = F.pad(keep, (0, kv_len - keep.shape[-1]), value=True)
        mask = mask & keep[:, None, None, :]
        # A left-padding query sees no key at all: let it see everything rather than produce NaN,
        # which would leak into later layers through its masked-out (but multiplied) values.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


# How a decode step attends where the CPU kernel does not run (CUDA; float32 models): see
# `decode_attention` and `Glm4PreTrainedModel.set_decode_attention`.
DECODE_ATTENTION = ("einsum", "sdpa", "reduce")


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    how: str = "einsum",
) -> torch.Tensor:
    """Attention of one query per row (decoding). GQA groups share their KV head.

    On the CPU in bf16 a hand-written kernel reads the cache as it is (see kernels.py). Elsewhere
    `how` says how: "einsum" (the default) writes it out as two float32 matmuls, as the library
    kernel's setup costs more than the arithmetic at this size; "sdpa" takes torch's fused
    attention in the inputs' dtype, a KV head's group of query heads as its queries; "reduce" is the
    einsums as float32 multiply-reduces, which inductor can fuse with the conversions and the mask
    into few kernels (eager, it holds a (group x keys x head_dim) product: a compiled step only).
    The last two are candidates for the compiled CUDA step, not yet measured on a GPU.
    """
    if kernels.can_decode(q, k, v):
        return kernels.decode_attention(q, k, v, mask, scale)
    B, H, _, D = q.shape
    q = q.view(B, k.shape[1], -1, D)  # (B, H_kv, G, D): the query heads that share a KV head
    if how == "sdpa":  # mask (B, 1, 1, S) broadcasts over KV heads and their groups
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).reshape(B, H, 1, D)
    dtype = v.dtype
    q, k, v = q.float(), k.float(), v.float()
    if how == "reduce":
        scores = (q[:, :, :, None] * k[:, :, None]).sum(-1) * scale
    else:
        scores = torch.einsum("bhgd,bhsd->bhgs", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1)
    if how == "reduce":
        out = (probs[..., None] * v[:, :, None]).sum(-2)
    else:
        out = torch.einsum("bhgs,bhsd->bhgd", probs, v)
    return out.to(dtype).reshape(B, H, 1, D)


CAUSAL_BLOCK = 256


def causal_prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of a whole prompt (no past, no padding) in blocks of 256 queries, each over
    the keys it can see.

    The CPU flash kernel (torch 2.13) skips masked keys in blocks of 512 only, so up to 512 tokens
    it computes the whole T x T square; blocks of queries halve that. Measured at 512 tokens: the
    attention 20-35% faster, the whole prefill 3-5% (bench model, alternating runs).
    """
    T, gqa = q.shape[2], q.shape[1] != k.shape[1]
    blocks = []
    for start in range(0, T, CAUSAL_BLOCK):
        end = min(start + CAUSAL_BLOCK, T)
        queries = torch.arange(start, end, device=q.device)[:, None]
        sees = torch.arange(end, device=q.device)[None, :] <= queries
        blocks.append(
            F.scaled_dot_product_attention(
                q[:, :, start:end],
                k[:, :, :end],
                v[:, :, :end],
                attn_mask=None if start == 0 else sees,
                is_causal=start == 0,
                scale=scale,
                enable_gqa=gqa,
            )
        )
    return torch.cat(blocks, dim=2)


def prompt_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    training: bool = False,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention of several queries per row (a prompt, a chunk of one, training): q (B, H, T, D),
    k and v (B, H_kv, S, D), mask a (B, 1, T, S) bool from `causal_mask`, or None for plain causal
    attention (S == T). Dropout applies in training only.

    On the CPU in bf16, outside training, glm4's kernel (see kernels.py); elsewhere torch's SDPA,
    on the CPU short causal prompts in blocks of queries (`causal_prompt_attention`).
    """
    if not training and kernels.can_prompt(q, k, v):
        return kernels.prompt_attention(q, k, v, mask, scale)
    # torch's CPU kernel is about 20% faster on contiguous heads than on the (B, T, H, D) views.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    T = q.shape[2]
    if mask is None and CAUSAL_BLOCK < T <= 512 and q.device.type == "cpu" and not training:
        return causal_prompt_attention(q, k, v, scale)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=dropout if training else 0.0,
        is_causal=mask is None and T > 1,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
