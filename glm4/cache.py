"""KV caches. The model writes into the cache it is given and returns it; nothing is hidden in globals.

A cache answers three questions for the model: where the new tokens start (`get_seq_length`), how
wide the attention is after writing them (`kv_length`), and, in `update`, what keys and values a
layer attends over. A preallocated static cache (fixed `kv_length`, writes by index) or a paged
cache for a batching server fits the same three methods, so modeling.py never changes for them.
"""

from __future__ import annotations

import torch


class KVCache:
    """The interface the model relies on."""

    def get_seq_length(self) -> int:
        """Number of positions already written (the cache index of the first new token)."""
        raise NotImplementedError

    def kv_length(self, new_tokens: int) -> int:
        """Width of the keys a layer attends over once `new_tokens` more have been written."""
        return self.get_seq_length() + new_tokens

    def update(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, H_kv, T, D) keys/values for a layer; return everything to attend over."""
        raise NotImplementedError


class DynamicCache(KVCache):
    """Grows by concatenation: simple, exact, and the reference the faster caches are tested against."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def get_seq_length(self) -> int:
        return self.keys[0].shape[-2] if self.keys else 0

    def update(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` positions."""
        self.keys = [k[..., :length, :] for k in self.keys]
        self.values = [v[..., :length, :] for v in self.values]

    def __len__(self) -> int:
        return len(self.keys)
