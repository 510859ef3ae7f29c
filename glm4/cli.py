"""The `glm4` command line. main(argv) -> exit code, so tests can call it."""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

import glm4

HELP_CHAT = (
    "Type a message; end a line with \\ to continue it on the next. /reset clears the chat, /exit quits."
)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="checkpoint folder or hub id (default: the bundled toy demo model)"
    )
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16 or float32")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--chat-template", default=None, help="glm4, glm-z1, a .jinja file, or template text")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only quantization")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def add_chat_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument("--tools", default=None, help="a JSON file with a list of OpenAI-style tools")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm4", description="Run GLM-4-0414 models.")
    parser.add_argument("--version", action="version", version=f"glm4 {glm4.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="answer one prompt (as a chat turn, or raw with --raw)")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="continue the prompt as plain text, no chat template")
    chat = commands.add_parser("chat", help="chat interactively")
    for sub in (gen, chat):
        add_model_args(sub)
        add_sampling_args(sub)
        add_chat_args(sub)
    serve = commands.add_parser("serve", help="serve the OpenAI-compatible API (and a chat page)")
    add_model_args(serve)
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    serve.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together")
    serve.add_argument("--max-model-len", type=int, default=None, help="positions per sequence (cache size)")
    serve.add_argument(
        "--queue-timeout", type=float, default=30.0, help="seconds a request may wait for a slot"
    )
    serve.add_argument("--served-model-name", default=None, help="the model id clients use")
    return parser


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def load_tools(path: str | None) -> list[dict[str, Any]] | None:
    if path is None:
        return None
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"tools file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"tools file {path} is not valid JSON: {e}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError(f"tools file {path} must hold a JSON list of tool objects")
    return tools


class Printer:
    """Writes a streamed reply: reasoning apart from the answer, tool calls as calls."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.state = None  # "reasoning" or "content"

    def chunk(self, chunk: Any) -> None:
        if chunk.reasoning:
            self._switch("reasoning", "[thinking] ")
            self.out.write(chunk.reasoning)
        if chunk.content:
            self._switch("content", "")
            self.out.write(chunk.content)
        for call in chunk.tool_calls:
            self._switch("call", "")
            self.out.write(f"[tool call] {call.name}({call.arguments})\n")
        self.out.flush()

    def _switch(self, state: str, header: str) -> None:
        if self.state != state:
            if self.state == "reasoning":
                self.out.write("\n[/thinking]\n")
            self.out.write(header)
            self.state = state

    def end(self) -> None:
        if self.state == "reasoning":
            self.out.write("\n[/thinking]")
        if self.state != "call":
            self.out.write("\n")
        self.out.flush()
        self.state = None


def reply(pipe: Any, messages: list[dict], tools: list | None, args: argparse.Namespace, out: TextIO) -> Any:
    """Stream one reply to `out`; return the assistant messages to keep in the history."""
    printer = Printer(out)
    content, calls = "", []
    for chunk in pipe.stream_chat(messages, tools, **sampling_kwargs(args)):
        printer.chunk(chunk)
        content += chunk.content
        calls += chunk.tool_calls
    printer.end()
    if calls:  # GLM history form of a call: metadata = the function name, content = its arguments
        return [{"role": "assistant", "metadata": c.name, "content": c.arguments} for c in calls]
    return [{"role": "assistant", "content": content}]


def start_messages(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [{"role": "system", "content": args.system}] if args.system else []


def load_pipeline(args: argparse.Namespace) -> Any:
    from glm4.parallel import is_tensor_parallel
    from glm4.pipeline import Glm4Pipeline

    tp_plan = "auto" if is_tensor_parallel() else None  # under torchrun: shard over the ranks
    return Glm4Pipeline.from_pretrained(
        args.model, args.dtype, args.device, args.chat_template, quantization=args.quantize, tp_plan=tp_plan
    )


def cmd_generate(args: argparse.Namespace, out: TextIO) -> int:
    tools = load_tools(args.tools)
    pipe = load_pipeline(args)
    if args.raw:
        printer = Printer(out)
        for chunk in pipe.stream_text(args.prompt, **sampling_kwargs(args)):
            printer.chunk(chunk)
        printer.end()
        return 0
    messages = start_messages(args) + [{"role": "user", "content": args.prompt}]
    reply(pipe, messages, tools, args, out)
    return 0


def read_message(prompt: str, out: TextIO) -> str | None:
    """One message from stdin; a trailing backslash continues it on the next line. None at EOF.

    Under tensor parallel rank 0 reads the terminal and every rank gets what it read."""
    from glm4 import parallel

    if parallel.is_tensor_parallel():
        return parallel.share(_read_lines(prompt, out) if parallel.rank() == 0 else None)
    return _read_lines(prompt, out)


def _read_lines(prompt: str, out: TextIO) -> str | None:
    lines = []
    while True:
        out.write(prompt if not lines else "... ")
        out.flush()
        line = sys.stdin.readline()
        if not line:
            return None if not lines else "\n".join(lines)
        line = line.rstrip("\n")
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def cmd_chat(args: argparse.Namespace, out: TextIO) -> int:
    tools = load_tools(args.tools)
    pipe = load_pipeline(args)
    out.write(f"glm4 chat with {args.model or 'the bundled demo model'}. {HELP_CHAT}\n")
    messages = start_messages(args)
    while True:
        text = read_message("> ", out)
        if text is None or text.strip() == "/exit":
            return 0
        if text.strip() == "/reset":
            messages = start_messages(args)
            out.write("(chat cleared)\n")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        answer = reply(pipe, messages, tools, args, out)
        messages += answer
        while answer[0].get("metadata"):  # the model called tools: the user plays them
            results = []
            for call in answer:
                result = read_message(f"result of {call['metadata']}> ", out)
                if not result:
                    break
                results.append({"role": "observation", "content": result})
            if len(results) < len(answer):
                break
            messages += results
            answer = reply(pipe, messages, tools, args, out)
            messages += answer


def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    from glm4.server import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_batch_size=args.max_batch_size,
        max_model_len=args.max_model_len,
        queue_timeout=args.queue_timeout,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        device=args.device,
        chat_template=args.chat_template,
        quantization=args.quantize,
    )
    return 0


class Progress(logging.Handler):
    """glm4's log on stderr as `glm4: ...`: the long waits (building the CPU kernels, compiling a
    decode step) and notes on the checkpoint. The library itself leaves logging to its user."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"glm4: {record.getMessage()}", file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


def show_progress() -> None:
    log = logging.getLogger("glm4")
    if not any(isinstance(h, Progress) for h in log.handlers):
        log.addHandler(Progress())
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    from glm4 import parallel

    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    if parallel.is_tensor_parallel() and parallel.rank() != 0:
        out = io.StringIO()  # under torchrun every rank computes; rank 0 alone talks to the user
    else:
        show_progress()
    commands = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve}
    try:
        return commands[args.command](args, out)
    except KeyboardInterrupt:
        out.write("\n")
        return 130
    except (ValueError, OSError) as e:
        if parallel.rank() == 0:
            print(f"glm4: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
