"""Parse model output text: GLM-4-0414 tool calls and GLM-Z1 reasoning, whole or chunk by chunk.

Tool calls (reference §3): after `<|assistant|>` the model writes `{name}\\n{json arguments}` and
stops on `<|observation|>`; several calls are separated by `<|assistant|>`. A plain answer starts
with a newline instead of a name. Z1 reasoning: the prompt already opened `<think>`, so the output
starts inside the reasoning and only `</think>` appears in it.

The streaming parsers hold back only what could still become a separator, so any chunking of a
text yields exactly what the whole-text parse does.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

ASSISTANT = "<|assistant|>"
OBSERVATION = "<|observation|>"
THINK_END = "</think>"
_CALL = re.compile(r"([\w.\-]+)[ \t]*\n(.*)", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON string, as the OpenAI API carries it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class ParsedOutput:
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning: str | None = None


def _parse_segment(segment: str) -> ToolCall | None:
    """A segment is a call when it is `name\\n{json object}`; anything else (bad JSON too) is text."""
    m = _CALL.fullmatch(segment.rstrip().removesuffix(OBSERVATION).rstrip())
    if not m:
        return None
    try:
        arguments = json.loads(m.group(2))
    except json.JSONDecodeError:
        return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(m.group(1), json.dumps(arguments, ensure_ascii=False))


def parse_tool_calls(text: str) -> ParsedOutput:
    """Split GLM-4 output into plain content and tool calls."""
    out = ParsedOutput()
    for segment in text.split(ASSISTANT):
        call = _parse_segment(segment)
        if call is not None:
            out.tool_calls.append(call)
        else:
            out.content += segment.removesuffix(OBSERVATION)
    return out


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of GLM-Z1 output; with no `</think>` (cut off) it is all reasoning."""
    reasoning, sep, answer = text.partition(THINK_END)
    return reasoning, answer.lstrip() if sep else ""


def parse_output(text: str, reasoning: bool = False, tools: bool = False) -> ParsedOutput:
    """Reasoning first (Z1), then tool calls in the answer when tools were offered.

    The answer loses its leading whitespace: GLM-4 starts a plain reply with a newline.
    """
    thought = None
    if reasoning:
        thought, text = split_reasoning(text)
    out = parse_tool_calls(text) if tools else ParsedOutput(content=text)
    out.content = out.content.lstrip()
    out.reasoning = thought
    return out


def held_back(text: str, token: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of token."""
    for n in range(min(len(token) - 1, len(text)), 0, -1):
        if token.startswith(text[-n:]):
            return n
    return 0


@dataclass
class Delta:
    """What one chunk of streamed text added."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


class StreamParser:
    """Incremental `parse_output`: feed text chunks, get deltas; `finish()` flushes the rest."""

    def __init__(self, reasoning: bool = False, tools: bool = False) -> None:
        self.tools = tools
        self.in_reasoning = reasoning
        self.answer_started = not reasoning  # Z1's answer drops the whitespace after </think>
        self.content_started = False  # the answer's leading whitespace is dropped, as in parse_output
        self.pending = ""  # reasoning text not yet known to be free of "</think>"
        self.segment = ""  # the current tool-call segment (since the last <|assistant|>)
        self.segment_is_text = False  # decided: this segment is plain content, stream it

    def feed(self, chunk: str) -> Delta:
        delta = Delta()
        if self.in_reasoning:
            self.pending += chunk
            if THINK_END in self.pending:
                thought, _, chunk = self.pending.partition(THINK_END)
                delta.reasoning, self.pending, self.in_reasoning = thought, "", False
            else:
                keep = held_back(self.pending, THINK_END)
                delta.reasoning = self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(delta.reasoning) :]
                return delta
        if not self.answer_started:
            chunk = chunk.lstrip()
            self.answer_started = bool(chunk)
        self._answer(chunk, delta, final=False)
        return self._trim(delta)

    def finish(self) -> Delta:
        delta = Delta()
        if self.in_reasoning:
            delta.reasoning, self.pending = self.pending, ""
            return delta
        self._answer("", delta, final=True)
        return self._trim(delta)

    def _trim(self, delta: Delta) -> Delta:
        if not self.content_started:
            delta.content = delta.content.lstrip()
            self.content_started = bool(delta.content)
        return delta

    def _answer(self, chunk: str, delta: Delta, final: bool) -> None:
        if not self.tools:
            delta.content += chunk
            return
        self.segment += chunk
        while ASSISTANT in self.segment:
            done, _, self.segment = self.segment.partition(ASSISTANT)
            self._close_segment(done, delta)
        if final:
            self._close_segment(self.segment, delta)
            self.segment = ""
        elif self.segment_is_text or (self.segment and not _could_be_call(self.segment)):
            # Plain text: stream it, holding back what could be the start of a separator.
            self.segment_is_text = True
            keep = max(held_back(self.segment, ASSISTANT), held_back(self.segment, OBSERVATION))
            if self.segment.endswith(OBSERVATION):
                keep = len(OBSERVATION)
            emit = self.segment[: len(self.segment) - keep]
            delta.content += emit
            self.segment = self.segment[len(emit) :]

    def _close_segment(self, segment: str, delta: Delta) -> None:
        call = None if self.segment_is_text else _parse_segment(segment)
        if call is not None:
            delta.tool_calls.append(call)
        else:
            delta.content += segment.removesuffix(OBSERVATION)
        self.segment_is_text = False


def _could_be_call(segment: str) -> bool:
    """Whether a segment's start still fits `name\\n{...`; plain answers start with a newline."""
    return re.match(r"[\w.\-]+[ \t]*(\n\s*(\{.*)?)?$", segment, re.DOTALL) is not None
