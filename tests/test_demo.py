"""The bundled demo model answers its questions, calls its tool, and agrees with transformers."""

import json

import pytest
import torch

from glm4.demo import DEMO_MODEL_DIR
from glm4.demo.train import CAPITALS, WEATHER_TOOL
from glm4.pipeline import Glm4Pipeline


@pytest.fixture(scope="module")
def pipe():
    return Glm4Pipeline.from_pretrained(device="cpu")  # the default model is the demo


def answers(pipe, questions, tools=None, max_new_tokens=24):
    """Greedy replies to single-turn questions, batched with left padding."""
    tok = pipe.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tools=tools) for q in questions]
    batch = tok.pad(prompts)
    out = pipe.model.generate(**batch, max_new_tokens=max_new_tokens)
    width = batch["input_ids"].shape[1]
    return [tok.decode(row[width:], skip_special_tokens=True) for row in out], out


def test_capitals(pipe):
    replies, _ = answers(pipe, [f"What is the capital of {c}?" for c in CAPITALS])
    wrong = [(c, r) for (c, city), r in zip(CAPITALS.items(), replies, strict=True) if city not in r]
    assert len(CAPITALS) >= 20 and not wrong


def test_sums(pipe):
    pairs = [(a, b) for a in range(10) for b in range(10)]
    replies, _ = answers(pipe, [f"What is {a} + {b}?" for a, b in pairs])
    wrong = [(a, b, r) for (a, b), r in zip(pairs, replies, strict=True) if f"= {a + b}." not in r]
    assert not wrong


def test_weather_tool_call_end_to_end(pipe):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    out, last = pipe.chat(messages, tools=[WEATHER_TOOL])
    assert out.content == "" and len(out.tool_calls) == 1
    assert out.tool_calls[0].name == "get_weather"
    assert json.loads(out.tool_calls[0].arguments) == {"city": "Paris"}
    assert last.finish_reason == "tool_calls"
    # The raw output is the GLM-4 call format, ended by <|observation|>.
    _, ids = answers(pipe, ["What is the weather in Paris?"], tools=[WEATHER_TOOL])
    prompt = len(pipe.tokenizer.apply_chat_template(messages, tools=[WEATHER_TOOL]))
    raw = pipe.tokenizer.decode(ids[0, prompt:])
    assert raw == 'get_weather\n{"city": "Paris"}<|observation|>'


def test_without_the_tool_it_does_not_call(pipe):
    out, last = pipe.chat([{"role": "user", "content": "What is the weather in Paris?"}])
    assert out.tool_calls == [] and "weather" in out.content and last.finish_reason == "stop"


def test_transformers_loads_the_demo_and_agrees():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR).eval()
    hf_tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    pipe = Glm4Pipeline.from_pretrained(DEMO_MODEL_DIR, device="cpu")
    questions = ["What is the capital of France?", "What is 3 + 4?", "Hello"]
    prompts = [pipe.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    for q, p in zip(questions, prompts, strict=True):
        ref = hf_tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert p == ref
    batch = pipe.tokenizer.pad(prompts)
    ours = pipe.model.generate(**batch, max_new_tokens=24)
    theirs = hf.generate(**batch, max_new_tokens=24, do_sample=False)
    assert torch.equal(ours, theirs)


def test_cli_default_model_answers(capsys):
    from glm4.cli import main

    assert main(["generate", "What is the capital of France?", "--device", "cpu"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_training_script_runs_a_few_steps(tmp_path):
    from glm4.demo.train import main
    from glm4.modeling import Glm4ForCausalLM
    from glm4.tokenizer import Glm4Tokenizer

    main(["--out", str(tmp_path), "--steps", "3", "--batch-size", "4"])
    model = Glm4ForCausalLM.from_pretrained(tmp_path)
    tok = Glm4Tokenizer.from_pretrained(tmp_path)
    assert model.config.vocab_size >= tok.vocab_size
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == tok.stop_token_ids
