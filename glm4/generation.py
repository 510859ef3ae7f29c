"""generate(): a loop over token ids that yields as it goes; it knows nothing of text.

It follows transformers' `generate` step for step (positions from the padding mask, finished rows
padded with pad_token_id, logits processors in the same order), so greedy output is identical on
the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from glm4.cache import DynamicCache, KVCache, StaticCache
from glm4.sampling import SamplingParams, sample_next
from glm4.steps import decode_step_for, pack_for

# (row, generated ids of that row) -> stop now? Used for stop strings, which need a tokenizer.
StopCheck = Callable[[int, list[int]], bool]
GREEDY = SamplingParams()


def stream_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 256,
    params: SamplingParams = GREEDY,
    eos_token_id: list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    stop_check: StopCheck | None = None,
    cache: str = "static",
    compile: bool | None = None,
    prefill_chunk: int = 512,
    pack: bool | None = None,
    overlap: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,) per step; a finished row gets pad_token_id.

    cache: "static" (preallocated, the default) or "dynamic" (grows by concatenation).
    compile: None (the default) takes the fastest decode step that applies: the fused CPU step
        (`glm4.fused`), else the torch.compile'd graph where it pays off, else the module; True
        the compiled graph; False the module as it is.
    prefill_chunk: the prompt is run through the model this many tokens at a time.
    pack: keep the weights in oneDNN's blocked layout for batched CPU decoding too (see
        `pack_weights`); None packs for batches when the copy fits in the memory available.
    overlap: queue each decode step before the host reads the token it takes (from the second
        token on), so that on a GPU the loop's own work (stop checks, the next step's inputs, CUDA
        graph bookkeeping) runs while the device computes. Tokens then come as CPU tensors, and a
        generation that stops early computes one step it does not use. Off by default: a candidate
        for CUDA, not yet measured there (it cannot help where the step runs on the host).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be a non-empty (batch, seq) tensor, got shape {tuple(input_ids.shape)}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if cache not in ("static", "dynamic"):
        raise ValueError(f"cache must be 'static' or 'dynamic', got {cache!r}")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    config = model.config
    device = input_ids.device
    eos = eos_token_id if eos_token_id is not None else config.eos_token_ids
    eos = [eos] if isinstance(eos, int) else list(eos)
    stop_ids = set(eos)
    if pad_token_id is None:
        # (no pad and no eos: no row ever finishes early, so the pad is never written)
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    B, T = input_ids.shape
    limit = config.max_context
    if limit is not None:
        if T >= limit:
            raise ValueError(
                f"the prompt has {T:,} tokens but the model's context is {limit:,}; shorten it or enable "
                "rope scaling (YaRN) in config.json"
            )
        max_new_tokens = min(max_new_tokens, limit - T)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # Left padding: a row's first real token is position 0 (padding positions do not matter).
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    if cache == "static":
        kv = StaticCache.borrow(model, B, _bucket(T + max_new_tokens))
    else:
        kv = DynamicCache()
    compile = compile if cache == "static" else False
    pack_for(model, B, pack, compile)
    if hasattr(model, "refresh_fused_qkv"):
        model.refresh_fused_qkv()
    step, kind = decode_step_for(model, B, compile, max_new_tokens)
    compiled = kind == "compiled"

    seen = input_ids if params.repetition_penalty != 1.0 else None
    counts = None
    if params.presence_penalty or params.frequency_penalty:
        counts = torch.zeros(B, config.vocab_size, device=device)
    unfinished = [True] * B
    live = torch.ones(B, dtype=torch.bool, device=device)  # `unfinished` on the device
    generated: list[list[int]] = [[] for _ in range(B)]
    try:
        with torch.inference_mode():
            logits = prefill(model, input_ids, attention_mask, positions, kv, prefill_chunk)
            # Which cache slots hold real tokens: the prompt's, then each generated one as written.
            width = kv.kv_length(0)
            key_mask = torch.zeros(B, width, dtype=torch.bool, device=device)
            key_mask[:, :T] = attention_mask.bool()
            position = positions[:, -1:]
            slot = torch.tensor([kv.get_seq_length()], device=device)

            def decode(token: torch.Tensor) -> torch.Tensor:
                """Run `token` through the model: the next logits. Only queues work on a GPU."""
                nonlocal seen, key_mask, position, slot
                if seen is not None:
                    seen = torch.cat([seen, token[:, None]], dim=-1)
                position = position + 1
                filled = kv.get_seq_length()
                if cache == "static":
                    key_mask[:, filled] = True
                else:
                    key_mask = torch.cat([key_mask, key_mask.new_ones(B, 1)], dim=-1)
                logits = step(token[:, None], position, step_mask(key_mask, filled + 1, compiled), kv, slot)
                kv.advance(1)
                slot = slot + 1
                return logits

            for i in range(max_new_tokens):
                last = i == max_new_tokens - 1
                token = sample_next(logits, params, seen, counts, generator)
                if not all(unfinished):
                    token = torch.where(live, token, pad_token_id)
                if counts is not None:
                    counts.scatter_add_(-1, token[:, None], live[:, None].float())
                # Ahead: the next step is queued before the host reads this token (from the second
                # on, so that a first compile does not hold back the first token).
                ahead = overlap and i > 0 and not last
                shown = token
                if overlap:  # every token comes as a CPU tensor
                    read = host_copy(token)
                    if ahead:
                        logits = decode(token)
                    shown = read()
                yield shown
                # The bookkeeping on Python ints: after a step has streamed the weights through the
                # caches, every small tensor op here costs tens of microseconds.
                for row, t in enumerate(shown.tolist()):
                    if not unfinished[row]:
                        continue
                    if t in stop_ids:
                        unfinished[row] = False
                    elif stop_check is not None:
                        generated[row].append(t)
                        unfinished[row] = not stop_check(row, generated[row])
                    if not unfinished[row]:
                        live[row] = False
                if not any(unfinished) or last:
                    return
                if not ahead:
                    logits = decode(token)
    finally:
        if isinstance(kv, StaticCache):
            kv.give_back(model)


def host_copy(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start copying `tensor` to the host; the returned call gives the copy. On CUDA it waits for
    that copy alone, not for the work queued after it (the next decode step); elsewhere the copy is
    made at once."""
    if tensor.device.type != "cuda":
        copy = tensor.cpu()
        return lambda: copy
    copy = tensor.to("cpu", non_blocking=True)  # into pinned memory
    done = torch.cuda.Event()
    done.record()

    def read() -> torch.Tensor:
        done.synchronize()
        return copy

    return read


def step_mask(key_mask: torch.Tensor, filled: int, compiled: bool) -> torch.Tensor:
    """The (B, 1, 1, S) mask a decode step attends with, from the (B, cache size) mask of the
    slots that hold keys, of which the first `filled` are in use.

    A step attends over those only: a static cache is sized for the longest answer, and attending
    over all of it (masked) made every step of a small model on the CPU a quarter slower at 4096
    slots. A compiled CPU step takes the width as a dynamic size, so one graph serves every
    length; CUDA graphs need fixed shapes, so there a step attends over the whole cache.
    """
    if compiled and key_mask.device.type == "cuda":
        return key_mask[:, None, None, :]
    mask = key_mask[:, None, None, :filled]
    if compiled:
        torch._dynamo.mark_dynamic(mask, 3)
    return mask


def prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    cache: KVCache,
    chunk: int,
) -> torch.Tensor:
    """Run the prompt into the cache `chunk` tokens at a time; the last position's logits (B, vocab).

    Chunks bound the activation memory of long prompts; only the very last position goes through
    the (vocab x hidden) lm_head.
    """
    T = input_ids.shape[1]
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        out = model(
            input_ids[:, start:end],
            attention_mask=attention_mask[:, :end],
            position_ids=positions[:, start:end],
            past_key_values=cache,
            logits_to_keep=1,
        )
    return out.logits[:, -1].float()


def _bucket(length: int, smallest: int = 512) -> int:
    """Round cache sizes up to a power of two: the compiled step's shapes are fixed, so a growing
    chat recompiles only when its length doubles, not every few hundred tokens."""
    return max(smallest, 1 << (length - 1).bit_length())


class GenerationMixin:
    """`model.generate(...)` with transformers-style keyword arguments."""

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 256,
        streamer: Callable[[torch.Tensor], None] | None = None,
        cache: str = "static",
        compile: bool | None = None,
        prefill_chunk: int = 512,
        pack: bool | None = None,
        overlap: bool = False,
        **sampling: Any,
    ) -> torch.Tensor:
        """Generate like transformers' `generate`: prompt + new ids (B, T + N).

        `sampling` takes the keyword arguments of `generation_kwargs` (do_sample, temperature,
        top_k, top_p, min_p, repetition_penalty, eos_token_id, pad_token_id, seed, generator,
        stop_strings with tokenizer). `streamer` is called with each step's tokens (B,). `cache`,
        `compile`, `prefill_chunk`, `pack` and `overlap` choose the path (see `stream_tokens`); every path
        gives the same greedy tokens up to near-ties that bf16 rounding in another order tips.
        """
        kwargs = self.generation_kwargs(**sampling)
        kwargs.update(cache=cache, compile=compile, prefill_chunk=prefill_chunk, pack=pack, overlap=overlap)
        steps = []
        for token in stream_tokens(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, **kwargs):
            steps.append(token)
            if streamer is not None:
                streamer(token)
        return torch.cat([input_ids, torch.stack(steps, dim=1).to(input_ids.device)], dim=1)

    def generation_kwargs(
        self,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        stop_strings: list[str] | None = None,
        tokenizer: Any = None,
    ) -> dict[str, Any]:
        """Keyword arguments for `stream_tokens`, with defaults from generation_config.json."""
        params = SamplingParams(
            do_sample,
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
        )
        defaults = getattr(self, "generation_config", None) or {}
        if eos_token_id is None:
            eos_token_id = defaults.get("eos_token_id", self.config.eos_token_ids)
        if isinstance(eos_token_id, int):
            eos_token_id = [eos_token_id]
        if pad_token_id is None:
            pad_token_id = defaults.get("pad_token_id", self.config.pad_token_id)
        if generator is None and seed is not None:
            generator = torch.Generator(self.device).manual_seed(seed)
        stop_check = None
        if stop_strings:
            if tokenizer is None:
                raise ValueError("stop_strings need the tokenizer: pass tokenizer=...")
            stop_check = stop_string_check(stop_strings, tokenizer)
        return dict(
            params=params,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            generator=generator,
            stop_check=stop_check,
        )


def stop_string_check(stop_strings: list[str], tokenizer: Any) -> StopCheck:
    """Stop a row once its generated text contains a stop string (checked over a short tail)."""
    tail = max(len(s) for s in stop_strings) + 8  # tokens are at least one character, mostly

    def check(row: int, ids: list[int]) -> bool:
        text = tokenizer.decode(ids[-tail:])
        return any(s in text for s in stop_strings)

    return check
