"""Continuous batching: many sequences, one model, one loop.

The engine's thread owns the model. Each step it admits waiting requests into free cache slots
(prefilling their prompts), then runs one decode step over every slot at once and hands each
request its next token. A finished or cancelled request leaves its slot at once, and the next
waiting one takes it at the following step. The KV cache is one preallocated block of
`max_batch_size` slots of `max_model_len` positions: that is the memory budget.

A request's greedy tokens do not depend on its neighbours: every step runs all slots, so a
request alone goes through the very same batched arithmetic as one among others.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from glm4 import sampling
from glm4.cache import KVCache, cache_buffer, kv_layout
from glm4.generation import prefill, step_mask
from glm4.sampling import SamplingParams, sample_next
from glm4.steps import decode_step_for, pack_for

logger = logging.getLogger("glm4")


def release_openmp_workers() -> bool:
    """Let the calling thread's idle OpenMP worker threads go (omp_pause_resource_all).

    The engine's thread runs the model with an OpenMP team of its own. libgomp keeps waiting
    workers spinning, ready for the next parallel region, only while it manages no more threads
    than there are CPUs; the loading thread's idle team plus the engine's exceed that whenever
    each team spans the CPUs (the default), and every kernel then waits for sleeping workers to
    wake: decode steps took twice as long (25 against 48 tok/s on 2 cores). Returns whether the
    runtime let them go.
    """
    try:
        pause = ctypes.CDLL(None).omp_pause_resource_all
    except (OSError, AttributeError):
        return False  # another OpenMP runtime, or none
    return pause(1) == 0  # omp_pause_soft


# What a request's consumer receives: token ids, then a Finished.
Emit = Callable[[object], None]


@dataclass
class Finished:
    reason: str  # "stop", "length", "cancelled", "timeout" or "error"
    completion_tokens: int
    error: str | None = None


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop_ids: frozenset[int]
    emit: Emit
    seed: int | None = None
    id: int = 0
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # Set by the engine while the request runs.
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Ask the engine to stop this request and free its slot (safe from any thread)."""
        self.cancelled = True


class SlotCache(KVCache):
    """(slots, H_kv, max_len, D) buffers; each slot is one sequence with its own length.

    Decode steps write one position per slot (`cache_position` has one entry per row); a prompt is
    prefilled into one slot through `view(slot)`.
    """

    def __init__(self, model: torch.nn.Module, slots: int, max_length: int) -> None:
        layers, kv_heads, head_dim = kv_layout(model)
        shape = (slots, kv_heads, max_length, head_dim)
        device, dtype = model.device, model.dtype
        self.keys = [cache_buffer(shape, dtype, device) for _ in range(layers)]
        self.values = [cache_buffer(shape, dtype, device) for _ in range(layers)]
        self.rows = torch.arange(slots, device=device)
        self.lengths = [0] * slots
        self.max_length = max_length

    def update(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, cache_position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # One new position per slot: row r writes at cache_position[r].
        self.keys[layer_idx][self.rows, :, cache_position] = key[:, :, 0]
        self.values[layer_idx][self.rows, :, cache_position] = value[:, :, 0]
        return self.keys[layer_idx], self.values[layer_idx]

    def view(self, slot: int) -> _SlotView:
        return _SlotView(self, slot)


class _SlotView(KVCache):
    """One slot of a SlotCache as an ordinary cache of batch 1, for prefilling a prompt."""

    def __init__(self, cache: SlotCache, slot: int) -> None:
        self.cache, self.slot = cache, slot

    def get_seq_length(self) -> int:
        return self.cache.lengths[self.slot]

    def kv_length(self, new_tokens: int) -> int:
        return self.cache.max_length

    def update(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, cache_position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.cache.keys[layer_idx][self.slot : self.slot + 1]
        values = self.cache.values[layer_idx][self.slot : self.slot + 1]
        keys.index_copy_(2, cache_position, key)
        values.index_copy_(2, cache_position, value)
        return keys, values

    def advance(self, new_tokens: int) -> None:
        self.cache.lengths[self.slot] += new_tokens


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        max_batch_size: int = 8,
        max_model_len: int | None = None,
        queue_timeout: float = 30.0,
        compile: bool | None = None,
        prefill_chunk: int = 512,
        mirror: Callable[[str, tuple], None] | None = None,
        start: bool = True,
        pack: bool | None = None,
    ) -> None:
        """`mirror(op, args)` is told of every model call before it runs (tensor parallel: rank 0
        broadcasts them); `start=False` builds the state without the loop thread (the other ranks).
        `compile` and `pack` as in `stream_tokens`: None takes the fastest decode step that applies
        at `max_batch_size` rows, and packs the weights when the copy fits in memory."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        context = model.config.max_context or model.config.max_position_embeddings
        self.max_model_len = min(max_model_len or context, context)
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        self.model = model
        self.slots = max_batch_size
        self.queue_timeout = queue_timeout
        self.prefill_chunk = prefill_chunk
        self.cache = SlotCache(model, max_batch_size, self.max_model_len)
        device = model.device
        self.key_mask = torch.zeros(max_batch_size, self.max_model_len, dtype=torch.bool, device=device)
        self.key_mask[:, 0] = True
        self.tokens = torch.zeros(max_batch_size, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch_size, 1, dtype=torch.long, device=device)
        self.write_at = torch.zeros(max_batch_size, dtype=torch.long, device=device)
        pack_for(model, max_batch_size, pack, compile)
        self.step_fn, kind = decode_step_for(model, max_batch_size, compile, 64)
        self.compiled = kind == "compiled"
        self.fused = kind == "fused"  # steps only the slots in use (see decode_slots)
        self.active: dict[int, Request] = {}
        self.waiting: deque[Request] = deque()
        self.ids = itertools.count(1)
        self.lock = threading.Condition()
        self.running = True
        self.steps = 0
        self.mirror = mirror
        self.thread = threading.Thread(target=self._loop, name="glm4-engine", daemon=True)
        if start:
            if device.type == "cpu":
                release_openmp_workers()
            self.thread.start()

    # -- the API, callable from any thread -----------------------------------------------------

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        stop_ids: set[int] | frozenset[int],
        emit: Emit,
        seed: int | None = None,
    ) -> Request:
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt):,} tokens but the context is {self.max_model_len:,} "
                "(--max-model-len); shorten it"
            )
        request = Request(
            list(prompt), params, max_new_tokens, frozenset(stop_ids), emit, seed, next(self.ids)
        )
        with self.lock:
            self.waiting.append(request)
            self.lock.notify()
        return request

    def generate(
        self, prompt: list[int], params: SamplingParams, max_new_tokens: int, stop_ids: set[int], seed=None
    ) -> Iterator[int | Finished]:
        """Blocking helper: the request's tokens, then its Finished."""
        import queue

        out: queue.Queue = queue.Queue()
        self.submit(prompt, params, max_new_tokens, stop_ids, out.put, seed)
        while True:
            item = out.get()
            yield item
            if isinstance(item, Finished):
                return

    def shutdown(self) -> None:
        with self.lock:
            self.running = False
            self.lock.notify()
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        if self.mirror is not None:
            self.mirror("stop", ())

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.lock:
                while self.running and not self.active and not self.waiting:
                    self.lock.wait()
                if not self.running:
                    break
            try:
                self._admit()
                self._expire_waiting()
                if self.active:
                    self._step()
            except Exception as e:  # never let one request take the loop down
                logger.exception("engine step failed")
                for request in [*self.active.values()]:
                    self._finish(request, "error", str(e))

    def _admit(self) -> None:
        while True:
            with self.lock:
                free = [s for s in range(self.slots) if s not in self.active]
                if not free or not self.waiting:
                    return
                request = self.waiting.popleft()
            if request.cancelled:
                request.emit(Finished("cancelled", 0))
                continue
            self._prefill(request, free[0])

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        with self.lock:
            expired = [r for r in self.waiting if now - r.submitted > self.queue_timeout or r.cancelled]
            for r in expired:
                self.waiting.remove(r)
        for r in expired:
            r.emit(Finished("cancelled" if r.cancelled else "timeout", 0))

    def _prefill(self, request: Request, slot: int) -> None:
        request.slot = slot
        if request.seed is not None:
            request.generator = torch.Generator(self.model.device).manual_seed(request.seed)
        self.active[slot] = request
        logits = self.run("prefill_slot", slot, request.prompt)
        self._take(request, logits)

    def _step(self) -> None:
        rows = [(slot, request.generated[-1]) for slot, request in self.active.items()]
        logits, order = self.run("decode_slots", rows)
        self.steps += 1
        greedy = sampling.greedy(logits).tolist()  # one call for every row that needs nothing more
        for (slot, _), i in zip(rows, order, strict=True):
            self._take(self.active[slot], logits[i : i + 1], greedy[i])

    # -- the model work: the only methods that touch the model and the cache. Under tensor parallel
    # every rank must run them in the same order with the same arguments, so they take plain values
    # and `run` tells the other ranks (see parallel.follow_engine) before running them here.

    def run(self, op: str, *args):
        if self.mirror is not None:
            self.mirror(op, args)
        return getattr(self, op)(*args)

    def prefill_slot(self, slot: int, prompt: list[int]) -> torch.Tensor:
        """Write a prompt into a free slot; the logits (1, vocab) of its last position."""
        self.cache.lengths[slot] = 0
        ids = torch.tensor([prompt], device=self.model.device)
        positions = torch.arange(len(prompt), device=self.model.device)[None]
        logits = prefill(
            self.model, ids, torch.ones_like(ids), positions, self.cache.view(slot), self.prefill_chunk
        )
        self.key_mask[slot] = False
        self.key_mask[slot, : len(prompt)] = True
        return logits

    def decode_slots(self, rows: list[tuple[int, int]]) -> tuple[torch.Tensor, list[int]]:
        """One decode step; `rows` are the (slot, last token) pairs in use. Returns the logits and,
        for each pair, its row in them.

        The compiled graph and the module step every slot (fixed shapes; a slot's numbers the same
        whoever else is in use). The fused step runs the slots in use only, as its numbers for a
        slot do not depend on the other rows: one request on an engine of 8 slots costs one row's
        step, not eight."""
        width = 1
        for slot, token in rows:
            self.tokens[slot, 0] = token
            position = self.cache.lengths[slot]
            self.positions[slot, 0] = position
            self.write_at[slot] = position
            self.key_mask[slot, position] = True
            width = max(width, position + 1)
        # Attend over the longest filled slot, not all max_model_len positions.
        mask = step_mask(self.key_mask, width, self.compiled)
        if self.fused:
            used = torch.tensor([slot for slot, _ in rows], device=self.model.device)
            take = (self.tokens[used], self.positions[used], mask[used], self.cache, self.write_at[used])
            logits, order = self.step_fn(*take, used), list(range(len(rows)))
        else:
            logits = self.step_fn(self.tokens, self.positions, mask, self.cache, self.write_at)
            order = [slot for slot, _ in rows]
        for slot, _ in rows:
            self.cache.lengths[slot] += 1
        return logits, order

    def release_slot(self, slot: int) -> None:
        self.key_mask[slot] = False
        self.key_mask[slot, 0] = True  # an empty slot attends to something, so it computes no NaN

    def _take(self, request: Request, logits: torch.Tensor, argmax: int | None = None) -> None:
        """Sample the request's next token from its logits (1, vocab), emit it, maybe finish it."""
        if request.cancelled:
            self._finish(request, "cancelled")
            return
        params = request.params
        plain = (
            params.repetition_penalty == 1.0 and not params.presence_penalty and not params.frequency_penalty
        )
        if argmax is not None and params.greedy and plain:
            self._emit(request, argmax)
            return
        seen = counts = None
        if params.repetition_penalty != 1.0:
            seen = torch.tensor([request.prompt + request.generated], device=logits.device)
        if params.presence_penalty or params.frequency_penalty:
            counts = torch.zeros_like(logits)
            if request.generated:
                counts[0].index_add_(
                    0,
                    torch.tensor(request.generated, device=logits.device),
                    torch.ones(len(request.generated), device=logits.device),
                )
        self._emit(request, int(sample_next(logits, params, seen, counts, request.generator)[0]))

    def _emit(self, request: Request, token: int) -> None:
        request.generated.append(token)
        if token in request.stop_ids:
            self._finish(request, "stop")
            return
        request.emit(token)
        used = len(request.prompt) + len(request.generated)
        if len(request.generated) >= request.max_new_tokens or used >= self.max_model_len:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        self.active.pop(request.slot, None)
        self.run("release_slot", request.slot)
        request.emit(Finished(reason, len(request.generated), error))
