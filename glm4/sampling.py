"""Pure functions on logits (B, vocab): penalties, temperature, top-k/p, min-p, and the draw.

Each takes and returns float logits; removed tokens become -inf. The order in `sample_next` is
transformers': repetition penalty, then temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glm4 import kernels

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    presence_penalty: float = 0.0  # OpenAI-style, additive
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on every token in `seen` (B, T): divide positive logits, multiply negative ones."""
    if penalty == 1.0:
        return logits
    scores = logits.gather(-1, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(-1, seen, scores)


def presence_frequency_penalty(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties from per-token counts (B, vocab) of the generated tokens."""
    if presence == 0 and frequency == 0:
        return logits
    return logits - presence * (counts > 0) - frequency * counts


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove = cumulative <= 1 - p
    remove[..., -1] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), NEG_INF)


def min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens less likely than p times the most likely one."""
    if p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < p * probs.max(-1, keepdim=True).values, NEG_INF)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim of (B, vocab) logits; glm4's kernel for a real vocabulary on the CPU."""
    return kernels.argmax(logits) if kernels.can_argmax(logits) else logits.argmax(-1)


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token (B,) from last-position logits (B, vocab); argmax when greedy."""
    logits = logits.float()
    if seen is not None:
        logits = repetition_penalty(logits, seen, params.repetition_penalty)
    if counts is not None:
        logits = presence_frequency_penalty(logits, counts, params.presence_penalty, params.frequency_penalty)
    if params.greedy:
        return greedy(logits)
    logits = logits / params.temperature
    logits = min_p(top_p(top_k(logits, params.top_k), params.top_p), params.min_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
