"""The model + tokenizer pipeline: streamed chunks, finish reasons, Z1 detection."""

import pytest
from helpers import build_tiny_checkpoint

from glm4.pipeline import Glm4Pipeline


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    out = {}
    for template in ("glm4", "glm-z1"):
        folder = tmp_path_factory.mktemp(template)
        build_tiny_checkpoint(folder, chat_template=template)
        out[template] = Glm4Pipeline.from_pretrained(folder, device="cpu")
    return out


def test_z1_template_is_detected_and_output_starts_in_reasoning(pipes):
    assert not pipes["glm4"].reasoning and pipes["glm-z1"].reasoning
    out, last = pipes["glm-z1"].chat([{"role": "user", "content": "Hello"}], max_new_tokens=10)
    # A random model never writes </think>: everything is reasoning (cut off), nothing is content.
    assert out.content == "" and out.reasoning and last.finish_reason in ("length", "stop")


def test_stream_and_whole_agree_and_count_tokens(pipes):
    pipe = pipes["glm4"]
    messages = [{"role": "user", "content": "Hello world!"}]
    chunks = list(pipe.stream_chat(messages, max_new_tokens=12))
    out, last = pipe.chat(messages, max_new_tokens=12)
    assert "".join(c.content for c in chunks) == out.content
    assert chunks[-1].finish_reason == last.finish_reason
    assert last.prompt_tokens == len(pipe.tokenizer.apply_chat_template(messages))
    assert 1 <= last.completion_tokens <= 12
    if last.finish_reason == "length":
        assert last.completion_tokens == 12
