"""The GLM-4-0414 architecture: norm -> rope (rope.py) -> attention -> MLP -> layer -> model -> LM head.

Module names are the checkpoint's tensor names (`model.layers.3.self_attn.q_proj`,
`mlp.gate_up_proj`, `post_self_attn_layernorm`), so loading is a strict `load_state_dict`.
No I/O and no torch.distributed here: checkpoint.py reads files, parallel.py shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from glm4.attention import DECODE_ATTENTION, causal_mask, decode_attention, prompt_attention
from glm4.cache import DynamicCache, KVCache
from glm4.checkpoint import PretrainedMixin
from glm4.config import Glm4Config
from glm4.generation import GenerationMixin
from glm4.linear import FusedRows, Linear, can_pack, fuse_rows, rows_are_fused, unfuse_rows
from glm4.rope import Glm4RotaryEmbedding, apply_rotary

# -- outputs: the transformers field names -----------------------------------------------------


@dataclass
class Glm4ModelOutput:
    last_hidden_state: torch.Tensor
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class HeadOutput:
    """What the three heads return; transformers calls it CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast or TokenClassifierOutput, with these same fields."""

    loss: torch.Tensor | None
    logits: torch.Tensor
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


CausalLMOutput = HeadOutput


# -- norm ----------------------------------------------------------------------------------------


class Glm4RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32, then back to the input dtype before the weight (as transformers).
        # torch's op does both itself (it upcasts a bf16 input and rounds its result once): the
        # same numbers (tested against transformers) without a float32 copy of x.
        return self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)


# -- attention -----------------------------------------------------------------------------------


class Glm4Attention(nn.Module):
    decode_with = "einsum"  # how decode steps attend off the CPU kernel (see `decode_attention`)

    def __init__(self, config: Glm4Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = config.head_dim**-0.5
        self.dropout = config.attention_dropout
        bias = config.attention_bias
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.q_proj = Linear(hidden, heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(heads * self.head_dim, hidden, bias=False)

    # q, k and v's weights (and biases) as row blocks of one matrix, or None: see `fuse_qkv`.
    qkv: FusedRows | None = None

    def _projections(self) -> tuple[Linear, Linear, Linear]:
        return self.q_proj, self.k_proj, self.v_proj

    def qkv_is_current(self) -> bool:
        """Whether the fused matrix still holds the three projections' parameters."""
        return rows_are_fused(self._projections(), self.qkv)

    def fuse_qkv(self) -> bool:
        """Keep q, k and v's weights and biases as row blocks of one matrix (`fuse_rows`), which a
        forward without autograd multiplies in one product (one kernel for three; a candidate for
        the CUDA step). Returns whether it applies: not to quantized (or tensor-parallel replaced)
        projections. A matrix still current is kept."""
        if not self.qkv_is_current():
            self.qkv = fuse_rows(self._projections())
        return self.qkv is not None

    def unfuse_qkv(self) -> None:
        """Give the three projections parameters of their own again (copies) and drop the matrix."""
        if self.qkv_is_current():
            unfuse_rows(self._projections())
        self.qkv = None

    def _apply(self, fn, recurse=True):
        """`.to()` and the like give each parameter a new tensor of its own where they change
        anything: fuse those again after."""
        super()._apply(fn, recurse)
        if self.qkv is not None:
            self.fuse_qkv()
        return self

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        cache_position: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv is not None and not torch.is_grad_enabled() and type(self.q_proj) is Linear:
            sizes = [p.out_features for p in self._projections()]
            q, k, v = F.linear(x, *self.qkv).split(sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, cache_position)
        if T == 1 and not self.training:
            if mask is not None:  # the mask's width: the whole cache, or only its filled part
                k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
            out = decode_attention(q, k, v, mask, self.scaling, self.decode_with)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        width = mask.shape[-1] if mask is not None else T
        if k.shape[2] > width:  # a preallocated cache: only its filled part
            k, v = k[:, :, :width], v[:, :, :width]
        out = prompt_attention(q, k, v, mask, self.scaling, self.training, self.dropout)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


# -- MLP and decoder layer -----------------------------------------------------------------------


class Glm4MLP(nn.Module):
    def __init__(self, config: Glm4Config) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # first half is the gate
        return self.down_proj(up * F.silu(gate))


class Glm4DecoderLayer(nn.Module):
    def __init__(self, config: Glm4Config, layer_idx: int) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Glm4Attention(config, layer_idx)
        self.mlp = Glm4MLP(config)
        # "Sandwich" norms: each sublayer's output is normalised again before the residual add.
        # post_attention_layernorm is, despite its name, the norm *before* the MLP.
        self.input_layernorm = Glm4RMSNorm(config.hidden_size, eps)
        self.post_self_attn_layernorm = Glm4RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = Glm4RMSNorm(config.hidden_size, eps)
        self.post_mlp_layernorm = Glm4RMSNorm(config.hidden_size, eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_position)
        h = x + self.post_self_attn_layernorm(attn)
        return h + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(h)))


# -- the model -----------------------------------------------------------------------------------


class Glm4PreTrainedModel(nn.Module, PretrainedMixin):
    """Weight init like transformers, gradient checkpointing, and (via PretrainedMixin) loading."""

    config: Glm4Config

    def init_weights(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    module.weight.data[module.padding_idx].zero_()
            elif isinstance(module, Glm4RMSNorm):
                nn.init.ones_(module.weight)

    def init_buffers(self, device: torch.device | str) -> None:
        for module in self.modules():
            if isinstance(module, Glm4RotaryEmbedding):
                module.init_buffers(device)

    def gradient_checkpointing_enable(self) -> None:
        self.base_model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.base_model.gradient_checkpointing = False

    def pack_weights(self) -> int:
        """Keep a copy of every bf16 Linear weight in oneDNN's blocked layout, for inference on
        several rows at a time on the CPU (batched decoding, prefill); see `Linear`. Weights packed
        before and unchanged since are kept. Returns the bytes the copies hold.

        `generate` and the serving engine call this themselves for batches when the copy fits in
        the memory available."""
        return sum(m.pack() for m in self.modules() if isinstance(m, Linear))

    def set_decode_attention(self, how: str) -> None:
        """How decode steps attend where the CPU kernel does not run (on CUDA, or in float32): one
        of `DECODE_ATTENTION`, "einsum" by default (see `decode_attention`). A step compiled
        before recompiles on its next call."""
        if how not in DECODE_ATTENTION:
            raise ValueError(f"decode attention must be one of {', '.join(DECODE_ATTENTION)}, got {how!r}")
        for m in self.modules():
            if isinstance(m, Glm4Attention):
                m.decode_with = how

    def fuse_qkv(self, fuse: bool = True) -> int:
        """Keep each layer's q, k and v projections as one matrix (see `Glm4Attention.fuse_qkv`),
        or with `fuse=False` as three again. A candidate for the CUDA step, off by default.
        `generate` re-fuses a layer whose parameters were replaced since, and drops the matrix of
        one that can no longer be fused (quantized). Returns the layers fused."""
        layers = [m for m in self.modules() if isinstance(m, Glm4Attention)]
        if not fuse:
            for m in layers:
                m.unfuse_qkv()
            return 0
        return sum(m.fuse_qkv() for m in layers)

    def refresh_fused_qkv(self) -> None:
        """Fuse again the layers fused before whose parameters were replaced since."""
        for m in self.modules():
            if isinstance(m, Glm4Attention) and m.qkv is not None:
                m.fuse_qkv()  # keeps a current matrix as it is

    def unpack_weights(self) -> None:
        """Drop the packed copies made by `pack_weights`."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.unpack()

    def packable_bytes(self) -> int:
        """Bytes `pack_weights` would add now (weights packable and not packed yet)."""
        return sum(
            m.weight.nbytes
            for m in self.modules()
            if isinstance(m, Linear) and can_pack(m.weight) and not m.packed_is_current()
        )

    @property
    def base_model(self) -> Glm4Model:
        return self if isinstance(self, Glm4Model) else self.model

    @property
    def device(self) -> torch.device:
        return self.base_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base_model.embed_tokens.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Glm4Model(Glm4PreTrainedModel):
    def __init__(self, config: Glm4Config) -> None:
        super().__init__()
        self.config = config
        pad = config.pad_token_id
        padding_idx = pad if pad is not None and 0 <= pad < config.vocab_size else None
        # An empty table: init_weights fills it below, and a checkpoint replaces it (nn.Embedding's
        # own init on the meta device would import torch's reference ops, as rope_inv_freq says).
        table = torch.empty(config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx, _weight=table)
        self.layers = nn.ModuleList(Glm4DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Glm4RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Glm4RotaryEmbedding(config)
        self.gradient_checkpointing = False
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
    ) -> Glm4ModelOutput:
        self._check_dtype()
        x = self._embed(input_ids, inputs_embeds)
        B, T, _ = x.shape
        if use_cache is None:
            use_cache = past_key_values is not None or (self.config.use_cache and not self.training)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        cache = past_key_values if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0
        width = cache.kv_length(T) if cache is not None else T
        # Several new tokens (a prompt) attend over the filled part of a preallocated cache only;
        # a single one (decoding) keeps the full width: one shape for the compiled step.
        kv_len = past + T if T > 1 else width
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None]
            last_position = past + T - 1
        else:
            last_position = int(position_ids.max())
        self._check_length(last_position)
        if attention_mask is not None:
            attention_mask = self._check_mask(attention_mask, B, past + T, width)[:, :kv_len]
        mask = causal_mask(attention_mask, B, T, past, kv_len, x.device)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        cache_position = torch.arange(past, past + T, device=x.device) if cache is not None else None

        hidden_states = [x] if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, cache, cache_position, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, cache_position)
            if hidden_states is not None:
                hidden_states.append(x)
        x = self.norm(x)
        if cache is not None:
            cache.advance(T)
        if hidden_states is not None:
            hidden_states[-1] = x  # transformers reports the normed output as the last entry
        return Glm4ModelOutput(x, cache, tuple(hidden_states) if hidden_states is not None else None)

    # -- input checks: errors a user can cause, said in their terms ---------------------------

    def _check_dtype(self) -> None:
        if self.embed_tokens.weight.dtype == torch.float16:
            raise ValueError(
                "float16 is not supported: GLM-4 activations exceed float16's range (65504) and turn "
                "into inf/NaN. Use dtype=torch.bfloat16 (or float32 where bfloat16 is unavailable)."
            )

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(
                    f"inputs_embeds must be (batch, seq, {self.config.hidden_size}), "
                    f"got {tuple(inputs_embeds.shape)}"
                )
            return inputs_embeds
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(
                f"input_ids must be an integer (batch, seq) tensor, got {input_ids.dtype} "
                f"of shape {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: pass at least one token")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        return self.embed_tokens(input_ids)

    def _check_length(self, last_position: int) -> None:
        limit = self.config.max_context
        if limit is not None and last_position >= limit:
            raise ValueError(
                f"the sequence needs {last_position + 1:,} positions but the model's context is "
                f"{limit:,}; shorten the input or enable rope scaling (YaRN) in config.json"
            )

    @staticmethod
    def _check_mask(attention_mask: torch.Tensor, batch: int, length: int, kv_len: int) -> torch.Tensor:
        if (
            attention_mask.dim() != 2
            or attention_mask.shape[0] != batch
            or (attention_mask.shape[1] not in (length, kv_len))
        ):
            raise ValueError(
                f"attention_mask must be (batch, past + new tokens) = ({batch}, {length}), "
                f"got {tuple(attention_mask.shape)}"
            )
        return attention_mask


class Glm4ForCausalLM(Glm4PreTrainedModel, GenerationMixin):
    def __init__(self, config: Glm4Config) -> None:
        super().__init__()
        self.config = config
        self.model = Glm4Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.lm_head.weight.device.type != "meta":
            nn.init.normal_(self.lm_head.weight, std=config.initializer_range)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> CausalLMOutput:
        out = self.model(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            inputs_embeds,
            use_cache,
            output_hidden_states,
        )
        h = out.last_hidden_state
        # Generation only needs the last position: skip the (vocab x hidden) matmul for the rest.
        h = h[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(loss, logits, out.past_key_values, out.hidden_states)

    def decode_step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache,
        cache_position: torch.Tensor,
    ) -> torch.Tensor:
        """forward() for generation: tensors in, last-position logits (B, vocab) out, no checks.

        Everything is a tensor of fixed shape but the mask, whose width is what the step attends
        over: the whole static cache (fixed, for CUDA graphs) or its filled part (marked dynamic,
        so that one compiled graph still serves every step). The caller advances the cache.
        """
        base = self.model
        x = base.embed_tokens(input_ids)
        cos, sin = base.rotary_emb(position_ids, x.dtype)
        for layer in base.layers:
            x = layer(x, cos, sin, mask, cache, cache_position)
        return self.lm_head(base.norm(x[:, -1])).float()


# -- the language model's loss (the other heads' are in heads.py) ---------------------------------


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy: position t predicts labels[t + 1]; -100 is ignored."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    return F.cross_entropy(
        logits.float().flatten(0, 1), shifted.flatten().to(logits.device), ignore_index=-100
    )
