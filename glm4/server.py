"""The OpenAI-compatible HTTP API on top of the engine: `glm4 serve`.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health, and a
small chat page at /. GLM-4 tool calls come back as OpenAI `tool_calls`, GLM-Z1 reasoning as
`reasoning_content`. Errors are OpenAI error objects; nothing a client sends reaches the engine
loop unchecked.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from glm4.chat import StreamParser, held_back
from glm4.engine import Engine, Finished
from glm4.pipeline import ChatChunk, Glm4Pipeline, ReplyStream
from glm4.sampling import SamplingParams

PAGE = Path(__file__).parent / "static" / "chat.html"


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# -- request bodies ----------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatBody(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto"] | dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionBody(SamplingFields):
    prompt: str | list[str]


def sampling_params(body: SamplingFields, defaults: dict[str, Any]) -> SamplingParams:
    """The request's sampling; what it leaves out comes from the checkpoint's generation_config.json
    (greedy when that says do_sample false), else OpenAI's defaults (temperature 1, top_p 1)."""
    temperature = body.temperature
    if temperature is None:
        temperature = defaults.get("temperature", 1.0) if defaults.get("do_sample", True) else 0.0
    top_p = body.top_p if body.top_p is not None else defaults.get("top_p", 1.0)
    return SamplingParams(
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=top_p,
        top_k=defaults.get("top_k", 0) if body.temperature is None else 0,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
    )


def to_glm_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages in GLM-4's terms: a tool call is an assistant turn with `metadata` = the
    function name and `content` = its arguments; a tool result is an `observation`."""
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool", "observation"):
            raise ApiError(
                400, f"messages[{i}].role {role!r} is not supported", "invalid_request_error", "messages"
            )
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if content is not None and not isinstance(content, str):
            raise ApiError(
                400, f"messages[{i}].content must be a string", "invalid_request_error", "messages"
            )
        if role == "assistant" and m.get("tool_calls"):
            if content:
                out.append({"role": "assistant", "content": content})
            for call in m["tool_calls"]:
                function = call.get("function", {})
                out.append(
                    {
                        "role": "assistant",
                        "metadata": function.get("name", ""),
                        "content": function.get("arguments", ""),
                    }
                )
            continue
        out.append({"role": "observation" if role == "tool" else role, "content": content or ""})
    return out


# -- the app ---------------------------------------------------------------------------------------


def create_app(
    pipeline: Glm4Pipeline,
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
) -> FastAPI:
    app = FastAPI(title="glm4", docs_url=None, redoc_url=None)
    tokenizer = pipeline.tokenizer
    created = int(time.time())
    stop_ids = pipeline.stop_ids
    defaults = getattr(pipeline.model, "generation_config", None) or {}

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = (
            f"{where}: {first.get('msg', 'invalid request')}"
            if where
            else first.get("msg", "invalid request")
        )
        return error_response(400, message, "invalid_request_error", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error")

    # A dependency rather than an HTTP middleware: Starlette's BaseHTTPMiddleware makes streaming
    # responses see a client disconnect that never happened.
    async def authorize(request: Request) -> None:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise ApiError(401, "invalid or missing API key", "invalid_request_error", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                           "invalid_request_error", "model", "model_not_found")  # fmt: skip

    def check_common(body: SamplingFields) -> None:
        check_model(body.model)
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", "invalid_request_error", "n")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @v1.get("/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "glm4"}],
        }

    def submit(prompt: list[int], body: SamplingFields, max_tokens: int | None) -> tuple[Any, asyncio.Queue]:
        """Hand the request to the engine; its tokens arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        limit = max_tokens or (engine.max_model_len - len(prompt))
        try:
            request = engine.submit(
                prompt, sampling_params(body, defaults), limit, stop_ids,
                lambda item: loop.call_soon_threadsafe(queue.put_nowait, item), body.seed,
            )  # fmt: skip
        except ValueError as e:
            raise ApiError(
                400, str(e), "invalid_request_error", "messages", "context_length_exceeded"
            ) from None
        return request, queue

    async def follow(request: Any, queue: asyncio.Queue, body: SamplingFields, parser: StreamParser):
        """ChatChunks of a submitted request as its tokens arrive; cancel it if the client goes away."""
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        reply, text = ReplyStream(tokenizer, parser), StopText(stops)
        prompt_tokens = len(request.prompt)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Finished):
                    if item.reason == "timeout":
                        raise ApiError(503, "the server is busy: no slot became free in time; retry later",
                                       "server_error", code="overloaded")  # fmt: skip
                    if item.reason == "error":
                        raise ApiError(500, f"generation failed: {item.error}", "server_error")
                    yield text.finish(reply.finish(item.reason, prompt_tokens, item.completion_tokens))
                    return
                chunk = reply.token(item)
                if chunk is None:
                    continue
                chunk = text.feed(chunk)
                if text.stopped:
                    request.cancel()
                    last = reply.finish("stop", prompt_tokens, len(request.generated))
                    last.content = ""
                    yield chunk
                    yield last
                    return
                yield chunk
        finally:
            request.cancel()

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatBody):
        check_common(body)
        tools = body.tools if body.tools and body.tool_choice != "none" else None
        try:
            prompt = tokenizer.apply_chat_template(to_glm_messages(body.messages), tools=tools)
        except ApiError:
            raise
        except Exception as e:  # a template error is the request's fault
            raise ApiError(
                400, f"could not render the chat template: {e}", "invalid_request_error", "messages"
            ) from None
        parser = StreamParser(reasoning=pipeline.reasoning, tools=bool(tools))
        request, queue = submit(prompt, body, body.max_completion_tokens or body.max_tokens)
        chunks = follow(request, queue, body, parser)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            events = chat_events(chunks, rid, now, body.model, usage)
            return StreamingResponse(sse(events), media_type="text/event-stream")
        return chat_response(await collect(chunks), rid, now, body.model)

    @v1.post("/completions")
    async def completions(body: CompletionBody):
        check_common(body)
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise ApiError(
                    400, "only one prompt per request is supported", "invalid_request_error", "prompt"
                )
            body.prompt = body.prompt[0]
        prompt = tokenizer.encode(body.prompt)
        request, queue = submit(prompt, body, body.max_tokens or 16)
        chunks = follow(request, queue, body, StreamParser())
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            events = completion_events(chunks, rid, now, body.model, usage)
            return StreamingResponse(sse(events), media_type="text/event-stream")
        whole = await collect(chunks)
        choice = {"index": 0, "text": whole.content, "logprobs": None, "finish_reason": whole.finish_reason}
        return {"id": rid, "object": "text_completion", "created": now, "model": body.model,
                "choices": [choice], "usage": usage_of(whole)}  # fmt: skip

    app.include_router(v1)
    return app


class StopText:
    """OpenAI `stop` strings on the streamed content: cut at the first match, never emit part of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, chunk: ChatChunk) -> ChatChunk:
        if not self.stops or not chunk.content:
            return chunk
        text = self.held + chunk.content
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            chunk.content, self.held, self.stopped = text[: min(hits)], "", True
            return chunk
        keep = max(held_back(text, s) for s in self.stops)
        chunk.content, self.held = text[: len(text) - keep], text[len(text) - keep :]
        return chunk

    def finish(self, last: ChatChunk) -> ChatChunk:
        last = self.feed(last)
        if not self.stopped:
            last.content += self.held
        elif last.finish_reason == "length":
            last.finish_reason = "stop"
        return last


async def collect(chunks) -> ChatChunk:
    whole = ChatChunk()
    async for c in chunks:
        whole.content += c.content
        whole.reasoning += c.reasoning
        whole.tool_calls += c.tool_calls
        whole.finish_reason = c.finish_reason or whole.finish_reason
        whole.prompt_tokens = c.prompt_tokens or whole.prompt_tokens
        whole.completion_tokens = c.completion_tokens or whole.completion_tokens
    return whole


def usage_of(c: ChatChunk) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}  # fmt: skip


def chat_response(whole: ChatChunk, rid: str, now: int, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": whole.content or None}
    if whole.reasoning:
        message["reasoning_content"] = whole.reasoning
    if whole.tool_calls:
        message["tool_calls"] = [c.to_openai() for c in whole.tool_calls]
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": whole.finish_reason}
    return {"id": rid, "object": "chat.completion", "created": now, "model": model, "choices": [choice],
            "usage": usage_of(whole)}  # fmt: skip


async def chat_events(chunks, rid: str, now: int, model: str, include_usage: bool):
    def event(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": now,
            "model": model,
            "choices": [choice],
        }

    yield event({"role": "assistant", "content": ""})
    calls = 0
    last = ChatChunk()
    async for c in chunks:
        last = c
        if c.reasoning:
            yield event({"reasoning_content": c.reasoning})
        if c.content:
            yield event({"content": c.content})
        for call in c.tool_calls:
            call_delta = {"index": calls, "id": call.id, "type": "function",
                          "function": {"name": call.name, "arguments": call.arguments}}  # fmt: skip
            yield event({"tool_calls": [call_delta]})
            calls += 1
    yield event({}, last.finish_reason)
    if include_usage:
        yield {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model, "choices": [],
               "usage": usage_of(last)}  # fmt: skip


async def completion_events(chunks, rid: str, now: int, model: str, include_usage: bool):
    def event(text: str, finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "text_completion", "created": now, "model": model, "choices": [choice]}

    last = ChatChunk()
    async for c in chunks:
        last = c
        if c.content:
            yield event(c.content)
    yield event("", last.finish_reason)
    if include_usage:
        yield {"id": rid, "object": "text_completion", "created": now, "model": model, "choices": [],
               "usage": usage_of(last)}  # fmt: skip


async def sse(events):
    try:
        async for e in events:
            yield f"data: {json.dumps(e, ensure_ascii=False)}\n\n"
    except ApiError as e:  # an error after the stream began: an error event, then the end
        yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'code': e.code}})}\n\n"
    yield "data: [DONE]\n\n"


def serve(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch_size: int = 8,
    max_model_len: int | None = None,
    queue_timeout: float = 30.0,
    served_model_name: str | None = None,
    **load: Any,
) -> None:
    """Load the model, start the engine and run the HTTP server until interrupted."""
    import uvicorn

    from glm4 import parallel

    tp = parallel.is_tensor_parallel()
    pipeline = Glm4Pipeline.from_pretrained(model, tp_plan="auto" if tp else None, **load)
    if tp and parallel.rank() != 0:  # the other ranks only mirror rank 0's model calls
        follower = Engine(pipeline.model, max_batch_size, max_model_len, queue_timeout, start=False)
        parallel.follow_engine(follower)
        return
    mirror = parallel.broadcast_engine_op if tp else None
    engine = Engine(pipeline.model, max_batch_size, max_model_len, queue_timeout, mirror=mirror)
    name = served_model_name or model or "glm4-demo"
    app = create_app(pipeline, engine, name, api_key)
    print(f"glm4 serving {name!r} on http://{host}:{port}  (OpenAI API at /v1, chat page at /)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.shutdown()
