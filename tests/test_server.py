"""The OpenAI-compatible server, through the real openai client, on a loopback port."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn
from helpers import build_tiny_checkpoint, free_port

from glm4.demo.train import WEATHER_TOOL
from glm4.engine import Engine
from glm4.pipeline import Glm4Pipeline
from glm4.server import create_app

MODEL = "glm4-demo"


class Server:
    """uvicorn in a thread, serving an app until stop()."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(5)


def start(pipeline, api_key=None, **engine_args):
    engine = Engine(pipeline.model, **{"max_batch_size": 16, "compile": False, **engine_args})
    return Server(create_app(pipeline, engine, MODEL, api_key)), engine


@pytest.fixture(scope="module")
def demo():
    return Glm4Pipeline.from_pretrained(device="cpu")


@pytest.fixture(scope="module")
def server(demo):
    srv, engine = start(demo)
    yield srv
    srv.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def ask(client, content, **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], temperature=0, **kwargs
    )


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_chat(client):
    reply = ask(client, "What is the capital of France?")
    choice = reply.choices[0]
    assert choice.message.content == "The capital of France is Paris." and choice.finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_stream_concatenates_to_the_whole(client):
    whole = ask(client, "What is 7 + 8?").choices[0].message.content
    chunks = list(ask(client, "What is 7 + 8?", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole == "7 + 8 = 15."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_tool_call_whole_and_streamed(client):
    reply = ask(client, "What is the weather in Paris?", tools=[WEATHER_TOOL])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(ask(client, "What is the weather in Paris?", tools=[WEATHER_TOOL], stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["get_weather"]
    assert json.loads(deltas[0].function.arguments) == {"city": "Paris"} and deltas[0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # tool_choice "none" offers no tools: the model answers in text.
    plain = ask(client, "What is the weather in Paris?", tools=[WEATHER_TOOL], tool_choice="none")
    assert plain.choices[0].message.tool_calls is None


def test_tool_result_round_trip_is_accepted(client):
    reply = ask(client, "What is the weather in Paris?", tools=[WEATHER_TOOL])
    call = reply.choices[0].message.tool_calls[0]
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"weather": "sunny"}'},
    ]
    follow = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=8
    )
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_16_concurrent_streams_equal_the_same_requests_alone(client):
    from glm4.demo.train import CAPITALS

    questions = [f"What is the capital of {c}?" for c in list(CAPITALS)[:8]] + [
        f"What is {a} + {a + 1}?" for a in range(8)
    ]
    alone = [ask(client, q).choices[0].message.content for q in questions]

    def stream(q):
        return "".join(c.choices[0].delta.content or "" for c in ask(client, q, stream=True) if c.choices)

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(stream, questions))
    assert together == alone
    assert all(city in a for city, a in zip(list(CAPITALS.values())[:8], alone, strict=False))


def test_completions(client):
    out = client.completions.create(model=MODEL, prompt="The capital of", max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens <= 5
    streamed = client.completions.create(
        model=MODEL, prompt="The capital of", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text


def test_stop_strings(client):
    reply = ask(client, "What is the capital of France?", stop=[" is"])
    assert (
        reply.choices[0].message.content == "The capital of France"
        and reply.choices[0].finish_reason == "stop"
    )
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in ask(client, "What is the capital of France?", stop=[" is"], stream=True)
    )
    assert streamed == "The capital of France"


# -- errors ------------------------------------------------------------------------------------


def post(server, body, headers=None, raw=None):
    headers = {"content-type": "application/json", **(headers or {})}
    url = server.url + "/v1/chat/completions"
    return httpx.post(url, json=body if raw is None else None, content=raw, headers=headers)


def test_malformed_json_and_wrong_types_are_400(server):
    r = post(server, None, raw=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = post(server, {"model": MODEL, "messages": "hello"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = post(server, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = post(server, {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and "wizard" in r.json()["error"]["message"]
    r = post(server, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2})
    assert r.status_code == 400


def test_prompt_longer_than_the_context_is_400(client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as e:
        ask(client, "word " * 600)
    message = e.value.body["message"]
    assert "tokens but the context is 512" in message


def test_unknown_model_is_404(client):
    from openai import NotFoundError

    with pytest.raises(NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])


def test_api_key(demo):
    from openai import AuthenticationError, OpenAI

    srv, engine = start(demo, api_key="sesame")
    try:
        good = OpenAI(base_url=srv.url + "/v1", api_key="sesame", max_retries=0)
        assert ask(good, "What is 1 + 1?").choices[0].message.content == "1 + 1 = 2."
        for key in ("wrong", None):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            r = httpx.get(srv.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(AuthenticationError):
            ask(OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0), "hi")
        assert httpx.get(srv.url + "/health").status_code == 200  # not behind the key
    finally:
        srv.stop()
        engine.shutdown()


def test_busy_server_answers_503_and_a_dropped_stream_frees_its_slot(tmp_path):
    build_tiny_checkpoint(tmp_path, context=8192)
    pipe = Glm4Pipeline.from_pretrained(tmp_path, device="cpu")
    with torch.no_grad():  # all logits equal: greedy picks token 0, a byte, never a stop token
        pipe.model.lm_head.weight.zero_()
    srv, engine = start(pipe, max_batch_size=1, queue_timeout=0.3)
    try:
        messages = [{"role": "user", "content": "Hello"}]
        body = {"model": MODEL, "messages": messages, "max_tokens": 8000, "stream": True, "temperature": 0}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body) as long:
            assert long.status_code == 200
            lines = long.iter_lines()  # (kept: a dropped iterator closes the connection)
            next(lines)  # it is running and holds the only slot
            r = post(srv, {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        # The client went away mid-stream: its sequence is cancelled and the next request runs at once.
        start_time = time.monotonic()
        r = post(srv, {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert r.status_code == 200 and time.monotonic() - start_time < 5
        assert not engine.active
    finally:
        srv.stop()
        engine.shutdown()
