"""generate(): a loop over token ids that yields as it goes; it knows nothing of text.

It follows transformers' `generate` step for step (positions from the padding mask, finished rows
padded with pad_token_id, logits processors in the same order), so greedy output is identical on
the same weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from glm4 import fused, kernels
from glm4.cache import DynamicCache, KVCache, StaticCache
from glm4.sampling import SamplingParams, sample_next

logger = logging.getLogger("glm4")

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
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else eos[0]
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


def decode_step_for(
    model: torch.nn.Module, batch_size: int, compile: bool | None, max_new_tokens: int
) -> tuple[Callable[..., torch.Tensor], str]:
    """The decode step a generation of `batch_size` rows runs on a static (or slot) cache, called as
    `model.decode_step`, and which it is: "fused", "compiled" or "module". `compile` None: the
    fastest that applies (the fused CPU step, else the compiled graph where it pays for its compile
    time, else the module); True: the compiled graph; False: the module as it is."""
    if compile is None:
        step = fused.fused_step(model, batch_size)
        if step is not None:
            return step, "fused"
        compile = should_compile(model, max_new_tokens)
    return (steady(model), "compiled") if compile else (model.decode_step, "module")


def should_compile(model: torch.nn.Module, max_new_tokens: int) -> bool:
    """Compiling costs seconds up front; it pays off for real models and longer generations."""
    if model.config.rope_type == "dynamic":
        return False  # its frequencies depend on the length, read on the host each step
    if model.device.type == "cuda":
        return max_new_tokens >= 16
    return model.num_parameters() >= 50_000_000 and max_new_tokens >= 64


def available_memory() -> int | None:
    """Bytes the kernel could hand out now without swapping (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def should_pack(model: torch.nn.Module, batch_size: int, reserve: int = 2 << 30) -> bool:
    """Pack the weights for batched CPU decoding if the copy leaves `reserve` bytes of memory free.

    Batch 1 never needs it (it reads the plain weights), and a copy that does not fit would send
    the machine into swap for a speed-up.
    """
    if batch_size < 2 or model.device.type != "cpu" or not hasattr(model, "pack_weights"):
        return False
    needed = model.packable_bytes()
    if needed == 0:
        return True  # already packed (or nothing to pack): refreshing is free
    free = available_memory()
    return free is not None and needed + reserve <= free


def pack_for(model: torch.nn.Module, batch_size: int, pack: bool | None, compile: bool | None = None) -> None:
    """Pack the weights if asked to (True), or if None and `should_pack` says it pays and fits, but
    not where the fused step will run (`compile` None and it applies): it reads the plain weights,
    so a copy would double the weights' memory for prefill alone."""
    if pack is None and compile is None and fused.applies(model, batch_size):
        return
    if pack or (pack is None and should_pack(model, batch_size)):
        model.pack_weights()


# Graphs of decode_step a process may compile: one per model, batch size and cache size. dynamo
# counts them together (one code object), and past its default of 8 a fullgraph step fails.
RECOMPILE_LIMIT = 256


def compiled_step(model: torch.nn.Module):
    """`model.decode_step` under torch.compile, built once per model and kept on it."""
    step = getattr(model, "_compiled_decode_step", None)
    if step is None:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        if model.device.type == "cuda":
            # CUDA graphs (mode "reduce-overhead"). For a quantized model, also coordinate descent
            # tuning: inductor then turns one-row matmuls into reductions (its mm decomposition asks
            # for it) and fuses the int8 dequantization into them (and that of int4 layers tinygemm
            # does not take); without it the library matmul reads a bf16 copy of each weight written
            # every step (int8 at batch 1 on an H200: 10.9 tok/s against bf16's 127.5; with the
            # tuning, not yet measured, as its compile outran the GPU lease). For bf16 it measured no
            # better (124.7 tok/s), so bf16 goes without.
            quantized = bool(getattr(model.config, "quantization", None))
            options = {"triton.cudagraphs": True, "coordinate_descent_tuning": quantized}
            step = torch.compile(model.decode_step, fullgraph=True, dynamic=False, options=options)
        else:
            if model.dtype == torch.bfloat16:
                kernels.available()  # build the CPU kernels now: tracing cannot
            # Materialise every intermediate instead of recomputing it inside the consumers: otherwise
            # inductor inlines a norm into the next matmul-as-reduction and redoes it for every row.
            options = {"realize_reads_threshold": 1, "realize_opcount_threshold": 1}
            step = torch.compile(model.decode_step, fullgraph=True, dynamic=False, options=options)
        model._compiled_decode_step = step
    return step


_compiled: set[tuple] = set()  # the models and shapes whose decode step this process has compiled


def steady(model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """The model's compiled step for a run of calls on inputs of unchanging shapes: once the first
    call has passed dynamo's guards, later calls skip evaluating them (about 0.5 ms a step on the
    CPU, a few percent of a small model's step).

    The first call for a model and shapes this process has not met compiles, which takes from
    seconds to minutes by model size: it is logged (logger "glm4", INFO; the CLI shows it).
    """
    step = compiled_step(model)
    checked = False

    # decode_step's arguments; the cache is a static or slot cache (a fixed max_length).
    def call(tokens: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, cache: Any, slot: Any):
        nonlocal checked
        args = (tokens, position, mask, cache, slot)
        if not checked:
            checked = True
            batch, positions = tokens.shape[0], cache.max_length
            # What dynamo's guards look at: another instance of the same model shares the graph.
            key = (repr(model.config), model.dtype, model.device, batch, positions)
            if key in _compiled:
                return step(*args)
            logger.info("compiling the decode step for batch %d, %d cache positions (once)", batch, positions)
            start = time.perf_counter()
            out = step(*args)
            _compiled.add(key)
            logger.info("compiled in %.1f s", time.perf_counter() - start)
            return out
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            return step(*args)

    return call


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
