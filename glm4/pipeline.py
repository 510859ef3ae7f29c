"""A model and its tokenizer together: chat messages in, parsed text out, whole or streamed.

This is where token ids meet text: generation.py yields ids, the tokenizer turns them into text
deltas, chat.py splits them into content, reasoning and tool calls.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from glm4.chat import Delta, ParsedOutput, StreamParser, ToolCall
from glm4.generation import stream_tokens
from glm4.modeling import Glm4ForCausalLM
from glm4.tokenizer import Glm4Tokenizer


@dataclass
class ChatChunk:
    """One streamed piece of a reply; the last one carries finish_reason and the token counts."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "tool_calls"
    prompt_tokens: int = 0
    completion_tokens: int = 0


def default_model_path() -> str:
    from glm4.demo import DEMO_MODEL_DIR

    return str(DEMO_MODEL_DIR)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class Glm4Pipeline:
    def __init__(self, model: Glm4ForCausalLM, tokenizer: Glm4Tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.reasoning = self._is_reasoning_template()

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike | None = None,
        dtype: str | torch.dtype = "auto",
        device: str = "auto",
        chat_template: str | None = None,
        revision: str | None = None,
        quantization: str | None = None,
        tp_plan: str | None = None,
    ) -> Glm4Pipeline:
        """Model and tokenizer from one folder or hub id (the bundled demo model by default)."""
        path = path_or_repo_id or default_model_path()
        model = Glm4ForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            device=resolve_device(device),
            revision=revision,
            quantization=quantization,
            tp_plan=tp_plan,
        )
        tokenizer = Glm4Tokenizer.from_pretrained(path, revision=revision, chat_template=chat_template)
        return cls(model, tokenizer)

    @property
    def stop_ids(self) -> set[int]:
        """Every id that ends a reply: config.json's and generation_config.json's eos ids and
        the GLM stop tokens (<|endoftext|>, <|user|>, <|observation|>) of the vocabulary."""
        ids = set(self.model.config.eos_token_ids) | set(self.tokenizer.stop_token_ids)
        eos = (getattr(self.model, "generation_config", None) or {}).get("eos_token_id", [])
        return ids | ({eos} if isinstance(eos, int) else set(eos))

    def _is_reasoning_template(self) -> bool:
        """GLM-Z1's template opens `<think>` in the generation prompt, so replies start in reasoning."""
        if self.tokenizer.chat_template is None:
            return False
        prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        return prompt.rstrip().endswith("<think>")

    # -- text in, text out --------------------------------------------------------------------

    def stream_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        max_new_tokens: int = 512,
        **sampling: Any,
    ) -> Iterator[ChatChunk]:
        """Reply to a conversation, streamed: content, Z1 reasoning and tool calls, apart."""
        ids = self.tokenizer.apply_chat_template(messages, tools=tools)
        parser = StreamParser(reasoning=self.reasoning, tools=bool(tools))
        yield from self._stream(ids, parser, max_new_tokens, sampling)

    def chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        max_new_tokens: int = 512,
        **sampling: Any,
    ) -> tuple[ParsedOutput, ChatChunk]:
        """The whole reply, and the last chunk (finish_reason, token counts)."""
        out, last = ParsedOutput(reasoning="" if self.reasoning else None), ChatChunk()
        for last in self.stream_chat(messages, tools, max_new_tokens, **sampling):
            out.content += last.content
            out.tool_calls += last.tool_calls
            if out.reasoning is not None:
                out.reasoning += last.reasoning
        return out, last

    def stream_text(self, prompt: str, max_new_tokens: int = 256, **sampling: Any) -> Iterator[ChatChunk]:
        """Continue a raw prompt (no chat template)."""
        yield from self._stream(self.tokenizer.encode(prompt), StreamParser(), max_new_tokens, sampling)

    def _stream(
        self, ids: list[int], parser: StreamParser, max_new_tokens: int, sampling: dict[str, Any]
    ) -> Iterator[ChatChunk]:
        kwargs = self.model.generation_kwargs(**sampling)
        stops = set(kwargs["eos_token_id"]) | self.stop_ids
        kwargs["eos_token_id"] = sorted(stops)
        input_ids = torch.tensor([ids], device=self.model.device)
        reply = ReplyStream(self.tokenizer, parser)
        count, finish = 0, "length"
        for token in stream_tokens(self.model, input_ids, max_new_tokens=max_new_tokens, **kwargs):
            count += 1
            if int(token[0]) in stops:
                finish = "stop"
                break
            chunk = reply.token(int(token[0]))
            if chunk is not None:
                yield chunk
        yield reply.finish(finish, len(ids), count)


class ReplyStream:
    """Token ids of one reply in, ChatChunks out: text deltas split by the output parser."""

    def __init__(self, tokenizer: Glm4Tokenizer, parser: StreamParser) -> None:
        self.decoder = tokenizer.stream_decoder()
        self.parser = parser
        self.called = False

    def token(self, token_id: int) -> ChatChunk | None:
        delta = self.parser.feed(self.decoder.add(token_id))
        self.called |= bool(delta.tool_calls)
        return _chunk(delta) if delta.content or delta.reasoning or delta.tool_calls else None

    def finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> ChatChunk:
        """The last chunk: what was held back, the finish reason ("tool_calls" after a call) and counts."""
        last = _chunk(self.parser.feed(self.decoder.flush()))
        tail = self.parser.finish()
        last.content += tail.content
        last.reasoning += tail.reasoning
        last.tool_calls += tail.tool_calls
        if reason == "stop" and (self.called or last.tool_calls):
            reason = "tool_calls"
        last.finish_reason, last.prompt_tokens, last.completion_tokens = (
            reason,
            prompt_tokens,
            completion_tokens,
        )
        return last


def _chunk(delta: Delta) -> ChatChunk:
    return ChatChunk(delta.content, delta.reasoning, list(delta.tool_calls))
