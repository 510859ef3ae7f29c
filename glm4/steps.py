"""Which decode step a generation runs, and building it: the fused CPU step (`glm4.fused`), the
torch.compile'd graph (CUDA graphs on a GPU; compiled once per model and shapes), or the module as
it is; and whether batches read a packed copy of the weights. generation.py and the serving engine
ask `decode_step_for` and `pack_for`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from glm4 import fused, kernels, quantization

logger = logging.getLogger("glm4")


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
            quantization.check_inductor()
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
