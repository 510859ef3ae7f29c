"""The rotary embedding of GLM-4: inverse frequencies by rope kind (default, linear, dynamic NTK,
YaRN), the cos/sin of each position, and the partial interleaved rotation of a head's first
rotary_dim dims."""

from __future__ import annotations

import math

import torch
from torch import nn

from glm4.config import Glm4Config


def rope_inv_freq(config: Glm4Config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary part and the cos/sin scale, as transformers' rope init.

    Only the first `rotary_dim` dims of a head rotate, so every formula uses dim = rotary_dim.
    """
    rope = config.rope_parameters
    base, dim = config.rope_theta, config.rotary_dim
    # On the CPU whatever the default device: on the meta device these small ops would import
    # torch's reference ops (a second or more at every start).
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    kind = config.rope_type
    if kind == "dynamic" and seq_len is not None and seq_len > config.max_position_embeddings:
        # NTK-aware: grow the base with the sequence once it passes the trained length.
        factor = rope["factor"]
        ratio = factor * seq_len / config.max_position_embeddings - (factor - 1)
        base = base * ratio ** (dim / (dim - 2))
    inv_freq = 1.0 / (base**exponents)
    if kind == "linear":
        return inv_freq / rope["factor"], 1.0
    if kind != "yarn":
        return inv_freq, 1.0
    return _yarn_inv_freq(rope, base, dim, inv_freq)


def _yarn_inv_freq(rope: dict, base: float, dim: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the low frequencies, keep the high ones, scale cos/sin by the mscale."""
    factor = rope["factor"]
    original = rope["original_max_position_embeddings"]
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.get("beta_fast") or 32), correction_dim(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    interpolated = inv_freq / factor
    return interpolated * (1 - extrapolation) + inv_freq * extrapolation, float(attention_factor)


class Glm4RotaryEmbedding(nn.Module):
    def __init__(self, config: Glm4Config) -> None:
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)

    def init_buffers(self, device: torch.device | str) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after building on the meta device."""
        self.inv_freq = rope_inv_freq(self.config)[0].to(device)

    def _apply(self, fn, recurse=True):
        """The frequencies move with the model but stay float32: `model.to(torch.bfloat16)` would
        round them to bf16, as loading in bf16 does not, and turn some pairs' angles by up to 0.44
        radians more at position 1000 (head_dim 64)."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.init_buffers(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos and sin laid out for `apply_rotary`, each (B, T, rotary_dim): per adjacent pair
        (2i, 2i+1), cos of its angle twice, and sin with the sign the pair's first element takes."""
        inv_freq = self.inv_freq
        if self.config.rope_type == "dynamic":
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.config.max_position_embeddings:
                inv_freq = rope_inv_freq(self.config, seq_len)[0].to(inv_freq.device)
        angles = position_ids[..., None].float() * inv_freq.float()
        cos = (angles.cos() * self.attention_scaling).to(dtype)
        sin = (angles.sin() * self.attention_scaling).to(dtype)
        # Computed once per forward for all layers: (cos, cos) and (-sin, sin) per pair.
        return torch.stack((cos, cos), -1).flatten(-2), torch.stack((-sin, sin), -1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the rotary module's cos/sin (B, T, R).

    GLM-4 rotates adjacent pairs (2i, 2i+1) (GPT-J style) of the first R dims only; the rest pass
    through. Rotating all dims, or pairing i with i + R/2 (NeoX), gives plausible but wrong output.
    Pair (a, b) becomes (a cos - b sin, b cos + a sin): x * cos + swap(x) * signed sin.
    """
    rot_dim = cos.shape[-1]
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    swapped = rot.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (b, a) for each pair (a, b)
    rotated = rot * cos[:, None] + swapped * sin[:, None]  # cos/sin broadcast over heads
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated
