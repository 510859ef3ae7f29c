"""KV caches. The model writes into the cache it is given and returns it; nothing is hidden in globals.

The model asks a cache where the new tokens start (`get_seq_length`) and how wide the attention
is once they are written (`kv_length`); each layer calls `update` with its keys and values and the
cache slots they go to, and gets back what to attend over; after the step the model calls
`advance`. A growing cache, a preallocated static one (fixed width, written by index, so a
compiled step never changes shape) and a slot cache for a batching server all fit these four.
"""

from __future__ import annotations

import torch

from glm4 import hugepages


def kv_layout(model: torch.nn.Module) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim) a cache for `model` must hold; local head counts under tensor
    parallel, read from the modules rather than the config."""
    layers = model.base_model.layers
    attn = layers[0].self_attn
    return len(layers), attn.k_proj.out_features // attn.head_dim, attn.head_dim


def cache_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeros for one layer's keys or values: on huge pages on the CPU; elsewhere marked as a static
    address, because CUDA graphs (the compiled decode step on the GPU) run a graph that writes
    into its inputs only where their addresses are known to stay, and skip the graph otherwise."""
    t = hugepages.zeros(shape, dtype, device)
    if t.device.type != "cpu":
        torch._dynamo.mark_static_address(t)
    return t


def reuses_buffers(device: torch.device) -> bool:
    """Whether generations on `device` reuse static caches (`StaticCache.borrow`): where CUDA graphs
    may record them, so off the CPU."""
    return device.type != "cpu"


def _free_caches(model: torch.nn.Module) -> dict[tuple[int, int], list[StaticCache]]:
    """The static caches given back to `model`, by (batch size, length); kept on the model."""
    return model.__dict__.setdefault("_free_static_caches", {})


class KVCache:
    """The interface the model relies on."""

    def get_seq_length(self) -> int:
        """Number of positions already written (the cache index of the first new token)."""
        raise NotImplementedError

    def kv_length(self, new_tokens: int) -> int:
        """Width of the keys a layer attends over once `new_tokens` more have been written."""
        return self.get_seq_length() + new_tokens

    def update(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, cache_position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, H_kv, T, D) keys/values at slots `cache_position` (T,); return what
        the layer attends over."""
        raise NotImplementedError

    def advance(self, new_tokens: int) -> None:
        """The model wrote `new_tokens` more positions in every layer."""


class DynamicCache(KVCache):
    """Grows by concatenation: simple, exact, and the reference the faster caches are tested against."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def get_seq_length(self) -> int:
        return self.keys[0].shape[-2] if self.keys else 0

    def update(
        self,
        layer_idx: int,
        key: torch.Tensor,
        value: torch.Tensor,
        cache_position: torch.Tensor | None = None,
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


class StaticCache(KVCache):
    """Preallocated (B, H_kv, max_length, D) buffers written in place at `cache_position`.

    Its shapes never change, so a compiled decode step runs without recompiling, and its memory is
    claimed once. Slots not yet written hold zeros and are masked out by the causal mask.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.keys = [cache_buffer(shape, dtype, device) for _ in range(num_layers)]
        self.values = [cache_buffer(shape, dtype, device) for _ in range(num_layers)]
        self.max_length = max_length
        self.length = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_length: int) -> StaticCache:
        """A cache shaped for `model`'s attention layers (their local head counts under tensor parallel)."""
        layers, kv_heads, head_dim = kv_layout(model)
        return cls(layers, batch_size, kv_heads, max_length, head_dim, model.dtype, model.device)

    @classmethod
    def borrow(cls, model: torch.nn.Module, batch_size: int, max_length: int) -> StaticCache:
        """`for_model`, but off the CPU a cache of this shape that an earlier generation gave back
        (`give_back`) is reused, emptied. CUDA graphs are recorded for the cache's addresses: a new
        cache per generation would re-record the graph every time, and past torch's limit of
        re-recordings the step would run without graphs. The CPU allocates afresh (no graphs)."""
        free = _free_caches(model).get((batch_size, max_length)) if reuses_buffers(model.device) else None
        if not free:
            return cls.for_model(model, batch_size, max_length)
        cache = free.pop()
        for t in (*cache.keys, *cache.values):
            t.zero_()
        cache.length = 0
        return cache

    def give_back(self, model: torch.nn.Module) -> None:
        """The generation that borrowed this cache is over: keep it for the next one (off the CPU)."""
        if reuses_buffers(model.device):
            _free_caches(model).setdefault((self.keys[0].shape[0], self.max_length), []).append(self)

    def get_seq_length(self) -> int:
        return self.length

    def kv_length(self, new_tokens: int) -> int:
        if self.length + new_tokens > self.max_length:
            raise ValueError(
                f"the static cache holds {self.max_length} positions; {self.length} are used and "
                f"{new_tokens} more do not fit"
            )
        return self.max_length

    def update(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, cache_position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer_idx].index_copy_(2, cache_position, key)
        self.values[layer_idx].index_copy_(2, cache_position, value)
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens
